namespace Vct.Core.Training

open System
open System.Collections.Generic
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Evaluation

/// The training loop (docs/architecture.md §10-11; official train_net.py, Trainer): iteration based, periodic
/// evaluation with the official metrics, best checkpoint by M_J, resumable checkpoints written atomically, JSONL
/// log, progress line, Ctrl-C handling, NaN/Inf detection. Every step runs in a dispose scope so memory stays flat.
[<RequireQualifiedAccess>]
module Trainer =
    /// Runs training. `log` receives every event (the CLI draws the progress line from it); `cancel` stops
    /// cleanly after the current step, saving a resumable checkpoint. With `resume`, continues from the run
    /// directory's checkpoint_last.
    /// `init` runs on the new model before training starts (pretrained weights); it is skipped when resuming.
    /// `run` spread by `par` (data-parallel ranks, gradient accumulation); with `DistributedOptions.Single` it is `run`.
    /// Only rank 0 writes files; every rank returns the same result.
    let runWith (par: DistributedOptions) (cfg: TrainConfig) (trainRecords: VideoRecord[]) (valRecords: VideoRecord[]) (device: torch.Device)
                (runDir: string) (resume: bool) (init: VctModel -> unit) (log: TrainEvent -> unit) (cancel: CancellationToken) : TrainResult =
        Runtime.init () |> ignore
        if cfg.Amp then Amp.require device
        if trainRecords.Length < cfg.BatchVideos then
            invalidArg (nameof trainRecords) $"{trainRecords.Length} training videos for a batch of {cfg.BatchVideos}"
        if valRecords.Length = 0 then raise (ArgumentException "no validation videos: the val split is empty, so the run could not be evaluated")
        RunState.checkRunDir runDir resume
        let files = RunFiles runDir
        // Only rank 0 writes the run's files.
        let appendJson path node = if par.IsRoot then RunState.appendJson path node
        if par.IsRoot then Directory.CreateDirectory runDir |> ignore
        let sw = Stopwatch.StartNew()
        let gen = new torch.Generator(uint64 cfg.Seed)
        torch.manual_seed (int64 cfg.Seed) |> ignore
        use model = new VctModel(cfg.Model, gen)
        use criterion = new Criterion(cfg.Criterion)
        if not resume then init model
        model.``to``(device) |> ignore
        criterion.``to``(device) |> ignore
        let settings = Optim.settings cfg.Optim [ "", model :> torch.nn.Module; "criterion", criterion :> torch.nn.Module ]
        let opt, baseLrs = Optim.adamW cfg.Optim settings
        use _opt = opt
        let trainable = settings |> List.map snd
        if not par.IsSingle then
            if par.Accumulate < 1 then invalidArg (nameof par) $"accumulate must be >= 1, got {par.Accumulate}"
            if cfg.BatchVideos % par.Parts <> 0 then
                invalidArg (nameof cfg) $"a batch of {cfg.BatchVideos} videos does not split into {par.Comm.Size} rank(s) x {par.Accumulate} micro-batch(es); choose a batch divisible by {par.Parts}"
            let ids = trainRecords |> Array.map (fun r -> r.Id) |> String.concat ","
            Distributed.checkSame par "configurations (seed, preset, batch or data)"
                $"seed {cfg.Seed}, batch {cfg.BatchVideos}, iterations {cfg.Iterations}, accumulate {par.Accumulate}, model {ConfigJson.toText cfg.Model}, {trainRecords.Length} training videos {Distributed.fingerprint ids}, {valRecords.Length} validation videos"
        // Mixed precision: forward and losses under float16 autocast on the device, dynamic loss scaling.
        let autocast = if cfg.Amp then Some(device.``type``, Amp.dtype) else None
        let scaler = if cfg.Amp then Some(GradScaler()) else None
        let mutable start, bestMJ, bestIt = 0, -1.0, -1
        if resume then
            // checkpoint_last, or the one before it when the last cannot be read (torn by a crash, corrupted).
            let tryLoad (path: string) =
                if not (File.Exists path) then Error $"{path} does not exist"
                else
                    try
                        let r = RunState.loadState path model criterion opt
                        scaler |> Option.iter (fun s -> RunState.loadScalerState path s |> ignore)
                        Ok r
                    with
                    | :? InvalidDataException | :? IOException | :? ArgumentException | :? InvalidOperationException
                    | :? System.Runtime.InteropServices.ExternalException as e -> Error e.Message
            let it, b, bi =
                match tryLoad files.Last with
                | Ok r -> r
                | Error whyLast ->
                    match tryLoad files.Previous with
                    | Ok ((it, _, _) as r) ->
                        log (Warning(it, $"{whyLast}; resuming from the previous checkpoint {files.Previous} (iteration {it})"))
                        r
                    | Error whyPrev -> raise (InvalidDataException $"cannot resume: {whyLast}; {whyPrev}")
            start <- it
            bestMJ <- b
            bestIt <- bi
            if par.IsRoot then
                let dropped = RunState.trimLog files.Metrics it
                if dropped > 0 then
                    log (Warning(it, $"{files.Metrics}: {dropped} line(s) after iteration {it} (or torn) dropped; those steps run again"))
        elif par.IsRoot && File.Exists files.Metrics then
            File.Delete files.Metrics
        // Every rank continues from rank 0's weights (the same seed builds the same model; this makes sure).
        if not par.IsSingle then Distributed.broadcastState par [ model; criterion ]
        use audio = new TrainData.AudioCache(model)
        let subset = cfg.Model.Subset
        // Pre-SAM mask images are read when the model has the branch and the tree has them; without them the model
        // refuses (MissingMasks.Refuse) unless the run chose a documented fallback.
        model.MissingMasks <- cfg.MissingMasks
        let loadOpts = { Data.LoadOptions.Default with FrameSize = Some cfg.CropSize; PreSam = cfg.Model.UsePreSam && trainRecords[0].PreMasks.Length > 0 }
        let aug = { AugmentOptions.Default with CropSize = cfg.CropSize; ColorJitter = cfg.ColorJitter; SquashToSquare = (subset = Subset.AVSS) }
        // NOTE: batches are decoded and augmented by `cfg.Workers` background threads, `Prefetch` batches ahead
        // (0 workers: on this thread, when asked for). TorchSharp 0.107 passes only the handles of the temporaries it
        // creates (the Scalar behind every `alpha`) to native code, so a GC triggered by a worker's allocations
        // during a native call could finalise one while LibTorch still reads it ("Scalar.h: Expected false to be
        // true", seen after a few hundred steps before the gate). The finalizer gate below holds the finalizer
        // thread during steps and lets it run between them (FinalizerGate); the workers never call TorchSharp.
        let loaderOpts = { LoaderOptions.Default with BatchSize = cfg.BatchVideos; Seed = cfg.Seed; Workers = max 0 cfg.Workers; Prefetch = 2 }
        let loader =
            if par.IsSingle then BatchLoader(trainRecords, loaderOpts, fun r rng -> r, Augment.video aug rng (Avsbench.loadVideo loadOpts r))
            else
                // Each rank decodes only its own videos of every batch (the others stay null); seeds are the batch's.
                let per = cfg.BatchVideos / par.Comm.Size
                BatchLoader.Positional(trainRecords, loaderOpts, fun i r rng ->
                    if i / per = par.Comm.Rank then r, Augment.video aug rng (Avsbench.loadVideo loadOpts r)
                    else r, Unchecked.defaultof<AugmentedVideo>)
        let perEpoch = loader.BatchesPerEpoch
        let mutable lastEval = None
        let mutable outcome = Completed
        let mutable iteration = start
        let evalNow () =
            Runtime.trimNativeHeap ()
            let t0 = sw.Elapsed.TotalSeconds
            let summary = if par.IsSingle then Validation.evaluate model audio valRecords false cfg.Workers else Validation.evaluateSharded par model audio valRecords cfg.Workers
            model.train ()
            lastEval <- Some summary
            log (Eval(iteration, summary.MJ, summary.MF, sw.Elapsed.TotalSeconds - t0))
            appendJson files.Metrics (JsonObject(dict [ "type", JsonValue.Create "eval" :> JsonNode
                                                        "iteration", JsonValue.Create iteration
                                                        "m_j", JsonValue.Create summary.MJ
                                                        "m_f", JsonValue.Create summary.MF ]))
            if summary.MJ > bestMJ then
                bestMJ <- summary.MJ
                bestIt <- iteration
                if par.IsRoot then ModelIO.save files.Best model
        // checkpoint_last, the one before it kept as checkpoint_prev (rank 0 only). Never with non-finite weights.
        let saveLast () =
            if par.IsRoot then
                if File.Exists files.Last then File.Move(files.Last, files.Previous, true)
                RunState.saveState files.Last cfg model criterion opt scaler iteration bestMJ bestIt
        let finiteOrDiverge () =
            if TrainStep.allFinite model && TrainStep.allFinite criterion then true
            else
                outcome <- Diverged(iteration, $"the weights are non-finite after iteration {iteration}; nothing was saved, the last good checkpoint is kept")
                false
        let mutable nonFiniteRun = 0
        model.train ()
        use gate = FinalizerGate.Hold()
        // Seconds the last step waited for its batch (0 when the workers had it ready).
        let mutable dataWait = 0.0
        let mutable skip = start % perEpoch
        // NOTE: the loader gets no token: the loop polls `cancel` before every batch, and a token passed down
        // would make MoveNext throw OperationCanceledException when Ctrl-C lands between that poll and the
        // loader's own check, ending the run with an exception instead of a checkpoint. Disposing the
        // enumerator stops background workers.
        use batches = (loader.Stream(start / perEpoch)).GetEnumerator()   // runs on across epochs
        let mutable more = true
        while more && iteration < cfg.Iterations && outcome = Completed do
            if (if par.IsSingle then cancel.IsCancellationRequested
                else
                    // Ctrl-C reaches the ranks at different moments: they stop together after the same step.
                    let flag = [| (if cancel.IsCancellationRequested then 1L else 0L) |]
                    par.Comm.AllReduceInt64(flag, MpiOp.Max)
                    flag[0] > 0L) then
                outcome <- Interrupted iteration
            elif (let w0 = sw.Elapsed.TotalSeconds
                  let moved = batches.MoveNext()
                  dataWait <- sw.Elapsed.TotalSeconds - w0
                  not moved) then more <- false
            elif skip > 0 then skip <- skip - 1 // resuming inside an epoch: the same batches, already used
            else
                let t0 = sw.Elapsed.TotalSeconds
                let stepSeed = TrainStep.seedFor cfg.Seed iteration
                torch.manual_seed (int64 stepSeed) |> ignore
                gen.manual_seed (int64 stepSeed) |> ignore
                use pointGen = new torch.Generator(uint64 (stepSeed + 1))
                Optim.setLr opt baseLrs (Optim.polyFactor cfg.Optim cfg.Iterations iteration)
                let lossValue, terms, diverged, (ampStep: ScaledStep) =
                    if not par.IsSingle then
                        TrainStep.splitStep par model criterion audio subset device gen stepSeed autocast scaler opt trainable cfg.Optim.ClipNorm iteration (snd batches.Current)
                    else
                    use scope = torch.NewDisposeScope()
                    let records, videos = Array.unzip (snd batches.Current)
                    // Annotated frames only (TrainBatch): S4 steps get about 5x cheaper.
                    let inputs = TrainBatch.inputs audio device records videos
                    let n = inputs.Images.shape[0]
                    // One label map per annotated frame, in frame order.
                    let targets =
                        [| for v in videos do
                               let l = (Batch.labels v.Masks).``to``(device)
                               for k in 0L .. l.shape[0] - 1L -> FrameTarget.ofLabelMap 255L (l.select(0L, k)) |]
                    if int64 targets.Length <> n then
                        invalidOp $"{targets.Length} label maps for {n} annotated frames in a batch of {records.Length} videos"
                    let supervision = TrainBatch.supervision subset records n
                    use losses =
                        Amp.within autocast (fun () ->
                            let out = model.Forward inputs
                            criterion.Forward(out.Decoder, targets, supervision, pointGen))
                    let total = (if losses.Total.dtype = torch.float32 then losses.Total else losses.Total.to_type(torch.float32)).item<float32> () |> float
                    if Double.IsFinite total then
                        opt.zero_grad ()
                        let step = Amp.backwardAndStep scaler losses.Total opt trainable cfg.Optim.ClipNorm
                        total, losses.Values, None, step
                    else
                        let bad = losses.Values |> Map.filter (fun _ v -> not (Double.IsFinite v)) |> Map.keys |> String.concat ", "
                        total, losses.Values, Some $"loss is {total} at iteration {iteration} (non-finite terms: {bad}); the last good checkpoint is kept",
                        { Skipped = true; Scale = 1.0; GradNorm = None }
                // A float32 step whose gradient norm is not finite was skipped (Amp.backwardAndStep); too many in
                // a row end the run.
                let badGradient = not cfg.Amp && ampStep.Skipped && diverged.IsNone
                nonFiniteRun <- if badGradient then nonFiniteRun + 1 else 0
                match diverged with
                | Some why -> outcome <- Diverged(iteration, why)
                | None when nonFiniteRun >= TrainStep.maxNonFiniteGradientSteps ->
                    outcome <- Diverged(iteration, $"the gradient norm was non-finite in {nonFiniteRun} steps in a row (iterations {iteration - nonFiniteRun + 2}..{iteration + 1}); the last good checkpoint is kept")
                | None ->
                    if badGradient then
                        let norm =
                            match ampStep.GradNorm with
                            | Some v when Double.IsPositiveInfinity v -> "+inf"
                            | Some v when Double.IsNegativeInfinity v -> "-inf"
                            | _ -> "NaN"
                        log (Warning(iteration + 1, $"iteration {iteration + 1}: the gradient norm is {norm}; step skipped (no weight update), {TrainStep.maxNonFiniteGradientSteps - nonFiniteRun} more in a row stop the run"))
                    iteration <- iteration + 1
                    let secs = sw.Elapsed.TotalSeconds - t0
                    let lr = (Seq.head opt.ParamGroups).LearningRate
                    log (Step(iteration, lossValue, terms, lr, secs))
                    let node = JsonObject(dict [ "type", JsonValue.Create "step" :> JsonNode
                                                 "iteration", JsonValue.Create iteration
                                                 "loss", JsonValue.Create lossValue
                                                 "lr", JsonValue.Create lr
                                                 "seconds", JsonValue.Create secs
                                                 "data_wait_seconds", JsonValue.Create dataWait ])
                    for kv in terms do node[kv.Key] <- JsonValue.Create kv.Value
                    if not par.IsSingle then node["allreduce_seconds"] <- JsonValue.Create(Distributed.lastSyncSeconds ())
                    if cfg.Amp then
                        node["amp_scale"] <- JsonValue.Create ampStep.Scale
                        node["amp_skipped"] <- JsonValue.Create ampStep.Skipped
                    elif badGradient then node["skipped_nonfinite_gradient"] <- JsonValue.Create true
                    appendJson files.Metrics node
                    let evalDue = iteration % cfg.EvalPeriod = 0 || iteration = cfg.Iterations
                    let saveDue = iteration % cfg.CheckpointPeriod = 0 || iteration = cfg.Iterations
                    if (evalDue || saveDue) && finiteOrDiverge () then
                        if evalDue then evalNow ()
                        if saveDue then saveLast ()
                // Between steps this thread is in no native call: let the step's temporaries be finalized.
                gate.Pulse()
        match outcome with
        | Interrupted _ -> if finiteOrDiverge () then saveLast ()
        | Completed -> if finiteOrDiverge () && par.IsRoot then ModelIO.save files.Final model
        | Diverged _ -> ()
        gen.Dispose()
        { Outcome = outcome; Iterations = iteration; BestMJ = bestMJ; BestIteration = bestIt
          LastEval = lastEval; WallSeconds = sw.Elapsed.TotalSeconds; RunDir = runDir }

    /// Runs training in this process alone (`runWith DistributedOptions.Single`).
    let run (cfg: TrainConfig) (trainRecords: VideoRecord[]) (valRecords: VideoRecord[]) (device: torch.Device)
            (runDir: string) (resume: bool) (init: VctModel -> unit) (log: TrainEvent -> unit) (cancel: CancellationToken) : TrainResult =
        runWith DistributedOptions.Single cfg trainRecords valRecords device runDir resume init log cancel
