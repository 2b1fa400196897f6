namespace Vct.Tests;

using System.Text.Json;

[Collection("tiny model")]
public sealed class SegmenterTests(TrainedTinyModel fixture)
{
    [Fact]
    public void SegmentVideo_gives_one_mask_per_second_at_the_source_size()
    {
        var video = fixture.MakeVideo("tone.mp4", 3.0);
        using var segmenter = VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu" });
        var reports = new List<VideoProgress>();
        var result = segmenter.SegmentVideo(video, progress: new SyncProgress<VideoProgress>(reports.Add));

        Assert.Equal(3, result.Frames.Count);
        Assert.Equal(3, reports.Count);
        Assert.Equal(new[] { 0, 1, 2 }, result.Frames.Select(f => f.AudioExample));
        foreach (var f in result.Frames)
        {
            Assert.Equal((64, 48), (f.Width, f.Height));
            Assert.Equal(64 * 48, f.Mask.Length);
            Assert.All(f.Mask.Distinct(), v => Assert.True(v is 0 or 255, $"mask value {v}"));
            Assert.Equal(f.Mask.Count(v => v == 255) / (double)f.Mask.Length, f.SoundingFraction, 6);
            // AVSBench takes, of each second, the frame 15/16 of the way through it.
            Assert.InRange(f.Time, f.Index + 0.9, f.Index + 1.0);
        }

        var masks = result.SaveMasks(fixture.NewFolder("video-masks"));
        Assert.Equal(3, masks.Count);
        Assert.All(masks, m => Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }, File.ReadAllBytes(m)[..4]));

        using var json = JsonDocument.Parse(result.ToJson());
        var frames = json.RootElement.GetProperty("frames");
        Assert.Equal(3, frames.GetArrayLength());
        Assert.Equal(result.Frames[1].SoundingFraction, frames[1].GetProperty("sounding_fraction").GetDouble(), 6);

        var overlay = Path.Combine(fixture.NewFolder("video-overlay"), "overlay.mp4");
        result.SaveOverlay(overlay);
        Assert.True(new FileInfo(overlay).Length > 0, "overlay.mp4 written");
    }

    [Fact]
    public void SegmentImages_follows_the_image_order_and_the_audio_file()
    {
        // The synthetic S4 tree: s4_data_384/visual_frames_384/<split>/<category>/<id>/<id>_<t>.png, s4_data/audio_wav/.../<id>.wav
        var frames = Directory.GetFiles(Path.Combine(fixture.Data, "s4_data_384", "visual_frames_384", "val"), "*.png", SearchOption.AllDirectories)
            .GroupBy(Path.GetDirectoryName).OrderBy(g => g.Key).First().OrderBy(f => f.Length).ThenBy(f => f).ToList();
        var name = Path.GetFileName(Path.GetDirectoryName(frames[0]))!;
        var audio = Directory.GetFiles(Path.Combine(fixture.Data, "s4_data", "audio_wav"), name + ".wav", SearchOption.AllDirectories).Single();
        using var segmenter = VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu" });

        var result = segmenter.SegmentImages(frames, audio);

        Assert.Equal(frames.Count, result.Frames.Count);
        Assert.Equal(frames.Select(Path.GetFileNameWithoutExtension), result.Frames.Select(f => Path.GetFileNameWithoutExtension(f.Name)));
        Assert.Equal(Enumerable.Range(0, frames.Count), result.Frames.Select(f => f.AudioExample));
    }

    [Fact]
    public void Predict_writes_masks_overlay_and_summary_under_the_output_folder_only()
    {
        var video = fixture.MakeVideo("predict.mp4", 2.0);
        var output = Path.Combine(fixture.Root, "predict-out");
        using var segmenter = VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu" });
        var warnings = new List<string>();

        var summary = segmenter.Predict(PredictInput.FromVideo(video), output, warn: warnings.Add);

        Assert.Equal(2, summary.Frames);
        Assert.False(summary.Interrupted);
        Assert.Equal(new[] { "000000.png", "000001.png" }, Directory.GetFiles(Path.Combine(output, "masks")).Select(Path.GetFileName).Order());
        Assert.True(File.Exists(summary.Overlay));
        using var json = JsonDocument.Parse(File.ReadAllText(summary.Summary));
        Assert.Equal(2, json.RootElement.GetProperty("frames").GetArrayLength());
        Assert.Equal(new[] { "masks", "overlay.mp4", "summary.json" },
            Directory.EnumerateFileSystemEntries(output).Select(Path.GetFileName).Order());

        // A second run into the same folder refuses instead of mixing predictions.
        var again = Assert.ThrowsAny<Exception>(() => segmenter.Predict(PredictInput.FromVideo(video), output));
        Assert.Contains(output, again.Message);
    }

    [Fact]
    public void A_cancelled_segmentation_stops_with_OperationCanceledException()
    {
        var video = fixture.MakeVideo("cancel.mp4", 3.0);
        using var segmenter = VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu" });
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        Assert.ThrowsAny<OperationCanceledException>(() => segmenter.SegmentVideo(video, cancellationToken: cts.Token));
    }

    [Fact]
    public void A_text_file_named_mp4_gets_a_message_naming_it()
    {
        var fake = Path.Combine(fixture.Root, "notes.mp4");
        File.WriteAllText(fake, "this is not a video\n");
        using var segmenter = VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu" });
        var e = Assert.ThrowsAny<Exception>(() => segmenter.SegmentVideo(fake));
        Assert.Contains("notes.mp4", e.Message);
        Assert.DoesNotContain("   at ", e.Message);
    }

    [Fact]
    public void A_missing_checkpoint_gets_a_message_naming_it()
    {
        var missing = Path.Combine(fixture.Root, "nowhere", "model_best.safetensors");
        var e = Assert.ThrowsAny<Exception>(() => VctSegmenter.Load(missing));
        Assert.Contains("model_best.safetensors", e.Message);
    }
}
