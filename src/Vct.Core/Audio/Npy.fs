namespace Vct.Core.Audio

open System
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint

/// NumPy `.npy` for float32 / float64 tensors, on top of `NpyFile` (the project's one .npy reader and writer).
[<RequireQualifiedAccess>]
module Npy =
    /// Writes a CPU copy of `t` to `path` as a standard little-endian C-order `.npy` (atomically: see NpyFile).
    let write (path: string) (t: Tensor) =
        let dtype =
            match t.dtype with
            | torch.ScalarType.Float32 -> NpyDtype.Float32
            | torch.ScalarType.Float64 -> NpyDtype.Float64
            | d -> invalidArg (nameof t) $"only float32/float64 tensors can be written as .npy here, got {d}"
        use c = t.detach().cpu().contiguous()
        let bytes =
            if dtype = NpyDtype.Float32 then
                let a = c.data<float32>().ToArray()
                let b = Array.zeroCreate<byte> (a.Length * 4)
                Buffer.BlockCopy(a, 0, b, 0, b.Length)
                b
            else
                let a = c.data<float>().ToArray()
                let b = Array.zeroCreate<byte> (a.Length * 8)
                Buffer.BlockCopy(a, 0, b, 0, b.Length)
                b
        NpyFile.writeBytes path dtype t.shape bytes

    /// Reads a little-endian C-order float32/float64 `.npy` (format 1.x-3.x) into a CPU tensor of that dtype.
    let read (path: string) : Tensor =
        let h = NpyFile.readHeader path
        let bytes = NpyFile.readBytes h 0L h.Count
        match h.Dtype with
        | NpyDtype.Float32 ->
            let a = Array.zeroCreate<float32> (int h.Count)
            Buffer.BlockCopy(bytes, 0, a, 0, bytes.Length)
            torch.tensor(a, ReadOnlySpan<int64>(h.Shape))
        | NpyDtype.Float64 ->
            let a = Array.zeroCreate<float> (int h.Count)
            Buffer.BlockCopy(bytes, 0, a, 0, bytes.Length)
            torch.tensor(a, ReadOnlySpan<int64>(h.Shape))
        | d -> raise (InvalidDataException($"{path}: not a readable .npy file (unsupported dtype {d.Descr}: float32 or float64 expected)"))
