namespace Vct.Core.Platform

open System
open System.IO
open TorchSharp

/// Arithmetic precision of an inference pass. Weights stay float32 in every case; `BFloat16` and `Float16` run
/// the big products (linear, matmul, convolution, fused attention) in that type under LibTorch's autocast
/// (Platform/Autocast.fs), with float32 accumulation inside the GEMM kernels, and keep LibTorch's
/// float32-listed ops (grid_sample, norms, losses, ...) in float32.
[<RequireQualifiedAccess>]
type Precision =
    | Float32
    | BFloat16
    | Float16

    /// Parses "fp32" / "float32", "bf16" / "bfloat16", "fp16" / "float16" (case-insensitive, surrounding blanks
    /// ignored); anything else is an ArgumentException that lists the accepted names.
    static member Parse(text: string) : Precision =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "fp32" | "float32" -> Precision.Float32
        | "bf16" | "bfloat16" -> Precision.BFloat16
        | "fp16" | "float16" -> Precision.Float16
        | _ -> invalidArg (nameof text) $"unknown precision '{text}': expected fp32 (float32), bf16 (bfloat16) or fp16 (float16)"

    /// The short name: "fp32", "bf16" or "fp16".
    member p.Name =
        match p with
        | Precision.Float32 -> "fp32"
        | Precision.BFloat16 -> "bf16"
        | Precision.Float16 -> "fp16"

    /// The LibTorch dtype of the products.
    member p.ScalarType =
        match p with
        | Precision.Float32 -> torch.ScalarType.Float32
        | Precision.BFloat16 -> torch.ScalarType.BFloat16
        | Precision.Float16 -> torch.ScalarType.Float16

/// Checks and runs inference passes in a chosen precision.
[<RequireQualifiedAccess>]
module Precision =
    /// Parses a precision name (see `Precision.Parse`).
    let parse (text: string) : Precision = Precision.Parse text

    /// The CPU's feature flags from /proc/cpuinfo (empty where the file cannot be read, e.g. off Linux).
    let cpuFlags () : Set<string> =
        try
            File.ReadLines "/proc/cpuinfo"
            |> Seq.tryFind (fun l -> l.StartsWith "flags")
            |> Option.map (fun l -> (l.Split(':', 2)[1]).Split(' ', StringSplitOptions.RemoveEmptyEntries) |> Set.ofArray)
            |> Option.defaultValue Set.empty
        with _ -> Set.empty

    /// True when the CPU has native bfloat16 dot products (AVX-512 BF16, or AMX BF16 tiles). Without them
    /// LibTorch converts bfloat16 in software and a bf16 pass is slower than float32, so it is refused.
    let cpuHasBf16 () =
        let flags = cpuFlags ()
        flags.Contains "avx512_bf16" || flags.Contains "amx_bf16"

    /// Why `precision` cannot run on `device`; None when it can.
    let unsupportedReason (device: torch.Device) (precision: Precision) : string option =
        match precision, device.``type`` with
        | Precision.Float32, _ -> None
        | p, _ when (Autocast.unavailableReason ()).IsSome ->
            Some $"precision {p.Name} needs LibTorch's autocast, which cannot be used here: {(Autocast.unavailableReason ()).Value}"
        | Precision.Float16, DeviceType.CPU ->
            Some "precision fp16 is not supported on the CPU (LibTorch has no fast float16 kernels there); use bf16 on a CPU with AVX-512 BF16 or AMX, or fp32"
        | Precision.BFloat16, DeviceType.CPU when not (cpuHasBf16 ()) ->
            Some "precision bf16 needs a CPU with native bfloat16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo); this one has neither, so bf16 would be slower than fp32: use fp32"
        | (Precision.BFloat16 | Precision.Float16), DeviceType.CUDA -> None
        | p, t when t <> DeviceType.CPU -> Some $"precision {p.Name} is only supported on the CPU and CUDA, not on {device}"
        | _ -> None

    /// Fails with a one-line NotSupportedException unless `precision` can run on `device`.
    let ensureSupported (device: torch.Device) (precision: Precision) : unit =
        match unsupportedReason device precision with
        | Some why -> raise (NotSupportedException why)
        | None -> ()

    /// Runs `f` (an inference pass on `device`) in `precision`: plainly for Float32, else inside a LibTorch
    /// autocast region for the device (after `ensureSupported`). Enter and leave on the thread that runs the ops.
    /// The region changes only the dtype of the products: a `VctModel.Forward` inside returns float32 tensors
    /// (the model casts its outputs back).
    let run (precision: Precision) (device: torch.Device) (f: unit -> 'T) : 'T =
        match precision with
        | Precision.Float32 -> f ()
        | p ->
            ensureSupported device p
            use _ = Autocast.enter device.``type`` p.ScalarType
            f ()

/// The same for C# callers (System.Func instead of F# functions).
type Precision with
    /// Parses a precision name: "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16".
    static member FromName(text: string) : Precision = Precision.Parse text

    /// Throws NotSupportedException (one line) unless `precision` can run on `device`.
    static member EnsureSupported(device: torch.Device, precision: Precision) : unit = Precision.ensureSupported device precision

    /// Runs `f` (an inference pass on `device`) in `precision`; see `Precision.run`.
    static member Run<'T>(precision: Precision, device: torch.Device, f: Func<'T>) : 'T = Precision.run precision device (fun () -> f.Invoke())
