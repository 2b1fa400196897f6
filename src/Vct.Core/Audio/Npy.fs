namespace Vct.Core.Audio

open System
open System.IO
open System.Text
open TorchSharp
open Vct.Core

/// Minimal NumPy `.npy` (format 1.0) writer and reader for float32 / float64 C-order arrays.
[<RequireQualifiedAccess>]
module Npy =
    let private descr (t: Tensor) =
        match t.dtype with
        | torch.ScalarType.Float32 -> "<f4"
        | torch.ScalarType.Float64 -> "<f8"
        | d -> invalidArg (nameof t) $"only float32/float64 tensors can be written as .npy here, got {d}"

    /// Writes a CPU copy of `t` to `path` as a standard little-endian C-order `.npy`.
    let write (path: string) (t: Tensor) =
        let d = descr t
        let shape =
            match t.shape with
            | [| n |] -> $"({n},)"
            | s -> "(" + String.Join(", ", s) + ")"
        let dict = $"{{'descr': '{d}', 'fortran_order': False, 'shape': {shape}, }}"
        // magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64, ending '\n'.
        let total = 10 + dict.Length + 1
        let padded = dict + String(' ', (64 - total % 64) % 64) + "\n"
        use c = t.detach().cpu().contiguous()
        let bytes =
            if t.dtype = torch.float32 then
                let a = c.data<float32>().ToArray()
                let b = Array.zeroCreate<byte> (a.Length * 4)
                Buffer.BlockCopy(a, 0, b, 0, b.Length)
                b
            else
                let a = c.data<float>().ToArray()
                let b = Array.zeroCreate<byte> (a.Length * 8)
                Buffer.BlockCopy(a, 0, b, 0, b.Length)
                b
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        if not (Directory.Exists dir) then Directory.CreateDirectory dir |> ignore
        use fs = File.Create path
        fs.Write([| 0x93uy; byte 'N'; byte 'U'; byte 'M'; byte 'P'; byte 'Y'; 1uy; 0uy |], 0, 8)
        fs.Write(BitConverter.GetBytes(uint16 padded.Length), 0, 2)
        fs.Write(Encoding.ASCII.GetBytes padded, 0, padded.Length)
        fs.Write(bytes, 0, bytes.Length)

    /// Reads a little-endian C-order float32/float64 `.npy` (format 1.x/2.x) into a CPU tensor.
    let read (path: string) : Tensor =
        let all = File.ReadAllBytes path
        let bad (why: string) = raise (InvalidDataException($"{path}: not a readable .npy file ({why})"))
        if all.Length < 10 || all[0] <> 0x93uy || Encoding.ASCII.GetString(all, 1, 5) <> "NUMPY" then bad "no NUMPY magic"
        let hlen, start =
            if all[6] = 1uy then int (BitConverter.ToUInt16(all, 8)), 10
            else int (BitConverter.ToUInt32(all, 8)), 12
        let header = Encoding.ASCII.GetString(all, start, hlen)
        let dtype, size =
            if header.Contains "'<f4'" then torch.float32, 4
            elif header.Contains "'<f8'" then torch.float64, 8
            else bad $"unsupported dtype in {header.Trim()}"
        if header.Contains "'fortran_order': True" then bad "Fortran order"
        let i = header.IndexOf "'shape': ("
        let j = header.IndexOf(')', i)
        let shape =
            header.Substring(i + 10, j - i - 10).Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
            |> Array.map int64
        let data = start + hlen
        let count = (all.Length - data) / size
        if int64 count <> Array.fold (*) 1L shape then bad "data size does not match the shape"
        if dtype = torch.float32 then
            let a = Array.zeroCreate<float32> count
            Buffer.BlockCopy(all, data, a, 0, count * 4)
            torch.tensor(a, ReadOnlySpan<int64>(shape))
        else
            let a = Array.zeroCreate<float> count
            Buffer.BlockCopy(all, data, a, 0, count * 8)
            torch.tensor(a, ReadOnlySpan<int64>(shape))
