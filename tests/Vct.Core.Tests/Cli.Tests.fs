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

        test "the C# facade reports what the F# API reports" {
            let viaFacade = Vct.VctRuntime.Info()
            let viaApi = Vct.Core.Api.systemInfo ()
            Expect.equal (viaFacade.VctVersion, viaFacade.TorchSharpVersion, viaFacade.LibTorchVersion, viaFacade.Device, viaFacade.Threads)
                         (viaApi.VctVersion, viaApi.TorchSharpVersion, viaApi.LibTorchVersion, viaApi.Device, viaApi.Threads) "same versions, device, threads"
            Expect.equal (viaFacade.Platform, viaFacade.CompatFixApplied, viaFacade.CompatFixReason)
                         (viaApi.Runtime.Platform, viaApi.Runtime.CompatFixApplied, viaApi.Runtime.CompatFixReason) "same runtime set-up"
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
