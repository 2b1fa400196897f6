namespace Vct.Core.Audio

open System
open System.IO
open Vct.Core
open Vct.Core.Platform

/// Reads audio from WAV directly and from any other container (mp3, flac, ogg, m4a, the audio track of
/// mp4/mkv/webm) through the `ffmpeg` program when it is installed.
[<RequireQualifiedAccess>]
module Media =
    /// Finds an `ffmpeg` executable: FFMPEG_BINARY (a file or folder), then the PATH.
    let tryFindFfmpeg () : string option =
        let exe = if OperatingSystem.IsWindows() then "ffmpeg.exe" else "ffmpeg"
        let fromVar =
            match Environment.GetEnvironmentVariable "FFMPEG_BINARY" with
            | null | "" -> None
            | p when File.Exists p -> Some p
            | p when File.Exists(Path.Combine(p, exe)) -> Some(Path.Combine(p, exe))
            | _ -> None
        match fromVar with
        | Some p -> Some p
        | None ->
            (Environment.GetEnvironmentVariable "PATH" |> Option.ofObj |> Option.defaultValue "")
                .Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            |> Array.map (fun d -> Path.Combine(d, exe))
            |> Array.tryFind File.Exists

    let private installHint =
        "ffmpeg is needed to read this format but was not found; install it (Debian/Ubuntu: `sudo apt-get install ffmpeg`, "
        + "macOS: `brew install ffmpeg`, Windows: `winget install ffmpeg`) or point FFMPEG_BINARY at it, or convert the file to WAV"

    /// True when the first 12 bytes are a RIFF/WAVE header.
    let isRiffWave (path: string) =
        use fs = File.OpenRead path
        let head = Array.zeroCreate<byte> 12
        let n = fs.Read(head, 0, 12)
        n = 12 && head[0..3] = "RIFF"B && head[8..11] = "WAVE"B

    /// Decodes any file ffmpeg can read with the given ffmpeg (None: not installed -> a clear error).
    let readWithFfmpegAt (ffmpeg: string option) (scaling: SampleScaling) (path: string) : Waveform =
        let ffmpeg =
            match ffmpeg with
            | Some p -> p
            | None -> raise (NotSupportedException($"{path}: {installHint}"))
        let tmp = Path.Combine(Path.GetTempPath(), $"vct-audio-{Guid.NewGuid():N}.wav")
        try
            // One argument per item (no command string: a '"' or a leading '-' in a name cannot inject options),
            // file names behind `file:`, and the first audio stream chosen explicitly.
            let args =
                [ "-nostdin"; "-hide_banner"; "-v"; "error"; "-i"; ChildProcess.fileArg path; "-map"; "0:a:0"
                  "-vn"; "-sn"; "-dn"; "-c:a"; "pcm_f64le"; "-f"; "wav"; "-y"; ChildProcess.fileArg tmp ]
            let code, _, err = ChildProcess.run ffmpeg args
            if code <> 0 || not (File.Exists tmp) then
                raise (InvalidDataException($"{path}: ffmpeg could not decode an audio track ({err})"))
            let w = Wav.read SampleScaling.Exact tmp
            let w = { w with Source = path; Encoding = $"ffmpeg ({Path.GetExtension(path).TrimStart('.')}) -> {w.Encoding}" }
            match scaling with
            | SampleScaling.Exact -> w
            | SampleScaling.OfficialInt16 ->
                // soundfile cannot read these containers at all; quantise to 16 bits as the official tool would
                // after a conversion to 16-bit WAV.
                let q (v: float) = Math.Clamp(Math.Round(v * 32768.0, MidpointRounding.ToEven), -32768.0, 32767.0) / 32768.0
                { w with Channels = w.Channels |> Array.map (Array.map q) }
        finally
            try File.Delete tmp with _ -> ()

    /// Decodes any file ffmpeg can read: all channels, native rate, as float64 (no resampling here).
    let readWithFfmpeg (scaling: SampleScaling) (path: string) : Waveform =
        readWithFfmpegAt (tryFindFfmpeg ()) scaling path

    /// Reads an audio file: WAV (by its RIFF header) directly, anything else through ffmpeg.
    /// A file named .wav without a RIFF/WAVE header is an error (not handed to ffmpeg).
    let read (scaling: SampleScaling) (path: string) : Waveform =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        if FileInfo(path).Length = 0L then raise (InvalidDataException($"{path}: empty file (0 bytes)"))
        if isRiffWave path then Wav.read scaling path
        elif Path.GetExtension(path).Equals(".wav", StringComparison.OrdinalIgnoreCase) then
            raise (InvalidDataException($"{path}: not a WAV file (no RIFF/WAVE header)"))
        else readWithFfmpeg scaling path
