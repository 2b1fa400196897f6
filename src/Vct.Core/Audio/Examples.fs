namespace Vct.Core.Audio

open System
open System.IO
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// What to do with a clip shorter than one example (0.975 s at 16 kHz: 15 600 samples).
[<RequireQualifiedAccess>]
type ShortClip =
    /// Fail with a message naming the file and its duration (default).
    | Error
    /// Append digital silence to the waveform up to one example, then apply the subset's rule.
    | ZeroPad

/// Options of the waveform -> examples pipeline.
type ExampleOptions =
    { /// The subset whose rule makes the clip's count (see `Preset`), or None for every whole example of the
      /// clip, no padding or truncation (the video path, `vct audio examples --subset none`).
      Subset: Subset option
      ShortClip: ShortClip
      /// Sample decoding; `OfficialInt16` reproduces `soundfile.read(dtype="int16")` (see SampleScaling).
      Scaling: SampleScaling
      /// dtype of the STFT / mel computation. float64 (default) is the reference's precision; float32 is
      /// ~2x faster and within 1e-4 on speech and noise, but pure tones reach 2e-4 (the quiet bands of a
      /// sparse spectrum are dominated by float32 FFT round-off). The examples are float32 either way.
      ComputeDtype: torch.ScalarType }
    static member Default(subset: Subset option) =
        { Subset = subset; ShortClip = ShortClip.Error; Scaling = SampleScaling.Exact; ComputeDtype = torch.float64 }

/// The examples of one clip.
type ClipExamples =
    { /// [T, 1, 96, 64] float32 on the CPU.
      Examples: Tensor
      /// Whole examples the audio itself gave (before padding or truncation).
      Available: int
      /// One entry per row of `Examples`: 1 = from the audio (also for S4/MS3 repeats), 0 = zero padding.
      /// For AVSS this is the data-derived counterpart of `vid_temporal_mask_flag`.
      Real: int[]
      /// Departures from the official behaviour that were applied (truncation, padding of a short clip).
      Warnings: string list
      Source: string }
    interface IDisposable with
        member e.Dispose() = e.Examples.Dispose()

/// AVSS temporal flags per metadata label (official: VCT `models/data/datasets/register_avss_sem.py`).
[<RequireQualifiedAccess>]
module AvssFlags =
    /// `vid_temporal_mask_flag` (10 entries): which of the 10 audio examples belong to real frames.
    let vidTemporalMask (label: string) =
        match label with
        | "v1s" | "v1m" -> [| 1; 1; 1; 1; 1; 0; 0; 0; 0; 0 |]
        | "v2" -> Array.create 10 1
        | _ -> invalidArg (nameof label) $"unknown AVSS label '{label}': expected v1s, v1m or v2"

    /// `gt_temporal_mask_flag` (one entry per frame): which frames have a ground-truth mask.
    let gtTemporalMask (label: string) (split: string) =
        match label, split with
        | "v1s", "train" -> [| 1; 0; 0; 0; 0 |]
        | ("v1s" | "v1m"), _ -> Array.create 5 1
        | "v2", _ -> Array.create 10 1
        | _ -> invalidArg (nameof label) $"unknown AVSS label '{label}': expected v1s, v1m or v2"

/// Clipping of examples to the per-subset count, and the whole file -> examples pipeline.
[<RequireQualifiedAccess>]
module Examples =
    /// Applies the subset rule to [n, 1, 96, 64] examples.
    ///   S4/MS3 (AVSBench `preprocess_s4.py`/`preprocess_ms3.py`): n < 5 -> repeat the last example; AVSS
    ///   (`avs_tools/preprocess_avss_audio.py`): n < 10 -> zero rows. Too many examples: the official tools crash
    ///   (a shape mismatch); here the first 5 / 10 are kept and a warning says so. n = 0: an error for S4/MS3
    ///   (the official tool crashes on `x[-1]`); for AVSS the official tool writes 10 zero rows, done here too
    ///   with a warning. The `source` names the clip in messages.
    let clip (subset: Subset option) (source: string) (examples: Tensor) : ClipExamples =
        Shape.requireRank (nameof examples) 4 examples
        let n = int examples.shape[0]
        let secs (k: int) = float (k * VggishParams.ExampleFrames) * 0.01
        match subset with
        | None ->
            { Examples = examples.alias(); Available = n; Real = Array.create n 1; Warnings = []; Source = source }
        | Some subset ->
            let target = subset.Preset.Frames
            let zeroRows = subset.Preset.AudioPadding = AudioPadding.ZeroRows
            let name = subset.Name.ToUpperInvariant()
            let warnings = ResizeArray<string>()
            let out =
                Scope.run (fun () ->
                    if n > target then
                        warnings.Add($"{source}: {n} examples ({secs n:F2} s of audio) but {name} uses {target}; kept the first {target} (the official tool fails on such clips)")
                        examples.narrow(0L, 0L, int64 target).clone()
                    elif n = target then examples.clone()
                    elif zeroRows then
                        if n = 0 then warnings.Add($"{source}: no whole example in the clip; {target} zero examples written, as the official tool does")
                        let z = torch.zeros([| int64 target; 1L; examples.shape[2]; examples.shape[3] |], dtype = examples.dtype)
                        if n > 0 then z.narrow(0L, 0L, int64 n).copy_(examples) |> ignore
                        z
                    elif n = 0 then
                        raise (InvalidDataException($"{source}: no whole example in the clip (an example needs 0.975 s at 16 kHz); the official {name} tool fails here too; use the zero-pad option to pad it"))
                    else
                        let last = examples.narrow(0L, int64 (n - 1), 1L)
                        torch.cat([| examples; last.expand(int64 (target - n), -1L, -1L, -1L) |], 0L))
            let real =
                if zeroRows then Array.init target (fun i -> if i < n then 1 else 0)
                else Array.create target 1
            { Examples = out; Available = n; Real = real; Warnings = List.ofSeq warnings; Source = source }

    /// Mono (channel mean), resampled to 16 kHz with resampy's kaiser_best, as float64 samples. A mono 16 kHz
    /// waveform's own sample array is returned as is (no copy): treat the result as read-only.
    let mono16k (w: Waveform) : float[] =
        let w = Wav.validate w
        let mono = if w.Channels.Length = 1 then w.Channels[0] else w.Mono()
        if w.SampleRate = VggishParams.SampleRate then mono
        else
            if Resample.outputLength w.SampleRate VggishParams.SampleRate mono.Length < 1 then
                raise (InvalidDataException($"{w.Source}: {mono.Length} samples are too few to resample from {w.SampleRate} Hz"))
            Resample.kaiserBest w.SampleRate VggishParams.SampleRate mono

    /// Log-mel [F, 64] of a 16 kHz signal (float64 in, computed in `dtype`, returned as float32).
    let logMel16k (dtype: torch.ScalarType) (samples: float[]) : Tensor =
        Scope.run (fun () ->
            // from_array shares the array's memory (no copy); the tensor is only read and dies in this scope.
            let x = torch.from_array(samples).``to``(dtype)
            (LogMel.ofWaveform x).``to``(torch.float32))

    /// Waveform -> examples for a subset: mono, resample, (short-clip rule), log-mel, framing, subset rule.
    let ofWaveform (opts: ExampleOptions) (w: Waveform) : ClipExamples =
        let x = mono16k w
        let source = if String.IsNullOrEmpty w.Source then "<waveform>" else w.Source
        let x, padWarning =
            if x.Length >= VggishParams.MinSamplesForExample then x, []
            else
                match opts.ShortClip, opts.Subset with
                | ShortClip.ZeroPad, _ ->
                    Array.append x (Array.zeroCreate (VggishParams.MinSamplesForExample - x.Length)),
                    [ $"{source}: {w.Duration:F3} s is shorter than one example; padded with silence to 0.975 s" ]
                | ShortClip.Error, Some s when s.Preset.AudioPadding = AudioPadding.ZeroRows -> x, []        // the AVSS rule writes zero rows (with a warning)
                | ShortClip.Error, _ ->
                    raise (InvalidDataException($"{source}: {w.Duration:F3} s of audio is shorter than one VGGish example (0.975 s); pass the zero-pad option to pad it with silence"))
        use lm = logMel16k opts.ComputeDtype x
        use ex = LogMel.toExamples lm
        let r = clip opts.Subset source ex
        { r with Warnings = padWarning @ r.Warnings }

    /// File -> examples: WAV directly, other containers through ffmpeg.
    let ofFile (opts: ExampleOptions) (path: string) : ClipExamples =
        ofWaveform opts (Media.read opts.Scaling path)
