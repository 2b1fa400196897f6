/// Audio front end: seconds of audio turned into VGGish examples per second (mono -> resampy kaiser_best to
/// 16 kHz -> log-mel -> [n, 1, 96, 64]) on a 10 s test signal at 16, 22.05, 44.1 and 48 kHz, ours against the
/// official numpy/resampy pipeline (`bench/python/audio_official.py`) in the same run, with the largest
/// difference between the two sides' examples.
module Vct.Bench.AudioBench

open System
open System.IO
open System.Threading.Tasks
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio
open Vct.Bench.Harness

let private seconds = 10.0

/// Same formula as audio_official.py: three tones, a chirp and a 3 Hz amplitude modulation.
let signal (rate: int) =
    let n = int (float rate * seconds)
    Array.init n (fun i ->
        let t = float i / float rate
        0.3 * sin (2.0 * Math.PI * 440.0 * t) + 0.2 * sin (2.0 * Math.PI * 1234.5 * t)
        + 0.1 * sin (2.0 * Math.PI * 6000.0 * t) + 0.1 * sin (2.0 * Math.PI * (100.0 + 400.0 * t) * t)
        * (0.5 + 0.5 * sin (2.0 * Math.PI * 3.0 * t)))

let private rates = [ 16000; 22050; 44100; 48000 ]

let run (repeats: int) =
    let runs = max 21 (7 * repeats)
    let clips = 16
    let threads = torch.get_num_threads ()
    let opts = ExampleOptions.Default None
    let dir = Path.Combine(Path.GetTempPath(), $"vct-audio-bench-{Environment.ProcessId}")
    Directory.CreateDirectory dir |> ignore
    let wave (rate: int) = { Channels = [| signal rate |]; SampleRate = rate; Source = $"signal_{rate}"; Encoding = "synthetic" }
    let oneClip = Collections.Generic.Dictionary<int, float>()
    let resampleOnly = Collections.Generic.Dictionary<int, float>()
    let manyClips = Collections.Generic.Dictionary<int, float>()
    try
        torch.set_num_threads 2
        for rate in rates do
            printfn "audio: ours, %d Hz" rate
            let w = wave rate
            // 40 warm-up runs: .NET compiles hot methods fully after ~30 calls (tiered JIT); the official side warms
            // up numba the same way.
            oneClip[rate] <- median (time 40 runs (fun () -> (Examples.ofWaveform opts w).Examples.Dispose()))
            use ex = (Examples.ofWaveform opts w).Examples
            Npy.write (Path.Combine(dir, $"ours_{rate}.npy")) ex
            if rate <> VggishParams.SampleRate then
                let x = w.Channels[0]
                resampleOnly[rate] <- median (time 40 runs (fun () -> Resample.kaiserBest rate VggishParams.SampleRate x |> ignore))
        // A folder of clips, as `vct audio examples` in folder mode processes them: one clip per core, one
        // LibTorch thread each.
        torch.set_num_threads 1
        let workers = Environment.ProcessorCount
        for rate in rates do
            let ws = Array.init clips (fun _ -> wave rate)
            let t =
                median (time 3 (max 3 repeats) (fun () ->
                    Parallel.For(0, clips, ParallelOptions(MaxDegreeOfParallelism = workers), fun i ->
                        (Examples.ofWaveform opts ws[i]).Examples.Dispose()) |> ignore))
            manyClips[rate] <- float clips * seconds / t
        torch.set_num_threads threads
        printfn "audio: official front end"
        let official = pythonJson "audio_official.py" [ string runs; dir ]
        let row (rate: int) =
            let o = official.GetProperty(string rate)
            let os = o.GetProperty("seconds").GetDouble()
            let diff =
                match o.TryGetProperty "max_abs_diff" with
                | true, d when d.ValueKind = Text.Json.JsonValueKind.Number -> $"{d.GetDouble():G3}"
                | _ -> "shapes differ"
            let ours = oneClip[rate]
            let rs = match resampleOnly.TryGetValue rate with | true, v -> $"{1000.0 * v:F1}" | _ -> "-"
            let officialRate = seconds / os
            $"| {float rate / 1000.0:G4} kHz | {1000.0 * ours:F1} | {rs} | {1000.0 * os:F1} | {os / ours:F1}x | {manyClips[rate]:F0} | {officialRate:F0} | {manyClips[rate] / officialRate:F1}x | {diff} |"
        let md =
            [ "## Audio front end (audio issue)"
              ""
              "Measured " + DateTime.UtcNow.ToString("yyyy-MM-dd") + " on " + machine () + "; official: VCT_AVS's `vggish_input.waveform_to_examples` (resampy 0.4.2"
              "kaiser_best with numba, numpy log-mel; Debian's numpy/resampy/torch) in the same run, via `bench/python/audio_official.py`."
              $"Input: a 10 s mono signal (tones, a chirp, amplitude modulation) as float64 samples; output: the [10, 1, 96, 64] examples."
              $"Single clip: median of {runs} runs, ours with {2} LibTorch threads and the resampler on 2 cores, the official code as it runs"
              $"(numpy single-threaded). Many clips: {clips} clips processed as `vct audio examples` does a folder ({workers} clips at a"
              "time, 1 LibTorch thread each); the official preprocessing tools process files one after another, so their rate is"
              "10 s divided by the single-clip time. Max abs diff: largest difference between the two sides' float32 examples."
              ""
              "| input rate | ours, one clip (ms) | of which resampling (ms) | official, one clip (ms) | speed-up | ours, many clips (s of audio / s) | official (s of audio / s) | speed-up | max abs diff |"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" ]
            @ (rates |> List.map row)
        let md = String.Join("\n", md)
        printfn "%s" md
        writeSection "audio" md
    finally
        torch.set_num_threads threads
        try Directory.Delete(dir, true) with _ -> ()
