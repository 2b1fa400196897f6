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
type BatchLoader<'T>(records: VideoRecord[], opts: LoaderOptions, transform: VideoRecord -> Random -> 'T, ?positional: int -> VideoRecord -> Random -> 'T) =
    let transformAt = match positional with Some f -> f | None -> fun (_: int) r rng -> transform r rng
    do if opts.BatchSize < 1 then invalidArg (nameof opts) $"BatchSize must be >= 1, got {opts.BatchSize}"

    /// A loader whose transform also receives the video's position in its batch (data-parallel training decodes
    /// only its own part of each batch; the seeds stay those of the whole batch).
    static member Positional(records: VideoRecord[], opts: LoaderOptions, transformAt: int -> VideoRecord -> Random -> 'T) =
        BatchLoader<'T>(records, opts, (fun r rng -> transformAt 0 r rng), transformAt)

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

    /// Batches of `epochs` in order, tagged with their epoch, produced ahead by background workers (Workers > 0)
    /// without a pause between epochs; dispose the enumerator to stop them.
    member private this.Produce(epochs: seq<int>, token: CancellationToken) : IEnumerable<int * 'T[]> =
        let nBatches = if opts.DropLast then records.Length / opts.BatchSize else (records.Length + opts.BatchSize - 1) / opts.BatchSize
        let make (epoch: int) (b: int) (i: int) (item: int) =
            let pos = b * opts.BatchSize + i
            transformAt i records[item] (Random(DeterministicSeed.mix [ opts.Seed; epoch; pos ]))
        let itemsOf (order: int[]) (b: int) = order[b * opts.BatchSize .. min order.Length ((b + 1) * opts.BatchSize) - 1]
        if opts.Workers <= 0 then
            // Synchronous mode: each batch is made on the caller's thread when it is asked for (same seeds, same
            // batches).
            seq {
                for epoch in epochs do
                    let order = this.Order epoch
                    for b in 0 .. nBatches - 1 do
                        token.ThrowIfCancellationRequested()
                        yield epoch, itemsOf order b |> Array.mapi (make epoch b)
            }
        else
        seq {
            use cts = CancellationTokenSource.CreateLinkedTokenSource token
            use queue = new BlockingCollection<Choice<int * 'T[], exn>>(max 1 opts.Prefetch)
            let producer =
                Task.Run(fun () ->
                    try
                        try
                            for epoch in epochs do
                                let order = this.Order epoch
                                for b in 0 .. nBatches - 1 do
                                    let items = itemsOf order b
                                    let out = Array.zeroCreate<'T> items.Length
                                    Parallel.For(0, items.Length, ParallelOptions(MaxDegreeOfParallelism = max 1 opts.Workers, CancellationToken = cts.Token), fun i ->
                                        out[i] <- make epoch b i items[i]) |> ignore
                                    queue.Add(Choice1Of2(epoch, out), cts.Token)
                        with
                        | :? OperationCanceledException when cts.IsCancellationRequested -> ()
                        | e ->
                            // With the cancellation token: a consumer that has stopped (failed, cancelled, disposed)
                            // leaves the queue full and never takes this; its cancel must free the producer.
                            try queue.Add(Choice2Of2 e, cts.Token) with _ -> ()
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

    /// Batches of one epoch, produced ahead by background workers; dispose the enumerator to stop them.
    member this.Epoch(epoch: int, ?cancel: CancellationToken) : IEnumerable<'T[]> =
        this.Produce(Seq.singleton epoch, defaultArg cancel CancellationToken.None) |> Seq.map snd

    /// Batches of epoch `first`, `first + 1`, ... without end, tagged with their epoch: the workers run on into the
    /// next epoch, so its first batch is ready when it is asked for. Dispose the enumerator to stop them.
    member this.Stream(first: int, ?cancel: CancellationToken) : IEnumerable<int * 'T[]> =
        this.Produce(Seq.initInfinite (fun k -> first + k), defaultArg cancel CancellationToken.None)

    /// Batches per epoch.
    member _.BatchesPerEpoch = if opts.DropLast then records.Length / opts.BatchSize else (records.Length + opts.BatchSize - 1) / opts.BatchSize
