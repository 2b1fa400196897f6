/// Tests of src/Vct.Core/Evaluation: the S4/MS3 and AVSS metrics against the official evaluators, their properties,
/// `vct score` and the C# facade's evaluator.
module Vct.Core.Tests.EvaluationTests

open Vct.Core
open Vct.Core.Platform
open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open TorchSharp
open Vct.Core.Evaluation
open Vct.Core.Tests.Support

let private goldenDir () = Golden.path [ "metrics" ]

let private expected =
    lazy (JsonDocument.Parse(File.ReadAllText(Path.Combine(goldenDir (), "expected.json"))).RootElement)

let private close (what: string) (actual: float) (wanted: float) =
    Expect.floatClose { absolute = 1e-6; relative = 0.0 } actual wanted what

/// Scores the golden folder `sub` and compares M_J, M_F and every video with expected.json's `key`.
let private checkBinaryGolden (sub: string) (key: string) (variant: MetricVariant) =
    let e = expected.Value.GetProperty key
    let dir = Path.Combine(goldenDir (), sub)
    let ev = BinaryEvaluator(Subset.S4, variant)
    for v in e.GetProperty("videos").EnumerateArray() do
        let id = v.GetProperty("id").GetString()
        use _ = torch.NewDisposeScope()
        let s, g = (Score.videos (Path.Combine(dir, id + "_scores.npy") |> Path.GetDirectoryName) dir |> Array.find (fun (i, _) -> i = id) |> snd) ()
        let r = ev.Add(id, s, g)
        close $"{id}: J" r.J (v.GetProperty("j").GetDouble())
        close $"{id}: F" r.F (v.GetProperty("f").GetDouble())
    let sum = ev.Summary()
    close "M_J" sum.MJ (e.GetProperty("m_j").GetDouble())
    close "M_F" sum.MF (e.GetProperty("m_f").GetDouble())

let private randomVideo (rng: Random) (t: int) (h: int) (w: int) =
    let prob = Array.init (t * h * w) (fun _ -> float32 (rng.NextDouble()))
    let gt = Array.init (t * h * w) (fun _ -> if rng.NextDouble() < 0.3 then 1uy else 0uy)
    // some frames empty, some all ones
    if t > 1 then Array.fill gt 0 (h * w) 0uy
    if t > 2 then Array.fill gt (h * w) (h * w) 1uy
    prob, gt

[<Tests>]
let golden =
    testList "Metrics.Golden" [
        test "thresholds are torch.linspace(0, 1-1e-10, 255) in float32 (within one ulp of PyTorch 1.13's)" {
            let mine = BinaryMetrics.thresholds ()
            let official = expected.Value.GetProperty("thresholds").EnumerateArray() |> Seq.map (fun x -> float32 (x.GetDouble())) |> Array.ofSeq
            Expect.equal mine.Length 255 "255 thresholds"
            for i in 0 .. 254 do
                let a, b = mine[i], official[i]
                Expect.isTrue (a = b || MathF.BitIncrement a = b || MathF.BitDecrement a = b) $"threshold {i}: {a} vs {b}"
            Expect.equal mine[0] 0.0f "first is 0"
            Expect.equal mine[127] 0.5f "middle is exactly 0.5"
            Expect.equal mine[254] 1.0f "QUIRK: the last threshold is exactly 1.0"
            Expect.equal official[254] 1.0f "also in PyTorch"
            for i in 1 .. 254 do Expect.isLessThan mine[i - 1] mine[i] "strictly increasing"
        }
        test "S4/MS3 (VCT): every case and the summary match SemSegEvaluator to 1e-6" {
            checkBinaryGolden "binary" "binary_vct" MetricVariant.Vct
        }
        test "S4/MS3 (AVSBench, sigmoid of one logit map): every case matches utility.py to 1e-6" {
            checkBinaryGolden "binary_avsbench" "binary_avsbench" MetricVariant.AvsBench
        }
        test "S4/MS3 single-file [V,T,C,H,W] input through Score.run matches" {
            let e = expected.Value.GetProperty "binary_all_vct"
            let d = goldenDir ()
            let s = Score.run Subset.S4 MetricVariant.Vct 2 (Path.Combine(d, "binary_all_scores.npy")) (Path.Combine(d, "binary_all_gt.npy")) (fun _ _ -> ())
            close "M_J" s.MJ (e.GetProperty("m_j").GetDouble())
            close "M_F" s.MF (e.GetProperty("m_f").GetDouble())
            Expect.equal s.Videos.Length (e.GetProperty("videos").GetArrayLength()) "video count"
        }
        test "AVSS (VCT): M_J, M_F and per-class values match SemSegEvaluator_SS to 1e-6" {
            let e = expected.Value.GetProperty "avss_vct"
            let d = Path.Combine(goldenDir (), "avss")
            let s = Score.run Subset.AVSS MetricVariant.Vct 71 d d (fun _ _ -> ())
            close "M_J" s.MJ (e.GetProperty("m_j").GetDouble())
            close "M_F" s.MF (e.GetProperty("m_f").GetDouble())
            let arr (k: string) = e.GetProperty(k).EnumerateArray() |> Seq.map (fun x -> x.GetDouble()) |> Array.ofSeq
            Array.iteri2 (fun c a b -> close $"class {c} J" a b) s.ClassJ (arr "class_j")
            Array.iteri2 (fun c a b -> close $"class {c} F" a b) s.ClassF (arr "class_f")
            Expect.equal (Array.map float s.ClassFrames) (arr "class_frames") "per-class frame counts"
        }
        test "AVSS (AVSBench, padded to 10 frames): M_J and M_F match compute_color_metrics.py to 1e-6" {
            let e = expected.Value.GetProperty "avss_avsbench"
            let d = Path.Combine(goldenDir (), "avss")
            let s = Score.run Subset.AVSS MetricVariant.AvsBench 71 d d (fun _ _ -> ())
            close "M_J" s.MJ (e.GetProperty("m_j").GetDouble())
            close "M_F" s.MF (e.GetProperty("m_f").GetDouble())
        }
    ]

let private config = { FsCheckConfig.defaultConfig with maxTest = 40 }

[<Tests>]
let properties =
    testList "Metrics.Properties" [
        testPropertyWithConfig config "IoU and F are in [0, 1]" <| fun (seed: int) ->
            let rng = Random seed
            let t, h, w = rng.Next(1, 6), rng.Next(1, 12), rng.Next(1, 12)
            let prob, gt = randomVideo rng t h w
            let ev = BinaryEvaluator(Subset.MS3, MetricVariant.Vct)
            let v = ev.AddProbabilities("v", prob, gt, t, h, w)
            Expect.isTrue (v.J >= 0.0 && v.J <= 1.0) $"J = {v.J}"
            Expect.isTrue (v.F >= 0.0 && v.F <= 1.0) $"F = {v.F}"

        testPropertyWithConfig config "a perfect prediction scores 1 on S4/MS3" <| fun (seed: int) ->
            let rng = Random seed
            let t, h, w = rng.Next(1, 6), rng.Next(2, 12), rng.Next(2, 12)
            let _, gt = randomVideo rng t h w
            gt[gt.Length - 1] <- 1uy                                 // at least one non-empty frame
            let prob = gt |> Array.map (fun g -> if g = 1uy then 1.0f else 0.0f)
            let ev = BinaryEvaluator(Subset.S4, MetricVariant.Vct)
            let v = ev.AddProbabilities("v", prob, gt, t, h, w)
            close "J" v.J 1.0
            close "F" v.F 1.0

        testPropertyWithConfig config "metrics are invariant to the order of videos" <| fun (seed: int) ->
            let rng = Random seed
            let vids = Array.init (rng.Next(2, 7)) (fun i -> let p, g = randomVideo rng 3 6 5 in string i, p, g)
            let perm = vids |> Array.sortBy (fun _ -> rng.Next())
            let score (vs: (string * float32[] * byte[])[]) =
                let ev = BinaryEvaluator(Subset.S4, MetricVariant.Vct)
                for id, p, g in vs do ev.AddProbabilities(id, p, g, 3, 6, 5) |> ignore
                ev.Summary()
            let a, b = score vids, score perm
            close "M_J" a.MJ b.MJ
            close "M_F" a.MF b.MF
            let sem (vs: (string * float32[] * byte[])[]) =
                let ev = SemanticEvaluator(MetricVariant.Vct, 5)
                for id, p, g in vs do
                    ev.AddLabels(id, p |> Array.map (fun x -> int (x * 4.99f)), g |> Array.map int, 3, 6, 5) |> ignore
                ev.Summary()
            let c, d = sem vids, sem perm
            close "AVSS M_J" c.MJ d.MJ
            close "AVSS M_F" c.MF d.MF

        testPropertyWithConfig config "the F-curve is evaluated at exactly the official thresholds (p >= tau)" <| fun (seed: int) ->
            let rng = Random seed
            let thr = BinaryMetrics.thresholds ()
            let n = 40
            // probabilities on, just below and just above the thresholds, plus 0 and 1
            let prob =
                Array.init n (fun _ ->
                    let t = thr[rng.Next thr.Length]
                    match rng.Next 4 with
                    | 0 -> t
                    | 1 -> MathF.BitDecrement t
                    | 2 -> MathF.BitIncrement t
                    | _ -> float32 (rng.Next 2))
            let gt = Array.init n (fun i -> if i = 0 || rng.Next 2 = 0 then 1uy else 0uy)
            let curve = (BinaryMetrics.frameFCurve thr prob gt 0 n).Value
            for i in 0 .. thr.Length - 1 do
                let pred = prob |> Array.map (fun p -> p >= thr[i])
                let tp = Array.fold2 (fun s p g -> if p && g = 1uy then s + 1 else s) 0 pred gt
                let np = pred |> Array.filter id |> Array.length
                let ng = gt |> Array.filter ((=) 1uy) |> Array.length
                let pr = float32 tp / (float32 np + 1e-20f)
                let re = float32 tp / (float32 ng + 1e-20f)
                let f = 1.3f * pr * re / (0.3f * pr + re)
                let f = if Single.IsNaN f then 0.0f else f
                Expect.equal curve[i] f $"threshold {i} ({thr[i]})"

        testPropertyWithConfig config "AVSS: a perfect prediction scores 1 on every class it contains" <| fun (seed: int) ->
            let rng = Random seed
            let k = 6
            let gt = Array.init (2 * 5 * 4) (fun _ -> rng.Next k)
            let ev = SemanticEvaluator(MetricVariant.Vct, k)
            ev.AddLabels("v", Array.copy gt, gt, 2, 5, 4) |> ignore
            let s = ev.Summary()
            let present = gt |> Array.distinct |> Array.length
            close "M_J" s.MJ (float present / float k)
            close "M_F" s.MF (float present / float k)
            for c in 0 .. k - 1 do
                Expect.isTrue (s.ClassJ[c] >= 0.0 && s.ClassJ[c] <= 1.0 && s.ClassF[c] >= 0.0 && s.ClassF[c] <= 1.0) "in [0, 1]"

        test "an all-empty video scores F = 0 and still counts; empty GT scores the true-negative rate" {
            let ev = BinaryEvaluator(Subset.S4, MetricVariant.Vct)
            let prob = [| 0.9f; 0.1f; 0.2f; 0.3f |]
            let v = ev.AddProbabilities("empty", prob, Array.zeroCreate 4, 1, 2, 2)
            close "J = TN rate" v.J (float (3.0f / (4.0f + 1e-7f)))
            close "F" v.F 0.0
            ev.AddProbabilities("full", [| 1.0f; 1.0f; 1.0f; 1.0f |], Array.create 4 1uy, 1, 2, 2) |> ignore
            close "M_F averages both videos" (ev.Summary().MF) 0.5
        }
        test "AVSS: GT 255 pixels are not ground truth but the prediction there is predicted area" {
            let ev = SemanticEvaluator(MetricVariant.Vct, 3)
            // pixel 0: gt 255, pred 1; pixel 1: gt 1, pred 1; pixels 2-3: gt 0, pred 0
            ev.AddLabels("v", [| 1; 1; 0; 0 |], [| 255; 1; 0; 0 |], 1, 2, 2) |> ignore
            let s = ev.Summary()
            close "class 1 IoU = 1 / 2" s.ClassJ[1] 0.5
            close "class 0 IoU = 1" s.ClassJ[0] 1.0
            close "class 2 never seen scores 0" s.ClassJ[2] 0.0
            close "M_J over all classes" s.MJ ((1.0 + 0.5 + 0.0) / 3.0)
        }
        test "bad inputs name the video" {
            let ev = BinaryEvaluator(Subset.S4, MetricVariant.Vct)
            let e =
                try ev.AddProbabilities("clip7", [| 0.5f |], [| 255uy |], 1, 1, 1) |> ignore; ""
                with :? ArgumentException as x -> x.Message
            Expect.stringContains e "clip7" "names the video"
            use s = torch.zeros(5L, 3L, 4L, 4L)
            use g = torch.zeros(5L, 4L, 4L, dtype = torch.uint8)
            Expect.throwsT<ArgumentException> (fun () -> ev.Add("x", s, g) |> ignore) "3 channels rejected"
        }
    ]

[<Tests>]
let cli =
    testList "Metrics.Cli" [
        test "vct score prints the golden M_J / M_F as JSON (folder mode)" {
            let d = Path.Combine(goldenDir (), "binary")
            let code, out, err = runVct [ "score"; "--subset"; "s4"; "--scores"; d; "--gt"; d; "--quiet" ]
            Expect.equal code 0 $"exit code; stderr: {err}"
            use doc = JsonDocument.Parse out
            let e = expected.Value.GetProperty "binary_vct"
            close "m_j" (doc.RootElement.GetProperty("m_j").GetDouble()) (e.GetProperty("m_j").GetDouble())
            close "m_f" (doc.RootElement.GetProperty("m_f").GetDouble()) (e.GetProperty("m_f").GetDouble())
            Expect.equal (doc.RootElement.GetProperty("videos").GetArrayLength()) (e.GetProperty("videos").GetArrayLength()) "per-video values"
        }
        test "vct score --avsbench on AVSS pads to 10 frames" {
            let d = Path.Combine(goldenDir (), "avss")
            let code, out, err = runVct [ "score"; "--subset"; "avss"; "--scores"; d; "--gt"; d; "--avsbench"; "--quiet" ]
            Expect.equal code 0 $"exit code; stderr: {err}"
            use doc = JsonDocument.Parse out
            close "m_j" (doc.RootElement.GetProperty("m_j").GetDouble()) (expected.Value.GetProperty("avss_avsbench").GetProperty("m_j").GetDouble())
        }
        test "vct score names the file on a shape mismatch and exits non-zero" {
            let d = goldenDir ()
            let code, _, err = runVct [ "score"; "--subset"; "s4"; "--scores"; Path.Combine(d, "binary_all_gt.npy"); "--gt"; Path.Combine(d, "binary_all_gt.npy") ]
            Expect.notEqual code 0 "fails"
            Expect.stringContains err "binary_all_gt.npy" "names the file"
        }
    ]

[<Tests>]
let facade =
    testList "Metrics.Facade" [
        test "VctEvaluator.Score reports what Score.run reports" {
            let d = Path.Combine(goldenDir (), "binary")
            let r = Vct.VctEvaluator.Score(Vct.VctSubset.S4, d, d)
            close "M_J" r.MJ (expected.Value.GetProperty("binary_vct").GetProperty("m_j").GetDouble())
            Expect.stringContains r.Json "\"m_f\"" "JSON included"
        }
    ]
