// CPU forward latency and peak memory of the vision modules (Swin-B 384 with / without the pre-SAM branch,
// pixel decoder). One case per process, so that peak RSS belongs to that case.
//   dotnet build Vct.sln -c Release
//   dotnet fsi bench/vision/bench.fsx -- <case> [repeats]      case: swin1 swin5 presam1 presam5 pixdec5 | all
// Prints one line per case: case, median seconds, min seconds, peak RSS MiB, threads ($VCT_BENCH_THREADS, default 2).
#r "../../tests/Vct.Core.Tests/bin/Release/net10.0/TorchSharp.dll"
#r "../../tests/Vct.Core.Tests/bin/Release/net10.0/Vct.Core.dll"

open System
open System.Diagnostics
open System.IO
open TorchSharp
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.PixelDecoder

Vct.Core.Platform.Runtime.init () |> ignore

let peakRssMiB () =
    File.ReadAllLines "/proc/self/status"
    |> Array.find (fun l -> l.StartsWith "VmHWM:")
    |> fun l -> float (l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0

let time (repeats: int) (f: unit -> unit) =
    f ()   // warm-up
    let ts =
        [| for _ in 1 .. repeats ->
             let sw = Stopwatch.StartNew()
             f ()
             sw.Elapsed.TotalSeconds |]
    Array.sortInPlace ts
    ts[ts.Length / 2], ts[0]

let run (case: string) (repeats: int) =
    match Environment.GetEnvironmentVariable "VCT_BENCH_THREADS" with
    | null | "" -> torch.set_num_threads 2
    | n -> torch.set_num_threads (int n)
    torch.manual_seed 0L |> ignore
    use _ = torch.no_grad ()
    let frames = if case.EndsWith "5" then 5L else 1L
    let median, best =
        match case with
        | "swin1" | "swin5" | "presam1" | "presam5" ->
            let enc = new VisualEncoder(VisualEncoderConfig.SwinB384.WithUsePreSam(case.StartsWith "presam"))
            enc.eval()
            let x = torch.randn(frames, 3L, 384L, 384L)
            let m = if case.StartsWith "presam" then Some(torch.randn(frames, 3L, 384L, 384L)) else None
            time repeats (fun () -> use _ = torch.NewDisposeScope() in enc.Forward(x, m) |> ignore)
        | "pixdec5" ->
            let pd = new MSDeformAttnPixelDecoder(PixelDecoderConfig.SwinB384)
            pd.eval()
            let feats = [| for c, s in [ 128L, 96L; 256L, 48L; 512L, 24L; 1024L, 12L ] -> torch.randn(frames, c, s, s) |]
            time repeats (fun () -> use _ = torch.NewDisposeScope() in pd.call feats |> ignore)
        | other -> failwith $"unknown case {other}"
    printfn "%s\t%.3f\t%.3f\t%.0f\t%d" case median best (peakRssMiB ()) (torch.get_num_threads ())

let args = fsi.CommandLineArgs |> Array.skip 1
let case = if args.Length > 0 then args[0] else "all"
let repeats = if args.Length > 1 then int args[1] else 3
if case = "all" then
    for c in [ "swin1"; "swin5"; "presam1"; "presam5"; "pixdec5" ] do
        let psi = ProcessStartInfo("dotnet", $"fsi {__SOURCE_DIRECTORY__}/bench.fsx -- {c} {repeats}")
        psi.RedirectStandardOutput <- true
        use p = Process.Start psi
        let out = p.StandardOutput.ReadToEnd()
        p.WaitForExit()
        printf "%s" out
else run case repeats
