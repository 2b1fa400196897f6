/// `vct predict` on generated clips: frames/s of the whole job (decode, resize, audio, forward, upsampling, PNGs,
/// overlay.mp4) for a 5 s and a 60 s clip at 1 and 5 fps with the released S4 configuration, against the official
/// model's forward on the same number of frames (the official code has no video path: its side is the 5-frame
/// forward of `time_official.py` times the number of 5-frame windows); and resident memory over a one-hour 1080p
/// video (tiny configuration: the memory of the streaming pipeline, not of the model, is what grows with length).
module Vct.Bench.VideoBench

open System
open System.Diagnostics
open System.IO
open System.Threading
open System.Text.Json
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Video
open Vct.Bench.Harness

let private ffmpeg (args: string list) =
    let psi = ProcessStartInfo("ffmpeg", RedirectStandardError = true)
    for a in [ "-nostdin"; "-y"; "-v"; "error" ] @ args do psi.ArgumentList.Add a
    use p = Process.Start psi
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    if p.ExitCode <> 0 then failwithf "ffmpeg failed: %s" err

/// A clip of ffmpeg's moving test pattern with a tone, H.264 + AAC.
let private clip (path: string) (seconds: int) (size: string) (rate: int) =
    if not (File.Exists path) then
        printfn "video: generating %s (%d s, %s at %d fps)" (Path.GetFileName path) seconds size rate
        ffmpeg [ "-f"; "lavfi"; "-i"; $"testsrc2=size={size}:rate={rate}:duration={seconds}"
                 "-f"; "lavfi"; "-i"; $"sine=frequency=440:sample_rate=16000:duration={seconds}"
                 "-c:v"; "libx264"; "-preset"; "ultrafast"; "-crf"; "35"; "-pix_fmt"; "yuv420p"; "-c:a"; "aac"; "-b:a"; "32k"; path ]

let private vmRssMiB () =
    File.ReadAllLines "/proc/self/status"
    |> Array.pick (fun l -> if l.StartsWith "VmRSS:" then Some(float (l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0) else None)

/// Runs the predict job, sampling resident memory every 0.5 s: (result, wall s, [(frames done, RSS MiB)]).
let private predict (model: VctModel) (opts: VideoOptions) (video: string) (out: string) (overlay: bool) =
    let samples = Collections.Generic.List<int * float>()
    let mutable frames = 0
    use stop = new CancellationTokenSource()
    let sampler =
        Tasks.Task.Run(fun () ->
            while not stop.IsCancellationRequested do
                lock samples (fun () -> samples.Add(frames, vmRssMiB ()))
                Thread.Sleep 500)
    let progress = { new IProgress<VideoProgress> with member _.Report p = frames <- p.Frames }
    let sw = Stopwatch.StartNew()
    let r =
        Predict.run model opts (FrameSource.VideoFile video)
            { Folder = out; SaveScores = false; Overlay = overlay; Checkpoint = "random weights"; Device = "cpu" }
            (Some progress) ignore CancellationToken.None
    let wall = sw.Elapsed.TotalSeconds
    stop.Cancel()
    sampler.Wait()
    r, wall, List.ofSeq samples

let private officialForward (repeats: int) =
    printfn "video: official 5-frame forward (time_official.py full_presam)..."
    match timeOfficial false [ "--cases"; "full_presam"; "--warmup-full"; "1"; "--runs-full"; string (max 2 repeats) ] |> Map.tryFind "full_presam" with
    | Some(s, _) -> s
    | None -> failwith "time_official.py reported no full_presam case"

let run (repeats: int) =
    // VCT_BENCH_QUICK=1: short clips, to check the suite itself; prints the table instead of writing it.
    let quick = Environment.GetEnvironmentVariable "VCT_BENCH_QUICK" = "1"
    let secs (s: int) = if quick then min s 8 else s
    torch.set_num_threads 2
    let dir = Path.Combine(Path.GetTempPath(), "vct-bench-video")
    Directory.CreateDirectory dir |> ignore
    let short, long = Path.Combine(dir, "clip5.mp4"), Path.Combine(dir, "clip60.mp4")
    let short, long = (if quick then Path.Combine(dir, "quick5.mp4"), Path.Combine(dir, "quick8.mp4") else short, long)
    clip short 5 "640x360" 25
    clip long (secs 60) "640x360" 25
    let official = officialForward repeats
    let loadBefore = loadAverage ()
    let rows =
        use _ = torch.no_grad ()
        use model = new VctModel(VctConfig.Released Subset.S4)
        model.eval ()
        model.MissingMasks <- Fusion.MissingMasks.BlankMaskImage
        let opts fps = { VideoOptions.Default with Fps = fps; MissingMasks = Fusion.MissingMasks.BlankMaskImage }
        [ for video, seconds in [ short, 5; long, secs 60 ] do
            for fps in [ 1.0; 5.0 ] ->
                let out = Path.Combine(dir, $"out-{seconds}-{fps}")
                if Directory.Exists out then Directory.Delete(out, true)
                printfn "video: ours, %d s clip at %g fps" seconds fps
                let r, wall, _ = predict model (opts fps) video out true
                let windows = Math.Ceiling(float r.Frames / 5.0)
                let off = official * windows
                $"| {seconds} s clip (640x360, 25 fps), --fps {fps:g} | {r.Frames} | {wall:F1} | {float r.Frames / wall:F2} | {off:F1} | {float r.Frames / off:F2} | {wall / off:F2} |" ]
    let loadAfter = loadAverage ()
    // Memory over a one-hour 1080p video: masks + summary streamed (no overlay), then 2 minutes with the overlay.
    let memory =
        use _ = torch.no_grad ()
        use model = new VctModel(VctConfig.Tiny(Subset.S4, 64L, 23L))
        model.eval ()
        model.MissingMasks <- Fusion.MissingMasks.BlankMaskImage
        [ for name, seconds, rate, overlay in [ "hour1080.mp4", secs 3600, 10, false; "two1080.mp4", secs 120, 25, true ] ->
            let video = Path.Combine(dir, name)
            clip video seconds "1920x1080" rate
            let out = Path.Combine(dir, "out-" + name)
            if Directory.Exists out then Directory.Delete(out, true)
            GC.Collect()
            let before = vmRssMiB ()
            printfn "video: memory, %s (overlay %b)" name overlay
            let r, wall, samples = predict model { VideoOptions.Default with MissingMasks = Fusion.MissingMasks.BlankMaskImage } video out overlay
            let at (q: float) =
                let target = int (q * float r.Frames)
                samples |> List.filter (fun (f, _) -> f <= target) |> List.map snd |> List.fold max before
            let peak = samples |> List.map snd |> List.fold max before
            let size = FileInfo(video).Length / 1048576L
            try Directory.Delete(out, true) with _ -> ()
            let ov = if overlay then "on" else "off"
            $"| {seconds / 60} min 1920x1080 at {rate} fps ({size} MiB), --fps 1, overlay {ov} | {r.Frames} | {wall:F0} | {before:F0} | {at 0.1:F0} | {at 0.5:F0} | {at 1.0:F0} | {peak:F0} |" ]
    for f in Directory.GetFiles(dir, "*1080.mp4") do File.Delete f
    let md =
        String.concat "\n"
            [ "## Video to masks, CPU (video issue)"
              ""
              "Measured " + DateTime.UtcNow.ToString("yyyy-MM-dd") + " on " + machine () + $"; 2 LibTorch threads; 1-min load average {loadBefore} before and {loadAfter} after the speed rows."
              "Ours: the whole `vct predict` job in-process (`Predict.run`: ffmpeg decode by pipe, frame sampling, Pillow-exact resize to 384,"
              "VGGish examples, forward, bilinear upsampling to the source size, mask PNGs, summary.json and overlay.mp4 encoded"
              "by a second ffmpeg), released S4 configuration with random weights, pre-SAM branch on with blank mask images."
              "Official: VCT has no video path, so its side is the model forward alone (`time_official.py` case `full_presam`, median"
              "5-frame forward, same threads, same run) times the number of 5-frame windows; decoding, audio and writing are not counted there."
              ""
              "| clip | frames | ours: vct predict (s) | ours (frames/s) | official forward only (s) | official (frames/s) | ours / official |"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
              yield! rows
              ""
              "Resident memory (VmRSS of the .NET process, sampled every 0.5 s) on long 1080p input, tiny configuration (random weights):"
              "frames stream from ffmpeg's pipe, masks are written as they come and the overlay encoder is fed through a bounded queue,"
              "so memory does not grow with the video's length. The clips are generated with ffmpeg's `testsrc2` and deleted afterwards."
              ""
              "| input | frames segmented | wall (s) | RSS before (MiB) | at 10% | at 50% | at 100% | peak (MiB) |"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
              yield! memory ]
    if quick then printfn "%s" md else writeSection "video" md
