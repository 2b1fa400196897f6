module Vct.Core.Tests.NotebooksTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open Expecto
open Vct.Core.Tests.Support

/// Runs `bash notebooks/run-notebooks.sh args` in the repository root; returns the exit code and the output
/// (stdout and stderr together).
let private runRunner (args: string list) =
    let root = repoRoot.Force()
    let script = Path.Combine(root, "notebooks", "run-notebooks.sh")
    if not (File.Exists script) then failtestf "%s is missing" script
    let psi = ProcessStartInfo("bash", WorkingDirectory = root, UseShellExecute = false)
    psi.ArgumentList.Add script
    for a in args do psi.ArgumentList.Add a
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.RedirectStandardInput <- true
    use p = Process.Start psi
    p.StandardInput.Close()
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit(TimeSpan.FromMinutes 40.0)) then
        p.Kill true
        failtestf "run-notebooks.sh did not finish in 40 minutes; output so far:\n%s%s" out.Result err.Result
    p.WaitForExit()
    p.ExitCode, out.Result + err.Result

/// Exit code 3 of the runner: the set-up failed (tool or FSharp.Core missing); its message says which.
let private explain (code: int) (output: string) =
    let hint =
        if code = 3 then
            "\nThe runner could not set up dotnet-repl: run `dotnet tool restore` in the repository root "
            + "(the tool is pinned in .config/dotnet-tools.json) and build the solution (`dotnet build Vct.sln -c Release`)."
        else ""
    $"run-notebooks.sh exited with {code}.{hint}\n--- output ---\n{output}"

[<Tests>]
let tests =
    testSequenced
    <| testList "Notebooks" [
        test "every notebook runs without a failing cell" {
            let code, output = runRunner []
            Expect.equal code 0 (explain code output)
            let root = repoRoot.Force()
            let notebooks = Directory.GetFiles(Path.Combine(root, "notebooks"), "*.ipynb") |> Array.map Path.GetFileName |> Array.sort
            Expect.isGreaterThanOrEqual notebooks.Length 7 "00 and the six notebooks that explore the model"
            for nb in notebooks do
                Expect.stringContains output $"ok     notebooks/{nb}" $"one ok line per notebook ({nb})"
            // Each notebook leaves copies of its charts (README's pictures are rendered from them): at least two each.
            let charts = Path.Combine(root, "artifacts", "notebooks", "charts")
            for nb in notebooks |> Array.filter (fun n -> not (n.StartsWith "00-")) do
                let name = Path.GetFileNameWithoutExtension nb
                let n = if Directory.Exists charts then Directory.GetFiles(charts, name + "-*.html").Length else 0
                Expect.isGreaterThanOrEqual n 2 $"{name} draws at least two charts"
        }

        test "the runner reports a failing cell and exits non-zero" {
            let root = repoRoot.Force()
            let source = Path.Combine(root, "notebooks", "00-getting-started.ipynb")
            let nb = JsonNode.Parse(File.ReadAllText source)
            let cell = JsonObject()
            cell["cell_type"] <- JsonValue.Create "code"
            cell["execution_count"] <- null
            cell["metadata"] <-
                JsonNode.Parse """{"dotnet_interactive":{"language":"fsharp"},"polyglot_notebook":{"kernelName":"fsharp"}}"""
            cell["outputs"] <- JsonArray()
            cell["source"] <- JsonArray(JsonValue.Create "if true then failwith \"boom\"")
            nb["cells"].AsArray().Add cell
            use dir = new TempDir("vct-notebook-test")
            let broken = Path.Combine(dir.Path, "zz-broken-cell-check.ipynb")
            File.WriteAllText(broken, nb.ToJsonString())
            let code, output = runRunner [ broken ]
            if code = 3 then failtest (explain code output)
            Expect.notEqual code 0 $"a notebook with a failing cell must fail the run\n--- output ---\n{output}"
            Expect.stringContains output "FAILED" $"the failing notebook is reported\n--- output ---\n{output}"
            Expect.stringContains output "boom" $"the failing cell's error text is printed\n--- output ---\n{output}"
        }
    ]
