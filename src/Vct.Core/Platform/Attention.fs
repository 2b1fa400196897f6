namespace Vct.Core.Platform

open TorchSharp

/// Scaled dot-product attention, fused where it may be: LibTorch's `scaled_dot_product_attention` (on the CPU
/// a flash-style kernel that never materialises the [.., L, S] logits) when no gradient is recorded, the
/// explicit matmul / softmax / matmul otherwise (training keeps the reference's autograd graph, including the
/// gradient of an additive mask built from parameters such as Swin's relative-position bias).
[<RequireQualifiedAccess>]
module Attention =
    /// A/B switch for benchmarks and tests: false forces the explicit path everywhere.
    let mutable fused = true

    /// True when the fused kernel will be used for the next call (switch on, no gradient recorded).
    let usesFused () = fused && not (torch.is_grad_enabled ())

    /// softmax(q kᵀ / sqrt(d) + mask) v.
    ///   q [.., L, d], k and v [.., S, d]; mask: additive float broadcastable to [.., L, S], or None -> [.., L, d]
    let additive (q: Tensor) (k: Tensor) (v: Tensor) (mask: Tensor option) : Tensor =
        if usesFused () then
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask = Option.toObj mask)
        else
            Scope.run (fun () ->
                let scale = 1.0 / sqrt (float q.shape[q.shape.Length - 1])
                let logits = (q * scale.AsScalar).matmul(k.transpose(-2L, -1L))
                match mask with
                | Some m -> logits.add_(m) |> ignore
                | None -> ()
                logits.softmax(-1L).matmul(v))

    /// softmax(q kᵀ / sqrt(d), blocked = -inf) v with a boolean mask (True = blocked, the convention of
    /// nn.MultiheadAttention's attn_mask) broadcastable to [.., L, S]; no row may be blocked everywhere.
    let blocked (q: Tensor) (k: Tensor) (v: Tensor) (blockedMask: Tensor option) : Tensor =
        if usesFused () then
            Scope.run (fun () ->
                let allowed = blockedMask |> Option.map (fun m -> m.logical_not())
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask = Option.toObj allowed))
        else
            Scope.run (fun () ->
                let scale = 1.0 / sqrt (float q.shape[q.shape.Length - 1])
                let logits = (q * scale.AsScalar).matmul(k.transpose(-2L, -1L))
                let logits =
                    match blockedMask with
                    | Some m -> logits.masked_fill(m, System.Double.NegativeInfinity.AsScalar)
                    | None -> logits
                logits.softmax(-1L).matmul(v))
