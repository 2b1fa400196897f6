// Shared set-up of the notebooks (`#load "common.fsx"` as the first cell): references the Release build of the
// solution (`dotnet fsi build.fsx build`), an offline chart helper, the built-in synthetic data and the tiny model
// that the notebooks train once and cache under artifacts/notebooks/. No model code lives here or in the notebooks:
// everything they run is the library's.
#r "../src/Vct.Cli/bin/Release/net10.0/TorchSharp.dll"
#r "../src/Vct.Cli/bin/Release/net10.0/Vct.Core.dll"
#r "../src/Vct.Cli/bin/Release/net10.0/Vct.CSharp.dll"
#r "../src/Vct.Cli/bin/Release/net10.0/DynamicObj.dll"
#r "../src/Vct.Cli/bin/Release/net10.0/Giraffe.ViewEngine.dll"
#r "../src/Vct.Cli/bin/Release/net10.0/Plotly.NET.dll"

open System
open System.IO
open Plotly.NET
open TorchSharp

Vct.Core.Platform.Runtime.init () |> ignore
torch.set_num_threads (min Environment.ProcessorCount 2)

/// The repository root and where the notebooks keep what they make (data, the trained model, chart copies).
let repoRoot = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, ".."))
let artifacts = Path.Combine(repoRoot, "artifacts", "notebooks")

let private plotlyJs =
    lazy
        (let asm = typeof<GenericChart>.Assembly
         let name = asm.GetManifestResourceNames() |> Array.find (fun n -> n.StartsWith "Plotly.NET.plotly-" && n.EndsWith ".min.js")
         use reader = new StreamReader(asm.GetManifestResourceStream name)
         reader.ReadToEnd())

/// A chart as HTML with plotly.js inlined (renders offline; `define` is hidden while plotly.js loads so that it sets
/// `window.Plotly` also where require.js is present).
let chartHtml (chart: GenericChart) =
    String.concat "\n" [
        "<script type=\"text/javascript\">"
        "if (typeof Plotly === 'undefined') { var __vctDefine = window.define; window.define = undefined;"
        plotlyJs.Force()
        "window.define = __vctDefine; }"
        "</script>"
        GenericChart.toChartHTML chart ]

let mutable private chartCount = Map.empty<string, int>

/// Shows a chart in the notebook and keeps a standalone copy as artifacts/notebooks/charts/<notebook>-<n>.html
/// (README's pictures are rendered from these).
let show (notebook: string) (chart: GenericChart) =
    let n = (chartCount.TryFind notebook |> Option.defaultValue 0) + 1
    chartCount <- chartCount.Add(notebook, n)
    let html = chartHtml chart
    let dir = Path.Combine(artifacts, "charts")
    Directory.CreateDirectory dir |> ignore
    File.WriteAllText(Path.Combine(dir, $"{notebook}-{n}.html"), "<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body style=\"margin:0;background:white\">" + html + "</body></html>")
    Microsoft.DotNet.Interactive.Kernel.display (Microsoft.DotNet.Interactive.Kernel.HTML html) |> ignore

/// An RGB frame as a Plotly image trace (`Chart.Image` takes rows of [r; g; b]).
let imageOf (img: Vct.Core.Data.Image) =
    [ for y in 0 .. img.Height - 1 ->
        [ for x in 0 .. img.Width - 1 ->
            let i = (y * img.Width + x) * img.Channels
            if img.Channels = 1 then [ int img.Pixels[i]; int img.Pixels[i]; int img.Pixels[i] ]
            else [ int img.Pixels[i]; int img.Pixels[i + 1]; int img.Pixels[i + 2] ] ] ]

/// The rows of a 2-D tensor as float arrays (for heatmaps; row 0 at the top with `ReverseYAxis`).
let rowsOf (t: torch.Tensor) : float[][] =
    let t = t.``to``(torch.float64).cpu().contiguous()
    let h, w = int t.shape[0], int t.shape[1]
    let data = t.data<float>().ToArray()
    [| for y in 0 .. h - 1 -> data[y * w .. y * w + w - 1] |]

/// The built-in synthetic S4-like dataset (the main job's), written once under artifacts/notebooks/data.
let syntheticData () =
    let dir = Path.Combine(artifacts, "data")
    if not (File.Exists(Path.Combine(dir, "Single-source", "s4_meta_data.csv"))) then
        printfn "%s" (Vct.Core.Training.TrainJob.ensureSynthetic dir)
    dir

/// A heatmap with row 0 at the top (Plotly draws row 0 at the bottom).
let heat (rows: float[][]) = Chart.Heatmap(Array.rev rows, ShowScale = false)

/// The rows of a boolean or integer 2-D tensor as 0/1 or integer values.
let rowsOfAny (t: torch.Tensor) = rowsOf (t.``to``(torch.float64))

/// Iterations of the notebooks' tiny model (a few minutes on 2 cores).
let tinyIterations = 300

/// The tiny model the notebooks look at: trained with the C# facade (`VctTrainer`) on the synthetic data the first
/// time, then taken from artifacts/notebooks/tiny/. Returns the run folder; `model_best.safetensors` is the model.
let tinyRun () =
    let run = Path.Combine(artifacts, "tiny")
    if not (File.Exists(Path.Combine(run, "model_best.safetensors")) && File.Exists(Path.Combine(run, "summary.json"))) then
        if Directory.Exists run then Directory.Delete(run, true)
        let data = syntheticData ()
        printfn "training the tiny preset for %d iterations (cached for the other notebooks)..." tinyIterations
        let options =
            Vct.TrainOptions(Preset = Vct.TrainPreset.Tiny, Data = data, RunsFolder = artifacts, Name = "tiny", Iterations = tinyIterations,
                             EvalPeriod = 100, Workers = 2, Device = "cpu")
        let progress = Vct.SyncProgress<Vct.TrainProgress>(fun p ->
            if p.Kind = Vct.TrainProgressKind.Evaluation then printfn "  eval at %d: M_J %.3f M_F %.3f" p.Iteration p.MJ p.MF)
        let r = Vct.VctTrainer.Train(options, progress, Threading.CancellationToken.None, (fun _ -> ()))
        if r.Outcome <> Vct.TrainOutcome.Completed then failwithf "training ended %A: %s" r.Outcome r.Diagnostic
    run
