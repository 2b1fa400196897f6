namespace Vct.Core.Video

open System
open System.IO
open System.Text.Json
open System.Threading
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio

/// The audio track a video carries.
type AudioTrack =
    { Codec: string
      SampleRate: int
      Channels: int }

/// What ffprobe says about a video file.
type VideoProbe =
    { Path: string
      /// Display size (after the rotation metadata is applied, as ffmpeg's decoder does by default).
      Width: int
      Height: int
      /// Rotation metadata in degrees (0, 90, 180, 270; from the display matrix or the `rotate` tag).
      Rotation: int
      Codec: string
      PixelFormat: string
      /// Average frame rate as ffmpeg writes it ("30000/1001") and its value.
      FrameRateText: string
      FrameRate: float
      /// Container or stream duration in seconds, when known.
      Duration: float option
      /// The first audio track, if any.
      Audio: AudioTrack option }

/// ffmpeg and ffprobe as child processes. Every file name is passed as one argument (`ArgumentList`), never
/// through a command string, so no name can inject options.
[<RequireQualifiedAccess>]
module Ffmpeg =
    let private installHint =
        "install ffmpeg (Debian/Ubuntu: `sudo apt-get install ffmpeg`, macOS: `brew install ffmpeg`, "
        + "Windows: `winget install ffmpeg`) or point FFMPEG_BINARY at it"

    /// The ffmpeg executable (FFMPEG_BINARY, then PATH) or a clear error naming what needed it.
    let ffmpeg (what: string) : string =
        match Media.tryFindFfmpeg () with
        | Some p -> p
        | None -> raise (NotSupportedException($"{what}: ffmpeg is needed to read videos but was not found; {installHint}"))

    /// ffprobe, looked up beside ffmpeg first.
    let ffprobe (what: string) : string =
        let ff = ffmpeg what
        let exe = if OperatingSystem.IsWindows() then "ffprobe.exe" else "ffprobe"
        let beside = Path.Combine(Path.GetDirectoryName ff, exe)
        if File.Exists beside then beside
        else raise (NotSupportedException($"{what}: ffprobe (part of ffmpeg) was not found beside {ff}; {installHint}"))

    /// A started child process (see `ChildProcess.Child`: one argument per list item, stderr tail kept).
    type Child = ChildProcess.Child

    /// A local file as ffmpeg's input or output argument (see `ChildProcess.fileArg`).
    let inputArg (path: string) = ChildProcess.fileArg path

    /// Runs a program to the end; returns (exit code, stdout, last stderr line).
    let run (exe: string) (args: string list) : int * string * string = ChildProcess.run exe args

    let private parseRate (text: string) =
        match text.Split('/') with
        | [| n; d |] ->
            match Double.TryParse(n, Globalization.CultureInfo.InvariantCulture), Double.TryParse(d, Globalization.CultureInfo.InvariantCulture) with
            | (true, n), (true, d) when d > 0.0 && n > 0.0 -> n / d
            | _ -> 0.0
        | _ -> 0.0

    /// Probes a video file: display size, rotation, frame rate, duration, first audio track.
    let probe (path: string) : VideoProbe =
        if not (File.Exists path) then
            if Directory.Exists path then raise (InvalidDataException($"{path}: is a folder, not a video file"))
            raise (FileNotFoundException($"{path}: no such file", path))
        if FileInfo(path).Length = 0L then raise (InvalidDataException($"{path}: empty file (0 bytes)"))
        let code, json, err =
            run (ffprobe path) [ "-v"; "error"; "-print_format"; "json"; "-show_format"; "-show_streams"; inputArg path ]
        if code <> 0 then raise (InvalidDataException($"{path}: not a video ffmpeg can read ({err})"))
        use doc = JsonDocument.Parse(json)
        let root = doc.RootElement
        let str (e: JsonElement) (name: string) =
            match e.TryGetProperty name with
            | true, v when v.ValueKind = JsonValueKind.String -> v.GetString()
            | true, v when v.ValueKind = JsonValueKind.Number -> v.GetRawText()
            | _ -> ""
        let num (e: JsonElement) (name: string) =
            match Double.TryParse(str e name, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
            | true, v -> Some v
            | _ -> None
        let streams =
            match root.TryGetProperty "streams" with
            | true, s when s.ValueKind = JsonValueKind.Array -> [ for x in s.EnumerateArray() -> x ]
            | _ -> []
        let isAttachedPic (s: JsonElement) =
            match s.TryGetProperty "disposition" with
            | true, d -> (match d.TryGetProperty "attached_pic" with | true, v -> v.ValueKind = JsonValueKind.Number && v.GetInt32() = 1 | _ -> false)
            | _ -> false
        let video =
            streams |> List.tryFind (fun s -> str s "codec_type" = "video" && not (isAttachedPic s))
        let video =
            match video with
            | Some v -> v
            | None -> raise (InvalidDataException($"{path}: has no video stream (ffprobe found {streams.Length} stream(s))"))
        let rotation =
            let fromMatrix =
                match video.TryGetProperty "side_data_list" with
                | true, l when l.ValueKind = JsonValueKind.Array ->
                    l.EnumerateArray() |> Seq.tryPick (fun d -> num d "rotation")
                | _ -> None
            let fromTag =
                match video.TryGetProperty "tags" with
                | true, t -> num t "rotate" |> Option.map (fun r -> -r)
                | _ -> None
            let r = defaultArg (Option.orElse fromTag fromMatrix) 0.0
            ((int (Math.Round r) % 360) + 360) % 360
        let w = int (defaultArg (num video "width") 0.0)
        let h = int (defaultArg (num video "height") 0.0)
        if w <= 0 || h <= 0 then raise (InvalidDataException($"{path}: the video stream has no frame size (corrupt file?)"))
        let w, h = if rotation = 90 || rotation = 270 then h, w else w, h
        let rateText =
            let a = str video "avg_frame_rate"
            if parseRate a > 0.0 then a else str video "r_frame_rate"
        let duration =
            match num video "duration" with
            | Some d when d > 0.0 -> Some d
            | _ ->
                match root.TryGetProperty "format" with
                | true, f -> num f "duration" |> Option.filter (fun d -> d > 0.0)
                | _ -> None
        let audio =
            streams
            |> List.tryFind (fun s -> str s "codec_type" = "audio")
            |> Option.map (fun a ->
                { Codec = str a "codec_name"
                  SampleRate = int (defaultArg (num a "sample_rate") 0.0)
                  Channels = int (defaultArg (num a "channels") 0.0) })
            |> Option.filter (fun a -> a.SampleRate > 0 && a.Channels > 0)
        { Path = path; Width = w; Height = h; Rotation = rotation; Codec = str video "codec_name"
          PixelFormat = str video "pix_fmt"; FrameRateText = rateText; FrameRate = parseRate rateText
          Duration = duration; Audio = audio }
