module Vct.Core.Tests.ModelTests

open System
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone
open Vct.Core.Fusion

/// The official manifest of `subset` as key -> "AxB" shape text ("" for scalars).
let manifest (subset: string) = Golden.manifest subset |> Array.map (fun r -> r.Key, r.Shape) |> Map.ofArray

let shapeText (t: torch.Tensor) = Golden.shapeText t.shape

/// Inputs drawn from LibTorch's global generator.
let tinyInputs (cfg: VctConfig) (frames: int64) (withMasks: bool) = Golden.tinyInputs None cfg frames withMasks

[<Tests>]
let tests =
    testList "Model" [
        test "released models have exactly the official state-dict keys and shapes (S4, MS3, AVSS)" {
            // Documented differences (docs/architecture.md §14.3): the criterion's training-only entries, and the VGGish FC
            // `embeddings` that VCT never applies; both are reported when a released file is loaded.
            let unusedInModel (k: string) = k.StartsWith "criterion." || k.StartsWith "audio_backbone.embeddings."
            for subset in [ Subset.S4; Subset.MS3; Subset.AVSS ] do
                use _ = torch.no_grad ()
                use m = new VctModel(VctConfig.Released subset)
                let ours = m.state_dict() |> Seq.map (fun kv -> kv.Key, shapeText kv.Value) |> Map.ofSeq
                let official = manifest ((sprintf "%A" subset).ToLowerInvariant()) |> Map.filter (fun k _ -> not (unusedInModel k))
                let missing = Set.difference (Set.ofSeq official.Keys) (Set.ofSeq ours.Keys)
                let extra = Set.difference (Set.ofSeq ours.Keys) (Set.ofSeq official.Keys)
                Expect.isEmpty missing $"{subset}: official keys we lack"
                Expect.isEmpty extra $"{subset}: keys the official model lacks"
                for kv in official do
                    Expect.equal ours[kv.Key] kv.Value $"{subset}: shape of {kv.Key}"
        }

        testProperty "Tiny model: output shapes for any number of frames" <| fun (n: FsCheck.PositiveInt) ->
            use _ = torch.NewDisposeScope()
            let frames = int64 (1 + n.Get % 3)
            let cfg = VctConfig.Tiny(Subset.S4, 64L, 4L)
            use m = new VctModel(cfg)
            m.eval ()
            use out = m.Forward(tinyInputs cfg frames false)
            let last = out.Decoder.Last
            Expect.sequenceEqual last.Logits.shape [| frames; 20L; 3L |] "class logits [BT, N, C+1]"
            Expect.sequenceEqual last.Masks.shape [| frames; 20L; 16L; 16L |] "mask logits at 1/4"
            Expect.equal out.Decoder.Predictions.Length 10 "10 predictions"
            use seg = Segment.ofOutput m SegmentOptions.Default None out
            let scores = seg.Scores
            Expect.sequenceEqual scores.shape [| frames; 2L; 64L; 64L |] "semantic scores"
            Expect.sequenceEqual (VctMath.binaryMasks scores).shape [| frames; 64L; 64L |] "binary masks"

        test "gradients reach every trainable parameter and none reach VGGish" {
            use _ = torch.NewDisposeScope()
            // No stochastic depth: a dropped branch legitimately gets no gradient in that step.
            let cfg = { (VctConfig.Tiny(Subset.S4, 64L, 4L)).WithUsePreSam true with Swin = SwinConfig.Tiny.WithDropPathRate 0.0 }
            torch.manual_seed 11L |> ignore
            use m = new VctModel(cfg)
            // The deformable attention's offset/weight projections start at zero (docs/architecture.md §6.4), which blocks
            // the gradient path to the pixel decoder's level embedding at init; give them noise so every path lives.
            // The tiny Swin's first level has 32 channels, so its channel-weight block's fc1 has only two ReLU units:
            // with negative pre-activations for both frames they are legitimately dead and fc1 gets a zero gradient
            // (it happened on one CI run). A positive bias keeps them alive, whatever the random init.
            let noGrad = torch.no_grad ()
            for struct (name, p) in m.named_parameters () do
                if name.EndsWith "sampling_offsets.weight" || name.EndsWith "attention_weights.weight" then
                    p.normal_(0.0, 0.01) |> ignore
                if name.StartsWith "scale_factor_module." && name.EndsWith "fc1.bias" then
                    p.fill_(1.0.ToScalar()) |> ignore
            noGrad.Dispose()
            m.train ()
            use out = m.Forward(tinyInputs cfg 2L true)
            let loss =
                out.Decoder.Predictions
                |> List.map (fun p -> p.Logits.pow(2.0.ToScalar()).mean() + p.Masks.sigmoid().mean())
                |> List.reduce (+)
            let loss = loss + out.Decoder.AudioFeat.Value.sum() + out.Decoder.ProtoFeat.Value.sum()
            loss.backward()
            for struct (name, p) in m.named_parameters () do
                if name.StartsWith "audio_backbone." then
                    Expect.isFalse p.requires_grad $"{name} is frozen"
                    Expect.isTrue (isNull p.grad) $"{name} has no gradient"
                else
                    Expect.isTrue p.requires_grad $"{name} is trainable"
                    Expect.isFalse (isNull p.grad) $"{name} received a gradient"
                    Expect.isTrue (p.grad.abs().sum().item<float32> () > 0.0f) $"{name} has a non-zero gradient"
        }

        test "a pre-SAM model refuses to run without mask images unless a fallback is chosen" {
            use _ = torch.NewDisposeScope()
            let cfg = (VctConfig.Tiny(Subset.MS3, 64L, 4L)).WithUsePreSam true
            use m = new VctModel(cfg)
            m.eval ()
            let e = Expect.throwsC (fun () -> m.Forward(tinyInputs cfg 1L false) |> ignore) id
            Expect.stringContains e.Message "Maskige" "explains what is missing"
            m.MissingMasks <- MissingMasks.BlankMaskImage
            use out = m.Forward(tinyInputs cfg 1L false)
            Expect.equal out.Decoder.Predictions.Length 10 "runs with the documented fallback"
        }

        test "bad audio shapes and frame/audio count mismatches are named" {
            use _ = torch.NewDisposeScope()
            let cfg = VctConfig.Tiny(Subset.S4, 64L, 4L)
            use m = new VctModel(cfg)
            let inputs = tinyInputs cfg 2L false
            let e1 = Expect.throwsC (fun () -> m.Forward({ inputs with Audio = AudioInput.LogMel(torch.randn(2L, 1L, 90L, 64L), None) }) |> ignore) id
            Expect.stringContains e1.Message "[2x1x90x64]" "names the shape"
            let e2 = Expect.throwsC (fun () -> m.Forward({ inputs with Audio = AudioInput.LogMel(torch.randn(3L, 1L, 96L, 64L), None) }) |> ignore) id
            Expect.stringContains e2.Message "audio examples" "names the mismatch"
        }

        test "semantic inference follows the formula on a hand-made case" {
            use _ = torch.NewDisposeScope()
            // One query, class logits favouring class 1, a mask that is +inf on the left half.
            let logits = torch.tensor([| 0.0f; 10.0f; -10.0f |]).view(1L, 1L, 3L)
            let masks = torch.tensor([| 20.0f; -20.0f; 20.0f; -20.0f |]).view(1L, 1L, 2L, 2L)
            let scores = VctMath.semanticInference (2L, 2L) (2L, 2L) logits masks
            let p = logits.softmax(-1L)
            let expected1 = p[0L, 0L, 1L].item<float32> ()
            Expect.floatClose Accuracy.medium (float (scores[0L, 1L, 0L, 0L].item<float32> ())) (float expected1) "class 1 on the left"
            Expect.isLessThan (scores[0L, 1L, 0L, 1L].item<float32> ()) 1e-6f "nothing on the right"
            Expect.sequenceEqual (VctMath.binaryMasks scores).shape [| 1L; 2L; 2L |] "binary shape"
            let masks01 = VctMath.binaryMasks scores
            Expect.isTrue (masks01[0L, 0L, 0L].item<bool> ()) "left is foreground"
        }
    ]
