module Vct.Core.Tests.BuildTests

open System.Diagnostics
open System.IO
open Expecto
open Vct.Core.Tests.Support

/// Runs `dotnet fsi build.fsx <args>` from the repository root; returns exit code and stdout.
let private buildScript (args: string list) =
    let psi = ProcessStartInfo("dotnet", WorkingDirectory = repoRoot.Value)
    for a in [ "fsi"; Path.Combine(repoRoot.Value, "build.fsx") ] @ args do psi.ArgumentList.Add a
    let code, out, err = runProcess psi
    Expect.equal code 0 $"exit code; stderr: {err}"
    out.Replace("\r\n", "\n").Trim().Split('\n') |> List.ofArray

[<Tests>]
let tests =
    testList "Build" [
        test "build.fsx passes every argument after the target to it" {
            let lines = buildScript [ "args"; "--iterations"; "100"; "two words" ]
            Expect.equal lines [ "arg: --iterations"; "arg: 100"; "arg: two words"; "3 argument(s)" ] "the options, in order"
        }

        test "build.fsx accepts a literal -- after the target and drops only that one" {
            // `dotnet fsi` removes the first `--` itself; the second reaches the script right after the target.
            let lines = buildScript [ "args"; "--"; "--"; "--filter-test-list"; "Runtime"; "--" ]
            Expect.equal lines [ "arg: --filter-test-list"; "arg: Runtime"; "arg: --"; "3 argument(s)" ] "one -- dropped, a later one kept"
        }

        test "build.fsx with a target and no options passes none" {
            Expect.equal (buildScript [ "args" ]) [ "0 argument(s)" ] "no options"
        }
    ]
