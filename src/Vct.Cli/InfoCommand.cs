using System.CommandLine;
using System.Text.Json;

namespace Vct.Cli;

/// <summary><c>vct info</c>: versions, device, threads and the runtime compatibility fix.</summary>
internal static class InfoCommand
{
    public static Command Create()
    {
        var json = new Option<bool>("--json") { Description = "Print JSON instead of text" };
        var device = CommonOptions.Device();
        var threads = CommonOptions.Threads();
        var cmd = new Command("info", "Print versions, device, threads and whether the native compatibility fix was applied");
        cmd.Options.Add(json);
        cmd.Options.Add(device);
        cmd.Options.Add(threads);
        cmd.SetAction(parse =>
        {
            var resolved = CommonOptions.Apply(parse.GetValue(device)!, parse.GetValue(threads));
            var info = VctRuntime.Info();
            var rt = info;
            if (parse.GetValue(json))
            {
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    vct = info.VctVersion,
                    torchsharp = info.TorchSharpVersion,
                    libtorch = info.LibTorchVersion,
                    dotnet = info.DotNetVersion,
                    device = resolved.ToString(),
                    cuda_available = info.CudaAvailable,
                    threads = Vct.Core.Platform.Device.threads(),
                    platform = rt.Platform,
                    compat_fix_applied = rt.CompatFixApplied,
                    compat_fix_reason = rt.CompatFixReason,
                    patched_library = rt.PatchedLibrary,
                    native_directory = rt.NativeDirectory,
                    libstdcxx = rt.LibStdCxx,
                }, new JsonSerializerOptions { WriteIndented = true }));
                return 0;
            }
            Console.WriteLine($"Vct          {info.VctVersion}");
            Console.WriteLine($"TorchSharp   {info.TorchSharpVersion} (LibTorch {info.LibTorchVersion})");
            Console.WriteLine($".NET         {info.DotNetVersion}");
            Console.WriteLine($"Platform     {rt.Platform}");
            Console.WriteLine($"Device       {resolved} (CUDA available: {(info.CudaAvailable ? "yes" : "no")})");
            Console.WriteLine($"Threads      {Vct.Core.Platform.Device.threads()}");
            Console.WriteLine($"Compat fix   {(rt.CompatFixApplied ? "applied" : "not applied")}: {rt.CompatFixReason}");
            if (rt.PatchedLibrary.Length > 0) Console.WriteLine($"  patched    {rt.PatchedLibrary}");
            if (rt.NativeDirectory.Length > 0) Console.WriteLine($"  LibTorch   {rt.NativeDirectory}");
            if (rt.LibStdCxx.Length > 0) Console.WriteLine($"  libstdc++  {rt.LibStdCxx}");
            return 0;
        });
        return cmd;
    }
}
