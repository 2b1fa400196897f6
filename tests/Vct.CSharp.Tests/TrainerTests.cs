namespace Vct.Tests;

[Collection("tiny model")]
public sealed class TrainerTests(TrainedTinyModel fixture)
{
    [Fact]
    public void Two_steps_report_progress_and_write_a_best_checkpoint()
    {
        var r = fixture.Training;
        Assert.Equal(TrainOutcome.Completed, r.Outcome);
        Assert.Equal(2, r.Iterations);
        var steps = fixture.Progress.Where(p => p.Kind == TrainProgressKind.Step).ToList();
        Assert.Equal(new[] { 1, 2 }, steps.Select(s => s.Iteration));
        Assert.All(steps, s =>
        {
            Assert.Equal(2, s.TotalIterations);
            Assert.True(double.IsFinite(s.Loss) && s.Loss > 0, $"loss {s.Loss}");
            Assert.Contains(s.Terms.Keys, k => k.Contains("dice"));
        });
        var eval = Assert.Single(fixture.Progress, p => p.Kind == TrainProgressKind.Evaluation);
        Assert.InRange(eval.MJ, 0.0, 1.0);
        Assert.True(File.Exists(r.BestCheckpoint), "model_best.safetensors");
        Assert.True(File.Exists(r.LastCheckpoint), "checkpoint_last.safetensors");
        using var doc = System.Text.Json.JsonDocument.Parse(r.SummaryJson);
        Assert.InRange(doc.RootElement.GetProperty("m_j").GetDouble(), 0.0, 1.0);
    }

    [Fact]
    public async Task Cancelling_stops_after_the_current_step_with_a_resumable_checkpoint()
    {
        using var cts = new CancellationTokenSource();
        var seen = new List<int>();
        var options = new TrainOptions
        {
            Preset = TrainPreset.Tiny, Data = fixture.Data, RunsFolder = Path.Combine(fixture.Root, "runs"), Name = "cancelled",
            Iterations = 200, BatchVideos = 2, EvalPeriod = 100, Workers = 1, Device = "cpu",
        };
        var progress = new SyncProgress<TrainProgress>(p =>
        {
            if (p.Kind != TrainProgressKind.Step) return;
            seen.Add(p.Iteration);
            if (p.Iteration == 2) cts.Cancel();
        });
        var r = await VctTrainer.TrainAsync(options, progress, cts.Token, log: _ => { });
        Assert.Equal(TrainOutcome.Interrupted, r.Outcome);
        Assert.True(seen.Count is >= 2 and < 10, $"steps after cancelling: {string.Join(",", seen)}");
        Assert.True(File.Exists(r.LastCheckpoint), "a resumable checkpoint_last is written on cancel");

        // Resuming continues from the written iteration instead of starting over.
        var resumed = new List<int>();
        var more = await VctTrainer.TrainAsync(options with { Resume = true, Iterations = r.Iterations + 1 },
            new SyncProgress<TrainProgress>(p => { if (p.Kind == TrainProgressKind.Step) resumed.Add(p.Iteration); }), log: _ => { });
        Assert.Equal(TrainOutcome.Completed, more.Outcome);
        Assert.Equal(new[] { r.Iterations + 1 }, resumed);
    }

    [Fact]
    public void An_unknown_preset_is_refused_before_anything_runs()
    {
        var e = Assert.Throws<ArgumentException>(() => VctTrainer.PlannedIterations(new TrainOptions { Preset = (TrainPreset)42 }));
        Assert.StartsWith("Preset must be Tiny, S4, MS3 or AVSS, got '42'", e.Message);
    }

    [Fact]
    public void A_job_of_one_process_is_its_own_root_and_plans_the_options_iterations()
    {
        var options = new TrainOptions
        {
            Preset = TrainPreset.Tiny, Data = fixture.Data, RunsFolder = Path.Combine(fixture.Root, "runs"), Name = "planned",
            Iterations = 7, BatchVideos = 2, Workers = 1, Device = "cpu",
        };
        using var job = VctTrainingJob.Create(options);
        Assert.Equal((0, 1, true), (job.Rank, job.Ranks, job.IsRoot));
        Assert.Equal(7, job.PlannedIterations);
        Assert.Equal(7, VctTrainer.PlannedIterations(options));
        job.StopAllRanksSoon(TimeSpan.FromSeconds(1)); // no MPI: nothing to do
        job.ExitWithoutFinalizing(1);                 // no MPI: returns
        Assert.False(Directory.Exists(Path.Combine(fixture.Root, "runs", "planned")), "creating a job writes nothing");
    }
}
