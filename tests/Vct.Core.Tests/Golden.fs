/// Shared helpers for golden tests: locate tests/golden, read flat torch.save'd dicts and the official state-dict
/// manifests, compare tensors; the committed small official-weight model's config; tiny model inputs.
module Vct.Core.Tests.Golden

open System
open System.Collections.Generic
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint
open Vct.Core.QueryGen

/// tests/golden of the repository.
let root = lazy (Path.Combine(Support.repoRoot.Value, "tests", "golden"))

/// A path under tests/golden: `path [ "audio"; "wav"; "x.wav" ]`.
let path (parts: string list) = Path.Combine(Array.ofList (root.Value :: parts))

/// A golden file under tests/golden/<folder>: a flat dict name -> tensor.
type File(folder: string, name: string) =
    let file = StateDict.load (Path.Combine(root.Value, folder, name))
    let d = file.StateDict
    member _.Item(key: string) : Tensor =
        if d.ContainsKey key then d[key] else failwith $"{folder}/{name} has no tensor {key}"
    member _.Has(key: string) = d.ContainsKey key
    /// The `w.<prefix>*` entries with `w.<prefix>` removed.
    member _.Weights(?prefix: string) =
        let p = "w." + defaultArg prefix ""
        let r = Dictionary<string, Tensor>()
        for kv in d do
            if kv.Key.StartsWith(p, StringComparison.Ordinal) then r[kv.Key.Substring p.Length] <- kv.Value
        r
    interface IDisposable with
        member _.Dispose() = (file :> IDisposable).Dispose()

/// A golden file under tests/golden/vision.
let vision (name: string) = new File("vision", name)

/// Copies golden weights into a module: every golden key must exist with the same shape, and every module
/// key must be covered except those `mayMiss` accepts.
let loadWeights (weights: Dictionary<string, Tensor>) (mayMiss: string -> bool) (m: torch.nn.Module) =
    use _ = torch.no_grad ()
    let sd = m.state_dict()
    for kv in weights do
        match sd.TryGetValue kv.Key with
        | true, t ->
            Expect.sequenceEqual t.shape kv.Value.shape $"shape of {kv.Key}"
            t.copy_(kv.Value) |> ignore
        | _ -> failtest $"module has no key {kv.Key}"
    for k in sd.Keys do
        if not (weights.ContainsKey k) && not (mayMiss k) then failtest $"golden has no weight for {k}"

/// |actual - expected| <= rtol*|expected| + atol elementwise, atol = 1e-5 * max|expected|
/// (rtol 1e-4 unless given), with the worst errors in the message.
let expectCloseWith (rtol: float) (what: string) (expected: Tensor) (actual: Tensor) =
    Expect.sequenceEqual actual.shape expected.shape $"{what}: shape"
    use _ = torch.NewDisposeScope()
    let e = expected.to_type(torch.float64)
    let a = actual.detach().to_type(torch.float64)
    let scale = e.abs().max().item<float>()
    let atol = 1e-5 * max scale 1e-6
    let err = (a - e).abs()
    let ok = err.le(e.abs() * rtol + atol).all().item<bool>()
    if not ok then
        let maxAbs = err.max().item<float>()
        let maxRel = (err / (e.abs() + atol)).max().item<float>()
        failtest $"{what}: max abs error {maxAbs:g3}, max rel error {maxRel:g3} (max |expected| {scale:g3})"

/// expectCloseWith 1e-4.
let expectClose what expected actual = expectCloseWith 1e-4 what expected actual

/// Same shape and identical values (any dtype).
let expectEqual (what: string) (expected: Tensor) (actual: Tensor) =
    Expect.sequenceEqual actual.shape expected.shape $"{what}: shape"
    Expect.isTrue (actual.eq(expected).all().item<bool> ()) $"{what}: values differ"

/// Same shape and identical values (any dtype), as a boolean.
let same (a: Tensor) (b: Tensor) = a.shape = b.shape && a.eq(b).all().item<bool>()

// ---- official state-dict manifests ---------------------------------------------------------------------------

/// One row of an official state-dict manifest: key, shape as "AxB" ("" for a scalar), dtype.
[<RequireQualifiedAccess>]
type ManifestRow = { Key: string; Shape: string; Dtype: string }

/// The rows of a manifest file (key, shape, dtype, numel; tab-separated, one header line).
let manifestOf (file: string) =
    System.IO.File.ReadAllLines file
    |> Array.skip 1
    |> Array.map (fun l -> l.Split('\t'))
    |> Array.map (fun c -> { ManifestRow.Key = c[0]; ManifestRow.Shape = (if c[1] = "scalar" then "" else c[1]); ManifestRow.Dtype = c[2] })

/// The official state dict of `subset` ("s4", "ms3", "avss"): tests/golden/manifest_<subset>.tsv.
let manifest (subset: string) = manifestOf (path [ $"manifest_{subset}.tsv" ])

/// The rows of `manifest subset` whose key starts with `prefix`, the prefix removed.
let manifestUnder (subset: string) (prefix: string) =
    manifest subset
    |> Array.filter (fun r -> r.Key.StartsWith(prefix, StringComparison.Ordinal))
    |> Array.map (fun r -> { r with ManifestRow.Key = r.Key.Substring prefix.Length })

/// A shape as the manifests write it: "AxB", "" for a scalar.
let shapeText (shape: int64[]) = String.Join("x", shape)

/// (key, shape, dtype) rows of `manifest subset` under `prefix`, the prefix removed.
let manifestRows (subset: string) (prefix: string) =
    manifestUnder subset prefix |> Array.map (fun r -> r.Key, r.Shape, r.Dtype)

/// (key, shape, dtype) rows of a module's state dict under `prefix` (prefix removed), as the manifests write them.
let stateDictRows (prefix: string) (m: torch.nn.Module) =
    [| for kv in m.state_dict() do
         if kv.Key.StartsWith(prefix, StringComparison.Ordinal) then
             let dtype = if kv.Value.dtype = torch.int64 then "int64" else "float32"
             yield kv.Key.Substring prefix.Length, shapeText kv.Value.shape, dtype |]

/// The same rows on both sides (up to 8 differences each way in the message), and as many.
let expectSameRows (what: string) (official: (string * string * string)[]) (ours: (string * string * string)[]) =
    let o = Set.ofArray official
    let u = Set.ofArray ours
    let missing = Set.difference o u |> Set.toList |> List.truncate 8
    let extra = Set.difference u o |> Set.toList |> List.truncate 8
    Expect.isTrue (missing.IsEmpty && extra.IsEmpty) $"{what}: official but not ours {missing}; ours but not official {extra}"
    Expect.equal ours.Length official.Length $"{what}: entry count"

// ---- the committed small official-weight models (tests/golden/model/<subset>) -------------------------------

/// "s4", "ms3" or "avss".
let subsetName (s: Subset) = (sprintf "%A" s).ToLowerInvariant()

/// The official config overrides of the committed small fixtures (make_model_fixtures.py SMALL_CFG and the
/// rebuilt literal-width modules) as a VctConfig.
let smallConfig (subset: Subset) : VctConfig =
    let r = VctConfig.Released subset
    let width = 64L
    let queries = 8L
    let classes, protos =
        match subset with
        | Subset.S4 -> 2L, Some 23L
        | Subset.MS3 -> 2L, None
        | Subset.AVSS -> 6L, Some 6L
    { r with
        Swin = { r.Swin with EmbedDim = 16L; Depths = [| 2; 2; 2; 2 |]; NumHeads = [| 1L; 2L; 4L; 8L |] }
        PixelDecoder = { r.PixelDecoder with InChannels = [| 16L; 32L; 64L; 128L |]; ConvDim = width; MaskDim = width; EncLayers = 2 }
        Decoder =
            { r.Decoder with
                HiddenDim = width; NumQueries = queries; DimFeedforward = 96L; NumClasses = classes
                Query = { VcqConfig.For(96L, 96L, protos) with Channels = width; NumQueries = queries } }
        AudioMlpHidden = 128L }

/// The file keys the model does not have (docs/architecture.md §14.3); everything else must match exactly.
let documentedLeftover (k: string) = k.StartsWith "criterion." || k.StartsWith "audio_backbone.embeddings."

/// Loads an official checkpoint, dropping the documented leftovers.
let loadOptions = { LoadOptions.Default with Remap = (fun k -> if documentedLeftover k then None else Some k); Strict = false }

// ---- tiny model inputs ---------------------------------------------------------------------------------------

/// Random inputs for `frames` frames of a model of `cfg`: images (and, `withMasks`, pre-SAM mask images) in
/// [0, 255), log-mel examples N(0, 1); drawn from `generator`, or LibTorch's global generator for None.
let tinyInputs (generator: torch.Generator option) (cfg: VctConfig) (frames: int64) (withMasks: bool) =
    let g = Option.toObj generator
    let s = cfg.ImageSize
    let pixels () = torch.rand([| frames; 3L; s; s |], generator = g) * 255.0f.ToScalar()
    // Drawn in this order: images, mask images, audio.
    let images = pixels ()
    let masks = if withMasks then Some(pixels ()) else None
    { Images = images
      PreMasks = masks
      Audio = AudioInput.LogMel(torch.randn([| frames; 1L; 96L; 64L |], generator = g), None) }
