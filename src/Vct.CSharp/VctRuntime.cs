namespace Vct;

/// <summary>Versions, device and native-library set-up of this process.</summary>
/// <param name="VctVersion">Version of the Vct assemblies.</param>
/// <param name="TorchSharpVersion">TorchSharp's version.</param>
/// <param name="LibTorchVersion">The native LibTorch's version.</param>
/// <param name="DotNetVersion">The .NET runtime's version.</param>
/// <param name="Device">The device "auto" resolves to.</param>
/// <param name="CudaAvailable">Whether LibTorch sees a CUDA device.</param>
/// <param name="Threads">LibTorch intra-op threads.</param>
/// <param name="Platform">OS and architecture, e.g. "Linux X64".</param>
/// <param name="CompatFixApplied">True when a patched copy of libLibTorchSharp.so was loaded.</param>
/// <param name="CompatFixReason">Why the fix was or was not applied.</param>
/// <param name="PatchedLibrary">The patched copy that was loaded ("" when none).</param>
/// <param name="NativeDirectory">The folder LibTorch's natives were loaded from ("" when TorchSharp loaded them itself).</param>
/// <param name="LibStdCxx">The libstdc++ that was preloaded ("" when none).</param>
/// <param name="NativeHeap">The native heap settings for LibTorch's CPU tensors, in words: "tuned: ..." (large blocks
/// stay in glibc's heap: faster, more resident memory), "glibc defaults (VCT_NATIVE_HEAP=system) ..." or "not glibc ...".
/// Threads other than the one that first initialised Vct share the tuned heap only when the process started with
/// MALLOC_ARENA_MAX=1 (see <see cref="NativeHeapFromHeapOnPoolThreads"/>).</param>
/// <param name="NativeHeapFromHeapOnCallingThread">Whether a 96 MB block allocated on the thread that asked came from
/// the heap (null where it could not be measured).</param>
/// <param name="NativeHeapFromHeapOnPoolThreads">Whether a 96 MB block allocated on a thread-pool thread came from the
/// heap (null where it could not be measured).</param>
public sealed record RuntimeInfo(string VctVersion, string TorchSharpVersion, string LibTorchVersion, string DotNetVersion,
    string Device, bool CudaAvailable, int Threads, string Platform, bool CompatFixApplied, string CompatFixReason,
    string PatchedLibrary, string NativeDirectory, string LibStdCxx, string NativeHeap, bool? NativeHeapFromHeapOnCallingThread, bool? NativeHeapFromHeapOnPoolThreads);

/// <summary>Runtime set-up and environment information for C# callers.</summary>
public static class VctRuntime
{
    /// <summary>
    /// Prepares TorchSharp's native libraries (idempotent). Every facade entry point calls it; call it
    /// yourself before using TorchSharp directly.
    /// </summary>
    public static void Initialize() => Vct.Core.Platform.Runtime.init();

    /// <summary>Versions, default device, thread count and what <see cref="Initialize"/> did.</summary>
    public static RuntimeInfo Info()
    {
        var i = Vct.Core.Api.systemInfo();
        var r = i.Runtime;
        return new RuntimeInfo(i.VctVersion, i.TorchSharpVersion, i.LibTorchVersion, i.DotNetVersion, i.Device, i.CudaAvailable, i.Threads,
            r.Platform, r.CompatFixApplied, r.CompatFixReason, r.PatchedLibrary, r.NativeDirectory, r.LibStdCxx,
            i.NativeHeap.Summary, Microsoft.FSharp.Core.OptionModule.ToNullable(i.NativeHeap.CallingThreadFromHeap),
            Microsoft.FSharp.Core.OptionModule.ToNullable(i.NativeHeap.PoolThreadFromHeap));
    }

    /// <summary>Resolves "auto", "cpu", "cuda" or "cuda:N" to a TorchSharp device.</summary>
    public static TorchSharp.torch.Device ResolveDevice(string device) => Vct.Core.Platform.Device.parse(device);

    /// <summary>Sets the number of intra-op threads LibTorch uses.</summary>
    public static void SetThreads(int threads) => Vct.Core.Platform.Device.setThreads(threads);

    /// <summary>
    /// Call just before ending the process from a signal or error handler (<see cref="Environment.Exit"/>): releases
    /// the finalizer gate that running inference and training hold, so that exiting does not wait for them.
    /// </summary>
    public static void PrepareForExit() => Vct.Core.Platform.FinalizerGate.ReleaseForExit();

    /// <summary>Seeds LibTorch (CPU and CUDA); returns a <see cref="System.Random"/> seeded alike.</summary>
    public static System.Random Seed(long seed) => Vct.Core.Platform.Device.seed(seed);
}
