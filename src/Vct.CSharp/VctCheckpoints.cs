namespace Vct;

using Vct.Core;
using Vct.Core.Checkpoint;

/// <summary>How a checkpoint file is laid out.</summary>
public enum CheckpointFormat
{
    /// <summary>torch.save, zip format (PyTorch 1.6 and later).</summary>
    TorchZip,
    /// <summary>torch.save, legacy format.</summary>
    TorchLegacy,
    /// <summary>A plain pickle (e.g. detectron2 .pkl weights holding numpy arrays).</summary>
    Pickle,
    /// <summary>safetensors (Vct's own checkpoints).</summary>
    Safetensors,
}

/// <summary>One tensor of a checkpoint.</summary>
/// <param name="Name">Its key in the state dict.</param>
/// <param name="DType">Its element type (TorchSharp's name, e.g. <c>Float32</c>).</param>
/// <param name="Shape">Its shape.</param>
public sealed record CheckpointTensor(string Name, string DType, IReadOnlyList<long> Shape)
{
    /// <summary>Number of elements.</summary>
    public long Elements => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>What a checkpoint file holds.</summary>
/// <param name="Path">The file read.</param>
/// <param name="Format">Its layout.</param>
/// <param name="Tensors">Its state dict, in file order.</param>
/// <param name="Metadata">safetensors string metadata (empty for other formats).</param>
/// <param name="Subset">The subset of a Vct checkpoint's config, or null when it has none (official checkpoints).</param>
/// <param name="ConfigJson">A Vct checkpoint's config JSON (beside it or in its metadata), or null.</param>
public sealed record CheckpointInfo(string Path, CheckpointFormat Format, IReadOnlyList<CheckpointTensor> Tensors,
    IReadOnlyDictionary<string, string> Metadata, VctSubset? Subset, string? ConfigJson)
{
    /// <summary>Elements over all tensors.</summary>
    public long Parameters => Tensors.Sum(t => t.Elements);
}

/// <summary>What <see cref="VctCheckpoints.Convert"/> wrote.</summary>
/// <param name="Checkpoint">The .safetensors written.</param>
/// <param name="Config">The .json config written beside it.</param>
/// <param name="LoadReport">How the official file's keys mapped onto the model.</param>
public sealed record ConversionResult(string Checkpoint, string Config, CheckpointLoadReport LoadReport);

/// <summary>Options of <see cref="VctCheckpoints.Forward"/>.</summary>
public sealed record ForwardOptions
{
    /// <summary>The released configuration of an official .pth checkpoint; null: the checkpoint's own.</summary>
    public VctSubset? Subset { get; init; }
    /// <summary>Prefix of the input names in the inputs file, e.g. <c>in.</c>.</summary>
    public string InputPrefix { get; init; } = "";
    /// <summary>Also write backbone, pixel-decoder, audio, PPQG and per-layer decoder tensors.</summary>
    public bool Intermediates { get; init; }
    /// <summary>"auto", "cpu", "cuda" or "cuda:N".</summary>
    public string Device { get; init => field = VctDevices.Validate(value); } = "auto";
    /// <summary>Numeric precision of the forward pass (as <see cref="SegmenterOptions.Precision"/>).</summary>
    public VctPrecision Precision { get; init; } = VctPrecision.Float32;
}

/// <summary>What <see cref="VctCheckpoints.Forward"/> wrote.</summary>
/// <param name="Output">The .safetensors of named predictions.</param>
/// <param name="Tensors">Names written, in order (pred_logits, pred_masks, aux*, feats.*, sem_seg, intermediates).</param>
/// <param name="LoadReport">How the checkpoint loaded.</param>
public sealed record ForwardResult(string Output, IReadOnlyList<string> Tensors, CheckpointLoadReport LoadReport);

/// <summary>Checkpoint tools for C# callers: convert an official checkpoint, inspect a file, and the layer-by-layer parity forward (<c>vct convert</c>, <c>vct forward</c>).</summary>
public static class VctCheckpoints
{
    /// <summary>Throws <see cref="ArgumentException"/> when <paramref name="path"/> cannot name a Vct checkpoint (a <c>.json</c> name: its config would overwrite it).</summary>
    public static void ValidateOutputPath(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ModelIO.checkCheckpointPath(path);
    }

    /// <summary>
    /// Converts an official VCT checkpoint (detectron2 <c>model_best.pth</c>, CPU or GPU saved) to a Vct safetensors
    /// checkpoint with its JSON config beside it. The output path is checked before the (long) load.
    /// </summary>
    /// <param name="subset">The released configuration the checkpoint belongs to.</param>
    /// <param name="officialCheckpoint">The .pth, or a hub reference.</param>
    /// <param name="output">The .safetensors to write.</param>
    public static ConversionResult Convert(VctSubset subset, string officialCheckpoint, string output)
    {
        ArgumentException.ThrowIfNullOrEmpty(officialCheckpoint);
        ValidateOutputPath(output);
        VctRuntime.Initialize();
        var (model, report) = ModelIO.loadOfficial(subset.ToCore(), VctWeights.Resolve(officialCheckpoint), TorchSharp.torch.CPU).ToValueTuple();
        using (model)
        {
            ModelIO.save(output, model);
            return new ConversionResult(output, ModelIO.configPathOf(output), report.FromCore());
        }
    }

    /// <summary>Reads a checkpoint's tensors (names, dtypes, shapes), metadata and, for Vct checkpoints, its config.</summary>
    /// <param name="checkpoint">A .safetensors, .pth, .pt or .pkl file, or a hub reference.</param>
    public static CheckpointInfo Inspect(string checkpoint)
    {
        ArgumentException.ThrowIfNullOrEmpty(checkpoint);
        var path = VctWeights.Resolve(checkpoint);
        VctRuntime.Initialize();
        using var ck = StateDict.load(path);
        var tensors = ck.StateDict.Select(kv => new CheckpointTensor(kv.Key, kv.Value.dtype.ToString(), kv.Value.shape)).ToList();
        var metadata = ck.Metadata.ToDictionary(kv => kv.Key, kv => kv.Value);
        var format = ck.Format.IsSafetensors ? CheckpointFormat.Safetensors : ck.Format.IsTorchZip ? CheckpointFormat.TorchZip
            : ck.Format.IsTorchLegacy ? CheckpointFormat.TorchLegacy : CheckpointFormat.Pickle;
        VctSubset? subset = null;
        string? config = null;
        if (format == CheckpointFormat.Safetensors && (File.Exists(ModelIO.configPathOf(path)) || metadata.ContainsKey("vct_config")))
        {
            var c = ModelIO.readConfig(path);
            subset = VctTypeConversions.FromCore(c.Subset);
            config = ConfigJson.toText(c);
        }
        return new CheckpointInfo(path, format, tensors, metadata, subset, config);
    }

    /// <summary>
    /// The parity tool: runs the raw model in eval mode on the tensors of <paramref name="inputs"/> (a flat dict
    /// name -> tensor as torch.save writes it, or a .safetensors, holding images, pre_masks, audio_log_mel and for AVSS
    /// vid_temporal_mask_flag) and writes every prediction, named as the official model's outputs, to <paramref name="output"/>.
    /// </summary>
    /// <param name="checkpoint">A Vct .safetensors, an official .pth (with <see cref="ForwardOptions.Subset"/>) or a hub reference.</param>
    /// <param name="inputs">The inputs file.</param>
    /// <param name="output">The .safetensors to write.</param>
    /// <param name="options">Subset, input prefix, intermediates, device.</param>
    /// <param name="loaded">Hears the load report as soon as the checkpoint is loaded (before the forward pass).</param>
    public static ForwardResult Forward(string checkpoint, string inputs, string output, ForwardOptions? options = null, Action<CheckpointLoadReport>? loaded = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(inputs);
        ArgumentException.ThrowIfNullOrEmpty(output);
        options ??= new ForwardOptions();
        VctRuntime.Initialize();
        var device = VctRuntime.ResolveDevice(options.Device);
        VctTypeConversions.CheckPrecision(options.Precision, device);
        var (model, report, _) = ModelLoading.Load(checkpoint, options.Subset, options.Device);
        using (model)
        {
            loaded?.Invoke(report);
            var cfg = model.Config;
            var (read, owner) = Parity.readInputs(inputs, options.InputPrefix, cfg.UsePreSam, cfg.Subset).ToValueTuple();
            using (owner)
            {
                var moved = new VctInputs(read.Images.to(device), VctTypeConversions.OptRef(read.PreMasks.OrNull()?.to(device)), read.Audio);
                var named = Parity.run(model, options.Precision.ToCore(), moved, options.Intermediates);
                try
                {
                    Parity.write(output, named);
                    return new ForwardResult(output, named.Select(t => t.Item1).ToList(), report);
                }
                finally
                {
                    foreach (var t in named) t.Item2.Dispose();
                }
            }
        }
    }
}
