/// Full-model goldens: checkpoints in the official `model_best.pth` format written by the official VCT model
/// (tests/fixtures/make_model_fixtures.py, see tests/golden/model/PROVENANCE.md), loaded through the checkpoint
/// reader, and our forward compared with the official one stage by stage.
module Vct.Core.Tests.ModelGoldenTests

open System
open System.Diagnostics
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint

/// err <= rtol*|e| + 1e-5*max|e| elementwise; returns (ok, max abs error, max rel error, max |expected|).
let closeness (rtol: float) (expected: torch.Tensor) (actual: torch.Tensor) =
    use _ = torch.NewDisposeScope()
    let e = expected.to_type(torch.float64)
    let a = actual.detach().to_type(torch.float64)
    let scale = e.abs().max().item<float>()
    let atol = 1e-5 * max scale 1e-6
    let err = (a - e).abs()
    err.le(e.abs() * rtol + atol).all().item<bool>(), err.max().item<float>(), (err / (e.abs() + atol)).max().item<float>(), scale

/// Compares every stage, in forward order, and fails once with the whole table (the first failing row is where
/// the forward first departs from the official one).
let compareAll (g: Golden.File) (rows: (string * float * torch.Tensor) list) =
    let lines = ResizeArray<string>()
    let mutable failed = []
    for (name, rtol, ours) in rows do
        // Thinned goldens hold x[:, ::c, ::s, ::s]; slice ours the same way.
        let ours =
            if g.Has("thin." + name) then
                let st = g["thin." + name]
                let c, s = st[0].item<int64>(), st[1].item<int64>()
                ours.slice(1L, 0L, ours.shape[1], c).slice(2L, 0L, ours.shape[2], s).slice(3L, 0L, ours.shape[3], s)
            else ours
        let expected = g[name]
        if ours.shape <> expected.shape then
            failed <- name :: failed
            lines.Add(sprintf "  %-28s SHAPE ours %A golden %A" name ours.shape expected.shape)
        else
            let ok, maxAbs, maxRel, scale = closeness rtol expected ours
            if not ok then failed <- name :: failed
            lines.Add(sprintf "  %-28s %s rtol %g: max abs %.3g, max rel %.3g (max |expected| %.3g)" name (if ok then "ok  " else "FAIL") rtol maxAbs maxRel scale)
    let table = String.Join("\n", lines)
    if not failed.IsEmpty then
        failtest $"first differing stage: {List.last failed}\n{table}"
    table

/// Loads `folder/model_best.pth` into a fresh model of `cfg`, runs `folder/golden.pt`'s inputs and compares.
let checkFolder (cfg: VctConfig) (folder: string) =
    use _ = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    use m = new VctModel(cfg)
    let report = StateDict.loadFileInto Golden.loadOptions (Path.Combine(folder, "model_best.pth")) m
    Expect.isEmpty report.Missing "keys missing from the checkpoint"
    Expect.isEmpty report.Unexpected "unexpected checkpoint keys"
    Expect.isEmpty report.ShapeMismatched "shape mismatches"
    Expect.isEmpty report.DtypeMismatched "dtype mismatches"
    Expect.all report.Dropped Golden.documentedLeftover "only the documented leftovers are dropped"
    Expect.exists report.Dropped (fun k -> k.StartsWith "criterion.") "criterion.* reported as dropped"
    Expect.exists report.Dropped (fun k -> k.StartsWith "audio_backbone.embeddings.") "audio_backbone.embeddings.* reported as dropped"
    m.eval ()
    use g = new Golden.File(folder, "golden.pt")
    let flags = if cfg.Subset = Subset.AVSS then Some g["in.vid_temporal_mask_flag"] else None
    let inputs =
        { Images = g["in.images"].to_type(torch.float32)
          PreMasks = Some(g["in.pre_masks"].to_type(torch.float32))
          Audio = AudioInput.LogMel(g["in.audio_log_mel"], flags) }
    use out = m.Forward(inputs, keepIntermediates = true)
    let inter = out.Intermediates.Value
    // AVSS: the official semantic_inference_ss multiplies frame i by vid_temporal_mask_flag[i].
    let scores = (Segment.ofOutput m SegmentOptions.Default flags out).Scores
    let preds = out.Decoder.Predictions |> Array.ofList
    let last = preds.Length - 1
    let rows =
        [ for i, k in Array.indexed [| "res2"; "res3"; "res4"; "res5" |] -> "int." + k, 1e-4, inter.Features[i]
          yield "int.audio_backbone", 1e-4, inter.AudioBackbone
          yield "int.audio_features", 1e-4, inter.AudioFeatures
          for i in 0..2 -> $"int.multi_scale.{i}", 1e-4, inter.MultiScale[i]
          yield "int.mask_features", 1e-4, inter.MaskFeatures
          for i in 0 .. last - 1 do
              yield $"out.aux.{i}.pred_logits", 1e-3, preds[i].Logits
              yield $"out.aux.{i}.pred_masks", 1e-3, preds[i].Masks
          yield "out.pred_logits", 1e-3, preds[last].Logits
          yield "out.pred_masks", 1e-3, preds[last].Masks
          if g.Has "out.audio_feat" then
              yield "out.audio_feat", 1e-3, out.Decoder.AudioFeat.Value
              yield "out.proto_feat", 1e-3, out.Decoder.ProtoFeat.Value
          yield "out.sem_seg", 1e-3, scores ]
    // Masked attention is the one discontinuity downstream of PPQG: prediction i, resized to the memory of layer i,
    // blocks where its logit < 0. Count the positions where ours and the official one fall on different sides
    // (only possible for unthinned goldens), so that a first difference right after such a flip is recognised
    // as a near-tie rather than a port bug.
    let sizes = [| 0L; 12L; 24L; 48L |]
    let flips =
        [ for i in 0 .. last - 1 do
            let lvl = i % 4
            let key = $"out.aux.{i}.pred_masks"
            if lvl <> 0 && not (g.Has("thin." + key)) then
                use _ = torch.NewDisposeScope()
                let resize (t: torch.Tensor) =
                    torch.nn.functional.interpolate(t, [| sizes[lvl]; sizes[lvl] |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
                let n = (resize preds[i].Masks).gt(0.0.ToScalar()).ne((resize g[key]).gt(0.0.ToScalar())).sum().item<int64>()
                if n > 0L then yield $"layer {i} (prediction {i} at {sizes[lvl]}x{sizes[lvl]}): {n} attention-mask positions flipped" ]
    if not flips.IsEmpty then printfn "ModelGolden %A: near-tie attention-mask flips:\n  %s" cfg.Subset (String.Join("\n  ", flips))
    let table =
        try compareAll g rows
        with e when not flips.IsEmpty -> raise (Exception(e.Message + "\nattention-mask flips (near-ties): " + String.Join("; ", flips), e))
    printfn "ModelGolden %A (%s):\n%s" cfg.Subset folder table

let subsets = [ Subset.S4; Subset.MS3; Subset.AVSS ]
let name (s: Subset) = Golden.subsetName s

// ---- released size: regenerated with the official code on request ------------------------------------------

let fullGoldenVar = "VCT_FULL_GOLDEN"

/// A fetched mirror of the official repository beside the checkout (../.mirror), when there is one.
let private defaultMirror = Path.GetFullPath(Path.Combine(Golden.root.Value, "..", "..", "..", ".mirror", "spyflying+VCT_AVS", "repo"))

let private officialSourceAvailable () =
    let src = Environment.GetEnvironmentVariable "VCT_SRC"
    let mirror = Environment.GetEnvironmentVariable "VCT_MIRROR"
    (not (String.IsNullOrEmpty src) && File.Exists(Path.Combine(src, "models", "vct_model.py")))
    || (not (String.IsNullOrEmpty mirror) && Directory.Exists mirror)
    || File.Exists(Path.Combine(Path.GetTempPath(), "vct_src", "models", "vct_model.py"))
    || Directory.Exists defaultMirror

let private pythonHasTorch () =
    File.Exists "/usr/bin/python3"
    && (try
            use p = Process.Start(ProcessStartInfo("/usr/bin/python3", "-c \"import torch, yaml\"", RedirectStandardError = true, UseShellExecute = false))
            p.WaitForExit(120000) && p.ExitCode = 0
        with _ -> false)

/// Runs the fixture script for the released size into `dir` (unless `dir/<subset>/golden.pt` exists already).
let private regenerate (dir: string) (subset: Subset) =
    if not (File.Exists(Path.Combine(dir, name subset, "golden.pt"))) then
        let script = Path.GetFullPath(Path.Combine(Golden.root.Value, "..", "fixtures", "make_model_fixtures.py"))
        let psi = ProcessStartInfo("/usr/bin/python3", $"\"{script}\" --size released --subsets {name subset} --out \"{dir}\"", UseShellExecute = false)
        if String.IsNullOrEmpty(Environment.GetEnvironmentVariable "VCT_MIRROR") && Directory.Exists defaultMirror then
            psi.Environment["VCT_MIRROR"] <- defaultMirror
        use p = Process.Start psi
        p.WaitForExit()
        if p.ExitCode <> 0 then failtest $"make_model_fixtures.py --size released failed with exit code {p.ExitCode}"

[<Tests>]
let tests =
    testList "ModelGolden" [
        for s in subsets do
            test $"small official model ({name s}): checkpoint loads exactly, forward matches (outputs 1e-3, intermediates 1e-4)" {
                checkFolder (Golden.smallConfig s) (Path.Combine(Golden.root.Value, "model", name s))
            }
        for s in subsets do
            test $"released-size official model ({name s}): regenerated with the official code, forward matches" {
                if Environment.GetEnvironmentVariable fullGoldenVar <> "1" then
                    skiptest $"released-size golden is off: set {fullGoldenVar}=1 (needs /usr/bin/python3 with torch and the official source via VCT_SRC/VCT_MIRROR; several minutes and ~2 GB of disk per subset; VCT_FULL_GOLDEN_DIR picks the folder)"
                if not (officialSourceAvailable ()) then skiptest "official VCT source not found (set VCT_SRC or VCT_MIRROR)"
                if not (pythonHasTorch ()) then skiptest "/usr/bin/python3 with torch and yaml is not available"
                let dir =
                    match Environment.GetEnvironmentVariable "VCT_FULL_GOLDEN_DIR" with
                    | null | "" -> Path.Combine(Path.GetTempPath(), "vct_full_golden")
                    | d -> d
                regenerate dir s
                checkFolder (VctConfig.Released s) (Path.Combine(dir, name s))
            }
    ]
