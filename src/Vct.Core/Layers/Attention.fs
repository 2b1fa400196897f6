namespace Vct.Core.Layers

open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform

/// Multi-head attention with PyTorch's `nn.MultiheadAttention` parameter layout and numerics
/// (`in_proj_weight` rows [q; k; v], `in_proj_bias`, `out_proj`), sequence-first like the official
/// decoder: query [L, B, C], key/value [S, B, C] -> [L, B, C].
/// A boolean `attnMask` blocks where True: [B*h, L, S] (row b*h + head, batch-major, as PyTorch's), or [B, L, S]
/// for one mask shared by every head (no per-head copy is made).
type MultiheadAttention(embedDim: int64, numHeads: int64) as this =
    inherit Module("MultiheadAttention")
    do
        if embedDim % numHeads <> 0L then
            invalidArg (nameof numHeads) $"embed dim {embedDim} is not divisible by {numHeads} heads"

    let in_proj_weight = Parameter(torch.empty(3L * embedDim, embedDim))
    let in_proj_bias = Parameter(torch.zeros(3L * embedDim))
    let out_proj = Linear(embedDim, embedDim)
    let headDim = embedDim / numHeads

    do
        // PyTorch's _reset_parameters: xavier-uniform in-projection, zero biases.
        use _ = torch.no_grad ()
        init.xavier_uniform_ in_proj_weight |> ignore
        out_proj.bias.zero_() |> ignore
        this.RegisterComponents()

    member _.NumHeads = numHeads

    /// query [L, B, C], key [S, B, C], value [S, B, C], mask [B*h, L, S] or [B, L, S] (True = blocked) -> [L, B, C]
    member _.Forward(query: Tensor, key: Tensor, value: Tensor, attnMask: Tensor option) : Tensor =
        Scope.run (fun () ->
            let l, b = query.shape[0], query.shape[1]
            let s = key.shape[0]
            let w = in_proj_weight.chunk(3L, 0L)
            let bi = in_proj_bias.chunk(3L, 0L)
            let heads (x: Tensor) (len: int64) = x.reshape(len, b * numHeads, headDim).transpose(0L, 1L) // [B*h, M, d]
            // the mask as [B, h or 1, L, S]
            let mask4 =
                attnMask |> Option.map (fun m ->
                    if m.shape = [| b * numHeads; l; s |] then m.view(b, numHeads, l, s)
                    elif m.shape = [| b; l; s |] then m.unsqueeze(1L)
                    else invalidArg "attnMask" $"attention mask must be [{b * numHeads}, {l}, {s}] or [{b}, {l}, {s}], got {Shape.show m}")
            let q = heads (functional.linear(query, w[0], bi[0])) l
            let k = heads (functional.linear(key, w[1], bi[1])) s
            let v = heads (functional.linear(value, w[2], bi[2])) s
            let out =
                if Attention.usesFused () then
                    // [B*h, M, d] seen as [B, h, M, d]: the fused kernel's 4-D layout (rows b*h + head, batch-major)
                    let as4 (x: Tensor) (len: int64) = x.view(b, numHeads, len, headDim)
                    (Attention.blocked (as4 q l) (as4 k s) (as4 v s) mask4).reshape(b * numHeads, l, headDim)
                else
                    // NOTE: q is scaled before the product, as torch 1.13's _scaled_dot_product_attention does.
                    let q = q * (1.0 / sqrt (float headDim)).AsScalar
                    let logits = q.bmm(k.transpose(1L, 2L))                               // [B*h, L, S]
                    let logits =
                        match mask4 with
                        | Some m -> logits.view(b, numHeads, l, s).masked_fill(m, Double.NegativeInfinity.AsScalar).view(b * numHeads, l, s)
                        | None -> logits
                    logits.softmax(-1L).bmm(v)                                            // [B*h, L, d]
            let out = out.transpose(0L, 1L).reshape(l * b, embedDim)                      // [L*B, C]
            out_proj.call(out).view(l, b, embedDim))

/// Post-norm cross-attention block of the official decoder (`CrossAttentionLayer`, dropout 0):
/// tgt [L, B, C], memory [S, B, C] -> LayerNorm(tgt + MHA(tgt + queryPos, memory + pos, memory)).
type CrossAttentionLayer(dModel: int64, nHead: int64) as this =
    inherit Module("CrossAttentionLayer")
    let multihead_attn = new MultiheadAttention(dModel, nHead)
    let norm = LayerNorm(dModel)

    do
        use _ = torch.no_grad ()
        this.RegisterComponents()

    /// tgt [L, B, C], memory [S, B, C], mask [B*h, L, S] or [B, L, S], pos [S, B, C], queryPos [L, B, C] -> [L, B, C]
    member _.Forward(tgt: Tensor, memory: Tensor, memoryMask: Tensor option, pos: Tensor option, queryPos: Tensor option) : Tensor =
        Scope.run (fun () ->
            let withPos (x: Tensor) (p: Tensor option) = match p with Some p -> x + p | None -> x
            let attended = multihead_attn.Forward(withPos tgt queryPos, withPos memory pos, memory, memoryMask)
            norm.call (tgt + attended))

/// Post-norm self-attention block (`SelfAttentionLayer`, dropout 0): q = k = tgt + queryPos, v = tgt.
type SelfAttentionLayer(dModel: int64, nHead: int64) as this =
    inherit Module("SelfAttentionLayer")
    let self_attn = new MultiheadAttention(dModel, nHead)
    let norm = LayerNorm(dModel)
    do this.RegisterComponents()

    /// tgt [L, B, C], queryPos [L, B, C] -> [L, B, C]
    member _.Forward(tgt: Tensor, queryPos: Tensor option) : Tensor =
        Scope.run (fun () ->
            let qk = match queryPos with Some p -> tgt + p | None -> tgt
            norm.call (tgt + self_attn.Forward(qk, qk, tgt, None)))

/// Post-norm feed-forward block (`FFNLayer`, ReLU, dropout 0): LayerNorm(x + linear2(relu(linear1(x)))).
type FFNLayer(dModel: int64, dimFeedforward: int64) as this =
    inherit Module("FFNLayer")
    let linear1 = Linear(dModel, dimFeedforward)
    let linear2 = Linear(dimFeedforward, dModel)
    let norm = LayerNorm(dModel)
    do this.RegisterComponents()

    /// [..., C] -> [..., C]
    member _.Forward(tgt: Tensor) : Tensor =
        Scope.run (fun () -> norm.call (tgt + linear2.call (functional.relu (linear1.call tgt))))

/// Mask2Former's `MLP`: `numLayers` Linear layers (`layers.<i>`), ReLU between them, none after the last.
type MLP(inputDim: int64, hiddenDim: int64, outputDim: int64, numLayers: int) as this =
    inherit Module("MLP")
    do if numLayers < 1 then invalidArg (nameof numLayers) $"an MLP needs at least one layer, got {numLayers}"
    let dims = [ inputDim ] @ List.replicate (numLayers - 1) hiddenDim @ [ outputDim ]
    let layers =
        ModuleList<Module<Tensor, Tensor>>(
            [| for (i, o) in List.pairwise dims -> Linear(i, o) :> Module<Tensor, Tensor> |])
    do this.RegisterComponents()

    /// [..., inputDim] -> [..., outputDim]
    member _.Forward(x: Tensor) : Tensor =
        Scope.run (fun () ->
            let mutable y = x
            for i in 0 .. layers.Count - 1 do
                y <- layers[i].call y
                if i < layers.Count - 1 then y <- functional.relu y
            y)
