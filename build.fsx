// Vct build script: `dotnet fsi build.fsx <target> [options...]`.
// Plain F# with no packages (FAKE cannot be restored here); every target only runs commands that a user
// could type, so there is no logic here that the projects lack.
//
// Every argument after the target is passed to it (`dotnet fsi` itself removes a `--` before the script sees
// its arguments; a literal `--` right after the target is accepted and dropped).
//
//   build       restore (locked in CI) and build the solution, warnings as errors
//   test        build, then run the Expecto test program (options go to Expecto, e.g. --filter-test-list X) and the
//               xunit suite tests/Vct.CSharp.Tests; prints each suite's count, then
//               "N passed, N failed, N skipped" summed over both, last
//   notebooks   build, then execute every notebooks/*.ipynb headless; fails on any failing cell
//   bench       build, then run the benchmarks (writes docs/benchmarks.md); options go to Vct.Bench (e.g. a suite)
//   train       the main job (training + evaluation on the built-in synthetic data); options replace the
//               default `vct train` options
//   eval        evaluate a checkpoint on the default synthetic split; options replace the default `vct eval` options
//   args        prints the options it received, one per line ("arg: <value>"), then "N argument(s)"
//   help        this text

open System
open System.Diagnostics
open System.IO

let root = __SOURCE_DIRECTORY__
let args = fsi.CommandLineArgs |> Array.skip 1
let target = if args.Length = 0 then "help" else args[0]
/// The target's options: everything after the target, less one literal `--` right after it.
let extra =
    let rest = if args.Length > 1 then args[1..] else [||]
    if rest.Length > 0 && rest[0] = "--" then rest[1..] else rest
let configuration = "Release"

/// What every program started here gets in its environment: MALLOC_ARENA_MAX=1 makes all threads of a Vct
/// process share glibc's main heap, which Vct tunes for LibTorch's large tensors (src/Vct.Core/Platform/NativeHeap.fs);
/// glibc reads it only at process start. VCT_NATIVE_HEAP=system leaves glibc's defaults.
let launchEnvironment =
    if String.Equals(Environment.GetEnvironmentVariable "VCT_NATIVE_HEAP", "system", StringComparison.OrdinalIgnoreCase) then []
    else [ "MALLOC_ARENA_MAX", "1" ]

/// Runs a program in `dir`, streaming its output; returns the exit code.
let run (dir: string) (exe: string) (arguments: string list) (env: (string * string) list) =
    let psi = ProcessStartInfo(exe, WorkingDirectory = dir, UseShellExecute = false)
    for a in arguments do psi.ArgumentList.Add a
    for (k, v) in launchEnvironment @ env do psi.Environment[k] <- v
    printfn "> %s %s" exe (String.Join(" ", arguments))
    use p = Process.Start psi
    p.WaitForExit()
    p.ExitCode

let check code what = if code <> 0 then failwithf "%s failed with exit code %d" what code

let dotnet (arguments: string list) = run root "dotnet" arguments []

let build () =
    let restore = [ "restore"; "Vct.sln" ] @ (if Environment.GetEnvironmentVariable "CI" = "true" then [ "--locked-mode" ] else [])
    check (dotnet restore) "restore"
    check (dotnet [ "build"; "Vct.sln"; "-c"; configuration; "--no-restore"; "-warnaserror"; "-nologo" ]) "build"

/// Runs a program like `run`, echoing its output, and returns the exit code with the output's lines.
let runCapture (exe: string) (arguments: string list) =
    let psi = ProcessStartInfo(exe, WorkingDirectory = root, UseShellExecute = false, RedirectStandardOutput = true)
    for a in arguments do psi.ArgumentList.Add a
    for (k, v) in launchEnvironment do psi.Environment[k] <- v
    printfn "> %s %s" exe (String.Join(" ", arguments))
    use p = Process.Start psi
    let lines = ResizeArray<string>()
    let mutable line = p.StandardOutput.ReadLine()
    while not (isNull line) do
        printfn "%s" line
        lines.Add line
        line <- p.StandardOutput.ReadLine()
    p.WaitForExit()
    p.ExitCode, List.ofSeq lines

/// The last line of `lines` matching `pattern` as (passed, failed, skipped); a suite that printed none counts as 1 failed.
let counts (pattern: string) (lines: string list) =
    let m = lines |> List.map (fun l -> Text.RegularExpressions.Regex.Match(l, pattern)) |> List.filter (fun m -> m.Success) |> List.tryLast
    match m with
    | Some m -> (int m.Groups["passed"].Value, int m.Groups["failed"].Value, int m.Groups["skipped"].Value)
    | None -> (0, 1, 0)

/// Both suites: the Expecto suite of the F# core (options after `test` go to Expecto and then only it runs) and the
/// xunit suite of the C# facade; the last line sums them: "N passed, N failed, N skipped".
let test () =
    build ()
    // Expecto is a plain program: `dotnet test` has no adapter for it and would run nothing.
    let coreCode, coreLines =
        runCapture "dotnet" ([ "run"; "--project"; "tests/Vct.Core.Tests"; "-c"; configuration; "--no-build"; "--" ] @ List.ofArray extra)
    let core = counts @"^(?<passed>\d+) passed, (?<failed>\d+) failed, (?<skipped>\d+) skipped" coreLines
    let csCode, cs =
        if extra.Length > 0 then 0, (0, 0, 0)
        else
            let code, lines = runCapture "dotnet" [ "test"; "tests/Vct.CSharp.Tests"; "-c"; configuration; "--no-build"; "--nologo" ]
            code, counts @"Failed:\s+(?<failed>\d+), Passed:\s+(?<passed>\d+), Skipped:\s+(?<skipped>\d+)" lines
    let (p1, f1, s1), (p2, f2, s2) = core, cs
    printfn "\nVct.Core.Tests (Expecto): %d passed, %d failed, %d skipped; Vct.CSharp.Tests (xunit): %d passed, %d failed, %d skipped" p1 f1 s1 p2 f2 s2
    printfn "%d passed, %d failed, %d skipped" (p1 + p2) (f1 + f2) (s1 + s2)
    if coreCode <> 0 || csCode <> 0 || f1 + f2 > 0 then 1 else 0

let notebooks () =
    build ()
    let script = Path.Combine(root, "notebooks", "run-notebooks.sh")
    run root "bash" ([ script ] @ List.ofArray extra) []

let bench () =
    build ()
    dotnet ([ "run"; "--project"; "bench/Vct.Bench"; "-c"; configuration; "--no-build"; "--" ] @ List.ofArray extra)

/// The `vct` CLI built in Release, run from the repository root.
let vct (arguments: string list) =
    dotnet ([ "run"; "--project"; "src/Vct.Cli"; "-c"; configuration; "--no-build"; "--" ] @ arguments)

/// The main job: the tiny preset on the built-in synthetic S4-like data (generated under data/ when missing),
/// evaluated with true and shuffled audio; everything lands in runs/main/.
/// An earlier runs/main is moved aside first (`vct train` refuses to mix a new run into an old one).
let train () =
    build ()
    let args =
        if extra.Length > 0 then List.ofArray extra
        else
            let dir = Path.Combine(root, "runs", "main")
            if Directory.Exists dir then
                let kept = Path.Combine(root, "runs", "main-" + DateTime.Now.ToString("yyyyMMdd-HHmmss"))
                Directory.Move(dir, kept)
                printfn "runs/main held an earlier run: moved to runs/%s" (Path.GetFileName kept)
            [ "--preset"; "tiny"; "--name"; "main" ]
    vct ([ "train" ] @ args)

/// Evaluates the main job's best checkpoint on the synthetic validation split.
let eval () =
    build ()
    let args =
        if extra.Length > 0 then List.ofArray extra
        else [ "--checkpoint"; "runs/main/model_best.safetensors"; "--data"; "data/synth-s4"; "--split"; "val"; "--out"; "runs/main/eval-val" ]
    vct ([ "eval" ] @ args)

/// Prints the options the script passes to a target (tests check that they arrive).
let echoArgs () =
    for a in extra do printfn "arg: %s" a
    printfn "%d argument(s)" extra.Length
    0

let help () =
    printfn "usage: dotnet fsi build.fsx <build|test|notebooks|bench|train|eval|args|help> [options for the target]"
    0

let code =
    try
        match target with
        | "build" -> build (); 0
        | "test" -> test ()
        | "notebooks" -> notebooks ()
        | "bench" -> bench ()
        | "train" -> train ()
        | "eval" -> eval ()
        | "args" -> echoArgs ()
        | "help" | "--help" | "-h" -> help ()
        | other ->
            eprintfn "unknown target '%s'" other
            help () |> ignore
            2
    with e ->
        eprintfn "build.fsx %s: %s" target e.Message
        1

exit code
