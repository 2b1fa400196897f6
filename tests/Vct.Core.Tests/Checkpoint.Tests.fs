module Vct.Core.Tests.CheckpointTests

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint
open Vct.Core.Tests.Support
open Vct.Core.Tests.Generators

// ---------------------------------------------------------------------------------------------------
// Random state dicts (Generators.RandomStateDict)

let private config = { FsCheckConfig.defaultConfig with maxTest = 40; arbitrary = [ typeof<Generators.StateDicts> ] }

let private toTensor (s: TensorSpec) = TensorData.ofBytes s.Dtype s.Shape (ReadOnlySpan s.Bytes)

/// Same keys in the same order, and for each the same dtype, shape and raw bytes.
let private expectSame (what: string) (specs: TensorSpec list) (loaded: OrderedDictionary<string, Tensor>) =
    Expect.sequenceEqual loaded.Keys (specs |> List.map (fun s -> s.Name)) $"{what}: keys in order"
    for s in specs do
        let t = loaded[s.Name]
        Expect.equal t.dtype s.Dtype $"{what}: dtype of {s.Name}"
        Expect.equal t.shape s.Shape $"{what}: shape of {s.Name}"
        Expect.equal t.device_type DeviceType.CPU $"{what}: {s.Name} on the CPU"
        Expect.equal (TensorData.toBytes t) s.Bytes $"{what}: bytes of {s.Name}"

// ---------------------------------------------------------------------------------------------------
// Files

/// tests/golden/checkpoints.
let private goldenDir = lazy (Path.Combine(Golden.root.Value, "checkpoints"))

let private golden (name: string) = Path.Combine(goldenDir.Value, name)

/// Expected tensors of the fixture files, as PyTorch described them (expected.json).
type private Expected = { Dtype: torch.ScalarType; Shape: int64[]; Stride: int64[]; Offset: int64; Bytes: byte[] }

let private expectedOf (file: string) =
    use doc = JsonDocument.Parse(File.ReadAllText(golden "expected.json"))
    let dtypeOf =
        function
        | "float32" -> torch.ScalarType.Float32 | "float16" -> torch.ScalarType.Float16
        | "bfloat16" -> torch.ScalarType.BFloat16 | "float64" -> torch.ScalarType.Float64
        | "int64" -> torch.ScalarType.Int64 | "int32" -> torch.ScalarType.Int32
        | "int16" -> torch.ScalarType.Int16 | "int8" -> torch.ScalarType.Int8
        | "uint8" -> torch.ScalarType.Byte | "bool" -> torch.ScalarType.Bool
        | other -> failwith $"dtype {other} in expected.json"
    let ints (e: JsonElement) = [| for x in e.EnumerateArray() -> x.GetInt64() |]
    [ for p in doc.RootElement.GetProperty("files").GetProperty(file).EnumerateObject() ->
          p.Name,
          { Dtype = dtypeOf (p.Value.GetProperty("dtype").GetString())
            Shape = ints (p.Value.GetProperty "shape")
            Stride = ints (p.Value.GetProperty "stride")
            Offset = p.Value.GetProperty("offset").GetInt64()
            Bytes = Convert.FromHexString(p.Value.GetProperty("hex").GetString()) } ]

/// Every expected key is in the state dict with PyTorch's dtype, shape and bytes (and strides and
/// storage offset when `layout`), and the state dict has no other keys.
let private expectFixture (file: string) (layout: bool) (sd: OrderedDictionary<string, Tensor>) =
    let expected = expectedOf file
    Expect.sequenceEqual sd.Keys (List.map fst expected) $"{file}: keys in file order"
    for (key, e) in expected do
        let t = sd[key]
        Expect.equal t.dtype e.Dtype $"{file} {key}: dtype"
        Expect.equal t.shape e.Shape $"{file} {key}: shape"
        Expect.equal (TensorData.toBytes t) e.Bytes $"{file} {key}: bytes"
        if layout then
            Expect.equal (t.stride ()) e.Stride $"{file} {key}: stride"
            Expect.equal (t.storage_offset ()) e.Offset $"{file} {key}: storage offset"

/// Writing into `shared.base` must show through the slice and the transpose: one storage, as in PyTorch.
let private expectSharedStorage (file: string) (sd: OrderedDictionary<string, Tensor>) =
    let b, s, t = sd["shared.base"], sd["shared.slice"], sd["shared.transposed"]
    b[1L, 2L] <- torch.tensor(-100.0f)
    Expect.equal (s[0L, 0L].item<float32> ()) -100.0f $"{file}: the slice views the base storage"
    Expect.equal (t[2L, 1L].item<float32> ()) -100.0f $"{file}: the transpose views the base storage"

let private expectInvalid (path: string) (fragment: string) (f: unit -> unit) =
    let e = Expect.throwsC f id
    Expect.isTrue (e :? InvalidDataException) $"InvalidDataException expected, got {e.GetType().Name}: {e.Message}"
    Expect.stringContains e.Message path "the message names the file"
    Expect.stringContains (e.Message.ToLowerInvariant()) fragment "the message names the problem"

let private writeBytes (path: string) (bytes: byte[]) =
    File.WriteAllBytes(path, bytes)
    path

/// A safetensors file with the given raw header text and `dataLen` zero bytes of data.
let private rawSafetensors (path: string) (header: string) (dataLen: int) =
    let h = Text.Encoding.UTF8.GetBytes header
    writeBytes path (Array.concat [ BitConverter.GetBytes(int64 h.Length); h; Array.zeroCreate dataLen ])

// ---------------------------------------------------------------------------------------------------
// A small module: Linear + LayerNorm + a persistent buffer.

type TinyNet() as this =
    inherit torch.nn.Module<Tensor, Tensor>("TinyNet")
    let proj = torch.nn.Linear(3L, 4L)
    let norm = torch.nn.LayerNorm([| 4L |])
    let scale = torch.ones(4L)
    do this.RegisterComponents()
    member _.Scale = scale
    override _.forward(x) = norm.call (proj.call x) * scale

let private tinyKeys = [ "proj.weight"; "proj.bias"; "norm.weight"; "norm.bias"; "scale" ]

/// A state dict for TinyNet with values unlike the defaults: key -> arange-based tensor.
let private tinyState () =
    let sd = OrderedDictionary<string, Tensor>()
    sd["proj.weight"] <- torch.arange(12.0f.ToScalar()).reshape(4L, 3L) / 10.0f.ToScalar()
    sd["proj.bias"] <- torch.tensor([| -1.0f; 2.0f; -3.0f; 4.0f |])
    sd["norm.weight"] <- torch.tensor([| 0.5f; 1.5f; 2.5f; 3.5f |])
    sd["norm.bias"] <- torch.tensor([| 0.25f; 0.0f; -0.25f; 1.0f |])
    sd["scale"] <- torch.tensor([| 2.0f; 3.0f; 4.0f; 5.0f |])
    sd

/// Same dtype, shape and raw bytes.
let private same (a: Tensor) (b: Tensor) =
    a.dtype = b.dtype && a.shape = b.shape && TensorData.toBytes a = TensorData.toBytes b

[<Tests>]
let tests =
    testList "Checkpoint" [
        // ---- properties ------------------------------------------------------------------------------
        testPropertyWithConfig config "safetensors: random state dicts and metadata survive write and read bit-exactly" <|
            fun (RandomStateDict specs) (meta: (NonNull<string> * NonNull<string>) list) ->
                use _ = torch.NewDisposeScope()
                use tmp = new TempDir("vct-ckpt")
                let dir = tmp.Path
                let path = Path.Combine(dir, "random.safetensors")
                let metadata = Dictionary<string, string>()
                for (NonNull k, NonNull v) in meta do metadata[k] <- v
                Safetensors.write path metadata [ for s in specs -> s.Name, toTensor s ]
                use back = Safetensors.read path
                expectSame "safetensors" specs back.Tensors
                Expect.sequenceEqual (back.Metadata |> Seq.sortBy (fun kv -> kv.Key)) (metadata |> Seq.sortBy (fun kv -> kv.Key)) "metadata"

        testPropertyWithConfig config ".pth: random state dicts written by TorchSharp.PyBridge read back bit-exactly" <|
            fun (RandomStateDict specs) ->
                use _ = torch.NewDisposeScope()
                use tmp = new TempDir("vct-ckpt")
                let dir = tmp.Path
                let path = Path.Combine(dir, "random.pth")
                let sd = Dictionary<string, Tensor>()
                for s in specs do sd[s.Name] <- toTensor s
                TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(path, sd)
                use back = StateDict.load path
                Expect.equal back.Format CheckpointFormat.TorchZip "zip format"
                expectSame ".pth" specs back.StateDict

        testPropertyWithConfig config "safetensors written by us read back with TorchSharp.PyBridge's reader" <|
            fun (RandomStateDict specs) ->
                use _ = torch.NewDisposeScope()
                use tmp = new TempDir("vct-ckpt")
                let dir = tmp.Path
                let path = Path.Combine(dir, "ours.safetensors")
                Safetensors.write path (Dictionary()) [ for s in specs -> s.Name, toTensor s ]
                let theirs = TorchSharp.PyBridge.Safetensors.LoadStateDict(path, null)
                Expect.equal theirs.Count specs.Length "count"
                for s in specs do
                    Expect.equal theirs[s.Name].shape s.Shape $"shape of {s.Name}"
                    Expect.equal (TensorData.toBytes theirs[s.Name]) s.Bytes $"bytes of {s.Name}"

        // ---- files written by PyTorch ----------------------------------------------------------------
        test "zip-format state dict from PyTorch: dtypes, values, strides and offsets" {
            use ck = StateDict.load (golden "state_dict_zip.pth")
            Expect.equal ck.Format CheckpointFormat.TorchZip "format"
            expectFixture "state_dict_zip.pth" true ck.StateDict
            expectSharedStorage "state_dict_zip.pth" ck.StateDict
        }

        test "legacy-format state dict from PyTorch: dtypes, values, strides and offsets" {
            use ck = StateDict.load (golden "state_dict_legacy.pth")
            Expect.equal ck.Format CheckpointFormat.TorchLegacy "format"
            expectFixture "state_dict_legacy.pth" true ck.StateDict
            expectSharedStorage "state_dict_legacy.pth" ck.StateDict
        }

        test "a file whose storages are located on 'cuda:0' loads onto the CPU" {
            let pkl =
                use zip = Compression.ZipFile.OpenRead(golden "gpu_saved.pth")
                let e = zip.Entries |> Seq.find (fun e -> e.Name = "data.pkl")
                use r = new StreamReader(e.Open(), Text.Encoding.Latin1)
                r.ReadToEnd()
            Expect.stringContains pkl "cuda:0" "the fixture really names a GPU location"
            use ck = StateDict.load (golden "gpu_saved.pth")
            expectFixture "gpu_saved.pth" true ck.StateDict
            for kv in ck.StateDict do Expect.equal kv.Value.device_type DeviceType.CPU $"{kv.Key} on the CPU"
        }

        test "detectron2 checkpoint: the model state dict, iteration, optimizer and numpy extras" {
            use ck = StateDict.load (golden "detectron2.pth")
            expectFixture "detectron2.pth" false ck.StateDict
            Expect.equal (ck.Root.TryItem "iteration") (Some(PyValue.Int 123L)) "iteration"
            match ck.Root.TryItem "optimizer" |> Option.bind (fun o -> o.TryItem "param_groups") with
            | Some(PyValue.List groups) ->
                Expect.equal (groups[0].TryItem "lr") (Some(PyValue.Float 0.01)) "lr"
                Expect.equal (groups[0].TryItem "momentum") (Some(PyValue.Float 0.9)) "momentum"
            | other -> failtest $"optimizer.param_groups: {other}"
            match ck.Root.TryItem "optimizer" |> Option.bind (fun o -> o.TryItem "state") with
            | Some(PyValue.Dict state) ->
                Expect.equal state.Count 4 "momentum buffers of 4 parameters"
                match state.TryFind(PyValue.Int 0L) |> Option.bind (fun s -> s.TryItem "momentum_buffer") with
                | Some(PyValue.Tensor t) -> Expect.equal t.shape [| 2L; 3L |] "buffer of the Linear weight"
                | other -> failtest $"optimizer.state[0].momentum_buffer: {other}"
            | other -> failtest $"optimizer.state: {other}"
            Expect.equal (ck.Root.TryItem "scheduler" |> Option.bind (fun s -> s.TryItem "step_size")) (Some(PyValue.Int 10L)) "scheduler"
            use extra = (ck.Root.TryItem "extra" |> Option.bind Numpy.tryToTensor).Value
            Expect.equal extra.shape [| 2L; 3L |] "numpy array shape"
            Expect.isTrue (same extra (torch.arange(6.0f.ToScalar()).reshape(2L, 3L))) "numpy array values"
            use scalar = (ck.Root.TryItem "np_scalar" |> Option.bind Numpy.tryToTensor).Value
            Expect.equal (scalar.item<float32> ()) 1.5f "numpy scalar"
        }

        test "a {\"state_dict\": ...} wrapper is unwrapped; other entries stay in Root" {
            use ck = StateDict.load (golden "wrapped_state_dict.pth")
            expectFixture "wrapped_state_dict.pth" true ck.StateDict
            Expect.equal (ck.Root.TryItem "epoch") (Some(PyValue.Int 3L)) "epoch"
        }

        test "a pickled module object instead of a state dict is rejected, naming the class" {
            let path = golden "whole_module.pth"
            expectInvalid path "not a state dict" (fun () -> StateDict.load path |> ignore)
            let e = Expect.throwsC (fun () -> StateDict.load path |> ignore) id
            Expect.stringContains e.Message "torch.nn.modules.linear.Linear" "names the pickled class"
        }

        test "detectron2 model-zoo .pkl of numpy arrays (C and Fortran order)" {
            use ck = StateDict.load (golden "detectron2_numpy.pkl")
            Expect.equal ck.Format CheckpointFormat.Pickle "plain pickle"
            expectFixture "detectron2_numpy.pkl" false ck.StateDict
            Expect.equal (ck.Root.TryItem "__author__") (Some(PyValue.Str "vct fixtures")) "other entries stay readable"
        }

        testList "pickle protocols 0, 2, 4 and 5 give the same values" [
            for protocol in [ 0; 2; 4; 5 ] ->
                test $"protocol {protocol}" {
                    use ck = StateDict.load (golden $"values_p{protocol}.pkl")
                    Expect.equal ck.Format CheckpointFormat.Pickle "plain pickle"
                    Expect.sequenceEqual ck.StateDict.Keys [ "w"; "i" ] "numpy state dict"
                    Expect.isTrue (same ck.StateDict["w"] (torch.arange(6.0f.ToScalar()).reshape(3L, 2L) / 4.0f.ToScalar())) "w"
                    Expect.isTrue (same ck.StateDict["i"] (torch.tensor([| -1L; 2L |]).reshape(1L, 2L))) "i"
                    let item key = (ck.Root.TryItem key).Value
                    let big = Numerics.BigInteger.Pow(2I, 70)
                    let ints = [ PyValue.Int 0L; PyValue.Int -1L; PyValue.Int 255L; PyValue.Int 65536L
                                 PyValue.Int -2147483648L; PyValue.Int(1L <<< 40); PyValue.BigInt big; PyValue.BigInt -big ]
                    match item "ints" with
                    | PyValue.List xs -> Expect.sequenceEqual xs ints "ints"
                    | other -> failtest $"ints: {other}"
                    Expect.equal (item "float") (PyValue.Float -2.5) "float"
                    Expect.equal (item "text") (PyValue.Str "größe ✓") "text"
                    Expect.equal (item "blob") (PyValue.Bytes [| 0uy; 255uy; 97uy; 98uy |]) "bytes"
                    match item "nested" with
                    | PyValue.Tuple [| PyValue.Int 1L; PyValue.Tuple [| PyValue.Float 2.0; PyValue.None |]; PyValue.List flags |] ->
                        Expect.sequenceEqual flags [ PyValue.Bool true; PyValue.Bool false ] "bools"
                    | other -> failtest $"nested: {other}"
                    match item "tags" with
                    | PyValue.Set xs -> Expect.sequenceEqual xs [ PyValue.Str "a" ] "set"
                    | other -> failtest $"tags: {other}"
                }
        ]

        test "a recursive list/tuple pickled by Python in protocols 0, 1 and 2" {
            // l = []; t = (l, 5); l.append(t); pickle.dumps([t, 'x'], protocol) from CPython 3.11.
            let pickles =
                [ "(lp0\n((lp1\n(g1\nI5\ntp2\naI5\n000g2\naVx\np3\na."
                  "]q\x00((]q\x01(h\x01K\x05tq\x02aK\x051h\x02X\x01\x00\x00\x00xq\x03e."
                  "\x80\x02]q\x00(]q\x01h\x01K\x05\x86q\x02aK\x0500h\x02X\x01\x00\x00\x00xq\x03e." ]
                |> List.map Text.Encoding.Latin1.GetBytes
            for (protocol, bytes) in List.zip [ 0; 1; 2 ] pickles do
                use ms = new MemoryStream(bytes)
                match Pickle.load Pickle.noHooks ms with
                | PyValue.List outer ->
                    Expect.equal outer.Count 2 $"protocol {protocol}: two items"
                    Expect.equal outer[1] (PyValue.Str "x") $"protocol {protocol}: 'x'"
                    match outer[0] with
                    | PyValue.Tuple [| PyValue.List l; PyValue.Int 5L |] ->
                        Expect.equal l.Count 1 $"protocol {protocol}: l holds one item"
                        match l[0] with
                        | PyValue.Tuple [| PyValue.List l2; _ |] -> Expect.isTrue (obj.ReferenceEquals(l, l2)) $"protocol {protocol}: l contains t"
                        | other -> failtest $"protocol {protocol}: l[0] = {other}"
                    | other -> failtest $"protocol {protocol}: t = {other}"
                | other -> failtest $"protocol {protocol}: {other}"
                Expect.equal ms.Position ms.Length $"protocol {protocol}: read up to STOP"
        }

        test "safetensors written by Python: every dtype and the metadata" {
            use ck = StateDict.load (golden "python_written.safetensors")
            Expect.equal ck.Format CheckpointFormat.Safetensors "format"
            expectFixture "python_written.safetensors" false ck.StateDict
            Expect.equal (ck.Metadata |> Seq.map (fun kv -> kv.Key, kv.Value) |> List.ofSeq)
                [ "format", "pt"; "source", "vct fixtures" ] "metadata"
        }

        test "zip and legacy files written by PyTorch hold the same tensors" {
            use a = StateDict.load (golden "state_dict_zip.pth")
            use b = StateDict.load (golden "state_dict_legacy.pth")
            for kv in a.StateDict do
                Expect.equal (TensorData.toBytes b.StateDict[kv.Key]) (TensorData.toBytes kv.Value) kv.Key
        }

        // ---- safetensors writing ---------------------------------------------------------------------
        test "writing over a larger file leaves no stale bytes and no temporary file" {
            use _ = torch.NewDisposeScope()
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let path = Path.Combine(dir, "w.safetensors")
            Safetensors.write path (Dictionary()) [ "big", torch.zeros(1000L) ]
            let bigLength = FileInfo(path).Length
            Safetensors.write path (Dictionary()) [ "small", torch.arange(3.0f.ToScalar()) ]
            let bytes = File.ReadAllBytes path
            let headerLength = BitConverter.ToInt64(bytes, 0)
            Expect.isLessThan bytes.LongLength bigLength "shorter than before"
            Expect.equal bytes.LongLength (8L + headerLength + 12L) "header plus 3 floats, nothing more"
            use back = Safetensors.read path
            Expect.sequenceEqual back.Tensors.Keys [ "small" ] "only the new tensor"
            Expect.equal (Directory.GetFiles dir) [| path |] "no temporary file left"
        }

        test "a write that fails part-way keeps the old file" {
            use _ = torch.NewDisposeScope()
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let path = Path.Combine(dir, "keep.safetensors")
            Safetensors.write path (readOnlyDict [ "v", "1" ]) [ "old", torch.arange(5.0f.ToScalar()) ]
            let before = File.ReadAllBytes path
            // A meta tensor has a shape (so the header is written) but no data to copy: the data write fails.
            let meta = torch.empty([| 4L |], device = torch.META)
            Expect.throws (fun () -> Safetensors.write path (Dictionary()) [ "ok", torch.ones(2L); "no-data", meta ]) "write fails"
            Expect.equal (File.ReadAllBytes path) before "old file untouched"
            Expect.equal (Directory.GetFiles dir) [| path |] "no temporary file left"
        }

        test "the writer pads the header to 8 bytes and stores tensors contiguous, in order" {
            use _ = torch.NewDisposeScope()
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let path = Path.Combine(dir, "layout.safetensors")
            let t = torch.arange(6L.ToScalar(), dtype = torch.ScalarType.Int16).reshape(2L, 3L).t() // not contiguous
            Safetensors.write path (Dictionary()) [ "b", t; "a", torch.tensor([| true; false |]) ]
            let bytes = File.ReadAllBytes path
            let n = int (BitConverter.ToInt64(bytes, 0))
            Expect.equal (n % 8) 0 "header length is a multiple of 8"
            use doc = JsonDocument.Parse(Text.Encoding.UTF8.GetString(bytes, 8, n))
            Expect.sequenceEqual [ for p in doc.RootElement.EnumerateObject() -> p.Name ] [ "b"; "a" ] "given order"
            let data = bytes[8 + n ..]
            // [[0,1,2],[3,4,5]].T row-major = 0 3 1 4 2 5 as int16 LE, then two bools.
            Expect.equal data [| 0uy; 0uy; 3uy; 0uy; 1uy; 0uy; 4uy; 0uy; 2uy; 0uy; 5uy; 0uy; 1uy; 0uy |] "data bytes"
        }

        // ---- loading into a module -------------------------------------------------------------------
        test "loadInto copies every tensor into the existing parameters and buffers" {
            use _ = torch.NewDisposeScope()
            use net = new TinyNet()
            let before = net.state_dict()
            let sd = tinyState ()
            let report = StateDict.loadInto LoadOptions.Default sd net
            Expect.equal report.Loaded tinyKeys "all loaded"
            Expect.isTrue report.IsExact "exact"
            let after = net.state_dict()
            for k in tinyKeys do
                Expect.isTrue (obj.ReferenceEquals(before[k], after[k])) $"{k}: the same tensor object, filled in place"
                Expect.isTrue (same after[k] sd[k]) $"{k}: values"
            Expect.isTrue (after["proj.weight"].requires_grad) "parameters still require grad"
            Expect.isTrue (same net.Scale sd["scale"]) "the buffer field sees the values"
        }

        test "the report lists loaded, missing, unexpected, mismatched, dropped and converted keys" {
            use _ = torch.NewDisposeScope()
            use net = new TinyNet()
            let original = net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> dict
            let sd = OrderedDictionary<string, Tensor>()
            sd["model.proj.weight"] <- torch.zeros(4L, 2L)                      // shape mismatch
            sd["model.proj.bias"] <- torch.tensor([| 1.0f; 2.0f; 3.0f; 4.0f |])
            sd["model.norm.weight"] <- torch.tensor([| 1.5f; 2.5f; 3.5f; 4.5f |]).to_type(torch.ScalarType.Float16)
            sd["model.extra.weight"] <- torch.ones(2L)                          // unexpected
            sd["aux.loss_weight"] <- torch.ones(1L)                             // dropped
            sd["model.scale"] <- torch.tensor([| 1L; 2L; 3L; 4L |])             // int64 into a float buffer
            // norm.bias is missing
            let remap (k: string) = if k.StartsWith "aux." then None else Some(k.Substring "model.".Length)
            let options = { LoadOptions.Default with Remap = remap; Strict = false }
            let report = StateDict.loadInto options sd net
            Expect.equal report.Loaded [ "proj.bias"; "norm.weight" ] "loaded"
            Expect.equal report.Missing [ "norm.bias" ] "missing"
            Expect.equal report.Unexpected [ "extra.weight" ] "unexpected"
            Expect.equal report.ShapeMismatched [ { Key = "proj.weight"; Expected = [| 4L; 3L |]; Got = [| 4L; 2L |] } ] "shape"
            Expect.equal report.DtypeMismatched
                [ { Key = "scale"; Expected = torch.ScalarType.Float32; Got = torch.ScalarType.Int64 } ] "dtype"
            Expect.equal report.Dropped [ "aux.loss_weight" ] "dropped"
            Expect.equal report.Converted
                [ { Key = "norm.weight"; From = torch.ScalarType.Float16; To = torch.ScalarType.Float32 } ] "converted"
            Expect.isFalse report.IsExact "not exact"
            let now = net.state_dict()
            Expect.isTrue (same now["proj.bias"] sd["model.proj.bias"]) "matching key copied"
            Expect.isTrue (same now["proj.weight"] original["proj.weight"]) "mismatched key untouched"
            Expect.isTrue (same now["scale"] original["scale"]) "dtype-mismatched key untouched"
            Expect.isTrue (same now["norm.bias"] original["norm.bias"]) "missing key untouched"
        }

        test "strict mode fails naming every offending key and changes nothing" {
            use _ = torch.NewDisposeScope()
            use net = new TinyNet()
            let original = net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> dict
            let sd = tinyState ()
            sd.Remove "norm.bias" |> ignore
            sd.Remove "scale" |> ignore
            sd["proj.weight"] <- torch.zeros(3L, 4L)
            sd["proj.bias"] <- torch.zeros([| 4L |], dtype = torch.ScalarType.Int32)
            sd["decoder.query_feat.weight"] <- torch.zeros(2L)
            let e = Expect.throwsC (fun () -> StateDict.loadInto LoadOptions.Default sd net |> ignore) id
            Expect.isTrue (e :? StateDictMismatchException) $"StateDictMismatchException, got {e.GetType().Name}"
            for key in [ "norm.bias"; "scale"; "proj.weight"; "proj.bias"; "decoder.query_feat.weight" ] do
                Expect.stringContains e.Message key $"names {key}"
            Expect.stringContains e.Message "[4x3]" "shows the module's shape"
            let r = (e :?> StateDictMismatchException).Report
            Expect.equal r.Missing [ "norm.bias"; "scale" ] "report: missing"
            for kv in net.state_dict() do
                Expect.isTrue (same kv.Value original[kv.Key]) $"{kv.Key} unchanged by the failed load"
        }

        test "fp16 and bf16 entries convert to the module's float32; without conversion they mismatch" {
            use _ = torch.NewDisposeScope()
            use net = new TinyNet()
            let sd = tinyState ()
            let source = OrderedDictionary<string, Tensor>()
            for kv in sd do
                source[kv.Key] <- (if kv.Key.StartsWith "proj" then kv.Value.to_type(torch.ScalarType.Float16) else kv.Value.to_type(torch.ScalarType.BFloat16))
            let report = StateDict.loadInto LoadOptions.Default source net
            Expect.equal (report.Converted |> List.map (fun c -> c.Key)) tinyKeys "all converted"
            for kv in net.state_dict() do
                Expect.equal kv.Value.dtype torch.ScalarType.Float32 $"{kv.Key} stays float32"
                Expect.isTrue (same kv.Value (source[kv.Key].to_type(torch.ScalarType.Float32))) $"{kv.Key} holds the converted values"
            use other = new TinyNet()
            let strictNoConvert = { LoadOptions.Default with ConvertDtype = false }
            let e = Expect.throwsC (fun () -> StateDict.loadInto strictNoConvert source other |> ignore) id
            Expect.stringContains e.Message "Float16" "names the file dtype"
        }

        test "two file keys mapped onto one module key are rejected" {
            use _ = torch.NewDisposeScope()
            use net = new TinyNet()
            let sd = tinyState ()
            sd["copy.scale"] <- torch.ones(4L)
            let remap (k: string) = Some(if k = "copy.scale" then "scale" else k)
            Expect.throwsT<ArgumentException> (fun () -> StateDict.loadInto { LoadOptions.Default with Remap = remap } sd net |> ignore) "collision"
        }

        test "save then loadFileInto restores a module, through safetensors" {
            use _ = torch.NewDisposeScope()
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            use source = new TinyNet()
            StateDict.loadInto LoadOptions.Default (tinyState ()) source |> ignore
            let path = Path.Combine(dir, "tiny.safetensors")
            StateDict.save path source
            use target = new TinyNet()
            let report = StateDict.loadFileInto LoadOptions.Default path target
            Expect.equal report.Loaded tinyKeys "all loaded"
            let x = torch.arange(6.0f.ToScalar()).reshape(2L, 3L)
            Expect.isTrue (same (target.call x) (source.call x)) "same outputs"
            use ck = StateDict.load path
            Expect.equal (ck.Metadata |> Seq.map (fun kv -> kv.Key, kv.Value) |> List.ofSeq) [ "format", "pt" ] "metadata"
        }

        test "a PyTorch detectron2 checkpoint loads into a matching module with a remap" {
            use _ = torch.NewDisposeScope()
            use net =
                torch.nn.Sequential(
                    struct ("0", torch.nn.Linear(3L, 2L) :> torch.nn.Module<Tensor, Tensor>),
                    struct ("1", torch.nn.LayerNorm([| 2L |]) :> torch.nn.Module<Tensor, Tensor>))
            let report = StateDict.loadFileInto LoadOptions.Default (golden "detectron2.pth") net
            Expect.equal report.Loaded [ "0.weight"; "0.bias"; "1.weight"; "1.bias" ] "all loaded"
            use ck = StateDict.load (golden "detectron2.pth")
            for kv in net.state_dict() do Expect.isTrue (same kv.Value ck.StateDict[kv.Key]) kv.Key
        }

        // ---- bad input -------------------------------------------------------------------------------
        test "a missing file raises FileNotFoundException naming it" {
            let path = Path.Combine(Path.GetTempPath(), $"no-such-{Guid.NewGuid():N}.pth")
            let e = Expect.throwsC (fun () -> StateDict.load path |> ignore) id
            Expect.isTrue (e :? FileNotFoundException) "FileNotFoundException"
            Expect.stringContains e.Message path "names the file"
        }

        test "empty, text, truncated zip and truncated legacy files give clear errors" {
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let empty = writeBytes (Path.Combine(dir, "empty.pth")) [||]
            expectInvalid empty "empty" (fun () -> StateDict.load empty |> ignore)
            let text = writeBytes (Path.Combine(dir, "notes.pth")) (Text.Encoding.ASCII.GetBytes "model weights go here\n")
            expectInvalid text "not a pytorch checkpoint" (fun () -> StateDict.load text |> ignore)
            let paren = writeBytes (Path.Combine(dir, "paren.pth")) (Text.Encoding.ASCII.GetBytes "(looks like a pickle, is not)\n")
            expectInvalid paren "not a pytorch checkpoint" (fun () -> StateDict.load paren |> ignore)
            let zip = File.ReadAllBytes(golden "state_dict_zip.pth")
            let cutZip = writeBytes (Path.Combine(dir, "cut-zip.pth")) zip[.. zip.Length / 2]
            expectInvalid cutZip "truncated" (fun () -> StateDict.load cutZip |> ignore)
            let legacy = File.ReadAllBytes(golden "state_dict_legacy.pth")
            // Cut inside the main pickle, and inside the raw storage data at the end.
            for cut in [ 300; legacy.Length - 10 ] do
                let path = writeBytes (Path.Combine(dir, $"cut-legacy-{cut}.pth")) legacy[.. cut - 1]
                expectInvalid path "truncated" (fun () -> StateDict.load path |> ignore)
        }

        test "a zip whose storage record is shorter than the pickle says is rejected" {
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let path = Path.Combine(dir, "short-record.pth")
            File.Copy(golden "state_dict_zip.pth", path)
            let emptyFirstRecord () =
                use zip = Compression.ZipFile.Open(path, Compression.ZipArchiveMode.Update)
                let e = zip.Entries |> Seq.find (fun e -> e.FullName.EndsWith "/data/0")
                let name = e.FullName
                e.Delete()
                zip.CreateEntry(name).Open().Dispose()
            emptyFirstRecord ()
            expectInvalid path "storage record" (fun () -> StateDict.load path |> ignore)
        }

        test "safetensors headers that lie are rejected before any data is read" {
            use tmp = new TempDir("vct-ckpt")
            let dir = tmp.Path
            let past = rawSafetensors (Path.Combine(dir, "past.safetensors")) """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""" 8
            expectInvalid past "past the end" (fun () -> StateDict.load past |> ignore)
            let size = rawSafetensors (Path.Combine(dir, "size.safetensors")) """{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}""" 16
            expectInvalid size "needs 16" (fun () -> StateDict.load size |> ignore)
            let overlap =
                rawSafetensors (Path.Combine(dir, "overlap.safetensors"))
                    """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""" 12
            expectInvalid overlap "overlap" (fun () -> StateDict.load overlap |> ignore)
            let notJson = rawSafetensors (Path.Combine(dir, "notjson.safetensors")) "{this is not json}" 0
            expectInvalid notJson "not valid json" (fun () -> StateDict.load notJson |> ignore)
            let dtype = rawSafetensors (Path.Combine(dir, "dtype.safetensors")) """{"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}""" 1
            expectInvalid dtype "unsupported dtype" (fun () -> StateDict.load dtype |> ignore)
            let huge = writeBytes (Path.Combine(dir, "huge.safetensors")) (Array.append (BitConverter.GetBytes 1_000_000L) "{}"B)
            expectInvalid huge "header length" (fun () -> StateDict.load huge |> ignore)
        }

        test "NaN and infinity are data like any other" {
            use ck = StateDict.load (golden "state_dict_zip.pth")
            let b = ck.StateDict["backbone.layers.0.bias"]
            Expect.isTrue (Single.IsNaN(b[3L].item<float32> ())) "NaN kept"
            Expect.isTrue (Single.IsPositiveInfinity(b[2L].item<float32> ())) "inf kept"
            Expect.isTrue (Single.IsNegative(b[1L].item<float32> ())) "-0.0 kept"
        }
    ]
