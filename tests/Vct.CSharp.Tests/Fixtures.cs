namespace Vct.Tests;

using System.Diagnostics;

/// <summary>
/// What the facade tests share, made once per run the way an application would: a small synthetic dataset
/// (<see cref="VctData.Synthesize"/>), a tiny model trained for two steps (<see cref="VctTrainer.TrainAsync"/>),
/// and a 3-second mp4 with a sine tone made with ffmpeg's test sources.
/// </summary>
public sealed class TrainedTinyModel : IDisposable
{
    public string Root { get; } = Directory.CreateTempSubdirectory("vct-csharp-").FullName;
    public string Data { get; }
    public SynthesisResult Synthesis { get; }
    public TrainResult Training { get; }
    public List<TrainProgress> Progress { get; } = new();
    public string Checkpoint => Training.BestCheckpoint ?? throw new InvalidOperationException("no model_best was written");

    public TrainedTinyModel()
    {
        Synthesis = VctData.Synthesize(Path.Combine(Root, "data"), new SynthesisOptions { Seed = 3, Train = 4, Val = 2, Test = 2, Size = 64 });
        Data = Synthesis.Root;
        var options = new TrainOptions
        {
            Preset = TrainPreset.Tiny, Data = Data, RunsFolder = Path.Combine(Root, "runs"), Name = "two-steps",
            Iterations = 2, BatchVideos = 2, EvalPeriod = 2, Workers = 1, Device = "cpu",
        };
        Training = VctTrainer.TrainAsync(options, new SyncProgress<TrainProgress>(Progress.Add), log: _ => { }).GetAwaiter().GetResult();
    }

    /// <summary>Runs ffmpeg with the given arguments; fails the test with its error output when it fails.</summary>
    public static void Ffmpeg(params string[] arguments)
    {
        var psi = new ProcessStartInfo("ffmpeg") { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in new[] { "-v", "error", "-nostdin", "-y" }.Concat(arguments)) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEndAsync();
        p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"ffmpeg failed: {err.Result}");
    }

    /// <summary>A <paramref name="seconds"/>-long 64x48 H.264 video at 25 fps with a 440 Hz AAC tone.</summary>
    public string MakeVideo(string name, double seconds, int width = 64, int height = 48)
    {
        var path = Path.Combine(Root, name);
        Ffmpeg("-f", "lavfi", "-i", $"testsrc=size={width}x{height}:rate=25:duration={seconds}",
            "-f", "lavfi", "-i", $"sine=frequency=440:sample_rate=16000:duration={seconds}",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", path);
        return path;
    }

    public string NewFolder(string name) => Directory.CreateDirectory(Path.Combine(Root, name)).FullName;

    public void Dispose()
    {
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

[CollectionDefinition("tiny model")]
public sealed class TinyModelCollection : ICollectionFixture<TrainedTinyModel>;
