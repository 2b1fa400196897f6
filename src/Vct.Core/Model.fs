namespace Vct.Core

open Vct.Core.Platform
open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core.Audio
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.PixelDecoder
open Vct.Core.QueryGen
open Vct.Core.Decoder
open Vct.Core.Layers

/// Every hyper-parameter of a VCT model. `Released` is the paper's Swin-B/384 setting per subset; `Tiny`
/// keeps every code path at sizes that train on a CPU.
type VctConfig =
    { Subset: Subset
      Swin: SwinConfig
      /// MODEL.PRE_SAM.USE_PRE_SAM: the siamese Swin on Semantic-SAM mask images.
      UsePreSam: bool
      PixelDecoder: PixelDecoderConfig
      Decoder: VctDecoderConfig
      /// Hidden width of the audio MLP (4096 in the released models).
      AudioMlpHidden: int64
      /// Input frames are ImageSize x ImageSize (384); PPQG's pixel count is derived from it.
      ImageSize: int64
      /// MASK_FORMER.SIZE_DIVISIBILITY: frames are zero-padded (after normalisation) to a multiple of it.
      SizeDivisibility: int64
      /// Side of the semantic output (224, hard-coded in the official code for comparability).
      OutputSize: int64 }

    /// The released configuration of `subset` (Swin-B, window 12, 384 input, pre-SAM on).
    static member Released(subset: Subset) =
        let classes, protos =
            match subset with
            | Subset.S4 -> 2L, Some 23L
            | Subset.MS3 -> 2L, None
            | Subset.AVSS -> 71L, Some 71L
        { Subset = subset; Swin = SwinConfig.SwinB384; UsePreSam = true; PixelDecoder = PixelDecoderConfig.SwinB384
          Decoder = VctDecoderConfig.Released(classes, protos, 96L, 96L)
          AudioMlpHidden = 4096L; ImageSize = 384L; SizeDivisibility = 32L; OutputSize = 224L }

    /// A small model with the same structure: Tiny Swin and pixel decoder (64 channels), 4-head decoder with
    /// 20 queries, `imageSize` input (a multiple of 32), `prototypes` classes for ProtoVCQ (S4, AVSS).
    static member Tiny(subset: Subset, imageSize: int64, prototypes: int64) =
        let r = VctConfig.Released subset
        let hidden = PixelDecoderConfig.Tiny.ConvDim
        let m = imageSize / 4L
        let protos = match subset with Subset.MS3 -> None | _ -> Some prototypes
        { r with
            Swin = SwinConfig.Tiny
            UsePreSam = false
            PixelDecoder = PixelDecoderConfig.Tiny
            Decoder =
                { r.Decoder with
                    HiddenDim = hidden; NumQueries = 20L; NumHeads = 4L; DimFeedforward = 128L
                    Query = { VcqConfig.For(m, m, protos) with Channels = hidden; NumQueries = 20L } }
            AudioMlpHidden = 256L
            ImageSize = imageSize
            OutputSize = imageSize }

    member c.WithUsePreSam(on: bool) = { c with UsePreSam = on }
    member c.WithOutputSize(size: int64) = { c with OutputSize = size }
    member c.NumClasses = c.Decoder.NumClasses

    /// Fails with invalidArg when the parts do not fit together.
    member c.Validate() =
        if c.PixelDecoder.InChannels <> c.Swin.OutChannels then
            invalidArg "config" $"pixel decoder inputs {c.PixelDecoder.InChannels} differ from the Swin outputs {c.Swin.OutChannels}"
        if c.PixelDecoder.ConvDim <> c.Decoder.HiddenDim || c.PixelDecoder.MaskDim <> c.Decoder.HiddenDim then
            invalidArg "config" "pixel decoder ConvDim/MaskDim must equal the decoder's hidden width (input_proj is the identity)"
        if c.Decoder.Query.Channels <> c.Decoder.HiddenDim then invalidArg "config" "PPQG channels must equal the hidden width"
        let m = (c.ImageSize + c.SizeDivisibility - 1L) / c.SizeDivisibility * c.SizeDivisibility / 4L
        if c.Decoder.Query.NumPixels <> m * m then
            invalidArg "config" $"PPQG expects {c.Decoder.Query.NumPixels} mask-feature pixels but a {c.ImageSize} input gives {m}x{m}"

/// What the head computed: the pixel decoder's maps, the audio MLP's output [BT, C, 6, 4] and the decoder output.
type HeadOutput = { Pixel: PixelDecoderOutput; Audio: Tensor; Decoder: DecoderOutput }

/// The head: pixel decoder, audio MLP and the VCT decoder (official prefix `sem_seg_head.`).
type SemSegHead(cfg: VctConfig, gen: torch.Generator) as this =
    inherit Module("SemSegHead")
    let pixel_decoder = new MSDeformAttnPixelDecoder(cfg.PixelDecoder)
    let audio_transformation = new AudioMlp(512L, cfg.AudioMlpHidden, cfg.Decoder.HiddenDim)
    let predictor = new VctDecoder(cfg.Decoder, gen)
    do this.RegisterComponents()
    member _.PixelDecoder = pixel_decoder
    member _.AudioTransformation = audio_transformation
    member _.Predictor = predictor

    /// features [| res2; res3; res4; res5 |], audioMaps [BT, 512, 6, 4] -> pixel maps, audio tokens, decoder output
    /// (official: the head's forward, pixel_decoder.forward_features then predictor).
    member _.Forward(features: Tensor[], audioMaps: Tensor, ?noise: Tensor, ?keepMasks: bool, ?auxiliary: bool) : HeadOutput =
        let pix = pixel_decoder.Forward features
        let audio = audio_transformation.Forward audioMaps
        { Pixel = pix; Audio = audio
          Decoder = predictor.Forward(audio, pix.MultiScaleFeatures, pix.MaskFeatures, ?noise = noise, ?keepMasks = keepMasks,
                                      ?auxiliary = auxiliary) }

/// The audio of a forward pass: VGGish log-mel examples (the frozen VGGish runs on them), or VGGish maps computed
/// before (VGGish is frozen, so a trainer computes a clip's maps once and reuses them: the same numbers).
[<RequireQualifiedAccess>]
type AudioInput =
    /// Log-mel examples [N_a, 1, 96, 64] (N_a = BT for S4/MS3; 10 per video for AVSS) and, for AVSS, the
    /// vid_temporal_mask_flag [N_a] (1 = a real example; rows with 0 are dropped).
    | LogMel of examples: Tensor * temporalFlags: Tensor option
    /// VGGish maps [BT, 512, 6, 4], one per frame.
    | Maps of Tensor

/// Inputs of one forward pass over BT frames (one or several videos concatenated).
type VctInputs =
    { /// RGB frames [BT, 3, H, W], 0..255 (float).
      Images: Tensor
      /// Semantic-SAM mask images [BT, 3, H, W], 0..255, for a model with the pre-SAM branch.
      PreMasks: Tensor option
      Audio: AudioInput }

    /// The AVSS temporal flags of log-mel audio (None for maps or S4/MS3).
    member i.TemporalFlags = match i.Audio with AudioInput.LogMel(_, f) -> f | AudioInput.Maps _ -> None

/// Intermediate tensors for inspection and layer-by-layer parity checks.
type VctIntermediates =
    { Features: Tensor[]
      MaskFeatures: Tensor
      MultiScale: Tensor[]
      AudioBackbone: Tensor
      AudioFeatures: Tensor }

/// A forward pass's results: the decoder output and, on request, the intermediates.
type VctOutput =
    { Decoder: DecoderOutput
      Intermediates: VctIntermediates option
      /// Padded input height and width the masks refer to.
      InputSize: int64 * int64 }
    interface ITensorOwner with
        member o.Tensors =
            seq {
                yield! (o.Decoder :> ITensorOwner).Tensors
                match o.Intermediates with
                | Some i ->
                    yield! i.Features
                    yield! i.MultiScale
                    yield i.MaskFeatures
                    yield i.AudioBackbone
                    yield i.AudioFeatures
                | None -> () }
    interface IDisposable with
        member o.Dispose() = Scope.disposeOwned o

/// Parameter-free parts of the model: normalisation, padding, semantic inference.
[<RequireQualifiedAccess>]
module VctMath =
    /// (x - mean) / std per RGB channel on the 0..255 scale (MODEL.PIXEL_MEAN / PIXEL_STD). [B, 3, H, W]
    let normalise (x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        if x.shape[1] <> 3L then invalidArg (nameof x) $"images must be [B, 3, H, W], got {Shape.show x}"
        Scope.run (fun () ->
            let mean = torch.tensor(PreSam.pixelMean, device = x.device).view(1L, 3L, 1L, 1L)
            let std = torch.tensor(PreSam.pixelStd, device = x.device).view(1L, 3L, 1L, 1L)
            (x.to_type(torch.float32) - mean) / std)

    /// Zero-pads the bottom and right so that H and W are multiples of `divisibility` (ImageList.from_tensors).
    let padTo (divisibility: int64) (x: Tensor) : Tensor =
        let h, w = x.shape[2], x.shape[3]
        let ph = (h + divisibility - 1L) / divisibility * divisibility - h
        let pw = (w + divisibility - 1L) / divisibility * divisibility - w
        if ph = 0L && pw = 0L then x.alias() else functional.pad(x, [| 0L; pw; 0L; ph |])

    /// Semantic inference (docs/architecture.md §9.1; official VCT.semantic_inference): mask logits upsampled to
    /// the input size, then scores[c] = sum_q softmax(logits_q)[c] * sigmoid(mask_q) over the C real classes, resized to `output`.
    ///   logits [BT, N, C+1], masks [BT, N, h, w] -> scores [BT, C, oh, ow]
    let semanticInference (inputSize: int64 * int64) (outputSize: int64 * int64) (logits: Tensor) (masks: Tensor) : Tensor =
        Scope.run (fun () ->
            let up =
                functional.interpolate(masks, [| fst inputSize; snd inputSize |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
            let probs = logits.softmax(-1L)
            let c = logits.shape[2] - 1L
            let scores = torch.einsum("bqc,bqhw->bchw", probs.narrow(2L, 0L, c), up.sigmoid())
            if (scores.shape[2], scores.shape[3]) = outputSize then scores
            else functional.interpolate(scores, [| fst outputSize; snd outputSize |], mode = torch.InterpolationMode.Bilinear, align_corners = false))

    /// S4/MS3 foreground probability: softmax over the two score channels, channel 1. [BT, 2, H, W] -> [BT, H, W]
    let foreground (scores: Tensor) : Tensor = Scope.run (fun () -> scores.softmax(1L).select(1L, 1L))

    /// S4/MS3 binary masks: foreground probability > 0.5 (ties are background). [BT, 2, H, W] -> bool [BT, H, W]
    let binaryMasks (scores: Tensor) : Tensor = Scope.run (fun () -> (foreground scores).gt(0.5.AsScalar))

    /// AVSS label maps: arg-max over the class scores. [BT, C, H, W] -> int64 [BT, H, W]
    let labelMaps (scores: Tensor) : Tensor = scores.argmax(1L)

/// The VCT model (official `VCT` meta-architecture): Swin (+ pre-SAM branch), frozen VGGish, pixel decoder,
/// audio MLP and the VCT decoder. State-dict keys are those of the released `model_best.pth` files
/// (backbone.*, pre_sam_backbone.*, scale_factor_module.*, audio_backbone.*, sem_seg_head.*).
type VctModel(cfg: VctConfig, gen: torch.Generator) as this =
    inherit Module("VCT")
    do cfg.Validate()
    let encoder = new VisualEncoder({ Swin = cfg.Swin; UsePreSam = cfg.UsePreSam })
    let audio_backbone = new Vggish(VggishConfig.Default)
    let sem_seg_head = new SemSegHead(cfg, gen)
    do
        this.register_module("backbone", encoder.Backbone)
        match encoder.PreSamBackbone, encoder.ScaleFactorModule with
        | Some pre, Some scales ->
            this.register_module("pre_sam_backbone", pre)
            this.register_module("scale_factor_module", scales)
        | _ -> ()
        this.register_module("audio_backbone", audio_backbone)
        this.register_module("sem_seg_head", sem_seg_head)

    let mutable missingMasks = MissingMasks.Refuse

    new(cfg: VctConfig) = new VctModel(cfg, new torch.Generator(0UL))

    member _.Config = cfg
    member _.Head = sem_seg_head
    member _.AudioBackbone = audio_backbone
    member _.VisualEncoder = encoder

    /// What to do when the model has the pre-SAM branch and no mask images are given (default: refuse).
    member _.MissingMasks
        with get () = missingMasks
        and set v = missingMasks <- v

    /// The VGGish maps of the audio, frozen and without gradients; AVSS rows with a 0 flag are dropped.
    ///   [N_a, 1, 96, 64] -> [BT, 512, 6, 4]
    member _.AudioBackboneFeatures(logMel: Tensor, flags: Tensor option) : Tensor =
        Shape.requireRank "AudioLogMel" 4 logMel
        if logMel.shape[1] <> 1L || logMel.shape[2] <> 96L || logMel.shape[3] <> 64L then
            invalidArg "AudioLogMel" $"audio log-mel examples must be [N, 1, 96, 64], got {Shape.show logMel}"
        use _ = torch.no_grad ()
        audio_backbone.eval () |> ignore
        let maps = audio_backbone.Forward (logMel.to_type(torch.float32))
        match flags with
        | None -> maps
        | Some f ->
            use maps = maps
            use keep = f.``to``(maps.device).gt(0.5.AsScalar).nonzero().squeeze(1L)
            maps.index_select(0L, keep)

    /// Full forward pass. `keepIntermediates` returns backbone, pixel-decoder and audio tensors; `keepMasks` the
    /// decoder's per-layer attention masks; `noise` fixes PPQG's Gumbel noise in training; `auxiliary` = false
    /// returns only the last prediction (inference: see VctDecoder.Forward).
    member this.Forward(inputs: VctInputs, ?keepIntermediates: bool, ?keepMasks: bool, ?noise: Tensor, ?auxiliary: bool) : VctOutput =
        let keepIntermediates = defaultArg keepIntermediates false
        Scope.runOwner (fun () ->
            let images = VctMath.padTo cfg.SizeDivisibility (VctMath.normalise inputs.Images)
            let preMasks = inputs.PreMasks |> Option.map (fun m -> VctMath.padTo cfg.SizeDivisibility (VctMath.normalise m))
            let features = encoder.Forward(images, preMasks, missingMasks)
            let audioMaps =
                match inputs.Audio with
                | AudioInput.Maps m -> if m.device = images.device then m.alias() else m.``to``(images.device)
                | AudioInput.LogMel(examples, flags) -> this.AudioBackboneFeatures(examples.``to``(images.device), flags)
            if audioMaps.shape[0] <> images.shape[0] then
                invalidArg "inputs" $"{images.shape[0]} frames but {audioMaps.shape[0]} audio examples (after the temporal flags)"
            let { Pixel = pix; Audio = audio; Decoder = dec } = sem_seg_head.Forward(features, audioMaps, ?noise = noise, ?keepMasks = keepMasks, ?auxiliary = auxiliary)
            // Under a lower-precision autocast region (Platform/Precision.fs) the products come out in bfloat16 or
            // float16; callers always get float32.
            let toF32 (t: Tensor) =
                if t.dtype = torch.ScalarType.BFloat16 || t.dtype = torch.ScalarType.Float16 then t.to_type(torch.float32) else t
            let dec =
                { dec with
                    Predictions = [ for p in dec.Predictions -> { Logits = toF32 p.Logits; Masks = toF32 p.Masks } ]
                    AudioFeat = dec.AudioFeat |> Option.map toF32
                    ProtoFeat = dec.ProtoFeat |> Option.map toF32
                    Assignment = toF32 dec.Assignment }
            let features = features |> Array.map toF32
            let pix = { pix with MaskFeatures = toF32 pix.MaskFeatures; MultiScaleFeatures = pix.MultiScaleFeatures |> Array.map toF32 }
            let audio = toF32 audio
            let inter =
                if keepIntermediates then
                    Some { Features = features; MaskFeatures = pix.MaskFeatures; MultiScale = pix.MultiScaleFeatures
                           AudioBackbone = audioMaps; AudioFeatures = audio }
                else None
            { Decoder = dec; Intermediates = inter; InputSize = images.shape[2], images.shape[3] })
