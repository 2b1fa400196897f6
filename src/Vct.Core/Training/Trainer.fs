namespace Vct.Core.Training

open System
open System.Collections.Concurrent
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
open Vct.Core.Checkpoint

/// Everything a training run needs besides the data.
type TrainConfig =
    { Model: VctConfig
      Criterion: CriterionConfig
      Optim: OptimConfig
      /// SOLVER.MAX_ITER.
      Iterations: int
      /// Videos per step (SOLVER.IMS_PER_BATCH).
      BatchVideos: int
      /// Evaluate on the validation split every this many iterations (and at the end).
      EvalPeriod: int
      /// Write the resumable checkpoint every this many iterations (and at the end).
      CheckpointPeriod: int
      /// SEED: data order, augmentation, Gumbel noise, point sampling and drop path all derive from
      /// (Seed, iteration), so a resumed run repeats an uninterrupted one.
      Seed: int
      /// Side of the training crops (INPUT.CROP.SIZE; 384 released).
      CropSize: int
      ColorJitter: bool
      /// Data-loading workers.
      Workers: int
      /// What a pre-SAM model does when the data has no mask images (released presets: refuse).
      MissingMasks: Fusion.MissingMasks
      /// Mixed precision (CUDA only; refused elsewhere): forward and losses under LibTorch's float16 autocast,
      /// backward of the loss times a dynamic scale (GradScalerOptions.Default), gradients unscaled before
      /// clipping, steps with inf/NaN gradients skipped. Parameters and optimiser state stay float32.
      Amp: bool }

/// One line of the metrics log.
type TrainEvent =
    | Step of iteration: int * loss: float * terms: Map<string, float> * lr: float * seconds: float
    | Eval of iteration: int * mj: float * mf: float * seconds: float
    /// Something the run survived but the user should know (a skipped step, a fallback checkpoint).
    | Warning of iteration: int * message: string

/// How a run ended.
type TrainOutcome =
    | Completed
    | Interrupted of atIteration: int
    | Diverged of atIteration: int * diagnostic: string

/// The result of `Trainer.run`.
type TrainResult =
    { Outcome: TrainOutcome
      Iterations: int
      BestMJ: float
      BestIteration: int
      LastEval: MetricSummary option
      WallSeconds: float
      RunDir: string }

/// Where a run keeps its files: checkpoint_last.safetensors (resumable), checkpoint_prev.safetensors (the one
/// before it, the fallback when the last cannot be read), model_best.safetensors (+ .json), metrics.jsonl.
type RunFiles(dir: string) =
    member _.Dir = dir
    member _.Last = Path.Combine(dir, "checkpoint_last.safetensors")
    member _.Previous = Path.Combine(dir, "checkpoint_prev.safetensors")
    member _.Best = Path.Combine(dir, "model_best.safetensors")
    member _.Final = Path.Combine(dir, "model_final.safetensors")
    member _.Metrics = Path.Combine(dir, "metrics.jsonl")

/// Helpers shared by training and evaluation over the AVSBench readers.
[<RequireQualifiedAccess>]
module TrainData =
    /// VGGish maps of a record's audio, computed once per process and kept on the CPU ([T_a, 512, 6, 4]).
    type AudioCache(model: VctModel) =
        let cache = ConcurrentDictionary<string, Tensor>()
        member _.Maps(r: VideoRecord) : Tensor =
            cache.GetOrAdd(r.Id + "|" + r.Split, fun _ ->
                use ex = Avsbench.audioExamples r
                use _ = torch.no_grad ()
                let device = (Seq.head (model.AudioBackbone.parameters ())).device
                use maps = model.AudioBackbone.Forward (ex.``to``(device))
                // Cached across steps: it must not belong to the caller's dispose scope.
                maps.cpu().detach().clone().DetachFromDisposeScope())
        /// The maps of the frames that take part: AVSS rows whose vid flag is 0 are dropped.
        member this.FrameMaps(r: VideoRecord) : Tensor =
            let maps = this.Maps r
            if r.VidTemporalFlag.Length > 0 then
                let keep = [| for i in 0 .. r.VidTemporalFlag.Length - 1 do if r.VidTemporalFlag[i] = 1 then yield int64 i |]
                maps.index_select(0L, torch.tensor(keep))
            else maps.alias()
        interface IDisposable with
            member _.Dispose() = for t in cache.Values do t.Dispose()

/// Batch assembly: the annotated frames of a batch of videos as model inputs (VGGish maps from the cache) and
/// their supervision. NOTE: only the annotated frames are run (S4 train: frame 0 of each video). VCT has no
/// interaction between frames (every module works per frame), so the losses and gradients equal those of the
/// official step, which also runs the unannotated frames and discards them; only the random streams differ.
[<RequireQualifiedAccess>]
module TrainBatch =
    let private pick (r: VideoRecord) = torch.tensor(r.MaskFrames |> Array.map int64)

    /// The annotated frames, mask images (when every video has them) and audio maps, on `device`.
    let inputs (audio: TrainData.AudioCache) (device: torch.Device) (records: VideoRecord[]) (videos: AugmentedVideo[]) : VctInputs =
        let gather (images: AugmentedVideo -> Image[]) =
            torch.cat([| for r, v in Array.zip records videos -> (Batch.frames (images v)).index_select(0L, pick r) |], 0L).``to``(device)
        let preMasks = if videos |> Array.forall (fun v -> v.PreMasks.Length > 0) then Some(gather (fun v -> v.PreMasks)) else None
        let maps = torch.cat([| for r in records -> (audio.FrameMaps r).index_select(0L, pick r) |], 0L)
        { Images = gather (fun v -> v.Frames); PreMasks = preMasks; Audio = AudioInput.Maps(maps.``to``(device)) }

    /// What the losses supervise for `n` annotated frames of `records`.
    let supervision (subset: Subset) (records: VideoRecord[]) (n: int64) =
        match subset with
        | Subset.S4 -> Supervision.s4 n 1L (records |> Array.collect (fun r -> Array.create r.MaskFrames.Length r.CategoryLabel))
        | Subset.MS3 -> Supervision.ms3 n
        | Subset.AVSS -> Supervision.avss (Array.create (int n) 1)

/// The training loop (docs/architecture.md §10-11; official train_net.py, Trainer): iteration based, periodic
/// evaluation with the official metrics, best checkpoint by M_J, resumable checkpoints written atomically, JSONL
/// log, progress line, Ctrl-C handling, NaN/Inf detection. Every step runs in a dispose scope so memory stays flat.
[<RequireQualifiedAccess>]
module Trainer =
    let private seedFor (seed: int) (iteration: int) = DeterministicSeed.mix [ seed; iteration; 0x7a11 ]

    /// Steps in a row whose gradient norm may be non-finite before a float32 run stops as diverged (each such
    /// step is skipped: no weight or optimiser-state update, a warning).
    let maxNonFiniteGradientSteps = 5

    /// Refuses to start a new run in a folder that already holds one (its checkpoints and log would mix with
    /// the new run's); resuming needs its checkpoint.
    let checkRunDir (runDir: string) (resume: bool) =
        let files = RunFiles runDir
        if not resume then
            let held =
                [ files.Last; files.Previous; files.Metrics; files.Best; files.Final ]
                |> List.filter File.Exists |> List.map Path.GetFileName
            if not held.IsEmpty then
                let names = String.Join(", ", held)
                raise (InvalidOperationException $"{runDir}: already holds a run ({names}); pass --resume to continue it, or choose another --name")
        elif not (File.Exists files.Last || File.Exists files.Previous) then
            raise (FileNotFoundException($"nothing to resume: {files.Last} does not exist", files.Last))

    /// True when every parameter of `m` is finite (checked before any weights are saved).
    let allFinite (m: torch.nn.Module) =
        use _ = torch.no_grad ()
        m.parameters () |> Seq.forall (fun p -> use ok = p.isfinite().all() in ok.item<bool> ())

    /// Evaluates `model` on decoded videos with the VCT metrics: scores at the GT's size; `shuffleAudio` pairs each
    /// video with another video's audio (a control that shows whether the model listens).
    let evaluate (model: VctModel) (audio: TrainData.AudioCache) (records: VideoRecord[]) (shuffleAudio: bool) (workers: int) : MetricSummary =
        if records.Length = 0 then raise (ArgumentException "no videos to evaluate (the split is empty)")
        let subset = model.Config.Subset
        let evaluator = Metrics.evaluator subset MetricVariant.Vct (int model.Config.NumClasses)
        use _ = torch.no_grad ()
        model.eval ()
        // Videos are decoded ahead by `workers` background threads (0: on this thread); the finalizer gate makes
        // their allocations safe for this thread's LibTorch calls (see FinalizerGate). Nested in a training run's
        // gate, its pulses are the run's.
        use gate = FinalizerGate.Hold()
        let loader = BatchLoader(records, { LoaderOptions.Default with BatchSize = 1; Shuffle = false; Workers = max 0 workers; Prefetch = 2; DropLast = false },
                                 fun r _ -> Avsbench.loadVideo { Data.LoadOptions.Default with FrameSize = None; PreSam = model.Config.UsePreSam && r.PreMasks.Length > 0 } r)
        let mutable index = 0
        for batch in loader.Epoch 0 do
            for v in batch do
                use scope = torch.NewDisposeScope()
                let source =
                    if shuffleAudio && records.Length > 1 then records[(index + 1 + records.Length / 2) % records.Length]
                    else v.Record
                index <- index + 1
                let frames = Batch.frames v.Frames
                let maps = audio.FrameMaps source
                let t = frames.shape[0]
                // A shuffled clip of another length: repeat or cut to this video's frame count.
                let maps = if maps.shape[0] = t then maps else maps.index_select(0L, torch.arange(t.AsScalar, dtype = torch.int64).remainder(maps.shape[0].AsScalar))
                let inputs =
                    { Images = frames
                      PreMasks = (if v.PreMasks.Length > 0 then Some(Batch.frames v.PreMasks) else None)
                      Audio = AudioInput.Maps maps }
                let gt = Batch.labels v.Masks
                use seg = Segment.run model { SegmentOptions.Default with OutputSize = OutputSize.Size(gt.shape[1], gt.shape[2]) } inputs
                let scores = seg.Scores
                // Frames with GT only (S4/MS3 val/test annotate every frame; AVSS by the gt flags).
                let gtFrames = v.Record.MaskFrames
                let scores = if int64 gtFrames.Length = t then scores else scores.index_select(0L, torch.tensor(gtFrames |> Array.map int64))
                if scores.isnan().any().item<bool> () then
                    raise (InvalidDataException $"video '{v.Record.Id}': the model's scores hold NaN (non-finite weights?); no metric can be computed")
                evaluator.Add(v.Record.Id, scores.cpu(), gt) |> ignore
            gate.Pulse()
        evaluator.Summary()

    /// Writes the resumable state: model, criterion, optimiser state, iteration and the loss scaler's state (mixed
    /// precision), in one atomic safetensors file.
    let saveState (path: string) (cfg: TrainConfig) (model: VctModel) (criterion: Criterion) (opt: Modules.AdamW) (scaler: GradScaler option)
                  (iteration: int) (bestMJ: float) (bestIt: int) =
        let invariant (x: float) = x.ToString("R", Globalization.CultureInfo.InvariantCulture)
        let meta =
            [ yield "iteration", string iteration
              yield "best_mj", invariant bestMJ
              yield "best_iteration", string bestIt
              match scaler with
              | Some s ->
                  yield "amp_scale", invariant s.Scale
                  yield "amp_growth_tracker", string s.GrowthTracker
              | None -> () ]
        // The step's freed activations back to the OS first: the released presets come close to 24 GB otherwise.
        Runtime.trimNativeHeap ()
        use optTensor = Optim.stateTensor opt
        let tensors =
            [ for kv in model.state_dict () -> kv.Key, kv.Value
              for kv in criterion.state_dict () -> "criterion." + kv.Key, kv.Value
              yield "optimizer_state", optTensor ]
        VctCheckpoint.write path (Some(ConfigJson.toText cfg.Model)) false meta tensors

    /// Restores what `saveState` wrote; returns (iteration, best M_J, best iteration).
    let loadState (path: string) (model: VctModel) (criterion: Criterion) (opt: Modules.AdamW) : int * float * int =
        use f = Safetensors.read path
        let get = VctCheckpoint.requireMeta "Vct training checkpoint" path f
        // The metadata first: a malformed checkpoint is refused before anything is loaded.
        let number (k: string) =
            match Double.TryParse(get k, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
            | true, v -> v
            | _ -> raise (InvalidDataException $"{path}: metadata '{k}' is not a number ('{get k}')")
        let count (k: string) (least: int) =
            match Int32.TryParse(get k, Globalization.NumberStyles.Integer, Globalization.CultureInfo.InvariantCulture) with
            | true, v when v >= least -> v
            | _ -> raise (InvalidDataException $"{path}: metadata '{k}' is not an iteration count ('{get k}')")
        let iteration, bestMJ, bestIt = count "iteration" 0, number "best_mj", count "best_iteration" -1
        if not (f.Tensors.ContainsKey "optimizer_state") then
            raise (InvalidDataException $"{path}: not a Vct training checkpoint (no 'optimizer_state' tensor)")
        let modelPart = [ for kv in f.Tensors do if not (kv.Key.StartsWith "criterion.") && kv.Key <> "optimizer_state" then yield kv ]
        StateDict.loadInto Checkpoint.LoadOptions.Default modelPart model |> ignore
        let critPart = [ for kv in f.Tensors do if kv.Key.StartsWith "criterion." then yield KeyValuePair(kv.Key.Substring 10, kv.Value) ]
        StateDict.loadInto Checkpoint.LoadOptions.Default critPart criterion |> ignore
        Optim.loadStateBytes opt (f.Tensors["optimizer_state"].data<byte>().ToArray())
        iteration, bestMJ, bestIt

    /// Restores the loss scaler's state from a `saveState` checkpoint; false when it has none (a float32 run's
    /// checkpoint: the scaler then starts afresh).
    let loadScalerState (path: string) (scaler: GradScaler) : bool =
        use f = Safetensors.read path
        match f.Metadata.TryGetValue "amp_scale", f.Metadata.TryGetValue "amp_growth_tracker" with
        | (true, s), (true, t) ->
            let inv = Globalization.CultureInfo.InvariantCulture
            match Double.TryParse(s, Globalization.NumberStyles.Float, inv), Int32.TryParse(t, Globalization.NumberStyles.Integer, inv) with
            | (true, scale), (true, tracker) when scale > 0.0 && Double.IsFinite scale && tracker >= 0 -> scaler.Restore(scale, tracker)
            | _ -> raise (InvalidDataException $"{path}: metadata 'amp_scale' / 'amp_growth_tracker' malformed ('{s}', '{t}')")
            true
        | _ -> false

    let private appendJson (path: string) (node: JsonObject) =
        File.AppendAllText(path, node.ToJsonString() + "\n")

    /// On resume: the metrics log up to `iteration`, rewritten atomically. A torn last line (the process died while
    /// writing it) and the lines of steps after the checkpoint (they are run again) are dropped, so no step is
    /// logged twice. Returns the number of lines dropped.
    let trimLog (path: string) (iteration: int) : int =
        if not (File.Exists path) then 0
        else
            let lines = File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "")
            let keep =
                lines |> Array.filter (fun line ->
                    try
                        use doc = JsonDocument.Parse line
                        let mutable it = Unchecked.defaultof<JsonElement>
                        doc.RootElement.ValueKind = JsonValueKind.Object
                        && doc.RootElement.TryGetProperty("iteration", &it) && it.ValueKind = JsonValueKind.Number
                        && it.GetInt32() <= iteration
                    with :? JsonException | :? FormatException | :? InvalidOperationException -> false)
            if keep.Length <> lines.Length then
                AtomicFile.writeAllText path (String.Join("", keep |> Array.map (fun l -> l + "\n")))
            lines.Length - keep.Length

    /// One optimizer step of a split batch (data-parallel ranks and/or accumulated micro-batches): this rank's
    /// videos [rank * B/N, (rank + 1) * B/N) of the batch run as `Accumulate` micro-batches, each under a
    /// `BatchSlice` and a sliced point source (the same random numbers per sample as the whole batch), with the
    /// mask-count normaliser of the whole batch divided by the number of parts; the gradients are summed over the
    /// micro-batches and averaged over the ranks (bucketed allreduce), then clipped and stepped identically
    /// everywhere. Returns what the single-batch step returns: the batch's mean loss and terms over all parts.
    let private splitStep (par: DistributedOptions) (model: VctModel) (criterion: Criterion) (audio: TrainData.AudioCache)
                          (subset: Subset) (device: torch.Device) (gen: torch.Generator) (stepSeed: int)
                          (autocast: (DeviceType * torch.ScalarType) option) (scaler: GradScaler option) (opt: Modules.AdamW)
                          (trainable: Modules.Parameter list) (clip: float option) (iteration: int)
                          (batch: (VideoRecord * AugmentedVideo)[]) =
        let comm = par.Comm
        let records = batch |> Array.map fst
        let b = records.Length
        let parts = par.Parts
        if b % parts <> 0 then
            invalidOp $"a batch of {b} videos does not split into {comm.Size} rank(s) x {par.Accumulate} micro-batch(es); choose a batch divisible by {parts}"
        let per = b / parts
        let framesOf (r: VideoRecord) = r.MaskFrames.Length
        let frameStart = Array.scan (fun acc r -> acc + framesOf r) 0 records
        let totalFrames = frameStart[b]
        // This rank's micro-batches: video ranges of the batch.
        let micro = [| for k in 0 .. par.Accumulate - 1 -> (comm.Rank * par.Accumulate + k) * per |]
        use scope = torch.NewDisposeScope()
        let targetsOf (first: int) =
            [| for i in first .. first + per - 1 do
                   let l = (Batch.labels (snd batch[i]).Masks).``to``(device)
                   for k in 0L .. l.shape[0] - 1L -> FrameTarget.ofLabelMap 255L (l.select(0L, k)) |]
        let targets = micro |> Array.map targetsOf
        // Matched masks per frame of the whole batch (each rank fills its frames), and Mask2Former's DDP normaliser.
        let counts = Array.zeroCreate<int64> totalFrames
        for k in 0 .. micro.Length - 1 do
            targets[k] |> Array.iteri (fun j t -> counts[frameStart[micro[k]] + j] <- t.Labels.shape[0])
        comm.AllReduceInt64(counts, MpiOp.Sum)
        criterion.NumMasksOverride <- Some(max 1.0 (float (Array.sum counts) / float parts))
        let mutable lossSum = 0.0
        let mutable finite = 0.0
        let termSums = Dictionary<string, float>()
        let termNames = List<string>()
        try
            opt.zero_grad ()
            for k in 0 .. micro.Length - 1 do
                use microScope = torch.NewDisposeScope()
                let first = micro[k]
                let rs = records[first .. first + per - 1]
                let vs = batch[first .. first + per - 1] |> Array.map snd
                // Every micro-batch replays the step's random streams; its slice keeps its own samples' share.
                torch.manual_seed (int64 stepSeed) |> ignore
                gen.manual_seed (int64 stepSeed) |> ignore
                use pointGen = new torch.Generator(uint64 (stepSeed + 1))
                let inputs = TrainBatch.inputs audio device rs vs
                let n = inputs.Images.shape[0]
                let supervision = TrainBatch.supervision subset rs n
                let slice = { Total = int64 totalFrames; Offset = int64 frameStart[first]; Count = n }
                let uniform = Distributed.slicedUniform (UniformSource.ofGenerator device pointGen) totalFrames frameStart[first] (int n) counts
                use losses =
                    BatchSlice.within slice (fun () ->
                        Amp.within autocast (fun () ->
                            let out = model.Forward inputs
                            criterion.Forward(out.Decoder, targets[k], supervision, uniform)))
                let total = (if losses.Total.dtype = torch.float32 then losses.Total else losses.Total.to_type(torch.float32)).item<float32> () |> float
                for kv in losses.Values do
                    if not (termSums.ContainsKey kv.Key) then
                        termSums[kv.Key] <- 0.0
                        termNames.Add kv.Key
                    termSums[kv.Key] <- termSums[kv.Key] + kv.Value
                if Double.IsFinite total then
                    finite <- finite + 1.0
                    lossSum <- lossSum + total
                    Amp.backward scaler losses.Total
                else lossSum <- lossSum + total
        finally
            criterion.NumMasksOverride <- None
        // The batch's loss, its terms and how many parts were finite, over all ranks.
        let names = termNames |> Seq.sort |> Array.ofSeq
        let stats = Array.append [| finite; lossSum |] [| for nm in names -> termSums[nm] |]
        comm.AllReduceDouble(stats, MpiOp.Sum)
        let loss = stats[1] / float parts
        let terms = names |> Array.mapi (fun i nm -> nm, stats[2 + i] / float parts) |> Map.ofArray
        if int stats[0] < parts then
            let bad = terms |> Map.filter (fun _ v -> not (Double.IsFinite v)) |> Map.keys |> String.concat ", "
            loss, terms, Some $"loss is {loss} at iteration {iteration} (non-finite terms: {bad}); the last good checkpoint is kept",
            { Skipped = true; Scale = 1.0; GradNorm = None }
        else
            Distributed.averageGradients par trainable (float parts)
            loss, terms, None, Amp.step scaler opt trainable clip

    /// `evaluate` sharded over the ranks: rank r scores videos r, r + N, ...; the per-video scores are summed to
    /// every rank and M_J/M_F are their mean over videos (or, with `officialMean`, the mean of the per-rank
    /// means, as the official evaluator under DDP). AVSS (class totals, no per-video M_J) runs on every rank whole.
    let evaluateSharded (par: DistributedOptions) (model: VctModel) (audio: TrainData.AudioCache) (records: VideoRecord[]) (workers: int) : MetricSummary =
        let comm = par.Comm
        if comm.Size = 1 || model.Config.Subset = Subset.AVSS then evaluate model audio records false workers
        else
            let mine = [| for i in comm.Rank .. comm.Size .. records.Length - 1 -> records[i] |]
            let local = evaluate model audio mine false workers
            let v = records.Length
            let j = Array.zeroCreate<float> v
            let f = Array.zeroCreate<float> v
            let fr = Array.zeroCreate<float> v
            local.Videos |> Array.iteri (fun k s ->
                let i = comm.Rank + k * comm.Size
                j[i] <- s.J
                f[i] <- s.F
                fr[i] <- float s.Frames)
            let all = Array.concat [ j; f; fr ]
            comm.AllReduceDouble(all, MpiOp.Sum)
            let j, f, fr = all[0 .. v - 1], all[v .. 2 * v - 1], all[2 * v ..]
            let videos = Array.init v (fun i -> { Id = records[i].Id; Frames = int fr[i]; J = j[i]; F = f[i] })
            let mean (a: float[]) (idx: int[]) = if idx.Length = 0 then nan else (idx |> Array.sumBy (fun i -> a[i])) / float idx.Length
            let mj, mf =
                if par.OfficialEvalMean then
                    let ranks = [| for r in 0 .. comm.Size - 1 -> [| for i in r .. comm.Size .. v - 1 -> i |] |] |> Array.filter (fun a -> a.Length > 0)
                    (ranks |> Array.averageBy (mean j)), (ranks |> Array.averageBy (mean f))
                else
                    let idx = Array.init v id
                    mean j idx, mean f idx
            { local with MJ = mj; MF = mf; Videos = videos }

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
        checkRunDir runDir resume
        let files = RunFiles runDir
        // Only rank 0 writes the run's files.
        let appendJson path node = if par.IsRoot then appendJson path node
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
                        let r = loadState path model criterion opt
                        scaler |> Option.iter (fun s -> loadScalerState path s |> ignore)
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
                let dropped = trimLog files.Metrics it
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
            let summary = if par.IsSingle then evaluate model audio valRecords false cfg.Workers else evaluateSharded par model audio valRecords cfg.Workers
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
                saveState files.Last cfg model criterion opt scaler iteration bestMJ bestIt
        let finiteOrDiverge () =
            if allFinite model && allFinite criterion then true
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
                let stepSeed = seedFor cfg.Seed iteration
                torch.manual_seed (int64 stepSeed) |> ignore
                gen.manual_seed (int64 stepSeed) |> ignore
                use pointGen = new torch.Generator(uint64 (stepSeed + 1))
                Optim.setLr opt baseLrs (Optim.polyFactor cfg.Optim cfg.Iterations iteration)
                let lossValue, terms, diverged, (ampStep: ScaledStep) =
                    if not par.IsSingle then
                        splitStep par model criterion audio subset device gen stepSeed autocast scaler opt trainable cfg.Optim.ClipNorm iteration (snd batches.Current)
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
                | None when nonFiniteRun >= maxNonFiniteGradientSteps ->
                    outcome <- Diverged(iteration, $"the gradient norm was non-finite in {nonFiniteRun} steps in a row (iterations {iteration - nonFiniteRun + 2}..{iteration + 1}); the last good checkpoint is kept")
                | None ->
                    if badGradient then
                        let norm =
                            match ampStep.GradNorm with
                            | Some v when Double.IsPositiveInfinity v -> "+inf"
                            | Some v when Double.IsNegativeInfinity v -> "-inf"
                            | _ -> "NaN"
                        log (Warning(iteration + 1, $"iteration {iteration + 1}: the gradient norm is {norm}; step skipped (no weight update), {maxNonFiniteGradientSteps - nonFiniteRun} more in a row stop the run"))
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
