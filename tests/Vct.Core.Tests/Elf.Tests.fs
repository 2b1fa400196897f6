module Vct.Core.Tests.ElfTests

open System
open System.IO
open Expecto
open Vct.Core
open Vct.Core.Platform

let private torchSharpNative () =
    let report = Runtime.init ()
    let dir = if report.NativeDirectory <> "" then report.NativeDirectory else AppContext.BaseDirectory
    [ dir; Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native") ]
    |> List.map (fun d -> Path.Combine(d, "libLibTorchSharp.so"))
    |> List.tryFind File.Exists

let private libstdcxx () =
    [ "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"; "/usr/lib64/libstdc++.so.6"; "/usr/lib/libstdc++.so.6" ]
    |> List.tryFind File.Exists

let private images = Collections.Concurrent.ConcurrentDictionary<string, byte[]>()
let private imageOf (path: string) = images.GetOrAdd(path, File.ReadAllBytes)

[<Tests>]
let tests =
    testList "Elf" [
        test "versionNeeds of libLibTorchSharp.so lists libstdc++ versions with distinct indices" {
            match torchSharpNative () with
            | None -> skiptest "libLibTorchSharp.so is not beside the test program (not Linux x64)"
            | Some path ->
                let needs = Elf.versionNeeds (File.ReadAllBytes path)
                let cxx = needs |> List.filter (fun n -> n.File = "libstdc++.so.6")
                Expect.isNonEmpty cxx "needs libstdc++ versions"
                Expect.exists cxx (fun n -> n.Name = "GLIBCXX_3.4.32") "TorchSharp 0.107 asks for GLIBCXX_3.4.32"
                Expect.equal (needs |> List.map (fun n -> n.Index) |> List.distinct |> List.length) needs.Length "indices are unique"
                Expect.all needs (fun n -> n.Flags &&& Elf.VerFlagWeak = 0us) "nothing is weak in the original"
        }

        test "versionDefinitions of libstdc++ lists the GLIBCXX base versions" {
            match libstdcxx () with
            | None -> skiptest "no libstdc++ at a standard path"
            | Some path ->
                let defs = Elf.versionDefinitions (File.ReadAllBytes path)
                Expect.contains defs "GLIBCXX_3.4" "base version"
                Expect.contains defs "CXXABI_1.3" "ABI version"
        }

        test "the one symbol bound to GLIBCXX_3.4.32 is never relocated" {
            match torchSharpNative () with
            | None -> skiptest "not Linux x64"
            | Some path ->
                let bytes = File.ReadAllBytes path
                let need = Elf.versionNeeds bytes |> List.find (fun n -> n.Name = "GLIBCXX_3.4.32")
                let syms = Elf.symbolsOfVersion bytes need.Index
                Expect.equal (syms |> List.map snd) [ "_ZSt21ios_base_library_initv" ] "std::ios_base_library_init only"
                let relocated = Elf.relocatedSymbols bytes
                Expect.isNonEmpty relocated "the library has dynamic relocations"
                Expect.isFalse (relocated.Contains(fst syms.Head)) "no relocation uses it"
        }

        test "patchForMissing refuses when a missing version's symbol is relocated" {
            match torchSharpNative () with
            | None -> skiptest "not Linux x64"
            | Some path ->
                let bytes = File.ReadAllBytes path
                // A version that really binds relocated symbols: pretend the system lacks it.
                let relocated = Elf.relocatedSymbols bytes
                let used =
                    Elf.versionNeeds bytes
                    |> List.find (fun n -> Elf.symbolsOfVersion bytes n.Index |> List.exists (fun (i, _) -> relocated.Contains i))
                match Runtime.patchForMissing [ used ] bytes with
                | Ok _ -> failtest $"weakening {used.Name} must be refused"
                | Error why -> Expect.stringContains why used.Name "names the version"
        }

        test "markWeak changes exactly the flag bytes and leaves the input alone" {
            match torchSharpNative () with
            | None -> skiptest "not Linux x64"
            | Some path ->
                let bytes = File.ReadAllBytes path
                let before = Array.copy bytes
                let needs = Elf.versionNeeds bytes |> List.filter (fun n -> n.File = "libstdc++.so.6") |> List.truncate 3
                let patched = Elf.markWeak needs bytes
                Expect.equal bytes before "input unchanged"
                let diff = [ for i in 0 .. bytes.Length - 1 do if bytes[i] <> patched[i] then yield i ]
                Expect.isLessThanOrEqual diff.Length (2 * needs.Length) "at most two bytes per version"
                let reread = Elf.versionNeeds patched
                for n in needs do
                    let m = reread |> List.find (fun r -> r.Name = n.Name && r.File = n.File)
                    Expect.equal m.Flags (n.Flags ||| Elf.VerFlagWeak) $"{n.Name} weak"
        }

        testProperty "corrupted images give ArgumentException or a result, never another exception" <| fun (flips: (int * byte) list) (cutAt: int) ->
            match torchSharpNative () with
            | None -> ()
            | Some path ->
                let bytes = Array.copy (imageOf path)
                // Corrupt the header and the section table (where every offset comes from), then maybe cut.
                let shoff = int (BitConverter.ToUInt64(bytes, 40))
                for (pos, value) in flips do
                    let region = if pos % 2 = 0 then 64 else bytes.Length - shoff
                    let start = if pos % 2 = 0 then 0 else shoff
                    bytes[start + (abs (pos % region))] <- value
                let image = if cutAt % 3 = 0 then bytes[.. abs cutAt % bytes.Length] else bytes
                for f in [ (fun b -> Elf.versionNeeds b |> ignore); (fun b -> Elf.versionDefinitions b |> ignore)
                           (fun b -> Elf.relocatedSymbols b |> ignore) ] do
                    try f image with
                    | :? ArgumentException -> ()

        test "readers reject a truncated ELF image with a clear message" {
            match torchSharpNative () with
            | None -> skiptest "not Linux x64"
            | Some path ->
                let bytes = File.ReadAllBytes path
                let cut = bytes[.. bytes.Length / 2]
                let e = Expect.throwsC (fun () -> Elf.versionNeeds cut |> ignore) id
                Expect.stringContains e.Message "ELF" "says what is wrong"
        }
    ]
