/// Hand-made input files, a few bytes each, for the regression tests of the readers (the `Hardening` lists):
/// forged PNG and WAV headers, deep and lying pickles, records and dataset trees made without a real dataset.
module Vct.Core.Tests.Crafted

open System
open System.IO
open System.Text
open Vct.Core
open Vct.Core.Data
open Vct.Core.Tests.Support

/// Writes `bytes` to a new file `name` in `dir`; returns its path.
let crafted (dir: TempDir) (name: string) (bytes: byte[]) =
    let p = Path.Combine(dir.Path, name)
    File.WriteAllBytes(p, bytes)
    p

let le32 (v: uint32) = BitConverter.GetBytes v
let le16 (v: uint16) = BitConverter.GetBytes v
let be32 (v: uint32) = [| byte (v >>> 24); byte (v >>> 16); byte (v >>> 8); byte v |]

/// CRC-32 (PNG, zlib polynomial 0xEDB88320).
let crc32 (data: byte[]) =
    let mutable c = 0xFFFFFFFFu
    for b in data do
        c <- c ^^^ uint32 b
        for _ in 0 .. 7 do c <- if c &&& 1u <> 0u then (c >>> 1) ^^^ 0xEDB88320u else c >>> 1
    c ^^^ 0xFFFFFFFFu

/// The 8-byte PNG signature.
let pngSignature = [| 0x89uy; byte 'P'; byte 'N'; byte 'G'; 13uy; 10uy; 26uy; 10uy |]

/// One PNG chunk: length, type, data, CRC.
let pngChunk (kind: string) (data: byte[]) =
    let body = Array.append (Encoding.ASCII.GetBytes kind) data
    Array.concat [ be32 (uint32 data.Length); body; be32 (crc32 body) ]

/// A PNG whose IHDR claims `w` x `h` RGB pixels, with a tiny IDAT (its data cannot fill such an image).
let forgedPng (w: uint32) (h: uint32) =
    let ihdr = Array.concat [ be32 w; be32 h; [| 8uy; 2uy; 0uy; 0uy; 0uy |] ]
    Array.concat
        [ pngSignature
          pngChunk "IHDR" ihdr
          pngChunk "IDAT" [| 0x78uy; 0x9Cuy; 0x63uy; 0x60uy; 0x00uy; 0x00uy; 0x00uy; 0x02uy; 0x00uy; 0x01uy; 0uy; 0uy |]
          pngChunk "IEND" [||] ]

/// A RIFF/WAVE header, a 16-bit mono 16 kHz `fmt ` chunk, then `chunks` (id, declared size, body bytes).
let wavWith (chunks: (string * uint32 * byte[]) list) =
    let fmt = Array.concat [ le16 1us; le16 1us; le32 16000u; le32 32000u; le16 2us; le16 16us ]
    let body =
        Array.concat
            [ yield Encoding.ASCII.GetBytes "WAVE"
              yield Encoding.ASCII.GetBytes "fmt "
              yield le32 16u
              yield fmt
              for id, size, data in chunks do
                  yield Encoding.ASCII.GetBytes id
                  yield le32 size
                  yield data ]
    Array.concat [ Encoding.ASCII.GetBytes "RIFF"; le32 (uint32 body.Length); body ]

/// A protocol-2 pickle of a dict whose keys are `depth`-deep nested 1-tuples around None (`keys` of them, equal).
let deepTuplePickle (depth: int) (keys: int) =
    use ms = new MemoryStream()
    ms.Write([| 0x80uy; 2uy; byte '}' |], 0, 3)
    for _ in 1 .. keys do
        ms.WriteByte(byte 'N')
        for _ in 1 .. depth do ms.WriteByte 0x85uy // TUPLE1
        ms.WriteByte(byte 'N')
        ms.WriteByte(byte 's') // SETITEM
    ms.WriteByte(byte '.')
    ms.ToArray()

/// A pickle SHORT_BINUNICODE of an ASCII string.
let shortUnicode (s: string) = Array.append [| 0x8Cuy; byte s.Length |] (Encoding.ASCII.GetBytes s)

/// A legacy-format torch.save of one FloatStorage "0" whose 8-byte element count says `numel`, with no data after it.
let legacyPthClaiming (numel: int64) =
    let magic = Array.append [| 0x80uy; 2uy; 0x8Auy; 10uy |] (Array.append [| 0x6Cuy; 0xFCuy; 0x9Cuy; 0x46uy; 0xF9uy; 0x20uy; 0x6Auy; 0xA8uy; 0x50uy; 0x19uy |] [| byte '.' |])
    let protocol = [| 0x80uy; 2uy; byte 'M'; 0xE9uy; 0x03uy; byte '.' |]
    let sysInfo = [| 0x80uy; 2uy; byte '}'; byte '.' |]
    let main =
        Array.concat
            [ [| 0x80uy; 2uy; byte '(' |]; shortUnicode "storage"; Encoding.ASCII.GetBytes "ctorch\nFloatStorage\n"
              shortUnicode "0"; shortUnicode "cpu"; [| byte 'K'; 4uy; byte 't'; byte 'Q'; byte '.' |] ]
    let keys = Array.concat [ [| 0x80uy; 2uy; byte ']'; byte '(' |]; shortUnicode "0"; [| byte 'e'; byte '.' |] ]
    Array.concat [ magic; protocol; sysInfo; main; keys; BitConverter.GetBytes numel ]

/// Video records that only carry an id (the loader never opens their files).
let fakeRecords (n: int) : VideoRecord[] =
    Array.init n (fun i ->
        { Id = string i; Split = "train"; Kind = Subset.S4; Category = ""; CategoryLabel = 0; Frames = [||]
          Masks = [||]; MaskFrames = [||]; PreMasks = [||]; Audio = AudioSource.Wav ""; VidTemporalFlag = [||]
          GtTemporalFlag = [||]; Raw = false })

/// A one-video AVSBench-semantic tree for `Prepare.objectTree` (MS3: label v1m): metadata.csv, 8x8 frames and
/// labels_rgb. Returns the metadata path.
let semanticTree (root: string) (vid: string) (uid: string) =
    let meta = Path.Combine(root, "metadata.csv")
    File.WriteAllLines(meta, [ "vid,uid,s_min,s_sec,e_min,e_sec,label,split"; $"{vid},{uid},0,0,0,5,v1m,train" ])
    let safeUid = if SafePath.problem uid = None then uid else "u"
    for i in 0 .. 4 do
        ImageIO.write (Path.Combine(root, "v1m", safeUid, "frames", $"{i}.jpg")) (Image.Create(8, 8, 3, 90uy))
        ImageIO.write (Path.Combine(root, "v1m", safeUid, "labels_rgb", $"{i}.png")) (Image.Create(8, 8, 3, 128uy))
    meta

/// The path of a committed WAV fixture (tests/golden/audio/wav).
let goldenWav (name: string) = Golden.path [ "audio"; "wav"; name ]
