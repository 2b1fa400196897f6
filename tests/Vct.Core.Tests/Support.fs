/// Helpers every test file uses: the repository's folders, child processes (the built `vct` CLI among them),
/// temporary folders that are always deleted, and time and memory bounds for code that might hang or allocate
/// what an input merely declares.
module Vct.Core.Tests.Support

open System
open System.Diagnostics
open System.IO
open System.Threading.Tasks
open Expecto

// ---- the repository ------------------------------------------------------------------------------------------

/// The repository root: the first folder above the test program that holds Vct.sln.
let repoRoot =
    lazy
        (let rec up (d: DirectoryInfo) =
            if isNull d then failwith "Vct.sln not found above the test program"
            elif File.Exists(Path.Combine(d.FullName, "Vct.sln")) then d.FullName
            else up d.Parent
         up (DirectoryInfo AppContext.BaseDirectory))

// ---- child processes -----------------------------------------------------------------------------------------

/// Starts `psi` with stdout and stderr redirected, waits; returns exit code, stdout, stderr.
let runProcess (psi: ProcessStartInfo) =
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.UseShellExecute <- false
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    p.ExitCode, out.Result, err.Result

/// Like `runProcess`, but kills the process (and its children) when it has not exited after `seconds`: Some(exit
/// code, stdout, stderr), or None after a kill.
let runProcessWithin (seconds: int) (psi: ProcessStartInfo) =
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.UseShellExecute <- false
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if p.WaitForExit(seconds * 1000) then
        p.WaitForExit() // lets the output readers finish
        Some(p.ExitCode, out.Result, err.Result)
    else
        (try p.Kill true with _ -> ())
        None

/// Where the build puts the `vct` CLI (Release).
let cliPath = lazy (Path.Combine(repoRoot.Value, "src", "Vct.Cli", "bin", "Release", "net10.0", "vct.dll"))

/// The built `vct` CLI; fails the test, saying how to build it, when it is not there.
let cliDll () =
    let dll = cliPath.Value
    if not (File.Exists dll) then failtestf "the CLI is not built: %s (run `dotnet fsi build.fsx build`)" dll
    dll

/// `dotnet vct.dll args...`, one argument per item (not started).
let cliStartInfo (args: string list) =
    let psi = ProcessStartInfo("dotnet")
    psi.ArgumentList.Add(cliDll ())
    for a in args do psi.ArgumentList.Add a
    psi

/// Runs the built `vct` CLI with `args`; returns exit code, stdout, stderr.
let runVct (args: string list) = runProcess (cliStartInfo args)

/// Runs the built `vct` CLI with `args`, without VCT_DEBUG and with the extra environment variables `env`;
/// fails the test when it has not ended within 120 s (no hang allowed).
let runVctEnv (env: (string * string) list) (args: string list) =
    let psi = cliStartInfo args
    psi.Environment.Remove "VCT_DEBUG" |> ignore
    for k, v in env do psi.Environment[k] <- v
    match runProcessWithin 120 psi with
    | Some result -> result
    | None -> failtestf "vct %s did not end within 120 s" (String.Join(" ", args))

/// Runs the built `vct` CLI with `args`, killed after `seconds`; returns (exit code, stdout + stderr). A run past
/// the bound fails the test (a hang).
let vctWithin (seconds: int) (args: string list) =
    match runProcessWithin seconds (cliStartInfo args) with
    | Some(code, out, err) -> code, out + err
    | None -> failtest $"""vct {String.Join(" ", args)}: no exit within {seconds} s"""

// ---- temporary folders ---------------------------------------------------------------------------------------

/// Deletes a folder and everything in it; a folder that is gone already, or cannot be deleted, is left alone.
let private deleteFolder (path: string) =
    try
        if Directory.Exists path then Directory.Delete(path, true)
    with _ -> ()

/// A new empty folder `<prefix>-<random>` under the system's temporary folder, deleted with everything in it when
/// disposed (`use tmp = new TempDir("vct-x")`), whatever the test did.
type TempDir(prefix: string) =
    let path = Path.Combine(Path.GetTempPath(), $"{prefix}-{Guid.NewGuid():N}")
    do Directory.CreateDirectory path |> ignore
    /// The folder.
    member _.Path = path
    /// A new (or existing) folder `name` inside it.
    member _.Folder(name: string) =
        let d = Path.Combine(path, name)
        Directory.CreateDirectory d |> ignore
        d
    /// Every file below the folder.
    member _.Files = Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories) |> List.ofSeq
    interface IDisposable with
        member _.Dispose() = deleteFolder path

/// Runs `f` on a new empty temporary folder and deletes the folder afterwards, whatever `f` does.
let withTempDir (prefix: string) (f: string -> 'T) : 'T =
    use d = new TempDir(prefix)
    f d.Path

/// One temporary folder per run of the test program, deleted when it exits.
let private session =
    lazy
        (let d = new TempDir("vct-tests")
         AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> (d :> IDisposable).Dispose())
         d)

/// The folder `name` of this run of the test program: for fixtures that several tests share (made once, on first
/// use); deleted when the program exits.
let sessionDir (name: string) = session.Value.Folder name

// ---- time and memory bounds ----------------------------------------------------------------------------------

/// Runs `f` on a pool thread; fails the test when it does not end within `seconds` (a hang), else returns its value
/// or rethrows its exception unwrapped.
let within (seconds: int) (what: string) (f: unit -> 'T) : 'T =
    let t = Task.Run(fun () -> f ())
    if Task.WaitAny([| t :> Task |], TimeSpan.FromSeconds(float seconds)) <> 0 then
        failtest $"{what}: did not finish within {seconds} s"
    t.GetAwaiter().GetResult()

/// The exception `f` throws within `seconds`.
let throwsWithin (seconds: int) (what: string) (f: unit -> unit) : exn =
    within seconds what (fun () ->
        try
            f ()
            failtest $"{what}: expected an exception"
        with
        | :? AssertException -> reraise ()
        | e -> e)

/// Managed bytes `f` allocates on its thread (a reader must check a declared size before allocating it).
let allocatedBy (f: unit -> unit) =
    let before = GC.GetAllocatedBytesForCurrentThread()
    (try f () with _ -> ())
    GC.GetAllocatedBytesForCurrentThread() - before
