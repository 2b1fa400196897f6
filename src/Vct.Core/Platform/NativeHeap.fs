namespace Vct.Core.Platform

open System
open System.Runtime.InteropServices
open System.Threading.Tasks

/// How the native heap serves LibTorch's large CPU tensors, as `NativeHeap.probe` measured it.
type NativeHeapReport =
    { /// "tuned" (Vct's settings are in force), "system" (turned off by VCT_NATIVE_HEAP=system) or
      /// "not applicable" (not glibc).
      Mode: string
      /// Whether a 96 MB block allocated on the calling thread came from the heap (true) or from fresh
      /// mmap'd pages (false); None where it could not be measured.
      CallingThreadFromHeap: bool option
      /// The same for a block allocated on a thread-pool thread (these threads share the tuned heap only when
      /// the process started with MALLOC_ARENA_MAX=1, as build.fsx and .ci/run start it).
      PoolThreadFromHeap: bool option
      /// The settings, in words.
      Summary: string }

/// Native heap settings for LibTorch's CPU tensors (glibc on Linux).
///
/// LibTorch's CPU allocator takes its tensors from glibc malloc, which serves every block above its mmap
/// threshold (at most 32 MB) with fresh mmap'd pages and unmaps them again on free. The large temporaries of one
/// forward (Swin-B stage 0's MLP hidden map for five frames is 94 MB, the deformable encoder's FFN hidden 62 MB)
/// are then page-faulted and zeroed by the kernel on every pass: an element-wise pass over such a block costs
/// 5-7x what it costs over memory that is already mapped. `configure` keeps those blocks in the heap
/// (M_MMAP_MAX = 0), never gives the heap's top back on its own (M_TRIM_THRESHOLD = max; `Runtime.trimNativeHeap`
/// still does when asked) and grows it 64 MB at a time. The price is resident memory: after the first forward the
/// process keeps its peak working set (about 4 GB for a 5-frame S4 forward at 384 instead of 1.4 GB between calls).
///
/// mallopt changes glibc's main heap for the whole process, but threads other than the main one allocate from
/// their own arenas, which cannot hold blocks above 64 MB and mmap those whatever M_MMAP_MAX says; glibc reads the
/// arena limit only once, before `configure` can run. Starting the process with MALLOC_ARENA_MAX=1 makes every
/// thread use the main heap (build.fsx exports it for what it starts). Set VCT_NATIVE_HEAP=system to keep glibc's
/// defaults.
[<RequireQualifiedAccess>]
module NativeHeap =
    /// Set to "system" to keep glibc's default heap behaviour.
    [<Literal>]
    let ModeVariable = "VCT_NATIVE_HEAP"

    /// The process environment that makes every thread use the tuned main heap (glibc reads it at start-up).
    let launchEnvironment = [ "MALLOC_ARENA_MAX", "1" ]

    /// The same settings as glibc environment variables, for a process that does not run Vct (the benchmark gives
    /// them to the official code for its comparison row).
    let equivalentEnvironment =
        launchEnvironment
        @ [ "MALLOC_MMAP_MAX_", "0"; "MALLOC_TRIM_THRESHOLD_", string Int32.MaxValue; "MALLOC_TOP_PAD_", string (64 * 1024 * 1024) ]

    module private Libc =
        [<DllImport("libc.so.6")>]
        extern int mallopt(int param, int value)

        [<DllImport("libc.so.6")>]
        extern nativeint gnu_get_libc_version()

        [<DllImport("libc.so.6")>]
        extern int posix_memalign(nativeint& ptr, unativeint alignment, unativeint size)

        [<DllImport("libc.so.6")>]
        extern void free(nativeint ptr)

        [<DllImport("libc.so.6")>]
        extern int malloc_trim(unativeint pad)

        /// glibc >= 2.33: ten size_t fields; hblkhd (bytes in mmap'd blocks) is the fifth.
        [<Struct; StructLayout(LayoutKind.Sequential)>]
        type MallInfo2 =
            val arena: unativeint
            val ordblks: unativeint
            val smblks: unativeint
            val hblks: unativeint
            val hblkhd: unativeint
            val usmblks: unativeint
            val fsmblks: unativeint
            val uordblks: unativeint
            val fordblks: unativeint
            val keepcost: unativeint

        [<DllImport("libc.so.6")>]
        extern MallInfo2 mallinfo2()

    let private M_TRIM_THRESHOLD = -1
    let private M_TOP_PAD = -2
    let private M_MMAP_MAX = -4

    let private isGlibc = lazy (RuntimeInformation.IsOSPlatform OSPlatform.Linux && (try Libc.gnu_get_libc_version () <> 0n with _ -> false))

    /// True unless VCT_NATIVE_HEAP=system.
    let wanted () =
        not (String.Equals(Environment.GetEnvironmentVariable ModeVariable, "system", StringComparison.OrdinalIgnoreCase))

    let private applied =
        lazy
            (isGlibc.Value && wanted ()
             && Libc.mallopt (M_MMAP_MAX, 0) = 1
             && Libc.mallopt (M_TRIM_THRESHOLD, Int32.MaxValue) = 1
             && Libc.mallopt (M_TOP_PAD, 64 * 1024 * 1024) = 1)

    /// Applies the settings once (idempotent; `Runtime.init` calls it). Returns whether they are in force.
    let configure () = applied.Force()

    /// Whether a block of `bytes` allocated on this thread is served from the heap rather than a new mapping.
    let private fromHeap (bytes: int64) =
        try
            let before = Libc.mallinfo2().hblkhd
            let mutable p = 0n
            if Libc.posix_memalign (&p, 64un, unativeint bytes) <> 0 then None
            else
                let after = Libc.mallinfo2().hblkhd
                Libc.free p
                Some(after = before)
        with _ -> None

    /// Measures where a 96 MB block (the size of LibTorch's largest temporaries) comes from, on this thread and on
    /// a thread-pool thread.
    let probe () : NativeHeapReport =
        if not isGlibc.Value then
            { Mode = "not applicable"; CallingThreadFromHeap = None; PoolThreadFromHeap = None
              Summary = "not glibc: the platform's allocator defaults" }
        else
            let size = 96L * 1024L * 1024L
            let here = fromHeap size
            let pool = Task.Run(fun () -> fromHeap size).Result
            Libc.malloc_trim 0un |> ignore // the probe's blocks stay mapped otherwise (no automatic trim)
            let arenas =
                match Environment.GetEnvironmentVariable "MALLOC_ARENA_MAX" with
                | null | "" -> "per-thread arenas"
                | v -> $"MALLOC_ARENA_MAX={v}"
            if configure () then
                { Mode = "tuned"; CallingThreadFromHeap = here; PoolThreadFromHeap = pool
                  Summary = $"tuned: large blocks from the heap (mmap off, no automatic trim, 64 MB top pad), {arenas}" }
            else
                { Mode = "system"; CallingThreadFromHeap = here; PoolThreadFromHeap = pool
                  Summary = $"glibc defaults ({ModeVariable}=system), {arenas}" }
