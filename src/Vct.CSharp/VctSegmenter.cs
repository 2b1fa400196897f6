using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using TorchSharp;
using Vct.Core;
using Vct.Core.Platform;

namespace Vct;

/// <summary>Inference options. Unset values keep the released models' behaviour.</summary>
public sealed record SegmenterOptions
{
    /// <summary>"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; anything else is refused when set.</summary>
    public string Device { get; init => field = VctDevices.Validate(value); } = "auto";

    /// <summary>Numeric precision of the forward pass (default float32). bf16 runs the products in bfloat16 under LibTorch's
    /// autocast (a CPU with AVX-512 BF16 or AMX, or CUDA); fp16 needs CUDA. Where the device cannot, <see cref="VctSegmenter.Load"/>
    /// refuses it with a one-line <see cref="NotSupportedException"/>. Outputs are float32 always.</summary>
    public VctPrecision Precision { get; init; } = VctPrecision.Float32;

    /// <summary>The released configuration of an official PyTorch checkpoint (.pth): required for those, ignored for Vct checkpoints.</summary>
    public VctSubset? Subset { get; init; }

    /// <summary>Side of the output maps; null keeps the model's (224 for the released models).</summary>
    public int? OutputSize { get; init; }

    /// <summary>Also return the PPQG assignment, the decoder's attention masks and prototype similarities.</summary>
    public bool Intermediates { get; init; }

    /// <summary>What a pre-SAM model does without mask images.</summary>
    public MissingMasksPolicy MissingMasks { get; init; } = MissingMasksPolicy.Refuse;
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
    public CheckpointLoadReport LoadReport { get; private init; } = null!;

    /// <summary>The model's subset (S4, MS3 or AVSS).</summary>
    public VctSubset Subset => VctTypeConversions.FromCore(_model.Config.Subset);

    /// <summary>The options this segmenter was loaded with.</summary>
    public SegmenterOptions Options => _options;

    /// <summary>
    /// Loads a Vct checkpoint (.safetensors) or an official one (.pth, with <see cref="SegmenterOptions.Subset"/>).
    /// <paramref name="checkpointPath"/> may also be a hub reference (<c>hf:owner/repo/path</c>, an http(s) URL or a
    /// released name such as <c>s4</c>): it is resolved through <see cref="VctWeights.Resolve(string, IProgress{DownloadProgress}?, CancellationToken)"/> first.
    /// </summary>
    public static VctSegmenter Load(string checkpointPath, SegmenterOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(checkpointPath);
        options ??= new SegmenterOptions();
        VctRuntime.Initialize();
        VctTypeConversions.CheckPrecision(options.Precision, VctRuntime.ResolveDevice(options.Device));
        var (model, report, path) = ModelLoading.Load(checkpointPath, options.Subset, options.Device);
        model.MissingMasks = options.MissingMasks.ToCore();
        return new VctSegmenter(model, options) { LoadReport = report, CheckpointPath = path };
    }

    /// <summary>The audio examples of a file under the model's subset rules ([T_a, 1, 96, 64]) and, for AVSS, the temporal flags.</summary>
    public AudioExamples AudioExamples(string audioPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(audioPath);
        var (examples, flags) = Inference.audioExamples(_model.Config.Subset, audioPath).ToValueTuple();
        return new AudioExamples(examples, FSharpOption<torch.Tensor>.get_IsSome(flags) ? flags.Value : null);
    }

    /// <summary>frames: [T, 3, H, W] RGB 0..255; audioLogMel: [T_a, 1, 96, 64]; preMasks: [T, 3, H, W] 0..255 or null.</summary>
    public SegmentationResult Segment(torch.Tensor frames, torch.Tensor audioLogMel, torch.Tensor? preMasks = null, torch.Tensor? temporalFlags = null)
    {
        ArgumentNullException.ThrowIfNull(frames);
        ArgumentNullException.ThrowIfNull(audioLogMel);
        var input = new VctInputs(
            frames,
            preMasks is null ? FSharpOption<torch.Tensor>.None : FSharpOption<torch.Tensor>.Some(preMasks),
            AudioInput.NewLogMel(audioLogMel,
                temporalFlags is null ? FSharpOption<torch.Tensor>.None : FSharpOption<torch.Tensor>.Some(temporalFlags)));
        var opts = new SegmentOptions(_options.Intermediates,
            _options.OutputSize is int s ? OutputSize.NewSize(s, s) : OutputSize.Model, _options.Precision.ToCore());
        return new SegmentationResult(Inference.segment(_model, opts, input));
    }

    /// <summary>
    /// Segments a video file (any container and codec ffmpeg reads): frames sampled by timestamp at
    /// <see cref="VideoOptions.Fps"/> per second, audio from its first track (or <see cref="VideoOptions.Audio"/>),
    /// masks at the source resolution. The result holds every frame's mask in memory; for long videos use
    /// <see cref="Predict"/>, which streams to a folder.
    /// </summary>
    public VideoSegmentation SegmentVideo(string path, VideoOptions? options = null, IProgress<VideoProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return Collect(Core.Video.FrameSource.NewVideoFile(path), options ?? new VideoOptions(), progress, cancellationToken, path);
    }

    /// <summary>Segments images (in the given order, shown <see cref="VideoOptions.Fps"/> per second) with the audio of a file.</summary>
    public VideoSegmentation SegmentImages(IEnumerable<string> frames, string audio, VideoOptions? options = null, IProgress<VideoProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(frames);
        ArgumentException.ThrowIfNullOrEmpty(audio);
        var list = frames.ToList();
        if (list.Count == 0) throw new ArgumentException("no frames given", nameof(frames));
        var opts = (options ?? new VideoOptions()) with { Audio = audio };
        return Collect(Core.Video.FrameSource.NewImages(ListModule.OfSeq(list)), opts, progress, cancellationToken, null);
    }

    /// <summary>
    /// The <c>vct predict</c> job: segments a video (or images) and writes <c>masks/NNNNNN.png</c>, <c>overlay.mp4</c>,
    /// <c>summary.json</c> and optionally <c>scores/NNNNNN.npy</c> under <paramref name="outputFolder"/>, streaming (memory does not
    /// grow with the video's length). Cancelling stops after the current batch; what was written stays valid.
    /// </summary>
    public PredictSummary Predict(PredictInput input, string outputFolder, VideoOptions? options = null, PredictOutputOptions? outputs = null,
        IProgress<VideoProgress>? progress = null, Action<string>? warn = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentException.ThrowIfNullOrEmpty(outputFolder);
        var opts = options ?? new VideoOptions();
        var outs = outputs ?? new PredictOutputOptions();
        var core = new Core.Video.PredictOutputs(outputFolder, outs.SaveScores, outs.Overlay, CheckpointPath, DeviceName);
        var prog = progress is null ? FSharpOption<IProgress<Core.Video.VideoProgress>>.None
            : FSharpOption<IProgress<Core.Video.VideoProgress>>.Some(new SyncProgress<Core.Video.VideoProgress>(p => progress.Report(p.FromCore())));
        var w = warn ?? (line => Console.Error.WriteLine(line));
        var r = Core.Video.Predict.run(_model, opts.ToCore(_options), input.ToCore(), core, prog, FuncConvert.FromAction(w), cancellationToken);
        return new PredictSummary(r.OutputDir, r.Frames, r.Interrupted, FSharpOption<string>.get_IsSome(r.Overlay) ? r.Overlay.Value : null,
            r.Summary, r.Warnings.ToList(), r.Seconds);
    }

    private VideoSegmentation Collect(Core.Video.FrameSource source, VideoOptions options, IProgress<VideoProgress>? progress, CancellationToken ct, string? videoPath)
    {
        var warnings = new List<string>();
        var frames = new List<FrameSegmentation>();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var seq = Core.Video.VideoSegmentation.segment(_model, options.ToCore(_options), source, FuncConvert.FromAction<string>(warnings.Add), ct);
        foreach (var f in seq)
        {
            frames.Add(new FrameSegmentation(f, keepFrame: videoPath is null));
            var s = clock.Elapsed.TotalSeconds;
            progress?.Report(new VideoProgress(frames.Count, 0, clock.Elapsed, s > 0 ? frames.Count / s : 0));
        }
        return new VideoSegmentation(_model.Config.Subset, frames, warnings, videoPath, options.Fps, options.Audio);
    }

    private string CheckpointPath { get; init; } = "";
    private string DeviceName => _model.parameters().First().device.ToString();

    /// <inheritdoc />
    public void Dispose() => _model.Dispose();
}

/// <summary>What <see cref="VctSegmenter.Predict"/> reads: a video file, or images with an audio file.</summary>
public sealed record PredictInput
{
    private PredictInput(string? video, IReadOnlyList<string>? images) => (Video, Images) = (video, images);
    /// <summary>The video file, or null for image input.</summary>
    public string? Video { get; }
    /// <summary>The image files in order, or null for video input.</summary>
    public IReadOnlyList<string>? Images { get; }
    /// <summary>A video file (its first audio track is used unless <see cref="VideoOptions.Audio"/> is set).</summary>
    public static PredictInput FromVideo(string path) => new(path, null);
    /// <summary>Image files in this order (set <see cref="VideoOptions.Audio"/>).</summary>
    public static PredictInput FromImages(IEnumerable<string> paths) => new(null, paths.ToList());
}

/// <summary>Options of video segmentation.</summary>
public sealed record VideoOptions
{
    /// <summary>Frames segmented per second of video (1 = AVSBench's sampling: the frame 15/16 of the way through each second).</summary>
    public double Fps { get; init; } = 1.0;
    /// <summary>Frames per forward pass (results do not depend on it; VCT has no cross-frame interaction).</summary>
    public int BatchFrames { get; init; } = 5;
    /// <summary>An audio file to use instead of the video's own track (required for images).</summary>
    public string? Audio { get; init; }
    /// <summary>Go on with digital-silence examples when there is no audio (default: refuse).</summary>
    public bool SilenceWhenNoAudio { get; init; }
    /// <summary>A folder of Semantic-SAM mask images by frame name (<c>NNNNNN_mask_color.png</c> or <c>&lt;image name&gt;_mask_color.png</c>).</summary>
    public string? PreMasks { get; init; }
}

/// <summary>What <see cref="VctSegmenter.Predict"/> writes besides the masks and summary.json.</summary>
public sealed record PredictOutputOptions
{
    /// <summary>Write overlay.mp4 (source size and frame rate, source audio).</summary>
    public bool Overlay { get; init; } = true;
    /// <summary>Write each frame's score maps as scores/NNNNNN.npy.</summary>
    public bool SaveScores { get; init; }
}

/// <summary>Progress of a video run.</summary>
/// <param name="Frames">Frames segmented so far.</param>
/// <param name="TotalFrames">Estimated total (0 when unknown).</param>
/// <param name="Elapsed">Time since the start.</param>
/// <param name="FramesPerSecond">Average rate so far.</param>
public sealed record VideoProgress(int Frames, int TotalFrames, TimeSpan Elapsed, double FramesPerSecond);

/// <summary>What a <see cref="VctSegmenter.Predict"/> run wrote.</summary>
/// <param name="OutputFolder">The folder.</param>
/// <param name="Frames">Masks written.</param>
/// <param name="Interrupted">True when it was cancelled (the masks written are valid).</param>
/// <param name="Overlay">Path of overlay.mp4, or null when it was not written.</param>
/// <param name="Summary">Path of summary.json.</param>
/// <param name="Warnings">One-line warnings (partial windows, missing audio, ...).</param>
/// <param name="Seconds">Wall time.</param>
public sealed record PredictSummary(string OutputFolder, int Frames, bool Interrupted, string? Overlay, string Summary, IReadOnlyList<string> Warnings, double Seconds);

/// <summary>A class found in a frame.</summary>
/// <param name="Id">Class id (S4/MS3: 1 = sounding object; AVSS: 1..70).</param>
/// <param name="Name">Class name.</param>
/// <param name="Score">Mean score over the pixels it wins.</param>
/// <param name="Area">Fraction of the frame it covers.</param>
public sealed record FrameClass(int Id, string Name, double Score, double Area);

/// <summary>The segmentation of one sampled frame, at the source resolution.</summary>
public sealed class FrameSegmentation
{
    internal FrameSegmentation(Core.Video.FrameResult r, bool keepFrame)
    {
        Index = r.Index; Time = r.Time; Name = r.Name; Width = r.Width; Height = r.Height; Mask = r.Mask;
        SoundingFraction = r.SoundingFraction; Window = r.Window; AudioExample = r.Example;
        Classes = r.Classes.Select(c => new FrameClass(c.Id, c.Name, c.Score, c.Area)).ToList();
        Frame = keepFrame ? r.Frame : null;
        Core = r;
    }
    internal Core.Video.FrameResult Core { get; }
    internal Core.Data.Image? Frame { get; }
    /// <summary>Output frame number (slot): masks/NNNNNN.png.</summary>
    public int Index { get; }
    /// <summary>Presentation time of the source frame, in seconds.</summary>
    public double Time { get; }
    /// <summary>Frame name ("000003" or the image's name).</summary>
    public string Name { get; }
    /// <summary>Source width.</summary>
    public int Width { get; }
    /// <summary>Source height.</summary>
    public int Height { get; }
    /// <summary>Class id per pixel, row-major (S4/MS3: 0/1).</summary>
    public byte[] Mask { get; }
    /// <summary>Fraction of pixels that are not background.</summary>
    public double SoundingFraction { get; }
    /// <summary>The audio window the frame belongs to.</summary>
    public int Window { get; }
    /// <summary>The example (second) of that window it was paired with.</summary>
    public int AudioExample { get; }
    /// <summary>Classes present, best score first.</summary>
    public IReadOnlyList<FrameClass> Classes { get; }
}

/// <summary>The segmentation of a whole video or image sequence.</summary>
public sealed class VideoSegmentation
{
    private readonly Core.Subset _subset;
    private readonly string? _video;
    private readonly double _fps;
    private readonly string? _audio;

    internal VideoSegmentation(Core.Subset subset, IReadOnlyList<FrameSegmentation> frames, IReadOnlyList<string> warnings, string? video, double fps, string? audio)
        => (_subset, Frames, Warnings, _video, _fps, _audio) = (subset, frames, warnings, video, fps, audio);

    /// <summary>The frames in order.</summary>
    public IReadOnlyList<FrameSegmentation> Frames { get; }
    /// <summary>One-line warnings of the run.</summary>
    public IReadOnlyList<string> Warnings { get; }

    /// <summary>Writes masks/NNNNNN.png under <paramref name="folder"/> (grey 0/255 for S4/MS3, palette class ids for AVSS), atomically; returns the paths.</summary>
    public IReadOnlyList<string> SaveMasks(string folder)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        Directory.CreateDirectory(folder);
        var kind = Core.Video.Predict.maskKind(_subset);
        var paths = new List<string>();
        foreach (var f in Frames)
        {
            var p = Path.Combine(folder, $"{f.Index:D6}.png");
            Core.Video.Png.write(p, kind, f.Width, f.Height, Core.Video.Predict.maskPixels(_subset, f.Mask));
            paths.Add(p);
        }
        return paths;
    }

    /// <summary>Writes an mp4 of the source with the masks blended in (as VCT's visualization.py), source audio muxed; returns warnings (empty when all went well).</summary>
    public IReadOnlyList<string> SaveOverlay(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var colours = Core.Video.Predict.colours(_subset);
        var audio = _audio ?? _video;
        Core.Video.OverlayWriter writer;
        if (_video is not null)
            writer = Core.Video.OverlayWriter.ForVideo(path, Core.Video.Ffmpeg.probe(_video), _fps, colours, audio is null ? FSharpOption<string>.None : FSharpOption<string>.Some(audio));
        else
        {
            if (Frames.Count == 0) return new[] { "no frames" };
            writer = Core.Video.OverlayWriter.ForImages(path, Frames[0].Width, Frames[0].Height, _fps, colours, audio is null ? FSharpOption<string>.None : FSharpOption<string>.Some(audio));
        }
        using (writer)
        {
            foreach (var f in Frames)
                writer.Add(f.Index, f.Mask, f.Frame is null ? FSharpOption<Core.Data.Image>.None : FSharpOption<Core.Data.Image>.Some(f.Frame));
            var w = writer.Finish(false);
            return FSharpOption<string>.get_IsSome(w) ? new[] { w.Value } : Array.Empty<string>();
        }
    }

    /// <summary>The frames as summary.json writes them (index, time, mask path, sounding_fraction, classes).</summary>
    public string ToJson()
    {
        var arr = new System.Text.Json.Nodes.JsonArray();
        foreach (var f in Frames) arr.Add(Core.Video.Predict.frameJson(f.Core, $"masks/{f.Index:D6}.png"));
        var root = new System.Text.Json.Nodes.JsonObject { ["subset"] = _subset.ToString().ToLowerInvariant(), ["fps"] = _fps, ["frames"] = arr };
        return root.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true });
    }
}

/// <summary>An IProgress that reports on the caller's thread (Progress&lt;T&gt; would post to a synchronisation context).</summary>
public sealed class SyncProgress<T>(Action<T> report) : IProgress<T>
{
    /// <inheritdoc />
    public void Report(T value) => report(value);
}

/// <summary>What loading a checkpoint into the model did, key by key.</summary>
/// <param name="Loaded">Model keys whose values were copied from the file.</param>
/// <param name="Missing">Model keys that no file key fills.</param>
/// <param name="Unexpected">File keys that the model does not have.</param>
/// <param name="ShapeMismatched">Keys in both whose shapes differ (not copied), with both shapes.</param>
/// <param name="Dropped">File keys dropped as documented unused (criterion.*, audio_backbone.embeddings.*).</param>
/// <param name="Converted">Keys copied with a dtype conversion.</param>
/// <param name="DtypeMismatched">Keys in both whose dtypes differ and were not converted, with both dtypes.</param>
public sealed record CheckpointLoadReport(IReadOnlyList<string> Loaded, IReadOnlyList<string> Missing, IReadOnlyList<string> Unexpected,
    IReadOnlyList<string> ShapeMismatched, IReadOnlyList<string> Dropped, IReadOnlyList<string> Converted, IReadOnlyList<string> DtypeMismatched)
{
    /// <summary>True when every model key was loaded and every file key was used or dropped.</summary>
    public bool IsExact => Missing.Count == 0 && Unexpected.Count == 0 && ShapeMismatched.Count == 0 && DtypeMismatched.Count == 0;

    /// <summary>The one-line count <c>vct convert</c> and <c>vct forward</c> print: loaded, missing, unexpected, shape-mismatched, dropped, converted.</summary>
    public override string ToString() =>
        $"loaded {Loaded.Count} tensors; missing {Missing.Count}, unexpected {Unexpected.Count}, " +
        $"shape-mismatched {ShapeMismatched.Count}, dropped {Dropped.Count}, converted {Converted.Count}";
}

/// <summary>The VGGish examples of an audio file ([T_a, 1, 96, 64]) and, for AVSS, the temporal flags; owns both tensors.</summary>
public sealed class AudioExamples(torch.Tensor examples, torch.Tensor? flags) : IDisposable
{
    /// <summary>[T_a, 1, 96, 64] log-mel examples, one per second.</summary>
    public torch.Tensor Examples { get; } = examples;
    /// <summary>AVSS temporal flags, or null.</summary>
    public torch.Tensor? Flags { get; } = flags;

    /// <inheritdoc />
    public void Dispose()
    {
        Examples.Dispose();
        Flags?.Dispose();
    }
}
