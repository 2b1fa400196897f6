namespace Vct;

using Vct.Core.Data;
using Vct.Core.Evaluation;
using Subset = Vct.Core.Subset;

/// <summary>Options of <see cref="VctData.Synthesize"/>. Unset values keep the small defaults.</summary>
public sealed record SynthesisOptions
{
    /// <summary>"s4", "ms3" or "avss".</summary>
    public string Kind { get; init; } = "s4";
    /// <summary>Random seed: the same seed writes the same bytes.</summary>
    public int Seed { get; init; }
    /// <summary>Training / validation / test videos (null: the default 48 / 12 / 12).</summary>
    public int? Train { get; init; }
    /// <summary>Validation videos.</summary>
    public int? Val { get; init; }
    /// <summary>Test videos.</summary>
    public int? Test { get; init; }
    /// <summary>Frame side in pixels (null: 96).</summary>
    public int? Size { get; init; }
}

/// <summary>The official metrics of one video.</summary>
/// <param name="Id">The video's id.</param>
/// <param name="Frames">Frames scored.</param>
/// <param name="J">Mean Jaccard (IoU) over its frames (the official per-video value).</param>
/// <param name="F">Its F-score (beta^2 = 0.3, the official thresholds).</param>
public sealed record VideoMetrics(string Id, int Frames, double J, double F);

/// <summary>M_J and M_F of a scoring run, with the per-video values.</summary>
public sealed record ScoreResult(double MJ, double MF, IReadOnlyList<VideoMetrics> Videos, string Json);

/// <summary>Datasets and metrics for C# callers: the synthetic AVS dataset, the data check, and official scoring.</summary>
public static class VctData
{
    /// <summary>Writes the synthetic dataset under <paramref name="outputDirectory"/>; returns the subset folder.</summary>
    public static string Synthesize(string outputDirectory, SynthesisOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(outputDirectory);
        options ??= new SynthesisOptions();
        VctRuntime.Initialize();
        var kind = Subset.Parse(options.Kind);
        var d = SynthOptions.Default(kind);
        var o = new SynthOptions(kind, options.Seed, options.Train ?? d.Train, options.Val ?? d.Val, options.Test ?? d.Test,
            options.Size ?? d.Size, d.EvalSize, d.Categories, d.DistractorGain);
        return Synth.generate(o, outputDirectory).Root;
    }

    /// <summary>Validates a dataset; every problem is listed, one line each.</summary>
    public static IReadOnlyList<string> Check(string directory, int parallelism = 2)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        VctRuntime.Initialize();
        return DataCheck.run(directory, parallelism).Problems;
    }

    /// <summary>
    /// Scores saved predictions with the official metrics: <paramref name="scores"/> and <paramref name="groundTruth"/>
    /// are one .npy each ([V,T,C,H,W] float32 and [V,T,H,W] uint8) or folders of per-video pairs.
    /// </summary>
    public static ScoreResult Score(string subset, string scores, string groundTruth, bool avsbench = false)
    {
        ArgumentException.ThrowIfNullOrEmpty(scores);
        ArgumentException.ThrowIfNullOrEmpty(groundTruth);
        VctRuntime.Initialize();
        var s = Vct.Core.Evaluation.Score.run(Subset.Parse(subset), avsbench ? MetricVariant.AvsBench : MetricVariant.Vct,
            Metrics.AvssClasses, scores, groundTruth, Microsoft.FSharp.Core.FuncConvert.FromFunc<int, int, Microsoft.FSharp.Core.Unit>((_, _) => null!));
        return new ScoreResult(s.MJ, s.MF, s.Videos.Select(v => new VideoMetrics(v.Id, v.Frames, v.J, v.F)).ToList(), Vct.Core.Evaluation.Score.toJson(s));
    }
}
