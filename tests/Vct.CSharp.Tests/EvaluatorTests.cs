namespace Vct.Tests;

using System.Text;
using System.Text.Json;

[Collection("tiny model")]
public sealed class EvaluatorTests(TrainedTinyModel fixture)
{
    [Fact]
    public void Evaluate_scores_every_video_of_the_split_and_saves_what_vct_eval_writes()
    {
        var lines = new List<string>();
        var r = VctEvaluator.Evaluate(fixture.Checkpoint, fixture.Data,
            new EvaluationOptions { Split = VctSplit.Val, AudioShuffled = true, Workers = 1, Device = "cpu" }, lines.Add);

        Assert.Equal(VctSplit.Val, r.Split);
        Assert.Equal(2, r.Videos);
        Assert.Equal(2, r.PerVideo.Count);
        Assert.Equal(["evaluating 2 videos of val"], lines);
        Assert.InRange(r.MJ, 0.0, 1.0);
        Assert.InRange(r.MF, 0.0, 1.0);
        Assert.InRange(r.MJAudioShuffled!.Value, 0.0, 1.0);
        Assert.InRange(r.MFAudioShuffled!.Value, 0.0, 1.0);
        // M_J is the mean of the per-video values.
        Assert.Equal(r.PerVideo.Average(v => v.J), r.MJ, 9);
        Assert.All(r.PerVideo, v => Assert.True(v.Frames > 0, $"{v.Id}: frames scored"));

        var files = r.Save(fixture.NewFolder("eval-out"));
        Assert.Equal(["per_video.csv", "summary.json"], files.Select(Path.GetFileName));
        var csv = File.ReadAllLines(files[0]);
        Assert.Equal("video,j,f", csv[0]);
        Assert.Equal(3, csv.Length);
        using var json = JsonDocument.Parse(File.ReadAllText(files[1]));
        Assert.Equal("val", json.RootElement.GetProperty("split").GetString());
        Assert.Equal(r.MJ, json.RootElement.GetProperty("m_j").GetDouble());
        Assert.True(json.RootElement.TryGetProperty("m_j_audio_shuffled", out _));
    }

    [Fact]
    public void Without_the_control_the_shuffled_values_are_null_and_absent_from_the_JSON()
    {
        var r = VctEvaluator.Evaluate(fixture.Checkpoint, fixture.Data, new EvaluationOptions { Split = VctSplit.Test, Workers = 1, Device = "cpu" });
        Assert.Null(r.MJAudioShuffled);
        Assert.DoesNotContain("audio_shuffled", r.ToJson());
    }

    [Fact]
    public void Evaluate_honours_a_cancelled_token()
    {
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        Assert.ThrowsAny<OperationCanceledException>(() =>
            VctEvaluator.Evaluate(fixture.Checkpoint, fixture.Data, new EvaluationOptions { Device = "cpu", Workers = 1 }, cancellationToken: cts.Token));
    }

    [Fact]
    public void An_empty_split_is_refused_naming_the_dataset()
    {
        var data = VctData.Synthesize(fixture.NewFolder("no-test"), new SynthesisOptions { Train = 1, Val = 1, Test = 0, Size = 32 }).Root;
        var e = Assert.Throws<InvalidDataException>(() =>
            VctEvaluator.Evaluate(fixture.Checkpoint, data, new EvaluationOptions { Device = "cpu", Workers = 1 }));
        Assert.Equal($"{data}: the test split has no videos; nothing to evaluate", e.Message);
    }

    /// <summary>A minimal .npy (format 1.0, little endian, C order).</summary>
    static void WriteNpy(string path, string descr, long[] shape, byte[] data)
    {
        var dims = shape.Length == 1 ? $"{shape[0]}," : string.Join(", ", shape);
        var header = $"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}";
        var total = 10 + header.Length + 1;
        header = header.PadRight(header.Length + (64 - total % 64) % 64) + "\n";
        using var f = File.Create(path);
        f.Write([0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', 1, 0]);
        f.Write(BitConverter.GetBytes((ushort)header.Length));
        f.Write(Encoding.ASCII.GetBytes(header));
        f.Write(data);
    }

    /// <summary>One S4 video of one 4x4 frame: ground truth = left half; scores favouring <paramref name="predicted"/>.</summary>
    static (string Scores, string Gt) OneFrame(string dir, Func<int, bool> predicted)
    {
        Directory.CreateDirectory(dir);
        var gt = Enumerable.Range(0, 16).Select(i => (byte)(i % 4 < 2 ? 1 : 0)).ToArray();
        var scores = new float[2 * 16];
        for (var i = 0; i < 16; i++) (scores[i], scores[16 + i]) = predicted(i) ? (0f, 5f) : (5f, 0f);
        var s = Path.Combine(dir, "scores.npy");
        var g = Path.Combine(dir, "gt.npy");
        WriteNpy(s, "<f4", [1, 1, 2, 4, 4], scores.SelectMany(BitConverter.GetBytes).ToArray());
        WriteNpy(g, "|u1", [1, 1, 4, 4], gt);
        return (s, g);
    }

    [Fact]
    public void Score_gives_one_for_a_perfect_prediction_and_less_for_half_of_it()
    {
        var (s, g) = OneFrame(fixture.NewFolder("score-perfect"), i => i % 4 < 2);
        var reports = new List<ScoreProgress>();
        var perfect = VctEvaluator.Score(VctSubset.S4, s, g, progress: new SyncProgress<ScoreProgress>(reports.Add));
        Assert.Equal(1.0, perfect.MJ, 6);
        Assert.Equal(1.0, perfect.MF, 6);
        Assert.Equal([new ScoreProgress(1, 1)], reports);
        Assert.Single(perfect.Videos);
        using (var json = JsonDocument.Parse(perfect.Json)) Assert.Equal(perfect.MJ, json.RootElement.GetProperty("m_j").GetDouble());

        // Predicting the first column only: intersection 4 pixels, union 8.
        var (s2, g2) = OneFrame(fixture.NewFolder("score-half"), i => i % 4 == 0);
        var half = VctEvaluator.Score(VctSubset.S4, s2, g2);
        Assert.Equal(0.5, half.MJ, 6);
        Assert.InRange(half.MF, 0.01, 0.99);
    }
}
