namespace Vct.Core.Data

open System
open System.IO
open System.Threading
open System.Threading.Tasks
open SkiaSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio

/// The result of `DataCheck.run`.
type CheckReport =
    { Root: string
      Kind: Subset option
      /// Videos per split that were read without a problem.
      Videos: (string * int)[]
      /// Every problem found, one line each, naming the file.
      Problems: string[]
      /// What training will accept but the user should know (palette masks, short audio, empty ground truth).
      Warnings: string[] }
    /// True when no problem was found (warnings do not count).
    member r.Ok = r.Problems.Length = 0

/// Validation of a dataset tree (`vct data check`): reports every problem at once instead of stopping at the first,
/// reading every file through the readers training uses (the mask decoding, the subset's audio rule).
[<RequireQualifiedAccess>]
module DataCheck =
    /// Most pixels a frame may have (4096 x 4096): evaluation runs the model on frames at their stored size, and a
    /// larger frame costs gigabytes to decode and run.
    let framePixelBudget = 4096L * 4096L

    let private message (e: exn) =
        match e with
        | :? AggregateException as a when a.InnerExceptions.Count = 1 -> a.InnerExceptions[0].Message
        | e -> e.Message

    /// Per split: masks read, masks with an object pixel, palette masks (and the first of them).
    type private SplitStats() =
        member val Masks = 0 with get, set
        member val NonEmpty = 0 with get, set
        member val Palette = 0 with get, set
        member val FirstPalette = "" with get, set

    /// Width and height from the image header, without decoding the pixels (None: not decodable; the decoder reports it).
    let private headerSize (path: string) =
        try
            use codec = SKCodec.Create path
            if isNull codec then None else Some(codec.Info.Width, codec.Info.Height)
        with _ -> None

    /// Checks one decoded video: frame sizes agree and fit the pixel budget, masks hold legal values and sizes,
    /// Maskiges match their frames, the audio gives the examples the subset uses.
    let private checkVideo (numClasses: int) (r: VideoRecord) (add: string -> unit) (warn: string -> unit) (stats: SplitStats) =
        let frames =
            r.Frames |> Array.choose (fun p ->
                match headerSize p with
                | Some(w, h) when int64 w * int64 h > framePixelBudget ->
                    add $"{p}: frame is {w}x{h} ({int64 w * int64 h} pixels), over the frame pixel budget of {framePixelBudget} (4096x4096); downscale the frames"
                    None
                | _ -> try Some(p, ImageIO.readRgb p) with e -> add (message e); None)
        // Masks as training reads them: S4/MS3 grey 0/255 (palette masks through their palette), AVSS class ids.
        let readMask (p: string) =
            if r.Kind = Subset.AVSS then ImageIO.readLabels p, { BitDepth = 8; Palette = false }
            else ImageIO.readBinaryMask p
        match frames with
        | [||] -> ()
        | _ ->
            let _, f0 = frames[0]
            for p, f in frames do
                if f.Width <> f0.Width || f.Height <> f0.Height then
                    add $"{p}: frame is {f.Width}x{f.Height}, the video's first frame is {f0.Width}x{f0.Height}"
            let mutable first = None
            for i in 0 .. r.Masks.Length - 1 do
                let p = r.Masks[i]
                try
                    let m, storage = readMask p
                    let isTrain = r.Split = "train"
                    if isTrain && not r.Raw && (m.Width <> f0.Width || m.Height <> f0.Height) then
                        add $"{p}: mask is {m.Width}x{m.Height}, its frame is {f0.Width}x{f0.Height}"
                    match first with
                    | Some(w, h) when m.Width <> w || m.Height <> h ->
                        add $"{p}: mask is {m.Width}x{m.Height}, the video's first mask is {w}x{h}"
                    | Some _ -> ()
                    | None -> if i = 0 then first <- Some(m.Width, m.Height)
                    if storage.BitDepth = 16 then
                        add $"{p}: 16-bit mask: its samples are scaled to 8 bits on reading, so a 16-bit {{0,1}} mask becomes empty ground truth; save it as 8-bit grey 0/255"
                    let nonEmpty =
                        match r.Kind with
                        | Subset.AVSS ->
                            match m.Pixels |> Array.tryFind (fun v -> int v >= numClasses && v <> 255uy) with
                            | Some v -> add $"{p}: class index {v} outside 0..{numClasses - 1} (and not 255)"
                            | None -> ()
                            m.Pixels |> Array.exists (fun v -> v <> 0uy && v <> 255uy)
                        | _ ->
                            match m.Pixels |> Array.tryFind (fun v -> v <> 0uy && v <> 255uy) with
                            | Some v -> add $"{p}: mask value {v} (S4/MS3 masks must be 0 or 255)"
                            | None -> ()
                            m.Pixels |> Array.exists (fun v -> v = 255uy)
                    lock stats (fun () ->
                        stats.Masks <- stats.Masks + 1
                        if nonEmpty then stats.NonEmpty <- stats.NonEmpty + 1
                        if storage.Palette then
                            stats.Palette <- stats.Palette + 1
                            if stats.FirstPalette = "" || String.CompareOrdinal(p, stats.FirstPalette) < 0 then stats.FirstPalette <- p)
                with e -> add (message e)
            r.PreMasks |> Array.iteri (fun i p ->
                try
                    let m = ImageIO.readRgb p
                    if i < frames.Length then
                        let _, f = frames[i]
                        if m.Width <> f.Width || m.Height <> f.Height then add $"{p}: pre-SAM mask is {m.Width}x{m.Height}, its frame is {f.Width}x{f.Height}"
                with e -> add (message e))
        // The audio through the subset's rule, as training reads it: every frame needs a whole example of its own.
        try
            let frameCount = r.Frames.Length
            let name = r.Kind.ToString().ToUpperInvariant()
            match r.Audio with
            | AudioSource.Wav p ->
                use clip = Examples.ofFile (Avsbench.exampleOptions r) p
                for w in clip.Warnings do warn w
                if clip.Available < frameCount then
                    let how = if r.Kind = Subset.AVSS then "zero examples stand in for the rest" else "the last is repeated for the rest"
                    warn $"{p}: {clip.Available} whole example(s) of audio ({float clip.Available * 0.96:F2} s) for the {frameCount} frames {name} uses; {how}, as the official tool does"
            | AudioSource.LogMelPickle p ->
                use ex = LogMelPickle.read p
                if ex.shape[0] < int64 frameCount then add $"{p}: {ex.shape[0]} log-mel examples for {frameCount} frames"
        with e -> add (message e)

    /// Checks every split of the dataset under `root` (an AVSBench subset folder or a folder holding one).
    /// `degree` videos are decoded in parallel.
    let run (root: string) (degree: int) : CheckReport =
        if not (Directory.Exists root) then
            { Root = root; Kind = None; Videos = [||]; Problems = [| $"{root}: no such folder" |]; Warnings = [||] }
        else
            match Avsbench.detect root with
            | None ->
                { Root = root; Kind = None; Videos = [||]; Warnings = [||]
                  Problems = [| $"{root}: no s4_meta_data.csv, ms3_meta_data.csv or metadata.csv (in it or in Single-source/, Multi-sources/, AVSBench_semantic/)" |] }
            | Some kind ->
                let problems = Collections.Concurrent.ConcurrentBag<string>()
                let warnings = Collections.Concurrent.ConcurrentBag<string>()
                let numClasses =
                    if kind = Subset.AVSS then
                        try (Avsbench.avssClasses root).Length with e -> problems.Add(message e); 71
                    else 2
                let counts =
                    [| for split in Avsbench.splits do
                           let recs =
                               try Avsbench.recordsWith kind root DataTree.Auto split (fun e -> problems.Add(message e))
                               with e -> problems.Add(message e); [||]
                           let stats = SplitStats()
                           // Pickled log-mel files go through TorchSharp on every worker: hold the finalizer gate.
                           FinalizerGate.ParallelForEach(recs, degree, fun r -> checkVideo numClasses r problems.Add warnings.Add stats)
                           if stats.Palette > 0 then
                               warnings.Add $"{split}: {stats.Palette} palette (P-mode) mask(s), e.g. {stats.FirstPalette}: decoded through their palette, white = object, every other colour = background"
                           if stats.Masks > 0 && stats.NonEmpty = 0 then
                               warnings.Add $"{split}: all {stats.Masks} ground-truth masks are empty (no object pixel); training and evaluation would see no object"
                           yield split, recs.Length |]
                { Root = root; Kind = Some kind; Videos = counts
                  Problems = problems.ToArray() |> Array.distinct |> Array.sort
                  Warnings = warnings.ToArray() |> Array.distinct |> Array.sort }
