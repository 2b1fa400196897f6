module Vct.Core.Tests.OptimTests

open System
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.Training

[<Tests>]
let tests =
    testList "Optim" [
        test "parameter settings follow the official build_optimizer rules on the released S4 model" {
            use _ = torch.no_grad ()
            use m = new VctModel(VctConfig.Released Subset.S4)
            let s = Optim.settings OptimConfig.Released [ "", m :> torch.nn.Module ] |> List.map fst
            let find name = s |> List.find (fun x -> x.Name = name)
            let check name lr wd =
                let x = find name
                Expect.floatClose Accuracy.veryHigh x.LrScale lr $"{name} lr scale"
                Expect.floatClose Accuracy.veryHigh x.WeightDecay wd $"{name} weight decay"
            check "backbone.patch_embed.proj.weight" 0.1 0.05
            check "pre_sam_backbone.layers.2.blocks.5.attn.qkv.weight" 0.1 0.05
            check "backbone.layers.0.blocks.0.attn.relative_position_bias_table" 0.1 0.0
            check "backbone.norm3.weight" 0.1 0.0
            check "sem_seg_head.pixel_decoder.input_proj.0.1.weight" 1.0 0.0          // GroupNorm
            check "sem_seg_head.pixel_decoder.transformer.level_embed" 1.0 0.05      // a bare Parameter decays
            check "sem_seg_head.predictor.query_feat.weight" 1.0 0.0                 // Embedding
            check "sem_seg_head.predictor.visual_query_block.prototype.weight" 1.0 0.0
            check "sem_seg_head.predictor.transformer_ffn_layers.3.norm.bias" 1.0 0.0
            check "sem_seg_head.predictor.class_embed.weight" 1.0 0.05
            Expect.isFalse (s |> List.exists (fun x -> x.Name.StartsWith "audio_backbone")) "the frozen VGGish is not optimised"
            let trainable = m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.length
            Expect.equal s.Length trainable "one setting per trainable tensor"
        }

        testProperty "poly factor: 1 at the start, 0 at the end, non-increasing" <| fun (maxIter: FsCheck.PositiveInt) ->
            let n = maxIter.Get
            let f = Optim.polyFactor OptimConfig.Released n
            Expect.floatClose Accuracy.veryHigh (f 0) 1.0 "starts at 1"
            Expect.floatClose Accuracy.veryHigh (f n) 0.0 "ends at 0"
            let xs = [ for i in 0 .. n -> f i ]
            Expect.isTrue (xs |> List.pairwise |> List.forall (fun (a, b) -> b <= a)) "non-increasing"
            Expect.floatClose Accuracy.high (f (n / 2)) (Math.Pow(1.0 - float (n / 2) / float n, 0.9)) "(1 - t)^0.9"

        test "full-model clipping bounds the global gradient norm" {
            use _ = torch.NewDisposeScope()
            let ps = [ for _ in 1 .. 3 -> torch.nn.Parameter(torch.randn(4L, 5L)) ]
            let loss = ps |> List.map (fun p -> (p * 100.0.ToScalar()).pow(2.0.ToScalar()).sum()) |> List.reduce (+)
            loss.backward()
            let before = Optim.clipFullModel 0.01 ps
            Expect.isGreaterThan before 0.01 "large before"
            let after = ps |> List.sumBy (fun p -> p.grad.pow(2.0.ToScalar()).sum().item<float32> () |> float) |> sqrt
            Expect.floatClose Accuracy.medium after 0.01 "0.01 after"
        }

        test "optimiser state survives a byte round trip: the next steps are identical" {
            use _ = torch.NewDisposeScope()
            let run (restore: bool) =
                torch.manual_seed 3L |> ignore
                use lin = torch.nn.Linear(4L, 3L)
                let settings = Optim.settings OptimConfig.Released [ "", lin :> torch.nn.Module ]
                let opt, lrs = Optim.adamW OptimConfig.Released settings
                let x = torch.randn(8L, 4L)
                let step () =
                    opt.zero_grad ()
                    lin.call(x).pow(2.0.ToScalar()).sum().backward()
                    opt.step () |> ignore
                step (); step ()
                if restore then
                    let bytes = Optim.stateBytes opt
                    let opt2, _ = Optim.adamW OptimConfig.Released settings
                    Optim.loadStateBytes opt2 bytes
                    Optim.setLr opt2 lrs 1.0
                    for _ in 1 .. 2 do
                        opt2.zero_grad ()
                        lin.call(x).pow(2.0.ToScalar()).sum().backward()
                        opt2.step () |> ignore
                else
                    step (); step ()
                lin.weight.detach().clone()
            Expect.isTrue (run(false).equal(run true).all().item<bool> ()) "same weights after resuming"
        }
    ]
