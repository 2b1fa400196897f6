namespace Vct.Core.Checkpoint

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Tensors and string metadata of a safetensors file. Disposing it frees the tensors.
[<Sealed>]
type SafetensorsFile internal (path: string, tensors: OrderedDictionary<string, Tensor>, metadata: IReadOnlyDictionary<string, string>) =
    /// The file that was read.
    member _.Path = path
    /// Name -> CPU tensor, in header order.
    member _.Tensors = tensors
    /// The `__metadata__` string map (empty when the header has none).
    member _.Metadata = metadata
    interface IDisposable with
        member _.Dispose() = for t in tensors.Values do t.Dispose()

/// The safetensors format: 8-byte little-endian header length N, N bytes of JSON
/// `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data,
/// offsets relative to its start. Reference: huggingface/safetensors, docs and `safetensors/src/tensor.rs`.
[<RequireQualifiedAccess>]
module Safetensors =
    /// The header may not exceed 100 MB (the reference implementation's limit).
    let private maxHeader = 100_000_000L

    let private bad (msg: string) = raise (InvalidDataException msg)

    /// Format name of a dtype ("F32", "BF16", ...).
    let dtypeName (dtype: torch.ScalarType) : string =
        match dtype with
        | torch.ScalarType.Float32 -> "F32"
        | torch.ScalarType.Float16 -> "F16"
        | torch.ScalarType.BFloat16 -> "BF16"
        | torch.ScalarType.Float64 -> "F64"
        | torch.ScalarType.Int64 -> "I64"
        | torch.ScalarType.Int32 -> "I32"
        | torch.ScalarType.Int16 -> "I16"
        | torch.ScalarType.Int8 -> "I8"
        | torch.ScalarType.Byte -> "U8"
        | torch.ScalarType.Bool -> "BOOL"
        | other -> invalidArg (nameof dtype) $"dtype {other} cannot be stored in safetensors by this writer"

    /// Dtype of a format name; None for names torch lacks (U16, F8_E4M3, ...).
    let tryDtype (name: string) : torch.ScalarType option =
        match name with
        | "F32" -> Some torch.ScalarType.Float32
        | "F16" -> Some torch.ScalarType.Float16
        | "BF16" -> Some torch.ScalarType.BFloat16
        | "F64" -> Some torch.ScalarType.Float64
        | "I64" -> Some torch.ScalarType.Int64
        | "I32" -> Some torch.ScalarType.Int32
        | "I16" -> Some torch.ScalarType.Int16
        | "I8" -> Some torch.ScalarType.Int8
        | "U8" -> Some torch.ScalarType.Byte
        | "BOOL" -> Some torch.ScalarType.Bool
        | _ -> None

    type private Entry = { Name: string; Dtype: torch.ScalarType; Shape: int64[]; Begin: int64; End: int64 }

    let private parseEntry (name: string) (e: JsonElement) =
        if e.ValueKind <> JsonValueKind.Object then bad $"header entry '{name}' is not an object"
        let prop (p: string) =
            match e.TryGetProperty p with
            | true, v -> v
            | _ -> bad $"header entry '{name}' has no \"{p}\""
        let dtype =
            let d = prop "dtype"
            if d.ValueKind <> JsonValueKind.String then bad $"'{name}': dtype is not a string"
            match tryDtype (d.GetString()) with
            | Some t -> t
            | None -> bad $"'{name}': unsupported dtype {d.GetRawText()}"
        let intArray (p: string) =
            let a = prop p
            if a.ValueKind <> JsonValueKind.Array then bad $"'{name}': {p} is not an array"
            [| for x in a.EnumerateArray() ->
                   match x.ValueKind, x.TryGetInt64() with
                   | JsonValueKind.Number, (true, v) when v >= 0L -> v
                   | _ -> bad $"'{name}': {p} holds {x.GetRawText()}, not a non-negative integer" |]
        let shape = intArray "shape"
        match intArray "data_offsets" with
        | [| b; en |] when b <= en -> { Name = name; Dtype = dtype; Shape = shape; Begin = b; End = en }
        | other -> bad $"'{name}': data_offsets {TensorData.showShape other} is not [begin, end] with begin <= end"

    /// Reads every tensor of a safetensors file onto the CPU. The header is checked before any data is
    /// read: JSON, known dtypes, offsets inside the data, sizes that match shapes, no overlaps.
    let read (path: string) : SafetensorsFile =
        Runtime.init () |> ignore
        use fs = Pth.openChecked path
        Pth.withPath path (fun () ->
            let len = fs.Length
            if len < 8L then bad $"{len} bytes: too short for a safetensors header"
            let lenBytes = Array.zeroCreate<byte> 8
            fs.ReadExactly(lenBytes.AsSpan())
            let n = Buffers.Binary.BinaryPrimitives.ReadInt64LittleEndian(ReadOnlySpan lenBytes)
            if n < 2L || n > maxHeader || n > len - 8L then
                bad $"header length {n} does not fit a file of {len} bytes (not a safetensors file?)"
            let headerBytes = Array.zeroCreate<byte> (int n)
            fs.ReadExactly(headerBytes.AsSpan())
            let doc =
                try JsonDocument.Parse(ReadOnlyMemory headerBytes)
                with :? JsonException as e -> bad $"the header is not valid JSON: {e.Message}"
            use doc = doc
            if doc.RootElement.ValueKind <> JsonValueKind.Object then bad "the header is not a JSON object"
            let dataStart = 8L + n
            let dataLen = len - dataStart
            let metadata = Dictionary<string, string>()
            let entries = ResizeArray<Entry>()
            for p in doc.RootElement.EnumerateObject() do
                if p.Name = "__metadata__" then
                    if p.Value.ValueKind <> JsonValueKind.Object then bad "__metadata__ is not an object"
                    for m in p.Value.EnumerateObject() do
                        if m.Value.ValueKind <> JsonValueKind.String then bad $"__metadata__ value of '{m.Name}' is not a string"
                        metadata[m.Name] <- m.Value.GetString()
                else
                    let e = parseEntry p.Name p.Value
                    let expected =
                        try Checked.(*) (Array.fold (fun a b -> Checked.(*) a b) 1L e.Shape) (TensorData.elementSize e.Dtype)
                        with :? OverflowException -> bad $"'{e.Name}': shape {TensorData.showShape e.Shape} is too large"
                    if e.End - e.Begin <> expected then
                        bad $"'{e.Name}': data_offsets [{e.Begin}, {e.End}] span {e.End - e.Begin} bytes, {e.Dtype} {TensorData.showShape e.Shape} needs {expected}"
                    if e.End > dataLen then
                        bad $"'{e.Name}': data_offsets [{e.Begin}, {e.End}] go past the end of the data ({dataLen} bytes; truncated file?)"
                    entries.Add e
            let sorted = entries |> Seq.filter (fun e -> e.End > e.Begin) |> Seq.sortBy (fun e -> e.Begin) |> Array.ofSeq
            for i in 1 .. sorted.Length - 1 do
                if sorted[i].Begin < sorted[i - 1].End then
                    bad $"'{sorted[i - 1].Name}' and '{sorted[i].Name}' overlap in the data"
            let tensors = OrderedDictionary<string, Tensor>()
            try
                for e in entries do
                    fs.Position <- dataStart + e.Begin
                    use flat = TensorData.readStorage e.Dtype (TensorData.numelOf e.Shape) fs
                    tensors.Add(e.Name, flat.reshape(e.Shape))
            with _ ->
                for t in tensors.Values do t.Dispose()
                reraise ()
            new SafetensorsFile(path, tensors, metadata))

    /// Writes `tensors` (any device, any layout; stored contiguous, in the given order) with `metadata`.
    /// Atomic: the bytes go to a temporary file in the same folder, which then replaces `path`; a failure
    /// part-way leaves any old file untouched, and no stale bytes of a longer old file remain.
    let write (path: string) (metadata: IReadOnlyDictionary<string, string>) (tensors: (string * Tensor) seq) =
        Runtime.init () |> ignore
        let tensors = List.ofSeq tensors
        let names = HashSet<string>()
        for (name, _) in tensors do
            if name = "__metadata__" then invalidArg (nameof tensors) "'__metadata__' is reserved and cannot name a tensor"
            if not (names.Add name) then invalidArg (nameof tensors) $"tensor name '{name}' appears twice"
        let header =
            use ms = new MemoryStream()
            (use w = new Utf8JsonWriter(ms)
             w.WriteStartObject()
             if not (isNull metadata) && metadata.Count > 0 then
                 w.WriteStartObject "__metadata__"
                 for kv in metadata do w.WriteString(kv.Key, kv.Value)
                 w.WriteEndObject()
             let mutable offset = 0L
             for (name, t) in tensors do
                 let nbytes = t.numel () * TensorData.elementSize t.dtype
                 w.WriteStartObject name
                 w.WriteString("dtype", dtypeName t.dtype)
                 w.WriteStartArray "shape"
                 for d in t.shape do w.WriteNumberValue d
                 w.WriteEndArray()
                 w.WriteStartArray "data_offsets"
                 w.WriteNumberValue offset
                 w.WriteNumberValue(offset + nbytes)
                 w.WriteEndArray()
                 w.WriteEndObject()
                 offset <- offset + nbytes
             w.WriteEndObject())
            let json = ms.ToArray()
            // NOTE: padded with spaces to a multiple of 8 so that the data starts aligned, as the reference does.
            let padded = (json.Length + 7) / 8 * 8
            Array.append json (Array.create (padded - json.Length) (byte ' '))
        let full = Path.GetFullPath path
        let dir = Path.GetDirectoryName full
        let tmp = Path.Combine(dir, $".{Path.GetFileName full}.{Guid.NewGuid():N}.tmp")
        try
            (use fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None)
             let lenBytes = Array.zeroCreate<byte> 8
             Buffers.Binary.BinaryPrimitives.WriteInt64LittleEndian(Span lenBytes, int64 header.Length)
             fs.Write(lenBytes, 0, 8)
             fs.Write(header, 0, header.Length)
             for (_, t) in tensors do
                 if t.numel () > 0L then
                     // Straight from the tensor's memory: no managed copy of large weights.
                     use c = t.detach().cpu().contiguous()
                     let span: Span<byte> = c.bytes
                     fs.Write(Span<byte>.op_Implicit span: ReadOnlySpan<byte>)
             fs.Flush(true))
            File.Move(tmp, full, true)
        finally
            if File.Exists tmp then File.Delete tmp
