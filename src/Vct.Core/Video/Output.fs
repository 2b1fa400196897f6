namespace Vct.Core.Video

#nowarn "3395" // JsonNode's implicit conversions from numbers and strings are what they are for

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data

/// Writes `overlay.mp4`: every source frame (source size and frame rate) blended with the mask of its slot as
/// `Overlay` does, the source audio muxed back. Runs on its own thread and is fed masks in slot order through a
/// bounded queue, so memory stays that of a few frames whatever the length of the video. Never calls TorchSharp.
type OverlayWriter private (target: string, fps: float, colours: (byte * byte * byte)[], width: int, height: int,
                            frameRate: string, video: VideoProbe option, audio: string option) =
    let queue = new BlockingCollection<int * byte[] * Image option>(8)
    let tmp = Path.Combine(Path.GetDirectoryName(Path.GetFullPath target), $".overlay.{Guid.NewGuid():N}.mp4")
    let mutable failure : string option = None
    let mutable cancelled = false
    let mutable written = 0
    let encoderArgs =
        let pixFmt = if width % 2 = 0 && height % 2 = 0 then "yuv420p" else "yuv444p"
        [ yield! [ "-nostdin"; "-y"; "-hide_banner"; "-v"; "error"; "-f"; "rawvideo"; "-pix_fmt"; "rgb24"
                   "-s"; $"{width}x{height}"; "-framerate"; frameRate; "-i"; "pipe:0" ]
          match audio with
          | Some a -> yield! [ "-i"; Ffmpeg.inputArg a; "-map"; "0:v:0"; "-map"; "1:a:0?"; "-c:a"; "aac"; "-b:a"; "160k" ]
          | None -> yield! [ "-map"; "0:v:0" ]
          yield! [ "-c:v"; "libx264"; "-preset"; "veryfast"; "-crf"; "18"; "-pix_fmt"; pixFmt
                   "-shortest"; "-movflags"; "+faststart"; "-f"; "mp4"; Ffmpeg.inputArg tmp ] ]
    let drain () = for _ in queue.GetConsumingEnumerable() do ()
    let work () =
        try
            try
                use enc = new Ffmpeg.Child(Ffmpeg.ffmpeg target, encoderArgs, true, ignore)
                let stdin = enc.Stdin
                let put (rgb: byte[]) =
                    stdin.Write(rgb, 0, rgb.Length)
                    written <- written + 1
                match video with
                | Some probe ->
                    let mutable slot = -1
                    let mutable mask : byte[] = [||]
                    let mutable finished = false
                    use frames = (Video.decode probe ignore).GetEnumerator()
                    while not finished && frames.MoveNext() do
                        let f = frames.Current
                        let want = int (floor (f.Time * fps + 1e-9))
                        // Take masks until the frame's slot (masks arrive in slot order).
                        let mutable waiting = slot < want
                        let mutable item = Unchecked.defaultof<int * byte[] * Image option>
                        while waiting do
                            if queue.TryTake(&item, Timeout.Infinite) then
                                let s, m, _ = item
                                slot <- s
                                mask <- m
                                waiting <- slot < want
                            else waiting <- false
                        if slot < want && (cancelled || mask.Length = 0) then finished <- true
                        elif mask.Length = f.Width * f.Height then
                            Overlay.blendInPlace colours f.Rgb mask
                            put f.Rgb
                        else put f.Rgb
                | None ->
                    for (_, m, img) in queue.GetConsumingEnumerable() do
                        match img with
                        | Some img when img.Width = width && img.Height = height && failure.IsNone ->
                            let rgb = Array.copy img.Pixels
                            Overlay.blendInPlace colours rgb m
                            put rgb
                        | Some img when failure.IsNone ->
                            failure <- Some $"overlay.mp4 covers the first {written} frames only: an image is {img.Width}x{img.Height}, the first was {width}x{height}"
                        | _ -> ()
                stdin.Close()
                let code = enc.Wait()
                if code <> 0 && failure.IsNone then failure <- Some $"overlay.mp4 not written: ffmpeg failed ({enc.LastError})"
            with e ->
                if failure.IsNone then failure <- Some $"overlay.mp4 not written: {e.Message}"
        finally
            drain ()
    let thread = Thread(work, IsBackground = true, Name = "vct-overlay")

    /// Starts an overlay of a video file (frames decoded again from the source).
    static member ForVideo(target: string, probe: VideoProbe, fps: float, colours, audio: string option) =
        let w = new OverlayWriter(target, fps, colours, probe.Width, probe.Height,
                                  (if probe.FrameRate > 0.0 then probe.FrameRateText else "25"), Some probe, audio)
        w.Start()
        w
    /// Starts an overlay of images shown `fps` per second, all of the given size.
    static member ForImages(target: string, width: int, height: int, fps: float, colours, audio: string option) =
        let w = new OverlayWriter(target, fps, colours, width, height,
                                  fps.ToString("R", Globalization.CultureInfo.InvariantCulture), None, audio)
        w.Start()
        w
    member private _.Start() = thread.Start()
    /// Hands the mask of a slot (and, for images, the frame) to the writer; blocks while the writer is behind.
    member _.Add(slot: int, mask: byte[], frame: Image option) =
        if not queue.IsAddingCompleted then
            try queue.Add((slot, mask, frame)) with :? InvalidOperationException -> ()
    /// Ends the overlay: `interrupted` stops it at the last slot given. Returns a warning when it failed.
    member _.Finish(interrupted: bool) : string option =
        cancelled <- interrupted
        queue.CompleteAdding()
        thread.Join()
        match failure with
        | None when written > 0 ->
            File.Move(tmp, target, true)
            None
        | None ->
            (try File.Delete tmp with _ -> ())
            Some "overlay.mp4 not written: no frame reached it"
        | Some f ->
            (try File.Delete tmp with _ -> ())
            Some f
    /// Source frames written so far.
    member _.Written = written
    interface IDisposable with
        member this.Dispose() =
            if thread.IsAlive then this.Finish(true) |> ignore
            try File.Delete tmp with _ -> ()

/// What a prediction run wrote.
type PredictResult =
    { OutputDir: string
      Frames: int
      Interrupted: bool
      Overlay: string option
      Summary: string
      Warnings: string list
      Seconds: float }

/// Where and what to write.
type PredictOutputs =
    { Folder: string
      /// Also write each frame's score maps as `scores/NNNNNN.npy` ([C, 224, 224] float32).
      SaveScores: bool
      /// Write overlay.mp4.
      Overlay: bool
      /// Descriptions recorded in summary.json.
      Checkpoint: string
      Device: string }

/// The `vct predict` job: masks, overlay, scores and summary.json under one folder, each file written
/// atomically; files the run did not create are never touched.
[<RequireQualifiedAccess>]
module Predict =
    let private ours = [ "summary.json"; "overlay.mp4"; "masks"; "scores" ]

    /// Checks and prepares the output folder (it may exist, but must not hold an earlier prediction).
    let prepareFolder (dir: string) (saveScores: bool) =
        if File.Exists dir then raise (IOException($"{dir}: --output is a file, not a folder"))
        let existing = ours |> List.filter (fun n -> File.Exists(Path.Combine(dir, n)) || Directory.Exists(Path.Combine(dir, n)))
        if not existing.IsEmpty then
            let names = String.Join(", ", existing)
            raise (IOException($"{dir}: already holds a prediction ({names}); choose another --output folder (nothing was changed)"))
        try
            Directory.CreateDirectory(Path.Combine(dir, "masks")) |> ignore
            if saveScores then Directory.CreateDirectory(Path.Combine(dir, "scores")) |> ignore
            let probe = Path.Combine(dir, "masks", $".write-test-{Guid.NewGuid():N}")
            File.WriteAllBytes(probe, [||])
            File.Delete probe
        with
        | :? UnauthorizedAccessException | :? IOException as e ->
            raise (IOException($"{dir}: cannot write to the output folder ({e.Message})"))

    let private finite (x: float) : JsonNode = if Double.IsFinite x then JsonValue.Create(Math.Round(x, 6)) else null

    /// The summary entry of a frame.
    let frameJson (f: FrameResult) (mask: string) : JsonObject =
        let classes = JsonArray()
        for c in f.Classes do
            classes.Add(JsonObject([ Collections.Generic.KeyValuePair("id", JsonValue.Create c.Id :> JsonNode)
                                     Collections.Generic.KeyValuePair("name", JsonValue.Create c.Name)
                                     Collections.Generic.KeyValuePair("score", finite c.Score)
                                     Collections.Generic.KeyValuePair("area", finite c.Area) ]))
        let o = JsonObject()
        o["index"] <- f.Index
        o["time"] <- finite f.Time
        o["source_frame"] <- f.SourceIndex
        o["name"] <- f.Name
        o["window"] <- f.Window
        o["audio_example"] <- f.Example
        o["mask"] <- mask
        o["sounding_fraction"] <- finite f.SoundingFraction
        o["classes"] <- classes
        o

    /// The mask image kind of a model's subset.
    let maskKind (subset: Vct.Core.Subset) =
        match subset with
        | Subset.AVSS -> MaskPng.Palette(Classes.palette Classes.avss.Length)
        | _ -> MaskPng.Grey

    /// Pixels as written to the PNG: grey 0/255 for S4/MS3, class ids for AVSS.
    let maskPixels (subset: Vct.Core.Subset) (mask: byte[]) =
        match subset with
        | Subset.AVSS -> mask
        | _ -> mask |> Array.map (fun v -> if v <> 0uy then 255uy else 0uy)

    /// Overlay colours of a subset.
    let colours (subset: Vct.Core.Subset) =
        match subset with
        | Subset.AVSS -> Classes.palette Classes.avss.Length
        | _ -> Overlay.binaryColours

    /// Runs a model over a video or images and writes everything under `outputs.Folder`. Ctrl-C (`ct`) stops
    /// after the current batch: what was written stays valid, summary.json says `interrupted`.
    let run (model: VctModel) (options: VideoOptions) (source: FrameSource) (outputs: PredictOutputs)
            (progress: IProgress<VideoProgress> option) (warn: string -> unit) (ct: CancellationToken) : PredictResult =
        let clock = Stopwatch.StartNew()
        let dir = outputs.Folder
        // Everything that can be refused is refused before the folder is touched.
        VideoSegmentation.checkPreSam model options ignore
        let probe, total =
            match source with
            | FrameSource.VideoFile p ->
                let pr = Ffmpeg.probe p
                Video.checkBudget p pr.Width pr.Height
                if pr.Audio.IsNone && options.Audio.IsNone && options.AudioMissing = AudioMissing.Refuse then
                    raise (InvalidDataException($"{p}: has no audio track; VCT segments what makes the sound, so it needs one (pass --audio FILE, or --audio-missing silence to go on with silent examples)"))
                Some pr, (match pr.Duration with Some d -> int (ceil (d * options.Fps - 1e-6)) | None -> 0)
            | FrameSource.Images ps -> None, ps.Length
        options.Audio |> Option.iter (fun a -> if not (File.Exists a) then raise (FileNotFoundException($"{a}: no such file (--audio)", a)))
        prepareFolder dir outputs.SaveScores
        let subset = model.Config.Subset
        let kind = maskKind subset
        let warnings = Collections.Generic.List<string>()
        let warn' (w: string) =
            warnings.Add w
            warn w
        let mutable overlay : OverlayWriter option =
            match outputs.Overlay, probe with
            | true, Some pr ->
                let audio = match options.Audio with Some a -> Some a | None -> (if pr.Audio.IsSome then Some pr.Path else None)
                Some(OverlayWriter.ForVideo(Path.Combine(dir, "overlay.mp4"), pr, options.Fps, colours subset, audio))
            | _ -> None
        let frames = JsonArray()
        let mutable count = 0
        let mutable interrupted = false
        let mutable overlayWarning = None
        try
            try
                for r in VideoSegmentation.segment model options source warn' ct do
                    let name = sprintf "%06d.png" r.Index
                    Png.write (Path.Combine(dir, "masks", name)) kind r.Width r.Height (maskPixels subset r.Mask)
                    if outputs.SaveScores then
                        let c = int64 (r.Scores.Length / (r.ScoreSize * r.ScoreSize))
                        use t = torch.tensor(r.Scores, ReadOnlySpan<int64>([| c; int64 r.ScoreSize; int64 r.ScoreSize |]))
                        Vct.Core.Audio.Npy.write (Path.Combine(dir, "scores", sprintf "%06d.npy" r.Index)) t
                    if outputs.Overlay && overlay.IsNone && probe.IsNone then
                        overlay <- Some(OverlayWriter.ForImages(Path.Combine(dir, "overlay.mp4"), r.Width, r.Height, options.Fps, colours subset, options.Audio))
                    match overlay with
                    | Some o -> o.Add(r.Index, r.Mask, (if probe.IsNone then Some r.Frame else None))
                    | None -> ()
                    frames.Add(frameJson r ("masks/" + name))
                    count <- count + 1
                    match progress with
                    | Some p ->
                        let s = clock.Elapsed.TotalSeconds
                        p.Report { Frames = count; TotalFrames = total; Elapsed = clock.Elapsed; FramesPerSecond = (if s > 0.0 then float count / s else 0.0) }
                    | None -> ()
            with :? OperationCanceledException -> interrupted <- true
        finally
            match overlay with
            | Some o ->
                overlayWarning <- o.Finish interrupted
                (o :> IDisposable).Dispose()
            | None -> ()
        overlayWarning |> Option.iter warn'
        let overlayPath = Path.Combine(dir, "overlay.mp4")
        let summary = JsonObject()
        summary["input"] <- (match source with FrameSource.VideoFile p -> p | FrameSource.Images ps -> String.Join(";", ps |> List.truncate 3) + (if ps.Length > 3 then ";..." else ""))
        summary["checkpoint"] <- outputs.Checkpoint
        summary["subset"] <- subset.ToString().ToLowerInvariant()
        summary["device"] <- outputs.Device
        let m = JsonObject()
        m["classes"] <- model.Config.Decoder.NumClasses
        m["image_size"] <- model.Config.ImageSize
        m["output_size"] <- model.Config.OutputSize
        m["pre_sam"] <- model.Config.UsePreSam
        m["window_seconds"] <- VideoSegmentation.windowSeconds subset
        summary["model"] <- m
        summary["fps"] <- options.Fps
        summary["sampling"] <- "the frame on screen 15/16 of the way through each 1/fps slot (AVSBench's frame of each second); audio: one VGGish example per second of each window"
        match probe with
        | Some pr ->
            let v = JsonObject()
            v["width"] <- pr.Width
            v["height"] <- pr.Height
            v["rotation"] <- pr.Rotation
            v["frame_rate"] <- pr.FrameRateText
            v["codec"] <- pr.Codec
            v["pixel_format"] <- pr.PixelFormat
            v["audio"] <- (match pr.Audio with Some a -> $"{a.Codec} {a.SampleRate} Hz, {a.Channels} ch" | None -> null)
            summary["video"] <- v
        | None -> ()
        summary["interrupted"] <- interrupted
        summary["overlay"] <- (if File.Exists overlayPath then "overlay.mp4" else null)
        let seconds = clock.Elapsed.TotalSeconds
        let t = JsonObject()
        t["total_seconds"] <- Math.Round(seconds, 3)
        t["frames_per_second"] <- (if seconds > 0.0 then Math.Round(float count / seconds, 3) else 0.0)
        summary["timings"] <- t
        let ws = JsonArray()
        for w in warnings do ws.Add(JsonValue.Create w)
        summary["warnings"] <- ws
        summary["frames"] <- frames
        let summaryPath = Path.Combine(dir, "summary.json")
        AtomicFile.writeAllText summaryPath (summary.ToJsonString(JsonSerializerOptions(WriteIndented = true)))
        { OutputDir = dir; Frames = count; Interrupted = interrupted
          Overlay = (if File.Exists overlayPath then Some overlayPath else None)
          Summary = summaryPath; Warnings = List.ofSeq warnings; Seconds = seconds }
