module Vct.Core.Tests.DeviceTests

open System
open Expecto
open TorchSharp
open Vct.Core
open Vct.Core.Platform

[<Tests>]
let tests =
    testList "Device" [
        test "parse accepts auto, cpu, cuda and cuda:N in any case" {
            Expect.equal (DeviceChoice.Parse "auto") DeviceChoice.Auto "auto"
            Expect.equal (DeviceChoice.Parse " CPU ") DeviceChoice.Cpu "cpu"
            Expect.equal (DeviceChoice.Parse "cuda") (DeviceChoice.Cuda 0) "cuda"
            Expect.equal (DeviceChoice.Parse "Cuda:3") (DeviceChoice.Cuda 3) "cuda:3"
        }

        test "parse rejects nonsense with the text in the message" {
            for bad in [ "gpu"; "cuda:-1"; "cuda:x"; "tpu:0" ] do
                let e = Expect.throwsC (fun () -> DeviceChoice.Parse bad |> ignore) id
                Expect.stringContains e.Message bad "names the bad value"
        }

        test "auto resolves to CUDA exactly when CUDA is available" {
            let d = Device.parse "auto"
            let expected = if torch.cuda.is_available () then DeviceType.CUDA else DeviceType.CPU
            Expect.equal d.``type`` expected "auto"
            Expect.equal (Device.parse "cpu").``type`` DeviceType.CPU "cpu"
        }

        test "asking for CUDA without CUDA is a clear error" {
            if torch.cuda.is_available () then skiptest "CUDA is available here"
            let e = Expect.throwsC (fun () -> Device.parse "cuda" |> ignore) id
            Expect.stringContains e.Message "CUDA" "mentions CUDA"
        }

        test "setThreads changes LibTorch's thread count and rejects 0" {
            let before = Device.threads ()
            try
                Device.setThreads 1
                Expect.equal (Device.threads ()) 1 "one thread"
            finally
                Device.setThreads before
            Expect.throwsT<ArgumentException> (fun () -> Device.setThreads 0) "0 threads"
        }

        testProperty "seed makes LibTorch and .NET randomness repeatable" <| fun (seed: int64) ->
            use _ = torch.NewDisposeScope()
            let r1 = Device.seed seed
            let a = torch.rand(5L)
            let x1 = r1.Next()
            let r2 = Device.seed seed
            let b = torch.rand(5L)
            let x2 = r2.Next()
            Expect.isTrue (a.allclose(b, 0.0, 0.0)) "same tensor"
            Expect.equal x1 x2 "same host random"
    ]
