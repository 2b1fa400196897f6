/// Audio front-end benchmark: seconds of audio turned into VGGish examples per second (resample + log-mel),
/// on a deterministic 10 s test signal at 16, 22.05, 44.1 and 48 kHz. Writes our examples as .npy so that
/// bench_official.py can check they equal the official pipeline's. Usage:
///   dotnet run -c Release --project bench/audio -- [--out DIR] [--reps N] [--float32] [--threads N]
module Vct.Bench.Audio

open System
open System.Diagnostics
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Audio

/// Same formula as bench_official.py: three tones, a chirp and a 3 Hz amplitude modulation.
let signal (rate: int) (seconds: float) =
    let n = int (float rate * seconds)
    Array.init n (fun i ->
        let t = float i / float rate
        0.3 * sin (2.0 * Math.PI * 440.0 * t) + 0.2 * sin (2.0 * Math.PI * 1234.5 * t)
        + 0.1 * sin (2.0 * Math.PI * 6000.0 * t) + 0.1 * sin (2.0 * Math.PI * (100.0 + 400.0 * t) * t)
        * (0.5 + 0.5 * sin (2.0 * Math.PI * 3.0 * t)))

[<EntryPoint>]
let main argv =
    let arg (name: string) (dflt: string) =
        match Array.tryFindIndex ((=) name) argv with
        | Some i when i + 1 < argv.Length -> argv[i + 1]
        | _ -> dflt
    let outDir = arg "--out" (Path.Combine(Path.GetTempPath(), "vct-audio-bench"))
    let reps = int (arg "--reps" "5")
    Runtime.init () |> ignore                    // before any TorchSharp access (libstdc++ compatibility fix)
    let dtype = if Array.contains "--float32" argv then torch.float32 else torch.float64
    match arg "--threads" "" with
    | "" -> ()
    | t -> Device.setThreads (int t)
    Directory.CreateDirectory outDir |> ignore
    let seconds = 10.0
    printfn "rate_hz\tseconds_of_audio_per_second\tms_per_10s_clip\t(threads %d, %s)" (torch.get_num_threads ()) (string dtype)
    for rate in [ 16000; 22050; 44100; 48000 ] do
        let x = signal rate seconds
        let w = { Channels = [| x |]; SampleRate = rate; Source = $"signal_{rate}"; Encoding = "synthetic" }
        let opts = { ExampleOptions.Default Subset.NoClip with ComputeDtype = dtype }
        (Examples.ofWaveform opts w).Examples.Dispose()                                   // warm-up
        let sw = Stopwatch.StartNew()
        for _ in 1 .. reps do (Examples.ofWaveform opts w).Examples.Dispose()
        let s = sw.Elapsed.TotalSeconds / float reps
        printfn "%d\t%.1f\t%.1f" rate (seconds / s) (1000.0 * s)
        use ex = (Examples.ofWaveform opts w).Examples
        Npy.write (Path.Combine(outDir, $"dotnet_{rate}.npy")) ex
    printfn "examples written to %s" outDir
    printfn "resampler alone, ms per 10 s clip: rate\tfast\tdirect"
    for rate in [ 22050; 44100; 48000 ] do
        let x = signal rate seconds
        let time (f: unit -> float[]) =
            f () |> ignore
            let sw = Stopwatch.StartNew()
            for _ in 1 .. reps do f () |> ignore
            1000.0 * sw.Elapsed.TotalSeconds / float reps
        let tf = time (fun () -> Resample.fast SincFilter.KaiserBest rate 16000 x)
        let td = time (fun () -> Resample.direct SincFilter.KaiserBest rate 16000 x)
        printfn "%d\t%.1f\t%.1f" rate tf td
    0
