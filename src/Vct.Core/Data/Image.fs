namespace Vct.Core.Data

open System
open System.IO
open System.Runtime.InteropServices
open SkiaSharp

/// An 8-bit image in memory: `Channels` = 3 (RGB) or 1 (grey / label), row-major HWC bytes.
type Image =
    { Width: int
      Height: int
      Channels: int
      Pixels: byte[] }
    /// A blank image.
    static member Create(width: int, height: int, channels: int, ?fill: byte) =
        { Width = width; Height = height; Channels = channels
          Pixels = Array.create (width * height * channels) (defaultArg fill 0uy) }

/// Image decoding and encoding through SkiaSharp, with every decode result checked.
[<RequireQualifiedAccess>]
module ImageIO =
    let private bad (path: string) (why: string) : 'T = raise (InvalidDataException($"{path}: {why}"))

    /// Decodes any format SkiaSharp reads to unpremultiplied RGBA bytes. A file SKCodec cannot open, or one whose
    /// pixels do not all decode (a truncated PNG/JPEG gives `IncompleteInput` and a partly filled bitmap), fails
    /// with the file named.
    let decodeRgba (path: string) (bytes: byte[]) : int * int * byte[] =
        use data = SKData.CreateCopy bytes
        use codec = SKCodec.Create data
        if isNull codec then bad path "not a decodable image (unknown format or corrupt header)"
        let info = SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul)
        if info.Width <= 0 || info.Height <= 0 then bad path "image has no pixels"
        let pixels = Array.zeroCreate<byte> (info.Width * info.Height * 4)
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
            let mutable pos = 8
            let mutable result = None
            while result.IsNone && pos + 8 <= bytes.Length do
                let len = (int bytes[pos] <<< 24) ||| (int bytes[pos + 1] <<< 16) ||| (int bytes[pos + 2] <<< 8) ||| int bytes[pos + 3]
                let kind = Text.Encoding.ASCII.GetString(bytes, pos + 4, 4)
                if kind = "PLTE" && pos + 8 + len <= bytes.Length then
                    result <- Some(Array.init (len / 3) (fun i -> bytes[pos + 8 + 3 * i], bytes[pos + 9 + 3 * i], bytes[pos + 10 + 3 * i]))
                pos <- pos + 12 + len
                if len < 0 then pos <- bytes.Length
            result

    /// Reads an RGB image (alpha dropped).
    let readRgb (path: string) : Image =
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        let w, h, rgba = decodeRgba path (File.ReadAllBytes path)
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
        if not (File.Exists path) then raise (FileNotFoundException($"{path}: no such file", path))
        let bytes = File.ReadAllBytes path
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

    /// Encodes an image as PNG (grey for 1 channel, RGB otherwise) or JPEG (quality 90) by the path's extension.
    /// Deterministic: the same pixels give the same bytes.
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
        File.WriteAllBytes(path, data.ToArray())

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

    /// Bilinear resize with pixel-centre alignment (align_corners = false), rounding to nearest.
    /// NOTE: PIL's BILINEAR widens its filter when shrinking (antialiasing); this one does not, so downscaled
    /// frames differ from the official preprocessed files by a few grey levels.
    let bilinear (width: int) (height: int) (img: Image) : Image =
        if width = img.Width && height = img.Height then img
        else
            let c = img.Channels
            let out = Array.zeroCreate<byte> (width * height * c)
            let sx = float img.Width / float width
            let sy = float img.Height / float height
            for y in 0 .. height - 1 do
                let fy = max 0.0 ((float y + 0.5) * sy - 0.5)
                let y0 = min (img.Height - 1) (int fy)
                let y1 = min (img.Height - 1) (y0 + 1)
                let wy = fy - float y0
                for x in 0 .. width - 1 do
                    let fx = max 0.0 ((float x + 0.5) * sx - 0.5)
                    let x0 = min (img.Width - 1) (int fx)
                    let x1 = min (img.Width - 1) (x0 + 1)
                    let wx = fx - float x0
                    for k in 0 .. c - 1 do
                        let p (xx: int) (yy: int) = float img.Pixels[(yy * img.Width + xx) * c + k]
                        let v = (1.0 - wy) * ((1.0 - wx) * p x0 y0 + wx * p x1 y0) + wy * ((1.0 - wx) * p x0 y1 + wx * p x1 y1)
                        out[(y * width + x) * c + k] <- byte (min 255.0 (Math.Round v))
            { Width = width; Height = height; Channels = c; Pixels = out }
