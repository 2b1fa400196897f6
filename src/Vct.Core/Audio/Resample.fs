namespace Vct.Core.Audio

open System
open System.Threading.Tasks
open TorchSharp
open Vct.Core
open Vct.Core.Platform

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

    let private buildPlan (f: SincFilter) (srIn: int) (srOut: int) =
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

    let private plans = Collections.Concurrent.ConcurrentDictionary<struct (SincFilter * int * int), Plan>()

    /// The plan of a rate pair, built once per process (its tables are a few MB and took longer to allocate and
    /// fill than a 10 s clip takes to resample).
    let private plan (f: SincFilter) (srIn: int) (srOut: int) =
        plans.GetOrAdd(struct (f, srIn, srOut), fun _ -> buildPlan f srIn srOut)

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

    /// Largest polyphase tap table (entries) the fast path builds; beyond it `direct` is used.
    let private maxPolyphaseEntries = 8_000_000L

    /// Per-phase taps of `fast` for one rate pair. Phase r's taps are Tw/Td[r * Width .. r * Width + KL[r] + KR[r]):
    /// KL[r] left taps (reversed, so in input order x[n-KL+1 .. n]) then KR[r] right taps (x[n+1 .. n+KR]); both
    /// wings are padded with zero taps (on their outer side) to a multiple of two SIMD vectors.
    type private Polyphase =
        { Plan: Plan
          OffL: int[]
          OffR: int[]
          KL: int[]
          KR: int[]
          Width: int
          Tw: float[]
          Td: float[] }

    let private polyphases = Collections.Concurrent.ConcurrentDictionary<struct (SincFilter * int * int), Polyphase option>()

    /// The taps of a rate pair (None when the table would exceed maxPolyphaseEntries), built once per process.
    let private polyphase (f: SincFilter) (srIn: int) (srOut: int) =
        polyphases.GetOrAdd(struct (f, srIn, srOut), fun _ ->
            let g = int (Numerics.BigInteger.GreatestCommonDivisor(Numerics.BigInteger srIn, Numerics.BigInteger srOut))
            let pl = plan f srIn srOut
            let nwin = pl.Win.Length
            let phases = srOut / g
            let pos = Array.init phases (position pl)
            let wings =
                pos |> Array.map (fun (struct (_, offL, _, offR, _)) ->
                    (nwin - offL) / pl.IndexStep, (nwin - offR) / pl.IndexStep)
            let block = 2 * Numerics.Vector<float>.Count
            let padded k = (k + block - 1) / block * block
            let width = wings |> Array.map (fun (l, r) -> padded l + padded r) |> Array.max
            if int64 phases * int64 width > maxPolyphaseEntries then None
            else
                let tw = Array.zeroCreate<float> (phases * width)
                let td = Array.zeroCreate<float> (phases * width)
                for r in 0 .. phases - 1 do
                    let struct (_, offL, _, offR, _) = pos[r]
                    let kL, kR = wings[r]
                    let pL = padded kL
                    let b = r * width
                    for i in 0 .. kL - 1 do
                        let j = offL + i * pl.IndexStep
                        tw[b + pL - 1 - i] <- pl.Win[j]
                        td[b + pL - 1 - i] <- pl.Delta[j]
                    for k in 0 .. kR - 1 do
                        let j = offR + k * pl.IndexStep
                        tw[b + pL + k] <- pl.Win[j]
                        td[b + pL + k] <- pl.Delta[j]
                Some { Plan = pl
                       OffL = pos |> Array.map (fun (struct (_, o, _, _, _)) -> o)
                       OffR = pos |> Array.map (fun (struct (_, _, _, o, _)) -> o)
                       KL = wings |> Array.map (fst >> padded)
                       KR = wings |> Array.map (snd >> padded)
                       Width = width; Tw = tw; Td = td })

    /// Outputs [t0, t1) of `fast` (see there): per output one SIMD pass over both wings accumulating
    /// Σ win·x and Σ delta·x with fused multiply-adds, two accumulators each to hide their latency. The loads are
    /// unchecked: the condition before them keeps every index inside x and inside the phase's taps.
    [<Runtime.CompilerServices.MethodImpl(Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)>]
    let private polyphaseRange (pp: Polyphase) (x: float[]) (y: float[]) (t0: int) (t1: int) =
        let pl, offLs, offRs, kLs, kRs, width, tw, td = pp.Plan, pp.OffL, pp.OffR, pp.KL, pp.KR, pp.Width, pp.Tw, pp.Td
        let lanes = Numerics.Vector<float>.Count
        let phases = offLs.Length
        let mutable r = t0 % phases
        for t in t0 .. t1 - 1 do
            let struct (n, offL, etaL, offR, etaR) = position pl t
            let kL, kR = kLs[r], kRs[r]
            if offL <> offLs[r] || offR <> offRs[r] || n + 1 < kL || n + 1 + kR > x.Length then
                y[t] <- kernelAt pl x t
            else
                let b = r * width
                let s = n + 1 - kL
                let mutable w0 = Numerics.Vector<float>.Zero
                let mutable w1 = Numerics.Vector<float>.Zero
                let mutable d0 = Numerics.Vector<float>.Zero
                let mutable d1 = Numerics.Vector<float>.Zero
                let mutable sdl = 0.0
                let mutable j = 0
                let stop = kL + kR
                while j < stop do
                    if j = kL then
                        // Left wing done: bank its delta sum, the right wing's starts afresh.
                        sdl <- Numerics.Vector.Sum(d0 + d1)
                        d0 <- Numerics.Vector<float>.Zero
                        d1 <- Numerics.Vector<float>.Zero
                    let x0 = Numerics.Vector.LoadUnsafe(&x[s], unativeint j)
                    let x1 = Numerics.Vector.LoadUnsafe(&x[s], unativeint (j + lanes))
                    w0 <- Numerics.Vector.FusedMultiplyAdd(Numerics.Vector.LoadUnsafe(&tw[b], unativeint j), x0, w0)
                    d0 <- Numerics.Vector.FusedMultiplyAdd(Numerics.Vector.LoadUnsafe(&td[b], unativeint j), x0, d0)
                    w1 <- Numerics.Vector.FusedMultiplyAdd(Numerics.Vector.LoadUnsafe(&tw[b], unativeint (j + lanes)), x1, w1)
                    d1 <- Numerics.Vector.FusedMultiplyAdd(Numerics.Vector.LoadUnsafe(&td[b], unativeint (j + lanes)), x1, d1)
                    j <- j + 2 * lanes
                let sdr =
                    if kR = 0 then
                        sdl <- Numerics.Vector.Sum(d0 + d1)
                        0.0
                    else Numerics.Vector.Sum(d0 + d1)
                y[t] <- Numerics.Vector.Sum(w0 + w1) + etaL * sdl + etaR * sdr
            r <- r + 1
            if r = phases then r <- 0

    /// Polyphase form of resampy's loop. With g = gcd(srIn, srOut) the table offsets of the outputs repeat
    /// every q = srOut / g outputs, so each phase's taps (win and delta of both wings, gathered at the table
    /// stride) are laid out once, contiguously and in input order; an output is then
    ///   y = Σ win·x + eta_L Σ delta_L·x + eta_R Σ delta_R·x
    /// over the contiguous inputs x[n-kL+1 .. n+kR], with SIMD dot products. n, eta_L and eta_R are each
    /// output's own, computed exactly as resampy does (t * (1/ratio) in float64, so eta drifts with t). The
    /// products are resampy's (win + eta·delta)·x regrouped, so results agree up to float64 rounding. Outputs
    /// whose table offsets leave their phase's (the float64 position fell on the other side of an integer) and
    /// outputs whose window is cut by either end of the signal use the exact loop. Rate pairs with very many
    /// phases (q * taps > 8M, e.g. 44099 Hz) use `direct`.
    let fast (f: SincFilter) (srIn: int) (srOut: int) (x: float[]) : float[] =
        checkRates srIn srOut
        if srIn = srOut then Array.copy x
        else
            let nOut = outputLength srIn srOut x.Length
            if nOut < 1 then invalidArg (nameof x) $"{x.Length} samples are too few to resample from {srIn} to {srOut} Hz"
            match polyphase f srIn srOut with
            | None -> direct f srIn srOut x
            | Some pp ->
                let y = Array.zeroCreate<float> nOut
                let chunk = 4096
                Parallel.For(0, (nOut + chunk - 1) / chunk, fun c ->
                    polyphaseRange pp x y (c * chunk) (min nOut ((c + 1) * chunk))) |> ignore
                y

    /// resampy `kaiser_best` resampling (the official front end's), fast path.
    let kaiserBest (srIn: int) (srOut: int) (x: float[]) = fast SincFilter.KaiserBest srIn srOut x
