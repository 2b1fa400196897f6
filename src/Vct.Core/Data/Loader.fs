namespace Vct.Core.Data

open System
open System.Collections.Concurrent
open System.Collections.Generic
open System.Threading
open System.Threading.Tasks

/// Options of `BatchLoader`.
type LoaderOptions =
    { /// Videos per batch (IMS_PER_BATCH counts videos).
      BatchSize: int
      /// Shuffle the videos each epoch (with Seed + epoch).
      Shuffle: bool
      Seed: int
      /// Videos decoded and augmented at once.
      Workers: int
      /// Finished batches kept ready ahead of the consumer (bounds memory).
      Prefetch: int
      /// Drop a last incomplete batch.
      DropLast: bool }
    static member Default = { BatchSize = 2; Shuffle = true; Seed = 0; Workers = Environment.ProcessorCount; Prefetch = 2; DropLast = true }

/// Decodes and transforms videos in parallel on background threads, keeping at most `Prefetch` batches ready,
/// so the training step does not wait on data. `transform` receives the record and a `Random` seeded from
/// (Seed, epoch, position), so an epoch's batches are the same whatever the thread timing.
type BatchLoader<'T>(records: VideoRecord[], opts: LoaderOptions, transform: VideoRecord -> Random -> 'T) =
    do if opts.BatchSize < 1 then invalidArg (nameof opts) $"BatchSize must be >= 1, got {opts.BatchSize}"

    /// The video order of an epoch.
    member _.Order(epoch: int) : int[] =
        let idx = Array.init records.Length id
        if opts.Shuffle then
            let rng = Random(DeterministicSeed.mix [ opts.Seed; epoch; 0x5eed ])
            for i in idx.Length - 1 .. -1 .. 1 do
                let j = rng.Next(i + 1)
                let t = idx[i]
                idx[i] <- idx[j]
                idx[j] <- t
        idx

    /// Batches of one epoch, produced ahead by background workers; dispose the enumerator to stop them.
    member this.Epoch(epoch: int, ?cancel: CancellationToken) : IEnumerable<'T[]> =
        let token = defaultArg cancel CancellationToken.None
        let order = this.Order epoch
        let nBatches = if opts.DropLast then order.Length / opts.BatchSize else (order.Length + opts.BatchSize - 1) / opts.BatchSize
        if opts.Workers <= 0 then
            // Synchronous mode: each batch is made on the caller's thread when it is asked for (same seeds, same
            // batches). Used by the trainer: see Trainer's NOTE on TorchSharp's finaliser race.
            seq {
                for b in 0 .. nBatches - 1 do
                    token.ThrowIfCancellationRequested()
                    let items = order[b * opts.BatchSize .. min order.Length ((b + 1) * opts.BatchSize) - 1]
                    yield items |> Array.mapi (fun i item ->
                        let pos = b * opts.BatchSize + i
                        transform records[item] (Random(DeterministicSeed.mix [ opts.Seed; epoch; pos ])))
            }
        else
        seq {
            use cts = CancellationTokenSource.CreateLinkedTokenSource token
            use queue = new BlockingCollection<Choice<'T[], exn>>(max 1 opts.Prefetch)
            let producer =
                Task.Run(fun () ->
                    try
                        try
                            for b in 0 .. nBatches - 1 do
                                let items = order[b * opts.BatchSize .. min order.Length ((b + 1) * opts.BatchSize) - 1]
                                let out = Array.zeroCreate<'T> items.Length
                                Parallel.For(0, items.Length, ParallelOptions(MaxDegreeOfParallelism = max 1 opts.Workers, CancellationToken = cts.Token), fun i ->
                                    let pos = b * opts.BatchSize + i
                                    out[i] <- transform records[items[i]] (Random(DeterministicSeed.mix [ opts.Seed; epoch; pos ]))) |> ignore
                                queue.Add(Choice1Of2 out, cts.Token)
                        with
                        | :? OperationCanceledException -> ()
                        | e -> (try queue.Add(Choice2Of2 e) with _ -> ())
                    finally
                        queue.CompleteAdding())
            try
                for item in queue.GetConsumingEnumerable(token) do
                    match item with
                    | Choice1Of2 batch -> yield batch
                    | Choice2Of2 e -> raise (AggregateException("data loading failed", e))
            finally
                cts.Cancel()
                try producer.Wait() with _ -> ()
        }

    /// Batches per epoch.
    member _.BatchesPerEpoch = if opts.DropLast then records.Length / opts.BatchSize else (records.Length + opts.BatchSize - 1) / opts.BatchSize
