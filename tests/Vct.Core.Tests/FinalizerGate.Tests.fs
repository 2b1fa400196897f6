module Vct.Core.Tests.FinalizerGateTests

open System
open System.Runtime.CompilerServices
open System.Threading
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform

/// Counts its own finalization.
type private Probe(counter: int ref) =
    override _.Finalize() = Interlocked.Increment(&counter.contents) |> ignore

[<MethodImpl(MethodImplOptions.NoInlining)>]
let private dropProbes (counter: int ref) (n: int) =
    for _ in 1 .. n do Probe(counter) |> ignore

/// Collects until `counter` reaches `n` or `timeoutMs` passes; returns the count.
let private collectUntil (counter: int ref) (n: int) (timeoutMs: int) =
    let sw = Diagnostics.Stopwatch.StartNew()
    while counter.Value < n && sw.ElapsedMilliseconds < int64 timeoutMs do
        GC.Collect()
        Thread.Sleep 10
    counter.Value

[<Tests>]
let tests =
    testList "FinalizerGate" [
        test "while held nothing is finalized; a pulse and the release let everything through" {
            let counter = ref 0
            use gate = FinalizerGate.Hold()
            Expect.isTrue FinalizerGate.IsHeld "held"
            dropProbes counter 50
            Expect.equal (collectUntil counter 50 300) 0 "no finalizer ran while the gate was held"
            gate.Pulse()
            Expect.equal (collectUntil counter 50 5000) 50 "the pulse let the pending finalizers run"
            dropProbes counter 20
            Expect.equal (collectUntil counter 70 300) 50 "held again after the pulse"
            (gate :> IDisposable).Dispose()
            Expect.isFalse FinalizerGate.IsHeld "released"
            Expect.equal (collectUntil counter 70 5000) 70 "released: the rest ran"
        }

        test "is re-entrant: an inner hold neither blocks nor releases, and its pulse does nothing" {
            let counter = ref 0
            use outer = FinalizerGate.Hold()
            do
                use inner = FinalizerGate.Hold()
                dropProbes counter 10
                inner.Pulse()
                Expect.equal (collectUntil counter 10 300) 0 "the inner pulse is a no-op"
            Expect.isTrue FinalizerGate.IsHeld "still held by the outer handle"
            Expect.equal (collectUntil counter 10 300) 0 "the inner dispose did not release"
            outer.Pulse()
            Expect.equal (collectUntil counter 10 5000) 10 "the outer pulse did"
        }

        test "ReleaseForExit lets the finalizer thread go whatever the holders, and later handle calls are harmless" {
            let counter = ref 0
            let outer = FinalizerGate.Hold()
            let inner = FinalizerGate.Hold()
            dropProbes counter 5
            Expect.equal (collectUntil counter 5 300) 0 "held"
            FinalizerGate.ReleaseForExit()
            Expect.isFalse FinalizerGate.IsHeld "released"
            Expect.equal (collectUntil counter 5 5000) 5 "finalizers ran"
            outer.Pulse()
            (inner :> IDisposable).Dispose()
            (outer :> IDisposable).Dispose()
            Expect.isFalse FinalizerGate.IsHeld "still released"
            use again = FinalizerGate.Hold()
            Expect.isTrue FinalizerGate.IsHeld "held again"
            dropProbes counter 3
            Expect.equal (collectUntil counter 8 300) 5 "a new hold works afterwards"
            again.Pulse()
            Expect.equal (collectUntil counter 8 5000) 8 "and pulses"
        }

        test "LibTorch temporaries stay valid while another thread allocates heavily (soak)" {
            // The situation of training with background decoding: this thread runs ops whose Scalars and tensors
            // TorchSharp leaves to the finalizer, while another thread forces collections; the gate is pulsed
            // between "steps". Without the gate this pattern crashed LibTorch after a few hundred steps.
            use stop = new CancellationTokenSource()
            let churn =
                Tasks.Task.Run(fun () ->
                    let mutable keep = Array.zeroCreate<byte[]> 64
                    let mutable i = 0
                    while not stop.IsCancellationRequested do
                        keep[i % 64] <- Array.zeroCreate<byte> 65536
                        i <- i + 1
                        if i % 4096 = 0 then GC.Collect(0))
            use gate = FinalizerGate.Hold()
            let mutable total = 0.0
            for _ in 1 .. 200 do
                use _ = torch.NewDisposeScope()
                let mutable x = torch.ones(64L, 64L)
                for _ in 1 .. 20 do
                    // add/sub/mul with implicit alpha Scalars and unscoped intermediates, as in any model code
                    x <- (x.add(x, 0.5.ToScalar()).mul(0.5.ToScalar()) - x.mul(0.25.ToScalar())).clamp(0.0.ToScalar(), 10.0.ToScalar())
                total <- total + float (x.sum().item<float32>())
                gate.Pulse()
            stop.Cancel()
            churn.Wait()
            Expect.isTrue (Double.IsFinite total && total > 0.0) $"the ops computed ({total})"
        }
    ]
