using System.CommandLine;

namespace Vct.Cli;

/// <summary><c>vct data check DIR</c>: validates an AVSBench-layout dataset and reports every problem at once.</summary>
internal static class DataCommand
{
    public static Command Create()
    {
        var dir = new Argument<string>("dir") { Description = "An AVSBench subset folder (Single-source, Multi-sources, AVSBench_semantic) or a folder holding one" };
        var jobs = new Option<int>("--jobs") { Description = "Videos decoded in parallel", DefaultValueFactory = _ => Environment.ProcessorCount };
        var check = new Command("check", "Validate a dataset: missing frames or masks, bad CSV columns, unknown splits, undecodable files, mask values, sizes");
        check.Arguments.Add(dir);
        check.Options.Add(jobs);
        check.SetAction(parse =>
        {
            var report = VctData.Check(parse.GetValue(dir)!, parse.GetValue(jobs));
            var kind = report.Kind?.ToString() ?? "unknown";
            var videos = string.Join(", ", report.Splits.Select(v => $"{v.Split} {v.Videos}"));
            Console.WriteLine($"{report.Root}: {kind} dataset; videos: {(videos.Length > 0 ? videos : "none")}");
            foreach (var p in report.Problems) Console.WriteLine($"error: {p}");
            foreach (var w in report.Warnings) Console.WriteLine($"warning: {w}");
            Console.WriteLine(report.Ok ? "OK" : $"{report.Problems.Count} problem(s)");
            return report.Ok ? 0 : 2;
        });
        var subset = new Argument<string>("subset") { Description = "s4 | ms3" };
        subset.AcceptOnlyFromAmong("s4", "ms3");
        var semantic = new Option<string>("--semantic") { Description = "AVSBench_semantic root (metadata.csv, v1s/, v1m/, optional pre_SAM_mask/)", Required = true };
        var objectRoot = new Option<string>("--object") { Description = "AVSBench_object root: the 384 tree is written to Single-source/s4_data_384 or Multi-sources/ms3_data_384 below it (S4 reads Single-source/s4_meta_data.csv for the categories)", Required = true };
        var prepare = new Command("prepare", "Build the VCT 384 tree of S4 or MS3 from AVSBench-semantic as the official generate_data_384 tools do (frames, Semantic-SAM images, GT re-derived from labels_rgb)");
        prepare.Arguments.Add(subset);
        prepare.Options.Add(semantic);
        prepare.Options.Add(objectRoot);
        prepare.SetAction(parse =>
        {
            var report = VctData.Prepare(CommonOptions.ParseSubset(parse.GetValue(subset))!.Value, parse.GetValue(semantic)!, parse.GetValue(objectRoot)!,
                line => Console.Error.WriteLine(line));
            Console.WriteLine($"{report.Videos} video(s), {report.Files} file(s) written");
            foreach (var v in report.WithoutMasks) Console.WriteLine($"warning: {v}: no Semantic-SAM mask images; pre_SAM_mask_384 not written");
            return 0;
        });
        var data = new Command("data", "Dataset tools");
        data.Subcommands.Add(check);
        data.Subcommands.Add(prepare);
        return data;
    }
}
