namespace Vct.Core.Checkpoint

open System
open System.Collections.Generic
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// The file layouts `StateDict.load` reads.
[<RequireQualifiedAccess>]
type CheckpointFormat =
    /// torch.save, zip format (PyTorch >= 1.6).
    | TorchZip
    /// torch.save, legacy format (before 1.6, or `_use_new_zipfile_serialization=False`).
    | TorchLegacy
    /// A plain pickle, e.g. detectron2's `.pkl` weights holding numpy arrays.
    | Pickle
    /// safetensors.
    | Safetensors

/// A checkpoint read from disk: its state dict, the whole object tree and any string metadata.
/// Disposing it frees every tensor it created.
[<Sealed>]
type LoadedCheckpoint internal (path: string, format: CheckpointFormat, stateDict: OrderedDictionary<string, Tensor>,
                                root: PyValue, metadata: IReadOnlyDictionary<string, string>, owned: IDisposable list) =
    /// The file that was read.
    member _.Path = path
    /// How the file was laid out.
    member _.Format = format
    /// Parameter name -> CPU tensor of the file's dtype, in file order. For a wrapped checkpoint this is the
    /// `"model"` or `"state_dict"` entry; numpy arrays in it are converted to tensors.
    member _.StateDict = stateDict
    /// The whole unpickled object (iteration, optimizer, scheduler, placeholders...); None for safetensors.
    member _.Root = root
    /// safetensors `__metadata__`; empty for other formats.
    member _.Metadata = metadata
    interface IDisposable with
        member _.Dispose() = for d in owned do d.Dispose()

/// Options of `StateDict.loadInto`.
type LoadOptions =
    { /// File key -> module key; None drops the entry (reported as dropped, never as unexpected).
      Remap: string -> string option
      /// Fail, before changing anything, on any missing, unexpected or mismatched key.
      Strict: bool
      /// Convert float16 / bfloat16 / float32 / float64 entries to the dtype of the module's tensor.
      ConvertDtype: bool }
    /// Keys as they are, strict, with float conversion.
    static member Default = { Remap = Some; Strict = true; ConvertDtype = true }

/// A key whose shape differs between module and file.
type ShapeMismatch = { Key: string; Expected: int64[]; Got: int64[] }

/// A key whose dtype differs and is not converted (conversion off, or not float to float).
type DtypeMismatch = { Key: string; Expected: torch.ScalarType; Got: torch.ScalarType }

/// A key whose values were converted from the file's dtype to the module's.
type DtypeConversion = { Key: string; From: torch.ScalarType; To: torch.ScalarType }

/// What `StateDict.loadInto` did. Keys are module keys except `Dropped` (file keys).
type LoadReport =
    { /// Module keys whose values were copied from the file.
      Loaded: string list
      /// Module keys that no (remapped) file key fills.
      Missing: string list
      /// Remapped file keys that the module does not have.
      Unexpected: string list
      /// Keys in both whose shapes differ (not copied).
      ShapeMismatched: ShapeMismatch list
      /// Keys in both whose dtypes differ and are not converted (not copied).
      DtypeMismatched: DtypeMismatch list
      /// File keys the remap function dropped.
      Dropped: string list
      /// Keys copied with a dtype conversion (also listed in Loaded).
      Converted: DtypeConversion list }
    /// True when every module key was loaded and every file key was used or dropped.
    member r.IsExact =
        r.Missing.IsEmpty && r.Unexpected.IsEmpty && r.ShapeMismatched.IsEmpty && r.DtypeMismatched.IsEmpty

/// Raised by a strict load; the message names every offending key, `Report` has them as data.
type StateDictMismatchException(message: string, report: LoadReport) =
    inherit InvalidOperationException(message)
    /// The report of the failed load (nothing was copied).
    member _.Report = report

/// Reading checkpoints of any supported format into ordered state dicts, loading them into modules, and
/// saving modules as safetensors. Reference: torch.nn.Module.load_state_dict, detectron2 Checkpointer.
[<RequireQualifiedAccess>]
module StateDict =
    let private bad (msg: string) = raise (InvalidDataException msg)

    /// The state dict inside a checkpoint tree: `root["state_dict"]`, `root["model"]` or `root` itself.
    let private findStateDict (root: PyValue) =
        match root with
        | PyValue.Dict _ ->
            let wrapped key =
                match root.TryItem key with
                | Some(PyValue.Dict _ as inner) -> Some inner
                | Some other -> bad $"the '{key}' entry is a {other.TypeName}, not a state dict (a pickled module object?)"
                | None -> None
            match wrapped "state_dict" with
            | Some inner -> inner
            | None -> defaultArg (wrapped "model") root
        | other -> bad $"the top-level object is a {other.TypeName}, not a dict of tensors"

    let private fromTree (path: string) (format: CheckpointFormat) (file: PthFile) =
        let converted = ResizeArray<IDisposable>()
        try
            let sd = OrderedDictionary<string, Tensor>()
            Pth.withPath path (fun () ->
                match findStateDict file.Root with
                | PyValue.Dict d ->
                    for (k, v) in d.Items do
                        match k, v with
                        | PyValue.Str key, PyValue.Tensor t -> sd[key] <- t
                        | PyValue.Str key, (PyValue.Object _ as o) ->
                            match Numpy.tryToTensor o with
                            | Some t ->
                                converted.Add t
                                sd[key] <- t
                            | None -> ()
                        | _ -> ()
                | _ -> ())
            new LoadedCheckpoint(path, format, sd, file.Root, Dictionary<string, string>(), (file :> IDisposable) :: List.ofSeq converted)
        with _ ->
            for c in converted do c.Dispose()
            (file :> IDisposable).Dispose()
            reraise ()

    let private looksLikeSafetensors (path: string) =
        path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)
        || (try
                use fs = File.OpenRead path
                let head = Array.zeroCreate<byte> 9
                fs.Read(head, 0, 9) = 9 && head[8] = byte '{' && head[0] <> 0x80uy && head[0] <> byte 'P'
            with _ -> false)

    /// Reads a checkpoint: torch.save zip or legacy, plain pickle (.pkl) or safetensors, told apart by
    /// content (and the .safetensors extension). Every tensor lands on the CPU with its original dtype.
    /// Missing files raise FileNotFoundException; malformed ones InvalidDataException naming the path.
    let load (path: string) : LoadedCheckpoint =
        if looksLikeSafetensors path then
            let st = Safetensors.read path
            new LoadedCheckpoint(path, CheckpointFormat.Safetensors, st.Tensors, PyValue.None, st.Metadata, [ st ])
        else
            let file = Pth.read path
            let format =
                match file.Format with
                | PthFormat.Zip -> CheckpointFormat.TorchZip
                | PthFormat.Legacy -> CheckpointFormat.TorchLegacy
                | PthFormat.Pickle -> CheckpointFormat.Pickle
            fromTree path format file

    let private describe (r: LoadReport) =
        let join (xs: string seq) = String.Join(", ", xs)
        [ if not r.Missing.IsEmpty then $"{r.Missing.Length} missing in the file ({join r.Missing})"
          if not r.Unexpected.IsEmpty then $"{r.Unexpected.Length} unexpected, not in the module ({join r.Unexpected})"
          if not r.ShapeMismatched.IsEmpty then
              let items = r.ShapeMismatched |> List.map (fun m -> $"{m.Key}: module {TensorData.showShape m.Expected}, file {TensorData.showShape m.Got}")
              $"{r.ShapeMismatched.Length} with another shape ({join items})"
          if not r.DtypeMismatched.IsEmpty then
              let items = r.DtypeMismatched |> List.map (fun m -> $"{m.Key}: module {m.Expected}, file {m.Got}")
              $"{r.DtypeMismatched.Length} with another dtype ({join items})" ]
        |> String.concat "; "

    let private loadCore (source: string) (options: LoadOptions) (tensors: KeyValuePair<string, Tensor> seq) (m: torch.nn.Module) =
        let target = m.state_dict()
        let fileKeyOf = Dictionary<string, string>()
        let dropped, unexpected = ResizeArray(), ResizeArray()
        let shapes, dtypes, converted = ResizeArray(), ResizeArray(), ResizeArray()
        let plan = ResizeArray<string * Tensor * Tensor>()
        for kv in tensors do
            match options.Remap kv.Key with
            | None -> dropped.Add kv.Key
            | Some key ->
                match fileKeyOf.TryGetValue key with
                | true, first -> invalidArg (nameof options) $"{source}: file keys '{first}' and '{kv.Key}' both map to '{key}'"
                | _ -> fileKeyOf[key] <- kv.Key
                let src = kv.Value
                match target.TryGetValue key with
                | false, _ -> unexpected.Add key
                | true, dst when dst.shape <> src.shape -> shapes.Add { ShapeMismatch.Key = key; Expected = dst.shape; Got = src.shape }
                | true, dst when dst.dtype = src.dtype -> plan.Add(key, src, dst)
                | true, dst when options.ConvertDtype && TensorData.isFloating dst.dtype && TensorData.isFloating src.dtype ->
                    converted.Add { DtypeConversion.Key = key; From = src.dtype; To = dst.dtype }
                    plan.Add(key, src, dst)
                | true, dst -> dtypes.Add { DtypeMismatch.Key = key; Expected = dst.dtype; Got = src.dtype }
        let report =
            { Loaded = [ for (k, _, _) in plan -> k ]
              Missing = [ for k in target.Keys do if not (fileKeyOf.ContainsKey k) then yield k ]
              Unexpected = List.ofSeq unexpected
              ShapeMismatched = List.ofSeq shapes
              DtypeMismatched = List.ofSeq dtypes
              Dropped = List.ofSeq dropped
              Converted = List.ofSeq converted }
        if options.Strict && not report.IsExact then
            raise (StateDictMismatchException($"{source}: state dict does not match the module: {describe report}", report))
        use _ = torch.no_grad()
        for (_, src, dst) in plan do dst.copy_(src) |> ignore
        report

    /// Copies `tensors` into the parameters and persistent buffers of `m`, in place and under no_grad, so
    /// the module keeps its device (and its dtype when `ConvertDtype` is on). Keys go through
    /// `options.Remap` first. A strict load that finds any missing, unexpected or mismatched key raises
    /// StateDictMismatchException naming all of them and changes nothing; a non-strict load copies what
    /// matches. Two file keys mapped to one module key raise ArgumentException.
    let loadInto (options: LoadOptions) (tensors: KeyValuePair<string, Tensor> seq) (m: torch.nn.Module) : LoadReport =
        loadCore "state dict" options tensors m

    /// `load path` then `loadInto`; messages name the file.
    let loadFileInto (options: LoadOptions) (path: string) (m: torch.nn.Module) : LoadReport =
        use ck = load path
        loadCore path options ck.StateDict m

    /// Saves the state dict of `m` (parameters and persistent buffers) as safetensors, atomically, with
    /// metadata {"format": "pt"} as the reference tools write.
    let save (path: string) (m: torch.nn.Module) =
        VctCheckpoint.write path None false [] [ for kv in m.state_dict () -> kv.Key, kv.Value ]
