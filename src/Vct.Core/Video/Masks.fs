namespace Vct.Core.Video

open System
open System.IO
open System.IO.Compression
open Vct.Core
open Vct.Core.Platform

/// The colour of mask images, as the official tools write them.
[<RequireQualifiedAccess>]
type MaskPng =
    /// 8-bit grey ("L" mode), 0 = background, 255 = sounding object (S4/MS3 ground truth and predictions).
    | Grey
    /// 8-bit palette ("P" mode) of class ids with a colour table (AVSS).
    | Palette of (byte * byte * byte)[]

/// Colours and names of the AVSBench classes (official `visualization.py`, `get_v2_pallete`; AVSBench-semantic
/// `label2idx.json` order, index = id - 1).
[<RequireQualifiedAccess>]
module Classes =
    /// The unified AVSBench palette: class j's colour takes j's bits three at a time, bit 0 -> red, bit 1 -> green,
    /// bit 2 -> blue, from the most significant bit down (the PASCAL VOC colour map). 0 -> black, 1 -> (128, 0, 0).
    let palette (n: int) : (byte * byte * byte)[] =
        Array.init n (fun j ->
            let mutable r, g, b, lab, i = 0, 0, 0, j, 0
            while lab > 0 do
                r <- r ||| (((lab >>> 0) &&& 1) <<< (7 - i))
                g <- g ||| (((lab >>> 1) &&& 1) <<< (7 - i))
                b <- b ||| (((lab >>> 2) &&& 1) <<< (7 - i))
                i <- i + 1
                lab <- lab >>> 3
            byte r, byte g, byte b)

    /// The 71 AVSS classes (background first).
    let avss : string[] =
        [| "background"; "accordion"; "airplane"; "axe"; "baby"; "bassoon"; "bell"; "bird"; "boat"; "boy"; "bus"; "car"
           "cat"; "cello"; "clarinet"; "clipper"; "clock"; "dog"; "donkey"; "drum"; "duck"; "elephant"; "emergency-car"
           "erhu"; "flute"; "frying-food"; "girl"; "goose"; "guitar"; "gun"; "guzheng"; "hair-dryer"; "handpan"
           "harmonica"; "harp"; "helicopter"; "hen"; "horse"; "keyboard"; "leopard"; "lion"; "man"; "marimba"
           "missile-rocket"; "motorcycle"; "mower"; "parrot"; "piano"; "pig"; "pipa"; "saw"; "saxophone"; "sheep"; "sitar"
           "sorna"; "squirrel"; "tabla"; "tank"; "tiger"; "tractor"; "train"; "trombone"; "truck"; "trumpet"; "tuba"
           "ukulele"; "utv"; "vacuum-cleaner"; "violin"; "wolf"; "woman" |]

    /// Names of a model's output classes: AVSS's 71, or background / sounding object for S4 and MS3.
    let names (classes: int) : string[] =
        if classes = avss.Length then avss
        else Array.init classes (fun c -> if c = 0 then "background" elif classes = 2 then "sounding object" else $"class {c}")

/// A minimal, deterministic PNG encoder for masks: 8-bit grey or 8-bit palette, filter 0, zlib (RFC 2083).
/// Hand-written because SkiaSharp cannot write palette images and the official AVSS masks are palette PNGs.
[<RequireQualifiedAccess>]
module Png =
    let private crcTable =
        Array.init 256 (fun n ->
            let mutable c = uint32 n
            for _ in 0 .. 7 do c <- if c &&& 1u <> 0u then 0xEDB88320u ^^^ (c >>> 1) else c >>> 1
            c)

    let private crc (data: ReadOnlySpan<byte>) =
        let mutable c = 0xFFFFFFFFu
        for b in data do c <- crcTable[int ((c ^^^ uint32 b) &&& 0xFFu)] ^^^ (c >>> 8)
        c ^^^ 0xFFFFFFFFu

    let private be32 (s: Stream) (v: uint32) =
        s.WriteByte(byte (v >>> 24)); s.WriteByte(byte (v >>> 16)); s.WriteByte(byte (v >>> 8)); s.WriteByte(byte v)

    let private chunk (s: Stream) (kind: string) (data: byte[]) =
        be32 s (uint32 data.Length)
        let body = Array.append (Text.Encoding.ASCII.GetBytes kind) data
        s.Write(body, 0, body.Length)
        be32 s (crc (ReadOnlySpan body))

    /// Encodes `pixels` (row-major, one byte per pixel) as a PNG.
    let encode (kind: MaskPng) (width: int) (height: int) (pixels: byte[]) : byte[] =
        if width <= 0 || height <= 0 then invalidArg (nameof width) $"bad PNG size {width}x{height}"
        if int64 pixels.Length <> int64 width * int64 height then
            invalidArg (nameof pixels) $"{pixels.Length} pixels for a {width}x{height} PNG"
        use out = new MemoryStream()
        out.Write([| 0x89uy; byte 'P'; byte 'N'; byte 'G'; 13uy; 10uy; 26uy; 10uy |], 0, 8)
        let ihdr = Array.zeroCreate<byte> 13
        let put (o: int) (v: int) =
            ihdr[o] <- byte (v >>> 24); ihdr[o + 1] <- byte (v >>> 16); ihdr[o + 2] <- byte (v >>> 8); ihdr[o + 3] <- byte v
        put 0 width
        put 4 height
        ihdr[8] <- 8uy
        ihdr[9] <- (match kind with MaskPng.Grey -> 0uy | MaskPng.Palette _ -> 3uy)
        chunk out "IHDR" ihdr
        match kind with
        | MaskPng.Palette colours ->
            if colours.Length = 0 || colours.Length > 256 then invalidArg (nameof kind) $"a palette has 1..256 colours, got {colours.Length}"
            let plte = colours |> Array.collect (fun (r, g, b) -> [| r; g; b |])
            chunk out "PLTE" plte
            for p in pixels do
                if int p >= colours.Length then invalidArg (nameof pixels) $"class id {p} has no palette colour ({colours.Length} colours)"
        | MaskPng.Grey -> ()
        use packed = new MemoryStream()
        do
            use z = new ZLibStream(packed, CompressionLevel.Fastest, true)
            let row = Array.zeroCreate<byte> (width + 1)
            for y in 0 .. height - 1 do
                Buffer.BlockCopy(pixels, y * width, row, 1, width)
                z.Write(row, 0, row.Length)
        chunk out "IDAT" (packed.ToArray())
        chunk out "IEND" [||]
        out.ToArray()

    /// Writes a mask PNG atomically.
    let write (path: string) (kind: MaskPng) (width: int) (height: int) (pixels: byte[]) =
        AtomicFile.writeAllBytes path (encode kind width height pixels)

/// Mask overlays drawn as VCT's `visualization.py` does: the frame with alpha 0.3 (76 after PIL's truncation),
/// the colour mask with alpha 0.7 (178) where the mask colour is not black, combined by PIL's
/// `Image.alpha_composite` (its integer arithmetic, 7 fractional bits) and converted back to RGB.
[<RequireQualifiedAccess>]
module Overlay =
    /// PIL `point(lambda p: p * a)` on an opaque alpha channel: int(255 * a).
    let private alphaOf (a: float) = int (255.0 * a)
    let baseAlpha = alphaOf 0.3
    let maskAlpha = alphaOf 0.7

    // alpha_composite(dst = frame with alpha 76, src = mask colour with alpha 178), as fixed-point weights.
    let private coef1 =
        let blend = baseAlpha * (255 - maskAlpha)
        let outa255 = maskAlpha * 255 + blend
        maskAlpha * 255 * 255 * 128 / outa255
    let private coef2 = 255 * 128 - coef1
    let private div255 (a: int) = ((a >>> 8) + a) >>> 8

    /// One channel of a covered pixel: the mask colour `src` over the frame value `dst`.
    let blendChannel (src: byte) (dst: byte) : byte =
        byte (div255 (int src * coef1 + int dst * coef2 + (0x80 <<< 7)) >>> 7)

    /// Blends in place: `rgb` is the frame (HWC, 3 bytes per pixel), `mask` one class id per pixel, `colours` the
    /// colour of each id (black = not drawn).
    let blendInPlace (colours: (byte * byte * byte)[]) (rgb: byte[]) (mask: byte[]) =
        if rgb.Length <> 3 * mask.Length then invalidArg (nameof mask) $"{mask.Length} mask pixels for {rgb.Length / 3} frame pixels"
        for i in 0 .. mask.Length - 1 do
            let m = int mask[i]
            if m <> 0 && m < colours.Length then
                let r, g, b = colours[m]
                if r <> 0uy || g <> 0uy || b <> 0uy then
                    rgb[3 * i] <- blendChannel r rgb[3 * i]
                    rgb[3 * i + 1] <- blendChannel g rgb[3 * i + 1]
                    rgb[3 * i + 2] <- blendChannel b rgb[3 * i + 2]

    /// S4/MS3 colours: 0 black, 1 white (masks hold 0/1 here, not 0/255).
    let binaryColours = [| (0uy, 0uy, 0uy); (255uy, 255uy, 255uy) |]
