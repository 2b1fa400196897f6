namespace Vct;

using System.Collections.Concurrent;
using TorchSharp;
using Vct.Core.Audio;

/// <summary>Options of the waveform to VGGish log-mel examples pipeline (the official preprocessing).</summary>
public sealed record AudioExampleOptions
{
    /// <summary>
    /// The subset's example rule: S4 / MS3 give 5 examples (a short clip repeats its last), AVSS 10 (zero rows after the
    /// real ones); null (default) keeps every whole example of the clip.
    /// </summary>
    public VctSubset? Subset { get; init; }
    /// <summary>Pad a clip shorter than one example (0.975 s) with silence instead of failing.</summary>
    public bool ZeroPadShortClips { get; init; }
    /// <summary>Read samples as the official tool does (soundfile int16: drops the low bits of 24/32-bit PCM; float WAVs become near silence).</summary>
    public bool OfficialInt16 { get; init; }
    /// <summary>Compute the STFT in float32 (faster, about 1e-4 from the reference) instead of float64.</summary>
    public bool Float32Stft { get; init; }
}

/// <summary>The VGGish examples of one audio file; owns the tensor, dispose to free it.</summary>
public sealed class AudioClipExamples : IDisposable
{
    internal AudioClipExamples(ClipExamples c)
    {
        Examples = c.Examples;
        Available = c.Available;
        Real = c.Real;
        Warnings = c.Warnings.ToList();
        Source = c.Source;
    }

    /// <summary>[T, 1, 96, 64] float32 log-mel examples on the CPU, one per 0.96 s.</summary>
    public torch.Tensor Examples { get; }
    /// <summary>Whole examples the audio itself gave (before the subset's padding or truncation).</summary>
    public int Available { get; }
    /// <summary>One entry per row of <see cref="Examples"/>: 1 = from the audio, 0 = zero padding (for AVSS, the temporal flags).</summary>
    public IReadOnlyList<int> Real { get; }
    /// <summary>Departures from the official behaviour that were applied (truncation, padding of a short clip).</summary>
    public IReadOnlyList<string> Warnings { get; }
    /// <summary>The file read.</summary>
    public string Source { get; }

    /// <inheritdoc />
    public void Dispose() => Examples.Dispose();
}

/// <summary>One audio file whose examples were written as .npy.</summary>
/// <param name="Source">The audio file.</param>
/// <param name="Output">The .npy written.</param>
/// <param name="Available">Whole examples the audio gave.</param>
/// <param name="Shape">The shape written ([T, 1, 96, 64]).</param>
/// <param name="Warnings">Departures from the official behaviour that were applied.</param>
public sealed record AudioFileResult(string Source, string Output, int Available, IReadOnlyList<long> Shape, IReadOnlyList<string> Warnings);

/// <summary>An audio file of a folder that could not be converted.</summary>
/// <param name="Source">The audio file.</param>
/// <param name="Error">Why.</param>
public sealed record AudioFileFailure(string Source, Exception Error);

/// <summary>What <see cref="VctAudio.WriteFolderExamples"/> did.</summary>
/// <param name="Total">.wav files found.</param>
/// <param name="Written">Files converted, in path order.</param>
/// <param name="Failures">Files that failed, in path order (the others were still converted).</param>
public sealed record AudioFolderResult(int Total, IReadOnlyList<AudioFileResult> Written, IReadOnlyList<AudioFileFailure> Failures);

/// <summary>The audio front end for C# callers: VGGish log-mel examples exactly as the official preprocessing computes them (<c>vct audio examples</c>).</summary>
public static class VctAudio
{
    /// <summary>The examples of one audio file (WAV, or any format ffmpeg reads).</summary>
    public static AudioClipExamples Examples(string audioFile, AudioExampleOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(audioFile);
        VctRuntime.Initialize();
        return new AudioClipExamples(Core.Audio.Examples.ofFile((options ?? new AudioExampleOptions()).ToCore(), audioFile));
    }

    /// <summary>Writes the examples of one audio file as a standard float32 .npy at <paramref name="outputNpy"/>.</summary>
    public static AudioFileResult WriteExamples(string audioFile, string outputNpy, AudioExampleOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(outputNpy);
        using var r = Examples(audioFile, options);
        Npy.write(outputNpy, r.Examples);
        return new AudioFileResult(audioFile, outputNpy, r.Available, r.Examples.shape, r.Warnings);
    }

    /// <summary>
    /// Writes the examples of every .wav below <paramref name="folder"/> as a mirrored tree of .npy files under
    /// <paramref name="outputFolder"/>, <paramref name="parallelism"/> files at a time. A file that fails is listed in
    /// <see cref="AudioFolderResult.Failures"/>, not fatal; a folder without .wav files is refused.
    /// </summary>
    /// <param name="folder">The folder of .wav files (searched recursively).</param>
    /// <param name="outputFolder">The root of the .npy tree; nothing is written outside it (symbolic links included).</param>
    /// <param name="options">The example rules.</param>
    /// <param name="parallelism">Files converted at a time.</param>
    /// <param name="progress">Hears after each file written (from the worker threads).</param>
    public static AudioFolderResult WriteFolderExamples(string folder, string outputFolder, AudioExampleOptions? options = null, int parallelism = 1,
        IProgress<AudioFileResult>? progress = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        ArgumentException.ThrowIfNullOrEmpty(outputFolder);
        VctRuntime.Initialize();
        var opts = options ?? new AudioExampleOptions();
        var work = Core.Audio.Audio.treeJobs(folder, outputFolder);
        if (work.Length == 0) throw new ArgumentException($"{folder}: no .wav files below this folder");
        var written = new ConcurrentBag<AudioFileResult>();
        var failures = new ConcurrentBag<AudioFileFailure>();
        // Every worker runs TorchSharp: the finalizer gate is held while they do.
        Core.Platform.FinalizerGate.ParallelForEach(work, Math.Max(1, parallelism), job =>
        {
            var (src, dst) = job;
            try
            {
                var r = WriteExamples(src, Core.Data.SafePath.checkWrite(outputFolder, dst), opts);
                written.Add(r);
                progress?.Report(r);
            }
            catch (Exception e)
            {
                // Any failure of one file (LibTorch, arithmetic, memory included) is that file's entry, not the batch's end.
                failures.Add(new AudioFileFailure(src, e));
            }
        });
        return new AudioFolderResult(work.Length,
            written.OrderBy(r => r.Source, StringComparer.Ordinal).ToList(),
            failures.OrderBy(f => f.Source, StringComparer.Ordinal).ToList());
    }
}
