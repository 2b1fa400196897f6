namespace Vct.Core.Backbone

open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Parameter-free window arithmetic of the Swin backbone
/// (reference: models/modeling/backbone/swinb.py, window_partition / window_reverse / WindowAttention / BasicLayer).
[<RequireQualifiedAccess>]
module Windows =
    /// Smallest multiple of `m` that is >= `n`.
    let roundUp (m: int64) (n: int64) = ((n + m - 1L) / m) * m

    /// Splits a map into non-overlapping windows, row-major over windows.
    ///   x: [B, H, W, C] (H, W multiples of ws) -> [B*nW, ws, ws, C]
    let partition (ws: int64) (x: Tensor) : Tensor =
        Shape.requireRank (nameof x) 4 x
        let b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if h % ws <> 0L || w % ws <> 0L then
            invalidArg (nameof x) $"map {Shape.show x} is not a multiple of the window size {ws}"
        Scope.run (fun () ->
            x.view(b, h / ws, ws, w / ws, ws, c)
             .permute(0L, 1L, 3L, 2L, 4L, 5L)
             .contiguous()
             .view(-1L, ws, ws, c))                                   // [B*nW, ws, ws, C]

    /// Inverse of `partition`.
    ///   windows: [B*nW, ws, ws, C] -> [B, H, W, C]
    let reverse (ws: int64) (h: int64) (w: int64) (windows: Tensor) : Tensor =
        Shape.requireRank (nameof windows) 4 windows
        let nW = (h / ws) * (w / ws)
        if h % ws <> 0L || w % ws <> 0L || windows.shape[0] % nW <> 0L then
            invalidArg (nameof windows) $"windows {Shape.show windows} do not tile a {h}x{w} map with window {ws}"
        let b = windows.shape[0] / nW
        Scope.run (fun () ->
            windows.view(b, h / ws, w / ws, ws, ws, -1L)
                   .permute(0L, 1L, 3L, 2L, 4L, 5L)
                   .contiguous()
                   .view(b, h, w, -1L))                                // [B, H, W, C]

    /// Pair-wise relative-position index of the tokens of a ws x ws window (row-major):
    /// for tokens (y1, x1), (y2, x2): (y1 - y2 + ws - 1) * (2 ws - 1) + (x1 - x2 + ws - 1).
    ///   -> int64 [ws*ws, ws*ws], values in [0, (2 ws - 1)^2)
    let relativePositionIndex (ws: int64) : Tensor =
        Scope.run (fun () ->
            let r = torch.arange(ws.AsScalar, dtype = torch.int64)
            let ys = r.repeat_interleave(ws)                          // [ws*ws] row of each token
            let xs = r.repeat(ws)                                     // [ws*ws] column of each token
            let dy = ys.unsqueeze(1) - ys.unsqueeze(0) + (ws - 1L).AsScalar   // [N, N]
            let dx = xs.unsqueeze(1) - xs.unsqueeze(0) + (ws - 1L).AsScalar
            dy * (2L * ws - 1L).AsScalar + dx)

    /// Region label (0..8) of each position of the padded map for the shifted-window mask: rows and columns are
    /// split into [0, P - ws), [P - ws, P - shift), [P - shift, P); label = 3 * rowPart + colPart.
    ///   -> float32 [1, Hp, Wp, 1]
    let regionIds (hp: int64) (wp: int64) (ws: int64) (shift: int64) (device: torch.Device) : Tensor =
        let part (p: int64) (i: int64) = if i < p - ws then 0L elif i < p - shift then 1L else 2L
        Scope.run (fun () ->
            let rows = Array.init (int hp) (fun i -> float32 (part hp (int64 i)))
            let cols = Array.init (int wp) (fun j -> float32 (part wp (int64 j)))
            let r = torch.tensor(rows, device = device).view(1L, hp, 1L, 1L)
            let c = torch.tensor(cols, device = device).view(1L, 1L, wp, 1L)
            r * 3.0f.AsScalar + c)                                  // [1, Hp, Wp, 1]

    /// Additive attention mask of the shifted windows: 0 where two tokens of a window come from the same region
    /// of the (cyclically shifted) padded map, -100 (the reference value, not -inf) where they do not.
    ///   -> float32 [nW, ws*ws, ws*ws]
    let shiftMask (hp: int64) (wp: int64) (ws: int64) (shift: int64) (device: torch.Device) : Tensor =
        if hp % ws <> 0L || wp % ws <> 0L then
            invalidArg (nameof hp) $"padded map {hp}x{wp} is not a multiple of the window size {ws}"
        Scope.run (fun () ->
            let ids = partition ws (regionIds hp wp ws shift device)  // [nW, ws, ws, 1]
            let ids = ids.view(-1L, ws * ws)                          // [nW, N]
            let diff = ids.unsqueeze(1) - ids.unsqueeze(2)            // [nW, N, N]
            torch.zeros_like(diff).masked_fill(diff.ne(0.0f.AsScalar), (-100.0f).AsScalar))
