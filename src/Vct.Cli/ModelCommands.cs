using System.CommandLine;

namespace Vct.Cli;

/// <summary><c>vct convert</c>, <c>vct inspect</c> and <c>vct forward</c>: checkpoint conversion and inspection, and the layer-by-layer parity tool.</summary>
internal static class ModelCommands
{
    static void PrintReport(CheckpointLoadReport r, TextWriter w)
    {
        w.WriteLine(r.ToString());
        if (r.Dropped.Count > 0)
            w.WriteLine($"dropped (documented as unused by VCT: criterion.*, audio_backbone.embeddings.*): {string.Join(", ", r.Dropped)}");
    }

    /// <summary><c>vct convert --subset s4 --checkpoint model_best.pth --out model.safetensors</c></summary>
    public static Command Convert()
    {
        var subset = CommonOptions.Subset("s4 | ms3 | avss: the released configuration the checkpoint belongs to", required: true);
        var checkpoint = new Option<string>("--checkpoint") { Description = "Official model_best.pth (detectron2 format, CPU or GPU saved), or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var output = new Option<string>("--out") { Description = "Output .safetensors (a .json config is written beside it)", Required = true };
        var cmd = new Command("convert", "Convert an official VCT checkpoint to a Vct safetensors checkpoint with its JSON config");
        foreach (var o in new Option[] { subset, checkpoint, output }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply(null);
            var outPath = parse.GetValue(output)!;
            VctCheckpoints.ValidateOutputPath(outPath); // before a download or the (long) load
            var r = VctCheckpoints.Convert(CommonOptions.ParseSubset(parse.GetValue(subset))!.Value, WeightsCommand.Resolve(parse.GetValue(checkpoint))!, outPath);
            PrintReport(r.LoadReport, Console.Error);
            Console.WriteLine($"wrote {r.Checkpoint} and {r.Config}");
            return 0;
        });
        return cmd;
    }

    /// <summary><c>vct inspect --checkpoint CKPT [--tensors] [--json]</c></summary>
    public static Command Inspect()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "A .safetensors, .pth, .pt or .pkl checkpoint, or a hub reference", Required = true };
        var tensors = new Option<bool>("--tensors") { Description = "List every tensor (name, dtype, shape)" };
        var json = new Option<bool>("--json") { Description = "Print JSON instead of text" };
        var cmd = new Command("inspect", "Print what a checkpoint holds: format, tensors, parameters, metadata and (Vct checkpoints) the subset and config");
        foreach (var o in new Option[] { checkpoint, tensors, json }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            var info = VctCheckpoints.Inspect(WeightsCommand.Resolve(parse.GetValue(checkpoint))!);
            if (parse.GetValue(json))
            {
                Console.WriteLine(System.Text.Json.JsonSerializer.Serialize(new
                {
                    path = info.Path,
                    format = info.Format.ToString(),
                    subset = info.Subset?.ToString().ToLowerInvariant(),
                    tensors = info.Tensors.Count,
                    parameters = info.Parameters,
                    metadata = info.Metadata.Keys.Order(StringComparer.Ordinal).ToList(),
                    state_dict = parse.GetValue(tensors) ? info.Tensors.Select(t => new { name = t.Name, dtype = t.DType, shape = t.Shape }).ToList() : null,
                }, new System.Text.Json.JsonSerializerOptions { WriteIndented = true, DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.WhenWritingNull }));
                return 0;
            }
            Console.WriteLine($"{info.Path}: {info.Format}, {info.Tensors.Count} tensors, {info.Parameters} parameters" +
                              (info.Subset is VctSubset s ? $", Vct {s} checkpoint" : ""));
            if (info.Metadata.Count > 0) Console.WriteLine($"metadata: {string.Join(", ", info.Metadata.Keys.Order(StringComparer.Ordinal))}");
            if (parse.GetValue(tensors))
                foreach (var t in info.Tensors) Console.WriteLine($"{t.Name}  {t.DType}  [{string.Join(", ", t.Shape)}]");
            return 0;
        });
        return cmd;
    }

    /// <summary><c>vct forward --subset s4 --checkpoint CKPT --inputs FILE [--input-prefix P] --out OUT.safetensors [--intermediates]</c></summary>
    public static Command Forward()
    {
        var subset = CommonOptions.Subset("s4 | ms3 | avss (required for official .pth checkpoints)");
        var checkpoint = new Option<string>("--checkpoint") { Description = "Official .pth or Vct .safetensors checkpoint, or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var inputs = new Option<string>("--inputs") { Description = ".pt/.pth (flat dict name -> tensor, as torch.save writes it) or .safetensors with images, pre_masks, audio_log_mel[, vid_temporal_mask_flag]", Required = true };
        var prefix = new Option<string>("--input-prefix") { Description = "Prefix of the input names, e.g. 'in.'", DefaultValueFactory = _ => "" };
        var output = new Option<string>("--out") { Description = "Output .safetensors", Required = true };
        var intermediates = new Option<bool>("--intermediates") { Description = "Also write backbone, pixel-decoder, audio, PPQG and per-layer decoder tensors" };
        var precision = CommonOptions.Precision();
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("forward", "Run the raw model in eval mode on tensors from a file and write every prediction (parity checks against the official model)");
        foreach (var o in new Option[] { subset, checkpoint, inputs, prefix, output, intermediates, precision, device, threads }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply(parse.GetValue(threads));
            var reference = parse.GetValue(checkpoint)!;
            var options = new ForwardOptions
            {
                Subset = CommonOptions.ParseSubset(parse.GetValue(subset)) ?? VctWeights.SubsetOf(reference),
                InputPrefix = parse.GetValue(prefix)!,
                Intermediates = parse.GetValue(intermediates),
                Precision = CommonOptions.ParsePrecision(parse.GetValue(precision)!),
                Device = parse.GetValue(device)!,
            };
            var r = VctCheckpoints.Forward(WeightsCommand.Resolve(reference)!, parse.GetValue(inputs)!, parse.GetValue(output)!, options,
                report => PrintReport(report, Console.Error));
            Console.WriteLine($"wrote {r.Tensors.Count} tensors to {r.Output}");
            return 0;
        });
        return cmd;
    }
}
