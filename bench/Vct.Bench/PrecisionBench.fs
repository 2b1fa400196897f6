/// Accuracy of reduced-precision inference: the main job's checkpoint evaluated on the synthetic validation split in
/// float32 and in bf16 (`vct eval --precision bf16`), M_J / M_F and the time of each evaluation. The official code has
/// no reduced-precision path and cannot run the tiny preset, so this section has no official column: its speed
/// comparison is the model section's bf16 rows.
module Vct.Bench.PrecisionBench

open System
open System.Diagnostics
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Training
open Vct.Bench.Harness

let run (_: int) =
    torch.set_num_threads 2
    let checkpoint =
        match Environment.GetEnvironmentVariable "VCT_BENCH_CHECKPOINT" with
        | null | "" -> Path.Combine(repoRoot, "runs", "main", "model_best.safetensors")
        | p -> p
    let data = Path.Combine(repoRoot, "data", "synth-s4")
    if not (File.Exists checkpoint) || not (Directory.Exists data) then
        failwithf "precision: needs the main job's checkpoint %s and its data %s (run `dotnet fsi build.fsx train` first)" checkpoint data
    let model, _ = Inference.loadModel checkpoint None torch.CPU
    use model = model
    let records = Avsbench.records model.Config.Subset data "val"
    use audio = new TrainData.AudioCache(model)
    let cases =
        [ for p in [ Precision.Float32; Precision.BFloat16 ] do
              match Precision.unsupportedReason torch.CPU p with
              | Some why -> printfn "precision: %s skipped: %s" p.Name why
              | None ->
                  printfn "precision: evaluating in %s" p.Name
                  Validation.evaluateIn p model audio records false 2 |> ignore   // warm-up (and the audio cache)
                  let sw = Stopwatch.StartNew()
                  let s = Validation.evaluateIn p model audio records false 2
                  yield p, s.MJ, s.MF, sw.Elapsed.TotalSeconds ]
    let _, mj32, mf32, _ = cases |> List.find (fun (p, _, _, _) -> p = Precision.Float32)
    let rows =
        [ for p, mj, mf, secs in cases ->
              $"| {p.Name} | {mj:F6} | {mf:F6} | {abs (mj - mj32):F6} | {abs (mf - mf32):F6} | {secs:F2} |" ]
    let today = DateTime.UtcNow.ToString("yyyy-MM-dd")
    let md =
        String.concat "\n"
            [ "## Reduced-precision accuracy (speed issue)"
              ""
              $"Measured {today} on {machine ()}; 2 LibTorch threads; {heapNote ()}."
              "The main job's best checkpoint (`runs/main/model_best.safetensors`, tiny preset) on the synthetic validation"
              $"split ({records.Length} videos, `Validation.evaluateIn`, as `vct eval --precision`), scored by the official VCT"
              "metrics. bf16: LibTorch CPU autocast (products in bfloat16, float32 outputs). Target: |ΔM_J| ≤ 0.005."
              ""
              "| precision | M_J | M_F | abs ΔM_J vs fp32 | abs ΔM_F vs fp32 | evaluation (s) |"
              "| --- | ---: | ---: | ---: | ---: | ---: |"
              yield! rows ]
    writeSection "precision" md
    printfn "%s" md
