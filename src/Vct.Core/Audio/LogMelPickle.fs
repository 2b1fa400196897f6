namespace Vct.Core.Audio

open System
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint

/// The official pre-computed log-mel files: AVSBench `audio_log_mel/.../*.pkl` (S4/MS3, [5,1,96,64]) and
/// `audio.pkl` of `avs_tools/preprocess_avss_audio.py` (AVSS, [10,1,96,64]). Both are `pickle.dump(tensor)`,
/// not `torch.save`: the tensor pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
/// requires_grad, hooks)` whose storage pickles as `torch.storage._load_from_bytes(b)`, with `b` a whole
/// legacy-format `torch.save` of that storage (reference: torch/storage.py `__reduce__`, torch/_tensor.py
/// `_reduce_ex_internal`). The nested file is read with the checkpoint reader (`Pth`).
[<RequireQualifiedAccess>]
module LogMelPickle =
    let private bad (path: string) (why: string) : 'T = raise (InvalidDataException($"{path}: {why}"))

    let private ints (path: string) (v: PyValue) =
        match v with
        | PyValue.Tuple xs ->
            xs |> Array.map (function PyValue.Int i -> i | o -> bad path $"expected an int in a tensor shape, got {o.TypeName}")
        | o -> bad path $"expected a shape tuple, got {o.TypeName}"

    /// Storage bytes (a legacy torch.save of one storage) -> a 1-D tensor over the storage.
    let private storageFromBytes (path: string) (bytes: byte[]) : Tensor =
        let tmp = Path.Combine(Path.GetTempPath(), $"vct-storage-{Guid.NewGuid():N}.pt")
        try
            File.WriteAllBytes(tmp, bytes)
            use f =
                try Pth.read tmp
                with :? InvalidDataException as e ->
                    let why = e.Message.Replace(tmp, "<storage>")
                    bad path $"unreadable tensor storage ({why})"
            match f.Root with
            | PyValue.Storage(_, data) -> data.clone()
            | PyValue.Tensor t -> t.reshape(-1L).clone()
            | o -> bad path $"a pickled storage holds a {o.TypeName}"
        finally
            try File.Delete tmp with _ -> ()

    /// Reads any pickled torch tensor (plain `pickle.dump`), as a CPU tensor of its own dtype and shape.
    let readTensor (path: string) : Tensor =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        Runtime.init () |> ignore
        let created = ResizeArray<Tensor>()
        let resolve (m: string) (n: string) (args: PyValue[]) : PyValue option =
            match m, n, args with
            | "torch.storage", "_load_from_bytes", [| PyValue.Bytes b |] ->
                let s = storageFromBytes path b
                created.Add s
                Some(PyValue.Storage("bytes", s))
            | "torch._utils", ("_rebuild_tensor_v2" | "_rebuild_tensor"), a when a.Length >= 4 ->
                match a[0], a[1] with
                | PyValue.Storage(_, data), PyValue.Int offset ->
                    let size, stride = ints path a[2], ints path a[3]
                    if size.Length <> stride.Length then bad path $"tensor size {TensorData.showShape size} and stride {TensorData.showShape stride} differ in rank"
                    if offset < 0L || Array.exists (fun s -> s < 0L) size || Array.exists (fun s -> s < 0L) stride then
                        bad path $"negative size, stride or offset for a tensor {TensorData.showShape size}"
                    let last =
                        try Checked.(+) offset (Array.fold2 (fun acc s st -> Checked.(+) acc (Checked.(*) (s - 1L) st)) 0L size stride)
                        with :? OverflowException -> Int64.MaxValue
                    if size |> Array.exists (fun s -> s = 0L) |> not && last >= data.shape[0] then
                        bad path $"tensor {TensorData.showShape size} reaches beyond its storage of {data.shape[0]} elements"
                    let t = data.as_strided(size, stride, offset).contiguous()
                    created.Add t
                    Some(PyValue.Tensor t)
                | s, _ -> bad path $"a tensor whose storage is a {s.TypeName}"
            | "torch._utils", "_rebuild_parameter", a when a.Length >= 1 -> Some a[0]
            | _ -> None
        let hooks = { Pickle.noHooks with Resolve = resolve }
        try
            let root =
                try
                    use fs = File.OpenRead path
                    if fs.Length = 0L then bad path "empty file (0 bytes)"
                    Pickle.load hooks fs
                with :? InvalidDataException as e when not (e.Message.StartsWith path) -> bad path e.Message
            match root with
            | PyValue.Tensor t ->
                let r = t.detach().clone()
                for c in created do c.Dispose()
                r
            | o -> bad path $"the pickle holds a {o.TypeName}, not a tensor"
        with _ ->
            for c in created do c.Dispose()
            reraise ()

    /// Reads an official log-mel `.pkl` as float32 [T, 1, 96, 64]; any other shape is an error naming the file.
    let read (path: string) : Tensor =
        let t = readTensor path
        let s = t.shape
        if s.Length <> 4 || s[1] <> 1L || s[2] <> 96L || s[3] <> 64L then
            let shape = Shape.show t
            t.Dispose()
            bad path $"expected log-mel examples [T, 1, 96, 64], got {shape}"
        if t.dtype = torch.float32 then t
        else
            use t = t
            t.``to``(torch.float32)
