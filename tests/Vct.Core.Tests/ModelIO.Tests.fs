module Vct.Core.Tests.ModelIOTests

open System
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Checkpoint
open Vct.Core.Tests.Support

let private tiny subset = VctConfig.Tiny(subset, 64L, 4L)

let private inputs (cfg: VctConfig) =
    torch.manual_seed 7L |> ignore
    Golden.tinyInputs None cfg 2L false

let private logMelOf (x: VctInputs) =
    match x.Audio with
    | AudioInput.LogMel(examples, _) -> examples
    | AudioInput.Maps _ -> failwith "these tests build log-mel inputs"

[<Tests>]
let tests =
    testList "ModelIO" [
        test "config JSON round-trips for every released and tiny config" {
            for s in [ Subset.S4; Subset.MS3; Subset.AVSS ] do
                for c in [ VctConfig.Released s; tiny s; (tiny s).WithUsePreSam(true).WithOutputSize 224L ] do
                    let back = ConfigJson.ofText "test" (ConfigJson.toText c)
                    Expect.equal back c $"{s} round trip"
        }

        test "a config with a missing field is rejected naming the file and the field" {
            let o = ConfigJson.toJson (tiny Subset.S4)
            (o["decoder"].AsObject()).Remove "num_queries" |> ignore
            let e = Expect.throwsC (fun () -> ConfigJson.ofText "broken.json" (o.ToJsonString()) |> ignore) id
            Expect.stringContains e.Message "broken.json" "names the file"
            Expect.stringContains e.Message "decoder.num_queries" "names the field"
            let e2 = Expect.throwsC (fun () -> ConfigJson.ofText "junk.json" "{not json" |> ignore) id
            Expect.stringContains e2.Message "junk.json" "names the file"
        }

        test "our checkpoints round-trip: same weights, same outputs, config from JSON or metadata" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            let cfg = tiny Subset.AVSS
            use m = new VctModel(cfg)
            m.eval ()
            let path = Path.Combine(dir, "model.safetensors")
            ModelIO.save path m
            Expect.isTrue (File.Exists(Path.Combine(dir, "model.json"))) "config beside"
            let x = inputs cfg
            use expected = m.Forward x
            let loaded, report = ModelIO.load path torch.CPU
            use loaded = loaded
            Expect.isTrue report.IsExact $"exact load: {report}"
            use actual = loaded.Forward x
            Expect.isTrue (actual.Decoder.Last.Masks.equal(expected.Decoder.Last.Masks).all().item<bool> ()) "same masks"
            File.Delete(Path.Combine(dir, "model.json"))
            Expect.equal (ModelIO.readConfig path) cfg "config from the metadata"
        }

        test "official-format weights load strictly; criterion and VGGish FC keys are the only, reported, leftovers" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            let cfg = tiny Subset.S4
            use src = new VctModel(cfg)
            let extras =
                [ "criterion.empty_weight", torch.ones(3L)
                  "criterion.logit_scale", torch.tensor(2.659f)
                  "audio_backbone.embeddings.0.weight", torch.zeros(4L, 4L) ]
            let path = Path.Combine(dir, "official_like.safetensors")
            Safetensors.write path (Collections.Generic.Dictionary()) ([ for kv in src.state_dict () -> kv.Key, kv.Value ] @ extras)
            use dst = new VctModel(cfg)
            let report = ModelIO.loadOfficialInto path dst
            Expect.isEmpty report.Missing "nothing missing"
            Expect.isEmpty report.Unexpected "nothing unexpected"
            Expect.equal (Set.ofList report.Dropped) (Set.ofList (List.map fst extras)) "documented leftovers reported"
            let a = src.state_dict()
            for kv in dst.state_dict () do
                Expect.isTrue (kv.Value.equal(a[kv.Key]).all().item<bool> ()) $"{kv.Key} copied"
        }

        test "a checkpoint of another subset fails strictly, naming the mismatched keys" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            use avss = new VctModel(tiny Subset.AVSS)
            let path = Path.Combine(dir, "avss.safetensors")
            Safetensors.write path (Collections.Generic.Dictionary()) [ for kv in avss.state_dict () -> kv.Key, kv.Value ]
            use s4 = new VctModel(tiny Subset.S4)
            let e = Expect.throwsC (fun () -> ModelIO.loadOfficialInto path s4 |> ignore) id
            Expect.stringContains e.Message "class_embed" "names the class head"
        }

        test "loading a missing checkpoint names the path" {
            let e = Expect.throwsC (fun () -> ModelIO.load "/nonexistent/model.safetensors" torch.CPU |> ignore) id
            Expect.stringContains e.Message "/nonexistent/model.safetensors" "names the file"
        }
    
        test "vct forward writes the official output names and equals the in-process forward" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            let cfg = tiny Subset.S4
            use m = new VctModel(cfg)
            let ckpt = Path.Combine(dir, "tiny.safetensors")
            ModelIO.save ckpt m
            let x = inputs cfg
            let inPath = Path.Combine(dir, "inputs.safetensors")
            Safetensors.write inPath (Collections.Generic.Dictionary()) [ "in.images", x.Images; "in.audio_log_mel", logMelOf x ]
            let outPath = Path.Combine(dir, "out.safetensors")
            let code, out, err = runVct [ "forward"; "--checkpoint"; ckpt; "--inputs"; inPath; "--input-prefix"; "in."; "--out"; outPath; "--intermediates"; "--device"; "cpu" ]
            Expect.equal code 0 $"vct forward failed: {out}\n{err}"
            use written = Safetensors.read outPath
            let names = Set.ofSeq written.Tensors.Keys
            for n in [ "pred_logits"; "pred_masks"; "aux0.pred_logits"; "aux8.pred_masks"; "feats.audio_feat"; "feats.proto_feat"; "sem_seg"
                       "backbone.res2"; "sem_seg_head.pixel_decoder.mask_features"; "sem_seg_head.predictor.visual_query_block.assignment" ] do
                Expect.contains names n $"writes {n}"
            let expected = Parity.run m Precision.Float32 x false |> Map.ofList
            for n in [ "pred_logits"; "pred_masks"; "sem_seg"; "aux3.pred_masks" ] do
                Expect.isTrue (written.Tensors[n].allclose(expected[n], rtol = 1e-5, atol = 1e-6)) $"{n} as in-process"
        }

        test "vct forward without a needed input names the file and the tensor" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            use m = new VctModel(tiny Subset.MS3)
            let ckpt = Path.Combine(dir, "tiny.safetensors")
            ModelIO.save ckpt m
            let inPath = Path.Combine(dir, "inputs.safetensors")
            Safetensors.write inPath (Collections.Generic.Dictionary()) [ "images", torch.zeros(1L, 3L, 64L, 64L) ]
            let code, out, err = runVct [ "forward"; "--checkpoint"; ckpt; "--inputs"; inPath; "--out"; Path.Combine(dir, "o.safetensors") ]
            Expect.notEqual code 0 "fails"
            Expect.stringContains (out + err) "audio_log_mel" "names the tensor"
            Expect.stringContains (out + err) "inputs.safetensors" "names the file"
        }

        test "vct convert turns an official-format .pth into our checkpoint that loads exactly" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            // A released-size S4 state dict (1.2 GB) with one documented leftover, written as a PyTorch zip
            // .pth by TorchSharp.PyBridge: converted, then refused for the wrong subset.
            use _ng = torch.no_grad ()
            use m = new VctModel(VctConfig.Released Subset.S4)
            let sd = m.state_dict()
            sd.Add("criterion.empty_weight", torch.ones(3L))
            let pth = Path.Combine(dir, "model_best.pth")
            TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(pth, sd)
            let outPath = Path.Combine(dir, "s4.safetensors")
            let code, out, err = runVct [ "convert"; "--subset"; "s4"; "--checkpoint"; pth; "--out"; outPath ]
            Expect.equal code 0 $"convert failed: {out}\n{err}"
            Expect.stringContains err "criterion.empty_weight" "reports the dropped key"
            Expect.equal (ModelIO.readConfig outPath) (VctConfig.Released Subset.S4) "config written"
            let code2, out2, err2 = runVct [ "convert"; "--subset"; "avss"; "--checkpoint"; pth; "--out"; Path.Combine(dir, "x.safetensors") ]
            Expect.notEqual code2 0 "S4 weights do not fit the AVSS model"
            Expect.stringContains (out2 + err2) "class_embed" "names the mismatch"
        }
    
        test "the C# facade loads a checkpoint and segments a video with maps" {
            use tmp = new TempDir("vct-modelio")
            let dir = tmp.Path
            use _ = torch.NewDisposeScope()
            let cfg = tiny Subset.S4
            let src = new VctModel(cfg)
            ModelIO.save (Path.Combine(dir, "m.safetensors")) src
            src.Dispose()
            use seg = Vct.VctSegmenter.Load(Path.Combine(dir, "m.safetensors"), Vct.SegmenterOptions(Device = "cpu", Intermediates = true))
            let x = inputs cfg
            use r = seg.Segment(x.Images, logMelOf x)
            Expect.sequenceEqual r.Masks.shape [| 2L; 64L; 64L |] "masks [T, S, S]"
            Expect.equal r.Masks.dtype torch.ScalarType.Bool "binary for S4"
            Expect.sequenceEqual r.Scores.shape [| 2L; 2L; 64L; 64L |] "scores"
            Expect.sequenceEqual r.PixelToQuery.shape [| 2L; 16L; 16L |] "assignment per mask-feature pixel"
            Expect.isTrue (r.PixelToQuery.max().item<int64> () < 20L) "query indices"
            Expect.sequenceEqual r.PrototypeSimilarity.shape [| 2L; 4L |] "similarities [T, K]"
            Expect.equal r.AttentionMasks.Count 9 "one mask per layer"
            Expect.isTrue (r.ClassProbabilities.sum(-1).allclose(torch.ones(2L, 20L))) "probabilities"
        }
    ]
