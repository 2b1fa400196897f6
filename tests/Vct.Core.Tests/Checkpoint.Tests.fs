/// Tests of src/Vct.Core/Checkpoint: the .pth (zip and legacy), pickle, numpy and safetensors readers and writers,
/// loading into modules, the weights hub; the hardening and fuzz cases of these readers.
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

/// Checkpoint/Hub.fs: downloads into the cache (resume, checks, offline use) against a loopback HTTP server.
module HubTests =
    open System
    open System.Collections.Concurrent
    open System.IO
    open System.Net
    open System.Net.Sockets
    open System.Security.Cryptography
    open System.Text
    open System.Threading
    open Expecto
    open Vct.Core.Checkpoint
    open Vct.Core.Tests.Support

    /// A request the loopback server saw: path, Range and If-Range headers.
    type Seen = { Path: string; Range: string option; IfRange: string option }

    /// A minimal HTTP/1.1 server on 127.0.0.1 (one request per connection). It honours `Range: bytes=N-`, answers 404
    /// for unknown paths, sends a strong ETag (honouring If-Range) and can cut a response in the middle (Content-Length sent, half the body, then close), refuse
    /// ranges (200 with the whole body) or accept a request and never answer.
    type Loopback() =
        let listener = new TcpListener(IPAddress.Loopback, 0)
        let files = ConcurrentDictionary<string, byte[]>()
        let seen = ConcurrentQueue<Seen>()
        let stop = new CancellationTokenSource()
        let mutable cutNext = 0
        do listener.Start()
        let port = (listener.LocalEndpoint :?> IPEndPoint).Port

        let readHead (s: NetworkStream) =
            let sb = StringBuilder()
            let one = Array.zeroCreate<byte> 1
            while not (sb.ToString().EndsWith "\r\n\r\n") && s.Read(one, 0, 1) = 1 do
                sb.Append(char one[0]) |> ignore
            sb.ToString()

        let respond (client: TcpClient) (this: Loopback) =
            use client = client
            let s = client.GetStream()
            let head = readHead s
            let lines = head.Split("\r\n", StringSplitOptions.RemoveEmptyEntries)
            if lines.Length > 0 then
                let path = lines[0].Split(' ')[1]
                let header (name: string) =
                    lines |> Array.tryPick (fun l ->
                        let i = l.IndexOf ':'
                        if i > 0 && l.Substring(0, i).Trim().Equals(name, StringComparison.OrdinalIgnoreCase) then Some(l.Substring(i + 1).Trim())
                        else None)
                let range = header "Range"
                let ifRange = header "If-Range"
                seen.Enqueue { Path = path; Range = range; IfRange = ifRange }
                let send (status: string) (headers: (string * string) list) (body: byte[]) (count: int) =
                    let h = StringBuilder($"HTTP/1.1 {status}\r\nConnection: close\r\n")
                    for (k, v) in headers do h.Append($"{k}: {v}\r\n") |> ignore
                    h.Append("\r\n") |> ignore
                    let hb = Encoding.ASCII.GetBytes(h.ToString())
                    s.Write(hb, 0, hb.Length)
                    s.Write(body, 0, count)
                    s.Flush()
                if this.Silent then Thread.Sleep 5000
                else
                    match files.TryGetValue path with
                    | false, _ ->
                        let body = Encoding.ASCII.GetBytes "not found"
                        send "404 Not Found" [ "Content-Length", string body.Length ] body body.Length
                    | true, data ->
                        let etag = "\"" + Convert.ToHexStringLower(SHA256.HashData data).Substring(0, 16) + "\""
                        let from =
                            match range with
                            | Some r when not this.IgnoreRange && r.StartsWith "bytes=" && r.EndsWith "-" && (ifRange.IsNone || ifRange = Some etag) ->
                                Some(int64 (r.Substring(6, r.Length - 7)))
                            | _ -> None
                        let cut =
                            lock files (fun () ->
                                let c = cutNext > 0
                                if c then cutNext <- cutNext - 1
                                c)
                        match from with
                        | Some f when f >= int64 data.Length ->
                            send "416 Range Not Satisfiable" [ "Content-Range", $"bytes */{data.Length}"; "Content-Length", "0" ] [||] 0
                        | Some f ->
                            let body = data[int f ..]
                            let count = if cut then body.Length / 2 else body.Length
                            send "206 Partial Content" [ "ETag", etag; "Content-Range", $"bytes {f}-{data.Length - 1}/{data.Length}"; "Content-Length", string body.Length ] body count
                        | None ->
                            let count = if cut then data.Length / 2 else data.Length
                            send "200 OK" [ "ETag", etag; "Content-Length", string data.Length; "Accept-Ranges", "bytes" ] data count

        member val IgnoreRange = false with get, set
        member val Silent = false with get, set
        /// Cut the next n responses after half their body.
        member _.CutNext(n: int) = cutNext <- n
        member _.Port = port
        member _.Base = $"http://127.0.0.1:{port}"
        member this.Url(path: string) = this.Base + path
        member _.Serve(path: string, data: byte[]) = files[path] <- data
        member _.Seen = seen.ToArray() |> List.ofArray
        member this.Start() =
            let loop () =
                try
                    while not stop.IsCancellationRequested do
                        let c = listener.AcceptTcpClient()
                        ThreadPool.QueueUserWorkItem(fun _ -> try respond c this with _ -> ()) |> ignore
                with _ -> ()
            Thread(loop, IsBackground = true, Name = "loopback-http").Start()
            this
        interface IDisposable with
            member _.Dispose() =
                stop.Cancel()
                listener.Stop()

    let private randomBytes (n: int) (seed: int) =
        let b = Array.zeroCreate<byte> n
        Random(seed).NextBytes b
        b

    let private sha (b: byte[]) = Convert.ToHexStringLower(SHA256.HashData b)

    /// A temporary cache folder, deleted afterwards.
    let private tempCache () = new TempDir("vct-hub")

    let private settings (cache: TempDir) (server: Loopback) =
        { CacheRoot = cache.Path; Offline = false; HfEndpoint = server.Base; Timeout = TimeSpan.FromSeconds 10.0 }

    let private resolve (s: HubSettings) (reference: string) = Hub.resolveWith s None ignore CancellationToken.None reference

    /// The exception `f` throws (an Expecto failure when it throws none).
    let private errorOf (f: unit -> 'a) : exn =
        let r = try Choice1Of2(f ()) with e -> Choice2Of2 e
        match r with
        | Choice1Of2 _ -> failtest "expected an error, got a result"
        | Choice2Of2 e -> e

    let private setup () =
        let server = (new Loopback()).Start()
        let cache = tempCache ()
        let data = randomBytes 20000 7
        server.Serve("/files/model.pth", data)
        server, cache, data

    [<Tests>]
    let tests =
        testList "Hub" [
            test "a plain download lands in the cache with a sha256 sidecar" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                let path = resolve s url
                Expect.equal path (Path.Combine(cache.Path, $"127.0.0.1_{server.Port}", "files", "model.pth")) "layout: host_port / URL path"
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                Expect.equal (File.ReadAllText(path + ".sha256")) $"{sha data}  model.pth\n" "sidecar in sha256sum format"
                Expect.isFalse (File.Exists(path + ".part")) "no .part left"
                Expect.equal server.Seen [ { Path = "/files/model.pth"; Range = None; IfRange = None } ] "one plain request"
                // Reuse: no second request.
                Expect.equal (resolve s url) path "same path"
                Expect.equal server.Seen.Length 1 "cached file reused without the network"
            }

            test "an hf: reference goes to {endpoint}/{owner}/{repo}/resolve/main/{path}" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                server.Serve("/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth", data)
                let path = resolve (settings cache server) "hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth"
                Expect.equal (server.Seen |> List.map _.Path) [ "/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth" ] "mapped path"
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                Expect.equal (Hub.hfUrl "https://huggingface.co" "hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth")
                    "https://huggingface.co/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth" "default endpoint"
                let bad = errorOf (fun () -> Hub.hfUrl "https://huggingface.co" "hf:owner/file.pth")
                Expect.stringContains bad.Message "hf:owner/repo/path" "a short reference is explained"
            }

            test "catalogue names resolve through the endpoint; the README's blob link becomes the file" {
                let names = Hub.catalogue |> List.map _.Name
                Expect.equal names [ "s4"; "ms3"; "avss"; "swin-b-22k"; "vggish" ] "names"
                let s = { CacheRoot = Path.GetTempPath(); Offline = true; HfEndpoint = "http://127.0.0.1:9"; Timeout = TimeSpan.FromSeconds 1.0 }
                Expect.equal (Hub.tryUrl s "avss") (Some "http://127.0.0.1:9/nowherespyfly/VCT_AVS/resolve/main/ss_swinb_384/model_best.pth") "avss"
                Expect.equal (Hub.tryUrl s "https://huggingface.co/nowherespyfly/VCT_AVS/blob/main/ms3_swinb_384/model_best.pth")
                    (Some "https://huggingface.co/nowherespyfly/VCT_AVS/resolve/main/ms3_swinb_384/model_best.pth") "blob -> resolve"
                Expect.equal (Hub.tryUrl s "vggish") (Some "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth") "vggish"
            }

            test "a .part holding the first half resumes with Range: bytes=<half>-" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                let target = Hub.cachePath s url
                Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
                File.WriteAllBytes(target + ".part", data[.. 9999])
                let path = resolve s url
                Expect.equal server.Seen [ { Path = "/files/model.pth"; Range = Some "bytes=10000-"; IfRange = None } ] "range request"
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                Expect.equal (File.ReadAllText(path + ".sha256")).[.. 63] (sha data) "sha of the whole file"
            }

            test "a transfer cut in the middle fails clearly, keeps the .part, and the next call resumes" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                let target = Hub.cachePath s url
                server.CutNext 1
                let e = errorOf (fun () -> resolve s url)
                Expect.isTrue (e :? IOException) $"an IOException, got {e.GetType().Name}"
                Expect.stringContains e.Message url "names the URL"
                Expect.stringContains e.Message "partial download is kept" "says the part is kept"
                Expect.stringContains e.Message "resumes" "says it resumes"
                Expect.stringContains e.Message "curl" "says how to get it by hand"
                Expect.isFalse (File.Exists target) "nothing in place"
                let kept = FileInfo(target + ".part").Length
                Expect.isGreaterThan kept 0L "part holds what arrived"
                Expect.isLessThan kept (int64 data.Length) "part is partial"
                let path = resolve s url
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes after the resume"
                Expect.equal (server.Seen |> List.map _.Range) [ None; Some $"bytes={kept}-" ] "second request resumes where the part ends"
                Expect.isSome server.Seen[1].IfRange "the resume is conditional on the first response's ETag"
                Expect.isFalse (File.Exists(target + ".part.validator")) "validator removed"
            }

            test "a file changed at the source between attempts restarts instead of mixing (If-Range)" {
                let server, cache, _ = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                server.CutNext 1
                errorOf (fun () -> resolve s url) |> ignore
                let changed = randomBytes 30000 11
                server.Serve("/files/model.pth", changed)
                let path = resolve s url
                Expect.sequenceEqual (File.ReadAllBytes path) changed "the new file, whole"
                Expect.stringStarts (File.ReadAllText(path + ".sha256")) (sha changed) "its sha"
            }

            test "a cut resumed response is also caught, and a third call completes" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                server.CutNext 2
                errorOf (fun () -> resolve s url) |> ignore
                errorOf (fun () -> resolve s url) |> ignore
                Expect.sequenceEqual (File.ReadAllBytes(resolve s url)) data "bytes"
                Expect.equal server.Seen.Length 3 "three requests"
            }

            test "404 names the status and the URL and caches nothing" {
                let server, cache, _ = setup ()
                use _ = server
                use _ = cache
                let url = server.Url "/files/missing.pth"
                let e = errorOf (fun () -> resolve (settings cache server) url)
                Expect.stringContains e.Message "404" "status"
                Expect.stringContains e.Message url "URL"
                Expect.isEmpty cache.Files "nothing in the cache"
            }

            test "a wrong expected sha256 names both hashes and leaves no file" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let url = server.Url "/files/model.pth"
                let wrong = String('0', 64)
                let e = errorOf (fun () -> Hub.resolveWith (settings cache server) (Some wrong) ignore CancellationToken.None url)
                Expect.isTrue (e :? InvalidDataException) "InvalidDataException"
                Expect.stringContains e.Message wrong "expected hash"
                Expect.stringContains e.Message (sha data) "actual hash"
                Expect.stringContains e.Message url "URL"
                Expect.isEmpty cache.Files "no file, part or sidecar"
                // The right one is accepted (upper case too).
                let path = Hub.resolveWith (settings cache server) (Some((sha data).ToUpperInvariant())) ignore CancellationToken.None url
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
            }

            test "a cached file that no longer matches its sidecar is an error naming it" {
                let server, cache, _ = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                let path = resolve s url
                let bytes = File.ReadAllBytes path
                bytes[100] <- bytes[100] ^^^ 0xFFuy
                File.WriteAllBytes(path, bytes)
                let e = errorOf (fun () -> resolve s url)
                Expect.stringContains e.Message path "names the file"
                Expect.stringContains e.Message "delete" "says to delete it"
                Expect.equal server.Seen.Length 1 "no new request"
                File.Delete path
                File.Delete(path + ".sha256")
                Expect.isTrue (File.Exists(resolve s url)) "downloads again once deleted"
            }

            test "a file put into the cache by hand is used and gets a sidecar" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let s = { settings cache server with Offline = true }
                let url = server.Url "/files/model.pth"
                let target = Hub.cachePath s url
                Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
                File.WriteAllBytes(target, data)
                Expect.equal (resolve s url) target "used"
                Expect.stringStarts (File.ReadAllText(target + ".sha256")) (sha data) "sidecar written"
                Expect.isEmpty server.Seen "no request"
            }

            test "VCT_OFFLINE with a cache miss names the URL and the cache path and sends nothing" {
                let server, cache, _ = setup ()
                use _ = server
                use _ = cache
                let s = { settings cache server with Offline = true }
                let url = server.Url "/files/model.pth"
                let e = errorOf (fun () -> resolve s url)
                Expect.stringContains e.Message url "URL"
                Expect.stringContains e.Message (Hub.cachePath s url) "where to put the file"
                Expect.stringContains e.Message "VCT_OFFLINE" "why"
                Expect.isEmpty server.Seen "no request"
                Expect.isEmpty cache.Files "nothing written"
            }

            test "VCT_OFFLINE with a cache hit uses the file without a request" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let url = server.Url "/files/model.pth"
                let path = resolve (settings cache server) url
                let again = resolve { settings cache server with Offline = true } url
                Expect.equal again path "same file"
                Expect.sequenceEqual (File.ReadAllBytes again) data "bytes"
                Expect.equal server.Seen.Length 1 "only the first (online) request"
            }

            test "a server that ignores Range (200) restarts the file from zero" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                server.IgnoreRange <- true
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                let target = Hub.cachePath s url
                Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
                File.WriteAllBytes(target + ".part", randomBytes 5000 99) // not even the right bytes
                let path = resolve s url
                Expect.equal (server.Seen |> List.map _.Range) [ Some "bytes=5000-" ] "asked to resume"
                Expect.sequenceEqual (File.ReadAllBytes path) data "whole file, not appended"
            }

            test "416 on a .part that is already complete finishes without new bytes" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let s = settings cache server
                let url = server.Url "/files/model.pth"
                let target = Hub.cachePath s url
                Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
                File.WriteAllBytes(target + ".part", data)
                let path = resolve s url
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                Expect.equal (server.Seen |> List.map _.Range) [ Some $"bytes={data.Length}-" ] "one range request"
                // A .part longer than the file: 416 with another length restarts from zero.
                File.Delete path
                File.WriteAllBytes(target + ".part", Array.append data data)
                Expect.sequenceEqual (File.ReadAllBytes(resolve s url)) data "restarted"
            }

            test "an unreachable host (a closed port) gives one clear message" {
                use cache = tempCache ()
                let closed =
                    let l = new TcpListener(IPAddress.Loopback, 0)
                    l.Start()
                    let p = (l.LocalEndpoint :?> IPEndPoint).Port
                    l.Stop()
                    p
                let url = $"http://127.0.0.1:{closed}/files/model.pth"
                let s = { CacheRoot = cache.Path; Offline = false; HfEndpoint = "http://127.0.0.1:1"; Timeout = TimeSpan.FromSeconds 5.0 }
                let e = errorOf (fun () -> resolve s url)
                Expect.isTrue (e :? IOException) "IOException"
                Expect.stringContains e.Message url "URL"
                Expect.stringContains e.Message "download failed" "what"
                Expect.stringContains e.Message "by hand" "how to get it by hand"
                Expect.isFalse (e.Message.Contains "\n") "one line"
            }

            test "a server that never answers times out with a clear message" {
                let server, cache, _ = setup ()
                use _ = server
                use _ = cache
                server.Silent <- true
                let s = { settings cache server with Timeout = TimeSpan.FromSeconds 0.5 }
                let url = server.Url "/files/model.pth"
                let e = errorOf (fun () -> resolve s url)
                Expect.stringContains e.Message url "URL"
                Expect.stringContains e.Message "no answer within 0.5 s" "timeout"
            }

            test "local paths are themselves; a missing one that is no reference is named" {
                use cache = tempCache ()
                let s = { CacheRoot = cache.Path; Offline = true; HfEndpoint = "http://127.0.0.1:1"; Timeout = TimeSpan.FromSeconds 1.0 }
                let f = Path.Combine(cache.Path, "local.pth")
                File.WriteAllBytes(f, [| 1uy; 2uy |])
                Expect.equal (resolve s f) f "existing file"
                let missing = Path.Combine(cache.Path, "nope.pth")
                let e = errorOf (fun () -> resolve s missing)
                Expect.isTrue (e :? FileNotFoundException) "FileNotFoundException"
                Expect.stringContains e.Message missing "names it"
                Expect.stringContains e.Message "vct weights list" "points at the catalogue"
                let bad = errorOf (fun () -> Hub.resolveWith s (Some(String('0', 64))) ignore CancellationToken.None f)
                Expect.stringContains bad.Message f "expected sha256 checked on local files too"
            }

            test "cache paths stay under the root whatever the URL" {
                let s = { CacheRoot = Path.Combine(Path.GetTempPath(), "vct-root"); Offline = true; HfEndpoint = "http://x"; Timeout = TimeSpan.FromSeconds 1.0 }
                let root = Path.GetFullPath s.CacheRoot
                for url in [ "http://h/a/%2E%2E/%2E%2E/etc/passwd"; "http://h/..%2F..%2Fx"; "http://h/"; "http://h/a/b?x=1"; "https://h:8443/C:%5Cwin" ] do
                    let p = Hub.cachePath s url
                    Expect.stringStarts p (root + string Path.DirectorySeparatorChar) $"{url} -> {p}"
                    Expect.isFalse (p.Substring(root.Length).Split(Path.DirectorySeparatorChar) |> Array.contains "..") $"no .. in {p}"
                Expect.notEqual (Hub.cachePath s "http://h/f.pth?v=1") (Hub.cachePath s "http://h/f.pth?v=2") "queries kept apart"
                Expect.stringEnds (Hub.cachePath s "http://h/f.pth?v=1") ".pth" "extension kept"
            }

            test "settings from the environment: VCT_CACHE, XDG_CACHE_HOME, VCT_OFFLINE, VCT_HF_ENDPOINT, VCT_HTTP_TIMEOUT" {
                let lookup (pairs: (string * string) list) = fun name -> pairs |> List.tryFind (fst >> (=) name) |> Option.map snd
                let tmp = Path.GetTempPath()
                let a =
                    HubSettings.fromLookup (
                        lookup [ ("VCT_CACHE", Path.Combine(tmp, "c")); ("VCT_OFFLINE", "1"); ("VCT_HF_ENDPOINT", "http://127.0.0.1:5/"); ("VCT_HTTP_TIMEOUT", "2.5") ])
                Expect.equal a { CacheRoot = Path.Combine(tmp, "c"); Offline = true; HfEndpoint = "http://127.0.0.1:5"; Timeout = TimeSpan.FromSeconds 2.5 } "all set"
                let b = HubSettings.fromLookup (lookup [ "XDG_CACHE_HOME", Path.Combine(tmp, "xdg") ])
                if not (OperatingSystem.IsWindows()) then Expect.equal b.CacheRoot (Path.Combine(tmp, "xdg", "vct")) "XDG"
                Expect.equal b.HfEndpoint "https://huggingface.co" "default endpoint"
                Expect.isFalse b.Offline "online by default"
                Expect.equal b.Timeout (TimeSpan.FromSeconds 60.0) "default timeout"
                let c = HubSettings.fromLookup (lookup [])
                if OperatingSystem.IsLinux() then
                    Expect.equal c.CacheRoot (Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache", "vct")) "~/.cache/vct"
                Expect.stringContains (errorOf (fun () -> HubSettings.fromLookup (lookup [ "VCT_OFFLINE", "maybe" ]))).Message "VCT_OFFLINE" "bad VCT_OFFLINE named"
                Expect.stringContains (errorOf (fun () -> HubSettings.fromLookup (lookup [ "VCT_HF_ENDPOINT", "ftp://x" ]))).Message "VCT_HF_ENDPOINT" "bad endpoint named"
                // The real environment is read without error (whatever it holds here).
                Expect.isNotEmpty (HubSettings.fromEnvironment ()).CacheRoot "fromEnvironment"
            }

            test "the C# facade: records only, subset of released names, progress reports" {
                let cat = Vct.VctWeights.Catalogue
                Expect.equal (cat |> Seq.map _.Name |> List.ofSeq) [ "s4"; "ms3"; "avss"; "swin-b-22k"; "vggish" ] "names"
                Expect.equal (Vct.VctWeights.SubsetOf "ms3") (System.Nullable Vct.VctSubset.MS3) "subset"
                Expect.isFalse (Vct.VctWeights.SubsetOf "vggish").HasValue "not a checkpoint"
                let publicTypes = [ typeof<Vct.WeightsEntry>; typeof<Vct.DownloadProgress> ]
                for t in publicTypes do
                    for p in t.GetProperties() do
                        Expect.isFalse (p.PropertyType.Namespace = "Microsoft.FSharp.Core" || p.PropertyType.Namespace = "Microsoft.FSharp.Collections")
                            $"{t.Name}.{p.Name} is no F# type"
                // Resolve reads the environment: set it for this test only (the tests run one at a time) and restore it.
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                let saved = [ for k in [ "VCT_CACHE"; "VCT_OFFLINE"; "VCT_HF_ENDPOINT" ] -> k, Environment.GetEnvironmentVariable k ]
                try
                    Environment.SetEnvironmentVariable("VCT_CACHE", cache.Path)
                    Environment.SetEnvironmentVariable("VCT_OFFLINE", null)
                    Environment.SetEnvironmentVariable("VCT_HF_ENDPOINT", server.Base)
                    let reports = ResizeArray<Vct.DownloadProgress>()
                    server.Serve("/nowherespyfly/VCT_AVS/resolve/main/ms3_swinb_384/model_best.pth", data)
                    let path = Vct.VctWeights.Resolve("ms3", Vct.SyncProgress<Vct.DownloadProgress>(Action<Vct.DownloadProgress>(reports.Add)), Threading.CancellationToken.None)
                    Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                    Expect.isNonEmpty reports "progress reported"
                    let last = reports[reports.Count - 1]
                    Expect.equal (last.BytesDone, last.TotalBytes) (int64 data.Length, Nullable(int64 data.Length)) "last report: all bytes of the total"
                    Expect.equal (Vct.VctWeights.Catalogue |> Seq.find (fun e -> e.Name = "ms3")).CachedPath path "listed as cached"
                finally
                    for k, v in saved do Environment.SetEnvironmentVariable(k, v)
            }

            test "Inference.loadModel and VctSegmenter.Load resolve through the hub" {
                use cache = tempCache ()
                let saved = [ for k in [ "VCT_CACHE"; "VCT_OFFLINE" ] -> k, Environment.GetEnvironmentVariable k ]
                try
                    Environment.SetEnvironmentVariable("VCT_CACHE", cache.Path)
                    Environment.SetEnvironmentVariable("VCT_OFFLINE", "1")
                    let expectOffline (what: string) (f: unit -> unit) =
                        let e = errorOf f
                        Expect.stringContains e.Message "VCT_OFFLINE" $"{what}: went to the hub"
                        Expect.stringContains e.Message "s4_swinb_384/model_best.pth" $"{what}: the released file's URL"
                    expectOffline "loadModel" (fun () -> Vct.Core.Inference.loadModel "s4" None TorchSharp.torch.CPU |> ignore)
                    expectOffline "VctSegmenter.Load" (fun () -> Vct.VctSegmenter.Load("hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth") |> ignore)
                finally
                    for k, v in saved do Environment.SetEnvironmentVariable(k, v)
            }

            test "vct weights list prints the catalogue; vct weights get URL prints the cached path" {
                let server, cache, data = setup ()
                use _ = server
                use _ = cache
                cliDll () |> ignore
                let run (args: string list) (offline: bool) =
                    let psi = cliStartInfo args
                    psi.Environment["VCT_CACHE"] <- cache.Path
                    psi.Environment["VCT_HF_ENDPOINT"] <- server.Base
                    if offline then psi.Environment["VCT_OFFLINE"] <- "1" else psi.Environment.Remove "VCT_OFFLINE" |> ignore
                    runProcess psi
                let code, out, err = run [ "weights"; "list" ] false
                Expect.equal code 0 $"list exit code; stderr: {err}"
                for name in [ "s4"; "ms3"; "avss"; "swin-b-22k"; "vggish"; "swin_base_patch4_window12_384_22k.pth"; "vggish-10086976.pth"; "--swin-weights" ] do
                    Expect.stringContains out name $"lists {name}"
                Expect.stringContains out $"{server.Base}/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth" "source URL under the endpoint"
                let url = server.Url "/files/model.pth"
                let code, out, err = run [ "weights"; "get"; url ] false
                Expect.equal code 0 $"get exit code; stderr: {err}"
                let path = out.Trim()
                Expect.equal path (Path.Combine(cache.Path, $"127.0.0.1_{server.Port}", "files", "model.pth")) "prints the cached path"
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                let code, _, err = run [ "weights"; "get"; server.Url "/files/other.pth" ] true
                Expect.equal code 1 "offline miss fails"
                Expect.stringContains err "VCT_OFFLINE" "says why"
                Expect.isFalse (err.Contains "   at ") "no stack trace"
            }
        ]

/// Regression tests of the readers (issue #11): crafted files whose declared sizes lie.
module HardeningTests =
    open System
    open System.IO
    open System.Text
    open Expecto
    open Vct.Core.Audio
    open Vct.Core.Checkpoint
    open Vct.Core.Tests.Support
    open Vct.Core.Tests.Crafted

    [<Tests>]
    let tests =
        testList "Hardening" [
            // --- Pickle: deep nesting neither hashes nor compares recursively ----------------------------------------
            test "a 1 MB pickle whose dict key is a tuple nested 1,000,000 deep loads (no stack overflow)" {
                use tmp = new TempDir("vct-harden")
                let path = crafted tmp "deep.pkl" (deepTuplePickle 1_000_000 1)
                Expect.isGreaterThan (FileInfo(path).Length) 1_000_000L "over 1 MB"
                use f = within 60 "Pth.read" (fun () -> Pth.read path)
                Expect.equal f.Format PthFormat.Pickle "a plain pickle"
                match f.Root with
                | PyValue.Dict d -> Expect.equal d.Count 1 "one key"
                | other -> failtest $"a dict expected, got {other.TypeName}"
            }

            test "two equal deeply nested tuple keys are one key (iterative equality)" {
                use tmp = new TempDir("vct-harden")
                let path = crafted tmp "deep2.pkl" (deepTuplePickle 300_000 2)
                use f = within 60 "Pth.read" (fun () -> Pth.read path)
                match f.Root with
                | PyValue.Dict d -> Expect.equal d.Count 1 "equal keys"
                | other -> failtest $"a dict expected, got {other.TypeName}"
                let e = throwsWithin 60 "LogMelPickle.read" (fun () -> LogMelPickle.read path |> ignore)
                Expect.equal e.Message $"{path}: the pickle holds a dict, not a tensor" "exact message"
            }

            // --- Checkpoints and .npy: declared sizes are checked against the bytes there are before allocating ----
            test "a 7-byte pickle declaring a 2 GB bytes object fails without allocating it" {
                use tmp = new TempDir("vct-harden")
                let bytes = Array.concat [ [| 0x80uy; 2uy; byte 'B' |]; BitConverter.GetBytes 0x7FFFFF00u ]
                let path = crafted tmp "big_bytes.pkl" bytes
                let e = throwsWithin 20 "Pth.read" (fun () -> (Pth.read path :> IDisposable).Dispose())
                Expect.equal e.Message $"{path}: pickle: a length of 2147483392 bytes, but only 0 remain (truncated file?) (at byte 7)" "exact message"
                let allocated = within 20 "Pth.read" (fun () -> allocatedBy (fun () -> (Pth.read path :> IDisposable).Dispose()))
                Expect.isLessThan allocated 50_000_000L "nothing near the declared size was allocated"
            }

            test "a legacy .pth whose storage claims 2^28 floats with no data fails before allocating the storage" {
                use tmp = new TempDir("vct-harden")
                let path = crafted tmp "legacy.pth" (legacyPthClaiming (1L <<< 28))
                let e = throwsWithin 20 "Pth.read" (fun () -> (Pth.read path :> IDisposable).Dispose())
                Expect.equal e.Message $"{path}: a storage of 268435456 x Float32 (1073741824 bytes) but only 0 bytes remain (truncated file?)" "exact message"
                use f = within 20 "Pth.read" (fun () -> Pth.read (crafted tmp "legacy_ok.pth" (Array.append (legacyPthClaiming 2L) (Array.zeroCreate 8))))
                Expect.equal f.Format PthFormat.Legacy "the same file with its 8 bytes of data reads"
            }

            test "a zip .pth whose directory declares a 2 GB record from 16 stored bytes is refused" {
                use tmp = new TempDir("vct-harden")
                let path = Path.Combine(tmp.Folder "zip", "forged.pth")
                do
                    use zip = new Compression.ZipArchive(File.Create path, Compression.ZipArchiveMode.Create)
                    let add (name: string) (data: byte[]) =
                        use s = zip.CreateEntry(name, Compression.CompressionLevel.NoCompression).Open()
                        s.Write(data, 0, data.Length)
                    let pid =
                        Array.concat
                            [ [| 0x80uy; 2uy; byte '(' |]; shortUnicode "storage"; Encoding.ASCII.GetBytes "ctorch\nFloatStorage\n"
                              shortUnicode "0"; shortUnicode "cpu"; [| byte 'K'; 4uy; byte 't'; byte 'Q'; byte '.' |] ]
                    add "archive/data.pkl" pid
                    add "archive/data/0" (Array.zeroCreate 16)
                let bytes = File.ReadAllBytes path
                // The central directory entry of archive/data/0: signature PK\1\2, uncompressed size at offset 24.
                let name = Encoding.ASCII.GetBytes "archive/data/0"
                let cd =
                    [ 0 .. bytes.Length - 46 ]
                    |> List.find (fun i -> bytes[i] = 0x50uy && bytes[i + 1] = 0x4Buy && bytes[i + 2] = 1uy && bytes[i + 3] = 2uy
                                           && bytes.AsSpan(i + 46, name.Length).SequenceEqual(ReadOnlySpan name))
                BitConverter.GetBytes(0x7FFFFFFFu).CopyTo(bytes, cd + 24)
                File.WriteAllBytes(path, bytes)
                let e = throwsWithin 20 "Pth.read" (fun () -> (Pth.read path :> IDisposable).Dispose())
                Expect.equal e.Message $"{path}: zip record archive/data/0 declares 2147483647 bytes from 16 compressed bytes (corrupt or forged archive)" "exact message"
            }

            test ".npy shapes whose element count overflows 64 bits are refused (a wrapped product used to pass)" {
                use tmp = new TempDir("vct-harden")
                let npyWith (descr: string) (shape: string) =
                    let header = $"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n"
                    Array.concat [ [| 0x93uy |]; Encoding.ASCII.GetBytes "NUMPY"; [| 1uy; 0uy |]; BitConverter.GetBytes(uint16 header.Length); Encoding.ASCII.GetBytes header ]
                let path = crafted tmp "wrap.npy" (npyWith "<f4" "(4611686018427387904, 4)")
                let e = throwsWithin 20 "readHeader" (fun () -> NpyFile.readHeader path |> ignore)
                Expect.equal e.Message $"{path}: not a readable .npy file (shape (4611686018427387904,4) is too large)" "exact message"
                let path = crafted tmp "zero.npy" (npyWith "<f4" "(0, 4611686018427387904, 4)")
                let e = throwsWithin 20 "Npy.read" (fun () -> Npy.read path |> ignore)
                Expect.equal e.Message $"{path}: not a readable .npy file (shape (0,4611686018427387904,4) is too large)" "no elements, but strides that overflow"
                let path = crafted tmp "neg.npy" (npyWith "<f8" "(-1, 3)")
                let e = throwsWithin 20 "Npy.read" (fun () -> Npy.read path |> ignore)
                Expect.equal e.Message $"{path}: not a readable .npy file (bad shape entry '-1')" "exact message"
                let path = crafted tmp "hlen.npy" (Array.concat [ [| 0x93uy |]; Encoding.ASCII.GetBytes "NUMPY"; [| 2uy; 0uy |]; BitConverter.GetBytes 0x7FFFFFFFu; Encoding.ASCII.GetBytes "{}" ])
                let e = throwsWithin 20 "readHeader" (fun () -> NpyFile.readHeader path |> ignore)
                Expect.equal e.Message $"{path}: not a readable .npy file (truncated header)" "a 2 GB header length in a 14-byte file (12 + hlen used to wrap)"
                let path = crafted tmp "noquote.npy" (Array.concat [ [| 0x93uy |]; Encoding.ASCII.GetBytes "NUMPY"; [| 1uy; 0uy; 16uy; 0uy |]; Encoding.ASCII.GetBytes "{'descr': <f4 }\n" ])
                let e = throwsWithin 20 "readHeader" (fun () -> NpyFile.readHeader path |> ignore)
                Expect.equal e.Message $"{path}: not a readable .npy file (the 'descr' value is not a quoted string)" "exact message"
            }
        ]

/// Generated malformed .npy, pickle, .pth and safetensors files (Generators.fs) through the readers.
module FuzzTests =
    open System
    open System.IO
    open Expecto
    open FsCheck.FSharp
    open Vct.Core.Checkpoint
    open Vct.Core.Tests.Generators

    let private golden (parts: string list) = Golden.path parts

    let private npySeeds =
        lazy
            [| (let p = Path.Combine(fuzzDir.Value, "seed.npy")
                NpyFile.writeFloat32 p [| 2L; 3L |] (Array.init 6 float32)
                File.ReadAllBytes p)
               (let p = Path.Combine(fuzzDir.Value, "seed-u8.npy")
                NpyFile.writeUInt8 p [| 5L |] [| 1uy; 2uy; 3uy; 4uy; 5uy |]
                File.ReadAllBytes p) |]

    let private safetensorsSeed =
        lazy
            [| File.ReadAllBytes(golden [ "checkpoints"; "python_written.safetensors" ]) |]

    let private readPth (path: string) = (Pth.read path :> IDisposable).Dispose()

    let private readNpy (path: string) =
        let h = NpyFile.readHeader path
        if h.Count <= 1_000_000L then NpyFile.readFloat32 h 0L h.Count |> ignore

    [<Tests>]
    let tests =
        testList "Fuzz" [
            prop 300 ".npy: mutated valid files" (Gen.delay (fun () -> mutated npySeeds.Value)) "a.npy" readNpy
            prop 600 ".npy: forged headers (negative, huge, overflowing shapes)" npy "b.npy" readNpy
            prop 900 "pickle: random opcode streams (lengths, nesting, memo)" pickle "a.pkl" readPth
            prop 300 "pickle: mutated golden pickles" (Gen.delay (fun () ->
                mutated [| for f in [ "values_p0.pkl"; "values_p2.pkl"; "values_p4.pkl"; "values_p5.pkl"; "detectron2_numpy.pkl" ] ->
                               File.ReadAllBytes(golden [ "checkpoints"; f ]) |])) "b.pkl" readPth
            prop 450 ".pth zip: mutated (sizes in the zip directory, records, data.pkl)" (Gen.delay (fun () ->
                mutated [| File.ReadAllBytes(golden [ "checkpoints"; "state_dict_zip.pth" ]); File.ReadAllBytes(golden [ "checkpoints"; "gpu_saved.pth" ]) |])) "a.pth" readPth
            prop 300 ".pth zip: forged tensor storages, offsets, sizes and strides" pthZip "c.pth" readPth
            prop 450 ".pth legacy: mutated (storage sizes, pickles)" (Gen.delay (fun () ->
                mutated [| File.ReadAllBytes(golden [ "checkpoints"; "state_dict_legacy.pth" ]) |])) "b.pth" readPth
            prop 450 "safetensors: forged headers" safetensors "a.safetensors" (fun p -> (Safetensors.read p :> IDisposable).Dispose())
            prop 180 "safetensors: mutated valid file" (Gen.delay (fun () -> mutated safetensorsSeed.Value)) "b.safetensors" (fun p ->
                (Safetensors.read p :> IDisposable).Dispose())
        ]
