using Microsoft.FSharp.Core;
using Vct.Core.Checkpoint;

namespace Vct;

/// <summary>A released file: a VCT checkpoint, the Swin-B ImageNet-22K weights or the VGGish weights.</summary>
/// <param name="Name">Short name accepted wherever a checkpoint or weights path is (<c>s4</c>, <c>swin-b-22k</c>...).</param>
/// <param name="File">The file's name at its source.</param>
/// <param name="Source">Where it comes from: <c>hf:owner/repo/path</c> or an <c>https://</c> URL.</param>
/// <param name="Url">The URL it is downloaded from under the current settings (<c>VCT_HF_ENDPOINT</c>).</param>
/// <param name="Description">What it is.</param>
/// <param name="UsedFor">The option it is meant for (<c>--checkpoint</c>, <c>--swin-weights</c>, <c>--vggish-weights</c>).</param>
/// <param name="Sha256">The published sha256 (lower-case hex), or null when the source publishes none.</param>
/// <param name="CachedPath">The cached file, or null when it has not been downloaded.</param>
public sealed record WeightsEntry(string Name, string File, string Source, string Url, string Description, string UsedFor, string? Sha256, string? CachedPath);

/// <summary>How far a download is.</summary>
/// <param name="Url">The URL being downloaded.</param>
/// <param name="Path">The partial file being written.</param>
/// <param name="BytesDone">Bytes on disk so far (a resumed download starts above zero).</param>
/// <param name="TotalBytes">The whole size when the server says it, else null.</param>
public sealed record DownloadProgress(string Url, string Path, long BytesDone, long? TotalBytes);

/// <summary>
/// Released weights and hub references. A reference is a local path (used as it is), <c>hf:owner/repo/path</c>
/// (a Hugging Face file), an <c>http(s)://</c> URL or a catalogue name (<c>s4</c>, <c>ms3</c>, <c>avss</c>,
/// <c>swin-b-22k</c>, <c>vggish</c>). Downloads go to the cache (<c>VCT_CACHE</c>, default the user's cache folder),
/// resume after an interruption and are checked with sha256 on every reuse; <c>VCT_OFFLINE=1</c> forbids the network.
/// </summary>
public static class VctWeights
{
    /// <summary>The released files, with their URLs under the current settings and whether they are cached.</summary>
    public static IReadOnlyList<WeightsEntry> Catalogue
    {
        get
        {
            var settings = HubSettingsModule.fromEnvironment();
            return Hub.catalogue.Select(e =>
            {
                var cached = Hub.tryCached(settings, e.Name);
                return new WeightsEntry(e.Name, e.File, e.Source, Hub.entryUrl(settings, e), e.Description, e.UsedFor,
                    FSharpOption<string>.get_IsSome(e.Sha256) ? e.Sha256.Value : null,
                    FSharpOption<string>.get_IsSome(cached) ? cached.Value : null);
            }).ToList();
        }
    }

    /// <summary>The cache root under the current settings (<c>VCT_CACHE</c>, else <c>$XDG_CACHE_HOME/vct</c>, else the user's cache folder).</summary>
    public static string CacheRoot => HubSettingsModule.fromEnvironment().CacheRoot;

    /// <summary>True when <paramref name="reference"/> is a hub reference (hf:, http(s):// or a catalogue name) rather than a path.</summary>
    public static bool IsReference(string reference) => Hub.isReference(reference);

    /// <summary>The subset ("s4", "ms3", "avss") of a released checkpoint's catalogue name, else null.</summary>
    public static VctSubset? SubsetOf(string reference)
    {
        var e = Hub.tryFind(reference);
        if (!FSharpOption<HubEntry>.get_IsSome(e) || File.Exists(reference)) return null;
        return e.Value.Name switch { "s4" => VctSubset.S4, "ms3" => VctSubset.MS3, "avss" => VctSubset.AVSS, _ => null };
    }

    /// <summary>
    /// The local file of a reference: an existing path is returned as it is; hub references are taken from the cache or
    /// downloaded into it. Errors (no network, HTTP status, damaged cache, sha256 mismatch) are <see cref="IOException"/>
    /// or <see cref="InvalidDataException"/> with one line naming the file or URL and what to do.
    /// </summary>
    /// <param name="reference">A path, <c>hf:owner/repo/path</c>, an http(s) URL or a catalogue name.</param>
    /// <param name="progress">Hears about a download (not called when nothing is downloaded).</param>
    /// <param name="cancellationToken">Stops a download; the partial file is kept and resumes on the next call.</param>
    public static string Resolve(string reference, IProgress<DownloadProgress>? progress = null, CancellationToken cancellationToken = default) =>
        Resolve(reference, null, progress, cancellationToken);

    /// <summary>As <see cref="Resolve(string, IProgress{DownloadProgress}?, CancellationToken)"/>, checking the file against <paramref name="expectedSha256"/> (64 hex digits).</summary>
    public static string Resolve(string reference, string? expectedSha256, IProgress<DownloadProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(reference);
        var report = progress is null
            ? FuncConvert.FromAction<Core.Checkpoint.DownloadProgress>(_ => { })
            : FuncConvert.FromAction<Core.Checkpoint.DownloadProgress>(p => progress.Report(
                new DownloadProgress(p.Url, p.Path, p.BytesDone, FSharpOption<long>.get_IsSome(p.Total) ? p.Total.Value : null)));
        var sha = string.IsNullOrWhiteSpace(expectedSha256) ? FSharpOption<string>.None : FSharpOption<string>.Some(expectedSha256);
        return Hub.resolveWith(HubSettingsModule.fromEnvironment(), sha, report, cancellationToken, reference);
    }
}
