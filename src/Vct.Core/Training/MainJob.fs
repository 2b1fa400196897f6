namespace Vct.Core.Training

open Vct.Core.Platform
open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open Vct.Core
open Vct.Core.Data
open Vct.Core.Evaluation

/// Settings of a training run from the CLI or `build.fsx train`.
type TrainJobOptions =
    { /// "tiny" (CPU, synthetic data by default), "s4", "ms3" or "avss" (released configurations).
      Preset: string
      /// Dataset root in the official AVSBench layout; None = the built-in synthetic S4-like set under data/.
      Data: string option
      /// Where runs go; the run is RunsDir/Name.
      RunsDir: string
      Name: string
      Iterations: int option
      BatchVideos: int option
      BaseLr: float option
      Seed: int
      Resume: bool
      Device: torch.Device
      Workers: int
      EvalPeriod: int option
      /// Initial Swin weights (original ImageNet-22K file or converted .pkl) for both Swin copies; a path or a hub reference (`Hub.resolveWith`).
      SwinWeights: string option
      /// torchvggish `vggish-10086976.pth`; a path or a hub reference.
      VggishWeights: string option
      /// For pre-SAM models on data without mask images: Refuse (default), BlankMaskImage or SkipBranch.
      MissingMasks: Fusion.MissingMasks
      /// Mixed precision (float16 autocast + dynamic loss scaling); CUDA only, refused on other devices.
      Amp: bool }

/// The presets and the main job: train, evaluate (also with shuffled audio), write summary, plots and overlays.
[<RequireQualifiedAccess>]
module TrainJob =
    /// Frame side, training videos and categories of the default synthetic set used by the `tiny` preset.
    let tinyImageSize = 64
    let tinySynth = { SynthOptions.Default Subset.S4 with Train = 240; Val = 24; Test = 24; Size = tinyImageSize }

    /// The training configuration of a preset for `subset`.
    let config (preset: string) (subset: Subset) (o: TrainJobOptions) : TrainConfig =
        let released = CriterionConfig.Released subset
        let cfg =
            match preset with
            | "tiny" ->
                // NOTE: the tiny preset departs from the released schedule so that it learns in minutes on 2 CPU
                // cores: a 64x64 crop, 1024 sampled points (masks are 16x16), a 5x higher base LR and 16 videos
                // per step. Everything else (losses, matcher, AdamW groups, clipping, poly LR) is the released one.
                { Model = VctConfig.Tiny(subset, int64 tinyImageSize, 23L)
                  Criterion = released.WithNumPoints 1024L
                  Optim = { OptimConfig.Released with BaseLr = 5e-4 }
                  Iterations = 1500; BatchVideos = 16; EvalPeriod = 250; CheckpointPeriod = 250
                  Seed = o.Seed; CropSize = tinyImageSize; ColorJitter = true; Workers = o.Workers
                  MissingMasks = o.MissingMasks; Amp = o.Amp }
            | "s4" | "ms3" | "avss" ->
                let its = match subset with Subset.MS3 -> 40000 | _ -> 45000
                let evalPeriod = match subset with Subset.S4 -> 1000 | Subset.MS3 -> 500 | Subset.AVSS -> 2500
                { Model = VctConfig.Released subset
                  Criterion = released
                  Optim = OptimConfig.Released
                  Iterations = its; BatchVideos = (match subset with Subset.AVSS -> 8 | _ -> 2)
                  EvalPeriod = evalPeriod; CheckpointPeriod = evalPeriod
                  Seed = o.Seed; CropSize = 384; ColorJitter = true; Workers = o.Workers
                  MissingMasks = o.MissingMasks; Amp = o.Amp }
            | other -> invalidArg (nameof preset) $"unknown preset '{other}': expected tiny, s4, ms3 or avss"
        // The options' ranges, checked before any data is read or a model is built.
        let within (name: string) (lo: int) (hi: int) (v: int option) =
            v |> Option.iter (fun v -> if v < lo || v > hi then raise (ArgumentException $"{name} must be in {lo}..{hi}, got {v}"))
        within "--iterations" 1 100_000_000 o.Iterations
        within "--batch" 1 4096 o.BatchVideos
        within "--eval-period" 1 100_000_000 o.EvalPeriod
        within "--workers" 0 1024 (Some o.Workers)
        o.BaseLr |> Option.iter (fun lr ->
            if not (lr > 0.0 && lr <= 1.0) then raise (ArgumentException $"--lr must be in (0, 1], got {lr}"))
        { cfg with
            Iterations = defaultArg o.Iterations cfg.Iterations
            BatchVideos = defaultArg o.BatchVideos cfg.BatchVideos
            EvalPeriod = defaultArg o.EvalPeriod cfg.EvalPeriod
            Optim = { cfg.Optim with BaseLr = defaultArg o.BaseLr cfg.Optim.BaseLr } }

    let private kindOf (preset: string) (data: string option) =
        match preset, data with
        | "tiny", None -> Subset.S4
        | "tiny", Some _ -> Subset.S4
        | p, _ -> Subset.Parse p

    /// Writes the default synthetic set when `dir` has none; returns the report line.
    let ensureSynthetic (dir: string) =
        // The metadata CSV is written after every video, so its presence means a complete set.
        if File.Exists(Path.Combine(dir, "Single-source", "s4_meta_data.csv")) then $"using the synthetic S4-like set in {dir}"
        else
            let r = Synth.generate tinySynth dir
            let names = String.Join(", ", r.CategoryNames)
            $"wrote the synthetic S4-like set to {dir}: {r.Videos.Length} videos ({tinySynth.Train}/{tinySynth.Val}/{tinySynth.Test}), {tinySynth.Size}x{tinySynth.Size} frames, categories {names}"

    /// Evaluates a model on records with the true audio and with each video's audio swapped for another's.
    let evaluateWithControl (model: VctModel) (records: VideoRecord[]) (workers: int) =
        use audio = new TrainData.AudioCache(model)
        let normal = Validation.evaluate model audio records false workers
        let shuffled = Validation.evaluate model audio records true workers
        normal, shuffled

    /// Runs a whole job: data, training, evaluation, summary.json, plots and overlays in the run directory.
    /// Spread by `par` (MPI ranks, gradient accumulation): every rank trains its share; rank 0 alone logs, writes
    /// the synthetic set, the checkpoints and the report (the other ranks return a summary without scores). On
    /// CUDA, the local rank picks the device.
    let runWith (par: DistributedOptions) (o: TrainJobOptions) (log: string -> unit) (events: TrainEvent -> unit) (cancel: CancellationToken) : TrainResult * JsonObject =
        Runtime.init () |> ignore
        let o =
            if par.Comm.Size > 1 && o.Device.``type`` = DeviceType.CUDA then { o with Device = torch.Device(DeviceType.CUDA, par.Comm.LocalRank) }
            else o
        let log = if par.IsRoot then log else ignore
        let events = if par.IsRoot then events else ignore
        // Refused before any data is generated or read.
        if o.Amp then Amp.require o.Device
        let kind = kindOf o.Preset o.Data
        let subset = kind
        // A reused run name without --resume is refused before any data is generated or read.
        RunState.checkRunDir (Path.Combine(o.RunsDir, o.Name)) o.Resume
        let root =
            match o.Data with
            | Some d -> d
            | None ->
                let d = Path.Combine("data", "synth-s4")
                if par.IsRoot then log (ensureSynthetic d)
                par.Comm.Barrier()
                d
        let cfg = config o.Preset subset o
        let train = Avsbench.records kind root "train"
        let valr = Avsbench.records kind root "val"
        let runDir = Path.Combine(o.RunsDir, o.Name)
        let precision = if cfg.Amp then "mixed precision (float16 autocast, loss scaling)" else "float32"
        log $"training {o.Preset} ({subset}) for {cfg.Iterations} iterations of {cfg.BatchVideos} videos on {train.Length} videos in {precision}; run {runDir}"
        if not par.IsSingle then
            log $"  split over {par.Comm.Size} rank(s) x {par.Accumulate} micro-batch(es) of {cfg.BatchVideos / max 1 par.Parts} videos"
        // Hub references (swin-b-22k, vggish, hf:..., https://...) become cached local files before training starts.
        let swinWeights = o.SwinWeights |> Option.map Checkpoint.Hub.resolve
        let vggishWeights = o.VggishWeights |> Option.map Checkpoint.Hub.resolve
        let init (m: VctModel) =
            swinWeights |> Option.iter (fun path ->
                let swins = [ yield m.VisualEncoder.Backbone; match m.VisualEncoder.PreSamBackbone with Some p -> yield p | None -> () ]
                for r in Backbone.SwinPretrained.loadImageNet path swins do log $"Swin weights from {path}: {r}")
            match vggishWeights with
            | Some path ->
                let r = m.AudioBackbone.Load path
                log $"VGGish weights from {path}: loaded {r.Loaded.Length}, ignored (unused FC) {r.Dropped.Length}"
            | None ->
                // NOTE: without the AudioSet weights VGGish stays frozen (as in VCT) but random. PyTorch's default
                // conv init shrinks the activation variance ~6x per layer (1e-5 after six layers), which leaves the
                // audio MLP almost nothing to read; He initialisation keeps the features' scale.
                use _ = torch.no_grad ()
                for struct (name, p) in m.AudioBackbone.named_parameters () do
                    if name.EndsWith "weight" then torch.nn.init.kaiming_normal_(p, nonlinearity = torch.nn.init.NonlinearityType.ReLU) |> ignore
                    else p.zero_() |> ignore
                log "VGGish: no weights given (--vggish-weights); using a frozen He-initialised VGGish"
        let result = Trainer.runWith par cfg train valr o.Device runDir o.Resume init events cancel
        let summary = JsonObject()
        summary["preset"] <- JsonValue.Create o.Preset
        summary["subset"] <- JsonValue.Create(string subset)
        summary["data"] <- JsonValue.Create root
        summary["iterations"] <- JsonValue.Create result.Iterations
        summary["wall_seconds"] <- JsonValue.Create result.WallSeconds
        summary["outcome"] <- JsonValue.Create(sprintf "%A" result.Outcome)
        summary["best_iteration"] <- JsonValue.Create result.BestIteration
        summary["amp"] <- JsonValue.Create o.Amp
        if not par.IsSingle then
            summary["ranks"] <- JsonValue.Create par.Comm.Size
            summary["accumulate"] <- JsonValue.Create par.Accumulate
        let files = RunFiles runDir
        // The report is rank 0's: the others return what they trained.
        if not par.IsRoot then result, summary else
        // After an interrupt (or a divergence) the final evaluations are skipped: the run stops promptly and a
        // resumed run does them when it completes.
        if result.Outcome <> Completed then
            let how = match result.Outcome with Interrupted i -> $"interrupted at iteration {i}" | Diverged(i, _) -> $"diverged at iteration {i}" | Completed -> ""
            log $"run {how}: the final evaluations are skipped"
        elif File.Exists files.Best then
            let model, _ = ModelIO.load files.Best o.Device
            use model = model
            model.MissingMasks <- o.MissingMasks
            log "evaluating the best checkpoint on val with true and with shuffled audio"
            let normal, shuffled = evaluateWithControl model valr o.Workers
            summary["m_j"] <- JsonValue.Create normal.MJ
            summary["m_f"] <- JsonValue.Create normal.MF
            summary["m_j_audio_shuffled"] <- JsonValue.Create shuffled.MJ
            summary["m_f_audio_shuffled"] <- JsonValue.Create shuffled.MF
            let testr = try Avsbench.records kind root "test" with _ -> [||]
            if testr.Length > 0 then
                let tn, ts = evaluateWithControl model testr o.Workers
                summary["test_m_j"] <- JsonValue.Create tn.MJ
                summary["test_m_f"] <- JsonValue.Create tn.MF
                summary["test_m_j_audio_shuffled"] <- JsonValue.Create ts.MJ
                summary["test_m_f_audio_shuffled"] <- JsonValue.Create ts.MF
            // Overlays of the first validation videos.
            use _ = torch.no_grad ()
            use audio = new TrainData.AudioCache(model)
            let rows =
                [ for r in valr |> Array.truncate 3 ->
                      let v = Avsbench.loadVideo { LoadOptions.Default with FrameSize = None } r
                      let frames = Batch.frames v.Frames
                      let gt = Batch.labels v.Masks
                      use seg =
                          Segment.run model { SegmentOptions.Default with OutputSize = OutputSize.Size(gt.shape[1], gt.shape[2]) }
                              { Images = frames; PreMasks = None; Audio = AudioInput.Maps(audio.FrameMaps r) }
                      let pred = if subset = Subset.AVSS then seg.Masks.gt(0L.AsScalar) else seg.Masks
                      let gtFrames = frames.index_select(0L, torch.tensor(r.MaskFrames |> Array.map int64))
                      let predFrames = pred.cpu().index_select(0L, torch.tensor(r.MaskFrames |> Array.map int64))
                      gtFrames, predFrames, gt.gt(0L.AsScalar).logical_and(gt.ne(255L.AsScalar)) ]
            Report.overlayPng (Path.Combine(runDir, "overlays.png")) rows
        if File.Exists files.Metrics then
            let m = Report.readLog files.Metrics
            Report.writeHtml runDir m
            Report.writePngs runDir m
        let text = summary.ToJsonString(JsonSerializerOptions(WriteIndented = true))
        AtomicFile.writeAllText (Path.Combine(runDir, "summary.json")) text
        result, summary

    /// Runs a whole job in this process alone (`runWith DistributedOptions.Single`).
    let run (o: TrainJobOptions) (log: string -> unit) (events: TrainEvent -> unit) (cancel: CancellationToken) : TrainResult * JsonObject =
        runWith DistributedOptions.Single o log events cancel
