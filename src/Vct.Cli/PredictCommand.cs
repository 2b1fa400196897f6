using System.CommandLine;
using Spectre.Console;

namespace Vct.Cli;

/// <summary><c>vct predict</c>: a video (or images + audio) to masks, overlay.mp4 and summary.json, through the facade.</summary>
internal static class PredictCommand
{
    private static readonly string[] ImageExtensions = [".png", ".jpg", ".jpeg", ".bmp", ".webp"];

    /// <summary>Files, folders (their images) and globs (<c>dir/*.png</c>), each group in name order.</summary>
    internal static List<string> ExpandInputs(IEnumerable<string> inputs)
    {
        var files = new List<string>();
        foreach (var item in inputs)
        {
            if (Directory.Exists(item))
            {
                var found = Directory.EnumerateFiles(item)
                    .Where(f => ImageExtensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
                    .OrderBy(f => Path.GetFileName(f), StringComparer.Ordinal).ToList();
                if (found.Count == 0) throw new FileNotFoundException($"{item}: no images (.png, .jpg, .jpeg, .bmp, .webp) in this folder");
                files.AddRange(found);
            }
            else if (item.Contains('*') || item.Contains('?'))
            {
                var dir = Path.GetDirectoryName(item);
                dir = string.IsNullOrEmpty(dir) ? "." : dir;
                var pattern = Path.GetFileName(item);
                if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"{item}: folder '{dir}' not found");
                var found = Directory.EnumerateFiles(dir, pattern).OrderBy(f => Path.GetFileName(f), StringComparer.Ordinal).ToList();
                if (found.Count == 0) throw new FileNotFoundException($"{item}: no file matches");
                files.AddRange(found);
            }
            else if (File.Exists(item)) files.Add(item);
            else throw new FileNotFoundException($"{item}: no such file", item);
        }
        return files;
    }

    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "Vct .safetensors, official .pth (with --subset), or a hub reference (hf:owner/repo/path, https://..., a name from `vct weights list`)", Required = true };
        var subset = CommonOptions.Subset("s4 | ms3 | avss: required for official .pth checkpoints");
        var video = new Option<string?>("--video-input") { Description = "A video file (mp4, mkv, webm, mov, avi: anything ffmpeg reads)" };
        var input = new Option<string[]>("--input") { Description = "Image files, folders or globs (name order); needs --audio", AllowMultipleArgumentsPerToken = true };
        var audio = new Option<string?>("--audio") { Description = "Audio file (WAV or anything ffmpeg reads); replaces the video's own track" };
        var audioMissing = CommonOptions.Choice("--audio-missing", "refuse: a video without audio is an error; silence: go on with digital-silence examples", "refuse", "refuse", "silence");
        var output = new Option<string>("--output") { Description = "Output folder (created; must not hold an earlier prediction)", Required = true };
        var fps = new Option<double>("--fps") { Description = "Frames segmented per second (1 = AVSBench's sampling)", DefaultValueFactory = _ => 1.0 };
        var preMasks = new Option<string?>("--pre-masks") { Description = "Folder of Semantic-SAM mask images by frame name (<frame>_mask_color.png)" };
        var missing = CommonOptions.MissingMasks("Pre-SAM models without --pre-masks: refuse | blank | skip");
        var precision = CommonOptions.Precision();
        var saveScores = new Option<bool>("--save-scores") { Description = "Also write each frame's score maps as scores/NNNNNN.npy" };
        var noOverlay = new Option<bool>("--no-overlay") { Description = "Do not write overlay.mp4" };
        var batch = new Option<int>("--batch-frames") { Description = "Frames per forward pass", DefaultValueFactory = _ => 5 };
        fps.Validators.Add(r =>
        {
            var f = r.GetValueOrDefault<double>();
            if (!(f > 0 && f <= 120)) r.AddError($"--fps must be in (0, 120], got {f}");
        });
        batch.Validators.Add(r => { if (r.GetValueOrDefault<int>() < 1) r.AddError("--batch-frames must be at least 1"); });
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("predict", "Segment the sounding objects of a video: masks/, overlay.mp4 and summary.json under --output");
        foreach (var o in new Option[] { checkpoint, subset, video, input, audio, audioMissing, output, fps, preMasks, missing, saveScores, noOverlay, batch, precision, device, threads })
            cmd.Options.Add(o);
        cmd.Validators.Add(r =>
        {
            var hasVideo = r.GetValue(video) is not null;
            var hasImages = (r.GetValue(input) ?? []).Length > 0;
            if (hasVideo == hasImages) r.AddError("give either --video-input FILE or --input IMAGES... (with --audio FILE)");
            if (hasImages && r.GetValue(audio) is null && r.GetValue(audioMissing) != "silence") r.AddError("--input images need --audio FILE (or --audio-missing silence)");
            if (r.GetValue(preMasks) is not null && r.GetValue(missing) != "refuse") r.AddError("--pre-masks and --missing-masks exclude each other");
        });
        cmd.SetAction(parse =>
        {
            CommonOptions.Apply(parse.GetValue(threads));
            var source = parse.GetValue(video) is string v ? PredictInput.FromVideo(v) : PredictInput.FromImages(ExpandInputs(parse.GetValue(input)!));
            using var segmenter = VctSegmenter.Load(WeightsCommand.Resolve(parse.GetValue(checkpoint))!, new SegmenterOptions
            {
                Device = parse.GetValue(device)!,
                Subset = CommonOptions.ParseSubset(parse.GetValue(subset)) ?? VctWeights.SubsetOf(parse.GetValue(checkpoint)!),
                MissingMasks = CommonOptions.ParseMissingMasks(parse.GetValue(missing)!),
                Precision = CommonOptions.ParsePrecision(parse.GetValue(precision)!),
            });
            var options = new VideoOptions
            {
                Fps = parse.GetValue(fps),
                BatchFrames = parse.GetValue(batch),
                Audio = parse.GetValue(audio),
                SilenceWhenNoAudio = parse.GetValue(audioMissing) == "silence",
                PreMasks = parse.GetValue(preMasks),
            };
            var outputs = new PredictOutputOptions { Overlay = !parse.GetValue(noOverlay), SaveScores = parse.GetValue(saveScores) };
            // SIGTERM (a service manager, `kill`) stops like Ctrl-C: the masks written so far stay valid.
            using var interruption = new Interruption("\nvct: stopping after the current batch (Ctrl-C again to abort)", "\naborting",
                "\nvct: SIGTERM: stopping after the current batch", terminateAgainAborts: false);
            PredictSummary result;
            try
            {
                var outDir = parse.GetValue(output)!;
                if (!Console.IsErrorRedirected && AnsiConsole.Profile.Capabilities.Interactive)
                    result = AnsiConsole.Progress()
                        .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                        .Start(ctx =>
                        {
                            var task = ctx.AddTask("segmenting", maxValue: 1);
                            var progress = new SyncProgress<VideoProgress>(p =>
                            {
                                task.MaxValue = Math.Max(p.TotalFrames, p.Frames);
                                task.Value = p.Frames;
                                task.Description = $"{p.Frames} frames, {p.FramesPerSecond:F2} frames/s";
                            });
                            return segmenter.Predict(source, outDir, options, outputs, progress, w => AnsiConsole.MarkupLineInterpolated($"[yellow]{w}[/]"), interruption.Token);
                        });
                else
                {
                    var last = DateTime.MinValue;
                    var progress = new SyncProgress<VideoProgress>(p =>
                    {
                        if ((DateTime.UtcNow - last).TotalSeconds < 2 && p.Frames != p.TotalFrames) return;
                        last = DateTime.UtcNow;
                        var eta = p.TotalFrames > p.Frames && p.FramesPerSecond > 0 ? $", ETA {(p.TotalFrames - p.Frames) / p.FramesPerSecond:F0} s" : "";
                        var of = p.TotalFrames > 0 ? $"/{p.TotalFrames}" : "";
                        Console.Error.WriteLine($"predict: {p.Frames}{of} frames, {p.FramesPerSecond:F2} frames/s{eta}");
                    });
                    result = segmenter.Predict(source, outDir, options, outputs, progress, w => Console.Error.WriteLine(w), interruption.Token);
                }
            }
            finally
            {
                interruption.StopHandlingCtrlC();
            }
            Console.Error.WriteLine($"wrote {result.Frames} masks to {Path.Combine(result.OutputFolder, "masks")}" +
                (result.Overlay is null ? "" : $", {result.Overlay}") + $", {result.Summary} in {result.Seconds:F1} s");
            return result.Interrupted ? 130 : 0;
        });
        return cmd;
    }
}
