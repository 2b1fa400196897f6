namespace Vct.Tests;

using System.Text;
using System.Text.Json;

[Collection("tiny model")]
public sealed class CheckpointTests(TrainedTinyModel fixture)
{
    [Fact]
    public void Inspect_reads_the_tensors_and_the_config_of_a_Vct_checkpoint()
    {
        var info = VctCheckpoints.Inspect(fixture.Checkpoint);
        Assert.Equal(CheckpointFormat.Safetensors, info.Format);
        Assert.Equal(VctSubset.S4, info.Subset);
        Assert.True(info.Tensors.Count > 50, $"{info.Tensors.Count} tensors");
        Assert.Equal(info.Tensors.Count, info.Tensors.Select(t => t.Name).Distinct().Count());
        Assert.Contains(info.Tensors, t => t.Name.StartsWith("backbone.", StringComparison.Ordinal) && t.DType == "Float32");
        Assert.Equal(info.Tensors.Sum(t => t.Shape.Aggregate(1L, (a, b) => a * b)), info.Parameters);
        Assert.True(info.Parameters > 100_000, $"{info.Parameters} parameters");
        using var config = JsonDocument.Parse(info.ConfigJson!);
        Assert.Equal("s4", config.RootElement.GetProperty("subset").GetString());
        Assert.True(info.Metadata.ContainsKey("vct_config"));
    }

    [Fact]
    public void Convert_refuses_a_json_output_before_reading_anything()
    {
        var dir = fixture.NewFolder("convert-json");
        var output = Path.Combine(dir, "model.json");
        var e = Assert.Throws<ArgumentException>(() => VctCheckpoints.Convert(VctSubset.S4, Path.Combine(dir, "missing.pth"), output));
        Assert.StartsWith($"{output}: a checkpoint cannot be a .json file", e.Message);
        Assert.Empty(Directory.GetFiles(dir));
    }

    [Fact]
    public void Convert_names_a_file_that_is_not_an_official_checkpoint()
    {
        var dir = fixture.NewFolder("convert-bad");
        var pth = Path.Combine(dir, "model_best.pth");
        File.WriteAllText(pth, "not a pickle");
        var e = Assert.ThrowsAny<Exception>(() => VctCheckpoints.Convert(VctSubset.S4, pth, Path.Combine(dir, "s4.safetensors")));
        Assert.Contains("model_best.pth", e.Message);
        Assert.False(File.Exists(Path.Combine(dir, "s4.safetensors")), "nothing written");
    }

    /// <summary>A minimal safetensors file of float32 tensors.</summary>
    static void WriteSafetensors(string path, params (string Name, long[] Shape, float Value)[] tensors)
    {
        var header = new Dictionary<string, object>();
        var data = new MemoryStream();
        foreach (var (name, shape, value) in tensors)
        {
            var n = shape.Aggregate(1L, (a, b) => a * b);
            var start = data.Length;
            for (var i = 0; i < n; i++) data.Write(BitConverter.GetBytes(value));
            header[name] = new { dtype = "F32", shape, data_offsets = new[] { start, data.Length } };
        }
        var json = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(header));
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes((ulong)json.Length));
        f.Write(json);
        data.Position = 0;
        data.CopyTo(f);
    }

    [Fact]
    public void Forward_writes_the_named_predictions_of_the_raw_model()
    {
        var dir = fixture.NewFolder("forward");
        var inputs = Path.Combine(dir, "in.safetensors");
        WriteSafetensors(inputs, ("in.images", [2, 3, 64, 64], 100f), ("in.audio_log_mel", [2, 1, 96, 64], 0.5f));
        var output = Path.Combine(dir, "out.safetensors");
        CheckpointLoadReport? seen = null;

        var r = VctCheckpoints.Forward(fixture.Checkpoint, inputs, output, new ForwardOptions { InputPrefix = "in.", Device = "cpu" }, rep => seen = rep);

        Assert.NotNull(seen);
        Assert.True(seen!.IsExact, "the model's own checkpoint loads exactly");
        Assert.Equal(output, r.Output);
        foreach (var name in new[] { "pred_logits", "pred_masks", "sem_seg", "aux0.pred_logits" }) Assert.Contains(name, r.Tensors);
        var written = VctCheckpoints.Inspect(output);
        Assert.Equal(r.Tensors, written.Tensors.Select(t => t.Name));
        var semSeg = written.Tensors.Single(t => t.Name == "sem_seg");
        Assert.Equal(2, semSeg.Shape[0]);
        Assert.Equal(2, semSeg.Shape[1]);
    }

    [Fact]
    public void Reduced_precision_is_refused_with_a_clear_message_and_bad_devices_when_set()
    {
        // fp16 has no fast CPU kernels: refused on the CPU with a message that says what to use instead.
        var e = Assert.Throws<NotSupportedException>(() =>
            VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu", Precision = VctPrecision.Float16 }));
        Assert.Contains("fp16", e.Message);
        Assert.Contains("fp32", e.Message);
        // bf16 runs where the CPU has native bfloat16 dot products, and is refused naming them elsewhere.
        var cpuBf16 = File.ReadLines("/proc/cpuinfo").Any(l => l.StartsWith("flags") && (l.Contains(" avx512_bf16") || l.Contains(" amx_bf16")));
        if (cpuBf16)
        {
            using var bf16 = VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu", Precision = VctPrecision.BFloat16 });
            Assert.Equal(VctPrecision.BFloat16, bf16.Options.Precision);
        }
        else
        {
            var b = Assert.Throws<NotSupportedException>(() =>
                VctSegmenter.Load(fixture.Checkpoint, new SegmenterOptions { Device = "cpu", Precision = VctPrecision.BFloat16 }));
            Assert.Contains("avx512_bf16", b.Message);
        }
        var d = Assert.Throws<ArgumentException>(() => new SegmenterOptions { Device = "tpu" });
        Assert.Equal("unknown device 'tpu': expected auto, cpu, cuda or cuda:N", d.Message);
        Assert.Equal("cuda:1", new TrainOptions { Device = "cuda:1" }.Device);
    }
}

[Collection("tiny model")]
public sealed class AudioAndDataTests(TrainedTinyModel fixture)
{
    string Tone(string folder, string name, double seconds)
    {
        var path = Path.Combine(folder, name);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        TrainedTinyModel.Ffmpeg("-f", "lavfi", "-i", $"sine=frequency=440:sample_rate=16000:duration={seconds}", "-c:a", "pcm_s16le", path);
        return path;
    }

    [Fact]
    public void Examples_follow_the_subset_rules()
    {
        var wav = Tone(fixture.NewFolder("audio-one"), "tone.wav", 3.0);

        using (var all = VctAudio.Examples(wav))
        {
            // 3 s hold three whole 0.96 s examples.
            Assert.Equal(new long[] { 3, 1, 96, 64 }, all.Examples.shape);
            Assert.Equal(3, all.Available);
            Assert.Empty(all.Warnings);
            var values = all.Examples.data<float>().ToArray();
            Assert.All(values, v => Assert.True(float.IsFinite(v)));
            Assert.True(values.Max() - values.Min() > 1.0f, "a tone is not a flat log-mel");
        }
        using (var avss = VctAudio.Examples(wav, new AudioExampleOptions { Subset = VctSubset.AVSS }))
        {
            Assert.Equal(new long[] { 10, 1, 96, 64 }, avss.Examples.shape);
            Assert.Equal([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], avss.Real);
        }
        using var s4 = VctAudio.Examples(wav, new AudioExampleOptions { Subset = VctSubset.S4 });
        Assert.Equal(5, s4.Examples.shape[0]);
    }

    [Fact]
    public void A_folder_is_written_as_a_mirrored_tree_and_a_bad_file_is_listed()
    {
        var src = fixture.NewFolder("audio-tree");
        Tone(src, Path.Combine("a", "one.wav"), 2.0);
        Tone(src, Path.Combine("b", "two.wav"), 1.0);
        File.WriteAllText(Path.Combine(src, "broken.wav"), "not audio");
        var output = Path.Combine(fixture.Root, "audio-tree-out");
        var heard = new System.Collections.Concurrent.ConcurrentBag<string>();

        var r = VctAudio.WriteFolderExamples(src, output, parallelism: 2, progress: new SyncProgress<AudioFileResult>(f => heard.Add(f.Source)));

        Assert.Equal(3, r.Total);
        Assert.Equal(2, r.Written.Count);
        Assert.Equal(2, heard.Count);
        Assert.True(File.Exists(Path.Combine(output, "a", "one.npy")));
        Assert.True(File.Exists(Path.Combine(output, "b", "two.npy")));
        Assert.Equal(new long[] { 2, 1, 96, 64 }, r.Written.Single(w => w.Source.EndsWith("one.wav")).Shape);
        var failure = Assert.Single(r.Failures);
        Assert.EndsWith("broken.wav", failure.Source);
        Assert.False(File.Exists(Path.Combine(output, "broken.npy")));
        Assert.Throws<ArgumentException>(() => VctAudio.WriteFolderExamples(fixture.NewFolder("no-wav"), output));
    }

    [Fact]
    public void The_synthetic_dataset_passes_the_data_check()
    {
        Assert.Equal(8, fixture.Synthesis.Videos);
        Assert.Equal(VctSubset.S4, fixture.Synthesis.Kind);
        Assert.InRange(fixture.Synthesis.Baselines.GroundTruth.MJ, 0.99, 1.0);
        Assert.True(fixture.Synthesis.Baselines.AllObjects.MJ < fixture.Synthesis.Baselines.GroundTruth.MJ);

        var report = VctData.Check(fixture.Data);
        Assert.True(report.Ok, string.Join("\n", report.Problems));
        Assert.Equal(VctSubset.S4, report.Kind);
        Assert.Equal([new SplitCount("train", 4), new SplitCount("val", 2), new SplitCount("test", 2)], report.Splits);

        // A removed frame is a problem that names its file.
        var frame = Directory.GetFiles(Path.Combine(fixture.Data, "s4_data_384"), "*.png", SearchOption.AllDirectories).Order().First();
        var copy = fixture.NewFolder("broken-data");
        CopyTree(fixture.Data, copy);
        File.Delete(Path.Combine(copy, Path.GetRelativePath(fixture.Data, frame)));
        var broken = VctData.Check(copy);
        Assert.False(broken.Ok);
        Assert.Contains(broken.Problems, p => p.Contains(Path.GetFileNameWithoutExtension(frame)));
    }

    static void CopyTree(string from, string to)
    {
        foreach (var d in Directory.GetDirectories(from, "*", SearchOption.AllDirectories)) Directory.CreateDirectory(Path.Combine(to, Path.GetRelativePath(from, d)));
        foreach (var f in Directory.GetFiles(from, "*", SearchOption.AllDirectories)) File.Copy(f, Path.Combine(to, Path.GetRelativePath(from, f)));
    }
}
