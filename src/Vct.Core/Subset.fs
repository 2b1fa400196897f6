namespace Vct.Core

/// The three AVSBench settings, used by every layer (audio rules, data layout, model presets, metrics, outputs).
/// Official: AVSBench's `avs_s4` / `avs_ms3` / `avss` folders; VCT's configs `configs/avs_{s4,ms3,ss}`.
[<RequireQualifiedAccess>]
type Subset =
    /// AVSBench-object single source: 5 frames, first-frame GT on train, 2 classes, ProtoVCQ with 23 categories.
    | S4
    /// AVSBench-object multiple sources: 5 frames, all annotated, 2 classes, VCQ without prototypes.
    | MS3
    /// AVSBench-semantic: up to 10 frames, 71 classes (background + 70), ProtoVCQ with K = 71, temporal flags.
    | AVSS

    /// Parses "s4", "ms3" or "avss" ("ss", the VCT config name, is accepted for AVSS); case-insensitive.
    static member Parse(text: string) =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "s4" -> Subset.S4
        | "ms3" -> Subset.MS3
        | "avss" | "ss" -> Subset.AVSS
        | _ -> invalidArg (nameof text) $"unknown subset '{text}': expected s4, ms3 or avss"

    /// Every subset, in the order S4, MS3, AVSS.
    static member All = [| Subset.S4; Subset.MS3; Subset.AVSS |]

    /// "s4", "ms3" or "avss".
    member s.Name =
        match s with
        | Subset.S4 -> "s4"
        | Subset.MS3 -> "ms3"
        | Subset.AVSS -> "avss"

    /// This subset's row of the preset table.
    member s.Preset = Preset.Of s

/// How a clip's audio examples are made to the subset's count (AVSBench `preprocess_scripts/preprocess_s4.py`
/// for S4/MS3, VCT `avs_tools/preprocess_avss_audio.py` for AVSS).
and [<RequireQualifiedAccess>] AudioPadding =
    /// A short clip is padded by repeating its last example; a long one truncated.
    | RepeatLast
    /// Zero rows after the real examples, which the temporal flags mark.
    | ZeroRows

/// The evaluation protocol of a subset.
and [<RequireQualifiedAccess>] EvaluationKind =
    /// Foreground/background per frame (M_J = mean per-video IoU, M_F = max-over-thresholds F).
    | Binary
    /// Per-class IoU and F over the 71 classes.
    | Semantic

/// The numbers that differ between subsets, in one table (values of the released configurations).
and Preset =
    { Subset: Subset
      /// Frames (= audio examples) per video: 5, 5, 10.
      Frames: int
      AudioPadding: AudioPadding
      /// Whether videos carry temporal flags (real frames vs padding): AVSS only.
      TemporalFlags: bool
      /// Classes of the class head (background included): 2, 2, 71.
      Classes: int
      /// Learnable audio prototypes of ProtoVCQ (K), or None for plain VCQ (MS3).
      Prototypes: int option
      Evaluation: EvaluationKind }

    static member Of(subset: Subset) =
        match subset with
        | Subset.S4 ->
            { Subset = subset; Frames = 5; AudioPadding = AudioPadding.RepeatLast; TemporalFlags = false
              Classes = 2; Prototypes = Some 23; Evaluation = EvaluationKind.Binary }
        | Subset.MS3 ->
            { Subset = subset; Frames = 5; AudioPadding = AudioPadding.RepeatLast; TemporalFlags = false
              Classes = 2; Prototypes = None; Evaluation = EvaluationKind.Binary }
        | Subset.AVSS ->
            { Subset = subset; Frames = 10; AudioPadding = AudioPadding.ZeroRows; TemporalFlags = true
              Classes = 71; Prototypes = Some 71; Evaluation = EvaluationKind.Semantic }
