/// Model forward latency and peak memory on the CPU: the full 5-frame S4 forward at 384 with and without the
/// pre-SAM branch, one Swin-B, the pixel decoder and the transformer decoder, ours against the official model
/// run by the shared official-ref tool (`time_official.py`, Debian's torch with OpenBLAS) in the same run.
module Vct.Bench.ModelBench

open System
open System.IO
open System.Text.Json
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Bench.Harness
open Vct.Core.Fusion

/// (median seconds, peak MiB during the timed runs) of `f`.
let private measure (warmup: int) (runs: int) (f: unit -> unit) =
    for _ in 1 .. warmup do f ()
    GC.Collect()
    let ok = resetPeak ()
    let times = time 0 runs f
    median times, (if ok then peakMiB () else nan)

let run (repeats: int) =
    torch.set_num_threads 2
    let loadBefore = loadAverage ()
    let frames = 5L
    let inputs (preSam: bool) =
        torch.manual_seed 0L |> ignore
        { Images = torch.rand(frames, 3L, 384L, 384L) * 255.0.AsScalar
          PreMasks = (if preSam then Some(torch.rand(frames, 3L, 384L, 384L) * 255.0.AsScalar) else None)
          Audio = AudioInput.LogMel(torch.randn(frames, 1L, 96L, 64L), None) }
    let results = Collections.Generic.Dictionary<string, float * float>()
    // Inference mode (no autograd bookkeeping at all; the fused attention kernels need only "no gradient").
    use _ = torch.inference_mode ()
    let bf16Ok = (Precision.unsupportedReason torch.CPU Precision.BFloat16).IsNone
    let agreements = Collections.Generic.Dictionary<string, string>()
    printfn "model: GEMM peak"
    let gemmF32 = ProfileBench.gemmGflops torch.float32 2048L repeats
    let gemmBf16 = if bf16Ok then ProfileBench.gemmGflops torch.bfloat16 2048L repeats else nan
    for preSam in [ true; false ] do
        printfn "model: ours, full forward, pre-SAM %b" preSam
        use m = new VctModel((VctConfig.Released Subset.S4).WithUsePreSam preSam)
        m.eval ()
        let x = inputs preSam
        results[if preSam then "full_presam" else "full_nopresam"] <-
            measure 1 (max 2 (repeats - 1)) (fun () -> use _ = torch.NewDisposeScope() in (m.Forward(x, auxiliary = false) :> IDisposable).Dispose())
        if preSam && bf16Ok then
            printfn "model: ours, full forward, pre-SAM on, bf16"
            results["full_presam_bf16"] <-
                measure 1 (max 2 (repeats - 1)) (fun () ->
                    use _ = torch.NewDisposeScope()
                    Precision.run Precision.BFloat16 torch.CPU (fun () -> (m.Forward(x, auxiliary = false) :> IDisposable).Dispose()))
            // Pixel agreement of the bf16 masks with our float32 masks (same model, same inputs): the model's own
            // masks (0.5), and masks at the float32 median foreground probability (half the pixels on the boundary).
            use _ = torch.NewDisposeScope()
            let scores (p: Precision) = Precision.run p torch.CPU (fun () -> use o = m.Forward(x, auxiliary = false) in (Segment.ofOutput m SegmentOptions.Default None o).Scores)
            let s32, s16 = scores Precision.Float32, scores Precision.BFloat16
            let agree (a: Tensor) (b: Tensor) = 100.0 * a.eq(b).to_type(torch.float64).mean().item<float>()
            let f32, f16 = VctMath.foreground s32, VctMath.foreground s16
            let t = f32.flatten().median()
            agreements["full_presam_bf16"] <-
                $"{agree (VctMath.binaryMasks s32) (VctMath.binaryMasks s16):F2}%% of mask pixels (at the median threshold: {agree (f32.gt t) (f16.gt t):F2}%%)"
        if preSam then
            // The parts, on the same model and inputs.
            use scope = torch.NewDisposeScope()
            let images = VctMath.padTo 32L (VctMath.normalise x.Images)
            let pre = VctMath.normalise x.PreMasks.Value
            printfn "model: ours, parts"
            results["backbone"] <- measure 1 repeats (fun () -> use _ = torch.NewDisposeScope() in m.VisualEncoder.Backbone.Forward images |> ignore)
            for n in [ 1L; 5L ] do
                let xi, pi = images.narrow(0L, 0L, n), pre.narrow(0L, 0L, n)
                results[$"swin_{n}"] <- measure 1 repeats (fun () -> use _ = torch.NewDisposeScope() in m.VisualEncoder.Backbone.Forward xi |> ignore)
                results[$"presam_{n}"] <- measure 1 repeats (fun () -> use _ = torch.NewDisposeScope() in m.VisualEncoder.Forward(xi, Some pi) |> ignore)
            let features = m.VisualEncoder.Forward(images, Some pre)
            results["pixel_decoder"] <- measure 1 repeats (fun () -> use _ = torch.NewDisposeScope() in m.Head.PixelDecoder.Forward features |> ignore)
            let pix = m.Head.PixelDecoder.Forward features
            let audio = m.Head.AudioTransformation.Forward (m.AudioBackboneFeatures((match x.Audio with AudioInput.LogMel(e, _) -> e | AudioInput.Maps m -> m), None))
            results["transformer_decoder"] <-
                measure 1 repeats (fun () ->
                    use _ = torch.NewDisposeScope()
                    (m.Head.Predictor.Forward(audio, pix.MultiScaleFeatures, pix.MaskFeatures, auxiliary = false) :> IDisposable).Dispose())
            if bf16Ok then
                let bf (f: unit -> unit) () = Precision.run Precision.BFloat16 torch.CPU f
                printfn "model: ours, parts, bf16"
                results["backbone_bf16"] <- measure 1 repeats (bf (fun () -> use _ = torch.NewDisposeScope() in m.VisualEncoder.Backbone.Forward images |> ignore))
                results["pixel_decoder_bf16"] <- measure 1 repeats (bf (fun () -> use _ = torch.NewDisposeScope() in m.Head.PixelDecoder.Forward features |> ignore))
                results["transformer_decoder_bf16"] <-
                    measure 1 repeats (bf (fun () ->
                        use _ = torch.NewDisposeScope()
                        (m.Head.Predictor.Forward(audio, pix.MultiScaleFeatures, pix.MaskFeatures, auxiliary = false) :> IDisposable).Dispose()))
    // The official model, each case in a fresh process, same threads; then its full forward once more with the glibc
    // equivalent of our native heap settings, so that the report shows how much of the gap is the allocator.
    printfn "model: official (time_official.py)..."
    let official =
        timeOfficial false [ "--warmup"; "1"; "--runs"; string repeats; "--warmup-full"; "1"; "--runs-full"; string (max 2 (repeats - 1)) ]
    printfn "model: official full forward with our heap settings (time_official.py full_presam)..."
    let officialTuned =
        timeOfficial true [ "--cases"; "full_presam"; "--warmup-full"; "1"; "--runs-full"; string (max 2 (repeats - 1)) ]
        |> Map.tryFind "full_presam" |> Option.map fst |> Option.defaultValue nan
    printfn "model: official Swin-B 1/5 frames, with and without pre-SAM (swin_official.py)..."
    let swinOfficial = pythonJson "swin_official.py" [ string repeats ]
    let swinRows =
        [ for case, label in [ "swin_1", "Swin-B, 1 frame at 384"; "swin_5", "Swin-B, 5 frames at 384"
                               "presam_1", "Swin-B + pre-SAM branch (2 Swin-B + scale modules + fusion), 1 frame"
                               "presam_5", "Swin-B + pre-SAM branch, 5 frames" ] ->
              let (s, _) = results[case]
              let os = swinOfficial.GetProperty(case).GetDouble()
              $"| {label} | {s:F2} | {os:F2} | {s / os:F2} |" ]
    let labels =
        [ "full_presam", "full S4 forward, 5 frames at 384, pre-SAM on"
          "full_nopresam", "full S4 forward, 5 frames at 384, pre-SAM off"
          "backbone", "one Swin-B, 5 frames at 384"
          "pixel_decoder", "pixel decoder (5 frames)"
          "transformer_decoder", "VCT transformer decoder (5 frames)" ]
    let rows =
        [ for case, label in labels do
              let (s, mem) = results[case]
              let os, omem = defaultArg (official.TryFind case) (nan, nan)
              yield $"| {label} | {s:F2} | {os:F2} | {s / os:F2} | {mem:F0} | {omem:F0} |"
          // bf16 rows: ours under Precision.BFloat16 against the official float32 time of the same case.
          for case, label in labels do
              match results.TryGetValue(case + "_bf16") with
              | true, (s, mem) ->
                  let os, _ = defaultArg (official.TryFind case) (nan, nan)
                  let note = match agreements.TryGetValue(case + "_bf16") with | true, a -> $" (agreement with our float32 masks: {a})" | _ -> ""
                  yield $"| {label}, bf16{note} | {s:F2} | {os:F2} | {s / os:F2} | {mem:F0} | - |"
              | _ -> () ]
    let swinGflop = ProfileBench.swinFlops (VctConfig.Released Subset.S4).Swin frames 384L / 1e9
    let achieved key = match results.TryGetValue key with | true, (s, _) -> swinGflop / s | _ -> nan
    let a32, a16 = achieved "backbone", achieved "backbone_bf16"
    let gemmRow =
        $"GEMM peak (2048³ matmul, 2 threads): float32 {gemmF32:F0} GFLOP/s, bfloat16 {gemmBf16:F0} GFLOP/s. One Swin-B pass on 5 frames is "
        + $"{swinGflop:F0} GFLOP (2 × multiply-accumulates of its products): achieved {a32:F0} GFLOP/s in float32 "
        + $"({100.0 * a32 / gemmF32:F0}%% of the float32 peak), {a16:F0} GFLOP/s in bf16 ({100.0 * a16 / gemmBf16:F0}%% of the bf16 peak)."
    let md =
        String.concat "\n"
            [ "## Model forward, CPU (model issue, vision issue)"
              ""
              "Measured " + DateTime.UtcNow.ToString("yyyy-MM-dd") + " on " + machine () + $"; 1-min load average {loadBefore} before, {loadAverage ()} after; 2 LibTorch threads on both sides; official: the shared"
              "official-ref tool (`time_official.py`: official VCT code, Debian torch 1.13, OpenBLAS, each case in a fresh"
              "process) in the same run. Medians; random weights, eval mode, no gradients. Peak memory: ours is the .NET"
              "process's VmHWM during the timed runs (model already built), the official figure the child's peak RSS."
              $"Allocator: {heapNote ()}."
              ""
              "| case | ours (s) | official (s) | ours / official | ours peak (MiB) | official peak (MiB) |"
              "| --- | ---: | ---: | ---: | ---: | ---: |"
              yield! rows
              ""
              "bf16 rows: ours with `Precision.run Precision.BFloat16` (LibTorch CPU autocast: products in bfloat16, float32"
              "weights and outputs) against the official float32 time of the same case; the official code has no bf16 path."
              "Ours runs as `Segment.run` does: inference mode, the fused attention kernels (src/Vct.Core/Platform/Attention.fs),"
              "the gather kernel of the deformable attention (src/Vct.Core/PixelDecoder/MsDeformAttn.fs) and the decoder without"
              "auxiliary predictions (`auxiliary = false`: the same last prediction; the official eval forward computes all ten)."
              ""
              gemmRow
              ""
              (let ours, _ = results["full_presam"]
               let official, _ = defaultArg (official.TryFind "full_presam") (nan, nan)
               let vars = NativeHeap.equivalentEnvironment |> List.map (fun (k, v) -> k + "=" + v) |> String.concat " "
               $"The official full forward (pre-SAM on) with the glibc equivalent of our heap settings in its environment "
               + $"({vars}): {officialTuned:F2} s "
               + $"({officialTuned / official:F2}x its default time; ours / that = {ours / officialTuned:F2}).")
              ""
              "Backbone alone and with the pre-SAM branch (official side: `bench/python/swin_official.py`, same harness, same run):"
              ""
              "| case | ours (s) | official (s) | ours / official |"
              "| --- | ---: | ---: | ---: |"
              yield! swinRows ]
    writeSection "model" md
    printfn "%s" md
