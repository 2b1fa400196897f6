namespace Vct.Core.Checkpoint

open System
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Raw little-endian tensor bytes: the common ground of every checkpoint format read here.
[<RequireQualifiedAccess>]
module TensorData =
    /// Bytes per element of a dtype.
    let elementSize (dtype: torch.ScalarType) : int64 =
        match dtype with
        | torch.ScalarType.Bool | torch.ScalarType.Byte | torch.ScalarType.Int8 -> 1L
        | torch.ScalarType.Int16 | torch.ScalarType.Float16 | torch.ScalarType.BFloat16 -> 2L
        | torch.ScalarType.Int32 | torch.ScalarType.Float32 -> 4L
        | torch.ScalarType.Int64 | torch.ScalarType.Float64 | torch.ScalarType.ComplexFloat32 -> 8L
        | torch.ScalarType.ComplexFloat64 -> 16L
        | other -> invalidArg (nameof dtype) $"dtype {other} has no plain byte layout"

    /// True for float16, bfloat16, float32 and float64.
    let isFloating (dtype: torch.ScalarType) =
        match dtype with
        | torch.ScalarType.Float16 | torch.ScalarType.BFloat16 | torch.ScalarType.Float32 | torch.ScalarType.Float64 -> true
        | _ -> false

    /// "[2x3]" text of a shape ("[]" for a scalar).
    let showShape (shape: int64[]) = "[" + (shape |> Array.map string |> String.concat "x") + "]"

    /// The element count of `shape`, refusing a negative dimension and a product that overflows 64 bits (a forged
    /// shape whose wrapped product could match the bytes there are). Zero dimensions count as 1 in the overflow
    /// check: the strides of [0, 2^62, 4] overflow even though it has no elements.
    let numelOf (shape: int64[]) : int64 =
        if Array.exists (fun d -> d < 0L) shape then raise (InvalidDataException $"negative dimension in shape {showShape shape}")
        try Array.fold (fun a d -> Checked.(*) a (max 1L d)) 1L shape |> ignore
        with :? OverflowException -> raise (InvalidDataException $"shape {showShape shape} has more than 2^63 elements")
        Array.fold (*) 1L shape

    /// Reads `numel` elements of `dtype` from `stream` into a new 1-D CPU tensor. A seekable stream must hold the
    /// bytes before anything is allocated; a short stream raises EndOfStreamException. Storages must stay under
    /// 2 GiB (one .NET span).
    let readStorage (dtype: torch.ScalarType) (numel: int64) (stream: Stream) : Tensor =
        if numel < 0L then raise (InvalidDataException $"negative element count {numel}")
        let nbytes = try Checked.(*) numel (elementSize dtype) with :? OverflowException -> Int64.MaxValue
        if nbytes > int64 Int32.MaxValue then
            raise (InvalidDataException $"a storage of {nbytes} bytes exceeds the 2 GiB this reader supports")
        if stream.CanSeek && nbytes > stream.Length - stream.Position then
            raise (InvalidDataException $"a storage of {numel} x {dtype} ({nbytes} bytes) but only {stream.Length - stream.Position} bytes remain (truncated file?)")
        let t = torch.empty([| numel |], dtype = dtype)
        if numel > 0L then
            try stream.ReadExactly(t.bytes)
            with e ->
                t.Dispose()
                raise e
        t

    /// The bytes of `t` in row-major (contiguous) order, as the CPU holds them (little-endian).
    let toBytes (t: Tensor) : byte[] =
        if t.numel () = 0L then [||]
        else
            use c = t.detach().cpu().contiguous()
            c.bytes.ToArray()

    /// A new CPU tensor of `dtype` and `shape` holding a copy of `bytes` (row-major, little-endian).
    let ofBytes (dtype: torch.ScalarType) (shape: int64[]) (bytes: ReadOnlySpan<byte>) : Tensor =
        let numel = numelOf shape
        if int64 bytes.Length <> (try Checked.(*) numel (elementSize dtype) with :? OverflowException -> -1L) then
            invalidArg (nameof bytes) $"{bytes.Length} bytes do not fill a {dtype} tensor of shape {showShape shape}"
        let t = torch.empty(shape, dtype = dtype)
        if numel > 0L then bytes.CopyTo(t.bytes)
        t
