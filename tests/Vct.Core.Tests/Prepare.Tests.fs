module Vct.Core.Tests.PrepareTests

open Vct.Core
open Vct.Core.Platform
open System
open System.IO
open Expecto
open Vct.Core.Data

let private pillow (name: string) = Path.Combine(Golden.root.Value, "images", name)

/// Largest per-byte difference between two images of the same shape.
let private maxDiff (a: Image) (b: Image) =
    Expect.equal (a.Width, a.Height, a.Channels) (b.Width, b.Height, b.Channels) "same shape"
    Array.map2 (fun (x: byte) (y: byte) -> abs (int x - int y)) a.Pixels b.Pixels |> Array.max

/// A small AVSBench-semantic tree: metadata.csv, frames, labels_rgb, Semantic-SAM images for the first video.
let private semanticTree (root: string) (rows: (string * string * string * string) list) =
    let lines = "vid,uid,s_min,s_sec,e_min,e_sec,label,split" :: [ for vid, uid, label, split in rows -> $"{vid},{uid},0,0,0,5,{label},{split}" ]
    File.WriteAllLines(Path.Combine(root, "metadata.csv"), lines)
    let rng = Random(3)
    for k, (_, uid, label, _) in List.indexed rows do
        for i in 0 .. 4 do
            let frame = { Width = 64; Height = 48; Channels = 3; Pixels = Array.init (64 * 48 * 3) (fun _ -> byte (rng.Next 256)) }
            ImageIO.write (Path.Combine(root, label, uid, "frames", $"{i}.jpg")) frame
            let labels = Image.Create(64, 48, 3)
            for y in 10 .. 30 do
                for x in 5 + i .. 40 do
                    labels.Pixels[(y * 64 + x) * 3] <- 128uy
            ImageIO.write (Path.Combine(root, label, uid, "labels_rgb", $"{i}.png")) labels
            if k = 0 then
                ImageIO.write (Path.Combine(root, "pre_SAM_mask", "AVSBench_semantic", label, uid, "frames", $"{i}_mask_color.png")) labels

[<Tests>]
let tests =
    testList "Data.Prepare" [
        for w, h in [ 16, 16; 30, 20; 71, 12; 100, 64; 384, 384 ] do
            test $"BILINEAR resize equals Pillow's byte for byte (71x45 -> {w}x{h})" {
                let src = ImageIO.readRgb (pillow "rgb.png")
                let expected = ImageIO.readRgb (pillow $"rgb_bilinear_{w}x{h}.png")
                Expect.equal (maxDiff (Resize.bilinear w h src) expected) 0 "max byte difference"
            }

        test "BILINEAR on a grey image equals Pillow's" {
            let src = ImageIO.readLabels (pillow "grey.png")
            let expected = ImageIO.readLabels (pillow "grey_bilinear_23x17.png")
            Expect.equal (maxDiff (Resize.bilinear 23 17 src) expected) 0 "max byte difference"
        }

        test "labels_rgb -> GT 224 / 384 as the official tools derive it (Pillow grey, non-zero -> 255, NEAREST)" {
            let labels = ImageIO.readRgb (pillow "labels_rgb.png")
            for size in [ 224; 384 ] do
                let expected = ImageIO.readLabels (pillow $"labels_gt_{size}.png")
                Expect.equal (maxDiff (Prepare.binaryGt size labels) expected) 0 $"GT {size}"
            // (1, 0, 0) and (0, 0, 1) are not black, yet Pillow's grey of them is 0: they count as background.
            Expect.equal (Prepare.pilGrey 1uy 0uy 0uy) 0uy "Pillow grey of (1, 0, 0)"
            Expect.equal (Prepare.pilGrey 0uy 1uy 0uy) 1uy "Pillow grey of (0, 1, 0)"
            Expect.equal (Prepare.pilGrey 255uy 255uy 255uy) 255uy "white"
        }

        test "NEAREST resize of a colour mask equals Pillow's" {
            let src = ImageIO.readRgb (pillow "labels_rgb.png")
            Expect.equal (maxDiff (Resize.nearest 384 384 src) (ImageIO.readRgb (pillow "labels_nearest_384.png"))) 0 "max byte difference"
        }

        test "a JPEG frame decodes to Pillow's pixels" {
            let ours = ImageIO.readRgb (pillow "frame.jpg")
            let theirs = ImageIO.readRgb (pillow "frame_decoded.png")
            Expect.isLessThanOrEqual (maxDiff ours theirs) 1 "max byte difference (libjpeg-turbo on both sides)"
        }

        test "objectTree writes the official S4 and MS3 384 layouts from AVSBench-semantic" {
            Support.withTempDir "vct-prepare" (fun d ->
                let sem = Path.Combine(d, "AVSBench_semantic")
                let obj = Path.Combine(d, "AVSBench_object")
                Directory.CreateDirectory sem |> ignore
                semanticTree sem [ "vidA", "uidA", "v1s", "train"; "vidB", "uidB", "v1s", "test"; "vidC", "uidC", "v1m", "val" ]
                Directory.CreateDirectory(Path.Combine(obj, "Single-source")) |> ignore
                File.WriteAllLines(Path.Combine(obj, "Single-source", "s4_meta_data.csv"), [ "name,category,split"; "vidA,dog,train"; "vidB,car,test" ])
                let s4 = Prepare.objectTree Subset.S4 sem obj ignore
                Expect.equal s4.Videos 2 "two v1s videos"
                Expect.equal s4.WithoutMasks [ "vidB" ] "the video without Semantic-SAM images is reported"
                let s4Root = Path.Combine(obj, "Single-source", "s4_data_384")
                let frame = ImageIO.readRgb (Path.Combine(s4Root, "visual_frames_384", "train", "dog", "vidA", "vidA_3.png"))
                Expect.equal (frame.Width, frame.Height) (384, 384) "frames at 384"
                Expect.isTrue (File.Exists(Path.Combine(s4Root, "pre_SAM_mask_384", "train", "dog", "vidA", "vidA_5_mask_color.png"))) "Maskige at 384"
                Expect.isTrue (File.Exists(Path.Combine(s4Root, "gt_masks_224", "train", "dog", "vidA", "vidA_1.png"))) "train GT: frame 1"
                Expect.isFalse (File.Exists(Path.Combine(s4Root, "gt_masks_224", "train", "dog", "vidA", "vidA_2.png"))) "train GT: frame 1 only"
                let gt = ImageIO.readLabels (Path.Combine(s4Root, "gt_masks_224", "test", "car", "vidB", "vidB_4.png"))
                let expected = Prepare.binaryGt 224 (ImageIO.readRgb (Path.Combine(sem, "v1s", "uidB", "labels_rgb", "3.png")))
                Expect.equal (maxDiff gt expected) 0 "test GT: derived from labels_rgb frame 3"
                Expect.isTrue (gt.Pixels |> Array.forall (fun v -> v = 0uy || v = 255uy)) "binary"
                let ms3 = Prepare.objectTree Subset.MS3 sem obj ignore
                Expect.equal ms3.Videos 1 "one v1m video"
                let ms3Root = Path.Combine(obj, "Multi-sources", "ms3_data_384")
                Expect.isTrue (File.Exists(Path.Combine(ms3Root, "visual_frames_384", "vidC", "vidC_5.png"))) "MS3 frames are flat"
                Expect.isTrue (File.Exists(Path.Combine(ms3Root, "gt_masks_384", "val", "vidC", "vidC_5.png"))) "MS3 GT by split, all 5 frames")
        }

        test "objectTree names the file and the problem" {
            Support.withTempDir "vct-prepare" (fun d ->
                let sem = Path.Combine(d, "sem")
                Directory.CreateDirectory sem |> ignore
                semanticTree sem [ "vidA", "uidA", "v1s", "train" ]
                let obj = Path.Combine(d, "obj")
                Directory.CreateDirectory(Path.Combine(obj, "Single-source")) |> ignore
                File.WriteAllLines(Path.Combine(obj, "Single-source", "s4_meta_data.csv"), [ "name,split"; "vidA,train" ])
                let e = Expect.throwsC (fun () -> Prepare.objectTree Subset.S4 sem obj ignore |> ignore) id
                Expect.stringContains e.Message "s4_meta_data.csv" "names the CSV"
                Expect.stringContains e.Message "'category'" "names the missing column"
                File.WriteAllLines(Path.Combine(obj, "Single-source", "s4_meta_data.csv"), [ "name,category"; "vidA,dog" ])
                File.Delete(Path.Combine(sem, "v1s", "uidA", "labels_rgb", "0.png"))
                let e = Expect.throwsC (fun () -> Prepare.objectTree Subset.S4 sem obj ignore |> ignore) id
                Expect.stringContains e.Message (Path.Combine("labels_rgb", "0.png")) "names the missing label image")
        }
    ]
