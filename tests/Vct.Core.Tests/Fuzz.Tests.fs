module Vct.Core.Tests.FuzzTests

// The fuzz suite of issue #11: generated malformed WAV, PNG/JPEG, .npy, pickle, .pth (zip and legacy),
// safetensors and CSV inputs (Generators.fs) go through each reader with a time and a memory bound. The property:
// the reader returns a value or fails with a clean error (InvalidDataException, IOException or
// NotSupportedException) whose message names the file, within the bound.

open System
open System.IO
open System.Threading.Tasks
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Audio
open Vct.Core.Checkpoint
open Vct.Core.Data
open Vct.Core.Tests.Generators

/// Seconds one reader call may take.
let timeLimit = 10.0

/// Managed bytes one reader call may allocate on its thread: generous for inputs of a few KB, far below what a
/// forged size would make a reader allocate.
let memoryLimit (inputBytes: int) = 256L * 1024L * 1024L + 64L * int64 inputBytes

let private dir = lazy (Support.sessionDir "fuzz")

let private show (bytes: byte[]) =
    let head = Convert.ToBase64String(bytes[.. min bytes.Length 256 - 1])
    $"{bytes.Length} bytes, base64 of the first 256: {head}"

/// Runs `read` on `bytes` written to a fresh file `name`; fails unless it returns or throws a clean error naming
/// the file, within the time and memory bounds.
let check (name: string) (read: string -> unit) (bytes: byte[]) =
    let path = Path.Combine(dir.Value, $"{Guid.NewGuid():N}-{name}")
    File.WriteAllBytes(path, bytes)
    try
        let t =
            Task.Run(fun () ->
                let before = GC.GetAllocatedBytesForCurrentThread()
                let outcome = try Ok(read path) with e -> Error e
                outcome, GC.GetAllocatedBytesForCurrentThread() - before)
        if not (t.Wait(TimeSpan.FromSeconds timeLimit)) then failtest $"{name}: no result within {timeLimit} s ({show bytes})"
        let outcome, allocated = t.Result
        if allocated > memoryLimit bytes.Length then
            failtest $"{name}: allocated {allocated} bytes for a {bytes.Length}-byte input ({show bytes})"
        match outcome with
        | Ok() -> ()
        | Error e ->
            let clean =
                match e with
                | :? InvalidDataException | :? IOException | :? NotSupportedException -> true
                | _ -> false
            if not clean || not (e.Message.Contains path) then
                failtest $"{name}: not a clean error naming the file: {e.GetType().Name}: {e.Message}\n{e.StackTrace}\n({show bytes})"
    finally
        try File.Delete path with _ -> ()

/// Cases per property are multiplied by VCT_FUZZ_SCALE (default 1: the CI budget; e.g. 20 for a longer soak).
let private scale =
    match Int32.TryParse(Environment.GetEnvironmentVariable "VCT_FUZZ_SCALE") with
    | true, k when k > 0 -> k
    | _ -> 1

let private config n = { FsCheckConfig.defaultConfig with maxTest = n * scale }

let private prop (n: int) (title: string) (g: Gen<byte[]>) (name: string) (read: string -> unit) =
    testPropertyWithConfig (config n) title (Prop.forAll (Arb.fromGen g) (check name read))

let private golden (parts: string list) = Golden.path parts

// Valid seeds, made here or taken from the golden fixtures.
let private wavSeeds =
    lazy
        [| File.ReadAllBytes(golden [ "audio"; "bad"; "short_0.2s.wav" ])
           File.ReadAllBytes(golden [ "audio"; "wav"; "tones_16k_mono_pcm24.wav" ])[.. 4000]
           (let p = Path.Combine(dir.Value, "seed-float.wav")
            Wav.writeFloat32 p 16000 [| Array.init 64 (fun i -> float i / 64.0); Array.zeroCreate 64 |]
            File.ReadAllBytes p) |]

let private imageSeeds (ext: string) =
    [| for w, h, c in [ 4, 3, 3; 5, 5, 1; 16, 2, 3 ] ->
           let p = Path.Combine(dir.Value, $"seed-{w}x{h}x{c}{ext}")
           ImageIO.write p { Image.Create(w, h, c) with Pixels = Array.init (w * h * c) (fun i -> byte (i * 37)) }
           File.ReadAllBytes p |]

let private npySeeds =
    lazy
        [| (let p = Path.Combine(dir.Value, "seed.npy")
            NpyFile.writeFloat32 p [| 2L; 3L |] (Array.init 6 float32)
            File.ReadAllBytes p)
           (let p = Path.Combine(dir.Value, "seed-u8.npy")
            NpyFile.writeUInt8 p [| 5L |] [| 1uy; 2uy; 3uy; 4uy; 5uy |]
            File.ReadAllBytes p) |]

let private safetensorsSeed =
    lazy
        [| File.ReadAllBytes(golden [ "checkpoints"; "python_written.safetensors" ]) |]

let private readPth (path: string) = (Pth.read path :> IDisposable).Dispose()

let private readNpy (path: string) =
    let h = NpyFile.readHeader path
    if h.Count <= 1_000_000L then NpyFile.readFloat32 h 0L h.Count |> ignore

let private readNpyTensor (path: string) =
    use _ = torch.NewDisposeScope()
    Npy.read path |> ignore

/// A tiny S4 tree whose metadata CSV each case replaces; records must fail naming a file or stay inside the root.
let private csvTree =
    lazy
        (let root = Path.Combine(dir.Value, "tree")
         let rep = Synth.generate { SynthOptions.Default Subset.S4 with Seed = 1; Train = 1; Val = 1; Test = 0; Size = 32; EvalSize = 32 } root
         rep.Root)

let private readRecords (csvPath: string) =
    let root = csvTree.Value
    let csv = Path.Combine(root, "s4_meta_data.csv")
    File.Copy(csvPath, csv, true)
    let full = Path.GetFullPath root + string Path.DirectorySeparatorChar
    try
        for split in Avsbench.splits do
            for r in Avsbench.recordsWith Subset.S4 root DataTree.Auto split ignore do
                for p in Array.concat [ r.Frames; r.Masks; r.PreMasks; [| (match r.Audio with AudioSource.Wav p | AudioSource.LogMelPickle p -> p) |] ] do
                    if not ((Path.GetFullPath p).StartsWith full) then failtest $"{csvPath}: record {r.Id} reads {p}, outside {root}"
    with
    | :? AssertException -> reraise ()
    | e when e.Message.Contains csv ->
        // The error names the tree's CSV (the copy of the generated file): report it under the generated name.
        raise (InvalidDataException(e.Message.Replace(csv, csvPath), e))

/// Reads a generated label2idx.json as the AVSS class map of a folder that has only it and a metadata.csv.
let private readClassMap (jsonPath: string) =
    let root = Path.Combine(dir.Value, $"avss-{Guid.NewGuid():N}")
    Directory.CreateDirectory root |> ignore
    File.WriteAllText(Path.Combine(root, "metadata.csv"), "vid,uid,label,split\n")
    let target = Path.Combine(root, "label2idx.json")
    File.Copy(jsonPath, target)
    try Avsbench.avssClasses root |> ignore
    with e when e.Message.Contains target -> raise (InvalidDataException(e.Message.Replace(target, jsonPath), e))

[<Tests>]
let tests =
    testList "Fuzz" [
        prop 450 "WAV: mutated valid files" (Gen.delay (fun () -> mutated wavSeeds.Value)) "a.wav" (Audio.load >> ignore)
        prop 600 "WAV: forged chunk layouts" wav "b.wav" (Wav.read SampleScaling.Exact >> ignore)
        prop 300 "PNG: mutated valid files, RGB and labels" (Gen.delay (fun () -> mutated (imageSeeds ".png"))) "a.png" (fun p ->
            try ImageIO.readRgb p |> ignore
            finally ImageIO.readLabels p |> ignore)
        prop 450 "PNG: forged headers (huge, wrapping sizes; forged PLTE lengths)" forgedPng "b.png" (fun p ->
            try ImageIO.readRgb p |> ignore
            finally ImageIO.readLabels p |> ignore)
        prop 300 "JPEG: mutated valid files" (Gen.delay (fun () -> mutated (imageSeeds ".jpg"))) "a.jpg" (ImageIO.readRgb >> ignore)
        prop 300 ".npy: mutated valid files" (Gen.delay (fun () -> mutated npySeeds.Value)) "a.npy" readNpy
        prop 600 ".npy: forged headers (negative, huge, overflowing shapes)" npy "b.npy" readNpy
        prop 180 ".npy: forged headers, as tensors" npy "c.npy" readNpyTensor
        prop 900 "pickle: random opcode streams (lengths, nesting, memo)" pickle "a.pkl" readPth
        prop 300 "pickle: mutated golden pickles" (Gen.delay (fun () ->
            mutated [| for f in [ "values_p0.pkl"; "values_p2.pkl"; "values_p4.pkl"; "values_p5.pkl"; "detectron2_numpy.pkl" ] ->
                           File.ReadAllBytes(golden [ "checkpoints"; f ]) |])) "b.pkl" readPth
        prop 180 "log-mel pickle: mutated" (Gen.delay (fun () -> mutated [| File.ReadAllBytes(golden [ "audio"; "pkl"; "leaf_requires_grad.pkl" ]) |])) "c.pkl" (fun p ->
            use _ = torch.NewDisposeScope()
            LogMelPickle.readTensor p |> ignore)
        prop 450 ".pth zip: mutated (sizes in the zip directory, records, data.pkl)" (Gen.delay (fun () ->
            mutated [| File.ReadAllBytes(golden [ "checkpoints"; "state_dict_zip.pth" ]); File.ReadAllBytes(golden [ "checkpoints"; "gpu_saved.pth" ]) |])) "a.pth" readPth
        prop 300 ".pth zip: forged tensor storages, offsets, sizes and strides" pthZip "c.pth" readPth
        prop 450 ".pth legacy: mutated (storage sizes, pickles)" (Gen.delay (fun () ->
            mutated [| File.ReadAllBytes(golden [ "checkpoints"; "state_dict_legacy.pth" ]) |])) "b.pth" readPth
        prop 450 "safetensors: forged headers" safetensors "a.safetensors" (fun p -> (Safetensors.read p :> IDisposable).Dispose())
        prop 180 "safetensors: mutated valid file" (Gen.delay (fun () -> mutated safetensorsSeed.Value)) "b.safetensors" (fun p ->
            (Safetensors.read p :> IDisposable).Dispose())
        prop 300 "label2idx.json: class maps" (Gen.delay (fun () ->
            mutated [| Text.Encoding.UTF8.GetBytes "{\"background\": 0, \"dog\": 1, \"car\": 2}"; Text.Encoding.UTF8.GetBytes "[1, {\"a\": -1}]" |])) "label2idx.json" readClassMap
        prop 450 "CSV: parser" (s4Csv |> Gen.map Text.Encoding.UTF8.GetBytes) "a.csv" (Avsbench.readCsv >> ignore)
        prop 300 "CSV: dataset records never leave the root" (s4Csv |> Gen.map Text.Encoding.UTF8.GetBytes) "b.csv" readRecords
    ]
