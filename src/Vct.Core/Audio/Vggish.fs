namespace Vct.Core.Audio

open System
open System.Collections.Generic
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint

/// Options of the VGGish network (reference config keys MODEL.AUDIO.*).
type VggishConfig =
    { /// COMPACT_FEATURE: apply the FC `embeddings` (12288 -> 4096 -> 4096 -> 128). Off in every released config.
      Compact: bool
      /// POSTPROCESS_LOG_MEL_WITH_PCA: PCA + 8-bit quantisation of the 128-d embeddings (needs Compact). Off.
      Postprocess: bool }
    static member Default = { Compact = false; Postprocess = false }

/// PCA + quantisation of 128-d VGGish embeddings (reference: torchvggish `vggish.py`, Postprocessor).
[<RequireQualifiedAccess>]
module VggishPca =
    /// embeddings [N, 128], eigenVectors [128, 128], means [128] -> [N, 128] in 0..255 (float):
    /// round((clamp(E (x - mu), -2, 2) + 2) * 255 / 4).
    let postprocess (eigenVectors: Tensor) (means: Tensor) (embeddings: Tensor) : Tensor =
        Shape.requireRank (nameof embeddings) 2 embeddings
        if embeddings.shape[1] <> eigenVectors.shape[1] then
            invalidArg (nameof embeddings) $"embeddings {Shape.show embeddings} do not match the PCA matrix {Shape.show eigenVectors}"
        Scope.run (fun () ->
            let centred = embeddings.t() - means.reshape(-1L, 1L)                     // [128, N]
            let pca = eigenVectors.mm(centred).t()                                   // [N, 128]
            let clipped = pca.clamp((-2.0).AsScalar, (2.0).AsScalar)
            clipped.add((2.0).AsScalar).mul((255.0 / 4.0).AsScalar).round())

/// The VGGish network as the official `audio_backbone` (reference: torchvggish `vggish.py`, VGG/VGGish):
/// `features` = conv3x3 stack with max-pooling; input [N, 1, 96, 64] -> [N, 512, 6, 4]. The FC `embeddings`
/// exist only with `Compact` (otherwise their keys are reported as ignored). Frozen: no gradients, eval mode.
type Vggish(cfg: VggishConfig) as this =
    inherit Module("VGGish")
    let conv (i: int64) (o: int64) = Conv2d(i, o, 3L, padding = 1L) :> Module<Tensor, Tensor>
    let relu () = ReLU() :> Module<Tensor, Tensor>
    let pool () = MaxPool2d(2L, 2L) :> Module<Tensor, Tensor>
    // Sequential indices are the checkpoint names: convs at 0, 3, 6, 8, 11, 13.
    let features =
        Sequential(
            [| struct ("0", conv 1L 64L); struct ("1", relu ()); struct ("2", pool ())
               struct ("3", conv 64L 128L); struct ("4", relu ()); struct ("5", pool ())
               struct ("6", conv 128L 256L); struct ("7", relu ()); struct ("8", conv 256L 256L); struct ("9", relu ()); struct ("10", pool ())
               struct ("11", conv 256L 512L); struct ("12", relu ()); struct ("13", conv 512L 512L); struct ("14", relu ()); struct ("15", pool ()) |])
    let embeddings =
        if cfg.Compact then
            Sequential(
                [| struct ("0", Linear(512L * 4L * 6L, 4096L) :> Module<Tensor, Tensor>); struct ("1", relu ())
                   struct ("2", Linear(4096L, 4096L) :> Module<Tensor, Tensor>); struct ("3", relu ())
                   struct ("4", Linear(4096L, 128L) :> Module<Tensor, Tensor>); struct ("5", relu ()) |])
        else null
    let mutable pca : (Tensor * Tensor) option = None
    do
        if cfg.Postprocess && not cfg.Compact then
            invalidArg (nameof cfg) "Postprocess (PCA) applies to the 128-d embeddings: it needs Compact = true"
        this.RegisterComponents()
        for p in this.parameters() do p.requires_grad <- false
        this.eval() |> ignore

    member _.Config = cfg
    /// The conv stack (`features`), for callers that want it alone.
    member _.Features = features

    /// Loads a VGGish state dict (torchvggish `vggish-10086976.pth` keys `features.*`/`embeddings.*`, or
    /// `audio_backbone.*` of a VCT checkpoint: pass that prefix). Keys outside the prefix, and without
    /// `Compact` the FC `embeddings.*` (present in every file, unused by VCT), are reported as `Dropped`.
    /// Strict otherwise: a missing or mis-shaped conv key raises before anything is copied.
    member m.LoadStateDict(tensors: KeyValuePair<string, Tensor> seq, ?prefix: string) : LoadReport =
        let prefix = defaultArg prefix ""
        let remap (k: string) =
            if not (k.StartsWith(prefix, StringComparison.Ordinal)) then None
            else
                let k = k.Substring prefix.Length
                if k.StartsWith("embeddings.", StringComparison.Ordinal) && not cfg.Compact then None else Some k
        use _ = torch.no_grad()
        StateDict.loadInto { LoadOptions.Default with Remap = remap } tensors m

    /// Loads `vggish-10086976.pth` (or a VCT checkpoint with prefix "audio_backbone.").
    member m.Load(path: string, ?prefix: string) : LoadReport =
        use ck = StateDict.load path
        m.LoadStateDict(ck.StateDict, defaultArg prefix "")

    /// Loads `vggish_pca_params-970ea276.pth` (keys `pca_eigen_vectors`, `pca_means`) for `Postprocess`.
    member m.LoadPca(path: string) =
        use ck = StateDict.load path
        let get (k: string) =
            if ck.StateDict.ContainsKey k then ck.StateDict[k]
            else raise (IO.InvalidDataException($"{path}: no '{k}' entry (expected a VGGish PCA parameter file)"))
        m.SetPca(get "pca_eigen_vectors", get "pca_means")

    /// PCA parameters (`pca_eigen_vectors` [128,128], `pca_means` [128] or [128,1]) for `Postprocess`.
    member _.SetPca(eigenVectors: Tensor, means: Tensor) =
        pca <- Some(eigenVectors.detach().clone().``to``(torch.float32), means.detach().reshape(-1L).clone().``to``(torch.float32))

    /// The first `count` layers of `features` (0..16), e.g. 6 = two conv blocks: [N, 1, 96, 64] -> [N, 128, 24, 16].
    member _.ForwardLayers(x: Tensor, count: int) : Tensor =
        if count < 1 || count > 16 then invalidArg (nameof count) $"count must be 1..16, got {count}"
        use _ = torch.no_grad()
        Scope.run (fun () ->
            features.children()
            |> Seq.truncate count
            |> Seq.fold (fun (t: Tensor) m -> (m :?> Module<Tensor, Tensor>).call t) x)

    /// x: [N, 1, 96, 64] -> [N, 512, 6, 4] (or [N, 128] with Compact, post-processed with Postprocess).
    member _.Forward(x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        if x.shape[1] <> 1L || x.shape[2] <> 96L || x.shape[3] <> 64L then
            invalidArg (nameof x) $"VGGish expects [N, 1, 96, 64] log-mel examples, got {Shape.show x}"
        use _ = torch.no_grad()
        Scope.run (fun () ->
            let f = features.call x                                                     // [N, 512, 6, 4]
            if not cfg.Compact then f
            else
                let flat = f.permute(0L, 2L, 3L, 1L).contiguous().view(f.shape[0], -1L)   // [N, 12288] (h, w, c order)
                let e = embeddings.call flat                                            // [N, 128]
                match cfg.Postprocess, pca with
                | false, _ -> e
                | true, Some(v, mu) -> VggishPca.postprocess v mu e
                | true, None -> invalidOp "Postprocess is on but no PCA parameters were set (SetPca)")
