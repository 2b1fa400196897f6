module Vct.Core.Tests.RuntimeTests

open System
open System.Diagnostics
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Tests.Support

/// Runs this test program in a child process in mode `mode`, with extra environment variables.
let runChild (mode: string) (env: (string * string) list) =
    let exe = Environment.ProcessPath
    let dll = Reflection.Assembly.GetEntryAssembly().Location
    let psi = ProcessStartInfo(exe)
    if Path.GetFileNameWithoutExtension(exe) = "dotnet" then psi.ArgumentList.Add dll
    psi.ArgumentList.Add "--child"
    psi.ArgumentList.Add mode
    for (k, v) in env do psi.Environment[k] <- v
    runProcess psi

[<Tests>]
let tests =
    testList "Runtime" [
        test "init makes TorchSharp usable" {
            let report = Runtime.init ()
            use t = torch.arange(6L.ToScalar()).reshape(2L, 3L).sum()
            Expect.equal (t.item<int64> ()) 15L "0+1+...+5"
            Expect.isNotEmpty report.CompatFixReason "the report says why"
        }

        test "init is idempotent" {
            let a = Runtime.init ()
            let b = Runtime.init ()
            Expect.equal a b "the same report twice"
            Expect.isTrue (obj.ReferenceEquals(a, b)) "computed once"
        }

        test "the patched copy differs from the original only in vna_flags of missing versions" {
            let report = Runtime.init ()
            if report.CompatFixApplied then
                let original = File.ReadAllBytes(Path.Combine(report.NativeDirectory, "libLibTorchSharp.so"))
                let patched = File.ReadAllBytes report.PatchedLibrary
                Expect.equal patched.Length original.Length "same length"
                let diffs = [ for i in 0 .. original.Length - 1 do if original[i] <> patched[i] then yield i ]
                let missing = Runtime.missingVersions original (File.ReadAllBytes report.LibStdCxx)
                Expect.isNonEmpty missing "something was missing, or no fix would be applied"
                Expect.all diffs (fun i -> missing |> List.exists (fun n -> i = n.FlagsOffset || i = n.FlagsOffset + 1)) "only flag bytes change"
                let weak = Elf.versionNeeds patched |> List.filter (fun n -> missing |> List.exists (fun m -> m.Name = n.Name))
                Expect.all weak (fun n -> n.Flags &&& Elf.VerFlagWeak <> 0us) "missing versions are weak"
            else
                skiptest $"fix not applied here: {report.CompatFixReason}"
        }

        test "two processes initialising at once with an empty cache both work" {
            use tmp = new TempDir("vct-cache")
            let cache = Path.Combine(tmp.Path, "cache")
            let env = [ Runtime.CacheVariable, cache ]
            let results =
                [ for _ in 1 .. 3 -> Threading.Tasks.Task.Run(fun () -> runChild "init" env) ]
                |> List.map (fun t -> t.Result)
            for (code, out, err) in results do
                Expect.equal code 0 $"child failed: {out}\n{err}"
                Expect.stringContains out "sum=15" "child computed with TorchSharp"
            let leftovers = if Directory.Exists cache then Directory.GetFiles(cache, "*.tmp", SearchOption.AllDirectories) else [||]
            Expect.isEmpty leftovers "no temporary files left behind"
        }

        test "a corrupt cached copy is replaced" {
            let report = Runtime.init ()
            if not report.CompatFixApplied then skiptest "fix not applied here"
            use tmp = new TempDir("vct-cache")
            let cache = Path.Combine(tmp.Path, "cache")
            let rel = Path.GetRelativePath(Path.GetDirectoryName(Path.GetDirectoryName report.PatchedLibrary), report.PatchedLibrary)
            let target = Path.Combine(cache, rel)
            Directory.CreateDirectory(Path.GetDirectoryName target) |> ignore
            File.WriteAllBytes(target, [| 1uy; 2uy; 3uy |])
            let code, out, err = runChild "init" [ Runtime.CacheVariable, cache ]
            Expect.equal code 0 $"child failed: {out}\n{err}"
            Expect.equal (FileInfo(target).Length) (FileInfo(report.PatchedLibrary).Length) "rewritten"
        }

        test "turning the fix off leaves TorchSharp's own failure, named" {
            let report = Runtime.init ()
            if not report.CompatFixApplied then skiptest "fix not applied here"
            let code, out, err = runChild "init" [ Runtime.DisableVariable, "0" ]
            Expect.notEqual code 0 "without the fix TorchSharp cannot load here"
            Expect.stringContains (out + err) "TorchSharp failed to load" "clear message"
            Expect.stringContains (out + err) Runtime.DisableVariable "says how it was turned off"
        }
    ]

/// Child-process modes used by the tests above.
let childMain (mode: string) =
    match mode with
    | "init" ->
        try
            Runtime.init () |> ignore
            use t = torch.arange(6L.ToScalar()).sum()
            printfn "sum=%d" (t.item<int64> ())
            0
        with e ->
            eprintfn "%s" e.Message
            3
    | other ->
        eprintfn "unknown child mode %s" other
        2
