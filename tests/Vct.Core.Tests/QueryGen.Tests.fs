/// Tests of src/Vct.Core/QueryGen: the assignment attention (hard softmax, Gumbel noise) and the (Proto)VCQ
/// query generator against the official goldens and checkpoint names (part of the `Decoder.*` lists).
module Vct.Core.Tests.QueryGenTests

open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform
open Vct.Core.QueryGen
open Vct.Core.Tests.Golden

let private golden name = new Golden.File("decoder", name)

[<Tests>]
let goldens =
    testList "Decoder.Golden" [
        test "AssignAttention in eval: hard one-hot over queries, rows / (count + 1)" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_assign_attention.pt"
            use m = new AssignAttention(AssignConfig.Default 256L)
            loadWeights (g.Weights()) (fun _ -> false) m
            m.eval ()
            let out, maps = m.Forward(g["in.query"], g["in.key"])
            expectClose "raw logits" g["out.debug.raw_attn"] maps.Logits
            expectEqual "hard" g["out.eval.hard"] maps.Hard
            expectClose "out" g["out.eval.out"] out
        }

        test "AssignAttention in training with a given Gumbel sample" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_assign_attention.pt"
            use m = new AssignAttention(AssignConfig.Default 256L)
            loadWeights (g.Weights()) (fun _ -> false) m
            m.train ()
            let out, maps = m.Forward(g["in.query"], g["in.key"], g["in.gumbel_noise"])
            expectClose "hard (straight-through value)" g["out.train.hard"] maps.Hard
            expectClose "out" g["out.train.out"] out
        }

        test "ProtoVCQ (S4 form, K = 23) and VCQ (MS3 form) on 8x8 mask features" {
            use _ = torch.NewDisposeScope()
            use g = golden "comp_ppqg.pt"
            let x = g["in.x"]
            use proto = new VisualQueryBlock(VcqConfig.For(8L, 8L, Some 23L))
            loadWeights (g.Weights()) (fun _ -> false) proto
            proto.eval ()
            let o = proto.Forward x
            expectClose "queries" g["out.query"] o.Queries
            expectClose "prototypes" g["out.prototypes"] o.Prototypes.Value
            expectEqual "assignment arg-max" g["out.debug.assign_argmax"] (o.Assignment.argmax(2L))
            use vcq = new VisualQueryBlock(VcqConfig.For(8L, 8L, None))
            let shared = g.Weights()
            for k in List.ofSeq shared.Keys do
                if k.StartsWith "prototype" || k.StartsWith "pre_attn" then shared.Remove k |> ignore
            loadWeights shared (fun _ -> false) vcq
            vcq.eval ()
            let v = vcq.Forward x
            expectClose "VCQ queries" g["out.vcq.query"] v.Queries
            expectEqual "VCQ assignment arg-max" g["out.debug.assign_argmax_vcq"] (v.Assignment.argmax(2L))
        }
    ]

[<Tests>]
let properties =
    testList "Decoder.Properties" [
        testProperty "each pixel is assigned to exactly one query in eval" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            use m = new AssignAttention(AssignConfig.Default 16L)
            m.eval ()
            let _, maps = m.Forward(torch.randn(2L, 7L, 16L), torch.randn(2L, 11L, 16L))
            Expect.isTrue (maps.Hard.sum(2L).allclose(torch.ones(2L, 1L, 11L))) "one query per pixel"
            Expect.isTrue (maps.Hard.eq(0.0.ToScalar()).logical_or(maps.Hard.eq(1.0.ToScalar())).all().item<bool> ()) "one-hot"

        testProperty "Gumbel noise only in training: eval is deterministic, training draws" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let q, k = torch.randn(1L, 6L, 16L), torch.randn(1L, 40L, 16L)
            use m = new AssignAttention(AssignConfig.Default 16L, new torch.Generator(uint64 (abs seed)))
            m.eval ()
            let a1, _ = m.Forward(q, k)
            let a2, _ = m.Forward(q, k)
            Expect.isTrue (a1.allclose(a2, 0.0, 0.0)) "eval repeats exactly"
            m.train ()
            let hards = [ for _ in 1 .. 4 -> (snd (m.Forward(q, k))).Hard.detach().clone() ]
            let distinct = hards |> List.pairwise |> List.exists (fun (x, y) -> not (x.allclose(y, 0.0, 0.0)))
            Expect.isTrue distinct "training assignments vary with the noise"

        testProperty "hardSoftmax is one-hot forward with the softmax gradient" <| fun (seed: int) ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let x1 = torch.randn(2L, 5L, 3L).requires_grad_()
            let x2 = x1.detach().clone().requires_grad_()
            let w = torch.randn(2L, 5L, 3L)
            let y = Grouping.hardSoftmax -2L x1
            Expect.isTrue (y.sum(-2L).allclose(torch.ones(2L, 3L))) "one-hot"
            (y * w).sum().backward()
            (x2.softmax(-2L) * w).sum().backward()
            Expect.isTrue (x1.grad.allclose(x2.grad, rtol = 1e-5, atol = 1e-6)) "straight-through gradient"

        test "VCQ has no prototype keys; ProtoVCQ names follow the official checkpoint" {
            use proto = new VisualQueryBlock(VcqConfig.For(8L, 8L, Some 23L))
            use vcq = new VisualQueryBlock(VcqConfig.For(8L, 8L, None))
            let keys (m: torch.nn.Module) = m.state_dict().Keys |> Set.ofSeq
            let pk = keys proto
            for k in [ "prototype.weight"; "pre_proj.0.weight"; "pre_proj.2.weight"; "pre_proj.4.bias"; "query_mixer.layers.0.weight"
                       "pre_attn.multihead_attn.in_proj_weight"; "pre_attn.norm.weight"; "assign_attn.q_proj.weight"; "assign_attn.proj.bias" ] do
                Expect.contains pk k $"ProtoVCQ has {k}"
            Expect.isTrue (keys vcq |> Set.forall (fun k -> not (k.StartsWith "prototype" || k.StartsWith "pre_attn"))) "VCQ has none"
            Expect.equal (Set.difference pk (keys vcq) |> Set.forall (fun k -> k.StartsWith "prototype" || k.StartsWith "pre_attn")) true "the rest is shared"
        }
    ]
