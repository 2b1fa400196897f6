namespace Vct.Core.Data

open System
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Conversion of decoded images to tensors.
[<RequireQualifiedAccess>]
module Batch =
    /// RGB images (all the same size) -> [N, 3, H, W] float32 in 0..255 (the model normalises).
    let frames (images: Image[]) : Tensor =
        if images.Length = 0 then invalidArg (nameof images) "no images"
        let w, h = images[0].Width, images[0].Height
        let n = images.Length
        let data = Array.zeroCreate<float32> (n * 3 * h * w)
        images |> Array.iteri (fun k img ->
            if img.Width <> w || img.Height <> h || img.Channels <> 3 then
                invalidArg (nameof images) $"image {k} is {img.Width}x{img.Height}x{img.Channels}, expected {w}x{h}x3"
            let plane = h * w
            for i in 0 .. plane - 1 do
                for c in 0 .. 2 do
                    data[(k * 3 + c) * plane + i] <- float32 img.Pixels[3 * i + c])
        torch.tensor(data, ReadOnlySpan<int64>([| int64 n; 3L; int64 h; int64 w |]))

    /// Label maps (1 channel, same size) -> [N, H, W] int64.
    let labels (images: Image[]) : Tensor =
        if images.Length = 0 then invalidArg (nameof images) "no label maps"
        let w, h = images[0].Width, images[0].Height
        let data =
            images |> Array.mapi (fun k img ->
                if img.Width <> w || img.Height <> h || img.Channels <> 1 then
                    invalidArg (nameof images) $"label map {k} is {img.Width}x{img.Height}x{img.Channels}, expected {w}x{h}x1"
                img.Pixels |> Array.map int64)
            |> Array.concat
        torch.tensor(data, ReadOnlySpan<int64>([| int64 images.Length; int64 h; int64 w |]))

/// Ready-made loaders over a dataset split.
[<RequireQualifiedAccess>]
module Pipeline =
    /// Training batches: decode (`load`), augment (`aug`, seeded per video and epoch) in parallel with prefetch.
    let trainLoader (opts: LoaderOptions) (load: LoadOptions) (aug: AugmentOptions) (records: VideoRecord[]) =
        BatchLoader(records, opts, fun r rng -> Augment.video aug rng (Avsbench.loadVideo load r))

    /// Evaluation videos in order (no augmentation), decoded in parallel with prefetch, one video per batch.
    let evalLoader (workers: int) (load: LoadOptions) (records: VideoRecord[]) =
        BatchLoader(records, { LoaderOptions.Default with BatchSize = 1; Shuffle = false; Workers = workers; DropLast = false }, fun r _ -> Avsbench.loadVideo load r)
