namespace Vct.Core.QueryGen

open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform

/// Hyper-parameters of the pixel-to-query assignment attention (docs/architecture.md §7.3).
type AssignConfig =
    { /// C, channels of queries and keys.
      Dim: int64
      /// h, must divide Dim.
      NumHeads: int64
      QkvBias: bool
      /// Straight-through one-hot assignment.
      Hard: bool
      /// Gumbel noise while training.
      Gumbel: bool
      GumbelTau: float
      /// Rows are divided by (count + AssignEps).
      AssignEps: float }

    /// The settings PPQG uses: 1 head, bias, hard, Gumbel in training, tau 1, eps 1.
    static member Default(dim: int64) =
        { Dim = dim; NumHeads = 1L; QkvBias = true; Hard = true; Gumbel = true; GumbelTau = 1.0; AssignEps = 1.0 }

/// Parameter-free assignment functions (written from the paper's description, docs/architecture.md §7.3).
[<RequireQualifiedAccess>]
module Grouping =
    /// Forward: one-hot of the arg-max along `dim` (first maximum on ties). Backward: the softmax gradient.
    let hardSoftmax (dim: int64) (logits: Tensor) : Tensor =
        Scope.run (fun () ->
            let soft = logits.softmax(dim)
            let index = soft.argmax(dim, keepdim = true)
            let hard = torch.zeros_like(logits).scatter_(dim, index, torch.ones_like(index, dtype = logits.dtype))
            hard - soft.detach() + soft)

    /// Standard Gumbel(0, 1) noise of `shape` from `gen` (never infinite).
    let gumbelNoise (shape: int64[]) (dtype: torch.ScalarType) (device: torch.Device) (gen: torch.Generator) =
        Scope.run (fun () ->
            let u = BatchSlice.rand shape dtype device (Some gen)
            u.clamp(min = (1e-10).AsScalar, max = (1.0 - 1e-7).AsScalar).log().neg().log().neg())

    /// Gumbel-softmax along `dim` with the given noise: softmax((logits + noise) / tau), hard or soft.
    let gumbelSoftmaxWith (tau: float) (hard: bool) (dim: int64) (noise: Tensor) (logits: Tensor) =
        Scope.run (fun () ->
            let y = (logits + noise).div(tau.AsScalar)
            if hard then hardSoftmax dim y else y.softmax(dim))

/// What one assignment computed, for inspection: `Hard` is the (straight-through) assignment before
/// row normalisation [B, h, N, S]; `Logits` the raw scaled logits [B, h, N, S].
type AssignmentMaps = { Hard: Tensor; Logits: Tensor }

/// Assigns S key tokens (pixels) to N query slots: every pixel picks one query (softmax over the query axis),
/// each query's row is divided by its count + eps, and the projected mean of its pixels is returned.
///   query [B, N, C], key [B, S, C] -> [B, N, C]
type AssignAttention(cfg: AssignConfig, gen: torch.Generator) as this =
    inherit Module("AssignAttention")
    do
        if cfg.Dim % cfg.NumHeads <> 0L then
            invalidArg (nameof cfg) $"Dim {cfg.Dim} is not divisible by NumHeads {cfg.NumHeads}"

    let q_proj = Linear(cfg.Dim, cfg.Dim, hasBias = cfg.QkvBias)
    let k_proj = Linear(cfg.Dim, cfg.Dim, hasBias = cfg.QkvBias)
    let v_proj = Linear(cfg.Dim, cfg.Dim, hasBias = cfg.QkvBias)
    let proj = Linear(cfg.Dim, cfg.Dim)
    let scale = 1.0 / sqrt (float (cfg.Dim / cfg.NumHeads))
    do this.RegisterComponents()

    let heads (x: Tensor) = x.view(x.shape[0], x.shape[1], cfg.NumHeads, -1L).transpose(1L, 2L) // [B, M, C] -> [B, h, M, C/h]

    new(cfg: AssignConfig) = new AssignAttention(cfg, new torch.Generator(0UL))

    member _.Config = cfg

    /// query [B, N, C], key [B, S, C] -> the output [B, N, C] and the maps. `noise` fixes the Gumbel noise
    /// [B, h, N, S] (omitted: drawn from the generator in training, none in eval).
    member _.Forward(query: Tensor, key: Tensor, ?noise: Tensor) : Tensor * AssignmentMaps =
        use scope = torch.NewDisposeScope()
        let b, n, c = query.shape[0], query.shape[1], query.shape[2]
        let q = heads (q_proj.call query)                                    // [B, h, N, C/h]
        let k = heads (k_proj.call key)                                      // [B, h, S, C/h]
        let v = heads (v_proj.call key)                                      // [B, h, S, C/h]
        let logits = q.matmul(k.transpose(-2L, -1L)) * scale.AsScalar      // [B, h, N, S]
        let attn =
            if cfg.Gumbel && this.training then
                let g =
                    match noise with
                    | Some g -> g
                    | None -> Grouping.gumbelNoise logits.shape logits.dtype logits.device gen
                Grouping.gumbelSoftmaxWith cfg.GumbelTau cfg.Hard -2L g logits
            elif cfg.Hard then Grouping.hardSoftmax -2L logits
            else logits.softmax(-2L)
        let normalised = attn / (attn.sum(-1L, keepdim = true) + cfg.AssignEps.AsScalar)
        let out = normalised.matmul(v).transpose(1L, 2L).reshape(b, n, c)     // [B, N, C]
        let result = proj.call out
        result.MoveToOuterDisposeScope(),
        { Hard = attn.MoveToOuterDisposeScope(); Logits = logits.MoveToOuterDisposeScope() }
