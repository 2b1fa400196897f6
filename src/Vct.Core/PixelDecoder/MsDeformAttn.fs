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

    /// Bilinear sampling of every head's value maps at the given locations, weighted and summed over levels × points.
    /// Locations are normalised to [0, 1] (x first); pixel centres sit at (k + 0.5) / size (grid 2·loc − 1 with
    /// align_corners = false); each bilinear tap outside the map contributes zero (padding "zeros").
    ///   value: [N, S, M, D], shapes: L levels (H_l, W_l) with Σ H_l W_l = S,
    ///   locations: [N, Lq, M, L, P, 2], weights: [N, Lq, M, L, P] -> [N, Lq, M*D]
    let sampleWith (explicitSum: bool) (value: Tensor) (shapes: (int64 * int64)[]) (locations: Tensor) (weights: Tensor) : Tensor =
        Shape.requireRank (nameof value) 4 value
        Shape.requireRank (nameof locations) 6 locations
        Shape.requireRank (nameof weights) 5 weights
        let n, s, m, d = value.shape[0], value.shape[1], value.shape[2], value.shape[3]
        let lq, l, p = locations.shape[1], locations.shape[3], locations.shape[4]
        if shapes.Length <> int l then
            invalidArg (nameof shapes) $"{shapes.Length} level shapes for locations {Shape.show locations}"
        if Array.sumBy (fun (h, w) -> h * w) shapes <> s then
            invalidArg (nameof value) $"value {Shape.show value} does not hold the levels {shapes}"
        if weights.shape <> locations.shape[.. 4] then
            invalidArg (nameof weights) $"weights {Shape.show weights} do not match locations {Shape.show locations}"
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

    /// A/B switch for benchmarks: false makes `sample` use the stacked sum in inference too.
    let mutable chunked = true

    /// The chunked per-level sums in inference, the reference's stacked sum under autograd.
    let sample (value: Tensor) (shapes: (int64 * int64)[]) (locations: Tensor) (weights: Tensor) : Tensor =
        sampleWith (not chunked) value shapes locations weights

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

    /// Re-initialises as the official MSDeformAttn._reset_parameters (docs/architecture.md §6.4): offsets
    /// weight 0, bias = per head h the direction (cos θ_h, sin θ_h), θ_h = 2πh/M, scaled to max-abs 1, times
    /// (p + 1), same for every level; attention weights 0; value/output projections Xavier-uniform with bias 0.
    member _.ResetParameters() = reset ()

    member _.Config = cfg

    /// Sampling locations and (softmaxed) attention weights for the queries.
    ///   query: [N, Lq, C], reference: [N, Lq, L, 2] in [0, 1] (x, y) ->
    ///   locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P]
    member _.Locations(query: Tensor, referencePoints: Tensor, shapes: (int64 * int64)[]) : Tensor * Tensor =
        if referencePoints.Dimensions <> 4L || referencePoints.shape[3] <> 2L then
            invalidArg (nameof referencePoints) $"reference points must be [N, Lq, L, 2], got {Shape.show referencePoints}"
        use scope = torch.NewDisposeScope()
        let n, lq = query.shape[0], query.shape[1]
        let offsets = sampling_offsets.call(query).view(n, lq, nHeads, nLevels, nPoints, 2L)
        let weights =
            attention_weights.call(query).view(n, lq, nHeads, nLevels * nPoints).softmax(-1L)
                .view(n, lq, nHeads, nLevels, nPoints)
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
            let loc, weights = this.Locations(query, referencePoints, shapes)
            output_proj.call (MsDeformAttnCore.sample value shapes loc weights))
