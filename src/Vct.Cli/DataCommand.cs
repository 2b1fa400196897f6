using System.CommandLine;
using Vct.Core.Data;

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
            VctRuntime.Initialize();
            var report = DataCheck.run(parse.GetValue(dir)!, parse.GetValue(jobs));
            var kind = report.Kind is null ? "unknown" : report.Kind.Value.ToString();
            var videos = string.Join(", ", report.Videos.Select(v => $"{v.Item1} {v.Item2}"));
            Console.WriteLine($"{report.Root}: {kind} dataset; videos: {(videos.Length > 0 ? videos : "none")}");
            foreach (var p in report.Problems) Console.WriteLine($"error: {p}");
            Console.WriteLine(report.Ok ? "OK" : $"{report.Problems.Length} problem(s)");
            return report.Ok ? 0 : 2;
        });
        var data = new Command("data", "Dataset tools");
        data.Subcommands.Add(check);
        return data;
    }
}
