namespace Vct.Core.PixelDecoder

open Vct.Core.Platform
open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core

/// Sizes of the deformable encoder (official MSDeformAttnTransformerEncoderOnly(d_model, nhead, num_encoder_layers,
/// dim_feedforward, dropout, "relu", num_feature_levels, enc_n_points), in one record).
type MSDeformEncoderConfig =
    { /// the attention of every layer (DModel = d_model, Levels = num_feature_levels, Points = enc_n_points)
      Attention: MSDeformAttnConfig
      /// hidden width of each layer's feed-forward block (dim_feedforward)
      DimFeedforward: int64
      Dropout: float
      /// number of encoder layers (num_encoder_layers)
      Layers: int }

/// Hyper-parameters of MSDeformAttnPixelDecoder (docs/architecture.md §6.1; official:
/// models/modeling/pixel_decoder/msdeformattn.py).
type PixelDecoderConfig =
    { InChannels: int64[]        // channels of res2..res5 (backbone OutChannels), in stride order
      InStrides: int64[]         // strides of res2..res5 (4, 8, 16, 32)
      TransformerLevels: int     // how many of the coarsest inputs enter the deformable encoder (res3..res5: 3)
      ConvDim: int64             // MODEL.SEM_SEG_HEAD.CONVS_DIM
      MaskDim: int64             // MODEL.SEM_SEG_HEAD.MASK_DIM
      GroupNormGroups: int64     // "GN": 32 groups
      NumHeads: int64            // MODEL.MASK_FORMER.NHEADS
      NumPoints: int64           // encoder sampling points per head and level
      EncLayers: int             // MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
      DimFeedforward: int64      // hard-coded 1024 in the reference (ignores DIM_FEEDFORWARD)
      Dropout: float             // MODEL.MASK_FORMER.DROPOUT
      CommonStride: int64 }      // MODEL.SEM_SEG_HEAD.COMMON_STRIDE

    /// The released Swin-B 384 setting.
    static member SwinB384 =
        { InChannels = [| 128L; 256L; 512L; 1024L |]; InStrides = [| 4L; 8L; 16L; 32L |]; TransformerLevels = 3
          ConvDim = 256L; MaskDim = 256L; GroupNormGroups = 32L; NumHeads = 8L; NumPoints = 4L; EncLayers = 6
          DimFeedforward = 1024L; Dropout = 0.0; CommonStride = 4L }

    /// Small sizes for tests, fed by the Tiny Swin (channels 32/64/128/256).
    static member Tiny =
        { PixelDecoderConfig.SwinB384 with
            InChannels = [| 32L; 64L; 128L; 256L |]; ConvDim = 64L; MaskDim = 64L; NumHeads = 4L; EncLayers = 2
            DimFeedforward = 128L }

    /// Extra FPN levels: log2(finest encoder stride) − log2(common stride) (1 for the released setting).
    member c.NumFpnLevels =
        let finest = c.InStrides[c.InStrides.Length - c.TransformerLevels]
        int (Math.Round(Math.Log2(float finest) - Math.Log2(float c.CommonStride)))

    /// The deformable encoder this configuration builds.
    member c.Encoder : MSDeformEncoderConfig =
        { Attention = { DModel = c.ConvDim; Levels = int64 c.TransformerLevels; Heads = c.NumHeads; Points = c.NumPoints }
          DimFeedforward = c.DimFeedforward
          Dropout = c.Dropout
          Layers = c.EncLayers }

    member c.Validate() =
        if c.InChannels.Length <> c.InStrides.Length then invalidArg "config" "InChannels and InStrides differ in length"
        if c.TransformerLevels < 1 || c.TransformerLevels > c.InChannels.Length then
            invalidArg "config" $"TransformerLevels {c.TransformerLevels} outside 1..{c.InChannels.Length}"
        if c.ConvDim % c.NumHeads <> 0L then invalidArg "config" $"ConvDim {c.ConvDim} not divisible by {c.NumHeads} heads"
        if c.ConvDim % c.GroupNormGroups <> 0L then invalidArg "config" $"ConvDim {c.ConvDim} not divisible by {c.GroupNormGroups} groups"
        if c.NumFpnLevels < 0 || c.NumFpnLevels > c.InChannels.Length - c.TransformerLevels then
            invalidArg "config" $"{c.NumFpnLevels} FPN levels do not fit the {c.InChannels.Length - c.TransformerLevels} inputs outside the encoder"

/// Deformable encoder layer, post-norm: s = LN1(s + MSDeformAttn(s + pos, ref, s)); s = LN2(s + FFN(s))
/// (reference: msdeformattn.py, MSDeformAttnTransformerEncoderLayer, activation ReLU).
type MSDeformAttnEncoderLayer(cfg: MSDeformEncoderConfig) as this =
    inherit Module("MSDeformAttnTransformerEncoderLayer")
    let dModel, dropout = cfg.Attention.DModel, cfg.Dropout
    let self_attn = new MSDeformAttn(cfg.Attention)
    let norm1 = LayerNorm([| dModel |])
    let linear1 = Linear(dModel, cfg.DimFeedforward)
    let linear2 = Linear(cfg.DimFeedforward, dModel)
    let norm2 = LayerNorm([| dModel |])
    do this.RegisterComponents()

    member _.SelfAttn = self_attn

    /// src, pos: [N, S, C]; referencePoints: [N, S, L, 2]; paddingMask: [N, S] or None -> [N, S, C]
    member this.Forward(src: Tensor, pos: Tensor, referencePoints: Tensor, shapes: (int64 * int64)[],
                        paddingMask: Tensor option) : Tensor =
        Scope.run (fun () ->
            let drop (t: Tensor) = functional.dropout(t, dropout, this.training)
            let src2 = self_attn.Forward(src + pos, referencePoints, src, shapes, paddingMask)
            let src = norm1.call (src + drop src2)
            let src2 = linear2.call (drop (functional.relu (linear1.call src)))
            norm2.call (src + drop src2))

/// Stack of encoder layers (reference: MSDeformAttnTransformerEncoder).
type MSDeformAttnEncoder(cfg: MSDeformEncoderConfig) as this =
    inherit Module("MSDeformAttnTransformerEncoder")
    let layers = ModuleList<MSDeformAttnEncoderLayer>(Array.init cfg.Layers (fun _ -> new MSDeformAttnEncoderLayer(cfg)))
    do this.RegisterComponents()

    member _.Layers = layers

    /// Reference point of token (i, j) of level l: ((j + 0.5) / W_l, (i + 0.5) / H_l), the same on every level
    /// (no padding, valid ratios 1). -> [N, S, L, 2]
    static member ReferencePoints(shapes: (int64 * int64)[], n: int64, device: torch.Device) : Tensor =
        Scope.run (fun () ->
            let perLevel =
                shapes |> Array.map (fun (h, w) ->
                    let ys = torch.linspace(0.5, float h - 0.5, h, dtype = torch.float32, device = device) / float32 h
                    let xs = torch.linspace(0.5, float w - 0.5, w, dtype = torch.float32, device = device) / float32 w
                    let gy = ys.view(h, 1L).expand(h, w).reshape(-1L)
                    let gx = xs.view(1L, w).expand(h, w).reshape(-1L)
                    torch.stack([| gx; gy |], -1L))                                       // [H*W, 2] (x, y)
            let r = torch.cat(perLevel, 0L)                                               // [S, 2]
            r.view(1L, -1L, 1L, 2L).expand(n, -1L, int64 shapes.Length, 2L).contiguous())

    /// src, pos: [N, S, C] -> [N, S, C]
    member _.Forward(src: Tensor, pos: Tensor, shapes: (int64 * int64)[], paddingMask: Tensor option) : Tensor =
        use scope = torch.NewDisposeScope()
        let reference = MSDeformAttnEncoder.ReferencePoints(shapes, src.shape[0], src.device)
        let mutable out = src
        for layer in layers do
            out <- layer.Forward(out, pos, reference, shapes, paddingMask)
        out.MoveToOuterDisposeScope()

/// The encoder with its learned per-level embedding (reference: MSDeformAttnTransformerEncoderOnly; keys
/// `level_embed` [L, C] and `encoder.layers.i.*`).
type MSDeformAttnTransformerEncoderOnly(cfg: MSDeformEncoderConfig) as this =
    inherit Module("MSDeformAttnTransformerEncoderOnly")
    let nLevels = cfg.Attention.Levels
    let level_embed = Parameter(torch.empty(nLevels, cfg.Attention.DModel).DetachFromDisposeScope())
    let encoder = new MSDeformAttnEncoder(cfg)
    do this.RegisterComponents()

    /// The official init (docs/architecture.md §6.4): Xavier-uniform on every parameter with ≥ 2 dims, then each
    /// MSDeformAttn reset, then level_embed ~ N(0, 1).
    member this.ResetParameters() =
        use _ = torch.no_grad ()
        for struct (_, p) in this.named_parameters() do
            if p.Dimensions > 1L then init.xavier_uniform_(p) |> ignore
        for layer in encoder.Layers do layer.SelfAttn.ResetParameters()
        init.normal_(level_embed) |> ignore

    member _.Config = cfg
    member _.Encoder = encoder
    member _.LevelEmbed = level_embed

    /// srcs, pos: per level [N, C, H_l, W_l] -> memory [N, S, C] and the level shapes
    member _.Forward(srcs: Tensor[], pos: Tensor[]) : Tensor * (int64 * int64)[] =
        if int64 srcs.Length <> nLevels || pos.Length <> srcs.Length then
            invalidArg (nameof srcs) $"expected {nLevels} levels of sources and position embeddings, got {srcs.Length} and {pos.Length}"
        use scope = torch.NewDisposeScope()
        let shapes = srcs |> Array.map (fun s -> s.shape[2], s.shape[3])
        let srcFlat = torch.cat(srcs |> Array.map (fun s -> s.flatten(2L).transpose(1L, 2L)), 1L)        // [N, S, C]
        let posFlat =
            torch.cat(pos |> Array.mapi (fun l p -> p.flatten(2L).transpose(1L, 2L) + level_embed[int64 l].view(1L, 1L, -1L)), 1L)
        let memory = encoder.Forward(srcFlat, posFlat, shapes, None)
        memory.MoveToOuterDisposeScope(), shapes

/// NOTE: TorchSharp 0.107's GroupNorm leaves weight and bias uninitialised (garbage memory); PyTorch's are 1 / 0.
/// Every GroupNorm built here goes through `GroupNormInit.reset`.
[<RequireQualifiedAccess>]
module GroupNormInit =
    /// weight = 1, bias = 0 (PyTorch's GroupNorm.reset_parameters).
    let reset (gn: Modules.GroupNorm) =
        use _ = torch.no_grad ()
        init.ones_(gn.weight) |> ignore
        init.zeros_(gn.bias) |> ignore

/// Shape and options of one detectron2 Conv2d of the pixel decoder's FPN (square kernel, stride 1).
type Conv2dNormConfig =
    { /// input channels
      Input: int64
      /// output channels
      Output: int64
      Kernel: int64
      Padding: int64
      Bias: bool
      /// GroupNorm groups of the `norm` child (None: no norm)
      GroupNormGroups: int64 option
      /// ReLU after the norm
      Relu: bool }

/// detectron2's Conv2d with an optional norm and activation: keys `weight`, (`bias`), `norm.*`
/// (reference: detectron2.layers.Conv2d as the pixel decoder builds it). x: [N, Cin, H, W] -> [N, Cout, H', W']
type Conv2dNorm(cfg: Conv2dNormConfig) as this =
    inherit Module("Conv2d")
    let inC, outC, kernel, padding = cfg.Input, cfg.Output, cfg.Kernel, cfg.Padding
    let useBias, groupNormGroups, relu = cfg.Bias, cfg.GroupNormGroups, cfg.Relu
    let weight = Parameter(torch.empty(outC, inC, kernel, kernel).DetachFromDisposeScope())
    do this.RegisterComponents()
    let bias =
        if useBias then
            let b = Parameter(torch.zeros(outC).DetachFromDisposeScope())
            this.register_parameter("bias", b)
            Some b
        else None
    let norm =
        groupNormGroups |> Option.map (fun g ->
            let n = GroupNorm(g, outC)
            this.register_module("norm", n)
            n)
    do
        use _ = torch.no_grad ()
        init.kaiming_uniform_(weight, a = 1.0) |> ignore   // c2_xavier_fill
        norm |> Option.iter GroupNormInit.reset

    member _.Weight = weight
    /// c2_xavier_fill on the weight (Kaiming-uniform, a = 1), bias 0, norm 1 / 0.
    member _.ResetParameters() =
        use _ = torch.no_grad ()
        init.kaiming_uniform_(weight, a = 1.0) |> ignore
        bias |> Option.iter (fun b -> init.zeros_(b) |> ignore)
        norm |> Option.iter GroupNormInit.reset

    member _.Forward(x: Tensor) : Tensor =
        Scope.run (fun () ->
            let y = functional.conv2d(x, weight, (match bias with Some b -> b :> Tensor | None -> null), padding = [| padding; padding |])
            let y = match norm with Some n -> n.call y | None -> y
            if relu then functional.relu y else y)

/// Outputs of the pixel decoder (reference: MSDeformAttnPixelDecoder.forward_features).
type PixelDecoderOutput =
    { /// [N, MaskDim, H/4, W/4]: mask_features (1×1 conv of the finest FPN map)
      MaskFeatures: Tensor
      /// [N, ConvDim, H/32, W/32]: out[0], the coarsest encoder map (returned but unused by VCT)
      EncoderFeatures: Tensor
      /// the first three maps, coarse to fine: [N, ConvDim, H/32, W/32], [.., H/16, W/16], [.., H/8, W/8]
      MultiScaleFeatures: Tensor[] }

/// MSDeformAttnPixelDecoder (docs/architecture.md §6; official: models/modeling/pixel_decoder/msdeformattn.py). Keys as under
/// `sem_seg_head.pixel_decoder.`: input_proj.k.{0,1}, transformer.level_embed, transformer.encoder.layers.i.*,
/// mask_features, adapter_k, layer_k.
///   features [| res2; res3; res4; res5 |] -> PixelDecoderOutput
type MSDeformAttnPixelDecoder(cfg: PixelDecoderConfig) as this =
    inherit Module("MSDeformAttnPixelDecoder")
    do cfg.Validate()
    let nIn = cfg.InChannels.Length
    let nLevels = cfg.TransformerLevels
    let trInChannels = cfg.InChannels[nIn - nLevels ..]
    let convs = trInChannels |> Array.rev |> Array.map (fun c -> Conv2d(c, cfg.ConvDim, 1L))
    let norms = convs |> Array.map (fun _ -> GroupNorm(cfg.GroupNormGroups, cfg.ConvDim))
    let input_proj =
        ModuleList<Modules.Sequential>(
            Array.map2 (fun (conv: Modules.Conv2d) (gn: Modules.GroupNorm) ->
                Sequential(conv :> Module<Tensor, Tensor>, gn :> Module<Tensor, Tensor>)) convs norms)
    let transformer =
        new MSDeformAttnTransformerEncoderOnly(cfg.Encoder)
    let mask_features = Conv2d(cfg.ConvDim, cfg.MaskDim, 1L)
    do this.RegisterComponents()
    let nFpn = cfg.NumFpnLevels
    // adapter_{k+1} / layer_{k+1} for the k-th finest input (k < nFpn); applied coarse to fine.
    let fpn =
        Array.init nFpn (fun k ->
            let conv input kernel relu =
                new Conv2dNorm({ Input = input; Output = cfg.ConvDim; Kernel = kernel; Padding = kernel / 2L; Bias = false
                                 GroupNormGroups = Some cfg.GroupNormGroups; Relu = relu })
            let lateral = conv cfg.InChannels[k] 1L false
            let output = conv cfg.ConvDim 3L true
            this.register_module($"adapter_{k + 1}", lateral)
            this.register_module($"layer_{k + 1}", output)
            lateral, output)

    do this.ResetParameters()

    member _.Config = cfg
    member _.Transformer = transformer

    /// Initialisation of docs/architecture.md §6.4: input_proj convs Xavier-uniform (gain 1) with bias 0, their
    /// GroupNorms 1 / 0; the encoder's own reset; mask_features, adapter_k, layer_k c2_xavier_fill (Kaiming-uniform
    /// a = 1, bias 0).
    member _.ResetParameters() =
        use _ = torch.no_grad ()
        for conv in convs do
            init.xavier_uniform_(conv.weight, gain = 1.0) |> ignore
            init.zeros_(conv.bias) |> ignore
        for gn in norms do GroupNormInit.reset gn
        transformer.ResetParameters()
        init.kaiming_uniform_(mask_features.weight, a = 1.0) |> ignore
        init.zeros_(mask_features.bias) |> ignore
        for lateral, output in fpn do
            lateral.ResetParameters()
            output.ResetParameters()

    member _.Forward(features: Tensor[]) : PixelDecoderOutput =
        if features.Length <> nIn then
            invalidArg (nameof features) $"expected {nIn} feature maps (res2..), got {features.Length}"
        for k in 0 .. nIn - 1 do
            if features[k].Dimensions <> 4L || features[k].shape[1] <> cfg.InChannels[k] then
                invalidArg (nameof features) $"feature {k} must be [N, {cfg.InChannels[k]}, H, W], got {Shape.show features[k]}"
        use scope = torch.NewDisposeScope()
        // coarse -> fine over the encoder inputs (res5, res4, res3)
        let trInputs = features[nIn - nLevels ..] |> Array.rev |> Array.map (fun f -> f.to_type(torch.float32))
        let srcs = trInputs |> Array.mapi (fun i x -> input_proj[i].call x)
        let pos = trInputs |> Array.map (PositionEmbedding.sine (cfg.ConvDim / 2L))
        let y, shapes = transformer.Forward(srcs, pos)
        let n = y.shape[0]
        let starts = MsDeformAttnCore.levelStartIndex shapes
        let out = ResizeArray<Tensor>()
        for i in 0 .. shapes.Length - 1 do
            let h, w = shapes[i]
            out.Add(y.narrow(1L, starts[i], h * w).transpose(1L, 2L).reshape(n, -1L, h, w))
        for idx in nFpn - 1 .. -1 .. 0 do
            let lateral, output = fpn[idx]
            let x = features[idx].to_type(torch.float32)
            let cur = lateral.Forward x
            let up = functional.interpolate(out[out.Count - 1], size = [| cur.shape[2]; cur.shape[3] |],
                                            mode = torch.InterpolationMode.Bilinear, align_corners = false)
            out.Add(output.Forward (cur + up))
        let multi = out |> Seq.truncate 3 |> Seq.map (fun t -> t.alias().MoveToOuterDisposeScope()) |> Seq.toArray
        { MaskFeatures = (mask_features.call out[out.Count - 1]).MoveToOuterDisposeScope()
          EncoderFeatures = out[0].alias().MoveToOuterDisposeScope()
          MultiScaleFeatures = multi }
