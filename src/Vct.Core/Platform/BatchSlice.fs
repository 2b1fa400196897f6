namespace Vct.Core.Platform

open System
open TorchSharp

/// The part of a larger batch that the current step runs: frames [Offset, Offset + Count) of Total. Set by
/// data-parallel training and gradient accumulation around a micro-batch's forward; the random draws whose first
/// dimension is the batch (Gumbel noise, drop path) then draw the whole batch's tensor and keep this part, so a
/// sample's noise does not depend on how the batch is split. Not set (the single-batch step): draws as before.
type BatchSlice =
    { Total: int64
      Offset: int64
      Count: int64 }

type internal BatchSliceState() =
    [<ThreadStatic; DefaultValue>]
    static val mutable private current: BatchSlice voption
    static member Current with get () = BatchSliceState.current and set v = BatchSliceState.current <- v

[<RequireQualifiedAccess>]
module BatchSlice =
    /// The slice of this thread's step, if any.
    let current () = BatchSliceState.Current

    /// Runs `f` with `slice` as this thread's slice.
    let within (slice: BatchSlice) (f: unit -> 'T) : 'T =
        let saved = BatchSliceState.Current
        BatchSliceState.Current <- ValueSome slice
        try f () finally BatchSliceState.Current <- saved

    /// torch.rand of `shape` from `gen`; under a slice whose Count divides shape[0], the whole batch's tensor is
    /// drawn and this part returned.
    let rand (shape: int64[]) (dtype: torch.ScalarType) (device: torch.Device) (gen: torch.Generator option) : torch.Tensor =
        let draw (s: int64[]) =
            match gen with
            | Some g -> torch.rand(s, dtype = dtype, device = device, generator = g)
            | None -> torch.rand(s, dtype = dtype, device = device)
        match BatchSliceState.Current with
        | ValueSome sl when shape.Length > 0 && sl.Count > 0L && shape[0] % sl.Count = 0L && sl.Total <> sl.Count ->
            let per = shape[0] / sl.Count
            let whole = Array.copy shape
            whole[0] <- sl.Total * per
            use all = draw whole
            all.narrow(0L, sl.Offset * per, shape[0]).clone()
        | _ -> draw shape
