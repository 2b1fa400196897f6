module Vct.Core.Tests.TrainingHungarianTests

open System
open Expecto
open TorchSharp
open Vct.Core.Training
open Vct.Core.Tests.Golden
open Vct.Core.Tests.Generators

// ---------------------------------------------------------------------------------------------------
// Brute force and random matrices

/// The optimal total by enumerating every injective map of the smaller side into the larger one;
/// None when every assignment uses a +infinity entry.
let bruteForce (cost: float[,]) : float option =
    let n, m = Array2D.length1 cost, Array2D.length2 cost
    let tall = n > m
    let small, large = (if tall then m, n else n, m)
    let at i j = if tall then cost[j, i] else cost[i, j]
    let used = Array.zeroCreate<bool> large
    let mutable best = Double.PositiveInfinity
    let rec go i acc =
        if i = small then (if acc < best then best <- acc)
        else
            for j in 0 .. large - 1 do
                if not used[j] && not (Double.IsPositiveInfinity(at i j)) then
                    used[j] <- true
                    go (i + 1) (acc + at i j)
                    used[j] <- false
    go 0 0.0
    if Double.IsPositiveInfinity best then None else Some best

let makeMatrix (kind: MatrixKind) (n: int) (m: int) (seed: int) =
    let r = Random seed
    Array2D.init n m (fun _ _ ->
        match kind with
        | Uniform -> r.NextDouble()
        | SmallInts -> float (r.Next 4)
        | Constant -> 2.5
        | Signed -> (r.NextDouble() - 0.5) * 200.0
        | Forbidden -> if r.NextDouble() < 0.3 then Double.PositiveInfinity else float (r.Next 10))

/// Rows ascending and distinct, columns distinct, min(n, m) pairs, all inside the matrix.
let expectValid (cost: float[,]) (rows: int[], cols: int[]) =
    let n, m = Array2D.length1 cost, Array2D.length2 cost
    Expect.equal rows.Length (min n m) "pair count"
    Expect.equal cols.Length (min n m) "pair count"
    Expect.isTrue (rows |> Array.pairwise |> Array.forall (fun (a, b) -> a < b)) "rows strictly ascending"
    Expect.equal (Array.distinct cols).Length cols.Length "columns distinct"
    Expect.isTrue (rows |> Array.forall (fun r -> r >= 0 && r < n)) "rows in range"
    Expect.isTrue (cols |> Array.forall (fun c -> c >= 0 && c < m)) "cols in range"

/// Solve agrees with brute force: same optimum (to rounding), or both infeasible.
let agreesWithBruteForce (cost: float[,]) =
    match bruteForce cost with
    | None -> Expect.throwsT<ArgumentException> (fun () -> Hungarian.solve cost |> ignore) "infeasible input rejected"
    | Some best ->
        let a = Hungarian.solve cost
        expectValid cost a
        let total = Hungarian.totalCost cost a
        Expect.floatClose { absolute = 1e-9; relative = 1e-12 } total best "optimal total"

let private config = { FsCheckConfig.defaultConfig with maxTest = 300; arbitrary = [ typeof<CostMatrices> ] }

[<Tests>]
let tests =
    testList "Training.Hungarian" [
        testPropertyWithConfig config "random n x m (n, m <= 7, all kinds): optimum equals brute force" <|
            fun (n: int, m: int, kind: MatrixKind, seed: int) -> agreesWithBruteForce (makeMatrix kind n m seed)

        test "every shape up to 7x7, 6 matrices of each kind: optimum equals brute force" {
            for n in 1 .. 7 do
                for m in 1 .. 7 do
                    for kind in [ Uniform; SmallInts; Constant; Signed; Forbidden ] do
                        for s in 0 .. 5 do
                            agreesWithBruteForce (makeMatrix kind n m (1000 * n + 100 * m + s))
        }

        test "transposing the matrix gives the transposed assignment's cost" {
            for s in 0 .. 50 do
                let c = makeMatrix SmallInts (3 + s % 5) (1 + s % 7) s
                let t = Array2D.init (Array2D.length2 c) (Array2D.length1 c) (fun i j -> c[j, i])
                Expect.floatClose Accuracy.veryHigh (Hungarian.totalCost t (Hungarian.solve t)) (Hungarian.totalCost c (Hungarian.solve c)) "same optimum"
        }

        test "larger square and rectangular matrices: valid, and no cheaper single swap" {
            for (n, m) in [ (100, 3); (3, 100); (60, 60); (100, 20) ] do
                let c = makeMatrix Uniform n m (n * m)
                let rows, cols = Hungarian.solve c
                expectValid c (rows, cols)
                // 2-opt check on the assigned pairs and on moving a pair to a free line.
                for a in 0 .. rows.Length - 1 do
                    for b in a + 1 .. rows.Length - 1 do
                        let now = c[rows[a], cols[a]] + c[rows[b], cols[b]]
                        let swapped = c[rows[a], cols[b]] + c[rows[b], cols[a]]
                        Expect.isGreaterThanOrEqual (swapped + 1e-12) now "no improving swap"
        }

        test "empty matrices give empty assignments" {
            Expect.equal (Hungarian.solve (Array2D.zeroCreate 0 0)) ([||], [||]) "0x0"
            Expect.equal (Hungarian.solve (Array2D.zeroCreate 5 0)) ([||], [||]) "5x0"
            Expect.equal (Hungarian.solve (Array2D.zeroCreate 0 3)) ([||], [||]) "0x3"
        }

        test "NaN, -infinity and infeasible inputs are rejected with a message" {
            let c = makeMatrix Uniform 4 4 1
            c[2, 1] <- nan
            let e = Expect.throwsC (fun () -> Hungarian.solve c |> ignore) id
            Expect.stringContains e.Message "NaN at (2, 1)" "NaN position named"
            c[2, 1] <- Double.NegativeInfinity
            let e = Expect.throwsC (fun () -> Hungarian.solve c |> ignore) id
            Expect.stringContains e.Message "-infinity" "-inf named"
            let inf = Double.PositiveInfinity
            let infeasible = array2D [ [ 1.0; inf; inf ]; [ 2.0; inf; inf ]; [ 0.0; 1.0; 2.0 ] ]
            let e = Expect.throwsC (fun () -> Hungarian.solve infeasible |> ignore) id
            Expect.stringContains e.Message "infeasible" "infeasibility named"
            // A forbidden pair that can be avoided is fine.
            let ok = array2D [ [ 1.0; inf ]; [ inf; 2.0 ]; [ 0.5; 0.5 ] ]
            Expect.equal (Hungarian.solve ok) ([| 0; 2 |], [| 0; 1 |]) "3x2 avoiding +inf"
        }

        test "scipy.optimize.linear_sum_assignment on 25 stored matrices: same optimal total and same pairs" {
            use g = new Golden.File("training", "hungarian.pt")
            let count = g["count"].item<int64>() |> int
            Expect.isGreaterThanOrEqual count 20 "at least 20 matrices"
            for i in 0 .. count - 1 do
                let t = g[$"m{i}.cost"]
                let n, m = int t.shape[0], int t.shape[1]
                let data = t.data<float>().ToArray()
                let c = Array2D.init n m (fun r k -> data[r * m + k])
                let rows, cols = Hungarian.solve c
                let total = Hungarian.totalCost c (rows, cols)
                let expected = g[$"m{i}.total"].item<float>()
                Expect.floatClose { absolute = 1e-9; relative = 1e-12 } total expected $"matrix {i} ({n}x{m}): total"
                Expect.sequenceEqual (Array.map int64 rows) (g[$"m{i}.rows"].data<int64>().ToArray()) $"matrix {i}: rows"
                Expect.sequenceEqual (Array.map int64 cols) (g[$"m{i}.cols"].data<int64>().ToArray()) $"matrix {i}: cols (ties broken as SciPy)"
        }
    ]
