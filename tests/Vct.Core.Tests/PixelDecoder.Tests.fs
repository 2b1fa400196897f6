/// Tests of src/Vct.Core/PixelDecoder: the sine position embedding, multi-scale deformable attention (its sampling
/// core against an explicit loop, and the official goldens), the encoder and the whole pixel decoder.
module Vct.Core.Tests.PixelDecoderTests

open System
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone
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

/// The sampling `kernel` against `slowSample` on random sizes; locations uniform in [−below, spread − below].
let private checkAgainstSlow (kernel: Tensor -> (int64 * int64)[] -> Tensor -> Tensor -> Tensor) (spread: float32) (below: float32)
                             (seed: int) (nl: int) (mh: int) (dd: int) (pp: int) (qq: int) =
    let rnd = Random(seed)
    let l = abs nl % 3 + 1
    let m, d, p, lq = int64 (abs mh % 3 + 1), int64 (abs dd % 4 + 1), int64 (abs pp % 3 + 1), int64 (abs qq % 5 + 1)
    let shapes = Array.init l (fun _ -> int64 (rnd.Next(1, 7)), int64 (rnd.Next(1, 7)))
    let s = shapes |> Array.sumBy (fun (h, w) -> h * w)
    use _ = torch.NewDisposeScope()
    torch.manual_seed (int64 seed) |> ignore
    let n = 2L
    let value = torch.randn(n, s, m, d)
    let loc = torch.rand([| n; lq; m; int64 l; p; 2L |]) * spread.ToScalar() - below.ToScalar()   // many taps outside
    let wts = torch.rand([| n; lq; m; int64 l; p |])
    let fast = kernel value shapes loc wts                                                     // [N, Lq, M*D]
    let slow =
        slowSample (value.data<float32>().ToArray()) (int n, int m, int d) shapes (loc.data<float32>().ToArray())
                   (wts.data<float32>().ToArray()) (int lq, int p)
    let fa = fast.data<float32>().ToArray()
    Expect.equal fa.Length slow.Length "output size"
    for i in 0 .. fa.Length - 1 do
        let f, e = float fa[i], slow[i]
        if abs (f - e) > 1e-4 + 1e-4 * abs e then failtest $"element {i}: fast {f}, slow {e} (shapes {shapes})"

[<Tests>]
let core =
    testList "Vision.PixelDecoder.MsDeformAttnCore" [
        testPropertyWithConfig config "grid_sample core equals explicit bilinear sampling (zeros outside)" <|
            fun (seed: int) (nl: int) (mh: int) (dd: int) (pp: int) (qq: int) ->
                checkAgainstSlow (MsDeformAttnCore.sampleWith true) 1.6f 0.3f seed nl mh dd pp qq

        testPropertyWithConfig config "gather kernel equals explicit bilinear sampling (zeros outside)" <|
            fun (seed: int) (nl: int) (mh: int) (dd: int) (pp: int) (qq: int) ->
                checkAgainstSlow MsDeformAttnCore.sampleGather 1.6f 0.3f seed nl mh dd pp qq

        testPropertyWithConfig config "gather kernel: locations far outside the maps read zeros, as grid_sample" <|
            fun (seed: int) (nl: int) (mh: int) (dd: int) (pp: int) (qq: int) ->
                checkAgainstSlow MsDeformAttnCore.sampleGather 7.0f 3.0f seed nl mh dd pp qq

        testPropertyWithConfig fewConfig "gather kernel: gradients for value, locations and weights equal grid_sample's" <|
            fun (seed: int) (nl: int) (qq: int) ->
                let rnd = Random(seed)
                let l = abs nl % 3 + 1
                let m, d, p, lq = 2L, 3L, 2L, int64 (abs qq % 6 + 1)
                let shapes = Array.init l (fun _ -> int64 (rnd.Next(1, 6)), int64 (rnd.Next(1, 6)))
                let s = shapes |> Array.sumBy (fun (h, w) -> h * w)
                use _ = torch.NewDisposeScope()
                torch.manual_seed (int64 seed) |> ignore
                let n = 2L
                let value0 = torch.randn(n, s, m, d)
                // random coordinates are almost surely off the integer pixel positions where the location gradients jump
                let loc0 = torch.rand([| n; lq; m; int64 l; p; 2L |]) * 1.6f.ToScalar() - 0.3f.ToScalar()
                let wts0 = torch.rand([| n; lq; m; int64 l; p |])
                let upstream = torch.randn(n, lq, m * d)
                let grads (kernel: Tensor -> (int64 * int64)[] -> Tensor -> Tensor -> Tensor) =
                    let value = value0.clone().requires_grad_(true)
                    let loc = loc0.clone().requires_grad_(true)
                    let wts = wts0.clone().requires_grad_(true)
                    let out = kernel value shapes loc wts
                    (out * upstream).sum().backward()
                    out.detach(), value.grad.clone(), loc.grad.clone(), wts.grad.clone()
                let o1, v1, l1, w1 = grads (MsDeformAttnCore.sampleWith true)
                let o2, v2, l2, w2 = grads MsDeformAttnCore.sampleGather
                let close name (a: Tensor) (b: Tensor) =
                    Expect.isTrue (a.allclose(b, rtol = 1e-4, atol = 1e-5)) $"{name}: max diff {(a - b).abs().max().item<float32>()}"
                close "output" o1 o2
                close "d value" v1 v2
                close "d locations" l1 l2
                close "d weights" w1 w2

        test "gather kernel under bf16 autocast returns the value dtype" {
            use _ = torch.NewDisposeScope()
            use _ = torch.inference_mode ()
            let shapes = [| 3L, 4L; 2L, 2L |]
            let value = torch.randn(1L, 16L, 2L, 4L)
            let loc = torch.rand([| 1L; 5L; 2L; 2L; 3L; 2L |])
            let wts = torch.rand([| 1L; 5L; 2L; 2L; 3L |])
            let f32 = MsDeformAttnCore.sampleGather value shapes loc wts
            let b16 = MsDeformAttnCore.sampleGather (value.to_type(torch.bfloat16)) shapes loc wts
            Expect.equal b16.dtype torch.bfloat16 "dtype of a bf16 value"
            Expect.isTrue (b16.to_type(torch.float32).allclose(f32, rtol = 2e-2, atol = 2e-2)) "bf16 close to float32"
        }

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
                        MsDeformAttnCore.sampleWith false value shapes loc wts
                    finally MsDeformAttnCore.sampleChunkElements <- saved
                Expect.isTrue (fast.allclose(reference, rtol = 1e-5, atol = 1e-6)) $"max diff {(fast - reference).abs().max().item<float32>()}"

        testPropertyWithConfig fewConfig "MSDeformAttn inference (gather in pixel coordinates) equals the reference grid_sample forward" <|
            fun (seed: int) ->
                let rnd = Random(seed)
                use _ = torch.NewDisposeScope()
                torch.manual_seed (int64 seed) |> ignore
                let shapes = Array.init 2 (fun _ -> int64 (rnd.Next(1, 8)), int64 (rnd.Next(1, 8)))
                let s = shapes |> Array.sumBy (fun (h, w) -> h * w)
                use m = new MSDeformAttn({ DModel = 16L; Levels = 2L; Heads = 2L; Points = 3L })
                // offsets of a few pixels in every direction, so that points leave the maps too
                for KeyValue(name, prm) in m.state_dict () do
                    if name.StartsWith "sampling_offsets" || name.StartsWith "attention_weights" then
                        use _ = torch.no_grad ()
                        prm.copy_(torch.randn_like prm * 2.0f.ToScalar()) |> ignore
                let n, lq = 2L, 7L
                let query, input = torch.randn(n, lq, 16L), torch.randn(n, s, 16L)
                let reference = torch.rand(n, lq, 2L, 2L) * 1.4f.ToScalar() - 0.2f.ToScalar()
                let slow = m.Forward(query, reference, input, shapes, None).detach()    // autograd on: grid_sample
                let fast =
                    use _ = torch.no_grad ()
                    m.Forward(query, reference, input, shapes, None)
                Expect.isTrue (fast.allclose(slow, rtol = 1e-4, atol = 1e-5)) $"max diff {(fast - slow).abs().max().item<float32>()}"

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
                Expect.isTrue (Golden.same out.EncoderFeatures out.MultiScaleFeatures[0]) "encoder features = coarsest map"
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

[<Tests>]
let pixelDecoderGolden =
    testList "Vision.Golden.PixelDecoder" [
        test "comp_position_embedding_sine: three shapes" {
            use g = Golden.vision "comp_position_embedding_sine.pt"
            for i in 0 .. 2 do
                let shape = g[$"in.shape{i}"].data<int64>().ToArray()
                use x = torch.zeros(shape)
                use pos = PositionEmbedding.sine 128L x
                Golden.expectClose $"pos{i}" g[$"out.pos{i}"] pos
        }

        test "comp_msdeformattn: locations, weights and output (with padding mask)" {
            use g = Golden.vision "comp_msdeformattn.pt"
            use m = new MSDeformAttn({ DModel = 256L; Levels = 3L; Heads = 8L; Points = 4L })
            Golden.loadWeights (g.Weights()) (fun _ -> false) m
            m.eval()
            use _ = torch.no_grad ()
            let shapesT = g["in.input_spatial_shapes"].data<int64>().ToArray()
            let shapes = Array.init 3 (fun l -> shapesT[2 * l], shapesT[2 * l + 1])
            let loc, wts = m.Locations(g["in.query"], g["in.reference_points"], shapes)
            Golden.expectClose "sampling_locations" g["out.debug.sampling_locations"] loc
            Golden.expectClose "attention_weights" g["out.debug.attention_weights"] wts
            let out = m.Forward(g["in.query"], g["in.reference_points"], g["in.input_flatten"], shapes, Some g["in.input_padding_mask"])
            Golden.expectClose "output" g["out.output"] out
        }

        test "vision_encoder_layer: one deformable encoder layer" {
            use g = Golden.vision "vision_encoder_layer.pt"
            use layer = new MSDeformAttnEncoderLayer({ Attention = { DModel = 64L; Levels = 3L; Heads = 4L; Points = 4L }; DimFeedforward = 128L; Dropout = 0.0; Layers = 1 })
            Golden.loadWeights (g.Weights()) (fun _ -> false) layer
            layer.eval()
            use _ = torch.no_grad ()
            let shapesT = g["in.spatial_shapes"].data<int64>().ToArray()
            let shapes = Array.init 3 (fun l -> shapesT[2 * l], shapesT[2 * l + 1])
            use refs = MSDeformAttnEncoder.ReferencePoints(shapes, 2L, torch.CPU)
            Golden.expectClose "reference points" g["in.reference_points"] refs
            let out = layer.Forward(g["in.src"], g["in.pos"], refs, shapes, None)
            Golden.expectClose "layer output" g["out.out"] out
        }

        test "vision_pixel_decoder: mask features, encoder features and the three multi-scale maps" {
            use g = Golden.vision "vision_pixel_decoder.pt"
            let cfg =
                { PixelDecoderConfig.SwinB384 with
                    InChannels = [| 16L; 32L; 64L; 128L |]; ConvDim = 64L; MaskDim = 64L; NumHeads = 4L; EncLayers = 2
                    DimFeedforward = 128L }
            use m = new MSDeformAttnPixelDecoder(cfg)
            Golden.loadWeights (g.Weights()) (fun _ -> false) m
            m.eval()
            use _ = torch.no_grad ()
            let out = m.Forward [| g["in.res2"]; g["in.res3"]; g["in.res4"]; g["in.res5"] |]
            Golden.expectClose "mask_features" g["out.mask_features"] out.MaskFeatures
            Golden.expectClose "encoder features" g["out.encoder_features"] out.EncoderFeatures
            for i in 0 .. 2 do
                Golden.expectClose $"multi_scale{i}" g[$"out.multi_scale{i}"] out.MultiScaleFeatures[i]
        }
    ]

[<Tests>]
let stateDict =
    testList "Vision.StateDict" [
        test "sem_seg_head.pixel_decoder matches the official manifests" {
            use pd = new MSDeformAttnPixelDecoder(PixelDecoderConfig.SwinB384)
            for subset in [ "s4"; "ms3"; "avss" ] do
                Golden.expectSameRows $"{subset} pixel decoder" (Golden.manifestRows subset "sem_seg_head.pixel_decoder.") (Golden.stateDictRows "" pd)
        }
    ]
