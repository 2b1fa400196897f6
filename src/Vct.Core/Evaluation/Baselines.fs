namespace Vct.Core.Evaluation

open Vct.Core
open Vct.Core.Platform
open Vct.Core.Data

/// What simple predictors score on a synthetic dataset (val + test videos, at the evaluation size), with the
/// official metrics: the ceiling (GT), audio-blind predictors, and a perfect audio-to-object model fed the audio of
/// another video (the "vision-only" control of the main training job).
type SynthBaselines =
    { /// The ground truth itself (M_J = M_F = 1 unless a frame is empty).
      Oracle: float * float
      /// Audio-blind: every visible object in every frame.
      AllObjects: float * float
      /// Audio-blind: one visible object (each object slot in turn, averaged): the expected score of a random pick.
      OneObject: float * float
      /// A perfect audio-to-category model given the audio of the next video (audio shuffled across videos).
      ShuffledAudioOracle: float * float }

/// Baselines of the built-in synthetic dataset.
[<RequireQualifiedAccess>]
module SynthStats =
    let private evalWith (kind: Subset) (size: int) (videos: SynthVideo[]) (predict: int -> SynthVideo -> int -> byte[]) =
        match kind with
        | Subset.AVSS ->
            let ev = SemanticEvaluator(MetricVariant.Vct, 9)
            videos |> Array.iteri (fun i v ->
                let gt = Array.concat [ for t in 0 .. v.Frames - 1 -> Synth.classMask v t size ] |> Array.map int
                let pr = Array.concat [ for t in 0 .. v.Frames - 1 -> predict i v t ] |> Array.map int
                ev.AddLabels(v.Id, pr, gt, v.Frames, size, size) |> ignore)
            let s = ev.Summary()
            s.MJ, s.MF
        | _ ->
            let ev = BinaryEvaluator(Subset.MS3, MetricVariant.Vct)
            videos |> Array.iteri (fun i v ->
                let gt = Array.concat [ for t in 0 .. v.Frames - 1 -> Synth.binaryMask v t size ]
                let pr = Array.concat [ for t in 0 .. v.Frames - 1 -> predict i v t ] |> Array.map float32
                ev.AddProbabilities(v.Id, pr, gt, v.Frames, size, size) |> ignore)
            let s = ev.Summary()
            s.MJ, s.MF

    /// Renders the prediction "these objects" (indices into v.Objects) for frame t.
    let private predictObjects (kind: Subset) (size: int) (v: SynthVideo) (t: int) (objs: Set<int>) : byte[] =
        Synth.objectMap v t size
        |> Array.map (fun k ->
            if k > 0 && objs.Contains(k - 1) then
                (if kind = Subset.AVSS then byte (v.Objects[k - 1].Category + 1) else 1uy)
            else 0uy)

    /// Baselines on the val and test videos of a plan, at side `size`.
    let baselines (kind: Subset) (size: int) (videos: SynthVideo[]) : SynthBaselines =
        let vs = videos |> Array.filter (fun v -> v.Split <> "train")
        let run = evalWith kind size vs
        let oracle = run (fun _ v t -> predictObjects kind size v t (Set.ofArray v.Sounding[t]))
        let all = run (fun _ v t -> predictObjects kind size v t (Set.ofList [ 0 .. v.Objects.Length - 1 ]))
        let one =
            let scores = [ for slot in 0 .. 3 -> run (fun _ v t -> predictObjects kind size v t (Set.singleton (slot % v.Objects.Length))) ]
            List.averageBy fst scores, List.averageBy snd scores
        let shuffled =
            run (fun i v t ->
                let other = vs[(i + 1) % vs.Length]
                let heard = other.Sounding[t % other.Frames] |> Array.map (fun k -> other.Objects[k].Category) |> Set.ofArray
                let objs = v.Objects |> Array.indexed |> Array.filter (fun (_, o) -> heard.Contains o.Category) |> Array.map fst
                predictObjects kind size v t (Set.ofArray objs))
        { Oracle = oracle; AllObjects = all; OneObject = one; ShuffledAudioOracle = shuffled }
