/// Tests of src/Vct.Core/Layers: multi-head attention against the explicit formula, the cross- and self-attention
/// layers and the FFN against the official goldens (part of the `Decoder.*` lists).
module Vct.Core.Tests.LayersTests

open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Layers
open Vct.Core.Tests.Golden

let private golden name = new Golden.File("decoder", name)

[<Tests>]
let goldens =
    testList "Decoder.Golden" [
        test "CrossAttentionLayer: masked visual level, audio level, no mask" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_cross_attention_layer.pt"
            use m = new CrossAttentionLayer(256L, 8L)
            loadWeights (g.Weights()) (fun _ -> false) m
            m.eval ()
            let masked = m.Forward(g["in.tgt"], g["in.memory_masked"], Some g["in.memory_mask_masked"], Some g["in.pos_masked"], Some g["in.query_pos"])
            expectClose "masked" g["out.masked"] masked
            let audio = m.Forward(g["in.tgt"], g["in.memory_audio"], Some g["in.memory_mask_audio"], Some g["in.pos_audio"], Some g["in.query_pos"])
            expectClose "audio" g["out.audio"] audio
            expectClose "nomask" g["out.nomask"] (m.Forward(g["in.tgt"], g["in.memory_audio"], None, None, None))
        }

        test "SelfAttentionLayer" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_self_attention_layer.pt"
            use m = new SelfAttentionLayer(128L, 4L)
            loadWeights (g.Weights()) (fun _ -> false) m
            expectClose "out" g["out.out"] (m.Forward(g["in.tgt"], Some g["in.query_pos"]))
        }

        test "FFNLayer" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_ffn_layer.pt"
            use m = new FFNLayer(256L, 256L)
            loadWeights (g.Weights()) (fun _ -> false) m
            expectClose "out" g["out.out"] (m.Forward g["in.tgt"])
        }
    ]

[<Tests>]
let properties =
    testList "Decoder.Properties" [
        testProperty "MultiheadAttention equals an explicit per-head softmax(q k^T / sqrt d) v" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let l, s, b, c, h = 3L, 5L, 2L, 8L, 2L
            use m = new MultiheadAttention(c, h)
            let q, k, v = torch.randn(l, b, c), torch.randn(s, b, c), torch.randn(s, b, c)
            // Random mask with column 0 always open, so that no row is fully masked.
            let mask = torch.cat([| torch.zeros(b * h, l, 1L, dtype = torch.ScalarType.Bool); torch.rand(b * h, l, s - 1L).lt(0.3.ToScalar()) |], 2L)
            let out = m.Forward(q, k, v, Some mask)
            let sd = m.state_dict()
            let w, bi = sd["in_proj_weight"], sd["in_proj_bias"]
            let d = c / h
            let perBatch =
                [| for bb in 0L .. b - 1L ->
                       let perHead =
                           [| for hh in 0L .. h - 1L ->
                                  let proj (x: Tensor) (part: int64) =
                                      let rows = torch.arange((part * c + hh * d).ToScalar(), (part * c + (hh + 1L) * d).ToScalar(), dtype = torch.int64)
                                      x.select(1L, bb).matmul(w.index_select(0L, rows).t()) + bi.index_select(0L, rows)
                                  let logits = (proj q 0L).matmul((proj k 1L).t()) / sqrt (float d)     // [L, S]
                                  let logits = logits.masked_fill(mask[bb * h + hh], System.Double.NegativeInfinity.ToScalar())
                                  logits.softmax(-1L).matmul(proj v 2L) |]                              // [L, d]
                       torch.cat(perHead, 1L) |]                                                        // [L, C]
            let heads = torch.stack(perBatch, 1L)                                                       // [L, B, C]
            let expectedOut = heads.matmul(sd["out_proj.weight"].t()) + sd["out_proj.bias"]
            Expect.isTrue (out.allclose(expectedOut, rtol = 1e-5, atol = 1e-5)) "same as the explicit formula"

        testProperty "MultiheadAttention: a [B, L, S] mask shared by the heads equals it repeated per head (fused and explicit)" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let l, s, b, c, h = 4L, 6L, 3L, 8L, 4L
            use m = new MultiheadAttention(c, h)
            let q, k, v = torch.randn(l, b, c), torch.randn(s, b, c), torch.randn(s, b, c)
            let shared = torch.cat([| torch.zeros(b, l, 1L, dtype = torch.ScalarType.Bool); torch.rand(b, l, s - 1L).lt(0.5.ToScalar()) |], 2L)
            let perHead = shared.unsqueeze(1L).expand(-1L, h, -1L, -1L).reshape(b * h, l, s)
            let explicit = m.Forward(q, k, v, Some perHead)          // gradients on: the explicit path
            let explicitShared = m.Forward(q, k, v, Some shared)
            use _ = torch.no_grad ()
            Expect.isTrue (Attention.usesFused ()) "the fused path is on under no_grad"
            let fusedShared = m.Forward(q, k, v, Some shared)
            Expect.isTrue (explicitShared.allclose(explicit, rtol = 1e-6, atol = 1e-6)) "explicit path"
            Expect.isTrue (fusedShared.allclose(explicit, rtol = 1e-5, atol = 1e-5)) "fused path"
            Expect.throws (fun () -> m.Forward(q, k, v, Some(torch.zeros(b, l, s + 1L, dtype = torch.ScalarType.Bool))) |> ignore) "a wrong mask size"
    ]
