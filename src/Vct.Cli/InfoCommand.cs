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
            CommonOptions.Apply(parse.GetValue(threads));
            var resolved = VctRuntime.ResolveDevice(parse.GetValue(device)!);
            var info = VctRuntime.Info();
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
                    threads = info.Threads,
                    platform = info.Platform,
                    compat_fix_applied = info.CompatFixApplied,
                    compat_fix_reason = info.CompatFixReason,
                    patched_library = info.PatchedLibrary,
                    native_directory = info.NativeDirectory,
                    libstdcxx = info.LibStdCxx,
                    native_heap = info.NativeHeap,
                    native_heap_main_thread_from_heap = info.NativeHeapFromHeapOnCallingThread,
                    native_heap_pool_threads_from_heap = info.NativeHeapFromHeapOnPoolThreads,
                }, new JsonSerializerOptions { WriteIndented = true }));
                return 0;
            }
            Console.WriteLine($"Vct          {info.VctVersion}");
            Console.WriteLine($"TorchSharp   {info.TorchSharpVersion} (LibTorch {info.LibTorchVersion})");
            Console.WriteLine($".NET         {info.DotNetVersion}");
            Console.WriteLine($"Platform     {info.Platform}");
            Console.WriteLine($"Device       {resolved} (CUDA available: {(info.CudaAvailable ? "yes" : "no")})");
            Console.WriteLine($"Threads      {info.Threads}");
            Console.WriteLine($"Compat fix   {(info.CompatFixApplied ? "applied" : "not applied")}: {info.CompatFixReason}");
            if (info.PatchedLibrary.Length > 0) Console.WriteLine($"  patched    {info.PatchedLibrary}");
            if (info.NativeDirectory.Length > 0) Console.WriteLine($"  LibTorch   {info.NativeDirectory}");
            if (info.LibStdCxx.Length > 0) Console.WriteLine($"  libstdc++  {info.LibStdCxx}");
            Console.WriteLine($"Native heap  {info.NativeHeap}");
            if (info.NativeHeapFromHeapOnCallingThread is bool main)
                Console.WriteLine($"  main thread: large blocks {(main ? "from the heap" : "mmap'd")}");
            if (info.NativeHeapFromHeapOnPoolThreads is bool pool)
                Console.WriteLine($"  pool threads: large blocks {(pool ? "from the heap" : "mmap'd (start with MALLOC_ARENA_MAX=1 to share the heap)")}");
            return 0;
        });
        return cmd;
    }
}
