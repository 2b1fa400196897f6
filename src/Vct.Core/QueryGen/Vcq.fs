namespace Vct.Core.QueryGen

open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Layers

/// Hyper-parameters of the vision-derived query block (PPQG, docs/architecture.md §7).
type VcqConfig =
    { /// Channels of the mask features and of the queries (256 in every released model).
      Channels: int64
      /// H*W of the mask features: 96*96 = 9216 for a 384 input (the official code hard-codes it).
      NumPixels: int64
      /// N, number of queries (100).
      NumQueries: int64
      /// K learnable class prototypes (ProtoVCQ: S4 23, AVSS 71); None = VCQ (MS3), no prototypes.
      NumPrototypes: int64 option
      /// Heads of the prototype pre-attention (4).
      PrototypeHeads: int64 }

    /// The block for mask features of `height` x `width` pixels.
    static member For(height: int64, width: int64, prototypes: int64 option) =
        { Channels = 256L; NumPixels = height * width; NumQueries = 100L; NumPrototypes = prototypes; PrototypeHeads = 4L }

/// What the query block produced: queries [N, B, C], the repeated prototypes [K, B, C] (ProtoVCQ only),
/// and the pixel-to-query assignment [B, 1, N, HW] (one-hot per pixel in eval) for inspection.
type VcqOutput =
    { Queries: Tensor
      Prototypes: Tensor option
      Assignment: Tensor }

/// Prototype-prompted query generation (`ProtoVCQ`, with prototypes) or `VCQ` (without), written from the
/// paper and docs/architecture.md §7: pre-projection convs, token mixing from pixels to N queries, optional prototype
/// cross-attention, and hard pixel grouping added residually.
///   mask features [B, C, H, W] -> queries [N, B, C]
type VisualQueryBlock(cfg: VcqConfig, gen: torch.Generator) as this =
    inherit Module("VisualQueryBlock")
    let c = cfg.Channels
    let pre_proj =
        Sequential(
            Conv2d(c, c, 1L), ReLU(), Conv2d(c, c, 3L, padding = 1L), ReLU(), Conv2d(c, c, 1L))
    let query_mixer = new MLP(cfg.NumPixels, c, cfg.NumQueries, 3)
    let assign_attn = new AssignAttention(AssignConfig.Default c, gen)
    // Only registered for ProtoVCQ, so that VCQ's state dict has no prototype keys (as the official one).
    let prototype = cfg.NumPrototypes |> Option.map (fun k -> Embedding(k, c))
    let pre_attn = cfg.NumPrototypes |> Option.map (fun _ -> new CrossAttentionLayer(c, cfg.PrototypeHeads))

    do
        this.RegisterComponents()
        match prototype, pre_attn with
        | Some p, Some a ->
            this.register_module("prototype", p)
            this.register_module("pre_attn", a)
        | _ -> ()

    new(cfg: VcqConfig) = new VisualQueryBlock(cfg, new torch.Generator(0UL))

    member _.Config = cfg

    /// Full output; `noise` fixes the Gumbel noise [B, 1, N, HW] in training (tests), else it is drawn.
    member _.Forward(x: Tensor, ?noise: Tensor) : VcqOutput =
        use scope = torch.NewDisposeScope()
        let b = x.shape[0]
        if x.shape[1] <> c || x.shape[2] * x.shape[3] <> cfg.NumPixels then
            invalidArg "x" $"mask features must be [B, {c}, H, W] with H*W = {cfg.NumPixels}, got {Shape.show x}"
        let pixels = pre_proj.call(x).flatten(2L)                             // [B, C, HW]
        let queries = query_mixer.Forward(pixels).permute(2L, 0L, 1L)             // [N, B, C]
        let queries, protos =
            match prototype, pre_attn with
            | Some p, Some a ->
                let protos = p.weight.unsqueeze(1L).repeat(1L, b, 1L)          // [K, B, C]
                a.Forward(queries, protos, None, None, None), Some protos
            | _ -> queries, None
        let qb = queries.transpose(0L, 1L)                                     // [B, N, C]
        let grouped, maps = assign_attn.Forward(qb, pixels.transpose(1L, 2L), ?noise = noise)
        let out = (qb + grouped).transpose(0L, 1L)                             // [N, B, C]
        { Queries = out.MoveToOuterDisposeScope()
          Prototypes = protos |> Option.map (fun p -> p.MoveToOuterDisposeScope())
          Assignment = maps.Hard.MoveToOuterDisposeScope() }
