namespace Vct.Core.PixelDecoder

open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform

/// Multi-scale deformable attention written with grid_sample (docs/architecture.md §6.3; official:
/// models/modeling/pixel_decoder/ops/functions/ms_deform_attn_func.py, ms_deform_attn_core_pytorch, which is
/// numerically the CUDA op).
[<RequireQualifiedAccess>]
module MsDeformAttnCore =
    /// Start offset of each level in the flattened token axis. shapes: (H_l, W_l) per level.
    let levelStartIndex (shapes: (int64 * int64)[]) : int64[] =
        shapes |> Array.scan (fun acc (h, w) -> acc + h * w) 0L |> Array.take shapes.Length

    /// Elements of the sampled values [N*M, D, chunk, P] one level holds at a time on the inference path.
    let mutable sampleChunkElements = 1L <<< 20

    /// Ranks and sizes of the sampling inputs (see `sampleWith`).
    let private validate (value: Tensor) (shapes: (int64 * int64)[]) (locations: Tensor) (weights: Tensor) =
        Shape.requireRank (nameof value) 4 value
        Shape.requireRank (nameof locations) 6 locations
        Shape.requireRank (nameof weights) 5 weights
        let s = value.shape[1]
        let l = locations.shape[3]
        if shapes.Length <> int l then
            invalidArg (nameof shapes) $"{shapes.Length} level shapes for locations {Shape.show locations}"
        if Array.sumBy (fun (h, w) -> h * w) shapes <> s then
            invalidArg (nameof value) $"value {Shape.show value} does not hold the levels {shapes}"
        if weights.shape <> locations.shape[.. 4] then
            invalidArg (nameof weights) $"weights {Shape.show weights} do not match locations {Shape.show locations}"

    /// Bilinear sampling of every head's value maps at the given locations, weighted and summed over levels × points.
    /// Locations are normalised to [0, 1] (x first); pixel centres sit at (k + 0.5) / size (grid 2·loc − 1 with
    /// align_corners = false); each bilinear tap outside the map contributes zero (padding "zeros").
    ///   value: [N, S, M, D], shapes: L levels (H_l, W_l) with Σ H_l W_l = S,
    ///   locations: [N, Lq, M, L, P, 2], weights: [N, Lq, M, L, P] -> [N, Lq, M*D]
    let sampleWith (explicitSum: bool) (value: Tensor) (shapes: (int64 * int64)[]) (locations: Tensor) (weights: Tensor) : Tensor =
        validate value shapes locations weights
        let n, _, m, d = value.shape[0], value.shape[1], value.shape[2], value.shape[3]
        let lq, l, p = locations.shape[1], locations.shape[3], locations.shape[4]
        if explicitSum || torch.is_grad_enabled () then
            Scope.run (fun () ->
                let starts = levelStartIndex shapes
                let grids = locations * 2.0f.AsScalar - 1.0f.AsScalar                     // [N, Lq, M, L, P, 2]
                let sampled =
                    shapes |> Array.mapi (fun lvl (h, w) ->
                        // [N, HW, M, D] -> [N, HW, M*D] -> [N, M*D, HW] -> [N*M, D, H, W]
                        let v = value.narrow(1L, starts[lvl], h * w).flatten(2L).transpose(1L, 2L).reshape(n * m, d, h, w)
                        // [N, Lq, M, P, 2] -> [N, M, Lq, P, 2] -> [N*M, Lq, P, 2]
                        let g = grids.select(3L, int64 lvl).transpose(1L, 2L).flatten(0L, 1L)
                        functional.grid_sample(v, g, mode = torch.GridSampleMode.Bilinear, padding_mode = torch.GridSamplePaddingMode.Zeros,
                                               align_corners = false))                       // [N*M, D, Lq, P]
                // [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N*M, 1, Lq, L*P]
                let w = weights.transpose(1L, 2L).reshape(n * m, 1L, lq, l * p)
                let out = (torch.stack(sampled, -2L).flatten(-2L) * w).sum(-1L).view(n, m * d, lq)   // [N, M*D, Lq]
                out.transpose(1L, 2L).contiguous())                                             // [N, Lq, M*D]
        else
            // Inference: the same sums, level by level and over chunks of queries, so that the sampled values
            // ([N*M, D, chunk, P] per level) are weighted and reduced while still in cache instead of stacking
            // [N*M, D, Lq, L*P] for all levels at once.
            Scope.run (fun () ->
                let starts = levelStartIndex shapes
                let values =
                    shapes |> Array.mapi (fun lvl (h, w) ->
                        value.narrow(1L, starts[lvl], h * w).flatten(2L).transpose(1L, 2L).reshape(n * m, d, h, w))  // [N*M, D, H, W]
                // [N, Lq, M, L, P, 2] -> [N*M, L, Lq, P, 2], and the weights [N*M, L, Lq, 1, P]
                let grids = (locations.permute(0L, 2L, 3L, 1L, 4L, 5L) * 2.0f.AsScalar - 1.0f.AsScalar).reshape(n * m, l, lq, p, 2L)
                let ws = weights.permute(0L, 2L, 3L, 1L, 4L).reshape(n * m, l, lq, 1L, p)
                let out = torch.empty(n * m, d, lq, dtype = value.dtype, device = value.device)  // [N*M, D, Lq]
                let chunk = max 1L (sampleChunkElements / (n * m * d * p))
                let mutable q0 = 0L
                while q0 < lq do
                    use _ = torch.NewDisposeScope()
                    let len = min chunk (lq - q0)
                    let acc = out.narrow(2L, q0, len)
                    for lvl in 0 .. shapes.Length - 1 do
                        let g = grids.select(1L, int64 lvl).narrow(1L, q0, len)                // [N*M, len, P, 2]
                        let s = functional.grid_sample(values[lvl], g, mode = torch.GridSampleMode.Bilinear,
                                                       padding_mode = torch.GridSamplePaddingMode.Zeros, align_corners = false)  // [N*M, D, len, P]
                        let wl = ws.select(1L, int64 lvl).narrow(1L, q0, len).transpose(1L, 2L)  // [N*M, 1, len, P]
                        let part = s.mul_(wl).sum(-1L)                                            // [N*M, D, len]
                        if lvl = 0 then acc.copy_(part) |> ignore else acc.add_(part) |> ignore
                    q0 <- q0 + len
                out.view(n, m * d, lq).transpose(1L, 2L).contiguous())                          // [N, Lq, M*D]

    /// (W_l, H_l) per level as [1, 1, 1, L, 1, 2] (x first).
    let pixelScale (shapes: (int64 * int64)[]) (device: torch.Device) =
        torch.tensor(shapes |> Array.collect (fun (h, w) -> [| float32 w; float32 h |]), device = device).view(1L, 1L, 1L, shapes.Length, 1L, 2L)

    /// `sampleGather` on continuous pixel coordinates: pixels [N, Lq, M, L, P, 2] = location · (W_l, H_l) − 0.5
    /// (x first; pixel centres at integers). Consumes `pixels` (it is clamped and floored in place).
    let sampleGatherPixels (value: Tensor) (shapes: (int64 * int64)[]) (pixels: Tensor) (weights: Tensor) : Tensor =
        let n, _, m, d = value.shape[0], value.shape[1], value.shape[2], value.shape[3]
        let lq, l, p = pixels.shape[1], pixels.shape[3], pixels.shape[4]
        validate value shapes pixels weights
        Scope.run (fun () ->
            let dev = value.device
            let starts = levelStartIndex shapes
            let padded = shapes |> Array.map (fun (h, w) -> h + 3L, w + 3L)
            let paddedStarts = levelStartIndex padded
            let sp = padded |> Array.sumBy (fun (h, w) -> h * w)
            // [N, Sp, M*D]: each level [N, H, W, M*D] with a zero border, rows (n, s, m) of D channels
            let table =
                torch.cat(shapes |> Array.mapi (fun lvl (h, w) ->
                              let v = value.narrow(1L, starts[lvl], h * w).reshape(n, h, w, m * d)
                              functional.pad(v, [| 0L; 0L; 1L; 2L; 1L; 2L |]).view(n, (h + 3L) * (w + 3L), m * d)), 1L)
            // pixel coordinates clamped to [−1, size]; corner = floor, frac = the rest (in place)
            let size = pixelScale shapes dev
            let pix = pixels.clamp_min_(-1.0f.ToScalar()).minimum(size)                            // [N, Lq, M, L, P, 2]
            let corner = pix.floor()
            let frac = pix.sub_(corner)
            // row of the top-left tap: (n·Sp + start_l + (y0 + 1)·Wp + x0 + 1)·M + m, exact in float32 (< 2^24 rows
            // for any realistic size; checked here)
            let rows = float (n * sp * m)
            if rows >= 16777216.0 then invalidOp $"deformable attention: {rows} value rows exceed the exact float32 index range"
            let wp = torch.tensor(shapes |> Array.map (fun (_, w) -> float32 (w + 3L)), device = dev).view(1L, 1L, 1L, l, 1L)
            // (n·Sp + start_l + Wp + 1)·M + m for every (n, m, level): [N, 1, M, L, 1]
            let levelBase = torch.tensor(Array.init shapes.Length (fun i -> float32 (paddedStarts[i] + snd padded[i] + 1L)), device = dev)
                                .view(1L, 1L, 1L, l, 1L)
            let frameBase = torch.arange(n.ToScalar(), dtype = torch.float32, device = dev).mul_((float32 sp).ToScalar()).view(n, 1L, 1L, 1L, 1L)
            let head = torch.arange(m.ToScalar(), dtype = torch.float32, device = dev).view(1L, 1L, m, 1L, 1L)
            let rowBase = (levelBase + frameBase).mul_((float32 m).ToScalar()) + head                         // [N, 1, M, L, 1]
            let topLeft =
                (corner.select(-1L, 1L) * (wp * float32 m)).add_(corner.select(-1L, 0L) * float32 m).add_(rowBase)   // [N, Lq, M, L, P]
            // the 4 taps (y0 x0, y0 x1, y1 x0, y1 x1) are 0, M, Wp·M, (Wp + 1)·M rows further
            let step = torch.stack([| torch.zeros_like wp; torch.ones_like wp; wp; wp + 1.0f.ToScalar() |], -1L)
                           .mul_((float32 m).ToScalar())                                                  // [1, 1, 1, L, 1, 4]
            let index = (topLeft.unsqueeze(-1L) + step).to_type(torch.int64).view(n * lq * m, l * p * 4L)
            let fx, fy = frac.select(-1L, 0L), frac.select(-1L, 1L)
            let a = weights.to_type(pix.dtype)
            let lower = fy * a                     // row y1
            let upper = a.sub(lower)               // row y0
            let ux, lx = upper * fx, lower * fx
            let tapWeights =
                torch.stack([| upper - ux; ux; lower - lx; lx |], -1L)
                    .to_type(value.dtype).view(n * lq * m, l * p * 4L)
            use bag = EmbeddingBag(1L, 1L, mode = EmbeddingBagMode.Sum)
            bag.weight <- new Modules.Parameter(table.view(-1L, d).alias(), table.requires_grad)
            bag.call(index, null, tapWeights).view(n, lq, m * d))

    /// The same sums as `sampleWith` as one weighted gather of value rows (LibTorch's embedding_bag in sum mode
    /// with per-sample weights): every (query, head) is a bag of L·P·4 rows of D channels, the 4 bilinear taps of
    /// each point weighted by tap × attention weight. The rows are contiguous D-vectors of the value in its own
    /// layout [N, S, M, D], so nothing is transposed and no [N*M, D, Lq, P] sample tensor is made. Each level map
    /// gets a zero border (1 before, 2 after in x and y) and the continuous pixel coordinate is clamped to
    /// [−1, size]: inside that range the taps are exactly grid_sample's (taps outside the map read the zero border);
    /// beyond it every tap of the point reads zeros, as grid_sample's padding "zeros" gives. Differentiable in
    /// value, locations and weights (embedding_bag's backward for the table and the per-sample weights).
    ///   value: [N, S, M, D], locations: [N, Lq, M, L, P, 2], weights: [N, Lq, M, L, P] -> [N, Lq, M*D]
    let sampleGather (value: Tensor) (shapes: (int64 * int64)[]) (locations: Tensor) (weights: Tensor) : Tensor =
        validate value shapes locations weights
        Scope.run (fun () ->
            let size = pixelScale shapes value.device                                        // [1, 1, 1, L, 1, 2]
            sampleGatherPixels value shapes (locations * size - 0.5f.ToScalar()) weights)

    /// How `sample` computes the sums when no gradient is recorded.
    type Kernel =
        /// one weighted gather (`sampleGather`)
        | Gather
        /// the reference's grid_sample per level (`sampleWith`), chunked
        | GridSample

    /// A/B switch for benchmarks and tests (inference only).
    let mutable kernel = Gather

    /// A/B switch for benchmarks: false makes the grid_sample kernel use the stacked sum in inference too.
    let mutable chunked = true

    /// Multi-scale deformable sampling: in inference with the selected kernel (`Gather` unless changed); under
    /// autograd always the reference's stacked grid_sample sum, whose backward is faster on the CPU than
    /// embedding_bag's (about 0.75x of it at the released sizes) and which keeps training numerics unchanged.
    let sample (value: Tensor) (shapes: (int64 * int64)[]) (locations: Tensor) (weights: Tensor) : Tensor =
        match kernel with
        | Gather when not (torch.is_grad_enabled ()) -> sampleGather value shapes locations weights
        | _ -> sampleWith (not chunked) value shapes locations weights

/// Sizes of one multi-scale deformable attention (official MSDeformAttn(d_model, n_levels, n_heads, n_points)).
/// A record rather than four positional int64 arguments, so that two sizes cannot be swapped silently.
type MSDeformAttnConfig =
    { /// channels C of queries and values (d_model)
      DModel: int64
      /// feature levels L (n_levels)
      Levels: int64
      /// attention heads M (n_heads)
      Heads: int64
      /// sampling points P per head and level (n_points)
      Points: int64 }

/// Multi-scale deformable attention module (reference: ops/modules/ms_deform_attn.py, MSDeformAttn).
/// Submodule names are the official ones: sampling_offsets, attention_weights, value_proj, output_proj.
type MSDeformAttn(cfg: MSDeformAttnConfig) as this =
    inherit Module("MSDeformAttn")
    let dModel, nLevels, nHeads, nPoints = cfg.DModel, cfg.Levels, cfg.Heads, cfg.Points
    do if dModel % nHeads <> 0L then invalidArg (nameof dModel) $"d_model {dModel} is not divisible by {nHeads} heads"
    let sampling_offsets = Linear(dModel, nHeads * nLevels * nPoints * 2L)
    let attention_weights = Linear(dModel, nHeads * nLevels * nPoints)
    let value_proj = Linear(dModel, dModel)
    let output_proj = Linear(dModel, dModel)
    do this.RegisterComponents()

    let reset () =
        use _ = torch.no_grad ()
        init.zeros_(sampling_offsets.weight) |> ignore
        let bias =
            [| for h in 0L .. nHeads - 1L do
                 let theta = float32 h * (2.0f * float32 Math.PI / float32 nHeads)
                 let c, s = cos theta, sin theta
                 let mx = max (abs c) (abs s)
                 for _ in 0L .. nLevels - 1L do
                     for p in 0L .. nPoints - 1L do
                         yield c / mx * float32 (p + 1L)
                         yield s / mx * float32 (p + 1L) |]
        use b = torch.tensor(bias)
        sampling_offsets.bias.copy_(b) |> ignore
        init.zeros_(attention_weights.weight) |> ignore
        init.zeros_(attention_weights.bias) |> ignore
        init.xavier_uniform_(value_proj.weight) |> ignore
        init.zeros_(value_proj.bias) |> ignore
        init.xavier_uniform_(output_proj.weight) |> ignore
        init.zeros_(output_proj.bias) |> ignore

    do reset ()

    /// Offsets in pixels [N, Lq, M, L, P, 2] and attention weights softmaxed jointly over a head's L·P entries
    /// [N, Lq, M, L, P].
    let offsetsAndWeights (query: Tensor) =
        let n, lq = query.shape[0], query.shape[1]
        sampling_offsets.call(query).view(n, lq, nHeads, nLevels, nPoints, 2L),
        attention_weights.call(query).view(n, lq, nHeads, nLevels * nPoints).softmax(-1L).view(n, lq, nHeads, nLevels, nPoints)

    let checkReference (referencePoints: Tensor) =
        if referencePoints.Dimensions <> 4L || referencePoints.shape[3] <> 2L then
            invalidArg (nameof referencePoints) $"reference points must be [N, Lq, L, 2], got {Shape.show referencePoints}"

    /// Re-initialises as the official MSDeformAttn._reset_parameters (docs/architecture.md §6.4): offsets
    /// weight 0, bias = per head h the direction (cos θ_h, sin θ_h), θ_h = 2πh/M, scaled to max-abs 1, times
    /// (p + 1), same for every level; attention weights 0; value/output projections Xavier-uniform with bias 0.
    member _.ResetParameters() = reset ()

    member _.Config = cfg

    /// Sampling locations and (softmaxed) attention weights for the queries.
    ///   query: [N, Lq, C], reference: [N, Lq, L, 2] in [0, 1] (x, y) ->
    ///   locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P]
    member _.Locations(query: Tensor, referencePoints: Tensor, shapes: (int64 * int64)[]) : Tensor * Tensor =
        checkReference referencePoints
        use scope = torch.NewDisposeScope()
        let n, lq = query.shape[0], query.shape[1]
        let offsets, weights = offsetsAndWeights query
        // offset normaliser (W_l, H_l) per level
        let norm =
            torch.tensor(shapes |> Array.collect (fun (h, w) -> [| float32 w; float32 h |]), device = query.device)
                .view(1L, 1L, 1L, nLevels, 1L, 2L)
        let loc = referencePoints.view(n, lq, 1L, nLevels, 1L, 2L) + offsets / norm
        loc.MoveToOuterDisposeScope(), weights.MoveToOuterDisposeScope()

    /// query: [N, Lq, C]; referencePoints: [N, Lq, L, 2]; input: [N, S, C] with S = Σ H_l W_l;
    /// paddingMask: [N, S] (true = padding, value zeroed) or None -> [N, Lq, C]
    member this.Forward(query: Tensor, referencePoints: Tensor, input: Tensor, shapes: (int64 * int64)[],
                        paddingMask: Tensor option) : Tensor =
        if int64 shapes.Length <> nLevels then invalidArg (nameof shapes) $"{shapes.Length} level shapes, module has {nLevels} levels"
        checkReference referencePoints
        let n, s = input.shape[0], input.shape[1]
        if Array.sumBy (fun (h, w) -> h * w) shapes <> s then
            invalidArg (nameof input) $"input {Shape.show input} does not hold the levels {shapes}"
        Scope.run (fun () ->
            let value = value_proj.call input
            let value =
                match paddingMask with
                | Some mk -> value.masked_fill(mk.unsqueeze(-1L), 0.0f.AsScalar)
                | None -> value
            let value = value.view(n, s, nHeads, dModel / nHeads)
            match MsDeformAttnCore.kernel with
            | MsDeformAttnCore.Gather when not (torch.is_grad_enabled ()) ->
                // The gather works in pixels: location · size − 0.5 = (reference · size − 0.5) + offset, so the
                // offsets are neither divided by the level size nor multiplied back.
                let lq = query.shape[1]
                let offsets, weights = offsetsAndWeights query
                let size = MsDeformAttnCore.pixelScale shapes query.device
                let refPixels = (referencePoints.view(n, lq, 1L, nLevels, 1L, 2L) * size).sub_(0.5f.ToScalar())
                // in float32 also under bf16 autocast (a bf16 pixel coordinate near 96 is only good to 0.5 pixel)
                let pixels = offsets.to_type(torch.float32).add_(refPixels)
                output_proj.call (MsDeformAttnCore.sampleGatherPixels value shapes pixels weights)
            | _ ->
                let loc, weights = this.Locations(query, referencePoints, shapes)
                output_proj.call (MsDeformAttnCore.sample value shapes loc weights))
