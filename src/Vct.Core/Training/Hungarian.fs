namespace Vct.Core.Training

open System

/// Linear sum assignment (the problem SciPy's `linear_sum_assignment` solves) on a dense cost matrix.
///
/// Algorithm: shortest augmenting paths with row/column potentials (Jonker-Volgenant family, as described by
/// D. F. Crouse, "On implementing 2D rectangular assignment algorithms", IEEE TAES 2016). One Dijkstra-like
/// search per row of the smaller side, O(n^2 m) overall for an n x m matrix with n <= m. Among equally cheap
/// columns the search prefers a free one, and columns are scanned in the same order as the paper's reference
/// description, so ties resolve as in SciPy.
[<RequireQualifiedAccess>]
module Hungarian =

    /// Solves min sum cost[r, c] over assignments that match every row to a distinct column when rows <= cols
    /// (every column to a distinct row otherwise). `+infinity` marks a forbidden pair. Returns
    /// (rows, cols): min(rows, cols) pairs, rows ascending, as SciPy does.
    /// Fails with ArgumentException on NaN or -infinity entries and when no assignment avoids the forbidden
    /// pairs (infeasible).
    let solve (cost: float[,]) : int[] * int[] =
        let nr0 = Array2D.length1 cost
        let nc0 = Array2D.length2 cost
        for i in 0 .. nr0 - 1 do
            for j in 0 .. nc0 - 1 do
                let c = cost[i, j]
                if Double.IsNaN c then invalidArg (nameof cost) $"cost matrix has NaN at ({i}, {j})"
                if Double.IsNegativeInfinity c then invalidArg (nameof cost) $"cost matrix has -infinity at ({i}, {j})"
        if nr0 = 0 || nc0 = 0 then
            [||], [||]
        else
            // Work on n <= m: transpose a tall matrix (more queries than targets is the usual case).
            let transposed = nr0 > nc0
            let nr, nc = (if transposed then nc0, nr0 else nr0, nc0)
            let c = if transposed then Array2D.init nr nc (fun i j -> cost[j, i]) else cost
            let u = Array.zeroCreate<float> nr          // row potentials
            let v = Array.zeroCreate<float> nc          // column potentials
            let shortest = Array.zeroCreate<float> nc   // reduced path length to each column
            let path = Array.create nc -1               // predecessor row of each column on the path
            let col4row = Array.create nr -1
            let row4col = Array.create nc -1
            let sr = Array.zeroCreate<bool> nr          // rows reached by the search
            let sc = Array.zeroCreate<bool> nc          // columns settled by the search
            let remaining = Array.zeroCreate<int> nc

            /// Dijkstra from `curRow` over reduced costs; returns the free column reached and the path length.
            let augmentingPath (curRow: int) =
                let mutable minVal = 0.0
                let mutable numRemaining = nc
                for it in 0 .. nc - 1 do
                    remaining[it] <- nc - it - 1
                Array.fill sr 0 nr false
                Array.fill sc 0 nc false
                Array.fill shortest 0 nc Double.PositiveInfinity
                let mutable sink = -1
                let mutable i = curRow
                while sink = -1 do
                    let mutable index = -1
                    let mutable lowest = Double.PositiveInfinity
                    sr[i] <- true
                    for it in 0 .. numRemaining - 1 do
                        let j = remaining[it]
                        let r = minVal + c[i, j] - u[i] - v[j]
                        if r < shortest[j] then
                            path[j] <- i
                            shortest[j] <- r
                        // Prefer a free column among equal lengths: the path ends sooner.
                        if shortest[j] < lowest || (shortest[j] = lowest && row4col[j] = -1) then
                            lowest <- shortest[j]
                            index <- it
                    minVal <- lowest
                    if Double.IsPositiveInfinity minVal then
                        let side = if transposed then "columns" else "rows"
                        invalidArg (nameof cost) $"cost matrix is infeasible: no assignment of all {nr} {side} avoids the +infinity entries"
                    let j = remaining[index]
                    if row4col[j] = -1 then sink <- j else i <- row4col[j]
                    sc[j] <- true
                    numRemaining <- numRemaining - 1
                    remaining[index] <- remaining[numRemaining]
                sink, minVal

            for curRow in 0 .. nr - 1 do
                let sink, minVal = augmentingPath curRow
                // Update the potentials so that reduced costs stay non-negative.
                u[curRow] <- u[curRow] + minVal
                for i in 0 .. nr - 1 do
                    if sr[i] && i <> curRow then u[i] <- u[i] + (minVal - shortest[col4row[i]])
                for j in 0 .. nc - 1 do
                    if sc[j] then v[j] <- v[j] - (minVal - shortest[j])
                // Augment along the path back to curRow.
                let mutable j = sink
                let mutable fin = false
                while not fin do
                    let i = path[j]
                    row4col[j] <- i
                    let previous = col4row[i]
                    col4row[i] <- j
                    j <- previous
                    if i = curRow then fin <- true

            if transposed then
                // Rows of the original matrix = our columns; list them ascending.
                let order = Array.init nr id |> Array.sortBy (fun k -> col4row[k])
                order |> Array.map (fun k -> col4row[k]), order
            else
                Array.init nr id, Array.copy col4row

    /// Total cost of an assignment returned by `solve`.
    let totalCost (cost: float[,]) (rows: int[], cols: int[]) =
        Array.fold2 (fun acc r c -> acc + cost[r, c]) 0.0 rows cols
