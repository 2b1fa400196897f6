namespace Vct.Core.Training

#nowarn "9" // the host address of a CPU tensor's data, for MPI

open System
open System.Collections.Generic
open System.Diagnostics
open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open System.Threading
open TorchSharp
open type TorchSharp.torch.nn
open Microsoft.FSharp.NativeInterop
open Vct.Core
open Vct.Core.Platform

/// The process group of data-parallel training: the ranks of one job and the collectives the trainer needs.
/// Every rank calls the same collectives in the same order.
type ICommunicator =
    inherit IDisposable
    abstract Rank: int
    abstract Size: int
    /// The rank among this host's processes (picks the CUDA device).
    abstract LocalRank: int
    /// In-place allreduce of host float32 memory (`count` values at `ptr`).
    abstract AllReduceFloat: ptr: nativeint * count: int * op: MpiOp -> unit
    abstract AllReduceDouble: buffer: float[] * op: MpiOp -> unit
    abstract AllReduceInt64: buffer: int64[] * op: MpiOp -> unit
    /// Broadcast of host float32 memory from rank 0.
    abstract BroadcastFloat: ptr: nativeint * count: int -> unit
    abstract Barrier: unit -> unit
    /// Prints `message` (one line, with the rank) and stops every rank of the job with exit code 1.
    abstract Abort: message: string -> unit

/// One process: every collective is the identity.
type LocalCommunicator() =
    interface ICommunicator with
        member _.Rank = 0
        member _.Size = 1
        member _.LocalRank = 0
        member _.AllReduceFloat(_, _, _) = ()
        member _.AllReduceDouble(_, _) = ()
        member _.AllReduceInt64(_, _) = ()
        member _.BroadcastFloat(_, _) = ()
        member _.Barrier() = ()
        member _.Abort(message) = failwith message
        member _.Dispose() = ()

/// MPI_COMM_WORLD through `Mpi`. A watchdog thread aborts the whole job when one collective waits longer than
/// `timeoutSeconds` (a rank that hangs without dying); a rank that dies or exits non-zero is handled by mpirun,
/// which then kills the others.
type MpiCommunicator(timeoutSeconds: float) =
    let _level = Mpi.init ()
    let mutable limit = timeoutSeconds
    let rank = Mpi.rank ()
    let size = Mpi.size ()
    let localRank = Mpi.localRank ()
    // Stopwatch ticks when the current collective started; 0 when none is in progress.
    let mutable started = 0L
    let mutable current = ""
    let mutable disposed = false
    let abortJob (message: string) =
        eprintfn "vct: rank %d of %d: %s" rank size message
        Console.Error.Flush()
        // MPI_Abort can block when mpirun is already tearing the job down: give it a few seconds, then leave.
        let t = Thread((fun () -> Mpi.abort 1), IsBackground = true)
        t.Start()
        t.Join 5000 |> ignore
        Libc.hardExit 1
    // Always running: the limit may be set later (StopSoon).
    let _watchdog =
        let t =
            Thread((fun () ->
                while not disposed do
                    Thread.Sleep 500
                    let s = Volatile.Read(&started)
                    let l = limit
                    if s <> 0L && l > 0.0 && Stopwatch.GetElapsedTime(s).TotalSeconds > l then
                        abortJob $"{current} waited more than {l:F0} s for the other ranks (a rank hangs or died); stopping the job"),
                   IsBackground = true, Name = "vct-mpi-watchdog")
        t.Start()
        t
    let guarded (what: string) (f: unit -> unit) =
        current <- what
        Volatile.Write(&started, Stopwatch.GetTimestamp())
        try f () finally Volatile.Write(&started, 0L)
    member _.Rank = rank
    member _.Size = size
    /// The job is being stopped (SIGTERM from mpirun: Ctrl-C, or another rank died): the live ranks reach the next
    /// collective within a step's imbalance, so one that waits longer than `seconds` now means a dead peer.
    /// Flushes the console and ends the process with `code` without MPI_Finalize (which can wait forever once
    /// mpirun is stopping the job).
    member _.HardExit(code: int) : unit =
        Console.Out.Flush()
        Console.Error.Flush()
        Libc.hardExit code
    member _.StopSoon(seconds: float) =
        limit <- if limit > 0.0 then min limit seconds else seconds
    interface ICommunicator with
        member _.Rank = rank
        member _.Size = size
        member _.LocalRank = localRank
        member _.AllReduceFloat(ptr, count, op) = guarded "allreduce" (fun () -> Mpi.allreduceFloatPtr ptr count op)
        member _.AllReduceDouble(buffer, op) = guarded "allreduce" (fun () -> Mpi.allreduceDouble buffer op)
        member _.AllReduceInt64(buffer, op) = guarded "allreduce" (fun () -> Mpi.allreduceInt64 buffer op)
        member _.BroadcastFloat(ptr, count) = guarded "broadcast" (fun () -> Mpi.broadcastFloatPtr ptr count 0)
        member _.Barrier() = guarded "barrier" Mpi.barrier
        member _.Abort(message) = abortJob message
        member _.Dispose() =
            if not disposed then
                disposed <- true
                Mpi.finalize ()

/// How a training run is spread: over the ranks of `Comm`, each running `Accumulate` micro-batches per step.
type DistributedOptions =
    { Comm: ICommunicator
      /// Micro-batches per optimizer step on each rank (gradient accumulation; 1: none).
      Accumulate: int
      /// Evaluation: M_J/M_F as the mean of per-rank means (the official evaluator under DDP) instead of the mean
      /// over all videos.
      OfficialEvalMean: bool
      /// Bytes of gradient per allreduce call (flattened buckets).
      BucketBytes: int64 }
    member p.Parts = p.Comm.Size * p.Accumulate
    member p.IsRoot = p.Comm.Rank = 0
    /// No splitting at all: the single-process path, unchanged.
    member p.IsSingle = p.Comm.Size = 1 && p.Accumulate = 1
    static member Single =
        { Comm = new LocalCommunicator(); Accumulate = 1; OfficialEvalMean = false; BucketBytes = 25L * 1024L * 1024L }
    /// `distributed`: "none" (one process) or "mpi" (the ranks of the mpirun job; MPI is initialised here).
    /// `collectiveTimeoutSeconds`: the watchdog's limit on one collective (0: none).
    static member Create(distributed: string, accumulate: int, officialEvalMean: bool, collectiveTimeoutSeconds: float) =
        if accumulate < 1 then invalidArg (nameof accumulate) $"accumulate must be >= 1, got {accumulate}"
        let comm : ICommunicator =
            match (if isNull distributed then "none" else distributed.ToLowerInvariant()) with
            | "" | "none" -> new LocalCommunicator()
            | "mpi" ->
                // A missing or foreign libmpi is bad environment: one clear line (InvalidOperationException).
                try new MpiCommunicator(collectiveTimeoutSeconds)
                with :? DllNotFoundException | :? EntryPointNotFoundException as e -> raise (InvalidOperationException(e.Message, e))
            | other -> invalidArg (nameof distributed) $"distributed must be none or mpi, got '{other}'"
        { DistributedOptions.Single with Comm = comm; Accumulate = accumulate; OfficialEvalMean = officialEvalMean }

/// Collectives over tensors: bucketed gradient averaging, parameter broadcast, configuration check.
[<RequireQualifiedAccess>]
module Distributed =
    /// Host address of a contiguous CPU tensor's data.
    let hostPointer (t: torch.Tensor) : nativeint =
        if t.device_type <> DeviceType.CPU || not (t.is_contiguous ()) then invalidArg (nameof t) "a contiguous CPU tensor is needed"
        let span = t.bytes
        NativePtr.toNativeInt (NativePtr.ofVoidPtr<byte> (Unsafe.AsPointer<byte>(&MemoryMarshal.GetReference(span))))

    /// Applies `collective` to `tensors` (float32) in flattened host buckets of at most `bucketBytes`: values are
    /// copied into a contiguous host buffer (host-staged, whatever the tensors' device), reduced in one call per
    /// bucket, and copied back through `back` (bucket slice, tensor).
    let private bucketed (bucketBytes: int64) (tensors: torch.Tensor list) (collective: nativeint -> int -> unit) (back: torch.Tensor -> torch.Tensor -> unit) =
        let maxElems = max 1L (bucketBytes / 4L)
        let rec groups (acc: torch.Tensor list list) (cur: torch.Tensor list) (n: int64) (rest: torch.Tensor list) =
            match rest with
            | [] -> List.rev (if cur.IsEmpty then acc else List.rev cur :: acc)
            | t :: tail ->
                let k = t.numel ()
                if not cur.IsEmpty && n + k > maxElems then groups (List.rev cur :: acc) [ t ] k tail
                else groups acc (t :: cur) (n + k) tail
        for g in groups [] [] 0L tensors do
            use scope = torch.NewDisposeScope()
            let total = g |> List.sumBy (fun t -> t.numel ())
            let bucket = torch.empty([| total |], dtype = torch.float32)
            let mutable off = 0L
            for t in g do
                let n = t.numel ()
                bucket.narrow(0L, off, n).copy_(t.detach().reshape(-1L)) |> ignore
                off <- off + n
            collective (hostPointer bucket) (int total)
            off <- 0L
            for t in g do
                let n = t.numel ()
                back (bucket.narrow(0L, off, n).view(t.shape)) t
                off <- off + n

    /// Sums every parameter's gradient over the ranks and divides it by `divisor` (ranks x micro-batches), in
    /// flattened buckets. A parameter without a gradient on this rank gets zeros when another rank has one.
    let mutable private syncSeconds = 0.0

    /// Wall seconds of the last `averageGradients` (its allreduce calls and the copies around them).
    let lastSyncSeconds () = syncSeconds

    let averageGradients (p: DistributedOptions) (parameters: TorchSharp.Modules.Parameter list) (divisor: float) =
        let t0 = Stopwatch.GetTimestamp()
        let ps = parameters |> List.filter (fun q -> q.requires_grad)
        let comm = p.Comm
        if comm.Size > 1 then
            let has = ps |> List.map (fun q -> if isNull q.grad then 0L else 1L) |> Array.ofList
            comm.AllReduceInt64(has, MpiOp.Max)
            ps |> List.iteri (fun i q ->
                if has[i] > 0L && isNull q.grad then q.grad <- torch.zeros_like(q).DetachFromDisposeScope())
        let withGrad = ps |> List.filter (fun q -> not (isNull q.grad))
        use _ = torch.no_grad ()
        if comm.Size > 1 then
            let scale = 1.0 / divisor
            bucketed p.BucketBytes [ for q in withGrad -> q.grad ]
                (fun ptr n -> comm.AllReduceFloat(ptr, n, MpiOp.Sum))
                (fun slice g -> g.copy_(slice.mul(scale.AsScalar)) |> ignore)
        elif divisor <> 1.0 then
            for q in withGrad do q.grad.div_(divisor.AsScalar) |> ignore
        syncSeconds <- Stopwatch.GetElapsedTime(t0).TotalSeconds

    /// Copies rank 0's float32 parameters and buffers to every rank.
    let broadcastState (p: DistributedOptions) (modules: torch.nn.Module list) =
        if p.Comm.Size > 1 then
            use _ = torch.no_grad ()
            let tensors =
                [ for m in modules do
                    for kv in m.state_dict () do
                        if kv.Value.dtype = torch.float32 then yield kv.Value ]
            bucketed p.BucketBytes tensors (fun ptr n -> p.Comm.BroadcastFloat(ptr, n)) (fun slice t -> t.copy_(slice) |> ignore)

    /// FNV-1a 64 of a text.
    let fingerprint (text: string) : int64 =
        let mutable h = 14695981039346656037UL
        for c in text do
            h <- (h ^^^ uint64 c) * 1099511628211UL
        int64 (h >>> 1)

    /// Fails on every rank, with one line, when the ranks' `description` differ (seed, preset, data, ...).
    let checkSame (p: DistributedOptions) (what: string) (description: string) =
        if p.Comm.Size > 1 then
            let h = fingerprint description
            let lo = [| h |]
            let hi = [| h |]
            p.Comm.AllReduceInt64(lo, MpiOp.Min)
            p.Comm.AllReduceInt64(hi, MpiOp.Max)
            if lo[0] <> hi[0] then
                failwith $"the ranks were started with different {what} (rank {p.Comm.Rank}: {description}); start every rank with the same arguments and data"

    /// A uniform source for one part of a batch whose frames [frameOffset, frameOffset + frames) of `totalFrames`
    /// it supervises, `targetsPerFrame` (every frame of the batch) matched masks each: it draws from `inner` what
    /// the whole batch's criterion would draw (per prediction: one [1, P, 2] per frame, then the mask loss's two
    /// [K, S, 2] draws over all K matched masks) and hands out this part's share, so the points a sample gets
    /// do not depend on the split.
    let slicedUniform (inner: UniformSource) (totalFrames: int) (frameOffset: int) (frames: int) (targetsPerFrame: int64[]) : UniformSource =
        let kTotal = Array.sum targetsPerFrame
        let kBefore = Array.sum targetsPerFrame[0 .. frameOffset - 1]
        let kLocal = Array.sum targetsPerFrame[frameOffset .. frameOffset + frames - 1]
        let mutable call = 0
        fun shape ->
            if call < frames then
                if call = 0 then for _ in 1 .. frameOffset do (inner shape).Dispose()
                let t = inner shape
                if call = frames - 1 then for _ in 1 .. totalFrames - frameOffset - frames do (inner shape).Dispose()
                call <- call + 1
                t
            else
                if shape[0] <> kLocal then
                    invalidOp $"split criterion: {shape[0]} matched masks where the targets give {kLocal}"
                let whole = Array.copy shape
                whole[0] <- kTotal
                use all = inner whole
                call <- call + 1
                if call = frames + 2 then call <- 0
                all.narrow(0L, kBefore, kLocal).clone()
