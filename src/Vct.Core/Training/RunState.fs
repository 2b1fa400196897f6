namespace Vct.Core.Training

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint

/// What a run keeps on disk: its folder rules, the resumable training state and the metrics log.
[<RequireQualifiedAccess>]
module RunState =
    /// Refuses to start a new run in a folder that already holds one (its checkpoints and log would mix with
    /// the new run's); resuming needs its checkpoint.
    let checkRunDir (runDir: string) (resume: bool) =
        let files = RunFiles runDir
        if not resume then
            let held =
                [ files.Last; files.Previous; files.Metrics; files.Best; files.Final ]
                |> List.filter File.Exists |> List.map Path.GetFileName
            if not held.IsEmpty then
                let names = String.Join(", ", held)
                raise (InvalidOperationException $"{runDir}: already holds a run ({names}); pass --resume to continue it, or choose another --name")
        elif not (File.Exists files.Last || File.Exists files.Previous) then
            raise (FileNotFoundException($"nothing to resume: {files.Last} does not exist", files.Last))

    /// Writes the resumable state: model, criterion, optimiser state, iteration and the loss scaler's state (mixed
    /// precision), in one atomic safetensors file.
    let saveState (path: string) (cfg: TrainConfig) (model: VctModel) (criterion: Criterion) (opt: Modules.AdamW) (scaler: GradScaler option)
                  (iteration: int) (bestMJ: float) (bestIt: int) =
        let invariant (x: float) = x.ToString("R", Globalization.CultureInfo.InvariantCulture)
        let meta =
            [ yield "iteration", string iteration
              yield "best_mj", invariant bestMJ
              yield "best_iteration", string bestIt
              match scaler with
              | Some s ->
                  yield "amp_scale", invariant s.Scale
                  yield "amp_growth_tracker", string s.GrowthTracker
              | None -> () ]
        // The step's freed activations back to the OS first: the released presets come close to 24 GB otherwise.
        Runtime.trimNativeHeap ()
        use optTensor = Optim.stateTensor opt
        let tensors =
            [ for kv in model.state_dict () -> kv.Key, kv.Value
              for kv in criterion.state_dict () -> "criterion." + kv.Key, kv.Value
              yield "optimizer_state", optTensor ]
        VctCheckpoint.write path (Some(ConfigJson.toText cfg.Model)) false meta tensors

    /// Restores what `saveState` wrote; returns (iteration, best M_J, best iteration).
    let loadState (path: string) (model: VctModel) (criterion: Criterion) (opt: Modules.AdamW) : int * float * int =
        use f = Safetensors.read path
        let get = VctCheckpoint.requireMeta "Vct training checkpoint" path f
        // The metadata first: a malformed checkpoint is refused before anything is loaded.
        let number (k: string) =
            match Double.TryParse(get k, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
            | true, v -> v
            | _ -> raise (InvalidDataException $"{path}: metadata '{k}' is not a number ('{get k}')")
        let count (k: string) (least: int) =
            match Int32.TryParse(get k, Globalization.NumberStyles.Integer, Globalization.CultureInfo.InvariantCulture) with
            | true, v when v >= least -> v
            | _ -> raise (InvalidDataException $"{path}: metadata '{k}' is not an iteration count ('{get k}')")
        let iteration, bestMJ, bestIt = count "iteration" 0, number "best_mj", count "best_iteration" -1
        if not (f.Tensors.ContainsKey "optimizer_state") then
            raise (InvalidDataException $"{path}: not a Vct training checkpoint (no 'optimizer_state' tensor)")
        let modelPart = [ for kv in f.Tensors do if not (kv.Key.StartsWith "criterion.") && kv.Key <> "optimizer_state" then yield kv ]
        StateDict.loadInto Checkpoint.LoadOptions.Default modelPart model |> ignore
        let critPart = [ for kv in f.Tensors do if kv.Key.StartsWith "criterion." then yield KeyValuePair(kv.Key.Substring 10, kv.Value) ]
        StateDict.loadInto Checkpoint.LoadOptions.Default critPart criterion |> ignore
        Optim.loadStateBytes opt (f.Tensors["optimizer_state"].data<byte>().ToArray())
        iteration, bestMJ, bestIt

    /// Restores the loss scaler's state from a `saveState` checkpoint; false when it has none (a float32 run's
    /// checkpoint: the scaler then starts afresh).
    let loadScalerState (path: string) (scaler: GradScaler) : bool =
        use f = Safetensors.read path
        match f.Metadata.TryGetValue "amp_scale", f.Metadata.TryGetValue "amp_growth_tracker" with
        | (true, s), (true, t) ->
            let inv = Globalization.CultureInfo.InvariantCulture
            match Double.TryParse(s, Globalization.NumberStyles.Float, inv), Int32.TryParse(t, Globalization.NumberStyles.Integer, inv) with
            | (true, scale), (true, tracker) when scale > 0.0 && Double.IsFinite scale && tracker >= 0 -> scaler.Restore(scale, tracker)
            | _ -> raise (InvalidDataException $"{path}: metadata 'amp_scale' / 'amp_growth_tracker' malformed ('{s}', '{t}')")
            true
        | _ -> false

    /// Appends one JSON line to the metrics log.
    let appendJson (path: string) (node: JsonObject) =
        File.AppendAllText(path, node.ToJsonString() + "\n")

    /// On resume: the metrics log up to `iteration`, rewritten atomically. A torn last line (the process died while
    /// writing it) and the lines of steps after the checkpoint (they are run again) are dropped, so no step is
    /// logged twice. Returns the number of lines dropped.
    let trimLog (path: string) (iteration: int) : int =
        if not (File.Exists path) then 0
        else
            let lines = File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "")
            let keep =
                lines |> Array.filter (fun line ->
                    try
                        use doc = JsonDocument.Parse line
                        let mutable it = Unchecked.defaultof<JsonElement>
                        doc.RootElement.ValueKind = JsonValueKind.Object
                        && doc.RootElement.TryGetProperty("iteration", &it) && it.ValueKind = JsonValueKind.Number
                        && it.GetInt32() <= iteration
                    with :? JsonException | :? FormatException | :? InvalidOperationException -> false)
            if keep.Length <> lines.Length then
                AtomicFile.writeAllText path (String.Join("", keep |> Array.map (fun l -> l + "\n")))
            lines.Length - keep.Length
