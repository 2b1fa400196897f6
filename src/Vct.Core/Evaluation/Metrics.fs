namespace Vct.Core.Evaluation

open System
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Which evaluator's conventions to follow.
[<RequireQualifiedAccess>]
type MetricVariant =
    /// VCT's evaluators (`models/evaluation/sem_seg_evaluation.py`, `sem_seg_evaluation_ss.py`): the numbers
    /// the VCT README and paper report. S4/MS3 foreground = 2-class softmax of the score maps; AVSS evaluates
    /// only real frames.
    | Vct
    /// OpenNLPLab/AVSBench test scripts (`avs_s4/utils/utility.py`, `avss/utils/compute_color_metrics.py`):
    /// S4/MS3 foreground = sigmoid of one logit map; every AVSS video padded to 10 frames.
    | AvsBench

/// One video's scores. For S4/MS3, J is the official per-video IoU (mean over frames) and F the per-video
/// max-over-thresholds F-score. For AVSS the official metric has no per-video value: J and F are the mean,
/// over the classes present in that video's predictions or GT, of that video's per-class means
/// (informational only; M_J/M_F are not their average).
type VideoScore =
    { Id: string
      Frames: int
      J: float
      F: float }

/// The result of an evaluation.
type MetricSummary =
    { Subset: Subset
      Variant: MetricVariant
      /// M_J (mIoU) as a fraction, unrounded. The official evaluators log round(M_J, 4).
      MJ: float
      /// M_F (F-score, beta^2 = 0.3) as a fraction, unrounded.
      MF: float
      /// Per-video values, in the order the videos were added.
      Videos: VideoScore[]
      /// AVSS only (empty otherwise): per-class mean IoU over the frames where the class occurs (0 when never).
      ClassJ: float[]
      /// AVSS only: per-class mean F.
      ClassF: float[]
      /// AVSS only: number of frames where the class is in the prediction or the GT.
      ClassFrames: int[] }

/// S4/MS3 metrics, exactly as `SemSegEvaluator` (VCT) computes them, on flat float32 arrays [T*H*W].
/// All arithmetic is float32 in the reference's operation order, so results agree with PyTorch bit for bit
/// up to the summation order of reductions.
[<RequireQualifiedAccess>]
module BinaryMetrics =
    /// beta^2 of the F-measure.
    [<Literal>]
    let Beta2 = 0.3f

    /// Number of F-measure thresholds (`pr_num`).
    [<Literal>]
    let NumThresholds = 255

    /// The thresholds `torch.linspace(0, 1 - 1e-10, 255)` in float32 (the default dtype), computed by LibTorch
    /// as the reference computes them with PyTorch. QUIRK: 1 - 1e-10 rounds to exactly 1.0f, so the last
    /// threshold is 1.0 and only p = 1.0 passes it.
    /// NOTE: linspace's float32 values depend on the build (vectorised CPU kernels round some entries
    /// differently): Debian's PyTorch 1.13 differs from LibTorch 2.10 by one ulp at a few dozen of the 255
    /// entries (0, 0.5 and 1 agree). The reference's values therefore depend on the PyTorch it ran with; the
    /// effect on F is limited to probabilities lying exactly on such a threshold.
    let thresholds () : float32[] =
        Scope.runValue (fun () ->
            torch.linspace(0.0, 1.0 - 1e-10, int64 NumThresholds, dtype = torch.float32).data<float32>().ToArray())

    /// IoU of one frame: prob[off .. off+n-1] binarised with p > 0.5 (so p = 0.5 is background) against
    /// gt (0/1). QUIRK: a frame with empty GT scores its true-negative rate
    /// #(pred = 0 and gt = 0) / #pixels instead of IoU; the denominator gets + 1e-7 (in float32).
    let frameIoU (prob: float32[]) (gt: byte[]) (off: int) (n: int) : float32 =
        let mutable inter = 0
        let mutable union = 0
        let mutable tn = 0
        let mutable gtSum = 0
        for i in off .. off + n - 1 do
            let p = prob[i] > 0.5f
            let g = gt[i] <> 0uy
            if g then gtSum <- gtSum + 1
            if p && g then inter <- inter + 1
            if p || g then union <- union + 1
            if not p && not g then tn <- tn + 1
        if gtSum = 0 then float32 tn / (float32 n + 1e-7f)
        else float32 inter / (float32 union + 1e-7f)

    /// F-measure curve of one frame at the 255 thresholds (pred = p >= tau), or None when the GT is empty
    /// (QUIRK: such frames are skipped by the F-score). precision = TP/(#pred + 1e-20),
    /// recall = TP/(#gt + 1e-20), F = 1.3*P*R / (0.3*P + R), NaN -> 0, all in float32.
    let frameFCurve (thr: float32[]) (prob: float32[]) (gt: byte[]) (off: int) (n: int) : float32[] option =
        let m = thr.Length
        // k = number of thresholds <= p (thresholds ascend): p passes thresholds 0..k-1.
        let predHist = Array.zeroCreate<int> (m + 1)
        let tpHist = Array.zeroCreate<int> (m + 1)
        let mutable gtSum = 0
        for i in off .. off + n - 1 do
            let p = prob[i]
            let mutable lo = 0
            let mutable hi = m
            while lo < hi do
                let mid = (lo + hi) >>> 1
                if thr[mid] <= p then lo <- mid + 1 else hi <- mid
            predHist[lo] <- predHist[lo] + 1
            if gt[i] <> 0uy then
                gtSum <- gtSum + 1
                tpHist[lo] <- tpHist[lo] + 1
        if gtSum = 0 then None
        else
            let curve = Array.zeroCreate<float32> m
            let mutable nPred = 0
            let mutable tp = 0
            let gtDen = float32 gtSum + 1e-20f
            for i in m - 1 .. -1 .. 0 do
                // thresholds i is passed by every pixel with k > i.
                nPred <- nPred + predHist[i + 1]
                tp <- tp + tpHist[i + 1]
                let prec = float32 tp / (float32 nPred + 1e-20f)
                let recall = float32 tp / gtDen
                let f = (1.0f + Beta2) * prec * recall / (Beta2 * prec + recall)
                curve[i] <- if Single.IsNaN f then 0.0f else f
            Some curve

    /// Per-video IoU: the float32 sum of the frame IoUs divided by the frame count.
    let videoIoU (prob: float32[]) (gt: byte[]) (frames: int) (pixels: int) : float32 =
        let mutable s = 0.0f
        for t in 0 .. frames - 1 do
            s <- s + frameIoU prob gt (t * pixels) pixels
        s / float32 frames

    /// Per-video F: the F curves of the non-empty-GT frames are averaged (float32 running sum divided by the
    /// count) and the maximum over thresholds is taken. QUIRK: a video whose frames all have empty GT scores 0.
    let videoF (thr: float32[]) (prob: float32[]) (gt: byte[]) (frames: int) (pixels: int) : float32 =
        let sum = Array.zeroCreate<float32> thr.Length
        let mutable count = 0
        for t in 0 .. frames - 1 do
            match frameFCurve thr prob gt (t * pixels) pixels with
            | Some c ->
                for i in 0 .. c.Length - 1 do
                    sum[i] <- sum[i] + c[i]
                count <- count + 1
            | None -> ()
        if count = 0 then 0.0f
        else sum |> Array.map (fun v -> v / float32 count) |> Array.max

    /// Foreground probability [T, H, W] (flattened) from scores [T, C, H, W]:
    /// VCT: C = 2, softmax over the channel axis, channel 1 (the evaluator applies F.softmax(preds, dim=1));
    /// AVSBench: C = 1, sigmoid of the single logit map.
    let foreground (variant: MetricVariant) (scores: Tensor) : float32[] =
        Shape.requireRank (nameof scores) 4 scores
        let c = scores.shape[1]
        Scope.runValue (fun () ->
            let s = scores.detach().cpu().to_type(torch.float32)
            let p =
                match variant with
                | MetricVariant.Vct ->
                    if c <> 2L then invalidArg (nameof scores) $"S4/MS3 scores must have 2 channels (background, object), got {Shape.show scores}"
                    s.softmax(1L).select(1L, 1L)
                | MetricVariant.AvsBench ->
                    if c <> 1L then invalidArg (nameof scores) $"AVSBench-variant S4/MS3 scores must be one logit map [T,1,H,W], got {Shape.show scores}"
                    s.select(1L, 0L).sigmoid()
            p.contiguous().data<float32>().ToArray())

/// AVSS metrics, exactly as `_batch_miou_fscore` / `SemSegEvaluator_SS` compute them.
[<RequireQualifiedAccess>]
module SemanticMetrics =
    /// Per-frame class areas (float32, as torch.histc returns them).
    type FrameAreas =
        { Inter: float32[]
          Pred: float32[]
          Gt: float32[] }

    /// Class areas of one frame. pred: arg-max labels 0..K-1; gt: labels, where any value >= K (255 = padding)
    /// is outside the official histogram range 1..K after the +1 shift: QUIRK, such pixels count for neither
    /// GT nor intersection, but the prediction there still counts as predicted area.
    let frameAreas (numClasses: int) (pred: int[]) (predOff: int) (gt: int[]) (gtOff: int) (n: int) : FrameAreas =
        let inter = Array.zeroCreate<int> numClasses
        let p = Array.zeroCreate<int> numClasses
        let g = Array.zeroCreate<int> numClasses
        for i in 0 .. n - 1 do
            let a = pred[predOff + i]
            let b = gt[gtOff + i]
            p[a] <- p[a] + 1
            if b >= 0 && b < numClasses then
                g[b] <- g[b] + 1
                if a = b then inter[a] <- inter[a] + 1
        { Inter = Array.map float32 inter; Pred = Array.map float32 p; Gt = Array.map float32 g }

    /// Per-class IoU, F and presence of one frame: IoU = inter/(union + 2.220446049250313e-16) (float32),
    /// present = union > 0, F = 1.3PR/(0.3P+R) with P = inter/pred, R = inter/gt and NaN -> 0.
    let frameScores (a: FrameAreas) : float32[] * float32[] * bool[] =
        let k = a.Inter.Length
        let iou = Array.zeroCreate<float32> k
        let f = Array.zeroCreate<float32> k
        let present = Array.zeroCreate<bool> k
        let eps = float32 2.220446049250313e-16
        for c in 0 .. k - 1 do
            let union = a.Pred[c] + a.Gt[c] - a.Inter[c]
            iou[c] <- 1.0f * a.Inter[c] / (eps + union)
            present[c] <- union <> 0.0f
            let prec = a.Inter[c] / a.Pred[c]
            let recall = a.Inter[c] / a.Gt[c]
            let v = (1.0f + BinaryMetrics.Beta2) * prec * recall / (BinaryMetrics.Beta2 * prec + recall)
            f[c] <- if Single.IsNaN v then 0.0f else v
        iou, f, present

    /// Arg-max labels [T*H*W] of scores [T, K, H, W]: softmax over K first (as `calc_color_miou_fscore` does;
    /// it can turn nearly equal scores into exact ties), then torch.argmax, which picks the first maximum.
    let labels (scores: Tensor) : int[] =
        Shape.requireRank (nameof scores) 4 scores
        Scope.runValue (fun () ->
            let s = scores.detach().cpu().to_type(torch.float32)
            s.softmax(1L).argmax(1L).to_type(torch.int32).contiguous().data<int>().ToArray())

/// Feeds per-video scores to an evaluator; a model's inference output can be passed here frame by frame
/// per video (scores [T, C, H, W] as `semantic_inference` produces them at 224x224; GT [T, H, W]).
type IVideoEvaluator =
    /// Adds one video; returns its per-video scores.
    abstract Add: id: string * scores: Tensor * gt: Tensor -> VideoScore
    /// The metrics over every video added so far.
    abstract Summary: unit -> MetricSummary

module private EvalShared =
    let gtBytes (name: string) (gt: Tensor) : int[] =
        Shape.requireRank name 3 gt
        Scope.runValue (fun () -> gt.detach().cpu().to_type(torch.int32).contiguous().data<int>().ToArray())

    let checkShapes (scores: Tensor) (gt: Tensor) =
        Shape.requireRank (nameof scores) 4 scores
        Shape.requireRank (nameof gt) 3 gt
        if scores.shape[0] <> gt.shape[0] || scores.shape[2] <> gt.shape[1] || scores.shape[3] <> gt.shape[2] then
            invalidArg (nameof gt) $"scores {Shape.show scores} [T,C,H,W] and ground truth {Shape.show gt} [T,H,W] disagree"

/// S4/MS3 evaluator (one video per `Add`, as the official test loader's batch of 1 video).
/// Aggregation as the reference: M_J = float32 running sum of the per-video IoUs / #videos (AverageMeter of
/// 0-d float32 tensors); M_F = the float64 mean of the per-video F values (Python floats), which VCT's
/// `evaluate` rounds to float32 through `torch.tensor(list).mean()` (AVSBench keeps the float64 mean).
type BinaryEvaluator(subset: Subset, variant: MetricVariant) =
    do if subset = Subset.AVSS then invalidArg (nameof subset) "BinaryEvaluator is for S4/MS3; use SemanticEvaluator for AVSS"
    let thr = BinaryMetrics.thresholds ()
    let videos = ResizeArray<VideoScore>()
    let mutable jSum = 0.0f
    let mutable fSum = 0.0

    /// The 255 F-measure thresholds used.
    member _.Thresholds = Array.copy thr

    /// Adds one video from foreground probabilities prob [T*H*W] and GT gt [T*H*W] in {0, 1}.
    member _.AddProbabilities(id: string, prob: float32[], gt: byte[], frames: int, height: int, width: int) : VideoScore =
        let pixels = height * width
        if frames <= 0 || pixels <= 0 then invalidArg (nameof frames) $"video '{id}': empty shape [{frames},{height},{width}]"
        if prob.Length <> frames * pixels || gt.Length <> frames * pixels then
            invalidArg (nameof prob) $"video '{id}': {prob.Length} probabilities and {gt.Length} labels for [{frames},{height},{width}]"
        match gt |> Array.tryFind (fun v -> v > 1uy) with
        | Some v -> invalidArg (nameof gt) $"video '{id}': S4/MS3 ground truth must be 0/1 (the official loader divides the 0/255 PNG by 255), found {v}"
        | None -> ()
        let j = BinaryMetrics.videoIoU prob gt frames pixels
        let f = BinaryMetrics.videoF thr prob gt frames pixels
        jSum <- jSum + j
        fSum <- fSum + float f
        let v = { Id = id; Frames = frames; J = float j; F = float f }
        videos.Add v
        v

    /// Adds one video: scores [T, C, H, W] (C = 2 for the VCT variant, 1 logit map for AVSBench), gt [T, H, W] 0/1.
    member this.Add(id: string, scores: Tensor, gt: Tensor) : VideoScore =
        EvalShared.checkShapes scores gt
        let prob = BinaryMetrics.foreground variant scores
        let g = EvalShared.gtBytes (nameof gt) gt |> Array.map (fun v -> if v < 0 || v > 255 then 255uy else byte v)
        this.AddProbabilities(id, prob, g, int scores.shape[0], int scores.shape[2], int scores.shape[3])

    /// M_J, M_F and the per-video values.
    member _.Summary() : MetricSummary =
        let n = videos.Count
        let mj = if n = 0 then nan else float (jSum / float32 n)
        let mf =
            if n = 0 then nan
            elif variant = MetricVariant.Vct then float (float32 (fSum / float n))
            else fSum / float n
        { Subset = subset; Variant = variant; MJ = mj; MF = mf; Videos = videos.ToArray()
          ClassJ = [||]; ClassF = [||]; ClassFrames = [||] }

    interface IVideoEvaluator with
        member this.Add(id, scores, gt) = this.Add(id, scores, gt)
        member this.Summary() = this.Summary()

/// AVSS evaluator: per-class sums of IoU and F over every frame of every video, divided by the number of frames
/// where the class occurs; classes never seen score 0; M_J / M_F = mean over all K classes (background
/// included). The float32 per-video sums are added video by video, as the reference's AverageMeter does.
/// QUIRK (not reproduced as a number): the logged "noBg" variants drop the last class (70), not background.
type SemanticEvaluator(variant: MetricVariant, numClasses: int) =
    do if numClasses < 2 then invalidArg (nameof numClasses) $"numClasses must be >= 2, got {numClasses}"
    let iouTotal = Array.zeroCreate<float32> numClasses
    let fTotal = Array.zeroCreate<float32> numClasses
    let countTotal = Array.zeroCreate<float32> numClasses
    let videos = ResizeArray<VideoScore>()

    /// AVSBench pads every video to this many frames (its AVSS test loader's T = 10).
    static member AvsBenchFrames = 10

    /// The number of classes K.
    member _.NumClasses = numClasses

    /// Adds one video from arg-max labels pred [Tp*H*W] and GT [T*H*W]. For the AVSBench variant a video with
    /// T < 10 is padded to 10 frames with all-background GT; the padded frames' predictions are `pred`'s own
    /// frames T..9 when it has 10 frames (the model's output on the black padding images), otherwise all background.
    member _.AddLabels(id: string, pred: int[], gt: int[], frames: int, height: int, width: int) : VideoScore =
        let pixels = height * width
        if frames <= 0 || pixels <= 0 then invalidArg (nameof frames) $"video '{id}': empty shape [{frames},{height},{width}]"
        if gt.Length <> frames * pixels then invalidArg (nameof gt) $"video '{id}': {gt.Length} labels for [{frames},{height},{width}]"
        let predFrames = pred.Length / pixels
        if pred.Length % pixels <> 0 || (predFrames <> frames && not (variant = MetricVariant.AvsBench && predFrames = SemanticEvaluator.AvsBenchFrames && frames < predFrames)) then
            invalidArg (nameof pred) $"video '{id}': {predFrames} predicted frames for {frames} ground-truth frames"
        match pred |> Array.tryFind (fun v -> v < 0 || v >= numClasses) with
        | Some v -> invalidArg (nameof pred) $"video '{id}': predicted label {v} outside 0..{numClasses - 1}"
        | None -> ()
        let total = if variant = MetricVariant.AvsBench then max frames SemanticEvaluator.AvsBenchFrames else frames
        let vi = Array.zeroCreate<float32> numClasses
        let vf = Array.zeroCreate<float32> numClasses
        let vc = Array.zeroCreate<float32> numClasses
        let zeros = lazy (Array.zeroCreate<int> pixels)
        for t in 0 .. total - 1 do
            let p, po = if t < predFrames then pred, t * pixels else zeros.Value, 0
            let g, go = if t < frames then gt, t * pixels else zeros.Value, 0
            let a = SemanticMetrics.frameAreas numClasses p po g go pixels
            let iou, f, present = SemanticMetrics.frameScores a
            for c in 0 .. numClasses - 1 do
                vi[c] <- vi[c] + iou[c]
                vf[c] <- vf[c] + f[c]
                if present[c] then vc[c] <- vc[c] + 1.0f
        for c in 0 .. numClasses - 1 do
            iouTotal[c] <- iouTotal[c] + vi[c]
            fTotal[c] <- fTotal[c] + vf[c]
            countTotal[c] <- countTotal[c] + vc[c]
        let seen = [| for c in 0 .. numClasses - 1 do if vc[c] > 0.0f then c |]
        let mean (s: float32[]) = if seen.Length = 0 then 0.0 else seen |> Array.averageBy (fun c -> float (s[c] / vc[c]))
        let v = { Id = id; Frames = frames; J = mean vi; F = mean vf }
        videos.Add v
        v

    /// Adds one video: scores [T, K, H, W] (for AVSBench possibly 10 frames for a 5-frame GT), gt [T, H, W].
    member this.Add(id: string, scores: Tensor, gt: Tensor) : VideoScore =
        Shape.requireRank (nameof scores) 4 scores
        Shape.requireRank (nameof gt) 3 gt
        if scores.shape[1] <> int64 numClasses then
            invalidArg (nameof scores) $"video '{id}': scores {Shape.show scores} have {scores.shape[1]} classes, expected {numClasses}"
        if scores.shape[2] <> gt.shape[1] || scores.shape[3] <> gt.shape[2] then
            invalidArg (nameof gt) $"video '{id}': scores {Shape.show scores} and ground truth {Shape.show gt} differ in size"
        let pred = SemanticMetrics.labels scores
        let g = EvalShared.gtBytes (nameof gt) gt
        this.AddLabels(id, pred, g, int gt.shape[0], int gt.shape[1], int gt.shape[2])

    /// M_J, M_F, the per-class values and the per-video values.
    member _.Summary() : MetricSummary =
        let perClass (s: float32[]) =
            Array.init numClasses (fun c ->
                let v = s[c] / countTotal[c]
                if Single.IsNaN v then 0.0f else v)
        let cj = perClass iouTotal
        let cf = perClass fTotal
        // NOTE: torch.mean of the 71 float32 values; summed here in float64 and rounded once to float32
        // (PyTorch's cascade sum is at least as close to this as a sequential float32 sum).
        let mean (a: float32[]) = float (float32 (Array.sumBy float a / float a.Length))
        { Subset = Subset.AVSS; Variant = variant
          MJ = (if videos.Count = 0 then nan else mean cj)
          MF = (if videos.Count = 0 then nan else mean cf)
          Videos = videos.ToArray()
          ClassJ = Array.map float cj; ClassF = Array.map float cf; ClassFrames = Array.map int countTotal }

    interface IVideoEvaluator with
        member this.Add(id, scores, gt) = this.Add(id, scores, gt)
        member this.Summary() = this.Summary()

/// Entry points: evaluators per subset.
[<RequireQualifiedAccess>]
module Metrics =
    /// AVSS classes (background + 70).
    [<Literal>]
    let AvssClasses = 71

    /// A fresh evaluator for the subset and variant (AVSS with `numClasses` classes, normally 71).
    let evaluator (subset: Subset) (variant: MetricVariant) (numClasses: int) : IVideoEvaluator =
        match subset with
        | Subset.AVSS -> SemanticEvaluator(variant, numClasses) :> IVideoEvaluator
        | _ -> BinaryEvaluator(subset, variant) :> IVideoEvaluator
