namespace Vct.Core.Fusion

open Vct.Core.Platform
open System
open System.Collections.Generic
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Checkpoint

/// The audio MLP of the head (reference: `models/modeling/misc/audio_transformation.py`, audio_mlp, as
/// `sem_seg_head.audio_transformation`): Linear 512->4096, ReLU, Linear 4096->4096, ReLU, Linear 4096->256
/// applied per (time, frequency) cell on the channel axis: [N, 512, 6, 4] -> [N, 256, 6, 4].
type AudioMlp(inDim: int64, middleDim: int64, outDim: int64) as this =
    inherit Module("audio_mlp")
    let embeddings =
        Sequential(
            [| struct ("0", Linear(inDim, middleDim) :> Module<Tensor, Tensor>); struct ("1", ReLU() :> Module<Tensor, Tensor>)
               struct ("2", Linear(middleDim, middleDim) :> Module<Tensor, Tensor>); struct ("3", ReLU() :> Module<Tensor, Tensor>)
               struct ("4", Linear(middleDim, outDim) :> Module<Tensor, Tensor>) |])
    do this.RegisterComponents()
    new() = new AudioMlp(512L, 4096L, 256L)

    /// Loads `embeddings.*` keys (pass prefix "sem_seg_head.audio_transformation." for a VCT checkpoint;
    /// keys outside it are reported as `Dropped`). Strict on the MLP's own keys.
    member m.LoadStateDict(tensors: KeyValuePair<string, Tensor> seq, ?prefix: string) : LoadReport =
        let prefix = defaultArg prefix ""
        let remap (k: string) =
            if k.StartsWith(prefix, StringComparison.Ordinal) then Some(k.Substring prefix.Length) else None
        use _ = torch.no_grad()
        StateDict.loadInto { LoadOptions.Default with Remap = remap } tensors m

    /// x: [N, C, 6, 4] -> [N, outDim, 6, 4]. The official code transposes 1<->3, runs the MLP on [N, 24, C]
    /// and transposes back; per-cell, that is this permutation.
    member _.Forward(x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        if x.shape[1] <> inDim then invalidArg (nameof x) $"audio MLP expects {inDim} channels, got {Shape.show x}"
        Scope.run (fun () ->
            let t = x.permute(0L, 2L, 3L, 1L)                // [N, 6, 4, C]
            (embeddings.call t).permute(0L, 3L, 1L, 2L))     // [N, outDim, 6, 4]
