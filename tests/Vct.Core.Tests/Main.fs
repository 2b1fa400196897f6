module Vct.Core.Tests.Main

open Expecto
open Expecto.Impl

/// Runs every [<Tests>] value of this assembly and ends with one line "N passed, N failed, N skipped"
/// (errored tests count as failed), which CI reads.
let runAll (argv: string[]) =
    Vct.Core.Platform.Runtime.init () |> ignore
    let mutable counts = None
    let printer =
        { TestPrinters.defaultPrinter with
            summary =
                fun config (s: TestRunSummary) ->
                    async {
                        do! TestPrinters.defaultPrinter.summary config s
                        counts <- Some(s.passed.Length, s.failed.Length + s.errored.Length, s.ignored.Length)
                    } }
    // NOTE: sequenced: LibTorch's global RNG (torch.manual_seed) and thread count are process-wide, so tests that
    // seed it must not interleave; LibTorch already uses every core inside each test.
    let rc = Tests.runTestsInAssemblyWithCLIArgs [ CLIArguments.Printer printer; CLIArguments.Sequenced ] argv
    match counts with
    | Some(p, f, s) -> printf "\n%d passed, %d failed, %d skipped\n" p f s
    | None -> printfn "0 passed, 1 failed, 0 skipped" // Expecto stopped before running (bad arguments)
    rc

[<EntryPoint>]
let main argv =
    match argv with
    | [| "--child"; mode |] -> PlatformTests.RuntimeTests.childMain mode
    | _ -> runAll argv
