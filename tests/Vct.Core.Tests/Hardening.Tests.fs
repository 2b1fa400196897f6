module Vct.Core.Tests.HardeningTests

// Regression tests of issue #11 ("Hardening"): each crafted file is made here (a few bytes) and each error is
// checked word for word. Every body runs under a time bound, so a regression fails instead of hanging.

open System
open System.IO
open System.Text
open System.Threading
open System.Threading.Tasks
open Expecto
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio
open Vct.Core.Checkpoint
open Vct.Core.Data
open Vct.Core.Tests.Support
open Vct.Core.Tests.Crafted

/// Runs ffmpeg with one argument per item; fails the test when it fails.
let ffmpegTo (ffmpeg: string) (args: string list) =
    let code, _, err = ChildProcess.run ffmpeg ([ "-nostdin"; "-v"; "error"; "-y" ] @ args)
    if code <> 0 then failtest $"ffmpeg failed: {err}"

/// How a loader scenario fails: a worker (from batch 2 on), the consumer (after its first batch), the caller's
/// cancellation (after the first batch), in any combination.
type private Failing = { Worker: bool; Consumer: bool; Cancel: bool }

/// Runs one loader scenario: 2 workers, 1 batch of prefetch, batches of 2; returns the exception that ended it.
let private loaderScenario (f: Failing) : exn =
    let workerFailed = new ManualResetEventSlim(false)
    use cts = new CancellationTokenSource()
    let loader =
        BatchLoader(fakeRecords 40, { LoaderOptions.Default with BatchSize = 2; Workers = 2; Prefetch = 1; Shuffle = false }, fun r _ ->
            if f.Worker && int r.Id >= 4 then
                workerFailed.Set()
                raise (InvalidDataException $"{r.Id}: worker failed")
            r.Id)
    throwsWithin 20 $"loader with %A{f}" (fun () ->
        let mutable n = 0
        for _ in loader.Epoch(0, cts.Token) do
            n <- n + 1
            if n = 1 then
                // Let the producer block on the full queue (with its batch or its error) before the consumer stops.
                if f.Worker then workerFailed.Wait(TimeSpan.FromSeconds 10.0) |> ignore
                Thread.Sleep 200
                if f.Cancel then cts.Cancel()
                if f.Consumer then raise (InvalidOperationException "consumer failed")
        if not f.Worker && not f.Consumer && not f.Cancel then failtest "nothing failed"
        failtest $"the epoch ended normally after {n} batches")

/// The loading error an epoch rethrows for a failing worker.
let private isLoadingError (e: exn) =
    match e with
    | :? AggregateException as a -> a.Message.StartsWith "data loading failed" && a.Message.Contains "4: worker failed"
    | _ -> false

[<Tests>]
let tests =
    testList "Hardening" [
        // --- Images: a forged header never allocates or decodes past the pixel budget ---------------------------
        test "a 69-byte PNG that claims 100000x100000 pixels is refused naming the file and its size (no SIGSEGV)" {
            use tmp = new TempDir("vct-harden")
            let bytes = forgedPng 100000u 100000u
            Expect.equal bytes.Length 69 "a 69-byte file"
            let path = crafted tmp "huge.png" bytes
            let expected = $"{path}: image is 100000x100000 (10000000000 pixels), over the budget of 67108864 pixels per frame"
            for read in [ ImageIO.readRgb; ImageIO.readLabels ] do
                let e = throwsWithin 20 "decode" (fun () -> read path |> ignore)
                Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}"
                Expect.equal e.Message expected "exact message"
        }

        test "a PNG whose width x height x 4 wraps to 0 in 32 bits is refused as well" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "wrap.png" (forgedPng 65536u 16384u)
            let e = throwsWithin 20 "decode" (fun () -> ImageIO.readRgb path |> ignore)
            Expect.equal e.Message $"{path}: image is 65536x16384 (1073741824 pixels), over the budget of 67108864 pixels per frame" "exact message"
        }

        test "a 69-byte PNG that claims 8192x8192 pixels (within the budget) is refused as implausible for its size" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "big.png" (forgedPng 8192u 8192u)
            let e = throwsWithin 20 "decode" (fun () -> ImageIO.readRgb path |> ignore)
            Expect.equal e.Message $"{path}: image is 8192x8192 (67108864 pixels) in a file of 69 bytes, more than 16384 pixels per byte (truncated or forged header)" "exact message"
            let allocated = within 20 "decode" (fun () -> allocatedBy (fun () -> ImageIO.readRgb path |> ignore))
            Expect.isLessThan allocated 10_000_000L "no pixel buffer allocated"
        }

        test "a palette PNG whose chunk length is near 2^32 ends the chunk walk (no wrap, no out-of-range read)" {
            use tmp = new TempDir("vct-harden")
            // Colour type 3 makes readLabels walk the chunks for PLTE; a chunk length of 0xFFFFFFF0 used to wrap.
            let ihdr = Array.concat [ be32 2u; be32 2u; [| 8uy; 3uy; 0uy; 0uy; 0uy |] ]
            let bytes =
                Array.concat
                    [ pngSignature
                      pngChunk "IHDR" ihdr
                      be32 0xFFFFFFF0u
                      Encoding.ASCII.GetBytes "tEXt"
                      Array.zeroCreate 8 ]
            let path = crafted tmp "walk.png" bytes
            let e = throwsWithin 20 "decode" (fun () -> ImageIO.readLabels path |> ignore)
            Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}: {e.Message}"
            Expect.stringStarts e.Message $"{path}: " "names the file"
        }

        // --- WAV: 64-bit chunk walk, every step forward ---------------------------------------------------------
        test "a WAV with a huge unknown chunk (size 0xFFFFFFF8, -8 as an int) fails at once instead of looping" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "huge_chunk.wav" (wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
            Expect.equal (FileInfo(path).Length) 52L "52 bytes"
            let expected = $"{path}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)"
            let e = throwsWithin 20 "Wav.read" (fun () -> Wav.read SampleScaling.Exact path |> ignore)
            Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}"
            Expect.equal e.Message expected "exact message"
            let e = throwsWithin 20 "Audio.load" (fun () -> Audio.load path |> ignore)
            Expect.equal e.Message expected "the same through Audio.load"
        }

        test "an odd-sized chunk that pads past the end and a data chunk past the end give clear errors" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "odd.wav" (wavWith [ "data", 4u, [| 1uy; 0uy; 2uy; 0uy |]; "LIST", 0xFFFFFFFFu, [||] ])
            // The data chunk comes first after fmt: the walk stops there and never looks at the broken LIST chunk.
            let w = within 20 "Wav.read" (fun () -> Wav.read SampleScaling.Exact path)
            Expect.equal w.Channels [| [| 1.0 / 32768.0; 2.0 / 32768.0 |] |] "two samples"
            let path = crafted tmp "past.wav" (wavWith [ "data", 0x7FFFFFF0u, [| 1uy; 0uy |] ])
            let e = throwsWithin 20 "Wav.read" (fun () -> Wav.read SampleScaling.Exact path |> ignore)
            Expect.equal e.Message $"{path}: truncated: the header declares 2147483632 bytes of audio but the file holds 2" "exact message"
        }

        test "a forward-only stream reads as the file does (streaming reads, no whole-file copy)" {
            let path = goldenWav "tones_48k_stereo_pcm24.wav"
            let direct = Wav.read SampleScaling.Exact path
            use fs = File.OpenRead path
            let oneWay =
                { new Stream() with
                    member _.CanRead = true
                    member _.CanSeek = false
                    member _.CanWrite = false
                    member _.Length = raise (NotSupportedException())
                    member _.Position with get () = raise (NotSupportedException()) and set _ = raise (NotSupportedException())
                    member _.Flush() = ()
                    member _.Read(b, o, c) = fs.Read(b, o, min c 1000)
                    member _.Seek(_, _) = raise (NotSupportedException())
                    member _.SetLength _ = raise (NotSupportedException())
                    member _.Write(_, _, _) = raise (NotSupportedException()) }
            let streamed = Wav.readStream SampleScaling.Exact path oneWay
            Expect.equal streamed.Channels direct.Channels "same samples"
            Expect.equal streamed.Encoding direct.Encoding "same encoding"
        }

        test "vct data check on a tree holding the huge-chunk WAV reports it and ends" {
            use tmp = new TempDir("vct-harden")
            let root = tmp.Folder "check"
            Synth.generate { SynthOptions.Default Subset.S4 with Seed = 2; Train = 1; Val = 1; Test = 0; Size = 40; EvalSize = 56 } root |> ignore
            let r = Avsbench.records Subset.S4 root "val" |> Array.exactlyOne
            let wav = match r.Audio with AudioSource.Wav p -> p | AudioSource.LogMelPickle p -> failtest $"{p}: not a wav"
            File.WriteAllBytes(wav, wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
            let report = within 60 "DataCheck.run" (fun () -> DataCheck.run root 2)
            Expect.equal report.Problems
                [| $"{wav}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)" |]
                "exactly that problem"
        }

        // --- Pickle: deep nesting neither hashes nor compares recursively ----------------------------------------
        test "a 1 MB pickle whose dict key is a tuple nested 1,000,000 deep loads (no stack overflow)" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "deep.pkl" (deepTuplePickle 1_000_000 1)
            Expect.isGreaterThan (FileInfo(path).Length) 1_000_000L "over 1 MB"
            use f = within 60 "Pth.read" (fun () -> Pth.read path)
            Expect.equal f.Format PthFormat.Pickle "a plain pickle"
            match f.Root with
            | PyValue.Dict d -> Expect.equal d.Count 1 "one key"
            | other -> failtest $"a dict expected, got {other.TypeName}"
        }

        test "two equal deeply nested tuple keys are one key (iterative equality)" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "deep2.pkl" (deepTuplePickle 300_000 2)
            use f = within 60 "Pth.read" (fun () -> Pth.read path)
            match f.Root with
            | PyValue.Dict d -> Expect.equal d.Count 1 "equal keys"
            | other -> failtest $"a dict expected, got {other.TypeName}"
            let e = throwsWithin 60 "LogMelPickle.read" (fun () -> LogMelPickle.read path |> ignore)
            Expect.equal e.Message $"{path}: the pickle holds a dict, not a tensor" "exact message"
        }

        // --- Paths: CSV names stay one path component; writers stay inside their output folder -----------------
        test "CSV names that are absolute, hold '..', separators or NUL are refused with the CSV line" {
            use tmp = new TempDir("vct-harden")
            for value, why in
                [ "../../evil", "holds a path separator"; "..", "is a folder reference"; ".", "is a folder reference"
                  "/etc/passwd", "holds a path separator"; "a\\b", "holds a path separator"; "nul\000x", "holds a NUL character"
                  "C:evil", "is an absolute path"; "", "is empty" ] do
                Expect.equal (SafePath.problem value) (Some why) $"'{value}'"
            for ok in [ "-0Ab3_x"; "vidéo_日本"; "a..b"; "x y" ] do
                Expect.equal (SafePath.problem ok) None $"'{ok}' is a plain name"
            let root = tmp.Folder "csv"
            let rep = Synth.generate { SynthOptions.Default Subset.S4 with Seed = 3; Train = 1; Val = 1; Test = 0; Size = 40; EvalSize = 56 } root
            let csv = Path.Combine(rep.Root, "s4_meta_data.csv")
            let lines = File.ReadAllLines csv
            let header = lines[0].Split(',')
            let valLine = lines |> Array.findIndex (fun l -> l.Contains ",val")
            let setCell (col: string) (v: string) =
                let cells = lines[valLine].Split(',')
                cells[Array.findIndex ((=) col) header] <- v
                File.WriteAllLines(csv, lines |> Array.mapi (fun i l -> if i = valLine then String.Join(",", cells) else l))
            setCell "name" "../../../outside"
            let e = throwsWithin 20 "records" (fun () -> Avsbench.records Subset.S4 root "val" |> ignore)
            Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}"
            Expect.equal e.Message $"{csv}: line {valLine + 1}: video id '../../../outside' holds a path separator (it must be a plain file name)" "exact message"
            let report = within 60 "DataCheck.run" (fun () -> DataCheck.run root 2)
            Expect.contains report.Problems e.Message "the check reports it"
            setCell "category" ".."
            let e = throwsWithin 20 "records" (fun () -> Avsbench.records Subset.S4 root "val" |> ignore)
            Expect.equal e.Message $"{csv}: line {valLine + 1}: category '..' is a folder reference (it must be a plain file name)" "exact message"
        }

        test "prepare refuses a vid that would write outside the output folder, naming the CSV line" {
            use tmp = new TempDir("vct-harden")
            let sem = tmp.Folder "sem"
            let meta = semanticTree sem "../../escape" "u"
            let out = tmp.Folder "out"
            let e = throwsWithin 60 "objectTree" (fun () -> Prepare.objectTree Subset.MS3 sem out ignore |> ignore)
            Expect.equal e.Message $"{meta}: line 2: vid '../../escape' holds a path separator (it must be a plain file name)" "exact message"
            Expect.isEmpty (Directory.GetFiles(out, "*", SearchOption.AllDirectories)) "nothing written"
        }

        test "prepare does not write through a symbolic link that leads out of the output folder" {
            use tmp = new TempDir("vct-harden")
            let sem = tmp.Folder "sem"
            semanticTree sem "v" "u" |> ignore
            let out = tmp.Folder "out"
            let outside = tmp.Folder "outside"
            let root = Path.Combine(out, "Multi-sources", "ms3_data_384")
            Directory.CreateDirectory root |> ignore
            let link = Path.Combine(root, "visual_frames_384")
            Directory.CreateSymbolicLink(link, outside) |> ignore
            let target = Path.Combine(root, "visual_frames_384", "v", "v_1.png")
            let e = throwsWithin 60 "objectTree" (fun () -> Prepare.objectTree Subset.MS3 sem out ignore |> ignore)
            Expect.isTrue (e :? IOException) $"IOException, got {e.GetType().Name}"
            Expect.equal e.Message
                $"{target}: refusing to write through the symbolic link {link} -> {outside}, which leads outside the output folder {root}"
                "exact message"
            Expect.isEmpty (Directory.GetFiles(outside, "*", SearchOption.AllDirectories)) "nothing written outside"
            // A link that stays inside the folder is followed as usual.
            Directory.Delete link
            Directory.CreateDirectory(Path.Combine(root, "real")) |> ignore
            Directory.CreateSymbolicLink(link, Path.Combine(root, "real")) |> ignore
            let rep = within 60 "objectTree" (fun () -> Prepare.objectTree Subset.MS3 sem out ignore)
            Expect.equal rep.Videos 1 "prepared"
            Expect.isTrue (File.Exists(Path.Combine(root, "real", "v", "v_1.png"))) "written through the inside link"
        }

        // --- ffmpeg: file names are single arguments, the first audio stream is chosen ---------------------------
        test "a file name holding '\"' and options reaches ffmpeg as one argument (no option injection)" {
            use tmp = new TempDir("vct-harden")
            match Media.tryFindFfmpeg () with
            | None -> skiptest "ffmpeg is not installed"
            | Some ffmpeg ->
                let dir = tmp.Folder "ffmpeg"
                let plain = Path.Combine(dir, "plain.flac")
                ffmpegTo ffmpeg [ "-i"; ChildProcess.fileArg (goldenWav "speech_16k_mono_pcm16.wav"); ChildProcess.fileArg plain ]
                // Through a quoted command string this name ended the input and added `-f lavfi -i anullsrc`.
                let evil = Path.Combine(dir, "x\" -f lavfi -i \"anullsrc.flac")
                File.Copy(plain, evil)
                let a = within 60 "Audio.load" (fun () -> Audio.load plain)
                let b = within 60 "Audio.load" (fun () -> Audio.load evil)
                Expect.equal b.Channels a.Channels "the named file's samples"
                let dash = Path.Combine(dir, "-y.flac")
                File.Copy(plain, dash)
                Expect.equal (within 60 "Audio.load" (fun () -> Audio.load dash)).Channels a.Channels "a name starting with '-'"
        }

        test "ffmpeg decodes the first audio stream (-map 0:a:0), not the one it would rank best" {
            use tmp = new TempDir("vct-harden")
            match Media.tryFindFfmpeg () with
            | None -> skiptest "ffmpeg is not installed"
            | Some ffmpeg ->
                let dir = tmp.Folder "ffmpeg"
                let mkv = Path.Combine(dir, "two.mkv")
                // Stream 0: 16 kHz mono; stream 1: 44.1 kHz stereo (ffmpeg's default choice: more channels).
                ffmpegTo ffmpeg
                    [ "-i"; ChildProcess.fileArg (goldenWav "speech_16k_mono_pcm16.wav"); "-i"; ChildProcess.fileArg (goldenWav "mix_44k_stereo_pcm16.wav")
                      "-map"; "0:a"; "-map"; "1:a"; "-c:a"; "flac"; ChildProcess.fileArg mkv ]
                let w = within 60 "Audio.load" (fun () -> Audio.load mkv)
                Expect.equal (w.SampleRate, w.Channels.Length) (16000, 1) "the first stream"
                Expect.equal w.Channels (Audio.load (goldenWav "speech_16k_mono_pcm16.wav")).Channels "its samples"
        }

        // --- Checkpoints and .npy: declared sizes are checked against the bytes there are before allocating ----
        test "a 7-byte pickle declaring a 2 GB bytes object fails without allocating it" {
            use tmp = new TempDir("vct-harden")
            let bytes = Array.concat [ [| 0x80uy; 2uy; byte 'B' |]; BitConverter.GetBytes 0x7FFFFF00u ]
            let path = crafted tmp "big_bytes.pkl" bytes
            let e = throwsWithin 20 "Pth.read" (fun () -> (Pth.read path :> IDisposable).Dispose())
            Expect.equal e.Message $"{path}: pickle: a length of 2147483392 bytes, but only 0 remain (truncated file?) (at byte 7)" "exact message"
            let allocated = within 20 "Pth.read" (fun () -> allocatedBy (fun () -> (Pth.read path :> IDisposable).Dispose()))
            Expect.isLessThan allocated 50_000_000L "nothing near the declared size was allocated"
        }

        test "a legacy .pth whose storage claims 2^28 floats with no data fails before allocating the storage" {
            use tmp = new TempDir("vct-harden")
            let path = crafted tmp "legacy.pth" (legacyPthClaiming (1L <<< 28))
            let e = throwsWithin 20 "Pth.read" (fun () -> (Pth.read path :> IDisposable).Dispose())
            Expect.equal e.Message $"{path}: a storage of 268435456 x Float32 (1073741824 bytes) but only 0 bytes remain (truncated file?)" "exact message"
            use f = within 20 "Pth.read" (fun () -> Pth.read (crafted tmp "legacy_ok.pth" (Array.append (legacyPthClaiming 2L) (Array.zeroCreate 8))))
            Expect.equal f.Format PthFormat.Legacy "the same file with its 8 bytes of data reads"
        }

        test "a zip .pth whose directory declares a 2 GB record from 16 stored bytes is refused" {
            use tmp = new TempDir("vct-harden")
            let path = Path.Combine(tmp.Folder "zip", "forged.pth")
            do
                use zip = new Compression.ZipArchive(File.Create path, Compression.ZipArchiveMode.Create)
                let add (name: string) (data: byte[]) =
                    use s = zip.CreateEntry(name, Compression.CompressionLevel.NoCompression).Open()
                    s.Write(data, 0, data.Length)
                let pid =
                    Array.concat
                        [ [| 0x80uy; 2uy; byte '(' |]; shortUnicode "storage"; Encoding.ASCII.GetBytes "ctorch\nFloatStorage\n"
                          shortUnicode "0"; shortUnicode "cpu"; [| byte 'K'; 4uy; byte 't'; byte 'Q'; byte '.' |] ]
                add "archive/data.pkl" pid
                add "archive/data/0" (Array.zeroCreate 16)
            let bytes = File.ReadAllBytes path
            // The central directory entry of archive/data/0: signature PK\1\2, uncompressed size at offset 24.
            let name = Encoding.ASCII.GetBytes "archive/data/0"
            let cd =
                [ 0 .. bytes.Length - 46 ]
                |> List.find (fun i -> bytes[i] = 0x50uy && bytes[i + 1] = 0x4Buy && bytes[i + 2] = 1uy && bytes[i + 3] = 2uy
                                       && bytes.AsSpan(i + 46, name.Length).SequenceEqual(ReadOnlySpan name))
            BitConverter.GetBytes(0x7FFFFFFFu).CopyTo(bytes, cd + 24)
            File.WriteAllBytes(path, bytes)
            let e = throwsWithin 20 "Pth.read" (fun () -> (Pth.read path :> IDisposable).Dispose())
            Expect.equal e.Message $"{path}: zip record archive/data/0 declares 2147483647 bytes from 16 compressed bytes (corrupt or forged archive)" "exact message"
        }

        test ".npy shapes whose element count overflows 64 bits are refused (a wrapped product used to pass)" {
            use tmp = new TempDir("vct-harden")
            let npyWith (descr: string) (shape: string) =
                let header = $"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n"
                Array.concat [ [| 0x93uy |]; Encoding.ASCII.GetBytes "NUMPY"; [| 1uy; 0uy |]; BitConverter.GetBytes(uint16 header.Length); Encoding.ASCII.GetBytes header ]
            let path = crafted tmp "wrap.npy" (npyWith "<f4" "(4611686018427387904, 4)")
            let e = throwsWithin 20 "readHeader" (fun () -> NpyFile.readHeader path |> ignore)
            Expect.equal e.Message $"{path}: not a readable .npy file (shape (4611686018427387904,4) is too large)" "exact message"
            let path = crafted tmp "zero.npy" (npyWith "<f4" "(0, 4611686018427387904, 4)")
            let e = throwsWithin 20 "Npy.read" (fun () -> Npy.read path |> ignore)
            Expect.equal e.Message $"{path}: not a readable .npy file (shape (0,4611686018427387904,4) is too large)" "no elements, but strides that overflow"
            let path = crafted tmp "neg.npy" (npyWith "<f8" "(-1, 3)")
            let e = throwsWithin 20 "Npy.read" (fun () -> Npy.read path |> ignore)
            Expect.equal e.Message $"{path}: not a readable .npy file (bad shape entry '-1')" "exact message"
            let path = crafted tmp "hlen.npy" (Array.concat [ [| 0x93uy |]; Encoding.ASCII.GetBytes "NUMPY"; [| 2uy; 0uy |]; BitConverter.GetBytes 0x7FFFFFFFu; Encoding.ASCII.GetBytes "{}" ])
            let e = throwsWithin 20 "readHeader" (fun () -> NpyFile.readHeader path |> ignore)
            Expect.equal e.Message $"{path}: not a readable .npy file (truncated header)" "a 2 GB header length in a 14-byte file (12 + hlen used to wrap)"
            let path = crafted tmp "noquote.npy" (Array.concat [ [| 0x93uy |]; Encoding.ASCII.GetBytes "NUMPY"; [| 1uy; 0uy; 16uy; 0uy |]; Encoding.ASCII.GetBytes "{'descr': <f4 }\n" ])
            let e = throwsWithin 20 "readHeader" (fun () -> NpyFile.readHeader path |> ignore)
            Expect.equal e.Message $"{path}: not a readable .npy file (the 'descr' value is not a quoted string)" "exact message"
        }

        // --- Threads: TorchSharp worker pools hold the finalizer gate ----------------------------------------------
        test "FinalizerGate.ParallelForEach holds the gate while its workers run, in waves, and releases it after" {
            Expect.isFalse FinalizerGate.IsHeld "not held before"
            let seen = Collections.Concurrent.ConcurrentBag<int * bool>()
            within 60 "ParallelForEach" (fun () ->
                FinalizerGate.ParallelForEach(Array.init 100 id, 2, fun i -> seen.Add((i, FinalizerGate.IsHeld))))
            Expect.equal (seen |> Seq.map fst |> Seq.sort |> List.ofSeq) [ 0 .. 99 ] "every item once"
            Expect.isTrue (seen |> Seq.forall snd) "held inside every item"
            Expect.isFalse FinalizerGate.IsHeld "released after"
            let e = throwsWithin 60 "ParallelForEach" (fun () ->
                FinalizerGate.ParallelForEach([| 1; 2; 3 |], 2, fun i -> if i = 2 then raise (InvalidDataException "item 2")))
            Expect.isTrue (e :? AggregateException && e.InnerException.Message = "item 2") $"the item's error, got {e.Message}"
            Expect.isFalse FinalizerGate.IsHeld "released after a failure"
        }

        // --- The CLI on the crafted inputs: a clean non-zero exit, never 134/139 or a hang -----------------------
        test "vct audio examples and vct data check on the crafted files exit cleanly (no 134/139, no hang)" {
            use tmp = new TempDir("vct-harden")
            let dir = tmp.Folder "cli"
            let wav = Path.Combine(dir, "huge_chunk.wav")
            File.WriteAllBytes(wav, wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
            let wavError = $"{wav}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)"
            let code, text = vctWithin 120 [ "audio"; "examples"; wav; "--out"; Path.Combine(dir, "x.npy") ]
            Expect.isTrue (code <> 0 && code <> 134 && code <> 139) $"a clean failure, got exit {code}: {text}"
            Expect.stringContains text wavError "names the file and the problem"
            let code, text = vctWithin 120 [ "audio"; "examples"; dir; "--out"; Path.Combine(dir, "out") ]
            Expect.equal code 1 $"folder mode: the file is listed as failed: {text}"
            Expect.stringContains text wavError "folder mode names it"
            // A tree with the huge-chunk WAV, a forged 100000x100000 frame and a deeply nested log-mel pickle.
            let root = tmp.Folder "tree"
            Synth.generate { SynthOptions.Default Subset.S4 with Seed = 4; Train = 1; Val = 1; Test = 1; Size = 40; EvalSize = 56 } root |> ignore
            let recs = [| for s in [ "train"; "val"; "test" ] -> Avsbench.records Subset.S4 root s |> Array.exactlyOne |]
            let wavOf (r: VideoRecord) = match r.Audio with AudioSource.Wav p -> p | AudioSource.LogMelPickle p -> p
            File.WriteAllBytes(wavOf recs[0], wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
            File.WriteAllBytes(recs[1].Frames[2], forgedPng 100000u 100000u)
            let pkl = Path.ChangeExtension((wavOf recs[2]).Replace("audio_wav", "audio_log_mel"), ".pkl")
            Directory.CreateDirectory(Path.GetDirectoryName pkl) |> ignore
            File.WriteAllBytes(pkl, deepTuplePickle 1_000_000 1)
            let code, text = vctWithin 180 [ "data"; "check"; root ]
            Expect.isTrue (code <> 0 && code <> 134 && code <> 139) $"a clean failure, got exit {code}: {text}"
            for line in
                [ $"{wavOf recs[0]}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)"
                  // The check's own (tighter) frame budget reads only the header, before the reader's limit applies.
                  $"{recs[1].Frames[2]}: frame is 100000x100000 (10000000000 pixels), over the frame pixel budget of 16777216 (4096x4096); downscale the frames"
                  $"{pkl}: the pickle holds a dict, not a tensor" ] do
                Expect.stringContains text line "reported"
        }

        test "a WAV over 2 GB (sparse) fails naming the file before reading its audio" {
            use tmp = new TempDir("vct-harden")
            let path = Path.Combine(tmp.Folder "big", "big.wav")
            do
                use fs = new FileStream(path, FileMode.CreateNew)
                let head = wavWith [ "data", 0xFFFFFFFFu, [||] ]
                // 8-bit mono: one frame per byte; the streaming placeholder size means "up to the end".
                head[32] <- 1uy
                head[34] <- 8uy
                BitConverter.GetBytes(16000u).CopyTo(head, 28)
                fs.Write(head, 0, head.Length)
                fs.SetLength(2_300_000_000L)
            let e = throwsWithin 60 "Wav.read" (fun () -> Wav.read SampleScaling.Exact path |> ignore)
            Expect.equal e.Message $"{path}: too long: 2299999956 frames per channel (at most {Array.MaxLength} are read)" "exact message"
            File.Delete path
        }

        // --- Loader: a failing worker, a failing consumer and cancellation, in any combination, end --------------
        test "loader: a failing worker ends the epoch with its error" {
            let e = loaderScenario { Worker = true; Consumer = false; Cancel = false }
            Expect.isTrue (isLoadingError e) $"the loading error, got {e.GetType().Name}: {e.Message}"
        }
        test "loader: a failing consumer stops the workers" {
            let e = loaderScenario { Worker = false; Consumer = true; Cancel = false }
            Expect.equal e.Message "consumer failed" "the consumer's error"
        }
        test "loader: cancellation stops the epoch" {
            let e = loaderScenario { Worker = false; Consumer = false; Cancel = true }
            Expect.isTrue (e :? OperationCanceledException) $"cancelled, got {e.GetType().Name}: {e.Message}"
        }
        test "loader: a consumer failing while a worker fails on a full queue ends (was a deadlock)" {
            let e = loaderScenario { Worker = true; Consumer = true; Cancel = false }
            Expect.equal e.Message "consumer failed" "the consumer's error"
        }
        test "loader: cancellation while a worker fails on a full queue ends" {
            let e = loaderScenario { Worker = true; Consumer = false; Cancel = true }
            Expect.isTrue (e :? OperationCanceledException || isLoadingError e) $"cancelled or the loading error, got {e.GetType().Name}: {e.Message}"
        }
        test "loader: a consumer failing after cancelling ends" {
            let e = loaderScenario { Worker = false; Consumer = true; Cancel = true }
            Expect.equal e.Message "consumer failed" "the consumer's error"
        }
        test "loader: a failing worker, a failing consumer and cancellation together end" {
            let e = loaderScenario { Worker = true; Consumer = true; Cancel = true }
            Expect.equal e.Message "consumer failed" "the consumer's error"
        }
    ]
