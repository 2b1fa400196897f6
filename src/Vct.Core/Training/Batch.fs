namespace Vct.Core.Training

open System
open System.Collections.Concurrent
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data

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
