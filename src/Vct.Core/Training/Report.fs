namespace Vct.Core.Training

open System
open System.IO
open System.Text.Json
open Plotly.NET
open SkiaSharp
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// A metrics log read back: training steps and evaluations.
type MetricsLog =
    { Steps: (int * float) list
      Evals: (int * float * float) list }

/// Run reports: the metrics log, Plotly.NET charts (HTML with plotly.js inlined, works offline), PNG charts and
/// prediction overlays drawn with SkiaSharp (no browser needed).
[<RequireQualifiedAccess>]
module Report =
    /// Reads metrics.jsonl.
    let readLog (path: string) : MetricsLog =
        let steps = ResizeArray()
        let evals = ResizeArray()
        for line in File.ReadLines path do
            if line.Trim() <> "" then
                // A line torn by a crash (or not ours) is skipped: the charts show what was logged whole.
                try
                    use doc = JsonDocument.Parse line
                    let r = doc.RootElement
                    match r.GetProperty("type").GetString() with
                    | "step" -> steps.Add(r.GetProperty("iteration").GetInt32(), r.GetProperty("loss").GetDouble())
                    | "eval" -> evals.Add(r.GetProperty("iteration").GetInt32(), r.GetProperty("m_j").GetDouble(), r.GetProperty("m_f").GetDouble())
                    | _ -> ()
                with :? JsonException | :? InvalidOperationException | :? Collections.Generic.KeyNotFoundException | :? FormatException -> ()
        { Steps = List.ofSeq steps; Evals = List.ofSeq evals }

    /// Moving average over `window` points (for a readable loss curve).
    let smooth (window: int) (xs: float list) =
        let a = Array.ofList xs
        [ for i in 0 .. a.Length - 1 ->
              let lo = max 0 (i - window + 1)
              Array.average a[lo .. i] ]

    /// Writes loss.html and metrics.html (Plotly.NET, plotly.js inlined).
    let writeHtml (dir: string) (log: MetricsLog) =
        let its = log.Steps |> List.map (fst >> float)
        let losses = log.Steps |> List.map snd
        let lossChart =
            [ Chart.Line(its, losses, Name = "loss") |> Chart.withTraceInfo (Name = "loss")
              Chart.Line(its, smooth 25 losses, Name = "moving average (25)") ]
            |> Chart.combine
            |> Chart.withXAxisStyle "iteration"
            |> Chart.withYAxisStyle "total weighted loss"
            |> Chart.withTitle "Training loss"
        let evIts = log.Evals |> List.map (fun (i, _, _) -> float i)
        let metricChart =
            [ Chart.Line(evIts, log.Evals |> List.map (fun (_, j, _) -> j), Name = "M_J (mIoU)", ShowMarkers = true)
              Chart.Line(evIts, log.Evals |> List.map (fun (_, _, f) -> f), Name = "M_F", ShowMarkers = true) ]
            |> Chart.combine
            |> Chart.withXAxisStyle "iteration"
            |> Chart.withYAxisStyle "validation score"
            |> Chart.withTitle "Validation M_J and M_F"
        let save (chart: GenericChart) (name: string) =
            // plotly.js inlined (read from Plotly.NET's resources): the page works offline.
            let html =
                chart
                |> Chart.withDisplayOptions (DisplayOptions.init (PlotlyJSReference = PlotlyJSReference.Full))
                |> GenericChart.toEmbeddedHTML
            AtomicFile.writeAllText (Path.Combine(dir, name)) html
        save lossChart "loss.html"
        save metricChart "metrics.html"

    /// A line chart PNG of one or more series (x, y) with axis labels.
    let linePng (path: string) (title: string) (series: (string * SKColor * (float * float) list) list) =
        let w, h, m = 800, 450, 60
        use surface = SKSurface.Create(SKImageInfo(w, h))
        let c = surface.Canvas
        c.Clear SKColors.White
        let all = series |> List.collect (fun (_, _, p) -> p)
        if not all.IsEmpty then
            let xs, ys = List.map fst all, List.map snd all
            let x0, x1 = List.min xs, max (List.max xs) (List.min xs + 1e-9)
            let y0, y1 = min 0.0 (List.min ys), max (List.max ys) (min 0.0 (List.min ys) + 1e-9)
            let px x = float32 (float m + (x - x0) / (x1 - x0) * float (w - 2 * m))
            let py y = float32 (float (h - m) - (y - y0) / (y1 - y0) * float (h - 2 * m))
            use axis = new SKPaint(Color = SKColors.Black, StrokeWidth = 1.0f, IsAntialias = true)
            use font = new SKFont(SKTypeface.Default, 14.0f)
            c.DrawLine(float32 m, float32 (h - m), float32 (w - m), float32 (h - m), axis)
            c.DrawLine(float32 m, float32 m, float32 m, float32 (h - m), axis)
            c.DrawText(title, float32 m, 30.0f, font, axis)
            c.DrawText($"{y1:g3}", 4.0f, float32 m + 5.0f, font, axis)
            c.DrawText($"{y0:g3}", 4.0f, float32 (h - m), font, axis)
            c.DrawText($"{x0:g4}", float32 m, float32 (h - m + 20), font, axis)
            c.DrawText($"{x1:g4}", float32 (w - m - 40), float32 (h - m + 20), font, axis)
            series |> List.iteri (fun k (name, colour, pts) ->
                use paint = new SKPaint(Color = colour, StrokeWidth = 2.0f, IsAntialias = true, Style = SKPaintStyle.Stroke)
                for (a, b) in List.pairwise pts do
                    c.DrawLine(px (fst a), py (snd a), px (fst b), py (snd b), paint)
                use label = new SKPaint(Color = colour, IsAntialias = true)
                c.DrawText(name, float32 (w - m - 220), float32 (m + 20 * (k + 1)), font, label))
        use img = surface.Snapshot()
        use data = img.Encode(SKEncodedImageFormat.Png, 100)
        AtomicFile.writeAllBytes path (data.ToArray())

    /// loss.png and metrics.png.
    let writePngs (dir: string) (log: MetricsLog) =
        let its = log.Steps |> List.map (fst >> float)
        linePng (Path.Combine(dir, "loss.png")) "Training loss (moving average 25)"
            [ "loss", SKColors.SteelBlue, List.zip its (smooth 25 (log.Steps |> List.map snd)) ]
        linePng (Path.Combine(dir, "metrics.png")) "Validation M_J and M_F"
            [ "M_J", SKColors.Crimson, [ for (i, j, _) in log.Evals -> float i, j ]
              "M_F", SKColors.SeaGreen, [ for (i, _, f) in log.Evals -> float i, f ] ]

    /// Overlays of predictions on frames: each row is a frame; left the frame with the predicted mask in red,
    /// right the frame with the ground truth in green. frames [T, 3, H, W] 0..255; masks bool [T, H, W] (any size).
    let overlayPng (path: string) (rows: (Tensor * Tensor * Tensor) list) =
        let cell = 160
        let n = rows |> List.sumBy (fun (f, _, _) -> int f.shape[0])
        use surface = SKSurface.Create(SKImageInfo(2 * cell, max 1 n * cell))
        let c = surface.Canvas
        c.Clear SKColors.White
        let mutable row = 0
        for (frames, pred, gt) in rows do
            use scope = torch.NewDisposeScope()
            let resize (t: Tensor) =
                torch.nn.functional.interpolate(t.to_type(torch.float32).unsqueeze(1L), [| int64 cell; int64 cell |], mode = torch.InterpolationMode.Nearest).squeeze(1L)
            let img = torch.nn.functional.interpolate(frames.to_type(torch.float32), [| int64 cell; int64 cell |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
            let p, g = resize pred, resize gt
            for t in 0L .. frames.shape[0] - 1L do
                let rgb = img[t].permute(1L, 2L, 0L).clamp(0.0.AsScalar, 255.0.AsScalar).contiguous().data<float32>().ToArray()
                let pm = p[t].contiguous().data<float32>().ToArray()
                let gm = g[t].contiguous().data<float32>().ToArray()
                for (col, mask, tint) in [ 0, pm, (255.0f, 0.0f, 0.0f); 1, gm, (0.0f, 200.0f, 0.0f) ] do
                    use bmp = new SKBitmap(cell, cell, SKColorType.Rgba8888, SKAlphaType.Unpremul)
                    for y in 0 .. cell - 1 do
                        for x in 0 .. cell - 1 do
                            let i = y * cell + x
                            let a = if mask[i] > 0.5f then 0.5f else 0.0f
                            let (tr, tg, tb) = tint
                            let mix v tv = byte (min 255.0f ((1.0f - a) * v + a * tv))
                            bmp.SetPixel(x, y, SKColor(mix rgb[3 * i] tr, mix rgb[3 * i + 1] tg, mix rgb[3 * i + 2] tb))
                    c.DrawBitmap(bmp, float32 (col * cell), float32 (row * cell))
                row <- row + 1
        use imgOut = surface.Snapshot()
        use data = imgOut.Encode(SKEncodedImageFormat.Png, 100)
        AtomicFile.writeAllBytes path (data.ToArray())
