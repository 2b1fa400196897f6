/// Mixed precision: LibTorch's autocast binding, the dynamic loss scaler, the CPU refusal. The CUDA float16 path
/// itself needs a GPU; here the binding is exercised through the CPU's bfloat16 autocast.
module Vct.Core.Tests.AmpTests

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

        test "Autocast (LibTorch's, via its C++ symbols): on the CPU in bfloat16 a matmul runs in bfloat16, and leaving restores float32" {
            Expect.equal (Autocast.unavailableReason ()) None "autocast bound"
            use _ = torch.NewDisposeScope()
            let a = torch.randn(4L, 5L)
            let b = torch.randn(5L, 3L, requires_grad = true)
            Expect.isFalse (Autocast.isEnabled DeviceType.CPU) "off outside"
            Expect.equal (a.mm(b)).dtype torch.float32 "float32 outside"
            let outer = Autocast.enter DeviceType.CPU torch.ScalarType.BFloat16
            Expect.isTrue (Autocast.isEnabled DeviceType.CPU) "on inside"
            Expect.equal (Autocast.dtype DeviceType.CPU) torch.ScalarType.BFloat16 "region dtype"
            Expect.isFalse (Autocast.isEnabled DeviceType.CUDA) "the CUDA switch is separate"
            let y = a.mm(b)
            Expect.equal y.dtype torch.bfloat16 "matmul in bfloat16"
            do
                use _ = Autocast.enter DeviceType.CPU torch.ScalarType.BFloat16
                Expect.equal (a.mm(b)).dtype torch.bfloat16 "nested"
            Expect.isTrue (Autocast.isEnabled DeviceType.CPU) "still on after the inner region"
            outer.Dispose()
            outer.Dispose() // idempotent
            Expect.isFalse (Autocast.isEnabled DeviceType.CPU) "off after the outer region"
            Expect.equal (a.mm(b)).dtype torch.float32 "float32 again"
            y.to_type(torch.float32).sum().backward()
            Expect.equal b.grad.dtype torch.float32 "a float32 leaf gets a float32 gradient through the recorded cast"
            Expect.throwsT<ArgumentException> (fun () -> Autocast.enter DeviceType.CPU torch.ScalarType.Float32 |> ignore) "float32 is not a lower precision"
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
                    crit.Compute(out.Decoder, targets, sup, new torch.Generator(1UL)), logits)
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
            Trainer.saveState path cfg model crit opt (Some s) 7 0.5 5
            let s2 = GradScaler()
            Expect.isTrue (Trainer.loadScalerState path s2) "found"
            Expect.equal (s2.Scale, s2.GrowthTracker) (4096.0, 123) "restored"
            let plain = Path.Combine(dir, "plain.safetensors")
            Trainer.saveState plain cfg model crit opt None 7 0.5 5
            let s3 = GradScaler()
            Expect.isFalse (Trainer.loadScalerState plain s3) "a float32 run's checkpoint has none"
            Expect.equal s3.Scale GradScalerOptions.Default.InitScale "then the scaler starts afresh"
            Expect.equal (Trainer.loadState path model crit opt) (7, 0.5, 5) "the rest of the state as before"
        }
    ]
