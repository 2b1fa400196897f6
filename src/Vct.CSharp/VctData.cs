namespace Vct;

using Vct.Core.Data;
using static Vct.VctTypeConversions;

/// <summary>Options of <see cref="VctData.Synthesize"/>. Unset values keep the small defaults.</summary>
public sealed record SynthesisOptions
{
    /// <summary>Which subset's layout and rules to write (S4, MS3 or AVSS).</summary>
    public VctSubset Kind { get; init; } = VctSubset.S4;
    /// <summary>Random seed: the same seed writes the same bytes.</summary>
    public int Seed { get; init; }
    /// <summary>Training videos (null: the default 48).</summary>
    public int? Train { get; init; }
    /// <summary>Validation videos (null: the default 12).</summary>
    public int? Val { get; init; }
    /// <summary>Test videos (null: the default 12).</summary>
    public int? Test { get; init; }
    /// <summary>Frame side in pixels (null: 96).</summary>
    public int? Size { get; init; }
    /// <summary>Object categories, 2..8 (null: 6 for S4/MS3, 8 for AVSS, which needs 8).</summary>
    public int? Categories { get; init; }
}

/// <summary>M_J and M_F of one way of predicting.</summary>
/// <param name="MJ">Mean Jaccard (IoU).</param>
/// <param name="MF">Mean F-score (beta^2 = 0.3).</param>
public sealed record MetricPair(double MJ, double MF);

/// <summary>Reference scores of a synthetic dataset's validation and test videos, to read a model's numbers against.</summary>
/// <param name="GroundTruth">The ground truth itself (1 / 1 unless a frame is empty).</param>
/// <param name="AllObjects">Audio-blind: every visible object in every frame.</param>
/// <param name="OneObject">Audio-blind: one visible object (the expected score of a random pick).</param>
/// <param name="ShuffledAudioOracle">A perfect audio-to-category model given another video's audio.</param>
public sealed record SynthesisBaselines(MetricPair GroundTruth, MetricPair AllObjects, MetricPair OneObject, MetricPair ShuffledAudioOracle);

/// <summary>What <see cref="VctData.Synthesize"/> wrote.</summary>
/// <param name="Root">The subset folder (pass it as the dataset root to training and evaluation).</param>
/// <param name="Kind">The subset.</param>
/// <param name="Train">Training videos written.</param>
/// <param name="Val">Validation videos written.</param>
/// <param name="Test">Test videos written.</param>
/// <param name="Size">Frame side in pixels.</param>
/// <param name="CategoryNames">Category names in id order.</param>
/// <param name="Baselines">Reference scores of the validation and test videos.</param>
public sealed record SynthesisResult(string Root, VctSubset Kind, int Train, int Val, int Test, int Size,
    IReadOnlyList<string> CategoryNames, SynthesisBaselines Baselines)
{
    /// <summary>Videos written in all splits.</summary>
    public int Videos => Train + Val + Test;
}

/// <summary>Videos of one split that a data check read without a problem.</summary>
/// <param name="Split">"train", "val" or "test".</param>
/// <param name="Videos">Readable videos.</param>
public sealed record SplitCount(string Split, int Videos);

/// <summary>The result of <see cref="VctData.Check"/>.</summary>
/// <param name="Root">The folder checked.</param>
/// <param name="Kind">The subset recognised, or null when the layout is not recognised.</param>
/// <param name="Splits">Readable videos per split.</param>
/// <param name="Problems">Every problem found, one line each, naming the file.</param>
/// <param name="Warnings">What training accepts but you should know (palette masks, short audio, empty ground truth).</param>
public sealed record DataCheckReport(string Root, VctSubset? Kind, IReadOnlyList<SplitCount> Splits, IReadOnlyList<string> Problems, IReadOnlyList<string> Warnings)
{
    /// <summary>True when no problem was found (warnings do not count).</summary>
    public bool Ok => Problems.Count == 0;
}

/// <summary>What <see cref="VctData.Prepare"/> wrote.</summary>
/// <param name="Videos">Videos written.</param>
/// <param name="Files">Files written.</param>
/// <param name="WithoutMasks">Videos without Semantic-SAM mask images (their pre_SAM_mask_384 part was not written).</param>
public sealed record PrepareResult(int Videos, int Files, IReadOnlyList<string> WithoutMasks);

/// <summary>Datasets for C# callers: the synthetic AVS dataset, the data check, and the 384 tree of the official tools.</summary>
public static class VctData
{
    /// <summary>Writes the synthetic dataset under <paramref name="outputDirectory"/> (the subset folder is created inside it).</summary>
    public static SynthesisResult Synthesize(string outputDirectory, SynthesisOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(outputDirectory);
        options ??= new SynthesisOptions();
        VctRuntime.Initialize();
        var kind = options.Kind.ToCore();
        var d = SynthOptions.Default(kind);
        var o = new SynthOptions(kind, options.Seed, options.Train ?? d.Train, options.Val ?? d.Val, options.Test ?? d.Test,
            options.Size ?? d.Size, d.EvalSize, options.Categories ?? d.Categories, d.DistractorGain);
        var report = Synth.generate(o, outputDirectory);
        var b = Core.Evaluation.SynthStats.baselines(kind, 64, report.Videos);
        static MetricPair Pair(Tuple<double, double> p) => new(p.Item1, p.Item2);
        return new SynthesisResult(report.Root, options.Kind, o.Train, o.Val, o.Test, o.Size, report.CategoryNames,
            new SynthesisBaselines(Pair(b.Oracle), Pair(b.AllObjects), Pair(b.OneObject), Pair(b.ShuffledAudioOracle)));
    }

    /// <summary>
    /// Validates a dataset the way training reads it: missing frames or masks, bad CSV columns, unknown splits,
    /// undecodable files, mask values, sizes. Every problem is listed, one line each.
    /// </summary>
    /// <param name="directory">An AVSBench subset folder (Single-source, Multi-sources, AVSBench_semantic) or a folder holding one.</param>
    /// <param name="parallelism">Videos decoded in parallel.</param>
    public static DataCheckReport Check(string directory, int parallelism = 2)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        VctRuntime.Initialize();
        var r = DataCheck.run(directory, Math.Max(1, parallelism));
        return new DataCheckReport(r.Root, r.Kind.OrNull() is { } k ? FromCore(k) : null,
            r.Videos.Select(v => new SplitCount(v.Item1, v.Item2)).ToList(), r.Problems, r.Warnings);
    }

    /// <summary>
    /// Builds the VCT 384 tree of S4 or MS3 from AVSBench-semantic as the official <c>generate_data_384</c> tools do
    /// (frames, Semantic-SAM images, ground truth re-derived from labels_rgb).
    /// </summary>
    /// <param name="subset">S4 or MS3.</param>
    /// <param name="semanticRoot">AVSBench_semantic root (metadata.csv, v1s/, v1m/, optional pre_SAM_mask/).</param>
    /// <param name="objectRoot">AVSBench_object root: the tree is written to Single-source/s4_data_384 or Multi-sources/ms3_data_384 below it.</param>
    /// <param name="log">Receives progress lines (default: none).</param>
    public static PrepareResult Prepare(VctSubset subset, string semanticRoot, string objectRoot, Action<string>? log = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(semanticRoot);
        ArgumentException.ThrowIfNullOrEmpty(objectRoot);
        if (subset == VctSubset.AVSS) throw new ArgumentException("Prepare builds the S4 or MS3 tree; AVSS reads AVSBench_semantic as it is", nameof(subset));
        VctRuntime.Initialize();
        var r = Core.Data.Prepare.objectTree(subset.ToCore(), semanticRoot, objectRoot, Fun(log));
        return new PrepareResult(r.Videos, r.Files, r.WithoutMasks.ToList());
    }
}
