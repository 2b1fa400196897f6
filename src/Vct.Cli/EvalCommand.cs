using System.CommandLine;

namespace Vct.Cli;

/// <summary><c>vct eval</c>: a checkpoint on a dataset split with the official metrics; per-video CSV and a summary JSON.</summary>
internal static class EvalCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "Vct .safetensors or official .pth (then --subset), or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var subset = CommonOptions.Subset("s4 | ms3 | avss (default: the checkpoint's)");
        var data = new Option<string>("--data") { Description = "Dataset root in the official AVSBench layout", Required = true };
        var split = CommonOptions.Choice("--split", "train | val | test", "test", "train", "val", "test");
        var output = new Option<string>("--out") { Description = "Output folder for per_video.csv and summary.json", Required = true };
        var shuffled = new Option<bool>("--audio-shuffled") { Description = "Also evaluate with each video's audio swapped for another's (a listening control)" };
        var workers = new Option<int>("--workers") { Description = "Decoding workers", DefaultValueFactory = _ => Environment.ProcessorCount };
        var precision = CommonOptions.Precision();
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("eval", "Evaluate a checkpoint on a dataset split with the official VCT metrics (M_J, M_F)");
        foreach (var o in new Option[] { checkpoint, subset, data, split, output, shuffled, workers, precision, device, threads }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply(parse.GetValue(threads));
            var reference = parse.GetValue(checkpoint)!;
            var options = new EvaluationOptions
            {
                Split = Enum.Parse<VctSplit>(parse.GetValue(split)!, ignoreCase: true),
                Subset = CommonOptions.ParseSubset(parse.GetValue(subset)) ?? VctWeights.SubsetOf(reference),
                AudioShuffled = parse.GetValue(shuffled),
                Workers = parse.GetValue(workers),
                Device = parse.GetValue(device)!,
                Precision = CommonOptions.ParsePrecision(parse.GetValue(precision)!),
            };
            // The summary names the checkpoint as it was given (a hub reference stays one).
            var result = VctEvaluator.Evaluate(WeightsCommand.Resolve(reference)!, parse.GetValue(data)!, options, line => Console.Error.WriteLine(line))
                with { Checkpoint = reference };
            result.Save(parse.GetValue(output)!);
            Console.WriteLine(result.ToJson());
            return 0;
        });
        return cmd;
    }
}
