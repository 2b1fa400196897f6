namespace Vct;

using System.Text.Json;
using Vct.Core.Training;

/// <summary>The training configurations.</summary>
public enum TrainPreset
{
    /// <summary>A tiny model for the CPU, on the built-in synthetic data unless <see cref="TrainOptions.Data"/> is set.</summary>
    Tiny,
    /// <summary>The released S4 configuration (Swin-B 384, pre-SAM).</summary>
    S4,
    /// <summary>The released MS3 configuration.</summary>
    MS3,
    /// <summary>The released AVSS configuration.</summary>
    AVSS,
}

/// <summary>How a training run is spread over processes.</summary>
public enum DistributedMode
{
    /// <summary>This process alone.</summary>
    None,
    /// <summary>Data-parallel over the ranks of the mpirun job this process belongs to.</summary>
    Mpi,
}

/// <summary>Options of <see cref="VctTrainer.TrainAsync"/>. Unset values keep the preset's (official) values.</summary>
public sealed record TrainOptions
{
    /// <summary>The configuration (default: <see cref="TrainPreset.Tiny"/>).</summary>
    public TrainPreset Preset { get; init; } = TrainPreset.Tiny;
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
    /// <summary>"auto", "cpu", "cuda" or "cuda:N"; anything else is refused when set.</summary>
    public string Device { get; init => field = VctDevices.Validate(value); } = "auto";
    /// <summary><see cref="DistributedMode.Mpi"/>: data-parallel over the ranks of the mpirun job this process belongs
    /// to (every rank runs the same options; rank 0 writes the files; on CUDA the local rank picks the device).</summary>
    public DistributedMode Distributed { get; init; } = DistributedMode.None;
    /// <summary>Micro-batches per optimizer step (gradient accumulation); 1: none.</summary>
    public int Accumulate { get; init; } = 1;
    /// <summary>Sharded evaluation: the mean of the per-rank means (as the official evaluator under DDP) instead of the
    /// mean over videos.</summary>
    public bool OfficialEvalMean { get; init; }
    /// <summary>MPI: abort the job when one collective waits longer than this (zero: never).</summary>
    public TimeSpan CollectiveTimeout { get; init; } = TimeSpan.FromSeconds(600);
}

/// <summary>What a training run reports while it runs: a step, an evaluation on the validation split, or a warning.</summary>
/// <param name="Kind">Step, evaluation or warning.</param>
/// <param name="Iteration">The iteration just finished (1-based).</param>
/// <param name="TotalIterations">The run's last iteration.</param>
/// <param name="Loss">Total loss of the step (NaN otherwise).</param>
/// <param name="Terms">The loss terms of the step by name (empty otherwise).</param>
/// <param name="LearningRate">Base learning rate of the step (NaN otherwise).</param>
/// <param name="MJ">M_J of an evaluation (NaN otherwise).</param>
/// <param name="MF">M_F of an evaluation (NaN otherwise).</param>
/// <param name="Seconds">Seconds the step or the evaluation took (0 for warnings).</param>
/// <param name="Message">What a warning says (a skipped step, a fallback checkpoint); null otherwise.</param>
public sealed record TrainProgress(TrainProgressKind Kind, int Iteration, int TotalIterations, double Loss,
    IReadOnlyDictionary<string, double> Terms, double LearningRate, double MJ, double MF, double Seconds, string? Message = null);

/// <summary>Kind of a <see cref="TrainProgress"/> report.</summary>
public enum TrainProgressKind
{
    /// <summary>One optimiser step.</summary>
    Step,
    /// <summary>A periodic evaluation on the validation split.</summary>
    Evaluation,
    /// <summary>Something the run survived but you should know (<see cref="TrainProgress.Message"/>).</summary>
    Warning,
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
/// One training job of this process: for <see cref="DistributedMode.Mpi"/> it holds the MPI communicator (initialised
/// by <see cref="Create"/>, finalised by <see cref="Dispose"/>), so the caller can ask for its rank and stop all ranks.
/// <see cref="VctTrainer.TrainAsync"/> creates and disposes one for you.
/// </summary>
public sealed class VctTrainingJob : IDisposable
{
    private readonly TrainJobOptions _options;
    private readonly DistributedOptions _parallel;

    private VctTrainingJob(TrainJobOptions options, DistributedOptions parallel, int iterations) =>
        (_options, _parallel, PlannedIterations) = (options, parallel, iterations);

    /// <summary>Checks the options, resolves the device and, for MPI, joins the job's ranks.</summary>
    public static VctTrainingJob Create(TrainOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        VctRuntime.Initialize();
        var o = options.ToCore(VctRuntime.ResolveDevice(options.Device));
        var iterations = VctTrainer.Config(o).Iterations;
        var par = DistributedOptions.Create(options.Distributed == DistributedMode.Mpi ? "mpi" : "none", options.Accumulate,
            options.OfficialEvalMean, options.CollectiveTimeout.TotalSeconds);
        return new VctTrainingJob(o, par, iterations);
    }

    /// <summary>The number of iterations the run ends at.</summary>
    public int PlannedIterations { get; }
    /// <summary>This process's rank (0 without MPI).</summary>
    public int Rank => _parallel.Comm.Rank;
    /// <summary>Processes in the job (1 without MPI).</summary>
    public int Ranks => _parallel.Comm.Size;
    /// <summary>True on the rank that writes the files and prints the summary.</summary>
    public bool IsRoot => _parallel.IsRoot;

    /// <summary>
    /// Runs the training loop on this thread. <paramref name="progress"/> hears every step, evaluation and warning
    /// (on the training thread); <paramref name="log"/> the run's log lines (default: standard error). Cancelling stops
    /// after the current step and writes a resumable checkpoint. With several ranks a failure stops the whole job.
    /// </summary>
    public TrainResult Run(IProgress<TrainProgress>? progress = null, CancellationToken cancellationToken = default, Action<string>? log = null)
    {
        var total = PlannedIterations;
        void OnEvent(TrainEvent e)
        {
            if (progress is null) return;
            var none = new Dictionary<string, double>();
            progress.Report(e switch
            {
                TrainEvent.Step s => new TrainProgress(TrainProgressKind.Step, s.iteration, total, s.loss,
                    s.terms.ToDictionary(kv => kv.Key, kv => kv.Value), s.lr, double.NaN, double.NaN, s.seconds),
                TrainEvent.Eval ev => new TrainProgress(TrainProgressKind.Evaluation, ev.iteration, total, double.NaN, none, double.NaN, ev.mj, ev.mf, ev.seconds),
                TrainEvent.Warning w => new TrainProgress(TrainProgressKind.Warning, w.iteration, total, double.NaN, none, double.NaN, double.NaN, double.NaN, 0, w.message),
                _ => throw new InvalidOperationException($"unknown training event {e}"),
            });
        }
        Core.Training.TrainResult r;
        System.Text.Json.Nodes.JsonObject summary;
        try
        {
            (r, summary) = TrainJob.runWith(_parallel, _options, VctTypeConversions.Fun(log ?? (line => Console.Error.WriteLine(line))),
                VctTypeConversions.Fun<TrainEvent>(OnEvent), cancellationToken).ToValueTuple();
        }
        catch (Exception e) when (Ranks > 1)
        {
            // One rank failing stops the job: the others would wait for it in the next collective.
            _parallel.Comm.Abort((e is AggregateException { InnerException: { } ie } ? ie : e).Message);
            throw;
        }
        var files = new RunFiles(r.RunDir);
        var outcome = r.Outcome.IsCompleted ? TrainOutcome.Completed : r.Outcome.IsInterrupted ? TrainOutcome.Interrupted : TrainOutcome.Diverged;
        var diagnostic = r.Outcome is Core.Training.TrainOutcome.Diverged d ? d.diagnostic : null;
        return new TrainResult(outcome, r.Iterations, r.BestIteration > 0 ? r.BestMJ : double.NaN, r.BestIteration, r.RunDir,
            File.Exists(files.Best) ? files.Best : null, File.Exists(files.Last) ? files.Last : null, diagnostic,
            summary.ToJsonString(new JsonSerializerOptions { WriteIndented = true }), r.WallSeconds);
    }

    /// <summary>
    /// The job is being stopped (mpirun's SIGTERM: Ctrl-C, or a rank died): the live ranks reach the next collective
    /// within a step's imbalance, so from now on one that waits longer than <paramref name="within"/> aborts the job.
    /// Does nothing without MPI.
    /// </summary>
    public void StopAllRanksSoon(TimeSpan within)
    {
        if (_parallel.Comm is MpiCommunicator mpi) mpi.StopSoon(within.TotalSeconds);
    }

    /// <summary>
    /// With MPI: flushes the console and ends the process with <paramref name="exitCode"/> without MPI_Finalize (which
    /// can wait forever once mpirun is stopping the job). Without MPI: returns and does nothing.
    /// </summary>
    public void ExitWithoutFinalizing(int exitCode)
    {
        if (_parallel.Comm is MpiCommunicator mpi) mpi.HardExit(exitCode);
    }

    /// <summary>Finalises MPI (when it was used).</summary>
    public void Dispose() => _parallel.Comm.Dispose();
}

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
        return Config(options.ToCore(VctRuntime.ResolveDevice("cpu"))).Iterations;
    }

    /// <summary>
    /// Runs training on a dedicated thread. <paramref name="log"/> receives the run's log lines (default: standard error);
    /// <paramref name="progress"/> every step, evaluation and warning, on the training thread.
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
        using var job = VctTrainingJob.Create(options);
        return job.Run(progress, cancellationToken, log);
    }

    internal static TrainConfig Config(TrainJobOptions o) =>
        TrainJob.config(o.Preset, o.Preset == "tiny" ? Core.Subset.S4 : Core.Subset.Parse(o.Preset), o);
}
