namespace Vct;

using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Vct.Core.Data;
using Vct.Core.Evaluation;
using Vct.Core.Training;

/// <summary>Options of <see cref="VctEvaluator.Evaluate"/>.</summary>
public sealed record EvaluationOptions
{
    /// <summary>The split to evaluate (default: test).</summary>
    public VctSplit Split { get; init; } = VctSplit.Test;
    /// <summary>The released configuration of an official .pth checkpoint; null: the checkpoint's own (Vct checkpoints, released names).</summary>
    public VctSubset? Subset { get; init; }
    /// <summary>Also evaluate with each video's audio swapped for another's (a listening control).</summary>
    public bool AudioShuffled { get; init; }
    /// <summary>Decoding workers.</summary>
    public int Workers { get; init; } = Environment.ProcessorCount;
    /// <summary>"auto", "cpu", "cuda" or "cuda:N".</summary>
    public string Device { get; init => field = VctDevices.Validate(value); } = "auto";
    /// <summary>Arithmetic of the forward pass (default float32, the precision of the goldens). Reduced precisions are
    /// refused with <see cref="NotSupportedException"/> where the device cannot run them (bf16 needs a CPU with AVX-512
    /// BF16 or a CUDA device; fp16 needs CUDA).</summary>
    public VctPrecision Precision { get; init; } = VctPrecision.Float32;
}

/// <summary>The official metrics of one video.</summary>
/// <param name="Id">The video's id.</param>
/// <param name="Frames">Frames scored.</param>
/// <param name="J">Mean Jaccard (IoU) over its frames (the official per-video value).</param>
/// <param name="F">Its F-score (beta^2 = 0.3, the official thresholds).</param>
public sealed record VideoMetrics(string Id, int Frames, double J, double F);

/// <summary>A checkpoint's metrics on a dataset split.</summary>
/// <param name="Checkpoint">The checkpoint as it was given.</param>
/// <param name="Split">The split evaluated.</param>
/// <param name="Videos">Videos evaluated.</param>
/// <param name="MJ">M_J (mean Jaccard) as a fraction.</param>
/// <param name="MF">M_F (mean F-score) as a fraction.</param>
/// <param name="MJAudioShuffled">M_J with shuffled audio, or null when the control was not asked for.</param>
/// <param name="MFAudioShuffled">M_F with shuffled audio, or null.</param>
/// <param name="PerVideo">Per-video values, in split order.</param>
public sealed record EvaluationResult(string Checkpoint, VctSplit Split, int Videos, double MJ, double MF,
    double? MJAudioShuffled, double? MFAudioShuffled, IReadOnlyList<VideoMetrics> PerVideo)
{
    /// <summary>The forward pass's precision (summary.json's "precision": fp32, bf16 or fp16).</summary>
    public VctPrecision Precision { get; init; } = VctPrecision.Float32;

    /// <summary>The summary as <c>vct eval</c> writes it to summary.json (checkpoint, split, videos, m_j, m_f, and the control's values).</summary>
    public string ToJson()
    {
        var json = new JsonObject
        {
            ["checkpoint"] = Checkpoint,
            ["split"] = Split.Name(),
            ["videos"] = Videos,
            ["m_j"] = MJ,
            ["m_f"] = MF,
            ["precision"] = Precision switch { VctPrecision.BFloat16 => "bf16", VctPrecision.Float16 => "fp16", _ => "fp32" },
        };
        if (MJAudioShuffled is double mj) json["m_j_audio_shuffled"] = mj;
        if (MFAudioShuffled is double mf) json["m_f_audio_shuffled"] = mf;
        return json.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }

    /// <summary>The per-video values as <c>vct eval</c> writes them to per_video.csv (<c>video,j,f</c>, round-trip numbers).</summary>
    public string ToCsv()
    {
        var csv = new StringBuilder("video,j,f\n");
        foreach (var v in PerVideo) csv.Append(CultureInfo.InvariantCulture, $"{v.Id},{v.J:R},{v.F:R}\n");
        return csv.ToString();
    }

    /// <summary>Writes per_video.csv and summary.json into <paramref name="folder"/> (created), each atomically; returns both paths.</summary>
    public IReadOnlyList<string> Save(string folder)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        Directory.CreateDirectory(folder);
        var csv = Path.Combine(folder, "per_video.csv");
        var summary = Path.Combine(folder, "summary.json");
        Core.Platform.AtomicFile.writeAllText(csv, ToCsv());
        Core.Platform.AtomicFile.writeAllText(summary, ToJson());
        return [csv, summary];
    }
}

/// <summary>Options of <see cref="VctEvaluator.Score"/>.</summary>
public sealed record ScoreOptions
{
    /// <summary>Which metric definitions to apply (default: VCT's).</summary>
    public MetricVariant Variant { get; init; } = MetricVariant.Vct;
    /// <summary>AVSS class count (default 71: background + 70).</summary>
    public int Classes { get; init; } = Metrics.AvssClasses;
}

/// <summary>How far a scoring run is.</summary>
/// <param name="Done">Videos scored.</param>
/// <param name="Total">Videos to score.</param>
public sealed record ScoreProgress(int Done, int Total);

/// <summary>M_J and M_F of a scoring run, with the per-video values.</summary>
/// <param name="MJ">M_J as a fraction, unrounded.</param>
/// <param name="MF">M_F as a fraction, unrounded.</param>
/// <param name="Videos">Per-video values, in input order.</param>
/// <param name="Json">The summary as <c>vct score</c> prints it (also rounded values and, for AVSS, per-class values).</param>
public sealed record ScoreResult(double MJ, double MF, IReadOnlyList<VideoMetrics> Videos, string Json);

/// <summary>The official metrics for C# callers: a checkpoint on a dataset split (<c>vct eval</c>), or saved predictions against ground truth (<c>vct score</c>).</summary>
public static class VctEvaluator
{
    /// <summary>
    /// Evaluates a checkpoint on a split of a dataset in the official AVSBench layout with the official VCT metrics.
    /// An empty split is refused (<see cref="InvalidDataException"/>) before anything is computed.
    /// </summary>
    /// <param name="checkpoint">A Vct .safetensors, an official .pth (with <see cref="EvaluationOptions.Subset"/>) or a hub reference.</param>
    /// <param name="data">The dataset root.</param>
    /// <param name="options">Split, device, workers and the shuffled-audio control.</param>
    /// <param name="log">Receives one line when the evaluation starts (default: none).</param>
    /// <param name="cancellationToken">Checked before each of the two evaluations.</param>
    public static EvaluationResult Evaluate(string checkpoint, string data, EvaluationOptions? options = null, Action<string>? log = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(checkpoint);
        ArgumentException.ThrowIfNullOrEmpty(data);
        options ??= new EvaluationOptions();
        var split = options.Split.Name();
        VctTypeConversions.CheckPrecision(options.Precision, VctRuntime.ResolveDevice(options.Device));
        var (model, _, _) = ModelLoading.Load(checkpoint, options.Subset, options.Device);
        using (model)
        {
            var records = Avsbench.records(model.Config.Subset, data, split);
            if (records.Length == 0) throw new InvalidDataException($"{data}: the {split} split has no videos; nothing to evaluate");
            log?.Invoke($"evaluating {records.Length} videos of {split}");
            var workers = Math.Max(1, options.Workers);
            using var audio = new TrainData.AudioCache(model);
            cancellationToken.ThrowIfCancellationRequested();
            var summary = Validation.evaluateIn(options.Precision.ToCore(), model, audio, records, false, workers);
            double? mjShuffled = null, mfShuffled = null;
            if (options.AudioShuffled)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var control = Validation.evaluateIn(options.Precision.ToCore(), model, audio, records, true, workers);
                (mjShuffled, mfShuffled) = (control.MJ, control.MF);
            }
            return new EvaluationResult(checkpoint, options.Split, records.Length, summary.MJ, summary.MF, mjShuffled, mfShuffled, Videos(summary))
                { Precision = options.Precision };
        }
    }

    /// <summary>
    /// Scores saved predictions with the official metrics: <paramref name="scores"/> and <paramref name="groundTruth"/>
    /// are one .npy each ([V,T,C,H,W] float32 and [V,T,H,W] uint8) or folders of per-video
    /// <c>&lt;id&gt;_scores.npy</c> / <c>&lt;id&gt;_gt.npy</c> pairs. Predictions holding NaN are refused.
    /// </summary>
    /// <param name="subset">S4 / MS3 (C = 2 score maps) or AVSS (C = 71).</param>
    /// <param name="scores">The scores file or folder.</param>
    /// <param name="groundTruth">The labels file or folder (0/1 for S4/MS3; class ids and 255 for AVSS).</param>
    /// <param name="options">Metric variant and AVSS class count.</param>
    /// <param name="progress">Hears after each video.</param>
    public static ScoreResult Score(VctSubset subset, string scores, string groundTruth, ScoreOptions? options = null, IProgress<ScoreProgress>? progress = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(scores);
        ArgumentException.ThrowIfNullOrEmpty(groundTruth);
        options ??= new ScoreOptions();
        VctRuntime.Initialize();
        var s = Core.Evaluation.Score.run(subset.ToCore(), options.Variant.ToCore(), options.Classes, scores, groundTruth,
            Microsoft.FSharp.Core.FuncConvert.FromFunc<int, int, Microsoft.FSharp.Core.Unit>((done, total) =>
            {
                progress?.Report(new ScoreProgress(done, total));
                return null!;
            }));
        return new ScoreResult(s.MJ, s.MF, Videos(s), Core.Evaluation.Score.toJson(s));
    }

    static IReadOnlyList<VideoMetrics> Videos(MetricSummary s) => s.Videos.Select(v => new VideoMetrics(v.Id, v.Frames, v.J, v.F)).ToList();
}
