module Vct.Core.Tests.ModelIOTests

open System
open System.IO
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Checkpoint

let private tempDir () =
    let d = Path.Combine(Path.GetTempPath(), $"vct-modelio-{Guid.NewGuid():N}")
    Directory.CreateDirectory d |> ignore
    d

let private tiny subset = VctConfig.Tiny(subset, 64L, 4L)

let private inputs (cfg: VctConfig) =
    torch.manual_seed 7L |> ignore
    { Images = torch.rand(2L, 3L, cfg.ImageSize, cfg.ImageSize) * 255.0.ToScalar()
      PreMasks = None
      AudioLogMel = torch.randn(2L, 1L, 96L, 64L)
      TemporalFlags = None }

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
            let dir = tempDir ()
            try
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
            finally
                Directory.Delete(dir, true)
        }

        test "official-format weights load strictly; criterion and VGGish FC keys are the only, reported, leftovers" {
            let dir = tempDir ()
            try
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
            finally
                Directory.Delete(dir, true)
        }

        test "a checkpoint of another subset fails strictly, naming the mismatched keys" {
            let dir = tempDir ()
            try
                use _ = torch.NewDisposeScope()
                use avss = new VctModel(tiny Subset.AVSS)
                let path = Path.Combine(dir, "avss.safetensors")
                Safetensors.write path (Collections.Generic.Dictionary()) [ for kv in avss.state_dict () -> kv.Key, kv.Value ]
                use s4 = new VctModel(tiny Subset.S4)
                let e = Expect.throwsC (fun () -> ModelIO.loadOfficialInto path s4 |> ignore) id
                Expect.stringContains e.Message "class_embed" "names the class head"
            finally
                Directory.Delete(dir, true)
        }

        test "loading a missing checkpoint names the path" {
            let e = Expect.throwsC (fun () -> ModelIO.load "/nonexistent/model.safetensors" torch.CPU |> ignore) id
            Expect.stringContains e.Message "/nonexistent/model.safetensors" "names the file"
        }
    ]
