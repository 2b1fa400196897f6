using System.CommandLine;

namespace Vct.Cli;

/// <summary>
/// <c>vct score --subset s4|ms3|avss --scores PATH --gt PATH [--avsbench]</c>: scores saved predictions with the
/// official metrics (M_J, M_F) and prints JSON. PATH is one .npy with all videos (scores [V,T,C,H,W] float32,
/// labels [V,T,H,W] uint8) or a folder of per-video <c>&lt;id&gt;_scores.npy</c> / <c>&lt;id&gt;_gt.npy</c> pairs.
/// </summary>
internal static class ScoreCommand
{
    public static Command Create()
    {
        var subset = CommonOptions.Subset("s4 | ms3 (binary, C = 2 score maps) | avss (semantic, C = 71)", required: true);
        var scores = new Option<string>("--scores") { Description = "Scores .npy [V,T,C,H,W] float32, or a folder of <id>_scores.npy [T,C,H,W]", Required = true };
        var gt = new Option<string>("--gt") { Description = "Labels .npy [V,T,H,W] uint8 (0/1 for S4/MS3, class ids and 255 for AVSS), or a folder of <id>_gt.npy [T,H,W]", Required = true };
        var avsbench = new Option<bool>("--avsbench")
        {
            Description = "Original AVSBench metric variant: S4/MS3 scores are one logit map (sigmoid), AVSS videos are padded to 10 frames",
        };
        var classes = new Option<int>("--classes") { Description = "AVSS class count", DefaultValueFactory = _ => new ScoreOptions().Classes };
        var quiet = new Option<bool>("--quiet") { Description = "No progress line on stderr" };
        var cmd = new Command("score", "Score saved predictions with the official VCT (or AVSBench) metrics; prints JSON (m_j, m_f, per-video values)");
        foreach (var o in new Option[] { subset, scores, gt, avsbench, classes, quiet }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            var showProgress = !parse.GetValue(quiet) && !Console.IsErrorRedirected;
            var options = new ScoreOptions
            {
                Variant = parse.GetValue(avsbench) ? MetricVariant.AvsBench : MetricVariant.Vct,
                Classes = parse.GetValue(classes),
            };
            var summary = VctEvaluator.Score(CommonOptions.ParseSubset(parse.GetValue(subset))!.Value, parse.GetValue(scores)!, parse.GetValue(gt)!, options,
                showProgress ? new SyncProgress<ScoreProgress>(p => Console.Error.Write($"\rscored {p.Done}/{p.Total} videos")) : null);
            if (showProgress) Console.Error.WriteLine();
            Console.WriteLine(summary.Json);
            return 0;
        });
        return cmd;
    }
}
