namespace Vct.Core.Data

open Vct.Core
open Vct.Core.Platform
open System
open System.IO

/// What `Prepare.objectTree` wrote.
type PrepareReport =
    { Videos: int
      Files: int
      /// Videos without Semantic-SAM mask images (the pre_SAM_mask_384 part was skipped for them).
      WithoutMasks: string list }

/// The VCT S4 / MS3 trees (`s4_data_384`, `ms3_data_384`) built from AVSBench-semantic as the official tools
/// `avs_tools/generate_data_384/{s4,ms3}_process.py` build them (docs/architecture.md §13.2): frames resized to 384 with
/// Pillow's BILINEAR, Semantic-SAM mask images with NEAREST, and the ground truth re-derived from the semantic
/// `labels_rgb` (Pillow's RGB -> L conversion, every non-zero grey -> 255, NEAREST to 224 and to 384) — the GT the
/// VCT evaluators score against, which differs from AVSBench-object's own `gt_masks`.
/// Departures: `ms3_process.py` stops at a leftover `breakpoint()` on every video (not reproduced); a video whose
/// Semantic-SAM images are missing gets no pre_SAM_mask_384 files (the official tool fails) and is reported.
[<RequireQualifiedAccess>]
module Prepare =
    /// Pillow's RGB -> L conversion of one pixel (ITU-R 601-2 luma in 16-bit fixed point, rounded).
    let pilGrey (r: byte) (g: byte) (b: byte) : byte =
        byte ((int r * 19595 + int g * 38470 + int b * 7471 + 0x8000) >>> 16)

    /// The binary (0/255) mask of a `labels_rgb` image at size x size: grey, non-zero -> 255, NEAREST.
    let binaryGt (size: int) (labelsRgb: Image) : Image =
        if labelsRgb.Channels <> 3 then invalidArg (nameof labelsRgb) $"an RGB label image expected, got {labelsRgb.Channels} channels"
        let n = labelsRgb.Width * labelsRgb.Height
        let px = labelsRgb.Pixels
        let grey = Array.init n (fun i -> if pilGrey px[3 * i] px[3 * i + 1] px[3 * i + 2] <> 0uy then 255uy else 0uy)
        Resize.nearest size size { Width = labelsRgb.Width; Height = labelsRgb.Height; Channels = 1; Pixels = grey }

    /// Writes the 384 tree of `kind` (S4 or MS3) under `objectRoot` (`Single-source/s4_data_384` or
    /// `Multi-sources/ms3_data_384` below it) from the AVSBench-semantic root (`metadata.csv`, `v1s/`, `v1m/`,
    /// optional `pre_SAM_mask/AVSBench_semantic/`). The S4 category of each video comes from
    /// `Single-source/s4_meta_data.csv` (by the `name` column). `log` receives one line per video.
    let objectTree (kind: Subset) (semanticRoot: string) (objectRoot: string) (log: string -> unit) : PrepareReport =
        let label, sub, d384 =
            match kind with
            | Subset.S4 -> "v1s", "Single-source", "s4_data_384"
            | Subset.MS3 -> "v1m", "Multi-sources", "ms3_data_384"
            | Subset.AVSS -> invalidArg (nameof kind) "AVSS needs no 384 tree: its loaders read AVSBench-semantic directly"
        let metaPath = Path.Combine(semanticRoot, "metadata.csv")
        let header, rows = Avsbench.readCsv metaPath
        for c in [ "vid"; "uid"; "label"; "split" ] do Avsbench.column metaPath header [ c ] |> ignore
        let category =
            if kind = Subset.S4 then
                let s4Csv = Path.Combine(objectRoot, sub, "s4_meta_data.csv")
                let h, r = Avsbench.readCsv s4Csv
                for c in [ "name"; "category" ] do Avsbench.column s4Csv h [ c ] |> ignore
                let m =
                    r |> Array.map (fun (row, line) -> row["name"], SafePath.name s4Csv line "category" row["category"]) |> dict
                fun (vid: string) ->
                    match m.TryGetValue vid with
                    | true, c -> c
                    | _ -> raise (InvalidDataException($"{s4Csv}: no entry with name '{vid}' (needed for its category)"))
            else fun _ -> ""
        let root = Path.Combine(objectRoot, sub, d384)
        let mutable files = 0
        let missingMasks = Collections.Generic.List<string>()
        let videos = rows |> Array.filter (fun (r, _) -> r["label"] = label)
        // Names from the CSVs become single path components, and every write stays inside `root` (no symbolic
        // link on the way may lead out of it).
        let write (path: string) (img: Image) = ImageIO.write (SafePath.checkWrite root path) img
        for row, line in videos do
            let vid = SafePath.name metaPath line "vid" row["vid"]
            let uid = SafePath.name metaPath line "uid" row["uid"]
            let split = SafePath.name metaPath line "split" row["split"]
            // S4 trees nest <split>/<category>/<vid> everywhere; MS3 frames and masks are flat (<vid>), its GT is
            // <split>/<vid>.
            let media = if kind = Subset.S4 then Path.Combine(split, category vid, vid) else vid
            let gtDir = if kind = Subset.S4 then media else Path.Combine(split, vid)
            let src = Path.Combine(semanticRoot, label, uid)
            for i in 0 .. 4 do
                let img = ImageIO.readRgb (Path.Combine(src, "frames", $"{i}.jpg"))
                write (Path.Combine(root, "visual_frames_384", media, $"{vid}_{i + 1}.png")) (Resize.bilinear 384 384 img)
                files <- files + 1
            let maskDir = Path.Combine(semanticRoot, "pre_SAM_mask", "AVSBench_semantic", label, uid, "frames")
            if Directory.Exists maskDir then
                for i in 0 .. 4 do
                    let m = ImageIO.readRgb (Path.Combine(maskDir, $"{i}_mask_color.png"))
                    write (Path.Combine(root, "pre_SAM_mask_384", media, $"{vid}_{i + 1}_mask_color.png")) (Resize.nearest 384 384 m)
                    files <- files + 1
            else missingMasks.Add vid
            // S4 training videos are annotated on their first frame only.
            let gtFrames = if kind = Subset.S4 && split = "train" then 1 else 5
            for i in 0 .. gtFrames - 1 do
                let labels = ImageIO.readRgb (Path.Combine(src, "labels_rgb", $"{i}.png"))
                for size, folder in [ 224, "gt_masks_224"; 384, "gt_masks_384" ] do
                    write (Path.Combine(root, folder, gtDir, $"{vid}_{i + 1}.png")) (binaryGt size labels)
                    files <- files + 1
            log $"{label}/{uid} -> {vid} ({split})"
        { Videos = videos.Length; Files = files; WithoutMasks = List.ofSeq missingMasks }
