namespace Vct.Core.Training

open System.IO
open Vct.Core
open Vct.Core.Evaluation

/// Everything a training run needs besides the data.
type TrainConfig =
    { Model: VctConfig
      Criterion: CriterionConfig
      Optim: OptimConfig
      /// SOLVER.MAX_ITER.
      Iterations: int
      /// Videos per step (SOLVER.IMS_PER_BATCH).
      BatchVideos: int
      /// Evaluate on the validation split every this many iterations (and at the end).
      EvalPeriod: int
      /// Write the resumable checkpoint every this many iterations (and at the end).
      CheckpointPeriod: int
      /// SEED: data order, augmentation, Gumbel noise, point sampling and drop path all derive from
      /// (Seed, iteration), so a resumed run repeats an uninterrupted one.
      Seed: int
      /// Side of the training crops (INPUT.CROP.SIZE; 384 released).
      CropSize: int
      ColorJitter: bool
      /// Data-loading workers.
      Workers: int
      /// What a pre-SAM model does when the data has no mask images (released presets: refuse).
      MissingMasks: Fusion.MissingMasks
      /// Mixed precision (CUDA only; refused elsewhere): forward and losses under LibTorch's float16 autocast,
      /// backward of the loss times a dynamic scale (GradScalerOptions.Default), gradients unscaled before
      /// clipping, steps with inf/NaN gradients skipped. Parameters and optimiser state stay float32.
      Amp: bool }

/// One line of the metrics log.
type TrainEvent =
    | Step of iteration: int * loss: float * terms: Map<string, float> * lr: float * seconds: float
    | Eval of iteration: int * mj: float * mf: float * seconds: float
    /// Something the run survived but the user should know (a skipped step, a fallback checkpoint).
    | Warning of iteration: int * message: string

/// How a run ended.
type TrainOutcome =
    | Completed
    | Interrupted of atIteration: int
    | Diverged of atIteration: int * diagnostic: string

/// The result of `Trainer.run`.
type TrainResult =
    { Outcome: TrainOutcome
      Iterations: int
      BestMJ: float
      BestIteration: int
      LastEval: MetricSummary option
      WallSeconds: float
      RunDir: string }

/// Where a run keeps its files: checkpoint_last.safetensors (resumable), checkpoint_prev.safetensors (the one
/// before it, the fallback when the last cannot be read), model_best.safetensors (+ .json), metrics.jsonl.
type RunFiles(dir: string) =
    member _.Dir = dir
    member _.Last = Path.Combine(dir, "checkpoint_last.safetensors")
    member _.Previous = Path.Combine(dir, "checkpoint_prev.safetensors")
    member _.Best = Path.Combine(dir, "model_best.safetensors")
    member _.Final = Path.Combine(dir, "model_final.safetensors")
    member _.Metrics = Path.Combine(dir, "metrics.jsonl")
