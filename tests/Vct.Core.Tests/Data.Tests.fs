/// Tests of src/Vct.Core/Data: the synthetic data set, the AVSBench readers and the data check, augmentation, the
/// batch loader, labels, `vct data prepare`'s conversions; the hardening and fuzz cases of the image and CSV readers.
module Vct.Core.Tests.DataTests

open Vct.Core
open Vct.Core.Platform
open System
open System.IO
open Expecto
open Vct.Core.Data
open Vct.Core.Evaluation
open Vct.Core.Tests.Support

let private tiny (kind: Subset) (seed: int) =
    { SynthOptions.Default kind with Seed = seed; Train = 2; Val = 1; Test = 1; Size = 40; EvalSize = 56 }

let private filesOf (root: string) =
    Directory.GetFiles(root, "*", SearchOption.AllDirectories)
    |> Array.map (fun f -> Path.GetRelativePath(root, f), File.ReadAllBytes f)
    |> Array.sortBy fst

let private throwsMentioning<'E when 'E :> exn> (what: string) (f: unit -> unit) =
    let msg =
        try f (); failtest $"expected {typeof<'E>.Name} mentioning {what}"
        with
        | :? 'E as e -> e.Message
    Expect.stringContains msg what $"the error names {what}"

[<Tests>]
let synth =
    testList "Data.Synth" [
        test "same seed, same bytes; another seed, other bytes" {
            use tmp = new TempDir("vct-data")
            let a, b, c = tmp.Folder "a", tmp.Folder "b", tmp.Folder "c"
            Synth.generate (tiny Subset.MS3 5) a |> ignore
            Synth.generate (tiny Subset.MS3 5) b |> ignore
            Synth.generate (tiny Subset.MS3 6) c |> ignore
            let fa, fb, fc = filesOf a, filesOf b, filesOf c
            Expect.equal (Array.map fst fa) (Array.map fst fb) "same files"
            Array.iter2 (fun (n, x: byte[]) (_, y: byte[]) -> Expect.isTrue (x.AsSpan().SequenceEqual(ReadOnlySpan y)) $"{n} identical") fa fb
            Expect.isFalse ((Array.map snd fa |> Array.concat).AsSpan().SequenceEqual(ReadOnlySpan(Array.map snd fc |> Array.concat))) "seed matters"
        }
        test "same bytes across processes (vct synth in a child process vs the library here)" {
            use tmp = new TempDir("vct-data")
            let a, b = tmp.Folder "proc-a", tmp.Folder "proc-b"
            let code, _, err = runVct [ "synth"; "--kind"; "avss"; "--out"; a; "--train"; "1"; "--val"; "1"; "--test"; "0"; "--size"; "40"; "--seed"; "12" ]
            Expect.equal code 0 $"synth: {err}"
            Synth.generate { SynthOptions.Default Subset.AVSS with Seed = 12; Train = 1; Val = 1; Test = 0; Size = 40 } b |> ignore
            let fa, fb = filesOf a, filesOf b
            Expect.equal (Array.map fst fa) (Array.map fst fb) "same files"
            Array.iter2 (fun (n, x: byte[]) (_, y: byte[]) -> Expect.isTrue (x.AsSpan().SequenceEqual(ReadOnlySpan y)) $"{n} identical") fa fb
        }
        for kind in [ Subset.S4; Subset.MS3; Subset.AVSS ] do
            test $"{kind}: output passes the data check and loads back through the readers" {
                use tmp = new TempDir("vct-data")
                let root = tmp.Folder "synth"
                let rep = Synth.generate (tiny kind 1) root
                let check = DataCheck.run root 2
                Expect.isTrue check.Ok $"""no problems: {String.Join("; ", check.Problems)}"""
                let dk = kind
                for split, n in [ "train", 2; "val", 1; "test", 1 ] do
                    let recs = Avsbench.records dk root split
                    Expect.equal recs.Length n $"{split} videos"
                    for r in recs do
                        let v = Avsbench.loadVideo LoadOptions.Default r
                        let planned = rep.Videos |> Array.find (fun p -> p.Id = r.Id)
                        Expect.equal v.Frames.Length planned.Frames "frames"
                        Expect.equal v.Frames[0].Width 40 "frame size"
                        let expectedMasks = if kind = Subset.S4 && split = "train" then 1 else planned.Frames
                        Expect.equal v.Masks.Length expectedMasks "annotated frames"
                        Expect.equal v.Masks[0].Width (if split = "train" then 40 else 56) "train GT at frame size, eval GT at EvalSize"
                        let gt0 = if kind = Subset.AVSS then Synth.classMask planned 0 v.Masks[0].Width else Synth.binaryMask planned 0 v.Masks[0].Width
                        Expect.equal v.Masks[0].Pixels gt0 "mask decodes to the planned GT (0/1 or class ids)"
                        use a = Avsbench.audioExamples r
                        Expect.equal a.shape [| (if kind = Subset.AVSS then 10L else 5L); 1L; 96L; 64L |] "log-mel examples"
                        if kind = Subset.AVSS then
                            Expect.equal r.VidTemporalFlag.Length 10 "vid flag"
                            Expect.equal r.GtTemporalFlag.Length planned.Frames "gt flag"
                if kind = Subset.AVSS then Expect.equal (Avsbench.avssClasses root).Length 9 "background + 8 classes"
            }
        test "audio matters: a vision-only model (other videos' audio) is far below what the GT allows" {
            // statistics of the default S4-like set (no files written)
            let videos = Synth.plan (SynthOptions.Default Subset.S4)
            let b = SynthStats.baselines Subset.S4 64 videos
            Expect.floatClose Accuracy.medium (fst b.Oracle) 1.0 "the GT scores 1"
            Expect.isLessThan (fst b.AllObjects) 0.55 "audio-blind, every object: M_J < 0.55"
            Expect.isLessThan (fst b.OneObject) 0.55 "audio-blind, one object: M_J < 0.55"
            Expect.isLessThan (fst b.ShuffledAudioOracle) 0.3 "perfect model with shuffled audio: M_J < 0.3"
            for kind in [ Subset.MS3; Subset.AVSS ] do
                let b = SynthStats.baselines kind 48 (Synth.plan (SynthOptions.Default kind))
                Expect.isLessThan (fst b.ShuffledAudioOracle) (fst b.Oracle - 0.2) $"{kind}: shuffled audio is measurably worse"
                Expect.isLessThan (fst b.AllObjects) (fst b.Oracle - 0.2) $"{kind}: audio-blind is measurably worse"
        }
        test "each category has its own sound: the signatures are far apart in log-spectrum" {
            let n = 16000
            let spec (x: float32[]) =
                use t = TorchSharp.torch.tensor(x)
                use s = TorchSharp.torch.fft.rfft(t).abs().add(TorchSharp.Scalar.op_Implicit 1e-3).log()
                s.data<float32>().ToArray()
            let sigs = Array.init 8 (fun c -> spec (Synth.signature (Random 3) c n))
            for i in 0 .. 7 do
                for j in i + 1 .. 7 do
                    let d = Array.fold2 (fun s (a: float32) b -> s + float (abs (a - b))) 0.0 sigs[i] sigs[j] / float sigs[i].Length
                    Expect.isGreaterThan d 0.5 $"categories {i} and {j} differ"
            for c in 0 .. 7 do
                let s = Synth.signature (Random 3) c n
                Expect.all s (fun v -> Single.IsFinite v && abs v <= 2.0f) $"category {c} is finite and bounded"
        }
    ]

/// Writes a 16-bit grey PNG (colour type 0, bit depth 16) by hand: SkiaSharp writes 8-bit only.
let private writePng16 (path: string) (w: int) (h: int) (values: uint16[]) =
    let raw =
        [| for y in 0 .. h - 1 do
               yield 0uy
               for x in 0 .. w - 1 do
                   let v = values[y * w + x]
                   yield byte (v >>> 8)
                   yield byte v |]
    use packed = new MemoryStream()
    (use z = new Compression.ZLibStream(packed, Compression.CompressionLevel.Fastest, true)
     z.Write(raw, 0, raw.Length))
    let ihdr = Array.concat [ Crafted.be32 (uint32 w); Crafted.be32 (uint32 h); [| 16uy; 0uy; 0uy; 0uy; 0uy |] ]
    File.WriteAllBytes(path, Array.concat [ Crafted.pngSignature
                                            Crafted.pngChunk "IHDR" ihdr; Crafted.pngChunk "IDAT" (packed.ToArray()); Crafted.pngChunk "IEND" [||] ])

[<Tests>]
let readers =
    testList "Data.Readers" [
        test "the check reads what training reads: palette masks via their palette, 16-bit masks, empty GT, short audio, the pixel budget" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "check"
            Synth.generate (tiny Subset.S4 9) root |> ignore
            let clean = DataCheck.run root 2
            Expect.isTrue clean.Ok $"""the synthetic set passes: {String.Join("; ", clean.Problems)}"""
            Expect.isEmpty clean.Warnings "and gives no warning"
            let train = Avsbench.records Subset.S4 root "train"
            let valr = Avsbench.records Subset.S4 root "val" |> Array.exactlyOne
            let test = Avsbench.records Subset.S4 root "test" |> Array.exactlyOne
            // A palette (P-mode) mask with indices {0, 1} and palette black / white: the object is white.
            let before = (Avsbench.loadVideo LoadOptions.Default valr).Masks[0].Pixels
            let grey = ImageIO.readLabels valr.Masks[0]
            Vct.Core.Video.Png.write valr.Masks[0] (Vct.Core.Video.MaskPng.Palette [| (0uy, 0uy, 0uy); (255uy, 255uy, 255uy) |])
                grey.Width grey.Height (grey.Pixels |> Array.map (fun v -> v / 255uy))
            Expect.equal (ImageIO.readLabels valr.Masks[0]).Pixels (grey.Pixels |> Array.map (fun v -> v / 255uy)) "raw palette indices {0,1}"
            Expect.exists before (fun v -> v = 1uy) "the mask has an object"
            Expect.equal (Avsbench.loadVideo LoadOptions.Default valr).Masks[0].Pixels before "training reads the palette mask as the grey one"
            // A 16-bit grey mask holding {0, 1}.
            let m16 = test.Masks[1]
            let g16 = ImageIO.readLabels m16
            writePng16 m16 g16.Width g16.Height (g16.Pixels |> Array.map (fun v -> uint16 (v / 255uy)))
            Expect.isTrue ((Avsbench.loadVideo LoadOptions.Default test).Masks[1].Pixels |> Array.forall ((=) 0uy)) "read as empty (the problem the check flags)"
            // Every training mask empty.
            for r in train do
                let m = ImageIO.readLabels r.Masks[0]
                ImageIO.write r.Masks[0] { m with Pixels = Array.zeroCreate m.Pixels.Length }
            // Audio for 2 of the 5 frames (2.5 s).
            let wav = match train[0].Audio with AudioSource.Wav p -> p | a -> failtestf "expected a WAV, got %A" a
            Vct.Core.Audio.Wav.writeFloat32 wav 16000 [| Array.init 40000 (fun i -> 0.3 * sin (float i * 0.05)) |]
            // A frame over the pixel budget (4097 x 4096 grey: only its header is read).
            let big = test.Frames[4]
            Vct.Core.Video.Png.write big Vct.Core.Video.MaskPng.Grey 4097 4096 (Array.zeroCreate (4097 * 4096))
            let check = DataCheck.run root 2
            Expect.equal check.Problems
                [| $"{m16}: 16-bit mask: its samples are scaled to 8 bits on reading, so a 16-bit {{0,1}} mask becomes empty ground truth; save it as 8-bit grey 0/255"
                   $"{big}: frame is 4097x4096 (16781312 pixels), over the frame pixel budget of 16777216 (4096x4096); downscale the frames" |]
                "problems, sorted by path"
            Expect.equal check.Warnings
                [| $"{wav}: 2 whole example(s) of audio (1.92 s) for the 5 frames S4 uses; the last is repeated for the rest, as the official tool does"
                   "train: all 2 ground-truth masks are empty (no object pixel); training and evaluation would see no object"
                   $"val: 1 palette (P-mode) mask(s), e.g. {valr.Masks[0]}: decoded through their palette, white = object, every other colour = background" |]
                "warnings, sorted"
            let code, out, _ = runVct [ "data"; "check"; root ]
            Expect.equal code 2 "problems: exit 2"
            Expect.stringContains out $"warning: val: 1 palette (P-mode) mask(s), e.g. {valr.Masks[0]}" "warnings printed"
            Expect.stringContains out $"error: {m16}: 16-bit mask" "problems printed"
            Expect.stringContains out "2 problem(s)" "counted"
        }
        test "missing frame, missing mask: clear errors naming the file; the check reports both at once" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "broken"
            Synth.generate (tiny Subset.S4 2) root |> ignore
            let rv = Avsbench.records Subset.S4 root "val"
            let rt = Avsbench.records Subset.S4 root "test"
            File.Delete rv[0].Frames[2]
            File.Delete rt[0].Masks[3]
            throwsMentioning<FileNotFoundException> (Path.GetFileName rv[0].Frames[2]) (fun () -> Avsbench.records Subset.S4 root "val" |> ignore)
            throwsMentioning<FileNotFoundException> (Path.GetFileName rt[0].Masks[3]) (fun () -> Avsbench.records Subset.S4 root "test" |> ignore)
            let check = DataCheck.run root 2
            Expect.equal check.Problems.Length 2 $"""both problems: {String.Join("; ", check.Problems)}"""
        }
        test "CSV without a column and unknown split name the CSV" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "csv"
            let rep = Synth.generate (tiny Subset.S4 3) root
            let csv = Path.Combine(rep.Root, "s4_meta_data.csv")
            let lines = File.ReadAllLines csv
            File.WriteAllLines(csv, lines |> Array.map (fun l -> let c = l.Split(',') in String.Join(",", [| c[0]; c[1]; c[3] |])))
            throwsMentioning<InvalidDataException> "'category'" (fun () -> Avsbench.records Subset.S4 root "train" |> ignore)
            throwsMentioning<InvalidDataException> "s4_meta_data.csv" (fun () -> Avsbench.records Subset.S4 root "train" |> ignore)
            File.WriteAllLines(csv, lines |> Array.mapi (fun i l -> if i = 1 then l.Replace(",train", ",training") else l))
            throwsMentioning<InvalidDataException> "unknown split 'training'" (fun () -> Avsbench.records Subset.S4 root "val" |> ignore)
            let check = DataCheck.run root 2
            Expect.exists check.Problems (fun p -> p.Contains "training" && p.Contains "s4_meta_data.csv") "the check reports it"
            throwsMentioning<ArgumentException> "unknown split 'dev'" (fun () -> Avsbench.records Subset.S4 root "dev" |> ignore)
        }
        test "a unicode video id is read like any other" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "unicode"
            let rep = Synth.generate (tiny Subset.MS3 4) root
            let v = rep.Videos |> Array.find (fun v -> v.Split = "val")
            let uid = "vidéo_日本_ß"
            for f in Directory.GetFiles(rep.Root, $"*{v.Id}*", SearchOption.AllDirectories) |> Array.sortByDescending (fun f -> f.Length) do
                File.Move(f, Path.Combine(Path.GetDirectoryName f, Path.GetFileName(f).Replace(v.Id, uid)))
            for d in Directory.GetDirectories(rep.Root, v.Id, SearchOption.AllDirectories) do
                Directory.Move(d, Path.Combine(Path.GetDirectoryName d, uid))
            let csv = Path.Combine(rep.Root, "ms3_meta_data.csv")
            File.WriteAllText(csv, File.ReadAllText(csv).Replace(v.Id, uid))
            let r = Avsbench.records Subset.MS3 root "val" |> Array.exactlyOne
            Expect.equal r.Id uid "unicode id"
            Expect.equal (Avsbench.loadVideo LoadOptions.Default r).Frames.Length 5 "frames load"
            let check = DataCheck.run root 2
            Expect.isTrue check.Ok $"""the check passes: {String.Join("; ", check.Problems)}"""
        }
        test "a truncated PNG is an error, not a partly decoded image; bad mask values are reported" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "trunc"
            Synth.generate (tiny Subset.S4 5) root |> ignore
            let r = Avsbench.records Subset.S4 root "test" |> Array.exactlyOne
            let bytes = File.ReadAllBytes r.Frames[1]
            File.WriteAllBytes(r.Frames[1], bytes[.. bytes.Length * 2 / 3])
            throwsMentioning<InvalidDataException> (Path.GetFileName r.Frames[1]) (fun () -> ImageIO.readRgb r.Frames[1] |> ignore)
            let m = ImageIO.readLabels r.Masks[0]
            ImageIO.write r.Masks[0] { m with Pixels = m.Pixels |> Array.map (fun v -> if v = 255uy then 128uy else v) }
            let check = DataCheck.run root 2
            Expect.exists check.Problems (fun p -> p.Contains(Path.GetFileName r.Frames[1]) && p.Contains "truncated") "truncated frame reported"
            Expect.exists check.Problems (fun p -> p.Contains(Path.GetFileName r.Masks[0]) && p.Contains "128") "mask value reported"
        }
        test "AVSS raw originals (no processed_* folders) are resized on the fly to the 224-style eval size" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "raw"
            let rep = Synth.generate (tiny Subset.AVSS 6) root
            for d in Directory.GetDirectories(rep.Root, "processed_*", SearchOption.AllDirectories) do Directory.Delete(d, true)
            let r = Avsbench.records Subset.AVSS root "test" |> Array.exactlyOne
            Expect.isTrue r.Raw "raw originals"
            let v = Avsbench.loadVideo { LoadOptions.Default with FrameSize = Some 64; EvalGtSize = 56 } r
            Expect.equal (v.Frames[0].Width, v.Masks[0].Width) (64, 56) "frames to FrameSize, eval GT to EvalGtSize"
            let planned = rep.Videos |> Array.find (fun p -> p.Id = r.Id)
            let direct = Synth.classMask planned 0 56
            let agree = Array.fold2 (fun s (a: byte) b -> if a = b then s + 1 else s) 0 v.Masks[0].Pixels direct
            Expect.isGreaterThan (float agree / float direct.Length) 0.97 "nearest-resized labels match the analytic ones"
        }
        test "S4 raw AVSBench-object tree (s4_data/visual_frames, gt_masks) is read and resized on the fly" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "s4raw"
            let rep = Synth.generate (tiny Subset.S4 8) root
            let d = rep.Root
            Directory.Move(Path.Combine(d, "s4_data_384", "visual_frames_384"), Path.Combine(d, "s4_data", "visual_frames"))
            Directory.CreateDirectory(Path.Combine(d, "s4_data", "gt_masks")) |> ignore
            Directory.Move(Path.Combine(d, "s4_data_384", "gt_masks_384", "train"), Path.Combine(d, "s4_data", "gt_masks", "train"))
            for s in [ "val"; "test" ] do
                Directory.Move(Path.Combine(d, "s4_data_384", "gt_masks_224", s), Path.Combine(d, "s4_data", "gt_masks", s))
            for split in [ "train"; "test" ] do
                let r = Avsbench.records Subset.S4 root split |> Array.head
                Expect.isTrue r.Raw "raw tree chosen when the 384 tree is absent"
                Expect.stringContains r.Frames[0] "visual_frames" "raw frames"
                let v = Avsbench.loadVideo { LoadOptions.Default with FrameSize = Some 64; EvalGtSize = 48 } r
                Expect.equal v.Frames[0].Width 64 "frames resized to FrameSize"
                Expect.equal v.Masks[0].Width (if split = "train" then 64 else 48) "masks resized (train: FrameSize, eval: EvalGtSize)"
                Expect.isTrue (v.Masks[0].Pixels |> Array.forall (fun p -> p <= 1uy)) "0/1"
            Expect.isTrue (DataCheck.run root 2).Ok "the check accepts the raw tree"
        }
        test "vct data check exits non-zero and lists the problems; vct synth writes a dataset that passes" {
            use tmp = new TempDir("vct-data")
            let root = tmp.Folder "cli"
            let code, out, err = runVct [ "synth"; "--kind"; "s4"; "--out"; root; "--train"; "2"; "--val"; "1"; "--test"; "1"; "--size"; "40" ]
            Expect.equal code 0 $"synth exit code; stderr: {err}"
            Expect.stringContains out "shuffled audio" "prints the baselines"
            let code, out, _ = runVct [ "data"; "check"; root ]
            Expect.equal code 0 $"check passes: {out}"
            let r = Avsbench.records Subset.S4 root "train"
            File.Delete r[0].Frames[0]
            let code, out, _ = runVct [ "data"; "check"; root ]
            Expect.notEqual code 0 "non-zero exit"
            Expect.stringContains out (Path.GetFileName r[0].Frames[0]) "names the missing frame"
        }
    ]

let private greyVideo (frames: int) (w: int) (h: int) =
    // frames carry their mask (object = 200, background = 0) so geometry can be checked after augmentation
    let rng = Random 11
    let masks =
        Array.init frames (fun _ ->
            let cx, cy, r = rng.Next(w), rng.Next(h), 5 + rng.Next(w / 3)
            { Width = w; Height = h; Channels = 1
              Pixels = Array.init (w * h) (fun i -> let x, y = i % w, i / w in if (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r then 1uy else 0uy) })
    let fr = masks |> Array.map (fun m -> { Width = w; Height = h; Channels = 3; Pixels = Array.init (w * h * 3) (fun i -> m.Pixels[i / 3] * 200uy) })
    let record =
        { Id = "v"; Split = "train"; Kind = Subset.MS3; Category = ""; CategoryLabel = 0; Frames = [||]; Masks = [||]; MaskFrames = [||]
          PreMasks = [||]; Audio = AudioSource.Wav ""; VidTemporalFlag = [||]; GtTemporalFlag = [||]; Raw = false }
    { Record = record; Frames = fr; Masks = masks; PreMasks = fr }

[<Tests>]
let augment =
    testList "Data.Augment" [
        test "deterministic for a seed; another seed draws other parameters" {
            let v = greyVideo 3 60 60
            let o = { AugmentOptions.Default with CropSize = 48 }
            let a = Augment.video o (Random 4) v
            let b = Augment.video o (Random 4) v
            Expect.equal a b "same seed, same output"
            let others = [ for s in 5 .. 12 -> Augment.video o (Random s) v ]
            Expect.exists others (fun c -> c.ShortSide <> a.ShortSide || c.CropX <> a.CropX || c.Flip <> a.Flip) "parameters vary with the seed"
        }
        test "geometry is shared by frames, masks and Maskiges; padding is 128 / 255; size is the crop" {
            let v = greyVideo 5 60 60
            let o = { AugmentOptions.Default with CropSize = 48; ColorJitter = false }
            for s in 0 .. 9 do
                let a = Augment.video o (Random s) v
                Expect.isTrue (Array.forall (fun (f: Image) -> f.Width = 48 && f.Height = 48) (Array.concat [ a.Frames; a.Masks; a.PreMasks ])) "crop size"
                for t in 0 .. 4 do
                    let f, m = a.Frames[t], a.Masks[t]
                    let agree (i: int) =
                        let g = f.Pixels[3 * i]
                        match m.Pixels[i] with
                        | 255uy -> g = 128uy
                        | 1uy -> g > 150uy
                        | _ -> g < 50uy
                    let ok = Array.init m.Pixels.Length agree |> Array.filter id |> Array.length
                    Expect.isGreaterThan (float ok / float m.Pixels.Length) 0.95 $"seed {s} frame {t}: frame and mask aligned"
                    Expect.equal a.PreMasks[t].Pixels a.Frames[t].Pixels "Maskige follows the frame (no jitter here)"
                Expect.contains (Augment.shortSides 48) a.ShortSide "short side from the official choices"
        }
        test "the colour jitter is redrawn for every image" {
            let img = { Width = 16; Height = 16; Channels = 3; Pixels = Array.init (16 * 16 * 3) (fun i -> byte (40 + i % 170)) }
            let v = { greyVideo 5 16 16 with Frames = Array.create 5 img; PreMasks = [||] }
            let a = Augment.video { AugmentOptions.Default with CropSize = 16 } (Random 1) v
            let distinct = a.Frames |> Array.map (fun f -> f.Pixels) |> Array.distinct
            Expect.isGreaterThan distinct.Length 2 "identical frames come out differently jittered"
        }
        test "the batch loader is deterministic whatever the worker count, bounded, and reshuffles per epoch" {
            let recs = Array.init 11 (fun i -> { (greyVideo 1 4 4).Record with Id = string i })
            let mutable inFlight = 0
            let mutable peak = 0
            let mk workers =
                BatchLoader(recs, { LoaderOptions.Default with BatchSize = 3; Workers = workers; Prefetch = 2; Seed = 9 }, fun r rng ->
                    let n = Threading.Interlocked.Increment &inFlight
                    if n > peak then peak <- n
                    r.Id, rng.Next())
            let consume (l: BatchLoader<string * int>) e =
                [ for b in l.Epoch e do
                      Threading.Thread.Sleep 20
                      Threading.Interlocked.Add(&inFlight, -b.Length) |> ignore
                      yield b ]
            let l1, l2 = mk 1, mk 2
            let a = consume l1 0
            Expect.equal a.Length 3 "11 videos, batch 3, drop last"
            Expect.equal a (consume l2 0) "same batches with 2 workers"
            Expect.notEqual (consume l1 1) a "another epoch, another order"
            Expect.isLessThanOrEqual peak ((2 + 2) * 3) "at most prefetch + in-progress batches are held"
        }
        test "the stream runs on across epochs with exactly the batches of each epoch, and stops when disposed" {
            let recs = Array.init 7 (fun i -> { (greyVideo 1 4 4).Record with Id = string i })
            let made = ref 0
            let mk workers =
                BatchLoader(recs, { LoaderOptions.Default with BatchSize = 2; Workers = workers; Prefetch = 2; Seed = 4 }, fun r rng ->
                    Threading.Interlocked.Increment(&made.contents) |> ignore
                    r.Id, rng.Next())
            for workers in [ 0; 2 ] do
                let l = mk workers
                let perEpoch = [ for e in 3 .. 5 -> [ for b in l.Epoch e -> b ] ]
                let streamed = l.Stream 3 |> Seq.take (3 * 3) |> List.ofSeq
                Expect.equal (streamed |> List.map fst) [ 3; 3; 3; 4; 4; 4; 5; 5; 5 ] $"{workers} workers: epochs in order"
                Expect.equal (streamed |> List.map snd) (List.concat perEpoch) $"{workers} workers: the same batches as Epoch"
            made.Value <- 0
            do
                use e = ((mk 2).Stream 0).GetEnumerator()
                e.MoveNext() |> ignore
            let after = made.Value
            Threading.Thread.Sleep 200
            Expect.equal made.Value after "no work after the enumerator is disposed"
            Expect.isLessThanOrEqual after ((1 + 2 + 1) * 2) "only the prefetch window was decoded"
        }
    ]

[<Tests>]
let labels =
    testList "Data.Labels" [
        test "palette and grey label PNGs read as PIL's np.array(Image.open(...)) does" {
            let dir = Path.Combine(repoRoot.Value, "tests", "golden", "avsbench")
            let expected = [| 0uy; 1uy; 2uy; 3uy; 4uy; 70uy; 255uy; 0uy; 12uy; 12uy; 1uy; 0uy |]
            for f in [ "palette_labels.png"; "grey_labels.png" ] do
                let m = ImageIO.readLabels (Path.Combine(dir, f))
                Expect.equal (m.Width, m.Height) (4, 3) $"{f} size"
                Expect.equal m.Pixels expected $"{f} indices"
        }
        test "the AVSS colour map is PASCAL-VOC's bit-interleaved palette" {
            Expect.equal (Avsbench.avssColour 0) (0uy, 0uy, 0uy) "0"
            Expect.equal (Avsbench.avssColour 1) (128uy, 0uy, 0uy) "1"
            Expect.equal (Avsbench.avssColour 2) (0uy, 128uy, 0uy) "2"
            Expect.equal (Avsbench.avssColour 3) (128uy, 128uy, 0uy) "3"
            Expect.equal (Avsbench.avssColour 4) (0uy, 0uy, 128uy) "4"
            Expect.equal (Avsbench.avssColour 8) (64uy, 0uy, 0uy) "8"
        }
        test "batches become [N,3,H,W] float32 and [N,H,W] int64 tensors" {
            let img = { Width = 3; Height = 2; Channels = 3; Pixels = Array.init 18 byte }
            use t = Batch.frames [| img; img |]
            Expect.equal t.shape [| 2L; 3L; 2L; 3L |] "frames shape"
            Expect.equal (t[0, 1, 0, 2].item<float32>()) 7.0f "channel-first: pixel (x=2, y=0) green = byte 7"
            use l = Batch.labels [| { Width = 3; Height = 2; Channels = 1; Pixels = Array.init 6 byte } |]
            Expect.equal l.shape [| 1L; 2L; 3L |] "labels shape"
            Expect.equal l.dtype TorchSharp.torch.int64 "int64"
        }
    ]

/// Data/Prepare.fs: Pillow-exact resizing and the official object-tree layouts from AVSBench-semantic.
module PrepareTests =
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

/// Regression tests of the image, CSV and dataset readers and of the loader (issue #11).
module HardeningTests =
    open System
    open System.IO
    open System.Text
    open System.Threading
    open Expecto
    open Vct.Core
    open Vct.Core.Data
    open Vct.Core.Tests.Support
    open Vct.Core.Tests.Crafted

    /// How a loader scenario fails: a worker (from batch 2 on), the consumer (after its first batch), the caller's
    /// cancellation (after the first batch), in any combination.
    type private Failing = { Worker: bool; Consumer: bool; Cancel: bool }

    /// Runs one loader scenario: 2 workers, 1 batch of prefetch, batches of 2; returns the exception that ended it.
    let private loaderScenario (f: Failing) : exn =
        let workerFailed = new ManualResetEventSlim(false)
        use cts = new CancellationTokenSource()
        let loader =
            BatchLoader(fakeRecords 40, { LoaderOptions.Default with BatchSize = 2; Workers = 2; Prefetch = 1; Shuffle = false }, fun r _ ->
                if f.Worker && int r.Id >= 4 then
                    workerFailed.Set()
                    raise (InvalidDataException $"{r.Id}: worker failed")
                r.Id)
        throwsWithin 20 $"loader with %A{f}" (fun () ->
            let mutable n = 0
            for _ in loader.Epoch(0, cts.Token) do
                n <- n + 1
                if n = 1 then
                    // Let the producer block on the full queue (with its batch or its error) before the consumer stops.
                    if f.Worker then workerFailed.Wait(TimeSpan.FromSeconds 10.0) |> ignore
                    Thread.Sleep 200
                    if f.Cancel then cts.Cancel()
                    if f.Consumer then raise (InvalidOperationException "consumer failed")
            if not f.Worker && not f.Consumer && not f.Cancel then failtest "nothing failed"
            failtest $"the epoch ended normally after {n} batches")

    /// The loading error an epoch rethrows for a failing worker.
    let private isLoadingError (e: exn) =
        match e with
        | :? AggregateException as a -> a.Message.StartsWith "data loading failed" && a.Message.Contains "4: worker failed"
        | _ -> false

    [<Tests>]
    let tests =
        testList "Hardening" [
            // --- Images: a forged header never allocates or decodes past the pixel budget ---------------------------
            test "a 69-byte PNG that claims 100000x100000 pixels is refused naming the file and its size (no SIGSEGV)" {
                use tmp = new TempDir("vct-harden")
                let bytes = forgedPng 100000u 100000u
                Expect.equal bytes.Length 69 "a 69-byte file"
                let path = crafted tmp "huge.png" bytes
                let expected = $"{path}: image is 100000x100000 (10000000000 pixels), over the budget of 67108864 pixels per frame"
                for read in [ ImageIO.readRgb; ImageIO.readLabels ] do
                    let e = throwsWithin 20 "decode" (fun () -> read path |> ignore)
                    Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}"
                    Expect.equal e.Message expected "exact message"
            }

            test "a PNG whose width x height x 4 wraps to 0 in 32 bits is refused as well" {
                use tmp = new TempDir("vct-harden")
                let path = crafted tmp "wrap.png" (forgedPng 65536u 16384u)
                let e = throwsWithin 20 "decode" (fun () -> ImageIO.readRgb path |> ignore)
                Expect.equal e.Message $"{path}: image is 65536x16384 (1073741824 pixels), over the budget of 67108864 pixels per frame" "exact message"
            }

            test "a 69-byte PNG that claims 8192x8192 pixels (within the budget) is refused as implausible for its size" {
                use tmp = new TempDir("vct-harden")
                let path = crafted tmp "big.png" (forgedPng 8192u 8192u)
                let e = throwsWithin 20 "decode" (fun () -> ImageIO.readRgb path |> ignore)
                Expect.equal e.Message $"{path}: image is 8192x8192 (67108864 pixels) in a file of 69 bytes, more than 16384 pixels per byte (truncated or forged header)" "exact message"
                let allocated = within 20 "decode" (fun () -> allocatedBy (fun () -> ImageIO.readRgb path |> ignore))
                Expect.isLessThan allocated 10_000_000L "no pixel buffer allocated"
            }

            test "a palette PNG whose chunk length is near 2^32 ends the chunk walk (no wrap, no out-of-range read)" {
                use tmp = new TempDir("vct-harden")
                // Colour type 3 makes readLabels walk the chunks for PLTE; a chunk length of 0xFFFFFFF0 used to wrap.
                let ihdr = Array.concat [ be32 2u; be32 2u; [| 8uy; 3uy; 0uy; 0uy; 0uy |] ]
                let bytes =
                    Array.concat
                        [ pngSignature
                          pngChunk "IHDR" ihdr
                          be32 0xFFFFFFF0u
                          Encoding.ASCII.GetBytes "tEXt"
                          Array.zeroCreate 8 ]
                let path = crafted tmp "walk.png" bytes
                let e = throwsWithin 20 "decode" (fun () -> ImageIO.readLabels path |> ignore)
                Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}: {e.Message}"
                Expect.stringStarts e.Message $"{path}: " "names the file"
            }

            test "vct data check on a tree holding the huge-chunk WAV reports it and ends" {
                use tmp = new TempDir("vct-harden")
                let root = tmp.Folder "check"
                Synth.generate { SynthOptions.Default Subset.S4 with Seed = 2; Train = 1; Val = 1; Test = 0; Size = 40; EvalSize = 56 } root |> ignore
                let r = Avsbench.records Subset.S4 root "val" |> Array.exactlyOne
                let wav = match r.Audio with AudioSource.Wav p -> p | AudioSource.LogMelPickle p -> failtest $"{p}: not a wav"
                File.WriteAllBytes(wav, wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
                let report = within 60 "DataCheck.run" (fun () -> DataCheck.run root 2)
                Expect.equal report.Problems
                    [| $"{wav}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)" |]
                    "exactly that problem"
            }

            // --- Paths: CSV names stay one path component; writers stay inside their output folder -----------------
            test "CSV names that are absolute, hold '..', separators or NUL are refused with the CSV line" {
                use tmp = new TempDir("vct-harden")
                for value, why in
                    [ "../../evil", "holds a path separator"; "..", "is a folder reference"; ".", "is a folder reference"
                      "/etc/passwd", "holds a path separator"; "a\\b", "holds a path separator"; "nul\000x", "holds a NUL character"
                      "C:evil", "is an absolute path"; "", "is empty" ] do
                    Expect.equal (SafePath.problem value) (Some why) $"'{value}'"
                for ok in [ "-0Ab3_x"; "vidéo_日本"; "a..b"; "x y" ] do
                    Expect.equal (SafePath.problem ok) None $"'{ok}' is a plain name"
                let root = tmp.Folder "csv"
                let rep = Synth.generate { SynthOptions.Default Subset.S4 with Seed = 3; Train = 1; Val = 1; Test = 0; Size = 40; EvalSize = 56 } root
                let csv = Path.Combine(rep.Root, "s4_meta_data.csv")
                let lines = File.ReadAllLines csv
                let header = lines[0].Split(',')
                let valLine = lines |> Array.findIndex (fun l -> l.Contains ",val")
                let setCell (col: string) (v: string) =
                    let cells = lines[valLine].Split(',')
                    cells[Array.findIndex ((=) col) header] <- v
                    File.WriteAllLines(csv, lines |> Array.mapi (fun i l -> if i = valLine then String.Join(",", cells) else l))
                setCell "name" "../../../outside"
                let e = throwsWithin 20 "records" (fun () -> Avsbench.records Subset.S4 root "val" |> ignore)
                Expect.isTrue (e :? InvalidDataException) $"InvalidDataException, got {e.GetType().Name}"
                Expect.equal e.Message $"{csv}: line {valLine + 1}: video id '../../../outside' holds a path separator (it must be a plain file name)" "exact message"
                let report = within 60 "DataCheck.run" (fun () -> DataCheck.run root 2)
                Expect.contains report.Problems e.Message "the check reports it"
                setCell "category" ".."
                let e = throwsWithin 20 "records" (fun () -> Avsbench.records Subset.S4 root "val" |> ignore)
                Expect.equal e.Message $"{csv}: line {valLine + 1}: category '..' is a folder reference (it must be a plain file name)" "exact message"
            }

            test "prepare refuses a vid that would write outside the output folder, naming the CSV line" {
                use tmp = new TempDir("vct-harden")
                let sem = tmp.Folder "sem"
                let meta = semanticTree sem "../../escape" "u"
                let out = tmp.Folder "out"
                let e = throwsWithin 60 "objectTree" (fun () -> Prepare.objectTree Subset.MS3 sem out ignore |> ignore)
                Expect.equal e.Message $"{meta}: line 2: vid '../../escape' holds a path separator (it must be a plain file name)" "exact message"
                Expect.isEmpty (Directory.GetFiles(out, "*", SearchOption.AllDirectories)) "nothing written"
            }

            test "prepare does not write through a symbolic link that leads out of the output folder" {
                use tmp = new TempDir("vct-harden")
                let sem = tmp.Folder "sem"
                semanticTree sem "v" "u" |> ignore
                let out = tmp.Folder "out"
                let outside = tmp.Folder "outside"
                let root = Path.Combine(out, "Multi-sources", "ms3_data_384")
                Directory.CreateDirectory root |> ignore
                let link = Path.Combine(root, "visual_frames_384")
                Directory.CreateSymbolicLink(link, outside) |> ignore
                let target = Path.Combine(root, "visual_frames_384", "v", "v_1.png")
                let e = throwsWithin 60 "objectTree" (fun () -> Prepare.objectTree Subset.MS3 sem out ignore |> ignore)
                Expect.isTrue (e :? IOException) $"IOException, got {e.GetType().Name}"
                Expect.equal e.Message
                    $"{target}: refusing to write through the symbolic link {link} -> {outside}, which leads outside the output folder {root}"
                    "exact message"
                Expect.isEmpty (Directory.GetFiles(outside, "*", SearchOption.AllDirectories)) "nothing written outside"
                // A link that stays inside the folder is followed as usual.
                Directory.Delete link
                Directory.CreateDirectory(Path.Combine(root, "real")) |> ignore
                Directory.CreateSymbolicLink(link, Path.Combine(root, "real")) |> ignore
                let rep = within 60 "objectTree" (fun () -> Prepare.objectTree Subset.MS3 sem out ignore)
                Expect.equal rep.Videos 1 "prepared"
                Expect.isTrue (File.Exists(Path.Combine(root, "real", "v", "v_1.png"))) "written through the inside link"
            }

            // --- Loader: a failing worker, a failing consumer and cancellation, in any combination, end --------------
            test "loader: a failing worker ends the epoch with its error" {
                let e = loaderScenario { Worker = true; Consumer = false; Cancel = false }
                Expect.isTrue (isLoadingError e) $"the loading error, got {e.GetType().Name}: {e.Message}"
            }
            test "loader: a failing consumer stops the workers" {
                let e = loaderScenario { Worker = false; Consumer = true; Cancel = false }
                Expect.equal e.Message "consumer failed" "the consumer's error"
            }
            test "loader: cancellation stops the epoch" {
                let e = loaderScenario { Worker = false; Consumer = false; Cancel = true }
                Expect.isTrue (e :? OperationCanceledException) $"cancelled, got {e.GetType().Name}: {e.Message}"
            }
            test "loader: a consumer failing while a worker fails on a full queue ends (was a deadlock)" {
                let e = loaderScenario { Worker = true; Consumer = true; Cancel = false }
                Expect.equal e.Message "consumer failed" "the consumer's error"
            }
            test "loader: cancellation while a worker fails on a full queue ends" {
                let e = loaderScenario { Worker = true; Consumer = false; Cancel = true }
                Expect.isTrue (e :? OperationCanceledException || isLoadingError e) $"cancelled or the loading error, got {e.GetType().Name}: {e.Message}"
            }
            test "loader: a consumer failing after cancelling ends" {
                let e = loaderScenario { Worker = false; Consumer = true; Cancel = true }
                Expect.equal e.Message "consumer failed" "the consumer's error"
            }
            test "loader: a failing worker, a failing consumer and cancellation together end" {
                let e = loaderScenario { Worker = true; Consumer = true; Cancel = true }
                Expect.equal e.Message "consumer failed" "the consumer's error"
            }
        ]

/// Generated malformed PNG, JPEG, label2idx.json and CSV files (Generators.fs) through the readers.
module FuzzTests =
    open System
    open System.IO
    open Expecto
    open FsCheck.FSharp
    open Vct.Core
    open Vct.Core.Data
    open Vct.Core.Tests.Generators

    let private imageSeeds (ext: string) =
        [| for w, h, c in [ 4, 3, 3; 5, 5, 1; 16, 2, 3 ] ->
               let p = Path.Combine(fuzzDir.Value, $"seed-{w}x{h}x{c}{ext}")
               ImageIO.write p { Image.Create(w, h, c) with Pixels = Array.init (w * h * c) (fun i -> byte (i * 37)) }
               File.ReadAllBytes p |]

    /// A tiny S4 tree whose metadata CSV each case replaces; records must fail naming a file or stay inside the root.
    let private csvTree =
        lazy
            (let root = Path.Combine(fuzzDir.Value, "tree")
             let rep = Synth.generate { SynthOptions.Default Subset.S4 with Seed = 1; Train = 1; Val = 1; Test = 0; Size = 32; EvalSize = 32 } root
             rep.Root)

    let private readRecords (csvPath: string) =
        let root = csvTree.Value
        let csv = Path.Combine(root, "s4_meta_data.csv")
        File.Copy(csvPath, csv, true)
        let full = Path.GetFullPath root + string Path.DirectorySeparatorChar
        try
            for split in Avsbench.splits do
                for r in Avsbench.recordsWith Subset.S4 root DataTree.Auto split ignore do
                    for p in Array.concat [ r.Frames; r.Masks; r.PreMasks; [| (match r.Audio with AudioSource.Wav p | AudioSource.LogMelPickle p -> p) |] ] do
                        if not ((Path.GetFullPath p).StartsWith full) then failtest $"{csvPath}: record {r.Id} reads {p}, outside {root}"
        with
        | :? AssertException -> reraise ()
        | e when e.Message.Contains csv ->
            // The error names the tree's CSV (the copy of the generated file): report it under the generated name.
            raise (InvalidDataException(e.Message.Replace(csv, csvPath), e))

    /// Reads a generated label2idx.json as the AVSS class map of a folder that has only it and a metadata.csv.
    let private readClassMap (jsonPath: string) =
        let root = Path.Combine(fuzzDir.Value, $"avss-{Guid.NewGuid():N}")
        Directory.CreateDirectory root |> ignore
        File.WriteAllText(Path.Combine(root, "metadata.csv"), "vid,uid,label,split\n")
        let target = Path.Combine(root, "label2idx.json")
        File.Copy(jsonPath, target)
        try Avsbench.avssClasses root |> ignore
        with e when e.Message.Contains target -> raise (InvalidDataException(e.Message.Replace(target, jsonPath), e))

    [<Tests>]
    let tests =
        testList "Fuzz" [
            prop 300 "PNG: mutated valid files, RGB and labels" (Gen.delay (fun () -> mutated (imageSeeds ".png"))) "a.png" (fun p ->
                try ImageIO.readRgb p |> ignore
                finally ImageIO.readLabels p |> ignore)
            prop 450 "PNG: forged headers (huge, wrapping sizes; forged PLTE lengths)" forgedPng "b.png" (fun p ->
                try ImageIO.readRgb p |> ignore
                finally ImageIO.readLabels p |> ignore)
            prop 300 "JPEG: mutated valid files" (Gen.delay (fun () -> mutated (imageSeeds ".jpg"))) "a.jpg" (ImageIO.readRgb >> ignore)
            prop 300 "label2idx.json: class maps" (Gen.delay (fun () ->
                mutated [| Text.Encoding.UTF8.GetBytes "{\"background\": 0, \"dog\": 1, \"car\": 2}"; Text.Encoding.UTF8.GetBytes "[1, {\"a\": -1}]" |])) "label2idx.json" readClassMap
            prop 450 "CSV: parser" (s4Csv |> Gen.map Text.Encoding.UTF8.GetBytes) "a.csv" (Avsbench.readCsv >> ignore)
            prop 300 "CSV: dataset records never leave the root" (s4Csv |> Gen.map Text.Encoding.UTF8.GetBytes) "b.csv" readRecords
        ]
