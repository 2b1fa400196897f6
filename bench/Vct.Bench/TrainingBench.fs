/// Training: wall seconds per training step of the real trainer (`Trainer.run`: forward, matching, losses,
/// backward, full-model clipping, AdamW) for the released S4 and MS3 presets on one 5-frame video at 384, against
/// the official training step run in the same session (`bench/python/train_step_official.py`); the tiny preset's
/// step time and resident memory after 20 and 500 steps; and the data loader's decode + augment time per batch
/// against the step it feeds.
module Vct.Bench.TrainingBench

open System
open System.Diagnostics
open System.IO
open System.Threading
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Training
open Vct.Bench.Harness

/// Step seconds (by iteration) and RSS samples of a trainer run on `root`.
let private trainRun (cfg: TrainConfig) (kind: Subset) (root: string) (rssAt: int list) =
    let train = Avsbench.records kind root "train"
    let valr = Avsbench.records kind root "val" |> Array.truncate 2
    let runDir = Path.Combine(Path.GetTempPath(), $"vct-train-bench-{Environment.ProcessId}-{Guid.NewGuid():N}")
    let steps = Collections.Generic.List<float>()
    let rss = Collections.Generic.Dictionary<int, float>()
    try
        let onEvent (e: TrainEvent) =
            match e with
            | TrainEvent.Step(it, _, _, _, secs) ->
                steps.Add secs
                if List.contains it rssAt then
                    GC.Collect()
                    rss[it] <- rssMiB ()
                printf "\r  step %d (%.2f s)   " it secs
            | TrainEvent.Eval _ | TrainEvent.Warning _ -> ()
        let r = Trainer.run cfg train valr (torch.CPU) runDir false ignore onEvent CancellationToken.None
        printfn ""
        if r.Outcome <> Completed then failwithf "benchmark run ended with %A" r.Outcome
        // Seconds each step waited for its batch, from the run's metrics log.
        let waits =
            File.ReadLines(Path.Combine(runDir, "metrics.jsonl"))
            |> Seq.map (fun l -> Text.Json.JsonDocument.Parse(l).RootElement.Clone())
            |> Seq.filter (fun e -> e.GetProperty("type").GetString() = "step")
            |> Seq.map (fun e -> e.GetProperty("data_wait_seconds").GetDouble())
            |> List.ofSeq
        List.ofSeq steps, rss, waits
    finally
        try Directory.Delete(runDir, true) with _ -> ()

let private jobOptions (preset: string) (iterations: int) (batch: int) =
    { Preset = preset; Data = None; RunsDir = Path.GetTempPath(); Name = "bench"; Iterations = Some iterations
      BatchVideos = Some batch; BaseLr = None; Seed = 0; Resume = false; Device = torch.CPU; Workers = Environment.ProcessorCount
      EvalPeriod = Some 1_000_000; SwinWeights = None; VggishWeights = None
      MissingMasks = Fusion.MissingMasks.BlankMaskImage; Amp = false }

/// Mean seconds to decode and augment one batch (as the trainer's loader does it) over `batches` batches,
/// and the RSS growth over them.
let private loading (cfg: TrainConfig) (kind: Subset) (root: string) (batches: int) =
    let records = Avsbench.records kind root "train"
    let loadOpts = { LoadOptions.Default with FrameSize = Some cfg.CropSize; PreSam = cfg.Model.UsePreSam && records[0].PreMasks.Length > 0 }
    let aug = { AugmentOptions.Default with CropSize = cfg.CropSize; ColorJitter = cfg.ColorJitter }
    let loader = BatchLoader(records, { LoaderOptions.Default with BatchSize = cfg.BatchVideos; Workers = 0 }, fun r rng -> Augment.video aug rng (Avsbench.loadVideo loadOpts r))
    let perEpoch = loader.BatchesPerEpoch
    let mutable n = 0
    let mutable epoch = 0
    GC.Collect()
    let rss0 = rssMiB ()
    let sw = Stopwatch.StartNew()
    while n < batches do
        for _ in loader.Epoch epoch |> Seq.truncate (batches - n) do
            n <- n + 1
        epoch <- epoch + 1
    let secs = sw.Elapsed.TotalSeconds / float batches
    GC.Collect()
    secs, rssMiB () - rss0, perEpoch

let run (repeats: int) =
    let threads = torch.get_num_threads ()
    torch.set_num_threads 2
    let runs = max 2 (repeats - 1)          // full-size steps take 5-45 s each
    let dataRoot = Path.Combine(Path.GetTempPath(), $"vct-train-bench-data-{Environment.ProcessId}")
    try
        // Released presets on one 5-frame video at 384 (the synthetic trees have no pre-SAM images: the branch runs
        // on the blank mask image, the same work).
        // The official steps first, while this process holds little memory: each peaks near 18 GB on its own.
        let official =
            [ for preset in [ "s4"; "ms3" ] ->
                printfn "training: official, %s" preset
                let o = pythonJson "train_step_official.py" [ preset; string runs ]
                preset, (o.GetProperty("seconds").GetDouble(), o.GetProperty("peak_mib").GetDouble()) ] |> Map.ofList
        let presetRow (preset: string) (kind: Subset) (dkind: Subset) =
            let root = Path.Combine(dataRoot, preset)
            Synth.generate { SynthOptions.Default kind with Train = 2; Val = 1; Test = 1; Size = 384 } root |> ignore
            let cfg = TrainJob.config preset dkind (jobOptions preset (1 + runs) 1)
            printfn "training: ours, %s preset, %d steps" preset (1 + runs)
            GC.Collect()
            trimNative ()
            let peakOk = resetPeak ()
            let sampled = new RssSampler()
            let steps, _, _ = trainRun cfg dkind root []
            let hwm = if peakOk then peakMiB () else nan
            let oursPeak = if Double.IsNaN hwm then sampled.Peak else hwm
            (sampled :> IDisposable).Dispose()
            let ours = median (List.tail steps)
            let load, _, _ = loading cfg dkind root 4
            let o, peak = official[preset]
            ours, o, peak, load, oursPeak
        // The tiny preset (before the released presets, so that its resident memory is not theirs) as the main job runs it (its own synthetic set, 16 videos per step, evaluation every 250).
        let tinyRoot = Path.Combine(dataRoot, "tiny")
        Synth.generate TrainJob.tinySynth tinyRoot |> ignore
        let tinyCfg = { TrainJob.config "tiny" Subset.S4 (jobOptions "tiny" 500 16) with EvalPeriod = 250 }
        printfn "training: ours, tiny preset, 500 steps"
        let rssPoints = [ 20; 100; 250; 500 ]
        let tinySteps, rss, waits = trainRun tinyCfg Subset.S4 tinyRoot rssPoints
        let waitAfterFirst = waits |> List.skip 1
        let meanWait = List.average waitAfterFirst
        let waited = waitAfterFirst |> List.filter (fun w -> w > 0.001) |> List.length
        let tinyStep = median (tinySteps |> List.skip 20)
        let tinyLoad, tinyLoadGrowth, perEpoch = loading tinyCfg Subset.S4 tinyRoot (3 * 15)
        let s4 = presetRow "s4" Subset.S4 Subset.S4
        let ms3 = presetRow "ms3" Subset.MS3 Subset.MS3
        let row (name: string) (ours: float, official: float, officialPeak: float, load: float, oursPeak: float) (note: string) =
            $"| {name} | {ours:F2} | {official:F2} | {ours / official:F2} | {officialPeak:F0} | {oursPeak:F0} ({100.0 * oursPeak / officialPeak:F0}%%) | {1000.0 * load:F0} ({100.0 * load / ours:F1}%%) | {note} |"
        let md =
            String.Join("\n",
                [ "## Training step, CPU (training issue, data issue)"
                  ""
                  "Measured " + DateTime.UtcNow.ToString("yyyy-MM-dd") + " on " + machine () + "; 2 LibTorch threads on both sides."
                  "Ours: the real trainer (`Trainer.run`) on a synthetic tree in the official layout, one video per step, median"
                  $"of {runs} steps after one warm-up step; a step is forward, Hungarian matching, losses, backward, full-model"
                  "clipping and AdamW, timed by the trainer (data loading excluded: it is the last column). Official: VCT_AVS's"
                  "model in train mode with its criterion, the same step (`bench/python/train_step_official.py`, shared"
                  "official-ref harness, Debian torch 1.13 + OpenBLAS) on one 5-frame video at 384, in the same run."
                  "The synthetic trees have no Semantic-SAM images, so the pre-SAM branch runs on the blank mask image (same work)."
                  "Ours peak RSS: the process's VmHWM over that preset's run (counter reset before it; the model, optimiser state,"
                  "activations and the loader's workers), the official figure the child process's peak RSS."
                  ""
                  "| preset, one 5-frame video at 384 | ours (s/step) | official (s/step) | ours / official | official peak RSS (MiB) | ours peak RSS, MiB (% of official) | ours: decode + augment per batch, ms (% of a step) | note |"
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
                  row "S4 (released config, pre-SAM on)" s4 "S4 training annotates frame 0 only: ours runs that frame (equal losses and gradients, see Trainer), the official step runs all 5"
                  row "MS3 (released config, pre-SAM on)" ms3 "all 5 frames annotated: the same work on both sides"
                  ""
                  $"Tiny preset (ours only: it is this project's CPU preset, 64 px, a small Swin; the official code has no such"
                  $"configuration): {tinyStep:F3} s per step of 16 videos (median of steps 21-500). Decoding and augmenting a batch"
                  $"costs {1000.0 * tinyLoad:F1} ms of one core ({100.0 * tinyLoad / tinyStep:F1}%% of a step); the trainer's {tinyCfg.Workers} background"
                  $"workers prepare 2 batches ahead, so steps 2-500 waited {1000.0 * meanWait:F2} ms on average for their batch"
                  $"({waited} of {waitAfterFirst.Length} waited more than 1 ms; the workers run on across epochs). Resident"
                  "memory over the 500-step run (evaluations at 250 and 500; the trainer returns freed native memory to the OS before"
                  "each evaluation and checkpoint write):"
                  ""
                  "| after step | " + String.Join(" | ", rssPoints) + " |"
                  "| --- | " + String.Join(" | ", rssPoints |> List.map (fun _ -> "---:")) + " |"
                  "| RSS (MiB) | " + String.Join(" | ", rssPoints |> List.map (fun p -> $"{rss[p]:F0}")) + " |"
                  ""
                  $"The loader alone over 3 epochs ({3 * perEpoch} batches): RSS changed by {tinyLoadGrowth:F0} MiB." ])
        printfn "%s" md
        writeSection "training" md
    finally
        torch.set_num_threads threads
        try Directory.Delete(dataRoot, true) with _ -> ()
