namespace Vct.Core.Audio

open Vct.Core.Platform
open System
open System.IO
open TorchSharp
open Vct.Core

/// Notebook- and CLI-level entry points of the audio path:
///   let w = Audio.load "clip.wav"
///   let ex = Audio.examples Subset.S4 w            // [5, 1, 96, 64]
///   let f = Audio.encode (new Vggish(VggishConfig.Default)) ex   // [5, 512, 6, 4]
[<RequireQualifiedAccess>]
module Audio =
    /// Reads any audio file (WAV directly; mp3/flac/ogg/m4a/video through ffmpeg) at full precision.
    let load (path: string) : Waveform = Media.read SampleScaling.Exact path

    /// A waveform from mono samples in memory.
    let ofSamples (sampleRate: int) (samples: float[]) : Waveform =
        Wav.validate { Channels = [| samples |]; SampleRate = sampleRate; Source = "<samples>"; Encoding = "in memory" }

    /// The [T, 1, 96, 64] float32 examples of a waveform under a subset's rules (default options).
    let examples (subset: Subset) (w: Waveform) : Tensor =
        let r = Examples.ofWaveform (ExampleOptions.Default(Some subset)) w
        r.Examples

    /// Examples of one file with explicit options, with the count, flags and warnings.
    let examplesOfFile (opts: ExampleOptions) (path: string) : ClipExamples = Examples.ofFile opts path

    /// Examples of many files in parallel (`degree` workers, TorchSharp on each: the finalizer gate is held while
    /// they run); results in input order. A failing file fails the whole call with its own message.
    let examplesOfFiles (opts: ExampleOptions) (degree: int) (paths: string[]) : ClipExamples[] =
        let out = Array.zeroCreate paths.Length
        FinalizerGate.ParallelForEach(Array.init paths.Length id, degree, fun i -> out[i] <- Examples.ofFile opts paths[i])
        out

    /// VGGish features of examples: [N, 1, 96, 64] -> [N, 512, 6, 4], on the module's device, batched by
    /// `batch` rows (0 = all at once).
    let encodeBatched (vggish: Vggish) (batch: int) (examples: Tensor) : Tensor =
        let device = (vggish.parameters() |> Seq.head).device
        let n = examples.shape[0]
        if batch <= 0 || int64 batch >= n then vggish.Forward(examples.``to``(device))
        else
            Scope.run (fun () ->
                let parts =
                    [| for s in 0L .. int64 batch .. n - 1L ->
                           vggish.Forward(examples.narrow(0L, s, min (int64 batch) (n - s)).``to``(device)) |]
                torch.cat(parts, 0L))

    /// VGGish features of examples: [N, 1, 96, 64] -> [N, 512, 6, 4].
    let encode (vggish: Vggish) (examples: Tensor) : Tensor = encodeBatched vggish 0 examples

    /// Writes examples as a float32 `.npy`.
    let saveNpy (path: string) (examples: Tensor) = Npy.write path examples

    /// The audio files of an AVSBench-style tree: every .wav below `root` (sorted), with the .npy path
    /// that mirrors it under `outRoot`.
    let treeJobs (root: string) (outRoot: string) : (string * string)[] =
        if not (Directory.Exists root) then raise (DirectoryNotFoundException($"{root}: no such folder"))
        Directory.EnumerateFiles(root, "*.wav", SearchOption.AllDirectories)
        |> Seq.sort
        |> Seq.map (fun f ->
            let rel = Path.GetRelativePath(root, f)
            f, Path.Combine(outRoot, Path.ChangeExtension(rel, ".npy")))
        |> Array.ofSeq
