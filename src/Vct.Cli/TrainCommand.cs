using System.CommandLine;
using System.Diagnostics;
using Microsoft.FSharp.Core;
using Vct.Core.Training;

namespace Vct.Cli;

/// <summary><c>vct train</c>: the training loop with a progress line, Ctrl-C handling and the run report.</summary>
internal static class TrainCommand
{
    static FSharpOption<T> Opt<T>(T? v) where T : struct => v is T x ? FSharpOption<T>.Some(x) : FSharpOption<T>.None;
    static FSharpOption<string> Opt(string? v) => string.IsNullOrWhiteSpace(v) ? FSharpOption<string>.None : FSharpOption<string>.Some(v);

    public static Command Create()
    {
        var preset = new Option<string>("--preset") { Description = "tiny (CPU; built-in synthetic data unless --data) | s4 | ms3 | avss (released configurations)", DefaultValueFactory = _ => "tiny" };
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
        var missing = new Option<string>("--missing-masks") { Description = "pre-SAM models on data without mask images: refuse | blank | skip", DefaultValueFactory = _ => "refuse" };
        var distributed = new Option<string>("--distributed") { Description = "none | mpi: data-parallel over the ranks of an mpirun job (every rank trains its share of each batch; rank 0 writes the files)", DefaultValueFactory = _ => "none" };
        var accumulate = new Option<int>("--accumulate") { Description = "Micro-batches per optimizer step (gradient accumulation): the same step as one batch, in K parts", DefaultValueFactory = _ => 1 };
        var officialMean = new Option<bool>("--official-eval-mean") { Description = "Sharded evaluation: M_J/M_F as the mean of the per-rank means (the official evaluator under DDP) instead of the mean over videos" };
        var collectiveTimeout = new Option<double>("--collective-timeout") { Description = "--distributed mpi: abort the job when one collective waits longer than this many seconds (0: never)", DefaultValueFactory = _ => 600 };
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("train", "Train VCT: iteration based, periodic evaluation, best checkpoint by M_J, resumable; Ctrl-C saves and exits");
        foreach (var o in new Option[] { preset, data, runs, name, iterations, batch, lr, evalPeriod, seed, resume, workers, swin, vggish, missing, amp, distributed, accumulate, officialMean, collectiveTimeout, device, threads }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            var dev = CommonOptions.Apply(parse.GetValue(device)!, parse.GetValue(threads));
            var p = parse.GetValue(preset)!.ToLowerInvariant();
            var runName = parse.GetValue(name) ?? $"{p}-{DateTime.Now:yyyyMMdd-HHmmss}";
            var options = new TrainJobOptions(
                p, Opt(parse.GetValue(data)), parse.GetValue(runs)!, runName,
                Opt(parse.GetValue(iterations)), Opt(parse.GetValue(batch)), Opt(parse.GetValue(lr)),
                parse.GetValue(seed), parse.GetValue(resume), dev, parse.GetValue(workers), Opt(parse.GetValue(evalPeriod)),
                Opt(WeightsCommand.Resolve(parse.GetValue(swin))), Opt(WeightsCommand.Resolve(parse.GetValue(vggish))),
                parse.GetValue(missing)!.ToLowerInvariant() switch
                {
                    "refuse" => Vct.Core.Fusion.MissingMasks.Refuse,
                    "blank" => Vct.Core.Fusion.MissingMasks.BlankMaskImage,
                    "skip" => Vct.Core.Fusion.MissingMasks.SkipBranch,
                    var other => throw new ArgumentException($"--missing-masks must be refuse, blank or skip, got '{other}'"),
                },
                parse.GetValue(amp));
            var par = DistributedOptions.Create(parse.GetValue(distributed)!, parse.GetValue(accumulate), parse.GetValue(officialMean), parse.GetValue(collectiveTimeout));
            using var comm = par.Comm;
            var ranks = par.Comm.Size;
            using var cts = new CancellationTokenSource();
            var terminated = false;
            ConsoleCancelEventHandler onCancel = (_, e) =>
            {
                e.Cancel = true;
                if (cts.IsCancellationRequested)
                {
                    Console.Error.WriteLine("\naborting without a checkpoint");
                    // The trainer holds the finalizer gate during steps; exit would otherwise wait for it forever.
                    Vct.Core.Platform.FinalizerGate.ReleaseForExit();
                    Environment.Exit(130);
                }
                Console.Error.WriteLine("\nstopping after this step; a resumable checkpoint will be written (Ctrl-C again to abort)");
                cts.Cancel();
            };
            Console.CancelKeyPress += onCancel;
            // SIGTERM (kill, docker stop, a scheduler's pre-emption) is handled like Ctrl-C: stop after the step,
            // write the resumable checkpoint, exit 130; a second one aborts. Under mpirun (several ranks) Ctrl-C
            // reaches the ranks as SIGTERM: all stop after the same step.
            using var onTerm = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, ranks > 1
                ? ctx =>
            {
                ctx.Cancel = true;
                terminated = true;
                // A peer that died also brings SIGTERM: a collective that now waits long means it is gone.
                if (par.Comm is MpiCommunicator mpi) mpi.StopSoon(15.0);
                if (!cts.IsCancellationRequested && par.IsRoot) Console.Error.WriteLine("\nstopping all ranks after this step; a resumable checkpoint will be written");
                cts.Cancel();
            }
                : ctx =>
            {
                ctx.Cancel = true;
                if (cts.IsCancellationRequested)
                {
                    Console.Error.WriteLine("\naborting without a checkpoint");
                    Vct.Core.Platform.FinalizerGate.ReleaseForExit();
                    Environment.Exit(130);
                }
                Console.Error.WriteLine("\nSIGTERM: stopping after this step; a resumable checkpoint will be written");
                cts.Cancel();
            });
            var total = 0;
            var sw = Stopwatch.StartNew();
            var first = -1;
            var interactive = !Console.IsErrorRedirected && ranks == 1;
            void Log(string s) => Console.Error.WriteLine(s);
            void Event(TrainEvent e)
            {
                if (e is TrainEvent.Step s)
                {
                    if (first < 0) { first = s.iteration - 1; sw.Restart(); }
                    var done = s.iteration - first;
                    var rate = done / Math.Max(sw.Elapsed.TotalSeconds, 1e-9);
                    var left = total > 0 ? (total - s.iteration) / Math.Max(rate, 1e-9) : 0;
                    var line = $"it {s.iteration}/{total} loss {s.loss:F3} lr {s.lr:E2} {rate:F2} it/s ETA {TimeSpan.FromSeconds(left):hh\\:mm\\:ss}";
                    if (interactive) Console.Error.Write("\r" + line.PadRight(90));
                    else if (s.iteration % 50 == 0) Console.Error.WriteLine(line);
                }
                else if (e is TrainEvent.Warning w)
                {
                    if (interactive) Console.Error.WriteLine();
                    Console.Error.WriteLine($"warning: {w.message}");
                }
                else if (e is TrainEvent.Eval ev)
                {
                    if (interactive) Console.Error.WriteLine();
                    Console.Error.WriteLine($"eval at {ev.iteration}: M_J {ev.mj:F4} M_F {ev.mf:F4} ({ev.seconds:F1} s)");
                }
            }
            var kind = p == "tiny" ? Vct.Core.Subset.S4 : Vct.Core.Subset.Parse(p);
            total = TrainJob.config(p, kind, options).Iterations;
            Vct.Core.Training.TrainResult result;
            System.Text.Json.Nodes.JsonObject summary;
            try
            {
                (result, summary) = TrainJob.runWith(par, options,
                    FuncConvert.FromAction<string>(Log), FuncConvert.FromAction<TrainEvent>(Event), cts.Token).ToValueTuple();
            }
            catch (Exception e) when (ranks > 1)
            {
                // One rank failing stops the job: the others would wait for it in the next collective.
                var inner = e is AggregateException { InnerException: { } ie } ? ie : e;
                par.Comm.Abort(inner.Message);
                throw;
            }
            Console.CancelKeyPress -= onCancel;
            if (interactive) Console.Error.WriteLine();
            if (par.IsRoot)
            {
                Console.WriteLine(summary.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
                Console.Error.WriteLine($"run directory: {result.RunDir}");
            }
            // mpirun is stopping the job (SIGTERM): MPI_Finalize would wait for it; leave with the exit code now.
            if (terminated && par.Comm is MpiCommunicator stopping) stopping.HardExit(result.Outcome.IsInterrupted ? 130 : 1);
            return result.Outcome switch
            {
                var o when o.IsCompleted => 0,
                var o when o.IsInterrupted => 130,
                Vct.Core.Training.TrainOutcome.Diverged d => Fail(d.diagnostic),
                _ => 1,
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
