/// Where the time of the released S4 forward goes (5 frames at 384, pre-SAM on, random weights, 2 threads):
/// stopwatch timing per stage, and per op kind inside one Swin-B pass from micro-runs of the same ops at the same
/// shapes (TorchSharp has no profiler binding). Also the GEMM peak of the machine (float32 and bfloat16) and
/// quick A/B runs of the speed levers of issue #14. Writes the `profile` section of docs/benchmarks.md.
module Vct.Bench.ProfileBench

open System
open System.Diagnostics
open TorchSharp
open type TorchSharp.torch.nn
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Backbone
open Vct.Core.PixelDecoder
open Vct.Core.QueryGen
open Vct.Bench.Harness

/// Median seconds of `f` over `runs` timed runs after one warm-up, each in its own dispose scope.
let timeOf (runs: int) (f: unit -> unit) =
    let once () =
        use _ = torch.NewDisposeScope()
        f ()
    once ()
    median [ for _ in 1 .. runs ->
                 let sw = Stopwatch.StartNew()
                 once ()
                 sw.Elapsed.TotalSeconds ]

/// GFLOP/s of an n x n x n matmul in `dtype` (2 n^3 flops per product).
let gemmGflops (dtype: torch.ScalarType) (n: int64) (runs: int) =
    use _ = torch.NewDisposeScope()
    let a = torch.randn(n, n).to_type(dtype)
    let b = torch.randn(n, n).to_type(dtype)
    let s = timeOf runs (fun () -> a.matmul(b) |> ignore)
    2.0 * float n ** 3.0 / s / 1e9

/// Multiply-accumulates ×2 of one Swin pass at `b` frames of `size` (attention products, linears, patch
/// embedding and merging; norms, softmax and element-wise ops not counted), as fvcore-style FLOP counts do.
let swinFlops (cfg: SwinConfig) (b: int64) (size: int64) =
    let mutable macs = 0.0
    let mutable h = size / cfg.PatchSize
    macs <- macs + float (b * h * h) * float (cfg.InChans * cfg.PatchSize * cfg.PatchSize * cfg.EmbedDim)
    for i in 0 .. cfg.Depths.Length - 1 do
        let c = cfg.StageDim i
        let ws = cfg.WindowSize
        let hp = Windows.roundUp ws h
        let tokens = float (b * hp * hp)
        let n = float (ws * ws)
        let perBlock = tokens * (3.0 * float c * float c + float c * float c + 8.0 * float c * float c) + tokens * n * float c * 2.0
        macs <- macs + float cfg.Depths[i] * perBlock
        if i < cfg.Depths.Length - 1 then
            let h2 = (h + 1L) / 2L
            macs <- macs + float (b * h2 * h2) * float (4L * c * 2L * c)
            h <- h2
    2.0 * macs

/// Per-op-kind micro profile of one Swin-B pass on `b` frames at 384 (same shapes, same op sequence per block,
/// random data), in seconds per pass. `sdpa` selects the fused attention in place of matmul/softmax/matmul.
let swinOps (cfg: SwinConfig) (b: int64) (runs: int) =
    let kinds = Collections.Generic.Dictionary<string, float>()
    let add k s = kinds[k] <- (match kinds.TryGetValue k with | true, v -> v | _ -> 0.0) + s
    let mutable h = 384L / cfg.PatchSize
    for i in 0 .. cfg.Depths.Length - 1 do
        use _ = torch.NewDisposeScope()
        let c = cfg.StageDim i
        let heads = cfg.NumHeads[i]
        let ws = cfg.WindowSize
        let n = ws * ws
        let d = c / heads
        let nW = (h / ws) * (h / ws)
        let bw = b * nW
        let depth = float cfg.Depths[i]
        let shifted = float (cfg.Depths[i] / 2)
        let x = torch.randn(b, h * h, c)
        let ln = LayerNorm([| c |])
        let qkv = Linear(c, 3L * c)
        let proj = Linear(c, c)
        let fc1 = Linear(c, 4L * c)
        let fc2 = Linear(4L * c, c)
        let xs = x.view(b, h, h, c)
        let win = Windows.partition ws xs |> fun t -> t.view(-1L, n, c)
        let qkvOut = qkv.call win
        let q = qkvOut.reshape(bw, n, 3L, heads, d).permute(2L, 0L, 3L, 1L, 4L)[0L]
        let logits = torch.randn(bw, heads, n, n)
        let bias = torch.randn(heads, n, n)
        let mask = torch.randn(nW, n, n)
        let hid = torch.randn(b * h * h, 4L * c)
        let y = torch.randn(bw, heads, n, d)
        add "LayerNorm (norm1, norm2)" (2.0 * depth * timeOf runs (fun () -> ln.call x |> ignore))
        add "GEMM: qkv, proj, fc1, fc2" (depth * timeOf runs (fun () ->
            qkv.call x |> ignore
            proj.call x |> ignore
            fc2.call (fc1.call x) |> ignore))
        add "GEMM: attention q·kᵀ and attn·v" (depth * timeOf runs (fun () ->
            let a = q.matmul(q.transpose(-2L, -1L))
            a.matmul(q) |> ignore))
        add "softmax" (depth * timeOf runs (fun () -> logits.softmax(-1L) |> ignore))
        add "bias and shift-mask adds, q scaling" (depth * timeOf runs (fun () ->
            logits.add_(bias.unsqueeze(0L)) |> ignore
            (q * 0.1.AsScalar) |> ignore)
                                                  + shifted * timeOf runs (fun () ->
            logits.view(b, nW, heads, n, n).add_(mask.unsqueeze(1L).unsqueeze(0L)) |> ignore))
        add "GELU" (depth * timeOf runs (fun () -> functional.gelu hid |> ignore))
        add "copies: window partition/reverse, roll, head transposes" (depth * timeOf runs (fun () ->
            Windows.partition ws xs |> ignore
            Windows.reverse ws h h (win.view(-1L, ws, ws, c)) |> ignore
            y.transpose(1L, 2L).reshape(bw, n, c) |> ignore)
                                                                       + 2.0 * shifted * timeOf runs (fun () ->
            xs.roll([| -ws / 2L; -ws / 2L |], [| 1L; 2L |]) |> ignore))
        add "residual adds" (2.0 * depth * timeOf runs (fun () -> (x + x) |> ignore))
        if i < cfg.Depths.Length - 1 then
            let pm = new PatchMerging(c)
            add "patch merging" (timeOf runs (fun () -> pm.Forward(x, h, h) |> ignore))
            h <- (h + 1L) / 2L
    kinds

/// Per-op-kind micro profile of the released pixel decoder on `b` frames at 384 (same shapes and op sequence per
/// deformable encoder layer and for the FPN, random data), in seconds per pixel-decoder pass. The sampling is timed
/// with both kernels; the share column uses the selected one.
let pixelDecoderOps (b: int64) (runs: int) =
    let kinds = Collections.Generic.Dictionary<string, float>()
    let add k s = kinds[k] <- (match kinds.TryGetValue k with | true, v -> v | _ -> 0.0) + s
    use _ = torch.NewDisposeScope()
    let c, heads, levels, points, ffn, layers = 256L, 8L, 3L, 4L, 1024L, 6.0
    let shapes = [| 12L, 12L; 24L, 24L; 48L, 48L |]
    let s = shapes |> Array.sumBy (fun (h, w) -> h * w)
    let x = torch.randn(b, s, c)
    let attn = new MSDeformAttn({ DModel = c; Levels = levels; Heads = heads; Points = points })
    // random offsets of a trained-looking spread (the reset's are regular)
    let refs = MSDeformAttnEncoder.ReferencePoints(shapes, b, torch.CPU)
    let loc, wts = attn.Locations(x, refs, shapes)
    let loc = (loc + torch.randn_like(loc) * 0.05.ToScalar()).contiguous()
    let value = torch.randn(b, s, heads, c / heads)
    let lin (i: int64) (o: int64) = Linear(i, o)
    let valueProj, outputProj, offsets, weights = lin c c, lin c c, lin c (heads * levels * points * 2L), lin c (heads * levels * points)
    let linear1, linear2 = lin c ffn, lin ffn c
    let ln = LayerNorm([| c |])
    let logits = torch.randn(b, s, heads, levels * points)
    add "GEMM: value/output projections, offsets and weights linears" (layers * timeOf runs (fun () ->
        valueProj.call x |> ignore
        outputProj.call x |> ignore
        offsets.call x |> ignore
        weights.call x |> ignore))
    add "GEMM: feed-forward (linear1, linear2) and ReLU" (layers * timeOf runs (fun () -> linear2.call (functional.relu (linear1.call x)) |> ignore))
    add "sampling locations (reference + offsets / size) and weight softmax" (layers * timeOf runs (fun () ->
        attn.Locations(x, refs, shapes) |> ignore
        logits.softmax(-1L) |> ignore))
    let gather = layers * timeOf runs (fun () -> MsDeformAttnCore.sampleGather value shapes loc wts |> ignore)
    let grid = layers * timeOf runs (fun () -> MsDeformAttnCore.sampleWith false value shapes loc wts |> ignore)
    add "deformable sampling" (match MsDeformAttnCore.kernel with MsDeformAttnCore.Gather -> gather | MsDeformAttnCore.GridSample -> grid)
    add "LayerNorm (norm1, norm2)" (2.0 * layers * timeOf runs (fun () -> ln.call x |> ignore))
    add "adds (query + pos, residuals)" (3.0 * layers * timeOf runs (fun () -> (x + x) |> ignore))
    // FPN and projections: input_proj (1x1 conv + GN) on res3..res5, adapter_1 (1x1 + GN) and layer_1 (3x3 + GN + ReLU)
    // at 1/4, mask_features (1x1) at 1/4, the bilinear upsampling of the 1/8 map
    let gn = GroupNorm(32L, c)
    let conv (i: int64) (o: int64) (k: int64) = Conv2d(i, o, k, padding = k / 2L)
    let proj = [| 1024L, 12L; 512L, 24L; 256L, 48L |] |> Array.map (fun (ci, h) -> conv ci c 1L, torch.randn(b, ci, h, h))
    let res2 = torch.randn(b, 128L, 96L, 96L)
    let adapter, layer1, maskFeatures = conv 128L c 1L, conv c c 3L, conv c c 1L
    let fine = torch.randn(b, c, 96L, 96L)
    let coarse = torch.randn(b, c, 48L, 48L)
    add "convolutions: input projections, adapter, 3x3 output conv, mask features" (timeOf runs (fun () ->
        for cv, t in proj do cv.call t |> ignore
        adapter.call res2 |> ignore
        layer1.call fine |> ignore
        maskFeatures.call fine |> ignore))
    let projected = proj |> Array.map (fun (_, t) -> torch.randn(b, c, t.shape[2], t.shape[3]))
    add "GroupNorm (5 maps) and the upsampling" (timeOf runs (fun () ->
        for t in projected do gn.call t |> ignore
        gn.call fine |> ignore
        gn.call fine |> ignore
        functional.interpolate(coarse, size = [| 96L; 96L |], mode = torch.InterpolationMode.Bilinear, align_corners = false) |> ignore))
    kinds, gather, grid

let run (repeats: int) =
    torch.set_num_threads 2
    let runs = max 1 repeats
    let frames = 5L
    let loadBefore = loadAverage ()
    use _ = torch.inference_mode ()
    printfn "profile: GEMM peak"
    let f32 = gemmGflops torch.float32 2048L runs
    let bf16 = gemmGflops torch.bfloat16 2048L runs
    printfn "  float32 %.0f GFLOP/s, bfloat16 %.0f GFLOP/s" f32 bf16
    printfn "profile: released S4 model (random weights)"
    torch.manual_seed 0L |> ignore
    use m = new VctModel(VctConfig.Released Subset.S4)
    m.eval ()
    let images = VctMath.padTo 32L (VctMath.normalise (torch.rand(frames, 3L, 384L, 384L) * 255.0.AsScalar))
    let pre = VctMath.normalise (torch.rand(frames, 3L, 384L, 384L) * 255.0.AsScalar)
    let logMel = torch.randn(frames, 1L, 96L, 64L)
    let enc = m.VisualEncoder
    let stages = ResizeArray<string * float>()
    let full = timeOf runs (fun () ->
        (m.Forward { Images = torch.rand(frames, 3L, 384L, 384L) * 255.0.AsScalar; PreMasks = Some(torch.rand(frames, 3L, 384L, 384L) * 255.0.AsScalar)
                     Audio = AudioInput.LogMel(logMel, None) } :> IDisposable).Dispose())
    let swin = timeOf runs (fun () -> enc.Backbone.Forward images |> ignore)
    stages.Add("Swin-B (RGB frames)", swin)
    let encAll = timeOf runs (fun () -> enc.Forward(images, Some pre) |> ignore)
    stages.Add("pre-SAM branch (second Swin-B, scale blocks, fusion)", encAll - swin)
    let features = enc.Forward(images, Some pre)
    let pd = m.Head.PixelDecoder
    let pdAll = timeOf runs (fun () -> pd.Forward features |> ignore)
    let srcs = [| 12L; 24L; 48L |] |> Array.map (fun s -> torch.randn(frames, 256L, s, s))
    let pos = srcs |> Array.map (PositionEmbedding.sine 128L)
    let encoder = timeOf runs (fun () -> pd.Transformer.Forward(srcs, pos) |> ignore)
    stages.Add("pixel decoder: deformable encoder (6 layers)", encoder)
    stages.Add("pixel decoder: input projections, FPN, mask features", pdAll - encoder)
    let audioMaps = m.AudioBackboneFeatures(logMel, None)
    let audioT = timeOf runs (fun () -> m.Head.AudioTransformation.Forward (m.AudioBackboneFeatures(logMel, None)) |> ignore)
    stages.Add("audio: VGGish + audio MLP", audioT)
    let pix = pd.Forward features
    let audio = m.Head.AudioTransformation.Forward audioMaps
    let vqb = new VisualQueryBlock(m.Config.Decoder.Query)
    vqb.eval () |> ignore
    let ppqg = timeOf runs (fun () -> vqb.Forward(pix.MaskFeatures) |> ignore)
    let dec = timeOf runs (fun () -> (m.Head.Predictor.Forward(audio, pix.MultiScaleFeatures, pix.MaskFeatures) :> IDisposable).Dispose())
    stages.Add("PPQG (query generation)", ppqg)
    stages.Add("decoder: 9 layers + 10 prediction heads", dec - ppqg)
    let parts = stages |> Seq.sumBy snd
    printfn "profile: Swin op kinds"
    let ops = swinOps m.Config.Swin frames runs
    let opsTotal = ops.Values |> Seq.sum
    printfn "profile: pixel decoder op kinds"
    let pdOps, gatherT, gridT = pixelDecoderOps frames runs
    let pdOpsTotal = pdOps.Values |> Seq.sum
    let swinGflop = swinFlops m.Config.Swin frames 384L / 1e9
    // Lever A/B runs in this process, interleaved (A, B, A, B) so that load changes hit both sides alike.
    printfn "profile: lever A/B"
    let ab (name: string) (a: unit -> unit) (b: unit -> unit) =
        let ta = ResizeArray<float>()
        let tb = ResizeArray<float>()
        for _ in 1 .. 2 do
            ta.Add(timeOf runs a)
            tb.Add(timeOf runs b)
        let sa, sb = List.min (List.ofSeq ta), List.min (List.ofSeq tb)
        printfn "  %s: %.3f s -> %.3f s" name sa sb
        name, sa, sb
    let one = images.narrow(0L, 0L, 1L)
    let withFused on (f: unit -> unit) () =
        Attention.fused <- on
        try f () finally Attention.fused <- true
    let withChunked on (f: unit -> unit) () =
        MsDeformAttnCore.chunked <- on
        try f () finally MsDeformAttnCore.chunked <- true
    let withKernel k (f: unit -> unit) () =
        let saved = MsDeformAttnCore.kernel
        MsDeformAttnCore.kernel <- k
        try f () finally MsDeformAttnCore.kernel <- saved
    let encode () = pd.Transformer.Forward(srcs, pos) |> ignore
    let swin1 () = enc.Backbone.Forward one |> ignore
    let decode () = (m.Head.Predictor.Forward(audio, pix.MultiScaleFeatures, pix.MaskFeatures) :> IDisposable).Dispose()
    let levers =
        [ ab "Swin-B, 1 frame: explicit window attention -> fused SDPA (bias + shift mask as attn_mask)"
              (withFused false swin1) (withFused true swin1)
          ab "transformer decoder, 5 frames: explicit attention -> fused SDPA" (withFused false decode) (withFused true decode)
          ab "deformable encoder, 5 frames: grid_sample, stacked level sums -> chunked per-level sums"
              (withKernel MsDeformAttnCore.GridSample (withChunked false encode)) (withKernel MsDeformAttnCore.GridSample (withChunked true encode))
          ab "deformable encoder, 5 frames: grid_sample (chunked) -> one weighted gather (embedding_bag)"
              (withKernel MsDeformAttnCore.GridSample encode) (withKernel MsDeformAttnCore.Gather encode)
          ab "Swin-B, 1 frame: no_grad -> inference_mode"
              (fun () -> (use _ = torch.inference_mode false in use _ = torch.no_grad () in swin1 ()))
              swin1
          ab "Swin-B, 1 frame: float32 -> bf16 (Precision.run)" swin1 (fun () -> Precision.run Precision.BFloat16 torch.CPU swin1) ]
    let loadAfter = loadAverage ()
    let md =
        String.concat "\n"
            [ "## Profile of the S4 forward, CPU (speed issue #14)"
              ""
              "Measured " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC on " + machine () + "; 2 LibTorch threads; released S4"
              "config, random weights, eval, inference mode, 5 frames at 384 with pre-SAM masks. Stopwatch medians of"
              $"{runs} runs after a warm-up; each stage timed alone on the same model. 1-min load average {loadBefore} at the"
              $"start, {loadAfter} at the end (2 cores: above about 2.3 something else was running and the figures are noisy)."
              ""
              $"GEMM peak (2048³ matmul): float32 {f32:F0} GFLOP/s, bfloat16 {bf16:F0} GFLOP/s."
              ""
              "| stage | s | share of the full forward |"
              "| --- | ---: | ---: |"
              yield! [ for name, s in stages -> $"| {name} | {s:F2} | {100.0 * s / full:F0}%% |" ]
              $"| sum of the stages | {parts:F2} | {100.0 * parts / full:F0}%% |"
              $"| full forward (incl. normalisation, padding) | {full:F2} | 100%% |"
              ""
              $"One Swin-B pass on 5 frames: {swinGflop:F0} GFLOP (2 × MACs of the products), {swin:F2} s = {swinGflop / swin:F0} GFLOP/s"
              $"({100.0 * swinGflop / swin / f32:F0}%% of the float32 GEMM peak). Its op kinds, from micro-runs of the same ops at"
              "the same shapes (so they need not add up to the pass exactly):"
              ""
              "| op kind | s per Swin-B pass | share |"
              "| --- | ---: | ---: |"
              yield! [ for kv in ops |> Seq.sortByDescending (fun kv -> kv.Value) -> $"| {kv.Key} | {kv.Value:F3} | {100.0 * kv.Value / opsTotal:F0}%% |" ]
              $"| sum of the op kinds | {opsTotal:F2} | 100%% |"
              ""
              "Pixel decoder op kinds per pass on 5 frames (6 deformable encoder layers on 3,024 tokens per frame, then the FPN),"
              "from micro-runs of the same ops at the same shapes; the deformable sampling with the kernel in use"
              $"({MsDeformAttnCore.kernel}; grid_sample kernel: {gridT:F3} s, gather kernel: {gatherT:F3} s per pass):"
              ""
              "| op kind | s per pixel-decoder pass | share |"
              "| --- | ---: | ---: |"
              yield! [ for kv in pdOps |> Seq.sortByDescending (fun kv -> kv.Value) -> $"| {kv.Key} | {kv.Value:F3} | {100.0 * kv.Value / pdOpsTotal:F0}%% |" ]
              $"| sum of the op kinds | {pdOpsTotal:F2} | 100%% |"
              ""
              "Lever A/B in the same process (best of two interleaved medians each):"
              ""
              "| lever | before (s) | after (s) | after / before |"
              "| --- | ---: | ---: | ---: |"
              yield! [ for name, a, b in levers -> $"| {name} | {a:F3} | {b:F3} | {b / a:F2} |" ] ]
    printfn "%s" md
    writeSection "profile" md
