namespace Vct.Core

open Vct.Core.Platform
open System
open TorchSharp

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
    interface ITensorOwner with
        member s.Tensors =
            seq {
                yield s.Scores
                yield s.Masks
                yield s.ClassProbabilities
                match s.Maps with
                | Some m ->
                    yield m.PixelToQuery
                    yield! m.AttentionMasks
                    yield! Option.toList m.PrototypeSimilarity
                | None -> () }
    interface IDisposable with
        member s.Dispose() = Scope.disposeOwned s

/// Side of the semantic output.
[<RequireQualifiedAccess>]
type OutputSize =
    /// The model's OutputSize (224 for the released models, hard-coded in the official code for comparability).
    | Model
    /// Height and width (evaluation at the ground truth's size, masks at the source resolution).
    | Size of height: int64 * width: int64

/// Inference options.
type SegmentOptions =
    { /// Return the PPQG assignment, attention masks and prototype similarities.
      Intermediates: bool
      OutputSize: OutputSize
      /// Arithmetic of the forward pass (`Platform/Precision.fs`): float32, or bf16/fp16 products under LibTorch's
      /// autocast where the device can (refused with a one-line message elsewhere). Outputs are float32 always.
      Precision: Precision }
    static member Default = { Intermediates = false; OutputSize = OutputSize.Model; Precision = Precision.Float32 }

/// The one inference pipeline: model inputs -> scores, masks, class probabilities and optional maps. Every caller
/// that segments goes through `Segment.run`: the API and C# facade, the video path, evaluation, the trainer's
/// validation and the main job's overlays; `vct forward` runs the model itself and turns its output with
/// `Segment.ofOutput`.
[<RequireQualifiedAccess>]
module Segment =
    /// The segmentation of a forward pass's output (official `VCT.semantic_inference` in `vct/VCT.py`): the last
    /// prediction's mask logits upsampled to the padded input, class-weighted, resized to the output size; AVSS
    /// scores multiplied by the frames' `vid_temporal_mask_flag` (frame i by flag i, as the official code, which
    /// indexes the 10-entry vector by the frame index: x1 for the real frames of one video). Results on the CPU.
    let ofOutput (model: VctModel) (options: SegmentOptions) (flags: Tensor option) (out: VctOutput) : Segmentation =
        Scope.runOwner (fun () ->
            let last = out.Decoder.Last
            let t = last.Masks.shape[0]
            let size =
                match options.OutputSize with
                | OutputSize.Model -> model.Config.OutputSize, model.Config.OutputSize
                | OutputSize.Size(h, w) -> h, w
            let scores = VctMath.semanticInference out.InputSize size last.Logits last.Masks
            // float32 also when called inside a lower-precision autocast region (Platform/Precision.fs)
            let scores = if scores.dtype = torch.ScalarType.Float32 then scores else scores.to_type(torch.float32)
            let scores =
                match flags with
                | Some f when model.Config.Subset.Preset.TemporalFlags && f.shape[0] >= t ->
                    scores * f.``to``(scores.device).narrow(0L, 0L, t).to_type(scores.dtype).view(-1L, 1L, 1L, 1L)
                | _ -> scores
            let masks =
                match model.Config.Subset.Preset.Evaluation with
                | EvaluationKind.Semantic -> VctMath.labelMaps scores
                | EvaluationKind.Binary -> VctMath.binaryMasks scores
            let maps =
                if options.Intermediates then
                    let mh, mw = last.Masks.shape[2], last.Masks.shape[3]
                    let similarity =
                        match out.Decoder.AudioFeat, out.Decoder.ProtoFeat with
                        | Some a, Some p -> Some(p.bmm(a.unsqueeze(2L)).squeeze(2L).cpu())
                        | _ -> None
                    Some { PixelToQuery = out.Decoder.Assignment.argmax(2L).reshape(t, mh, mw).cpu()
                           AttentionMasks = [ for m in out.Decoder.AttentionMasks -> m.cpu() ]
                           PrototypeSimilarity = similarity }
                else None
            { Scores = scores.cpu(); Masks = masks.cpu(); ClassProbabilities = last.Logits.softmax(-1L).cpu(); Maps = maps })

    /// Segments the frames of `inputs` (one video, or several concatenated): no gradients, eval mode; inputs are
    /// moved to the model's device, results to the CPU.
    let run (model: VctModel) (options: SegmentOptions) (inputs: VctInputs) : Segmentation =
        use _ = torch.no_grad ()
        model.eval ()
        let device = (Seq.head (model.parameters ())).device
        Scope.runOwner (fun () ->
            let inputs = { inputs with Images = inputs.Images.``to``(device); PreMasks = inputs.PreMasks |> Option.map (fun m -> m.``to``(device)) }
            use out = Precision.run options.Precision device (fun () -> model.Forward(inputs, keepMasks = options.Intermediates, auxiliary = false))
            ofOutput model options inputs.TemporalFlags out)
