/// Data-parallel training over MPI (`vct train --distributed mpi` under mpirun), gradient accumulation and the
/// fault handling of a job: the real CLI, real ranks. Skipped when mpirun (Open MPI) is not installed.
module Vct.Core.Tests.DistributedTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Threading
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Training
open Vct.Core.Tests.Support

let private cli = cliPath

/// mpirun on PATH, if any.
let private mpirun =
    lazy
        (let path = Environment.GetEnvironmentVariable "PATH"
         if isNull path then None
         else path.Split(':') |> Array.map (fun d -> Path.Combine(d, "mpirun")) |> Array.tryFind File.Exists)

let private requireMpi () =
    if mpirun.Value.IsNone then skiptest "mpirun not found: install Open MPI (openmpi-bin) to run the data-parallel tests"
    cliDll () |> ignore

/// Launcher flags: root in CI containers, and more ranks than cores on small machines.
let private mpiFlags = [ "--allow-run-as-root"; "--oversubscribe"; "--mca"; "btl"; "self,vader"; "--bind-to"; "none" ]

let private psiOf (exe: string) (args: string list) =
    let p = ProcessStartInfo(exe, UseShellExecute = false)
    for a in args do p.ArgumentList.Add a
    p

/// `vct args` in one process: (exit code, stdout, stderr).
let private vct (args: string list) = runProcess (psiOf "dotnet" (cli.Value :: args))

/// `mpirun -np n vct args --distributed mpi`.
let private mpiArgs (n: int) (args: string list) =
    mpiFlags @ [ "-np"; string n; "dotnet"; cli.Value ] @ args @ [ "--distributed"; "mpi" ]

let private mpi (n: int) (args: string list) = runProcess (psiOf mpirun.Value.Value (mpiArgs n args))

let private ok (what: string) (code: int, _: string, err: string) =
    if code <> 0 then failtestf "%s exited %d:\n%s" what code err

/// ||a - b|| / ||b|| over all tensors of two safetensors files (float64), and the tensors compared.
let private relativeDifference (a: string) (b: string) =
    use fa = Checkpoint.Safetensors.read a
    use fb = Checkpoint.Safetensors.read b
    let mutable num, den = 0.0, 0.0
    for kv in fa.Tensors do
        use x = kv.Value.to_type(torch.float64)
        use y = fb.Tensors[kv.Key].to_type(torch.float64)
        use d = x - y
        num <- num + Math.Pow(d.norm().item<float>(), 2.0)
        den <- den + Math.Pow(y.norm().item<float>(), 2.0)
    sqrt num / sqrt den, fa.Tensors.Count

let private losses (metrics: string) =
    [ for line in File.ReadAllLines metrics do
          use doc = JsonDocument.Parse line
          if doc.RootElement.GetProperty("type").GetString() = "step" then
              yield doc.RootElement.GetProperty("loss").GetDouble() ]

/// (M_J, M_F) of the last "eval" line of a metrics log.
let private lastEval (metrics: string) =
    [ for line in File.ReadAllLines metrics do
          use doc = JsonDocument.Parse line
          if doc.RootElement.GetProperty("type").GetString() = "eval" then
              yield doc.RootElement.GetProperty("m_j").GetDouble(), doc.RootElement.GetProperty("m_f").GetDouble() ]
    |> List.last

let private iterationOf (checkpoint: string) =
    use f = Checkpoint.Safetensors.read checkpoint
    int f.Metadata["iteration"]

let private withData (f: string -> string -> unit) =
    withTempDir "vct-mpi" (fun dir ->
        let data = Path.Combine(dir, "data")
        Synth.generate { SynthOptions.Default Subset.S4 with Train = 8; Val = 2; Test = 2; Size = 64; EvalSize = 64 } data |> ignore
        f data (Path.Combine(dir, "runs")))

let private common (data: string) (runs: string) (name: string) (iterations: int) =
    [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; runs; "--name"; name; "--batch"; "4"
      "--iterations"; string iterations; "--eval-period"; "100000"; "--device"; "cpu"; "--threads"; "1"; "--workers"; "0" ]

let private copyDir (src: string) (dst: string) =
    Directory.CreateDirectory dst |> ignore
    for f in Directory.GetFiles src do File.Copy(f, Path.Combine(dst, Path.GetFileName f))

/// The ranks (child processes) of an mpirun: pid -> OMPI_COMM_WORLD_RANK.
let private ranksOf (mpirunPid: int) =
    [ for d in Directory.GetDirectories "/proc" do
          match Int32.TryParse(Path.GetFileName d) with
          | true, pid ->
              try
                  let stat = File.ReadAllText(Path.Combine(d, "stat"))
                  let fields = stat.Substring(stat.LastIndexOf ')' + 2).Split(' ')
                  if int fields[1] = mpirunPid then
                      let env = File.ReadAllText(Path.Combine(d, "environ")).Split('\000')
                      match env |> Array.tryFind (fun e -> e.StartsWith "OMPI_COMM_WORLD_RANK=") with
                      | Some e -> yield pid, int (e.Substring 21)
                      | None -> ()
              with _ -> ()
          | _ -> () ]

/// Starts mpirun in the background; returns the process (its output drained).
let private startMpi (n: int) (args: string list) =
    let psi = psiOf mpirun.Value.Value (mpiArgs n args)
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    let p = Process.Start psi
    let err = p.StandardError.ReadToEndAsync()
    p.StandardOutput.ReadToEndAsync() |> ignore
    p, err

let private waitFor (timeout: TimeSpan) (cond: unit -> bool) =
    let sw = Stopwatch.StartNew()
    while not (cond ()) && sw.Elapsed < timeout do Thread.Sleep 200
    cond ()

let private stepCount (metrics: string) =
    if not (File.Exists metrics) then 0
    else
        use fs = new FileStream(metrics, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete)
        use r = new StreamReader(fs)
        r.ReadToEnd().Split('\n') |> Array.filter (fun l -> l.EndsWith "}") |> Array.length

[<Tests>]
let tests =
    testList "Distributed" [
        test "batch slices: split random draws equal the whole batch's" {
            use g1 = new torch.Generator(7UL)
            use whole = torch.rand([| 4L; 3L; 5L |], generator = g1)
            let parts =
                [ for off in [ 0L; 2L ] ->
                      use g = new torch.Generator(7UL)
                      BatchSlice.within { Total = 4L; Offset = off; Count = 2L } (fun () -> BatchSlice.rand [| 2L; 3L; 5L |] torch.float32 torch.CPU (Some g)) ]
            use joined = torch.cat(parts |> Array.ofList, 0L)
            Expect.isTrue (joined.eq(whole).all().item<bool>()) "the slices of the batch's draw"
            // The criterion's points: per prediction one [1, P, 2] per frame, then two [K, S, 2].
            let counts = [| 2L; 1L; 3L |]
            let draw (u: UniformSource) frames k = [ for _ in 1 .. frames -> u [| 1L; 4L; 2L |] ] @ [ u [| k; 6L; 2L |]; u [| k; 2L; 2L |] ]
            use g = new torch.Generator(3UL)
            let all = [ for _ in 1 .. 2 do yield! draw (UniformSource.ofGenerator torch.CPU g) 3 6L ]
            use g = new torch.Generator(3UL)
            let part = [ for _ in 1 .. 2 do yield! draw (Distributed.slicedUniform (UniformSource.ofGenerator torch.CPU g) 3 1 2 counts) 2 4L ]
            // The part holds frames 1..2: match draws 1 and 2, then mask rows 2..5 of each prediction.
            for pred in 0 .. 1 do
                let a, p = pred * 5, pred * 4
                Expect.isTrue (part[p].eq(all[a + 1]).all().item<bool>()) "match draw of frame 1"
                Expect.isTrue (part[p + 1].eq(all[a + 2]).all().item<bool>()) "match draw of frame 2"
                Expect.isTrue (part[p + 2].eq(all[a + 3].narrow(0L, 2L, 4L)).all().item<bool>()) "candidate rows"
                Expect.isTrue (part[p + 3].eq(all[a + 4].narrow(0L, 2L, 4L)).all().item<bool>()) "fill rows"
        }

        test "2 ranks equal 1 process with the same global batch, and --accumulate 2 with half the micro-batch; resume with another rank count" {
            requireMpi ()
            withData (fun data runs ->
                vct (common data runs "single" 3) |> ok "single process"
                mpi 2 (common data runs "ranks2" 3) |> ok "mpirun -np 2"
                vct (common data runs "accumulate2" 3 @ [ "--accumulate"; "2" ]) |> ok "--accumulate 2"
                let final name = Path.Combine(runs, name, "model_final.safetensors")
                let rel2, n = relativeDifference (final "ranks2") (final "single")
                let relA, _ = relativeDifference (final "accumulate2") (final "single")
                printfn "weights after 3 steps, relative to one process x 4 videos: 2 ranks x 2 videos %.2e, --accumulate 2 x 2 videos %.2e (%d tensors)" rel2 relA n
                Expect.isLessThan rel2 1e-5 "2 ranks x 2 videos = 1 process x 4 videos"
                Expect.isLessThan relA 1e-5 "--accumulate 2 x 2 videos = 1 process x 4 videos"
                Expect.isFalse (File.Exists(Path.Combine(runs, "ranks2", "model_final.safetensors.tmp"))) "no stray files"
                for name in [ "ranks2"; "accumulate2" ] do
                    let a = losses (Path.Combine(runs, name, "metrics.jsonl"))
                    let b = losses (Path.Combine(runs, "single", "metrics.jsonl"))
                    Expect.equal a.Length 3 $"{name}: one log line per step (rank 0 alone writes)"
                    for x, y in List.zip a b do Expect.floatClose { absolute = 0.0; relative = 1e-5 } x y $"{name}: the step's loss"
                // The final evaluation, sharded over the 2 ranks (one video each) and gathered: the mean over videos.
                let (j1, f1), (j2, f2) = lastEval (Path.Combine(runs, "single", "metrics.jsonl")), lastEval (Path.Combine(runs, "ranks2", "metrics.jsonl"))
                Expect.floatClose { absolute = 1e-4; relative = 0.0 } j2 j1 "sharded M_J = one process's"
                Expect.floatClose { absolute = 1e-4; relative = 0.0 } f2 f1 "sharded M_F = one process's"
                // Resume with another number of ranks: 2 steps in one process, then on to 3 with 1 and with 2 ranks.
                vct (common data runs "first" 2) |> ok "first 2 steps"
                copyDir (Path.Combine(runs, "first")) (Path.Combine(runs, "first2"))
                vct (common data runs "first" 3 @ [ "--resume" ]) |> ok "resume in one process"
                mpi 2 (common data runs "first2" 3 @ [ "--resume" ]) |> ok "resume on 2 ranks"
                let relR, _ = relativeDifference (Path.Combine(runs, "first2", "model_final.safetensors")) (Path.Combine(runs, "first", "model_final.safetensors"))
                Expect.isLessThan relR 1e-5 "resumed on 2 ranks = resumed in one process")
        }

        test "a killed rank stops the job within 30 s with a non-zero exit; checkpoint_last stays intact" {
            requireMpi ()
            withData (fun data runs ->
                vct (common data runs "k" 2) |> ok "first 2 steps"
                let last = Path.Combine(runs, "k", "checkpoint_last.safetensors")
                let metrics = Path.Combine(runs, "k", "metrics.jsonl")
                let p, err = startMpi 2 (common data runs "k" 100000 @ [ "--resume" ])
                use p = p
                try
                    Expect.isTrue (waitFor (TimeSpan.FromSeconds 120.0) (fun () -> stepCount metrics >= 4)) "the ranks train"
                    let victim = ranksOf p.Id |> List.find (fun (_, r) -> r = 1) |> fst
                    let sw = Stopwatch.StartNew()
                    Process.GetProcessById(victim).Kill()
                    let ended = p.WaitForExit 30000
                    Expect.isTrue ended "mpirun (and rank 0) ended within 30 s of the kill"
                    printfn "job ended %.1f s after rank 1 was killed" sw.Elapsed.TotalSeconds
                    p.WaitForExit()
                    Expect.notEqual p.ExitCode 0 "non-zero exit"
                    Expect.isTrue (ranksOf p.Id |> List.isEmpty) "no rank left"
                    Expect.equal (iterationOf last) 2 "checkpoint_last is the last complete one and reads"
                    Expect.stringContains err.Result "rank 1" "mpirun names the rank"
                finally
                    if not p.HasExited then p.Kill true)
        }

        test "a hung rank (SIGSTOP) makes the watchdog stop the job" {
            requireMpi ()
            withData (fun data runs ->
                let metrics = Path.Combine(runs, "h", "metrics.jsonl")
                let p, err = startMpi 2 (common data runs "h" 100000 @ [ "--collective-timeout"; "8" ])
                use p = p
                let mutable victim = -1
                try
                    Expect.isTrue (waitFor (TimeSpan.FromSeconds 120.0) (fun () -> stepCount metrics >= 2)) "the ranks train"
                    victim <- ranksOf p.Id |> List.find (fun (_, r) -> r = 1) |> fst
                    let code, _, e = runProcess (psiOf "kill" [ "-STOP"; string victim ])
                    if code <> 0 then failtestf "kill -STOP failed: %s" e
                    let sw = Stopwatch.StartNew()
                    Expect.isTrue (p.WaitForExit 30000) "the job ended within 30 s of the hang"
                    printfn "job ended %.1f s after rank 1 stopped (watchdog limit 8 s)" sw.Elapsed.TotalSeconds
                    p.WaitForExit()
                    Expect.notEqual p.ExitCode 0 "non-zero exit"
                    Expect.stringContains err.Result "waited more than 8 s" "the watchdog says why"
                finally
                    if victim > 0 then
                        (try runProcess (psiOf "kill" [ "-KILL"; string victim ]) |> ignore with _ -> ())
                    if not p.HasExited then p.Kill true)
        }

        test "ranks started with different seeds refuse to train" {
            requireMpi ()
            withData (fun data runs ->
                let args seed = common data runs "m" 2 @ [ "--seed"; string seed; "--distributed"; "mpi" ]
                let all = mpiFlags @ [ "-np"; "1"; "dotnet"; cli.Value ] @ args 1 @ [ ":"; "-np"; "1"; "dotnet"; cli.Value ] @ args 2
                let code, _, err = runProcess (psiOf mpirun.Value.Value all)
                Expect.notEqual code 0 "non-zero exit"
                Expect.stringContains err "different configurations" "one clear line")
        }

        test "SIGTERM to the ranks (what mpirun sends them on Ctrl-C) stops every rank after the same step with one checkpoint" {
            requireMpi ()
            withData (fun data runs ->
                let metrics = Path.Combine(runs, "s", "metrics.jsonl")
                let p, err = startMpi 2 (common data runs "s" 100000)
                use p = p
                try
                    Expect.isTrue (waitFor (TimeSpan.FromSeconds 120.0) (fun () -> stepCount metrics >= 2)) "the ranks train"
                    for pid, _ in ranksOf p.Id do
                        let code, _, e = runProcess (psiOf "kill" [ "-TERM"; string pid ])
                        if code <> 0 then failtestf "kill -TERM failed: %s" e
                    Expect.isTrue (p.WaitForExit 60000) "the job ended"
                    p.WaitForExit()
                    let steps = stepCount metrics
                    Expect.equal (iterationOf (Path.Combine(runs, "s", "checkpoint_last.safetensors"))) steps "checkpoint of the last step"
                    Expect.stringContains err.Result "stopping all ranks after this step" "the stop is announced"
                finally
                    if not p.HasExited then p.Kill true)
        }
    ]
