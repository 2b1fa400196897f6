using System.CommandLine;
using System.Text.Json;
using Microsoft.FSharp.Core;
using Vct.Core;
using Vct.Core.Platform;
using Vct.Core.Checkpoint;

namespace Vct.Cli;

/// <summary><c>vct convert</c> and <c>vct forward</c>: checkpoint conversion and the layer-by-layer parity tool.</summary>
internal static class ModelCommands
{
    static FSharpOption<Subset> SubsetOption(string? text) =>
        string.IsNullOrWhiteSpace(text) ? FSharpOption<Subset>.None : FSharpOption<Subset>.Some(Subset.Parse(text));

    static void PrintReport(LoadReport r, TextWriter w)
    {
        w.WriteLine($"loaded {r.Loaded.Length} tensors; missing {r.Missing.Length}, unexpected {r.Unexpected.Length}, " +
                    $"shape-mismatched {r.ShapeMismatched.Length}, dropped {r.Dropped.Length}, converted {r.Converted.Length}");
        if (r.Dropped.Length > 0)
            w.WriteLine($"dropped (documented as unused by VCT: criterion.*, audio_backbone.embeddings.*): {string.Join(", ", r.Dropped)}");
    }

    /// <summary><c>vct convert --subset s4 --checkpoint model_best.pth --out model.safetensors</c></summary>
    public static Command Convert()
    {
        var subset = new Option<string>("--subset") { Description = "s4 | ms3 | avss: the released configuration the checkpoint belongs to", Required = true };
        var checkpoint = new Option<string>("--checkpoint") { Description = "Official model_best.pth (detectron2 format, CPU or GPU saved), or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var output = new Option<string>("--out") { Description = "Output .safetensors (a .json config is written beside it)", Required = true };
        var cmd = new Command("convert", "Convert an official VCT checkpoint to a Vct safetensors checkpoint with its JSON config");
        foreach (var o in new Option[] { subset, checkpoint, output }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply("cpu", null);
            ModelIO.checkCheckpointPath(parse.GetValue(output)!); // before the (long) load
            var (model, report) = ModelIO.loadOfficial(Subset.Parse(parse.GetValue(subset)!), WeightsCommand.Resolve(parse.GetValue(checkpoint))!, TorchSharp.torch.CPU).ToValueTuple();
            using (model)
            {
                PrintReport(report, Console.Error);
                var outPath = parse.GetValue(output)!;
                ModelIO.save(outPath, model);
                Console.WriteLine($"wrote {outPath} and {ModelIO.configPathOf(outPath)}");
            }
            return 0;
        });
        return cmd;
    }

    /// <summary><c>vct forward --subset s4 --checkpoint CKPT --inputs FILE [--input-prefix P] --out OUT.safetensors [--intermediates]</c></summary>
    public static Command Forward()
    {
        var subset = new Option<string>("--subset") { Description = "s4 | ms3 | avss (required for official .pth checkpoints)" };
        var checkpoint = new Option<string>("--checkpoint") { Description = "Official .pth or Vct .safetensors checkpoint, or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var inputs = new Option<string>("--inputs") { Description = ".pt/.pth (flat dict name -> tensor, as torch.save writes it) or .safetensors with images, pre_masks, audio_log_mel[, vid_temporal_mask_flag]", Required = true };
        var prefix = new Option<string>("--input-prefix") { Description = "Prefix of the input names, e.g. 'in.'", DefaultValueFactory = _ => "" };
        var output = new Option<string>("--out") { Description = "Output .safetensors", Required = true };
        var intermediates = new Option<bool>("--intermediates") { Description = "Also write backbone, pixel-decoder, audio, PPQG and per-layer decoder tensors" };
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("forward", "Run the raw model in eval mode on tensors from a file and write every prediction (parity checks against the official model)");
        foreach (var o in new Option[] { subset, checkpoint, inputs, prefix, output, intermediates, device, threads }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            var dev = CommonOptions.Apply(parse.GetValue(device)!, parse.GetValue(threads));
            var (model, report) = Inference.loadModel(WeightsCommand.Resolve(parse.GetValue(checkpoint))!, SubsetOption(parse.GetValue(subset) ?? VctWeights.SubsetOf(parse.GetValue(checkpoint)!)?.ToString()), dev).ToValueTuple();
            using (model)
            {
                PrintReport(report, Console.Error);
                var cfg = model.Config;
                var (vctInputs, owner) = Parity.readInputs(parse.GetValue(inputs)!, parse.GetValue(prefix)!, cfg.UsePreSam, cfg.Subset).ToValueTuple();
                using (owner)
                {
                    var moved = new VctInputs(
                        vctInputs.Images.to(dev),
                        vctInputs.PreMasks == null ? null : FSharpOption<TorchSharp.torch.Tensor>.Some(vctInputs.PreMasks.Value.to(dev)),
                        vctInputs.Audio);
                    var named = Parity.run(model, moved, parse.GetValue(intermediates));
                    var outPath = parse.GetValue(output)!;
                    Parity.write(outPath, named);
                    Console.WriteLine($"wrote {named.Length} tensors to {outPath}");
                    foreach (var t in named) t.Item2.Dispose();
                }
            }
            return 0;
        });
        return cmd;
    }
}
