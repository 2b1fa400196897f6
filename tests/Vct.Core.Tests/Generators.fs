/// The FsCheck generators of the test suite. Mostly malformed inputs for the `Fuzz` lists: mutations of valid
/// seed files (truncations, byte flips, "interesting" integers written over lengths, insertions) and structured
/// forgeries of each format (huge declared sizes, wrapped integers, deep nesting, negative shapes); then random
/// state dicts (checkpoint round trips) and cost matrices (the Hungarian solver).
module Vct.Core.Tests.Generators

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Threading.Tasks
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Vct.Core.Checkpoint

/// Integers that break size arithmetic: 0, 1, around 2^7/2^8/2^15/2^16/2^31/2^32/2^63, negative values.
let interesting32 : uint32[] =
    [| 0u; 1u; 2u; 3u; 7u; 8u; 16u; 127u; 128u; 255u; 256u; 32767u; 32768u; 65535u; 65536u; 0x7FFFFFF0u; 0x7FFFFFFFu
       0x80000000u; 0xFFFFFFF0u; 0xFFFFFFF8u; 0xFFFFFFFEu; 0xFFFFFFFFu; 100000u; 1000000u |]

let interesting64 : int64[] =
    [| 0L; 1L; -1L; -8L; 255L; 65536L; int64 Int32.MaxValue; 0x80000000L; 0xFFFFFFFFL; 0x100000000L; 1L <<< 40
       Int64.MaxValue; Int64.MinValue; Int64.MaxValue / 2L + 1L; 3074457345618258603L |]

/// One change to a byte array.
type Mutation =
    | Truncate of keep: float
    | Flip of at: float * value: byte
    | Overwrite of at: float * bytes: byte[]
    | Insert of at: float * bytes: byte[]
    | Repeat of from: float * count: int

let private position = Gen.choose (0, 10000) |> Gen.map (fun i -> float i / 10000.0)

let private valueBytes =
    Gen.oneof
        [ Gen.elements interesting32 |> Gen.map BitConverter.GetBytes
          Gen.elements interesting32 |> Gen.map (fun v -> BitConverter.GetBytes v |> Array.rev) // big-endian (PNG)
          Gen.elements interesting64 |> Gen.map BitConverter.GetBytes
          Gen.elements [ 0us; 1us; 0x7FFFus; 0x8000us; 0xFFFFus; 0xFFFEus ] |> Gen.map BitConverter.GetBytes
          Gen.arrayOfLength 4 (Gen.choose (0, 255) |> Gen.map byte) ]

let mutation : Gen<Mutation> =
    Gen.frequency
        [ 2, position |> Gen.map Truncate
          3, Gen.map2 (fun p v -> Flip(p, byte v)) position (Gen.choose (0, 255))
          5, Gen.map2 (fun p b -> Overwrite(p, b)) position valueBytes
          1, Gen.map2 (fun p b -> Insert(p, b)) position valueBytes
          1, Gen.map2 (fun p n -> Repeat(p, n)) position (Gen.choose (1, 64)) ]

/// Applies a mutation (positions are fractions of the length, so they fit any file).
let apply (bytes: byte[]) (m: Mutation) : byte[] =
    let at (f: float) = min bytes.Length (int (f * float bytes.Length))
    match m with
    | Truncate keep -> bytes[.. at keep - 1]
    | Flip(p, v) when bytes.Length > 0 ->
        let b = Array.copy bytes
        b[min (b.Length - 1) (at p)] <- v
        b
    | Flip _ -> bytes
    | Overwrite(p, v) ->
        let b = Array.copy bytes
        let i = at p
        for k in 0 .. v.Length - 1 do
            if i + k < b.Length then b[i + k] <- v[k]
        b
    | Insert(p, v) -> Array.concat [ bytes[.. at p - 1]; v; bytes[at p ..] ]
    | Repeat(p, n) ->
        let i = at p
        let seg = bytes[i .. min (bytes.Length - 1) (i + n - 1)]
        Array.concat [ bytes[.. i - 1]; seg; seg; bytes[i ..] ]

/// One to four mutations of one of `seeds`.
let mutated (seeds: byte[][]) : Gen<byte[]> =
    gen {
        let! seed = Gen.elements seeds
        let! n = Gen.choose (1, 4)
        let! ms = Gen.listOfLength n mutation
        return List.fold apply seed ms
    }

let private le16 (v: int) = BitConverter.GetBytes(uint16 v)
let private le32 (v: uint32) = BitConverter.GetBytes v
let private ascii (s: string) = Encoding.ASCII.GetBytes s

// --- WAV ------------------------------------------------------------------------------------------------------

/// A RIFF file of random chunks: a random `fmt ` (tags, channel counts, rates, sizes, some consistent), `data`,
/// unknown chunks; each with its true or a forged declared size, in any order.
let wav : Gen<byte[]> =
    let fmtBody =
        gen {
            let! tag = Gen.elements [ 1; 3; 0xFFFE; 2; 7; 0 ]
            let! ch = Gen.elements [ 1; 2; 0; 3; 65535 ]
            let! rate = Gen.elements [ 16000u; 8000u; 0u; 1u; 0xFFFFFFFFu; 768000u; 768001u ]
            let! bits = Gen.elements [ 16; 8; 24; 32; 64; 0; 7; 12 ]
            let! alignOk = Gen.elements [ true; true; false ]
            let align = if alignOk then ch * bits / 8 else 3
            let! ext = Gen.elements [ 0; 0; 22; 40 ]
            let basic = Array.concat [ le16 tag; le16 ch; le32 rate; le32 (rate * uint32 (max 1 align)); le16 align; le16 bits ]
            let extra =
                if ext = 0 then [||]
                else
                    let g = (if bits = 32 then Guid("00000003-0000-0010-8000-00aa00389b71") else Guid("00000001-0000-0010-8000-00aa00389b71")).ToByteArray()
                    Array.concat [ le16 22; le16 bits; le32 3u; g ] |> Array.truncate (ext + 2)
            return Array.append basic extra
        }
    let chunk =
        gen {
            let! kind = Gen.elements [ "fmt "; "data"; "data"; "LIST"; "junk"; "ds64"; "\000\001\002\003" ]
            let! body =
                if kind = "fmt " then fmtBody
                else Gen.choose (0, 64) |> Gen.bind (fun n -> Gen.arrayOfLength n (Gen.choose (0, 255) |> Gen.map byte))
            let! forged = Gen.frequency [ 3, Gen.constant None; 1, Gen.elements interesting32 |> Gen.map Some ]
            let size = defaultArg forged (uint32 body.Length)
            return Array.concat [ ascii kind; le32 size; body ]
        }
    gen {
        let! n = Gen.choose (0, 5)
        let! chunks = Gen.listOfLength n chunk
        let! head = Gen.frequency [ 8, Gen.constant "RIFF"; 2, Gen.constant "RF64"; 1, Gen.constant "RIFX" ]
        let body = Array.concat (ascii "WAVE" :: chunks)
        let! riffSize = Gen.frequency [ 3, Gen.constant (uint32 body.Length); 1, Gen.elements interesting32 ]
        return Array.concat [ ascii head; le32 riffSize; body ]
    }

// --- PNG ------------------------------------------------------------------------------------------------------

let private be32 = Crafted.be32
let private pngChunk = Crafted.pngChunk

/// A PNG whose IHDR (correct CRC) claims random, often huge or wrapping, sizes and colour types, followed by
/// random chunks (PLTE with forged lengths, small IDATs).
let forgedPng : Gen<byte[]> =
    gen {
        let! w = Gen.elements [ 1u; 2u; 100000u; 65536u; 0x7FFFFFFFu; 0u; 46341u; 8192u; 8193u ]
        let! h = Gen.elements [ 1u; 2u; 100000u; 16384u; 0x7FFFFFFFu; 0u; 46341u; 8192u ]
        let! depth = Gen.elements [ 8uy; 1uy; 16uy; 3uy ]
        let! colour = Gen.elements [ 2uy; 3uy; 0uy; 6uy; 4uy; 7uy ]
        let! plteLen = Gen.elements [ 6u; 6u; 3u; 0xFFFFFFF0u; 0x7FFFFFFFu ]
        let! idat = Gen.choose (0, 40) |> Gen.bind (fun n -> Gen.arrayOfLength n (Gen.choose (0, 255) |> Gen.map byte))
        let ihdr = Array.concat [ be32 w; be32 h; [| depth; colour; 0uy; 0uy; 0uy |] ]
        let! withPlte = Gen.elements [ false; true; true ]
        let palette = [| 0uy; 0uy; 0uy; 255uy; 255uy; 255uy |]
        let plte =
            if not withPlte then [||]
            elif plteLen = 6u then pngChunk "PLTE" palette
            else Array.concat [ be32 plteLen; ascii "PLTE"; palette; be32 0u ]
        return
            Array.concat
                [ Crafted.pngSignature
                  pngChunk "IHDR" ihdr
                  plte
                  pngChunk "IDAT" idat
                  pngChunk "IEND" [||] ]
    }

// --- .npy -----------------------------------------------------------------------------------------------------

/// An .npy file with a random version, header length and header text: descr, fortran order and shapes that are
/// negative, huge, overflowing or malformed, with some data bytes.
let npy : Gen<byte[]> =
    gen {
        let! version = Gen.frequency [ 8, Gen.constant 1uy; 2, Gen.constant 2uy; 1, Gen.constant 3uy; 1, Gen.elements [ 0uy; 9uy ] ]
        let! descr = Gen.frequency [ 6, Gen.elements [ "'<f4'"; "'<f8'"; "'|u1'"; "'<i8'" ]; 2, Gen.elements [ "'>f4'"; "'<U8'"; "<f4"; "'"; "" ] ]
        let! dims =
            Gen.choose (0, 4)
            |> Gen.bind (fun n ->
                Gen.listOfLength n (Gen.elements [ "0"; "1"; "3"; "-1"; "-4"; "4294967296"; "9223372036854775807"; "3074457345618258603"; "x"; "" ]))
        let! shapeStyle = Gen.elements [ 0; 0; 0; 1; 2 ]
        let shape =
            match shapeStyle with
            | 0 -> "(" + String.Join(", ", dims) + (if dims.Length = 1 then ",)" else ")")
            | 1 -> "(" + String.Join(", ", dims)
            | _ -> String.Join(", ", dims)
        let! fortran = Gen.frequency [ 5, Gen.constant "False"; 1, Gen.constant "True" ]
        let header = $"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n"
        let! hlenForged = Gen.frequency [ 4, Gen.constant None; 1, Gen.elements interesting32 |> Gen.map Some ]
        let hlen = defaultArg hlenForged (uint32 header.Length)
        let lenBytes = if version = 1uy then le16 (int (hlen &&& 0xFFFFu)) else le32 hlen
        let! data = Gen.choose (0, 64) |> Gen.bind (fun n -> Gen.arrayOfLength n (Gen.choose (0, 255) |> Gen.map byte))
        return Array.concat [ [| 0x93uy |]; ascii "NUMPY"; [| version; 0uy |]; lenBytes; ascii header; data ]
    }

// --- pickle ---------------------------------------------------------------------------------------------------

/// A pickle made of random opcodes: pushes (with lengths that are true, huge or negative), containers, marks,
/// memo operations, calls, deep TUPLE1/list nesting, and mostly a STOP at the end.
let private l1 (s: string) = Encoding.Latin1.GetBytes s

let pickle : Gen<byte[]> =
    let op =
        Gen.frequency
            [ 6, Gen.elements [ (l1 "N"); (l1 "\x88"); (l1 "K\x05"); (l1 "M\x01\x02"); (l1 "J\xff\xff\xff\xff"); (l1 ")"); (l1 "]"); (l1 "}"); (l1 "("); (l1 "t"); (l1 "l"); (l1 "d"); (l1 "\x85"); (l1 "\x86"); (l1 "\x87"); (l1 "a"); (l1 "e"); (l1 "s"); (l1 "u"); (l1 "0"); (l1 "1"); (l1 "2"); (l1 "\x94"); (l1 "b"); (l1 "R"); (l1 "\x81"); (l1 "\x93"); (l1 "Q"); (l1 ".") ]
              2, Gen.elements [ (l1 "\x8c\x03abc"); (l1 "\x8c\x0ecollections\x8c\x0bOrderedDict"); (l1 "ctorch._utils\n_rebuild_tensor_v2\n"); (l1 "cnumpy.core.multiarray\n_reconstruct\n"); (l1 "q\x00"); (l1 "h\x00"); (l1 "h\x07"); (l1 "j\xff\xff\xff\xff"); (l1 "r\x01\x00\x00\x00"); (l1 "I12\n"); (l1 "Ixyz\n"); (l1 "F1.5\n"); (l1 "S'a\\x4'\n"); (l1 "Vab\\u12\n"); (l1 "\x8a\x02\xff\x7f") ]
              2, gen {
                     let! code = Gen.elements [ (byte 'T'); (byte 'X'); (byte 'B'); (byte '\x8b') ]
                     let! n = Gen.elements interesting32
                     return Array.append [| code |] (le32 n)
                 }
              1, gen {
                     let! code = Gen.elements [ (byte '\x8d'); (byte '\x8e'); (byte '\x96') ]
                     let! n = Gen.elements interesting64
                     return Array.append [| code |] (BitConverter.GetBytes n)
                 }
              1, gen {
                     let! n = Gen.elements [ 1000; 100000 ]
                     let! o = Gen.elements [ (l1 "\x85"); (l1 "("); (l1 "]") ]
                     return Array.append (l1 "N") (Array.replicate n o |> Array.concat)
                 } ]
    gen {
        let! proto = Gen.frequency [ 4, Gen.constant [| 0x80uy; 2uy |]; 4, Gen.constant [| 0x80uy; 4uy |]; 1, Gen.constant [| 0x80uy; 9uy |]; 2, Gen.constant [||] ]
        let! n = Gen.choose (0, 24)
        let! ops = Gen.listOfLength n op
        let! stop = Gen.frequency [ 4, Gen.constant (l1 "."); 1, Gen.constant [||] ]
        return Array.concat [ yield proto; yield! ops; yield stop ]
    }

// --- safetensors ------------------------------------------------------------------------------------------------

/// A safetensors file with a random header: dtypes, shapes (negative, huge, overflowing), offsets (reversed,
/// overlapping, past the end), deep JSON nesting, a forged header length.
let safetensors : Gen<byte[]> =
    let dim = Gen.elements [ "0"; "1"; "2"; "-1"; "4294967296"; "9223372036854775807"; "1e3"; "\"2\"" ]
    let entry (i: int) =
        gen {
            let! dtype = Gen.elements [ "F32"; "U8"; "I64"; "F8_E4M3"; "X"; "7" ]
            let! rank = Gen.choose (0, 3)
            let! dims = Gen.listOfLength rank dim
            let! b = Gen.elements [ "0"; "4"; "8"; "-4"; "18446744073709551615" ]
            let! e = Gen.elements [ "0"; "4"; "8"; "16"; "1000000000000" ]
            return $"\"t{i}\": {{\"dtype\": \"{dtype}\", \"shape\": [{String.Join(',', dims)}], \"data_offsets\": [{b}, {e}]}}"
        }
    gen {
        let! n = Gen.choose (0, 3)
        let! entries = Gen.sequenceToList [ for i in 0 .. n - 1 -> entry i ]
        let! deep = Gen.frequency [ 8, Gen.constant 0; 1, Gen.elements [ 20; 70; 5000 ] ]
        let nested = String.replicate deep "[" + String.replicate deep "]"
        let json =
            "{" + String.Join(", ", entries @ (if deep > 0 then [ $"\"__metadata__\": {nested}" ] else [])) + "}"
        let header = ascii json
        let! lenForged = Gen.frequency [ 4, Gen.constant None; 1, Gen.elements interesting64 |> Gen.map Some ]
        let len = defaultArg lenForged (int64 header.Length)
        let! data = Gen.choose (0, 32) |> Gen.bind (fun k -> Gen.arrayOfLength k (Gen.choose (0, 255) |> Gen.map byte))
        return Array.concat [ BitConverter.GetBytes len; header; data ]
    }

// --- CSV ------------------------------------------------------------------------------------------------------

/// Cells of a metadata CSV that try to leave the dataset root or break the parser.
let csvCell : Gen<string> =
    Gen.frequency
        [ 4, Gen.elements [ "abc"; "train"; "val"; "test"; "helicopter"; "v1s"; "v2"; "-0Ab3_x"; "vidéo_日本" ]
          3, Gen.elements [ ".."; "."; "../.."; "../x"; "/etc"; "/"; "a/b"; "a\\b"; "C:x"; "x\000y"; "\000"; ""; " "; "\"q\"\"q\""; "\"unterminated"; "a,b"; "\uFEFFname" ]
          1, Gen.choose (0, 12) |> Gen.bind (fun n -> Gen.arrayOfLength n (Gen.choose (0, 0x2FF) |> Gen.map char)) |> Gen.map String ]

/// An S4 metadata CSV (`vid,name,category,split` style columns, sometimes missing or reordered) of random rows.
let s4Csv : Gen<string> =
    gen {
        let! header = Gen.elements [ "vid,uid,category,split,name"; "name,category,split"; "name,split"; "category,name,split,extra"; "" ]
        let cols = if header = "" then 3 else header.Split(',').Length
        let! rows = Gen.choose (0, 6)
        let! cells = Gen.listOfLength rows (Gen.listOfLength cols csvCell)
        let! ragged = Gen.elements [ false; false; true ]
        let lines = [ for r in cells -> String.Join(",", (if ragged then List.truncate (max 0 (cols - 1)) r else r)) ]
        return String.Join("\n", header :: lines)
    }

// --- .pth zip with a forged tensor ---------------------------------------------------------------------------

/// A pickle int of any int64 value (LONG1, 8 bytes two's complement).
let private pickleInt (v: int64) = Array.append [| 0x8Auy; 8uy |] (BitConverter.GetBytes v)

let private pickleStr (s: string) = Array.append [| 0x8Cuy; byte s.Length |] (ascii s)

/// A torch.save zip whose one tensor is `_rebuild_tensor_v2(storage, offset, size, stride, ...)` with forged
/// storage sizes, offsets, sizes and strides (negative, huge, overflowing), over a storage record of a few bytes.
let pthZip : Gen<byte[]> =
    let value = Gen.frequency [ 4, Gen.elements [ 0L; 1L; 2L; 3L; 4L ]; 2, Gen.elements interesting64 ]
    gen {
        let! numel = value
        let! offset = value
        let! rank = Gen.choose (0, 3)
        let! size = Gen.listOfLength rank value
        let! stride = Gen.listOfLength rank value
        let! recordBytes = Gen.elements [ 0; 4; 16; 17 ]
        let tuple (xs: int64 list) = Array.concat ("("B :: (xs |> List.map pickleInt) @ [ "t"B ])
        let pkl =
            Array.concat
                [ [| 0x80uy; 2uy |]
                  ascii "ctorch._utils\n_rebuild_tensor_v2\n"
                  "("B
                  "("B; pickleStr "storage"; ascii "ctorch\nFloatStorage\n"; pickleStr "0"; pickleStr "cpu"; pickleInt numel; "t"B; "Q"B
                  pickleInt offset
                  tuple size
                  tuple stride
                  [| 0x89uy |]
                  ascii "ccollections\nOrderedDict\n"; ")"B; "R"B
                  "t"B; "R"B; "."B ]
        use ms = new MemoryStream()
        do
            use zip = new Compression.ZipArchive(ms, Compression.ZipArchiveMode.Create, true)
            let add (name: string) (data: byte[]) =
                use s = zip.CreateEntry(name, Compression.CompressionLevel.NoCompression).Open()
                s.Write(data, 0, data.Length)
            add "archive/data.pkl" pkl
            add "archive/byteorder" (ascii "little")
            add "archive/data/0" (Array.zeroCreate recordBytes)
        return ms.ToArray()
    }

// --- random state dicts ---------------------------------------------------------------------------------------

/// One tensor of a random state dict: raw little-endian bytes of a row-major tensor.
type TensorSpec = { Name: string; Dtype: torch.ScalarType; Shape: int64[]; Bytes: byte[] }

/// 0..12 tensors with unique dotted names, rank 0..4, dims 0..3.
type RandomStateDict = RandomStateDict of TensorSpec list

let private segments =
    [| "sem_seg_head"; "pixel_decoder"; "layers"; "transformer"; "encoder"; "query_feat"; "level_embed"
       "norm"; "weight"; "bias"; "running_mean"; "num_batches_tracked"; "0"; "3"; "12"; "audio_proj"; "größe" |]

let private dtypes =
    [| torch.ScalarType.Float32; torch.ScalarType.Float16; torch.ScalarType.BFloat16; torch.ScalarType.Int64
       torch.ScalarType.Float64; torch.ScalarType.Int32; torch.ScalarType.Byte; torch.ScalarType.Bool |]

let private specGen =
    gen {
        let! parts = Gen.choose (1, 5) |> Gen.bind (fun n -> Gen.listOfLength n (Gen.elements segments))
        let! dtype = Gen.elements dtypes
        let! rank = Gen.choose (0, 4)
        let! dims = Gen.listOfLength rank (Gen.choose (0, 3))
        let! seed = Gen.choose (0, Int32.MaxValue)
        let shape = dims |> List.map int64 |> Array.ofList
        let bytes = Array.zeroCreate<byte> (int (Array.fold (*) 1L shape * TensorData.elementSize dtype))
        Random(seed).NextBytes bytes // any bit pattern: NaN payloads and subnormals must survive too
        if dtype = torch.ScalarType.Bool then
            for i in 0 .. bytes.Length - 1 do bytes[i] <- bytes[i] &&& 1uy
        return { Name = String.concat "." parts; Dtype = dtype; Shape = shape; Bytes = bytes }
    }

/// The arbitrary of RandomStateDict (FsCheckConfig.arbitrary).
type StateDicts =
    static member RandomStateDict() =
        gen {
            let! n = Gen.choose (0, 12)
            let! specs = Gen.listOfLength n specGen
            // Unique names: a repeated name gets its position appended as one more segment.
            let seen = HashSet<string>()
            let specs = specs |> List.mapi (fun i s -> if seen.Add s.Name then s else { s with Name = $"{s.Name}.{i}" })
            return RandomStateDict specs
        }
        |> Arb.fromGen

// --- cost matrices --------------------------------------------------------------------------------------------

/// How the entries of a random cost matrix are drawn.
type MatrixKind =
    | Uniform          // floats in [0, 1)
    | SmallInts        // 0..3: many ties
    | Constant         // every optimum ties
    | Signed           // N(0, 100)-ish, negative entries
    | Forbidden        // 0..9 with ~30 % +infinity (possibly infeasible)

/// The arbitrary of (rows, columns, kind, seed) cases, 1..7 x 1..7 (FsCheckConfig.arbitrary).
type CostMatrices =
    static member Case() =
        gen {
            let! n = Gen.choose (1, 7)
            let! m = Gen.choose (1, 7)
            let! kind = Gen.elements [ Uniform; SmallInts; Constant; Signed; Forbidden ]
            let! seed = Gen.choose (0, Int32.MaxValue)
            return n, m, kind, seed
        }
        |> Arb.fromGen

// --- running generated files through a reader (the `Fuzz` lists) --------------------------------------------
// Each `Fuzz` list (one per folder file: Audio, Checkpoint, Data) sends generated malformed WAV, PNG/JPEG, .npy,
// pickle, .pth (zip and legacy), safetensors and CSV inputs through a reader with a time and a memory bound. The
// property: the reader returns a value or fails with a clean error (InvalidDataException, IOException or
// NotSupportedException) whose message names the file, within the bound.

/// Seconds one reader call may take.
let timeLimit = 10.0

/// Managed bytes one reader call may allocate on its thread: generous for inputs of a few KB, far below what a
/// forged size would make a reader allocate.
let memoryLimit (inputBytes: int) = 256L * 1024L * 1024L + 64L * int64 inputBytes

/// The folder of the fuzz suite's files (this run's; deleted when the test program exits).
let fuzzDir = lazy (Support.sessionDir "fuzz")

let private show (bytes: byte[]) =
    let head = Convert.ToBase64String(bytes[.. min bytes.Length 256 - 1])
    $"{bytes.Length} bytes, base64 of the first 256: {head}"

/// Runs `read` on `bytes` written to a fresh file `name`; fails unless it returns or throws a clean error naming
/// the file, within the time and memory bounds.
let check (name: string) (read: string -> unit) (bytes: byte[]) =
    let path = Path.Combine(fuzzDir.Value, $"{Guid.NewGuid():N}-{name}")
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

/// A property of `n` cases (times VCT_FUZZ_SCALE): files drawn from `g`, written as `name`, go through `read` (`check`).
let prop (n: int) (title: string) (g: Gen<byte[]>) (name: string) (read: string -> unit) =
    testPropertyWithConfig (config n) title (Prop.forAll (Arb.fromGen g) (check name read))
