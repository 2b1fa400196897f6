namespace Vct.Core.Checkpoint

open System
open System.IO
open System.Text
open Vct.Core.Platform

/// Element types of the `.npy` files this module reads and writes.
[<RequireQualifiedAccess>]
type NpyDtype =
    | Float32
    | Float64
    | UInt8
    | Bool
    | Int16
    | Int32
    | Int64
    /// Bytes per element.
    member d.Size =
        match d with
        | NpyDtype.UInt8 | NpyDtype.Bool -> 1
        | NpyDtype.Int16 -> 2
        | NpyDtype.Float32 | NpyDtype.Int32 -> 4
        | NpyDtype.Float64 | NpyDtype.Int64 -> 8
    /// The `descr` string numpy writes for this type (little-endian).
    member d.Descr =
        match d with
        | NpyDtype.Float32 -> "<f4"
        | NpyDtype.Float64 -> "<f8"
        | NpyDtype.UInt8 -> "|u1"
        | NpyDtype.Bool -> "|b1"
        | NpyDtype.Int16 -> "<i2"
        | NpyDtype.Int32 -> "<i4"
        | NpyDtype.Int64 -> "<i8"

/// The header of an `.npy` file: element type, C-order shape and where the data starts.
type NpyHeader =
    { Path: string
      Dtype: NpyDtype
      Shape: int64[]
      DataOffset: int64 }
    /// Number of elements (readHeader has checked that it does not overflow).
    member h.Count = Array.fold (*) 1L h.Shape

/// NumPy `.npy` (format 1.x/2.x/3.x, little-endian, C order) reading and writing on plain arrays, with
/// streaming access to slices along the first axis so a multi-gigabyte score file is never loaded at once.
/// (Audio/Npy.fs adapts it to float tensors.)
[<RequireQualifiedAccess>]
module NpyFile =
    let private bad (path: string) (why: string) : 'T = raise (InvalidDataException($"{path}: not a readable .npy file ({why})"))

    let private parseDescr (path: string) (header: string) =
        let key = "'descr':"
        let i = header.IndexOf key
        if i < 0 then bad path "no 'descr' in the header"
        let q1 = header.IndexOf('\'', i + key.Length)
        let q2 = if q1 < 0 then -1 else header.IndexOf('\'', q1 + 1)
        if q2 < 0 then bad path "the 'descr' value is not a quoted string"
        match header.Substring(q1 + 1, q2 - q1 - 1) with
        | "<f4" -> NpyDtype.Float32
        | "<f8" -> NpyDtype.Float64
        | "|u1" | "<u1" | ">u1" -> NpyDtype.UInt8
        | "|b1" -> NpyDtype.Bool
        | "<i2" -> NpyDtype.Int16
        | "<i4" -> NpyDtype.Int32
        | "<i8" -> NpyDtype.Int64
        | d -> bad path $"unsupported dtype '{d}' (float32/float64/uint8/bool/int16/int32/int64 little-endian are read)"

    /// Reads and validates the header (the data size must match the shape).
    let readHeader (path: string) : NpyHeader =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        use fs = File.OpenRead path
        let pre = Array.zeroCreate<byte> 12
        let n = fs.Read(pre, 0, 12)
        if n < 10 || pre[0] <> 0x93uy || Encoding.ASCII.GetString(pre, 1, 5) <> "NUMPY" then bad path "no NUMPY magic"
        let hlen, start =
            if pre[6] = 1uy then int (BitConverter.ToUInt16(pre, 8)), 10
            elif pre[6] = 2uy || pre[6] = 3uy then int (BitConverter.ToUInt32(pre, 8)), 12
            else bad path $"unknown format version {pre[6]}"
        if hlen <= 0 || int64 start + int64 hlen > fs.Length then bad path "truncated header"
        let hb = Array.zeroCreate<byte> hlen
        fs.Position <- int64 start
        if fs.Read(hb, 0, hlen) <> hlen then bad path "truncated header"
        let header = Encoding.UTF8.GetString hb
        let dtype = parseDescr path header
        if header.Contains "'fortran_order': True" then bad path "Fortran order is not supported; save with np.ascontiguousarray"
        let i = header.IndexOf "'shape':"
        if i < 0 then bad path "no 'shape' in the header"
        let a = header.IndexOf('(', i)
        let b = if a < 0 then -1 else header.IndexOf(')', a)
        if b < 0 then bad path "the 'shape' value is not a tuple"
        let shape =
            header.Substring(a + 1, b - a - 1).Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
            |> Array.map (fun s -> match Int64.TryParse s with | true, v when v >= 0L -> v | _ -> bad path $"bad shape entry '{s}'")
        let h = { Path = path; Dtype = dtype; Shape = shape; DataOffset = int64 (start + hlen) }
        // Checked: a wrapped product of a forged shape must not pass for the bytes the file has.
        // Zero dimensions count as 1 here: the strides of (0, 2^62, 4) overflow even though it has no elements.
        let expected =
            try
                Checked.(*) (Array.fold (fun acc d -> Checked.(*) acc (max 1L d)) 1L shape) (int64 dtype.Size) |> ignore
                h.Count * int64 dtype.Size
            with :? OverflowException -> bad path $"shape ({String.Join(',', shape)}) is too large"
        let actual = fs.Length - h.DataOffset
        if actual < expected then bad path $"data is truncated: {actual} bytes for shape ({String.Join(',', shape)}) of {dtype.Descr}, expected {expected}"
        h

    /// Raw bytes of `count` elements starting at element `first`.
    let readBytes (h: NpyHeader) (first: int64) (count: int64) : byte[] =
        let size = int64 h.Dtype.Size
        if first < 0L || count < 0L || first + count > h.Count then
            invalidArg (nameof first) $"{h.Path}: elements [{first}, {first + count}) outside 0..{h.Count}"
        if count * size > int64 Array.MaxLength then
            bad h.Path $"{count} elements of {h.Dtype.Descr} ({count * size} bytes) are more than one read may hold"
        let bytes = Array.zeroCreate<byte> (int (count * size))
        use fs = File.OpenRead h.Path
        fs.Position <- h.DataOffset + first * size
        let mutable got = 0
        while got < bytes.Length do
            let n = fs.Read(bytes, got, bytes.Length - got)
            if n <= 0 then bad h.Path "unexpected end of data"
            got <- got + n
        bytes

    /// Elements [first, first+count) converted to float32 (exact for uint8/bool/int16; float64 and large
    /// integers are rounded to nearest).
    let readFloat32 (h: NpyHeader) (first: int64) (count: int64) : float32[] =
        let b = readBytes h first count
        let n = int count
        match h.Dtype with
        | NpyDtype.Float32 ->
            let a = Array.zeroCreate<float32> n
            Buffer.BlockCopy(b, 0, a, 0, b.Length)
            a
        | NpyDtype.Float64 -> Array.init n (fun i -> float32 (BitConverter.ToDouble(b, i * 8)))
        | NpyDtype.UInt8 | NpyDtype.Bool -> Array.init n (fun i -> float32 b[i])
        | NpyDtype.Int16 -> Array.init n (fun i -> float32 (BitConverter.ToInt16(b, i * 2)))
        | NpyDtype.Int32 -> Array.init n (fun i -> float32 (BitConverter.ToInt32(b, i * 4)))
        | NpyDtype.Int64 -> Array.init n (fun i -> float32 (BitConverter.ToInt64(b, i * 8)))

    /// Elements [first, first+count) as integer labels; non-integer or out-of-range values fail with the file named.
    let readLabels (h: NpyHeader) (first: int64) (count: int64) : int[] =
        let b = readBytes h first count
        let n = int count
        let checkInt (v: float) =
            if v <> Math.Floor v || v < 0.0 || v > 65535.0 then bad h.Path $"label value {v} is not an integer in 0..65535"
            int v
        match h.Dtype with
        | NpyDtype.UInt8 | NpyDtype.Bool -> Array.init n (fun i -> int b[i])
        | NpyDtype.Int16 -> Array.init n (fun i -> checkInt (float (BitConverter.ToInt16(b, i * 2))))
        | NpyDtype.Int32 -> Array.init n (fun i -> checkInt (float (BitConverter.ToInt32(b, i * 4))))
        | NpyDtype.Int64 -> Array.init n (fun i -> checkInt (float (BitConverter.ToInt64(b, i * 8))))
        | NpyDtype.Float32 -> Array.init n (fun i -> checkInt (float (BitConverter.ToSingle(b, i * 4))))
        | NpyDtype.Float64 -> Array.init n (fun i -> checkInt (BitConverter.ToDouble(b, i * 8)))

    /// Writes raw little-endian element bytes with a version-1.0 header.
    let writeBytes (path: string) (dtype: NpyDtype) (shape: int64[]) (data: byte[]) =
        let count = Array.fold (*) 1L shape
        if int64 data.Length <> count * int64 dtype.Size then
            invalidArg (nameof data) $"{path}: {data.Length} bytes do not hold shape ({String.Join(',', shape)}) of {dtype.Descr}"
        let shapeText =
            match shape with
            | [| n |] -> $"({n},)"
            | s -> "(" + String.Join(", ", s) + ")"
        let dict = $"{{'descr': '{dtype.Descr}', 'fortran_order': False, 'shape': {shapeText}, }}"
        let total = 10 + dict.Length + 1
        let padded = dict + String(' ', (64 - total % 64) % 64) + "\n"
        let full = Path.GetFullPath path
        let dir = Path.GetDirectoryName full
        if not (Directory.Exists dir) then Directory.CreateDirectory dir |> ignore
        // Written next to the target and renamed over it: an interrupted write never leaves a partial .npy.
        let tmp = Path.Combine(dir, $".{Path.GetFileName full}.{Guid.NewGuid():N}.tmp")
        try
            do
                use fs = File.Create tmp
                fs.Write([| 0x93uy; byte 'N'; byte 'U'; byte 'M'; byte 'P'; byte 'Y'; 1uy; 0uy |], 0, 8)
                fs.Write(BitConverter.GetBytes(uint16 padded.Length), 0, 2)
                fs.Write(Encoding.ASCII.GetBytes padded, 0, padded.Length)
                fs.Write(data, 0, data.Length)
            File.Move(tmp, full, true)
        finally
            if File.Exists tmp then File.Delete tmp

    /// Writes a float32 array of the given C-order shape.
    let writeFloat32 (path: string) (shape: int64[]) (data: float32[]) =
        let b = Array.zeroCreate<byte> (data.Length * 4)
        Buffer.BlockCopy(data, 0, b, 0, b.Length)
        writeBytes path NpyDtype.Float32 shape b

    /// Writes a uint8 array of the given C-order shape.
    let writeUInt8 (path: string) (shape: int64[]) (data: byte[]) = writeBytes path NpyDtype.UInt8 shape data
