/// Shared helpers for golden tests: locate tests/golden, read flat torch.save'd dicts, compare tensors.
module Vct.Core.Tests.Golden

open System
open System.Collections.Generic
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// The repository root: the first folder above the test program that holds Vct.sln.
let repoRoot =
    lazy
        (let rec up (d: DirectoryInfo) =
            if isNull d then failwith "Vct.sln not found above the test program"
            elif File.Exists(Path.Combine(d.FullName, "Vct.sln")) then d.FullName
            else up d.Parent
         up (DirectoryInfo AppContext.BaseDirectory))

/// tests/golden of the repository.
let root = lazy (Path.Combine(repoRoot.Value, "tests", "golden"))

/// Starts `psi` with stdout and stderr redirected, waits; returns exit code, stdout, stderr.
let runProcess (psi: Diagnostics.ProcessStartInfo) =
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.UseShellExecute <- false
    use p = Diagnostics.Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    p.ExitCode, out.Result, err.Result

/// A golden file under tests/golden/<folder>: a flat dict name -> tensor.
type File(folder: string, name: string) =
    let file = Vct.Core.Checkpoint.StateDict.load (Path.Combine(root.Value, folder, name))
    let d = file.StateDict
    member _.Item(key: string) : Tensor =
        if d.ContainsKey key then d[key] else failwith $"{folder}/{name} has no tensor {key}"
    member _.Has(key: string) = d.ContainsKey key
    /// The `w.<prefix>*` entries with `w.<prefix>` removed.
    member _.Weights(?prefix: string) =
        let p = "w." + defaultArg prefix ""
        let r = Dictionary<string, Tensor>()
        for kv in d do
            if kv.Key.StartsWith(p, StringComparison.Ordinal) then r[kv.Key.Substring p.Length] <- kv.Value
        r
    interface IDisposable with
        member _.Dispose() = (file :> IDisposable).Dispose()

/// Copies golden weights into a module: every golden key must exist with the same shape, and every module
/// key must be covered except those `mayMiss` accepts.
let loadWeights (weights: Dictionary<string, Tensor>) (mayMiss: string -> bool) (m: torch.nn.Module) =
    use _ = torch.no_grad ()
    let sd = m.state_dict()
    for kv in weights do
        match sd.TryGetValue kv.Key with
        | true, t ->
            Expect.sequenceEqual t.shape kv.Value.shape $"shape of {kv.Key}"
            t.copy_(kv.Value) |> ignore
        | _ -> failtest $"module has no key {kv.Key}"
    for k in sd.Keys do
        if not (weights.ContainsKey k) && not (mayMiss k) then failtest $"golden has no weight for {k}"

/// |actual - expected| <= rtol*|expected| + atol elementwise, atol = 1e-5 * max|expected|
/// (rtol 1e-4 unless given), with the worst errors in the message.
let expectCloseWith (rtol: float) (what: string) (expected: Tensor) (actual: Tensor) =
    Expect.sequenceEqual actual.shape expected.shape $"{what}: shape"
    use _ = torch.NewDisposeScope()
    let e = expected.to_type(torch.float64)
    let a = actual.detach().to_type(torch.float64)
    let scale = e.abs().max().item<float>()
    let atol = 1e-5 * max scale 1e-6
    let err = (a - e).abs()
    let ok = err.le(e.abs() * rtol + atol).all().item<bool>()
    if not ok then
        let maxAbs = err.max().item<float>()
        let maxRel = (err / (e.abs() + atol)).max().item<float>()
        failtest $"{what}: max abs error {maxAbs:g3}, max rel error {maxRel:g3} (max |expected| {scale:g3})"

/// expectCloseWith 1e-4.
let expectClose what expected actual = expectCloseWith 1e-4 what expected actual

/// Same shape and identical values (any dtype).
let expectEqual (what: string) (expected: Tensor) (actual: Tensor) =
    Expect.sequenceEqual actual.shape expected.shape $"{what}: shape"
    Expect.isTrue (actual.eq(expected).all().item<bool> ()) $"{what}: values differ"

/// Runs `f` on a new empty temporary folder and deletes the folder afterwards, whatever `f` does.
let withTempDir (prefix: string) (f: string -> unit) =
    let d = Path.Combine(Path.GetTempPath(), $"{prefix}-{Guid.NewGuid():N}")
    Directory.CreateDirectory d |> ignore
    try f d
    finally (try Directory.Delete(d, true) with _ -> ())
