namespace Vct.Core

open System
open TorchSharp

/// One video to segment: frames, audio examples and, for pre-SAM models, the mask images.
type VideoInput =
    { /// RGB frames [T, 3, H, W], 0..255.
      Frames: Tensor
      /// VGGish log-mel examples [T_a, 1, 96, 64] (T_a = T for S4/MS3; 10 for AVSS with TemporalFlags).
      AudioLogMel: Tensor
      /// Semantic-SAM mask images [T, 3, H, W], 0..255 (models with the pre-SAM branch).
      PreMasks: Tensor option
      /// AVSS `vid_temporal_mask_flag` [T_a].
      TemporalFlags: Tensor option }

/// Maps people want to look at, on request.
type SegmentationMaps =
    { /// PPQG: the query each mask-feature pixel is assigned to, int64 [T, H/4, W/4].
      PixelToQuery: Tensor
      /// The boolean attention mask of each decoder layer [T*heads, N, h*w] (True = blocked).
      AttentionMasks: Tensor list
      /// Cosine similarity of each frame's audio embedding to each prototype [T, K] (S4, AVSS).
      PrototypeSimilarity: Tensor option }

/// The segmentation of one video (CPU tensors).
type Segmentation =
    { /// Semantic scores [T, C, S, S] (official `VCT.semantic_inference` in `vct/VCT.py`; S = the output size).
      Scores: Tensor
      /// S4/MS3: bool foreground masks [T, S, S]; AVSS: int64 class maps [T, S, S].
      Masks: Tensor
      /// Class probabilities of the queries [T, N, C+1] (softmax of the last prediction's logits).
      ClassProbabilities: Tensor
      Maps: SegmentationMaps option }
    interface IDisposable with
        member s.Dispose() =
            s.Scores.Dispose()
            s.Masks.Dispose()
            s.ClassProbabilities.Dispose()
            match s.Maps with
            | Some m ->
                m.PixelToQuery.Dispose()
                for t in m.AttentionMasks do t.Dispose()
                m.PrototypeSimilarity |> Option.iter (fun t -> t.Dispose())
            | None -> ()

/// Inference options.
type SegmentOptions =
    { /// Return the PPQG assignment, attention masks and prototype similarities.
      Intermediates: bool
      /// Output side; None = the model's OutputSize (224 for the released models, as the official code).
      OutputSize: int64 option }
    static member Default = { Intermediates = false; OutputSize = None }

/// The one inference pipeline: model inputs -> scores, masks, class probabilities and optional maps. Every
/// caller that segments (the API, the video path, `vct forward`'s users) goes through `Segment.run`.
[<RequireQualifiedAccess>]
module Segment =
    /// Segments one video: no gradients, eval mode; inputs are moved to the model's device, results to the CPU.
    let run (model: VctModel) (options: SegmentOptions) (video: VideoInput) : Segmentation =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        model.eval ()
        let device = (Seq.head (model.parameters ())).device
        let inputs =
            { Images = video.Frames.``to``(device)
              PreMasks = video.PreMasks |> Option.map (fun m -> m.``to``(device))
              AudioLogMel = video.AudioLogMel.``to``(device)
              TemporalFlags = video.TemporalFlags }
        use out = model.Forward(inputs, keepMasks = options.Intermediates)
        let size = defaultArg options.OutputSize model.Config.OutputSize
        let last = out.Decoder.Last
        let scores = VctMath.semanticInference out.InputSize (size, size) last.Logits last.Masks
        let masks =
            match model.Config.Subset with
            | Subset.AVSS -> VctMath.labelMaps scores
            | _ -> VctMath.binaryMasks scores
        let maps =
            if options.Intermediates then
                let t = video.Frames.shape[0]
                let mh, mw = last.Masks.shape[2], last.Masks.shape[3]
                let similarity =
                    match out.Decoder.AudioFeat, out.Decoder.ProtoFeat with
                    | Some a, Some p -> Some(p.bmm(a.unsqueeze(2L)).squeeze(2L).cpu().MoveToOuterDisposeScope())
                    | _ -> None
                Some { PixelToQuery = out.Decoder.Assignment.argmax(2L).reshape(t, mh, mw).cpu().MoveToOuterDisposeScope()
                       AttentionMasks = [ for m in out.Decoder.AttentionMasks -> m.cpu().MoveToOuterDisposeScope() ]
                       PrototypeSimilarity = similarity }
            else None
        { Scores = scores.cpu().MoveToOuterDisposeScope()
          Masks = masks.cpu().MoveToOuterDisposeScope()
          ClassProbabilities = last.Logits.softmax(-1L).cpu().MoveToOuterDisposeScope()
          Maps = maps }
