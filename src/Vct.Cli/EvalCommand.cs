using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using Microsoft.FSharp.Core;
using Vct.Core;
using Vct.Core.Platform;
using Vct.Core.Data;
using Vct.Core.Training;

namespace Vct.Cli;

/// <summary><c>vct eval</c>: a checkpoint on a dataset split with the official metrics; per-video CSV and a summary JSON.</summary>
internal static class EvalCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "Vct .safetensors or official .pth (then --subset), or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var subset = new Option<string?>("--subset") { Description = "s4 | ms3 | avss (default: the checkpoint's)" };
        var data = new Option<string>("--data") { Description = "Dataset root in the official AVSBench layout", Required = true };
        var split = new Option<string>("--split") { Description = "train | val | test", DefaultValueFactory = _ => "test" };
        var output = new Option<string>("--out") { Description = "Output folder for per_video.csv and summary.json", Required = true };
        var shuffled = new Option<bool>("--audio-shuffled") { Description = "Also evaluate with each video's audio swapped for another's (a listening control)" };
        var workers = new Option<int>("--workers") { Description = "Decoding workers", DefaultValueFactory = _ => Environment.ProcessorCount };
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("eval", "Evaluate a checkpoint on a dataset split with the official VCT metrics (M_J, M_F)");
        foreach (var o in new Option[] { checkpoint, subset, data, split, output, shuffled, workers, device, threads }) cmd.Options.Add(o);
        cmd.SetAction(parse =>
        {
            var dev = CommonOptions.Apply(parse.GetValue(device)!, parse.GetValue(threads));
            var sub = parse.GetValue(subset) ?? VctWeights.SubsetOf(parse.GetValue(checkpoint)!)?.ToString();
            var (model, _) = Inference.loadModel(WeightsCommand.Resolve(parse.GetValue(checkpoint))!,
                string.IsNullOrWhiteSpace(sub) ? FSharpOption<Subset>.None : FSharpOption<Subset>.Some(Subset.Parse(sub)), dev).ToValueTuple();
            using (model)
            {
                var kind = model.Config.Subset.IsS4 ? Subset.S4 : model.Config.Subset.IsMS3 ? Subset.MS3 : Subset.AVSS;
                var records = Avsbench.records(kind, parse.GetValue(data)!, parse.GetValue(split)!);
                if (records.Length == 0)
                    throw new InvalidDataException($"{parse.GetValue(data)}: the {parse.GetValue(split)} split has no videos; nothing to evaluate");
                Console.Error.WriteLine($"evaluating {records.Length} videos of {parse.GetValue(split)}");
                using var audio = new TrainData.AudioCache(model);
                var summary = Trainer.evaluate(model, audio, records, false, parse.GetValue(workers));
                var outDir = parse.GetValue(output)!;
                Directory.CreateDirectory(outDir);
                var csv = new StringBuilder("video,j,f\n");
                foreach (var v in summary.Videos)
                    csv.Append(CultureInfo.InvariantCulture, $"{v.Id},{v.J:R},{v.F:R}\n");
                AtomicFile.writeAllText(Path.Combine(outDir, "per_video.csv"), csv.ToString());
                var json = new JsonObject
                {
                    ["checkpoint"] = parse.GetValue(checkpoint),
                    ["split"] = parse.GetValue(split),
                    ["videos"] = records.Length,
                    ["m_j"] = summary.MJ,
                    ["m_f"] = summary.MF,
                };
                if (parse.GetValue(shuffled))
                {
                    var control = Trainer.evaluate(model, audio, records, true, parse.GetValue(workers));
                    json["m_j_audio_shuffled"] = control.MJ;
                    json["m_f_audio_shuffled"] = control.MF;
                }
                var text = json.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true });
                AtomicFile.writeAllText(Path.Combine(outDir, "summary.json"), text);
                Console.WriteLine(text);
            }
            return 0;
        });
        return cmd;
    }
}
