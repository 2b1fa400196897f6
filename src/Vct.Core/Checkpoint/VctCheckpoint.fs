namespace Vct.Core.Checkpoint

open System
open System.Collections.Generic
open System.IO
open Vct.Core
open Vct.Core.Platform

/// The Vct checkpoint format, owned here alone: a safetensors file whose metadata holds {"format": "pt"} (as the
/// reference tools write it), the model's config JSON under `vct_config` and any further entries (a training
/// state's iteration, best M_J, loss-scaler state); model checkpoints also get the config beside them as
/// `<name>.json`. Every file is written to a temporary name and renamed (a crash never leaves half a checkpoint).
/// Callers: `ModelIO.save` / `ModelIO.readConfig` (model weights), `RunState.saveState` / `loadState` (training
/// state), `StateDict.save` (a bare module), `vct forward` (named outputs).
[<RequireQualifiedAccess>]
module VctCheckpoint =
    /// The metadata key of the config JSON.
    [<Literal>]
    let ConfigKey = "vct_config"

    /// The JSON config file written beside a checkpoint: model.safetensors -> model.json.
    let configPathOf (checkpoint: string) = Path.ChangeExtension(checkpoint, ".json")

    /// Refuses a checkpoint path that its own config file would overwrite (`x.json`).
    let checkPath (path: string) =
        if String.Equals(Path.GetFullPath(configPathOf path), Path.GetFullPath path, StringComparison.OrdinalIgnoreCase) then
            raise (ArgumentException $"{path}: a checkpoint cannot be a .json file (its config is written beside it as <name>.json); use a .safetensors name")

    /// Writes `tensors` with metadata {"format": "pt"} + `config` (under `vct_config`) + `extra`, atomically.
    /// With `configBeside` the config is also written as `<name>.json` (after the weights, also atomically).
    let write (path: string) (config: string option) (configBeside: bool) (extra: (string * string) seq) (tensors: (string * Tensor) seq) =
        if config.IsSome then checkPath path
        let meta = Dictionary<string, string>()
        meta["format"] <- "pt"
        config |> Option.iter (fun text -> meta[ConfigKey] <- text)
        for k, v in extra do meta[k] <- v
        Safetensors.write path meta (List.ofSeq tensors)
        match config with
        | Some text when configBeside -> AtomicFile.writeAllText (configPathOf path) text
        | _ -> ()

    /// The config JSON of a checkpoint and where it was read: the file beside it, else its metadata.
    let readConfigText (path: string) : string * string =
        let json = configPathOf path
        if File.Exists json then json, File.ReadAllText json
        else
            use f = Safetensors.read path
            match f.Metadata.TryGetValue ConfigKey with
            | true, text -> $"{path} (metadata)", text
            | _ -> raise (InvalidDataException $"{path}: no config: neither {Path.GetFileName json} beside it nor '{ConfigKey}' in its metadata")

    /// A metadata entry of an open checkpoint, or an error that says the file is not of `kind`.
    let requireMeta (kind: string) (path: string) (f: SafetensorsFile) (key: string) =
        match f.Metadata.TryGetValue key with
        | true, v -> v
        | _ -> raise (InvalidDataException $"{path}: not a {kind} (no '{key}' in its metadata)")
