namespace Vct.Core.Platform

open TorchSharp

/// The tensor type used throughout Vct.
type Tensor = torch.Tensor

/// A result record that owns tensors. `Tensors` names every one of them once: a scope moves exactly these out
/// (`Scope.runOwner`) and `Dispose` frees exactly these, so the two lists can never disagree.
type ITensorOwner =
    inherit System.IDisposable
    abstract Tensors: Tensor seq

/// Dispose scopes: temporaries die with the scope, only the result leaves it.
[<RequireQualifiedAccess>]
module Scope =
    /// Runs `f` in a new dispose scope and moves its result to the enclosing scope.
    let run (f: unit -> Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let result = f ()
        result.MoveToOuterDisposeScope()

    /// Runs `f` in a new dispose scope and moves every tensor its result owns to the enclosing scope; the other
    /// tensors `f` made die with the scope.
    let runOwner (f: unit -> 'T) : 'T when 'T :> ITensorOwner =
        use scope = torch.NewDisposeScope()
        let result = f ()
        for t in result.Tensors do t.MoveToOuterDisposeScope() |> ignore
        result

    /// Disposes every tensor an owner holds (the body of an `ITensorOwner`'s `Dispose`).
    let disposeOwned (owner: ITensorOwner) = for t in owner.Tensors do t.Dispose()

    /// Runs `f` in a new dispose scope; `f` returns plain .NET values (no tensors survive).
    let runValue (f: unit -> 'T) : 'T =
        use scope = torch.NewDisposeScope()
        f ()

/// Shape checks with messages that name the offending shape.
[<RequireQualifiedAccess>]
module Shape =
    /// "[2x3x4]" style text of a tensor's shape.
    let show (t: Tensor) = "[" + (t.shape |> Array.map string |> String.concat "x") + "]"

    /// Fails with `invalidArg name` unless `t` has exactly `rank` dimensions.
    let requireRank (name: string) (rank: int) (t: Tensor) =
        if int t.Dimensions <> rank then
            invalidArg name $"{name} must have {rank} dimensions, got {show t}"

/// Scalars that live for the whole process.
/// NOTE: TorchSharp's `Scalar` is not tracked by dispose scopes and its P/Invokes pass only its handle, so a
/// temporary `x.ToScalar()` can be finalised by the GC while the native call still uses it (seen as
/// "Scalar.h: Expected false to be true" after a few hundred training steps). Constants are therefore taken
/// from this cache, which keeps one Scalar per distinct value alive forever (a bounded set in practice).
[<RequireQualifiedAccess>]
module Scalars =
    let private cache = System.Collections.Concurrent.ConcurrentDictionary<struct (int * int64), Scalar>()
    /// A double Scalar.
    let ofFloat (x: float) = cache.GetOrAdd(struct (0, System.BitConverter.DoubleToInt64Bits x), fun _ -> x.ToScalar())
    /// An int64 Scalar.
    let ofInt64 (x: int64) = cache.GetOrAdd(struct (1, x), fun _ -> x.ToScalar())
    /// A float32 Scalar.
    let ofSingle (x: float32) = cache.GetOrAdd(struct (2, int64 (System.BitConverter.SingleToInt32Bits x)), fun _ -> x.ToScalar())
    /// An int32 Scalar.
    let ofInt32 (x: int) = cache.GetOrAdd(struct (3, int64 x), fun _ -> x.ToScalar())

/// `x.AsScalar`: a process-lifetime Scalar (see `Scalars`); use it instead of `x.ToScalar()`.
[<AutoOpen>]
module ScalarExtensions =
    type System.Double with
        member x.AsScalar = Scalars.ofFloat x
    type System.Int64 with
        member x.AsScalar = Scalars.ofInt64 x
    type System.Single with
        member x.AsScalar = Scalars.ofSingle x
    type System.Int32 with
        member x.AsScalar = Scalars.ofInt32 x
