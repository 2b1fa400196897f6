/// `dotnet fsi build.fsx bench [-- suite ... [--repeats N]]`: runs benchmark suites and writes their
/// sections of docs/benchmarks.md. Every suite measures the official PyTorch stack in the same run.
module Vct.Bench.Program

let suites : (string * (int -> unit)) list =
    [ "checkpoint", CheckpointBench.run
      "model", ModelBench.run
      "precision", PrecisionBench.run
      "profile", ProfileBench.run
      "audio", AudioBench.run
      "training", TrainingBench.run
      "video", VideoBench.run
      "distributed", DistributedBench.run ]

[<EntryPoint>]
let main argv =
    Vct.Core.Platform.Runtime.init () |> ignore
    let rec parse (names: string list) (repeats: int) args =
        match args with
        | "--repeats" :: n :: rest -> parse names (int n) rest
        | name :: rest -> parse (names @ [ name ]) repeats rest
        | [] -> names, repeats
    let names, repeats = parse [] 3 (List.ofArray argv)
    let chosen = if names.IsEmpty then suites else suites |> List.filter (fun (n, _) -> List.contains n names)
    let unknown = names |> List.filter (fun n -> not (List.exists (fun (s, _) -> s = n) suites))
    if not unknown.IsEmpty then
        eprintfn "unknown suite(s): %s; known: %s" (String.concat ", " unknown) (suites |> List.map fst |> String.concat ", ")
        2
    else
        for (name, run) in chosen do
            printfn "== %s" name
            run repeats
        0
