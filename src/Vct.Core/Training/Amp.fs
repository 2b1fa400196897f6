namespace Vct.Core.Training

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open Vct.Core
open Vct.Core.Platform

/// Dynamic loss scaling for float16 training (the semantics of PyTorch's `torch.amp.GradScaler`).
type GradScalerOptions =
    { /// Scale of the first step (2^16).
      InitScale: float
      /// Factor applied after GrowthInterval consecutive steps with finite gradients (2).
      GrowthFactor: float
      /// Factor applied after a step whose gradients had an inf or NaN (0.5).
      BackoffFactor: float
      /// Consecutive good steps before the scale grows (2000).
      GrowthInterval: int }
    static member Default = { InitScale = 65536.0; GrowthFactor = 2.0; BackoffFactor = 0.5; GrowthInterval = 2000 }

/// What `GradScaler.Step` did.
type ScaledStep =
    { /// The optimiser step was skipped because a gradient was inf or NaN.
      Skipped: bool
      /// The scale the step's loss was multiplied by.
      Scale: float
      /// The full-model gradient norm before clipping (unscaled; None when skipped or not clipping).
      GradNorm: float option }

/// Dynamic loss scaler: multiply the loss by `Scale` before backward, then `Step` divides the gradients by it,
/// skips the optimiser step and multiplies the scale by BackoffFactor when any gradient is inf or NaN, and
/// multiplies it by GrowthFactor after GrowthInterval good steps in a row.
type GradScaler(opts: GradScalerOptions) =
    do
        if not (opts.InitScale > 0.0 && Double.IsFinite opts.InitScale) then invalidArg (nameof opts) "InitScale must be positive and finite"
        if not (opts.GrowthFactor > 1.0) then invalidArg (nameof opts) "GrowthFactor must be > 1"
        if not (opts.BackoffFactor > 0.0 && opts.BackoffFactor < 1.0) then invalidArg (nameof opts) "BackoffFactor must be in (0, 1)"
        if opts.GrowthInterval < 1 then invalidArg (nameof opts) "GrowthInterval must be >= 1"
    let mutable scale = opts.InitScale
    let mutable growthTracker = 0

    new() = GradScaler(GradScalerOptions.Default)

    member _.Options = opts
    /// The current loss scale.
    member _.Scale = scale
    /// Good steps in a row since the scale last changed.
    member _.GrowthTracker = growthTracker

    /// Restores a state saved from `Scale` and `GrowthTracker` (resumed runs).
    member _.Restore(savedScale: float, savedTracker: int) =
        if not (savedScale > 0.0 && Double.IsFinite savedScale) then invalidArg (nameof savedScale) $"bad loss scale {savedScale}"
        scale <- savedScale
        growthTracker <- max 0 savedTracker

    /// The loss in float32 times the scale (call backward on this).
    member _.ScaleLoss(loss: Tensor) : Tensor = loss.to_type(torch.float32) * scale.AsScalar

    /// Divides every gradient of `parameters` by the scale, in place; true when any gradient holds an inf or NaN.
    member _.Unscale(parameters: Parameter seq) : bool =
        use _ = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let inv = (1.0 / scale).AsScalar
        let mutable allFinite : Tensor option = None
        for p in parameters do
            let g = p.grad
            if not (isNull g) then
                g.mul_(inv) |> ignore
                let ok = g.isfinite().all()
                allFinite <- Some(match allFinite with Some a -> a.logical_and(ok) | None -> ok)
        match allFinite with
        | Some ok -> not (ok.item<bool> ())
        | None -> false

    /// Backs off after a step with inf/NaN gradients; grows after GrowthInterval good steps in a row.
    member _.Update(foundInf: bool) =
        if foundInf then
            scale <- scale * opts.BackoffFactor
            growthTracker <- 0
        else
            growthTracker <- growthTracker + 1
            if growthTracker >= opts.GrowthInterval then
                let grown = scale * opts.GrowthFactor
                // Kept finite in float32, as PyTorch keeps its float32 scale tensor.
                if float (float32 grown) < infinity then scale <- grown
                growthTracker <- 0

    /// After `ScaleLoss(loss).backward()`: unscales the gradients, then, when all are finite, clips the
    /// full-model norm to `clip` (on the unscaled gradients) and steps `opt`; otherwise skips the step. Updates
    /// the scale either way.
    member this.Step(opt: torch.optim.Optimizer, parameters: Parameter seq, clip: float option) : ScaledStep =
        let used = scale
        let ps = Seq.toArray parameters
        let foundInf = this.Unscale ps
        let norm =
            if foundInf then None
            else
                let n = clip |> Option.map (fun c -> Optim.clipFullModel c ps)
                opt.step () |> ignore
                n
        this.Update foundInf
        { Skipped = foundInf; Scale = used; GradNorm = norm }

/// Mixed-precision policy of the trainer.
[<RequireQualifiedAccess>]
module Amp =
    /// The autocast dtype of mixed-precision training on CUDA.
    let dtype = torch.ScalarType.Float16

    /// Fails with a clear message unless mixed precision can run on `device`: CUDA only (LibTorch's float16
    /// autocast applies to CUDA tensors; on the CPU it would only be slower), and LibTorch's autocast reachable.
    let require (device: torch.Device) =
        if device.``type`` <> DeviceType.CUDA then
            invalidArg (nameof device)
                $"mixed precision (--amp) runs on CUDA only, but the device is {device}: float16 autocast and loss scaling are for CUDA GPUs; train on the CPU without --amp (float32)"
        match Autocast.unavailableReason () with
        | Some why -> raise (NotSupportedException $"mixed precision (--amp) is not available: {why}")
        | None -> ()

    /// Runs `f` inside an autocast region for `region` (device type, dtype), or plainly when None.
    let within (region: (DeviceType * torch.ScalarType) option) (f: unit -> 'T) : 'T =
        match region with
        | None -> f ()
        | Some(deviceType, dt) ->
            use _ = Autocast.enter deviceType dt
            f ()

    /// Backward and optimiser step of one training step: with a scaler, backward of the scaled loss and
    /// `GradScaler.Step` (unscale, skip on inf/NaN, clip, step, update); without, plain backward, clipping and
    /// step. Call `opt.zero_grad()` before. Returns whether the step was skipped and the scale it used (1 without
    /// a scaler).
    /// The backward pass of `loss` alone (scaled when `scaler` is given): a gradient-accumulation micro-batch.
    let backward (scaler: GradScaler option) (loss: Tensor) =
        match scaler with
        | Some s ->
            use scaled = s.ScaleLoss loss
            scaled.backward ()
        | None -> loss.backward ()

    /// Clipping and the optimiser step over gradients already computed (unscaled first when `scaler` is given).
    let step (scaler: GradScaler option) (opt: torch.optim.Optimizer) (parameters: Parameter list) (clip: float option) : ScaledStep =
        match scaler with
        | Some s -> s.Step(opt, parameters, clip)
        | None ->
            let norm = clip |> Option.map (fun c -> Optim.clipFullModel c parameters)
            opt.step () |> ignore
            { Skipped = false; Scale = 1.0; GradNorm = norm }

    let backwardAndStep (scaler: GradScaler option) (loss: Tensor) (opt: torch.optim.Optimizer) (parameters: Parameter list) (clip: float option) : ScaledStep =
        match scaler with
        | Some s ->
            (use scaled = s.ScaleLoss loss
             scaled.backward ())
            s.Step(opt, parameters, clip)
        | None ->
            loss.backward ()
            // The norm before clipping (without clipping: measured only, an infinite bound leaves the gradients as
            // they are). A non-finite norm skips the step: clipping would make every gradient NaN and poison the
            // weights and AdamW's moments.
            let norm = Optim.clipFullModel (defaultArg clip infinity) parameters
            if Double.IsFinite norm then
                opt.step () |> ignore
                { Skipped = false; Scale = 1.0; GradNorm = (if clip.IsSome then Some norm else None) }
            else { Skipped = true; Scale = 1.0; GradNorm = Some norm }
