/// Shared benchmark plumbing: timing, memory, the Python baseline, and docs/benchmarks.md sections.
module Vct.Bench.Harness

open System
open System.Diagnostics
open System.IO
open System.Text.Json

/// The repository root (the folder holding Vct.sln above the program).
let repoRoot =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwith "Vct.sln not found above the benchmark program"
        elif File.Exists(Path.Combine(d.FullName, "Vct.sln")) then d.FullName
        else up d.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// Median of a non-empty list.
let median (xs: float list) =
    let a = List.sort xs |> Array.ofList
    if a.Length % 2 = 1 then a[a.Length / 2] else (a[a.Length / 2 - 1] + a[a.Length / 2]) / 2.0

/// Wall-clock seconds of `f`, run `repeats` times after `warmup` untimed runs.
let time (warmup: int) (repeats: int) (f: unit -> unit) =
    for _ in 1 .. warmup do f ()
    [ for _ in 1 .. repeats ->
          GC.Collect()
          let sw = Stopwatch.StartNew()
          f ()
          sw.Elapsed.TotalSeconds ]

/// Current resident set size of this process in MiB (Linux: VmRSS; elsewhere the working set).
let rssMiB () =
    try
        File.ReadAllLines "/proc/self/status"
        |> Array.pick (fun l -> if l.StartsWith "VmRSS:" then Some(float (l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0) else None)
    with _ -> float (Process.GetCurrentProcess().WorkingSet64) / 1048576.0

/// Collects, then returns the native heap's free pages to the OS (LibTorch's CPU allocator keeps freed blocks in
/// glibc's heap), so that a baseline started next does not compete with memory this process no longer uses.
let trimNative () =
    GC.Collect()
    GC.WaitForPendingFinalizers()
    Vct.Core.Platform.Runtime.trimNativeHeap ()

/// The environment of a baseline process: glibc's defaults (the official code as its users run it: the
/// MALLOC_ARENA_MAX that build.fsx gives Vct is removed), or with `tunedHeap` the glibc equivalent of Vct's native
/// heap settings (src/Vct.Core/Platform/NativeHeap.fs).
let baselineEnvironment (tunedHeap: bool) (psi: ProcessStartInfo) =
    for k, _ in Vct.Core.Platform.NativeHeap.equivalentEnvironment do psi.Environment.Remove k |> ignore
    if tunedHeap then
        for k, v in Vct.Core.Platform.NativeHeap.equivalentEnvironment do psi.Environment[k] <- v

/// Our native heap settings and the baseline's, for a report's header.
let heapNote () =
    $"native heap: ours {Vct.Core.Platform.NativeHeap.probe().Summary}; official: glibc defaults"

/// Runs `/usr/bin/python3 script args` with the repository's bench/python on the path; returns stdout.
/// Fails with the script's stderr when it exits non-zero.
let python (script: string) (args: string list) =
    let psi = ProcessStartInfo("/usr/bin/python3", RedirectStandardOutput = true, RedirectStandardError = true)
    psi.ArgumentList.Add(Path.Combine(repoRoot, "bench", "python", script))
    for a in args do psi.ArgumentList.Add a
    baselineEnvironment false psi
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    if p.ExitCode <> 0 then failwithf "python %s %A failed (%d): %s" script args p.ExitCode err.Result
    out.Result

/// The shared official-ref tool's folder (VCT_OFFICIAL_REF overrides it).
let officialRef () =
    match Environment.GetEnvironmentVariable "VCT_OFFICIAL_REF" with
    | null | "" -> Path.GetFullPath(Path.Combine(repoRoot, "..", "shared", "tools", "official-ref"))
    | p -> p

/// Runs the official-ref tool's `time_official.py` (each case in a fresh process, 2 threads) with `args`;
/// returns case -> (median seconds, the child's peak RSS in MiB).
let timeOfficial (tunedHeap: bool) (args: string list) : Map<string, float * float> =
    let script = Path.Combine(officialRef (), "time_official.py")
    if not (File.Exists script) then failwithf "official timing script not found: %s (set VCT_OFFICIAL_REF)" script
    let dir = Directory.CreateTempSubdirectory("vct-bench-official-").FullName
    try
        let json = Path.Combine(dir, "timing.json")
        let psi = ProcessStartInfo("/usr/bin/python3")
        for a in [ script; "--fresh"; "--no-repeat"; "--threads"; "2"; "--json"; json; "--md"; Path.Combine(dir, "timing.md") ] @ args do
            psi.ArgumentList.Add a
        baselineEnvironment tunedHeap psi
        use p = Process.Start psi
        p.WaitForExit()
        if p.ExitCode <> 0 then failwithf "time_official.py failed (%d)" p.ExitCode
        use doc = JsonDocument.Parse(File.ReadAllText json)
        [ for r in doc.RootElement.EnumerateArray() ->
              r.GetProperty("case").GetString(), (r.GetProperty("median_s").GetDouble(), r.GetProperty("peak_rss_mb_process").GetDouble()) ]
        |> Map.ofList
    finally
        try Directory.Delete(dir, true) with _ -> ()

/// Parses the JSON that a baseline script printed on its last line.
let pythonJson (script: string) (args: string list) =
    let out = python script args
    let last = out.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.last
    JsonDocument.Parse(last).RootElement.Clone()

/// "Debian GNU/Linux 12 (bookworm), 2 cores, AMD EPYC ..." for the report.
/// Resets the process's peak-RSS counter (Linux: "5" to clear_refs) so VmHWM measures from here.
/// Prints why when it cannot (then callers fall back on `RssSampler`).
let resetPeak () =
    try File.WriteAllText("/proc/self/clear_refs", "5"); true
    with e ->
        eprintfn "bench: cannot reset the peak RSS counter (/proc/self/clear_refs): %s" e.Message
        false

let peakMiB () =
    try
        File.ReadAllLines "/proc/self/status"
        |> Array.pick (fun l -> if l.StartsWith "VmHWM:" then Some(float (l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0) else None)
    with _ -> nan

/// Samples VmRSS every 20 ms on a background thread until disposed; `Peak` is the largest sample (MiB). The fallback
/// where the kernel's peak counter cannot be reset.
type RssSampler() =
    let mutable peak = rssMiB ()
    let stop = new Threading.CancellationTokenSource()
    let worker =
        Threading.Tasks.Task.Run(fun () ->
            while not stop.IsCancellationRequested do
                peak <- max peak (rssMiB ())
                Threading.Thread.Sleep 20)
    member _.Peak = max peak (rssMiB ())
    interface IDisposable with
        member _.Dispose() =
            stop.Cancel()
            worker.Wait()
            stop.Dispose()

/// The 1-minute load average (VCT_BENCH_LOAD overrides it, for tests of the report text).
let loadAverage () =
    match Environment.GetEnvironmentVariable "VCT_BENCH_LOAD" with
    | null | "" -> (try (IO.File.ReadAllText "/proc/loadavg").Split(' ')[0] with _ -> "?")
    | s -> s

let machine () =
    let cpu =
        try
            File.ReadAllLines "/proc/cpuinfo"
            |> Array.tryPick (fun l -> if l.StartsWith "model name" then Some((l.Split(':', 2)[1]).Trim()) else None)
            |> Option.defaultValue "unknown CPU"
        with _ -> "unknown CPU"
    $"{Runtime.InteropServices.RuntimeInformation.OSDescription}, {Environment.ProcessorCount} cores, {cpu}"

/// Replaces (or appends) the section of docs/benchmarks.md between `<!-- bench:NAME -->` markers.
let writeSection (name: string) (markdown: string) =
    let path = Path.Combine(repoRoot, "docs", "benchmarks.md")
    let start, stop = $"<!-- bench:{name} -->", $"<!-- /bench:{name} -->"
    let existing =
        if File.Exists path then File.ReadAllText path
        else "# Benchmarks\n\nWritten by `dotnet fsi build.fsx bench`; each section is replaced when its suite runs again.\n"
    let block = $"{start}\n{markdown.TrimEnd()}\n{stop}"
    let i, j = existing.IndexOf start, existing.IndexOf stop
    let text =
        if i >= 0 && j > i then existing.Substring(0, i) + block + existing.Substring(j + stop.Length)
        else existing.TrimEnd() + "\n\n" + block + "\n"
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    File.WriteAllText(path, text)
    printfn "wrote section '%s' of %s" name path
