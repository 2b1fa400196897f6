/// Tests of src/Vct.Core/Training: the optimiser settings and schedule, mixed precision, the Hungarian solver, the
/// matcher and the losses against the official criterion, data-parallel training over MPI, the trainer (resume,
/// divergence, checkpoints, `vct train` and `vct eval`) and the CLI's handling of Ctrl-C and SIGTERM.
module Vct.Core.Tests.TrainingTests

/// Training/Optim.fs: the official build_optimizer rules, the poly schedule, clipping, the optimiser state.
module OptimTests =
    open System
    open Expecto
    open TorchSharp
    open Vct.Core
    open Vct.Core.Platform
    open Vct.Core.Training

    [<Tests>]
    let tests =
        testList "Optim" [
            test "parameter settings follow the official build_optimizer rules on the released S4 model" {
                use _ = torch.no_grad ()
                use m = new VctModel(VctConfig.Released Subset.S4)
                let s = Optim.settings OptimConfig.Released [ "", m :> torch.nn.Module ] |> List.map fst
                let find name = s |> List.find (fun x -> x.Name = name)
                let check name lr wd =
                    let x = find name
                    Expect.floatClose Accuracy.veryHigh x.LrScale lr $"{name} lr scale"
                    Expect.floatClose Accuracy.veryHigh x.WeightDecay wd $"{name} weight decay"
                check "backbone.patch_embed.proj.weight" 0.1 0.05
                check "pre_sam_backbone.layers.2.blocks.5.attn.qkv.weight" 0.1 0.05
                check "backbone.layers.0.blocks.0.attn.relative_position_bias_table" 0.1 0.0
                check "backbone.norm3.weight" 0.1 0.0
                check "sem_seg_head.pixel_decoder.input_proj.0.1.weight" 1.0 0.0          // GroupNorm
                check "sem_seg_head.pixel_decoder.transformer.level_embed" 1.0 0.05      // a bare Parameter decays
                check "sem_seg_head.predictor.query_feat.weight" 1.0 0.0                 // Embedding
                check "sem_seg_head.predictor.visual_query_block.prototype.weight" 1.0 0.0
                check "sem_seg_head.predictor.transformer_ffn_layers.3.norm.bias" 1.0 0.0
                check "sem_seg_head.predictor.class_embed.weight" 1.0 0.05
                Expect.isFalse (s |> List.exists (fun x -> x.Name.StartsWith "audio_backbone")) "the frozen VGGish is not optimised"
                let trainable = m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.length
                Expect.equal s.Length trainable "one setting per trainable tensor"
            }

            testProperty "poly factor: 1 at the start, 0 at the end, non-increasing" <| fun (maxIter: FsCheck.PositiveInt) ->
                let n = maxIter.Get
                let f = Optim.polyFactor OptimConfig.Released n
                Expect.floatClose Accuracy.veryHigh (f 0) 1.0 "starts at 1"
                Expect.floatClose Accuracy.veryHigh (f n) 0.0 "ends at 0"
                let xs = [ for i in 0 .. n -> f i ]
                Expect.isTrue (xs |> List.pairwise |> List.forall (fun (a, b) -> b <= a)) "non-increasing"
                Expect.floatClose Accuracy.high (f (n / 2)) (Math.Pow(1.0 - float (n / 2) / float n, 0.9)) "(1 - t)^0.9"

            test "full-model clipping bounds the global gradient norm" {
                use _ = torch.NewDisposeScope()
                let ps = [ for _ in 1 .. 3 -> torch.nn.Parameter(torch.randn(4L, 5L)) ]
                let loss = ps |> List.map (fun p -> (p * 100.0.ToScalar()).pow(2.0.ToScalar()).sum()) |> List.reduce (+)
                loss.backward()
                let before = Optim.clipFullModel 0.01 ps
                Expect.isGreaterThan before 0.01 "large before"
                let after = ps |> List.sumBy (fun p -> p.grad.pow(2.0.ToScalar()).sum().item<float32> () |> float) |> sqrt
                Expect.floatClose Accuracy.medium after 0.01 "0.01 after"
            }

            test "optimiser state survives a byte round trip: the next steps are identical" {
                use _ = torch.NewDisposeScope()
                let run (restore: bool) =
                    torch.manual_seed 3L |> ignore
                    use lin = torch.nn.Linear(4L, 3L)
                    let settings = Optim.settings OptimConfig.Released [ "", lin :> torch.nn.Module ]
                    let opt, lrs = Optim.adamW OptimConfig.Released settings
                    let x = torch.randn(8L, 4L)
                    let step () =
                        opt.zero_grad ()
                        lin.call(x).pow(2.0.ToScalar()).sum().backward()
                        opt.step () |> ignore
                    step (); step ()
                    if restore then
                        let bytes = Optim.stateBytes opt
                        let opt2, _ = Optim.adamW OptimConfig.Released settings
                        Optim.loadStateBytes opt2 bytes
                        Optim.setLr opt2 lrs 1.0
                        for _ in 1 .. 2 do
                            opt2.zero_grad ()
                            lin.call(x).pow(2.0.ToScalar()).sum().backward()
                            opt2.step () |> ignore
                    else
                        step (); step ()
                    lin.weight.detach().clone()
                Expect.isTrue (run(false).equal(run true).all().item<bool> ()) "same weights after resuming"
            }
        ]

/// Training/Amp.fs, mixed precision: the dynamic loss scaler, a step under autocast, the CPU refusal (the autocast
/// binding itself is tested in Platform.Tests.fs). The CUDA float16 path needs a GPU; here autocast runs on the CPU
/// in bfloat16.
module AmpTests =
    open System
    open System.IO
    open System.Threading
    open Expecto
    open TorchSharp
    open TorchSharp.Modules
    open Vct.Core
    open Vct.Core.Platform
    open Vct.Core.Training
    open Vct.Core.Tests.Support

    /// A small two-layer model with fixed weights, and a loss of it on fixed inputs.
    let private smallModel (seed: uint64) =
        let g = new torch.Generator(seed)
        let m = torch.nn.Sequential(torch.nn.Linear(6L, 5L), torch.nn.ReLU(), torch.nn.Linear(5L, 3L))
        use _ = torch.no_grad ()
        for p in m.parameters () do p.copy_(torch.randn(p.shape, generator = g)) |> ignore
        let x = torch.randn([| 8L; 6L |], generator = g)
        let loss () = (m.call x).pow(2.0.AsScalar).mean()
        m, loss

    let private paramsOf (m: torch.nn.Module) = [ for p in m.parameters () -> p ]
    let private snapshot (ps: Parameter list) = [ for p in ps -> p.detach().clone() ]
    let private grads (ps: Parameter list) = [ for p in ps -> p.grad.detach().clone() ]

    /// Puts an inf (or NaN) into the first gradient, as an overflowing float16 backward would.
    let private inject (value: float32) (ps: Parameter list) =
        use _ = torch.no_grad ()
        ps.Head.grad.view(-1L).narrow(0L, 0L, 1L).fill_(value.AsScalar) |> ignore

    let private scaledBackward (s: GradScaler) (loss: unit -> Tensor) (opt: torch.optim.Optimizer) =
        opt.zero_grad ()
        use l = loss ()
        use scaled = s.ScaleLoss l
        scaled.backward ()

    [<Tests>]
    let tests =
        testList "Amp" [
            test "GradScaler: an inf or NaN gradient skips the optimiser step and halves the scale" {
                use _ = torch.NewDisposeScope()
                for bad in [ Single.PositiveInfinity; Single.NaN ] do
                    let m, loss = smallModel 3UL
                    let ps = paramsOf m
                    let opt = torch.optim.AdamW(ps, 1e-2)
                    let s = GradScaler { GradScalerOptions.Default with InitScale = 1024.0 }
                    // A good step first, so that the optimiser has state that a skipped step must not touch.
                    scaledBackward s loss opt
                    let good = s.Step(opt, ps, Some 1.0)
                    Expect.isFalse good.Skipped "finite gradients: stepped"
                    Expect.equal s.GrowthTracker 1 "one good step counted"
                    let before = snapshot ps
                    let stateBefore = Optim.stateBytes opt
                    scaledBackward s loss opt
                    inject bad ps
                    let r = s.Step(opt, ps, Some 1.0)
                    Expect.isTrue r.Skipped $"{bad} in a gradient: skipped"
                    Expect.equal r.Scale 1024.0 "the step reports the scale it used"
                    Expect.equal r.GradNorm None "no clipping on a skipped step"
                    Expect.equal s.Scale 512.0 "scale halved"
                    Expect.equal s.GrowthTracker 0 "good-step count restarts"
                    for p, b in List.zip ps before do Golden.expectEqual "parameters unchanged" b p
                    Expect.equal (Optim.stateBytes opt) stateBefore "optimiser state (moments, step count) unchanged"
            }

            test "GradScaler: the scale doubles after GrowthInterval good steps in a row; a bad step restarts the count" {
                use _ = torch.NewDisposeScope()
                let m, loss = smallModel 4UL
                let ps = paramsOf m
                let opt = torch.optim.SGD(ps, 1e-3)
                let s = GradScaler { GradScalerOptions.Default with InitScale = 256.0; GrowthInterval = 3 }
                let step (inf: bool) =
                    scaledBackward s loss opt
                    if inf then inject Single.PositiveInfinity ps
                    s.Step(opt, ps, None)
                for _ in 1 .. 2 do step false |> ignore
                Expect.equal (s.Scale, s.GrowthTracker) (256.0, 2) "two good steps: not yet"
                Expect.isTrue (step true).Skipped "bad step"
                Expect.equal (s.Scale, s.GrowthTracker) (128.0, 0) "halved, count restarted"
                for _ in 1 .. 2 do step false |> ignore
                Expect.equal (s.Scale, s.GrowthTracker) (128.0, 2) "two good steps after the bad one: not yet"
                let third = step false
                Expect.equal third.Scale 128.0 "the third good step used the old scale"
                Expect.equal (s.Scale, s.GrowthTracker) (256.0, 0) "third good step in a row: doubled"
                for _ in 1 .. 3 do step false |> ignore
                Expect.equal s.Scale 512.0 "and again after three more"
            }

            test "GradScaler: unscaled gradients equal the unscaled loss's, and clipping and the step see them" {
                use _ = torch.NewDisposeScope()
                // Reference gradients: plain backward of the unscaled loss.
                let mA, lossA = smallModel 5UL
                let psA = paramsOf mA
                do
                    use l = lossA ()
                    l.backward ()
                let gRef = grads psA
                // Scaled backward, then unscale.
                let mB, lossB = smallModel 5UL
                let psB = paramsOf mB
                let s = GradScaler { GradScalerOptions.Default with InitScale = 65536.0 }
                scaledBackward s lossB (torch.optim.SGD(psB, 0.1))
                for p, g in List.zip psB gRef do Golden.expectClose "scaled gradient = scale x gradient" (g * 65536.0.AsScalar) p.grad
                Expect.isFalse (s.Unscale psB) "finite"
                for p, g in List.zip psB gRef do Golden.expectClose "unscaled gradient = gradient of the unscaled loss" g p.grad
                // Whole steps with active clipping and SGD (which, unlike Adam, is not invariant to the gradients'
                // scale): float32 path against the scaled path.
                let mC, lossC = smallModel 5UL
                let psC = paramsOf mC
                let optC = torch.optim.SGD(psC, 0.1)
                optC.zero_grad ()
                let plain = Amp.backwardAndStep None (lossC ()) optC psC (Some 0.05)
                let mD, lossD = smallModel 5UL
                let psD = paramsOf mD
                let optD = torch.optim.SGD(psD, 0.1)
                optD.zero_grad ()
                let scaled = Amp.backwardAndStep (Some(GradScaler())) (lossD ()) optD psD (Some 0.05)
                Expect.isFalse scaled.Skipped "stepped"
                Expect.equal scaled.Scale 65536.0 "scaled by 2^16"
                Expect.isGreaterThan plain.GradNorm.Value 0.05 "clipping was active (so its order matters)"
                Expect.floatClose Accuracy.medium scaled.GradNorm.Value plain.GradNorm.Value "clipping saw the unscaled norm"
                let moved = List.zip psC (snapshot psA) |> List.exists (fun (p, q) -> not (p.allclose(q)))
                Expect.isTrue moved "the step moved the parameters"
                for p, q in List.zip psD psC do Golden.expectClose "parameters after the step equal the float32 path's" q p
            }

            test "GradScaler.ScaleLoss multiplies in float32, so a float16 loss cannot overflow" {
                use _ = torch.NewDisposeScope()
                let s = GradScaler()
                let l = torch.tensor(1000.0f).to_type(torch.float16)
                let scaled = s.ScaleLoss l
                Expect.equal scaled.dtype torch.float32 "float32"
                Expect.equal (scaled.item<float32> ()) 65536000.0f "1000 x 2^16, finite"
            }

            test "GradScaler: bad options are refused, and a restored state is used" {
                Expect.throwsT<ArgumentException> (fun () -> GradScaler { GradScalerOptions.Default with GrowthInterval = 0 } |> ignore) "interval"
                Expect.throwsT<ArgumentException> (fun () -> GradScaler { GradScalerOptions.Default with BackoffFactor = 1.0 } |> ignore) "backoff"
                Expect.throwsT<ArgumentException> (fun () -> GradScaler { GradScalerOptions.Default with InitScale = infinity } |> ignore) "scale"
                let s = GradScaler()
                s.Restore(2048.0, 17)
                Expect.equal (s.Scale, s.GrowthTracker) (2048.0, 17) "restored"
                Expect.throwsT<ArgumentException> (fun () -> s.Restore(nan, 0)) "NaN scale refused"
            }

            test "a tiny-model step under autocast (CPU bfloat16) with loss scaling: finite loss near float32's, float32 gradients" {
                use _ = torch.NewDisposeScope()
                let cfg = VctConfig.Tiny(Subset.S4, 64L, 4L)
                use model = new VctModel(cfg)
                model.eval () // deterministic; gradients still flow
                let g = new torch.Generator(21UL)
                let inputs = Golden.tinyInputs (Some g) cfg 5L false
                let map = torch.arange(64L.AsScalar).view(1L, 64L).lt(24L.AsScalar).expand(64L, 64L).to_type(torch.int64)
                let targets = [| FrameTarget.ofLabelMap 255L map |]
                use crit = new Criterion((CriterionConfig.Released Subset.S4).WithNumPoints 256L)
                let sup = Supervision.s4 5L 5L [| 3 |]
                let trainable = [ for p in model.parameters () do if p.requires_grad then p ] @ [ crit.LogitScale ]
                let forward region =
                    Amp.within region (fun () ->
                        use out = model.Forward inputs
                        let logits = out.Decoder.Last.Logits.detach().clone()
                        crit.Forward(out.Decoder, targets, sup, new torch.Generator(1UL)), logits)
                let lossF, logitsF = forward None
                let lossB, logitsB = forward (Some(DeviceType.CPU, torch.ScalarType.BFloat16))
                // The model hands float32 to its callers in both cases (Model.fs); the products ran in bfloat16 under
                // autocast, which shows as logits that differ from float32's by bfloat16 rounding, not more.
                Expect.equal logitsF.dtype torch.float32 "float32 without autocast"
                Expect.equal logitsB.dtype torch.float32 "float32 outputs under autocast too"
                let diff = (logitsB - logitsF).abs().max().item<float32> () |> float
                Expect.isGreaterThan diff 0.0 "the class head ran in bfloat16 under autocast (outputs differ from float32's)"
                Expect.isLessThan diff 0.5 "by rounding only"
                let f = lossF.Total.item<float32> () |> float
                let b = (lossB.Total.to_type(torch.float32)).item<float32> () |> float
                Expect.isTrue (Double.IsFinite b) "finite loss under autocast"
                Expect.isLessThan (abs (b - f) / abs f) 0.05 $"loss under autocast ({b}) within 5 percent of float32's ({f})"
                Expect.equal (lossB.Values |> Map.keys |> List.ofSeq) (lossF.Values |> Map.keys |> List.ofSeq) "the same terms, readable"
                let opt = torch.optim.SGD(trainable, 0.0) // lr 0: only the gradients matter here
                opt.zero_grad ()
                let r = Amp.backwardAndStep (Some(GradScaler())) lossB.Total opt trainable (Some 0.01)
                Expect.isFalse r.Skipped "no overflow at 2^16 in float32 gradients"
                let withGrad = trainable |> List.filter (fun p -> not (isNull p.grad))
                Expect.isGreaterThan withGrad.Length (trainable.Length / 2) "most tensors get a gradient"
                for p in withGrad do Expect.equal p.grad.dtype torch.float32 "float32 gradients of float32 parameters"
            }

            test "mixed precision is refused on the CPU with a clear message, by the library and by vct train" {
                let e = Expect.throwsC (fun () -> Amp.require torch.CPU) id
                Expect.isTrue (e :? ArgumentException) "an argument error"
                for part in [ "--amp"; "CUDA only"; "without --amp" ] do Expect.stringContains e.Message part $"says {part}"
                // Trainer.run refuses before touching the run directory.
                use tmp = new TempDir("vct-amp-cpu")
                let dir = Path.Combine(tmp.Path, "runs")
                let cfg = { (TrainJob.config "tiny" Subset.S4 { Preset = "tiny"; Data = None; RunsDir = dir; Name = "r"; Iterations = Some 1; BatchVideos = Some 1
                                                                BaseLr = None; Seed = 1; Resume = false; Device = torch.CPU; Workers = 0; EvalPeriod = None
                                                                SwinWeights = None; VggishWeights = None; MissingMasks = Fusion.MissingMasks.Refuse; Amp = true }) with Amp = true }
                Expect.isTrue cfg.Amp "the preset keeps the option"
                Expect.throwsT<ArgumentException> (fun () -> Trainer.run cfg [||] [||] torch.CPU dir false ignore ignore CancellationToken.None |> ignore) "Trainer.run refuses"
                Expect.isFalse (Directory.Exists dir) "no run directory"
                // The CLI: one line, exit 1, nothing generated.
                let code, out, err = runVct [ "train"; "--amp"; "--device"; "cpu"; "--runs"; dir; "--name"; "r"; "--data"; Path.Combine(dir, "data") ]
                Expect.equal code 1 $"exit code 1; stdout {out}"
                Expect.stringContains err "vct: mixed precision (--amp) runs on CUDA only" "the reason"
                Expect.isFalse (err.Contains "   at ") "no stack trace"
                Expect.isFalse (Directory.Exists dir) "nothing written"
            }

            test "the loss scaler's state is saved in checkpoint_last and restored" {
                use tmp = new TempDir("vct-amp-ckpt")
                let dir = tmp.Path
                use _ = torch.NewDisposeScope()
                let cfg =
                    TrainJob.config "tiny" Subset.S4
                        { Preset = "tiny"; Data = None; RunsDir = dir; Name = "r"; Iterations = None; BatchVideos = None; BaseLr = None; Seed = 1
                          Resume = false; Device = torch.CPU; Workers = 0; EvalPeriod = None; SwinWeights = None; VggishWeights = None
                          MissingMasks = Fusion.MissingMasks.Refuse; Amp = false }
                use model = new VctModel(cfg.Model)
                use crit = new Criterion(cfg.Criterion)
                let settings = Optim.settings cfg.Optim [ "", model :> torch.nn.Module; "criterion", crit :> torch.nn.Module ]
                let opt, _ = Optim.adamW cfg.Optim settings
                let s = GradScaler()
                s.Restore(4096.0, 123)
                let path = Path.Combine(dir, "checkpoint_last.safetensors")
                RunState.saveState path cfg model crit opt (Some s) 7 0.5 5
                let s2 = GradScaler()
                Expect.isTrue (RunState.loadScalerState path s2) "found"
                Expect.equal (s2.Scale, s2.GrowthTracker) (4096.0, 123) "restored"
                let plain = Path.Combine(dir, "plain.safetensors")
                RunState.saveState plain cfg model crit opt None 7 0.5 5
                let s3 = GradScaler()
                Expect.isFalse (RunState.loadScalerState plain s3) "a float32 run's checkpoint has none"
                Expect.equal s3.Scale GradScalerOptions.Default.InitScale "then the scaler starts afresh"
                Expect.equal (RunState.loadState path model crit opt) (7, 0.5, 5) "the rest of the state as before"
            }
        ]

/// Training/Hungarian.fs: the assignment solver against brute force and SciPy.
module HungarianTests =
    open System
    open Expecto
    open TorchSharp
    open Vct.Core.Training
    open Vct.Core.Tests.Golden
    open Vct.Core.Tests.Generators

    // ---------------------------------------------------------------------------------------------------
    // Brute force and random matrices

    /// The optimal total by enumerating every injective map of the smaller side into the larger one;
    /// None when every assignment uses a +infinity entry.
    let bruteForce (cost: float[,]) : float option =
        let n, m = Array2D.length1 cost, Array2D.length2 cost
        let tall = n > m
        let small, large = (if tall then m, n else n, m)
        let at i j = if tall then cost[j, i] else cost[i, j]
        let used = Array.zeroCreate<bool> large
        let mutable best = Double.PositiveInfinity
        let rec go i acc =
            if i = small then (if acc < best then best <- acc)
            else
                for j in 0 .. large - 1 do
                    if not used[j] && not (Double.IsPositiveInfinity(at i j)) then
                        used[j] <- true
                        go (i + 1) (acc + at i j)
                        used[j] <- false
        go 0 0.0
        if Double.IsPositiveInfinity best then None else Some best

    let makeMatrix (kind: MatrixKind) (n: int) (m: int) (seed: int) =
        let r = Random seed
        Array2D.init n m (fun _ _ ->
            match kind with
            | Uniform -> r.NextDouble()
            | SmallInts -> float (r.Next 4)
            | Constant -> 2.5
            | Signed -> (r.NextDouble() - 0.5) * 200.0
            | Forbidden -> if r.NextDouble() < 0.3 then Double.PositiveInfinity else float (r.Next 10))

    /// Rows ascending and distinct, columns distinct, min(n, m) pairs, all inside the matrix.
    let expectValid (cost: float[,]) (rows: int[], cols: int[]) =
        let n, m = Array2D.length1 cost, Array2D.length2 cost
        Expect.equal rows.Length (min n m) "pair count"
        Expect.equal cols.Length (min n m) "pair count"
        Expect.isTrue (rows |> Array.pairwise |> Array.forall (fun (a, b) -> a < b)) "rows strictly ascending"
        Expect.equal (Array.distinct cols).Length cols.Length "columns distinct"
        Expect.isTrue (rows |> Array.forall (fun r -> r >= 0 && r < n)) "rows in range"
        Expect.isTrue (cols |> Array.forall (fun c -> c >= 0 && c < m)) "cols in range"

    /// Solve agrees with brute force: same optimum (to rounding), or both infeasible.
    let agreesWithBruteForce (cost: float[,]) =
        match bruteForce cost with
        | None -> Expect.throwsT<ArgumentException> (fun () -> Hungarian.solve cost |> ignore) "infeasible input rejected"
        | Some best ->
            let a = Hungarian.solve cost
            expectValid cost a
            let total = Hungarian.totalCost cost a
            Expect.floatClose { absolute = 1e-9; relative = 1e-12 } total best "optimal total"

    let private config = { FsCheckConfig.defaultConfig with maxTest = 300; arbitrary = [ typeof<CostMatrices> ] }

    [<Tests>]
    let tests =
        testList "Training.Hungarian" [
            testPropertyWithConfig config "random n x m (n, m <= 7, all kinds): optimum equals brute force" <|
                fun (n: int, m: int, kind: MatrixKind, seed: int) -> agreesWithBruteForce (makeMatrix kind n m seed)

            test "every shape up to 7x7, 6 matrices of each kind: optimum equals brute force" {
                for n in 1 .. 7 do
                    for m in 1 .. 7 do
                        for kind in [ Uniform; SmallInts; Constant; Signed; Forbidden ] do
                            for s in 0 .. 5 do
                                agreesWithBruteForce (makeMatrix kind n m (1000 * n + 100 * m + s))
            }

            test "transposing the matrix gives the transposed assignment's cost" {
                for s in 0 .. 50 do
                    let c = makeMatrix SmallInts (3 + s % 5) (1 + s % 7) s
                    let t = Array2D.init (Array2D.length2 c) (Array2D.length1 c) (fun i j -> c[j, i])
                    Expect.floatClose Accuracy.veryHigh (Hungarian.totalCost t (Hungarian.solve t)) (Hungarian.totalCost c (Hungarian.solve c)) "same optimum"
            }

            test "larger square and rectangular matrices: valid, and no cheaper single swap" {
                for (n, m) in [ (100, 3); (3, 100); (60, 60); (100, 20) ] do
                    let c = makeMatrix Uniform n m (n * m)
                    let rows, cols = Hungarian.solve c
                    expectValid c (rows, cols)
                    // 2-opt check on the assigned pairs and on moving a pair to a free line.
                    for a in 0 .. rows.Length - 1 do
                        for b in a + 1 .. rows.Length - 1 do
                            let now = c[rows[a], cols[a]] + c[rows[b], cols[b]]
                            let swapped = c[rows[a], cols[b]] + c[rows[b], cols[a]]
                            Expect.isGreaterThanOrEqual (swapped + 1e-12) now "no improving swap"
            }

            test "empty matrices give empty assignments" {
                Expect.equal (Hungarian.solve (Array2D.zeroCreate 0 0)) ([||], [||]) "0x0"
                Expect.equal (Hungarian.solve (Array2D.zeroCreate 5 0)) ([||], [||]) "5x0"
                Expect.equal (Hungarian.solve (Array2D.zeroCreate 0 3)) ([||], [||]) "0x3"
            }

            test "NaN, -infinity and infeasible inputs are rejected with a message" {
                let c = makeMatrix Uniform 4 4 1
                c[2, 1] <- nan
                let e = Expect.throwsC (fun () -> Hungarian.solve c |> ignore) id
                Expect.stringContains e.Message "NaN at (2, 1)" "NaN position named"
                c[2, 1] <- Double.NegativeInfinity
                let e = Expect.throwsC (fun () -> Hungarian.solve c |> ignore) id
                Expect.stringContains e.Message "-infinity" "-inf named"
                let inf = Double.PositiveInfinity
                let infeasible = array2D [ [ 1.0; inf; inf ]; [ 2.0; inf; inf ]; [ 0.0; 1.0; 2.0 ] ]
                let e = Expect.throwsC (fun () -> Hungarian.solve infeasible |> ignore) id
                Expect.stringContains e.Message "infeasible" "infeasibility named"
                // A forbidden pair that can be avoided is fine.
                let ok = array2D [ [ 1.0; inf ]; [ inf; 2.0 ]; [ 0.5; 0.5 ] ]
                Expect.equal (Hungarian.solve ok) ([| 0; 2 |], [| 0; 1 |]) "3x2 avoiding +inf"
            }

            test "scipy.optimize.linear_sum_assignment on 25 stored matrices: same optimal total and same pairs" {
                use g = new Golden.File("training", "hungarian.pt")
                let count = g["count"].item<int64>() |> int
                Expect.isGreaterThanOrEqual count 20 "at least 20 matrices"
                for i in 0 .. count - 1 do
                    let t = g[$"m{i}.cost"]
                    let n, m = int t.shape[0], int t.shape[1]
                    let data = t.data<float>().ToArray()
                    let c = Array2D.init n m (fun r k -> data[r * m + k])
                    let rows, cols = Hungarian.solve c
                    let total = Hungarian.totalCost c (rows, cols)
                    let expected = g[$"m{i}.total"].item<float>()
                    Expect.floatClose { absolute = 1e-9; relative = 1e-12 } total expected $"matrix {i} ({n}x{m}): total"
                    Expect.sequenceEqual (Array.map int64 rows) (g[$"m{i}.rows"].data<int64>().ToArray()) $"matrix {i}: rows"
                    Expect.sequenceEqual (Array.map int64 cols) (g[$"m{i}.cols"].data<int64>().ToArray()) $"matrix {i}: cols (ties broken as SciPy)"
            }
        ]

/// Training/Matcher.fs and Training/Losses.fs: targets, supervision, point sampling, the official matcher and criteria.
module LossesTests =
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
        let r = crit.Forward(out, targets, supervision, UniformSource.ofQueue (draws g))
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
                let r = crit.Forward(out, targets, Supervision.s4 10L 5L [| 1; 23 |], gen)
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
                    let r = crit.Forward(out, targets, Supervision.ms3 5L, gen)
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
                    let r = crit.Forward(out.Decoder, targets, sup, new torch.Generator(1UL))
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
                let r = crit.Forward(out, targets, Supervision.s4 10L 5L [| 3; 17 |], gen)
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

/// Data-parallel training over MPI (`vct train --distributed mpi` under mpirun), gradient accumulation and the
/// fault handling of a job: the real CLI, real ranks. Skipped when mpirun (Open MPI) is not installed.
module DistributedTests =
    open System
    open System.Diagnostics
    open System.IO
    open System.Text.Json
    open System.Threading
    open Expecto
    open TorchSharp
    open Vct.Core
    open Vct.Core.Platform
    open Vct.Core.Data
    open Vct.Core.Training
    open Vct.Core.Tests.Support

    let private cli = cliPath

    /// mpirun on PATH, if any.
    let private mpirun =
        lazy
            (let path = Environment.GetEnvironmentVariable "PATH"
             if isNull path then None
             else path.Split(':') |> Array.map (fun d -> Path.Combine(d, "mpirun")) |> Array.tryFind File.Exists)

    let private requireMpi () =
        if mpirun.Value.IsNone then skiptest "mpirun not found: install Open MPI (openmpi-bin) to run the data-parallel tests"
        cliDll () |> ignore

    /// Launcher flags: root in CI containers, and more ranks than cores on small machines.
    let private mpiFlags = [ "--allow-run-as-root"; "--oversubscribe"; "--mca"; "btl"; "self,vader"; "--bind-to"; "none" ]

    let private psiOf (exe: string) (args: string list) =
        let p = ProcessStartInfo(exe, UseShellExecute = false)
        for a in args do p.ArgumentList.Add a
        p

    /// `vct args` in one process: (exit code, stdout, stderr).
    let private vct (args: string list) = runProcess (psiOf "dotnet" (cli.Value :: args))

    /// `mpirun -np n vct args --distributed mpi`.
    let private mpiArgs (n: int) (args: string list) =
        mpiFlags @ [ "-np"; string n; "dotnet"; cli.Value ] @ args @ [ "--distributed"; "mpi" ]

    let private mpi (n: int) (args: string list) = runProcess (psiOf mpirun.Value.Value (mpiArgs n args))

    let private ok (what: string) (code: int, _: string, err: string) =
        if code <> 0 then failtestf "%s exited %d:\n%s" what code err

    /// ||a - b|| / ||b|| over all tensors of two safetensors files (float64), and the tensors compared.
    let private relativeDifference (a: string) (b: string) =
        use fa = Checkpoint.Safetensors.read a
        use fb = Checkpoint.Safetensors.read b
        let mutable num, den = 0.0, 0.0
        for kv in fa.Tensors do
            use x = kv.Value.to_type(torch.float64)
            use y = fb.Tensors[kv.Key].to_type(torch.float64)
            use d = x - y
            num <- num + Math.Pow(d.norm().item<float>(), 2.0)
            den <- den + Math.Pow(y.norm().item<float>(), 2.0)
        sqrt num / sqrt den, fa.Tensors.Count

    let private losses (metrics: string) =
        [ for line in File.ReadAllLines metrics do
              use doc = JsonDocument.Parse line
              if doc.RootElement.GetProperty("type").GetString() = "step" then
                  yield doc.RootElement.GetProperty("loss").GetDouble() ]

    /// (M_J, M_F) of the last "eval" line of a metrics log.
    let private lastEval (metrics: string) =
        [ for line in File.ReadAllLines metrics do
              use doc = JsonDocument.Parse line
              if doc.RootElement.GetProperty("type").GetString() = "eval" then
                  yield doc.RootElement.GetProperty("m_j").GetDouble(), doc.RootElement.GetProperty("m_f").GetDouble() ]
        |> List.last

    let private iterationOf (checkpoint: string) =
        use f = Checkpoint.Safetensors.read checkpoint
        int f.Metadata["iteration"]

    let private withData (f: string -> string -> unit) =
        withTempDir "vct-mpi" (fun dir ->
            let data = Path.Combine(dir, "data")
            Synth.generate { SynthOptions.Default Subset.S4 with Train = 8; Val = 2; Test = 2; Size = 64; EvalSize = 64 } data |> ignore
            f data (Path.Combine(dir, "runs")))

    let private common (data: string) (runs: string) (name: string) (iterations: int) =
        [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; runs; "--name"; name; "--batch"; "4"
          "--iterations"; string iterations; "--eval-period"; "100000"; "--device"; "cpu"; "--threads"; "1"; "--workers"; "0" ]

    let private copyDir (src: string) (dst: string) =
        Directory.CreateDirectory dst |> ignore
        for f in Directory.GetFiles src do File.Copy(f, Path.Combine(dst, Path.GetFileName f))

    /// The ranks (child processes) of an mpirun: pid -> OMPI_COMM_WORLD_RANK.
    let private ranksOf (mpirunPid: int) =
        [ for d in Directory.GetDirectories "/proc" do
              match Int32.TryParse(Path.GetFileName d) with
              | true, pid ->
                  try
                      let stat = File.ReadAllText(Path.Combine(d, "stat"))
                      let fields = stat.Substring(stat.LastIndexOf ')' + 2).Split(' ')
                      if int fields[1] = mpirunPid then
                          let env = File.ReadAllText(Path.Combine(d, "environ")).Split('\000')
                          match env |> Array.tryFind (fun e -> e.StartsWith "OMPI_COMM_WORLD_RANK=") with
                          | Some e -> yield pid, int (e.Substring 21)
                          | None -> ()
                  with _ -> ()
              | _ -> () ]

    /// Starts mpirun in the background; returns the process (its output drained).
    let private startMpi (n: int) (args: string list) =
        let psi = psiOf mpirun.Value.Value (mpiArgs n args)
        psi.RedirectStandardOutput <- true
        psi.RedirectStandardError <- true
        let p = Process.Start psi
        let err = p.StandardError.ReadToEndAsync()
        p.StandardOutput.ReadToEndAsync() |> ignore
        p, err

    let private waitFor (timeout: TimeSpan) (cond: unit -> bool) =
        let sw = Stopwatch.StartNew()
        while not (cond ()) && sw.Elapsed < timeout do Thread.Sleep 200
        cond ()

    let private stepCount (metrics: string) =
        if not (File.Exists metrics) then 0
        else
            use fs = new FileStream(metrics, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete)
            use r = new StreamReader(fs)
            r.ReadToEnd().Split('\n') |> Array.filter (fun l -> l.EndsWith "}") |> Array.length

    [<Tests>]
    let tests =
        testList "Distributed" [
            test "batch slices: split random draws equal the whole batch's" {
                use g1 = new torch.Generator(7UL)
                use whole = torch.rand([| 4L; 3L; 5L |], generator = g1)
                let parts =
                    [ for off in [ 0L; 2L ] ->
                          use g = new torch.Generator(7UL)
                          BatchSlice.within { Total = 4L; Offset = off; Count = 2L } (fun () -> BatchSlice.rand [| 2L; 3L; 5L |] torch.float32 torch.CPU (Some g)) ]
                use joined = torch.cat(parts |> Array.ofList, 0L)
                Expect.isTrue (joined.eq(whole).all().item<bool>()) "the slices of the batch's draw"
                // The criterion's points: per prediction one [1, P, 2] per frame, then two [K, S, 2].
                let counts = [| 2L; 1L; 3L |]
                let draw (u: UniformSource) frames k = [ for _ in 1 .. frames -> u [| 1L; 4L; 2L |] ] @ [ u [| k; 6L; 2L |]; u [| k; 2L; 2L |] ]
                use g = new torch.Generator(3UL)
                let all = [ for _ in 1 .. 2 do yield! draw (UniformSource.ofGenerator torch.CPU g) 3 6L ]
                use g = new torch.Generator(3UL)
                let part = [ for _ in 1 .. 2 do yield! draw (Distributed.slicedUniform (UniformSource.ofGenerator torch.CPU g) 3 1 2 counts) 2 4L ]
                // The part holds frames 1..2: match draws 1 and 2, then mask rows 2..5 of each prediction.
                for pred in 0 .. 1 do
                    let a, p = pred * 5, pred * 4
                    Expect.isTrue (part[p].eq(all[a + 1]).all().item<bool>()) "match draw of frame 1"
                    Expect.isTrue (part[p + 1].eq(all[a + 2]).all().item<bool>()) "match draw of frame 2"
                    Expect.isTrue (part[p + 2].eq(all[a + 3].narrow(0L, 2L, 4L)).all().item<bool>()) "candidate rows"
                    Expect.isTrue (part[p + 3].eq(all[a + 4].narrow(0L, 2L, 4L)).all().item<bool>()) "fill rows"
            }

            test "2 ranks equal 1 process with the same global batch, and --accumulate 2 with half the micro-batch; resume with another rank count" {
                requireMpi ()
                withData (fun data runs ->
                    vct (common data runs "single" 3) |> ok "single process"
                    mpi 2 (common data runs "ranks2" 3) |> ok "mpirun -np 2"
                    vct (common data runs "accumulate2" 3 @ [ "--accumulate"; "2" ]) |> ok "--accumulate 2"
                    let final name = Path.Combine(runs, name, "model_final.safetensors")
                    let rel2, n = relativeDifference (final "ranks2") (final "single")
                    let relA, _ = relativeDifference (final "accumulate2") (final "single")
                    printfn "weights after 3 steps, relative to one process x 4 videos: 2 ranks x 2 videos %.2e, --accumulate 2 x 2 videos %.2e (%d tensors)" rel2 relA n
                    Expect.isLessThan rel2 1e-5 "2 ranks x 2 videos = 1 process x 4 videos"
                    Expect.isLessThan relA 1e-5 "--accumulate 2 x 2 videos = 1 process x 4 videos"
                    Expect.isFalse (File.Exists(Path.Combine(runs, "ranks2", "model_final.safetensors.tmp"))) "no stray files"
                    for name in [ "ranks2"; "accumulate2" ] do
                        let a = losses (Path.Combine(runs, name, "metrics.jsonl"))
                        let b = losses (Path.Combine(runs, "single", "metrics.jsonl"))
                        Expect.equal a.Length 3 $"{name}: one log line per step (rank 0 alone writes)"
                        for x, y in List.zip a b do Expect.floatClose { absolute = 0.0; relative = 1e-5 } x y $"{name}: the step's loss"
                    // The final evaluation, sharded over the 2 ranks (one video each) and gathered: the mean over videos.
                    let (j1, f1), (j2, f2) = lastEval (Path.Combine(runs, "single", "metrics.jsonl")), lastEval (Path.Combine(runs, "ranks2", "metrics.jsonl"))
                    Expect.floatClose { absolute = 1e-4; relative = 0.0 } j2 j1 "sharded M_J = one process's"
                    Expect.floatClose { absolute = 1e-4; relative = 0.0 } f2 f1 "sharded M_F = one process's"
                    // Resume with another number of ranks: 2 steps in one process, then on to 3 with 1 and with 2 ranks.
                    vct (common data runs "first" 2) |> ok "first 2 steps"
                    copyDir (Path.Combine(runs, "first")) (Path.Combine(runs, "first2"))
                    vct (common data runs "first" 3 @ [ "--resume" ]) |> ok "resume in one process"
                    mpi 2 (common data runs "first2" 3 @ [ "--resume" ]) |> ok "resume on 2 ranks"
                    let relR, _ = relativeDifference (Path.Combine(runs, "first2", "model_final.safetensors")) (Path.Combine(runs, "first", "model_final.safetensors"))
                    Expect.isLessThan relR 1e-5 "resumed on 2 ranks = resumed in one process")
            }

            test "a killed rank stops the job within 30 s with a non-zero exit; checkpoint_last stays intact" {
                requireMpi ()
                withData (fun data runs ->
                    vct (common data runs "k" 2) |> ok "first 2 steps"
                    let last = Path.Combine(runs, "k", "checkpoint_last.safetensors")
                    let metrics = Path.Combine(runs, "k", "metrics.jsonl")
                    let p, err = startMpi 2 (common data runs "k" 100000 @ [ "--resume" ])
                    use p = p
                    try
                        Expect.isTrue (waitFor (TimeSpan.FromSeconds 120.0) (fun () -> stepCount metrics >= 4)) "the ranks train"
                        let victim = ranksOf p.Id |> List.find (fun (_, r) -> r = 1) |> fst
                        let sw = Stopwatch.StartNew()
                        Process.GetProcessById(victim).Kill()
                        let ended = p.WaitForExit 30000
                        Expect.isTrue ended "mpirun (and rank 0) ended within 30 s of the kill"
                        printfn "job ended %.1f s after rank 1 was killed" sw.Elapsed.TotalSeconds
                        p.WaitForExit()
                        Expect.notEqual p.ExitCode 0 "non-zero exit"
                        Expect.isTrue (ranksOf p.Id |> List.isEmpty) "no rank left"
                        Expect.equal (iterationOf last) 2 "checkpoint_last is the last complete one and reads"
                        Expect.stringContains err.Result "rank 1" "mpirun names the rank"
                    finally
                        if not p.HasExited then p.Kill true)
            }

            test "a hung rank (SIGSTOP) makes the watchdog stop the job" {
                requireMpi ()
                withData (fun data runs ->
                    let metrics = Path.Combine(runs, "h", "metrics.jsonl")
                    let p, err = startMpi 2 (common data runs "h" 100000 @ [ "--collective-timeout"; "8" ])
                    use p = p
                    let mutable victim = -1
                    try
                        Expect.isTrue (waitFor (TimeSpan.FromSeconds 120.0) (fun () -> stepCount metrics >= 2)) "the ranks train"
                        victim <- ranksOf p.Id |> List.find (fun (_, r) -> r = 1) |> fst
                        let code, _, e = runProcess (psiOf "kill" [ "-STOP"; string victim ])
                        if code <> 0 then failtestf "kill -STOP failed: %s" e
                        let sw = Stopwatch.StartNew()
                        Expect.isTrue (p.WaitForExit 30000) "the job ended within 30 s of the hang"
                        printfn "job ended %.1f s after rank 1 stopped (watchdog limit 8 s)" sw.Elapsed.TotalSeconds
                        p.WaitForExit()
                        Expect.notEqual p.ExitCode 0 "non-zero exit"
                        Expect.stringContains err.Result "waited more than 8 s" "the watchdog says why"
                    finally
                        if victim > 0 then
                            (try runProcess (psiOf "kill" [ "-KILL"; string victim ]) |> ignore with _ -> ())
                        if not p.HasExited then p.Kill true)
            }

            test "ranks started with different seeds refuse to train" {
                requireMpi ()
                withData (fun data runs ->
                    let args seed = common data runs "m" 2 @ [ "--seed"; string seed; "--distributed"; "mpi" ]
                    let all = mpiFlags @ [ "-np"; "1"; "dotnet"; cli.Value ] @ args 1 @ [ ":"; "-np"; "1"; "dotnet"; cli.Value ] @ args 2
                    let code, _, err = runProcess (psiOf mpirun.Value.Value all)
                    Expect.notEqual code 0 "non-zero exit"
                    Expect.stringContains err "different configurations" "one clear line")
            }

            test "SIGTERM to the ranks (what mpirun sends them on Ctrl-C) stops every rank after the same step with one checkpoint" {
                requireMpi ()
                withData (fun data runs ->
                    let metrics = Path.Combine(runs, "s", "metrics.jsonl")
                    let p, err = startMpi 2 (common data runs "s" 100000)
                    use p = p
                    try
                        Expect.isTrue (waitFor (TimeSpan.FromSeconds 120.0) (fun () -> stepCount metrics >= 2)) "the ranks train"
                        for pid, _ in ranksOf p.Id do
                            let code, _, e = runProcess (psiOf "kill" [ "-TERM"; string pid ])
                            if code <> 0 then failtestf "kill -TERM failed: %s" e
                        Expect.isTrue (p.WaitForExit 60000) "the job ended"
                        p.WaitForExit()
                        let steps = stepCount metrics
                        Expect.equal (iterationOf (Path.Combine(runs, "s", "checkpoint_last.safetensors"))) steps "checkpoint of the last step"
                        Expect.stringContains err.Result "stopping all ranks after this step" "the stop is announced"
                    finally
                        if not p.HasExited then p.Kill true)
            }
        ]

/// Training/Trainer.fs: runs on a small synthetic set (non-finite steps, resume, torn files, evaluation), `vct eval`, `vct train`.
module TrainerTests =
    open System
    open System.IO
    open System.Threading
    open Expecto
    open TorchSharp
    open Vct.Core
    open Vct.Core.Platform
    open Vct.Core.Data
    open Vct.Core.Training
    open Vct.Core.Tests.Support

    /// A small synthetic S4-like set (32x32 frames), written once per test process.
    let private data =
        lazy
            (let dir = sessionDir "trainer-data"
             Synth.generate { SynthOptions.Default Subset.S4 with Train = 8; Val = 2; Test = 2; Size = 32; EvalSize = 32 } dir |> ignore
             dir)

    let private config iterations =
        { Model = VctConfig.Tiny(Subset.S4, 32L, 23L)
          Criterion = (CriterionConfig.Released Subset.S4).WithNumPoints 64L
          Optim = { OptimConfig.Released with BaseLr = 5e-4 }
          Iterations = iterations; BatchVideos = 2; EvalPeriod = 1000; CheckpointPeriod = 1000
          Seed = 11; CropSize = 32; ColorJitter = true; Workers = 2; MissingMasks = Fusion.MissingMasks.Refuse; Amp = false }

    let private runTo (dir: string) (iterations: int) (resume: bool) (stopAt: int option) =
        let root = data.Value
        let train = Avsbench.records Subset.S4 root "train"
        let valr = Avsbench.records Subset.S4 root "val"
        use cts = new CancellationTokenSource()
        let losses = Collections.Generic.List<int * float>()
        let log e =
            match e with
            | Step(i, l, _, _, _) ->
                losses.Add(i, l)
                if Some i = stopAt then cts.Cancel()
            | _ -> ()
        let r = Trainer.run (config iterations) train valr torch.CPU dir resume ignore log cts.Token
        r, List.ofSeq losses

    /// A run of `cfg` in `dir` that records every event.
    let private runCfg (cfg: TrainConfig) (dir: string) (resume: bool) (init: VctModel -> unit) =
        let root = data.Value
        let train = Avsbench.records Subset.S4 root "train"
        let valr = Avsbench.records Subset.S4 root "val"
        let events = Collections.Generic.List<TrainEvent>()
        let r = Trainer.run cfg train valr torch.CPU dir resume init events.Add CancellationToken.None
        r, List.ofSeq events

    let private warnings (events: TrainEvent list) = events |> List.choose (function Warning(_, m) -> Some m | _ -> None)

    let private stepLines (metrics: string) =
        File.ReadAllLines metrics |> Array.filter (fun l -> l.Contains "\"type\":\"step\"")
        |> Array.map (fun l -> use d = Text.Json.JsonDocument.Parse l in d.RootElement.GetProperty("iteration").GetInt32()) |> List.ofArray

    [<Tests>]
    let tests =
        testList "Trainer" [
            test "a float32 step whose gradient norm is not finite is skipped: no weight update" {
                use p = new Modules.Parameter(torch.ones(3L))
                use opt = torch.optim.AdamW([ p ], 0.1)
                opt.zero_grad ()
                // sqrt at 0: a finite loss (0) whose gradient is infinite.
                use loss = (p - 1.0).sqrt().sum()
                let r = Amp.backwardAndStep None loss opt [ p ] (Some 0.01)
                Expect.isTrue r.Skipped "skipped"
                Expect.equal r.GradNorm (Some infinity) "the norm is reported"
                Expect.equal (p.data<float32>().ToArray()) [| 1.0f; 1.0f; 1.0f |] "weights unchanged"
                opt.zero_grad ()
                use loss2 = (p * p).sum()
                let r2 = Amp.backwardAndStep None loss2 opt [ p ] (Some 0.01)
                Expect.isFalse r2.Skipped "a finite gradient steps"
                Expect.isTrue (p.data<float32>().ToArray() |> Array.forall (fun v -> v < 1.0f)) "weights updated"
                use bad = torch.nn.Linear(2L, 2L)
                Expect.isTrue (TrainStep.allFinite bad) "finite weights"
                do
                    use _ = torch.no_grad ()
                    bad.weight.fill_(TorchSharp.Scalar.op_Implicit nan) |> ignore
                Expect.isFalse (TrainStep.allFinite bad) "a NaN weight is found"
            }

            test "non-finite gradients skip steps with a warning and stop the run after 5 in a row, nothing saved" {
                use tmp = new TempDir("vct-run-nan")
                let dir = Path.Combine(tmp.Path, "run")
                // A hook that leaves the forward values as they are but makes every gradient NaN (0 * d sqrt(0)).
                let poison (m: VctModel) =
                    let norm =
                        m.named_modules () |> Seq.pick (fun struct (name, md) ->
                            match md with
                            | :? torch.nn.Module<torch.Tensor, torch.Tensor> as l when name.EndsWith "decoder_norm" -> Some l
                            | _ -> None)
                    norm.register_forward_hook(fun _ _ o -> o + (o * 0.0).sqrt()) |> ignore
                let r, events = runCfg { config 20 with CheckpointPeriod = 2; EvalPeriod = 2 } dir false poison
                Expect.equal r.Outcome (Diverged(4, "the gradient norm was non-finite in 5 steps in a row (iterations 1..5); the last good checkpoint is kept")) "diverged"
                Expect.equal (warnings events)
                    [ for i in 1 .. 4 -> $"iteration {i}: the gradient norm is NaN; step skipped (no weight update), {5 - i} more in a row stop the run" ]
                    "one warning per skipped step"
                let metrics = Path.Combine(dir, "metrics.jsonl")
                Expect.equal (stepLines metrics) [ 1 .. 4 ] "the skipped steps are logged"
                Expect.all (File.ReadAllLines metrics |> Array.filter (fun l -> l.Contains "\"step\"")) (fun l -> l.Contains "\"skipped_nonfinite_gradient\":true") "flagged as skipped"
                // The weights never changed, so the periodic checkpoints (at 2 and 4) and the evaluations are of finite weights.
                Expect.isTrue (File.Exists(Path.Combine(dir, "checkpoint_last.safetensors"))) "periodic checkpoint of finite weights"
                Expect.isFalse (File.Exists(Path.Combine(dir, "model_final.safetensors"))) "no final model"
            }

            test "non-finite weights are never saved: the run stops at the next save, the last good checkpoint kept" {
                use tmp = new TempDir("vct-run-nanw")
                let dir = Path.Combine(tmp.Path, "run")
                let root = data.Value
                let train = Avsbench.records Subset.S4 root "train"
                let valr = Avsbench.records Subset.S4 root "val"
                let model = ref None
                // After step 3, a NaN in VGGish: its (cached) audio maps of the training videos stay finite, so the
                // losses do too, but the weights are no longer finite.
                let log e =
                    match e, model.Value with
                    | Step(3, _, _, _, _), Some(m: VctModel) ->
                        use _ = torch.no_grad ()
                        (Seq.head (m.AudioBackbone.parameters ())).fill_(TorchSharp.Scalar.op_Implicit nan) |> ignore
                    | _ -> ()
                let cfg = { config 10 with BatchVideos = 8; EvalPeriod = 4; CheckpointPeriod = 2 }
                let r = Trainer.run cfg train valr torch.CPU dir false (fun m -> model.Value <- Some m) log CancellationToken.None
                Expect.equal r.Outcome (Diverged(4, "the weights are non-finite after iteration 4; nothing was saved, the last good checkpoint is kept")) "stops at the save"
                let last = Path.Combine(dir, "checkpoint_last.safetensors")
                let it =
                    use f = Checkpoint.Safetensors.read last
                    f.Metadata["iteration"]
                Expect.equal it "2" "checkpoint_last is the good one of iteration 2"
                for f in [ "checkpoint_prev.safetensors"; "model_best.safetensors"; "model_final.safetensors" ] do
                    Expect.isFalse (File.Exists(Path.Combine(dir, f))) $"no {f}"
            }

            test "reusing a run folder without resume is refused instead of mixing runs" {
                use tmp = new TempDir("vct-run-reuse")
                let dir = Path.Combine(tmp.Path, "run")
                let r, _ = runCfg (config 2) dir false ignore
                Expect.equal r.Outcome Completed "first run"
                let e = Expect.throwsC (fun () -> runCfg (config 2) dir false ignore |> ignore) id
                Expect.isTrue (e :? InvalidOperationException) "InvalidOperationException"
                Expect.equal e.Message $"{dir}: already holds a run (checkpoint_last.safetensors, metrics.jsonl, model_best.safetensors, model_final.safetensors); pass --resume to continue it, or choose another --name" "message"
                Expect.equal (stepLines (Path.Combine(dir, "metrics.jsonl"))) [ 1; 2 ] "the first run's log untouched"
            }

            test "a torn checkpoint_last falls back to checkpoint_prev; a torn metrics line and later steps are dropped, none duplicated" {
                use tmp = new TempDir("vct-run-torn")
                let dir = Path.Combine(tmp.Path, "run")
                let cfg = { config 4 with CheckpointPeriod = 2 }
                let r, _ = runCfg cfg dir false ignore
                Expect.equal r.Outcome Completed "first run"
                let last = Path.Combine(dir, "checkpoint_last.safetensors")
                let prev = Path.Combine(dir, "checkpoint_prev.safetensors")
                Expect.isTrue (File.Exists prev) "the previous checkpoint is kept"
                let prevIteration =
                    use f = Checkpoint.Safetensors.read prev
                    f.Metadata["iteration"]
                Expect.equal prevIteration "2" "prev at 2"
                let bytes = File.ReadAllBytes last
                File.WriteAllBytes(last, bytes[.. bytes.Length / 2])
                let metrics = Path.Combine(dir, "metrics.jsonl")
                File.AppendAllText(metrics, "{\"type\":\"step\",\"itera")
                let r2, events = runCfg { cfg with Iterations = 6 } dir true ignore
                Expect.equal r2.Outcome Completed "resumed run completes"
                match warnings events with
                | [ fallback; trimmed ] ->
                    Expect.stringContains fallback $"; resuming from the previous checkpoint {prev} (iteration 2)" "falls back to checkpoint_prev"
                    Expect.stringStarts fallback last "names the unreadable checkpoint"
                    Expect.equal trimmed $"{metrics}: 4 line(s) after iteration 2 (or torn) dropped; those steps run again" "log trimmed"
                | w -> failtestf "expected two warnings, got %A" w
                Expect.equal (stepLines metrics) [ 1 .. 6 ] "every step once"
                let log = Report.readLog metrics
                Expect.equal (log.Steps |> List.map fst) [ 1 .. 6 ] "the report reads it"
                File.AppendAllText(metrics, "{\"type\":\"eval\",\"iteration\":7,\"m_")
                Expect.equal ((Report.readLog metrics).Evals |> List.map (fun (i, _, _) -> i)) [ 6 ] "a torn line is skipped by the report"
            }


            test "a 30-step run interrupted at 15 and resumed gives the losses of the uninterrupted run" {
                use tmp = new TempDir("vct-run-ab")
                let dir = tmp.Path
                let a = Path.Combine(dir, "a")
                let b = Path.Combine(dir, "b")
                let full, lossesFull = runTo a 30 false None
                Expect.equal full.Outcome Completed "completes"
                Expect.equal lossesFull.Length 30 "30 steps"
                let first, lossesFirst = runTo b 30 false (Some 15)
                Expect.equal first.Outcome (Interrupted 15) "stops cleanly at 15"
                Expect.isTrue (File.Exists(Path.Combine(b, "checkpoint_last.safetensors"))) "resumable checkpoint written"
                let second, lossesSecond = runTo b 30 true None
                Expect.equal second.Outcome Completed "resumed run completes"
                Expect.equal (lossesFirst @ lossesSecond |> List.map fst) [ 1 .. 30 ] "steps 1..15 then 16..30"
                for (i, l), (_, l2) in List.zip lossesFull (lossesFirst @ lossesSecond) do
                    Expect.floatClose Accuracy.veryHigh l2 l $"loss of step {i}"
                let metrics = File.ReadAllLines(Path.Combine(b, "metrics.jsonl"))
                Expect.equal (metrics |> Array.filter (fun l -> l.Contains "\"step\"") |> Array.length) 30 "one JSONL line per step across both runs"
            }

            test "the loss falls over 40 steps and an evaluation writes the best checkpoint" {
                use tmp = new TempDir("vct-run-c")
                let dir = Path.Combine(tmp.Path, "run")
                let root = data.Value
                let train = Avsbench.records Subset.S4 root "train"
                let valr = Avsbench.records Subset.S4 root "val"
                let losses = Collections.Generic.List<float>()
                let evals = Collections.Generic.List<float>()
                let log e =
                    match e with
                    | Step(_, l, _, _, _) -> losses.Add l
                    | Eval(_, mj, _, _) -> evals.Add mj
                    | Warning _ -> ()
                let r = Trainer.run { config 40 with EvalPeriod = 40 } train valr torch.CPU dir false ignore log CancellationToken.None
                Expect.equal r.Outcome Completed "completes"
                let early = Seq.take 5 losses |> Seq.average
                let late = Seq.skip 35 losses |> Seq.average
                Expect.isLessThan late early "loss falls"
                Expect.equal evals.Count 1 "one evaluation at the end"
                Expect.isTrue (evals[0] >= 0.0 && evals[0] <= 1.0) "M_J in [0, 1]"
                Expect.isTrue (File.Exists(Path.Combine(dir, "model_best.safetensors"))) "best checkpoint"
                let m, report = ModelIO.load (Path.Combine(dir, "model_best.safetensors")) torch.CPU
                m.Dispose()
                Expect.isTrue report.IsExact "the best checkpoint loads exactly"
            }

            test "a checkpoint write that fails part-way leaves the last good checkpoint intact" {
                use tmp = new TempDir("vct-ckpt")
                let dir = tmp.Path
                let path = Path.Combine(dir, "checkpoint_last.safetensors")
                Checkpoint.Safetensors.write path (Collections.Generic.Dictionary()) [ "a", torch.ones(1000L) ]
                let good = File.ReadAllBytes path
                let broken = torch.ones(10L)
                broken.Dispose() // reading its data throws mid-write
                Expect.throws (fun () ->
                    Checkpoint.Safetensors.write path (Collections.Generic.Dictionary()) [ "a", torch.zeros(1000L); "b", broken ]) "the write fails"
                Expect.equal (File.ReadAllBytes path) good "old checkpoint unchanged"
                Expect.isEmpty (Directory.GetFiles(dir, "*.tmp")) "no temporary file left"
            }

            test "resuming without a checkpoint is a clear error naming the file" {
                use tmp = new TempDir("vct-run-none")
                let dir = Path.Combine(tmp.Path, "run")
                let e = Expect.throwsC (fun () -> runTo dir 5 true None |> ignore) id
                Expect.stringContains e.Message "checkpoint_last.safetensors" "names the file"
            }

            test "vct eval writes per-video CSV and a summary with M_J, M_F and the audio-shuffled control" {
                use tmp = new TempDir("vct-eval")
                let dir = tmp.Path
                let ckpt = Path.Combine(dir, "m.safetensors")
                let m = new VctModel(VctConfig.Tiny(Subset.S4, 32L, 23L))
                ModelIO.save ckpt m
                m.Dispose()
                let out = Path.Combine(dir, "eval")
                let code, stdout, err = runVct [ "eval"; "--checkpoint"; ckpt; "--data"; data.Value; "--split"; "val"; "--out"; out; "--audio-shuffled" ]
                Expect.equal code 0 $"vct eval failed: {stdout}\n{err}"
                use doc = Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
                for k in [ "m_j"; "m_f"; "m_j_audio_shuffled"; "m_f_audio_shuffled" ] do
                    let v = doc.RootElement.GetProperty(k).GetDouble()
                    Expect.isTrue (v >= 0.0 && v <= 1.0) $"{k} in [0, 1]"
                let rows = File.ReadAllLines(Path.Combine(out, "per_video.csv"))
                Expect.equal rows.Length 3 "header + 2 validation videos"
            }

            test "vct train --preset s4 runs the released configuration end to end on a tree in the official layout" {
                // Released S4 (Swin-B 384, pre-SAM on) for 2 iterations of 1 video on a 4-video synthetic tree at 384
                // (no mask images in it: first refused, then run with the documented blank-mask fallback).
                use tmp = new TempDir("vct-s4-e2e")
                let dir = Path.Combine(tmp.Path, "run")
                let root = Path.Combine(dir, "data")
                Synth.generate { SynthOptions.Default Subset.S4 with Train = 2; Val = 1; Test = 1; Size = 384 } root |> ignore
                let common = [ "train"; "--preset"; "s4"; "--data"; root; "--runs"; Path.Combine(dir, "runs"); "--iterations"; "2"
                               "--batch"; "1"; "--eval-period"; "2"; "--device"; "cpu" ]
                let code0, out0, err0 = runVct (common @ [ "--name"; "refused" ])
                Expect.notEqual code0 0 "refuses without mask images"
                Expect.stringContains (out0 + err0) "Maskige" "says what is missing and how to choose a fallback"
                let code, out, err = runVct (common @ [ "--name"; "e2e"; "--missing-masks"; "blank" ])
                Expect.equal code 0 $"vct train failed: {out}\n{err}"
                let run = Path.Combine(dir, "runs", "e2e")
                use doc = Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(run, "summary.json")))
                Expect.equal (doc.RootElement.GetProperty("iterations").GetInt32()) 2 "2 iterations"
                for k in [ "m_j"; "m_f"; "m_j_audio_shuffled"; "m_f_audio_shuffled"; "wall_seconds" ] do
                    Expect.isTrue (doc.RootElement.TryGetProperty(k) |> fst) $"summary has {k}"
                Expect.equal (ModelIO.readConfig (Path.Combine(run, "model_best.safetensors"))) (VctConfig.Released Subset.S4) "released S4 config"
                for f in [ "checkpoint_last.safetensors"; "metrics.jsonl"; "loss.html"; "metrics.png"; "overlays.png" ] do
                    Expect.isTrue (File.Exists(Path.Combine(run, f))) $"writes {f}"
            }
        ]

/// Acceptance test of `vct train`'s Ctrl-C handling: the real CLI process, a real SIGINT.
module TrainInterruptTests =
    open System
    open System.Diagnostics
    open System.IO
    open System.Text.Json
    open System.Threading
    open Expecto
    open Vct.Core
    open Vct.Core.Platform
    open Vct.Core.Data
    open Vct.Core.Tests.Support

    /// A running `vct` CLI process whose stdout and stderr are drained in the background.
    type private VctProcess(args: string list) =
        let psi =
            let p = cliStartInfo args
            p.RedirectStandardOutput <- true
            p.RedirectStandardError <- true
            p.UseShellExecute <- false
            p
        let proc = Process.Start psi
        let out = proc.StandardOutput.ReadToEndAsync()
        let err = proc.StandardError.ReadToEndAsync()
        member _.Id = proc.Id
        member _.HasExited = proc.HasExited
        /// Waits up to `timeout`; Some(exit code, stdout, stderr) when it ended, None when it still runs.
        member _.Wait(timeout: TimeSpan) =
            if proc.WaitForExit(int timeout.TotalMilliseconds) then
                proc.WaitForExit() // lets the output readers finish
                Some(proc.ExitCode, out.Result, err.Result)
            else None
        interface IDisposable with
            member _.Dispose() =
                if not proc.HasExited then
                    proc.Kill true
                    proc.WaitForExit()
                proc.Dispose()

    /// Sends a signal (INT: what Ctrl-C in a terminal sends; TERM: kill's default) to `pid` with the system's `kill`.
    let private signal (name: string) (pid: int) =
        let psi = ProcessStartInfo("kill", UseShellExecute = false)
        for a in [ $"-{name}"; string pid ] do psi.ArgumentList.Add a
        let code, _, err = runProcess psi
        if code <> 0 then failtestf "kill -%s %d failed: %s" name pid err

    let private sigint = signal "INT"

    /// The iterations of the "step" lines of a metrics log (a line still being written is skipped).
    let private stepIterations (metrics: string) =
        if not (File.Exists metrics) then []
        else
            let text =
                use fs = new FileStream(metrics, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete)
                use r = new StreamReader(fs)
                r.ReadToEnd()
            [ for line in text.Split('\n') do
                  if line.EndsWith "}" then
                      use doc = JsonDocument.Parse line
                      if doc.RootElement.GetProperty("type").GetString() = "step" then
                          yield doc.RootElement.GetProperty("iteration").GetInt32() ]

    let private iterationOf (checkpoint: string) =
        use f = Checkpoint.Safetensors.read checkpoint
        int f.Metadata["iteration"]

    [<Tests>]
    let tests =
        testList "TrainInterrupt" [
            test "vct train on SIGINT exits 130 with a complete checkpoint_last, and --resume continues from it" {
                use tmp = new TempDir("vct-sigint")
                let dir = tmp.Path
                let data = Path.Combine(dir, "data")
                Synth.generate { SynthOptions.Default Subset.S4 with Train = 4; Val = 2; Test = 2; Size = 64; EvalSize = 64 } data |> ignore
                let runs = Path.Combine(dir, "runs")
                let run = Path.Combine(runs, "r")
                let metrics = Path.Combine(run, "metrics.jsonl")
                let last = Path.Combine(run, "checkpoint_last.safetensors")
                // Long enough that it could only end by the signal; no evaluation or periodic checkpoint before it.
                let common = [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; runs; "--name"; "r"; "--batch"; "2"
                               "--eval-period"; "100000"; "--device"; "cpu"; "--threads"; "2" ]
                let stopped =
                    use p = new VctProcess(common @ [ "--iterations"; "100000" ])
                    let deadline = Stopwatch.StartNew()
                    while (stepIterations metrics).Length < 3 && not p.HasExited && deadline.Elapsed < TimeSpan.FromSeconds 40.0 do
                        Thread.Sleep 100
                    if p.HasExited then
                        let code, out, err = (p.Wait TimeSpan.Zero).Value
                        failtestf "vct train ended before the signal (exit %d): %s\n%s" code out err
                    Expect.isGreaterThanOrEqual (stepIterations metrics).Length 3 "a few steps logged within 40 s"
                    Expect.isFalse (File.Exists last) "no checkpoint before the signal (the periodic one is far away)"
                    let signalled = Stopwatch.StartNew()
                    sigint p.Id
                    match p.Wait(TimeSpan.FromSeconds 20.0) with
                    | None -> failtest "vct train still runs 20 s after SIGINT"
                    | Some(code, out, err) ->
                        Expect.equal code 130 $"exit code 130 after SIGINT; stderr: {err}"
                        Expect.isLessThan signalled.Elapsed.TotalSeconds 20.0 "stops promptly"
                        Expect.stringContains err "stopping after this step" "says what it does"
                        use doc = JsonDocument.Parse out
                        let reached = doc.RootElement.GetProperty("iterations").GetInt32()
                        Expect.stringStarts (doc.RootElement.GetProperty("outcome").GetString()) "Interrupted" "summary says interrupted"
                        reached
                let logged = stepIterations metrics
                Expect.equal logged [ 1 .. stopped ] "one step line per iteration up to the one reached"
                Expect.isTrue (File.Exists last) "checkpoint_last written"
                Expect.equal (iterationOf last) stopped "checkpoint_last holds the iteration reached"
                Expect.isFalse (File.Exists(Path.Combine(run, "model_final.safetensors"))) "no final model for an interrupted run"
                let leftovers =
                    Directory.GetFiles(run, "*", SearchOption.AllDirectories)
                    |> Array.map Path.GetFileName
                    |> Array.filter (fun f -> f.StartsWith "." || f.EndsWith ".tmp")
                Expect.isEmpty leftovers "no temporary or half-written files"
                // Resume to a few iterations beyond.
                let target = stopped + 3
                use p = new VctProcess(common @ [ "--iterations"; string target; "--resume" ])
                match p.Wait(TimeSpan.FromSeconds 60.0) with
                | None -> failtest "the resumed run did not end within 60 s"
                | Some(code, out, err) ->
                    Expect.equal code 0 $"resumed run completes; stderr: {err}"
                    use doc = JsonDocument.Parse out
                    Expect.equal (doc.RootElement.GetProperty("iterations").GetInt32()) target "ends at the requested iteration"
                    Expect.equal (doc.RootElement.GetProperty("outcome").GetString()) "Completed" "completed"
                Expect.equal (stepIterations metrics) [ 1 .. target ] "continues at the next iteration: no step repeated or lost"
                Expect.equal (iterationOf last) target "checkpoint_last at the end"
                Expect.isTrue (File.Exists(Path.Combine(run, "model_final.safetensors"))) "final model written"
            }

            test "vct train on SIGTERM stops like Ctrl-C, skips the final evaluations; the run name is not reused without --resume" {
                use tmp = new TempDir("vct-sigterm")
                let dir = tmp.Path
                let data = Path.Combine(dir, "data")
                Synth.generate { SynthOptions.Default Subset.S4 with Train = 4; Val = 2; Test = 2; Size = 64; EvalSize = 64 } data |> ignore
                let runs = Path.Combine(dir, "runs")
                let run = Path.Combine(runs, "r")
                let metrics = Path.Combine(run, "metrics.jsonl")
                // An evaluation at 2 writes model_best, so the final evaluations would have something to evaluate.
                let common = [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; runs; "--name"; "r"; "--batch"; "2"
                               "--eval-period"; "2"; "--device"; "cpu"; "--threads"; "2"; "--iterations"; "100000" ]
                do
                    use p = new VctProcess(common)
                    let deadline = Stopwatch.StartNew()
                    while (stepIterations metrics).Length < 3 && not p.HasExited && deadline.Elapsed < TimeSpan.FromSeconds 60.0 do
                        Thread.Sleep 100
                    if p.HasExited then
                        let code, out, err = (p.Wait TimeSpan.Zero).Value
                        failtestf "vct train ended before the signal (exit %d): %s\n%s" code out err
                    Expect.isTrue (File.Exists(Path.Combine(run, "model_best.safetensors"))) "a best checkpoint before the signal"
                    signal "TERM" p.Id
                    match p.Wait(TimeSpan.FromSeconds 20.0) with
                    | None -> failtest "vct train still runs 20 s after SIGTERM"
                    | Some(code, out, err) ->
                        Expect.equal code 130 $"exit code 130 after SIGTERM; stderr: {err}"
                        Expect.stringContains err "SIGTERM: stopping after this step; a resumable checkpoint will be written" "says what it does"
                        Expect.stringContains err "the final evaluations are skipped" "no final evaluation after an interrupt"
                        use doc = JsonDocument.Parse out
                        let reached = doc.RootElement.GetProperty("iterations").GetInt32()
                        Expect.stringStarts (doc.RootElement.GetProperty("outcome").GetString()) "Interrupted" "summary says interrupted"
                        Expect.isFalse (doc.RootElement.TryGetProperty("m_j") |> fst) "no final M_J"
                        Expect.equal (iterationOf (Path.Combine(run, "checkpoint_last.safetensors"))) reached "checkpoint at the iteration reached"
                // The same name again without --resume: refused, the run untouched.
                let before = File.ReadAllBytes metrics
                use p = new VctProcess(common)
                match p.Wait(TimeSpan.FromSeconds 60.0) with
                | None -> failtest "the refused run did not end within 60 s"
                | Some(code, _, err) ->
                    Expect.equal code 1 $"refused: {err}"
                    Expect.stringContains err $"vct: {run}: already holds a run (checkpoint_last.safetensors, metrics.jsonl, model_best.safetensors); pass --resume to continue it, or choose another --name" "says why"
                Expect.equal (File.ReadAllBytes metrics) before "metrics untouched"
            }
            test "vct predict on SIGTERM stops after the current batch; the masks written so far stay valid" {
                use tmp = new TempDir("vct-predict-term")
                let dir = tmp.Path
                let ckpt = Path.Combine(dir, "tiny.safetensors")
                do
                    use model = new VctModel(VctConfig.Tiny(Subset.S4, 64L, 23L))
                    ModelIO.save ckpt model
                let video = Path.Combine(dir, "long.mp4")
                let psi = ProcessStartInfo("ffmpeg", UseShellExecute = false)
                for a in [ "-nostdin"; "-y"; "-v"; "error"; "-f"; "lavfi"; "-i"; "testsrc=size=64x64:rate=25:duration=60"
                           "-f"; "lavfi"; "-i"; "sine=duration=60"; "-pix_fmt"; "yuv420p"; "-shortest"; video ] do psi.ArgumentList.Add a
                let code, _, err = runProcess psi
                if code <> 0 then failtestf "ffmpeg: %s" err
                let out = Path.Combine(dir, "out")
                let masks () = if Directory.Exists(Path.Combine(out, "masks")) then Directory.GetFiles(Path.Combine(out, "masks"), "*.png").Length else 0
                use p = new VctProcess([ "predict"; "--checkpoint"; ckpt; "--video-input"; video; "--output"; out; "--fps"; "5"; "--device"; "cpu" ])
                let deadline = Stopwatch.StartNew()
                while masks () < 3 && not p.HasExited && deadline.Elapsed < TimeSpan.FromSeconds 120.0 do
                    Thread.Sleep 100
                if p.HasExited then
                    let code, o, e = (p.Wait TimeSpan.Zero).Value
                    failtestf "vct predict ended before the signal (exit %d): %s\n%s" code o e
                signal "TERM" p.Id
                match p.Wait(TimeSpan.FromSeconds 30.0) with
                | None -> failtest "vct predict still runs 30 s after SIGTERM"
                | Some(code, _, err) ->
                    Expect.equal code 130 $"exit code 130 after SIGTERM; stderr: {err}"
                    Expect.stringContains err "SIGTERM: stopping after the current batch" "says what it does"
                    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "summary.json")))
                    Expect.isTrue (doc.RootElement.GetProperty("interrupted").GetBoolean()) "summary says interrupted"
                    let n = doc.RootElement.GetProperty("frames").GetArrayLength()
                    Expect.isLessThan n 300 "stopped early"
                    Expect.equal (masks ()) n "one valid mask per summary entry"
                    for m in Directory.GetFiles(Path.Combine(out, "masks"), "*.png") do
                        Expect.equal (ImageIO.readLabels m).Width 64 "valid PNG"
            }
        ]
