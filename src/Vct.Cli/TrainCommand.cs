using System.CommandLine;
using System.Diagnostics;

namespace Vct.Cli;

/// <summary><c>vct train</c>: the training loop with a progress line, Ctrl-C handling and the run report.</summary>
internal static class TrainCommand
{
    public static Command Create()
    {
        var preset = CommonOptions.Choice("--preset", "tiny (CPU; built-in synthetic data unless --data) | s4 | ms3 | avss (released configurations)", "tiny", "tiny", "s4", "ms3", "avss");
        var data = new Option<string?>("--data") { Description = "Dataset root in the official AVSBench layout (default for tiny: data/synth-s4, generated when missing)" };
        var runs = new Option<string>("--runs") { Description = "Folder of runs", DefaultValueFactory = _ => "runs" };
        var name = new Option<string?>("--name") { Description = "Run name (default: <preset>-<date>)" };
        var iterations = new Option<int?>("--iterations") { Description = "Iterations (SOLVER.MAX_ITER)" };
        var batch = new Option<int?>("--batch") { Description = "Videos per step (SOLVER.IMS_PER_BATCH)" };
        var lr = new Option<double?>("--lr") { Description = "Base learning rate" };
        var evalPeriod = new Option<int?>("--eval-period") { Description = "Evaluate every N iterations" };
        var seed = new Option<int>("--seed") { Description = "Seed of data order, augmentation and sampling", DefaultValueFactory = _ => 8434882 };
        var resume = new Option<bool>("--resume") { Description = "Continue the run from its checkpoint_last.safetensors" };
        var workers = new Option<int>("--workers") { Description = "Data-loading workers", DefaultValueFactory = _ => Environment.ProcessorCount };
        var swin = new Option<string?>("--swin-weights") { Description = "ImageNet Swin file for both Swin copies (released presets); a path or a hub reference (swin-b-22k, hf:..., https://...)" };
        var vggish = new Option<string?>("--vggish-weights") { Description = "torchvggish vggish-10086976.pth; a path or a hub reference (vggish, hf:..., https://...)" };
        var amp = new Option<bool>("--amp") { Description = "Mixed precision on CUDA: float16 autocast for forward and losses, dynamic loss scaling (refused on the CPU)" };
        var missing = CommonOptions.MissingMasks("pre-SAM models on data without mask images: refuse | blank | skip");
        var distributed = CommonOptions.Choice("--distributed", "none | mpi: data-parallel over the ranks of an mpirun job (every rank trains its share of each batch; rank 0 writes the files)", "none", "none", "mpi");
        var accumulate = new Option<int>("--accumulate") { Description = "Micro-batches per optimizer step (gradient accumulation): the same step as one batch, in K parts", DefaultValueFactory = _ => 1 };
        var officialMean = new Option<bool>("--official-eval-mean") { Description = "Sharded evaluation: M_J/M_F as the mean of the per-rank means (the official evaluator under DDP) instead of the mean over videos" };
        var collectiveTimeout = new Option<double>("--collective-timeout") { Description = "--distributed mpi: abort the job when one collective waits longer than this many seconds (0: never)", DefaultValueFactory = _ => 600 };
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("train", "Train VCT: iteration based, periodic evaluation, best checkpoint by M_J, resumable; Ctrl-C saves and exits");
        foreach (var o in new Option[] { preset, data, runs, name, iterations, batch, lr, evalPeriod, seed, resume, workers, swin, vggish, missing, amp, distributed, accumulate, officialMean, collectiveTimeout, device, threads }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply(parse.GetValue(threads));
            var options = new TrainOptions
            {
                Preset = Enum.Parse<TrainPreset>(parse.GetValue(preset)!, ignoreCase: true),
                Data = parse.GetValue(data),
                RunsFolder = parse.GetValue(runs)!,
                Name = parse.GetValue(name),
                Iterations = parse.GetValue(iterations),
                BatchVideos = parse.GetValue(batch),
                LearningRate = parse.GetValue(lr),
                EvalPeriod = parse.GetValue(evalPeriod),
                Seed = parse.GetValue(seed),
                Resume = parse.GetValue(resume),
                Workers = parse.GetValue(workers),
                SwinWeights = WeightsCommand.Resolve(parse.GetValue(swin)),
                VggishWeights = WeightsCommand.Resolve(parse.GetValue(vggish)),
                MissingMasks = CommonOptions.ParseMissingMasks(parse.GetValue(missing)!),
                MixedPrecision = parse.GetValue(amp),
                Device = parse.GetValue(device)!,
                Distributed = parse.GetValue(distributed) == "mpi" ? DistributedMode.Mpi : DistributedMode.None,
                Accumulate = parse.GetValue(accumulate),
                OfficialEvalMean = parse.GetValue(officialMean),
                CollectiveTimeout = TimeSpan.FromSeconds(parse.GetValue(collectiveTimeout)),
            };
            using var job = VctTrainingJob.Create(options);
            var ranks = job.Ranks;
            // SIGTERM (kill, docker stop, a scheduler's pre-emption) is handled like Ctrl-C: stop after the step,
            // write the resumable checkpoint, exit 130; a second one aborts. Under mpirun (several ranks) Ctrl-C
            // reaches the ranks as SIGTERM: all stop after the same step, and a peer that died also brings SIGTERM:
            // a collective that now waits long means it is gone.
            using var interruption = ranks > 1
                ? new Interruption("\nstopping after this step; a resumable checkpoint will be written (Ctrl-C again to abort)", "\naborting without a checkpoint",
                    job.IsRoot ? "\nstopping all ranks after this step; a resumable checkpoint will be written" : null, terminateAgainAborts: false,
                    () => job.StopAllRanksSoon(TimeSpan.FromSeconds(15)))
                : new Interruption("\nstopping after this step; a resumable checkpoint will be written (Ctrl-C again to abort)", "\naborting without a checkpoint",
                    "\nSIGTERM: stopping after this step; a resumable checkpoint will be written", terminateAgainAborts: true);
            var total = job.PlannedIterations;
            var sw = Stopwatch.StartNew();
            var first = -1;
            var interactive = !Console.IsErrorRedirected && ranks == 1;
            void Report(TrainProgress p)
            {
                switch (p.Kind)
                {
                    case TrainProgressKind.Step:
                        if (first < 0) { first = p.Iteration - 1; sw.Restart(); }
                        var done = p.Iteration - first;
                        var rate = done / Math.Max(sw.Elapsed.TotalSeconds, 1e-9);
                        var left = total > 0 ? (total - p.Iteration) / Math.Max(rate, 1e-9) : 0;
                        var line = $"it {p.Iteration}/{total} loss {p.Loss:F3} lr {p.LearningRate:E2} {rate:F2} it/s ETA {TimeSpan.FromSeconds(left):hh\\:mm\\:ss}";
                        if (interactive) Console.Error.Write("\r" + line.PadRight(90));
                        else if (p.Iteration % 50 == 0) Console.Error.WriteLine(line);
                        break;
                    case TrainProgressKind.Warning:
                        if (interactive) Console.Error.WriteLine();
                        Console.Error.WriteLine($"warning: {p.Message}");
                        break;
                    case TrainProgressKind.Evaluation:
                        if (interactive) Console.Error.WriteLine();
                        Console.Error.WriteLine($"eval at {p.Iteration}: M_J {p.MJ:F4} M_F {p.MF:F4} ({p.Seconds:F1} s)");
                        break;
                }
            }
            var result = job.Run(new SyncProgress<TrainProgress>(Report), interruption.Token, line => Console.Error.WriteLine(line));
            interruption.StopHandlingCtrlC();
            if (interactive) Console.Error.WriteLine();
            if (job.IsRoot)
            {
                Console.WriteLine(result.SummaryJson);
                Console.Error.WriteLine($"run directory: {result.RunFolder}");
            }
            // mpirun is stopping the job (SIGTERM): MPI_Finalize would wait for it; leave with the exit code now.
            if (interruption.Terminated) job.ExitWithoutFinalizing(result.Outcome == TrainOutcome.Interrupted ? 130 : 1);
            return result.Outcome switch
            {
                TrainOutcome.Completed => 0,
                TrainOutcome.Interrupted => 130,
                _ => Fail(result.Diagnostic ?? "training diverged"),
            };
        });
        return cmd;
    }

    static int Fail(string why)
    {
        Console.Error.WriteLine($"vct train: {why}");
        return 3;
    }
}
