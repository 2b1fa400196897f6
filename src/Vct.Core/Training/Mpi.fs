namespace Vct.Core.Training

open System
open System.Runtime.InteropServices
open Vct.Core.Platform

// The handful of MPI calls data-parallel training needs, bound at run time from Open MPI's libmpi.so.40 (the
// handles MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ... are addresses of exported objects in Open MPI's ABI).
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiInitThread = delegate of nativeint * nativeint * int * int[] -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiFlag = delegate of int[] -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiCommInt = delegate of nativeint * int[] -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiAllreduce = delegate of nativeint * nativeint * int * nativeint * nativeint * nativeint -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiBcast = delegate of nativeint * int * nativeint * int * nativeint -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiComm = delegate of nativeint -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiAbort = delegate of nativeint * int -> int
[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>] type internal MpiVoid = delegate of unit -> int

module internal Libc =
    /// Ends the process at once (no finalizers, no atexit): a rank stopping a broken job must not wait for anything.
    [<DllImport("libc", EntryPoint = "_exit")>]
    extern void hardExit(int code)

/// Reduction operations of `Mpi.allreduce`.
type MpiOp =
    | Sum
    | Min
    | Max

/// A minimal binding of Open MPI (4.x, libmpi.so.40): init, rank/size, allreduce, broadcast, barrier, abort,
/// finalize on MPI_COMM_WORLD. Errors are fatal (MPI's default handler aborts the job).
[<RequireQualifiedAccess>]
module Mpi =
    type private Api =
        { Lib: nativeint
          InitThread: MpiInitThread
          Initialized: MpiFlag
          Finalized: MpiFlag
          Rank: MpiCommInt
          Size: MpiCommInt
          Allreduce: MpiAllreduce
          Bcast: MpiBcast
          Barrier: MpiComm
          Abort: MpiAbort
          Finalize: MpiVoid
          World: nativeint
          Float: nativeint
          Double: nativeint
          Int64: nativeint
          Sum: nativeint
          Min: nativeint
          Max: nativeint }

    /// MPI_IN_PLACE in Open MPI's ABI.
    let private inPlace = nativeint 1

    let private names = [ "libmpi.so.40"; "libmpi.so" ]

    let private load () =
        let lib =
            names |> List.tryPick (fun n -> match NativeLibrary.TryLoad n with | true, h -> Some h | _ -> None)
        match lib with
        | None -> raise (DllNotFoundException "MPI is not available: libmpi.so.40 (Open MPI 4) was not found; install Open MPI (Debian/Ubuntu: openmpi-bin) and start the job with mpirun")
        | Some lib ->
            let sym (name: string) =
                match NativeLibrary.TryGetExport(lib, name) with
                | true, p -> p
                | _ -> raise (EntryPointNotFoundException $"libmpi has no '{name}': Vct's MPI binding needs Open MPI 4.x")
            let fn name : 'D = Marshal.GetDelegateForFunctionPointer<'D>(sym name)
            { Lib = lib
              InitThread = fn "MPI_Init_thread"; Initialized = fn "MPI_Initialized"; Finalized = fn "MPI_Finalized"
              Rank = fn "MPI_Comm_rank"; Size = fn "MPI_Comm_size"; Allreduce = fn "MPI_Allreduce"; Bcast = fn "MPI_Bcast"
              Barrier = fn "MPI_Barrier"; Abort = fn "MPI_Abort"; Finalize = fn "MPI_Finalize"
              World = sym "ompi_mpi_comm_world"; Float = sym "ompi_mpi_float"; Double = sym "ompi_mpi_double"
              Int64 = sym "ompi_mpi_long_long_int"
              Sum = sym "ompi_mpi_op_sum"; Min = sym "ompi_mpi_op_min"; Max = sym "ompi_mpi_op_max" }

    let private api = lazy (load ())

    let private check (what: string) (rc: int) =
        if rc <> 0 then failwith $"{what} failed with MPI error code {rc}"

    /// Whether the process was started by an MPI launcher (mpirun sets OMPI_COMM_WORLD_SIZE / PMIX_RANK).
    let launched () =
        not (isNull (Environment.GetEnvironmentVariable "OMPI_COMM_WORLD_SIZE"))
        || not (isNull (Environment.GetEnvironmentVariable "PMIX_RANK"))
        || not (isNull (Environment.GetEnvironmentVariable "PMI_RANK"))

    /// MPI_Init_thread (MPI_THREAD_MULTIPLE requested: the watchdog may abort from its own thread); once per
    /// process. Returns the thread level provided.
    let init () : int =
        let a = api.Force()
        let flag = [| 0 |]
        check "MPI_Initialized" (a.Initialized.Invoke flag)
        if flag[0] <> 0 then 3
        else
            let provided = [| 0 |]
            check "MPI_Init_thread" (a.InitThread.Invoke(0n, 0n, 3, provided))
            provided[0]

    let rank () =
        let r = [| 0 |]
        check "MPI_Comm_rank" ((api.Force()).Rank.Invoke((api.Force()).World, r))
        r[0]

    let size () =
        let r = [| 0 |]
        check "MPI_Comm_size" ((api.Force()).Size.Invoke((api.Force()).World, r))
        r[0]

    /// The rank among the processes of this host (Open MPI's OMPI_COMM_WORLD_LOCAL_RANK; 0 when unset).
    let localRank () =
        match Environment.GetEnvironmentVariable "OMPI_COMM_WORLD_LOCAL_RANK" with
        | null -> 0
        | s -> match Int32.TryParse s with | true, v -> v | _ -> 0

    let private pinned (buffer: Array) (f: nativeint -> 'T) : 'T =
        let h = GCHandle.Alloc(buffer, GCHandleType.Pinned)
        try f (h.AddrOfPinnedObject()) finally h.Free()

    let private opOf (a: Api) op = match op with Sum -> a.Sum | Min -> a.Min | Max -> a.Max

    /// In-place allreduce of `count` floats at `ptr` (host memory, or device memory with a CUDA-aware MPI).
    let allreduceFloatPtr (ptr: nativeint) (count: int) (op: MpiOp) =
        let a = api.Force()
        check "MPI_Allreduce" (a.Allreduce.Invoke(inPlace, ptr, count, a.Float, opOf a op, a.World))

    /// In-place allreduce of `buffer` over all ranks.
    let allreduceFloat (buffer: float32[]) (op: MpiOp) =
        if buffer.Length > 0 then pinned buffer (fun p -> allreduceFloatPtr p buffer.Length op)

    let allreduceDouble (buffer: float[]) (op: MpiOp) =
        let a = api.Force()
        if buffer.Length > 0 then
            pinned buffer (fun p -> check "MPI_Allreduce" (a.Allreduce.Invoke(inPlace, p, buffer.Length, a.Double, opOf a op, a.World)))

    let allreduceInt64 (buffer: int64[]) (op: MpiOp) =
        let a = api.Force()
        if buffer.Length > 0 then
            pinned buffer (fun p -> check "MPI_Allreduce" (a.Allreduce.Invoke(inPlace, p, buffer.Length, a.Int64, opOf a op, a.World)))

    /// Broadcast of `count` floats at `ptr` from `root`.
    let broadcastFloatPtr (ptr: nativeint) (count: int) (root: int) =
        let a = api.Force()
        check "MPI_Bcast" (a.Bcast.Invoke(ptr, count, a.Float, root, a.World))

    let broadcastFloat (buffer: float32[]) (root: int) =
        if buffer.Length > 0 then pinned buffer (fun p -> broadcastFloatPtr p buffer.Length root)

    let barrier () = check "MPI_Barrier" ((api.Force()).Barrier.Invoke((api.Force()).World))

    /// MPI_Abort on MPI_COMM_WORLD: every rank of the job is killed with `code`.
    let abort (code: int) =
        let a = api.Force()
        a.Abort.Invoke(a.World, code) |> ignore

    /// MPI_Finalize unless already finalized.
    let finalize () =
        if api.IsValueCreated then
            let a = api.Value
            let flag = [| 0 |]
            a.Finalized.Invoke flag |> ignore
            if flag[0] = 0 then a.Finalize.Invoke() |> ignore
