namespace Vct.Core.Checkpoint

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// How a pickled checkpoint file is laid out.
[<RequireQualifiedAccess>]
type PthFormat =
    /// torch.save since PyTorch 1.6: a zip with `<name>/data.pkl` and one record per storage in `<name>/data/`.
    | Zip
    /// torch.save before 1.6 (or `_use_new_zipfile_serialization=False`): pickles followed by raw storages.
    | Legacy
    /// A plain pickle with no tensors of its own, e.g. detectron2's numpy `.pkl` weights.
    | Pickle

/// The object tree of a `.pth`/`.pkl` file, its tensors rebuilt on the CPU. Disposing it frees every
/// tensor the reader created.
[<Sealed>]
type PthFile internal (path: string, format: PthFormat, root: PyValue, tensors: Tensor list) =
    /// The file that was read.
    member _.Path = path
    /// Zip, legacy or plain pickle.
    member _.Format = format
    /// The unpickled top-level object; tensors appear as `PyValue.Tensor`, unknown classes as placeholders.
    member _.Root = root
    /// Every tensor the reader created (whole storages and the tensors viewing them), in creation order.
    member _.Tensors = tensors
    interface ITensorOwner with
        member _.Tensors = Seq.ofList tensors
    interface IDisposable with
        member this.Dispose() = Scope.disposeOwned this

/// Reader of PyTorch `torch.save` files. Reference: torch/serialization.py (`_load`, `_legacy_load`,
/// `persistent_load`) and torch/_utils.py (`_rebuild_tensor_v2`, `_rebuild_parameter`).
[<RequireQualifiedAccess>]
module Pth =
    /// `0x1950a86a20f9469cfc6c`, the first pickle of a legacy file.
    let private legacyMagic = PyValue.BigInt(Numerics.BigInteger.Parse "119547037146038801333356")
    [<Literal>]
    let private LegacyProtocol = 1001L

    let private bad (msg: string) = raise (InvalidDataException msg)

    /// `torch.FloatStorage` and friends -> dtype.
    let storageDtype (className: string) : torch.ScalarType =
        match className with
        | "DoubleStorage" -> torch.ScalarType.Float64
        | "FloatStorage" -> torch.ScalarType.Float32
        | "HalfStorage" -> torch.ScalarType.Float16
        | "BFloat16Storage" -> torch.ScalarType.BFloat16
        | "LongStorage" -> torch.ScalarType.Int64
        | "IntStorage" -> torch.ScalarType.Int32
        | "ShortStorage" -> torch.ScalarType.Int16
        | "CharStorage" -> torch.ScalarType.Int8
        | "ByteStorage" | "UntypedStorage" -> torch.ScalarType.Byte
        | "BoolStorage" -> torch.ScalarType.Bool
        | "ComplexFloatStorage" -> torch.ScalarType.ComplexFloat32
        | "ComplexDoubleStorage" -> torch.ScalarType.ComplexFloat64
        | other -> bad $"unsupported storage type torch.{other}"

    /// A persistent id ('storage', storage_type, key, location, numel[, view_metadata]) -> its parts.
    /// The location ('cpu', 'cuda:0', ...) is read and ignored: every storage loads onto the CPU.
    let private parseStorageId (pid: PyValue) =
        match pid with
        | PyValue.Tuple items when items.Length >= 5 && items[0] = PyValue.Str "storage" ->
            let dtype =
                match items[1] with
                | PyValue.Global(("torch" | "torch.storage"), cls) -> storageDtype cls
                | other -> bad $"bad storage type {other.TypeName} in a persistent id"
            let key = match items[2] with PyValue.Str k -> k | PyValue.Int k -> string k | _ -> bad "bad storage key"
            match items[3] with
            | PyValue.Str _ -> ()
            | other -> bad $"bad storage location {other.TypeName}"
            let numel = match items[4] with PyValue.Int n when n >= 0L -> n | _ -> bad "bad storage size"
            let view = if items.Length > 5 then items[5] else PyValue.None
            key, dtype, numel, view
        | PyValue.Tuple items when items.Length > 0 ->
            bad $"""unsupported persistent id kind {items[0].TypeName}{(match items[0] with PyValue.Str k -> $" '{k}'" | _ -> "")}"""
        | other -> bad $"unsupported persistent id {other.TypeName}"

    let private ints (what: string) (v: PyValue) =
        match v with
        | PyValue.Tuple a -> a |> Array.map (function PyValue.Int i -> i | _ -> bad $"{what} must hold integers")
        | PyValue.List a -> a.ToArray() |> Array.map (function PyValue.Int i -> i | _ -> bad $"{what} must hold integers")
        | other -> bad $"{what} must be a tuple, got {other.TypeName}"

    /// `storage.as_strided(size, stride, offset)` after checking that every element lies in the storage.
    let private rebuild (created: ResizeArray<Tensor>) (storage: PyValue) (offset: PyValue) (size: PyValue) (stride: PyValue) =
        match storage with
        | PyValue.Storage(key, data) ->
            let offset = match offset with PyValue.Int o -> o | _ -> bad "storage offset must be an integer"
            let size = ints "tensor size" size
            let stride = ints "tensor stride" stride
            if size.Length <> stride.Length then bad $"tensor size {TensorData.showShape size} and stride {TensorData.showShape stride} differ in rank"
            if offset < 0L || Array.exists (fun s -> s < 0L) size || Array.exists (fun s -> s < 0L) stride then
                bad $"negative size, stride or offset for a tensor on storage {key}"
            let numel = data.shape[0]
            // The element count in LibTorch's order (a product that overflows before a zero size fails there too).
            (try Array.fold (fun acc n -> Checked.(*) acc n) 1L size |> ignore
             with :? OverflowException -> bad $"tensor size {TensorData.showShape size} on storage {key} has more elements than fit in 64 bits")
            if Array.forall (fun s -> s > 0L) size then
                let last =
                    try Checked.(+) offset (Array.fold2 (fun acc n s -> Checked.(+) acc (Checked.(*) (n - 1L) s)) 0L size stride)
                    with :? OverflowException -> Int64.MaxValue
                if last >= numel then
                    bad $"tensor {TensorData.showShape size} at offset {offset} reaches element {last} of storage {key}, which has {numel}"
            let t = data.as_strided(size, stride, offset)
            created.Add t
            PyValue.Tensor t
        | other -> bad $"a tensor's storage must come from a persistent id, got {other.TypeName}"

    /// Torch functions the pickle may call; everything else becomes a placeholder. `_rebuild_from_type_v2` may wrap
    /// another rebuild; a nesting deeper than a few levels is a forged file (and would recurse without bound).
    let rec private resolveAt (depth: int) (created: ResizeArray<Tensor>) (m: string) (n: string) (args: PyValue[]) : PyValue option =
        if depth > 8 then bad "tensor rebuild calls nested more than 8 deep"
        match m, n, args with
        | "torch._utils", "_rebuild_tensor_v2", a when a.Length >= 4 -> Some(rebuild created a[0] a[1] a[2] a[3])
        | "torch._utils", "_rebuild_tensor", [| s; o; size; stride |] -> Some(rebuild created s o size stride)
        | "torch._utils", ("_rebuild_parameter" | "_rebuild_parameter_with_state"), a when a.Length >= 1 -> Some a[0]
        | "torch._tensor", "_rebuild_from_type_v2", [| PyValue.Global(fm, fn); _; PyValue.Tuple fargs; _ |] ->
            resolveAt (depth + 1) created fm fn fargs
        | "torch._utils", "_rebuild_device_tensor_from_numpy", a when a.Length >= 1 ->
            // Tensors of devices without storages (XLA, MPS) are pickled as numpy arrays; they load onto the CPU.
            match Numpy.tryToTensor a[0] with
            | Some t ->
                created.Add t
                Some(PyValue.Tensor t)
            | None -> bad "a device tensor whose numpy data has an unsupported dtype"
        | "torch._utils", name, _ when name.StartsWith "_rebuild_" ->
            bad $"unsupported tensor kind torch._utils.{name} (quantized, sparse, meta or nested tensors are not read)"
        | _ -> Option.None

    let private resolve (created: ResizeArray<Tensor>) m n args = resolveAt 0 created m n args

    let private hooksFor (created: ResizeArray<Tensor>) (storageOf: PyValue -> PyValue) : Pickle.Hooks =
        { PersistentLoad = storageOf; Resolve = resolve created }

    /// The most a zip record may expand (deflate cannot exceed about 1032:1; torch.save stores records
    /// uncompressed): a record that declares more is a forged or corrupt archive.
    [<Literal>]
    let private MaxExpansion = 1100L

    /// Checks a zip record's declared size against its compressed size and the whole file.
    let private checkEntry (fileLength: int64) (e: ZipArchiveEntry) =
        if e.Length < 0L || e.Length > max 1024L (e.CompressedLength * MaxExpansion) || e.CompressedLength > fileLength then
            bad $"zip record {e.FullName} declares {e.Length} bytes from {e.CompressedLength} compressed bytes (corrupt or forged archive)"

    let private readZip (fs: Stream) (created: ResizeArray<Tensor>) =
        let fileLength = fs.Length
        use zip =
            try new ZipArchive(fs, ZipArchiveMode.Read)
            with :? InvalidDataException as e -> bad $"corrupt or truncated zip archive: {e.Message}"
        let pkl =
            zip.Entries
            |> Seq.filter (fun e -> e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal) && e.FullName.IndexOf('/') = e.FullName.Length - 9)
            |> List.ofSeq
        let pkl =
            match pkl with
            | [ e ] -> e
            | [] -> bad "a zip without <name>/data.pkl: not a torch.save file (a TorchScript archive or another zip?)"
            | many ->
                let names = many |> List.map (fun e -> e.FullName) |> String.concat ", "
                bad $"several data.pkl records: {names}"
        let prefix = pkl.FullName.Substring(0, pkl.FullName.Length - "data.pkl".Length)
        match zip.GetEntry(prefix + "byteorder") with
        | null -> ()
        | e ->
            use r = new StreamReader(e.Open())
            let order = r.ReadToEnd().Trim()
            if order <> "little" then bad $"byte order '{order}' is not supported (only little-endian files)"
        let storages = Dictionary<string, Tensor>()
        let storageOf (pid: PyValue) =
            let key, dtype, numel, _ = parseStorageId pid
            match storages.TryGetValue key with
            | true, t -> PyValue.Storage(key, t)
            | _ ->
                let name = prefix + "data/" + key
                let entry = match zip.GetEntry name with null -> bad $"storage record {name} is missing" | e -> e
                checkEntry fileLength entry
                let nbytes = try Checked.(*) numel (TensorData.elementSize dtype) with :? OverflowException -> Int64.MaxValue
                if entry.Length < nbytes then
                    bad $"storage record {name} has {entry.Length} bytes, the pickle needs {nbytes} ({numel} x {dtype})"
                use s = entry.Open()
                let t =
                    try TensorData.readStorage dtype numel s
                    with :? EndOfStreamException -> bad $"storage record {name} is truncated"
                storages[key] <- t
                created.Add t
                PyValue.Storage(key, t)
        checkEntry fileLength pkl
        if pkl.Length > int64 Array.MaxLength then bad $"{pkl.FullName} of {pkl.Length} bytes is too large"
        use ms = new MemoryStream()
        (use s = pkl.Open()
         // Never more than the record declares (a forged size cannot make the copy grow without bound).
         let buf = Array.zeroCreate<byte> 65536
         let mutable go = true
         while go do
             let n = s.Read(buf, 0, buf.Length)
             if n <= 0 then go <- false
             elif ms.Length + int64 n > pkl.Length then bad $"{pkl.FullName} holds more than the {pkl.Length} bytes it declares"
             else ms.Write(buf, 0, n))
        ms.Position <- 0L
        let root = Pickle.load (hooksFor created storageOf) ms
        root

    let private readLegacy (fs: Stream) (created: ResizeArray<Tensor>) =
        match Pickle.load Pickle.noHooks fs with
        | v when v <> legacyMagic -> PthFormat.Pickle, v // a plain pickle: its only object is the first
        | _ ->
        match Pickle.load Pickle.noHooks fs with
        | PyValue.Int LegacyProtocol -> ()
        | PyValue.Int v -> bad $"legacy protocol version {v} is not supported (expected {LegacyProtocol})"
        | other -> bad $"legacy protocol version is a {other.TypeName}, not an integer (expected {LegacyProtocol})"
        match (Pickle.load Pickle.noHooks fs).TryItem "little_endian" with
        | Some(PyValue.Bool false) -> bad "the file was written on a big-endian machine"
        | _ -> ()
        let start = fs.Position
        // Pass 1 learns each storage's dtype; the data follows the pickles, so tensors come in pass 2.
        let dtypes = Dictionary<string, torch.ScalarType>()
        let record (pid: PyValue) =
            let key, dtype, _, _ = parseStorageId pid
            dtypes[key] <- dtype
            PyValue.None
        Pickle.load { PersistentLoad = record; Resolve = fun _ _ _ -> Option.None } fs |> ignore
        let keys =
            match Pickle.load Pickle.noHooks fs with
            | PyValue.List keys -> keys |> Seq.map (function PyValue.Str k -> k | other -> bad $"bad storage key {other.TypeName}") |> List.ofSeq
            | other -> bad $"the storage key list is a {other.TypeName}"
        let storages = Dictionary<string, Tensor>()
        let header = Array.zeroCreate<byte> 8
        for key in keys do
            let dtype = match dtypes.TryGetValue key with | true, d -> d | _ -> bad $"storage {key} is listed but no tensor uses it"
            try fs.ReadExactly(header.AsSpan())
            with :? EndOfStreamException -> bad $"truncated before storage {key}"
            let numel = Buffers.Binary.BinaryPrimitives.ReadInt64LittleEndian(ReadOnlySpan header)
            let t =
                try TensorData.readStorage dtype numel fs
                with :? EndOfStreamException -> bad $"storage {key} is truncated ({numel} x {dtype} expected)"
            storages[key] <- t
            created.Add t
        let views = Dictionary<string, Tensor>()
        let storageOf (pid: PyValue) =
            let key, _, _, view = parseStorageId pid
            let data = match storages.TryGetValue key with | true, t -> t | _ -> bad $"storage {key} has no data in the file"
            match view with
            | PyValue.Tuple [| PyValue.Str viewKey; PyValue.Int offset; PyValue.Int size |] ->
                match views.TryGetValue viewKey with
                | true, v -> PyValue.Storage(viewKey, v)
                | _ ->
                    if offset < 0L || size < 0L || offset > data.shape[0] || size > data.shape[0] - offset then
                        bad $"storage view {viewKey} [{offset}, {offset + size}) lies outside storage {key} of {data.shape[0]} elements"
                    let v = data.narrow(0L, offset, size)
                    views[viewKey] <- v
                    created.Add v
                    PyValue.Storage(viewKey, v)
            | _ -> PyValue.Storage(key, data)
        fs.Position <- start
        let root = Pickle.load (hooksFor created storageOf) fs
        PthFormat.Legacy, root

    /// Wraps a reader failure in InvalidDataException whose message starts with the path.
    let internal withPath (path: string) (f: unit -> 'T) : 'T =
        try f ()
        with
        | :? FileNotFoundException -> reraise ()
        | :? DirectoryNotFoundException -> reraise ()
        | :? InvalidDataException as e when e.Message.Contains path -> reraise ()
        | :? InvalidDataException | :? EndOfStreamException | :? ArgumentException | :? InvalidOperationException
        | :? FormatException | :? OverflowException as e ->
            raise (InvalidDataException($"{path}: {e.Message}", e))

    /// Opens `path` for reading; a missing file raises FileNotFoundException and an empty one
    /// InvalidDataException, both naming the path.
    let internal openChecked (path: string) : FileStream =
        if not (File.Exists path) then raise (FileNotFoundException($"checkpoint file not found: {path}", path))
        let fs = File.OpenRead path
        if fs.Length = 0L then
            fs.Dispose()
            raise (InvalidDataException $"{path}: the file is empty")
        fs

    /// Reads a `torch.save` file (zip or legacy format) or a plain pickle. Tensors are rebuilt on the CPU
    /// with their dtype, strides and storage sharing (views of one storage share memory, as in PyTorch);
    /// storages saved from a GPU ('cuda:0') load onto the CPU. Bad input raises InvalidDataException naming
    /// the path and the problem.
    let read (path: string) : PthFile =
        Runtime.init () |> ignore
        use fs = openChecked path
        let created = ResizeArray<Tensor>()
        try
            withPath path (fun () ->
                let head = Array.zeroCreate<byte> 4
                let n = fs.Read(head, 0, 4)
                fs.Position <- 0L
                if n >= 4 && head[0] = byte 'P' && head[1] = byte 'K' && head[2] = 3uy && head[3] = 4uy then
                    let root = readZip fs created
                    new PthFile(path, PthFormat.Zip, root, List.ofSeq created)
                elif head[0] = 0x80uy then
                    let format, root = readLegacy fs created
                    new PthFile(path, format, root, List.ofSeq created)
                elif "(}])c".Contains(char head[0]) then
                    // Protocol 0 and 1 pickles have no PROTO opcode; they can only be plain pickles.
                    let root =
                        try Pickle.load Pickle.noHooks fs
                        with :? InvalidDataException as e -> bad $"not a PyTorch checkpoint, nor a readable pickle: {e.Message}"
                    new PthFile(path, PthFormat.Pickle, root, List.ofSeq created)
                elif n >= 2 && head[0] = byte 'P' && head[1] = byte 'K' then
                    bad "a zip file that is truncated or not a torch.save archive (no local file header at the start)"
                else
                    let shown = head[.. n - 1] |> Array.map (fun b -> $"{b:x2}") |> String.concat " "
                    bad $"not a PyTorch checkpoint: it starts with bytes {shown}, neither a zip archive nor a pickle")
        with _ ->
            for t in created do t.Dispose()
            reraise ()
