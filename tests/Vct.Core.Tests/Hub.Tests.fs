module Vct.Core.Tests.HubTests

open System
open System.Collections.Concurrent
open System.IO
open System.Net
open System.Net.Sockets
open System.Security.Cryptography
open System.Text
open System.Threading
open Expecto
open Vct.Core.Checkpoint
open Vct.Core.Tests.Support

/// A request the loopback server saw: path, Range and If-Range headers.
type Seen = { Path: string; Range: string option; IfRange: string option }

/// A minimal HTTP/1.1 server on 127.0.0.1 (one request per connection). It honours `Range: bytes=N-`, answers 404
/// for unknown paths, sends a strong ETag (honouring If-Range) and can cut a response in the middle (Content-Length sent, half the body, then close), refuse
/// ranges (200 with the whole body) or accept a request and never answer.
type Loopback() =
    let listener = new TcpListener(IPAddress.Loopback, 0)
    let files = ConcurrentDictionary<string, byte[]>()
    let seen = ConcurrentQueue<Seen>()
    let stop = new CancellationTokenSource()
    let mutable cutNext = 0
    do listener.Start()
    let port = (listener.LocalEndpoint :?> IPEndPoint).Port

    let readHead (s: NetworkStream) =
        let sb = StringBuilder()
        let one = Array.zeroCreate<byte> 1
        while not (sb.ToString().EndsWith "\r\n\r\n") && s.Read(one, 0, 1) = 1 do
            sb.Append(char one[0]) |> ignore
        sb.ToString()

    let respond (client: TcpClient) (this: Loopback) =
        use client = client
        let s = client.GetStream()
        let head = readHead s
        let lines = head.Split("\r\n", StringSplitOptions.RemoveEmptyEntries)
        if lines.Length > 0 then
            let path = lines[0].Split(' ')[1]
            let header (name: string) =
                lines |> Array.tryPick (fun l ->
                    let i = l.IndexOf ':'
                    if i > 0 && l.Substring(0, i).Trim().Equals(name, StringComparison.OrdinalIgnoreCase) then Some(l.Substring(i + 1).Trim())
                    else None)
            let range = header "Range"
            let ifRange = header "If-Range"
            seen.Enqueue { Path = path; Range = range; IfRange = ifRange }
            let send (status: string) (headers: (string * string) list) (body: byte[]) (count: int) =
                let h = StringBuilder($"HTTP/1.1 {status}\r\nConnection: close\r\n")
                for (k, v) in headers do h.Append($"{k}: {v}\r\n") |> ignore
                h.Append("\r\n") |> ignore
                let hb = Encoding.ASCII.GetBytes(h.ToString())
                s.Write(hb, 0, hb.Length)
                s.Write(body, 0, count)
                s.Flush()
            if this.Silent then Thread.Sleep 5000
            else
                match files.TryGetValue path with
                | false, _ ->
                    let body = Encoding.ASCII.GetBytes "not found"
                    send "404 Not Found" [ "Content-Length", string body.Length ] body body.Length
                | true, data ->
                    let etag = "\"" + Convert.ToHexStringLower(SHA256.HashData data).Substring(0, 16) + "\""
                    let from =
                        match range with
                        | Some r when not this.IgnoreRange && r.StartsWith "bytes=" && r.EndsWith "-" && (ifRange.IsNone || ifRange = Some etag) ->
                            Some(int64 (r.Substring(6, r.Length - 7)))
                        | _ -> None
                    let cut =
                        lock files (fun () ->
                            let c = cutNext > 0
                            if c then cutNext <- cutNext - 1
                            c)
                    match from with
                    | Some f when f >= int64 data.Length ->
                        send "416 Range Not Satisfiable" [ "Content-Range", $"bytes */{data.Length}"; "Content-Length", "0" ] [||] 0
                    | Some f ->
                        let body = data[int f ..]
                        let count = if cut then body.Length / 2 else body.Length
                        send "206 Partial Content" [ "ETag", etag; "Content-Range", $"bytes {f}-{data.Length - 1}/{data.Length}"; "Content-Length", string body.Length ] body count
                    | None ->
                        let count = if cut then data.Length / 2 else data.Length
                        send "200 OK" [ "ETag", etag; "Content-Length", string data.Length; "Accept-Ranges", "bytes" ] data count

    member val IgnoreRange = false with get, set
    member val Silent = false with get, set
    /// Cut the next n responses after half their body.
    member _.CutNext(n: int) = cutNext <- n
    member _.Port = port
    member _.Base = $"http://127.0.0.1:{port}"
    member this.Url(path: string) = this.Base + path
    member _.Serve(path: string, data: byte[]) = files[path] <- data
    member _.Seen = seen.ToArray() |> List.ofArray
    member this.Start() =
        let loop () =
            try
                while not stop.IsCancellationRequested do
                    let c = listener.AcceptTcpClient()
                    ThreadPool.QueueUserWorkItem(fun _ -> try respond c this with _ -> ()) |> ignore
            with _ -> ()
        Thread(loop, IsBackground = true, Name = "loopback-http").Start()
        this
    interface IDisposable with
        member _.Dispose() =
            stop.Cancel()
            listener.Stop()

let private randomBytes (n: int) (seed: int) =
    let b = Array.zeroCreate<byte> n
    Random(seed).NextBytes b
    b

let private sha (b: byte[]) = Convert.ToHexStringLower(SHA256.HashData b)

/// A temporary cache folder, deleted afterwards.
let private tempCache () = new TempDir("vct-hub")

let private settings (cache: TempDir) (server: Loopback) =
    { CacheRoot = cache.Path; Offline = false; HfEndpoint = server.Base; Timeout = TimeSpan.FromSeconds 10.0 }

let private resolve (s: HubSettings) (reference: string) = Hub.resolveWith s None ignore CancellationToken.None reference

/// The exception `f` throws (an Expecto failure when it throws none).
let private errorOf (f: unit -> 'a) : exn =
    let r = try Choice1Of2(f ()) with e -> Choice2Of2 e
    match r with
    | Choice1Of2 _ -> failtest "expected an error, got a result"
    | Choice2Of2 e -> e

let private setup () =
    let server = (new Loopback()).Start()
    let cache = tempCache ()
    let data = randomBytes 20000 7
    server.Serve("/files/model.pth", data)
    server, cache, data

[<Tests>]
let tests =
    testList "Hub" [
        test "a plain download lands in the cache with a sha256 sidecar" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            let path = resolve s url
            Expect.equal path (Path.Combine(cache.Path, $"127.0.0.1_{server.Port}", "files", "model.pth")) "layout: host_port / URL path"
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
            Expect.equal (File.ReadAllText(path + ".sha256")) $"{sha data}  model.pth\n" "sidecar in sha256sum format"
            Expect.isFalse (File.Exists(path + ".part")) "no .part left"
            Expect.equal server.Seen [ { Path = "/files/model.pth"; Range = None; IfRange = None } ] "one plain request"
            // Reuse: no second request.
            Expect.equal (resolve s url) path "same path"
            Expect.equal server.Seen.Length 1 "cached file reused without the network"
        }

        test "an hf: reference goes to {endpoint}/{owner}/{repo}/resolve/main/{path}" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            server.Serve("/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth", data)
            let path = resolve (settings cache server) "hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth"
            Expect.equal (server.Seen |> List.map _.Path) [ "/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth" ] "mapped path"
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
            Expect.equal (Hub.hfUrl "https://huggingface.co" "hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth")
                "https://huggingface.co/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth" "default endpoint"
            let bad = errorOf (fun () -> Hub.hfUrl "https://huggingface.co" "hf:owner/file.pth")
            Expect.stringContains bad.Message "hf:owner/repo/path" "a short reference is explained"
        }

        test "catalogue names resolve through the endpoint; the README's blob link becomes the file" {
            let names = Hub.catalogue |> List.map _.Name
            Expect.equal names [ "s4"; "ms3"; "avss"; "swin-b-22k"; "vggish" ] "names"
            let s = { CacheRoot = Path.GetTempPath(); Offline = true; HfEndpoint = "http://127.0.0.1:9"; Timeout = TimeSpan.FromSeconds 1.0 }
            Expect.equal (Hub.tryUrl s "avss") (Some "http://127.0.0.1:9/nowherespyfly/VCT_AVS/resolve/main/ss_swinb_384/model_best.pth") "avss"
            Expect.equal (Hub.tryUrl s "https://huggingface.co/nowherespyfly/VCT_AVS/blob/main/ms3_swinb_384/model_best.pth")
                (Some "https://huggingface.co/nowherespyfly/VCT_AVS/resolve/main/ms3_swinb_384/model_best.pth") "blob -> resolve"
            Expect.equal (Hub.tryUrl s "vggish") (Some "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth") "vggish"
        }

        test "a .part holding the first half resumes with Range: bytes=<half>-" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            let target = Hub.cachePath s url
            Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
            File.WriteAllBytes(target + ".part", data[.. 9999])
            let path = resolve s url
            Expect.equal server.Seen [ { Path = "/files/model.pth"; Range = Some "bytes=10000-"; IfRange = None } ] "range request"
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
            Expect.equal (File.ReadAllText(path + ".sha256")).[.. 63] (sha data) "sha of the whole file"
        }

        test "a transfer cut in the middle fails clearly, keeps the .part, and the next call resumes" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            let target = Hub.cachePath s url
            server.CutNext 1
            let e = errorOf (fun () -> resolve s url)
            Expect.isTrue (e :? IOException) $"an IOException, got {e.GetType().Name}"
            Expect.stringContains e.Message url "names the URL"
            Expect.stringContains e.Message "partial download is kept" "says the part is kept"
            Expect.stringContains e.Message "resumes" "says it resumes"
            Expect.stringContains e.Message "curl" "says how to get it by hand"
            Expect.isFalse (File.Exists target) "nothing in place"
            let kept = FileInfo(target + ".part").Length
            Expect.isGreaterThan kept 0L "part holds what arrived"
            Expect.isLessThan kept (int64 data.Length) "part is partial"
            let path = resolve s url
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes after the resume"
            Expect.equal (server.Seen |> List.map _.Range) [ None; Some $"bytes={kept}-" ] "second request resumes where the part ends"
            Expect.isSome server.Seen[1].IfRange "the resume is conditional on the first response's ETag"
            Expect.isFalse (File.Exists(target + ".part.validator")) "validator removed"
        }

        test "a file changed at the source between attempts restarts instead of mixing (If-Range)" {
            let server, cache, _ = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            server.CutNext 1
            errorOf (fun () -> resolve s url) |> ignore
            let changed = randomBytes 30000 11
            server.Serve("/files/model.pth", changed)
            let path = resolve s url
            Expect.sequenceEqual (File.ReadAllBytes path) changed "the new file, whole"
            Expect.stringStarts (File.ReadAllText(path + ".sha256")) (sha changed) "its sha"
        }

        test "a cut resumed response is also caught, and a third call completes" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            server.CutNext 2
            errorOf (fun () -> resolve s url) |> ignore
            errorOf (fun () -> resolve s url) |> ignore
            Expect.sequenceEqual (File.ReadAllBytes(resolve s url)) data "bytes"
            Expect.equal server.Seen.Length 3 "three requests"
        }

        test "404 names the status and the URL and caches nothing" {
            let server, cache, _ = setup ()
            use _ = server
            use _ = cache
            let url = server.Url "/files/missing.pth"
            let e = errorOf (fun () -> resolve (settings cache server) url)
            Expect.stringContains e.Message "404" "status"
            Expect.stringContains e.Message url "URL"
            Expect.isEmpty cache.Files "nothing in the cache"
        }

        test "a wrong expected sha256 names both hashes and leaves no file" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let url = server.Url "/files/model.pth"
            let wrong = String('0', 64)
            let e = errorOf (fun () -> Hub.resolveWith (settings cache server) (Some wrong) ignore CancellationToken.None url)
            Expect.isTrue (e :? InvalidDataException) "InvalidDataException"
            Expect.stringContains e.Message wrong "expected hash"
            Expect.stringContains e.Message (sha data) "actual hash"
            Expect.stringContains e.Message url "URL"
            Expect.isEmpty cache.Files "no file, part or sidecar"
            // The right one is accepted (upper case too).
            let path = Hub.resolveWith (settings cache server) (Some((sha data).ToUpperInvariant())) ignore CancellationToken.None url
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
        }

        test "a cached file that no longer matches its sidecar is an error naming it" {
            let server, cache, _ = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            let path = resolve s url
            let bytes = File.ReadAllBytes path
            bytes[100] <- bytes[100] ^^^ 0xFFuy
            File.WriteAllBytes(path, bytes)
            let e = errorOf (fun () -> resolve s url)
            Expect.stringContains e.Message path "names the file"
            Expect.stringContains e.Message "delete" "says to delete it"
            Expect.equal server.Seen.Length 1 "no new request"
            File.Delete path
            File.Delete(path + ".sha256")
            Expect.isTrue (File.Exists(resolve s url)) "downloads again once deleted"
        }

        test "a file put into the cache by hand is used and gets a sidecar" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let s = { settings cache server with Offline = true }
            let url = server.Url "/files/model.pth"
            let target = Hub.cachePath s url
            Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
            File.WriteAllBytes(target, data)
            Expect.equal (resolve s url) target "used"
            Expect.stringStarts (File.ReadAllText(target + ".sha256")) (sha data) "sidecar written"
            Expect.isEmpty server.Seen "no request"
        }

        test "VCT_OFFLINE with a cache miss names the URL and the cache path and sends nothing" {
            let server, cache, _ = setup ()
            use _ = server
            use _ = cache
            let s = { settings cache server with Offline = true }
            let url = server.Url "/files/model.pth"
            let e = errorOf (fun () -> resolve s url)
            Expect.stringContains e.Message url "URL"
            Expect.stringContains e.Message (Hub.cachePath s url) "where to put the file"
            Expect.stringContains e.Message "VCT_OFFLINE" "why"
            Expect.isEmpty server.Seen "no request"
            Expect.isEmpty cache.Files "nothing written"
        }

        test "VCT_OFFLINE with a cache hit uses the file without a request" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let url = server.Url "/files/model.pth"
            let path = resolve (settings cache server) url
            let again = resolve { settings cache server with Offline = true } url
            Expect.equal again path "same file"
            Expect.sequenceEqual (File.ReadAllBytes again) data "bytes"
            Expect.equal server.Seen.Length 1 "only the first (online) request"
        }

        test "a server that ignores Range (200) restarts the file from zero" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            server.IgnoreRange <- true
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            let target = Hub.cachePath s url
            Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
            File.WriteAllBytes(target + ".part", randomBytes 5000 99) // not even the right bytes
            let path = resolve s url
            Expect.equal (server.Seen |> List.map _.Range) [ Some "bytes=5000-" ] "asked to resume"
            Expect.sequenceEqual (File.ReadAllBytes path) data "whole file, not appended"
        }

        test "416 on a .part that is already complete finishes without new bytes" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let s = settings cache server
            let url = server.Url "/files/model.pth"
            let target = Hub.cachePath s url
            Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
            File.WriteAllBytes(target + ".part", data)
            let path = resolve s url
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
            Expect.equal (server.Seen |> List.map _.Range) [ Some $"bytes={data.Length}-" ] "one range request"
            // A .part longer than the file: 416 with another length restarts from zero.
            File.Delete path
            File.WriteAllBytes(target + ".part", Array.append data data)
            Expect.sequenceEqual (File.ReadAllBytes(resolve s url)) data "restarted"
        }

        test "an unreachable host (a closed port) gives one clear message" {
            use cache = tempCache ()
            let closed =
                let l = new TcpListener(IPAddress.Loopback, 0)
                l.Start()
                let p = (l.LocalEndpoint :?> IPEndPoint).Port
                l.Stop()
                p
            let url = $"http://127.0.0.1:{closed}/files/model.pth"
            let s = { CacheRoot = cache.Path; Offline = false; HfEndpoint = "http://127.0.0.1:1"; Timeout = TimeSpan.FromSeconds 5.0 }
            let e = errorOf (fun () -> resolve s url)
            Expect.isTrue (e :? IOException) "IOException"
            Expect.stringContains e.Message url "URL"
            Expect.stringContains e.Message "download failed" "what"
            Expect.stringContains e.Message "by hand" "how to get it by hand"
            Expect.isFalse (e.Message.Contains "\n") "one line"
        }

        test "a server that never answers times out with a clear message" {
            let server, cache, _ = setup ()
            use _ = server
            use _ = cache
            server.Silent <- true
            let s = { settings cache server with Timeout = TimeSpan.FromSeconds 0.5 }
            let url = server.Url "/files/model.pth"
            let e = errorOf (fun () -> resolve s url)
            Expect.stringContains e.Message url "URL"
            Expect.stringContains e.Message "no answer within 0.5 s" "timeout"
        }

        test "local paths are themselves; a missing one that is no reference is named" {
            use cache = tempCache ()
            let s = { CacheRoot = cache.Path; Offline = true; HfEndpoint = "http://127.0.0.1:1"; Timeout = TimeSpan.FromSeconds 1.0 }
            let f = Path.Combine(cache.Path, "local.pth")
            File.WriteAllBytes(f, [| 1uy; 2uy |])
            Expect.equal (resolve s f) f "existing file"
            let missing = Path.Combine(cache.Path, "nope.pth")
            let e = errorOf (fun () -> resolve s missing)
            Expect.isTrue (e :? FileNotFoundException) "FileNotFoundException"
            Expect.stringContains e.Message missing "names it"
            Expect.stringContains e.Message "vct weights list" "points at the catalogue"
            let bad = errorOf (fun () -> Hub.resolveWith s (Some(String('0', 64))) ignore CancellationToken.None f)
            Expect.stringContains bad.Message f "expected sha256 checked on local files too"
        }

        test "cache paths stay under the root whatever the URL" {
            let s = { CacheRoot = Path.Combine(Path.GetTempPath(), "vct-root"); Offline = true; HfEndpoint = "http://x"; Timeout = TimeSpan.FromSeconds 1.0 }
            let root = Path.GetFullPath s.CacheRoot
            for url in [ "http://h/a/%2E%2E/%2E%2E/etc/passwd"; "http://h/..%2F..%2Fx"; "http://h/"; "http://h/a/b?x=1"; "https://h:8443/C:%5Cwin" ] do
                let p = Hub.cachePath s url
                Expect.stringStarts p (root + string Path.DirectorySeparatorChar) $"{url} -> {p}"
                Expect.isFalse (p.Substring(root.Length).Split(Path.DirectorySeparatorChar) |> Array.contains "..") $"no .. in {p}"
            Expect.notEqual (Hub.cachePath s "http://h/f.pth?v=1") (Hub.cachePath s "http://h/f.pth?v=2") "queries kept apart"
            Expect.stringEnds (Hub.cachePath s "http://h/f.pth?v=1") ".pth" "extension kept"
        }

        test "settings from the environment: VCT_CACHE, XDG_CACHE_HOME, VCT_OFFLINE, VCT_HF_ENDPOINT, VCT_HTTP_TIMEOUT" {
            let lookup (pairs: (string * string) list) = fun name -> pairs |> List.tryFind (fst >> (=) name) |> Option.map snd
            let tmp = Path.GetTempPath()
            let a =
                HubSettings.fromLookup (
                    lookup [ ("VCT_CACHE", Path.Combine(tmp, "c")); ("VCT_OFFLINE", "1"); ("VCT_HF_ENDPOINT", "http://127.0.0.1:5/"); ("VCT_HTTP_TIMEOUT", "2.5") ])
            Expect.equal a { CacheRoot = Path.Combine(tmp, "c"); Offline = true; HfEndpoint = "http://127.0.0.1:5"; Timeout = TimeSpan.FromSeconds 2.5 } "all set"
            let b = HubSettings.fromLookup (lookup [ "XDG_CACHE_HOME", Path.Combine(tmp, "xdg") ])
            if not (OperatingSystem.IsWindows()) then Expect.equal b.CacheRoot (Path.Combine(tmp, "xdg", "vct")) "XDG"
            Expect.equal b.HfEndpoint "https://huggingface.co" "default endpoint"
            Expect.isFalse b.Offline "online by default"
            Expect.equal b.Timeout (TimeSpan.FromSeconds 60.0) "default timeout"
            let c = HubSettings.fromLookup (lookup [])
            if OperatingSystem.IsLinux() then
                Expect.equal c.CacheRoot (Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache", "vct")) "~/.cache/vct"
            Expect.stringContains (errorOf (fun () -> HubSettings.fromLookup (lookup [ "VCT_OFFLINE", "maybe" ]))).Message "VCT_OFFLINE" "bad VCT_OFFLINE named"
            Expect.stringContains (errorOf (fun () -> HubSettings.fromLookup (lookup [ "VCT_HF_ENDPOINT", "ftp://x" ]))).Message "VCT_HF_ENDPOINT" "bad endpoint named"
            // The real environment is read without error (whatever it holds here).
            Expect.isNotEmpty (HubSettings.fromEnvironment ()).CacheRoot "fromEnvironment"
        }

        test "the C# facade: records only, subset of released names, progress reports" {
            let cat = Vct.VctWeights.Catalogue
            Expect.equal (cat |> Seq.map _.Name |> List.ofSeq) [ "s4"; "ms3"; "avss"; "swin-b-22k"; "vggish" ] "names"
            Expect.equal (Vct.VctWeights.SubsetOf "ms3") (System.Nullable Vct.VctSubset.MS3) "subset"
            Expect.isFalse (Vct.VctWeights.SubsetOf "vggish").HasValue "not a checkpoint"
            let publicTypes = [ typeof<Vct.WeightsEntry>; typeof<Vct.DownloadProgress> ]
            for t in publicTypes do
                for p in t.GetProperties() do
                    Expect.isFalse (p.PropertyType.Namespace = "Microsoft.FSharp.Core" || p.PropertyType.Namespace = "Microsoft.FSharp.Collections")
                        $"{t.Name}.{p.Name} is no F# type"
            // Resolve reads the environment: set it for this test only (the tests run one at a time) and restore it.
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            let saved = [ for k in [ "VCT_CACHE"; "VCT_OFFLINE"; "VCT_HF_ENDPOINT" ] -> k, Environment.GetEnvironmentVariable k ]
            try
                Environment.SetEnvironmentVariable("VCT_CACHE", cache.Path)
                Environment.SetEnvironmentVariable("VCT_OFFLINE", null)
                Environment.SetEnvironmentVariable("VCT_HF_ENDPOINT", server.Base)
                let reports = ResizeArray<Vct.DownloadProgress>()
                server.Serve("/nowherespyfly/VCT_AVS/resolve/main/ms3_swinb_384/model_best.pth", data)
                let path = Vct.VctWeights.Resolve("ms3", Vct.SyncProgress<Vct.DownloadProgress>(Action<Vct.DownloadProgress>(reports.Add)), Threading.CancellationToken.None)
                Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
                Expect.isNonEmpty reports "progress reported"
                let last = reports[reports.Count - 1]
                Expect.equal (last.BytesDone, last.TotalBytes) (int64 data.Length, Nullable(int64 data.Length)) "last report: all bytes of the total"
                Expect.equal (Vct.VctWeights.Catalogue |> Seq.find (fun e -> e.Name = "ms3")).CachedPath path "listed as cached"
            finally
                for k, v in saved do Environment.SetEnvironmentVariable(k, v)
        }

        test "Inference.loadModel and VctSegmenter.Load resolve through the hub" {
            use cache = tempCache ()
            let saved = [ for k in [ "VCT_CACHE"; "VCT_OFFLINE" ] -> k, Environment.GetEnvironmentVariable k ]
            try
                Environment.SetEnvironmentVariable("VCT_CACHE", cache.Path)
                Environment.SetEnvironmentVariable("VCT_OFFLINE", "1")
                let expectOffline (what: string) (f: unit -> unit) =
                    let e = errorOf f
                    Expect.stringContains e.Message "VCT_OFFLINE" $"{what}: went to the hub"
                    Expect.stringContains e.Message "s4_swinb_384/model_best.pth" $"{what}: the released file's URL"
                expectOffline "loadModel" (fun () -> Vct.Core.Inference.loadModel "s4" None TorchSharp.torch.CPU |> ignore)
                expectOffline "VctSegmenter.Load" (fun () -> Vct.VctSegmenter.Load("hf:nowherespyfly/VCT_AVS/s4_swinb_384/model_best.pth") |> ignore)
            finally
                for k, v in saved do Environment.SetEnvironmentVariable(k, v)
        }

        test "vct weights list prints the catalogue; vct weights get URL prints the cached path" {
            let server, cache, data = setup ()
            use _ = server
            use _ = cache
            cliDll () |> ignore
            let run (args: string list) (offline: bool) =
                let psi = cliStartInfo args
                psi.Environment["VCT_CACHE"] <- cache.Path
                psi.Environment["VCT_HF_ENDPOINT"] <- server.Base
                if offline then psi.Environment["VCT_OFFLINE"] <- "1" else psi.Environment.Remove "VCT_OFFLINE" |> ignore
                runProcess psi
            let code, out, err = run [ "weights"; "list" ] false
            Expect.equal code 0 $"list exit code; stderr: {err}"
            for name in [ "s4"; "ms3"; "avss"; "swin-b-22k"; "vggish"; "swin_base_patch4_window12_384_22k.pth"; "vggish-10086976.pth"; "--swin-weights" ] do
                Expect.stringContains out name $"lists {name}"
            Expect.stringContains out $"{server.Base}/nowherespyfly/VCT_AVS/resolve/main/s4_swinb_384/model_best.pth" "source URL under the endpoint"
            let url = server.Url "/files/model.pth"
            let code, out, err = run [ "weights"; "get"; url ] false
            Expect.equal code 0 $"get exit code; stderr: {err}"
            let path = out.Trim()
            Expect.equal path (Path.Combine(cache.Path, $"127.0.0.1_{server.Port}", "files", "model.pth")) "prints the cached path"
            Expect.sequenceEqual (File.ReadAllBytes path) data "bytes"
            let code, _, err = run [ "weights"; "get"; server.Url "/files/other.pth" ] true
            Expect.equal code 1 "offline miss fails"
            Expect.stringContains err "VCT_OFFLINE" "says why"
            Expect.isFalse (err.Contains "   at ") "no stack trace"
        }
    ]
