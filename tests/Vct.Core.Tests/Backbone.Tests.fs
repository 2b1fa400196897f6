/// Tests of src/Vct.Core/Backbone: window partition and shift masks, the Swin transformer against the official
/// goldens, padding, stochastic depth, ImageNet weights.
module Vct.Core.Tests.BackboneTests

open System
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone

let private config = { FsCheckConfig.defaultConfig with maxTest = 40 }
let private fewConfig = { FsCheckConfig.defaultConfig with maxTest = 8 }

let swinConfigOfCompSwin =
    { SwinConfig.SwinB384 with
        EmbedDim = 32L; Depths = [| 2; 2 |]; NumHeads = [| 1L; 2L |]; WindowSize = 12L; OutIndices = [| 0; 1 |] }

let swinConfigOfPad =
    { SwinConfig.SwinB384 with
        EmbedDim = 8L; Depths = [| 2; 2; 2; 2 |]; NumHeads = [| 1L; 1L; 2L; 2L |]; WindowSize = 7L }

let isRelIndex (k: string) = k.EndsWith(".relative_position_index", StringComparison.Ordinal)

[<Tests>]
let swinGolden =
    testList "Vision.Golden.Swin" [
        test "comp_swin: full reduced backbone (res2, res3)" {
            use g = Golden.vision "comp_swin.pt"
            use m = new SwinTransformer(swinConfigOfCompSwin)
            Golden.loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            let outs = m.Forward g["in.x"]
            Golden.expectClose "res2" g["out.res2"] outs[0]
            Golden.expectClose "res3" g["out.res3"] outs[1]
        }

        test "comp_swin: block without shift (layer0.block0) and patch embedding" {
            use g = Golden.vision "comp_swin.pt"
            use m = new SwinTransformer(swinConfigOfCompSwin)
            Golden.loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let emb = m.PatchEmbed.Forward g["in.x"]                                        // [1, 32, 24, 24]
            let tokens = emb.flatten(2L).transpose(1L, 2L)
            let blk = m.Layers[0].Blocks[0]
            Expect.equal blk.ShiftSize 0L "block 0 is not shifted"
            let mask = Windows.shiftMask 24L 24L 12L 6L tokens.device
            Golden.expectClose "layer0.block0" g["out.debug.layer0.block0"] (blk.Forward(tokens, 24L, 24L, mask))
        }

        test "comp_swin: shifted block (layer0.block1, 2x2 windows) from the official block0 output" {
            use g = Golden.vision "comp_swin.pt"
            use m = new SwinTransformer(swinConfigOfCompSwin)
            Golden.loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let blk = m.Layers[0].Blocks[1]
            Expect.equal blk.ShiftSize 6L "block 1 is shifted by ws/2"
            let mask = Windows.shiftMask 24L 24L 12L 6L torch.CPU
            Golden.expectClose "layer0.block1" g["out.debug.layer0.block1"] (blk.Forward(g["out.debug.layer0.block0"], 24L, 24L, mask))
        }

        test "comp_swin: whole stage 1 (merging + plain + shifted block on one 12x12 window)" {
            use g = Golden.vision "comp_swin.pt"
            use m = new SwinTransformer(swinConfigOfCompSwin)
            Golden.loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let down = m.Layers[0].Downsample.Value.Forward(g["out.debug.layer0.block1"], 24L, 24L)   // [1, 144, 64]
            let out, _, _, _, _, _ = m.Layers[1].Forward(down, 12L, 12L)
            Golden.expectClose "layer1.block1" g["out.debug.layer1.block1"] out
            let b0 = m.Layers[1].Blocks[0].Forward(down, 12L, 12L, Windows.shiftMask 12L 12L 12L 6L torch.CPU)
            Golden.expectClose "layer1.block0" g["out.debug.layer1.block0"] b0
        }

        test "vision_swin_pad: four stages on 70x101 (padding in patch embed, windows and merging) + index buffers" {
            use g = Golden.vision "vision_swin_pad.pt"
            use m = new SwinTransformer(swinConfigOfPad)
            let w = g.Weights()
            // the official relative_position_index buffers equal ours before loading
            let sd = m.state_dict()
            for kv in w do
                if isRelIndex kv.Key then
                    Expect.isTrue (Golden.same sd[kv.Key] kv.Value) $"{kv.Key} equals the official buffer"
            Golden.loadWeights w (fun _ -> false) m
            m.eval()
            use _ = torch.no_grad ()
            let outs = m.Forward g["in.x"]
            for i in 0 .. 3 do
                Golden.expectClose $"res{i + 2}" g[$"out.res{i + 2}"] outs[i]
        }
    ]

[<Tests>]
let windows =
    testList "Vision.Backbone.Windows" [
        testPropertyWithConfig config "partition and reverse are inverses" <|
            fun (b: int) (ws: int) (nh: int) (nw: int) (c: int) (seed: int) ->
                let b, ws, nh, nw, c = int64 (abs b % 2 + 1), int64 (abs ws % 5 + 1), int64 (abs nh % 3 + 1), int64 (abs nw % 3 + 1), int64 (abs c % 4 + 1)
                use _ = torch.NewDisposeScope()
                torch.manual_seed (int64 seed) |> ignore
                let x = torch.randn(b, nh * ws, nw * ws, c)
                let wins = Windows.partition ws x
                Expect.sequenceEqual wins.shape [| b * nh * nw; ws; ws; c |] "window shape"
                Expect.isTrue (Golden.same (Windows.reverse ws (nh * ws) (nw * ws) wins) x) "reverse (partition x) = x"
                let y = torch.randn(b * nh * nw, ws, ws, c)
                Expect.isTrue (Golden.same (Windows.partition ws (Windows.reverse ws (nh * ws) (nw * ws) y)) y) "partition (reverse w) = w"
                // window k holds rows/cols of block (k / nw, k % nw), row-major
                let k = (nh * nw) - 1L
                let expected = x[0L].narrow(0L, (k / nw) * ws, ws).narrow(1L, (k % nw) * ws, ws)
                Expect.isTrue (Golden.same wins[k] expected) "last window is the bottom-right block"

        testPropertyWithConfig config "shift mask never lets tokens of different regions attend, and allows all others" <|
            fun (ws: int) (kh: int) (kw: int) (s: int) ->
                let ws = int64 (abs ws % 6 + 2)
                let hp, wp = ws * int64 (abs kh % 3 + 1), ws * int64 (abs kw % 3 + 1)
                let shift = int64 (abs s % int (ws - 1L)) + 1L
                use _ = torch.NewDisposeScope()
                let mask = Windows.shiftMask hp wp ws shift torch.CPU                       // [nW, N, N]
                let nW = (hp / ws) * (wp / ws)
                Expect.sequenceEqual mask.shape [| nW; ws * ws; ws * ws |] "mask shape"
                let m = mask.data<float32>().ToArray()
                // After the cyclic shift by -shift, rows >= hp - shift (cols >= wp - shift) came round from the top (left).
                let region (win: int64) (t: int64) =
                    let r = (win / (wp / ws)) * ws + t / ws
                    let c = (win % (wp / ws)) * ws + t % ws
                    (r >= hp - shift), (c >= wp - shift)
                let nn = ws * ws
                for win in 0L .. nW - 1L do
                    for i in 0L .. nn - 1L do
                        for j in 0L .. nn - 1L do
                            let v = m[int (win * nn * nn + i * nn + j)]
                            let sameRegion = region win i = region win j
                            if sameRegion && v <> 0.0f then failtest $"window {win}: tokens {i}, {j} of one region masked ({v})"
                            if not sameRegion && v <> -100.0f then failtest $"window {win}: tokens {i}, {j} of different regions not masked ({v})"

        test "relative position index is (y1-y2+ws-1)(2ws-1) + (x1-x2+ws-1)" {
            for ws in [ 1L; 3L; 7L; 12L ] do
                use idx = Windows.relativePositionIndex ws
                Expect.equal idx.dtype torch.int64 "int64 buffer"
                let a = idx.data<int64>().ToArray()
                let n = ws * ws
                for i in 0L .. n - 1L do
                    for j in 0L .. n - 1L do
                        let e = (i / ws - j / ws + ws - 1L) * (2L * ws - 1L) + (i % ws - j % ws + ws - 1L)
                        if a[int (i * n + j)] <> e then failtest $"ws {ws}: index[{i},{j}] = {a[int (i * n + j)]}, expected {e}"
        }
    ]

let private tiny = lazy (let m = new SwinTransformer(SwinConfig.Tiny) in m.eval(); m)

[<Tests>]
let swin =
    testList "Vision.Backbone.Swin" [
        testPropertyWithConfig fewConfig "Tiny: output shapes for random input sizes (ceil of the strides)" <|
            fun (h: int) (w: int) (seed: int) ->
                let h, w = int64 (abs h % 90 + 5), int64 (abs w % 90 + 5)
                use _ = torch.NewDisposeScope()
                use _ = torch.no_grad ()
                torch.manual_seed (int64 seed) |> ignore
                let outs = tiny.Value.Forward (torch.randn(2L, 3L, h, w))
                Expect.equal outs.Length 4 "res2..res5"
                let mutable eh, ew = (h + 3L) / 4L, (w + 3L) / 4L
                for i in 0 .. 3 do
                    Expect.sequenceEqual outs[i].shape [| 2L; SwinConfig.Tiny.StageDim i; eh; ew |] $"res{i + 2} for {h}x{w}"
                    Expect.isTrue (outs[i].isfinite().all().item<bool>()) "finite"
                    eh <- (eh + 1L) / 2L
                    ew <- (ew + 1L) / 2L

        test "ImagePadding.toDivisible pads bottom/right with zeros to a multiple of 32" {
            use _ = torch.NewDisposeScope()
            let x = torch.randn(2L, 3L, 50L, 64L)
            let p = ImagePadding.toDivisible 32L x
            Expect.sequenceEqual p.shape [| 2L; 3L; 64L; 64L |] "padded shape"
            Expect.isTrue (Golden.same (p.narrow(2L, 0L, 50L)) x) "top-left is the input"
            Expect.isTrue (p.narrow(2L, 50L, 14L).eq(0.0f.ToScalar()).all().item<bool>()) "zeros below"
            Expect.isTrue (obj.ReferenceEquals(ImagePadding.toDivisible 32L p, p)) "no copy when divisible"
        }

        test "SwinB384 strides and channels" {
            Expect.sequenceEqual SwinConfig.SwinB384.OutChannels [| 128L; 256L; 512L; 1024L |] "channels"
            Expect.sequenceEqual SwinConfig.SwinB384.OutStrides [| 4L; 8L; 16L; 32L |] "strides"
        }

        test "drop path: identity in eval mode, per-sample zero-or-scaled in training" {
            use _ = torch.NewDisposeScope()
            let x = torch.ones(64L, 3L, 5L)
            Expect.isTrue (Golden.same (DropPath.apply 0.3 false None x) (x)) "eval: identity"
            let y = DropPath.apply 0.5 true (Some(new torch.Generator(1UL))) x
            let perSample = y.view(64L, -1L)
            let first = perSample.select(1L, 0L)
            Expect.isTrue (perSample.eq(first.unsqueeze(1L)).all().item<bool>()) "one decision per sample"
            let vals = first.data<float32>().ToArray()
            Expect.isTrue (vals |> Array.forall (fun v -> v = 0.0f || abs (v - 2.0f) < 1e-6f)) "0 or 1/keep"
            Expect.isTrue (vals |> Array.exists ((=) 0.0f) && vals |> Array.exists ((<>) 0.0f)) "some kept, some dropped"
        }

        test "training mode runs with stochastic depth and back-propagates" {
            use m = new SwinTransformer(SwinConfig.Tiny, new torch.Generator(3UL))
            m.train()
            use _ = torch.NewDisposeScope()
            let outs = m.Forward (torch.randn(2L, 3L, 33L, 47L))
            let loss = outs |> Array.map (fun t -> t.square().mean()) |> Array.reduce (+)
            loss.backward()
            let grads = m.parameters() |> Seq.filter (fun p -> not (isNull p.grad)) |> Seq.length
            Expect.isGreaterThan grads 0 "gradients reach the parameters"
        }
    ]

[<Tests>]
let imageNet =
    testList "Vision.Backbone.ImageNet" [
        test "original classification key layout loads like the reference (norm0..3 untouched, head/norm/attn_mask unused)" {
            let cfg = { swinConfigOfPad with NumHeads = [| 1L; 1L; 2L; 2L |]; EmbedDim = 8L; DropPathRate = 0.2 }
            use m = new SwinTransformer(cfg)
            let reports = SwinPretrained.loadImageNet (Golden.path [ "vision"; "vision_swin_imagenet.pth" ]) [ m ]
            let r = List.exactlyOne reports
            Expect.sequenceEqual (List.sort r.NotInCheckpoint)
                (List.sort [ for i in 0 .. 3 do for p in [ "weight"; "bias" ] -> $"norm{i}.{p}" ]) "only norm0..3 missing"
            Expect.isTrue (r.Loaded |> List.forall (fun (k, c) -> k = c)) "keys map to themselves"
            let unused = List.sort r.Unused
            Expect.containsAll unused [ "head.weight"; "head.bias"; "norm.weight"; "norm.bias" ] "classifier and final norm unused"
            Expect.isTrue (unused |> List.forall (fun k -> k.StartsWith "head." || k.StartsWith "norm." || k.EndsWith ".attn_mask")) "nothing else unused"
            Expect.equal (unused |> List.filter (fun k -> k.EndsWith ".attn_mask")).Length 4 "the 4 attn_mask buffers"
            // values: file tensors copied exactly; norms at LayerNorm defaults
            use file = Vct.Core.Checkpoint.StateDict.load (Golden.path [ "vision"; "vision_swin_imagenet.pth" ])
            let sd = m.state_dict()
            for k, c in r.Loaded do Expect.isTrue (Golden.same sd[k] file.StateDict[c]) $"{k} copied"
            Expect.isTrue (sd["norm2.weight"].eq(1.0f.ToScalar()).all().item<bool>()) "norm2 weight stays 1"
            // the official forward after the same load
            use g = Golden.vision "vision_swin_imagenet_expected.pt"
            m.eval()
            use _ = torch.no_grad ()
            let outs = m.Forward g["in.x"]
            for i in 0 .. 3 do Golden.expectClose $"res{i + 2}" g[$"out.res{i + 2}"] outs[i]
        }

        test "both Swin copies (backbone, pre_sam_backbone) start from the same ImageNet weights" {
            let cfg = { swinConfigOfPad with EmbedDim = 8L; NumHeads = [| 1L; 1L; 2L; 2L |] }
            use rgb = new SwinTransformer(cfg)
            use pre = new SwinTransformer(cfg)
            let reports = SwinPretrained.loadImageNet (Golden.path [ "vision"; "vision_swin_imagenet.pth" ]) [ rgb; pre ]
            Expect.equal reports.Length 2 "two reports"
            let a = rgb.state_dict()
            let b = pre.state_dict()
            for kv in a do
                if not (kv.Key.StartsWith "norm") then Expect.isTrue (Golden.same kv.Value b[kv.Key]) $"{kv.Key} equal in both"
        }
    ]
