using Microsoft.FSharp.Core;
using TorchSharp;
using Vct.Core;

namespace Vct;

/// <summary>Inference options. Unset values keep the released models' behaviour.</summary>
public sealed record SegmenterOptions
{
    /// <summary>"auto" (CUDA when available), "cpu", "cuda" or "cuda:N".</summary>
    public string Device { get; init; } = "auto";

    /// <summary>"s4", "ms3" or "avss": required for official PyTorch checkpoints (.pth), ignored for Vct checkpoints.</summary>
    public string? Subset { get; init; }

    /// <summary>Side of the output maps; null keeps the model's (224 for the released models).</summary>
    public int? OutputSize { get; init; }

    /// <summary>Also return the PPQG assignment, the decoder's attention masks and prototype similarities.</summary>
    public bool Intermediates { get; init; }

    /// <summary>What a pre-SAM model does without mask images: "refuse" (default), "blank" or "skip".</summary>
    public string MissingMasks { get; init; } = "refuse";
}

/// <summary>The segmentation of one video; CPU tensors, dispose to free them.</summary>
public sealed class SegmentationResult : IDisposable
{
    private readonly Segmentation _inner;
    internal SegmentationResult(Segmentation inner) => _inner = inner;

    /// <summary>Semantic scores [T, C, S, S].</summary>
    public torch.Tensor Scores => _inner.Scores;

    /// <summary>S4/MS3: bool foreground masks [T, S, S]; AVSS: int64 class maps [T, S, S].</summary>
    public torch.Tensor Masks => _inner.Masks;

    /// <summary>Class probabilities of the queries [T, N, C+1].</summary>
    public torch.Tensor ClassProbabilities => _inner.ClassProbabilities;

    /// <summary>PPQG: the query each mask-feature pixel belongs to, int64 [T, H/4, W/4]; null unless requested.</summary>
    public torch.Tensor? PixelToQuery => FSharpOption<SegmentationMaps>.get_IsSome(_inner.Maps) ? _inner.Maps.Value.PixelToQuery : null;

    /// <summary>Audio-prototype cosine similarities [T, K] (S4, AVSS); null unless requested or for MS3.</summary>
    public torch.Tensor? PrototypeSimilarity =>
        FSharpOption<SegmentationMaps>.get_IsSome(_inner.Maps) && FSharpOption<torch.Tensor>.get_IsSome(_inner.Maps.Value.PrototypeSimilarity)
            ? _inner.Maps.Value.PrototypeSimilarity.Value : null;

    /// <summary>Decoder attention masks, one per layer [T*heads, N, h*w]; empty unless requested.</summary>
    public IReadOnlyList<torch.Tensor> AttentionMasks =>
        FSharpOption<SegmentationMaps>.get_IsSome(_inner.Maps) ? _inner.Maps.Value.AttentionMasks.ToList() : Array.Empty<torch.Tensor>();

    /// <inheritdoc />
    public void Dispose() => ((IDisposable)_inner).Dispose();
}

/// <summary>Segments the sounding objects of videos with a VCT model. One instance per thread.</summary>
public sealed class VctSegmenter : IDisposable
{
    private readonly VctModel _model;
    private readonly SegmenterOptions _options;

    private VctSegmenter(VctModel model, SegmenterOptions options) => (_model, _options) = (model, options);

    /// <summary>The checkpoint's load report (missing, unexpected, dropped keys).</summary>
    public Vct.Core.Checkpoint.LoadReport LoadReport { get; private init; } = null!;

    /// <summary>"S4", "MS3" or "AVSS".</summary>
    public string Subset => _model.Config.Subset.ToString();

    /// <summary>Loads a Vct checkpoint (.safetensors) or an official one (.pth, with <see cref="SegmenterOptions.Subset"/>).</summary>
    public static VctSegmenter Load(string checkpointPath, SegmenterOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(checkpointPath);
        options ??= new SegmenterOptions();
        VctRuntime.Initialize();
        var device = VctRuntime.ResolveDevice(options.Device);
        var subset = string.IsNullOrWhiteSpace(options.Subset) ? FSharpOption<Core.Subset>.None : FSharpOption<Core.Subset>.Some(Core.Subset.Parse(options.Subset));
        var (model, report) = Inference.loadModel(checkpointPath, subset, device).ToValueTuple();
        model.MissingMasks = options.MissingMasks.ToLowerInvariant() switch
        {
            "refuse" => Core.Backbone.MissingMasks.Refuse,
            "blank" => Core.Backbone.MissingMasks.BlankMaskImage,
            "skip" => Core.Backbone.MissingMasks.SkipBranch,
            var other => throw new ArgumentException($"MissingMasks must be refuse, blank or skip, got '{other}'", nameof(options)),
        };
        return new VctSegmenter(model, options) { LoadReport = report };
    }

    /// <summary>The audio examples of a file under the model's subset rules ([T_a, 1, 96, 64]) and, for AVSS, the temporal flags.</summary>
    public (torch.Tensor Examples, torch.Tensor? Flags) AudioExamples(string audioPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(audioPath);
        var (examples, flags) = Inference.audioExamples(_model.Config.Subset, audioPath).ToValueTuple();
        return (examples, FSharpOption<torch.Tensor>.get_IsSome(flags) ? flags.Value : null);
    }

    /// <summary>frames: [T, 3, H, W] RGB 0..255; audioLogMel: [T_a, 1, 96, 64]; preMasks: [T, 3, H, W] 0..255 or null.</summary>
    public SegmentationResult Segment(torch.Tensor frames, torch.Tensor audioLogMel, torch.Tensor? preMasks = null, torch.Tensor? temporalFlags = null)
    {
        ArgumentNullException.ThrowIfNull(frames);
        ArgumentNullException.ThrowIfNull(audioLogMel);
        var input = new VideoInput(
            frames, audioLogMel,
            preMasks is null ? FSharpOption<torch.Tensor>.None : FSharpOption<torch.Tensor>.Some(preMasks),
            temporalFlags is null ? FSharpOption<torch.Tensor>.None : FSharpOption<torch.Tensor>.Some(temporalFlags));
        var opts = new SegmentOptions(_options.Intermediates,
            _options.OutputSize is int s ? FSharpOption<long>.Some(s) : FSharpOption<long>.None);
        return new SegmentationResult(Inference.segment(_model, opts, input));
    }

    /// <inheritdoc />
    public void Dispose() => _model.Dispose();
}
