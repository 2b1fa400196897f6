using Vct.Core;
using Vct.Core.Platform;
using System.CommandLine;
using Vct.Core.Data;
using Vct.Core.Evaluation;

namespace Vct.Cli;

/// <summary><c>vct synth --kind s4|ms3|avss --out DIR</c>: writes the built-in synthetic AVS dataset in the official layout.</summary>
internal static class SynthCommand
{
    public static Command Create()
    {
        var kind = new Option<string>("--kind") { Description = "s4 | ms3 | avss", DefaultValueFactory = _ => "s4" };
        var output = new Option<string>("--out") { Description = "Output folder (the subset folder is created inside it)", Required = true };
        var seed = new Option<int>("--seed") { Description = "Random seed (same seed, same bytes)", DefaultValueFactory = _ => 0 };
        var train = new Option<int?>("--train") { Description = "Training videos" };
        var val = new Option<int?>("--val") { Description = "Validation videos" };
        var test = new Option<int?>("--test") { Description = "Test videos" };
        var size = new Option<int?>("--size") { Description = "Frame side in pixels" };
        var categories = new Option<int?>("--categories") { Description = "Object categories (2..8; AVSS needs 8)" };
        var cmd = new Command("synth", "Write the built-in synthetic audio-visual segmentation dataset (AVSBench layout) and print its baselines");
        foreach (var o in new Option[] { kind, output, seed, train, val, test, size, categories }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            VctRuntime.Initialize();
            var k = Subset.Parse(parse.GetValue(kind)!);
            var d = SynthOptions.Default(k);
            var o = new SynthOptions(k, parse.GetValue(seed), parse.GetValue(train) ?? d.Train, parse.GetValue(val) ?? d.Val,
                parse.GetValue(test) ?? d.Test, parse.GetValue(size) ?? d.Size, d.EvalSize, parse.GetValue(categories) ?? d.Categories, d.DistractorGain);
            var report = Synth.generate(o, parse.GetValue(output)!);
            var b = SynthStats.baselines(k, 64, report.Videos);
            Console.WriteLine($"{report.Root}: {report.Videos.Length} videos ({o.Train} train, {o.Val} val, {o.Test} test), {o.Size}x{o.Size} frames, categories: {string.Join(", ", report.CategoryNames)}");
            Console.WriteLine($"val+test M_J / M_F: ground truth {b.Oracle.Item1:F3} / {b.Oracle.Item2:F3}; audio-blind all objects {b.AllObjects.Item1:F3} / {b.AllObjects.Item2:F3}; " +
                              $"audio-blind one object {b.OneObject.Item1:F3} / {b.OneObject.Item2:F3}; perfect model with shuffled audio {b.ShuffledAudioOracle.Item1:F3} / {b.ShuffledAudioOracle.Item2:F3}");
            return 0;
        });
        return cmd;
    }
}
