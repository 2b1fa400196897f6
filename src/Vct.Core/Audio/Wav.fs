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

/// WAV decoding (our RIFF/RF64 chunk walk and sample decoding; NAudio.Core names encodings and writes test files)
/// and input checks. Every size is 64-bit and checked against the bytes the file has before anything is allocated.
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

    /// Decodes interleaved little-endian sample bytes into `out` from frame `first` on (`data` holds whole frames).
    let private decodeInto (scaling: SampleScaling) (isFloat: bool) (bits: int) (channels: int) (data: ReadOnlySpan<byte>) (out: float[][]) (first: int) =
        let bytesPer = bits / 8
        let frames = data.Length / (bytesPer * channels)
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
                out[c][first + f] <- v

    /// Decodes interleaved little-endian sample bytes. `bits` is the container size; `isFloat` selects IEEE.
    let decode (scaling: SampleScaling) (isFloat: bool) (bits: int) (channels: int) (data: ReadOnlySpan<byte>) : float[][] =
        let frames = data.Length / (bits / 8 * channels)
        let out = Array.init channels (fun _ -> Array.zeroCreate<float> frames)
        decodeInto scaling isFloat bits channels data out 0
        out

    /// Largest `fmt `/`ds64` chunk read (WAVE_FORMAT_EXTENSIBLE needs 40 bytes).
    [<Literal>]
    let private MaxHeaderChunk = 65536L

    /// Audio bytes read and decoded at a time.
    [<Literal>]
    let private ReadBlock = 1048576

    /// Reads up to `count` bytes; fewer only at the end of the stream.
    let private readUpTo (s: Stream) (buf: byte[]) (count: int) =
        let mutable got = 0
        let mutable go = true
        while go && got < count do
            let n = s.Read(buf, got, count - got)
            if n <= 0 then go <- false else got <- got + n
        got

    /// A chunk id for messages: the four characters when printable, else their hex bytes.
    let private showId (b: byte[]) =
        if b |> Array.forall (fun c -> c >= 32uy && c < 127uy) then $"'{Text.Encoding.ASCII.GetString b}'"
        else "0x" + Convert.ToHexString b

    /// Where the RIFF chunk walk found the format and the audio (positions relative to the stream's start).
    type private Layout = { Format: byte[]; DataStart: int64; DataSize: int64 }

    /// Walks the RIFF/RF64 chunks with 64-bit positions, every step moving forward, reading no chunk body but
    /// `fmt ` and `ds64` (both capped at MaxHeaderChunk bytes). A seekable stream seeks past the other chunks (a
    /// chunk that claims more bytes than the file has is an error); a forward-only one reads past them and must
    /// have `fmt ` before `data`. Leaves the stream at the first audio byte.
    let private walk (name: string) (s: Stream) : Layout =
        let bad (why: string) : 'T = fail name $"not a readable WAV file ({why})"
        let seekable = s.CanSeek
        let origin = if seekable then s.Position else 0L
        let total = if seekable then s.Length - origin else Int64.MaxValue
        let head = Array.zeroCreate<byte> 12
        let n = readUpTo s head 12
        let riff = Text.Encoding.ASCII.GetString(head, 0, 4)
        if n < 12 || (riff <> "RIFF" && riff <> "RF64") || Text.Encoding.ASCII.GetString(head, 8, 4) <> "WAVE" then
            bad "no RIFF/WAVE header"
        let rf64 = riff = "RF64"
        let mutable cur = 12L
        let mutable fmt: byte[] = null
        let mutable data = None
        let mutable ds64Data = -1L
        let mutable go = true
        let scratch = Array.zeroCreate<byte> 65536
        let skipTo (target: int64) =
            if seekable then s.Position <- origin + target
            else
                let mutable left = target - cur
                while left > 0L do
                    let r = s.Read(scratch, 0, int (min left (int64 scratch.Length)))
                    if r <= 0 then left <- 0L else left <- left - int64 r
            cur <- target
        let chunkHead = Array.zeroCreate<byte> 8
        while go do
            let start = cur
            if start + 8L > total || readUpTo s chunkHead 8 < 8 then go <- false
            else
                let id = chunkHead[0..3]
                let idText = Text.Encoding.ASCII.GetString id
                let size32 = int64 (BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(chunkHead, 4, 4)))
                let body = start + 8L
                cur <- body
                let readBody (size: int64) =
                    if size > MaxHeaderChunk then bad $"{showId id} chunk of {size} bytes at byte {start} (at most {MaxHeaderChunk} accepted)"
                    let b = Array.zeroCreate<byte> (int size)
                    if readUpTo s b b.Length < b.Length then bad $"{showId id} chunk at byte {start} is truncated"
                    cur <- body + size
                    b
                let mutable size = size32
                match idText with
                | "fmt " ->
                    if size < 16L then bad $"'fmt ' chunk of {size} bytes (at least 16 needed)"
                    fmt <- readBody size
                | "ds64" when rf64 ->
                    let b = readBody size
                    if b.Length < 16 then bad $"'ds64' chunk of {b.Length} bytes (at least 16 needed)"
                    ds64Data <- BinaryPrimitives.ReadInt64LittleEndian(ReadOnlySpan(b, 8, 8))
                    if ds64Data < 0L || ds64Data > (1L <<< 56) then bad $"'ds64' chunk declares {ds64Data} bytes of audio"
                | "data" ->
                    if size32 = 0xFFFFFFFFL then
                        // RF64 keeps the real size in ds64; in plain RIFF it is the streaming placeholder: up to the end.
                        if rf64 && ds64Data >= 0L then size <- ds64Data
                        elif seekable then size <- total - body
                        else bad "a data chunk of unknown length (0xFFFFFFFF) needs a seekable file"
                    data <- Some(body, size)
                    if not (isNull fmt) then go <- false
                    elif not seekable then bad "the 'fmt ' chunk comes after the 'data' chunk (not supported in a stream)"
                | _ ->
                    if seekable && body + size > total then
                        bad $"chunk {showId id} at byte {start} declares {size} bytes, but the file ends at byte {total}"
                if go then
                    // Every step moves forward: next >= start + 8 since sizes are non-negative 64-bit values.
                    let next = body + size + (size &&& 1L)
                    if next <= start then bad $"chunk walk stalled at byte {start}"
                    if next > total then go <- false else skipTo next
        if isNull fmt then bad "no 'fmt ' chunk"
        match data with
        | None -> bad "no 'data' chunk"
        | Some(start, size) ->
            if seekable then s.Position <- origin + start
            { Format = fmt; DataStart = start; DataSize = size }

    /// Reads a WAV stream (any common encoding, plain or WAVE_FORMAT_EXTENSIBLE, RIFF or RF64); `name` goes into
    /// errors. The audio is read and decoded a block at a time (no copy of the file in memory).
    let readStream (scaling: SampleScaling) (name: string) (stream: Stream) : Waveform =
        if stream.CanSeek && stream.Length = 0L then fail name "empty file (0 bytes)"
        let layout = walk name stream
        let total = if stream.CanSeek then stream.Length - (stream.Position - layout.DataStart) else Int64.MaxValue
        let held = total - layout.DataStart
        let declared = layout.DataSize
        if stream.CanSeek && declared > held then
            fail name $"truncated: the header declares {declared} bytes of audio but the file holds {held}"
        let f = layout.Format
        let tag = int (BinaryPrimitives.ReadUInt16LittleEndian(ReadOnlySpan(f, 0, 2)))
        let channels = int (BinaryPrimitives.ReadUInt16LittleEndian(ReadOnlySpan(f, 2, 2)))
        let rate = int64 (BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(f, 4, 4)))
        let align = int (BinaryPrimitives.ReadUInt16LittleEndian(ReadOnlySpan(f, 12, 2)))
        let bits = int (BinaryPrimitives.ReadUInt16LittleEndian(ReadOnlySpan(f, 14, 2)))
        let isFloat, kind =
            match tag with
            | 1 -> false, "PCM"
            | 3 -> true, "IEEE float"
            | 0xFFFE ->
                // WAVE_FORMAT_EXTENSIBLE: cbSize (2), valid bits (2), channel mask (4), sub-format GUID (16).
                let sub = if f.Length >= 40 then Some(Guid(ReadOnlySpan(f, 24, 16))) else None
                match sub with
                | Some g when g = pcmGuid -> false, "PCM (extensible)"
                | Some g when g = floatGuid -> true, "IEEE float (extensible)"
                | Some g -> fail name $"unsupported WAVE_FORMAT_EXTENSIBLE sub-format {g}"
                | None -> fail name "unsupported WAVE_FORMAT_EXTENSIBLE header (no sub-format)"
            | t -> fail name $"unsupported WAV encoding {LanguagePrimitives.EnumOfValue<uint16, WaveFormatEncoding> (uint16 t)} (expected PCM or IEEE float; convert with ffmpeg)"
        let ok = if isFloat then bits = 32 || bits = 64 else bits = 8 || bits = 16 || bits = 24 || bits = 32
        if not ok then fail name $"unsupported sample size: {bits}-bit {kind}"
        if channels < 1 then fail name $"invalid channel count {channels}"
        if rate < int64 MinSampleRate || rate > int64 MaxSampleRate then
            fail name $"implausible sample rate {rate} Hz (accepted: {MinSampleRate}..{MaxSampleRate} Hz)"
        let blockAlign = channels * bits / 8
        if align <> blockAlign then fail name $"inconsistent header: block align {align}, expected {blockAlign}"
        let frames = declared / int64 blockAlign
        if frames > int64 Array.MaxLength then
            fail name $"too long: {frames} frames per channel (at most {Array.MaxLength} are read)"
        let out =
            try Array.init channels (fun _ -> Array.zeroCreate<float> (int frames))
            with :? OutOfMemoryException -> fail name $"{frames} frames x {channels} channels do not fit in memory"
        let block = Array.zeroCreate<byte> (int (min (int64 (max 1 (ReadBlock / blockAlign) * blockAlign)) (max declared 1L)))
        let mutable got = 0L
        let mutable frame = 0
        let mutable go = true
        while go && got < declared do
            let want = int (min (int64 block.Length) (declared - got))
            let n = readUpTo stream block want
            got <- got + int64 n
            let whole = n / blockAlign * blockAlign
            decodeInto scaling isFloat bits channels (ReadOnlySpan(block, 0, whole)) out frame
            frame <- frame + whole / blockAlign
            if n < want then go <- false
        if got < declared && not stream.CanSeek then
            fail name $"truncated: the header declares {declared} bytes of audio but the file holds {got}"
        let out = if int64 frame < frames then out |> Array.map (fun c -> c[.. frame - 1]) else out
        if got % int64 blockAlign <> 0L then
            fail name $"truncated: {got} bytes of audio is not a whole number of {blockAlign}-byte frames"
        validate
            { Channels = out
              SampleRate = int rate
              Source = name
              Encoding = $"{kind} {bits}-bit, {channels} ch" }

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
