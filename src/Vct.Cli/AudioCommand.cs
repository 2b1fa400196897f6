using System.CommandLine;
using Vct.Core.Audio;

namespace Vct.Cli;

/// <summary>
/// <c>vct audio examples FILE|FOLDER --subset s4|ms3|avss|none --out OUT</c>: the .NET counterpart of the official
/// preprocessing tools. Writes the [T,1,96,64] float32 VGGish log-mel examples of one file as a standard .npy, or of
/// every .wav below a folder (in parallel) as a mirrored tree of .npy files.
/// </summary>
internal static class AudioCommand
{
    public static Command Create()
    {
        var input = new Argument<string>("input") { Description = "An audio file (WAV, or any format ffmpeg reads), or a folder of .wav files" };
        var subset = new Option<string>("--subset")
        {
            Description = "s4 | ms3 (5 examples, repeat the last) | avss (10, zero rows) | none (every whole example)",
            DefaultValueFactory = _ => "none",
        };
        var output = new Option<string>("--out") { Description = "Output .npy (file input) or output folder (folder input)", Required = true };
        var zeroPad = new Option<bool>("--zero-pad") { Description = "Pad a clip shorter than one example (0.975 s) with silence instead of failing" };
        var int16 = new Option<bool>("--official-int16")
        {
            Description = "Read samples as the official tool does (soundfile int16: drops the low bits of 24/32-bit PCM; float WAVs become near silence)",
        };
        var float32 = new Option<bool>("--float32") { Description = "Compute the STFT in float32 (faster, ~1e-4 from the reference) instead of float64" };
        var jobs = new Option<int>("--jobs")
        {
            Description = "Files processed in parallel in folder mode (default: one per core, each with cores/jobs LibTorch threads unless --threads is given)",
            DefaultValueFactory = _ => Environment.ProcessorCount,
        };
        var threads = CommonOptions.Threads();

        var examples = new Command("examples", "Write the VGGish log-mel examples [T,1,96,64] of a file (or of every .wav in a folder) as .npy");
        examples.Arguments.Add(input);
        foreach (var o in new Option[] { subset, output, zeroPad, int16, float32, jobs, threads }) examples.Options.Add(o);
        examples.SetAction(parse =>
        {
            var path = parse.GetValue(input)!;
            var folder = Directory.Exists(path);
            var jobCount = Math.Max(1, parse.GetValue(jobs));
            // Folder mode: one clip per worker, the cores shared out between them (measured: 1 thread x 2 clips
            // processes about 1.5x more audio per second than 2 threads x 1 clip on 2 cores; docs/benchmarks.md).
            var threadCount = parse.GetValue(threads) ?? (folder ? Math.Max(1, Environment.ProcessorCount / jobCount) : null);
            CommonOptions.Apply("cpu", threadCount);
            var subsetName = parse.GetValue(subset)!;
            var sub = subsetName.Trim().ToLowerInvariant() == "none"
                ? Microsoft.FSharp.Core.FSharpOption<Vct.Core.Subset>.None
                : Microsoft.FSharp.Core.FSharpOption<Vct.Core.Subset>.Some(Vct.Core.Subset.Parse(subsetName));
            var opts = new ExampleOptions(
                sub,
                parse.GetValue(zeroPad) ? ShortClip.ZeroPad : ShortClip.Error,
                parse.GetValue(int16) ? SampleScaling.OfficialInt16 : SampleScaling.Exact,
                parse.GetValue(float32) ? TorchSharp.torch.ScalarType.Float32 : TorchSharp.torch.ScalarType.Float64);
            var outPath = parse.GetValue(output)!;
            if (folder) return RunFolder(opts, path, outPath, jobCount);
            using var r = Examples.ofFile(opts, path);
            foreach (var w in r.Warnings) Console.Error.WriteLine($"vct: warning: {w}");
            Npy.write(outPath, r.Examples);
            Console.WriteLine($"{path}: {r.Available} example(s) -> [{string.Join(",", r.Examples.shape)}] {outPath}");
            return 0;
        });

        var audio = new Command("audio", "Audio front end: VGGish log-mel examples as the official preprocessing computes them");
        audio.Subcommands.Add(examples);
        return audio;
    }

    /// <summary>Every .wav below <paramref name="root"/> to a mirrored .npy; failures are listed, not fatal.</summary>
    private static int RunFolder(ExampleOptions opts, string root, string outRoot, int jobs)
    {
        var work = Audio.treeJobs(root, outRoot);
        if (work.Length == 0) throw new ArgumentException($"{root}: no .wav files below this folder");
        var failures = new System.Collections.Concurrent.ConcurrentBag<string>();
        var written = 0;
        // Every worker runs TorchSharp: the finalizer gate is held while they do (Vct.Core.Platform.FinalizerGate).
        Vct.Core.Platform.FinalizerGate.ParallelForEach(work, Math.Max(1, jobs), job =>
        {
            var (src, dst) = job;
            try
            {
                using var r = Examples.ofFile(opts, src);
                foreach (var w in r.Warnings) Console.Error.WriteLine($"vct: warning: {w}");
                // The .npy stays inside the output folder (no symbolic link on the way may lead out of it).
                Npy.write(Vct.Core.Data.SafePath.checkWrite(outRoot, dst), r.Examples);
                Interlocked.Increment(ref written);
            }
            catch (Exception e)
            {
                // Any failure of one file (LibTorch, arithmetic, memory included) is that file's line, not the batch's end.
                var line = Errors.Describe(e);
                failures.Add(line.Contains(src, StringComparison.Ordinal) ? line : $"{src}: {line}");
            }
        });
        foreach (var f in failures.OrderBy(f => f, StringComparer.Ordinal)) Console.Error.WriteLine($"vct: {f}");
        Console.WriteLine($"{written} of {work.Length} file(s) written under {outRoot}; {failures.Count} failed");
        return failures.IsEmpty ? 0 : 1;
    }
}
