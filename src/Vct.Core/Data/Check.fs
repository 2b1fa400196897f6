namespace Vct.Core.Data

open System
open System.IO
open Vct.Core
open Vct.Core.Audio

/// The result of `DataCheck.run`.
type CheckReport =
    { Root: string
      Kind: DatasetKind option
      /// Videos per split that were read without a problem.
      Videos: (string * int)[]
      /// Every problem found, one line each, naming the file.
      Problems: string[] }
    /// True when no problem was found.
    member r.Ok = r.Problems.Length = 0

/// Validation of a dataset tree (`vct data check`): reports every problem at once instead of stopping at the first.
[<RequireQualifiedAccess>]
module DataCheck =
    let private message (e: exn) =
        match e with
        | :? AggregateException as a when a.InnerExceptions.Count = 1 -> a.InnerExceptions[0].Message
        | e -> e.Message

    /// Checks one decoded video: frame sizes agree, masks hold legal values and sizes, Maskiges match their frames.
    let private checkVideo (numClasses: int) (r: VideoRecord) (problems: Collections.Concurrent.ConcurrentBag<string>) =
        let add (s: string) = problems.Add s
        let frames =
            r.Frames |> Array.choose (fun p ->
                try Some(p, ImageIO.readRgb p) with e -> add (message e); None)
        match frames with
        | [||] -> ()
        | _ ->
            let _, f0 = frames[0]
            for p, f in frames do
                if f.Width <> f0.Width || f.Height <> f0.Height then
                    add $"{p}: frame is {f.Width}x{f.Height}, the video's first frame is {f0.Width}x{f0.Height}"
            r.Masks |> Array.iteri (fun i p ->
                try
                    let m = ImageIO.readLabels p
                    let isTrain = r.Split = "train"
                    if isTrain && not r.Raw && (m.Width <> f0.Width || m.Height <> f0.Height) then
                        add $"{p}: mask is {m.Width}x{m.Height}, its frame is {f0.Width}x{f0.Height}"
                    if i > 0 then
                        let m0 = ImageIO.readLabels r.Masks[0]
                        if m.Width <> m0.Width || m.Height <> m0.Height then
                            add $"{p}: mask is {m.Width}x{m.Height}, the video's first mask is {m0.Width}x{m0.Height}"
                    match r.Kind with
                    | DatasetKind.Avss ->
                        match m.Pixels |> Array.tryFind (fun v -> int v >= numClasses && v <> 255uy) with
                        | Some v -> add $"{p}: class index {v} outside 0..{numClasses - 1} (and not 255)"
                        | None -> ()
                    | _ ->
                        match m.Pixels |> Array.tryFind (fun v -> v <> 0uy && v <> 255uy) with
                        | Some v -> add $"{p}: mask value {v} (S4/MS3 masks must be 0 or 255)"
                        | None -> ()
                with e -> add (message e))
            r.PreMasks |> Array.iteri (fun i p ->
                try
                    let m = ImageIO.readRgb p
                    if i < frames.Length then
                        let _, f = frames[i]
                        if m.Width <> f.Width || m.Height <> f.Height then add $"{p}: pre-SAM mask is {m.Width}x{m.Height}, its frame is {f.Width}x{f.Height}"
                with e -> add (message e))
        try
            match r.Audio with
            | AudioSource.Wav p -> Audio.load p |> ignore
            | AudioSource.LogMelPickle p -> (LogMelPickle.read p).Dispose()
        with e -> add (message e)

    /// Checks every split of the dataset under `root` (an AVSBench subset folder or a folder holding one).
    /// `degree` videos are decoded in parallel.
    let run (root: string) (degree: int) : CheckReport =
        if not (Directory.Exists root) then
            { Root = root; Kind = None; Videos = [||]; Problems = [| $"{root}: no such folder" |] }
        else
            match Avsbench.detect root with
            | None ->
                { Root = root; Kind = None; Videos = [||]
                  Problems = [| $"{root}: no s4_meta_data.csv, ms3_meta_data.csv or metadata.csv (in it or in Single-source/, Multi-sources/, AVSBench_semantic/)" |] }
            | Some kind ->
                let problems = Collections.Concurrent.ConcurrentBag<string>()
                let numClasses =
                    if kind = DatasetKind.Avss then
                        try (Avsbench.avssClasses root).Length with e -> problems.Add(message e); 71
                    else 2
                let counts =
                    [| for split in Avsbench.splits do
                           let recs =
                               try Avsbench.recordsWith kind root DataTree.Auto split (fun e -> problems.Add(message e))
                               with e -> problems.Add(message e); [||]
                           let before = problems.Count
                           // Pickled log-mel files go through TorchSharp on every worker: hold the finalizer gate.
                           FinalizerGate.ParallelForEach(recs, degree, fun r -> checkVideo numClasses r problems)
                           ignore before
                           yield split, recs.Length |]
                let all = problems.ToArray() |> Array.distinct |> Array.sort
                { Root = root; Kind = Some kind; Videos = counts; Problems = all }
