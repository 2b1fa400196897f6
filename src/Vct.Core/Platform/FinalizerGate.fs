namespace Vct.Core.Platform

open System
open System.Runtime.CompilerServices
open System.Threading
open System.Threading.Tasks

/// An object whose finalizer parks the finalizer thread until `release` is set.
type private Blocker(entered: ManualResetEventSlim, release: ManualResetEventSlim) =
    override _.Finalize() =
        entered.Set()
        release.Wait()

/// Holds the .NET finalizer thread while LibTorch may be using TorchSharp temporaries.
///
/// NOTE: TorchSharp 0.107 passes only the handles of the temporaries it creates (the Scalar behind every
/// `alpha`, intermediate tensors outside dispose scopes) to native code. A temporary is unreachable once its
/// handle is read, so a GC that another thread triggers during the native call may collect it, and the finalizer
/// thread may then free it while LibTorch still reads it ("Scalar.h: Expected false to be true", seen after a
/// few hundred training steps with background data decoding). While the gate is held, the finalizer thread sits
/// in the finalizer of a `Blocker`: collections still happen, but nothing is finalized, so no handle in use can
/// be freed. `Pulse` lets the pending finalizers run at a moment the holder chooses (between training steps, when
/// it is in no native call) and holds again. Finalization is only delayed, never skipped.
/// Always dispose a held gate (`use`): CoreCLR raises ProcessExit on the finalizer thread, so a process that exits
/// with the gate held waits forever; code that calls `Environment.Exit` while a gate may be held (a Ctrl-C handler)
/// calls `ReleaseForExit` first.
///
/// The gate is process-wide and re-entrant: an inner Hold while one is held returns a handle whose Pulse does
/// nothing (the outermost holder pulses). Only one thread may use TorchSharp while the gate is used to make other
/// threads' allocations safe; those threads (the data loader's workers) must not use TorchSharp themselves.
/// Worker pools whose threads all use TorchSharp (folder mode of `vct audio examples`, `vct data check`) run
/// through `ParallelForEach`, which holds the gate while any worker runs and pulses only between waves.
[<Sealed>]
type FinalizerGate private (outer: bool) =
    static let sync = obj ()
    static let mutable depth = 0
    static let mutable release: ManualResetEventSlim = null
    let mutable disposed = false

    [<MethodImpl(MethodImplOptions.NoInlining)>]
    static member private Drop(entered: ManualResetEventSlim, rel: ManualResetEventSlim) =
        Blocker(entered, rel) |> ignore

    /// Parks the finalizer thread; returns once it sits in the blocker (after finishing what was queued before).
    static member private Park() : ManualResetEventSlim =
        use entered = new ManualResetEventSlim(false)
        let rel = new ManualResetEventSlim(false)
        FinalizerGate.Drop(entered, rel)
        let mutable tries = 0
        while not (entered.Wait 20) do
            // The blocker is unreachable: collect until the finalizer thread picks it up (gen0 first; a full
            // collection in case a collection in between promoted it).
            GC.Collect((if tries < 2 then 0 else GC.MaxGeneration), GCCollectionMode.Forced, true)
            tries <- tries + 1
            if tries > 3000 then
                rel.Set()
                failwith "FinalizerGate: the finalizer thread did not reach the gate within 60 s"
        rel

    /// Releases the finalizer thread whatever the holders, for a process that is about to exit: CoreCLR raises
    /// ProcessExit on the finalizer thread, so `Environment.Exit` with a held gate would wait forever. Holders'
    /// later Pulse/Dispose calls do nothing harmful.
    static member ReleaseForExit() =
        lock sync (fun () ->
            if not (isNull release) then release.Set()
            release <- null
            depth <- 0)

    /// Whether a gate is held now.
    static member IsHeld = lock sync (fun () -> depth > 0)

    /// Holds the gate until Dispose (re-entrant: see the type's notes).
    static member Hold() : FinalizerGate =
        lock sync (fun () ->
            depth <- depth + 1
            if depth = 1 then
                try release <- FinalizerGate.Park()
                with _ ->
                    depth <- 0
                    reraise ()
                new FinalizerGate(true)
            else new FinalizerGate(false))

    /// Runs `body` on every item on up to `degree` threads that use TorchSharp, with the gate held while they run:
    /// in waves of `degree` x 16 items, the gate released between waves so that the temporaries a wave left behind
    /// are finalized (no thread is in a native call then). A failing item fails the call (AggregateException) after
    /// its wave.
    static member ParallelForEach(items: 'T[], degree: int, body: Action<'T>) =
        let degree = max 1 degree
        let wave = degree * 16
        for start in 0 .. wave .. items.Length - 1 do
            use _gate = FinalizerGate.Hold()
            Parallel.For(start, min items.Length (start + wave), ParallelOptions(MaxDegreeOfParallelism = degree), fun i ->
                body.Invoke items[i]) |> ignore

    /// Lets everything finalizable so far be finalized, then holds again; a no-op on an inner handle. Call it only
    /// where the holding thread is in no native call (e.g. between training steps).
    member _.Pulse() =
        if disposed then raise (ObjectDisposedException(nameof FinalizerGate))
        if outer then
            lock sync (fun () ->
                if not (isNull release) then
                    let old = release
                    old.Set()
                    release <- FinalizerGate.Park()
                    old.Dispose())

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                lock sync (fun () ->
                    depth <- max 0 (depth - 1)
                    if depth = 0 && not (isNull release) then
                        release.Set()
                        release <- null)
