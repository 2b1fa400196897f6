namespace Vct.Core.Data

open System
open System.IO
open System.Text
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio

/// Which copy of the frames and masks to read.
[<RequireQualifiedAccess>]
type DataTree =
    /// VCT's preprocessed tree (`*_data_384`, `processed_*`), falling back to the raw originals when absent.
    | Auto
    /// Only the preprocessed 384 tree (and the 224 evaluation GT).
    | Preprocessed
    /// Only the raw AVSBench originals (`*_data/visual_frames`, `gt_masks`, AVSS `frames`/`labels_semantic`), to be
    /// resized on the fly by `Avsbench.loadVideo`.
    | Raw

/// Where a video's audio is.
[<RequireQualifiedAccess>]
type AudioSource =
    /// A waveform, turned into VGGish log-mel examples by the Audio module.
    | Wav of string
    /// The official pickled log-mel examples ([5|10, 1, 96, 64]).
    | LogMelPickle of string

/// One video of a split, with every file path resolved (nothing decoded yet).
type VideoRecord =
    { Id: string
      Split: string
      Kind: Subset
      /// S4: category folder name; AVSS: the metadata `label` (v1s, v1m, v2); MS3: "".
      Category: string
      /// S4: official category id 1..23 (0 for a name outside the official list); others 0.
      CategoryLabel: int
      /// Frame images in time order.
      Frames: string[]
      /// Ground-truth images of the annotated frames (S4 train: the first frame only).
      Masks: string[]
      /// Frame index of each mask.
      MaskFrames: int[]
      /// Pre-SAM "Maskige" images, one per frame, or empty when the tree has none.
      PreMasks: string[]
      Audio: AudioSource
      /// AVSS `vid_temporal_mask_flag` (10 entries), empty otherwise.
      VidTemporalFlag: int[]
      /// AVSS `gt_temporal_mask_flag` (one per frame), empty otherwise.
      GtTemporalFlag: int[]
      /// True when the files come from the raw originals (to be resized on the fly).
      Raw: bool }

/// A decoded video.
type VideoSample =
    { Record: VideoRecord
      /// RGB frames.
      Frames: Image[]
      /// Label maps (1 channel): S4/MS3 0/1 (PNG value / 255, integer division, as the official mappers do);
      /// AVSS class indices 0..70 (255 = ignore).
      Masks: Image[]
      /// RGB Maskiges (empty when absent or not requested).
      PreMasks: Image[] }

/// Options of `Avsbench.loadVideo`.
type LoadOptions =
    { /// Side frames (and pre-SAM images, training masks) are resized to when they differ (raw originals):
      /// bilinear for frames, nearest for masks. None keeps the stored size.
      FrameSize: int option
      /// Side of val/test ground truth when it must be derived from raw originals (the metrics' 224), nearest.
      EvalGtSize: int
      /// Decode the pre-SAM Maskiges.
      PreSam: bool }
    static member Default = { FrameSize = Some 384; EvalGtSize = 224; PreSam = false }

/// AVSBench readers for the S4, MS3 and AVSS official layouts (docs/architecture.md §13; official:
/// models/data/datasets/register_*_sem.py).
[<RequireQualifiedAccess>]
module Avsbench =
    /// Official S4 category ids (register_avss4_sem.py), used by the PAC loss.
    let s4CategoryIds =
        [| "helicopter"; "mynah_bird_singing"; "typing_on_computer_keyboard"; "playing_violin"; "playing_glockenspiel"
           "playing_piano"; "lions_roaring"; "baby_laughter"; "male_speech"; "lawn_mowing"; "playing_ukulele"; "playing_tabla"
           "driving_buses"; "cap_gun_shooting"; "chainsawing_trees"; "playing_acoustic_guitar"; "cat_meowing"; "female_singing"
           "ambulance_siren"; "dog_barking"; "horse_clip-clop"; "coyote_howling"; "race_car" |]
        |> Array.mapi (fun i n -> n, i + 1)
        |> Map.ofArray

    /// The split names the readers accept.
    let splits = [| "train"; "val"; "test" |]

    let private bad (path: string) (why: string) : 'T = raise (InvalidDataException($"{path}: {why}"))

    /// Splits one CSV line (RFC 4180 quotes).
    let private splitCsv (line: string) : string[] =
        let out = ResizeArray<string>()
        let sb = StringBuilder()
        let mutable q = false
        let mutable i = 0
        while i < line.Length do
            let c = line[i]
            if q then
                if c = '"' && i + 1 < line.Length && line[i + 1] = '"' then sb.Append('"') |> ignore; i <- i + 1
                elif c = '"' then q <- false
                else sb.Append c |> ignore
            elif c = '"' then q <- true
            elif c = ',' then out.Add(sb.ToString()); sb.Clear() |> ignore
            else sb.Append c |> ignore
            i <- i + 1
        out.Add(sb.ToString())
        out.ToArray()

    /// Reads a CSV with a header row: (column names, rows as name -> value, 1-based line numbers).
    /// A column is found by name, never by position (the official code reads some by position).
    let readCsv (path: string) : string[] * (Map<string, string> * int)[] =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file (metadata CSV)", path))
        let lines = File.ReadAllLines(path, Encoding.UTF8)
        if lines.Length = 0 then bad path "empty CSV (no header row)"
        let header = splitCsv (lines[0].TrimStart('\uFEFF')) |> Array.map (fun s -> s.Trim())
        let rows =
            [| for i in 1 .. lines.Length - 1 do
                   if lines[i].Trim() <> "" then
                       let cells = splitCsv lines[i]
                       if cells.Length < header.Length then bad path $"line {i + 1} has {cells.Length} fields, the header has {header.Length}"
                       yield (Array.zip header (cells[.. header.Length - 1] |> Array.map (fun s -> s.Trim())) |> Map.ofArray), i + 1 |]
        header, rows

    /// The first of `names` that is a column of the CSV, else an error naming the file and the columns it has.
    let column (path: string) (header: string[]) (names: string list) =
        match names |> List.tryFind (fun n -> Array.contains n header) with
        | Some n -> n
        | None ->
            let want = String.Join(" or ", names |> List.map (fun n -> $"'{n}'"))
            bad path $"""no column {want} (columns: {String.Join(",", header)})"""

    let private requireFile (what: string) (path: string) =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: missing {what}", path))
        path

    let private firstDir (dirs: string list) = dirs |> List.tryFind Directory.Exists

    /// Root folder of a subset below an AVS_dataset-style root (or the subset folder itself).
    let subsetRoot (kind: Subset) (root: string) =
        let names =
            match kind with
            | Subset.S4 -> [ "Single-source"; "AVSBench_object/Single-source" ]
            | Subset.MS3 -> [ "Multi-sources"; "AVSBench_object/Multi-sources" ]
            | Subset.AVSS -> [ "AVSBench_semantic" ]
        let csv = match kind with Subset.S4 -> "s4_meta_data.csv" | Subset.MS3 -> "ms3_meta_data.csv" | Subset.AVSS -> "metadata.csv"
        if File.Exists(Path.Combine(root, csv)) then root
        else
            match names |> List.map (fun n -> Path.Combine(root, n)) |> List.tryFind (fun d -> File.Exists(Path.Combine(d, csv))) with
            | Some d -> d
            | None -> raise (FileNotFoundException($"{Path.Combine(root, csv)}: no such file (not an AVSBench {kind} root)", Path.Combine(root, csv)))

    /// Which subset a folder holds (by its metadata file), if any.
    let detect (root: string) : Subset option =
        [ Subset.S4; Subset.MS3; Subset.AVSS ]
        |> List.tryFind (fun k -> try subsetRoot k root |> ignore; true with _ -> false)

    let private s4OrMs3 (kind: Subset) (dir: string) (tree: DataTree) (v: string) (split: string) (category: string) : VideoRecord =
        let s4 = kind = Subset.S4
        let p = if s4 then "s4" else "ms3"
        let d384 = Path.Combine(dir, $"{p}_data_384")
        let draw = Path.Combine(dir, $"{p}_data")
        let useRaw =
            match tree with
            | DataTree.Raw -> true
            | DataTree.Preprocessed -> false
            | DataTree.Auto -> not (Directory.Exists(Path.Combine(d384, "visual_frames_384")))
        let rel = if s4 then Path.Combine(split, category, v) else v
        let frameDir =
            if useRaw then Path.Combine(draw, "visual_frames", (if s4 then rel else v))
            else Path.Combine(d384, "visual_frames_384", rel)
        let frames = [| for i in 1 .. 5 -> requireFile "frame" (Path.Combine(frameDir, $"{v}_{i}.png")) |]
        let maskIdx = if s4 && split = "train" then [| 0 |] else [| 0 .. 4 |]
        let gtDir =
            let sub = if s4 then Path.Combine(category, v) else v
            if useRaw then Path.Combine(draw, "gt_masks", split, sub)
            elif split = "train" then Path.Combine(d384, "gt_masks_384", "train", sub)
            else Path.Combine(d384, "gt_masks_224", split, sub)
        let masks = maskIdx |> Array.map (fun i -> requireFile "mask" (Path.Combine(gtDir, $"{v}_{i + 1}.png")))
        let preDir = Path.Combine(d384, "pre_SAM_mask_384", (if s4 then rel else v))
        let pre =
            if not useRaw && Directory.Exists preDir then [| for i in 1 .. 5 -> requireFile "pre-SAM mask" (Path.Combine(preDir, $"{v}_{i}_mask_color.png")) |]
            else [||]
        let audioRel = if s4 then Path.Combine(split, category, v) else Path.Combine(split, v)
        let pkl = Path.Combine(draw, "audio_log_mel", audioRel + ".pkl")
        let wav = Path.Combine(draw, "audio_wav", audioRel + ".wav")
        let audio =
            if File.Exists pkl then AudioSource.LogMelPickle pkl
            elif File.Exists wav then AudioSource.Wav wav
            else raise (FileNotFoundException($"{wav}: missing audio (nor {pkl})", wav))
        { Id = v; Split = split; Kind = kind; Category = category
          CategoryLabel = (if s4 then defaultArg (s4CategoryIds.TryFind category) 0 else 0)
          Frames = frames; Masks = masks; MaskFrames = maskIdx; PreMasks = pre; Audio = audio
          VidTemporalFlag = [||]; GtTemporalFlag = [||]; Raw = useRaw }

    let private avss (dir: string) (tree: DataTree) (uid: string) (label: string) (split: string) (csv: string) (line: int) : VideoRecord =
        let t =
            match label with
            | "v1s" | "v1m" -> 5
            | "v2" -> 10
            | _ -> bad csv $"line {line}: unknown label '{label}' (expected v1s, v1m or v2)"
        let vd = Path.Combine(dir, label, uid)
        let processed = split <> "train" && Directory.Exists(Path.Combine(vd, "processed_frames_384"))
        let useRaw =
            match tree with
            | DataTree.Raw -> true
            | DataTree.Preprocessed -> false
            | DataTree.Auto -> split <> "train" && not processed
        let framesSub, labelsSub =
            if split = "train" || useRaw then "frames", "labels_semantic" else "processed_frames_384", "processed_labels_semantic"
        let gtFlag = AvssFlags.gtTemporalMask label split
        let maskIdx = [| for i in 0 .. t - 1 do if gtFlag[i] = 1 then i |]
        let frames = [| for i in 0 .. t - 1 -> requireFile "frame" (Path.Combine(vd, framesSub, $"{i}.jpg")) |]
        let masks = maskIdx |> Array.map (fun i -> requireFile "mask" (Path.Combine(vd, labelsSub, $"{i}.png")))
        let preDir = Path.Combine(dir, "pre_SAM_mask", "AVSBench_semantic", label, uid, framesSub)
        let pre = if Directory.Exists preDir then [| for i in 0 .. t - 1 -> requireFile "pre-SAM mask" (Path.Combine(preDir, $"{i}_mask_color.png")) |] else [||]
        let pkl = Path.Combine(vd, "audio.pkl")
        let wav = Path.Combine(vd, "audio.wav")
        let audio =
            if File.Exists pkl then AudioSource.LogMelPickle pkl
            elif File.Exists wav then AudioSource.Wav wav
            else raise (FileNotFoundException($"{wav}: missing audio (nor {pkl})", wav))
        { Id = uid; Split = split; Kind = Subset.AVSS; Category = label; CategoryLabel = 0
          Frames = frames; Masks = masks; MaskFrames = maskIdx; PreMasks = pre; Audio = audio
          VidTemporalFlag = AvssFlags.vidTemporalMask label; GtTemporalFlag = gtFlag; Raw = useRaw && split <> "train" }

    /// Every video of `split` ("train", "val", "test"), in metadata order, paths resolved and checked for existence.
    /// `onError` receives each video's problem (return normally to skip the video; the default rethrows).
    let recordsWith (kind: Subset) (root: string) (tree: DataTree) (split: string) (onError: exn -> unit) : VideoRecord[] =
        if not (Array.contains split splits) then invalidArg (nameof split) $"unknown split '{split}' (expected train, val or test)"
        let dir = subsetRoot kind root
        let csvName = match kind with Subset.S4 -> "s4_meta_data.csv" | Subset.MS3 -> "ms3_meta_data.csv" | Subset.AVSS -> "metadata.csv"
        let csv = Path.Combine(dir, csvName)
        let header, rows = readCsv csv
        let splitCol = column csv header [ "split" ]
        let idCol =
            match kind with
            | Subset.S4 -> column csv header [ "name"; "vid" ]
            | Subset.MS3 -> column csv header [ "video_id"; "name"; "vid" ]
            | Subset.AVSS -> column csv header [ "uid" ]
        let catCol = if kind = Subset.S4 then Some(column csv header [ "category" ]) elif kind = Subset.AVSS then Some(column csv header [ "label" ]) else None
        [| for row, line in rows do
               let s = row[splitCol]
               if not (Array.contains s splits) then
                   onError (InvalidDataException($"{csv}: line {line}: unknown split '{s}' (expected train, val or test)"))
               elif s = split then
                   let id = row[idCol]
                   if id = "" then bad csv $"line {line}: empty video id"
                   try
                       // Every CSV value that becomes part of a path is one plain name: none can lead out of the root.
                       let id = SafePath.name csv line (if kind = Subset.AVSS then "uid" else "video id") id
                       let category =
                           match catCol with
                           | Some c -> SafePath.name csv line (if kind = Subset.AVSS then "label" else "category") row[c]
                           | None -> ""
                       yield
                           match kind with
                           | Subset.AVSS -> avss dir tree id category s csv line
                           | _ -> s4OrMs3 kind dir tree id s category
                   with e -> onError e |]

    /// Every video of `split`; the first problem raises (FileNotFoundException / InvalidDataException naming the file).
    let records (kind: Subset) (root: string) (split: string) : VideoRecord[] =
        recordsWith kind root DataTree.Auto split raise

    /// AVSS class names in label2idx.json order (index = class id; background first).
    let avssClasses (root: string) : string[] =
        let path = Path.Combine(subsetRoot Subset.AVSS root, "label2idx.json")
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        let notAMap (why: string) = bad path $"not a JSON object of class name -> index ({why})"
        let classes =
            try
                use doc = Text.Json.JsonDocument.Parse(File.ReadAllText path)
                if doc.RootElement.ValueKind <> Text.Json.JsonValueKind.Object then notAMap $"the top level is {doc.RootElement.ValueKind}"
                [| for p in doc.RootElement.EnumerateObject() ->
                       let mutable i = 0
                       if p.Value.ValueKind = Text.Json.JsonValueKind.Number && p.Value.TryGetInt32(&i) && i >= 0 then p.Name, i
                       else notAMap $"class '{p.Name}' has index {p.Value.GetRawText()}, not a non-negative integer" |]
            with :? Text.Json.JsonException as e -> notAMap $"not valid JSON: {e.Message}"
        classes |> Array.sortBy snd |> Array.map fst

    /// PASCAL-VOC bit-interleaved colour of AVSS class j (the `labels_rgb` palette).
    let avssColour (j: int) : byte * byte * byte =
        let mutable r, g, b, c = 0, 0, 0, j
        for i in 0 .. 7 do
            r <- r ||| (((c >>> 0) &&& 1) <<< (7 - i))
            g <- g ||| (((c >>> 1) &&& 1) <<< (7 - i))
            b <- b ||| (((c >>> 2) &&& 1) <<< (7 - i))
            c <- c >>> 3
        byte r, byte g, byte b

    /// Decodes a video. Frames are RGB; masks are label maps (S4/MS3: value / 255 so 255 -> 1 and anything lower -> 0,
    /// as `sem_seg_gt // 255`); raw originals are resized on the fly (frames bilinear to FrameSize; train masks
    /// nearest to FrameSize; val/test masks nearest to EvalGtSize, as VCT's preprocessing builds its eval GT).
    /// NOTE: VCT's S4/MS3 eval GT is re-derived from AVSBench-semantic `labels_rgb` (grey, non-zero -> 255); the raw
    /// AVSBench-object `gt_masks` read here can differ from it.
    let loadVideo (opts: LoadOptions) (r: VideoRecord) : VideoSample =
        let resizeFrame (img: Image) =
            match opts.FrameSize with
            | Some s when r.Raw && (img.Width <> s || img.Height <> s) -> Resize.bilinear s s img
            | _ -> img
        let frames = r.Frames |> Array.map (ImageIO.readRgb >> resizeFrame)
        let masks =
            r.Masks |> Array.map (fun p ->
                let m =
                    if r.Kind = Subset.AVSS then ImageIO.readLabels p
                    else
                        let m, _ = ImageIO.readBinaryMask p
                        { m with Pixels = m.Pixels |> Array.map (fun v -> v / 255uy) }
                if r.Raw then
                    let s = if r.Split = "train" then opts.FrameSize else Some opts.EvalGtSize
                    match s with
                    | Some s when m.Width <> s || m.Height <> s -> Resize.nearest s s m
                    | _ -> m
                else m)
        let pre =
            if opts.PreSam then
                r.PreMasks |> Array.mapi (fun i p ->
                    let m = ImageIO.readRgb p
                    if m.Width <> frames[i].Width || m.Height <> frames[i].Height then Resize.nearest frames[i].Width frames[i].Height m else m)
            else [||]
        { Record = r; Frames = frames; Masks = masks; PreMasks = pre }

    /// The options a video's WAV is turned into examples with (the subset's rule, exact samples, float64 STFT).
    let exampleOptions (r: VideoRecord) =
        ExampleOptions.Default(Some r.Kind)

    /// The [T, 1, 96, 64] VGGish log-mel examples of a video (wav through the Audio module with the subset's rule,
    /// or the official pickle).
    let audioExamples (r: VideoRecord) : Tensor =
        match r.Audio with
        | AudioSource.LogMelPickle p -> LogMelPickle.read p
        | AudioSource.Wav p ->
            let ex = Examples.ofFile (exampleOptions r) p
            ex.Examples
