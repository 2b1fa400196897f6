namespace Vct.Core.Training

open System
open System.Collections.Generic
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform

/// The ground truth of one supervised frame (docs/architecture.md §10.1): the label values present (sorted, 255 excluded)
/// and one binary mask per label, padded to the input size.
///   Labels: int64 [M]; Masks: [M, H, W] (bool or float 0/1)
type FrameTarget =
    { Labels: Tensor
      Masks: Tensor }
    interface IDisposable with
        member t.Dispose() =
            t.Labels.Dispose()
            t.Masks.Dispose()

[<RequireQualifiedAccess>]
module FrameTarget =
    /// The official dataset mappers' targets from a semantic label map [H, W] (integer values): one target per
    /// value present except `ignore` (255), labels ascending, masks = (map == label) as float32. Background (0)
    /// is a target like any other class. For S4/MS3 pass the GT PNG divided by 255 (0 = background,
    /// 1 = object).
    let ofLabelMap (ignore: int64) (labelMap: Tensor) : FrameTarget =
        Shape.requireRank (nameof labelMap) 2 labelMap
        use scope = torch.NewDisposeScope()
        let map = labelMap.to_type(torch.int64)
        let values = map.flatten().unique(sorted = true) |> fun struct (v, _, _) -> v
        let labels = values.masked_select(values.ne(ignore.AsScalar))
        let masks =
            if labels.shape[0] = 0L then torch.zeros([| 0L; map.shape[0]; map.shape[1] |], dtype = torch.float32, device = map.device)
            else map.unsqueeze(0L).eq(labels.view(-1L, 1L, 1L)).to_type(torch.float32)
        { Labels = labels.MoveToOuterDisposeScope(); Masks = masks.MoveToOuterDisposeScope() }

/// A source of uniform [0, 1) random numbers of a given shape: the official code draws point coordinates with
/// `torch.rand`. Tests inject prepared tensors to make the point sampling deterministic.
type UniformSource = int64[] -> Tensor

[<RequireQualifiedAccess>]
module UniformSource =
    /// torch.rand with `gen` (float32, on `device`).
    let ofGenerator (device: torch.Device) (gen: torch.Generator) : UniformSource =
        fun shape -> torch.rand(shape, dtype = torch.float32, device = device, generator = gen)

    /// Hands out `tensors` in order; each request must ask for exactly the next tensor's shape.
    /// Fails when the queue is exhausted or a shape differs (the call order no longer matches).
    let ofQueue (tensors: Tensor seq) : UniformSource =
        let queue = Queue<Tensor>(tensors)
        fun shape ->
            if queue.Count = 0 then invalidOp $"uniform queue exhausted (asked for [{String.Join(',', shape)}])"
            let t = queue.Dequeue()
            if t.shape <> shape then
                invalidOp $"uniform queue: next tensor is {Shape.show t}, asked for [{String.Join(',', shape)}]"
            t.alias()

/// PointRend point sampling (detectron2 `point_sample`) and the importance sampling of mask-loss points.
[<RequireQualifiedAccess>]
module Points =
    /// Bilinear samples of `input` [N, C, H, W] at `coords` [N, P, 2] in [0, 1]^2 (x then y):
    /// grid_sample(2p - 1), zeros padding, align_corners = false. -> [N, C, P]
    let sample (input: Tensor) (coords: Tensor) : Tensor =
        Scope.run (fun () ->
            let grid = (coords * 2.0f.AsScalar - 1.0f.AsScalar).unsqueeze(2L)        // [N, P, 1, 2]
            functional.grid_sample(input, grid, mode = torch.GridSampleMode.Bilinear,
                                   padding_mode = torch.GridSamplePaddingMode.Zeros, align_corners = false)
                .squeeze(3L))

    /// detectron2 `get_uncertain_point_coords_with_randomness` with uncertainty -|logit| (docs/architecture.md §10.5):
    /// draw floor(numPoints * oversample) candidates per mask, keep the floor(importance * numPoints) most
    /// uncertain and append fresh uniform points up to numPoints. logits [N, 1, H, W] -> coords [N, numPoints, 2].
    /// Two draws from `uniform`, in the official order. No gradient.
    let uncertain (uniform: UniformSource) (numPoints: int64) (oversample: float) (importance: float) (logits: Tensor) : Tensor =
        if oversample < 1.0 then invalidArg (nameof oversample) $"oversample ratio must be >= 1, got {oversample}"
        if importance < 0.0 || importance > 1.0 then invalidArg (nameof importance) $"importance ratio must be in [0, 1], got {importance}"
        use _ = torch.no_grad ()
        Scope.run (fun () ->
            let n = logits.shape[0]
            let numSampled = int64 (float numPoints * oversample)
            let candidates = (uniform [| n; numSampled; 2L |]).``to``(logits.device)
            let uncertainty = (sample logits candidates).abs().neg()                       // [N, 1, S]
            let numUncertain = int64 (importance * float numPoints)
            let numRandom = numPoints - numUncertain
            let struct (_, idx) = uncertainty.select(1L, 0L).topk(int numUncertain, dim = 1)  // [N, k]
            let chosen = candidates.gather(1L, idx.unsqueeze(-1L).expand(-1L, -1L, 2L))
            if numRandom > 0L then torch.cat([| chosen; (uniform [| n; numRandom; 2L |]).``to``(logits.device) |], 1L)
            else chosen)

/// Weights of the matching cost (docs/architecture.md §10.3; official models/modeling/matcher.py, HungarianMatcher).
type MatcherConfig =
    { CostClass: float
      CostMask: float
      CostDice: float
      /// Points shared by all predictions and targets of a frame (TRAIN_NUM_POINTS).
      NumPoints: int64 }
    /// The released setting: class 2, mask 5, dice 5, 12544 points.
    static member Released = { CostClass = 2.0; CostMask = 5.0; CostDice = 5.0; NumPoints = 12544L }
    member c.WithNumPoints(n: int64) = { c with NumPoints = n }

/// The official Hungarian matcher, one frame at a time, without gradients.
[<RequireQualifiedAccess>]
module Matcher =
    /// Mean over points of BCE-with-logits between every prediction and every target, as pos/neg products.
    /// logits [N, P], targets [M, P] -> [N, M]
    let sigmoidCeCost (logits: Tensor) (targets: Tensor) : Tensor =
        Scope.run (fun () ->
            let p = logits.shape[1]
            let pos = functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction = Reduction.None)
            let neg = functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction = Reduction.None)
            let one = torch.ones_like(targets)
            (pos.matmul(targets.t()) + neg.matmul((one - targets).t())) / (float p).AsScalar)

    /// 1 - (2 sum sigma(x) t + 1) / (sum sigma(x) + sum t + 1) for every pair. logits [N, P], targets [M, P] -> [N, M]
    let diceCost (logits: Tensor) (targets: Tensor) : Tensor =
        Scope.run (fun () ->
            let p = logits.sigmoid()
            let numerator = p.matmul(targets.t()) * 2.0f.AsScalar
            let denominator = p.sum(-1L).unsqueeze(1L) + targets.sum(-1L).unsqueeze(0L)
            1.0f.AsScalar - (numerator + 1.0f.AsScalar) / (denominator + 1.0f.AsScalar))

    /// The weighted cost matrix of one frame [N, M] (float32):
    ///   CostMask * BCE + CostClass * (-softmax(logits)[:, label]) + CostDice * dice,
    /// with BCE and dice on `coords` [P, 2] shared by all masks. logits [N, C+1]; masks [N, h, w] (logits).
    let costMatrix (cfg: MatcherConfig) (logits: Tensor) (masks: Tensor) (target: FrameTarget) (coords: Tensor) : Tensor =
        Shape.requireRank (nameof logits) 2 logits
        Shape.requireRank (nameof masks) 3 masks
        Shape.requireRank (nameof coords) 2 coords
        use _ = torch.no_grad ()
        Scope.run (fun () ->
            let n = logits.shape[0]
            let m = target.Labels.shape[0]
            let prob = logits.softmax(-1L)
            let costClass = prob.index_select(1L, target.Labels.to_type(torch.int64).``to``(logits.device)).neg()  // [N, M]
            let pts = coords.``to``(masks.device).to_type(torch.float32)
            let tgt = target.Masks.``to``(masks.device).to_type(masks.dtype).unsqueeze(1L)           // [M, 1, H, W]
            if m = 0L then torch.zeros([| n; 0L |], dtype = torch.float32, device = logits.device)
            else
                let tgtPts = (Points.sample tgt (pts.unsqueeze(0L).expand(m, -1L, -1L))).squeeze(1L).float()
                let outPts = (Points.sample (masks.unsqueeze(1L)) (pts.unsqueeze(0L).expand(n, -1L, -1L))).squeeze(1L).float()
                let costMask = sigmoidCeCost outPts tgtPts
                let costDice = diceCost outPts tgtPts
                costMask * cfg.CostMask.AsScalar + costClass.float() * cfg.CostClass.AsScalar + costDice * cfg.CostDice.AsScalar)

    /// Optimal (query indices, target indices) of one frame for a cost matrix [N, M]; query indices ascending.
    let assign (cost: Tensor) : int64[] * int64[] =
        let n, m = int cost.shape[0], int cost.shape[1]
        let data = if n * m = 0 then [||] else cost.detach().cpu().to_type(torch.float64).contiguous().data<float>().ToArray()
        let rows, cols = Hungarian.solve (Array2D.init n m (fun i j -> data[i * m + j]))
        Array.map int64 rows, Array.map int64 cols

    /// Matches one prediction to the targets, frame by frame (the official memory_efficient_forward): for each
    /// frame draws [1, NumPoints, 2] uniform coordinates from `uniform`, builds the cost and solves it.
    /// logits [F, N, C+1]; masks [F, N, h, w]; targets: one per frame.
    let matchFrames (cfg: MatcherConfig) (uniform: UniformSource) (logits: Tensor) (masks: Tensor) (targets: FrameTarget[]) =
        if logits.shape[0] <> int64 targets.Length || masks.shape[0] <> int64 targets.Length then
            invalidArg (nameof targets) $"{targets.Length} targets for predictions {Shape.show logits} / {Shape.show masks}"
        use _ = torch.no_grad ()
        [| for f in 0 .. targets.Length - 1 ->
            use scope = torch.NewDisposeScope()
            let coords = uniform [| 1L; cfg.NumPoints; 2L |]
            let cost = costMatrix cfg (logits[int64 f]) (masks[int64 f]) targets[f] (coords.squeeze(0L))
            assign cost |]
