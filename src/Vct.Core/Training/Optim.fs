namespace Vct.Core.Training

open System
open System.IO
open TorchSharp
open TorchSharp.Modules
open Vct.Core
open Vct.Core.Platform

/// Optimiser settings (docs/architecture.md §11.1-11.3; SOLVER.* keys).
type OptimConfig =
    { /// SOLVER.BASE_LR (1e-4).
      BaseLr: float
      /// SOLVER.WEIGHT_DECAY (0.05).
      WeightDecay: float
      /// SOLVER.BACKBONE_MULTIPLIER (0.1) for every parameter whose module path contains "backbone".
      BackboneMultiplier: float
      /// Full-model gradient clipping: max L2 norm over all parameters (0.01); None = off.
      ClipNorm: float option
      /// WarmupPolyLR power (0.9).
      PolyPower: float
      /// Warm-up iterations (0 in the released configs) with linear warm-up factor WarmupFactor.
      WarmupIters: int
      WarmupFactor: float }
    static member Released =
        { BaseLr = 1e-4; WeightDecay = 0.05; BackboneMultiplier = 0.1; ClipNorm = Some 0.01; PolyPower = 0.9
          WarmupIters = 0; WarmupFactor = 1.0 }

/// One parameter's optimiser settings, for inspection.
type ParamSetting = { Name: string; LrScale: float; WeightDecay: float }

[<RequireQualifiedAccess>]
module Optim =
    /// Settings per trainable parameter as the official `build_optimizer` assigns them: x BackboneMultiplier for
    /// paths containing "backbone" (both Swin copies; the frozen VGGish has no trainable parameters), no weight
    /// decay for normalisation layers, embeddings and relative-position tables.
    let settings (cfg: OptimConfig) (modules: (string * torch.nn.Module) list) : (ParamSetting * Parameter) list =
        let seen = Collections.Generic.HashSet<nativeint>()
        [ for (prefix, root) in modules do
              for struct (modName, m) in Seq.append [ struct ("", root) ] (root.named_modules ()) do
                  let isNorm =
                      match m with
                      | :? LayerNorm | :? GroupNorm | :? BatchNorm1d | :? BatchNorm2d -> true
                      | _ -> false
                  let isEmbedding = m :? Embedding
                  for struct (pName, p) in m.named_parameters(recurse = false) do
                      if p.requires_grad && seen.Add(p.Handle) then
                          let full = String.concat "." ([ prefix; modName; pName ] |> List.filter (fun s -> s <> ""))
                          let noDecay = isNorm || isEmbedding || pName = "relative_position_bias_table" || pName = "absolute_pos_embed"
                          let lrScale = if full.Contains "backbone" then cfg.BackboneMultiplier else 1.0
                          yield { Name = full; LrScale = lrScale; WeightDecay = (if noDecay then 0.0 else cfg.WeightDecay) }, p ]

    /// AdamW (betas 0.9/0.999, eps 1e-8) with one parameter group per tensor, as the official optimiser.
    let adamW (cfg: OptimConfig) (settings: (ParamSetting * Parameter) list) : AdamW * float[] =
        let groups =
            [ for (s, p) in settings ->
                  let opts = AdamW.Options()
                  opts.LearningRate <- Nullable(cfg.BaseLr * s.LrScale)
                  opts.weight_decay <- Nullable s.WeightDecay
                  AdamW.ParamGroup([ p ], opts) ]
        let opt = torch.optim.AdamW(groups, cfg.BaseLr, 0.9, 0.999, 1e-8, cfg.WeightDecay, false, false)
        let baseLrs = [| for (s, _) in settings -> cfg.BaseLr * s.LrScale |]
        opt, baseLrs

    /// WarmupPolyLR factor at iteration `iter` of `maxIter`: warm-up (linear) * (1 - iter/maxIter)^power.
    let polyFactor (cfg: OptimConfig) (maxIter: int) (iter: int) =
        let warm =
            if iter >= cfg.WarmupIters || cfg.WarmupIters = 0 then 1.0
            else
                let alpha = float iter / float cfg.WarmupIters
                cfg.WarmupFactor * (1.0 - alpha) + alpha
        warm * Math.Pow(1.0 - float (min iter maxIter) / float maxIter, cfg.PolyPower)

    /// Sets every group's learning rate for iteration `iter`.
    let setLr (opt: AdamW) (baseLrs: float[]) (factor: float) =
        let groups = Seq.toArray opt.ParamGroups
        for i in 0 .. groups.Length - 1 do
            groups[i].LearningRate <- baseLrs[i] * factor

    /// Clips the global L2 norm of all gradients to `maxNorm`; returns the norm before clipping.
    let clipFullModel (maxNorm: float) (parameters: Parameter seq) : float =
        let ps = parameters |> Seq.filter (fun p -> not (isNull p.grad)) |> Seq.toArray
        if ps.Length = 0 then 0.0
        else torch.nn.utils.clip_grad_norm_(ps, maxNorm)

    /// The optimiser's state serialised by TorchSharp (exp_avg, exp_avg_sq, step per parameter) into a stream.
    let private serialise (opt: AdamW) : MemoryStream =
        let ms = new MemoryStream()
        (use w = new BinaryWriter(ms, Text.Encoding.UTF8, true)
         opt.save_state_dict w |> ignore)
        ms

    /// The optimiser's state as bytes, for checkpoints.
    let stateBytes (opt: AdamW) : byte[] =
        use ms = serialise opt
        ms.ToArray()

    /// The optimiser's state as a uint8 tensor, without the copies of `stateBytes` (the released presets' AdamW
    /// state is ~1.9 GB): the stream's own buffer, shared with the tensor (valid while the tensor lives).
    let stateTensor (opt: AdamW) : Tensor =
        let ms = serialise opt
        torch.from_array(ms.GetBuffer()).narrow(0L, 0L, ms.Length)

    /// Restores the optimiser's state from `stateBytes` output.
    let loadStateBytes (opt: AdamW) (bytes: byte[]) =
        use ms = new MemoryStream(bytes)
        use r = new BinaryReader(ms)
        opt.load_state_dict r |> ignore
