namespace Vct.Core.Audio

open System
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// VGGish front-end constants (official: torchvggish `vggish_params.py` and `mel_features.py`).
[<RequireQualifiedAccess>]
module VggishParams =
    [<Literal>]
    let SampleRate = 16000

    /// 0.025 s.
    [<Literal>]
    let WindowLength = 400

    /// 0.010 s.
    [<Literal>]
    let HopLength = 160

    /// Next power of two >= WindowLength.
    [<Literal>]
    let FftLength = 512

    [<Literal>]
    let NumMelBins = 64

    [<Literal>]
    let MelMinHz = 125.0

    [<Literal>]
    let MelMaxHz = 7500.0

    [<Literal>]
    let LogOffset = 0.01

    /// Frames per example (0.96 s) and the hop between examples (no overlap).
    [<Literal>]
    let ExampleFrames = 96

    [<Literal>]
    let ExampleHop = 96

    /// Fewest 16 kHz samples that give one example: 400 + 95 * 160.
    [<Literal>]
    let MinSamplesForExample = 15600

/// Waveform -> log-mel spectrogram -> [n, 1, 96, 64] examples, as torchvggish `mel_features.py` and
/// `vggish_input.waveform_to_examples` (without the resampling, see `Resample`).
[<RequireQualifiedAccess>]
module LogMel =
    /// HTK mel scale: 1127 ln(1 + f / 700).
    let hertzToMel (hz: float) = 1127.0 * log (1.0 + hz / 700.0)

    /// `spectrogram_to_mel_matrix`: [bins, melBins] triangular weights in the mel domain, no area
    /// normalisation, DC row zero. Row-major float64.
    let melMatrix (numBins: int) (sampleRate: float) (numMel: int) (lowHz: float) (highHz: float) : float[,] =
        let nyquist = sampleRate / 2.0
        if lowHz < 0.0 then invalidArg (nameof lowHz) $"lower edge {lowHz} Hz must be >= 0"
        if lowHz >= highHz then invalidArg (nameof highHz) $"lower edge {lowHz} Hz >= upper edge {highHz} Hz"
        if highHz > nyquist then invalidArg (nameof highHz) $"upper edge {highHz} Hz is above Nyquist {nyquist} Hz"
        // np.linspace(start, stop, num): start + i * ((stop - start) / (num - 1)), last = stop.
        let linspace (a: float) (b: float) (num: int) =
            let step = (b - a) / float (num - 1)
            Array.init num (fun i -> if i = num - 1 then b else float i * step + a)
        let binsMel = linspace 0.0 nyquist numBins |> Array.map hertzToMel
        let edges = linspace (hertzToMel lowHz) (hertzToMel highHz) (numMel + 2)
        Array2D.init numBins numMel (fun b i ->
            if b = 0 then 0.0
            else
                let lo, c, hi = edges[i], edges[i + 1], edges[i + 2]
                let lower = (binsMel[b] - lo) / (c - lo)
                let upper = (hi - binsMel[b]) / (hi - c)
                max 0.0 (min lower upper))

    /// The VGGish mel matrix [257, 64].
    let vggishMelMatrix = lazy (melMatrix (VggishParams.FftLength / 2 + 1) (float VggishParams.SampleRate) VggishParams.NumMelBins VggishParams.MelMinHz VggishParams.MelMaxHz)

    /// Periodic Hann: 0.5 - 0.5 cos(2 pi n / N), n = 0..N-1.
    let periodicHann (n: int) = Array.init n (fun i -> 0.5 - 0.5 * cos (2.0 * Math.PI / float n * float i))

    /// STFT frames of an N-sample signal: 1 + floor((N - 400) / 160), 0 when N < 400 (no padding).
    let frameCount (samples: int) =
        if samples < VggishParams.WindowLength then 0
        else 1 + (samples - VggishParams.WindowLength) / VggishParams.HopLength

    /// Whole examples in F log-mel frames: 1 + floor((F - 96) / 96), 0 when F < 96.
    let exampleCount (frames: int) =
        if frames < VggishParams.ExampleFrames then 0
        else 1 + (frames - VggishParams.ExampleFrames) / VggishParams.ExampleHop

    /// The Hann window [400] and the mel matrix [257, 64] per dtype and device, built once and kept for the
    /// process (outside every dispose scope): rebuilding them cost about a third of a 10 s clip's log-mel.
    let private constantCache = Collections.Concurrent.ConcurrentDictionary<struct (torch.ScalarType * string), struct (Tensor * Tensor)>()

    let private constants (dtype: torch.ScalarType) (device: torch.Device) =
        constantCache.GetOrAdd(struct (dtype, device.ToString()), fun _ ->
            let w = torch.tensor(periodicHann VggishParams.WindowLength, dtype = dtype, device = device).DetachFromDisposeScope()
            let m = torch.tensor(vggishMelMatrix.Value, dtype = dtype, device = device).DetachFromDisposeScope()
            struct (w, m))

    /// Short-time magnitude spectrum of 16 kHz waveforms, the first half of `ofWaveform`: 25 ms periodic-Hann
    /// frames every 10 ms, |rfft_512|. [.., N] -> [.., F, 257] (F >= 1 required: see `frameCount`).
    let magnitude (wave: Tensor) : Tensor =
        Scope.run (fun () ->
            let struct (window, _) = constants wave.dtype wave.device                          // [400]
            let fr = wave.unfold(-1L, int64 VggishParams.WindowLength, int64 VggishParams.HopLength) * window  // [.., F, 400]
            // |z| as the 2-norm of (re, im): same values as abs() to 1e-16, in less than half the time.
            let spec = torch.fft.rfft(fr, int64 VggishParams.FftLength, -1L)                   // [.., F, 257] complex
            torch.linalg.vector_norm(torch.view_as_real(spec), 2, [| -1L |]))                 // [.., F, 257]

    /// Log-mel of 16 kHz waveforms: [.., N] -> [.., F, 64], natural log of (|rfft_512(frame * hann)| @ mel + 0.01).
    /// Computed in `wave.dtype` (float64: ~1e-12 from the numpy reference; float32: ~1e-4, up to 2e-4 on pure tones).
    let ofWaveform (wave: Tensor) : Tensor =
        Scope.run (fun () ->
            let n = wave.shape[wave.shape.Length - 1]
            let lead = wave.shape[.. wave.shape.Length - 2]
            let frames = frameCount (int n)
            if frames = 0 then torch.zeros(Array.append lead [| 0L; int64 VggishParams.NumMelBins |], dtype = wave.dtype, device = wave.device)
            else
                let struct (_, mel) = constants wave.dtype wave.device                         // [257, 64]
                let m = (magnitude wave).matmul(mel)                                           // [.., F, 64]
                if wave.requires_grad then m.add(VggishParams.LogOffset.AsScalar).log()
                else m.add_(VggishParams.LogOffset.AsScalar).log_())

    /// Frames a log-mel into examples: [F, 64] -> [n, 1, 96, 64] (incomplete tail dropped; n may be 0).
    let toExamples (logMel: Tensor) : Tensor =
        Shape.requireRank (nameof logMel) 2 logMel
        Scope.run (fun () ->
            let f = int logMel.shape[0]
            let n = exampleCount f
            if n = 0 then torch.zeros([| 0L; 1L; int64 VggishParams.ExampleFrames; logMel.shape[1] |], dtype = logMel.dtype, device = logMel.device)
            else
                logMel.narrow(0L, 0L, int64 (n * VggishParams.ExampleHop))
                      .reshape(int64 n, 1L, int64 VggishParams.ExampleFrames, logMel.shape[1]))
