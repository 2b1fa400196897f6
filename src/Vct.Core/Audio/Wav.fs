namespace Vct.Core.Audio

open System
open System.Buffers.Binary
open System.IO
open NAudio.Wave

/// How integer samples become floats.
[<RequireQualifiedAccess>]
type SampleScaling =
    /// Full precision: a b-bit integer v becomes v / 2^(b-1) (8-bit: (v - 128) / 128); floats are kept.
    | Exact
    /// As the official `vggish_input.wavfile_to_examples`: `soundfile.read(dtype="int16") / 32768`. libsndfile
    /// drops the low bits of 24/32-bit PCM (arithmetic shift, i.e. floor) and rounds float samples to the
    /// nearest integer *without* scaling, so a float WAV becomes all -1/0/+1 LSBs (near silence).
    | OfficialInt16

/// A decoded clip: samples [channels][frames] as float64, and where they came from.
type Waveform =
    { /// Per-channel samples (float64, nominally in [-1, 1)).
      Channels: float[][]
      SampleRate: int
      /// File the clip was read from ("" for in-memory data).
      Source: string
      /// Encoding as read, e.g. "PCM 24-bit (extensible)", "IEEE float 32-bit", "ffmpeg: mp3".
      Encoding: string }
    /// Samples per channel.
    member w.Length = if w.Channels.Length = 0 then 0 else w.Channels[0].Length
    /// Duration in seconds.
    member w.Duration = float w.Length / float w.SampleRate

    /// Mean over channels, as `np.mean(data, axis=1)` in the official code (float64).
    member w.Mono() : float[] =
        match w.Channels with
        | [| one |] -> Array.copy one
        | chans ->
            let n = w.Length
            let c = float chans.Length
            Array.init n (fun i ->
                let mutable s = 0.0
                for ch in chans do s <- s + ch[i]
                s / c)

/// WAV decoding (NAudio.Core parses the RIFF header; the sample decoding is ours) and input checks.
[<RequireQualifiedAccess>]
module Wav =
    /// Lowest and highest sample rates accepted (Hz). Anything else is almost surely a broken header.
    [<Literal>]
    let MinSampleRate = 1000

    [<Literal>]
    let MaxSampleRate = 768000

    let private pcmGuid = Guid("00000001-0000-0010-8000-00aa00389b71")
    let private floatGuid = Guid("00000003-0000-0010-8000-00aa00389b71")

    let private fail (path: string) (problem: string) : 'T =
        raise (InvalidDataException($"{path}: {problem}"))

    /// Checks the rate and that every sample is finite; returns the waveform unchanged.
    let validate (w: Waveform) : Waveform =
        let name = if String.IsNullOrEmpty w.Source then "<waveform>" else w.Source
        if w.SampleRate < MinSampleRate || w.SampleRate > MaxSampleRate then
            fail name $"implausible sample rate {w.SampleRate} Hz (accepted: {MinSampleRate}..{MaxSampleRate} Hz)"
        if w.Channels.Length = 0 then fail name "no channels"
        if w.Length = 0 then fail name "no audio samples (empty data chunk)"
        for c in 0 .. w.Channels.Length - 1 do
            let ch = w.Channels[c]
            let bad = ch |> Array.tryFindIndex (fun v -> not (Double.IsFinite v))
            match bad with
            | Some i ->
                let count = ch |> Array.sumBy (fun v -> if Double.IsFinite v then 0 else 1)
                fail name $"{count} non-finite (NaN/Inf) samples in channel {c}, the first at sample {i} ({float i / float w.SampleRate:F3} s)"
            | None -> ()
        w

    /// Decodes interleaved little-endian sample bytes. `bits` is the container size; `isFloat` selects IEEE.
    let decode (scaling: SampleScaling) (isFloat: bool) (bits: int) (channels: int) (data: ReadOnlySpan<byte>) : float[][] =
        let bytesPer = bits / 8
        let frames = data.Length / (bytesPer * channels)
        let out = Array.init channels (fun _ -> Array.zeroCreate<float> frames)
        let official = (scaling = SampleScaling.OfficialInt16)
        let roundToInt16 (v: float) =
            // libsndfile float -> short without scaling: lrint, saturated.
            let r = Math.Round(v, MidpointRounding.ToEven)
            if Double.IsNaN r then r else Math.Clamp(r, -32768.0, 32767.0) / 32768.0
        for f in 0 .. frames - 1 do
            for c in 0 .. channels - 1 do
                let o = (f * channels + c) * bytesPer
                let v =
                    match isFloat, bits with
                    | true, 32 ->
                        let x = float (BinaryPrimitives.ReadSingleLittleEndian(data.Slice(o, 4)))
                        if official then roundToInt16 x else x
                    | true, 64 ->
                        let x = BinaryPrimitives.ReadDoubleLittleEndian(data.Slice(o, 8))
                        if official then roundToInt16 x else x
                    | false, 8 -> float (int data[o] - 128) / 128.0
                    | false, 16 -> float (BinaryPrimitives.ReadInt16LittleEndian(data.Slice(o, 2))) / 32768.0
                    | false, 24 ->
                        let i = (int data[o] ||| (int data[o + 1] <<< 8) ||| (int (sbyte data[o + 2]) <<< 16))
                        if official then float (i >>> 8) / 32768.0 else float i / 8388608.0
                    | false, 32 ->
                        let i = BinaryPrimitives.ReadInt32LittleEndian(data.Slice(o, 4))
                        if official then float (i >>> 16) / 32768.0 else float i / 2147483648.0
                    | _ ->
                        let kind = if isFloat then "float" else "PCM"
                        invalidArg (nameof bits) $"unsupported sample format: {bits}-bit {kind}"
                out[c][f] <- v
        out

    /// The data chunk's declared size and the bytes the file really has after its header (RIFF chunk walk).
    /// None when there is no data chunk or the size is the streaming placeholder 0xFFFFFFFF.
    let private dataChunkSizes (bytes: byte[]) : (int64 * int64) option =
        let mutable pos = 12
        let mutable result = None
        let mutable go = bytes.Length >= 12
        while go && pos + 8 <= bytes.Length do
            let id = Text.Encoding.ASCII.GetString(bytes, pos, 4)
            let size = int64 (BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(bytes, pos + 4, 4)))
            if id = "data" then
                if size <> 0xFFFFFFFFL then result <- Some(size, int64 bytes.Length - int64 (pos + 8))
                go <- false
            else pos <- pos + 8 + int size + int (size &&& 1L)
        result

    /// Reads a WAV stream (any common encoding, plain or WAVE_FORMAT_EXTENSIBLE); `name` goes into errors.
    let readStream (scaling: SampleScaling) (name: string) (stream: Stream) : Waveform =
        if stream.CanSeek && stream.Length = 0L then fail name "empty file (0 bytes)"
        let bytes =
            use ms = new MemoryStream()
            stream.CopyTo ms
            ms.ToArray()
        match dataChunkSizes bytes with
        | Some(declared, held) when declared > held ->
            fail name $"truncated: the header declares {declared} bytes of audio but the file holds {held}"
        | _ -> ()
        let stream = new MemoryStream(bytes, false)
        let reader =
            try new WaveFileReader(stream)
            with
            | :? FormatException as e -> fail name $"not a readable WAV file ({e.Message})"
            | :? EndOfStreamException -> fail name "not a readable WAV file (truncated header)"
            | :? ArgumentException as e -> fail name $"not a readable WAV file ({e.Message})"
            | :? InvalidDataException as e -> fail name $"not a readable WAV file ({e.Message})"
        use reader = reader
        let fmt = reader.WaveFormat
        let isFloat, kind =
            match fmt.Encoding with
            | WaveFormatEncoding.Pcm -> false, "PCM"
            | WaveFormatEncoding.IeeeFloat -> true, "IEEE float"
            | WaveFormatEncoding.Extensible ->
                // NAudio hands WAVE_FORMAT_EXTENSIBLE back as WaveFormatExtensible or as WaveFormatExtraData
                // (cbSize bytes: valid bits 2, channel mask 4, sub-format GUID 16).
                let sub =
                    match fmt with
                    | :? WaveFormatExtensible as x -> Some x.SubFormat
                    | :? WaveFormatExtraData as x when x.ExtraSize >= 22 -> Some(Guid(ReadOnlySpan(x.ExtraData, 6, 16)))
                    | _ -> None
                match sub with
                | Some g when g = pcmGuid -> false, "PCM (extensible)"
                | Some g when g = floatGuid -> true, "IEEE float (extensible)"
                | Some g -> fail name $"unsupported WAVE_FORMAT_EXTENSIBLE sub-format {g}"
                | None -> fail name "unsupported WAVE_FORMAT_EXTENSIBLE header (no sub-format)"
            | e -> fail name $"unsupported WAV encoding {e} (expected PCM or IEEE float; convert with ffmpeg)"
        let bits = fmt.BitsPerSample
        let ok = if isFloat then bits = 32 || bits = 64 else bits = 8 || bits = 16 || bits = 24 || bits = 32
        if not ok then fail name $"unsupported sample size: {bits}-bit {kind}"
        if fmt.Channels < 1 then fail name $"invalid channel count {fmt.Channels}"
        if fmt.SampleRate < MinSampleRate || fmt.SampleRate > MaxSampleRate then
            fail name $"implausible sample rate {fmt.SampleRate} Hz (accepted: {MinSampleRate}..{MaxSampleRate} Hz)"
        let blockAlign = fmt.Channels * bits / 8
        if fmt.BlockAlign <> blockAlign then fail name $"inconsistent header: block align {fmt.BlockAlign}, expected {blockAlign}"
        let declared = reader.Length
        if declared > int64 Int32.MaxValue then fail name $"data chunk too large ({declared} bytes)"
        let buffer = Array.zeroCreate<byte> (int declared)
        let mutable got = 0
        let mutable go = true
        while go && got < buffer.Length do
            let n = reader.Read(buffer, got, buffer.Length - got)
            if n <= 0 then go <- false else got <- got + n
        if got < buffer.Length then
            fail name $"truncated: the header declares {declared} bytes of audio but the file holds {got}"
        if got % blockAlign <> 0 then
            fail name $"truncated: {got} bytes of audio is not a whole number of {blockAlign}-byte frames"
        let chans = decode scaling isFloat bits fmt.Channels (ReadOnlySpan(buffer, 0, got))
        validate
            { Channels = chans
              SampleRate = fmt.SampleRate
              Source = name
              Encoding = $"{kind} {bits}-bit, {fmt.Channels} ch" }

    /// Reads a WAV file.
    let read (scaling: SampleScaling) (path: string) : Waveform =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        use fs = File.OpenRead path
        readStream scaling path fs

    /// Writes float samples [channels][frames] as a 32-bit float WAV (for tests and tools).
    let writeFloat32 (path: string) (sampleRate: int) (channels: float[][]) =
        let fmt = WaveFormat.CreateIeeeFloatWaveFormat(sampleRate, channels.Length)
        use w = new WaveFileWriter(path, fmt)
        let n = if channels.Length = 0 then 0 else channels[0].Length
        let frame = Array.zeroCreate<float32> channels.Length
        for i in 0 .. n - 1 do
            for c in 0 .. channels.Length - 1 do frame[c] <- float32 (channels[c][i])
            w.WriteSamples(frame, 0, frame.Length)
