module Vct.Core.Tests.TrainerTests

open System
open System.IO
open System.Threading
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Training
open Vct.Core.Tests.Support

/// A small synthetic S4-like set (32x32 frames), written once per test process.
let private data =
    lazy
        (let dir = sessionDir "trainer-data"
         Synth.generate { SynthOptions.Default Subset.S4 with Train = 8; Val = 2; Test = 2; Size = 32; EvalSize = 32 } dir |> ignore
         dir)

let private config iterations =
    { Model = VctConfig.Tiny(Subset.S4, 32L, 23L)
      Criterion = (CriterionConfig.Released Subset.S4).WithNumPoints 64L
      Optim = { OptimConfig.Released with BaseLr = 5e-4 }
      Iterations = iterations; BatchVideos = 2; EvalPeriod = 1000; CheckpointPeriod = 1000
      Seed = 11; CropSize = 32; ColorJitter = true; Workers = 2; MissingMasks = Fusion.MissingMasks.Refuse; Amp = false }

let private runTo (dir: string) (iterations: int) (resume: bool) (stopAt: int option) =
    let root = data.Value
    let train = Avsbench.records Subset.S4 root "train"
    let valr = Avsbench.records Subset.S4 root "val"
    use cts = new CancellationTokenSource()
    let losses = Collections.Generic.List<int * float>()
    let log e =
        match e with
        | Step(i, l, _, _, _) ->
            losses.Add(i, l)
            if Some i = stopAt then cts.Cancel()
        | _ -> ()
    let r = Trainer.run (config iterations) train valr torch.CPU dir resume ignore log cts.Token
    r, List.ofSeq losses

/// A run of `cfg` in `dir` that records every event.
let private runCfg (cfg: TrainConfig) (dir: string) (resume: bool) (init: VctModel -> unit) =
    let root = data.Value
    let train = Avsbench.records Subset.S4 root "train"
    let valr = Avsbench.records Subset.S4 root "val"
    let events = Collections.Generic.List<TrainEvent>()
    let r = Trainer.run cfg train valr torch.CPU dir resume init events.Add CancellationToken.None
    r, List.ofSeq events

let private warnings (events: TrainEvent list) = events |> List.choose (function Warning(_, m) -> Some m | _ -> None)

let private stepLines (metrics: string) =
    File.ReadAllLines metrics |> Array.filter (fun l -> l.Contains "\"type\":\"step\"")
    |> Array.map (fun l -> use d = Text.Json.JsonDocument.Parse l in d.RootElement.GetProperty("iteration").GetInt32()) |> List.ofArray

[<Tests>]
let tests =
    testList "Trainer" [
        test "a float32 step whose gradient norm is not finite is skipped: no weight update" {
            use p = new Modules.Parameter(torch.ones(3L))
            use opt = torch.optim.AdamW([ p ], 0.1)
            opt.zero_grad ()
            // sqrt at 0: a finite loss (0) whose gradient is infinite.
            use loss = (p - 1.0).sqrt().sum()
            let r = Amp.backwardAndStep None loss opt [ p ] (Some 0.01)
            Expect.isTrue r.Skipped "skipped"
            Expect.equal r.GradNorm (Some infinity) "the norm is reported"
            Expect.equal (p.data<float32>().ToArray()) [| 1.0f; 1.0f; 1.0f |] "weights unchanged"
            opt.zero_grad ()
            use loss2 = (p * p).sum()
            let r2 = Amp.backwardAndStep None loss2 opt [ p ] (Some 0.01)
            Expect.isFalse r2.Skipped "a finite gradient steps"
            Expect.isTrue (p.data<float32>().ToArray() |> Array.forall (fun v -> v < 1.0f)) "weights updated"
            use bad = torch.nn.Linear(2L, 2L)
            Expect.isTrue (Trainer.allFinite bad) "finite weights"
            do
                use _ = torch.no_grad ()
                bad.weight.fill_(TorchSharp.Scalar.op_Implicit nan) |> ignore
            Expect.isFalse (Trainer.allFinite bad) "a NaN weight is found"
        }

        test "non-finite gradients skip steps with a warning and stop the run after 5 in a row, nothing saved" {
            use tmp = new TempDir("vct-run-nan")
            let dir = Path.Combine(tmp.Path, "run")
            // A hook that leaves the forward values as they are but makes every gradient NaN (0 * d sqrt(0)).
            let poison (m: VctModel) =
                let norm =
                    m.named_modules () |> Seq.pick (fun struct (name, md) ->
                        match md with
                        | :? torch.nn.Module<torch.Tensor, torch.Tensor> as l when name.EndsWith "decoder_norm" -> Some l
                        | _ -> None)
                norm.register_forward_hook(fun _ _ o -> o + (o * 0.0).sqrt()) |> ignore
            let r, events = runCfg { config 20 with CheckpointPeriod = 2; EvalPeriod = 2 } dir false poison
            Expect.equal r.Outcome (Diverged(4, "the gradient norm was non-finite in 5 steps in a row (iterations 1..5); the last good checkpoint is kept")) "diverged"
            Expect.equal (warnings events)
                [ for i in 1 .. 4 -> $"iteration {i}: the gradient norm is NaN; step skipped (no weight update), {5 - i} more in a row stop the run" ]
                "one warning per skipped step"
            let metrics = Path.Combine(dir, "metrics.jsonl")
            Expect.equal (stepLines metrics) [ 1 .. 4 ] "the skipped steps are logged"
            Expect.all (File.ReadAllLines metrics |> Array.filter (fun l -> l.Contains "\"step\"")) (fun l -> l.Contains "\"skipped_nonfinite_gradient\":true") "flagged as skipped"
            // The weights never changed, so the periodic checkpoints (at 2 and 4) and the evaluations are of finite weights.
            Expect.isTrue (File.Exists(Path.Combine(dir, "checkpoint_last.safetensors"))) "periodic checkpoint of finite weights"
            Expect.isFalse (File.Exists(Path.Combine(dir, "model_final.safetensors"))) "no final model"
        }

        test "non-finite weights are never saved: the run stops at the next save, the last good checkpoint kept" {
            use tmp = new TempDir("vct-run-nanw")
            let dir = Path.Combine(tmp.Path, "run")
            let root = data.Value
            let train = Avsbench.records Subset.S4 root "train"
            let valr = Avsbench.records Subset.S4 root "val"
            let model = ref None
            // After step 3, a NaN in VGGish: its (cached) audio maps of the training videos stay finite, so the
            // losses do too, but the weights are no longer finite.
            let log e =
                match e, model.Value with
                | Step(3, _, _, _, _), Some(m: VctModel) ->
                    use _ = torch.no_grad ()
                    (Seq.head (m.AudioBackbone.parameters ())).fill_(TorchSharp.Scalar.op_Implicit nan) |> ignore
                | _ -> ()
            let cfg = { config 10 with BatchVideos = 8; EvalPeriod = 4; CheckpointPeriod = 2 }
            let r = Trainer.run cfg train valr torch.CPU dir false (fun m -> model.Value <- Some m) log CancellationToken.None
            Expect.equal r.Outcome (Diverged(4, "the weights are non-finite after iteration 4; nothing was saved, the last good checkpoint is kept")) "stops at the save"
            let last = Path.Combine(dir, "checkpoint_last.safetensors")
            let it =
                use f = Checkpoint.Safetensors.read last
                f.Metadata["iteration"]
            Expect.equal it "2" "checkpoint_last is the good one of iteration 2"
            for f in [ "checkpoint_prev.safetensors"; "model_best.safetensors"; "model_final.safetensors" ] do
                Expect.isFalse (File.Exists(Path.Combine(dir, f))) $"no {f}"
        }

        test "reusing a run folder without resume is refused instead of mixing runs" {
            use tmp = new TempDir("vct-run-reuse")
            let dir = Path.Combine(tmp.Path, "run")
            let r, _ = runCfg (config 2) dir false ignore
            Expect.equal r.Outcome Completed "first run"
            let e = Expect.throwsC (fun () -> runCfg (config 2) dir false ignore |> ignore) id
            Expect.isTrue (e :? InvalidOperationException) "InvalidOperationException"
            Expect.equal e.Message $"{dir}: already holds a run (checkpoint_last.safetensors, metrics.jsonl, model_best.safetensors, model_final.safetensors); pass --resume to continue it, or choose another --name" "message"
            Expect.equal (stepLines (Path.Combine(dir, "metrics.jsonl"))) [ 1; 2 ] "the first run's log untouched"
        }

        test "a torn checkpoint_last falls back to checkpoint_prev; a torn metrics line and later steps are dropped, none duplicated" {
            use tmp = new TempDir("vct-run-torn")
            let dir = Path.Combine(tmp.Path, "run")
            let cfg = { config 4 with CheckpointPeriod = 2 }
            let r, _ = runCfg cfg dir false ignore
            Expect.equal r.Outcome Completed "first run"
            let last = Path.Combine(dir, "checkpoint_last.safetensors")
            let prev = Path.Combine(dir, "checkpoint_prev.safetensors")
            Expect.isTrue (File.Exists prev) "the previous checkpoint is kept"
            let prevIteration =
                use f = Checkpoint.Safetensors.read prev
                f.Metadata["iteration"]
            Expect.equal prevIteration "2" "prev at 2"
            let bytes = File.ReadAllBytes last
            File.WriteAllBytes(last, bytes[.. bytes.Length / 2])
            let metrics = Path.Combine(dir, "metrics.jsonl")
            File.AppendAllText(metrics, "{\"type\":\"step\",\"itera")
            let r2, events = runCfg { cfg with Iterations = 6 } dir true ignore
            Expect.equal r2.Outcome Completed "resumed run completes"
            match warnings events with
            | [ fallback; trimmed ] ->
                Expect.stringContains fallback $"; resuming from the previous checkpoint {prev} (iteration 2)" "falls back to checkpoint_prev"
                Expect.stringStarts fallback last "names the unreadable checkpoint"
                Expect.equal trimmed $"{metrics}: 4 line(s) after iteration 2 (or torn) dropped; those steps run again" "log trimmed"
            | w -> failtestf "expected two warnings, got %A" w
            Expect.equal (stepLines metrics) [ 1 .. 6 ] "every step once"
            let log = Report.readLog metrics
            Expect.equal (log.Steps |> List.map fst) [ 1 .. 6 ] "the report reads it"
            File.AppendAllText(metrics, "{\"type\":\"eval\",\"iteration\":7,\"m_")
            Expect.equal ((Report.readLog metrics).Evals |> List.map (fun (i, _, _) -> i)) [ 6 ] "a torn line is skipped by the report"
        }


        test "a 30-step run interrupted at 15 and resumed gives the losses of the uninterrupted run" {
            use tmp = new TempDir("vct-run-ab")
            let dir = tmp.Path
            let a = Path.Combine(dir, "a")
            let b = Path.Combine(dir, "b")
            let full, lossesFull = runTo a 30 false None
            Expect.equal full.Outcome Completed "completes"
            Expect.equal lossesFull.Length 30 "30 steps"
            let first, lossesFirst = runTo b 30 false (Some 15)
            Expect.equal first.Outcome (Interrupted 15) "stops cleanly at 15"
            Expect.isTrue (File.Exists(Path.Combine(b, "checkpoint_last.safetensors"))) "resumable checkpoint written"
            let second, lossesSecond = runTo b 30 true None
            Expect.equal second.Outcome Completed "resumed run completes"
            Expect.equal (lossesFirst @ lossesSecond |> List.map fst) [ 1 .. 30 ] "steps 1..15 then 16..30"
            for (i, l), (_, l2) in List.zip lossesFull (lossesFirst @ lossesSecond) do
                Expect.floatClose Accuracy.veryHigh l2 l $"loss of step {i}"
            let metrics = File.ReadAllLines(Path.Combine(b, "metrics.jsonl"))
            Expect.equal (metrics |> Array.filter (fun l -> l.Contains "\"step\"") |> Array.length) 30 "one JSONL line per step across both runs"
        }

        test "the loss falls over 40 steps and an evaluation writes the best checkpoint" {
            use tmp = new TempDir("vct-run-c")
            let dir = Path.Combine(tmp.Path, "run")
            let root = data.Value
            let train = Avsbench.records Subset.S4 root "train"
            let valr = Avsbench.records Subset.S4 root "val"
            let losses = Collections.Generic.List<float>()
            let evals = Collections.Generic.List<float>()
            let log e =
                match e with
                | Step(_, l, _, _, _) -> losses.Add l
                | Eval(_, mj, _, _) -> evals.Add mj
                | Warning _ -> ()
            let r = Trainer.run { config 40 with EvalPeriod = 40 } train valr torch.CPU dir false ignore log CancellationToken.None
            Expect.equal r.Outcome Completed "completes"
            let early = Seq.take 5 losses |> Seq.average
            let late = Seq.skip 35 losses |> Seq.average
            Expect.isLessThan late early "loss falls"
            Expect.equal evals.Count 1 "one evaluation at the end"
            Expect.isTrue (evals[0] >= 0.0 && evals[0] <= 1.0) "M_J in [0, 1]"
            Expect.isTrue (File.Exists(Path.Combine(dir, "model_best.safetensors"))) "best checkpoint"
            let m, report = ModelIO.load (Path.Combine(dir, "model_best.safetensors")) torch.CPU
            m.Dispose()
            Expect.isTrue report.IsExact "the best checkpoint loads exactly"
        }

        test "a checkpoint write that fails part-way leaves the last good checkpoint intact" {
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let path = Path.Combine(dir, "checkpoint_last.safetensors")
            Checkpoint.Safetensors.write path (Collections.Generic.Dictionary()) [ "a", torch.ones(1000L) ]
            let good = File.ReadAllBytes path
            let broken = torch.ones(10L)
            broken.Dispose() // reading its data throws mid-write
            Expect.throws (fun () ->
                Checkpoint.Safetensors.write path (Collections.Generic.Dictionary()) [ "a", torch.zeros(1000L); "b", broken ]) "the write fails"
            Expect.equal (File.ReadAllBytes path) good "old checkpoint unchanged"
            Expect.isEmpty (Directory.GetFiles(dir, "*.tmp")) "no temporary file left"
        }

        test "resuming without a checkpoint is a clear error naming the file" {
            use tmp = new TempDir("vct-run-none")
            let dir = Path.Combine(tmp.Path, "run")
            let e = Expect.throwsC (fun () -> runTo dir 5 true None |> ignore) id
            Expect.stringContains e.Message "checkpoint_last.safetensors" "names the file"
        }
    
        test "vct eval writes per-video CSV and a summary with M_J, M_F and the audio-shuffled control" {
            use tmp = new TempDir("vct-eval")
            let dir = tmp.Path
            let ckpt = Path.Combine(dir, "m.safetensors")
            let m = new VctModel(VctConfig.Tiny(Subset.S4, 32L, 23L))
            ModelIO.save ckpt m
            m.Dispose()
            let out = Path.Combine(dir, "eval")
            let code, stdout, err = runVct [ "eval"; "--checkpoint"; ckpt; "--data"; data.Value; "--split"; "val"; "--out"; out; "--audio-shuffled" ]
            Expect.equal code 0 $"vct eval failed: {stdout}\n{err}"
            use doc = Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
            for k in [ "m_j"; "m_f"; "m_j_audio_shuffled"; "m_f_audio_shuffled" ] do
                let v = doc.RootElement.GetProperty(k).GetDouble()
                Expect.isTrue (v >= 0.0 && v <= 1.0) $"{k} in [0, 1]"
            let rows = File.ReadAllLines(Path.Combine(out, "per_video.csv"))
            Expect.equal rows.Length 3 "header + 2 validation videos"
        }
    
        test "vct train --preset s4 runs the released configuration end to end on a tree in the official layout" {
            // Released S4 (Swin-B 384, pre-SAM on) for 2 iterations of 1 video on a 4-video synthetic tree at 384
            // (no mask images in it: first refused, then run with the documented blank-mask fallback).
            use tmp = new TempDir("vct-s4-e2e")
            let dir = Path.Combine(tmp.Path, "run")
            let root = Path.Combine(dir, "data")
            Synth.generate { SynthOptions.Default Subset.S4 with Train = 2; Val = 1; Test = 1; Size = 384 } root |> ignore
            let common = [ "train"; "--preset"; "s4"; "--data"; root; "--runs"; Path.Combine(dir, "runs"); "--iterations"; "2"
                           "--batch"; "1"; "--eval-period"; "2"; "--device"; "cpu" ]
            let code0, out0, err0 = runVct (common @ [ "--name"; "refused" ])
            Expect.notEqual code0 0 "refuses without mask images"
            Expect.stringContains (out0 + err0) "Maskige" "says what is missing and how to choose a fallback"
            let code, out, err = runVct (common @ [ "--name"; "e2e"; "--missing-masks"; "blank" ])
            Expect.equal code 0 $"vct train failed: {out}\n{err}"
            let run = Path.Combine(dir, "runs", "e2e")
            use doc = Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(run, "summary.json")))
            Expect.equal (doc.RootElement.GetProperty("iterations").GetInt32()) 2 "2 iterations"
            for k in [ "m_j"; "m_f"; "m_j_audio_shuffled"; "m_f_audio_shuffled"; "wall_seconds" ] do
                Expect.isTrue (doc.RootElement.TryGetProperty(k) |> fst) $"summary has {k}"
            Expect.equal (ModelIO.readConfig (Path.Combine(run, "model_best.safetensors"))) (VctConfig.Released Subset.S4) "released S4 config"
            for f in [ "checkpoint_last.safetensors"; "metrics.jsonl"; "loss.html"; "metrics.png"; "overlays.png" ] do
                Expect.isTrue (File.Exists(Path.Combine(run, f))) $"writes {f}"
        }
    ]
