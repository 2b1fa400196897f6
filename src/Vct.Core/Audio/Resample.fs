namespace Vct.Core.Audio

open System
open System.Threading.Tasks
open TorchSharp
open Vct.Core

/// A Kaiser-windowed sinc interpolation filter as resampy builds it (reference: resampy 0.4.2
/// `filters.sinc_window`; the shipped `kaiser_best.npz` table is this function of these parameters).
type SincFilter =
    { /// Zero crossings kept on each side of the sinc.
      NumZeros: int
      /// log2 of the table entries per zero crossing.
      PrecisionBits: int
      /// Kaiser window shape parameter.
      Beta: float
      /// Cut-off as a fraction of Nyquist.
      Rolloff: float }
    /// resampy's default filter `kaiser_best` (it produced the official features). These four values
    /// rebuild the shipped table to 3e-16.
    static member KaiserBest = { NumZeros = 50; PrecisionBits = 13; Beta = 12.9846; Rolloff = 0.917347 }
    /// resampy's `kaiser_fast`.
    static member KaiserFast = { NumZeros = 24; PrecisionBits = 9; Beta = 9.90322; Rolloff = 0.868212 }
    /// Table entries per zero crossing (2^PrecisionBits).
    member f.NumTable = 1 <<< f.PrecisionBits

/// Band-limited resampling that reproduces `resampy.resample(x, sr_orig, sr_new)` (resampy 0.4.2,
/// `interpn._resample_loop`) up to float64 rounding.
[<RequireQualifiedAccess>]
module Resample =
    /// Modified Bessel function of the first kind, order 0 (power series; relative error ~1e-16 for |x| < 50).
    let besselI0 (x: float) =
        let q = x * x / 4.0
        let mutable term = 1.0
        let mutable sum = 1.0
        let mutable k = 1.0
        while term > sum * 1e-18 do
            term <- term * q / (k * k)
            sum <- sum + term
            k <- k + 1.0
        sum

    /// The right half of the interpolation filter: `rolloff * sinc(rolloff * t) * kaiser(t)` at
    /// t = j / 2^PrecisionBits, j = 0 .. NumZeros * 2^PrecisionBits (the symmetric Kaiser window of length
    /// 2n+1, right half, as `scipy.signal.kaiser`).
    let halfWindow (f: SincFilter) : float[] =
        if f.NumZeros < 1 || f.PrecisionBits < 0 || not (f.Rolloff > 0.0 && f.Rolloff <= 1.0) then
            invalidArg (nameof f) $"invalid sinc filter {f}"
        let n = f.NumTable * f.NumZeros
        let step = float f.NumZeros / float n          // np.linspace(0, num_zeros, n + 1)
        let i0Beta = besselI0 f.Beta
        Array.init (n + 1) (fun j ->
            let t = if j = n then float f.NumZeros else float j * step
            let sinc =
                let y = Math.PI * (if f.Rolloff * t = 0.0 then 1.0e-20 else f.Rolloff * t)
                sin y / y
            let r = float j / float n                   // (k - alpha) / alpha of the full window
            let taper = besselI0 (f.Beta * sqrt (1.0 - r * r)) / i0Beta
            f.Rolloff * sinc * taper)

    let private kaiserBestTable = lazy (halfWindow SincFilter.KaiserBest)

    let private tableOf (f: SincFilter) =
        if f = SincFilter.KaiserBest then kaiserBestTable.Value else halfWindow f

    /// Output length for `nIn` samples, as resampy: int(n * sr_new / sr_orig).
    let outputLength (srIn: int) (srOut: int) (nIn: int) = int (float nIn * float srOut / float srIn)

    /// Everything the per-output kernel needs.
    type private Plan =
        { Win: float[]
          Delta: float[]
          NumTable: float
          Scale: float
          IndexStep: int
          TimeIncrement: float }

    let private plan (f: SincFilter) (srIn: int) (srOut: int) =
        let ratio = float srOut / float srIn
        let baseWin = tableOf f
        let win = if ratio < 1.0 then baseWin |> Array.map (fun v -> ratio * v) else baseWin
        let delta = Array.init win.Length (fun i -> if i + 1 < win.Length then win[i + 1] - win[i] else 0.0)
        let scale = min 1.0 ratio
        { Win = win
          Delta = delta
          NumTable = float f.NumTable
          Scale = scale
          IndexStep = int (scale * float f.NumTable)
          TimeIncrement = 1.0 / ratio }

    /// Filter-table position of one output: input index n, then (offset, eta) of the left and right wings.
    let inline private position (p: Plan) (t: int) =
        let time = float t * p.TimeIncrement
        let n = int time
        let frac = p.Scale * (time - float n)
        let indexFrac = frac * p.NumTable
        let offL = int indexFrac
        let etaL = indexFrac - float offL
        let fracR = p.Scale - frac
        let indexFracR = fracR * p.NumTable
        let offR = int indexFracR
        let etaR = indexFracR - float offR
        struct (n, offL, etaL, offR, etaR)

    /// One output sample exactly as resampy's loop computes it (same terms, same order).
    let private kernelAt (p: Plan) (x: float[]) (t: int) =
        let struct (n, offL, etaL, offR, etaR) = position p t
        let nwin = p.Win.Length
        let mutable y = 0.0
        let iMax = min (n + 1) ((nwin - offL) / p.IndexStep)
        for i in 0 .. iMax - 1 do
            let j = offL + i * p.IndexStep
            let w = p.Win[j] + etaL * p.Delta[j]
            y <- y + w * x[n - i]
        let kMax = min (x.Length - n - 1) ((nwin - offR) / p.IndexStep)
        for k in 0 .. kMax - 1 do
            let j = offR + k * p.IndexStep
            let w = p.Win[j] + etaR * p.Delta[j]
            y <- y + w * x[n + k + 1]
        y

    let private checkRates (srIn: int) (srOut: int) =
        if srIn <= 0 then invalidArg (nameof srIn) $"invalid sample rate {srIn}"
        if srOut <= 0 then invalidArg (nameof srOut) $"invalid sample rate {srOut}"

    /// Plain loop over outputs (parallel over chunks): the reference for the fast path and its fallback.
    let direct (f: SincFilter) (srIn: int) (srOut: int) (x: float[]) : float[] =
        checkRates srIn srOut
        if srIn = srOut then Array.copy x
        else
            let p = plan f srIn srOut
            let nOut = outputLength srIn srOut x.Length
            if nOut < 1 then invalidArg (nameof x) $"{x.Length} samples are too few to resample from {srIn} to {srOut} Hz"
            let y = Array.zeroCreate<float> nOut
            let chunk = 4096
            Parallel.For(0, (nOut + chunk - 1) / chunk, fun c ->
                for t in c * chunk .. min nOut ((c + 1) * chunk) - 1 do
                    y[t] <- kernelAt p x t) |> ignore
            y

    /// Largest polyphase weight matrix (entries) the fast path builds; beyond it `direct` is used.
    let private maxPolyphaseEntries = 16_000_000L

    /// Polyphase form: with g = gcd(srIn, srOut), every q = srOut/g outputs the input advances p = srIn/g
    /// samples and the table offsets repeat. With X the zero-padded input viewed as [rows, p], the outputs are
    /// Σ_a X[a : a+M] @ W_a (float64 GEMMs) where W holds, per phase, three columns: Σ win over both wings, and
    /// the left and right Σ delta, so that y[t] = base + eta_L(t) * dL + eta_R(t) * dR with each output's own
    /// interpolation factors (eta drifts with t because resampy computes t * (1/ratio) in float64). Outputs
    /// whose table offsets or input index differ from their phase's (the float64 position fell on the other
    /// side of an integer) are recomputed with the exact loop.
    let fast (f: SincFilter) (srIn: int) (srOut: int) (x: float[]) : float[] =
        checkRates srIn srOut
        if srIn = srOut then Array.copy x
        else
            let nOut = outputLength srIn srOut x.Length
            if nOut < 1 then invalidArg (nameof x) $"{x.Length} samples are too few to resample from {srIn} to {srOut} Hz"
            let g = int (Numerics.BigInteger.GreatestCommonDivisor(Numerics.BigInteger srIn, Numerics.BigInteger srOut))
            // NOTE: a period of q < 32 outputs (48 kHz: q = 1) would make many skinny GEMMs; k periods are
            // grouped into one super-period of k*q outputs (the phases are then k*q distinct outputs).
            let k = max 1 ((32 + srOut / g - 1) / (srOut / g))
            let pIn, q = k * (srIn / g), k * (srOut / g)
            let pl = plan f srIn srOut
            let nwin = pl.Win.Length
            let phases = min q nOut
            let pos = Array.init phases (position pl)
            let wings =
                pos |> Array.map (fun (struct (_, offL, _, offR, _)) ->
                    (nwin - offL) / pl.IndexStep, (nwin - offR) / pl.IndexStep)
            let kl = wings |> Array.map fst |> Array.max
            let kr = wings |> Array.map snd |> Array.max
            let nMax = pos |> Array.map (fun (struct (n, _, _, _, _)) -> n) |> Array.max
            let dmin = 1 - kl                         // n_0 = 0
            let dmax = nMax + kr
            let lw = dmax - dmin + 1
            let a = (lw + pIn - 1) / pIn              // GEMMs
            let cols = 3 * q
            if int64 (a * pIn) * int64 cols > maxPolyphaseEntries then direct f srIn srOut x
            else
                // [A*p, 3q], row = d - dmin; columns [0, q): win (both wings), [q, 2q): left delta, [2q, 3q): right delta.
                let w = Array.zeroCreate<float> (a * pIn * cols)
                for r in 0 .. phases - 1 do
                    let struct (n, offL, _, offR, _) = pos[r]
                    let iW, kW = wings[r]
                    for i in 0 .. iW - 1 do
                        let j = offL + i * pl.IndexStep
                        let row = (n - i - dmin) * cols
                        w[row + r] <- w[row + r] + pl.Win[j]
                        w[row + q + r] <- w[row + q + r] + pl.Delta[j]
                    for k in 0 .. kW - 1 do
                        let j = offR + k * pl.IndexStep
                        let row = (n + 1 + k - dmin) * cols
                        w[row + r] <- w[row + r] + pl.Win[j]
                        w[row + 2 * q + r] <- w[row + 2 * q + r] + pl.Delta[j]
                let m = (nOut + q - 1) / q
                let rows = m + a - 1
                let padL = -dmin
                // Per-output interpolation factors, and the outputs that leave their phase's offsets.
                let etaL = Array.zeroCreate<float> (m * q)
                let etaR = Array.zeroCreate<float> (m * q)
                let odd = Collections.Concurrent.ConcurrentBag<int>()
                Parallel.For(0, nOut, fun t ->
                    let struct (n, offL, eL, offR, eR) = position pl t
                    etaL[t] <- eL
                    etaR[t] <- eR
                    let struct (n0, offL0, _, offR0, _) = pos[t % q]
                    if n <> n0 + (t / q) * pIn || offL <> offL0 || offR <> offR0 then odd.Add t) |> ignore
                let y =
                    Scope.runValue (fun () ->
                        let xp = torch.zeros([| int64 rows * int64 pIn |], dtype = torch.float64)
                        let avail = min x.Length (rows * pIn - padL)
                        xp.narrow(0L, int64 padL, int64 avail).copy_(torch.tensor(x.AsSpan(0, avail).ToArray(), dtype = torch.float64)) |> ignore
                        let xv = xp.view(int64 rows, int64 pIn)                                   // [rows, p]
                        let wt = torch.tensor(w, ReadOnlySpan<int64>([| int64 (a * pIn); int64 cols |]), dtype = torch.float64)
                        let acc = torch.zeros([| int64 m; int64 cols |], dtype = torch.float64)  // [M, 3q]
                        for i in 0 .. a - 1 do
                            acc.addmm_(xv.narrow(0L, int64 i, int64 m), wt.narrow(0L, int64 (i * pIn), int64 pIn)) |> ignore
                        let el = torch.tensor(etaL, dtype = torch.float64).view(int64 m, int64 q)
                        let er = torch.tensor(etaR, dtype = torch.float64).view(int64 m, int64 q)
                        let out =
                            acc.narrow(1L, 0L, int64 q)
                            + el * acc.narrow(1L, int64 q, int64 q)
                            + er * acc.narrow(1L, int64 (2 * q), int64 q)                          // [M, q]
                        out.reshape(-1L).narrow(0L, 0L, int64 nOut).data<float>().ToArray())
                for t in odd do
                    y[t] <- kernelAt pl x t
                y

    /// resampy `kaiser_best` resampling (the official front end's), fast path.
    let kaiserBest (srIn: int) (srOut: int) (x: float[]) = fast SincFilter.KaiserBest srIn srOut x
