namespace Vct.Core.Training

open System
open System.Collections.Generic
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data

/// One optimizer step over a batch (docs/architecture.md §10): forward and losses per micro-batch, gradient
/// reduction over the ranks, clipping and the optimiser step; the checks around it.
[<RequireQualifiedAccess>]
module TrainStep =
    /// The random seed of one iteration (data order, augmentation, noise and points derive from it).
    let seedFor (seed: int) (iteration: int) = DeterministicSeed.mix [ seed; iteration; 0x7a11 ]

    /// Steps in a row whose gradient norm may be non-finite before a float32 run stops as diverged (each such
    /// step is skipped: no weight or optimiser-state update, a warning).
    let maxNonFiniteGradientSteps = 5

    /// True when every parameter of `m` is finite (checked before any weights are saved).
    let allFinite (m: torch.nn.Module) =
        use _ = torch.no_grad ()
        m.parameters () |> Seq.forall (fun p -> use ok = p.isfinite().all() in ok.item<bool> ())

    /// One optimizer step of a split batch (data-parallel ranks and/or accumulated micro-batches): this rank's
    /// videos [rank * B/N, (rank + 1) * B/N) of the batch run as `Accumulate` micro-batches, each under a
    /// `BatchSlice` and a sliced point source (the same random numbers per sample as the whole batch), with the
    /// mask-count normaliser of the whole batch divided by the number of parts; the gradients are summed over the
    /// micro-batches and averaged over the ranks (bucketed allreduce), then clipped and stepped identically
    /// everywhere. Returns what the single-batch step returns: the batch's mean loss and terms over all parts.
    let splitStep (par: DistributedOptions) (model: VctModel) (criterion: Criterion) (audio: TrainData.AudioCache)
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
