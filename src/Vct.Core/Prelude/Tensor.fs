namespace Vct.Core

open TorchSharp

/// The tensor type used throughout Vct.
type Tensor = torch.Tensor

/// Dispose scopes: temporaries die with the scope, only the result leaves it.
[<RequireQualifiedAccess>]
module Scope =
    /// Runs `f` in a new dispose scope and moves its result to the enclosing scope.
    let run (f: unit -> Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let result = f ()
        result.MoveToOuterDisposeScope()

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
