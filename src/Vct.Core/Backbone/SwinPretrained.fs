namespace Vct.Core.Backbone

open System
open System.Collections.Generic
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// What loading an ImageNet Swin checkpoint did to one Swin module.
type SwinPretrainedReport =
    { /// Module keys that received a checkpoint tensor, with the checkpoint key used.
      Loaded: (string * string) list
      /// Module keys nothing matched (norm0..norm3 for a classification checkpoint): they keep their values.
      NotInCheckpoint: string list
      /// Checkpoint keys no module key used (head.*, the final norm.*, attn_mask buffers).
      Unused: string list }

/// Loading the original ImageNet classification Swin checkpoints (e.g. swin_base_patch4_window12_384_22k.pth) into
/// our Swin, doing in code what the reference does in two steps: avs_tools/convert-pretrained-
/// swin-model-to-d2.py keeps the keys unchanged, and detectron2's matching heuristics then give each module key the
/// longest checkpoint key that equals it or is a dot-suffix of it with the same shape. Applied to a Swin module
/// (and so to `backbone.` and `pre_sam_backbone.` alike) this loads patch_embed.* and layers.* (with their
/// relative_position_index); norm0..norm3 stay as they are (LayerNorm 1 / 0 when fresh); head.*, norm.* and the
/// attn_mask buffers of the classification model are ignored.
[<RequireQualifiedAccess>]
module SwinPretrained =
    /// detectron2's suffix rule: the longest checkpoint key `c` with key = c or key ending in "." + c, same shape.
    let matchKey (checkpoint: IDictionary<string, Tensor>) (key: string) (shape: int64[]) : string option =
        checkpoint
        |> Seq.filter (fun kv -> (kv.Key = key || key.EndsWith("." + kv.Key, StringComparison.Ordinal)) && kv.Value.shape = shape)
        |> Seq.sortByDescending (fun kv -> kv.Key.Length)
        |> Seq.tryHead
        |> Option.map (fun kv -> kv.Key)

    /// Copies the matched checkpoint tensors into `swin` (no gradient; converted to the module's dtype and device).
    let loadFrom (checkpoint: IDictionary<string, Tensor>) (swin: torch.nn.Module) : SwinPretrainedReport =
        use _ = torch.no_grad ()
        let target = swin.state_dict()
        let loaded = ResizeArray()
        let missing = ResizeArray()
        for kv in target do
            match matchKey checkpoint kv.Key kv.Value.shape with
            | Some c ->
                use src = checkpoint[c].``to``(kv.Value.dtype, kv.Value.device)
                kv.Value.copy_(src) |> ignore
                loaded.Add((kv.Key, c))
            | None -> missing.Add kv.Key
        let used = HashSet(loaded |> Seq.map snd)
        { Loaded = List.ofSeq loaded
          NotInCheckpoint = List.ofSeq missing
          Unused = checkpoint.Keys |> Seq.filter (used.Contains >> not) |> List.ofSeq }

    /// Loads an ImageNet Swin file into each module of `targets` (the RGB backbone and the pre-SAM backbone start
    /// from the same weights, as in the reference). Reads `{"model": state_dict}` or a bare state dict, as
    /// torch.save zip/legacy files (swin_base_patch4_window12_384_22k.pth) or the pickled `.pkl` that the
    /// official conversion script writes (same keys, numpy arrays).
    let loadImageNet (path: string) (targets: SwinTransformer seq) : SwinPretrainedReport list =
        use ckpt = Vct.Core.Checkpoint.StateDict.load path
        if ckpt.StateDict.Count = 0 then invalidArg (nameof path) $"{path} holds no tensors"
        [ for t in targets -> loadFrom ckpt.StateDict t ]
