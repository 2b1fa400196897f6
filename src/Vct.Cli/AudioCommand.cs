using System.CommandLine;

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
        var subset = CommonOptions.Choice("--subset", "s4 | ms3 (5 examples, repeat the last) | avss (10, zero rows) | none (every whole example)",
            "none", "s4", "ms3", "avss", "none");
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
            CommonOptions.Apply(threadCount);
            var sub = parse.GetValue(subset)!;
            var opts = new AudioExampleOptions
            {
                Subset = sub == "none" ? null : CommonOptions.ParseSubset(sub),
                ZeroPadShortClips = parse.GetValue(zeroPad),
                OfficialInt16 = parse.GetValue(int16),
                Float32Stft = parse.GetValue(float32),
            };
            var outPath = parse.GetValue(output)!;
            if (folder) return RunFolder(opts, path, outPath, jobCount);
            var r = VctAudio.WriteExamples(path, outPath, opts);
            PrintWarnings(r);
            Console.WriteLine($"{path}: {r.Available} example(s) -> [{string.Join(",", r.Shape)}] {outPath}");
            return 0;
        });

        var audio = new Command("audio", "Audio front end: VGGish log-mel examples as the official preprocessing computes them");
        audio.Subcommands.Add(examples);
        return audio;
    }

    static void PrintWarnings(AudioFileResult r)
    {
        foreach (var w in r.Warnings) Console.Error.WriteLine($"vct: warning: {w}");
    }

    /// <summary>Every .wav below <paramref name="root"/> to a mirrored .npy; failures are listed, not fatal.</summary>
    private static int RunFolder(AudioExampleOptions opts, string root, string outRoot, int jobs)
    {
        var r = VctAudio.WriteFolderExamples(root, outRoot, opts, jobs, new SyncProgress<AudioFileResult>(PrintWarnings));
        var lines = r.Failures.Select(f =>
        {
            var line = Errors.Describe(f.Error);
            return line.Contains(f.Source, StringComparison.Ordinal) ? line : $"{f.Source}: {line}";
        });
        foreach (var f in lines.OrderBy(f => f, StringComparer.Ordinal)) Console.Error.WriteLine($"vct: {f}");
        Console.WriteLine($"{r.Written.Count} of {r.Total} file(s) written under {outRoot}; {r.Failures.Count} failed");
        return r.Failures.Count == 0 ? 0 : 1;
    }
}
