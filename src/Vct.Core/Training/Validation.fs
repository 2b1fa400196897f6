namespace Vct.Core.Training

open System
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Evaluation

/// Validation during and after training (docs/architecture.md §11): the VCT metrics on decoded videos, on one
/// process or sharded over data-parallel ranks.
[<RequireQualifiedAccess>]
module Validation =
    /// Evaluates `model` on decoded videos with the VCT metrics: scores at the GT's size; `shuffleAudio` pairs each
    /// video with another video's audio (a control that shows whether the model listens). `precision` is the
    /// forward pass's arithmetic (`Segment.run`; refused with a one-line message where the device cannot).
    let evaluateIn (precision: Precision) (model: VctModel) (audio: TrainData.AudioCache) (records: VideoRecord[]) (shuffleAudio: bool) (workers: int) : MetricSummary =
        if records.Length = 0 then raise (ArgumentException "no videos to evaluate (the split is empty)")
        Precision.ensureSupported (Seq.head (model.parameters ())).device precision
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
                use seg = Segment.run model { SegmentOptions.Default with OutputSize = OutputSize.Size(gt.shape[1], gt.shape[2]); Precision = precision } inputs
                let scores = seg.Scores
                // Frames with GT only (S4/MS3 val/test annotate every frame; AVSS by the gt flags).
                let gtFrames = v.Record.MaskFrames
                let scores = if int64 gtFrames.Length = t then scores else scores.index_select(0L, torch.tensor(gtFrames |> Array.map int64))
                if scores.isnan().any().item<bool> () then
                    raise (InvalidDataException $"video '{v.Record.Id}': the model's scores hold NaN (non-finite weights?); no metric can be computed")
                evaluator.Add(v.Record.Id, scores.cpu(), gt) |> ignore
            gate.Pulse()
        evaluator.Summary()

    /// `evaluateIn` float32: the metric the trainer, the main job and the goldens use.
    let evaluate model audio records shuffleAudio workers = evaluateIn Precision.Float32 model audio records shuffleAudio workers

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
