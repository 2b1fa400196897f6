namespace Vct.Core.Platform

open System
open System.IO
open System.Runtime.InteropServices
open System.Security.Cryptography

/// What `Runtime.init` found and did. Plain strings so that C# callers and the CLI can print it.
type RuntimeReport =
    { /// OS and architecture, e.g. "Linux X64".
      Platform: string
      /// True when a patched copy of libLibTorchSharp.so was loaded.
      CompatFixApplied: bool
      /// Why the fix was or was not applied.
      CompatFixReason: string
      /// The patched copy that was loaded ("" when none).
      PatchedLibrary: string
      /// The folder LibTorch's natives were loaded from ("" when TorchSharp loaded them itself).
      NativeDirectory: string
      /// The libstdc++ that the process uses ("" where not applicable).
      LibStdCxx: string }

/// Native-library set-up that must run before the first TorchSharp call.
///
/// TorchSharp 0.107's `libLibTorchSharp.so` declares that it needs `GLIBCXX_3.4.32` (GCC 13), for one
/// symbol (`std::ios_base_library_init`) that no relocation uses. On a system whose libstdc++ is older
/// (Debian 12: 3.4.30) the loader refuses the file although nothing from that version is called. The fix
/// loads a private copy in which that version requirement is marked weak (VER_FLG_WEAK): two bytes.
/// Before that, libc10 / libtorch_cpu / libtorch are loaded from the very folder the app would load them
/// from, so that LibTorch is mapped once. TorchSharp then finds the copy by its SONAME.
[<RequireQualifiedAccess>]
module Runtime =
    /// Set to "0" to turn the compatibility fix off (TorchSharp then reports its own load error).
    [<Literal>]
    let DisableVariable = "VCT_COMPAT_FIX"

    /// Overrides the cache folder of patched libraries (default: the local application-data folder).
    [<Literal>]
    let CacheVariable = "VCT_NATIVE_CACHE"

    module private Dl =
        [<DllImport("libdl.so.2")>]
        extern nativeint dlopen(string filename, int flags)

        [<DllImport("libdl.so.2")>]
        extern nativeint dlerror()

        let RTLD_NOW = 0x2
        let RTLD_GLOBAL = 0x100

        let lastError () =
            let p = dlerror ()
            if p = 0n then "unknown dlopen error" else Marshal.PtrToStringUTF8 p

    module private Libc =
        [<DllImport("libc.so.6", EntryPoint = "malloc_trim")>]
        extern int mallocTrim(unativeint pad)

    /// Returns the free pages of the native heap to the OS (glibc `malloc_trim`; a no-op elsewhere). LibTorch's CPU
    /// allocator frees into glibc's heap, which keeps most of it: after a training step's activations are freed,
    /// the process still holds them, and a checkpoint write or an evaluation then adds to that peak.
    let trimNativeHeap () =
        if RuntimeInformation.IsOSPlatform OSPlatform.Linux then
            try Libc.mallocTrim 0un |> ignore with _ -> ()

    let private nativeRid =
        if RuntimeInformation.IsOSPlatform OSPlatform.Windows then "win-x64"
        elif RuntimeInformation.IsOSPlatform OSPlatform.OSX then "osx-arm64"
        else "linux-x64"

    /// Paths of the shared objects mapped into this process whose file name starts with `prefix`.
    let mapped (prefix: string) =
        try
            File.ReadAllLines "/proc/self/maps"
            |> Array.choose (fun line ->
                let i = line.IndexOf '/'
                if i < 0 then None
                else
                    let path = line.Substring i
                    if Path.GetFileName(path).StartsWith(prefix, StringComparison.Ordinal) then Some path else None)
            |> Array.distinct
        with _ -> [||]

    /// Candidate folders for LibTorch's natives, in the order the .NET host and TorchSharp would use.
    let private candidateFolders () =
        let torchSharpDir = Path.GetDirectoryName(typeof<TorchSharp.torch>.Assembly.Location)
        let hostDirs =
            match AppContext.GetData "NATIVE_DLL_SEARCH_DIRECTORIES" with
            | :? string as s -> s.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
            | _ -> []
        let baseDir = AppContext.BaseDirectory
        // NuGet cache layout, used by F# Interactive and notebooks: .../torchsharp/<v>/lib/<tfm>/TorchSharp.dll
        let packagesDir = Path.GetFullPath(Path.Combine(torchSharpDir, "..", "..", "..", ".."))
        let fromCache =
            [ for pkg in [ $"libtorch-cpu-{nativeRid}"; "libtorch-cuda-12.8-linux-x64" ] do
                  let root = Path.Combine(packagesDir, pkg)
                  if Directory.Exists root then
                      for v in Directory.GetDirectories root |> Array.sortDescending do
                          yield Path.Combine(v, "runtimes", nativeRid, "native")
              yield Path.GetFullPath(Path.Combine(torchSharpDir, "..", "..", "runtimes", nativeRid, "native")) ]
        hostDirs
        @ [ baseDir; Path.Combine(baseDir, "runtimes", nativeRid, "native")
            torchSharpDir; Path.Combine(torchSharpDir, "runtimes", nativeRid, "native") ]
        @ fromCache
        |> List.map (fun d -> Path.TrimEndingDirectorySeparator(Path.GetFullPath d))
        |> List.distinct

    let private findIn (folders: string list) (file: string) =
        folders |> List.tryFind (fun d -> File.Exists(Path.Combine(d, file)))

    let private cacheRoot () =
        match Environment.GetEnvironmentVariable CacheVariable with
        | null | "" ->
            let local = Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData, Environment.SpecialFolderOption.Create)
            let local = if String.IsNullOrEmpty local then Path.GetTempPath() else local
            Path.Combine(local, "Vct", "native")
        | dir -> dir

    /// Writes `bytes` to `path` unless an identical file is there. Atomic: write a unique temporary file
    /// in the same folder, then rename it over the target, so concurrent processes never see a torn file.
    let private writeAtomically (path: string) (bytes: byte[]) =
        let dir = Path.GetDirectoryName path
        Directory.CreateDirectory dir |> ignore
        let same = File.Exists path && (try File.ReadAllBytes path = bytes with _ -> false)
        if not same then
            let tmp = Path.Combine(dir, $".{Path.GetFileName path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp")
            try
                File.WriteAllBytes(tmp, bytes)
                File.Move(tmp, path, true)
            finally
                if File.Exists tmp then File.Delete tmp

    /// The versions of libstdc++ that `lib` needs and `libstdcxx` lacks.
    let missingVersions (libBytes: byte[]) (libstdcxxBytes: byte[]) : VersionNeed list =
        let provided = Elf.versionDefinitions libstdcxxBytes
        Elf.versionNeeds libBytes
        |> List.filter (fun n -> n.File.StartsWith("libstdc++", StringComparison.Ordinal) && not (provided.Contains n.Name))

    /// Returns the patched image of `libBytes` for `missing`, or an error when a symbol of a missing
    /// version is actually used by a relocation (then weakening would only move the failure to run time).
    let patchForMissing (missing: VersionNeed list) (libBytes: byte[]) : Result<byte[], string> =
        let relocated = Elf.relocatedSymbols libBytes
        let used =
            [ for n in missing do
                  for (i, name) in Elf.symbolsOfVersion libBytes n.Index do
                      if relocated.Contains i then yield $"{name}@{n.Name}" ]
        if List.isEmpty used then Ok(Elf.markWeak missing libBytes)
        else Error(sprintf "the missing versions are really used by: %s" (String.Join(", ", used)))

    let private hint =
        "Fix: install a libstdc++ from GCC 13 or newer (GLIBCXX_3.4.32), or run on a newer distribution. "
        + $"Set {DisableVariable}=0 to skip this fix and see TorchSharp's own error. See README, 'TorchSharp on Linux'."

    let private fail (msg: string) = raise (InvalidOperationException($"Vct runtime: {msg}. {hint}"))

    let private linuxInit () : RuntimeReport =
        let platform = $"{RuntimeInformation.OSDescription} {RuntimeInformation.ProcessArchitecture}"
        let report reason =
            { Platform = platform; CompatFixApplied = false; CompatFixReason = reason
              PatchedLibrary = ""; NativeDirectory = ""; LibStdCxx = "" }
        if Environment.GetEnvironmentVariable DisableVariable = "0" then
            report $"turned off by {DisableVariable}=0"
        else
        // Bind dlerror now: P/Invoke's lazy binding would otherwise clear the text of the first error.
        Dl.dlerror () |> ignore
        if Dl.dlopen ("libstdc++.so.6", Dl.RTLD_NOW) = 0n then fail $"cannot load libstdc++.so.6: {Dl.lastError ()}"
        let libstdcxx =
            match mapped "libstdc++.so" with
            | [||] -> fail "libstdc++.so.6 loaded but its path is not in /proc/self/maps"
            | paths -> paths[0]
        let folders = candidateFolders ()
        // If LibTorch is already mapped (TorchSharp was used first), keep that folder: loading
        // libtorch_cpu.so from a second folder aborts the process ("multiple backend fallbacks").
        let nativeDir =
            match mapped "libtorch_cpu.so" with
            | [||] -> findIn folders "libtorch_cpu.so"
            | paths -> Some(Path.GetDirectoryName paths[0])
        let sharpDir =
            match findIn (Option.toList nativeDir @ folders) "libLibTorchSharp.so" with
            | Some d -> d
            | None -> fail $"libLibTorchSharp.so not found (looked in: {String.Join(Path.PathSeparator, folders)})"
        let sharpPath = Path.Combine(sharpDir, "libLibTorchSharp.so")
        let libBytes = File.ReadAllBytes sharpPath
        let missing =
            try missingVersions libBytes (File.ReadAllBytes libstdcxx)
            with :? ArgumentException as e -> fail $"cannot read {sharpPath} or {libstdcxx}: {e.Message}"
        let withPaths r = { r with LibStdCxx = libstdcxx; NativeDirectory = defaultArg nativeDir "" }
        if List.isEmpty missing then
            withPaths (report $"not needed: {libstdcxx} provides every version libLibTorchSharp.so needs")
        elif (mapped "libLibTorchSharp.so").Length > 0 then
            withPaths (report "not applied: libLibTorchSharp.so was already loaded before Runtime.init")
        else
        let names = missing |> List.map (fun n -> n.Name) |> String.concat ", "
        let dir =
            match nativeDir with
            | Some d -> d
            | None -> fail $"libtorch_cpu.so not found (looked in: {String.Join(Path.PathSeparator, folders)})"
        match patchForMissing missing libBytes with
        | Error why -> fail $"{libstdcxx} lacks {names}, and the fix cannot help: {why}"
        | Ok patched ->
            for lib in [ "libc10.so"; "libtorch_cpu.so"; "libtorch.so" ] do
                let p = Path.Combine(dir, lib)
                if File.Exists p && Dl.dlopen (p, Dl.RTLD_NOW ||| Dl.RTLD_GLOBAL) = 0n then
                    fail $"cannot load {p}: {Dl.lastError ()}"
            let hash = Convert.ToHexString(SHA256.HashData libBytes).Substring(0, 16).ToLowerInvariant()
            let target = Path.Combine(cacheRoot (), hash, "libLibTorchSharp.so")
            try writeAtomically target patched
            with e -> fail $"cannot write the patched copy {target}: {e.Message}"
            if Dl.dlopen (target, Dl.RTLD_NOW ||| Dl.RTLD_GLOBAL) = 0n then
                fail $"the patched copy {target} does not load: {Dl.lastError ()}"
            { Platform = platform
              CompatFixApplied = true
              CompatFixReason = $"{libstdcxx} lacks {names}, which libLibTorchSharp.so requires but never binds a symbol from"
              PatchedLibrary = target
              NativeDirectory = dir
              LibStdCxx = libstdcxx }

    let private state =
        lazy
            (NativeHeap.configure () |> ignore
             let report =
                if RuntimeInformation.IsOSPlatform OSPlatform.Linux then linuxInit ()
                else
                    { Platform = $"{RuntimeInformation.OSDescription} {RuntimeInformation.ProcessArchitecture}"
                      CompatFixApplied = false
                      CompatFixReason = "not needed on this operating system"
                      PatchedLibrary = ""; NativeDirectory = ""; LibStdCxx = "" }
             try
                 TorchSharp.torch.InitializeDeviceType TorchSharp.DeviceType.CPU
             with e ->
                 fail $"TorchSharp failed to load its native library ({report.CompatFixReason}): {e.Message}"
             report)

    /// Prepares the native libraries and the native heap (`NativeHeap.configure`); idempotent and thread-safe.
    /// Every public entry point calls it.
    let init () : RuntimeReport = state.Force()
