using System.CommandLine;
using Spectre.Console;

namespace Vct.Cli;

/// <summary><c>vct weights list</c> and <c>vct weights get NAME|REF</c>; <see cref="Resolve"/> is how every command reads a checkpoint or weights option.</summary>
internal static class WeightsCommand
{
    /// <summary>
    /// A checkpoint or weights option resolved to a local file (hub references are downloaded into the cache):
    /// a progress bar on a terminal, a line every few seconds otherwise. Null stays null.
    /// </summary>
    internal static string? Resolve(string? reference, string? expectedSha256 = null)
    {
        if (string.IsNullOrWhiteSpace(reference)) return reference;
        if (!VctWeights.IsReference(reference) || File.Exists(reference) || Directory.Exists(reference)) return VctWeights.Resolve(reference, expectedSha256);
        if (!Console.IsErrorRedirected && AnsiConsole.Profile.Capabilities.Interactive)
        {
            string? path = null;
            AnsiConsole.Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn(), new TransferSpeedColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    ProgressTask? task = null;
                    var progress = new SyncProgress<DownloadProgress>(p =>
                    {
                        task ??= ctx.AddTask($"downloading {Path.GetFileName(p.Path[..^".part".Length])}", maxValue: p.TotalBytes ?? 1);
                        if (p.TotalBytes is long t) task.MaxValue = t;
                        else task.IsIndeterminate = true;
                        task.Value = p.BytesDone;
                    });
                    path = VctWeights.Resolve(reference, expectedSha256, progress);
                });
            return path;
        }
        var last = DateTime.MinValue;
        var announced = false;
        var plain = new SyncProgress<DownloadProgress>(p =>
        {
            if (!announced) { Console.Error.WriteLine($"downloading {p.Url}" + (p.BytesDone > 0 ? $" (resuming at {p.BytesDone} bytes)" : "")); announced = true; }
            var complete = p.TotalBytes is long t && p.BytesDone == t;
            if ((DateTime.UtcNow - last).TotalSeconds < 5 && !complete) return;
            last = DateTime.UtcNow;
            var of = p.TotalBytes is long total ? $" of {total / 1048576.0:F1} MiB ({100.0 * p.BytesDone / Math.Max(total, 1):F0}%)" : "";
            Console.Error.WriteLine($"download: {p.BytesDone / 1048576.0:F1} MiB{of}");
        });
        var resolved = VctWeights.Resolve(reference, expectedSha256, plain);
        if (announced) Console.Error.WriteLine($"saved {resolved}");
        return resolved;
    }

    public static Command Create()
    {
        var cmd = new Command("weights", "Released checkpoints and pretrained weights: list them, download one into the cache");
        cmd.Subcommands.Add(List());
        cmd.Subcommands.Add(Get());
        return cmd;
    }

    /// <summary><c>vct weights list</c>: name, file, used for, source URL, cached or not.</summary>
    static Command List()
    {
        var cmd = new Command("list", "Name the released files (use a name wherever a checkpoint or weights path goes)");
        cmd.SetAction(_ =>
        {
            var entries = VctWeights.Catalogue;
            if (!Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive)
            {
                var table = new Table().AddColumns("name", "file", "used for", "source URL", "cached");
                foreach (var e in entries)
                    table.AddRow(Markup.Escape(e.Name), Markup.Escape(e.File), Markup.Escape(e.UsedFor), Markup.Escape(e.Url), e.CachedPath is null ? "no" : "yes");
                AnsiConsole.Write(table);
            }
            else
            {
                var rows = entries.Select(e => new[] { e.Name, e.File, e.UsedFor, e.Url, e.CachedPath is null ? "no" : "yes" }).ToList();
                var header = new[] { "name", "file", "used for", "source URL", "cached" };
                var widths = Enumerable.Range(0, header.Length).Select(i => rows.Select(r => r[i].Length).Append(header[i].Length).Max()).ToArray();
                string Line(string[] r) => string.Join("  ", r.Select((c, i) => i == r.Length - 1 ? c : c.PadRight(widths[i])));
                Console.WriteLine(Line(header));
                foreach (var r in rows) Console.WriteLine(Line(r));
            }
            Console.WriteLine($"cache: {VctWeights.CacheRoot}");
            return 0;
        });
        return cmd;
    }

    /// <summary><c>vct weights get NAME|REF</c>: downloads (or finds in the cache) and prints the local path.</summary>
    static Command Get()
    {
        var reference = new Argument<string>("reference") { Description = "A name from `vct weights list`, hf:owner/repo/path, or an http(s) URL" };
        var sha = new Option<string?>("--sha256") { Description = "Expected sha256 (64 hex digits); a mismatch is an error and nothing is cached" };
        var cmd = new Command("get", "Download a released file (or any hub reference) into the cache and print its local path");
        cmd.Arguments.Add(reference);
        cmd.Options.Add(sha);
        cmd.SetAction(parse =>
        {
            var r = parse.GetValue(reference)!;
            var expected = parse.GetValue(sha);
            var path = Resolve(r, expected)!;
            Console.WriteLine(path);
            return 0;
        });
        return cmd;
    }
}
