namespace Vct.Core.Data

open System

/// Options of the training augmentation (docs/architecture.md §11.4; detectron2 transforms of the official
/// mappers in models/data/dataset_mappers/).
type AugmentOptions =
    { /// Crop and pad side (INPUT.CROP.SIZE, 384). The short-side choices scale with it.
      CropSize: int
      /// Apply the SSD colour jitter (INPUT.COLOR_AUG_SSD).
      ColorJitter: bool
      /// AVSS: squash every frame, GT and Maskige to a square of side min(H, W) first.
      SquashToSquare: bool }
    static member Default = { CropSize = 384; ColorJitter = true; SquashToSquare = false }

/// One augmented video.
type AugmentedVideo =
    { Frames: Image[]
      /// Label maps, padding = 255.
      Masks: Image[]
      PreMasks: Image[]
      /// The drawn parameters: short side, crop offset (x, y), flip.
      ShortSide: int
      CropX: int
      CropY: int
      Flip: bool }

/// Training augmentation as the official dataset mappers apply it: the geometric parameters are drawn once per video
/// (on frame 0) and reused for every frame, GT map and Maskige; the colour jitter redraws for every image it touches
/// (frames and Maskiges, not GT). Deterministic for a given `Random`.
[<RequireQualifiedAccess>]
module Augment =
    /// ResizeShortestEdge choices: int(x * 0.1 * crop) for x = 5..20 (192..768 for crop 384).
    let shortSides (crop: int) = [| for x in 5 .. 20 -> int (float x * 0.1 * float crop) |]

    /// detectron2 ResizeShortestEdge output size (h, w) for short side `s`, long side capped at `maxSize`.
    let resizedShape (h: int) (w: int) (s: int) (maxSize: int) =
        let scale = float s / float (min h w)
        let nh, nw = float h * scale, float w * scale
        let nh, nw =
            if max nh nw > float maxSize then
                let k = float maxSize / max nh nw
                nh * k, nw * k
            else nh, nw
        int (nh + 0.5), int (nw + 0.5)

    let private crop (x: int) (y: int) (w: int) (h: int) (img: Image) =
        let c = img.Channels
        let out = Array.zeroCreate<byte> (w * h * c)
        for yy in 0 .. h - 1 do
            Array.blit img.Pixels (((y + yy) * img.Width + x) * c) out (yy * w * c) (w * c)
        { Width = w; Height = h; Channels = c; Pixels = out }

    let private flip (img: Image) =
        let c = img.Channels
        let out = Array.zeroCreate<byte> img.Pixels.Length
        for y in 0 .. img.Height - 1 do
            for x in 0 .. img.Width - 1 do
                Array.blit img.Pixels ((y * img.Width + x) * c) out ((y * img.Width + (img.Width - 1 - x)) * c) c
        { img with Pixels = out }

    let private pad (side: int) (value: byte) (img: Image) =
        if img.Width >= side && img.Height >= side then img
        else
            let c = img.Channels
            let out = Array.create (side * side * c) value
            for y in 0 .. img.Height - 1 do
                Array.blit img.Pixels (y * img.Width * c) out (y * side * c) (img.Width * c)
            { Width = side; Height = side; Channels = c; Pixels = out }

    /// RGB <-> OpenCV-style HSV (H in 0..180, S and V in 0..255), in float.
    let private toHsv (r: float) (g: float) (b: float) =
        let v = max r (max g b)
        let m = min r (min g b)
        let s = if v = 0.0 then 0.0 else 255.0 * (v - m) / v
        let h =
            if v = m then 0.0
            elif v = r then 60.0 * (g - b) / (v - m)
            elif v = g then 120.0 + 60.0 * (b - r) / (v - m)
            else 240.0 + 60.0 * (r - g) / (v - m)
        let h = if h < 0.0 then h + 360.0 else h
        h / 2.0, s, v

    let private ofHsv (h: float) (s: float) (v: float) =
        let h = (h * 2.0) % 360.0
        let s = s / 255.0
        let c = v * s
        let x = c * (1.0 - abs ((h / 60.0) % 2.0 - 1.0))
        let m = v - c
        let r, g, b =
            match int (h / 60.0) with
            | 0 -> c, x, 0.0
            | 1 -> x, c, 0.0
            | 2 -> 0.0, c, x
            | 3 -> 0.0, x, c
            | 4 -> x, 0.0, c
            | _ -> c, 0.0, x
        r + m, g + m, b + m

    /// detectron2 `ColorAugSSDTransform` on one RGB image, its random numbers drawn from `rng`:
    /// brightness +U(-32, 32) (p 0.5); then, in random order, contrast xU(0.5, 1.5) (p 0.5) before or after
    /// saturation xU(0.5, 1.5) and hue +randint(-18, 18) on OpenCV's 0..180 scale (p 0.5 each); clipped to 0..255.
    /// NOTE: the HSV round trip is computed in float here; OpenCV's uint8 conversion rounds in between.
    let colorJitter (rng: Random) (img: Image) : Image =
        let n = img.Width * img.Height
        let px = Array.init (n * 3) (fun i -> float img.Pixels[i])
        let clip () = for i in 0 .. px.Length - 1 do px[i] <- max 0.0 (min 255.0 px[i])
        if rng.Next 2 = 1 then
            let d = rng.NextDouble() * 64.0 - 32.0
            for i in 0 .. px.Length - 1 do px[i] <- px[i] + d
            clip ()
        let contrast () =
            if rng.Next 2 = 1 then
                let a = 0.5 + rng.NextDouble()
                for i in 0 .. px.Length - 1 do px[i] <- px[i] * a
                clip ()
        let satHue () =
            let sat = if rng.Next 2 = 1 then Some(0.5 + rng.NextDouble()) else None
            let hue = if rng.Next 2 = 1 then Some(float (rng.Next(-18, 18))) else None
            if sat.IsSome || hue.IsSome then
                for i in 0 .. n - 1 do
                    let h, s, v = toHsv px[3 * i] px[3 * i + 1] px[3 * i + 2]
                    let s = match sat with Some a -> min 255.0 (s * a) | None -> s
                    let h = match hue with Some d -> ((h + d) % 180.0 + 180.0) % 180.0 | None -> h
                    let r, g, b = ofHsv h s v
                    px[3 * i] <- r
                    px[3 * i + 1] <- g
                    px[3 * i + 2] <- b
                clip ()
        if rng.Next 2 = 1 then
            contrast ()
            satHue ()
        else
            satHue ()
            contrast ()
        { img with Pixels = px |> Array.map (fun v -> byte (Math.Round v)) }

    /// Augments a decoded video: (AVSS) squash to square, resize shortest edge, random crop, colour jitter per image,
    /// horizontal flip, pad bottom/right to CropSize (images and Maskiges 128, GT 255).
    let video (opts: AugmentOptions) (rng: Random) (v: VideoSample) : AugmentedVideo =
        let squash (nearest: bool) (img: Image) =
            if opts.SquashToSquare && img.Width <> img.Height then
                let s = min img.Width img.Height
                if nearest then Resize.nearest s s img else Resize.bilinear s s img
            else img
        let frames = v.Frames |> Array.map (squash false)
        let masks = v.Masks |> Array.map (squash true)
        let pre = v.PreMasks |> Array.map (squash true)
        let f0 = frames[0]
        let choices = shortSides opts.CropSize
        let s = choices[rng.Next choices.Length]
        let nh, nw = resizedShape f0.Height f0.Width s (896 * opts.CropSize / 384)
        let ch, cw = min opts.CropSize nh, min opts.CropSize nw
        let y0 = rng.Next(nh - ch + 1)
        let x0 = rng.Next(nw - cw + 1)
        let geo (nearest: bool) (img: Image) =
            let r = if nearest then Resize.nearest nw nh img else Resize.bilinear nw nh img
            crop x0 y0 cw ch r
        // ColorAugSSD comes after the crop and before the flip in the transform list; the flip decision is drawn
        // when the flip transform is reached, i.e. after frame 0's jitter.
        let frames = frames |> Array.map (geo false)
        let masks = masks |> Array.map (geo true)
        // NOTE: the official mappers resize Maskiges with the image (bilinear) transform.
        let pre = pre |> Array.map (geo false)
        let jitter (img: Image) = if opts.ColorJitter then colorJitter rng img else img
        // Jitter order as the mapper's loop: frame 0 (then the flip is drawn), Maskige 0, frame 1, Maskige 1, ...
        let f0j = jitter frames[0]
        let doFlip = rng.Next 2 = 1
        let framesJ = Array.copy frames
        let preJ = Array.copy pre
        framesJ[0] <- f0j
        for i in 0 .. frames.Length - 1 do
            if i > 0 then framesJ[i] <- jitter frames[i]
            if i < pre.Length then preJ[i] <- jitter pre[i]
        let frames, pre = framesJ, preJ
        let fl (img: Image) = if doFlip then flip img else img
        { Frames = frames |> Array.map (fl >> pad opts.CropSize 128uy)
          Masks = masks |> Array.map (fl >> pad opts.CropSize 255uy)
          PreMasks = pre |> Array.map (fl >> pad opts.CropSize 128uy)
          ShortSide = s; CropX = x0; CropY = y0; Flip = doFlip }
