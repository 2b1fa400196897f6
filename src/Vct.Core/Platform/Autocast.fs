namespace Vct.Core.Platform

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp

// Native signatures of LibTorch's autocast switches. Every argument and result is passed as an int: c10's
// DeviceType and ScalarType are int8 enums and C++ bools one byte, which the C calling conventions pass in a
// full register; results are masked to their low byte where the C++ type is one byte.
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal AutocastIntToInt = delegate of int -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal AutocastIntIntToUnit = delegate of int * int -> unit
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal AutocastIntToUnit = delegate of int -> unit
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal AutocastUnitToInt = delegate of unit -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal AutocastUnitToUnit = delegate of unit -> unit

type internal AutocastNative =
    { IsEnabled: AutocastIntToInt
      SetEnabled: AutocastIntIntToUnit
      GetDtype: AutocastIntToInt
      SetDtype: AutocastIntIntToUnit
      IsCacheEnabled: AutocastUnitToInt
      SetCacheEnabled: AutocastIntToUnit
      IncrementNesting: AutocastUnitToInt
      DecrementNesting: AutocastUnitToInt
      ClearCache: AutocastUnitToUnit }

/// LibTorch's autocast (automatic mixed precision), which TorchSharp 0.107 does not expose: inside a region,
/// LibTorch's dispatcher runs the ops of its lower-precision list (convolutions, matmuls, linear, ...) in the
/// region's dtype and those of its float32 list (softmax, log, losses, norms, ...) in float32, for tensors of
/// the region's device type; autograd records the casts, so float32 parameters get float32 gradients.
///
/// NOTE: bound by the Itanium C++ ABI names of `at::autocast::*` in the libtorch_cpu.so this process has mapped
/// (LibTorch 2.x on Linux). Elsewhere, or if a LibTorch lacks one of the functions, `unavailableReason` says why
/// and `enter` throws. The state is per thread: enter and leave a region on the thread that runs the ops.
[<RequireQualifiedAccess>]
module Autocast =
    /// c10::DeviceType of a TorchSharp device type (CPU 0, CUDA 1, ...: the same numbering).
    let private deviceCode (d: DeviceType) = int d

    let private symbols =
        [ "is_autocast_enabled", "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"
          "set_autocast_enabled", "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"
          "get_autocast_dtype", "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"
          "set_autocast_dtype", "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"
          "is_autocast_cache_enabled", "_ZN2at8autocast25is_autocast_cache_enabledEv"
          "set_autocast_cache_enabled", "_ZN2at8autocast26set_autocast_cache_enabledEb"
          "increment_nesting", "_ZN2at8autocast17increment_nestingEv"
          "decrement_nesting", "_ZN2at8autocast17decrement_nestingEv"
          "clear_cache", "_ZN2at8autocast11clear_cacheEv" ]

    let private native : Lazy<Result<AutocastNative, string>> =
        lazy
            (Runtime.init () |> ignore
             if not (RuntimeInformation.IsOSPlatform OSPlatform.Linux) then
                 Error $"autocast is bound by LibTorch's Linux symbol names; not available on {RuntimeInformation.OSDescription}"
             else
                 match Runtime.mapped "libtorch_cpu.so" with
                 | [||] -> Error "libtorch_cpu.so is not mapped into this process"
                 | paths ->
                     let lib = NativeLibrary.Load paths[0]
                     let found = [ for name, sym in symbols -> name, (match NativeLibrary.TryGetExport(lib, sym) with | true, p -> p | _ -> 0n) ]
                     match found |> List.filter (fun (_, p) -> p = 0n) |> List.map fst with
                     | [] ->
                         let ptr name = found |> List.find (fun (n, _) -> n = name) |> snd
                         let inline fn name : 'D = Marshal.GetDelegateForFunctionPointer<'D>(ptr name)
                         Ok { IsEnabled = fn "is_autocast_enabled"
                              SetEnabled = fn "set_autocast_enabled"
                              GetDtype = fn "get_autocast_dtype"
                              SetDtype = fn "set_autocast_dtype"
                              IsCacheEnabled = fn "is_autocast_cache_enabled"
                              SetCacheEnabled = fn "set_autocast_cache_enabled"
                              IncrementNesting = fn "increment_nesting"
                              DecrementNesting = fn "decrement_nesting"
                              ClearCache = fn "clear_cache" }
                     | missing ->
                         let names = String.Join(", ", missing)
                         Error $"{paths[0]} lacks at::autocast::{{{names}}} (a LibTorch other than 2.x?)")

    let private get () =
        match native.Force() with
        | Ok n -> n
        | Error why -> raise (NotSupportedException $"mixed precision: LibTorch's autocast cannot be used: {why}")

    /// Why autocast cannot be used in this process; None when it can.
    let unavailableReason () : string option =
        match native.Force() with
        | Ok _ -> None
        | Error why -> Some why

    /// True inside an autocast region for `deviceType` on this thread.
    let isEnabled (deviceType: DeviceType) : bool = ((get ()).IsEnabled.Invoke(deviceCode deviceType) &&& 0xFF) <> 0

    /// The lower-precision dtype of `deviceType`'s autocast on this thread.
    let dtype (deviceType: DeviceType) : torch.ScalarType =
        LanguagePrimitives.EnumOfValue<sbyte, torch.ScalarType>(sbyte ((get ()).GetDtype.Invoke(deviceCode deviceType) &&& 0xFF))

    /// Enters an autocast region for tensors on `deviceType` computing in `dtype` (Float16 or BFloat16), like
    /// PyTorch's `torch.autocast(device_type, dtype)`; disposing it leaves the region on the same thread:
    /// the previous state comes back and, when the outermost region ends, the cache of cast weights is cleared
    /// (it must not outlive an optimiser step).
    let enter (deviceType: DeviceType) (dtype: torch.ScalarType) : IDisposable =
        if dtype <> torch.ScalarType.Float16 && dtype <> torch.ScalarType.BFloat16 then
            invalidArg (nameof dtype) $"autocast computes in Float16 or BFloat16, not {dtype}"
        let n = get ()
        let dev = deviceCode deviceType
        let thread = Environment.CurrentManagedThreadId
        let prevEnabled = n.IsEnabled.Invoke dev &&& 0xFF
        let prevDtype = n.GetDtype.Invoke dev &&& 0xFF
        let prevCache = n.IsCacheEnabled.Invoke() &&& 0xFF
        n.SetDtype.Invoke(dev, int dtype)
        n.SetEnabled.Invoke(dev, 1)
        n.SetCacheEnabled.Invoke 1
        n.IncrementNesting.Invoke() |> ignore
        let mutable left = false
        { new IDisposable with
            member _.Dispose() =
                if not left then
                    if Environment.CurrentManagedThreadId <> thread then
                        invalidOp "an autocast region must be left on the thread that entered it"
                    left <- true
                    if n.DecrementNesting.Invoke() = 0 then n.ClearCache.Invoke()
                    n.SetEnabled.Invoke(dev, prevEnabled)
                    n.SetDtype.Invoke(dev, prevDtype)
                    n.SetCacheEnabled.Invoke prevCache }

