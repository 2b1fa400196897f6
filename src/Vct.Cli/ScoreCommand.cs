using Vct.Core;
using Vct.Core.Platform;
using System.CommandLine;
using Vct.Core.Evaluation;

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
        var subset = new Option<string>("--subset") { Description = "s4 | ms3 (binary, C = 2 score maps) | avss (semantic, C = 71)", Required = true };
        var scores = new Option<string>("--scores") { Description = "Scores .npy [V,T,C,H,W] float32, or a folder of <id>_scores.npy [T,C,H,W]", Required = true };
        var gt = new Option<string>("--gt") { Description = "Labels .npy [V,T,H,W] uint8 (0/1 for S4/MS3, class ids and 255 for AVSS), or a folder of <id>_gt.npy [T,H,W]", Required = true };
        var avsbench = new Option<bool>("--avsbench")
        {
            Description = "Original AVSBench metric variant: S4/MS3 scores are one logit map (sigmoid), AVSS videos are padded to 10 frames",
        };
        var classes = new Option<int>("--classes") { Description = "AVSS class count", DefaultValueFactory = _ => Metrics.AvssClasses };
        var quiet = new Option<bool>("--quiet") { Description = "No progress line on stderr" };
        var cmd = new Command("score", "Score saved predictions with the official VCT (or AVSBench) metrics; prints JSON (m_j, m_f, per-video values)");
        foreach (var o in new Option[] { subset, scores, gt, avsbench, classes, quiet }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply("cpu", null);
            var sub = Subset.Parse(parse.GetValue(subset)!);
            var variant = parse.GetValue(avsbench) ? MetricVariant.AvsBench : MetricVariant.Vct;
            var showProgress = !parse.GetValue(quiet) && !Console.IsErrorRedirected;
            var summary = Score.run(sub, variant, parse.GetValue(classes), parse.GetValue(scores)!, parse.GetValue(gt)!,
                Microsoft.FSharp.Core.FuncConvert.FromFunc<int, int, Microsoft.FSharp.Core.Unit>((done, total) =>
                {
                    if (showProgress) Console.Error.Write($"\rscored {done}/{total} videos");
                    return null!;
                }));
            if (showProgress) Console.Error.WriteLine();
            Console.WriteLine(Score.toJson(summary));
            return 0;
        });
        return cmd;
    }
}
