namespace Vct.Core

open Vct.Core.Platform
open System
open System.IO
open TorchSharp

/// Versions and environment, as `vct info` prints them.
type SystemInfo =
    { VctVersion: string
      TorchSharpVersion: string
      LibTorchVersion: string
      DotNetVersion: string
      Device: string
      CudaAvailable: bool
      Threads: int
      Runtime: RuntimeReport
      /// Where LibTorch's large CPU tensors come from (`NativeHeap.probe`).
      NativeHeap: NativeHeapReport }

/// The F# entry points that the C# facade, the CLI and notebooks call.
[<RequireQualifiedAccess>]
module Api =
    /// Collects versions, the default device, the thread count and the runtime report.
    let systemInfo () : SystemInfo =
        let report = Runtime.init ()
        let asmVersion (t: Type) =
            let a = t.Assembly
            match a.GetCustomAttributes(typeof<Reflection.AssemblyInformationalVersionAttribute>, false) with
            | [| :? Reflection.AssemblyInformationalVersionAttribute as v |] -> v.InformationalVersion.Split('+')[0]
            | _ -> string (a.GetName().Version)
        let cuda = torch.cuda.is_available ()
        { VctVersion = asmVersion typeof<RuntimeReport>
          TorchSharpVersion = asmVersion typeof<torch>
          LibTorchVersion = torch.__version__
          DotNetVersion = Environment.Version.ToString()
          Device = (if cuda then "cuda" else "cpu")
          CudaAvailable = cuda
          Threads = torch.get_num_threads ()
          Runtime = report
          NativeHeap = NativeHeap.probe () }

/// Inference entry points.
[<RequireQualifiedAccess>]
module Inference =
    /// Loads a model: our safetensors checkpoint (config beside it or in its metadata), or an official
    /// PyTorch checkpoint (`.pth`/`.pt`/`.pkl`; then `subset` is required). The model is in eval mode on `device`.
    /// `path` may be a hub reference (`Checkpoint.Hub`): a released name (`s4`, `ms3`, `avss`: it implies the subset),
    /// `hf:owner/repo/path` or an http(s) URL, downloaded into the cache first.
    let loadModel (path: string) (subset: Subset option) (device: torch.Device) : VctModel * Checkpoint.LoadReport =
        Runtime.init () |> ignore
        let subset =
            match subset, Checkpoint.Hub.tryFind path with
            | None, Some e when not (File.Exists path) && List.contains e.Name [ "s4"; "ms3"; "avss" ] -> Some(Subset.Parse e.Name)
            | s, _ -> s
        let path = Checkpoint.Hub.resolve path
        match Path.GetExtension(path).ToLowerInvariant(), subset with
        | (".pth" | ".pt" | ".pkl"), Some s -> ModelIO.loadOfficial s path device
        | (".pth" | ".pt" | ".pkl"), None ->
            invalidArg (nameof subset) $"{path} is an official PyTorch checkpoint: say which subset it is for (s4, ms3 or avss)"
        | _ -> ModelIO.load path device

    /// The audio examples of a file under the model's subset rules: [T_a, 1, 96, 64] and, for AVSS, the flags.
    let audioExamples (subset: Subset) (path: string) : Tensor * Tensor option =
        let clip = Audio.Audio.examplesOfFile (Audio.ExampleOptions.Default(Some subset)) path
        let flags = match subset with Subset.AVSS -> Some(torch.tensor(clip.Real |> Array.map float32)) | _ -> None
        clip.Examples, flags

    /// Segments one video: no gradients, eval mode; inputs are moved to the model's device, results to the CPU.
    let segment (model: VctModel) (options: SegmentOptions) (video: VctInputs) : Segmentation = Segment.run model options video

    /// Segments a video file frame by frame, lazily (frames sampled at `options.Fps`, one VGGish example per
    /// second of each 5 s / 10 s window; masks at the source resolution). `warn` receives one-line warnings.
    let segmentVideo (model: VctModel) (options: Video.VideoOptions) (path: string) : seq<Video.FrameResult> =
        Video.VideoSegmentation.segment model options (Video.FrameSource.VideoFile path) ignore Threading.CancellationToken.None

    /// Segments several videos one after the other (memory stays that of one video).
    let segmentAll (model: VctModel) (options: SegmentOptions) (videos: VctInputs seq) : Segmentation list =
        [ for v in videos -> segment model options v ]

/// The researchers' parity tool behind `vct forward`: the raw model on named input tensors.
[<RequireQualifiedAccess>]
module Parity =
    /// Looks up `prefix + name` in a flat dict.
    let private find (tensors: Collections.Generic.IDictionary<string, Tensor>) (prefix: string) (name: string) =
        match tensors.TryGetValue(prefix + name) with
        | true, t -> Some t
        | _ -> None

    /// Reads the inputs (images, pre_masks, audio_log_mel, vid_temporal_mask_flag) from a flat dict file.
    let readInputs (path: string) (prefix: string) (usePreSam: bool) (subset: Subset) : VctInputs * IDisposable =
        let ck = Checkpoint.StateDict.load path
        let d = ck.StateDict :> Collections.Generic.IDictionary<string, Tensor>
        let need name =
            match find d prefix name with
            | Some t -> t
            | None ->
                let have = String.Join(", ", d.Keys |> Seq.truncate 20)
                raise (InvalidDataException $"{path}: no tensor '{prefix}{name}' (it has: {have})")
        let inputs =
            { Images = need "images"
              PreMasks = if usePreSam then Some(need "pre_masks") else find d prefix "pre_masks"
              Audio =
                AudioInput.LogMel(
                    need "audio_log_mel",
                    if subset.Preset.TemporalFlags then Some(need "vid_temporal_mask_flag") else None) }
        inputs, (ck :> IDisposable)

    /// Runs the model in eval mode and names its outputs as `vct forward` writes them: pred_logits, pred_masks,
    /// aux<i>.pred_logits / aux<i>.pred_masks (i = 0..8, the official aux_outputs order), feats.audio_feat,
    /// feats.proto_feat, sem_seg; with `intermediates` also backbone, pixel-decoder, audio, PPQG and per-layer
    /// decoder tensors under names mirroring the official module paths.
    let run (model: VctModel) (precision: Precision) (inputs: VctInputs) (intermediates: bool) : (string * Tensor) list =
        use _ = torch.no_grad ()
        model.eval ()
        let device = (Seq.head (model.parameters ())).device
        use out = Precision.run precision device (fun () -> model.Forward(inputs, keepIntermediates = intermediates, keepMasks = intermediates))
        let c (t: Tensor) = t.detach().cpu().clone()
        let preds = out.Decoder.Predictions
        let last = List.last preds
        [ yield "pred_logits", c last.Logits
          yield "pred_masks", c last.Masks
          for i, p in List.indexed (List.take (preds.Length - 1) preds) do
              yield $"aux{i}.pred_logits", c p.Logits
              yield $"aux{i}.pred_masks", c p.Masks
          match out.Decoder.AudioFeat with Some a -> yield "feats.audio_feat", c a | None -> ()
          match out.Decoder.ProtoFeat with Some p -> yield "feats.proto_feat", c p | None -> ()
          use seg = Segment.ofOutput model SegmentOptions.Default None out
          yield "sem_seg", c seg.Scores
          match out.Intermediates with
          | Some i ->
              for k, f in Array.indexed i.Features do yield $"backbone.res{k + 2}", c f
              yield "sem_seg_head.pixel_decoder.mask_features", c i.MaskFeatures
              for k, f in Array.indexed i.MultiScale do yield $"sem_seg_head.pixel_decoder.multi_scale_features.{k}", c f
              yield "audio_backbone", c i.AudioBackbone
              yield "sem_seg_head.audio_transformation", c i.AudioFeatures
              yield "sem_seg_head.predictor.visual_query_block.assignment", c out.Decoder.Assignment
              for k, m in List.indexed out.Decoder.AttentionMasks do
                  yield $"sem_seg_head.predictor.attn_mask.{k}", c m
          | None -> () ]

    /// Writes named outputs of `run` as a safetensors file (metadata: format pt, producer "vct forward"), atomically.
    let write (path: string) (named: (string * Tensor) list) =
        Checkpoint.VctCheckpoint.write path None false [ "producer", "vct forward" ] named
