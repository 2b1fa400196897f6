/// Acceptance test of `vct train`'s Ctrl-C handling: the real CLI process, a real SIGINT.
module Vct.Core.Tests.TrainInterruptTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open Expecto
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Tests.Support

/// A running `vct` CLI process whose stdout and stderr are drained in the background.
type private VctProcess(args: string list) =
    let psi =
        let p = cliStartInfo args
        p.RedirectStandardOutput <- true
        p.RedirectStandardError <- true
        p.UseShellExecute <- false
        p
    let proc = Process.Start psi
    let out = proc.StandardOutput.ReadToEndAsync()
    let err = proc.StandardError.ReadToEndAsync()
    member _.Id = proc.Id
    member _.HasExited = proc.HasExited
    /// Waits up to `timeout`; Some(exit code, stdout, stderr) when it ended, None when it still runs.
    member _.Wait(timeout: TimeSpan) =
        if proc.WaitForExit(int timeout.TotalMilliseconds) then
            proc.WaitForExit() // lets the output readers finish
            Some(proc.ExitCode, out.Result, err.Result)
        else None
    interface IDisposable with
        member _.Dispose() =
            if not proc.HasExited then
                proc.Kill true
                proc.WaitForExit()
            proc.Dispose()

/// Sends a signal (INT: what Ctrl-C in a terminal sends; TERM: kill's default) to `pid` with the system's `kill`.
let private signal (name: string) (pid: int) =
    let psi = ProcessStartInfo("kill", UseShellExecute = false)
    for a in [ $"-{name}"; string pid ] do psi.ArgumentList.Add a
    let code, _, err = runProcess psi
    if code <> 0 then failtestf "kill -%s %d failed: %s" name pid err

let private sigint = signal "INT"

/// The iterations of the "step" lines of a metrics log (a line still being written is skipped).
let private stepIterations (metrics: string) =
    if not (File.Exists metrics) then []
    else
        let text =
            use fs = new FileStream(metrics, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete)
            use r = new StreamReader(fs)
            r.ReadToEnd()
        [ for line in text.Split('\n') do
              if line.EndsWith "}" then
                  use doc = JsonDocument.Parse line
                  if doc.RootElement.GetProperty("type").GetString() = "step" then
                      yield doc.RootElement.GetProperty("iteration").GetInt32() ]

let private iterationOf (checkpoint: string) =
    use f = Checkpoint.Safetensors.read checkpoint
    int f.Metadata["iteration"]

[<Tests>]
let tests =
    testList "TrainInterrupt" [
        test "vct train on SIGINT exits 130 with a complete checkpoint_last, and --resume continues from it" {
            use tmp = new TempDir("vct-sigint")
            let dir = tmp.Path
            let data = Path.Combine(dir, "data")
            Synth.generate { SynthOptions.Default Subset.S4 with Train = 4; Val = 2; Test = 2; Size = 64; EvalSize = 64 } data |> ignore
            let runs = Path.Combine(dir, "runs")
            let run = Path.Combine(runs, "r")
            let metrics = Path.Combine(run, "metrics.jsonl")
            let last = Path.Combine(run, "checkpoint_last.safetensors")
            // Long enough that it could only end by the signal; no evaluation or periodic checkpoint before it.
            let common = [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; runs; "--name"; "r"; "--batch"; "2"
                           "--eval-period"; "100000"; "--device"; "cpu"; "--threads"; "2" ]
            let stopped =
                use p = new VctProcess(common @ [ "--iterations"; "100000" ])
                let deadline = Stopwatch.StartNew()
                while (stepIterations metrics).Length < 3 && not p.HasExited && deadline.Elapsed < TimeSpan.FromSeconds 40.0 do
                    Thread.Sleep 100
                if p.HasExited then
                    let code, out, err = (p.Wait TimeSpan.Zero).Value
                    failtestf "vct train ended before the signal (exit %d): %s\n%s" code out err
                Expect.isGreaterThanOrEqual (stepIterations metrics).Length 3 "a few steps logged within 40 s"
                Expect.isFalse (File.Exists last) "no checkpoint before the signal (the periodic one is far away)"
                let signalled = Stopwatch.StartNew()
                sigint p.Id
                match p.Wait(TimeSpan.FromSeconds 20.0) with
                | None -> failtest "vct train still runs 20 s after SIGINT"
                | Some(code, out, err) ->
                    Expect.equal code 130 $"exit code 130 after SIGINT; stderr: {err}"
                    Expect.isLessThan signalled.Elapsed.TotalSeconds 20.0 "stops promptly"
                    Expect.stringContains err "stopping after this step" "says what it does"
                    use doc = JsonDocument.Parse out
                    let reached = doc.RootElement.GetProperty("iterations").GetInt32()
                    Expect.stringStarts (doc.RootElement.GetProperty("outcome").GetString()) "Interrupted" "summary says interrupted"
                    reached
            let logged = stepIterations metrics
            Expect.equal logged [ 1 .. stopped ] "one step line per iteration up to the one reached"
            Expect.isTrue (File.Exists last) "checkpoint_last written"
            Expect.equal (iterationOf last) stopped "checkpoint_last holds the iteration reached"
            Expect.isFalse (File.Exists(Path.Combine(run, "model_final.safetensors"))) "no final model for an interrupted run"
            let leftovers =
                Directory.GetFiles(run, "*", SearchOption.AllDirectories)
                |> Array.map Path.GetFileName
                |> Array.filter (fun f -> f.StartsWith "." || f.EndsWith ".tmp")
            Expect.isEmpty leftovers "no temporary or half-written files"
            // Resume to a few iterations beyond.
            let target = stopped + 3
            use p = new VctProcess(common @ [ "--iterations"; string target; "--resume" ])
            match p.Wait(TimeSpan.FromSeconds 60.0) with
            | None -> failtest "the resumed run did not end within 60 s"
            | Some(code, out, err) ->
                Expect.equal code 0 $"resumed run completes; stderr: {err}"
                use doc = JsonDocument.Parse out
                Expect.equal (doc.RootElement.GetProperty("iterations").GetInt32()) target "ends at the requested iteration"
                Expect.equal (doc.RootElement.GetProperty("outcome").GetString()) "Completed" "completed"
            Expect.equal (stepIterations metrics) [ 1 .. target ] "continues at the next iteration: no step repeated or lost"
            Expect.equal (iterationOf last) target "checkpoint_last at the end"
            Expect.isTrue (File.Exists(Path.Combine(run, "model_final.safetensors"))) "final model written"
        }

        test "vct train on SIGTERM stops like Ctrl-C, skips the final evaluations; the run name is not reused without --resume" {
            use tmp = new TempDir("vct-sigterm")
            let dir = tmp.Path
            let data = Path.Combine(dir, "data")
            Synth.generate { SynthOptions.Default Subset.S4 with Train = 4; Val = 2; Test = 2; Size = 64; EvalSize = 64 } data |> ignore
            let runs = Path.Combine(dir, "runs")
            let run = Path.Combine(runs, "r")
            let metrics = Path.Combine(run, "metrics.jsonl")
            // An evaluation at 2 writes model_best, so the final evaluations would have something to evaluate.
            let common = [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; runs; "--name"; "r"; "--batch"; "2"
                           "--eval-period"; "2"; "--device"; "cpu"; "--threads"; "2"; "--iterations"; "100000" ]
            do
                use p = new VctProcess(common)
                let deadline = Stopwatch.StartNew()
                while (stepIterations metrics).Length < 3 && not p.HasExited && deadline.Elapsed < TimeSpan.FromSeconds 60.0 do
                    Thread.Sleep 100
                if p.HasExited then
                    let code, out, err = (p.Wait TimeSpan.Zero).Value
                    failtestf "vct train ended before the signal (exit %d): %s\n%s" code out err
                Expect.isTrue (File.Exists(Path.Combine(run, "model_best.safetensors"))) "a best checkpoint before the signal"
                signal "TERM" p.Id
                match p.Wait(TimeSpan.FromSeconds 20.0) with
                | None -> failtest "vct train still runs 20 s after SIGTERM"
                | Some(code, out, err) ->
                    Expect.equal code 130 $"exit code 130 after SIGTERM; stderr: {err}"
                    Expect.stringContains err "SIGTERM: stopping after this step; a resumable checkpoint will be written" "says what it does"
                    Expect.stringContains err "the final evaluations are skipped" "no final evaluation after an interrupt"
                    use doc = JsonDocument.Parse out
                    let reached = doc.RootElement.GetProperty("iterations").GetInt32()
                    Expect.stringStarts (doc.RootElement.GetProperty("outcome").GetString()) "Interrupted" "summary says interrupted"
                    Expect.isFalse (doc.RootElement.TryGetProperty("m_j") |> fst) "no final M_J"
                    Expect.equal (iterationOf (Path.Combine(run, "checkpoint_last.safetensors"))) reached "checkpoint at the iteration reached"
            // The same name again without --resume: refused, the run untouched.
            let before = File.ReadAllBytes metrics
            use p = new VctProcess(common)
            match p.Wait(TimeSpan.FromSeconds 60.0) with
            | None -> failtest "the refused run did not end within 60 s"
            | Some(code, _, err) ->
                Expect.equal code 1 $"refused: {err}"
                Expect.stringContains err $"vct: {run}: already holds a run (checkpoint_last.safetensors, metrics.jsonl, model_best.safetensors); pass --resume to continue it, or choose another --name" "says why"
            Expect.equal (File.ReadAllBytes metrics) before "metrics untouched"
        }
        test "vct predict on SIGTERM stops after the current batch; the masks written so far stay valid" {
            use tmp = new TempDir("vct-predict-term")
            let dir = tmp.Path
            let ckpt = Path.Combine(dir, "tiny.safetensors")
            do
                use model = new VctModel(VctConfig.Tiny(Subset.S4, 64L, 23L))
                ModelIO.save ckpt model
            let video = Path.Combine(dir, "long.mp4")
            let psi = ProcessStartInfo("ffmpeg", UseShellExecute = false)
            for a in [ "-nostdin"; "-y"; "-v"; "error"; "-f"; "lavfi"; "-i"; "testsrc=size=64x64:rate=25:duration=60"
                       "-f"; "lavfi"; "-i"; "sine=duration=60"; "-pix_fmt"; "yuv420p"; "-shortest"; video ] do psi.ArgumentList.Add a
            let code, _, err = runProcess psi
            if code <> 0 then failtestf "ffmpeg: %s" err
            let out = Path.Combine(dir, "out")
            let masks () = if Directory.Exists(Path.Combine(out, "masks")) then Directory.GetFiles(Path.Combine(out, "masks"), "*.png").Length else 0
            use p = new VctProcess([ "predict"; "--checkpoint"; ckpt; "--video-input"; video; "--output"; out; "--fps"; "5"; "--device"; "cpu" ])
            let deadline = Stopwatch.StartNew()
            while masks () < 3 && not p.HasExited && deadline.Elapsed < TimeSpan.FromSeconds 120.0 do
                Thread.Sleep 100
            if p.HasExited then
                let code, o, e = (p.Wait TimeSpan.Zero).Value
                failtestf "vct predict ended before the signal (exit %d): %s\n%s" code o e
            signal "TERM" p.Id
            match p.Wait(TimeSpan.FromSeconds 30.0) with
            | None -> failtest "vct predict still runs 30 s after SIGTERM"
            | Some(code, _, err) ->
                Expect.equal code 130 $"exit code 130 after SIGTERM; stderr: {err}"
                Expect.stringContains err "SIGTERM: stopping after the current batch" "says what it does"
                use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
                Expect.isTrue (doc.RootElement.GetProperty("interrupted").GetBoolean()) "summary says interrupted"
                let n = doc.RootElement.GetProperty("frames").GetArrayLength()
                Expect.isLessThan n 300 "stopped early"
                Expect.equal (masks ()) n "one valid mask per summary entry"
                for m in Directory.GetFiles(Path.Combine(out, "masks"), "*.png") do
                    Expect.equal (ImageIO.readLabels m).Width 64 "valid PNG"
        }
    ]
