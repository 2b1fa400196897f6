namespace Vct.Core.Checkpoint

open System
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Numpy arrays and scalars as pickled by numpy (detectron2 .pkl weights, extra entries of checkpoints).
/// Reference: numpy/core/src/multiarray/methods.c, `array_reduce` and `array_setstate`;
/// `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` then BUILD with
/// (version, shape, dtype, is_fortran, raw bytes); dtype: `numpy.dtype(code, False, True)` then BUILD with
/// (version, byte order, ...); scalar: `numpy.core.multiarray.scalar(dtype, raw bytes)`; protocol 5:
/// `numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`.
[<RequireQualifiedAccess>]
module Numpy =
    let private isMultiarray (m: string) = m = "numpy.core.multiarray" || m = "numpy._core.multiarray"

    /// The torch dtype and big-endianness of a pickled `numpy.dtype`, when torch has that dtype.
    let tryDtype (v: PyValue) : (torch.ScalarType * bool) option =
        match v with
        | PyValue.Object o when o.Module = "numpy" && o.Name = "dtype" && o.Args.Length >= 1 ->
            let code = match o.Args[0] with PyValue.Str s -> s | _ -> ""
            let order =
                match o.State with
                | PyValue.Tuple st when st.Length >= 2 -> (match st[1] with PyValue.Str s -> s | _ -> "|")
                | _ -> "|"
            let bigEndian = order = ">" || (order = "=" && not BitConverter.IsLittleEndian)
            let dtype =
                match code.TrimStart('<', '>', '=', '|') with
                | "f2" -> Some torch.ScalarType.Float16
                | "f4" -> Some torch.ScalarType.Float32
                | "f8" -> Some torch.ScalarType.Float64
                | "i1" -> Some torch.ScalarType.Int8
                | "i2" -> Some torch.ScalarType.Int16
                | "i4" -> Some torch.ScalarType.Int32
                | "i8" -> Some torch.ScalarType.Int64
                | "u1" -> Some torch.ScalarType.Byte
                | "b1" -> Some torch.ScalarType.Bool
                | "c8" -> Some torch.ScalarType.ComplexFloat32
                | "c16" -> Some torch.ScalarType.ComplexFloat64
                | _ -> Option.None
            dtype |> Option.map (fun d -> d, bigEndian)
        | _ -> Option.None

    let private toTensorOf (dtype: torch.ScalarType, bigEndian: bool) (shape: int64[]) (fortran: bool) (raw: byte[]) =
        let size = int (TensorData.elementSize dtype)
        let raw =
            if bigEndian && size > 1 then
                let copy = Array.copy raw
                for i in 0 .. size .. copy.Length - size do Array.Reverse(copy, i, size)
                copy
            else raw
        if fortran && shape.Length > 1 then
            // Column-major data is the row-major layout of the reversed shape; permute back.
            use t = TensorData.ofBytes dtype (Array.rev shape) (ReadOnlySpan raw)
            t.permute(Array.init shape.Length (fun i -> int64 (shape.Length - 1 - i))).contiguous()
        else TensorData.ofBytes dtype shape (ReadOnlySpan raw)

    /// A new CPU tensor with the values of a pickled numpy array or numpy scalar; None for anything else
    /// (also for object arrays and dtypes torch lacks, such as uint16).
    let tryToTensor (v: PyValue) : Tensor option =
        match v with
        | PyValue.Object o when isMultiarray o.Module && o.Name = "_reconstruct" ->
            match o.State with
            | PyValue.Tuple [| _; PyValue.Tuple shape; dt; PyValue.Bool fortran; PyValue.Bytes raw |]
                when shape |> Array.forall (function PyValue.Int _ -> true | _ -> false) ->
                let shape = shape |> Array.map (function PyValue.Int i -> i | _ -> 0L)
                match tryDtype dt with
                | Some d when int64 raw.Length = TensorData.numelOf shape * TensorData.elementSize (fst d) ->
                    Some(toTensorOf d shape fortran raw)
                | _ -> Option.None
            | _ -> Option.None
        | PyValue.Object o when (o.Module = "numpy.core.numeric" || o.Module = "numpy._core.numeric") && o.Name = "_frombuffer" ->
            // Protocol 5: _frombuffer(buffer, dtype, shape, order) with the buffer in-band.
            match o.Args with
            | [| PyValue.Bytes raw; dt; PyValue.Tuple shape; PyValue.Str order |]
                when shape |> Array.forall (function PyValue.Int _ -> true | _ -> false) ->
                let shape = shape |> Array.map (function PyValue.Int i -> i | _ -> 0L)
                match tryDtype dt with
                | Some d when int64 raw.Length = TensorData.numelOf shape * TensorData.elementSize (fst d) ->
                    Some(toTensorOf d shape (order = "F") raw)
                | _ -> Option.None
            | _ -> Option.None
        | PyValue.Object o when isMultiarray o.Module && o.Name = "scalar" ->
            match o.Args with
            | [| dt; PyValue.Bytes raw |] ->
                match tryDtype dt with
                | Some d when int64 raw.Length = TensorData.elementSize (fst d) -> Some(toTensorOf d [||] false raw)
                | _ -> Option.None
            | _ -> Option.None
        | _ -> Option.None
