namespace Vct.Core.Platform

open System
open TorchSharp

/// Where tensors live: "auto" picks CUDA when it is available, else the CPU.
[<RequireQualifiedAccess>]
type DeviceChoice =
    | Auto
    | Cpu
    /// A CUDA device by index.
    | Cuda of index: int

    /// Parses "auto", "cpu", "cuda" or "cuda:N" (case-insensitive).
    static member Parse(text: string) =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "auto" | "" -> DeviceChoice.Auto
        | "cpu" -> DeviceChoice.Cpu
        | "cuda" -> DeviceChoice.Cuda 0
        | s when s.StartsWith "cuda:" ->
            match Int32.TryParse(s.Substring 5) with
            | true, i when i >= 0 -> DeviceChoice.Cuda i
            | _ -> invalidArg (nameof text) $"bad CUDA device '{text}': expected cuda:N with N >= 0"
        | _ -> invalidArg (nameof text) $"unknown device '{text}': expected auto, cpu, cuda or cuda:N"

/// Device, thread and seed helpers. Every code path takes a device argument; nothing assumes the CPU.
[<RequireQualifiedAccess>]
module Device =
    /// True when CUDA can be used by this process.
    let cudaAvailable () =
        Runtime.init () |> ignore
        torch.cuda.is_available ()

    /// Resolves a choice to a concrete device; asking for CUDA where there is none is an error.
    let resolve (choice: DeviceChoice) : torch.Device =
        Runtime.init () |> ignore
        match choice with
        | DeviceChoice.Cpu -> torch.CPU
        | DeviceChoice.Auto -> if torch.cuda.is_available () then torch.CUDA else torch.CPU
        | DeviceChoice.Cuda i ->
            if not (torch.cuda.is_available ()) then
                invalidOp "CUDA was requested but is not available (no GPU, or a CPU-only LibTorch package)"
            let n = torch.cuda.device_count ()
            if i >= n then invalidArg (nameof choice) $"cuda:{i} requested but only {n} CUDA device(s) exist"
            torch.device (DeviceType.CUDA, i)

    /// Parses and resolves "auto" | "cpu" | "cuda[:N]".
    let parse (text: string) = resolve (DeviceChoice.Parse text)

    /// Number of intra-op threads LibTorch uses.
    let threads () =
        Runtime.init () |> ignore
        torch.get_num_threads ()

    /// Sets LibTorch's intra-op thread count (n >= 1).
    let setThreads (n: int) =
        if n < 1 then invalidArg (nameof n) $"thread count must be >= 1, got {n}"
        Runtime.init () |> ignore
        torch.set_num_threads n

    /// Seeds LibTorch's CPU and CUDA generators; returns a .NET Random seeded the same way for host-side
    /// randomness (data order, augmentation). Same seed, same numbers on the same device and build.
    let seed (seed: int64) : Random =
        Runtime.init () |> ignore
        torch.manual_seed seed |> ignore
        if torch.cuda.is_available () then torch.cuda.manual_seed_all seed
        Random(int (seed &&& 0x7fffffffL))
