namespace Vct.Core.Data

open Vct.Core
open Vct.Core.Platform
open System
open System.IO
open System.Text
open NWaves.Signals.Builders

/// Seeds derived from several integers, identical in every process (System.HashCode is randomised per process).
[<RequireQualifiedAccess>]
module DeterministicSeed =
    /// SplitMix64-style mix of the values into a non-negative int.
    let mix (values: int list) : int =
        let mutable h = 0x9E3779B97F4A7C15UL
        for v in values do
            h <- h ^^^ uint64 (uint32 v)
            h <- (h ^^^ (h >>> 30)) * 0xBF58476D1CE4E5B9UL
            h <- (h ^^^ (h >>> 27)) * 0x94D049BB133111EBUL
            h <- h ^^^ (h >>> 31)
        int (h &&& 0x7FFFFFFFUL)

/// Options of the synthetic AVS dataset.
type SynthOptions =
    { Kind: Subset
      Seed: int
      /// Videos per split (train, val, test).
      Train: int
      Val: int
      Test: int
      /// Frame side in pixels (frames are square; the folder names keep the official "_384").
      Size: int
      /// Side of the evaluation GT written to gt_masks_224 / processed_labels_semantic (the metrics' 224).
      EvalSize: int
      /// Object categories used (at most 8 distinct signatures; AVSS needs >= 8 for its classes).
      Categories: int
      /// Linear gain of the off-screen distractor (background noise, hum and clicks that belong to no object).
      DistractorGain: float }
    /// Small defaults: S4/MS3 6 categories, AVSS 8; 96x96 frames; 48/12/12 videos.
    static member Default(kind: Subset) =
        { Kind = kind; Seed = 0; Train = 48; Val = 12; Test = 12; Size = 96; EvalSize = 224
          Categories = (if kind = Subset.AVSS then 8 else 6); DistractorGain = 0.15 }

/// One object of a synthetic scene.
type SynthObject =
    { Category: int
      /// Centre (fraction of the side) in the first frame, and per-frame drift.
      X: float
      Y: float
      Dx: float
      Dy: float
      /// Radius as a fraction of the side.
      R: float }

/// A generated video: its objects, which objects sound in each frame, and the split.
type SynthVideo =
    { Id: string
      Split: string
      Frames: int
      Objects: SynthObject[]
      /// Sounding[t] = indices into Objects.
      Sounding: int[][] }

/// What was written, with the baselines measured on the val + test videos.
type SynthReport =
    { Root: string
      Kind: Subset
      Videos: SynthVideo[]
      /// Category names in id order (S4/MS3: official S4 category names; AVSS: label2idx order without background).
      CategoryNames: string[] }

/// The built-in synthetic AVS dataset: scenes of >= 2 objects of distinct categories (shape, colour and texture
/// per category), a sound signature per category (harmonic tones, chirps, band-passed noise, amplitude modulation,
/// synthesised with NWaves), only some objects sounding in each frame, off-screen distractor sounds, and GT masks of
/// the sounding objects only, written in the official AVSBench layouts so the real readers are exercised.
/// Same options, same bytes.
///
/// What the ground truth allows and what ignoring the audio gives (val + test of the default sets, seed 0, official
/// metrics at 64x64; `SynthStats.baselines`, printed by `vct synth`), M_J / M_F:
///   S4-like:  GT 1.000 / 1.000; audio-blind, all visible objects 0.444 / 0.505; audio-blind, one object 0.438 / 0.499;
///             a perfect audio-to-object model given another video's audio 0.167 / 0.254.
///   MS3-like: GT 1.000; all objects 0.551 / 0.599; one object 0.368 / 0.478; shuffled audio 0.236 / 0.330.
///   AVSS-like (9 classes, class-averaged): all objects with their true classes 0.584 / 0.593; one object
///             0.330 / 0.335; shuffled audio 0.209 / 0.213.
/// So an S4-like model above ~0.45 M_J must be using the audio.
[<RequireQualifiedAccess>]
module Synth =
    /// Official S4 category folder names used for the synthetic categories (their ids are the PAC labels).
    let s4Names = [| "helicopter"; "playing_violin"; "dog_barking"; "lawn_mowing"; "ambulance_siren"; "cat_meowing"; "playing_piano"; "race_car" |]

    /// AVSS class names (after background) for the synthetic categories.
    let avssNames = [| "helicopter"; "violin"; "dog"; "mower"; "emergency-car"; "cat"; "piano"; "car" |]

    let private sampleRate = 16000

    // Per-category appearance: RGB colour, shape id, texture id.
    let private colours =
        [| (220, 40, 40); (40, 180, 60); (40, 80, 220); (230, 200, 30); (200, 50, 200); (30, 200, 210); (240, 130, 20); (240, 240, 240) |]

    /// Is (px, py) (fractions) inside the shape of category c centred at (cx, cy) with radius r?
    let private inside (c: int) (cx: float) (cy: float) (r: float) (px: float) (py: float) =
        let dx, dy = px - cx, py - cy
        match c % 8 with
        | 0 -> dx * dx + dy * dy <= r * r                                   // disc
        | 1 -> abs dx <= r * 0.85 && abs dy <= r * 0.85                     // square
        | 2 -> dy <= r * 0.8 && dy >= -r && abs dx <= (dy + r) * 0.6        // triangle (apex up)
        | 3 -> abs dx + abs dy <= r                                         // diamond
        | 4 -> let d = dx * dx + dy * dy in d <= r * r && d >= (r * 0.5) * (r * 0.5)   // ring
        | 5 -> (abs dx <= r * 0.3 && abs dy <= r) || (abs dy <= r * 0.3 && abs dx <= r)  // cross
        | 6 -> (dx * dx) / (r * r) + (dy * dy) / (r * r * 0.36) <= 1.0     // wide ellipse
        | _ -> abs dx <= r * 0.5 && abs dy <= r                             // tall bar

    /// Texture factor in [0.55, 1] of category c at pixel (x, y) (pixels of the frame).
    let private texture (c: int) (x: int) (y: int) (size: int) =
        let s = max 2 (size / 24)
        match c % 4 with
        | 0 -> 1.0
        | 1 -> if (x / s) % 2 = 0 then 1.0 else 0.6                          // vertical stripes
        | 2 -> if ((x / s) + (y / s)) % 2 = 0 then 1.0 else 0.55             // checker
        | _ -> if ((x + y) / s) % 2 = 0 then 1.0 else 0.65                   // diagonal stripes

    /// Object position in frame t.
    let private at (o: SynthObject) (t: int) = o.X + o.Dx * float t, o.Y + o.Dy * float t

    /// Label map of frame t at side n: 0 = background, k + 1 = object k (later objects occlude earlier ones).
    let objectMap (v: SynthVideo) (t: int) (n: int) : int[] =
        let m = Array.zeroCreate<int> (n * n)
        v.Objects |> Array.iteri (fun k o ->
            let cx, cy = at o t
            for y in 0 .. n - 1 do
                for x in 0 .. n - 1 do
                    if inside o.Category cx cy o.R ((float x + 0.5) / float n) ((float y + 0.5) / float n) then m[y * n + x] <- k + 1)
        m

    let private renderFrame (rng: Random) (v: SynthVideo) (t: int) (size: int) (bg: (float * float * float) * (float * float * float)) : Image =
        let img = Image.Create(size, size, 3)
        let (r0, g0, b0), (r1, g1, b1) = bg
        let objs = objectMap v t size
        for y in 0 .. size - 1 do
            for x in 0 .. size - 1 do
                let i = y * size + x
                let noise = float (rng.Next(-12, 13))
                let r, g, b =
                    match objs[i] with
                    | 0 ->
                        let a = (float x + float y) / float (2 * size)
                        r0 + (r1 - r0) * a + noise, g0 + (g1 - g0) * a + noise, b0 + (b1 - b0) * a + noise
                    | k ->
                        let c = v.Objects[k - 1].Category
                        let cr, cg, cb = colours[c % colours.Length]
                        let f = texture c x y size
                        float cr * f + noise, float cg * f + noise, float cb * f + noise
                let clamp (z: float) = byte (max 0.0 (min 255.0 z))
                img.Pixels[3 * i] <- clamp r
                img.Pixels[3 * i + 1] <- clamp g
                img.Pixels[3 * i + 2] <- clamp b
        img

    /// Sound signature of category c for `n` samples (amplitude about 1), deterministic per category and `rng`.
    let signature (rng: Random) (c: int) (n: int) : float32[] =
        let sr = float sampleRate
        let sine (f: float) = (SineBuilder().SetParameter("freq", f).OfLength(n).SampledAt(sampleRate).Build()).Samples
        let noise () = Array.init n (fun _ -> float32 (rng.NextDouble() * 2.0 - 1.0))
        let bandNoise (lo: float) (hi: float) =
            let f = NWaves.Filters.Butterworth.BandPassFilter(lo / sr, hi / sr, 2)
            let x = noise ()
            let y = x |> Array.map (fun s -> f.Process s)
            let peak = y |> Array.fold (fun m s -> max m (abs s)) 1e-6f
            y |> Array.map (fun s -> s / peak)
        let jitter = 1.0 + (rng.NextDouble() - 0.5) * 0.04
        let harmonic (f0: float) (odd: bool) =
            let hs = if odd then [ 1.0; 3.0; 5.0; 7.0 ] else [ 1.0; 2.0; 3.0; 4.0 ]
            let parts = hs |> List.map (fun h -> sine (f0 * jitter * h) |> Array.map (fun s -> s / float32 h))
            Array.init n (fun i -> parts |> List.sumBy (fun p -> p[i]) |> fun s -> s * 0.6f)
        let chirp (f0: float) (f1: float) (period: float) =
            let len = int (period * sr)
            let one = (ChirpBuilder().SetParameter("start", f0 * jitter).SetParameter("end", f1 * jitter).OfLength(len).SampledAt(sampleRate).Build()).Samples
            Array.init n (fun i -> one[i % len])
        let am (carrier: float) (rate: float) =
            let c = sine (carrier * jitter)
            Array.init n (fun i -> c[i] * float32 (0.5 + 0.5 * sin (2.0 * Math.PI * rate * float i / sr)))
        let pulsed (x: float32[]) (rate: float) =
            Array.init n (fun i -> if (float i / sr * rate) % 1.0 < 0.5 then x[i] else 0.0f)
        match c % 8 with
        | 0 -> harmonic 220.0 false
        | 1 -> chirp 400.0 2400.0 0.25
        | 2 -> bandNoise 2500.0 4500.0
        | 3 -> am 1000.0 6.0
        | 4 -> harmonic 523.0 true
        | 5 -> chirp 3000.0 800.0 0.5
        | 6 -> pulsed (bandNoise 150.0 500.0) 4.0
        | _ -> am 3000.0 15.0

    /// Off-screen distractor: brown-ish noise, a 50 Hz hum and sparse clicks, none of them an object's signature.
    let private distractor (rng: Random) (n: int) : float32[] =
        let mutable acc = 0.0
        let brown = Array.init n (fun _ -> acc <- 0.98 * acc + (rng.NextDouble() - 0.5) * 0.2; float32 acc)
        let peak = brown |> Array.fold (fun m s -> max m (abs s)) 1e-6f
        Array.init n (fun i ->
            let hum = 0.3 * sin (2.0 * Math.PI * 50.0 * float i / float sampleRate)
            let click = if rng.Next 4000 = 0 then 0.8 else 0.0
            brown[i] / peak * 0.7f + float32 hum + float32 click)

    let private writePcm16 (path: string) (samples: float32[]) =
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        if not (Directory.Exists dir) then Directory.CreateDirectory dir |> ignore
        Vct.Core.Platform.AtomicFile.writeWith path (fun tmp ->
            use fs = File.Create tmp
            use w = new BinaryWriter(fs)
            let dataBytes = samples.Length * 2
            w.Write(Encoding.ASCII.GetBytes "RIFF"); w.Write(36 + dataBytes); w.Write(Encoding.ASCII.GetBytes "WAVE")
            w.Write(Encoding.ASCII.GetBytes "fmt "); w.Write(16); w.Write(1s); w.Write(1s); w.Write(sampleRate); w.Write(sampleRate * 2)
            w.Write(2s); w.Write(16s)
            w.Write(Encoding.ASCII.GetBytes "data"); w.Write(dataBytes)
            for s in samples do w.Write(int16 (Math.Round(float (max -1.0f (min 1.0f s)) * 32767.0))))

    /// The clip of a video: per frame (1 s), the signatures of the sounding objects plus the distractor.
    let private audio (rng: Random) (gain: float) (v: SynthVideo) : float32[] =
        let n = sampleRate * v.Frames
        let out = Array.zeroCreate<float32> n
        let sigs = v.Objects |> Array.map (fun o -> signature rng o.Category n)
        let dis = distractor rng n
        let seg = sampleRate
        for t in 0 .. v.Frames - 1 do
            for k in v.Sounding[t] do
                for i in t * seg .. (t + 1) * seg - 1 do
                    // 10 ms fades at the segment edges avoid clicks that would leak across frames
                    let e = min (i - t * seg) ((t + 1) * seg - 1 - i)
                    let fade = float32 (min 1.0 (float e / 160.0))
                    out[i] <- out[i] + 0.45f * sigs[k][i] * fade
        for i in 0 .. n - 1 do
            out[i] <- (out[i] + float32 gain * dis[i]) * 0.8f
        out

    let private makeVideo (rng: Random) (o: SynthOptions) (split: string) (index: int) : SynthVideo =
        let frames =
            match o.Kind with
            | Subset.AVSS -> if rng.Next 2 = 0 then 5 else 10
            | _ -> 5
        let nObj =
            match o.Kind with
            | Subset.S4 -> rng.Next(2, 4)
            | _ -> rng.Next(2, min 4 o.Categories + 1)
        let cats = Array.init o.Categories id |> Array.sortBy (fun _ -> rng.Next()) |> Array.take nObj
        // Objects on a jittered grid of quadrants so that they rarely cover each other.
        let cells = [| (0.3, 0.3); (0.7, 0.3); (0.3, 0.7); (0.7, 0.7) |] |> Array.sortBy (fun _ -> rng.Next())
        let objs =
            Array.init nObj (fun k ->
                let x, y = cells[k]
                { Category = cats[k]
                  X = x + (rng.NextDouble() - 0.5) * 0.1
                  Y = y + (rng.NextDouble() - 0.5) * 0.1
                  Dx = (rng.NextDouble() - 0.5) * 0.02
                  Dy = (rng.NextDouble() - 0.5) * 0.02
                  R = 0.15 + rng.NextDouble() * 0.07 })
        let sounding =
            match o.Kind with
            | Subset.S4 -> let k = rng.Next nObj in Array.create frames [| k |]
            | _ ->
                Array.init frames (fun _ ->
                    let s = [| for k in 0 .. nObj - 1 do if rng.Next 2 = 0 then k |]
                    if s.Length = 0 then [| rng.Next nObj |] else s)
        let id = $"{split}_{index:D4}_{Convert.ToHexString(BitConverter.GetBytes(rng.Next())).ToLowerInvariant()}"
        { Id = id; Split = split; Frames = frames; Objects = objs; Sounding = sounding }

    /// Binary GT (0/1) of frame t at side n: the visible pixels of the sounding objects.
    let binaryMask (v: SynthVideo) (t: int) (n: int) : byte[] =
        let m = objectMap v t n
        let on = Set.ofArray v.Sounding[t]
        m |> Array.map (fun k -> if k > 0 && on.Contains(k - 1) then 1uy else 0uy)

    /// Class GT of frame t at side n: category + 1 for sounding objects, 0 elsewhere.
    let classMask (v: SynthVideo) (t: int) (n: int) : byte[] =
        let m = objectMap v t n
        let on = Set.ofArray v.Sounding[t]
        m |> Array.map (fun k -> if k > 0 && on.Contains(k - 1) then byte (v.Objects[k - 1].Category + 1) else 0uy)

    let private grey (n: int) (bits: byte[]) (scale: byte) = { Width = n; Height = n; Channels = 1; Pixels = bits |> Array.map (fun b -> b * scale) }

    /// The videos (scenes and sounding schedules) the options produce, without writing anything.
    let plan (o: SynthOptions) : SynthVideo[] =
        if o.Categories < 2 || o.Categories > 8 then invalidArg (nameof o) $"Categories must be 2..8, got {o.Categories}"
        if o.Kind = Subset.AVSS && o.Categories < 8 then invalidArg (nameof o) $"AVSS-like data needs 8 categories, got {o.Categories}"
        if o.Size < 32 then invalidArg (nameof o) $"Size must be >= 32, got {o.Size}"
        let rng = Random(o.Seed)
        [| for split, count in [ "train", o.Train; "val", o.Val; "test", o.Test ] do
               for i in 0 .. count - 1 -> makeVideo rng o split i |]

    /// Writes the dataset under `root` in the official layout of the kind:
    /// S4: `Single-source/` (s4_meta_data.csv, s4_data/audio_wav, s4_data_384/{visual_frames_384, gt_masks_384, gt_masks_224});
    /// MS3: `Multi-sources/` (ms3_meta_data.csv, ms3_data/audio_wav, ms3_data_384/...);
    /// AVSS: `AVSBench_semantic/` (metadata.csv, label2idx.json, <label>/<uid>/{frames, labels_semantic,
    /// processed_frames_384, processed_labels_semantic, audio.wav}).
    let generate (o: SynthOptions) (root: string) : SynthReport =
        let videos = plan o
        let names = if o.Kind = Subset.AVSS then avssNames[.. o.Categories - 1] else s4Names[.. o.Categories - 1]
        let sub = match o.Kind with Subset.S4 -> "Single-source" | Subset.MS3 -> "Multi-sources" | Subset.AVSS -> "AVSBench_semantic"
        let dir = Path.Combine(root, sub)
        Directory.CreateDirectory dir |> ignore
        let csv = StringBuilder()
        match o.Kind with
        | Subset.S4 -> csv.Append("name,start,category,split\n") |> ignore
        | Subset.MS3 -> csv.Append("video_id,split\n") |> ignore
        | Subset.AVSS -> csv.Append("vid,uid,s_min,s_sec,a_obj,split,label\n") |> ignore
        videos |> Array.iteri (fun vi v ->
            // Each video draws from its own generator so that videos do not depend on each other's pixel work.
            let rng = Random(DeterministicSeed.mix [ o.Seed; vi; 7919 ])
            let bg =
                let c () = float (rng.Next(60, 180))
                (c (), c (), c ()), (c (), c (), c ())
            let frames = Array.init v.Frames (fun t -> renderFrame rng v t o.Size bg)
            let wav = audio rng o.DistractorGain v
            let isTrain = v.Split = "train"
            match o.Kind with
            | Subset.S4 | Subset.MS3 ->
                let s4 = o.Kind = Subset.S4
                let cat = names[v.Objects[v.Sounding[0][0]].Category]
                let p = if s4 then "s4" else "ms3"
                let d384 = Path.Combine(dir, $"{p}_data_384")
                let rel = if s4 then Path.Combine(v.Split, cat, v.Id) else v.Id
                if s4 then csv.Append($"{v.Id},0,{cat},{v.Split}\n") |> ignore
                else csv.Append($"{v.Id},{v.Split}\n") |> ignore
                for t in 0 .. v.Frames - 1 do
                    ImageIO.write (Path.Combine(d384, "visual_frames_384", rel, $"{v.Id}_{t + 1}.png")) frames[t]
                let annotated = if isTrain && s4 then [ 0 ] else [ 0 .. v.Frames - 1 ]
                for t in annotated do
                    let gtDir, n =
                        if isTrain then Path.Combine(d384, "gt_masks_384", "train"), o.Size
                        else Path.Combine(d384, "gt_masks_224", v.Split), o.EvalSize
                    let sub = if s4 then Path.Combine(cat, v.Id) else v.Id
                    ImageIO.write (Path.Combine(gtDir, sub, $"{v.Id}_{t + 1}.png")) (grey n (binaryMask v t n) 255uy)
                let audioRel = if s4 then Path.Combine(v.Split, cat, v.Id + ".wav") else Path.Combine(v.Split, v.Id + ".wav")
                writePcm16 (Path.Combine(dir, $"{p}_data", "audio_wav", audioRel)) wav
            | Subset.AVSS ->
                let label = if v.Frames = 10 then "v2" else "v1m"
                csv.Append($"{v.Id},{v.Id},0,0,synthetic,{v.Split},{label}\n") |> ignore
                let vd = Path.Combine(dir, label, v.Id)
                for t in 0 .. v.Frames - 1 do
                    ImageIO.write (Path.Combine(vd, "frames", $"{t}.jpg")) frames[t]
                    ImageIO.write (Path.Combine(vd, "labels_semantic", $"{t}.png")) (grey o.Size (classMask v t o.Size) 1uy)
                    if not isTrain then
                        ImageIO.write (Path.Combine(vd, "processed_frames_384", $"{t}.jpg")) frames[t]
                        ImageIO.write (Path.Combine(vd, "processed_labels_semantic", $"{t}.png")) (grey o.EvalSize (classMask v t o.EvalSize) 1uy)
                writePcm16 (Path.Combine(vd, "audio.wav")) wav)
        let csvName = match o.Kind with Subset.S4 -> "s4_meta_data.csv" | Subset.MS3 -> "ms3_meta_data.csv" | Subset.AVSS -> "metadata.csv"
        Vct.Core.Platform.AtomicFile.writeAllText (Path.Combine(dir, csvName)) (csv.ToString())
        if o.Kind = Subset.AVSS then
            let entries = Array.append [| "background" |] names |> Array.mapi (fun i n -> $"  \"{n}\": {i + 1}")
            Vct.Core.Platform.AtomicFile.writeAllText (Path.Combine(dir, "label2idx.json")) ("{\n" + String.Join(",\n", entries) + "\n}\n")
        { Root = dir; Kind = o.Kind; Videos = videos; CategoryNames = names }
