/// Tests of src/Vct.Core/Video: mask PNGs and overlays, frame sampling, `Predict.run` on videos and image lists (bad
/// inputs, rotation, alpha, cancellation) against the evaluation path.
module Vct.Core.Tests.VideoTests

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
open Vct.Core.Evaluation
open Vct.Core.Training
open Vct.Core.Video
open Vct.Core.Tests.Golden
open Vct.Core.Tests.Support

let private ffmpeg (args: string list) =
    let psi = ProcessStartInfo("ffmpeg")
    for a in [ "-nostdin"; "-y"; "-v"; "error" ] @ args do psi.ArgumentList.Add a
    let code, _, err = runProcess psi
    if code <> 0 then failtestf "ffmpeg %A failed: %s" args err

let private ffprobe (path: string) =
    let psi = ProcessStartInfo("ffprobe")
    for a in [ "-v"; "error"; "-show_entries"; "stream=codec_type,width,height,avg_frame_rate"; "-of"; "compact"; path ] do psi.ArgumentList.Add a
    let _, out, _ = runProcess psi
    out

/// A small synthetic S4 set and a tiny model trained on it for a few iterations (shared by the tests).
let private trained =
    lazy
        (let dir = sessionDir "video"
         let data = Path.Combine(dir, "data")
         Synth.generate { SynthOptions.Default Subset.S4 with Train = 8; Val = 3; Test = 1; Size = 32; EvalSize = 32 } data |> ignore
         let cfg =
             { Model = VctConfig.Tiny(Subset.S4, 32L, 23L)
               Criterion = (CriterionConfig.Released Subset.S4).WithNumPoints 64L
               Optim = { OptimConfig.Released with BaseLr = 5e-4 }
               Iterations = 40; BatchVideos = 2; EvalPeriod = 1000; CheckpointPeriod = 1000
               Seed = 5; CropSize = 32; ColorJitter = false; Workers = 1; MissingMasks = Fusion.MissingMasks.Refuse; Amp = false }
         let train = Avsbench.records Subset.S4 data "train"
         let valr = Avsbench.records Subset.S4 data "val"
         Trainer.run cfg train valr torch.CPU (Path.Combine(dir, "run")) false ignore ignore CancellationToken.None |> ignore
         let ckpt = Directory.GetFiles(Path.Combine(dir, "run"), "model_final.safetensors") |> Array.head
         dir, ckpt, valr)

let private wavOf (r: VideoRecord) = match r.Audio with AudioSource.Wav p -> p | AudioSource.LogMelPickle p -> failtestf "%s: not a wav" p

/// Encodes a record's 5 frames (one per second) and its audio as an mp4 at 25 fps, nearly lossless.
let private videoOf (r: VideoRecord) (out: string) =
    let list = Path.ChangeExtension(out, ".txt")
    File.WriteAllLines(list, [ for f in r.Frames do yield $"file '{f}'"; yield "duration 1" ] @ [ $"file '{Array.last r.Frames}'" ])
    ffmpeg [ "-f"; "concat"; "-safe"; "0"; "-i"; list; "-i"; wavOf r; "-r"; "25"; "-c:v"; "libx264"; "-pix_fmt"; "yuv444p"; "-crf"; "0"
             "-c:a"; "aac"; "-t"; "5"; out ]

let private predict (ckpt: string) (source: FrameSource) (opts: VideoOptions) (out: string) =
    let model, _ = Inference.loadModel ckpt None torch.CPU
    use model = model
    Predict.run model opts source { Folder = out; SaveScores = false; Overlay = true; Checkpoint = ckpt; Device = "cpu" } None ignore CancellationToken.None

let private message (f: unit -> unit) =
    try f (); failtest "expected an error" with
    | :? AssertException -> reraise ()
    | e -> e.Message

[<Tests>]
let tests =
    testList "Video" [
        testProperty "mask PNGs decode to the pixels written (grey and palette)" <| fun (seed: int) ->
            let rng = Random(seed)
            let w, h = rng.Next(1, 40), rng.Next(1, 40)
            let ids = Array.init (w * h) (fun _ -> byte (rng.Next 71))
            withTempDir "vct-png" (fun dir ->
                let p = Path.Combine(dir, "m.png")
                Png.write p (MaskPng.Palette(Classes.palette 71)) w h ids
                let back = ImageIO.readLabels p
                Expect.equal (back.Width, back.Height) (w, h) "size"
                // readLabels recovers palette indices from the colours: the AVSBench palette is injective.
                Expect.sequenceEqual back.Pixels ids "palette ids"
                let grey = ids |> Array.map (fun v -> if v > 35uy then 255uy else 0uy)
                Png.write p MaskPng.Grey w h grey
                Expect.sequenceEqual (ImageIO.readLabels p).Pixels grey "grey values")

        test "the AVSBench palette (visualization.py get_v2_pallete)" {
            let p = Classes.palette 71
            Expect.equal p[0] (0uy, 0uy, 0uy) "0"
            Expect.equal p[1] (128uy, 0uy, 0uy) "1"
            Expect.equal p[2] (0uy, 128uy, 0uy) "2"
            Expect.equal p[3] (128uy, 128uy, 0uy) "3"
            Expect.equal p[8] (64uy, 0uy, 0uy) "8"
            Expect.equal (p |> Array.distinct |> Array.length) 71 "distinct"
            Expect.equal Classes.avss.Length 71 "names"
        }

        test "overlay blend equals Pillow's alpha_composite as visualization.py uses it" {
            let bytes = File.ReadAllBytes(Path.Combine(root.Value, "video", "overlay.bin"))
            let frame, ids = bytes[0 .. 767], bytes[768 .. 1023]
            let expBinary, expAvss = bytes[1024 .. 1791], bytes[1792 .. 2559]
            let a = Array.copy frame
            Overlay.blendInPlace Overlay.binaryColours a (ids |> Array.map (fun v -> if v > 1uy then 1uy else 0uy))
            Expect.sequenceEqual a expBinary "S4/MS3 white overlay"
            let b = Array.copy frame
            Overlay.blendInPlace (Classes.palette 71) b ids
            Expect.sequenceEqual b expAvss "AVSS palette overlay"
        }

        testProperty "upsampled decisions equal torch bilinear interpolation (align_corners=False)" <| fun (seed: int) ->
            let rng = Random(seed)
            let c = if rng.Next 2 = 0 then 2 else 5
            let s = rng.Next(3, 12)
            let h, w = rng.Next(1, 40), rng.Next(1, 40)
            torch.manual_seed (int64 seed) |> ignore
            use scores = torch.rand([| int64 c; int64 s; int64 s |])
            let mask, _, _ = Upsample.decide scores h w
            use up = torch.nn.functional.interpolate(scores.unsqueeze(0L), [| int64 h; int64 w |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
            use expected =
                if c = 2 then VctMath.binaryMasks up |> fun m -> m.squeeze(0L).to_type(torch.uint8)
                else up.argmax(1L).squeeze(0L).to_type(torch.uint8)
            let e = expected.contiguous().data<byte>().ToArray()
            let agree = Array.map2 (fun a b -> if a = b then 1 else 0) mask e |> Array.sum
            // Float rounding of the two summation orders may flip exact ties only.
            Expect.isGreaterThanOrEqual (float agree / float e.Length) 0.995 $"agreement {agree}/{e.Length}"

        test "1 fps sampling picks AVSBench's frame of each second (int(l*fps + 15/16*fps))" {
            for fps in [ 24; 25; 30; 60 ] do
                let frames = Seq.init (5 * fps) (fun i -> { Index = i; Time = float i / float fps; Duration = 1.0 / float fps; Width = 1; Height = 1; Rgb = [| byte i; 0uy; 0uy |] })
                let picked = Video.sample 1.0 ignore frames |> Seq.map (fun f -> f.SourceIndex) |> List.ofSeq
                let official = [ for l in 0 .. 4 -> int (float (l * fps) + 15.0 / 16.0 * float fps) ]
                Expect.equal picked official $"{fps} fps"
        }

        test "sampling by timestamp handles variable frame rates and gaps" {
            // Frames at irregular times: the one on screen at each sampling time is chosen.
            let times = [| 0.0; 0.5; 0.93; 0.95; 2.5; 2.6 |]
            let frames = times |> Array.mapi (fun i t -> { Index = i; Time = t; Duration = 0.1; Width = 1; Height = 1; Rgb = [| 0uy; 0uy; 0uy |] })
            let mutable endTime = 0.0
            let picked = Video.sample 1.0 (fun e -> endTime <- e) frames |> Seq.map (fun f -> f.Slot, f.SourceIndex) |> List.ofSeq
            // 0.9375 -> frame at 0.93 (2); 1.9375 -> 0.95 (3, still on screen); 2.9375 -> 2.6 (5, the last)
            Expect.equal picked [ (0, 2); (1, 3); (2, 5) ] "slots"
            Expect.floatClose Accuracy.high endTime 2.7 "end time"
        }

        test "an mp4 of validation videos gives the M_J of the evaluation path, an overlay and a summary" {
            let dir, ckpt, valr = trained.Value
            let model, _ = Inference.loadModel ckpt None torch.CPU
            use model = model
            use audio = new TrainData.AudioCache(model)
            let eval = Validation.evaluate model audio valr false 0
            let ious =
                [ for r in valr ->
                      let mp4 = Path.Combine(dir, r.Id + ".mp4")
                      videoOf r mp4
                      let out = Path.Combine(dir, "pred-" + r.Id)
                      let res = predict ckpt (FrameSource.VideoFile mp4) VideoOptions.Default out
                      Expect.equal res.Frames 5 "5 masks"
                      let probe = ffprobe (Path.Combine(out, "overlay.mp4"))
                      Expect.stringContains probe "codec_type=video|width=32|height=32|avg_frame_rate=25/1" "overlay video stream"
                      Expect.stringContains probe "codec_type=audio" "overlay audio stream"
                      use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
                      let frames = doc.RootElement.GetProperty("frames")
                      Expect.equal (frames.GetArrayLength()) 5 "one summary entry per sampled frame"
                      let masks = [| for k in 0 .. 4 -> ImageIO.readLabels (Path.Combine(out, "masks", sprintf "%06d.png" k)) |]
                      let gt = r.Masks |> Array.map ImageIO.readLabels
                      let prob = masks |> Array.collect (fun m -> m.Pixels |> Array.map (fun v -> if v > 0uy then 1.0f else 0.0f))
                      let g = gt |> Array.collect (fun m -> m.Pixels |> Array.map (fun v -> if v > 0uy then 1uy else 0uy))
                      float (BinaryMetrics.videoIoU prob g 5 (32 * 32)) ]
            let mj = List.average ious
            Expect.isLessThanOrEqual (abs (mj - eval.MJ)) 0.03 $"video M_J {mj:F4} vs eval {eval.MJ:F4}"
        }

        test "--fps 5 on a 5 s clip gives 25 masks; frames of one second share their audio example" {
            let dir, ckpt, valr = trained.Value
            let mp4 = Path.Combine(dir, "fps5.mp4")
            videoOf valr[0] mp4
            let out = Path.Combine(dir, "pred-fps5")
            let res = predict ckpt (FrameSource.VideoFile mp4) { VideoOptions.Default with Fps = 5.0 } out
            Expect.equal res.Frames 25 "25 masks"
            Expect.equal (Directory.GetFiles(Path.Combine(out, "masks"), "*.png").Length) 25 "25 files"
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
            let examples = [ for f in doc.RootElement.GetProperty("frames").EnumerateArray() -> f.GetProperty("audio_example").GetInt32() ]
            Expect.equal examples [ for k in 0 .. 24 -> k / 5 ] "second k's frames use example k"
        }

        test "bad video inputs fail with a message naming the file; nothing is written" {
            let _, ckpt, _ = trained.Value
            withTempDir "vct-video-bad" (fun dir ->
                let out = Path.Combine(dir, "out")
                let run (src: string) opts = predict ckpt (FrameSource.VideoFile src) opts out |> ignore
                let text = Path.Combine(dir, "notes.mp4")
                File.WriteAllText(text, "this is not a video\n")
                Expect.stringStarts (message (fun () -> run text VideoOptions.Default)) $"{text}: not a video ffmpeg can read (" "text file named .mp4"
                let empty = Path.Combine(dir, "empty.mp4")
                File.WriteAllBytes(empty, [||])
                Expect.equal (message (fun () -> run empty VideoOptions.Default)) $"{empty}: empty file (0 bytes)" "zero bytes"
                let missing = Path.Combine(dir, "nope.mp4")
                Expect.equal (message (fun () -> run missing VideoOptions.Default)) $"{missing}: no such file" "missing"
                let silent = Path.Combine(dir, "silent.mp4")
                ffmpeg [ "-f"; "lavfi"; "-i"; "testsrc=size=32x32:rate=10:duration=2"; "-pix_fmt"; "yuv420p"; silent ]
                Expect.equal (message (fun () -> run silent VideoOptions.Default))
                    $"{silent}: has no audio track; VCT segments what makes the sound, so it needs one (pass --audio FILE, or --audio-missing silence to go on with silent examples)" "no audio"
                Expect.isFalse (Directory.Exists out) "nothing written for refused inputs"
                let r = predict ckpt (FrameSource.VideoFile silent) { VideoOptions.Default with AudioMissing = AudioMissing.Silence } out
                Expect.equal r.Frames 2 "--audio-missing silence goes on"
                Expect.isTrue (r.Warnings |> List.exists (fun w -> w.Contains "has no audio track: using digital-silence examples")) "with a warning"
                Expect.stringContains (message (fun () -> run silent { VideoOptions.Default with AudioMissing = AudioMissing.Silence }))
                    "already holds a prediction (summary.json, overlay.mp4, masks); choose another --output folder (nothing was changed)" "an earlier prediction is never overwritten"
                let short = Path.Combine(dir, "short.mp4")
                ffmpeg [ "-f"; "lavfi"; "-i"; "testsrc=size=32x32:rate=10:duration=0.5"; "-f"; "lavfi"; "-i"; "sine=frequency=440:duration=0.5"; "-pix_fmt"; "yuv420p"; "-shortest"; short ]
                Expect.stringContains (message (fun () -> predict ckpt (FrameSource.VideoFile short) VideoOptions.Default (Path.Combine(dir, "o2")) |> ignore))
                    "shorter than one audio example (0.975 s)" "shorter than one example"
                let asFile = Path.Combine(dir, "file-out")
                File.WriteAllText(asFile, "x")
                Expect.equal (message (fun () -> predict ckpt (FrameSource.VideoFile silent) { VideoOptions.Default with AudioMissing = AudioMissing.Silence } asFile |> ignore))
                    $"{asFile}: --output is a file, not a folder" "output is a file"
                Expect.equal (File.ReadAllText asFile) "x" "the file is untouched"
                let huge = Path.Combine(dir, "huge.mkv")
                ffmpeg [ "-f"; "lavfi"; "-i"; "color=c=red:size=8200x4400:rate=1:duration=1"; "-c:v"; "ffv1"; huge ]
                Expect.stringStarts (message (fun () -> run huge { VideoOptions.Default with AudioMissing = AudioMissing.Silence }))
                    $"{huge}: frames are 8200x4400 (36.1 Mpx), above the frame budget of 33.2 Mpx (8K UHD)" "8K+ frames"
                // 10-bit video works (converted to 8-bit RGB by the decoder).
                let tenBit = Path.Combine(dir, "ten.mp4")
                ffmpeg [ "-i"; Path.Combine(dir, "silent.mp4"); "-f"; "lavfi"; "-i"; "sine=duration=2"; "-vf"; "scale=48:32"; "-pix_fmt"; "yuv420p10le"; "-c:v"; "libx264"; "-shortest"; tenBit ]
                let r = predict ckpt (FrameSource.VideoFile tenBit) VideoOptions.Default (Path.Combine(dir, "o3"))
                Expect.equal r.Frames 2 "10-bit video"
                let m = ImageIO.readLabels (Path.Combine(dir, "o3", "masks", "000000.png"))
                Expect.equal (m.Width, m.Height) (48, 32) "masks at the source size")
        }

        test "image input: files in order with an audio file; bad images name the file" {
            let dir, ckpt, valr = trained.Value
            let r = valr[0]
            let out = Path.Combine(dir, "pred-images")
            let res = predict ckpt (FrameSource.Images(List.ofArray r.Frames)) { VideoOptions.Default with Audio = Some(wavOf r) } out
            Expect.equal res.Frames 5 "5 masks"
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
            let names = [ for f in doc.RootElement.GetProperty("frames").EnumerateArray() -> f.GetProperty("name").GetString() ]
            Expect.equal names [ for f in r.Frames -> Path.GetFileNameWithoutExtension f ] "names in order"
            Expect.isTrue (File.Exists(Path.Combine(out, "overlay.mp4"))) "overlay of the images"
            withTempDir "vct-img-bad" (fun d ->
                let bad = Path.Combine(d, "frame.png")
                File.WriteAllBytes(bad, [||])
                let msg = message (fun () -> predict ckpt (FrameSource.Images [ bad ]) { VideoOptions.Default with Audio = Some(wavOf r) } (Path.Combine(d, "o")) |> ignore)
                Expect.stringStarts msg $"{bad}: " "zero-byte image names the file"
                let jpgAsPng = Path.Combine(d, "j.png")
                ImageIO.write (Path.Combine(d, "j.jpg")) (ImageIO.readRgb r.Frames[0])
                File.Move(Path.Combine(d, "j.jpg"), jpgAsPng)
                let ok = predict ckpt (FrameSource.Images [ jpgAsPng ]) { VideoOptions.Default with Audio = Some(wavOf r) } (Path.Combine(d, "o2"))
                Expect.equal ok.Frames 1 "a JPEG named .png is read by content")
        }

        test "an official-format checkpoint predicts the masks of the forward pass on the same tensors" {
            use _ = torch.NewDisposeScope()
            let cfg = smallConfig Subset.S4
            use model = new VctModel(cfg)
            Checkpoint.StateDict.loadFileInto loadOptions (Path.Combine(root.Value, "model", "s4", "model_best.pth")) model |> ignore
            withTempDir "vct-video-official" (fun dir ->
                let rng = Random(3)
                let size = int cfg.ImageSize
                let img () = { Width = size; Height = size; Channels = 3; Pixels = Array.init (size * size * 3) (fun _ -> byte (rng.Next 256)) }
                let frames = [ for k in 1 .. 5 -> Path.Combine(dir, $"f_{k}.png") ]
                let masksDir = Path.Combine(dir, "sam")
                Directory.CreateDirectory masksDir |> ignore
                for f in frames do
                    ImageIO.write f (img ())
                    ImageIO.write (Path.Combine(masksDir, Path.GetFileNameWithoutExtension f + "_mask_color.png")) (img ())
                let wav = Path.Combine(dir, "a.wav")
                ffmpeg [ "-f"; "lavfi"; "-i"; "sine=frequency=330:sample_rate=16000:duration=5"; "-c:a"; "pcm_s16le"; wav ]
                let out = Path.Combine(dir, "out")
                let opts = { VideoOptions.Default with Audio = Some wav; PreMasks = Some masksDir }
                let res = Predict.run model opts (FrameSource.Images frames) { Folder = out; SaveScores = false; Overlay = false; Checkpoint = "golden"; Device = "cpu" } None ignore CancellationToken.None
                Expect.equal res.Frames 5 "5 masks"
                // The forward pass on the same tensors (what `vct forward` runs), scores resized as predict does.
                let examples, _ = Inference.audioExamples Subset.S4 wav
                let inputs =
                    { Images = Batch.frames [| for f in frames -> ImageIO.readRgb f |]
                      PreMasks = Some(Batch.frames [| for f in frames -> ImageIO.readRgb (Path.Combine(masksDir, Path.GetFileNameWithoutExtension f + "_mask_color.png")) |])
                      Audio = AudioInput.LogMel(examples, None) }
                let semSeg = Parity.run model Precision.Float32 inputs false |> List.find (fun (n, _) -> n = "sem_seg") |> snd
                use up = torch.nn.functional.interpolate(semSeg, [| int64 size; int64 size |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
                use expected = (VctMath.binaryMasks up).to_type(torch.uint8)
                for k in 0 .. 4 do
                    let ours = (ImageIO.readLabels (Path.Combine(out, "masks", sprintf "%06d.png" k))).Pixels |> Array.map (fun v -> if v > 0uy then 1uy else 0uy)
                    let e = expected[int64 k].contiguous().data<byte>().ToArray()
                    let agree = Array.map2 (fun a b -> if a = b then 1 else 0) ours e |> Array.sum
                    Expect.isGreaterThanOrEqual (float agree / float e.Length) 0.999 $"frame {k}: {agree}/{e.Length} pixels agree")
        }

        test "cancelling keeps the masks written so far valid and says so in summary.json" {
            let dir, ckpt, valr = trained.Value
            let mp4 = Path.Combine(dir, "cancel.mp4")
            videoOf valr[1] mp4
            let out = Path.Combine(dir, "pred-cancel")
            let model, _ = Inference.loadModel ckpt None torch.CPU
            use model = model
            use cts = new CancellationTokenSource()
            let progress = { new IProgress<VideoProgress> with member _.Report p = if p.Frames >= 2 then cts.Cancel() }
            let res = Predict.run model { VideoOptions.Default with Fps = 5.0; BatchFrames = 2 } (FrameSource.VideoFile mp4)
                                  { Folder = out; SaveScores = true; Overlay = true; Checkpoint = ckpt; Device = "cpu" } (Some progress) ignore cts.Token
            Expect.isTrue res.Interrupted "interrupted"
            Expect.isLessThan res.Frames 25 "stopped early"
            let masks = Directory.GetFiles(Path.Combine(out, "masks"), "*.png")
            Expect.equal masks.Length res.Frames "every mask written is there"
            for m in masks do Expect.equal (ImageIO.readLabels m).Width 32 "valid PNG"
            Expect.equal (Directory.GetFiles(Path.Combine(out, "scores"), "*.npy").Length) res.Frames "scores"
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
            Expect.isTrue (doc.RootElement.GetProperty("interrupted").GetBoolean()) "summary says interrupted"
            Expect.isEmpty (Directory.GetFiles(out, ".*")) "no temporary files left"
        }
        test "rotation metadata is applied: frames, masks and overlay are in display orientation" {
            let _, ckpt, _ = trained.Value
            withTempDir "vct-video-rot" (fun dir ->
                let plain = Path.Combine(dir, "plain.mp4")
                ffmpeg [ "-f"; "lavfi"; "-i"; "testsrc=size=48x32:rate=10:duration=2"; "-f"; "lavfi"; "-i"; "sine=frequency=440:duration=2"
                         "-pix_fmt"; "yuv444p"; "-c:v"; "libx264"; "-crf"; "0"; "-shortest"; plain ]
                let rotated = Path.Combine(dir, "rotated.mp4")
                ffmpeg [ "-i"; plain; "-c"; "copy"; "-metadata:s:v:0"; "rotate=90"; rotated ]
                let probe = Ffmpeg.probe rotated
                Expect.equal (probe.Rotation, probe.Width, probe.Height) (90, 32, 48) "probe: rotation and display size"
                let first (p: string) = Video.read p 1.0 |> Seq.head |> fun f -> f.Image
                let a, b = first plain, first rotated
                Expect.equal (b.Width, b.Height) (32, 48) "decoded in display orientation"
                // ffmpeg's display matrix angle (ffprobe "rotation": 90) turns counter-clockwise: display (row r,
                // column c) shows source (row c, column W-1-r), as ffmpeg's own decoder (autorotate) shows it.
                let diff clockwise =
                    Seq.average [ for r in 0 .. 47 do
                                    for c in 0 .. 31 do
                                        let sr, sc = if clockwise then 31 - c, r else c, 47 - r
                                        for ch in 0 .. 2 -> abs (float b.Pixels[(r * 32 + c) * 3 + ch] - float a.Pixels[(sr * 48 + sc) * 3 + ch]) ]
                Expect.isLessThan (diff false) 2.0 "the source turned counter-clockwise"
                Expect.isGreaterThan (diff true) 20.0 "not the other way"
                let out = Path.Combine(dir, "out")
                let r = predict ckpt (FrameSource.VideoFile rotated) VideoOptions.Default out
                Expect.equal r.Frames 2 "2 masks"
                let m = ImageIO.readLabels (Path.Combine(out, "masks", "000000.png"))
                Expect.equal (m.Width, m.Height) (32, 48) "masks in display orientation"
                Expect.stringContains (ffprobe (Path.Combine(out, "overlay.mp4"))) "codec_type=video|width=32|height=48" "overlay in display orientation")
        }

        test "alpha video is read as RGB with a warning" {
            let _, ckpt, _ = trained.Value
            withTempDir "vct-video-alpha" (fun dir ->
                let alpha = Path.Combine(dir, "alpha.mov")
                ffmpeg [ "-f"; "lavfi"; "-i"; "testsrc=size=32x32:rate=10:duration=2,format=rgba"; "-f"; "lavfi"; "-i"; "sine=duration=2"
                         "-c:v"; "png"; "-c:a"; "pcm_s16le"; "-shortest"; alpha ]
                Expect.isTrue (Video.hasAlpha (Ffmpeg.probe alpha).PixelFormat) "the test video has alpha"
                let r = predict ckpt (FrameSource.VideoFile alpha) VideoOptions.Default (Path.Combine(dir, "out"))
                Expect.equal r.Frames 2 "2 masks"
                Expect.contains r.Warnings
                    $"warning: {alpha} has an alpha channel (rgba); it is dropped (frames are read as RGB, as the official tools' PIL convert('RGB') does)" "warning")
        }

        test "frame images: 16-bit, palette, RGBA and grey PNGs decode like 8-bit RGB; truncated ones name the file" {
            let _, ckpt, valr = trained.Value
            withTempDir "vct-img-kinds" (fun dir ->
                let make name pixFmt =
                    let p = Path.Combine(dir, name)
                    ffmpeg [ "-f"; "lavfi"; "-i"; "testsrc=size=32x32:rate=1"; "-frames:v"; "1"; "-pix_fmt"; pixFmt; p ]
                    p
                let rgb = ImageIO.readRgb (make "rgb24.png" "rgb24")
                let maxDiff (a: Image) (b: Image) = Seq.zip a.Pixels b.Pixels |> Seq.map (fun (x, y) -> abs (int x - int y)) |> Seq.max
                let deep = make "rgb48.png" "rgb48be"
                Expect.isLessThanOrEqual (maxDiff rgb (ImageIO.readRgb deep)) 1 "16-bit RGB = 8-bit RGB (to rounding)"
                let rgba = make "rgba.png" "rgba"
                Expect.equal (maxDiff rgb (ImageIO.readRgb rgba)) 0 "RGBA: alpha dropped"
                let pal = make "pal8.png" "pal8"
                let palRgb = Path.Combine(dir, "pal8-as-rgb.png")
                ffmpeg [ "-i"; pal; "-pix_fmt"; "rgb24"; palRgb ]
                Expect.equal (maxDiff (ImageIO.readRgb palRgb) (ImageIO.readRgb pal)) 0 "palette: through its palette (as ffmpeg expands it)"
                let grey = ImageIO.readRgb (make "gray16.png" "gray16be")
                Expect.isTrue (Seq.forall (fun i -> grey.Pixels[3 * i] = grey.Pixels[3 * i + 1] && grey.Pixels[3 * i + 1] = grey.Pixels[3 * i + 2]) [ 0 .. 32 * 32 - 1 ]) "grey: equal channels"
                let wav = wavOf valr[0]
                let r = predict ckpt (FrameSource.Images [ deep; rgba; pal; Path.Combine(dir, "gray16.png") ]) { VideoOptions.Default with Audio = Some wav } (Path.Combine(dir, "out"))
                Expect.equal r.Frames 4 "every kind segments"
                let cut = Path.Combine(dir, "cut.png")
                let bytes = File.ReadAllBytes(Path.Combine(dir, "rgb24.png"))
                File.WriteAllBytes(cut, bytes[.. bytes.Length / 2])
                let out2 = Path.Combine(dir, "out2")
                Expect.equal (message (fun () -> predict ckpt (FrameSource.Images [ cut ]) { VideoOptions.Default with Audio = Some wav } out2 |> ignore))
                    $"{cut}: truncated (incomplete image data)" "truncated PNG")
        }

        test "an output folder that cannot be written is refused naming it" {
            let _, ckpt, valr = trained.Value
            withTempDir "vct-video-ro" (fun dir ->
                let ro = Path.Combine(dir, "ro")
                Directory.CreateDirectory ro |> ignore
                File.SetUnixFileMode(ro, UnixFileMode.UserRead ||| UnixFileMode.UserExecute)
                // root ignores permission bits; sysfs refuses new files to everyone.
                let target = if Environment.UserName = "root" || (try File.WriteAllText(Path.Combine(ro, "x"), ""); true with _ -> false) then "/sys/kernel" else ro
                let wav = wavOf valr[0]
                let msg = message (fun () -> predict ckpt (FrameSource.Images [ valr[0].Frames[0] ]) { VideoOptions.Default with Audio = Some wav } target |> ignore)
                Expect.stringStarts msg $"{target}: cannot write to the output folder (" "read-only output folder"
                File.SetUnixFileMode(ro, UnixFileMode.UserRead ||| UnixFileMode.UserWrite ||| UnixFileMode.UserExecute))
        }
        test "a truncated video: without its index it is refused naming the file; with it the frames before the cut are used" {
            let _, ckpt, _ = trained.Value
            withTempDir "vct-video-cut" (fun dir ->
                let make (name: string) (faststart: bool) =
                    let p = Path.Combine(dir, name)
                    ffmpeg ([ "-f"; "lavfi"; "-i"; "testsrc=size=32x32:rate=10:duration=4"; "-f"; "lavfi"; "-i"; "sine=duration=4"; "-pix_fmt"; "yuv420p" ]
                            @ (if faststart then [ "-movflags"; "+faststart" ] else []) @ [ p ])
                    let bytes = File.ReadAllBytes p
                    File.WriteAllBytes(p, bytes[.. bytes.Length * 6 / 10])
                    p
                // The index (moov) is written last by default: cutting the file loses it.
                let noIndex = make "no-index.mp4" false
                Expect.stringStarts (message (fun () -> predict ckpt (FrameSource.VideoFile noIndex) VideoOptions.Default (Path.Combine(dir, "o1")) |> ignore))
                    $"{noIndex}: not a video ffmpeg can read (" "cut file without its index"
                Expect.isFalse (Directory.Exists(Path.Combine(dir, "o1"))) "nothing written"
                // With the index first (+faststart) the data ends early: the frames and audio before the cut are used.
                let cut = make "cut.mp4" true
                let out = Path.Combine(dir, "o2")
                let r = predict ckpt (FrameSource.VideoFile cut) VideoOptions.Default out
                Expect.isGreaterThanOrEqual r.Frames 1 "frames before the cut"
                Expect.isLessThanOrEqual r.Frames 4 "not more than the video has"
                Expect.isNonEmpty r.Warnings "the cut is reported"
                Expect.isTrue (r.Warnings |> List.forall (fun w -> not (w.Contains "   at "))) "one line each"
                for m in Directory.GetFiles(Path.Combine(out, "masks"), "*.png") do
                    Expect.equal (ImageIO.readLabels m).Width 32 "valid masks")
        }
    ]
