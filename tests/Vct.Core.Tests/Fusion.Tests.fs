/// Tests of src/Vct.Core/Fusion: the pre-SAM branch (channel-weighted blocks, F + s(P) * P, the missing-mask
/// fallbacks), the visual encoder's state dict, the audio MLP.
module Vct.Core.Tests.FusionTests

open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Fusion

[<Tests>]
let preSamGolden =
    testList "Vision.Golden.PreSam" [
        test "comp_channel_weighted_block: scale and fused output for d = 128, 256, 512, 1024" {
            use g = Golden.vision "comp_channel_weighted_block.pt"
            use _ = torch.no_grad ()
            for d in [ 128L; 256L; 512L; 1024L ] do
                use blk = new ChannelWeightedBlock(d)
                Golden.loadWeights (g.Weights($"dim{d}.")) (fun _ -> false) blk
                let pre = g[$"in.dim{d}.pre_sam_feature"]
                let s = blk.Forward pre
                Golden.expectClose $"scale {d}" g[$"out.dim{d}.scale"] s
                Golden.expectClose $"fused {d}" g[$"out.dim{d}.fused"] (PreSam.fuse g[$"in.dim{d}.feature"] s pre)
        }
    ]

[<Tests>]
let preSam =
    testList "Vision.Backbone.PreSam" [
        test "refuses without mask images unless a fallback is chosen; fallbacks run" {
            use enc = new VisualEncoder(VisualEncoderConfig.Tiny)
            enc.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let x = torch.randn(1L, 3L, 40L, 40L)
            let e = Expect.throwsC (fun () -> enc.Forward(x, None) |> ignore) id
            Expect.stringContains e.Message "MissingMasks" "the message names the fallbacks"
            let skip = enc.Forward(x, None, MissingMasks.SkipBranch)
            let rgb = enc.Backbone.Forward x
            for k in 0 .. 3 do Expect.isTrue (Golden.same skip[k] rgb[k]) "SkipBranch = RGB features"
            let blank = enc.Forward(x, None, MissingMasks.BlankMaskImage)
            let explicitBlank = enc.Forward(x, Some(PreSam.blankMaskImage 1L 40L 40L torch.CPU))
            for k in 0 .. 3 do Expect.isTrue (blank[k].allclose(explicitBlank[k])) "BlankMaskImage = the grey Maskige"
            Expect.throws (fun () -> enc.Forward(x, Some(torch.randn(1L, 3L, 32L, 40L))) |> ignore) "mask image size must match"
        }

        test "fusion is F + s(P) * P at every level" {
            use enc = new VisualEncoder(VisualEncoderConfig.Tiny)
            enc.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let x = torch.randn(2L, 3L, 36L, 52L)
            let p = torch.randn(2L, 3L, 36L, 52L)
            let fused = enc.Forward(x, Some p)
            let f = enc.Backbone.Forward x
            let pf = enc.PreSamBackbone.Value.Forward p
            for k in 0 .. 3 do
                let s = enc.ScaleFactorModule.Value[k].Forward pf[k]
                Expect.sequenceEqual s.shape [| 2L; pf[k].shape[1]; 1L; 1L |] "scale shape"
                Expect.isTrue (fused[k].allclose(f[k] + s * pf[k], rtol = 1e-5, atol = 1e-6)) $"level {k}"
        }
    ]

[<Tests>]
let stateDict =
    testList "Vision.StateDict" [
        test "backbone, pre_sam_backbone and scale_factor_module match the official manifests (names, shapes, dtypes)" {
            use enc = new VisualEncoder(VisualEncoderConfig.SwinB384)
            let all = Golden.stateDictRows "" enc
            for subset in [ "s4"; "ms3"; "avss" ] do
                for prefix in [ "backbone."; "pre_sam_backbone."; "scale_factor_module." ] do
                    Golden.expectSameRows $"{subset} {prefix}" (Golden.manifestRows subset prefix) (Golden.stateDictRows prefix enc)
            Expect.equal all.Length ((Golden.manifestRows "s4" "backbone.").Length * 2 + (Golden.manifestRows "s4" "scale_factor_module.").Length) "nothing else"
            let idx = all |> Array.filter (fun (k, _, _) -> k.EndsWith "relative_position_index")
            Expect.equal idx.Length 48 "24 relative_position_index buffers per backbone"
        }

        test "without the pre-SAM branch only backbone.* remains" {
            use enc = new VisualEncoder(VisualEncoderConfig.Tiny.WithUsePreSam false)
            for kv in enc.state_dict() do
                Expect.isTrue (kv.Key.StartsWith "backbone.") $"{kv.Key} is a backbone key"
        }
    ]

[<Tests>]
let audioMlp =
    testList "Audio.Vggish" [
        test "audio MLP matches the official audio_mlp (reduced width) with the head's transposes" {
            use _ = torch.NewDisposeScope()
            use ck = Checkpoint.StateDict.load (AudioTests.golden [ "ref"; "audio_mlp_small.pt" ])
            let sd = ck.StateDict
            use m = new AudioMlp(512L, 32L, 256L)
            let weights = sd |> Seq.filter (fun kv -> kv.Key.StartsWith "w.") |> Seq.toArray
            let r = m.LoadStateDict(weights, "w.")
            Expect.equal r.Loaded.Length 6 "3 linears"
            let y = m.Forward sd["in.x"]
            let expected = sd["out.out"]
            Expect.equal y.shape [| 1L; 256L; 6L; 4L |] "shape"
            let rel = (y - expected).abs().max().ToDouble() / expected.abs().max().ToDouble()
            Expect.isLessThanOrEqual rel 1e-4 $"relative error {rel:E2}"
        }

        test "audio MLP keys and shapes are the official sem_seg_head.audio_transformation.*" {
            use m = new AudioMlp()
            let ours = m.state_dict() |> Seq.map (fun kv -> kv.Key, AudioTests.shapeText kv.Value) |> Seq.sort |> Array.ofSeq
            Expect.equal ours (AudioTests.manifestKeys "sem_seg_head.audio_transformation." |> Array.sort) "same keys and shapes"
        }
    ]
