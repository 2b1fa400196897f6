namespace Vct;

using System.Text.Json;
using Microsoft.FSharp.Core;
using Vct.Core.Training;

/// <summary>Options of <see cref="VctTrainer.TrainAsync"/>. Unset values keep the preset's (official) values.</summary>
public sealed record TrainOptions
{
    /// <summary>"tiny" (CPU; the built-in synthetic data unless <see cref="Data"/>), "s4", "ms3" or "avss" (released configurations).</summary>
    public string Preset { get; init; } = "tiny";
    /// <summary>Dataset root in the AVSBench layout; null: <c>data/synth-s4</c> under the working folder, generated when missing.</summary>
    public string? Data { get; init; }
    /// <summary>Folder of runs; the run is <c>RunsFolder/Name</c>.</summary>
    public string RunsFolder { get; init; } = "runs";
    /// <summary>Run name (null: <c>&lt;preset&gt;-&lt;date&gt;</c>).</summary>
    public string? Name { get; init; }
    /// <summary>Iterations (SOLVER.MAX_ITER); null: the preset's.</summary>
    public int? Iterations { get; init; }
    /// <summary>Videos per step (SOLVER.IMS_PER_BATCH); null: the preset's.</summary>
    public int? BatchVideos { get; init; }
    /// <summary>Base learning rate; null: the preset's.</summary>
    public double? LearningRate { get; init; }
    /// <summary>Evaluate (and checkpoint) every N iterations; null: the preset's.</summary>
    public int? EvalPeriod { get; init; }
    /// <summary>Seed of data order, augmentation and point sampling.</summary>
    public int Seed { get; init; } = 8434882;
    /// <summary>Continue the run from its <c>checkpoint_last.safetensors</c>.</summary>
    public bool Resume { get; init; }
    /// <summary>Data-loading workers.</summary>
    public int Workers { get; init; } = Math.Min(Environment.ProcessorCount, 2);
    /// <summary>ImageNet Swin weights for both Swin copies (released presets), a path or a hub reference.</summary>
    public string? SwinWeights { get; init; }
    /// <summary>torchvggish <c>vggish-10086976.pth</c>, a path or a hub reference.</summary>
    public string? VggishWeights { get; init; }
    /// <summary>Pre-SAM models on data without Semantic-SAM mask images.</summary>
    public MissingMasksPolicy MissingMasks { get; init; } = MissingMasksPolicy.Refuse;
    /// <summary>float16 autocast with dynamic loss scaling (CUDA only; refused on the CPU).</summary>
    public bool MixedPrecision { get; init; }
    /// <summary>"auto", "cpu", "cuda" or "cuda:N".</summary>
    public string Device { get; init; } = "auto";
    /// <summary>"none" (this process alone) or "mpi": data-parallel over the ranks of the mpirun job this process belongs
    /// to (every rank calls <see cref="VctTrainer.Train"/> with the same options; rank 0 writes the files; on CUDA the
    /// local rank picks the device). MPI is finalised when the run ends.</summary>
    public string Distributed { get; init; } = "none";
    /// <summary>Micro-batches per optimizer step (gradient accumulation); 1: none.</summary>
    public int Accumulate { get; init; } = 1;
    /// <summary>Sharded evaluation: the mean of the per-rank means (as the official evaluator under DDP) instead of the
    /// mean over videos.</summary>
    public bool OfficialEvalMean { get; init; }
}

/// <summary>What a training run reports while it runs: a step, or an evaluation on the validation split.</summary>
/// <param name="Kind">Step or evaluation.</param>
/// <param name="Iteration">The iteration just finished (1-based).</param>
/// <param name="TotalIterations">The run's last iteration.</param>
/// <param name="Loss">Total loss of the step (NaN for evaluations).</param>
/// <param name="Terms">The loss terms of the step by name (empty for evaluations).</param>
/// <param name="LearningRate">Base learning rate of the step (NaN for evaluations).</param>
/// <param name="MJ">M_J of an evaluation (NaN for steps).</param>
/// <param name="MF">M_F of an evaluation (NaN for steps).</param>
/// <param name="Seconds">Seconds the step or the evaluation took.</param>
public sealed record TrainProgress(TrainProgressKind Kind, int Iteration, int TotalIterations, double Loss,
    IReadOnlyDictionary<string, double> Terms, double LearningRate, double MJ, double MF, double Seconds);

/// <summary>Kind of a <see cref="TrainProgress"/> report.</summary>
public enum TrainProgressKind
{
    /// <summary>One optimiser step.</summary>
    Step,
    /// <summary>A periodic evaluation on the validation split.</summary>
    Evaluation,
}

/// <summary>How a training run ended.</summary>
public enum TrainOutcome
{
    /// <summary>All iterations ran.</summary>
    Completed,
    /// <summary>Cancelled; a resumable checkpoint was written.</summary>
    Interrupted,
    /// <summary>The loss or the weights stopped being finite; see <see cref="TrainResult.Diagnostic"/>.</summary>
    Diverged,
}

/// <summary>The result of a training run.</summary>
/// <param name="Outcome">How it ended.</param>
/// <param name="Iterations">Iterations run in total (including resumed ones).</param>
/// <param name="BestMJ">Best validation M_J seen (NaN when never evaluated).</param>
/// <param name="BestIteration">Iteration of <paramref name="BestMJ"/> (0 when never evaluated).</param>
/// <param name="RunFolder">The run's folder.</param>
/// <param name="BestCheckpoint">model_best.safetensors, or null when no evaluation ran.</param>
/// <param name="LastCheckpoint">checkpoint_last.safetensors (resumable), or null.</param>
/// <param name="Diagnostic">Why the run diverged, or null.</param>
/// <param name="SummaryJson">The run's summary.json (final M_J/M_F with true and shuffled audio, ...).</param>
/// <param name="WallSeconds">Wall time of the loop.</param>
public sealed record TrainResult(TrainOutcome Outcome, int Iterations, double BestMJ, int BestIteration, string RunFolder,
    string? BestCheckpoint, string? LastCheckpoint, string? Diagnostic, string SummaryJson, double WallSeconds);

/// <summary>
/// Trains VCT as <c>vct train</c> does: iteration based, periodic evaluation, best checkpoint by M_J, resumable;
/// cancelling stops after the current step and writes a resumable checkpoint.
/// </summary>
public static class VctTrainer
{
    /// <summary>The number of iterations a run with these options would make.</summary>
    public static int PlannedIterations(TrainOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var o = ToCore(options, VctRuntime.ResolveDevice("cpu"));
        return TrainJob.config(o.Preset, SubsetOf(o.Preset), o).Iterations;
    }

    /// <summary>
    /// Runs training on a dedicated thread. <paramref name="log"/> receives the run's log lines (default: standard error);
    /// <paramref name="progress"/> every step and evaluation, on the training thread.
    /// </summary>
    public static Task<TrainResult> TrainAsync(TrainOptions options, IProgress<TrainProgress>? progress = null,
        CancellationToken cancellationToken = default, Action<string>? log = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        return Task.Factory.StartNew(() => Train(options, progress, cancellationToken, log), CancellationToken.None,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>The synchronous form of <see cref="TrainAsync"/>.</summary>
    public static TrainResult Train(TrainOptions options, IProgress<TrainProgress>? progress = null,
        CancellationToken cancellationToken = default, Action<string>? log = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        VctRuntime.Initialize();
        var device = VctRuntime.ResolveDevice(options.Device);
        var o = ToCore(options, device);
        var total = TrainJob.config(o.Preset, SubsetOf(o.Preset), o).Iterations;
        var write = log ?? (line => Console.Error.WriteLine(line));
        void OnEvent(TrainEvent e)
        {
            if (progress is null) return;
            if (e is TrainEvent.Step s)
                progress.Report(new TrainProgress(TrainProgressKind.Step, s.iteration, total, s.loss,
                    s.terms.ToDictionary(kv => kv.Key, kv => kv.Value), s.lr, double.NaN, double.NaN, s.seconds));
            else if (e is TrainEvent.Eval ev)
                progress.Report(new TrainProgress(TrainProgressKind.Evaluation, ev.iteration, total, double.NaN,
                    new Dictionary<string, double>(), double.NaN, ev.mj, ev.mf, ev.seconds));
        }
        var par = DistributedOptions.Create(options.Distributed, options.Accumulate, options.OfficialEvalMean, 600.0);
        using var comm = par.Comm;
        var (r, summary) = TrainJob.runWith(par, o, FuncConvert.FromAction(write), FuncConvert.FromAction<TrainEvent>(OnEvent), cancellationToken).ToValueTuple();
        var files = new RunFiles(r.RunDir);
        var outcome = r.Outcome.IsCompleted ? TrainOutcome.Completed : r.Outcome.IsInterrupted ? TrainOutcome.Interrupted : TrainOutcome.Diverged;
        var diagnostic = r.Outcome is Core.Training.TrainOutcome.Diverged d ? d.diagnostic : null;
        return new TrainResult(outcome, r.Iterations, r.BestIteration > 0 ? r.BestMJ : double.NaN, r.BestIteration, r.RunDir,
            File.Exists(files.Best) ? files.Best : null, File.Exists(files.Last) ? files.Last : null, diagnostic,
            summary.ToJsonString(new JsonSerializerOptions { WriteIndented = true }), r.WallSeconds);
    }

    static Core.Subset SubsetOf(string preset) => preset == "tiny" ? Core.Subset.S4 : Core.Subset.Parse(preset);

    static FSharpOption<T> Opt<T>(T? v) where T : struct => v is T x ? FSharpOption<T>.Some(x) : FSharpOption<T>.None;
    static FSharpOption<string> Opt(string? v) => string.IsNullOrWhiteSpace(v) ? FSharpOption<string>.None : FSharpOption<string>.Some(v);

    internal static TrainJobOptions ToCore(TrainOptions o, TorchSharp.torch.Device device)
    {
        var preset = o.Preset.ToLowerInvariant();
        if (preset is not ("tiny" or "s4" or "ms3" or "avss"))
            throw new ArgumentException($"Preset must be tiny, s4, ms3 or avss, got '{o.Preset}'", nameof(o));
        var name = string.IsNullOrWhiteSpace(o.Name) ? $"{preset}-{DateTime.Now:yyyyMMdd-HHmmss}" : o.Name;
        return new TrainJobOptions(preset, Opt(o.Data), o.RunsFolder, name, Opt(o.Iterations), Opt(o.BatchVideos), Opt(o.LearningRate),
            o.Seed, o.Resume, device, o.Workers, Opt(o.EvalPeriod), Opt(o.SwinWeights), Opt(o.VggishWeights),
            o.MissingMasks.ToCore(), o.MixedPrecision);
    }
}
