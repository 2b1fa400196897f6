using System.CommandLine;

namespace Vct.Cli;

/// <summary><c>vct synth --kind s4|ms3|avss --out DIR</c>: writes the built-in synthetic AVS dataset in the official layout.</summary>
internal static class SynthCommand
{
    public static Command Create()
    {
        var kind = CommonOptions.Choice("--kind", "s4 | ms3 | avss", "s4", "s4", "ms3", "avss");
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
            var r = VctData.Synthesize(parse.GetValue(output)!, new SynthesisOptions
            {
                Kind = CommonOptions.ParseSubset(parse.GetValue(kind))!.Value,
                Seed = parse.GetValue(seed),
                Train = parse.GetValue(train),
                Val = parse.GetValue(val),
                Test = parse.GetValue(test),
                Size = parse.GetValue(size),
                Categories = parse.GetValue(categories),
            });
            var b = r.Baselines;
            Console.WriteLine($"{r.Root}: {r.Videos} videos ({r.Train} train, {r.Val} val, {r.Test} test), {r.Size}x{r.Size} frames, categories: {string.Join(", ", r.CategoryNames)}");
            Console.WriteLine($"val+test M_J / M_F: ground truth {b.GroundTruth.MJ:F3} / {b.GroundTruth.MF:F3}; audio-blind all objects {b.AllObjects.MJ:F3} / {b.AllObjects.MF:F3}; " +
                              $"audio-blind one object {b.OneObject.MJ:F3} / {b.OneObject.MF:F3}; perfect model with shuffled audio {b.ShuffledAudioOracle.MJ:F3} / {b.ShuffledAudioOracle.MF:F3}");
            return 0;
        });
        return cmd;
    }
}
