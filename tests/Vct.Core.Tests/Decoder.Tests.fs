module Vct.Core.Tests.DecoderTests

open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Decoder
open Vct.Core.Layers
open Vct.Core.QueryGen
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
            let masked = m.call(g["in.tgt"], g["in.memory_masked"], Some g["in.memory_mask_masked"], Some g["in.pos_masked"], Some g["in.query_pos"])
            expectClose "masked" g["out.masked"] masked
            let audio = m.call(g["in.tgt"], g["in.memory_audio"], Some g["in.memory_mask_audio"], Some g["in.pos_audio"], Some g["in.query_pos"])
            expectClose "audio" g["out.audio"] audio
            expectClose "nomask" g["out.nomask"] (m.call(g["in.tgt"], g["in.memory_audio"], None, None, None))
        }

        test "SelfAttentionLayer" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_self_attention_layer.pt"
            use m = new SelfAttentionLayer(128L, 4L)
            loadWeights (g.Weights()) (fun _ -> false) m
            expectClose "out" g["out.out"] (m.call(g["in.tgt"], Some g["in.query_pos"]))
        }

        test "FFNLayer" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_ffn_layer.pt"
            use m = new FFNLayer(256L, 256L)
            loadWeights (g.Weights()) (fun _ -> false) m
            expectClose "out" g["out.out"] (m.call g["in.tgt"])
        }

        test "AssignAttention in eval: hard one-hot over queries, rows / (count + 1)" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_assign_attention.pt"
            use m = new AssignAttention(AssignConfig.Default 256L)
            loadWeights (g.Weights()) (fun _ -> false) m
            m.eval ()
            let out, maps = m.ForwardWith(g["in.query"], g["in.key"], None)
            expectClose "raw logits" g["out.debug.raw_attn"] maps.Logits
            expectEqual "hard" g["out.eval.hard"] maps.Hard
            expectClose "out" g["out.eval.out"] out
        }

        test "AssignAttention in training with a given Gumbel sample" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_assign_attention.pt"
            use m = new AssignAttention(AssignConfig.Default 256L)
            loadWeights (g.Weights()) (fun _ -> false) m
            m.train ()
            let out, maps = m.ForwardWith(g["in.query"], g["in.key"], Some g["in.gumbel_noise"])
            expectClose "hard (straight-through value)" g["out.train.hard"] maps.Hard
            expectClose "out" g["out.train.out"] out
        }

        test "ProtoVCQ (S4 form, K = 23) and VCQ (MS3 form) on 8x8 mask features" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_ppqg.pt"
            let x = g["in.x"]
            use proto = new VisualQueryBlock(VcqConfig.For(8L, 8L, Some 23L))
            loadWeights (g.Weights()) (fun _ -> false) proto
            proto.eval ()
            let o = proto.ForwardFull x
            expectClose "queries" g["out.query"] o.Queries
            expectClose "prototypes" g["out.prototypes"] o.Prototypes.Value
            expectEqual "assignment arg-max" g["out.debug.assign_argmax"] (o.Assignment.argmax(2L))
            use vcq = new VisualQueryBlock(VcqConfig.For(8L, 8L, None))
            let shared = g.Weights()
            for k in List.ofSeq shared.Keys do
                if k.StartsWith "prototype" || k.StartsWith "pre_attn" then shared.Remove k |> ignore
            loadWeights shared (fun _ -> false) vcq
            vcq.eval ()
            let v = vcq.ForwardFull x
            expectClose "VCQ queries" g["out.vcq.query"] v.Queries
            expectEqual "VCQ assignment arg-max" g["out.debug.assign_argmax_vcq"] (v.Assignment.argmax(2L))
        }

        test "prediction heads and the attention masks built from them (sizes 6x4 and 3x3)" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_prediction_heads.pt"
            let cfg = { VctDecoderConfig.Released(2L, None, 8L, 8L) with DecLayers = 1; DimFeedforward = 16L }
            use dec = new VctDecoder(cfg)
            let heads = set [ "decoder_norm."; "class_embed."; "mask_embed." ]
            loadWeights (g.Weights()) (fun k -> not (heads |> Set.exists (fun h -> k.StartsWith h))) dec
            dec.eval ()
            let pred = dec.Heads(g["in.output"], g["in.mask_features"])
            expectClose "class logits" g["out.outputs_class"] pred.Logits
            expectClose "mask logits" g["out.outputs_mask"] pred.Masks
            for (name, size) in [ "size6x4", (6L, 4L); "size3x3", (3L, 3L) ] do
                let m = PredictionHeads.attentionMask 8L size pred.Masks
                expectEqual $"{name} attention mask" g[$"out.{name}.attn_mask"] m
                expectEqual $"{name} after the fully-masked-row reset" g[$"out.{name}.attn_mask_reset"] (PredictionHeads.openFullyMaskedRows m)
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
            let out = m.call(q, k, v, Some mask)
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

        testProperty "each pixel is assigned to exactly one query in eval" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            use m = new AssignAttention(AssignConfig.Default 16L)
            m.eval ()
            let _, maps = m.ForwardWith(torch.randn(2L, 7L, 16L), torch.randn(2L, 11L, 16L), None)
            Expect.isTrue (maps.Hard.sum(2L).allclose(torch.ones(2L, 1L, 11L))) "one query per pixel"
            Expect.isTrue (maps.Hard.eq(0.0.ToScalar()).logical_or(maps.Hard.eq(1.0.ToScalar())).all().item<bool> ()) "one-hot"

        testProperty "Gumbel noise only in training: eval is deterministic, training draws" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let q, k = torch.randn(1L, 6L, 16L), torch.randn(1L, 40L, 16L)
            use m = new AssignAttention(AssignConfig.Default 16L, new torch.Generator(uint64 (abs seed)))
            m.eval ()
            let a1, _ = m.ForwardWith(q, k, None)
            let a2, _ = m.ForwardWith(q, k, None)
            Expect.isTrue (a1.allclose(a2, 0.0, 0.0)) "eval repeats exactly"
            m.train ()
            let hards = [ for _ in 1 .. 4 -> (snd (m.ForwardWith(q, k, None))).Hard.detach().clone() ]
            let distinct = hards |> List.pairwise |> List.exists (fun (x, y) -> not (x.allclose(y, 0.0, 0.0)))
            Expect.isTrue distinct "training assignments vary with the noise"

        testProperty "hardSoftmax is one-hot forward with the softmax gradient" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let x1 = torch.randn(2L, 5L, 3L).requires_grad_()
            let x2 = x1.detach().clone().requires_grad_()
            let w = torch.randn(2L, 5L, 3L)
            let y = Grouping.hardSoftmax -2L x1
            Expect.isTrue (y.sum(-2L).allclose(torch.ones(2L, 3L))) "one-hot"
            (y * w).sum().backward()
            (x2.softmax(-2L) * w).sum().backward()
            Expect.isTrue (x1.grad.allclose(x2.grad, rtol = 1e-5, atol = 1e-6)) "straight-through gradient"

        testProperty "no attention row is fully masked after the reset" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            // Strongly negative logits: most rows would be blocked everywhere.
            let masks = torch.randn(2L, 5L, 8L, 8L) - 3.0.ToScalar()
            let m = PredictionHeads.openFullyMaskedRows (PredictionHeads.attentionMask 4L (3L, 2L) masks)
            Expect.isFalse (m.all(-1L).any().item<bool> ()) "every row has an open key"
            Expect.sequenceEqual m.shape [| 8L; 5L; 6L |] "[B*h, N, h*w]"

        testProperty "decoder output shapes for any number of frames (tiny widths)" <| fun (frames: FsCheck.PositiveInt) ->
            use _ = torch.NewDisposeScope()
            let bt = int64 (1 + frames.Get % 3)
            let cfg =
                { VctDecoderConfig.Released(2L, Some 5L, 8L, 8L) with
                    HiddenDim = 32L; NumQueries = 7L; NumHeads = 4L; DimFeedforward = 16L
                    Query = { VcqConfig.For(8L, 8L, Some 5L) with Channels = 32L; NumQueries = 7L } }
            use dec = new VctDecoder(cfg)
            dec.eval ()
            let audio = torch.randn(bt, 32L, 6L, 4L)
            let ms = [| torch.randn(bt, 32L, 2L, 2L); torch.randn(bt, 32L, 4L, 4L); torch.randn(bt, 32L, 8L, 8L) |]
            use out = dec.Forward(audio, ms, torch.randn(bt, 32L, 8L, 8L), keepMasks = true)
            Expect.equal out.Predictions.Length 10 "1 + 9 predictions"
            Expect.sequenceEqual out.Last.Logits.shape [| bt; 7L; 3L |] "class logits"
            Expect.sequenceEqual out.Last.Masks.shape [| bt; 7L; 8L; 8L |] "mask logits"
            Expect.sequenceEqual out.AudioFeat.Value.shape [| bt; 32L |] "audio feat"
            Expect.sequenceEqual out.ProtoFeat.Value.shape [| bt; 5L; 32L |] "proto feat"
            Expect.equal out.AttentionMasks.Length 9 "one mask per layer"
            Expect.isTrue (out.AudioFeat.Value.norm(-1).allclose(torch.ones(bt))) "unit norm"

        test "decoder state-dict names and shapes equal the official S4 and MS3 manifests" {
            for (subset, protos) in [ "s4", Some 23L; "ms3", None ] do
                use dec = new VctDecoder(VctDecoderConfig.Released(2L, protos, 96L, 96L))
                let ours =
                    dec.state_dict()
                    |> Seq.map (fun kv -> "sem_seg_head.predictor." + kv.Key, Golden.shapeText kv.Value.shape)
                    |> Map.ofSeq
                let official =
                    Golden.manifest subset
                    |> Array.filter (fun r -> r.Key.StartsWith "sem_seg_head.predictor.")
                    |> Array.map (fun r -> r.Key, r.Shape)
                    |> Map.ofArray
                Expect.equal (Set.ofSeq ours.Keys) (Set.ofSeq official.Keys) $"{subset}: same keys"
                for kv in official do
                    Expect.equal ours[kv.Key] kv.Value $"{subset}: shape of {kv.Key}"
        }

        test "VCQ has no prototype keys; ProtoVCQ names follow the official checkpoint" {
            use proto = new VisualQueryBlock(VcqConfig.For(8L, 8L, Some 23L))
            use vcq = new VisualQueryBlock(VcqConfig.For(8L, 8L, None))
            let keys (m: torch.nn.Module) = m.state_dict().Keys |> Set.ofSeq
            let pk = keys proto
            for k in [ "prototype.weight"; "pre_proj.0.weight"; "pre_proj.2.weight"; "pre_proj.4.bias"; "query_mixer.layers.0.weight"
                       "pre_attn.multihead_attn.in_proj_weight"; "pre_attn.norm.weight"; "assign_attn.q_proj.weight"; "assign_attn.proj.bias" ] do
                Expect.contains pk k $"ProtoVCQ has {k}"
            Expect.isTrue (keys vcq |> Set.forall (fun k -> not (k.StartsWith "prototype" || k.StartsWith "pre_attn"))) "VCQ has none"
            Expect.equal (Set.difference pk (keys vcq) |> Set.forall (fun k -> k.StartsWith "prototype" || k.StartsWith "pre_attn")) true "the rest is shared"
        }
    ]
