namespace Vct.Core.Evaluation

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data
open Vct.Core.Checkpoint

/// Scoring saved predictions (`vct score`): one `.npy` pair holding all videos, or a folder of per-video pairs.
[<RequireQualifiedAccess>]
module Score =
    /// Videos of a score/label `.npy` pair: scores [V, T, C, H, W] float32 and labels [V, T, H, W] uint8 (video i
    /// is named by its index), or two folders with `<id>_scores.npy` [T, C, H, W] and `<id>_gt.npy` [T, H, W]
    /// (ids in ordinal order). Returns (id, load) pairs; `load` reads that video only.
    let videos (scoresPath: string) (gtPath: string) : (string * (unit -> Tensor * Tensor))[] =
        if Directory.Exists scoresPath then
            if not (Directory.Exists gtPath) then
                raise (ArgumentException($"{gtPath}: --scores is a folder, so --gt must be a folder of <id>_gt.npy files"))
            let ids =
                Directory.GetFiles(scoresPath, "*_scores.npy")
                |> Array.map (fun f -> let n = Path.GetFileName f in n.Substring(0, n.Length - "_scores.npy".Length))
                |> Array.sortWith (fun a b -> String.CompareOrdinal(a, b))
            if ids.Length = 0 then raise (InvalidDataException($"{scoresPath}: no <id>_scores.npy files"))
            ids
            |> Array.map (fun id ->
                let sp = Path.Combine(scoresPath, id + "_scores.npy")
                let gp = Path.Combine(gtPath, id + "_gt.npy")
                if not (File.Exists gp) then raise (FileNotFoundException($"{gp}: missing ground truth for video '{id}'", gp))
                id,
                fun () ->
                    let sh = NpyFile.readHeader sp
                    let gh = NpyFile.readHeader gp
                    if sh.Shape.Length <> 4 then raise (InvalidDataException($"{sp}: scores must be [T,C,H,W], got ({String.Join(',', sh.Shape)})"))
                    if gh.Shape.Length <> 3 then raise (InvalidDataException($"{gp}: labels must be [T,H,W], got ({String.Join(',', gh.Shape)})"))
                    let s = NpyFile.readFloat32 sh 0L sh.Count
                    let g = NpyFile.readLabels gh 0L gh.Count
                    torch.tensor(s, ReadOnlySpan<int64>(sh.Shape)), torch.tensor(g, ReadOnlySpan<int64>(gh.Shape)))
        else
            let sh = NpyFile.readHeader scoresPath
            let gh = NpyFile.readHeader gtPath
            if sh.Shape.Length <> 5 then
                raise (InvalidDataException($"{scoresPath}: scores must be [V,T,C,H,W] float32, got ({String.Join(',', sh.Shape)})"))
            if gh.Shape.Length <> 4 then
                raise (InvalidDataException($"{gtPath}: labels must be [V,T,H,W] uint8, got ({String.Join(',', gh.Shape)})"))
            if sh.Shape[0] = 0L then
                raise (InvalidDataException($"{scoresPath}: holds no videos (scores shape ({String.Join(',', sh.Shape)})); nothing to score"))
            if sh.Shape[0] <> gh.Shape[0] then
                raise (InvalidDataException($"{gtPath}: {gh.Shape[0]} videos of labels for {sh.Shape[0]} videos of scores in {scoresPath}"))
            let per = sh.Count / sh.Shape[0]
            let perG = gh.Count / gh.Shape[0]
            [| for v in 0L .. sh.Shape[0] - 1L ->
                   string v,
                   fun () ->
                       let s = NpyFile.readFloat32 sh (v * per) per
                       let g = NpyFile.readLabels gh (v * perG) perG
                       torch.tensor(s, ReadOnlySpan<int64>(sh.Shape[1..])), torch.tensor(g, ReadOnlySpan<int64>(gh.Shape[1..])) |]

    /// Scores every video with the official metrics. `progress` is called after each video with (done, total).
    let run (subset: Subset) (variant: MetricVariant) (numClasses: int) (scoresPath: string) (gtPath: string)
            (progress: int -> int -> unit) : MetricSummary =
        if subset = Subset.AVSS && (numClasses < 2 || numClasses > 1000) then
            raise (ArgumentException $"--classes must be in 2..1000, got {numClasses}")
        let ev = Metrics.evaluator subset variant numClasses
        let vs = videos scoresPath gtPath
        vs
        |> Array.iteri (fun i (id, load) ->
            use _ = torch.NewDisposeScope()
            let s, g = load ()
            // NaN has no place in a ranking: refuse instead of scoring it as some class (or writing NaN metrics).
            use nans = s.isnan().sum()
            let n = nans.item<int64> ()
            if n > 0L then
                raise (InvalidDataException($"{scoresPath}: the scores of video '{id}' hold {n} NaN value(s); the predictions are broken (non-finite weights or a failed export)"))
            try ev.Add(id, s, g) |> ignore
            with :? ArgumentException as e -> raise (InvalidDataException($"{scoresPath}: {e.Message}"))
            progress (i + 1) vs.Length)
        ev.Summary()

    /// The summary as JSON: subset, variant, m_j, m_f (unrounded fractions), the values rounded to 4 decimals as
    /// the official evaluators log them, per-video values and (AVSS) per-class values.
    let toJson (s: MetricSummary) : string =
        use ms = new MemoryStream()
        (
            use w = new Utf8JsonWriter(ms, JsonWriterOptions(Indented = true))
            let num (name: string) (v: float) = if Double.IsFinite v then w.WriteNumber(name, v) else w.WriteNull(name)
            w.WriteStartObject()
            w.WriteString("subset", s.Subset.Name)
            w.WriteString("variant", (match s.Variant with MetricVariant.Vct -> "vct" | MetricVariant.AvsBench -> "avsbench"))
            num "m_j" s.MJ
            num "m_f" s.MF
            num "m_j_rounded" (Math.Round(s.MJ, 4, MidpointRounding.ToEven))
            num "m_f_rounded" (Math.Round(s.MF, 4, MidpointRounding.ToEven))
            w.WriteNumber("videos_count", s.Videos.Length)
            w.WriteStartArray("videos")
            for v in s.Videos do
                w.WriteStartObject()
                w.WriteString("id", v.Id)
                w.WriteNumber("frames", v.Frames)
                num "j" v.J
                num "f" v.F
                w.WriteEndObject()
            w.WriteEndArray()
            if s.ClassJ.Length > 0 then
                w.WriteStartArray("class_j")
                for v in s.ClassJ do w.WriteNumberValue v
                w.WriteEndArray()
                w.WriteStartArray("class_f")
                for v in s.ClassF do w.WriteNumberValue v
                w.WriteEndArray()
                w.WriteStartArray("class_frames")
                for v in s.ClassFrames do w.WriteNumberValue v
                w.WriteEndArray()
            w.WriteEndObject()
        )
        Encoding.UTF8.GetString(ms.ToArray())
