namespace Vct.Core.Training

open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Decoder
open Vct.Core.Layers

/// What the prototype-audio contrastive loss compares the similarities with (docs/architecture.md §10.6).
[<RequireQualifiedAccess>]
type PacTarget =
    /// MS3: no PAC loss.
    | None
    /// S4: the 1-based category id of each supervised frame's video (one-hot of id - 1).
    | Categories of int[]
    /// AVSS: multi-hot of the labels present in each supervised frame's target (background 0 included).
    | FrameLabels

/// Which of the BT predicted frames have ground truth (docs/architecture.md §10.2), in the order of the targets, and the
/// PAC target.
type Supervision =
    { Frames: int64[]
      Pac: PacTarget }

[<RequireQualifiedAccess>]
module Supervision =
    /// S4: only each video's first frame is annotated: frames 0, T, 2T, ... of BT; `categories` per video.
    let s4 (numFrames: int64) (framesPerVideo: int64) (categories: int[]) =
        let frames = [| 0L .. framesPerVideo .. numFrames - 1L |]
        if frames.Length <> categories.Length then
            invalidArg (nameof categories) $"{categories.Length} categories for {frames.Length} videos ({numFrames} frames of {framesPerVideo})"
        { Frames = frames; Pac = PacTarget.Categories categories }

    /// MS3: every frame is annotated, no PAC loss.
    let ms3 (numFrames: int64) = { Frames = [| 0L .. numFrames - 1L |]; Pac = PacTarget.None }

    /// AVSS: the frames whose concatenated gt_temporal_mask_flag is 1 (flags: one per predicted frame).
    let avss (gtFlags: int[]) =
        { Frames = [| for i in 0 .. gtFlags.Length - 1 do if gtFlags[i] = 1 then int64 i |]; Pac = PacTarget.FrameLabels }

module private Tensors =
    /// The values of an integer tensor (any shape, possibly empty) as int64[].
    let longs (t: Tensor) =
        if t.numel() = 0L then [||] else t.cpu().to_type(torch.int64).contiguous().data<int64>().ToArray()

/// The loss functions of the official criteria (criterion.py, criterion_s4_pac.py, criterion_ss_pac.py) as
/// plain functions over tensors.
[<RequireQualifiedAccess>]
module Losses =
    /// Matched (frame, query) and (frame, target) pairs, frame-major, in the matcher's order.
    let private pairs (matches: (int64[] * int64[])[]) =
        [| for f in 0 .. matches.Length - 1 do
            let q, t = matches[f]
            for k in 0 .. q.Length - 1 -> int64 f, q[k], t[k] |]

    /// Weighted cross-entropy over all queries (docs/architecture.md §10.4): target = matched class,
    /// `numClasses` (no object) for the rest; class weights `emptyWeight` [C+1]; PyTorch's weighted mean. logits [F, N, C+1] -> scalar.
    let classification (emptyWeight: Tensor) (logits: Tensor) (matches: (int64[] * int64[])[]) (targets: FrameTarget[]) : Tensor =
        Shape.requireRank (nameof logits) 3 logits
        Scope.run (fun () ->
            let src = logits.float()
            let f, n, c1 = src.shape[0], src.shape[1], src.shape[2]
            let numClasses = c1 - 1L
            let targetClasses = Array.create (int (f * n)) numClasses
            let labels = targets |> Array.map (fun t -> Tensors.longs t.Labels)
            for fi, q, t in pairs matches do
                targetClasses[int (fi * n + q)] <- labels[int fi][int t]
            let target = torch.tensor(targetClasses, dtype = torch.int64, device = logits.device).view(f, n)
            functional.cross_entropy(src.transpose(1L, 2L), target, weight = emptyWeight.``to``(logits.device)))

    /// Σ_masks mean_points BCE-with-logits / numMasks. pointLogits, pointLabels [K, P] -> scalar
    let sigmoidCe (numMasks: float) (pointLogits: Tensor) (pointLabels: Tensor) : Tensor =
        Scope.run (fun () ->
            functional.binary_cross_entropy_with_logits(pointLogits, pointLabels, reduction = Reduction.None)
                .mean([| 1L |]).sum() / numMasks.AsScalar)

    /// Σ_masks [1 - (2 Σ σ(x) t + 1) / (Σ σ(x) + Σ t + 1)] / numMasks. pointLogits, pointLabels [K, P] -> scalar
    let dice (numMasks: float) (pointLogits: Tensor) (pointLabels: Tensor) : Tensor =
        Scope.run (fun () ->
            let p = pointLogits.sigmoid().flatten(1L)
            let numerator = (p * pointLabels).sum(-1L) * 2.0f.AsScalar
            let denominator = p.sum(-1L) + pointLabels.sum(-1L)
            let loss = 1.0f.AsScalar - (numerator + 1.0f.AsScalar) / (denominator + 1.0f.AsScalar)
            loss.sum() / numMasks.AsScalar)

    /// The matched target masks, zero-padded to the largest height and width (nested_tensor_from_tensor_list).
    /// -> [K, 1, H, W] in `dtype`
    let private matchedTargetMasks (dtype: torch.ScalarType) (device: torch.Device) (matches: (int64[] * int64[])[]) (targets: FrameTarget[]) =
        let h = targets |> Array.map (fun t -> t.Masks.shape[1]) |> Array.max
        let w = targets |> Array.map (fun t -> t.Masks.shape[2]) |> Array.max
        let picked =
            [| for fi, _, t in pairs matches ->
                let m = targets[int fi].Masks[t].``to``(device).to_type(dtype)
                if m.shape[0] = h && m.shape[1] = w then m
                else functional.pad(m, [| 0L; w - m.shape[1]; 0L; h - m.shape[0] |]) |]
        torch.stack(picked).unsqueeze(1L)

    /// Mask BCE and dice of the matched pairs on importance-sampled points (docs/architecture.md §10.5). masks [F, N, h, w] logits.
    /// Draws two uniform tensors (candidates, then the random fill) even when nothing is matched, as the
    /// official code. -> (loss_mask, loss_dice)
    let masks (uniform: UniformSource) (numPoints: int64) (oversample: float) (importance: float) (numMasks: float)
              (masks: Tensor) (matches: (int64[] * int64[])[]) (targets: FrameTarget[]) : Tensor * Tensor =
        Shape.requireRank (nameof masks) 4 masks
        use scope = torch.NewDisposeScope()
        let ps = pairs matches
        let k = int64 ps.Length
        let src =
            if k = 0L then masks.flatten(0L, 1L).narrow(0L, 0L, 0L).unsqueeze(1L)
            else
                let fIdx = torch.tensor(ps |> Array.map (fun (f, _, _) -> f), dtype = torch.int64, device = masks.device)
                let qIdx = torch.tensor(ps |> Array.map (fun (_, q, _) -> q), dtype = torch.int64, device = masks.device)
                masks.index([| torch.TensorIndex.Tensor fIdx; torch.TensorIndex.Tensor qIdx |]).unsqueeze(1L)   // [K, 1, h, w]
        let coords = Points.uncertain uniform numPoints oversample importance src
        let lossMask, lossDice =
            if k = 0L then
                let zero = masks.sum() * 0.0f.AsScalar
                zero, zero.clone()
            else
                let labels =
                    use _ = torch.no_grad ()
                    (Points.sample (matchedTargetMasks src.dtype src.device matches targets) coords).squeeze(1L)
                let logits = (Points.sample src coords).squeeze(1L)
                sigmoidCe numMasks logits labels, dice numMasks logits labels
        lossMask.MoveToOuterDisposeScope(), lossDice.MoveToOuterDisposeScope()

    /// S4 PAC targets: one-hot of (category id - 1) per supervised frame. -> [F, K] float32
    let pacTargetsOfCategories (numPrototypes: int64) (categories: int[]) : Tensor =
        let t = torch.zeros([| int64 categories.Length; numPrototypes |], dtype = torch.float32)
        for i in 0 .. categories.Length - 1 do
            let c = int64 categories[i] - 1L
            if c < 0L || c >= numPrototypes then
                invalidArg (nameof categories) $"category id {categories[i]} outside 1..{numPrototypes}"
            t[int64 i, c] <- torch.tensor(1.0f)
        t

    /// AVSS PAC targets: multi-hot of each frame's labels. -> [F, K] float32
    let pacTargetsOfLabels (numPrototypes: int64) (targets: FrameTarget[]) : Tensor =
        let t = torch.zeros([| int64 targets.Length; numPrototypes |], dtype = torch.float32)
        for i in 0 .. targets.Length - 1 do
            for l in Tensors.longs targets[i].Labels do
                if l < 0L || l >= numPrototypes then invalidArg (nameof targets) $"label {l} outside 0..{numPrototypes - 1L}"
                t[int64 i, l] <- torch.tensor(1.0f)
        t

    /// Prototype-audio contrastive loss (docs/architecture.md §10.6): BCE-with-logits of exp(logitScale) * audio · protoᵀ against
    /// `target`, mean over frames x K. audioFeat [F, C]; protoFeat [F, K, C]; target [F, K] -> scalar
    let prototype (logitScale: Tensor) (audioFeat: Tensor) (protoFeat: Tensor) (target: Tensor) : Tensor =
        Shape.requireRank (nameof audioFeat) 2 audioFeat
        Shape.requireRank (nameof protoFeat) 3 protoFeat
        Scope.run (fun () ->
            let similarity = (logitScale.exp() * audioFeat.unsqueeze(1L)).matmul(protoFeat.transpose(1L, 2L)).squeeze(1L) // [F, K]
            functional.binary_cross_entropy_with_logits(similarity, target.``to``(similarity.device).to_type(similarity.dtype)))

/// Hyper-parameters of the criterion (docs/architecture.md §10.3-10.7; MODEL.MASK_FORMER.*).
type CriterionConfig =
    { /// Segmentation classes C, without the no-object class.
      NumClasses: int64
      Matcher: MatcherConfig
      ClassWeight: float
      MaskWeight: float
      DiceWeight: float
      /// 1.0 for S4 and AVSS, 0.0 for MS3.
      ProtoWeight: float
      /// NO_OBJECT_WEIGHT: the class weight of no-object (0.1).
      EosCoef: float
      /// TRAIN_NUM_POINTS for the mask losses (12544).
      NumPoints: int64
      OversampleRatio: float
      ImportanceSampleRatio: float
      /// Supervise the auxiliary predictions too (DEEP_SUPERVISION).
      DeepSupervision: bool }

    /// The released configuration of `subset`.
    static member Released(subset: Subset) =
        { NumClasses = (match subset with Subset.AVSS -> 71L | _ -> 2L)
          Matcher = MatcherConfig.Released
          ClassWeight = 2.0; MaskWeight = 5.0; DiceWeight = 5.0
          ProtoWeight = (match subset with Subset.MS3 -> 0.0 | _ -> 1.0)
          EosCoef = 0.1; NumPoints = 12544L; OversampleRatio = 3.0; ImportanceSampleRatio = 0.75
          DeepSupervision = true }

    /// Same points for the matcher and the mask losses (both read TRAIN_NUM_POINTS in the official code).
    member c.WithNumPoints(n: int64) = { c with NumPoints = n; Matcher = c.Matcher.WithNumPoints n }
    member c.WithNumClasses(n: int64) = { c with NumClasses = n }

    /// The weight of a loss term by its official name ("loss_ce", "loss_mask_3", "loss_proto", ...).
    member c.WeightOf(name: string) =
        let baseName =
            let i = name.LastIndexOf '_'
            if i > 0 && name.Substring(i + 1) |> Seq.forall Char.IsDigit then name.Substring(0, i) else name
        match baseName with
        | "loss_ce" -> c.ClassWeight
        | "loss_mask" -> c.MaskWeight
        | "loss_dice" -> c.DiceWeight
        | "loss_proto" -> c.ProtoWeight
        | "loss_cosine" -> 0.0
        | _ -> invalidArg (nameof name) $"unknown loss term {name}"

/// The result of one criterion call. `Terms` are weighted as the official model returns them (their sum is
/// `Total`); `Raw` are the same terms before weighting. `Matches` holds the matching of each supervised
/// prediction (main first, then aux 0..), per supervised frame.
type LossResult =
    { Total: Tensor
      Terms: Map<string, Tensor>
      Raw: Map<string, Tensor>
      Matches: (int64[] * int64[])[] list }
    /// Plain numbers of the weighted terms (for logs), whatever their dtype (float16 under autocast).
    member r.Values =
        r.Terms |> Map.map (fun _ t ->
            if t.dtype = torch.float32 then float (t.item<float32> ())
            else
                use f = t.to_type(torch.float32)
                float (f.item<float32> ()))
    interface IDisposable with
        member r.Dispose() =
            r.Total.Dispose()
            for kv in r.Terms do kv.Value.Dispose()
            for kv in r.Raw do kv.Value.Dispose()

/// The VCT criterion (SetCriterion / SetCriterion_S4_PAC / SetCriterion_SS_PAC): owns the learnable PAC
/// temperature `logit_scale` (initial ln(1/0.07), never clamped) and the `empty_weight` buffer, so its
/// parameters go to the optimiser with the model's (official prefix `criterion.`).
type Criterion(cfg: CriterionConfig) as this =
    inherit Module("criterion")
    let logit_scale = Parameter(torch.tensor(Math.Log(1.0 / 0.07), dtype = torch.float32))
    let empty_weight =
        let w = torch.ones([| cfg.NumClasses + 1L |], dtype = torch.float32)
        w[cfg.NumClasses] <- torch.tensor(float32 cfg.EosCoef)
        w
    do this.RegisterComponents()

    member _.Config = cfg
    /// The mask losses' normaliser for the next calls instead of this call's target count (data-parallel
    /// training: the batch's count over all ranks divided by the number of parts, at least 1, as Mask2Former's
    /// criterion does under DDP). None: this call's count (at least 1).
    member val NumMasksOverride: float option = None with get, set
    member _.LogitScale = logit_scale
    member _.EmptyWeight = empty_weight

    /// Losses of one step (call `Total.backward()`; dispose the result, or run the step in a dispose scope).
    /// `output` holds all BT frames; `targets` one per supervised frame
    /// (`supervision.Frames`, in that order); `uniform` supplies the random point coordinates in the official
    /// order (for each prediction, main first then aux 0..8: one [1, P, 2] draw per frame for matching, then
    /// the candidate and fill draws of the mask loss).
    member this.Forward(output: DecoderOutput, targets: FrameTarget[], supervision: Supervision, uniform: UniformSource) : LossResult =
        if supervision.Frames.Length <> targets.Length then
            invalidArg (nameof targets) $"{targets.Length} targets for {supervision.Frames.Length} supervised frames"
        for t in targets do
            if t.Masks.shape[0] <> t.Labels.shape[0] then
                invalidArg (nameof targets) $"a target has {t.Labels.shape[0]} labels but masks {Shape.show t.Masks}"
        use scope = torch.NewDisposeScope()
        let mainPred = output.Last
        let device = mainPred.Logits.device
        let frames = torch.tensor(supervision.Frames, dtype = torch.int64, device = device)
        let select (t: Tensor) = t.index_select(0L, frames)
        let numMasks =
            match this.NumMasksOverride with
            | Some n -> n
            | None -> max 1.0 (targets |> Array.sumBy (fun t -> float t.Labels.shape[0]))
        let raw = Collections.Generic.List<string * Tensor>()
        let matches = Collections.Generic.List<(int64[] * int64[])[]>()
        let supervise (suffix: string) (pred: Prediction) =
            let logits = select pred.Logits
            let masks = select pred.Masks
            let m = Matcher.matchFrames cfg.Matcher uniform logits masks targets
            matches.Add m
            raw.Add("loss_ce" + suffix, Losses.classification empty_weight logits m targets)
            let lm, ld = Losses.masks uniform cfg.NumPoints cfg.OversampleRatio cfg.ImportanceSampleRatio numMasks masks m targets
            raw.Add("loss_mask" + suffix, lm)
            raw.Add("loss_dice" + suffix, ld)
        supervise "" mainPred
        if cfg.DeepSupervision then
            output.Predictions |> List.take (output.Predictions.Length - 1) |> List.iteri (fun i p -> supervise $"_{i}" p)
        match supervision.Pac, output.AudioFeat, output.ProtoFeat with
        | PacTarget.None, _, _ -> ()
        | pac, Some audio, Some proto ->
            let k = proto.shape[1]
            let target =
                match pac with
                | PacTarget.Categories c -> Losses.pacTargetsOfCategories k c
                | _ -> Losses.pacTargetsOfLabels k targets
            raw.Add("loss_proto", Losses.prototype logit_scale (select audio) (select proto) target)
        | _ -> invalidArg (nameof output) "the PAC loss needs AudioFeat and ProtoFeat (a model with prototypes)"
        let terms = [ for name, t in raw -> name, t * cfg.WeightOf(name).AsScalar ]
        let total = terms |> List.map snd |> List.reduce (fun a b -> a + b)
        // Only the results leave the scope; autograd keeps what backward needs.
        let keep (t: Tensor) = t.MoveToOuterDisposeScope()
        { Total = keep total
          Terms = terms |> List.map (fun (n, t) -> n, keep t) |> Map.ofList
          Raw = raw |> Seq.map (fun (n, t) -> n, keep t) |> Map.ofSeq
          Matches = List.ofSeq matches }

    /// Compute with points drawn from `gen` (training).
    member this.Forward(output: DecoderOutput, targets: FrameTarget[], supervision: Supervision, gen: torch.Generator) =
        this.Forward(output, targets, supervision, UniformSource.ofGenerator output.Last.Masks.device gen)
