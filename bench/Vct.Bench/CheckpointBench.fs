/// Checkpoint I/O: reading a released-size VCT checkpoint (the official S4 state-dict layout,
/// 1078 tensors, 291 M values, 1.16 GB) with our reader against torch.load in the same run.
module Vct.Bench.CheckpointBench

open System
open System.IO
open Vct.Core.Checkpoint
open Vct.Bench.Harness

let run (repeats: int) =
    let dir = Path.Combine(Path.GetTempPath(), $"vct-bench-ckpt-{Environment.ProcessId}")
    Directory.CreateDirectory dir |> ignore
    try
        let manifest = Path.Combine(repoRoot, "tests", "golden", "manifest_s4.tsv")
        let pth = Path.Combine(dir, "model_best.pth")
        printfn "checkpoint: writing a random checkpoint with the official S4 layout (python)..."
        python "checkpoint_io.py" [ "make"; manifest; pth ] |> ignore
        let sizeGB = float (FileInfo(pth).Length) / 1e9

        printfn "checkpoint: torch.load x%d (python)..." repeats
        let py = pythonJson "checkpoint_io.py" [ "time"; pth; string repeats ]
        let pyTimes = [ for e in py.GetProperty("load_s").EnumerateArray() -> e.GetDouble() ]
        let pyNumel = py.GetProperty("numel").GetInt64()
        let torchVersion = py.GetProperty("torch").GetString()

        printfn "checkpoint: StateDict.load x%d (ours)..." repeats
        let rss0 = rssMiB ()
        let mutable numel = 0L
        let mutable peak = 0.0
        let after = ResizeArray<float>()
        let ours =
            time 0 repeats (fun () ->
                (use ck = StateDict.load pth
                 numel <- ck.StateDict.Values |> Seq.sumBy (fun t -> t.numel ())
                 peak <- max peak (rssMiB ()))
                after.Add(rssMiB ()))
        if numel <> pyNumel then failwithf "value count differs: ours %d, torch %d" numel pyNumel

        // Round trip through our own format.
        let st = Path.Combine(dir, "model.safetensors")
        let writeTimes =
            use ck = StateDict.load pth
            let items = [ for kv in ck.StateDict -> kv.Key, kv.Value ]
            time 0 1 (fun () -> Safetensors.write st (Collections.Generic.Dictionary()) items)
        let stTimes =
            time 0 repeats (fun () ->
                use f = Safetensors.read st
                f.Tensors.Count |> ignore)
        let rss1 = rssMiB ()

        let m = median ours
        let mp = median pyTimes
        let md =
            $"""## Checkpoint I/O (foundation)

Measured {DateTime.UtcNow.ToString("yyyy-MM-dd")} on {machine ()}; baseline: torch {torchVersion} (Debian `python3-torch`) in the same run.
File: random weights in the official S4 `model_best.pth` layout (detectron2 `{{"model": state_dict}}`, {numel:N0} values, {sizeGB:F2} GB).
Median of {repeats} runs, cold process page cache not controlled (the file was just written, so it is cached for both).

| operation | ours (s) | official stack (s) | ours / official |
| --- | ---: | ---: | ---: |
| read `.pth` (zip) -> CPU tensors: `StateDict.load` vs `torch.load(map_location="cpu")` | {m:F2} | {mp:F2} | {m / mp:F2} |
| write safetensors (`Safetensors.write`) | {median writeTimes:F2} | - | - |
| read safetensors (`Safetensors.read`) | {median stTimes:F2} | - | - |

Resident memory of the .NET process: {rss0:F0} MiB before, {peak:F0} MiB peak while a checkpoint was held; after each disposed load: {String.Join(", ", after |> Seq.map (fun r -> r.ToString("F0")))} MiB; {rss1:F0} MiB at the end. (Freed LibTorch memory stays in the allocator's heap for reuse, so the resident size after the first load is a plateau, not a leak: it does not grow with repeats.)
"""
        writeSection "checkpoint" md
        printfn "%s" md
    finally
        try Directory.Delete(dir, true) with _ -> ()
