using System.CommandLine;

namespace Vct.Cli;

/// <summary>Options every command shares: --device and --threads.</summary>
internal static class CommonOptions
{
    public static Option<string> Device() => new("--device")
    {
        Description = "auto | cpu | cuda | cuda:N (auto = CUDA when available)",
        DefaultValueFactory = _ => "auto",
    };

    public static Option<int?> Threads() => new("--threads")
    {
        Description = "Intra-op threads for LibTorch (default: LibTorch's choice)",
    };

    /// <summary>Initialises the runtime, applies --threads and resolves --device.</summary>
    public static TorchSharp.torch.Device Apply(string device, int? threads)
    {
        if (threads is int t && (t < 1 || t > 1024)) throw new ArgumentException($"--threads must be in 1..1024, got {t}");
        VctRuntime.Initialize();
        if (threads is int n) VctRuntime.SetThreads(n);
        return VctRuntime.ResolveDevice(device);
    }
}
