using System.Text.RegularExpressions;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;

namespace Vct;

/// <summary>The AVSBench subsets: S4 (single sound source), MS3 (multiple sources), AVSS (semantic, 71 classes).</summary>
public enum VctSubset
{
    /// <summary>Single sound source, 5 frames of 1 s, binary masks.</summary>
    S4,
    /// <summary>Multiple sound sources, 5 frames of 1 s, binary masks.</summary>
    MS3,
    /// <summary>Semantic labels (background + 70 classes), up to 10 frames.</summary>
    AVSS,
}

/// <summary>What pre-SAM models do on inputs without Semantic-SAM mask images.</summary>
public enum MissingMasksPolicy
{
    /// <summary>Refuse with a message that explains the choice (default).</summary>
    Refuse,
    /// <summary>Feed a black mask image (runs, less accurate).</summary>
    Blank,
    /// <summary>Skip the mask-prior branch (runs, less accurate).</summary>
    Skip,
}

/// <summary>Numeric precision of inference.</summary>
public enum VctPrecision
{
    /// <summary>float32 everywhere (default; the precision the goldens are checked in).</summary>
    Float32,
    /// <summary>bfloat16 for the large matrix products (CPUs with AVX-512 BF16, recent GPUs).</summary>
    BFloat16,
    /// <summary>float16 for the large matrix products (CUDA).</summary>
    Float16,
}

/// <summary>A split of an AVSBench-layout dataset.</summary>
public enum VctSplit
{
    /// <summary>The training split.</summary>
    Train,
    /// <summary>The validation split.</summary>
    Val,
    /// <summary>The test split.</summary>
    Test,
}

/// <summary>The metric definitions <see cref="VctEvaluator.Score"/> can apply.</summary>
public enum MetricVariant
{
    /// <summary>VCT's evaluators (the numbers of the VCT paper): S4/MS3 foreground from a 2-class softmax; AVSS real frames only.</summary>
    Vct,
    /// <summary>The original AVSBench scripts: S4/MS3 foreground = sigmoid of one logit map; AVSS videos padded to 10 frames.</summary>
    AvsBench,
}

/// <summary>Device names the facade accepts: <c>auto</c> (CUDA when available), <c>cpu</c>, <c>cuda</c> or <c>cuda:N</c>.</summary>
public static class VctDevices
{
    /// <summary>The fixed names (besides <c>cuda:N</c>), as the CLI lists them.</summary>
    public static IReadOnlyList<string> Names { get; } = ["auto", "cpu", "cuda"];

    /// <summary>True when <paramref name="device"/> is <c>auto</c>, <c>cpu</c>, <c>cuda</c> or <c>cuda:N</c> (any case).</summary>
    public static bool IsValid(string? device) =>
        device is not null && Regex.IsMatch(device.Trim(), @"^(auto|cpu|cuda(:\d{1,3})?)$", RegexOptions.IgnoreCase);

    /// <summary>Returns <paramref name="device"/>, or throws <see cref="ArgumentException"/> naming it when it is not a device name.</summary>
    public static string Validate(string? device) =>
        IsValid(device) ? device!.Trim() : throw new ArgumentException($"unknown device '{device}': expected auto, cpu, cuda or cuda:N");
}

/// <summary>
/// Every conversion between the facade's C# types and Vct.Core's F# types: the one place that knows both
/// vocabularies (subsets, policies, options, lists, callbacks).
/// </summary>
internal static class VctTypeConversions
{
    internal static Core.Subset ToCore(this VctSubset s) => s switch
    {
        VctSubset.S4 => Core.Subset.S4,
        VctSubset.MS3 => Core.Subset.MS3,
        VctSubset.AVSS => Core.Subset.AVSS,
        _ => throw new ArgumentOutOfRangeException(nameof(s), s, "not a subset"),
    };

    internal static VctSubset FromCore(Core.Subset s) =>
        s.IsS4 ? VctSubset.S4 : s.IsMS3 ? VctSubset.MS3 : VctSubset.AVSS;

    /// <summary>The lower-case name the core and the CLI use ("s4", "ms3", "avss").</summary>
    internal static string Name(this VctSubset s) => s.ToString().ToLowerInvariant();

    /// <summary>The audio example rule of a subset; null: every whole example, no clipping or padding.</summary>
    internal static FSharpOption<Core.Subset> ToAudioRule(VctSubset? s) => OptRef(s?.ToCore());

    internal static string Name(this VctSplit s) => s.ToString().ToLowerInvariant();

    internal static Core.Evaluation.MetricVariant ToCore(this MetricVariant v) =>
        v == MetricVariant.AvsBench ? Core.Evaluation.MetricVariant.AvsBench : Core.Evaluation.MetricVariant.Vct;

    internal static Core.Fusion.MissingMasks ToCore(this MissingMasksPolicy m) => m switch
    {
        MissingMasksPolicy.Refuse => Core.Fusion.MissingMasks.Refuse,
        MissingMasksPolicy.Blank => Core.Fusion.MissingMasks.BlankMaskImage,
        MissingMasksPolicy.Skip => Core.Fusion.MissingMasks.SkipBranch,
        _ => throw new ArgumentOutOfRangeException(nameof(m), m, "not a missing-masks policy"),
    };

    internal static Core.Platform.Precision ToCore(this VctPrecision p) => p switch
    {
        VctPrecision.Float32 => Core.Platform.Precision.Float32,
        VctPrecision.BFloat16 => Core.Platform.Precision.BFloat16,
        VctPrecision.Float16 => Core.Platform.Precision.Float16,
        _ => throw new ArgumentOutOfRangeException(nameof(p), p, "not a precision"),
    };

    /// <summary>
    /// Checks that the core can run <paramref name="p"/> on <paramref name="device"/> (Platform/Precision.fs): bf16 on a
    /// CPU with native bfloat16 instructions or on CUDA, fp16 on CUDA; elsewhere a one-line NotSupportedException.
    /// </summary>
    internal static void CheckPrecision(VctPrecision p, TorchSharp.torch.Device device) =>
        Core.Platform.PrecisionModule.ensureSupported(device, p.ToCore());

    // Options and results of the facade's classes.
    internal static Core.Audio.ExampleOptions ToCore(this AudioExampleOptions o)
    {
        var d = Core.Audio.ExampleOptions.Default(ToAudioRule(o.Subset));
        return new Core.Audio.ExampleOptions(d.Subset, o.ZeroPadShortClips ? Core.Audio.ShortClip.ZeroPad : Core.Audio.ShortClip.Error,
            o.OfficialInt16 ? Core.Audio.SampleScaling.OfficialInt16 : Core.Audio.SampleScaling.Exact,
            o.Float32Stft ? TorchSharp.torch.ScalarType.Float32 : TorchSharp.torch.ScalarType.Float64);
    }

    internal static Core.Video.FrameSource ToCore(this PredictInput i) =>
        i.Video is not null ? Core.Video.FrameSource.NewVideoFile(i.Video) : Core.Video.FrameSource.NewImages(ListModule.OfSeq(i.Images!));

    internal static Core.Video.VideoOptions ToCore(this VideoOptions o, SegmenterOptions segmenter) => new(
        o.Fps, o.BatchFrames, OptRef(o.Audio), o.SilenceWhenNoAudio ? Core.Video.AudioMissing.Silence : Core.Video.AudioMissing.Refuse,
        OptRef(o.PreMasks), segmenter.MissingMasks.ToCore(), segmenter.Precision.ToCore());

    internal static VideoProgress FromCore(this Core.Video.VideoProgress p) => new(p.Frames, p.TotalFrames, p.Elapsed, p.FramesPerSecond);

    internal static CheckpointLoadReport FromCore(this Core.Checkpoint.LoadReport r) => new(
        r.Loaded.ToList(), r.Missing.ToList(), r.Unexpected.ToList(),
        r.ShapeMismatched.Select(m => $"{m.Key}: model [{string.Join(", ", m.Expected)}], file [{string.Join(", ", m.Got)}]").ToList(),
        r.Dropped.ToList(), r.Converted.Select(c => $"{c.Key}: {c.From} -> {c.To}").ToList(),
        r.DtypeMismatched.Select(m => $"{m.Key}: model {m.Expected}, file {m.Got}").ToList());

    internal static Core.Training.TrainJobOptions ToCore(this TrainOptions o, TorchSharp.torch.Device device)
    {
        if (!Enum.IsDefined(o.Preset)) throw new ArgumentException($"Preset must be Tiny, S4, MS3 or AVSS, got '{o.Preset}'", nameof(o));
        var preset = o.Preset.ToString().ToLowerInvariant();
        var name = string.IsNullOrWhiteSpace(o.Name) ? $"{preset}-{DateTime.Now:yyyyMMdd-HHmmss}" : o.Name;
        return new Core.Training.TrainJobOptions(preset, OptText(o.Data), o.RunsFolder, name, Opt(o.Iterations), Opt(o.BatchVideos),
            Opt(o.LearningRate), o.Seed, o.Resume, device, o.Workers, Opt(o.EvalPeriod), OptText(o.SwinWeights), OptText(o.VggishWeights),
            o.MissingMasks.ToCore(), o.MixedPrecision);
    }

    internal static FSharpOption<T> Opt<T>(T? v) where T : struct => v is T x ? FSharpOption<T>.Some(x) : FSharpOption<T>.None;
    internal static FSharpOption<T> OptRef<T>(T? v) where T : class => v is null ? FSharpOption<T>.None : FSharpOption<T>.Some(v);
    internal static FSharpOption<string> OptText(string? v) => string.IsNullOrWhiteSpace(v) ? FSharpOption<string>.None : FSharpOption<string>.Some(v);
    internal static T? OrNull<T>(this FSharpOption<T>? o) where T : class => FSharpOption<T>.get_IsSome(o) ? o!.Value : null;
    internal static T? OrNullValue<T>(this FSharpOption<T>? o) where T : struct => FSharpOption<T>.get_IsSome(o) ? o!.Value : null;
    internal static FSharpList<T> ToFSharpList<T>(this IEnumerable<T> xs) => ListModule.OfSeq(xs);
    internal static FSharpFunc<T, Unit> Fun<T>(Action<T>? a) => FuncConvert.FromAction(a ?? (_ => { }));
}
