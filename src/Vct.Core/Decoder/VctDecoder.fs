namespace Vct.Core.Decoder

open System
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Layers
open Vct.Core.Platform
open Vct.Core.QueryGen
open Vct.Core.PixelDecoder

/// Hyper-parameters of the iterative audio-visual decoder (`MultiScaleMaskedVCTDecoder`, docs/architecture.md §8.1).
type VctDecoderConfig =
    { /// Hidden width (256).
      HiddenDim: int64
      /// N queries (100).
      NumQueries: int64
      /// Heads of the decoder attentions (8).
      NumHeads: int64
      /// FFN width (2048).
      DimFeedforward: int64
      /// Decoder layers: MODEL.MASK_FORMER.DEC_LAYERS minus 1 (9).
      DecLayers: int
      /// C, classes without the no-object class (S4/MS3 2, AVSS 71); the class head has C + 1 outputs.
      NumClasses: int64
      /// PPQG settings (prototypes: S4 23, AVSS 71; none for MS3).
      Query: VcqConfig
      /// Audio/prototype projections for the prototype loss (S4, AVSS).
      ProtoProjections: bool }

    /// The released configuration for mask features of `maskH` x `maskW` (96x96 at a 384 input).
    static member Released(numClasses: int64, prototypes: int64 option, maskH: int64, maskW: int64) =
        { HiddenDim = 256L; NumQueries = 100L; NumHeads = 8L; DimFeedforward = 2048L; DecLayers = 9
          NumClasses = numClasses
          Query = VcqConfig.For(maskH, maskW, prototypes)
          ProtoProjections = prototypes.IsSome }

/// One prediction: class logits [BT, N, C+1] and mask logits [BT, N, H, W] (mask-feature resolution).
type Prediction = { Logits: Tensor; Masks: Tensor }

/// Everything the decoder returns. `Predictions` holds all 1 + DecLayers predictions in order (the initial
/// one on the PPQG queries first; the last one is the model's output, the others the auxiliary outputs).
type DecoderOutput =
    { Predictions: Prediction list
      /// normalise(audio_proj(mean of the audio map)) [BT, C] (S4, AVSS), for the prototype loss.
      AudioFeat: Tensor option
      /// normalise(proto_proj(prototypes)) [BT, K, C] (S4, AVSS).
      ProtoFeat: Tensor option
      /// PPQG pixel-to-query assignment [BT, 1, N, HW] (one-hot per pixel in eval).
      Assignment: Tensor
      /// Boolean attention mask used by each layer [BT*h, N, HW] (True = blocked), when requested.
      AttentionMasks: Tensor list }
    member o.Last = List.last o.Predictions
    interface ITensorOwner with
        member o.Tensors =
            seq {
                for p in o.Predictions do
                    yield p.Logits
                    yield p.Masks
                yield! Option.toList o.AudioFeat
                yield! Option.toList o.ProtoFeat
                yield o.Assignment
                yield! o.AttentionMasks }
    interface IDisposable with
        member o.Dispose() = Scope.disposeOwned o

/// The decoder's prediction heads (shared by all predictions, docs/architecture.md §8.6) as pure functions.
[<RequireQualifiedAccess>]
module PredictionHeads =
    /// Mask2Former masked attention (docs/architecture.md §8.5): bilinear resize of the mask logits to `size`,
    /// sigmoid < 0.5 = blocked, repeated per head batch-major and detached. masks [BT, N, H, W] -> bool [BT*heads, N, h*w]
    let attentionMask (numHeads: int64) (h: int64, w: int64) (masks: Tensor) : Tensor =
        Scope.run (fun () ->
            let resized = functional.interpolate(masks.detach(), [| h; w |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
            let blocked = resized.sigmoid().flatten(2L).lt(0.5.AsScalar)                      // [BT, N, hw]
            blocked.unsqueeze(1L).expand(-1L, numHeads, -1L, -1L).flatten(0L, 1L).contiguous())

    /// The same blocked mask from mask logits already at the attention level's size, once for all heads:
    /// masks [BT, N, h, w] -> bool [BT, N, h*w] (sigmoid < 0.5 = blocked, detached).
    let sharedAttentionMask (masks: Tensor) : Tensor =
        Scope.run (fun () -> masks.detach().sigmoid().flatten(2L).lt(0.5.AsScalar))

    /// Rows blocked everywhere are opened completely (the official reset before each visual layer).
    let openFullyMaskedRows (mask: Tensor) : Tensor =
        Scope.run (fun () ->
            let full = mask.all(-1L, keepdim = true)                                          // [BT*h, N, 1]
            mask.logical_and(full.logical_not()))

/// The iterative audio-visual decoder: PPQG queries, then layers cycling audio -> res5 -> res4 -> res3 with
/// masked cross-attention, self-attention and FFN, and shared prediction heads (docs/architecture.md §8; official
/// `MultiScaleMaskedVCTDecoder`, state-dict prefix `sem_seg_head.predictor.`).
type VctDecoder(cfg: VctDecoderConfig, gen: torch.Generator) as this =
    inherit Module("VctDecoder")
    let d = cfg.HiddenDim
    let transformer_cross_attention_layers =
        ModuleList<CrossAttentionLayer>([| for _ in 1 .. cfg.DecLayers -> new CrossAttentionLayer(d, cfg.NumHeads) |])
    let transformer_self_attention_layers =
        ModuleList<SelfAttentionLayer>([| for _ in 1 .. cfg.DecLayers -> new SelfAttentionLayer(d, cfg.NumHeads) |])
    let transformer_ffn_layers =
        ModuleList<FFNLayer>([| for _ in 1 .. cfg.DecLayers -> new FFNLayer(d, cfg.DimFeedforward) |])
    let decoder_norm = LayerNorm(d)
    let query_feat = Embedding(cfg.NumQueries, d)
    let query_embed = Embedding(cfg.NumQueries, d)
    let level_embed = Embedding(4L, d)
    let class_embed = Linear(d, cfg.NumClasses + 1L)
    let mask_embed = new MLP(d, d, d, 3)
    let visual_query_block = new VisualQueryBlock(cfg.Query, gen)
    let audio_proj = if cfg.ProtoProjections then Some(Linear(d, d, hasBias = false)) else None
    let proto_proj = if cfg.ProtoProjections then Some(Linear(d, d, hasBias = false)) else None

    do
        // The official layers reset their parameters with xavier-uniform (every p.dim() > 1).
        use _ = torch.no_grad ()
        for layers in [ transformer_cross_attention_layers :> Module; transformer_self_attention_layers; transformer_ffn_layers ] do
            for p in layers.parameters () do
                if p.dim () > 1L then init.xavier_uniform_ p |> ignore
        match audio_proj, proto_proj with
        | Some a, Some p ->
            init.normal_(a.weight, 0.0, 1.0 / sqrt (float d)) |> ignore
            init.normal_(p.weight, 0.0, 1.0 / sqrt (float d)) |> ignore
        | _ -> ()
        this.RegisterComponents()
        match audio_proj, proto_proj with
        | Some a, Some p ->
            this.register_module("audio_proj", a)
            this.register_module("proto_proj", p)
        | _ -> ()

    new(cfg: VctDecoderConfig) = new VctDecoder(cfg, new torch.Generator(0UL))

    member _.Config = cfg

    /// Shared prediction heads: output [N, BT, C], mask features [BT, C, H, W] -> class and mask logits.
    member _.Heads(output: Tensor, maskFeatures: Tensor) : Prediction =
        use scope = torch.NewDisposeScope()
        let x = decoder_norm.call(output).transpose(0L, 1L)                                  // [BT, N, C]
        let logits = class_embed.call x                                                       // [BT, N, C+1]
        let masks = torch.einsum("bqc,bchw->bqhw", mask_embed.Forward x, maskFeatures)           // [BT, N, H, W]
        { Logits = logits.MoveToOuterDisposeScope(); Masks = masks.MoveToOuterDisposeScope() }

    /// audio [BT, C, 6, 4]; multiScale = [res5; res4; res3] maps [BT, C, h, w] (low to high resolution);
    /// maskFeatures [BT, C, H, W]. `noise` fixes PPQG's Gumbel noise in training; `keepMasks` returns the
    /// attention mask of every layer. `auxiliary` (default true) returns all 1 + DecLayers predictions, the
    /// official outputs; false returns only the last one, and the intermediate mask logits that only steer the
    /// next layer's masked attention are computed at that layer's size directly: mask_embed · resize(mask
    /// features) instead of resize(mask_embed · mask features) (equal, the bilinear resize being linear, up to
    /// float rounding; 4 to 64 times fewer products), none before an audio layer. Inference uses false.
    member this.Forward(audio: Tensor, multiScale: Tensor[], maskFeatures: Tensor, ?noise: Tensor, ?keepMasks: bool,
                        ?auxiliary: bool) : DecoderOutput =
        if multiScale.Length <> 3 then invalidArg (nameof multiScale) $"expected 3 multi-scale maps, got {multiScale.Length}"
        Shape.requireRank (nameof audio) 4 audio
        let keepMasks = defaultArg keepMasks false
        let auxiliary = defaultArg auxiliary true
        Scope.runOwner (fun () ->
        let bt = audio.shape[0]
        let levels = Array.append [| audio |] multiScale
        let sizes = levels |> Array.map (fun x -> x.shape[2], x.shape[3])
        // sequence-first [HW, BT, C], contiguous so that each layer's projections read them directly
        let srcs, poss =
            levels
            |> Array.mapi (fun i x ->
                let pos = PositionEmbedding.sine (d / 2L) x |> fun p -> p.flatten(2L).permute(2L, 0L, 1L).contiguous()
                let src = x.flatten(2L) + level_embed.weight[int64 i].view(1L, -1L, 1L)
                src.permute(2L, 0L, 1L).contiguous(), pos)
            |> Array.unzip
        let queryPos = query_embed.weight.unsqueeze(1L).repeat(1L, bt, 1L)                 // [N, BT, C]
        let vq = visual_query_block.Forward(maskFeatures, ?noise = noise)
        let mutable output = query_feat.weight.unsqueeze(1L).repeat(1L, bt, 1L) + vq.Queries // [N, BT, C]
        let predictions = ResizeArray<Prediction>()
        let masks = ResizeArray<Tensor>()
        // the mask features resized to each visual level (only without auxiliary predictions)
        let resizedFeatures =
            if auxiliary then [||]
            else sizes |> Array.mapi (fun level (h, w) ->
                     if level = 0 then null
                     else functional.interpolate(maskFeatures, [| h; w |], mode = torch.InterpolationMode.Bilinear, align_corners = false))
        // the mask logits steering the next layer: full predictions [BT, N, H, W], or [BT, N, h, w] at its level
        let steer (output: Tensor) (nextLevel: int) : Tensor option =
            if auxiliary then
                let pred = this.Heads(output, maskFeatures)
                predictions.Add pred
                Some pred.Masks
            elif nextLevel = 0 then None
            else
                let x = decoder_norm.call(output).transpose(0L, 1L)                          // [BT, N, C]
                Some(torch.einsum("bqc,bchw->bqhw", mask_embed.Forward x, resizedFeatures[nextLevel]))
        let mutable steering = steer output 0
        for i in 0 .. cfg.DecLayers - 1 do
            let level = i % levels.Length
            let mask =
                if level = 0 then None // audio tokens are never masked
                elif auxiliary then
                    Some(PredictionHeads.openFullyMaskedRows (PredictionHeads.attentionMask cfg.NumHeads sizes[level] steering.Value))
                else
                    // one [BT, N, hw] mask for all heads (the rows are the same per head)
                    Some(PredictionHeads.openFullyMaskedRows (PredictionHeads.sharedAttentionMask steering.Value))
            if keepMasks then
                masks.Add(
                    match mask with
                    | Some m when m.shape[0] = bt * cfg.NumHeads -> m
                    | Some m -> m.unsqueeze(1L).expand(-1L, cfg.NumHeads, -1L, -1L).flatten(0L, 1L).contiguous()
                    | None -> torch.zeros([| bt * cfg.NumHeads; cfg.NumQueries; fst sizes[0] * snd sizes[0] |], dtype = torch.ScalarType.Bool, device = audio.device))
            output <- transformer_cross_attention_layers[i].Forward(output, srcs[level], mask, Some poss[level], Some queryPos)
            output <- transformer_self_attention_layers[i].Forward(output, Some queryPos)
            output <- transformer_ffn_layers[i].Forward output
            if i < cfg.DecLayers - 1 then steering <- steer output ((i + 1) % levels.Length)
        if auxiliary then steering <- steer output 0
        else predictions.Add(this.Heads(output, maskFeatures))
        let feats =
            match audio_proj, proto_proj, vq.Prototypes with
            | Some a, Some p, Some protos ->
                let normalise (x: Tensor) = x / x.norm(-1, keepdim = true)   // NOTE: no epsilon, as the official code
                Some(normalise (a.call (audio.mean([| 2L; 3L |])))), Some(normalise (p.call (protos.transpose(0L, 1L))))
            | _ -> None, None
        { Predictions = List.ofSeq predictions
          AudioFeat = fst feats
          ProtoFeat = snd feats
          Assignment = vq.Assignment
          AttentionMasks = List.ofSeq masks })
