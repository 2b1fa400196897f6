module Vct.Core.Tests.PixelDecoderTests

open System
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.PixelDecoder

let private config = { FsCheckConfig.defaultConfig with maxTest = 40 }
let private fewConfig = { FsCheckConfig.defaultConfig with maxTest = 6 }

/// Slow explicit version of MsDeformAttnCore.sample on flat row-major arrays: per query, head, level and point,
/// the continuous pixel coordinate is loc·size − 0.5 and each of the 4 bilinear taps inside the map adds
/// weight·tap·value. value: [N, S, M, D]; loc: [N, Lq, M, L, P, 2]; wts: [N, Lq, M, L, P] -> [N, Lq, M*D]
let slowSample (value: float32[]) (n: int, m: int, d: int) (shapes: (int64 * int64)[]) (loc: float32[]) (wts: float32[]) (lq: int, p: int) =
    let l = shapes.Length
    let s = shapes |> Array.sumBy (fun (h, w) -> int (h * w))
    let starts = MsDeformAttnCore.levelStartIndex shapes
    let out = Array.zeroCreate<float> (n * lq * m * d)
    for b in 0 .. n - 1 do
        for q in 0 .. lq - 1 do
            for h in 0 .. m - 1 do
                for lv in 0 .. l - 1 do
                    let hh, ww = shapes[lv]
                    for pt in 0 .. p - 1 do
                        let wi = (((b * lq + q) * m + h) * l + lv) * p + pt
                        let x = float loc[2 * wi] * float ww - 0.5
                        let y = float loc[2 * wi + 1] * float hh - 0.5
                        let x0, y0 = floor x, floor y
                        let a = float wts[wi]
                        for dy in 0 .. 1 do
                            for dx in 0 .. 1 do
                                let xi, yi = int x0 + dx, int y0 + dy
                                if xi >= 0 && yi >= 0 && int64 xi < ww && int64 yi < hh then
                                    let tap = (if dx = 1 then x - x0 else 1.0 - (x - x0)) * (if dy = 1 then y - y0 else 1.0 - (y - y0))
                                    let sIdx = int starts[lv] + yi * int ww + xi
                                    for c in 0 .. d - 1 do
                                        let o = (b * lq + q) * (m * d) + h * d + c
                                        out[o] <- out[o] + a * tap * float value[((b * s + sIdx) * m + h) * d + c]
    out

[<Tests>]
let core =
    testList "Vision.PixelDecoder.MsDeformAttnCore" [
        testPropertyWithConfig config "grid_sample core equals explicit bilinear sampling (zeros outside)" <|
            fun (seed: int) (nl: int) (mh: int) (dd: int) (pp: int) (qq: int) ->
                let rnd = Random(seed)
                let l = abs nl % 3 + 1
                let m, d, p, lq = int64 (abs mh % 3 + 1), int64 (abs dd % 4 + 1), int64 (abs pp % 3 + 1), int64 (abs qq % 5 + 1)
                let shapes = Array.init l (fun _ -> int64 (rnd.Next(1, 7)), int64 (rnd.Next(1, 7)))
                let s = shapes |> Array.sumBy (fun (h, w) -> h * w)
                use _ = torch.NewDisposeScope()
                torch.manual_seed (int64 seed) |> ignore
                let n = 2L
                let value = torch.randn(n, s, m, d)
                let loc = torch.rand([| n; lq; m; int64 l; p; 2L |]) * 1.6f.ToScalar() - 0.3f.ToScalar()   // many taps outside
                let wts = torch.rand([| n; lq; m; int64 l; p |])
                let fast = MsDeformAttnCore.sample value shapes loc wts                              // [N, Lq, M*D]
                let slow =
                    slowSample (value.data<float32>().ToArray()) (int n, int m, int d) shapes (loc.data<float32>().ToArray())
                               (wts.data<float32>().ToArray()) (int lq, int p)
                let fa = fast.data<float32>().ToArray()
                Expect.equal fa.Length slow.Length "output size"
                for i in 0 .. fa.Length - 1 do
                    let f, e = float fa[i], slow[i]
                    if abs (f - e) > 1e-4 + 1e-4 * abs e then failtest $"element {i}: fast {f}, slow {e} (shapes {shapes})"

        testPropertyWithConfig config "inference path (chunked per-level sums) equals the stacked reference sum" <|
            fun (seed: int) (nl: int) (qq: int) (chunk: int) ->
                let rnd = Random(seed)
                let l = abs nl % 3 + 1
                let m, d, p, lq = 2L, 3L, 2L, int64 (abs qq % 9 + 1)
                let shapes = Array.init l (fun _ -> int64 (rnd.Next(1, 7)), int64 (rnd.Next(1, 7)))
                let s = shapes |> Array.sumBy (fun (h, w) -> h * w)
                use _ = torch.NewDisposeScope()
                torch.manual_seed (int64 seed) |> ignore
                let n = 2L
                let value = torch.randn(n, s, m, d)
                let loc = torch.rand([| n; lq; m; int64 l; p; 2L |]) * 1.6f.ToScalar() - 0.3f.ToScalar()
                let wts = torch.rand([| n; lq; m; int64 l; p |])
                let reference = MsDeformAttnCore.sampleWith true value shapes loc wts
                let saved = MsDeformAttnCore.sampleChunkElements
                // chunks of 1 .. 4 queries, so that several chunks and a partial last one are exercised
                MsDeformAttnCore.sampleChunkElements <- n * m * d * p * int64 (abs chunk % 4 + 1)
                let fast =
                    try
                        use _ = torch.no_grad ()
                        MsDeformAttnCore.sample value shapes loc wts
                    finally MsDeformAttnCore.sampleChunkElements <- saved
                Expect.isTrue (fast.allclose(reference, rtol = 1e-5, atol = 1e-6)) $"max diff {(fast - reference).abs().max().item<float32>()}"

        test "level start index" {
            Expect.sequenceEqual (MsDeformAttnCore.levelStartIndex [| 12L, 12L; 24L, 24L; 48L, 48L |]) [| 0L; 144L; 720L |] "Swin-B 384"
        }

        test "reset parameters: offsets point along 8 head directions scaled by p + 1; uniform attention weights" {
            use m = new MSDeformAttn({ DModel = 256L; Levels = 3L; Heads = 8L; Points = 4L })
            let sd = m.state_dict()
            let bias = sd["sampling_offsets.bias"].view(8L, 3L, 4L, 2L)
            let b = bias.data<float32>().ToArray()
            // head 0: (1, 0); head 2: (0, 1) up to float error; head 1: (1, 1); point p scales by p + 1
            let at h l p c = b[((h * 3 + l) * 4 + p) * 2 + c]
            Expect.floatClose Accuracy.high (float (at 0 1 3 0)) 4.0 "head 0, point 3, x"
            Expect.floatClose Accuracy.high (float (at 1 2 1 0)) 2.0 "head 1, point 1, x"
            Expect.floatClose Accuracy.high (float (at 1 2 1 1)) 2.0 "head 1, point 1, y"
            Expect.isLessThan (abs (float (at 2 0 0 0))) 1e-6 "head 2 x ~ 0"
            Expect.isTrue (sd["sampling_offsets.weight"].eq(0.0f.ToScalar()).all().item<bool>()) "offset weights 0"
            use _ = torch.NewDisposeScope()
            let q = torch.randn(1L, 5L, 256L)
            let refs = torch.rand(1L, 5L, 3L, 2L)
            let _, w = m.Locations(q, refs, [| 2L, 2L; 3L, 3L; 4L, 4L |])
            Expect.isTrue (w.allclose(torch.full([| 1L; 5L; 8L; 3L; 4L |], (1.0f / 12.0f).ToScalar()))) "softmax of zeros"
        }
    ]

[<Tests>]
let decoder =
    testList "Vision.PixelDecoder" [
        testPropertyWithConfig fewConfig "Tiny: shapes of mask features and multi-scale maps for random input sizes" <|
            fun (h: int) (w: int) (seed: int) ->
                let h, w = int64 (abs h % 80 + 20), int64 (abs w % 80 + 20)
                use _ = torch.NewDisposeScope()
                use _ = torch.no_grad ()
                torch.manual_seed (int64 seed) |> ignore
                use swin = new SwinTransformer(SwinConfig.Tiny)
                use pd = new MSDeformAttnPixelDecoder(PixelDecoderConfig.Tiny)
                swin.eval()
                pd.eval()
                let feats = swin.Forward (torch.randn(1L, 3L, h, w))
                let out = pd.Forward feats
                let c = PixelDecoderConfig.Tiny.ConvDim
                Expect.sequenceEqual out.MaskFeatures.shape [| 1L; PixelDecoderConfig.Tiny.MaskDim; feats[0].shape[2]; feats[0].shape[3] |] "mask features at 1/4"
                Expect.equal out.MultiScaleFeatures.Length 3 "three levels"
                for i in 0 .. 2 do
                    let f = feats[3 - i]
                    Expect.sequenceEqual out.MultiScaleFeatures[i].shape [| 1L; c; f.shape[2]; f.shape[3] |] $"level {i} (coarse to fine)"
                Expect.isTrue (VisionGolden.same out.EncoderFeatures out.MultiScaleFeatures[0]) "encoder features = coarsest map"
                Expect.isTrue (out.MaskFeatures.isfinite().all().item<bool>()) "finite"

        test "init per reference: input_proj bias 0, level_embed ~ N(0,1), FPN convs without bias" {
            use pd = new MSDeformAttnPixelDecoder(PixelDecoderConfig.SwinB384)
            let sd = pd.state_dict()
            for k in 0 .. 2 do
                Expect.isTrue (sd[$"input_proj.{k}.0.bias"].eq(0.0f.ToScalar()).all().item<bool>()) $"input_proj.{k} bias 0"
            Expect.isFalse (sd.ContainsKey "adapter_1.bias") "adapter_1 has no bias"
            for k in [ "input_proj.0.1"; "input_proj.1.1"; "input_proj.2.1"; "adapter_1.norm"; "layer_1.norm" ] do
                Expect.isTrue (sd[k + ".weight"].eq(1.0f.ToScalar()).all().item<bool>()) $"{k} GroupNorm weight 1"
                Expect.isTrue (sd[k + ".bias"].eq(0.0f.ToScalar()).all().item<bool>()) $"{k} GroupNorm bias 0"
            Expect.isTrue (sd["mask_features.bias"].eq(0.0f.ToScalar()).all().item<bool>()) "mask_features bias 0"
            let le = sd["transformer.level_embed"]
            Expect.isLessThan (abs (le.mean().item<float32>())) 0.2f "level_embed mean ~ 0"
            Expect.isLessThan (abs (le.std().item<float32>() - 1.0f)) 0.2f "level_embed std ~ 1"
            let w = sd["adapter_1.weight"]
            let bound = sqrt (3.0f / 128.0f)   // kaiming_uniform a = 1: U(-sqrt(3 / fan_in), +)
            Expect.isLessThanOrEqual (w.abs().max().item<float32>()) (bound + 1e-6f) "c2_xavier_fill bound"
        }
    ]
