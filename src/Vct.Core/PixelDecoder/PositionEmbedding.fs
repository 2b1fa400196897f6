namespace Vct.Core.PixelDecoder

open System
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Sine position embedding without padding masks (reference: transformer_decoder/position_encoding.py,
/// PositionEmbeddingSine with mask None).
[<RequireQualifiedAccess>]
module PositionEmbedding =
    /// `numPosFeats` features per axis; with `normalize` the 1-based row/column index is divided by its last value
    /// (+1e-6) and multiplied by `scale` (2π). Channels 0..F-1 are the y (row) embedding, F..2F-1 the x (column)
    /// one; within each, even channels are sin and odd channels cos of index / temperature^(2⌊i/2⌋/F).
    ///   (B, H, W) -> float32 [B, 2F, H, W]
    let sineWith (numPosFeats: int64) (temperature: float) (normalize: bool) (scale: float)
                 (b: int64) (h: int64) (w: int64) (device: torch.Device) : Tensor =
        if numPosFeats % 2L <> 0L then invalidArg (nameof numPosFeats) $"numPosFeats {numPosFeats} must be even"
        Scope.run (fun () ->
            let ones = torch.ones(b, h, w, dtype = torch.float32, device = device)
            let yEmbed = ones.cumsum(1L)                                              // [B, H, W], 1..H
            let xEmbed = ones.cumsum(2L)                                              // [B, H, W], 1..W
            let yEmbed, xEmbed =
                if normalize then
                    let eps = 1e-6
                    yEmbed / (yEmbed.narrow(1L, h - 1L, 1L) + eps.AsScalar) * scale.AsScalar,
                    xEmbed / (xEmbed.narrow(2L, w - 1L, 1L) + eps.AsScalar) * scale.AsScalar
                else yEmbed, xEmbed
            let dimT = torch.arange(numPosFeats.AsScalar, dtype = torch.float32, device = device)
            let exponent = (dimT.floor_divide(2.0f.AsScalar) * 2.0f.AsScalar).div((float32 numPosFeats).AsScalar)
            let dimT = torch.pow(torch.tensor(float32 temperature, device = device), exponent)                      // [F]
            let embed (e: Tensor) =
                let p = e.unsqueeze(-1L) / dimT                                        // [B, H, W, F]
                let sin = p.slice(3L, 0L, numPosFeats, 2L).sin()
                let cos = p.slice(3L, 1L, numPosFeats, 2L).cos()
                torch.stack([| sin; cos |], 4L).flatten(3L)                            // [B, H, W, F] interleaved
            torch.cat([| embed yEmbed; embed xEmbed |], 3L).permute(0L, 3L, 1L, 2L).contiguous())

    /// The pixel decoder's and the transformer decoder's setting: normalised, temperature 10000, scale 2π.
    ///   numPosFeats F, x: [B, C, H, W] (only its shape and device are read) -> [B, 2F, H, W]
    let sine (numPosFeats: int64) (x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        sineWith numPosFeats 10000.0 true (2.0 * Math.PI) x.shape[0] x.shape[2] x.shape[3] x.device
