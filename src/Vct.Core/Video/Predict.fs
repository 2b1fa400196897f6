namespace Vct.Core.Video

open Vct.Core.Platform
open System
open System.Collections.Concurrent
open System.Collections.Generic
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open TorchSharp
open Vct.Core
open Vct.Core.Audio
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.Data

/// Where the frames come from.
[<RequireQualifiedAccess>]
type FrameSource =
    /// A video file (any container and codec ffmpeg reads).
    | VideoFile of string
    /// Image files in this order (frame i is shown from i/fps to (i+1)/fps).
    | Images of string list

/// What to do when the input has no audio.
[<RequireQualifiedAccess>]
type AudioMissing =
    /// Fail, naming the file (default).
    | Refuse
    /// Go on with digital-silence examples, with a warning.
    | Silence

/// Options of video segmentation.
type VideoOptions =
    { /// Frames segmented per second of video (1 = AVSBench's sampling).
      Fps: float
      /// Frames per forward pass (VCT has no cross-frame interaction, so results do not depend on it).
      BatchFrames: int
      /// An audio file to use instead of the video's own track (required for image input).
      Audio: string option
      AudioMissing: AudioMissing
      /// A folder of Semantic-SAM mask images, by frame name: `<name>_mask_color.png` or `<name>.png`.
      PreMasks: string option
      /// What a pre-SAM model does without mask images.
      MissingMasks: MissingMasks
      /// Arithmetic of the forward passes (`SegmentOptions.Precision`).
      Precision: Precision }
    static member Default =
        { Fps = 1.0; BatchFrames = 5; Audio = None; AudioMissing = AudioMissing.Refuse; PreMasks = None
          MissingMasks = MissingMasks.Refuse; Precision = Precision.Float32 }

/// One class found in a frame's mask.
type ClassScore =
    { Id: int
      Name: string
      /// Mean score of the class over the pixels it wins (S4/MS3: the foreground probability).
      Score: float
      /// Fraction of the frame's pixels it covers.
      Area: float }

/// The segmentation of one sampled frame, at the source resolution.
type FrameResult =
    { /// Slot number = output frame number (masks/NNNNNN.png).
      Index: int
      /// Presentation time of the source frame used, in seconds.
      Time: float
      /// Index of that frame in the source (presentation order), or of the image.
      SourceIndex: int
      /// Name used for pre-SAM masks and outputs ("000003" or the image's file name without extension).
      Name: string
      /// The 1 s audio example it was paired with (window index, example index in the window).
      Window: int
      Example: int
      Width: int
      Height: int
      /// Class id per pixel (S4/MS3: 0/1; AVSS: 0..70), row-major.
      Mask: byte[]
      SoundingFraction: float
      Classes: ClassScore list
      /// The model's semantic scores [C, S, S] (S = 224), float32 on the CPU.
      Scores: float32[]
      ScoreSize: int
      /// The frame itself (RGB, source resolution), for overlays.
      Frame: Image }

/// Progress of a video run.
type VideoProgress =
    { Frames: int
      /// Estimated number of frames (0 when unknown).
      TotalFrames: int
      Elapsed: TimeSpan
      FramesPerSecond: float }

/// Bilinear upsampling of score maps to the source size by separable interpolation matrices, exactly
/// PyTorch's `interpolate(mode="bilinear", align_corners=False)` rule (as HuggingFace's
/// `post_process_semantic_segmentation`), in tiles so memory does not grow with the frame size.
[<RequireQualifiedAccess>]
module Upsample =
    /// [dst, src] interpolation matrix of one axis.
    let matrix (src: int) (dst: int) : Tensor =
        let m = Array.zeroCreate<float32> (dst * src)
        let scale = float src / float dst
        for x in 0 .. dst - 1 do
            let s = max 0.0 ((float x + 0.5) * scale - 0.5)
            let x0 = min (int (floor s)) (src - 1)
            let x1 = min (x0 + 1) (src - 1)
            let l = float32 (s - float x0)
            m[x * src + x0] <- m[x * src + x0] + (1.0f - l)
            m[x * src + x1] <- m[x * src + x1] + l
        torch.tensor(m, ReadOnlySpan<int64>([| int64 dst; int64 src |]))

    /// Class ids at (height, width) and per-class (sum of winning scores, pixel count) from scores [C, S, S].
    /// Two classes: the foreground wins where its upsampled softmax exceeds 0.5 (S4/MS3's rule; ties are
    /// background), and its score is that probability. More classes: arg-max of the upsampled scores.
    let decide (scores: Tensor) (height: int) (width: int) : byte[] * float[] * int64[] =
        let c = int scores.shape[0]
        let mask = Array.zeroCreate<byte> (height * width)
        let sums = Array.zeroCreate<float> c
        let counts = Array.zeroCreate<int64> c
        Scope.runValue (fun () ->
            let wy = matrix (int scores.shape[1]) height
            let wx = matrix (int scores.shape[2]) width
            let colBand, rowBand = 1024, (if c <= 2 then 1024 else 128)
            for x0 in 0 .. colBand .. width - 1 do
                let nx = min colBand (width - x0)
                use _ = torch.NewDisposeScope()
                let wxc = wx.narrow(0L, int64 x0, int64 nx)
                // [C, S, nx]
                let cols = if c <= 2 then (scores[1] - scores[0]).unsqueeze(0L).matmul(wxc.t()) else scores.matmul(wxc.t())
                for y0 in 0 .. rowBand .. height - 1 do
                    let ny = min rowBand (height - y0)
                    use _ = torch.NewDisposeScope()
                    let tile = wy.narrow(0L, int64 y0, int64 ny).matmul(cols) // [C', ny, nx]
                    let ids, best =
                        if c <= 2 then
                            let d = tile[0]
                            d.gt(0.0.AsScalar).to_type(torch.uint8), d.sigmoid()
                        else
                            let struct (v, i) = tile.max(0L)
                            i.to_type(torch.uint8), v
                    let idArr = ids.contiguous().data<byte>().ToArray()
                    let bestArr = best.contiguous().data<float32>().ToArray()
                    for yy in 0 .. ny - 1 do
                        let row = (y0 + yy) * width + x0
                        for xx in 0 .. nx - 1 do
                            let k = yy * nx + xx
                            let id = idArr[k]
                            mask[row + xx] <- id
                            counts[int id] <- counts[int id] + 1L
                            sums[int id] <- sums[int id] + float (if c <= 2 && id = 0uy then 1.0f - bestArr[k] else bestArr[k])
            ())
        mask, sums, counts

/// Audio of consecutive windows: the video's first track (streamed), a file, or digital silence.
type private AudioFeed(source: string, stream: AudioStream option, wave: Waveform option, warn: string -> unit) =
    let mutable warnedShort = false
    member _.Source = source
    /// Samples of [start, start + length) seconds (zero-padded, with a warning, past the end of the audio).
    member _.Span(start: float, length: float) : Waveform =
        match stream, wave with
        | Some s, _ ->
            let first = int64 (Math.Round(start * float s.SampleRate))
            let n = int (Math.Round(length * float s.SampleRate))
            s.SkipTo first
            let got = s.Read n
            let short = got.Length > 0 && got[0].Length < n
            if short && not warnedShort then
                warnedShort <- true
                warn $"{source}: the audio track ends at {float s.Position / float s.SampleRate:F2} s, before the video; the rest is digital silence"
            let chans = got |> Array.map (fun a -> if a.Length < n then Array.append a (Array.zeroCreate (n - a.Length)) else a)
            { Channels = chans; SampleRate = s.SampleRate; Source = source; Encoding = "ffmpeg (first audio track)" }
        | None, Some w ->
            let first = int (Math.Round(start * float w.SampleRate))
            let n = int (Math.Round(length * float w.SampleRate))
            let chans =
                w.Channels |> Array.map (fun a ->
                    Array.init n (fun i -> let j = first + i in if j < a.Length then a[j] else 0.0))
            if first + n > w.Channels[0].Length && not warnedShort then
                warnedShort <- true
                warn $"{source}: the audio ends at {float w.Channels[0].Length / float w.SampleRate:F2} s, before the frames; the rest is digital silence"
            { w with Channels = chans }
        | None, None ->
            { Channels = [| Array.zeroCreate (int (Math.Round(length * 16000.0))) |]; SampleRate = 16000; Source = source; Encoding = "digital silence" }
    interface IDisposable with
        member _.Dispose() = stream |> Option.iter (fun s -> (s :> IDisposable).Dispose())

/// The video path: frames sampled by timestamp, cut into the subset's windows (5 s for S4/MS3, 10 s for
/// AVSS) with one VGGish example per second, segmented in batches, masks upsampled to the source size.
[<RequireQualifiedAccess>]
module VideoSegmentation =
    /// Seconds per window: the clip length the subset's models were trained on.
    let windowSeconds (subset: Vct.Core.Subset) = match subset with Vct.Core.Subset.AVSS -> 10 | _ -> 5

    let private resizeForModel (size: int) (img: Image) =
        if img.Width = size && img.Height = size then img else Resize.bilinear size size img

    let private readPreMask (dir: string) (name: string) (size: int) =
        let candidates = [ $"{name}_mask_color.png"; $"{name}.png"; $"{name}_mask_color.jpg"; $"{name}.jpg" ] |> List.map (fun f -> Path.Combine(dir, f))
        match candidates |> List.tryFind File.Exists with
        | Some p -> Resize.nearest size size (ImageIO.readRgb p)
        | None -> raise (FileNotFoundException($"{dir}: no pre-SAM mask image for frame '{name}' (looked for {name}_mask_color.png and {name}.png)"))

    /// Checks the pre-SAM choice before any work: a model with the branch needs mask images or an explicit policy.
    let checkPreSam (model: VctModel) (options: VideoOptions) (warn: string -> unit) =
        if model.Config.UsePreSam then
            match options.PreMasks, options.MissingMasks with
            | Some dir, _ when not (Directory.Exists dir) -> raise (DirectoryNotFoundException($"{dir}: --pre-masks folder not found"))
            | Some _, _ -> ()
            | None, MissingMasks.Refuse ->
                raise (InvalidOperationException(
                    "this model has the pre-SAM branch (MODEL.PRE_SAM.USE_PRE_SAM) and was trained with a Semantic-SAM mask image "
                    + "per frame: pass --pre-masks DIR with <frame>_mask_color.png files, or --missing-masks blank|skip to run without "
                    + "them (lower accuracy than the released numbers)"))
            | None, MissingMasks.BlankMaskImage -> warn "warning: no pre-SAM mask images: running with blank mask images (--missing-masks blank); expect lower accuracy"
            | None, MissingMasks.SkipBranch -> warn "warning: no pre-SAM mask images: running without the pre-SAM branch (--missing-masks skip); expect lower accuracy"
        elif options.PreMasks.IsSome then warn "warning: this model has no pre-SAM branch; --pre-masks is ignored"

    /// Examples of one window's audio ([n, 1, 96, 64], n >= 1), or None when the span holds no whole example.
    let private windowExamples (wave: Waveform) : Tensor option =
        let seconds = float wave.Channels[0].Length / float wave.SampleRate
        if seconds < 0.975 - 1e-9 then None
        else
            let opts = { ExampleOptions.Default None with ShortClip = ShortClip.ZeroPad }
            let ex = Examples.ofWaveform opts wave
            if ex.Examples.shape[0] = 0L then (ex.Examples.Dispose(); None) else Some ex.Examples

    /// Segments prepared frames: `frames` with their names, `examples` [n, 1, 96, 64] per frame.
    let private run (model: VctModel) (precision: Precision) (preMasks: string option) (frames: (SampledFrame * string)[]) (examples: Tensor) : (Tensor * Image[]) =
        let size = int model.Config.ImageSize
        let images = frames |> Array.map (fun (f, _) -> resizeForModel size f.Image)
        use x = Batch.frames images
        let pre =
            match preMasks with
            | Some dir when model.Config.UsePreSam -> Some(Batch.frames (frames |> Array.map (fun (_, n) -> readPreMask dir n size)))
            | _ -> None
        let input = { Images = x; PreMasks = pre; Audio = AudioInput.LogMel(examples, None) }
        use seg = Segment.run model { SegmentOptions.Default with Precision = precision } input
        pre |> Option.iter (fun p -> p.Dispose())
        seg.Scores.clone(), images

    /// Post-processes one frame's scores [C, S, S] into a FrameResult.
    let private result (names: string[]) (f: SampledFrame) (name: string) (window: int) (example: int) (scores: Tensor) =
        let h, w = f.Image.Height, f.Image.Width
        let mask, sums, counts = Upsample.decide scores h w
        let total = float (int64 h * int64 w)
        let classes =
            [ for c in 1 .. counts.Length - 1 do
                  if counts[c] > 0L then
                      yield { Id = c; Name = (if c < names.Length then names[c] else $"class {c}")
                              Score = sums[c] / float counts[c]; Area = float counts[c] / total } ]
            |> List.sortByDescending (fun c -> c.Score)
        let s = int scores.shape[1]
        { Index = f.Slot; Time = f.SourceTime; SourceIndex = f.SourceIndex; Name = name; Window = window; Example = example
          Width = w; Height = h; Mask = mask
          SoundingFraction = (if total > 0.0 then float (total - float counts[0]) / total else 0.0)
          Classes = classes; Scores = scores.contiguous().data<float32>().ToArray(); ScoreSize = s; Frame = f.Image }

    /// Segments a stream of sampled frames; `audioOf window span` gives each window's audio. Lazy.
    let private segmentFrames (model: VctModel) (options: VideoOptions) (sourceName: string) (names: SampledFrame -> string)
                              (audioFor: int -> float -> Waveform) (endTime: unit -> float)
                              (warn: string -> unit) (ct: CancellationToken) (frames: seq<SampledFrame>) : seq<FrameResult> =
        let subset = model.Config.Subset
        let window = windowSeconds subset
        let classNames = Classes.names (int model.Config.Decoder.NumClasses)
        let slotsPerWindow = max 1 (int (Math.Round(options.Fps * float window)))
        let batch = max 1 options.BatchFrames
        let mutable lastExample : Tensor option = None
        let processWindow (w: int) (items: SampledFrame list) (isLast: bool) : seq<FrameResult> =
          seq {
                let items = Array.ofList items
                let start = float (w * window)
                let span = if isLast then min (float window) (max 0.0 (endTime () - start)) else float window
                let wave = audioFor w span
                let examples =
                    match windowExamples wave with
                    | Some e -> e
                    | None ->
                        match lastExample with
                        | Some prev ->
                            warn $"window {w} ({start:F1}-{start + span:F2} s) holds no whole 0.975 s example; its frames use the last example of the previous window (the S4/MS3 padding rule)"
                            prev.clone()
                        | None ->
                            raise (InvalidDataException($"{sourceName}: the input is {span:F2} s long, shorter than one audio example (0.975 s)"))
                use examples = examples
                let n = int examples.shape[0]
                let secondsInWindow = int (ceil (span - 1e-9))
                if isLast && n < secondsInWindow then
                    warn $"window {w} ({start:F1}-{start + span:F2} s) is partial: {n} whole example(s) for {secondsInWindow} second(s); later seconds repeat the last example (the S4/MS3 padding rule)"
                lastExample |> Option.iter (fun t -> t.Dispose())
                lastExample <- Some(examples.narrow(0L, int64 (n - 1), 1L).clone())
                for b0 in 0 .. batch .. items.Length - 1 do
                      ct.ThrowIfCancellationRequested()
                      let chunk = items[b0 .. min (items.Length - 1) (b0 + batch - 1)]
                      let exIdx = chunk |> Array.map (fun f -> min (n - 1) (max 0 (int (floor (float f.Slot / options.Fps + 1e-9)) - w * window)))
                      let named = chunk |> Array.map (fun f -> f, names f)
                      use idx = torch.tensor(exIdx |> Array.map int64)
                      use ex = examples.index_select(0L, idx)
                      let scores, _ =
                          use _gate = FinalizerGate.Hold()
                          run model options.Precision options.PreMasks named ex
                      use scores = scores
                      for k in 0 .. chunk.Length - 1 do
                          use s = scores[k]
                          yield result classNames chunk[k] (snd named[k]) w exIdx[k] s
          }
        seq {
            try
                let mutable current = -1
                let pending = List<SampledFrame>()
                for f in frames do
                    ct.ThrowIfCancellationRequested()
                    let w = f.Slot / slotsPerWindow
                    if w <> current && pending.Count > 0 then
                        yield! processWindow current (List.ofSeq pending) false
                        pending.Clear()
                    current <- w
                    pending.Add f
                if pending.Count > 0 then yield! processWindow current (List.ofSeq pending) true
            finally
                lastExample |> Option.iter (fun t -> t.Dispose())
        }

    /// Segments a video or a list of images, lazily, frame by frame. `warn` receives one-line warnings.
    let segment (model: VctModel) (options: VideoOptions) (source: FrameSource) (warn: string -> unit) (ct: CancellationToken) : seq<FrameResult> =
        if not (options.Fps > 0.0) || Double.IsInfinity options.Fps || options.Fps > 120.0 then
            invalidArg "fps" $"--fps must be in (0, 120], got {options.Fps}"
        checkPreSam model options warn
        seq {
            let mutable endTime = 0.0
            match source with
            | FrameSource.VideoFile path ->
                let probe = Ffmpeg.probe path
                Video.checkBudget path probe.Width probe.Height
                if Video.hasAlpha probe.PixelFormat then
                    warn $"warning: {path} has an alpha channel ({probe.PixelFormat}); it is dropped (frames are read as RGB, as the official tools' PIL convert('RGB') does)"
                let feed =
                    match options.Audio, probe.Audio with
                    | Some a, _ -> new AudioFeed(a, None, Some(Media.read SampleScaling.Exact a), warn)
                    | None, Some track -> new AudioFeed(path, Some(new AudioStream(path, track)), None, warn)
                    | None, None ->
                        match options.AudioMissing with
                        | AudioMissing.Refuse ->
                            raise (InvalidDataException($"{path}: has no audio track; VCT segments what makes the sound, so it needs one (pass --audio FILE, or --audio-missing silence to go on with silent examples)"))
                        | AudioMissing.Silence ->
                            warn $"warning: {path} has no audio track: using digital-silence examples (--audio-missing silence); masks follow the pictures only"
                            new AudioFeed(path, None, None, warn)
                use feed = feed
                let frames = Video.decode probe warn |> Video.sample options.Fps (fun e -> endTime <- e)
                yield! segmentFrames model options path (fun f -> sprintf "%06d" f.Slot) (fun w span -> feed.Span(float (w * windowSeconds model.Config.Subset), span)) (fun () -> endTime) warn ct frames
            | FrameSource.Images paths ->
                if paths.IsEmpty then invalidArg "input" "no input images"
                let audio =
                    match options.Audio with
                    | Some a -> new AudioFeed(a, None, Some(Media.read SampleScaling.Exact a), warn)
                    | None ->
                        match options.AudioMissing with
                        | AudioMissing.Refuse -> invalidArg "audio" "image input needs --audio FILE (or --audio-missing silence)"
                        | AudioMissing.Silence ->
                            warn "warning: no audio: using digital-silence examples (--audio-missing silence); masks follow the pictures only"
                            new AudioFeed("silence", None, None, warn)
                use audio = audio
                let arr = Array.ofList paths
                endTime <- float arr.Length / options.Fps
                let frames =
                    arr |> Seq.mapi (fun i p ->
                        let img = ImageIO.readRgb p
                        Video.checkBudget p img.Width img.Height
                        { Slot = i; SampleTime = Video.samplingTime options.Fps i; SourceIndex = i; SourceTime = float i / options.Fps; Image = img })
                let name (f: SampledFrame) = Path.GetFileNameWithoutExtension arr[f.Slot]
                yield! segmentFrames model options arr[0] name (fun w span -> audio.Span(float (w * windowSeconds model.Config.Subset), span)) (fun () -> endTime) warn ct frames
        }
