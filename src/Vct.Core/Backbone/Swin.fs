namespace Vct.Core.Backbone

open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform

/// Hyper-parameters of the Swin backbone (reference: swinb.py, SwinTransformer / D2SwinTransformer; config keys
/// MODEL.SWIN.*). Absolute position embeddings (APE) are not supported: every released config has APE off.
type SwinConfig =
    { PatchSize: int64        // PATCH_SIZE
      InChans: int64
      EmbedDim: int64         // EMBED_DIM, channels of stage 0
      Depths: int[]           // DEPTHS, blocks per stage
      NumHeads: int64[]       // NUM_HEADS, per stage
      WindowSize: int64       // WINDOW_SIZE; odd blocks shift by WindowSize / 2
      MlpRatio: float
      QkvBias: bool
      QkScale: float option   // QK_SCALE; None = head_dim^-0.5
      DropRate: float
      AttnDropRate: float
      DropPathRate: float     // stochastic depth, linear 0 -> rate over all blocks
      PatchNorm: bool         // LayerNorm after the patch embedding
      OutIndices: int[] }     // stages whose (normed) output is returned as res{i+2}

    /// Swin-B, window 12, as the released VCT models use it (embed 128, depths 2/2/18/2, heads 4/8/16/32).
    static member SwinB384 =
        { PatchSize = 4L; InChans = 3L; EmbedDim = 128L; Depths = [| 2; 2; 18; 2 |]; NumHeads = [| 4L; 8L; 16L; 32L |]
          WindowSize = 12L; MlpRatio = 4.0; QkvBias = true; QkScale = None; DropRate = 0.0; AttnDropRate = 0.0
          DropPathRate = 0.3; PatchNorm = true; OutIndices = [| 0; 1; 2; 3 |] }

    /// A small four-stage Swin for tests (embed 32, depths 2/2/2/2, heads 1/2/4/8, window 4): same code paths.
    static member Tiny =
        { SwinConfig.SwinB384 with
            EmbedDim = 32L; Depths = [| 2; 2; 2; 2 |]; NumHeads = [| 1L; 2L; 4L; 8L |]; WindowSize = 4L; DropPathRate = 0.1 }

    /// Channels of stage i: EmbedDim * 2^i.
    member c.StageDim(i: int) = c.EmbedDim * (1L <<< i)
    /// Channels of the returned features, in OutIndices order.
    member c.OutChannels = c.OutIndices |> Array.map c.StageDim
    /// Strides of the returned features w.r.t. the input, in OutIndices order (4, 8, 16, 32 for Swin-B).
    member c.OutStrides = c.OutIndices |> Array.map (fun i -> c.PatchSize * (1L <<< i))
    member c.WithDropPathRate(rate: float) = { c with DropPathRate = rate }

    /// Fails with invalidArg unless the sizes are consistent.
    member c.Validate() =
        if c.Depths.Length = 0 || c.Depths.Length <> c.NumHeads.Length then
            invalidArg "config" $"Depths ({c.Depths.Length}) and NumHeads ({c.NumHeads.Length}) must be non-empty and equally long"
        for i in 0 .. c.Depths.Length - 1 do
            if c.StageDim i % c.NumHeads[i] <> 0L then
                invalidArg "config" $"stage {i}: {c.StageDim i} channels are not divisible by {c.NumHeads[i]} heads"
        if c.WindowSize < 1L || c.PatchSize < 1L then invalidArg "config" "WindowSize and PatchSize must be >= 1"
        for i in c.OutIndices do
            if i < 0 || i >= c.Depths.Length then invalidArg "config" $"OutIndices has {i}, outside 0..{c.Depths.Length - 1}"

/// Batch padding as detectron2's ImageList.from_tensors (detectron2 `structures/image_list.py`): the model pads frames and Maskiges with
/// zeros (in normalised space) at the bottom/right to a multiple of MASK_FORMER.SIZE_DIVISIBILITY (32) before the
/// backbones. The Swin modules accept any size; this is the step in front of them.
[<RequireQualifiedAccess>]
module ImagePadding =
    /// x: [B, C, H, W] -> [B, C, ceil(H/d)·d, ceil(W/d)·d] (x itself when nothing to pad)
    let toDivisible (divisibility: int64) (x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        if divisibility < 1L then invalidArg (nameof divisibility) $"divisibility {divisibility} must be >= 1"
        let h, w = x.shape[2], x.shape[3]
        let ph, pw = Windows.roundUp divisibility h - h, Windows.roundUp divisibility w - w
        if ph = 0L && pw = 0L then x
        else Scope.run (fun () -> functional.pad(x, [| 0L; pw; 0L; ph |]))

/// Stochastic depth as timm's DropPath: in training, each sample's residual branch is zeroed with probability
/// `rate` and the survivors are scaled by 1 / (1 - rate); identity in eval mode.
[<RequireQualifiedAccess>]
module DropPath =
    /// x: [B, ...] -> [B, ...]
    let apply (rate: float) (training: bool) (gen: torch.Generator option) (x: Tensor) : Tensor =
        if rate <= 0.0 || not training then x
        else
            Scope.run (fun () ->
                let keep = 1.0 - rate
                let shape = Array.init (int x.Dimensions) (fun i -> if i = 0 then x.shape[0] else 1L)
                let u = BatchSlice.rand shape x.dtype x.device gen
                let mask = (u + keep.AsScalar).floor_()
                x.div(keep.AsScalar) * mask)

/// Two-layer MLP with GELU (reference: swinb.py, Mlp). x: [.., C] -> [.., C]
type SwinMlp(dim: int64, hidden: int64, drop: float) as this =
    inherit Module("Mlp")
    let fc1 = Linear(dim, hidden)
    let fc2 = Linear(hidden, dim)
    do this.RegisterComponents()

    member _.Forward(x: Tensor) : Tensor =
        Scope.run (fun () ->
            let pre = fc1.call x
            let h = functional.gelu pre
            pre.Dispose()   // the widest temporary ([.., 4C]); autograd keeps what it needs
            let h = functional.dropout(h, drop, this.training)
            functional.dropout(fc2.call h, drop, this.training))

/// Window multi-head self-attention with a learned relative-position bias (reference: swinb.py, WindowAttention).
/// The relative_position_index is a persistent buffer, as in the official checkpoints.
type WindowAttention(dim: int64, windowSize: int64, numHeads: int64, qkvBias: bool, qkScale: float option,
                     attnDrop: float, projDrop: float) as this =
    inherit Module("WindowAttention")
    let n = windowSize * windowSize
    let headDim = dim / numHeads
    let scale = defaultArg qkScale (Math.Pow(float headDim, -0.5))
    let relative_position_bias_table =
        Parameter(torch.zeros((2L * windowSize - 1L) * (2L * windowSize - 1L), numHeads).DetachFromDisposeScope())  // [(2ws-1)^2, h]
    let relative_position_index = (Windows.relativePositionIndex windowSize).DetachFromDisposeScope()             // [N, N] int64
    let qkv = Linear(dim, 3L * dim, hasBias = qkvBias)
    let proj = Linear(dim, dim)
    do
        use _ = torch.no_grad ()
        init.trunc_normal_(relative_position_bias_table, std = 0.02) |> ignore
    do this.RegisterComponents()

    member _.NumHeads = numHeads
    member _.RelativePositionIndex = relative_position_index

    /// The bias added to the attention logits. -> [h, N, N]
    member _.RelativePositionBias() : Tensor =
        Scope.run (fun () ->
            relative_position_bias_table.index_select(0L, relative_position_index.view(-1L))
                .view(n, n, -1L).permute(2L, 0L, 1L).contiguous())

    /// x: [B*nW, N, C]; mask: additive [nW, N, N] or None -> [B*nW, N, C]
    member this.Forward(x: Tensor, mask: Tensor option) : Tensor =
        if Attention.usesFused () && not (this.training && attnDrop > 0.0) then this.ForwardFused(x, mask)
        else this.ForwardExplicit(x, mask)

    /// Inference path: LibTorch's fused attention with bias (+ shift mask) as the additive attn_mask; the
    /// [B_, h, N, N] logits are never materialised. Same values as ForwardExplicit within float rounding.
    member private this.ForwardFused(x: Tensor, mask: Tensor option) : Tensor =
        Scope.run (fun () ->
            let b_, m, c = x.shape[0], x.shape[1], x.shape[2]
            if m <> n || c <> dim then invalidArg (nameof x) $"expected [B*nW, {n}, {dim}], got {Shape.show x}"
            let d = c / numHeads
            // SDPA scales by d^-0.5; a configured QK_SCALE is folded into q.
            let qScale = scale * sqrt (float d)
            let bias = this.RelativePositionBias()                                          // [h, N, N]
            let y =
                match mask with
                | None ->
                    // [B_, N, 3, h, d] -> [3, B_, h, N, d], one copy for q, k and v
                    let qkv = qkv.call(x).view(b_, n, 3L, numHeads, d).permute(2L, 0L, 3L, 1L, 4L).contiguous()
                    let q = if qScale = 1.0 then qkv[0L] else qkv[0L] * qScale.AsScalar
                    Attention.additive q qkv[1L] qkv[2L] (Some(bias.unsqueeze(0L)))          // [B_, h, N, d]
                | Some mk ->
                    let nW = mk.shape[0]
                    if b_ % nW <> 0L then invalidArg (nameof mask) $"mask {Shape.show mk} does not fit {b_} windows"
                    let b = b_ / nW
                    // windows of one image side by side with the heads, so that the per-window mask broadcasts
                    // over the batch: [B, nW, N, 3, h, d] -> [3, B, nW*h, N, d]
                    let qkv =
                        qkv.call(x).view(b, nW, n, 3L, numHeads, d).permute(3L, 0L, 1L, 4L, 2L, 5L)
                            .reshape(3L, b, nW * numHeads, n, d)
                    let q = if qScale = 1.0 then qkv[0L] else qkv[0L] * qScale.AsScalar
                    let full = (mk.unsqueeze(1L) + bias.unsqueeze(0L)).view(1L, nW * numHeads, n, n)   // [1, nW*h, N, N]
                    (Attention.additive q qkv[1L] qkv[2L] (Some full)).reshape(b_, numHeads, n, d)
            let y = y.transpose(1L, 2L).reshape(b_, n, c)                                    // [B_, N, C]
            functional.dropout(proj.call y, projDrop, this.training))

    /// The reference's explicit product, bias, mask, softmax and product (training: autograd through all).
    member private this.ForwardExplicit(x: Tensor, mask: Tensor option) : Tensor =
        Scope.run (fun () ->
            let b_, m, c = x.shape[0], x.shape[1], x.shape[2]
            if m <> n || c <> dim then invalidArg (nameof x) $"expected [B*nW, {n}, {dim}], got {Shape.show x}"
            let qkv = qkv.call(x).reshape(b_, n, 3L, numHeads, c / numHeads).permute(2L, 0L, 3L, 1L, 4L)  // [3, B_, h, N, d]
            let q = qkv[0L] * scale.AsScalar
            let k = qkv[1L]
            let v = qkv[2L]
            // NOTE: the bias and the mask are added in place and the logits freed right after the softmax: same
            // values as the reference's out-of-place adds, but one [B_, h, N, N] buffer instead of three.
            let logits = q.matmul(k.transpose(-2L, -1L))                                 // [B_, h, N, N]
            logits.add_(this.RelativePositionBias().unsqueeze(0L)) |> ignore
            match mask with
            | Some mk ->
                let nW = mk.shape[0]
                if b_ % nW <> 0L then invalidArg (nameof mask) $"mask {Shape.show mk} does not fit {b_} windows"
                logits.view(b_ / nW, nW, numHeads, n, n).add_(mk.unsqueeze(1L).unsqueeze(0L)) |> ignore
            | None -> ()
            let attn = logits.softmax(-1L)
            logits.Dispose()
            let attn = functional.dropout(attn, attnDrop, this.training)
            let y = attn.matmul(v).transpose(1L, 2L).reshape(b_, n, c)                    // [B_, N, C]
            functional.dropout(proj.call y, projDrop, this.training))

/// One Swin block: LN -> (shifted) window attention -> residual -> LN -> MLP -> residual
/// (reference: swinb.py, SwinTransformerBlock). The map is padded (after norm1) to a multiple of the window.
type SwinTransformerBlock(dim: int64, numHeads: int64, windowSize: int64, shiftSize: int64, cfg: SwinConfig,
                          dropPath: float, gen: torch.Generator option) as this =
    inherit Module("SwinTransformerBlock")
    do if shiftSize < 0L || shiftSize >= windowSize then
        invalidArg (nameof shiftSize) $"shift {shiftSize} must be in [0, {windowSize})"
    let norm1 = LayerNorm([| dim |])
    let attn = new WindowAttention(dim, windowSize, numHeads, cfg.QkvBias, cfg.QkScale, cfg.AttnDropRate, cfg.DropRate)
    let norm2 = LayerNorm([| dim |])
    let mlp = new SwinMlp(dim, int64 (float dim * cfg.MlpRatio), cfg.DropRate)
    do this.RegisterComponents()

    member _.ShiftSize = shiftSize
    member _.Attn = attn

    /// x: [B, H*W, C]; shiftMask: [nW, ws*ws, ws*ws] of the padded map (used only when shifted) -> [B, H*W, C]
    member this.Forward(x: Tensor, h: int64, w: int64, shiftMask: Tensor) : Tensor =
        Scope.run (fun () ->
            let b, l, c = x.shape[0], x.shape[1], x.shape[2]
            if l <> h * w || c <> dim then invalidArg (nameof x) $"expected [B, {h}*{w}, {dim}], got {Shape.show x}"
            let shortcut = x
            let y = norm1.call(x).view(b, h, w, c)
            let padR = (windowSize - w % windowSize) % windowSize
            let padB = (windowSize - h % windowSize) % windowSize
            let y = if padR > 0L || padB > 0L then functional.pad(y, [| 0L; 0L; 0L; padR; 0L; padB |]) else y
            let hp, wp = y.shape[1], y.shape[2]
            let shifted, mask =
                if shiftSize > 0L then y.roll([| -shiftSize; -shiftSize |], [| 1L; 2L |]), Some shiftMask
                else y, None
            let windows = Windows.partition windowSize shifted |> fun t -> t.view(-1L, windowSize * windowSize, c)
            let attnWindows = attn.Forward(windows, mask).view(-1L, windowSize, windowSize, c)
            let shifted = Windows.reverse windowSize hp wp attnWindows                  // [B, Hp, Wp, C]
            let y = if shiftSize > 0L then shifted.roll([| shiftSize; shiftSize |], [| 1L; 2L |]) else shifted
            let y = if padR > 0L || padB > 0L then y.narrow(1L, 0L, h).narrow(2L, 0L, w).contiguous() else y
            let y = y.view(b, h * w, c)
            let x = shortcut + DropPath.apply dropPath this.training gen y
            x + DropPath.apply dropPath this.training gen (mlp.Forward (norm2.call x)))

/// 2x2 patch merging: concat (even,even), (odd,even), (even,odd), (odd,odd) -> LayerNorm(4C) -> Linear(4C -> 2C)
/// (reference: swinb.py, PatchMerging). Odd sizes are zero-padded at the bottom/right.
type PatchMerging(dim: int64) as this =
    inherit Module("PatchMerging")
    let reduction = Linear(4L * dim, 2L * dim, hasBias = false)
    let norm = LayerNorm([| 4L * dim |])
    do this.RegisterComponents()

    /// x: [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]
    member _.Forward(x: Tensor, h: int64, w: int64) : Tensor =
        Scope.run (fun () ->
            let b, l, c = x.shape[0], x.shape[1], x.shape[2]
            if l <> h * w then invalidArg (nameof x) $"expected [B, {h}*{w}, C], got {Shape.show x}"
            let y = x.view(b, h, w, c)
            let y = if h % 2L = 1L || w % 2L = 1L then functional.pad(y, [| 0L; 0L; 0L; w % 2L; 0L; h % 2L |]) else y
            let hh, ww = y.shape[1], y.shape[2]
            let x0 = y.slice(1L, 0L, hh, 2L).slice(2L, 0L, ww, 2L)
            let x1 = y.slice(1L, 1L, hh, 2L).slice(2L, 0L, ww, 2L)
            let x2 = y.slice(1L, 0L, hh, 2L).slice(2L, 1L, ww, 2L)
            let x3 = y.slice(1L, 1L, hh, 2L).slice(2L, 1L, ww, 2L)
            let y = torch.cat([| x0; x1; x2; x3 |], -1L).view(b, -1L, 4L * c)            // [B, H/2*W/2, 4C]
            reduction.call (norm.call y))

/// One stage: `depth` blocks (odd ones shifted by ws/2, always, even when the map fits one window), then an
/// optional patch merging (reference: swinb.py, BasicLayer).
type SwinStage(dim: int64, depth: int, numHeads: int64, cfg: SwinConfig, dropPaths: float[], downsample: bool,
               gen: torch.Generator option) as this =
    inherit Module("BasicLayer")
    let ws = cfg.WindowSize
    let shift = ws / 2L
    let blocks =
        ModuleList<SwinTransformerBlock>(
            Array.init depth (fun i ->
                new SwinTransformerBlock(dim, numHeads, ws, (if i % 2 = 0 then 0L else shift), cfg, dropPaths[i], gen)))
    do this.RegisterComponents()
    let merging = if downsample then Some(new PatchMerging(dim)) else None
    do merging |> Option.iter (fun m -> this.register_module("downsample", m))

    member _.Blocks = blocks
    member _.Downsample = merging

    /// x: [B, H*W, C] -> (stage output [B, H*W, C], H, W, next input [B, H'*W', 2C] (or x), H', W')
    member _.Forward(x: Tensor, h: int64, w: int64) : Tensor * int64 * int64 * Tensor * int64 * int64 =
        use scope = torch.NewDisposeScope()
        let hp, wp = Windows.roundUp ws h, Windows.roundUp ws w
        let mask = Windows.shiftMask hp wp ws shift x.device
        let mutable y = x
        for blk in blocks do
            y <- blk.Forward(y, h, w, mask)
        match merging with
        | Some m ->
            let down = m.Forward(y, h, w)
            y.MoveToOuterDisposeScope(), h, w, down.MoveToOuterDisposeScope(), (h + 1L) / 2L, (w + 1L) / 2L
        | None ->
            let y = y.MoveToOuterDisposeScope()
            y, h, w, y, h, w

/// Patch embedding: zero-pad to a multiple of the patch size (right/bottom), conv k=s=patch, optional LayerNorm
/// (reference: swinb.py, PatchEmbed). x: [B, 3, H, W] -> [B, C, ceil(H/p), ceil(W/p)]
type PatchEmbed(patchSize: int64, inChans: int64, embedDim: int64, patchNorm: bool) as this =
    inherit Module("PatchEmbed")
    let proj = Conv2d(inChans, embedDim, patchSize, stride = patchSize)
    do this.RegisterComponents()
    let norm = if patchNorm then Some(LayerNorm([| embedDim |])) else None
    do norm |> Option.iter (fun n -> this.register_module("norm", n))

    member _.Forward(x: Tensor) : Tensor =
        Scope.run (fun () ->
            let hIn, wIn = x.shape[2], x.shape[3]
            let x = if wIn % patchSize <> 0L then functional.pad(x, [| 0L; patchSize - wIn % patchSize |]) else x
            let x = if hIn % patchSize <> 0L then functional.pad(x, [| 0L; 0L; 0L; patchSize - hIn % patchSize |]) else x
            let y = proj.call x                                                            // [B, C, Wh, Ww]
            match norm with
            | Some n ->
                let wh, ww = y.shape[2], y.shape[3]
                n.call(y.flatten(2L).transpose(1L, 2L)).transpose(1L, 2L).view(-1L, embedDim, wh, ww)
            | None -> y)

/// Swin Transformer backbone returning the normed stage outputs res{i+2} for i in OutIndices, NCHW
/// (reference: swinb.py, SwinTransformer / D2SwinTransformer). Parameter and buffer names are the official ones
/// (patch_embed.*, layers.i.blocks.j.*, layers.i.downsample.*, norm{i}.*).
///   x: [B, InChans, H, W] (any H, W) -> [| [B, C_i, ceil(H/s_i), ceil(W/s_i)] for i in OutIndices |]
type SwinTransformer(cfg: SwinConfig, ?gen: torch.Generator) as this =
    inherit Module("SwinTransformer")
    do cfg.Validate()
    let nLayers = cfg.Depths.Length
    let total = Array.sum cfg.Depths
    let dpr =   // linspace(0, rate, total), as float32 like the reference's torch.linspace(..).item()
        Array.init total (fun i -> if total = 1 then 0.0 else float (float32 (cfg.DropPathRate * float i / float (total - 1))))
    let patch_embed = new PatchEmbed(cfg.PatchSize, cfg.InChans, cfg.EmbedDim, cfg.PatchNorm)
    let layers =
        ModuleList<SwinStage>(
            Array.init nLayers (fun i ->
                let start = Array.sum cfg.Depths[.. i - 1]
                new SwinStage(cfg.StageDim i, cfg.Depths[i], cfg.NumHeads[i], cfg, dpr[start .. start + cfg.Depths[i] - 1],
                              (i < nLayers - 1), gen)))
    do this.RegisterComponents()
    let norms =
        cfg.OutIndices |> Array.map (fun i ->
            let n = LayerNorm([| cfg.StageDim i |])
            this.register_module($"norm{i}", n)
            i, n)

    member _.Config = cfg
    member _.Layers = layers
    member _.PatchEmbed = patch_embed

    member _.Forward(x: Tensor) : Tensor[] =
        Shape.requireRank (nameof x) 4 x
        if x.shape[1] <> cfg.InChans then invalidArg (nameof x) $"expected [B, {cfg.InChans}, H, W], got {Shape.show x}"
        use scope = torch.NewDisposeScope()
        let y = patch_embed.Forward x
        let mutable wh, ww = y.shape[2], y.shape[3]
        let mutable cur = functional.dropout(y.flatten(2L).transpose(1L, 2L), cfg.DropRate, this.training)  // [B, HW, C]
        let outs = ResizeArray<Tensor>()
        for i in 0 .. nLayers - 1 do
            let xOut, h, w, next, h2, w2 = layers[i].Forward(cur, wh, ww)
            match norms |> Array.tryFind (fun (j, _) -> j = i) with
            | Some(_, n) ->
                let o = n.call(xOut).view(-1L, h, w, cfg.StageDim i).permute(0L, 3L, 1L, 2L).contiguous()
                outs.Add(o.MoveToOuterDisposeScope())
            | None -> ()
            cur <- next
            wh <- h2
            ww <- w2
        outs.ToArray()
