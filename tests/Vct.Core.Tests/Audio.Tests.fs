/// Tests of src/Vct.Core/Audio: WAV and ffmpeg reading, resampling, the log-mel front end, examples per subset,
/// log-mel pickles, VGGish, `vct audio`; the hardening and fuzz cases of the audio readers.
module Vct.Core.Tests.AudioTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio
open Vct.Core.Fusion
open Vct.Core.Tests.Support

/// A path under tests/golden/audio.
let golden (parts: string list) = Golden.path ("audio" :: parts)

type Fixture =
    { Name: string; Rate: int; Channels: int; Encoding: string; Samples: int; Examples: int
      ResampledSamples: int option; Int16Ref: bool }

let fixtures =
    lazy
        (use doc = JsonDocument.Parse(File.ReadAllText(golden [ "manifest.json" ]))
         [ for f in doc.RootElement.GetProperty("fixtures").EnumerateArray() ->
               let opt (n: string) = match f.TryGetProperty n with | true, v -> Some v | _ -> None
               { Name = f.GetProperty("name").GetString()
                 Rate = f.GetProperty("rate").GetInt32()
                 Channels = f.GetProperty("channels").GetInt32()
                 Encoding = f.GetProperty("encoding").GetString()
                 Samples = f.GetProperty("samples").GetInt32()
                 Examples = f.GetProperty("examples").GetInt32()
                 ResampledSamples = opt "resampled_samples" |> Option.map (fun v -> v.GetInt32())
                 Int16Ref = (opt "int16_ref").IsSome } ])

let maxAbs (a: Tensor) (b: Tensor) = Scope.runValue (fun () -> (a - b).abs().max().ToDouble())

let examplesOf (scaling: SampleScaling) (path: string) =
    let opts = { ExampleOptions.Default None with Scaling = scaling }
    (Examples.ofFile opts path).Examples

let sine (rate: int) (freq: float) (amp: float) (n: int) =
    Array.init n (fun i -> amp * sin (2.0 * Math.PI * freq * float i / float rate))

/// Amplitude of the `freq` component of x (least squares on sin/cos), ignoring `edge` samples at each end.
let amplitudeAt (rate: int) (freq: float) (edge: int) (x: float[]) =
    let mutable ss, cc, sc, xs, xc = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in edge .. x.Length - 1 - edge do
        let s = sin (2.0 * Math.PI * freq * float i / float rate)
        let c = cos (2.0 * Math.PI * freq * float i / float rate)
        ss <- ss + s * s; cc <- cc + c * c; sc <- sc + s * c; xs <- xs + x[i] * s; xc <- xc + x[i] * c
    let det = ss * cc - sc * sc
    let a = (xs * cc - xc * sc) / det
    let b = (xc * ss - xs * sc) / det
    sqrt (a * a + b * b)

let rms (edge: int) (x: float[]) =
    let core = x[edge .. x.Length - 1 - edge]
    sqrt (core |> Array.averageBy (fun v -> v * v))

let config = { FsCheckConfig.defaultConfig with maxTest = 40 }

[<Tests>]
let goldenTests =
    testList "Audio.Golden" [
        for f in fixtures.Value do
            test $"log-mel of {f.Name} matches the official front end" {
                use _ = torch.NewDisposeScope()
                let expected = Npy.read (golden [ "ref"; f.Name + ".npy" ])
                let actual = examplesOf SampleScaling.Exact (golden [ "wav"; f.Name + ".wav" ])
                Expect.equal actual.shape expected.shape "example count and shape"
                let tol = if f.Rate = 16000 then 1e-4 else 1e-3
                let err = maxAbs actual expected
                Expect.isLessThanOrEqual err tol $"max abs log-mel error {err:E2}"
            }
            if f.Int16Ref then
                test $"official int16 reading of {f.Name} matches wavfile_to_examples" {
                    use _ = torch.NewDisposeScope()
                    let expected = Npy.read (golden [ "ref"; f.Name + ".int16.npy" ])
                    let actual = examplesOf SampleScaling.OfficialInt16 (golden [ "wav"; f.Name + ".wav" ])
                    Expect.equal actual.shape expected.shape "shape"
                    let tol = if f.Rate = 16000 then 1e-4 else 1e-3
                    let err = maxAbs actual expected
                    Expect.isLessThanOrEqual err tol $"max abs log-mel error {err:E2}"
                }
            match f.ResampledSamples with
            | Some n ->
                test $"resampling {f.Name} reproduces resampy kaiser_best" {
                    use _ = torch.NewDisposeScope()
                    let w = Wav.read SampleScaling.Exact (golden [ "wav"; f.Name + ".wav" ])
                    Expect.equal w.SampleRate f.Rate "rate"
                    Expect.equal w.Channels.Length f.Channels "channels"
                    let y = Resample.kaiserBest f.Rate 16000 (w.Mono())
                    Expect.equal y.Length n "output length as resampy"
                    let expected = Npy.read (golden [ "ref"; f.Name + ".resampled.npy" ])   // [2, 2000] head, tail
                    let ours = torch.tensor(Array.append y[.. 1999] y[y.Length - 2000 ..], dtype = torch.float64).view(2L, 2000L)
                    let err = maxAbs ours expected
                    Expect.isLessThanOrEqual err 1e-12 $"max abs sample error {err:E2}"
                }
            | None -> ()
    ]

[<Tests>]
let resampler =
    testList "Audio.Resample" [
        test "the kaiser_best table is resampy's (spot values)" {
            let t = Resample.halfWindow SincFilter.KaiserBest
            Expect.equal t.Length 409601 "50 zero crossings x 8192 + 1"
            Expect.floatClose Accuracy.veryHigh t[0] 0.917347 "centre = rolloff"
            Expect.floatClose { absolute = 1e-20; relative = 1e-9 } t[t.Length - 1] -5.289331422066904e-08 "last entry of kaiser_best.npz"
        }

        test "Bessel I0 matches known values" {
            Expect.floatClose Accuracy.veryHigh (Resample.besselI0 0.0) 1.0 "I0(0)"
            Expect.floatClose Accuracy.veryHigh (Resample.besselI0 1.0) 1.2660658777520082 "I0(1)"
            Expect.floatClose Accuracy.veryHigh (Resample.besselI0 12.9846) 48718.34656175112 "I0(beta)"
        }

        for rate in [ 8000; 11025; 22050; 32000; 44100; 48000; 96000; 44056; 7919 ] do
            test $"fast polyphase path equals the direct loop at {rate} Hz" {
                let rng = Random(rate)
                let x = Array.init (rate / 3 + 17) (fun _ -> rng.NextDouble() * 2.0 - 1.0)
                let a = Resample.fast SincFilter.KaiserBest rate 16000 x
                let b = Resample.direct SincFilter.KaiserBest rate 16000 x
                Expect.equal a.Length b.Length "length"
                let err = Array.map2 (fun (u: float) v -> abs (u - v)) a b |> Array.max
                Expect.isLessThanOrEqual err 1e-13 $"max difference {err:E2}"
            }

        testPropertyWithConfig config "fast path equals the direct loop for any length, including clips shorter than the filter" <|
            fun (seed: int) ->
                let rng = Random(seed)
                let rate = [| 8000; 22050; 44100; 48000; 12345 |][rng.Next 5]
                let len = 1 + rng.Next(3000)
                let x = Array.init len (fun _ -> rng.NextDouble() * 2.0 - 1.0)
                if Resample.outputLength rate 16000 len >= 1 then
                    let a = Resample.fast SincFilter.KaiserBest rate 16000 x
                    let b = Resample.direct SincFilter.KaiserBest rate 16000 x
                    Expect.equal a.Length b.Length "length"
                    let err = Array.map2 (fun (u: float) v -> abs (u - v)) a b |> Array.max
                    Expect.isLessThanOrEqual err 1e-13 $"{rate} Hz, {len} samples: max difference {err:E2}"

        testPropertyWithConfig config "keeps an in-band sinusoid's frequency and amplitude" <|
            fun (seed: int) ->
                let rng = Random(seed)
                let rate = [| 8000; 22050; 44100; 48000 |][rng.Next 4]
                let freq = 100.0 + rng.NextDouble() * (min 6000.0 (0.4 * float rate) - 100.0)   // pass band: rolloff 0.917 x 8 kHz minus the transition
                let amp = 0.1 + 0.8 * rng.NextDouble()
                let y = Resample.kaiserBest rate 16000 (sine rate freq amp (rate / 2))
                let edge = 400
                let a = amplitudeAt 16000 freq edge y
                Expect.floatClose { absolute = 2e-3; relative = 2e-3 } a amp $"amplitude at {freq:F1} Hz from {rate} Hz"
                // The same frequency: fitting there explains (almost) all the energy.
                let total = rms edge y
                Expect.floatClose { absolute = 3e-3; relative = 3e-3 } total (a / sqrt 2.0) "all energy at that frequency"

        testPropertyWithConfig config "removes an out-of-band sinusoid" <|
            fun (seed: int) ->
                let rng = Random(seed)
                let rate = [| 22050; 44100; 48000 |][rng.Next 3]
                let freq = 8600.0 + rng.NextDouble() * (0.47 * float rate - 8600.0)
                let y = Resample.kaiserBest rate 16000 (sine rate freq 0.9 (rate / 2))
                let r = rms 400 y
                Expect.isLessThan r 1e-4 $"{freq:F0} Hz from {rate} Hz leaves rms {r:E2}"

        test "same rate is a copy; bad rates are rejected" {
            let x = [| 1.0; 2.0 |]
            Expect.equal (Resample.kaiserBest 16000 16000 x) x "copy"
            Expect.throwsT<ArgumentException> (fun () -> Resample.kaiserBest 0 16000 x |> ignore) "zero rate"
        }
    ]

[<Tests>]
let logMel =
    testList "Audio.LogMel" [
        test "the log-mel of silence is log(0.01)" {
            use _ = torch.NewDisposeScope()
            let lm = LogMel.ofWaveform (torch.zeros(20000L))
            Expect.equal lm.shape [| 1L + (20000L - 400L) / 160L; 64L |] "frames"
            let err = lm.sub((log 0.01).ToScalar()).abs().max().ToDouble()
            Expect.isLessThan err 1e-6 "every cell"
        }

        test "mel matrix: no area normalisation, DC row zero, peaks of 1" {
            let m = LogMel.vggishMelMatrix.Value
            Expect.equal (Array2D.length1 m, Array2D.length2 m) (257, 64) "shape"
            for j in 0 .. 63 do
                Expect.equal m[0, j] 0.0 "DC row"
                let col = [| for b in 0 .. 256 -> m[b, j] |]
                Expect.isLessThanOrEqual (Array.max col) 1.0 "triangle height <= 1"
                Expect.isGreaterThan (Array.max col) 0.3 "band not empty"
        }

        test "float64 computation matches the float32 one to 1e-4" {
            use _ = torch.NewDisposeScope()
            let rng = Random 7
            let x = Array.init 32000 (fun _ -> rng.NextDouble() - 0.5)
            let a = Examples.logMel16k torch.float32 x
            let b = Examples.logMel16k torch.float64 x
            Expect.isLessThan (maxAbs a b) 1e-4 "precision"
        }

        testPropertyWithConfig config "example count for any clip length" <|
            fun (len: uint16) (extra: byte) ->
                use _ = torch.NewDisposeScope()
                let n = int len + int extra * 300
                let frames = LogMel.frameCount n
                let expectedFrames = if n < 400 then 0 else 1 + (n - 400) / 160
                Expect.equal frames expectedFrames "STFT frames"
                let ex = LogMel.toExamples (LogMel.ofWaveform (torch.zeros(int64 n)))
                Expect.equal ex.shape[0] (int64 (if frames < 96 then 0 else 1 + (frames - 96) / 96)) "examples"
                Expect.equal ex.shape[1..] [| 1L; 96L; 64L |] "example shape"
    ]

let examplesFrom (count: int) =
    // Examples whose rows are their index, so that padding is visible.
    torch.arange((float count).ToScalar(), dtype = torch.float32).view(int64 count, 1L, 1L, 1L).expand(int64 count, 1L, 96L, 64L).contiguous()

[<Tests>]
let clipping =
    testList "Audio.Examples" [
        testPropertyWithConfig config "subset rules: count, repeat-last (S4/MS3), zero rows (AVSS), truncation" <|
            fun (n: byte) (which: byte) ->
                use _ = torch.NewDisposeScope()
                let n = int n % 16
                let subset = [| Some Subset.S4; Some Subset.MS3; Some Subset.AVSS; None |][int which % 4]
                let ex = examplesFrom n
                match subset, n with
                | Some (Subset.S4 | Subset.MS3), 0 ->
                    Expect.throwsT<InvalidDataException> (fun () -> Examples.clip subset "clip.wav" ex |> ignore) "no example"
                | _ ->
                    let r = Examples.clip subset "clip.wav" ex
                    let rows = [| for i in 0L .. r.Examples.shape[0] - 1L -> r.Examples[i].mean().ToDouble() |]
                    match subset |> Option.map (fun s -> s.Preset.Frames) with
                    | None -> Expect.equal rows.Length n "all examples"
                    | Some t ->
                        Expect.equal rows.Length t "target count"
                        for i in 0 .. t - 1 do
                            let expected =
                                if i < n then float i
                                elif subset = Some Subset.AVSS then 0.0
                                else float (n - 1)
                            Expect.equal rows[i] expected $"row {i}"
                        Expect.equal r.Available n "available"
                        Expect.equal (r.Warnings.Length > 0) (n > t || (subset = Some Subset.AVSS && n = 0)) "warned"
                        if subset = Some Subset.AVSS then
                            Expect.equal r.Real (Array.init 10 (fun i -> if i < n then 1 else 0)) "flags"

        test "AVSS flags per label" {
            Expect.equal (AvssFlags.vidTemporalMask "v1s") [| 1; 1; 1; 1; 1; 0; 0; 0; 0; 0 |] "v1s"
            Expect.equal (AvssFlags.vidTemporalMask "v2") (Array.create 10 1) "v2"
            Expect.equal (AvssFlags.gtTemporalMask "v1s" "train") [| 1; 0; 0; 0; 0 |] "v1s train"
            Expect.equal (AvssFlags.gtTemporalMask "v1s" "test") (Array.create 5 1) "v1s test"
            Expect.equal (AvssFlags.gtTemporalMask "v1m" "train") (Array.create 5 1) "v1m train"
        }

        test "a 5 s clip gives exactly 5 examples with no warning (S4)" {
            use _ = torch.NewDisposeScope()
            let w = Audio.ofSamples 16000 (sine 16000 440.0 0.5 80000)
            let r = Examples.ofWaveform (ExampleOptions.Default(Some Subset.S4)) w
            Expect.equal r.Available 5 "5 examples in 80 000 samples"
            Expect.isEmpty r.Warnings "no warning"
        }
    ]

/// Bad inputs: (file, subset, zero-pad?, expected: Error of message part | Ok of example count and warning part).
[<Tests>]
let badInputs =
    let expectError (path: string) (part: string) (f: unit -> unit) =
        let e = Expect.throwsC f id
        Expect.stringContains e.Message path "names the file"
        Expect.stringContains e.Message part "says the problem"
    let s4 = ExampleOptions.Default(Some Subset.S4)
    testList "Audio.BadInput" [
        for file, part in
            [ "truncated.wav", "truncated: the header declares 16800 bytes of audio but the file holds 8378"
              "empty.wav", "empty file"
              "header_only.wav", "no audio samples"
              "text.wav", "not a WAV file"
              "nan.wav", "2 non-finite (NaN/Inf) samples"
              "rate_1hz.wav", "implausible sample rate 1 Hz"
              "rate_1mhz.wav", "implausible sample rate 1000000 Hz"
              "short_0.2s.wav", "shorter than one VGGish example" ] do
            test $"{file} fails with a clear message" {
                let path = golden [ "bad"; file ]
                expectError path part (fun () -> Examples.ofFile s4 path |> ignore)
            }

        test "short_0.2s.wav with zero padding gives 5 examples and a warning" {
            use _ = torch.NewDisposeScope()
            let path = golden [ "bad"; "short_0.2s.wav" ]
            let r = Examples.ofFile { s4 with ShortClip = ShortClip.ZeroPad } path
            Expect.equal r.Examples.shape [| 5L; 1L; 96L; 64L |] "padded"
            Expect.equal r.Available 1 "one example after padding"
            Expect.stringContains (String.Join("\n", r.Warnings)) "padded with silence" "warned"
        }

        test "short_0.2s.wav for AVSS gives 10 zero rows, as the official tool" {
            use _ = torch.NewDisposeScope()
            let path = golden [ "bad"; "short_0.2s.wav" ]
            let r = Examples.ofFile (ExampleOptions.Default(Some Subset.AVSS)) path
            Expect.equal r.Examples.shape [| 10L; 1L; 96L; 64L |] "10 rows"
            Expect.equal (r.Examples.abs().sum().ToDouble()) 0.0 "all zero"
            Expect.equal r.Real (Array.zeroCreate 10) "no real example"
        }

        test "a 40 s clip is truncated to 5 (S4) with a warning, kept whole with none" {
            use _ = torch.NewDisposeScope()
            use tmp = new TempDir("vct-40s")
            let path = Path.Combine(tmp.Path, "clip.wav")
            Wav.writeFloat32 path 8000 [| sine 8000 300.0 0.3 (40 * 8000) |]
            let r = Examples.ofFile s4 path
            Expect.equal r.Examples.shape[0] 5L "5 examples"
            Expect.equal r.Available 41 "41 whole examples in 40 s"
            Expect.stringContains (String.Join("\n", r.Warnings)) "kept the first 5" "warned"
            Expect.stringContains (String.Join("\n", r.Warnings)) path "names the file"
            let all = Examples.ofFile (ExampleOptions.Default None) path
            Expect.equal all.Examples.shape[0] 41L "none: every whole example"
        }

        test "a missing file is a FileNotFoundException naming it" {
            expectError "/nonexistent/x.wav" "no such file" (fun () -> Audio.load "/nonexistent/x.wav" |> ignore)
        }

        test "without ffmpeg a non-WAV file gives an install hint" {
            let path = golden [ "pkl"; "s4_style.pkl" ]
            let e = Expect.throwsC (fun () -> Media.readWithFfmpegAt None SampleScaling.Exact path |> ignore) id
            Expect.isTrue (e :? NotSupportedException) "NotSupportedException"
            Expect.stringContains e.Message path "names the file"
            Expect.stringContains e.Message "apt-get install ffmpeg" "says how to install"
        }
    ]

[<Tests>]
let containers =
    testList "Audio.Ffmpeg" [
        test "flac and mp3 through ffmpeg" {
            match Media.tryFindFfmpeg () with
            | None -> skiptest "ffmpeg is not installed"
            | Some ffmpeg ->
                use _ = torch.NewDisposeScope()
                let src = golden [ "wav"; "mix_44k_stereo_pcm16.wav" ]
                use tmp = new TempDir("vct-ffmpeg")
                let dir = tmp.Path
                let conv (ext: string) =
                    let out = Path.Combine(dir, "clip." + ext)
                    let psi = Diagnostics.ProcessStartInfo(ffmpeg, $"-v error -y -i \"{src}\" \"{out}\"")
                    use p = Diagnostics.Process.Start psi
                    p.WaitForExit()
                    out
                let flac = Audio.load (conv "flac")
                let wav = Audio.load src
                Expect.equal flac.SampleRate 44100 "rate"
                Expect.equal flac.Channels.Length 2 "channels"
                Expect.equal flac.Channels wav.Channels "lossless: same samples"
                let mp3 = Examples.ofFile (ExampleOptions.Default None) (conv "mp3")
                Expect.equal mp3.Examples.shape[1..] [| 1L; 96L; 64L |] "mp3 decodes to examples"
                let bogus = Path.Combine(dir, "bogus.mp4")
                File.WriteAllText(bogus, "not a video")
                let e = Expect.throwsC (fun () -> Audio.load bogus |> ignore) id
                Expect.stringContains e.Message bogus "names the file"
        }
    ]

[<Tests>]
let pickles =
    testList "Audio.LogMelPickle" [
        test "an S4-style .pkl (pickled tensor, repeat-last padding) reads as the official examples" {
            use _ = torch.NewDisposeScope()
            let t = LogMelPickle.read (golden [ "pkl"; "s4_style.pkl" ])
            Expect.equal t.shape [| 5L; 1L; 96L; 64L |] "shape"
            // Written by the official front end from speech_16k_mono_pcm16.wav (PCM16: the int16 path is exact).
            let ours = Examples.ofFile (ExampleOptions.Default(Some Subset.S4)) (golden [ "wav"; "speech_16k_mono_pcm16.wav" ])
            let err = maxAbs ours.Examples t
            Expect.isLessThanOrEqual err 1e-4 $"our S4 examples vs the pickle: {err:E2}"
            Expect.equal (maxAbs t[3] t[4]) 0.0 "last example repeated"
        }

        test "an AVSS-style audio.pkl (zero rows) reads as the official examples" {
            use _ = torch.NewDisposeScope()
            let t = LogMelPickle.read (golden [ "pkl"; "avss_style.pkl" ])
            Expect.equal t.shape [| 10L; 1L; 96L; 64L |] "shape"
            let ours = Examples.ofFile (ExampleOptions.Default(Some Subset.AVSS)) (golden [ "wav"; "speech_16k_mono_pcm16.wav" ])
            Expect.isLessThanOrEqual (maxAbs ours.Examples t) 1e-4 "our AVSS examples vs the pickle"
            Expect.equal ours.Real [| 1; 1; 1; 0; 0; 0; 0; 0; 0; 0 |] "three real rows"
            Expect.equal (t.narrow(0L, 3L, 7L).abs().sum().ToDouble()) 0.0 "zero rows"
        }

        test "a pickled leaf tensor that requires grad reads with its values" {
            use _ = torch.NewDisposeScope()
            let t = LogMelPickle.readTensor (golden [ "pkl"; "leaf_requires_grad.pkl" ])
            Expect.equal t.shape [| 2L; 1L; 3L; 4L |] "shape"
            Expect.equal (t.data<float32>().ToArray()) (Array.init 24 float32) "values"
            Expect.isFalse t.requires_grad "detached"
        }

        test "a non-tensor or broken pickle fails naming the file" {
            let bad = golden [ "bad"; "text.wav" ]
            let e = Expect.throwsC (fun () -> LogMelPickle.read bad |> ignore) id
            Expect.stringContains e.Message bad "names the file"
            use dir = new TempDir("vct-trunc")
            let tmp = Path.Combine(dir.Path, "truncated.pkl")
            let bytes = File.ReadAllBytes(golden [ "pkl"; "s4_style.pkl" ])
            File.WriteAllBytes(tmp, bytes[.. bytes.Length / 2])
            let e = Expect.throwsC (fun () -> LogMelPickle.read tmp |> ignore) id
            Expect.stringContains e.Message tmp "names the truncated file"
        }
    ]

let officialGolden (name: string) = Golden.path [ "official"; name ]

/// (key, shape) of the official S4 manifest (tests/golden/official) under `prefix`, the prefix removed.
let manifestKeys (prefix: string) =
    Golden.manifestOf (officialGolden "manifest_s4.tsv")
    |> Array.filter (fun r -> r.Key.StartsWith(prefix, StringComparison.Ordinal))
    |> Array.map (fun r -> r.Key.Substring prefix.Length, r.Shape)

let shapeText (t: Tensor) = Golden.shapeText t.shape

[<Tests>]
let networks =
    testList "Audio.Vggish" [
        test "VGGish conv blocks match the official features[0:6] golden" {
            use _ = torch.NewDisposeScope()
            use ck = Checkpoint.StateDict.load (officialGolden "comp_vggish_features.pt")
            let sd = ck.StateDict
            use m = new Vggish(VggishConfig.Default)
            let weights = sd |> Seq.filter (fun kv -> kv.Key.StartsWith "w.") |> Seq.toArray
            let report =
                Checkpoint.StateDict.loadInto
                    { Checkpoint.LoadOptions.Default with Remap = (fun k -> Some(k.Substring 2)); Strict = false }
                    weights m
            Expect.equal report.Loaded.Length 4 "4 tensors (convs 0 and 3)"
            let y = m.ForwardLayers(sd["in.x"], 6)
            let expected = sd["out.out"]
            Expect.equal y.shape expected.shape "[1, 128, 24, 16]"
            let rel = (y - expected).abs().max().ToDouble() / expected.abs().max().ToDouble()
            Expect.isLessThanOrEqual rel 1e-4 $"relative error {rel:E2}"
            Expect.equal ((m.Forward sd["in.x"]).shape) [| 1L; 512L; 6L; 4L |] "full stack output"
        }

        test "VGGish keys and shapes are the official audio_backbone.features.*" {
            use m = new Vggish(VggishConfig.Default)
            let ours = m.state_dict() |> Seq.map (fun kv -> kv.Key, shapeText kv.Value) |> Seq.sort |> Array.ofSeq
            let theirs = manifestKeys "audio_backbone." |> Array.filter (fun (k, _) -> k.StartsWith "features.") |> Array.sort
            Expect.equal ours theirs "same keys and shapes"
            Expect.isTrue (m.parameters() |> Seq.forall (fun p -> not p.requires_grad)) "frozen"
            use c = new Vggish({ VggishConfig.Default with Compact = true })
            let compact = c.state_dict() |> Seq.map (fun kv -> kv.Key, shapeText kv.Value) |> Seq.sort |> Array.ofSeq
            Expect.equal compact (manifestKeys "audio_backbone." |> Array.sort) "with Compact: features and embeddings"
        }

        test "loading a torchvggish-style file reports the FC weights as dropped" {
            use _ = torch.NewDisposeScope()
            use src = new Vggish(VggishConfig.Default)
            let tensors =
                [ for kv in src.state_dict() -> Collections.Generic.KeyValuePair("audio_backbone." + kv.Key, kv.Value.clone())
                  // The real embeddings are [4096, 12288] etc.; dropped keys are not shape-checked, so small stand-ins do.
                  for k in [ "embeddings.0.weight"; "embeddings.0.bias"; "embeddings.2.weight"; "embeddings.2.bias"; "embeddings.4.weight"; "embeddings.4.bias" ] ->
                      Collections.Generic.KeyValuePair("audio_backbone." + k, torch.zeros(2L))
                  yield Collections.Generic.KeyValuePair("backbone.patch_embed.proj.bias", torch.zeros(2L)) ]
            use m = new Vggish(VggishConfig.Default)
            let r = m.LoadStateDict(tensors, "audio_backbone.")
            Expect.equal r.Loaded.Length 12 "12 conv tensors"
            Expect.equal r.Dropped.Length 7 "6 FC tensors and 1 foreign key dropped"
            Expect.isTrue (r.Dropped |> List.exists (fun k -> k = "audio_backbone.embeddings.0.weight")) "FC reported"
            let x = torch.randn(2L, 1L, 96L, 64L)
            Expect.equal (maxAbs (m.Forward x) (src.Forward x)) 0.0 "same weights, same output"
        }

        test "PCA post-processing: the official formula" {
            use _ = torch.NewDisposeScope()
            let v = torch.eye(128L) * 2.0.ToScalar()
            let mu = torch.ones(128L)
            let e = torch.linspace(-1.0, 3.0, 128L).unsqueeze(0L)
            let q = VggishPca.postprocess v mu e
            // 2 (x - 1) clamped to [-2, 2], then (. + 2) * 63.75 rounded.
            let expected = ((e - 1.0.ToScalar()) * 2.0.ToScalar()).clamp((-2.0).ToScalar(), 2.0.ToScalar()).add(2.0.ToScalar()).mul(63.75.ToScalar()).round()
            Expect.equal (maxAbs q expected) 0.0 "quantised"
            Expect.throwsT<ArgumentException> (fun () -> new Vggish({ Compact = false; Postprocess = true }) |> ignore) "needs Compact"
        }

        test "notebook path: file -> examples -> VGGish -> MLP in three calls" {
            use _ = torch.NewDisposeScope()
            let w = Audio.load (golden [ "wav"; "speech_16k_mono_pcm16.wav" ])
            let ex = Audio.examples Subset.S4 w
            use vggish = new Vggish(VggishConfig.Default)
            let f = Audio.encodeBatched vggish 2 ex
            Expect.equal f.shape [| 5L; 512L; 6L; 4L |] "VGGish features"
            Expect.isLessThan (maxAbs f (Audio.encode vggish ex)) 1e-5 "batching does not change the result"
            use mlp = new AudioMlp()
            Expect.equal (mlp.Forward f).shape [| 5L; 256L; 6L; 4L |] "audio tokens"
        }
    ]

[<Tests>]
let cli =
    testList "Audio.Cli" [
        test "vct audio examples writes the subset's examples as .npy" {
            use _ = torch.NewDisposeScope()
            use tmp = new TempDir("vct-cli-audio")
            let dir = tmp.Path
            let src = golden [ "wav"; "mix_44k_stereo_pcm16.wav" ]
            let out = Path.Combine(dir, "x.npy")
            let code, stdout, err = runVct [ "audio"; "examples"; src; "--subset"; "avss"; "--out"; out ]
            Expect.equal code 0 $"exit code; stderr: {err}"
            Expect.stringContains stdout "1 example(s)" "reports the count"
            let written = Npy.read out
            let lib = (Examples.ofFile (ExampleOptions.Default(Some Subset.AVSS)) src).Examples
            Expect.equal written.shape [| 10L; 1L; 96L; 64L |] "AVSS shape"
            Expect.equal (maxAbs written lib) 0.0 "same as the library"
        }

        test "vct audio examples on a folder writes a mirrored tree and lists failures" {
            use tmp = new TempDir("vct-cli-tree")
            let dir = tmp.Path
            let code, stdout, err = runVct [ "audio"; "examples"; golden [ "wav" ]; "--subset"; "s4"; "--out"; dir; "--jobs"; "2" ]
            Expect.equal code 0 $"exit code; stderr: {err}"
            Expect.stringContains stdout $"{fixtures.Value.Length} of {fixtures.Value.Length} file(s) written" "all written"
            Expect.isTrue (File.Exists(Path.Combine(dir, "tones_8k_mono_pcm16.npy"))) "mirrored name"
            let code, _, err = runVct [ "audio"; "examples"; golden [ "bad" ]; "--subset"; "s4"; "--out"; dir ]
            Expect.equal code 1 "failures give exit code 1"
            Expect.stringContains err (golden [ "bad"; "nan.wav" ]) "names each failing file"
            Expect.isFalse (err.Contains "   at ") "no stack trace"
        }

        test "vct audio examples on a bad file fails with one clear line" {
            let bad = golden [ "bad"; "rate_1mhz.wav" ]
            let code, _, err = runVct [ "audio"; "examples"; bad; "--out"; Path.Combine(Path.GetTempPath(), "never.npy") ]
            Expect.equal code 1 "exit code"
            Expect.stringContains err bad "names the file"
            Expect.stringContains err "implausible sample rate" "says the problem"
            Expect.isFalse (err.Contains "   at ") "no stack trace"
        }
    ]

/// Regression tests of the audio readers (issue #11): crafted WAV headers, file names ffmpeg must not parse.
module HardeningTests =
    open System
    open System.IO
    open Expecto
    open Vct.Core.Platform
    open Vct.Core.Audio
    open Vct.Core.Tests.Support
    open Vct.Core.Tests.Crafted

    /// Runs ffmpeg with one argument per item; fails the test when it fails.
    let ffmpegTo (ffmpeg: string) (args: string list) =
        let code, _, err = ChildProcess.run ffmpeg ([ "-nostdin"; "-v"; "error"; "-y" ] @ args)
        if code <> 0 then failtest $"ffmpeg failed: {err}"

    [<Tests>]
    let tests =
        testList "Hardening" [
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
        ]

/// Generated malformed WAV, .npy and log-mel pickle files (Generators.fs) through the readers.
module FuzzTests =
    open System.IO
    open Expecto
    open FsCheck.FSharp
    open TorchSharp
    open Vct.Core.Audio
    open Vct.Core.Tests.Generators

    let private golden (parts: string list) = Golden.path parts

    // Valid seeds, made here or taken from the golden fixtures.
    let private wavSeeds =
        lazy
            [| File.ReadAllBytes(golden [ "audio"; "bad"; "short_0.2s.wav" ])
               File.ReadAllBytes(golden [ "audio"; "wav"; "tones_16k_mono_pcm24.wav" ])[.. 4000]
               (let p = Path.Combine(fuzzDir.Value, "seed-float.wav")
                Wav.writeFloat32 p 16000 [| Array.init 64 (fun i -> float i / 64.0); Array.zeroCreate 64 |]
                File.ReadAllBytes p) |]

    let private readNpyTensor (path: string) =
        use _ = torch.NewDisposeScope()
        Npy.read path |> ignore

    [<Tests>]
    let tests =
        testList "Fuzz" [
            prop 450 "WAV: mutated valid files" (Gen.delay (fun () -> mutated wavSeeds.Value)) "a.wav" (Audio.load >> ignore)
            prop 600 "WAV: forged chunk layouts" wav "b.wav" (Wav.read SampleScaling.Exact >> ignore)
            prop 180 ".npy: forged headers, as tensors" npy "c.npy" readNpyTensor
            prop 180 "log-mel pickle: mutated" (Gen.delay (fun () -> mutated [| File.ReadAllBytes(golden [ "audio"; "pkl"; "leaf_requires_grad.pkl" ]) |])) "c.pkl" (fun p ->
                use _ = torch.NewDisposeScope()
                LogMelPickle.readTensor p |> ignore)
        ]
