namespace Vct.Core.Checkpoint

open System
open System.IO
open System.Net
open System.Net.Http
open System.Net.Http.Headers
open System.Security.Cryptography
open System.Text
open System.Threading

/// A released file `vct weights list` names.
type HubEntry =
    { /// Short name (`s4`, `swin-b-22k`...): accepted wherever a checkpoint or weights path is.
      Name: string
      /// The file's name at its source.
      File: string
      /// Where it comes from: `hf:owner/repo/path` or an `https://` URL.
      Source: string
      /// What it is.
      Description: string
      /// The option it is meant for (`--checkpoint --subset s4`, `--swin-weights`, `--vggish-weights`).
      UsedFor: string
      /// Lower-case hex sha256 when published; None when the source publishes none.
      Sha256: string option }

/// Where the resolver keeps files and whether it may use the network.
type HubSettings =
    { /// Cache root (VCT_CACHE, else $XDG_CACHE_HOME/vct, else the user's cache folder).
      CacheRoot: string
      /// VCT_OFFLINE=1: never touch the network; only cached files are used.
      Offline: bool
      /// Base of `hf:` references (VCT_HF_ENDPOINT, default https://huggingface.co).
      HfEndpoint: string
      /// Longest wait for the connection and for each block of data (VCT_HTTP_TIMEOUT seconds, default 60).
      Timeout: TimeSpan }

/// How far a download is.
type DownloadProgress =
    { Url: string
      /// The file being written (the `.part` file).
      Path: string
      BytesDone: int64
      /// The whole size when the server says it.
      Total: int64 option }

/// Settings from the environment.
[<RequireQualifiedAccess>]
module HubSettings =
    /// The default Hugging Face endpoint.
    [<Literal>]
    let DefaultHfEndpoint = "https://huggingface.co"

    /// The user's cache folder for Vct: `$XDG_CACHE_HOME/vct`, else `~/.cache/vct` (Linux), `~/Library/Caches/vct`
    /// (macOS), `%LOCALAPPDATA%\vct\cache` (Windows).
    let defaultCacheRoot (get: string -> string option) =
        match get "XDG_CACHE_HOME" with
        | Some x when Path.IsPathRooted x -> Path.Combine(x, "vct")
        | _ when OperatingSystem.IsWindows() ->
            Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.LocalApplicationData, "vct", "cache")
        | _ ->
            let home = Environment.GetFolderPath Environment.SpecialFolder.UserProfile
            if OperatingSystem.IsMacOS() then Path.Combine(home, "Library", "Caches", "vct")
            else Path.Combine(home, ".cache", "vct")

    /// Settings read through `get` (an environment lookup): VCT_CACHE, XDG_CACHE_HOME, VCT_OFFLINE, VCT_HF_ENDPOINT, VCT_HTTP_TIMEOUT.
    let fromLookup (get: string -> string option) : HubSettings =
        let get name = get name |> Option.map (fun (s: string) -> s.Trim()) |> Option.filter (fun s -> s <> "")
        let offline =
            match get "VCT_OFFLINE" with
            | None -> false
            | Some v ->
                match v.ToLowerInvariant() with
                | "1" | "true" | "yes" | "on" -> true
                | "0" | "false" | "no" | "off" -> false
                | other -> invalidArg "VCT_OFFLINE" $"VCT_OFFLINE must be 1 or 0, got '{other}'"
        let timeout =
            match get "VCT_HTTP_TIMEOUT" with
            | None -> TimeSpan.FromSeconds 60.0
            | Some v ->
                match Double.TryParse(v, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
                | true, s when s > 0.0 -> TimeSpan.FromSeconds s
                | _ -> invalidArg "VCT_HTTP_TIMEOUT" $"VCT_HTTP_TIMEOUT must be a positive number of seconds, got '{v}'"
        let endpoint =
            match get "VCT_HF_ENDPOINT" with
            | None -> DefaultHfEndpoint
            | Some e ->
                match Uri.TryCreate(e, UriKind.Absolute) with
                | true, u when u.Scheme = Uri.UriSchemeHttp || u.Scheme = Uri.UriSchemeHttps -> e.TrimEnd '/'
                | _ -> invalidArg "VCT_HF_ENDPOINT" $"VCT_HF_ENDPOINT must be an http:// or https:// URL, got '{e}'"
        { CacheRoot =
            match get "VCT_CACHE" with
            | Some c -> Path.GetFullPath c
            | None -> defaultCacheRoot get
          Offline = offline
          HfEndpoint = endpoint
          Timeout = timeout }

    /// Settings from this process's environment variables.
    let fromEnvironment () : HubSettings =
        fromLookup (fun name -> Environment.GetEnvironmentVariable name |> Option.ofObj)

/// Local paths, `hf:owner/repo/path` references, http(s) URLs and catalogue names, resolved to local files.
/// Downloads land in a cache (host / URL path) through a `.part` file that resumes with a Range request, are
/// checked against their length (and the expected sha256 when known), get a `<file>.sha256` sidecar (sha256sum
/// format) and are renamed into place. A cached file is checked against its sidecar each time it is reused; a
/// mismatch is an error telling to delete the file (it is never replaced silently). A file without a sidecar
/// (one put into the cache by hand) gets one on first use.
[<RequireQualifiedAccess>]
module Hub =
    /// The released files.
    let catalogue : HubEntry list =
        let vct subset folder (used: string) =
            { Name = subset
              File = "model_best.pth"
              Source = $"hf:nowherespyfly/VCT_AVS/{folder}/model_best.pth"
              Description = $"VCT Swin-B 384 checkpoint released for AVSBench {used}"
              UsedFor = $"--checkpoint (with --subset {subset})"
              Sha256 = None }
        [ vct "s4" "s4_swinb_384" "S4 (single source)"
          vct "ms3" "ms3_swinb_384" "MS3 (multiple sources)"
          vct "avss" "ss_swinb_384" "AVSS (semantic)"
          { Name = "swin-b-22k"
            File = "swin_base_patch4_window12_384_22k.pth"
            Source = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window12_384_22k.pth"
            Description = "Swin-B (window 12, 384) pretrained on ImageNet-22K, the backbone training starts from"
            UsedFor = "--swin-weights"
            Sha256 = None }
          { Name = "vggish"
            File = "vggish-10086976.pth"
            Source = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
            Description = "torchvggish VGGish audio encoder weights"
            UsedFor = "--vggish-weights"
            Sha256 = None } ]

    /// The catalogue entry of a name (case-insensitive).
    let tryFind (name: string) =
        catalogue |> List.tryFind (fun e -> String.Equals(e.Name, name, StringComparison.OrdinalIgnoreCase))

    let private isUrl (s: string) =
        s.StartsWith("https://", StringComparison.OrdinalIgnoreCase) || s.StartsWith("http://", StringComparison.OrdinalIgnoreCase)

    let private isHf (s: string) = s.StartsWith("hf:", StringComparison.Ordinal)

    /// True for `hf:`, http(s) URLs and catalogue names (whether or not a local file has that name).
    let isReference (s: string) = isHf s || isUrl s || (tryFind s).IsSome

    /// The URL of an `hf:owner/repo/path` reference under an endpoint.
    let hfUrl (endpoint: string) (reference: string) =
        let rest = reference.Substring(3).Trim('/')
        let parts = rest.Split('/', StringSplitOptions.RemoveEmptyEntries)
        if parts.Length < 3 || parts |> Array.exists (fun p -> p = "." || p = "..") then
            invalidArg "reference" $"{reference}: a Hugging Face reference is hf:owner/repo/path/to/file (e.g. hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth)"
        let path = parts[2..] |> Array.map Uri.EscapeDataString |> String.concat "/"
        $"{endpoint.TrimEnd '/'}/{Uri.EscapeDataString parts[0]}/{Uri.EscapeDataString parts[1]}/resolve/main/{path}"

    /// The URL a reference names (None for a local path); a huggingface.co `/blob/` page link becomes its `/resolve/` file.
    let tryUrl (settings: HubSettings) (reference: string) : string option =
        if isHf reference then Some(hfUrl settings.HfEndpoint reference)
        elif isUrl reference then
            match Uri.TryCreate(reference, UriKind.Absolute) with
            | true, u ->
                let segs = u.AbsolutePath.Split('/')
                if u.Host.EndsWith("huggingface.co", StringComparison.OrdinalIgnoreCase) && segs.Length > 4 && segs[3] = "blob" then
                    segs[3] <- "resolve"
                    Some(UriBuilder(u, Path = String.Join("/", segs)).Uri.AbsoluteUri)
                else Some reference
            | _ -> invalidArg "reference" $"{reference}: not a valid URL"
        else
            match tryFind reference with
            | Some e when isHf e.Source -> Some(hfUrl settings.HfEndpoint e.Source)
            | Some e -> Some e.Source
            | None -> None

    /// The URL of a catalogue entry under these settings.
    let entryUrl (settings: HubSettings) (e: HubEntry) = if isHf e.Source then hfUrl settings.HfEndpoint e.Source else e.Source

    let private sanitize (segment: string) =
        let bad = set (Path.GetInvalidFileNameChars()) + set [ '/'; '\\'; ':'; '*'; '?'; '"'; '<'; '>'; '|' ]
        let s = String(segment |> Seq.map (fun c -> if bad.Contains c || Char.IsControl c then '_' else c) |> Array.ofSeq)
        let s = s.TrimEnd('.', ' ')
        if s = "" || s = "." || s = ".." then "_" else s

    let private hex (bytes: byte[]) = Convert.ToHexStringLower bytes

    /// Where the cache keeps the file of a URL: `<root>/<host[_port]>/<path segments>` (each segment sanitized; a
    /// query adds a short hash to the file name).
    let cachePath (settings: HubSettings) (url: string) : string =
        let u =
            match Uri.TryCreate(url, UriKind.Absolute) with
            | true, u -> u
            | _ -> invalidArg "url" $"{url}: not a valid URL"
        let host = sanitize (if u.IsDefaultPort then u.Host else $"{u.Host}_{u.Port}")
        let segs =
            u.AbsolutePath.Split('/', StringSplitOptions.RemoveEmptyEntries) |> Array.map (Uri.UnescapeDataString >> sanitize)
        let segs = if segs.Length = 0 then [| "index" |] else segs
        if u.Query.Length > 1 then
            let q = hex (SHA256.HashData(Encoding.UTF8.GetBytes u.Query)) |> fun h -> h.Substring(0, 8)
            let last = segs[segs.Length - 1]
            segs[segs.Length - 1] <- $"{Path.GetFileNameWithoutExtension last}-{q}{Path.GetExtension last}"
        let root = Path.GetFullPath settings.CacheRoot
        let full = Path.GetFullPath(Path.Combine(Array.append [| root; host |] segs))
        if not (full.StartsWith(root.TrimEnd(Path.DirectorySeparatorChar) + string Path.DirectorySeparatorChar, StringComparison.Ordinal)) then
            invalidArg "url" $"{url}: maps outside the cache ({full})"
        full

    /// The sha256 of a file, lower-case hex.
    let sha256File (path: string) =
        use s = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 <<< 20)
        hex (SHA256.HashData s)

    /// The sidecar of a cached file: `<file>.sha256`.
    let sidecarPath (file: string) = file + ".sha256"

    let private writeSidecar (file: string) (sha: string) =
        let side = sidecarPath file
        let tmp = side + ".tmp"
        File.WriteAllText(tmp, $"{sha}  {Path.GetFileName file}\n")
        File.Move(tmp, side, true)

    let private readSidecar (file: string) =
        let side = sidecarPath file
        if File.Exists side then
            let text = File.ReadAllText(side).Trim()
            let first = text.Split([| ' '; '\t'; '\n' |], StringSplitOptions.RemoveEmptyEntries) |> Array.tryHead
            match first with
            | Some h when h.Length = 64 && h |> Seq.forall Uri.IsHexDigit -> Some(h.ToLowerInvariant())
            | _ -> raise (InvalidDataException($"{side}: not a sha256 sidecar (expected '<64 hex digits>  <file name>'); delete it and {file} to download again"))
        else None

    let private byHand (url: string) (target: string) =
        $"to get it by hand: `curl -L --create-dirs -o \"{target}\" \"{url}\"` (that is where the cache looks), or download it with a browser and pass the local path"

    /// Checks a cached file against its sidecar (and the expected sha256); writes the sidecar when there is none.
    let private verifyCached (url: string) (file: string) (expected: string option) =
        let actual = sha256File file
        match readSidecar file with
        | Some recorded when recorded <> actual ->
            raise (InvalidDataException(
                $"{file}: the cached file is damaged (sha256 {actual}, but {sidecarPath file} records {recorded}); "
                + $"delete it (and its .sha256) to download {url} again"))
        | Some _ -> ()
        | None -> writeSidecar file actual
        match expected with
        | Some e when e <> actual ->
            raise (InvalidDataException(
                $"{file}: sha256 {actual} differs from the expected {e} for {url}; delete it (and its .sha256) to download again"))
        | _ -> ()

    // One client for the process. Timeouts are per request (connection and each read), not a whole-download limit.
    let private client =
        lazy
            (let handler = new SocketsHttpHandler(AutomaticDecompression = DecompressionMethods.None, AllowAutoRedirect = true)
             let c = new HttpClient(handler, Timeout = Threading.Timeout.InfiniteTimeSpan)
             c.DefaultRequestHeaders.UserAgent.ParseAdd "vct/0.1"
             c)

    /// The partial-download error: names the URL, what went wrong, that the part is kept and how to get the file by hand.
    let private networkError (url: string) (part: string) (target: string) (why: string) (inner: exn) =
        let kept =
            if File.Exists part && FileInfo(part).Length > 0L then
                $"the partial download is kept ({FileInfo(part).Length} bytes in {part}) and resumes on the next try"
            else "nothing was downloaded yet; try again"
        IOException($"{url}: download failed ({why}); {kept}; {byHand url target}", inner)

    let private innermost (e: exn) =
        let mutable x = e
        while not (isNull x.InnerException) do x <- x.InnerException
        x.Message

    /// Downloads `url` to `target` (through `target.part`, resuming it); verifies length and the expected sha256,
    /// writes the sidecar and renames into place.
    let private download (settings: HubSettings) (url: string) (target: string) (expected: string option)
                         (progress: DownloadProgress -> unit) (ct: CancellationToken) =
        let dir = Path.GetDirectoryName target
        Directory.CreateDirectory dir |> ignore
        let part = target + ".part"
        // The validator (strong ETag or Last-Modified) of the response a .part began with: a resume sends it as
        // If-Range, so a file changed at the source restarts instead of mixing two versions.
        let validator = part + ".validator"
        let fail why (inner: exn) = raise (networkError url part target why inner)
        // A timer per step: the connection and each read must finish within the timeout.
        let withTimeout (f: CancellationToken -> 'a) =
            use cts = CancellationTokenSource.CreateLinkedTokenSource ct
            cts.CancelAfter settings.Timeout
            try f cts.Token
            with
            | :? OperationCanceledException as e when not ct.IsCancellationRequested ->
                fail $"no answer within {settings.Timeout.TotalSeconds:G} s" e
        let mutable finished = false
        let mutable restarts = 0
        while not finished do
            let have = if File.Exists part then FileInfo(part).Length else 0L
            use request = new HttpRequestMessage(HttpMethod.Get, url)
            if have > 0L then
                request.Headers.Range <- RangeHeaderValue(Nullable have, Nullable())
                if File.Exists validator then
                    let v = File.ReadAllText(validator).Trim()
                    if v.StartsWith "etag " then
                        match EntityTagHeaderValue.TryParse(v.Substring 5) with
                        | true, tag -> request.Headers.IfRange <- RangeConditionHeaderValue(tag)
                        | _ -> ()
                    elif v.StartsWith "date " then
                        match DateTimeOffset.TryParse(v.Substring 5, Globalization.CultureInfo.InvariantCulture, Globalization.DateTimeStyles.AssumeUniversal) with
                        | true, d -> request.Headers.IfRange <- RangeConditionHeaderValue(d)
                        | _ -> ()
            elif File.Exists validator then File.Delete validator
            let response =
                try withTimeout (fun t -> client.Value.Send(request, HttpCompletionOption.ResponseHeadersRead, t))
                with
                | :? HttpRequestException as e -> fail (innermost e) e
            use response = response
            let status = int response.StatusCode
            let contentLength = Option.ofNullable response.Content.Headers.ContentLength
            let contentRange = response.Content.Headers.ContentRange
            let restart () =
                if restarts >= 2 then fail "the server keeps answering the resume request inconsistently" null
                restarts <- restarts + 1
                File.Delete part
            match status with
            | 416 when have > 0L ->
                // Range not satisfiable: the part is complete when it already has the whole length; else start over.
                let total = if isNull contentRange then None else Option.ofNullable contentRange.Length
                if total = Some have then finished <- true else restart ()
            | 206 when have > 0L && not (isNull contentRange) && contentRange.From.HasValue && contentRange.From.Value <> have -> restart ()
            | 200 | 206 ->
                let append = status = 206 && have > 0L
                let total =
                    if status = 206 then
                        match (if isNull contentRange then None else Option.ofNullable contentRange.Length), contentLength with
                        | Some t, _ -> Some t
                        | None, Some n -> Some(have + n)
                        | None, None -> None
                    else contentLength
                let start = if append then have else 0L
                if not append then
                    let etag = response.Headers.ETag
                    let modified = response.Content.Headers.LastModified
                    if not (isNull etag) && not etag.IsWeak then File.WriteAllText(validator, "etag " + etag.ToString())
                    elif modified.HasValue then File.WriteAllText(validator, "date " + modified.Value.ToString("R", Globalization.CultureInfo.InvariantCulture))
                    elif File.Exists validator then File.Delete validator
                let stream =
                    try
                        new FileStream(part, (if append then FileMode.Append else FileMode.Create), FileAccess.Write, FileShare.None, 1 <<< 16)
                    with :? IOException as e ->
                        raise (IOException($"{part}: cannot write the download ({e.Message}); is another vct downloading the same file?", e))
                use file = stream
                let mutable doneBytes = start
                progress { Url = url; Path = part; BytesDone = doneBytes; Total = total }
                let body = withTimeout (fun t -> response.Content.ReadAsStream t)
                use body = body
                let buffer = Array.zeroCreate<byte> (1 <<< 16)
                let mutable reading = true
                while reading do
                    let n =
                        try withTimeout (fun t -> body.ReadAsync(buffer.AsMemory(), t).AsTask().GetAwaiter().GetResult())
                        with
                        | :? IOException as e ->
                            file.Flush()
                            let of' = match total with Some t -> string t | None -> "an unknown number of"
                            fail $"the transfer was cut after {doneBytes} of {of'} bytes: {innermost e}" e
                        | :? HttpRequestException as e ->
                            file.Flush()
                            fail (innermost e) e
                    if n = 0 then reading <- false
                    else
                        file.Write(buffer, 0, n)
                        doneBytes <- doneBytes + int64 n
                        progress { Url = url; Path = part; BytesDone = doneBytes; Total = total }
                file.Flush()
                match total with
                | Some t when doneBytes <> t ->
                    file.Dispose()
                    fail $"the transfer ended after {doneBytes} of {t} bytes" null
                | _ -> ()
                finished <- true
            | 404 ->
                raise (FileNotFoundException($"{url}: HTTP 404 (Not Found): no such file at the source; check the reference (`vct weights list` names the released files)", url))
            | _ ->
                let reason = if String.IsNullOrEmpty response.ReasonPhrase then "" else $" ({response.ReasonPhrase})"
                let hint = if status = 401 || status = 403 then " (the file may need a login); " else "; "
                raise (IOException($"{url}: HTTP {status}{reason}{hint}{byHand url target}"))
        let actual = sha256File part
        match expected with
        | Some e when e <> actual ->
            File.Delete part
            if File.Exists validator then File.Delete validator
            raise (InvalidDataException($"{url}: the download's sha256 {actual} differs from the expected {e}; the file was deleted, nothing was cached"))
        | _ -> ()
        writeSidecar target actual
        File.Move(part, target, true)
        if File.Exists validator then File.Delete validator

    let private normalizeSha (s: string option) =
        s
        |> Option.map (fun h -> h.Trim().ToLowerInvariant())
        |> Option.map (fun h ->
            if h.Length <> 64 || not (h |> Seq.forall Uri.IsHexDigit) then invalidArg "sha256" $"expected sha256 must be 64 hex digits, got '{h}'"
            h)

    /// Resolves a reference to a local file: an existing local path is itself; `hf:owner/repo/path`, http(s) URLs
    /// and catalogue names are downloaded into the cache (or taken from it). `expectedSha256` overrides the
    /// catalogue's; `progress` hears about downloads.
    let resolveWith (settings: HubSettings) (expectedSha256: string option) (progress: DownloadProgress -> unit)
                    (ct: CancellationToken) (reference: string) : string =
        if String.IsNullOrWhiteSpace reference then invalidArg "reference" "empty checkpoint or weights reference"
        if File.Exists reference then
            match normalizeSha expectedSha256 with
            | Some e ->
                let actual = sha256File reference
                if actual <> e then raise (InvalidDataException($"{reference}: sha256 {actual} differs from the expected {e}"))
            | None -> ()
            reference
        elif Directory.Exists reference then reference
        else
            match tryUrl settings reference with
            | None ->
                raise (FileNotFoundException(
                    $"{reference}: no such file (nor a hub reference: hf:owner/repo/path, an https:// URL, or a name from `vct weights list`)", reference))
            | Some url ->
                let expected =
                    match normalizeSha expectedSha256 with
                    | Some e -> Some e
                    | None -> (if isHf reference || isUrl reference then None else tryFind reference) |> Option.bind (fun e -> e.Sha256)
                let target = cachePath settings url
                if File.Exists target then
                    verifyCached url target expected
                    target
                elif settings.Offline then
                    raise (IOException(
                        $"{url}: not in the cache and VCT_OFFLINE=1 forbids the network; {byHand url target}"))
                else
                    download settings url target expected progress ct
                    target

    /// `resolveWith` under the environment's settings, without progress.
    let resolve (reference: string) : string =
        resolveWith (HubSettings.fromEnvironment ()) None ignore CancellationToken.None reference

    /// The cache path of a reference when it is a hub reference and its file is cached.
    let tryCached (settings: HubSettings) (reference: string) : string option =
        match tryUrl settings reference with
        | Some url ->
            let p = cachePath settings url
            if File.Exists p then Some p else None
        | None -> None
