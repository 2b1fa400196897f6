namespace Vct.Core.Data

open System
open System.IO
open System.Runtime.InteropServices
open SkiaSharp
open Vct.Core.Platform

/// An 8-bit image in memory: `Channels` = 3 (RGB) or 1 (grey / label), row-major HWC bytes.
type Image =
    { Width: int
      Height: int
      Channels: int
      Pixels: byte[] }
    /// A blank image.
    static member Create(width: int, height: int, channels: int, ?fill: byte) =
        if width < 0 || height < 0 || channels < 1 then invalidArg (nameof width) $"bad image size {width}x{height}x{channels}"
        let n = int64 width * int64 height * int64 channels
        if n > int64 Array.MaxLength then invalidArg (nameof width) $"an image of {width}x{height}x{channels} bytes is too large"
        { Width = width; Height = height; Channels = channels
          Pixels = Array.create (int n) (defaultArg fill 0uy) }

/// How an S4/MS3 mask file is stored, as `ImageIO.readBinaryMask` found it.
type MaskStorage =
    { /// Bits per sample of the PNG (8 expected; 16-bit samples are scaled to 8 bits on reading), 8 for other formats.
      BitDepth: int
      /// A palette ("P" mode) PNG, decoded through its palette (white = object).
      Palette: bool }

/// Image decoding and encoding through SkiaSharp, with every decode result checked.
[<RequireQualifiedAccess>]
module ImageIO =
    let private bad (path: string) (why: string) : 'T = raise (InvalidDataException($"{path}: {why}"))

    /// The pixel budget of one decoded frame (8192 x 8192, 256 MiB of RGBA): a larger image is refused, naming the
    /// file and its size, before any pixel memory is allocated (a header may claim any size).
    [<Literal>]
    let MaxPixels = 67108864L

    /// Pixels a header may claim whatever the file's size; above it, at most MaxPixelsPerByte per byte of file.
    [<Literal>]
    let PlausiblePixels = 4194304L

    /// The most pixels per byte of file a real image holds (a 1-bit PNG at deflate's best ratio has about 8256):
    /// a larger claim is a truncated or forged header, refused before the pixels are allocated.
    [<Literal>]
    let MaxPixelsPerByte = 16384L

    /// The largest image file read (bytes): a frame within the pixel budget never needs more.
    [<Literal>]
    let MaxFileBytes = 1073741824L

    /// The bytes of an image file, refusing a missing file and one over MaxFileBytes.
    let private readFile (path: string) =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        let n = FileInfo(path).Length
        if n > MaxFileBytes then bad path $"a file of {n} bytes is over the {MaxFileBytes}-byte limit for an image"
        File.ReadAllBytes path

    /// Decodes any format SkiaSharp reads to unpremultiplied RGBA bytes. A file SKCodec cannot open, one whose
    /// header claims more than MaxPixels pixels, or one whose pixels do not all decode (a truncated PNG/JPEG gives
    /// `IncompleteInput` and a partly filled bitmap), fails with the file named.
    let decodeRgba (path: string) (bytes: byte[]) : int * int * byte[] =
        use data = SKData.CreateCopy bytes
        use codec = SKCodec.Create data
        if isNull codec then bad path "not a decodable image (unknown format or corrupt header)"
        let info = SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul)
        if info.Width <= 0 || info.Height <= 0 then bad path "image has no pixels"
        // 64-bit: width * height * 4 wraps in 32 bits for a forged header (and Skia would write past the buffer).
        let count = int64 info.Width * int64 info.Height
        if count > MaxPixels then
            bad path $"image is {info.Width}x{info.Height} ({count} pixels), over the budget of {MaxPixels} pixels per frame"
        if count > PlausiblePixels && count > MaxPixelsPerByte * int64 bytes.Length then
            bad path $"image is {info.Width}x{info.Height} ({count} pixels) in a file of {bytes.Length} bytes, more than {MaxPixelsPerByte} pixels per byte (truncated or forged header)"
        let pixels = Array.zeroCreate<byte> (int (count * 4L))
        let handle = GCHandle.Alloc(pixels, GCHandleType.Pinned)
        try
            let r = codec.GetPixels(info, handle.AddrOfPinnedObject())
            if r <> SKCodecResult.Success then
                let why = if r = SKCodecResult.IncompleteInput then "truncated (incomplete image data)" else $"decoding failed ({r})"
                bad path why
        finally
            handle.Free()
        info.Width, info.Height, pixels

    /// PNG colour type (IHDR byte 25) and palette (PLTE chunk) if the bytes are a PNG.
    let private pngPalette (bytes: byte[]) : (byte * byte * byte)[] option =
        let isPng = bytes.Length > 33 && bytes[0] = 0x89uy && bytes[1] = byte 'P' && bytes[2] = byte 'N' && bytes[3] = byte 'G'
        if not isPng || bytes[25] <> 3uy then None
        else
            // 64-bit positions: a chunk length near 2^32 must end the walk, not wrap it backwards.
            let mutable pos = 8L
            let mutable result = None
            let size = int64 bytes.Length
            while result.IsNone && pos + 8L <= size do
                let p = int pos
                let len = (int64 bytes[p] <<< 24) ||| (int64 bytes[p + 1] <<< 16) ||| (int64 bytes[p + 2] <<< 8) ||| int64 bytes[p + 3]
                let kind = Text.Encoding.ASCII.GetString(bytes, p + 4, 4)
                if kind = "PLTE" && pos + 8L + len <= size then
                    result <- Some(Array.init (int len / 3) (fun i -> bytes[p + 8 + 3 * i], bytes[p + 9 + 3 * i], bytes[p + 10 + 3 * i]))
                pos <- pos + 12L + len
            result

    /// Reads an RGB image (alpha dropped).
    let readRgb (path: string) : Image =
        let w, h, rgba = decodeRgba path (readFile path)
        let px = Array.zeroCreate<byte> (w * h * 3)
        for i in 0 .. w * h - 1 do
            px[3 * i] <- rgba[4 * i]
            px[3 * i + 1] <- rgba[4 * i + 1]
            px[3 * i + 2] <- rgba[4 * i + 2]
        { Width = w; Height = h; Channels = 3; Pixels = px }

    /// Reads a single-channel label/mask PNG as PIL's `np.array(Image.open(path))` sees it: a grey image gives its
    /// values; a palette ("P" mode) image gives its palette indices (recovered from the colours; the first index
    /// of a repeated colour wins); an RGB image whose channels are equal gives that value. A colour RGB image is
    /// rejected (use `readRgb` and a colour map).
    let readLabels (path: string) : Image =
        let bytes = readFile path
        let w, h, rgba = decodeRgba path bytes
        let px = Array.zeroCreate<byte> (w * h)
        match pngPalette bytes with
        | Some pal ->
            let index = Collections.Generic.Dictionary<int, byte>()
            pal |> Array.iteri (fun i (r, g, b) ->
                let key = (int r <<< 16) ||| (int g <<< 8) ||| int b
                if not (index.ContainsKey key) && i < 256 then index[key] <- byte i)
            for i in 0 .. w * h - 1 do
                let key = (int rgba[4 * i] <<< 16) ||| (int rgba[4 * i + 1] <<< 8) ||| int rgba[4 * i + 2]
                match index.TryGetValue key with
                | true, v -> px[i] <- v
                | _ -> bad path $"pixel {i % w},{i / w} has a colour that is not in the palette"
        | None ->
            for i in 0 .. w * h - 1 do
                let r, g, b = rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]
                if r <> g || g <> b then bad path $"expected a grey or palette label image, pixel {i % w},{i / w} is colour ({r},{g},{b})"
                px[i] <- r
        { Width = w; Height = h; Channels = 1; Pixels = px }

    /// Reads an S4/MS3 binary mask as grey values 0..255 (0 = background, 255 = sounding object; the loader divides
    /// by 255), as training reads it. A grey (or grey RGB) image gives its values. A palette ("P" mode) image is
    /// decoded through its palette: a white pixel is the object, every other colour background (its raw indices
    /// {0,1} would be empty after the division by 255). 16-bit PNGs are reported in the storage (their samples
    /// are scaled to 8 bits: 16-bit {0,1} masks read as empty).
    let readBinaryMask (path: string) : Image * MaskStorage =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        let bytes = File.ReadAllBytes path
        let isPng = bytes.Length > 33 && bytes[0] = 0x89uy && bytes[1] = byte 'P' && bytes[2] = byte 'N' && bytes[3] = byte 'G'
        let depth = if isPng then int bytes[24] else 8
        if isPng && bytes[25] = 3uy then
            let w, h, rgba = decodeRgba path bytes
            let px = Array.init (w * h) (fun i -> if rgba[4 * i] = 255uy && rgba[4 * i + 1] = 255uy && rgba[4 * i + 2] = 255uy then 255uy else 0uy)
            { Width = w; Height = h; Channels = 1; Pixels = px }, { BitDepth = depth; Palette = true }
        else readLabels path, { BitDepth = depth; Palette = false }

    /// Encodes an image as PNG (grey for 1 channel, RGB otherwise) or JPEG (quality 90) by the path's extension.
    /// Deterministic: the same pixels give the same bytes. Written by temp + rename (a reader never sees a torn file).
    let write (path: string) (img: Image) =
        let ct = if img.Channels = 1 then SKColorType.Gray8 else SKColorType.Rgba8888
        let info = SKImageInfo(img.Width, img.Height, ct, SKAlphaType.Opaque)
        use bmp = new SKBitmap(info)
        let buf =
            if img.Channels = 1 then img.Pixels
            else
                let b = Array.zeroCreate<byte> (img.Width * img.Height * 4)
                for i in 0 .. img.Width * img.Height - 1 do
                    b[4 * i] <- img.Pixels[3 * i]
                    b[4 * i + 1] <- img.Pixels[3 * i + 1]
                    b[4 * i + 2] <- img.Pixels[3 * i + 2]
                    b[4 * i + 3] <- 255uy
                b
        Marshal.Copy(buf, 0, bmp.GetPixels(), buf.Length)
        let ext = Path.GetExtension(path).ToLowerInvariant()
        let format, quality =
            match ext with
            | ".png" -> SKEncodedImageFormat.Png, 100
            | ".jpg" | ".jpeg" -> SKEncodedImageFormat.Jpeg, 90
            | e -> invalidArg (nameof path) $"{path}: cannot encode '{e}' (use .png or .jpg)"
        use data = bmp.Encode(format, quality)
        if isNull data then invalidOp $"{path}: SkiaSharp could not encode the image"
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        if not (Directory.Exists dir) then Directory.CreateDirectory dir |> ignore
        Vct.Core.Platform.AtomicFile.writeAllBytes path (data.ToArray())

/// Pure resampling on `Image`.
[<RequireQualifiedAccess>]
module Resize =
    /// Nearest-neighbour resize (PIL NEAREST's pixel-centre rule: source = floor((dst + 0.5) * src / dst)); for masks.
    let nearest (width: int) (height: int) (img: Image) : Image =
        if width = img.Width && height = img.Height then img
        else
            let c = img.Channels
            let out = Array.zeroCreate<byte> (width * height * c)
            for y in 0 .. height - 1 do
                let sy = min (img.Height - 1) (int (floor ((float y + 0.5) * float img.Height / float height)))
                for x in 0 .. width - 1 do
                    let sx = min (img.Width - 1) (int (floor ((float x + 0.5) * float img.Width / float width)))
                    Array.blit img.Pixels ((sy * img.Width + sx) * c) out ((y * width + x) * c) c
            { Width = width; Height = height; Channels = c; Pixels = out }

    /// Pillow's resampling coefficients for one axis (`precompute_coeffs` + `normalize_coeffs_8bpc`): per output
    /// index the first input index, the tap count, and fixed-point weights with 22 fraction bits. The triangle
    /// filter's support grows with the shrink factor (antialiasing).
    let private pilCoefficients (inSize: int) (outSize: int) =
        let scale = float inSize / float outSize
        let filterScale = max scale 1.0
        let support = 1.0 * filterScale                        // bilinear support 1
        let kSize = int (ceil support) * 2 + 1
        let bounds = Array.zeroCreate<int> (outSize * 2)
        let kk = Array.zeroCreate<int> (outSize * kSize)
        let w = Array.zeroCreate<float> kSize
        for xx in 0 .. outSize - 1 do
            let center = (float xx + 0.5) * scale
            let ss = 1.0 / filterScale
            let xmin = max 0 (int (center - support + 0.5))
            let xmax = min inSize (int (center + support + 0.5)) - xmin
            let mutable ww = 0.0
            for x in 0 .. xmax - 1 do
                let t = abs ((float (x + xmin) - center + 0.5) * ss)
                w[x] <- (if t < 1.0 then 1.0 - t else 0.0)
                ww <- ww + w[x]
            for x in 0 .. kSize - 1 do
                let v = if x < xmax && ww <> 0.0 then w[x] / ww else 0.0
                kk[xx * kSize + x] <- int (v * float (1 <<< 22) + (if v < 0.0 then -0.5 else 0.5))
            bounds[2 * xx] <- xmin
            bounds[2 * xx + 1] <- xmax
        bounds, kk, kSize

    let inline private clip8 (v: int) = if v <= 0 then 0uy elif v >= (256 <<< 22) then 255uy else byte (v >>> 22)

    /// Bilinear resize exactly as Pillow's `Image.resize(..., BILINEAR)` on 8-bit images (the official preprocessing
    /// tools' and detectron2's resize): a separable triangle filter widened when shrinking, fixed-point weights,
    /// the horizontal pass first, each pass rounded to 8 bits.
    let bilinear (width: int) (height: int) (img: Image) : Image =
        if width = img.Width && height = img.Height then img
        else
            let c = img.Channels
            let half = 1 <<< 21
            // Horizontal pass (all rows), unless the width is unchanged.
            let tmp =
                if width = img.Width then img.Pixels
                else
                    let bounds, kk, kSize = pilCoefficients img.Width width
                    let out = Array.zeroCreate<byte> (width * img.Height * c)
                    for y in 0 .. img.Height - 1 do
                        let row = y * img.Width * c
                        for xx in 0 .. width - 1 do
                            let xmin, xmax, k = bounds[2 * xx], bounds[2 * xx + 1], xx * kSize
                            for ch in 0 .. c - 1 do
                                let mutable acc = half
                                for x in 0 .. xmax - 1 do
                                    acc <- acc + int img.Pixels[row + (x + xmin) * c + ch] * kk[k + x]
                                out[(y * width + xx) * c + ch] <- clip8 acc
                    out
            // Vertical pass, unless the height is unchanged.
            let pixels =
                if height = img.Height then tmp
                else
                    let bounds, kk, kSize = pilCoefficients img.Height height
                    let out = Array.zeroCreate<byte> (width * height * c)
                    for yy in 0 .. height - 1 do
                        let ymin, ymax, k = bounds[2 * yy], bounds[2 * yy + 1], yy * kSize
                        for x in 0 .. width - 1 do
                            for ch in 0 .. c - 1 do
                                let mutable acc = half
                                for y in 0 .. ymax - 1 do
                                    acc <- acc + int tmp[((y + ymin) * width + x) * c + ch] * kk[k + y]
                                out[(yy * width + x) * c + ch] <- clip8 acc
                    out
            { Width = width; Height = height; Channels = c; Pixels = pixels }
