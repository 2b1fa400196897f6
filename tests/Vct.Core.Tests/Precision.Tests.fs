/// Inference precision (src/Vct.Core/Platform/Precision.fs) and the fused attention kernels
/// (src/Vct.Core/Platform/Attention.fs): bf16 masks against float32 masks on the committed full-model goldens,
/// the CPU refusals, the parser, and fused against explicit attention.
module Vct.Core.Tests.PrecisionTests

open System
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint

/// The committed small official-weight model of `subset` (tests/golden/model/<subset>) and its golden inputs.
let private goldenModel (subset: Subset) =
    let folder = Golden.path [ "model"; Golden.subsetName subset ]
    let m = new VctModel(Golden.smallConfig subset)
    StateDict.loadFileInto Golden.loadOptions (Path.Combine(folder, "model_best.pth")) m |> ignore
    m.eval ()
    use g = new Golden.File(folder, "golden.pt")
    let inputs =
        { Images = g["in.images"].to_type(torch.float32).detach().clone()
          PreMasks = Some(g["in.pre_masks"].to_type(torch.float32).detach().clone())
          Audio =
            AudioInput.LogMel(
                g["in.audio_log_mel"].detach().clone(),
                if subset = Subset.AVSS then Some(g["in.vid_temporal_mask_flag"].detach().clone()) else None) }
    m, inputs

/// Semantic scores [BT, C, H, W] and last mask logits of one inference pass in `precision`, with the dtype of
/// the mask logits as returned.
let private passIn (precision: Precision) (m: VctModel) (inputs: VctInputs) =
    use _ = torch.inference_mode ()
    Precision.run precision torch.CPU (fun () ->
        use out = m.Forward inputs
        let dtype = out.Decoder.Last.Masks.dtype
        let scores = (Segment.ofOutput m SegmentOptions.Default inputs.TemporalFlags out).Scores
        scores.MoveToOuterDisposeScope(), out.Decoder.Last.Masks.clone().MoveToOuterDisposeScope(), dtype)

/// Fraction of equal elements of two boolean tensors.
let private agreement (a: Tensor) (b: Tensor) =
    use _ = torch.NewDisposeScope()
    a.eq(b).to_type(torch.float64).mean().item<float>()

[<Tests>]
let tests =
    testList "Precision" [
        test "parser: names, aliases, case and blanks; unknown names fail with the accepted list" {
            Expect.equal (Precision.parse "fp32") Precision.Float32 "fp32"
            Expect.equal (Precision.parse " Float32 ") Precision.Float32 "float32"
            Expect.equal (Precision.parse "BF16") Precision.BFloat16 "bf16"
            Expect.equal (Precision.parse "bfloat16") Precision.BFloat16 "bfloat16"
            Expect.equal (Precision.parse "fp16") Precision.Float16 "fp16"
            Expect.equal (Precision.parse "float16") Precision.Float16 "float16"
            for bad in [ "bf32"; ""; "int8"; null ] do
                let e = Expect.throwsC (fun () -> Precision.parse bad |> ignore) id
                Expect.isTrue (e :? ArgumentException) $"'{bad}': an ArgumentException"
                Expect.stringContains e.Message "expected fp32 (float32), bf16 (bfloat16) or fp16 (float16)" "lists the names"
            Expect.equal Precision.BFloat16.Name "bf16" "short name"
        }

        test "fp16 on the CPU is refused with one clear line; fp32 always runs" {
            let e = Expect.throwsC (fun () -> Precision.ensureSupported torch.CPU Precision.Float16) id
            Expect.isTrue (e :? NotSupportedException) "NotSupportedException"
            Expect.stringContains e.Message "fp16 is not supported on the CPU" "says what and where"
            Expect.isFalse (e.Message.Contains "\n") "one line"
            Expect.throwsT<NotSupportedException> (fun () -> Precision.run Precision.Float16 torch.CPU (fun () -> 1) |> ignore)
                "run refuses too"
            Precision.ensureSupported torch.CPU Precision.Float32
            Expect.equal (Precision.run Precision.Float32 torch.CPU (fun () -> 42)) 42 "fp32 runs the function plainly"
        }

        test "bf16 on the CPU follows the CPU's flags (avx512_bf16 / amx_bf16)" {
            let reason = Precision.unsupportedReason torch.CPU Precision.BFloat16
            if Precision.cpuHasBf16 () then Expect.isNone reason "this CPU has native bf16: allowed"
            else
                Expect.isSome reason "no native bf16: refused"
                Expect.stringContains reason.Value "avx512_bf16" "names the missing flags"
        }

        test "fused and explicit attention give the same golden S4 outputs (1e-4)" {
            use _ = torch.NewDisposeScope()
            let m, inputs = goldenModel Subset.S4
            use m = m
            let run fusedOn =
                Attention.fused <- fusedOn
                try
                    use _ = torch.no_grad ()
                    use out = m.Forward inputs
                    out.Decoder.Last.Masks.detach().clone(), out.Decoder.Last.Logits.detach().clone()
                finally Attention.fused <- true
            let mf, lf = run true
            let me, le = run false
            Expect.isTrue (mf.allclose(me, rtol = 1e-4, atol = 1e-4)) $"mask logits: max diff {(mf - me).abs().max().item<float32>()}"
            Expect.isTrue (lf.allclose(le, rtol = 1e-4, atol = 1e-4)) $"class logits: max diff {(lf - le).abs().max().item<float32>()}"
        }

        // Threshold: the issue's 99% of pixels for the model's masks. The golden models are small and barely trained,
        // so at the model's own 0.5 threshold their S4/MS3 masks are all background and agree trivially; hence two
        // harder checks: the sign of every query's mask logit (last prediction, >= 99%), and masks thresholded at
        // the float32 pass's median foreground probability (half the pixels foreground, many of them near the
        // threshold, >= 98%). AVSS: arg-max label maps of 6 classes.
        for subset in [ Subset.S4; Subset.MS3; Subset.AVSS ] do
            test $"bf16 masks agree with float32 masks on >= 99%% of pixels (golden {subset} model), outputs float32" {
                if not (Precision.cpuHasBf16 ()) then skiptest "this CPU has no native bf16 (avx512_bf16 / amx_bf16)"
                use _ = torch.NewDisposeScope()
                let m, inputs = goldenModel subset
                use m = m
                let s32, l32, d32 = passIn Precision.Float32 m inputs
                let s16, l16, d16 = passIn Precision.BFloat16 m inputs
                Expect.equal d32 torch.ScalarType.Float32 "fp32 pass: float32 outputs"
                Expect.equal d16 torch.ScalarType.Float32 "bf16 pass: float32 outputs too"
                Expect.equal s16.dtype torch.ScalarType.Float32 "bf16 pass: float32 scores"
                // the model's own masks (0.5 threshold, or arg-max labels for AVSS)
                let own =
                    if subset = Subset.AVSS then agreement (VctMath.labelMaps s32) (VctMath.labelMaps s16)
                    else agreement (VctMath.binaryMasks s32) (VctMath.binaryMasks s16)
                // the hard check: S4/MS3 masks at the float32 median foreground probability
                let median =
                    if subset = Subset.AVSS then own
                    else
                        let f32, f16 = VctMath.foreground s32, VctMath.foreground s16
                        let t = f32.flatten().median()
                        agreement (f32.gt(t)) (f16.gt(t))
                let logitAgree = agreement (l32.gt(0.0.AsScalar)) (l16.gt(0.0.AsScalar))
                printfn "Precision %A: bf16/fp32 agreement: masks %.3f%%, masks at the median threshold %.3f%%, mask-logit signs %.3f%%, max |score diff| %.3g"
                    subset (100.0 * own) (100.0 * median) (100.0 * logitAgree) ((s32 - s16).abs().max().item<float32>())
                Expect.isGreaterThanOrEqual own 0.99 $"mask pixel agreement {100.0 * own:F2}%%"
                Expect.isGreaterThanOrEqual logitAgree 0.99 $"mask-logit sign agreement {100.0 * logitAgree:F2}%%"
                // Half the pixels on the decision boundary: 98% (measured: S4 99.1%, MS3 99.0%).
                Expect.isGreaterThanOrEqual median 0.98 $"agreement at the median threshold {100.0 * median:F2}%%"
            }

        test "bf16 really computes in bfloat16 inside the region (the products are bf16, not float32)" {
            if not (Precision.cpuHasBf16 ()) then skiptest "this CPU has no native bf16 (avx512_bf16 / amx_bf16)"
            use _ = torch.NewDisposeScope()
            use _ = torch.inference_mode ()
            let lin = torch.nn.Linear(8L, 4L)
            let x = torch.randn(3L, 8L)
            let dt = Precision.run Precision.BFloat16 torch.CPU (fun () -> (lin.call x).dtype)
            Expect.equal dt torch.ScalarType.BFloat16 "linear under bf16 autocast"
            Expect.equal (lin.call x).dtype torch.ScalarType.Float32 "float32 again after the region"
        }
    ]
