module Vct.Core.Tests.TrainingLossesTests

open System
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Decoder
open Vct.Core.Layers
open Vct.Core.Training
open Vct.Core.Tests.Golden

let private golden name = new Golden.File("training", name)

/// |actual - expected| <= 1e-5 * max(1, |expected|) for scalars.
let private expectScalar (what: string) (expected: float) (actual: float) =
    let tol = 1e-5 * max 1.0 (abs expected)
    if not (abs (actual - expected) <= tol) then
        failtest $"{what}: expected {expected:R}, got {actual:R} (|diff| {abs (actual - expected):g3} > {tol:g3})"

let private longs (t: Tensor) = if t.numel() = 0L then [||] else t.contiguous().data<int64>().ToArray()

/// The golden's random draws in call order.
let private draws (g: Golden.File) =
    [ for i in 0 .. int (g["rand_count"].item<int64>()) - 1 -> g[$"rand{i}"] ]

/// A DecoderOutput over the golden predictions (leaves with gradients).
let private decoderOutput (g: Golden.File) =
    let leaf (t: Tensor) = t.detach().clone().requires_grad_(true)
    let preds = [ for i in 0 .. 9 -> { Logits = leaf g[$"in.logits{i}"]; Masks = leaf g[$"in.masks{i}"] } ]
    { Predictions = preds
      AudioFeat = (if g.Has "in.audio_feat" then Some(leaf g["in.audio_feat"]) else None)
      ProtoFeat = (if g.Has "in.proto_feat" then Some(leaf g["in.proto_feat"]) else None)
      Assignment = torch.zeros(1L)
      AttentionMasks = [] }

let private targetsOf (g: Golden.File) (count: int) =
    [| for i in 0 .. count - 1 -> FrameTarget.ofLabelMap 255L g[$"in.map{i}"] |]

/// Runs our criterion on a golden case and compares every term, the matchings and the gradients.
let private checkCriterion (file: string) (subset: Subset) =
    use _ = torch.NewDisposeScope()
    use g = golden file
    let frames = longs g["in.sup_frames"]
    let bt = g["in.num_frames"].item<int64>()
    let targets = targetsOf g frames.Length
    let supervision =
        match subset with
        | Subset.S4 -> Supervision.s4 bt 5L (longs g["in.categories"] |> Array.map int)
        | Subset.MS3 -> Supervision.ms3 bt
        | Subset.AVSS -> Supervision.avss (longs g["in.flags"] |> Array.map int)
    Expect.sequenceEqual supervision.Frames frames "supervised frames"
    let out = decoderOutput g
    use crit = new Criterion((CriterionConfig.Released subset).WithNumPoints 196L)
    if g.Has "in.logit_scale" then
        expectScalar "logit_scale init" (g["in.logit_scale"].item<float32>() |> float) (crit.LogitScale.item<float32>() |> float)
    let r = crit.Compute(out, targets, supervision, UniformSource.ofQueue (draws g))
    // Matchings: main then aux 0..8, frame by frame.
    let ours = r.Matches |> List.collect List.ofArray
    Expect.equal ours.Length (int (g["match_count"].item<int64>())) "matching count"
    ours |> List.iteri (fun i (q, t) ->
        Expect.sequenceEqual q (longs g[$"match{i}.query"]) $"matching {i}: queries"
        Expect.sequenceEqual t (longs g[$"match{i}.target"]) $"matching {i}: targets")
    // Every term, unweighted and weighted, and the total.
    let expectedNames =
        [ for suffix in "" :: [ for i in 0 .. 8 -> $"_{i}" ] do
            for b in [ "loss_ce"; "loss_mask"; "loss_dice" ] -> b + suffix
          if subset <> Subset.MS3 then yield "loss_proto" ]
        |> List.sort
    Expect.equal (int (g["term_count"].item<int64>())) expectedNames.Length "official term count"
    Expect.sequenceEqual (r.Raw |> Map.keys |> List.ofSeq |> List.sort) expectedNames "term names"
    for name in expectedNames do
        expectScalar $"raw {name}" (g[$"raw.{name}"].item<float32>() |> float) (r.Raw[name].item<float32>() |> float)
        expectScalar $"weighted {name}" (g[$"weighted.{name}"].item<float32>() |> float) (r.Terms[name].item<float32>() |> float)
    expectScalar "total" (g["total"].item<float32>() |> float) (r.Total.item<float32>() |> float)
    // Gradients of the weighted sum.
    r.Total.backward()
    expectClose "grad logits (main)" g["grad.logits_main"] out.Last.Logits.grad
    expectClose "grad masks (main)" g["grad.masks_main"] out.Last.Masks.grad
    expectClose "grad logits (aux 0)" g["grad.logits0"] out.Predictions.Head.Logits.grad
    expectClose "grad masks (aux 0)" g["grad.masks0"] out.Predictions.Head.Masks.grad
    if g.Has "grad.logit_scale" then
        expectClose "grad logit_scale" g["grad.logit_scale"] (crit.LogitScale.grad.reshape(1L))
        expectClose "grad audio_feat" g["grad.audio_feat"] out.AudioFeat.Value.grad
        expectClose "grad proto_feat" g["grad.proto_feat"] out.ProtoFeat.Value.grad
    r

[<Tests>]
let tests =
    testList "Training.Losses" [
        test "FrameTarget.ofLabelMap: sorted labels without 255, one mask per label, background a target" {
            use _ = torch.NewDisposeScope()
            let map = torch.tensor([| 0L; 0L; 7L; 255L; 3L; 7L |]).view(2L, 3L)
            use t = FrameTarget.ofLabelMap 255L map
            Expect.sequenceEqual (longs t.Labels) [| 0L; 3L; 7L |] "labels"
            Expect.sequenceEqual t.Masks.shape [| 3L; 2L; 3L |] "masks shape"
            Expect.sequenceEqual (t.Masks.flatten().data<float32>().ToArray())
                [| 1.0f; 1.0f; 0.0f; 0.0f; 0.0f; 0.0f
                   0.0f; 0.0f; 0.0f; 0.0f; 1.0f; 0.0f
                   0.0f; 0.0f; 1.0f; 0.0f; 0.0f; 1.0f |] "masks"
            use empty = FrameTarget.ofLabelMap 255L (torch.full([| 2L; 2L |], (255L).ToScalar(), dtype = torch.int64))
            Expect.equal empty.Labels.shape[0] 0L "all ignored: no target"
            Expect.sequenceEqual empty.Masks.shape [| 0L; 2L; 2L |] "all ignored: empty masks"
        }

        test "Supervision: S4 first frames, MS3 all frames, AVSS flagged frames" {
            Expect.sequenceEqual (Supervision.s4 15L 5L [| 1; 2; 3 |]).Frames [| 0L; 5L; 10L |] "S4"
            Expect.sequenceEqual (Supervision.ms3 5L).Frames [| 0L .. 4L |] "MS3"
            Expect.sequenceEqual (Supervision.avss [| 1; 0; 1; 1; 0 |]).Frames [| 0L; 2L; 3L |] "AVSS"
            Expect.throwsT<ArgumentException> (fun () -> Supervision.s4 10L 5L [| 1 |] |> ignore) "one category per video"
        }

        test "Points.uncertain keeps the most uncertain candidates and appends the fill draw" {
            use _ = torch.NewDisposeScope()
            // logits = x - 0.5 along the width: uncertainty -|logit| is highest near x = 0.5.
            let logits = torch.linspace(-0.5, 0.5, 8L).view(1L, 1L, 1L, 8L).expand(1L, 1L, 4L, 8L).contiguous()
            let cand = torch.tensor([| 0.05f; 0.5f; 0.5f; 0.5f; 0.95f; 0.5f; 0.45f; 0.5f; 0.2f; 0.5f; 0.7f; 0.5f |]).view(1L, 6L, 2L)
            let fill = torch.tensor([| 0.1f; 0.2f |]).view(1L, 1L, 2L)
            let coords = Points.uncertain (UniformSource.ofQueue [ cand; fill ]) 3L 2.0 (2.0 / 3.0) logits
            Expect.sequenceEqual coords.shape [| 1L; 3L; 2L |] "shape"
            let xs = coords.select(2L, 0L).select(0L, 0L).contiguous().data<float32>().ToArray()
            Expect.sequenceEqual (Array.sort xs.[0..1]) [| 0.45f; 0.5f |] "two most uncertain"
            Expect.equal xs[2] 0.1f "fill point last"
        }

        test "official HungarianMatcher: cost matrices within 1e-5 and the same assignment (12544 points)" {
            use _ = torch.NewDisposeScope()
            use g = golden "matcher.pt"
            let targets = targetsOf g 3
            for i in 0 .. 2 do
                Expect.sequenceEqual (longs targets[i].Labels) (longs g[$"in.labels{i}"]) $"frame {i} labels"
            let uniform = UniformSource.ofQueue [ for i in 0 .. 2 -> g[$"rand{i}"] ]
            let logits, masks = g["in.logits"], g["in.masks"]
            let cfg = MatcherConfig.Released
            for f in 0 .. 2 do
                let coords = g[$"rand{f}"].squeeze(0L)
                expectClose $"frame {f} cost" g[$"out.cost{f}"] (Matcher.costMatrix cfg logits[int64 f] masks[int64 f] targets[f] coords)
            let m = Matcher.matchFrames cfg uniform logits masks targets
            for f in 0 .. 2 do
                Expect.sequenceEqual (fst m[f]) (longs g[$"out.query{f}"]) $"frame {f} queries"
                Expect.sequenceEqual (snd m[f]) (longs g[$"out.target{f}"]) $"frame {f} targets"
        }

        test "official SetCriterion_S4_PAC: 31 terms, total, matchings and gradients (frame 0 of each video)" {
            let r = checkCriterion "criterion_s4.pt" Subset.S4
            Expect.equal r.Terms.Count 31 "10 x 3 + loss_proto"
        }

        test "official SetCriterion (MS3): 30 terms, no PAC, total, matchings and gradients" {
            let r = checkCriterion "criterion_ms3.pt" Subset.MS3
            Expect.equal r.Terms.Count 30 "10 x 3"
        }

        test "official SetCriterion_SS_PAC (AVSS): 31 terms over the flagged frames, multi-hot PAC, gradients" {
            let r = checkCriterion "criterion_avss.pt" Subset.AVSS
            Expect.equal r.Terms.Count 31 "10 x 3 + loss_proto"
        }

        test "a frame whose pixels are all ignored has no target: no match, every query is no-object" {
            use _ = torch.NewDisposeScope()
            let gen = new torch.Generator(9UL)
            let logits = torch.randn([| 2L; 6L; 3L |], generator = gen)
            let masks = torch.randn([| 2L; 6L; 8L; 8L |], generator = gen)
            let full = FrameTarget.ofLabelMap 255L (torch.arange((32L * 32L).ToScalar()).view(32L, 32L).remainder((2L).ToScalar()))
            let empty = FrameTarget.ofLabelMap 255L (torch.full([| 32L; 32L |], (255L).ToScalar(), dtype = torch.int64))
            let targets = [| full; empty |]
            let m = Matcher.matchFrames MatcherConfig.Released (UniformSource.ofGenerator torch.CPU gen) logits masks targets
            Expect.equal (fst m[0]).Length 2 "frame 0: both classes matched"
            Expect.equal (fst m[1]).Length 0 "frame 1: nothing to match"
            let weight = torch.tensor([| 1.0f; 1.0f; 0.1f |])
            let ce = Losses.classification weight logits m targets
            // By hand: frame 1 contributes -log softmax[q, 2] with weight 0.1 for every query.
            let logp = logits.log_softmax(-1L)
            let mutable num, den = 0.0, 0.0
            for f in 0 .. 1 do
                let q, t = m[f]
                let labels = longs targets[f].Labels
                for i in 0 .. 5 do
                    let k = Array.tryFindIndex ((=) (int64 i)) q
                    let cls, w = match k with Some k -> labels[int t[k]], 1.0 | None -> 2L, 0.1
                    num <- num - w * (logp[int64 f, int64 i, cls].item<float32>() |> float)
                    den <- den + w
            expectScalar "weighted CE" (num / den) (ce.item<float32>() |> float)
            // Nothing matched anywhere: the mask losses are zero but still part of the graph.
            let none = [| ([||]: int64[]), ([||]: int64[]); ([||]: int64[]), ([||]: int64[]) |]
            let lm, ld = Losses.masks (UniformSource.ofGenerator torch.CPU gen) 16L 3.0 0.75 1.0 masks none targets
            Expect.equal (lm.item<float32>(), ld.item<float32>()) (0.0f, 0.0f) "zero mask losses"
        }

        test "released sizes (100 queries, 96x96 masks, 384x384 targets, 12544 points, S4 batch of 2 videos) run" {
            use _ = torch.NewDisposeScope()
            let gen = new torch.Generator(3UL)
            let leaf (shape: int64[]) = torch.randn(shape, generator = gen).requires_grad_(true)
            let preds = [ for _ in 0 .. 9 -> { Logits = leaf [| 10L; 100L; 3L |]; Masks = leaf [| 10L; 100L; 96L; 96L |] } ]
            let norm (t: Tensor) = (t / t.norm(-1, keepdim = true)).detach().requires_grad_(true)
            let out =
                { Predictions = preds; AudioFeat = Some(norm (torch.randn([| 10L; 256L |], generator = gen)))
                  ProtoFeat = Some(norm (torch.randn([| 10L; 23L; 256L |], generator = gen))); Assignment = torch.zeros(1L); AttentionMasks = [] }
            let maps = [| for r in [ 100L; 250L ] -> torch.arange((384L).ToScalar()).view(384L, 1L).lt(r.ToScalar()).expand(384L, 384L).to_type(torch.int64) |]
            let targets = maps |> Array.map (FrameTarget.ofLabelMap 255L)
            use crit = new Criterion(CriterionConfig.Released Subset.S4)
            let sw = Diagnostics.Stopwatch.StartNew()
            let r = crit.Compute(out, targets, Supervision.s4 10L 5L [| 1; 23 |], gen)
            r.Total.backward()
            Expect.equal r.Terms.Count 31 "31 terms"
            Expect.isTrue (Double.IsFinite(r.Total.item<float32>() |> float)) "finite"
            Expect.isLessThan sw.Elapsed.TotalSeconds 60.0 "criterion + backward well under a minute on a CPU"
        }

        test "repeated steps in a dispose scope leave no live tensors behind" {
            use _ = torch.NewDisposeScope()
            let gen = new torch.Generator(4UL)
            let leaf (shape: int64[]) = torch.randn(shape, generator = gen).requires_grad_(true)
            let preds = [ for _ in 0 .. 9 -> { Logits = leaf [| 5L; 10L; 3L |]; Masks = leaf [| 5L; 10L; 8L; 8L |] } ]
            let out = { Predictions = preds; AudioFeat = None; ProtoFeat = None; Assignment = torch.zeros(1L); AttentionMasks = [] }
            let targets = [| for r in 1L .. 5L -> FrameTarget.ofLabelMap 255L (torch.arange((32L).ToScalar()).view(32L, 1L).lt((6L * r).ToScalar()).expand(32L, 32L).to_type(torch.int64)) |]
            use crit = new Criterion((CriterionConfig.Released Subset.MS3).WithNumPoints 32L)
            let step () =
                use scope = torch.NewDisposeScope()
                let r = crit.Compute(out, targets, Supervision.ms3 5L, gen)
                r.Total.backward()
                for p in preds do
                    p.Logits.grad.zero_() |> ignore
                    p.Masks.grad.zero_() |> ignore
            step ()
            let live () = TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount
            let before = live ()
            for _ in 1 .. 5 do step ()
            Expect.equal (live ()) before "live tensor count after 5 more steps"
        }

        test "Tiny S4 model end to end: the criterion's gradient reaches the model, and an SGD step lowers the loss" {
            use _ = torch.NewDisposeScope()
            let cfg = VctConfig.Tiny(Subset.S4, 64L, 4L)
            use model = new VctModel(cfg)
            model.eval ()   // deterministic (no Gumbel noise, no stochastic depth); gradients still flow
            let g = new torch.Generator(21UL)
            let inputs = Golden.tinyInputs (Some g) cfg 5L false
            let map = torch.arange((64L).ToScalar()).view(1L, 64L).lt((24L).ToScalar()).expand(64L, 64L).to_type(torch.int64)
            let targets = [| FrameTarget.ofLabelMap 255L map |]
            use crit = new Criterion((CriterionConfig.Released Subset.S4).WithNumPoints 256L)
            let sup = Supervision.s4 5L 5L [| 3 |]
            let trainable = [ for p in model.parameters() do if p.requires_grad then p ] @ [ crit.LogitScale ]
            let loss () =
                use scope = torch.NewDisposeScope()
                use out = model.Forward inputs
                let r = crit.Compute(out.Decoder, targets, sup, new torch.Generator(1UL))
                r.Total.backward()
                r.Total.item<float32>() |> float
            let before = loss ()
            let reached = trainable |> List.filter (fun p -> not (isNull p.grad) && p.grad.abs().sum().item<float32>() > 0.0f)
            Expect.isGreaterThan reached.Length (trainable.Length / 2) "most trainable tensors get a gradient"
            do
                use _ = torch.no_grad ()
                for p in trainable do
                    if not (isNull p.grad) then
                        p.sub_(p.grad * (1e-3).ToScalar()) |> ignore
                        p.grad.zero_() |> ignore
            let after = loss ()
            Expect.isLessThan after before "one small SGD step on the same points lowers the loss"
        }

        test "Criterion with a generator on a Tiny-sized output: finite loss, gradients reach every prediction and logit_scale" {
            use _ = torch.NewDisposeScope()
            let gen = new torch.Generator(5UL)
            let leaf (shape: int64[]) = torch.randn(shape, generator = gen).requires_grad_(true)
            let preds = [ for _ in 0 .. 9 -> { Logits = leaf [| 10L; 20L; 3L |]; Masks = leaf [| 10L; 20L; 16L; 16L |] } ]
            let norm (t: Tensor) = (t / t.norm(-1, keepdim = true)).detach().requires_grad_(true)
            let out =
                { Predictions = preds; AudioFeat = Some(norm (torch.randn([| 10L; 64L |], generator = gen)))
                  ProtoFeat = Some(norm (torch.randn([| 10L; 23L; 64L |], generator = gen))); Assignment = torch.zeros(1L); AttentionMasks = [] }
            // Video 0: rows 0..9 are object; video 1: rows 0..19.
            let maps = [| for rows in [ 10L; 20L ] -> torch.arange((64L).ToScalar()).view(64L, 1L).lt(rows.ToScalar()).expand(64L, 64L).to_type(torch.int64) |]
            let targets = maps |> Array.map (FrameTarget.ofLabelMap 255L)
            use crit = new Criterion((CriterionConfig.Released Subset.S4).WithNumPoints 64L)
            let r = crit.Compute(out, targets, Supervision.s4 10L 5L [| 3; 17 |], gen)
            Expect.isTrue (Double.IsFinite(r.Total.item<float32>() |> float)) "finite total"
            r.Total.backward()
            for p in preds do
                Expect.isTrue (p.Logits.grad.abs().sum().item<float32>() > 0.0f) "class gradient"
                Expect.isTrue (p.Masks.grad.abs().sum().item<float32>() > 0.0f) "mask gradient"
                // Frames 1-4 and 6-9 are not supervised in S4.
                Expect.equal (p.Masks.grad[1L].abs().sum().item<float32>()) 0.0f "frame 1 unsupervised"
            Expect.isTrue (crit.LogitScale.grad.abs().item<float32>() > 0.0f) "logit_scale gradient"
            Expect.sequenceEqual (crit.parameters() |> Seq.map (fun p -> p.shape.Length) |> List.ofSeq) [ 0 ] "one scalar parameter"
            Expect.contains (crit.state_dict().Keys |> List.ofSeq) "logit_scale" "official name logit_scale"
            Expect.contains (crit.state_dict().Keys |> List.ofSeq) "empty_weight" "official name empty_weight"
        }
    ]
