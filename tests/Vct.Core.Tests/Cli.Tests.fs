/// Tests of the `vct` CLI (src/Vct.Cli) as a program: `vct info`, parsing, the C# facade's runtime report, and how
/// every command fails (one line naming the file and the problem, exit 1, never an abort, a crash or a hang).
module Vct.Core.Tests.CliTests

open System
open System.Text.Json
open Expecto
open Vct.Core.Tests.Support

[<Tests>]
let tests =
    testList "Cli" [
        test "vct info prints versions, device, threads and the compat fix" {
            let code, out, err = runVct [ "info" ]
            Expect.equal code 0 $"exit code; stderr: {err}"
            for field in [ "TorchSharp"; "0.107.0"; "Device"; "Threads"; "Compat fix" ] do
                Expect.stringContains out field $"mentions {field}"
        }

        test "vct info --json reports the same facts as the library" {
            let code, out, err = runVct [ "info"; "--json"; "--device"; "cpu"; "--threads"; "1" ]
            Expect.equal code 0 $"exit code; stderr: {err}"
            use doc = JsonDocument.Parse out
            let r = doc.RootElement
            Expect.equal (r.GetProperty("torchsharp").GetString()) "0.107.0" "TorchSharp version"
            Expect.equal (r.GetProperty("device").GetString()) "cpu" "device honoured"
            Expect.equal (r.GetProperty("threads").GetInt32()) 1 "threads honoured"
            let mine = Vct.Core.Platform.Runtime.init ()
            Expect.equal (r.GetProperty("compat_fix_applied").GetBoolean()) mine.CompatFixApplied "same decision as in-process"
            Expect.isNotEmpty (r.GetProperty("compat_fix_reason").GetString()) "a reason"
        }

        test "the native heap keeps large tensors in glibc's heap on the main thread unless VCT_NATIVE_HEAP=system" {
            // A 96 MB block is above glibc's largest mmap threshold: by default it is mmap'd fresh on every allocation.
            let info (env: (string * string) list) =
                let psi = cliStartInfo [ "info"; "--json" ]
                for k in [ "MALLOC_ARENA_MAX"; "VCT_NATIVE_HEAP"; "VCT_DEBUG" ] do psi.Environment.Remove k |> ignore
                for k, v in env do psi.Environment[k] <- v
                match runProcessWithin 120 psi with
                | Some(0, out, _) -> JsonDocument.Parse(out).RootElement.Clone()
                | Some(code, _, err) -> failtestf "vct info exited %d: %s" code err
                | None -> failtest "vct info did not end within 120 s"
            let fromHeap (r: JsonElement) (thread: string) =
                let p = r.GetProperty $"native_heap_{thread}_from_heap"
                if p.ValueKind = JsonValueKind.Null then failtest "the probe could not measure (not glibc?)" else p.GetBoolean()
            let tuned = info []
            Expect.stringStarts (tuned.GetProperty("native_heap").GetString()) "tuned" "tuned by default"
            Expect.isTrue (fromHeap tuned "main_thread") "main thread: from the heap"
            Expect.isFalse (fromHeap tuned "pool_threads") "pool threads have their own arenas, which mmap such blocks"
            let shared = info [ "MALLOC_ARENA_MAX", "1" ]
            Expect.isTrue (fromHeap shared "pool_threads") "with MALLOC_ARENA_MAX=1 (as build.fsx starts processes) every thread uses the tuned heap"
            let system = info [ "VCT_NATIVE_HEAP", "system" ]
            Expect.stringStarts (system.GetProperty("native_heap").GetString()) "glibc defaults" "named"
            Expect.isFalse (fromHeap system "main_thread") "glibc's default mmaps the block"
        }

        test "the C# facade reports what the F# API reports" {
            let viaFacade = Vct.VctRuntime.Info()
            let viaApi = Vct.Core.Api.systemInfo ()
            Expect.equal (viaFacade.VctVersion, viaFacade.TorchSharpVersion, viaFacade.LibTorchVersion, viaFacade.Device, viaFacade.Threads)
                         (viaApi.VctVersion, viaApi.TorchSharpVersion, viaApi.LibTorchVersion, viaApi.Device, viaApi.Threads) "same versions, device, threads"
            Expect.equal (viaFacade.Platform, viaFacade.CompatFixApplied, viaFacade.CompatFixReason)
                         (viaApi.Runtime.Platform, viaApi.Runtime.CompatFixApplied, viaApi.Runtime.CompatFixReason) "same runtime set-up"
            Expect.equal (viaFacade.NativeHeap, viaFacade.NativeHeapFromHeapOnPoolThreads.HasValue) (viaApi.NativeHeap.Summary, viaApi.NativeHeap.PoolThreadFromHeap.IsSome) "same native heap"
            Expect.equal (Vct.VctRuntime.ResolveDevice "cpu").``type`` TorchSharp.DeviceType.CPU "device"
        }

        test "vct info --device with a bad value fails and names it" {
            let code, out, err = runVct [ "info"; "--device"; "tpu" ]
            Expect.notEqual code 0 "non-zero exit"
            Expect.stringContains (out + err) "tpu" "names the bad value"
            Expect.isFalse ((out + err).Contains "   at ") "one clear line, no stack trace"
        }

        test "a value outside its choices is refused at parse time in one line that lists the choices" {
            let code, out, err = runVct [ "predict"; "--subset"; "s5"; "--checkpoint"; "x"; "--video-input"; "y"; "--output"; "z" ]
            Expect.equal code 1 "exit 1"
            let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            Expect.isTrue (lines |> Array.forall (fun l -> l.StartsWith "vct: ")) $"every line is a vct: line, got {err}"
            Expect.stringContains err "s5" "names the bad value"
            Expect.stringContains err "avss" "lists the choices"
            Expect.isFalse (out.Contains "Usage:") "no help dump"
        }
    ]

/// Failures of the `vct` CLI: every one is a single line naming the file and the problem, exit 1, the stack trace
/// only with VCT_DEBUG=1; never an abort (134), a crash (139) or a hang. Inputs are crafted here.
module FailuresTests =
    open System
    open System.IO
    open System.Text.Json.Nodes
    open Expecto
    open Vct.Core
    open Vct.Core.Platform
    open Vct.Core.Data
    open Vct.Core.Checkpoint
    open Vct.Core.Tests.Support

    /// The CLI without a time limit is `Support.runVct`; here every run is bounded (120 s) and VCT_DEBUG is unset.
    let runVct args = runVctEnv [] args

    /// Expects exit 1 and exactly one stderr line `vct: <expected>`, without a stack trace.
    let expectOneLine (expected: string) (code: int, out: string, err: string) =
        Expect.equal code 1 $"exit code 1; stdout: {out}; stderr: {err}"
        let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
        Expect.equal lines [| $"vct: {expected}" |] "one line naming the file and the problem"

    /// Expects exit 1 and, after any progress lines, one last stderr line `vct: <expected>`, without a stack trace.
    let expectLastLine (expected: string) (code: int, out: string, err: string) =
        Expect.equal code 1 $"exit code 1; stdout: {out}; stderr: {err}"
        let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
        Expect.equal (Array.last lines) $"vct: {expected}" "the last line names the file and the problem"
        Expect.isFalse (err.Contains "   at ") "no stack trace"

    /// A tiny S4 checkpoint (32x32 input) and its config JSON.
    let tinyCheckpoint (dir: string) =
        let ckpt = Path.Combine(dir, "m.safetensors")
        use m = new VctModel(VctConfig.Tiny(Subset.S4, 32L, 23L))
        ModelIO.save ckpt m
        ckpt

    /// Rewrites one field of the checkpoint's config JSON.
    let editConfig (ckpt: string) (edit: JsonObject -> unit) =
        let json = ModelIO.configPathOf ckpt
        let o = (JsonNode.Parse(File.ReadAllText json)).AsObject()
        edit o
        File.WriteAllText(json, o.ToJsonString())
        json

    [<Tests>]
    let tests =
        testList "Failures" [
            test "a malformed checkpoint config is one line naming the file; VCT_DEBUG=1 adds the stack trace" {
                use tmp = new TempDir("vct-fail-json")
                let dir = tmp.Path
                let ckpt = tinyCheckpoint dir
                let json = ModelIO.configPathOf ckpt
                File.WriteAllText(json, "{ \"subset\": \"s4\", ")
                let args = [ "eval"; "--checkpoint"; ckpt; "--data"; dir; "--out"; Path.Combine(dir, "o"); "--device"; "cpu" ]
                let code, out, err = runVct args
                Expect.equal code 1 $"exit 1: {err}"
                Expect.stringStarts err $"vct: {json}: not valid JSON (" "names the file and the problem"
                Expect.equal (err.Trim().Split('\n').Length) 1 "one line"
                Expect.isFalse (err.Contains "   at ") "no stack trace"
                let code, _, err = runVctEnv [ "VCT_DEBUG", "1" ] args
                Expect.equal code 1 "same exit code with VCT_DEBUG=1"
                Expect.stringStarts err $"vct: {json}: not valid JSON (" "same first line"
                Expect.stringContains err "   at " "the stack trace with VCT_DEBUG=1"
                ignore out
            }

            test "config values are range-checked before a model is built" {
                use tmp = new TempDir("vct-fail-range")
                let dir = tmp.Path
                let ckpt = tinyCheckpoint dir
                let args = [ "eval"; "--checkpoint"; ckpt; "--data"; dir; "--out"; Path.Combine(dir, "o"); "--device"; "cpu" ]
                let json = editConfig ckpt (fun o -> o["swin"]["embed_dim"] <- JsonValue.Create -8)
                runVct args |> expectOneLine $"{json}: config: field 'swin.embed_dim' must be in 1..4096, got -8"
                let json = editConfig ckpt (fun o -> o["swin"]["embed_dim"] <- JsonValue.Create 32; o["decoder"]["num_heads"] <- JsonValue.Create 0)
                runVct args |> expectOneLine $"{json}: config: field 'decoder.num_heads' must be in 1..64, got 0"
                let json = editConfig ckpt (fun o -> o["decoder"]["num_heads"] <- JsonValue.Create 3)
                runVct args |> expectOneLine $"{json}: config: field 'decoder.num_heads' = 3 does not divide decoder.hidden_dim = 64"
                let json = editConfig ckpt (fun o -> o["decoder"]["num_heads"] <- JsonValue.Create 4; o["swin"]["drop_path_rate"] <- JsonValue.Create 1.5)
                runVct args |> expectOneLine $"{json}: config: field 'swin.drop_path_rate' must be in [0, 1), got 1.5"
                let json = editConfig ckpt (fun o -> o["swin"]["drop_path_rate"] <- JsonValue.Create 0.1; o["pixel_decoder"]["in_strides"] <- JsonArray(JsonValue.Create 4))
                runVct args |> expectOneLine $"{json}: config: field 'pixel_decoder.in_strides' has 1 entries for 4 inputs (pixel_decoder.in_channels)"
                let json = editConfig ckpt (fun o -> o["pixel_decoder"]["in_strides"] <- JsonArray([| for s in [ 4; 8; 16; 32 ] -> JsonValue.Create s :> JsonNode |]); o["image_size"] <- JsonValue.Create "big")
                runVct args |> expectOneLine $"{json}: config: field 'image_size' is malformed (expected an integer, got \"big\")"
            }

            test "training options are range-checked before any data is read" {
                use tmp = new TempDir("vct-fail-opts")
                let dir = tmp.Path
                let common = [ "train"; "--preset"; "tiny"; "--data"; Path.Combine(dir, "nodata"); "--runs"; Path.Combine(dir, "runs"); "--name"; "r"; "--device"; "cpu" ]
                runVct (common @ [ "--iterations"; "0" ]) |> expectOneLine "--iterations must be in 1..100000000, got 0"
                runVct (common @ [ "--batch"; "-2" ]) |> expectOneLine "--batch must be in 1..4096, got -2"
                runVct (common @ [ "--eval-period"; "0" ]) |> expectOneLine "--eval-period must be in 1..100000000, got 0"
                runVct (common @ [ "--lr"; "NaN" ]) |> expectOneLine "--lr must be in (0, 1], got NaN"
                runVct (common @ [ "--threads"; "0" ]) |> expectOneLine "--threads must be in 1..1024, got 0"
                Expect.isFalse (Directory.Exists(Path.Combine(dir, "runs"))) "nothing written"
            }

            test "vct score with zero videos or NaN scores says so instead of dividing by zero" {
                use tmp = new TempDir("vct-fail-score")
                let dir = tmp.Path
                let s0, g0 = Path.Combine(dir, "s0.npy"), Path.Combine(dir, "g0.npy")
                NpyFile.writeFloat32 s0 [| 0L; 1L; 2L; 4L; 4L |] [||]
                NpyFile.writeUInt8 g0 [| 0L; 1L; 4L; 4L |] [||]
                runVct [ "score"; "--subset"; "s4"; "--scores"; s0; "--gt"; g0; "--quiet" ]
                |> expectOneLine $"{s0}: holds no videos (scores shape (0,1,2,4,4)); nothing to score"
                let s1, g1 = Path.Combine(dir, "s1.npy"), Path.Combine(dir, "g1.npy")
                let scores = Array.init 32 (fun i -> if i = 5 || i = 9 then nanf else float32 (i % 3))
                NpyFile.writeFloat32 s1 [| 1L; 1L; 2L; 4L; 4L |] scores
                NpyFile.writeUInt8 g1 [| 1L; 1L; 4L; 4L |] (Array.init 16 (fun i -> byte (i % 2)))
                runVct [ "score"; "--subset"; "s4"; "--scores"; s1; "--gt"; g1; "--quiet" ]
                |> expectOneLine $"{s1}: the scores of video '0' hold 2 NaN value(s); the predictions are broken (non-finite weights or a failed export)"
                runVct [ "score"; "--subset"; "avss"; "--classes"; "0"; "--scores"; s1; "--gt"; g1; "--quiet" ]
                |> expectOneLine "--classes must be in 2..1000, got 0"
                let folder = Path.Combine(dir, "empty")
                Directory.CreateDirectory folder |> ignore
                runVct [ "score"; "--subset"; "s4"; "--scores"; folder; "--gt"; folder; "--quiet" ]
                |> expectOneLine $"{folder}: no <id>_scores.npy files"
            }

            test "vct eval --precision bf16 scores like fp32 where the CPU can; fp16 on the CPU is refused in one line" {
                use tmp = new TempDir("vct-eval-precision")
                let dir = tmp.Path
                let data = Path.Combine(dir, "data")
                Synth.generate { SynthOptions.Default Subset.S4 with Train = 1; Val = 0; Test = 2; Size = 32; EvalSize = 32 } data |> ignore
                let ckpt = tinyCheckpoint dir
                let eval (precision: string) =
                    let out = Path.Combine(dir, $"o-{precision}")
                    let code, stdout, err = runVct [ "eval"; "--checkpoint"; ckpt; "--data"; data; "--out"; out; "--device"; "cpu"; "--precision"; precision ]
                    code, stdout, err, out
                let code, stdout, err, _ = eval "fp32"
                Expect.equal code 0 $"fp32 eval; stderr: {err}"
                use fp32 = JsonDocument.Parse stdout
                Expect.equal (fp32.RootElement.GetProperty("precision").GetString()) "fp32" "summary names the precision"
                match Vct.Core.Platform.Precision.unsupportedReason TorchSharp.torch.CPU Vct.Core.Platform.Precision.BFloat16 with
                | None ->
                    let code, stdout, err, _ = eval "bf16"
                    Expect.equal code 0 $"bf16 eval; stderr: {err}"
                    use bf16 = JsonDocument.Parse stdout
                    Expect.equal (bf16.RootElement.GetProperty("precision").GetString()) "bf16" "summary names the precision"
                    let mj (d: JsonDocument) = d.RootElement.GetProperty("m_j").GetDouble()
                    Expect.isLessThan (abs (mj bf16 - mj fp32)) 0.02 "bf16 M_J close to fp32 on the tiny model"
                | Some why ->
                    let code, _, err, out = eval "bf16"
                    Expect.equal code 1 "refused"
                    Expect.stringContains err why "the reason"
                    Expect.isFalse (Directory.Exists out) "nothing written"
                let code, _, err, out = eval "fp16"
                Expect.equal code 1 "fp16 on the CPU refused"
                let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries)
                Expect.equal lines.Length 1 $"one line, got {err}"
                Expect.stringContains err "fp16 is not supported on the CPU" "names the problem"
                Expect.isFalse (Directory.Exists out) "nothing written"
            }

            test "vct eval on an empty split says so; no NaN reaches the JSON" {
                use tmp = new TempDir("vct-fail-eval")
                let dir = tmp.Path
                let data = Path.Combine(dir, "data")
                Synth.generate { SynthOptions.Default Subset.S4 with Train = 1; Val = 1; Test = 0; Size = 32; EvalSize = 32 } data |> ignore
                let ckpt = tinyCheckpoint dir
                let out = Path.Combine(dir, "o")
                runVct [ "eval"; "--checkpoint"; ckpt; "--data"; data; "--split"; "test"; "--out"; out; "--device"; "cpu" ]
                |> expectOneLine $"{data}: the test split has no videos; nothing to evaluate"
                Expect.isFalse (Directory.Exists out) "no output written"
            }

            test "a LibTorch error (frames of height 0) is one line without the native trace" {
                use tmp = new TempDir("vct-fail-torch")
                let dir = tmp.Path
                let ckpt = tinyCheckpoint dir
                let inputs = Path.Combine(dir, "in.safetensors")
                let meta = Collections.Generic.Dictionary<string, string>()
                use images = TorchSharp.torch.zeros(1L, 3L, 0L, 32L)
                use audio = TorchSharp.torch.zeros(1L, 1L, 96L, 64L)
                Checkpoint.Safetensors.write inputs meta [ "images", images; "audio_log_mel", audio ]
                let code, out, err = runVct [ "forward"; "--checkpoint"; ckpt; "--inputs"; inputs; "--out"; Path.Combine(dir, "out.safetensors"); "--device"; "cpu" ]
                Expect.equal code 1 $"exit 1; stdout: {out}; stderr: {err}"
                let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
                let last = Array.last lines
                Expect.equal last "vct: LibTorch: Calculated padded input size per channel: (0 x 32). Kernel size: (4 x 4). Kernel size can't be greater than actual input size" "the first line of LibTorch's message, marked as such"
                Expect.isFalse (err.Contains "Exception raised from" || err.Contains "frame #") "no native trace"
                Expect.isFalse (err.Contains "   at ") "no managed stack trace"
            }

            test "a checkpoint named .json is refused before its config could overwrite it" {
                use tmp = new TempDir("vct-fail-outjson")
                let dir = tmp.Path
                let out = Path.Combine(dir, "x.json")
                runVct [ "convert"; "--subset"; "s4"; "--checkpoint"; Path.Combine(dir, "none.pth"); "--out"; out ]
                |> expectOneLine $"{out}: a checkpoint cannot be a .json file (its config is written beside it as <name>.json); use a .safetensors name"
                use m = new VctModel(VctConfig.Tiny(Subset.S4, 32L, 23L))
                let e = Expect.throwsC (fun () -> ModelIO.save out m) id
                Expect.stringStarts e.Message $"{out}: a checkpoint cannot be a .json file" "the library refuses too"
                Expect.isEmpty (Directory.GetFiles dir) "nothing written"
            }

            test "resuming from a checkpoint with malformed metadata names the file and the field" {
                use tmp = new TempDir("vct-fail-resume")
                let dir = tmp.Path
                let run = Path.Combine(dir, "runs", "r")
                Directory.CreateDirectory run |> ignore
                let last = Path.Combine(run, "checkpoint_last.safetensors")
                let meta = Collections.Generic.Dictionary<string, string>()
                for k, v in [ "format", "pt"; "iteration", "twelve"; "best_mj", "0.5"; "best_iteration", "10" ] do meta[k] <- v
                use t = TorchSharp.torch.zeros(1L)
                Checkpoint.Safetensors.write last meta [ "optimizer_state", t ]
                let data = Path.Combine(dir, "data")
                Synth.generate { SynthOptions.Default Subset.S4 with Train = 2; Val = 1; Test = 0; Size = 32; EvalSize = 32 } data |> ignore
                let prev = Path.Combine(run, "checkpoint_prev.safetensors")
                runVct [ "train"; "--preset"; "tiny"; "--data"; data; "--runs"; Path.Combine(dir, "runs"); "--name"; "r"; "--resume"; "--batch"; "1"; "--device"; "cpu"; "--workers"; "0" ]
                |> expectLastLine $"cannot resume: {last}: metadata 'iteration' is not an iteration count ('twelve'); {prev} does not exist"
            }

            test "a malformed label2idx.json is reported naming the file" {
                use tmp = new TempDir("vct-fail-avss")
                let dir = tmp.Path
                let rep = Synth.generate { SynthOptions.Default Subset.AVSS with Train = 1; Val = 1; Test = 0; Size = 40 } dir
                let json = Path.Combine(rep.Root, "label2idx.json")
                File.WriteAllText(json, "{\"background\": 0, \"dog\": \"one\"}")
                let code, out, _ = runVct [ "data"; "check"; dir ]
                Expect.equal code 2 "the check fails with its own code"
                Expect.stringContains out $"error: {json}: not a JSON object of class name -> index (" "names the file"
            }
        ]

/// The CLI on the crafted files of the reader regression tests (issue #11).
module HardeningTests =
    open System.IO
    open Expecto
    open Vct.Core
    open Vct.Core.Data
    open Vct.Core.Tests.Support
    open Vct.Core.Tests.Crafted

    [<Tests>]
    let tests =
        testList "Hardening" [
            // --- The CLI on the crafted inputs: a clean non-zero exit, never 134/139 or a hang -----------------------
            test "vct audio examples and vct data check on the crafted files exit cleanly (no 134/139, no hang)" {
                use tmp = new TempDir("vct-harden")
                let dir = tmp.Folder "cli"
                let wav = Path.Combine(dir, "huge_chunk.wav")
                File.WriteAllBytes(wav, wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
                let wavError = $"{wav}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)"
                let code, text = vctWithin 120 [ "audio"; "examples"; wav; "--out"; Path.Combine(dir, "x.npy") ]
                Expect.isTrue (code <> 0 && code <> 134 && code <> 139) $"a clean failure, got exit {code}: {text}"
                Expect.stringContains text wavError "names the file and the problem"
                let code, text = vctWithin 120 [ "audio"; "examples"; dir; "--out"; Path.Combine(dir, "out") ]
                Expect.equal code 1 $"folder mode: the file is listed as failed: {text}"
                Expect.stringContains text wavError "folder mode names it"
                // A tree with the huge-chunk WAV, a forged 100000x100000 frame and a deeply nested log-mel pickle.
                let root = tmp.Folder "tree"
                Synth.generate { SynthOptions.Default Subset.S4 with Seed = 4; Train = 1; Val = 1; Test = 1; Size = 40; EvalSize = 56 } root |> ignore
                let recs = [| for s in [ "train"; "val"; "test" ] -> Avsbench.records Subset.S4 root s |> Array.exactlyOne |]
                let wavOf (r: VideoRecord) = match r.Audio with AudioSource.Wav p -> p | AudioSource.LogMelPickle p -> p
                File.WriteAllBytes(wavOf recs[0], wavWith [ "junk", 0xFFFFFFF8u, [||]; "data", 0u, [||] ])
                File.WriteAllBytes(recs[1].Frames[2], forgedPng 100000u 100000u)
                let pkl = Path.ChangeExtension((wavOf recs[2]).Replace("audio_wav", "audio_log_mel"), ".pkl")
                Directory.CreateDirectory(Path.GetDirectoryName pkl) |> ignore
                File.WriteAllBytes(pkl, deepTuplePickle 1_000_000 1)
                let code, text = vctWithin 180 [ "data"; "check"; root ]
                Expect.isTrue (code <> 0 && code <> 134 && code <> 139) $"a clean failure, got exit {code}: {text}"
                for line in
                    [ $"{wavOf recs[0]}: not a readable WAV file (chunk 'junk' at byte 36 declares 4294967288 bytes, but the file ends at byte 52)"
                      // The check's own (tighter) frame budget reads only the header, before the reader's limit applies.
                      $"{recs[1].Frames[2]}: frame is 100000x100000 (10000000000 pixels), over the frame pixel budget of 16777216 (4096x4096); downscale the frames"
                      $"{pkl}: the pickle holds a dict, not a tensor" ] do
                    Expect.stringContains text line "reported"
            }
        ]
