/// Tests of src/Vct.Core/Decoder: the prediction heads and attention masks, the decoder's outputs and state dict.
module Vct.Core.Tests.DecoderTests

open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Decoder
open Vct.Core.QueryGen
open Vct.Core.Tests.Golden

let private golden name = new Golden.File("decoder", name)

[<Tests>]
let goldens =
    testList "Decoder.Golden" [
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
        testProperty "no attention row is fully masked after the reset" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            // Strongly negative logits: most rows would be blocked everywhere.
            let masks = torch.randn(2L, 5L, 8L, 8L) - 3.0.ToScalar()
            let m = PredictionHeads.openFullyMaskedRows (PredictionHeads.attentionMask 4L (3L, 2L) masks)
            Expect.isFalse (m.all(-1L).any().item<bool> ()) "every row has an open key"
            Expect.sequenceEqual m.shape [| 8L; 5L; 6L |] "[B*h, N, h*w]"

        testList "decoder output shapes for any number of frames (tiny widths)" [
            for bt in [ 1L; 2L; 3L ] ->
                test $"{bt} frame(s)" {
                    use _ = torch.NewDisposeScope()
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
                }
        ]

        testList "without auxiliary predictions the last prediction is the same (released widths, random weights)" [
            for protos in [ Some 23L; None ] ->
                test (if protos.IsSome then "ProtoVCQ (S4)" else "VCQ (MS3)") {
                    use _ = torch.NewDisposeScope()
                    use _ = torch.no_grad ()
                    torch.manual_seed 3L |> ignore
                    use dec = new VctDecoder(VctDecoderConfig.Released(2L, protos, 32L, 32L))
                    dec.eval ()
                    let bt = 2L
                    let audio = torch.randn(bt, 256L, 6L, 4L)
                    let ms = [| torch.randn(bt, 256L, 4L, 4L); torch.randn(bt, 256L, 8L, 8L); torch.randn(bt, 256L, 16L, 16L) |]
                    let features = torch.randn(bt, 256L, 32L, 32L)
                    use full = dec.Forward(audio, ms, features, keepMasks = true)
                    use last = dec.Forward(audio, ms, features, keepMasks = true, auxiliary = false)
                    Expect.equal last.Predictions.Length 1 "only the last prediction"
                    Expect.isTrue (last.Last.Logits.allclose(full.Last.Logits, rtol = 1e-4, atol = 1e-4)) "class logits"
                    Expect.isTrue (last.Last.Masks.allclose(full.Last.Masks, rtol = 1e-4, atol = 1e-3)) "mask logits"
                    // the steering masks: the same blocked positions except where a logit sits at the threshold
                    for i, (a, b) in List.indexed (List.zip full.AttentionMasks last.AttentionMasks) do
                        Expect.sequenceEqual b.shape a.shape $"layer {i} mask shape"
                        let differ = a.ne(b).to_type(torch.float64).mean().item<float>()
                        Expect.isLessThan differ 1e-4 $"layer {i}: share of attention-mask entries that differ"
                }
        ]

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

    ]
