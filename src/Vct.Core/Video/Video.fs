namespace Vct.Core.Video

open System
open System.Collections.Concurrent
open System.Collections.Generic
open System.IO
open System.Text.RegularExpressions
open Vct.Core.Audio
open Vct.Core.Data

/// One decoded frame. `Rgb` (HWC, 3 bytes per pixel) belongs to the decoder: it stays valid until the
/// enumerator has moved two frames further on (three buffers rotate: one frame of look-ahead), so copy it to keep it.
type DecodedFrame =
    { /// Position in presentation order (0-based).
      Index: int
      /// Presentation time in seconds, relative to the first frame.
      Time: float
      /// How long the frame is shown (from its timestamp to the next; the nominal frame time for the last).
      Duration: float
      Width: int
      Height: int
      Rgb: byte[] }

/// A frame chosen for segmentation: the one on screen at its slot's sampling time.
type SampledFrame =
    { /// Slot number k (0-based): slot k covers [k/fps, (k+1)/fps) of the video.
      Slot: int
      /// The sampling time inside the slot (AVSBench's 15/16 point; see `Video.samplingTime`).
      SampleTime: float
      /// The source frame on screen at that time: its index and timestamp.
      SourceIndex: int
      SourceTime: float
      /// The frame in display orientation at its source resolution.
      Image: Image }

/// Streaming access to videos through ffmpeg: decoding in presentation order with exact timestamps, frame
/// sampling by timestamp, and the first audio track as raw samples.
[<RequireQualifiedAccess>]
module Video =
    /// Frames above this many pixels are refused before anything is decoded (8K UHD, 7680x4320, is the largest
    /// accepted): a frame costs 3 bytes a pixel to decode and the score maps are upsampled to it.
    let maxFramePixels = 7680L * 4320L

    /// Whether an ffmpeg pixel format carries alpha (rgba, argb, yuva420p, gbrap, ya8, ...).
    let hasAlpha (pixelFormat: string) =
        let f = pixelFormat.ToLowerInvariant()
        f.StartsWith "yuva" || f.StartsWith "gbrap" || f.StartsWith "ya" || f.Contains "rgba" || f.Contains "bgra" || f.Contains "argb" || f.Contains "abgr"

    /// AVSBench's frame in each second (`preprocess_scripts/preprocess_s4.py`, `extract_frame_for_each_video`):
    /// of 16 evenly spaced samples per second it keeps the last (index int(l*fps + 15/16*fps)), i.e. the frame on
    /// screen 15/16 of the way through the second. With `fps` frames per second, slot k is sampled at the same
    /// relative point of its 1/fps span.
    let samplingTime (fps: float) (slot: int) = (float slot + 15.0 / 16.0) / fps

    /// Checks a probed size against the frame budget.
    let checkBudget (path: string) (width: int) (height: int) =
        let px = int64 width * int64 height
        if px > maxFramePixels then
            raise (InvalidDataException(
                $"{path}: frames are {width}x{height} ({float px / 1e6:F1} Mpx), above the frame budget of "
                + $"{float maxFramePixels / 1e6:F1} Mpx (8K UHD); downscale first, e.g. ffmpeg -i <in> -vf scale=3840:-2 <out>"))

    let private showinfo = Regex(@"n:\s*(\d+)\s+pts:\s*(-?\d+)\s+pts_time:(\S+).*?duration_time:(\S+).*?\bs:(\d+)x(\d+)", RegexOptions.Compiled)
    let private showinfoNoDuration = Regex(@"n:\s*(\d+)\s+pts:\s*(-?\d+)\s+pts_time:(\S+).*?\bs:(\d+)x(\d+)", RegexOptions.Compiled)

    let private parseFloat (s: string) =
        match Double.TryParse(s, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> v
        | _ -> nan

    let rec private readExactly (s: Stream) (buf: byte[]) (offset: int) (count: int) : int =
        if count = 0 then offset
        else
            let n = s.Read(buf, offset, count)
            if n = 0 then offset else readExactly s buf (offset + n) (count - n)

    /// Every frame of the first video stream in presentation order, as RGB at display orientation (ffmpeg applies
    /// the rotation metadata), with its timestamp. Lazy: ffmpeg runs while the sequence is enumerated and is
    /// stopped when the enumerator is disposed. `warn` receives a line if decoding stops early.
    let decode (probe: VideoProbe) (warn: string -> unit) : seq<DecodedFrame> =
        seq {
            let path = probe.Path
            checkBudget path probe.Width probe.Height
            let infos = new BlockingCollection<int * float * float * int * int>()
            let onLine (line: string) =
                if line.Contains "Parsed_showinfo" then
                    let m = showinfo.Match line
                    if m.Success then
                        infos.Add((int m.Groups[1].Value, parseFloat m.Groups[3].Value, parseFloat m.Groups[4].Value,
                                   int m.Groups[5].Value, int m.Groups[6].Value))
                    else
                        let m = showinfoNoDuration.Match line
                        if m.Success then
                            infos.Add((int m.Groups[1].Value, parseFloat m.Groups[3].Value, nan, int m.Groups[4].Value, int m.Groups[5].Value))
            let args =
                [ "-nostdin"; "-hide_banner"; "-loglevel"; "info"; "-i"; Ffmpeg.inputArg path
                  "-map"; "0:v:0"; "-an"; "-sn"; "-dn"; "-vf"; "format=rgb24,showinfo"; "-fps_mode"; "passthrough"
                  "-f"; "rawvideo"; "-pix_fmt"; "rgb24"; "pipe:1" ]
            use child = new Ffmpeg.Child(Ffmpeg.ffmpeg path, args, false, onLine)
            // Close the info queue when ffmpeg's stderr ends, so a reader waiting for the next frame wakes up.
            let closer =
                Threading.Tasks.Task.Run(fun () ->
                    child.Process.WaitForExit()
                    Threading.Thread.Sleep 50
                    child.Wait() |> ignore
                    infos.CompleteAdding())
            let buffers = [| [||]; [||]; [||] |]
            let nominal = if probe.FrameRate > 0.0 then 1.0 / probe.FrameRate else 0.04
            let mutable t0 = nan
            let mutable count = 0
            let mutable go = true
            // One frame of look-ahead so that each frame's duration comes from the next timestamp.
            let mutable pending : DecodedFrame option = None
            let mutable info = Unchecked.defaultof<int * float * float * int * int>
            while go do
                match infos.TryTake(&info, Threading.Timeout.Infinite), info with
                | true, (_, ptsTime, dur, w, h) ->
                    checkBudget path w h
                    let size = w * h * 3
                    let slot = count % 3
                    if buffers[slot].Length <> size then buffers[slot] <- Array.zeroCreate size
                    let got = readExactly child.Stdout buffers[slot] 0 size
                    if got < size then go <- false
                    else
                        if Double.IsNaN t0 then t0 <- ptsTime
                        let t = ptsTime - t0
                        let frame = { Index = count; Time = t; Duration = (if Double.IsNaN dur || dur <= 0.0 then nominal else dur); Width = w; Height = h; Rgb = buffers[slot] }
                        count <- count + 1
                        match pending with
                        | Some p ->
                            let d = t - p.Time
                            yield (if d > 0.0 then { p with Duration = d } else p)
                        | None -> ()
                        pending <- Some frame
                | _ -> go <- false
            match pending with
            | Some p -> yield p
            | None -> ()
            closer.Wait(10000) |> ignore
            let code = child.Wait()
            if count = 0 then
                raise (InvalidDataException($"{path}: ffmpeg decoded no video frame ({child.LastError})"))
            if code <> 0 then
                warn $"{path}: decoding stopped after {count} frames ({child.LastError}); the frames before are used"
        }

    /// The frames to segment at `fps` per second: for slot k, the frame on screen at `samplingTime fps k`
    /// (by timestamp, so variable frame rates and odd rates work). Slots run while they start before the end
    /// of the last frame. `onEnd` receives the video's end time (last timestamp + its duration).
    let sample (fps: float) (onEnd: float -> unit) (frames: seq<DecodedFrame>) : seq<SampledFrame> =
        if not (fps > 0.0) || Double.IsInfinity fps then invalidArg (nameof fps) $"--fps must be a positive number, got {fps}"
        let pick (slot: int) (f: DecodedFrame) =
            { Slot = slot; SampleTime = samplingTime fps slot; SourceIndex = f.Index; SourceTime = f.Time
              Image = { Width = f.Width; Height = f.Height; Channels = 3; Pixels = Array.copy f.Rgb } }
        seq {
            let mutable slot = 0
            let mutable prev : DecodedFrame option = None
            for f in frames do
                // f is the first frame after the sampling time: the previous one was on screen then.
                while f.Time > samplingTime fps slot + 1e-9 do
                    yield pick slot (defaultArg prev f)
                    slot <- slot + 1
                prev <- Some f
            match prev with
            | Some last ->
                let endTime = last.Time + last.Duration
                while float slot / fps < endTime - 1e-6 do
                    yield pick slot last
                    slot <- slot + 1
                onEnd endTime
            | None -> onEnd 0.0
        }

    /// The frames of a video file sampled at `fps` per second (lazy; ffmpeg stops when the sequence is disposed).
    let read (path: string) (fps: float) : seq<SampledFrame> =
        seq { yield! decode (Ffmpeg.probe path) ignore |> sample fps ignore }

/// The first audio track of a media file as float64 samples, read forward in spans (ffmpeg decodes it at its
/// native rate and channel count; resampling and the channel mean are the audio front end's, as for WAV files).
type AudioStream(path: string, track: AudioTrack) =
    let args =
        [ "-nostdin"; "-hide_banner"; "-v"; "error"; "-i"; Ffmpeg.inputArg path; "-map"; "0:a:0"; "-vn"; "-sn"; "-dn"
          "-ac"; string track.Channels; "-ar"; string track.SampleRate; "-f"; "f64le"; "-acodec"; "pcm_f64le"; "pipe:1" ]
    let child = new Ffmpeg.Child(Ffmpeg.ffmpeg path, args, false, ignore)
    let mutable position = 0L
    let mutable ended = false
    let buf = Array.zeroCreate<byte> (8 * track.Channels * 4096)
    member _.SampleRate = track.SampleRate
    member _.Channels = track.Channels
    /// Samples per channel read so far.
    member _.Position = position
    member _.Ended = ended
    /// Reads up to `samples` samples per channel (fewer at the end of the track).
    member _.Read(samples: int) : float[][] =
        let ch = track.Channels
        let out = Array.init ch (fun _ -> Array.zeroCreate<float> samples)
        let mutable got = 0
        let frameBytes = 8 * ch
        while got < samples && not ended do
            let want = min (samples - got) (buf.Length / frameBytes) * frameBytes
            let mutable n = 0
            let mutable eof = false
            while n < want && not eof do
                let r = child.Stdout.Read(buf, n, want - n)
                if r = 0 then eof <- true else n <- n + r
            let frames = n / frameBytes
            for i in 0 .. frames - 1 do
                for c in 0 .. ch - 1 do
                    out[c][got + i] <- BitConverter.ToDouble(buf, (i * ch + c) * 8)
            got <- got + frames
            if eof then ended <- true
        position <- position + int64 got
        if got < samples then out |> Array.map (fun a -> Array.sub a 0 got) else out
    /// Skips forward to `sample` (per channel), if it is ahead.
    member this.SkipTo(sample: int64) =
        while position < sample && not ended do
            this.Read(int (min 65536L (sample - position))) |> ignore
    member _.LastError = child.LastError
    interface IDisposable with
        member _.Dispose() = (child :> IDisposable).Dispose()
