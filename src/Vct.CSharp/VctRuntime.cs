namespace Vct;

/// <summary>Runtime set-up and environment information for C# callers.</summary>
public static class VctRuntime
{
    /// <summary>
    /// Prepares TorchSharp's native libraries (idempotent). Every facade entry point calls it; call it
    /// yourself before using TorchSharp directly.
    /// </summary>
    public static Vct.Core.RuntimeReport Initialize() => Vct.Core.Runtime.init();

    /// <summary>Versions, default device, thread count and what <see cref="Initialize"/> did.</summary>
    public static Vct.Core.SystemInfo Info() => Vct.Core.Api.systemInfo();

    /// <summary>Resolves "auto", "cpu", "cuda" or "cuda:N" to a TorchSharp device.</summary>
    public static TorchSharp.torch.Device ResolveDevice(string device) => Vct.Core.Device.parse(device);

    /// <summary>Sets the number of intra-op threads LibTorch uses.</summary>
    public static void SetThreads(int threads) => Vct.Core.Device.setThreads(threads);

    /// <summary>Seeds LibTorch (CPU and CUDA); returns a <see cref="System.Random"/> seeded alike.</summary>
    public static System.Random Seed(long seed) => Vct.Core.Device.seed(seed);
}
