/// Data-parallel training: tiny-preset throughput of `vct train` in one process with 1 LibTorch thread, on 2 MPI
/// ranks with 1 thread each (`mpirun -np 2 ... --distributed mpi`), and in one process with 2 threads; and the
/// gradient allreduce's time per step. The real CLI, the same global batch of 16 videos.
module Vct.Bench.DistributedBench

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Training
open Vct.Bench.Harness

let private cli () = Path.Combine(repoRoot, "src", "Vct.Cli", "bin", "Release", "net10.0", "vct.dll")

let private mpirun () =
    match Environment.GetEnvironmentVariable "PATH" with
    | null -> None
    | path -> path.Split(':') |> Array.map (fun d -> Path.Combine(d, "mpirun")) |> Array.tryFind File.Exists

let private exec (exe: string) (args: string list) =
    let psi = ProcessStartInfo(exe, UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true)
    for a in args do psi.ArgumentList.Add a
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    if p.ExitCode <> 0 then failwithf "%s exited %d: %s" exe p.ExitCode err.Result
    out.Result |> ignore

/// Median step seconds after `warmup` steps and the mean allreduce seconds per step (0 when not logged).
let private stepsOf (metrics: string) (warmup: int) =
    let steps =
        [ for line in File.ReadLines metrics do
              let e = JsonDocument.Parse(line).RootElement
              if e.GetProperty("type").GetString() = "step" then
                  let ar = match e.TryGetProperty "allreduce_seconds" with | true, v -> v.GetDouble() | _ -> 0.0
                  yield e.GetProperty("seconds").GetDouble(), ar ]
        |> List.skip warmup
    median (List.map fst steps), List.averageBy snd steps

let run (_repeats: int) =
    match mpirun () with
    | None -> printfn "distributed: mpirun not found (install Open MPI, openmpi-bin); suite skipped"
    | Some mpi ->
        let dir = Path.Combine(Path.GetTempPath(), $"vct-dist-bench-{Environment.ProcessId}")
        try
            let data = Path.Combine(dir, "data")
            Synth.generate { TrainJob.tinySynth with Train = 64; Val = 4; Test = 0 } data |> ignore
            let batch, iterations, warmup = 16, 23, 3
            let args (name: string) (threads: int) =
                [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; Path.Combine(dir, "runs"); "--name"; name
                  "--batch"; string batch; "--iterations"; string iterations; "--eval-period"; "1000000"
                  "--device"; "cpu"; "--threads"; string threads; "--workers"; "1" ]
            let measure (name: string) (f: unit -> unit) =
                printfn "distributed: %s" name
                let sw = Stopwatch.StartNew()
                f ()
                let step, ar = stepsOf (Path.Combine(dir, "runs", name, "metrics.jsonl")) warmup
                name, step, ar, sw.Elapsed.TotalSeconds
            let rows =
                [ measure "1 process, 1 thread" (fun () -> exec "dotnet" (cli () :: args "1 process, 1 thread" 1))
                  measure "2 ranks, 1 thread each" (fun () ->
                      exec mpi ([ "--allow-run-as-root"; "--oversubscribe"; "--bind-to"; "none"; "--mca"; "btl"; "self,vader"; "-np"; "2"; "dotnet"; cli () ]
                                @ args "2 ranks, 1 thread each" 1 @ [ "--distributed"; "mpi" ]))
                  measure "1 process, 2 threads" (fun () -> exec "dotnet" (cli () :: args "1 process, 2 threads" 2)) ]
            let baseStep = rows |> List.head |> fun (_, s, _, _) -> s
            let md =
                String.Join("\n",
                    [ yield "## Data-parallel training, CPU (issue #15)"
                      yield ""
                      yield "Measured " + DateTime.UtcNow.ToString("yyyy-MM-dd") + " on " + machine () + " (shared with other jobs: expect noise)."
                      yield $"`vct train --preset tiny` on a synthetic set of 64 training videos, {batch} videos per step (the same global batch"
                      yield $"in every row), {iterations} steps; median step time of steps {warmup + 1}-{iterations} as the trainer logs it (forward,"
                      yield "losses, backward, gradient allreduce, clipping, AdamW). Ranks: `mpirun -np 2 ... --distributed mpi`, Open MPI"
                      yield "shared-memory transport, 8 of the 16 videos each; allreduce: the bucketed float32 gradient allreduce of a step"
                      yield "(host buffers, 25 MB buckets) including the copies in and out."
                      yield ""
                      yield "| run | s/step | videos/s | speed-up vs 1 process x 1 thread | allreduce per step (ms) | wall (s, with start-up and final evaluation) |"
                      yield "| --- | ---: | ---: | ---: | ---: | ---: |"
                      for name, step, ar, wall in rows ->
                          let arText = if ar > 0.0 then $"{1000.0 * ar:F1}" else "-"
                          $"| {name} | {step:F3} | {float batch / step:F1} | {baseStep / step:F2} | {arText} | {wall:F0} |" ])
            printfn "%s" md
            writeSection "distributed" md
        finally
            try Directory.Delete(dir, true) with _ -> ()
