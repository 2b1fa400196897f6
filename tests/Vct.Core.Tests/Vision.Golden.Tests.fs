module Vct.Core.Tests.VisionGolden

open System
open System.Collections.Generic
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.PixelDecoder

/// tests/golden (shared helpers in Golden.fs).
let goldenRoot = Golden.root

/// Same shape and identical values.
let same (a: Tensor) (b: Tensor) = a.shape = b.shape && a.eq(b).all().item<bool>()

let visionFile (name: string) = Path.Combine(goldenRoot.Value, "vision", name)

/// A golden file under tests/golden/vision: flat dict name -> tensor.
type Golden(name: string) =
    inherit Golden.File("vision", name)

/// Copies golden weights into a module (Golden.loadWeights).
let loadWeights weights mayMiss m = Golden.loadWeights weights mayMiss m

/// Elementwise closeness at rtol 1e-4 (Golden.expectClose).
let expectClose what expected actual = Golden.expectClose what expected actual

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
            use g = new Golden("comp_swin.pt")
            use m = new SwinTransformer(swinConfigOfCompSwin)
            loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            let outs = m.Forward g["in.x"]
            expectClose "res2" g["out.res2"] outs[0]
            expectClose "res3" g["out.res3"] outs[1]
        }

        test "comp_swin: block without shift (layer0.block0) and patch embedding" {
            use g = new Golden("comp_swin.pt")
            use m = new SwinTransformer(swinConfigOfCompSwin)
            loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let emb = m.PatchEmbed.Forward g["in.x"]                                        // [1, 32, 24, 24]
            let tokens = emb.flatten(2L).transpose(1L, 2L)
            let blk = m.Layers[0].Blocks[0]
            Expect.equal blk.ShiftSize 0L "block 0 is not shifted"
            let mask = Windows.shiftMask 24L 24L 12L 6L tokens.device
            expectClose "layer0.block0" g["out.debug.layer0.block0"] (blk.Forward(tokens, 24L, 24L, mask))
        }

        test "comp_swin: shifted block (layer0.block1, 2x2 windows) from the official block0 output" {
            use g = new Golden("comp_swin.pt")
            use m = new SwinTransformer(swinConfigOfCompSwin)
            loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let blk = m.Layers[0].Blocks[1]
            Expect.equal blk.ShiftSize 6L "block 1 is shifted by ws/2"
            let mask = Windows.shiftMask 24L 24L 12L 6L torch.CPU
            expectClose "layer0.block1" g["out.debug.layer0.block1"] (blk.Forward(g["out.debug.layer0.block0"], 24L, 24L, mask))
        }

        test "comp_swin: whole stage 1 (merging + plain + shifted block on one 12x12 window)" {
            use g = new Golden("comp_swin.pt")
            use m = new SwinTransformer(swinConfigOfCompSwin)
            loadWeights (g.Weights()) isRelIndex m
            m.eval()
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let down = m.Layers[0].Downsample.Value.Forward(g["out.debug.layer0.block1"], 24L, 24L)   // [1, 144, 64]
            let out, _, _, _, _, _ = m.Layers[1].Forward(down, 12L, 12L)
            expectClose "layer1.block1" g["out.debug.layer1.block1"] out
            let b0 = m.Layers[1].Blocks[0].Forward(down, 12L, 12L, Windows.shiftMask 12L 12L 12L 6L torch.CPU)
            expectClose "layer1.block0" g["out.debug.layer1.block0"] b0
        }

        test "vision_swin_pad: four stages on 70x101 (padding in patch embed, windows and merging) + index buffers" {
            use g = new Golden("vision_swin_pad.pt")
            use m = new SwinTransformer(swinConfigOfPad)
            let w = g.Weights()
            // the official relative_position_index buffers equal ours before loading
            let sd = m.state_dict()
            for kv in w do
                if isRelIndex kv.Key then
                    Expect.isTrue (same sd[kv.Key] kv.Value) $"{kv.Key} equals the official buffer"
            loadWeights w (fun _ -> false) m
            m.eval()
            use _ = torch.no_grad ()
            let outs = m.Forward g["in.x"]
            for i in 0 .. 3 do
                expectClose $"res{i + 2}" g[$"out.res{i + 2}"] outs[i]
        }
    ]

[<Tests>]
let preSamGolden =
    testList "Vision.Golden.PreSam" [
        test "comp_channel_weighted_block: scale and fused output for d = 128, 256, 512, 1024" {
            use g = new Golden("comp_channel_weighted_block.pt")
            use _ = torch.no_grad ()
            for d in [ 128L; 256L; 512L; 1024L ] do
                use blk = new ChannelWeightedBlock(d)
                loadWeights (g.Weights($"dim{d}.")) (fun _ -> false) blk
                let pre = g[$"in.dim{d}.pre_sam_feature"]
                let s = blk.Forward pre
                expectClose $"scale {d}" g[$"out.dim{d}.scale"] s
                expectClose $"fused {d}" g[$"out.dim{d}.fused"] (PreSam.fuse g[$"in.dim{d}.feature"] s pre)
        }
    ]

[<Tests>]
let pixelDecoderGolden =
    testList "Vision.Golden.PixelDecoder" [
        test "comp_position_embedding_sine: three shapes" {
            use g = new Golden("comp_position_embedding_sine.pt")
            for i in 0 .. 2 do
                let shape = g[$"in.shape{i}"].data<int64>().ToArray()
                use x = torch.zeros(shape)
                use pos = PositionEmbedding.sine 128L x
                expectClose $"pos{i}" g[$"out.pos{i}"] pos
        }

        test "comp_msdeformattn: locations, weights and output (with padding mask)" {
            use g = new Golden("comp_msdeformattn.pt")
            use m = new MSDeformAttn({ DModel = 256L; Levels = 3L; Heads = 8L; Points = 4L })
            loadWeights (g.Weights()) (fun _ -> false) m
            m.eval()
            use _ = torch.no_grad ()
            let shapesT = g["in.input_spatial_shapes"].data<int64>().ToArray()
            let shapes = Array.init 3 (fun l -> shapesT[2 * l], shapesT[2 * l + 1])
            let loc, wts = m.Locations(g["in.query"], g["in.reference_points"], shapes)
            expectClose "sampling_locations" g["out.debug.sampling_locations"] loc
            expectClose "attention_weights" g["out.debug.attention_weights"] wts
            let out = m.Forward(g["in.query"], g["in.reference_points"], g["in.input_flatten"], shapes, Some g["in.input_padding_mask"])
            expectClose "output" g["out.output"] out
        }

        test "vision_encoder_layer: one deformable encoder layer" {
            use g = new Golden("vision_encoder_layer.pt")
            use layer = new MSDeformAttnEncoderLayer({ Attention = { DModel = 64L; Levels = 3L; Heads = 4L; Points = 4L }; DimFeedforward = 128L; Dropout = 0.0; Layers = 1 })
            loadWeights (g.Weights()) (fun _ -> false) layer
            layer.eval()
            use _ = torch.no_grad ()
            let shapesT = g["in.spatial_shapes"].data<int64>().ToArray()
            let shapes = Array.init 3 (fun l -> shapesT[2 * l], shapesT[2 * l + 1])
            use refs = MSDeformAttnEncoder.ReferencePoints(shapes, 2L, torch.CPU)
            expectClose "reference points" g["in.reference_points"] refs
            let out = layer.Forward(g["in.src"], g["in.pos"], refs, shapes, None)
            expectClose "layer output" g["out.out"] out
        }

        test "vision_pixel_decoder: mask features, encoder features and the three multi-scale maps" {
            use g = new Golden("vision_pixel_decoder.pt")
            let cfg =
                { PixelDecoderConfig.SwinB384 with
                    InChannels = [| 16L; 32L; 64L; 128L |]; ConvDim = 64L; MaskDim = 64L; NumHeads = 4L; EncLayers = 2
                    DimFeedforward = 128L }
            use m = new MSDeformAttnPixelDecoder(cfg)
            loadWeights (g.Weights()) (fun _ -> false) m
            m.eval()
            use _ = torch.no_grad ()
            let out = m.Forward [| g["in.res2"]; g["in.res3"]; g["in.res4"]; g["in.res5"] |]
            expectClose "mask_features" g["out.mask_features"] out.MaskFeatures
            expectClose "encoder features" g["out.encoder_features"] out.EncoderFeatures
            for i in 0 .. 2 do
                expectClose $"multi_scale{i}" g[$"out.multi_scale{i}"] out.MultiScaleFeatures[i]
        }
    ]
