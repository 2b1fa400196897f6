namespace Vct.Core.Fusion

open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone

/// What to do when a model built with the pre-SAM branch is run without mask images ("Maskiges").
[<RequireQualifiedAccess>]
type MissingMasks =
    /// Refuse with an error (the default): the released models were trained with the branch on.
    | Refuse
    /// Feed the branch the Maskige the official preprocessing writes for a frame in which Semantic-SAM finds no
    /// mask at all: every pixel has id 0, i.e. ADE20K palette colour (120, 120, 120), normalised like the frames.
    /// Outputs then differ from those with real masks; use it only where masks cannot be made.
    | BlankMaskImage
    /// Skip the branch: RGB features only, as a model built with MODEL.PRE_SAM.USE_PRE_SAM False.
    /// The fused features the later layers were trained on are then missing altogether.
    | SkipBranch

/// Hyper-parameters of the visual encoder: the RGB Swin and the optional pre-SAM siamese branch
/// (reference: models/vct_model.py, VCT; MODEL.PRE_SAM.*).
type VisualEncoderConfig =
    { Swin: SwinConfig
      UsePreSam: bool }   // MODEL.PRE_SAM.USE_PRE_SAM; PRE_SAM_DIM = Swin.OutChannels
    static member SwinB384 = { Swin = SwinConfig.SwinB384; UsePreSam = true }
    static member Tiny = { Swin = SwinConfig.Tiny; UsePreSam = true }
    member c.WithUsePreSam(on: bool) = { c with UsePreSam = on }

/// Parameter-free parts of the pre-SAM fusion.
[<RequireQualifiedAccess>]
module PreSam =
    /// Per-channel pixel mean and std (RGB, 0-255 scale) the model normalises frames and Maskiges with
    /// (reference: MODEL.PIXEL_MEAN / PIXEL_STD).
    let pixelMean = [| 123.675f; 116.280f; 103.530f |]
    let pixelStd = [| 58.395f; 57.120f; 57.375f |]

    /// The normalised Maskige of a frame without any mask: colour (120, 120, 120) everywhere. -> [B, 3, H, W]
    let blankMaskImage (b: int64) (h: int64) (w: int64) (device: torch.Device) : Tensor =
        Scope.run (fun () ->
            let v = Array.init 3 (fun c -> (120.0f - pixelMean[c]) / pixelStd[c])
            torch.tensor(v, device = device).view(1L, 3L, 1L, 1L).expand(b, 3L, h, w).contiguous())

    /// F + s ⊙ P per level (reference: VCT.forward, "wscale" line). features, preSam: [B, C, H, W]; scale [B, C, 1, 1]
    let fuse (feature: Tensor) (scale: Tensor) (preSam: Tensor) : Tensor =
        Scope.run (fun () -> feature + scale * preSam)

/// Squeeze-excitation channel weights: global average pool -> Linear(d -> d/16) -> ReLU -> Linear(d/16 -> d)
/// -> sigmoid (reference: models/utils/misc.py, channel_weighted_block). x: [B, d, H, W] -> [B, d, 1, 1]
type ChannelWeightedBlock(dim: int64) as this =
    inherit Module("channel_weighted_block")
    do if dim < 16L then invalidArg (nameof dim) $"dim {dim} must be >= 16 (fc1 has dim/16 outputs)"
    let fc1 = Linear(dim, dim / 16L)
    let fc2 = Linear(dim / 16L, dim)
    do this.RegisterComponents()

    member _.Forward(x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        Scope.run (fun () ->
            let b, c = x.shape[0], x.shape[1]
            let y = x.mean([| 2L; 3L |])                                   // [B, d]
            let y = fc2.call(functional.relu(fc1.call y)).sigmoid()
            y.view(b, c, 1L, 1L))

/// The visual encoder of VCT: `backbone` (Swin on the normalised frames) and, when UsePreSam, `pre_sam_backbone`
/// (a second Swin with its own weights on the normalised Maskiges) and `scale_factor_module` (one
/// ChannelWeightedBlock per level); each level becomes F + s(P) ⊙ P (reference: vct_model.py, VCT.forward).
/// State-dict keys are the official top-level ones (backbone.*, pre_sam_backbone.*, scale_factor_module.k.*); a
/// containing model should register these three children under the same names to keep the official layout.
type VisualEncoder(cfg: VisualEncoderConfig, ?gen: torch.Generator) as this =
    inherit Module("VisualEncoder")
    let backbone = new SwinTransformer(cfg.Swin, ?gen = gen)
    do this.RegisterComponents()
    let branch =
        if cfg.UsePreSam then
            let pre = new SwinTransformer(cfg.Swin, ?gen = gen)
            let scales = ModuleList<ChannelWeightedBlock>(cfg.Swin.OutChannels |> Array.map (fun d -> new ChannelWeightedBlock(d)))
            this.register_module("pre_sam_backbone", pre)
            this.register_module("scale_factor_module", scales)
            Some(pre, scales)
        else None

    member _.Config = cfg
    member _.Backbone = backbone
    /// The pre-SAM Swin, when UsePreSam.
    member _.PreSamBackbone = branch |> Option.map fst
    /// The per-level channel-weight blocks, when UsePreSam.
    member _.ScaleFactorModule = branch |> Option.map snd

    /// images, preMasks: normalised [B, 3, H, W] -> features [| res2; res3; res4; res5 |] (Swin OutIndices order).
    /// Without preMasks a model with the branch refuses unless `onMissing` says otherwise (see MissingMasks).
    member _.Forward(images: Tensor, preMasks: Tensor option, ?onMissing: MissingMasks) : Tensor[] =
        let onMissing = defaultArg onMissing MissingMasks.Refuse
        match branch with
        | None -> backbone.Forward images
        | Some(pre, scales) ->
            let masks =
                match preMasks, onMissing with
                | Some m, _ ->
                    if m.shape <> images.shape then
                        invalidArg (nameof preMasks) $"pre-SAM masks {Shape.show m} must have the shape of the images {Shape.show images}"
                    Some m
                | None, MissingMasks.Refuse ->
                    invalidOp ("this model uses the pre-SAM branch (MODEL.PRE_SAM.USE_PRE_SAM) and needs one Semantic-SAM mask " +
                               "image (Maskige) per frame; none was given. Pass the mask images, or choose a fallback explicitly: " +
                               "MissingMasks.BlankMaskImage (a mask image without masks) or MissingMasks.SkipBranch (RGB features only); " +
                               "both change the outputs.")
                | None, MissingMasks.BlankMaskImage ->
                    Some(PreSam.blankMaskImage images.shape[0] images.shape[2] images.shape[3] images.device)
                | None, MissingMasks.SkipBranch -> None
            match masks with
            | None -> backbone.Forward images
            | Some m ->
                use scope = torch.NewDisposeScope()
                let features = backbone.Forward images
                let preFeatures = pre.Forward m
                let fused =
                    Array.init features.Length (fun k ->
                        let s = scales[k].Forward preFeatures[k]
                        (PreSam.fuse features[k] s preFeatures[k]).MoveToOuterDisposeScope())
                fused
