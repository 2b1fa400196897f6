namespace Vct.Core.Platform

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.IO
open System.Threading

/// Child processes (ffmpeg, ffprobe). Every argument, file names included, is passed as one item of
/// `ProcessStartInfo.ArgumentList`, never through a command string, so no name can inject options.
[<RequireQualifiedAccess>]
module ChildProcess =
    /// A started child process with its stderr collected on a background thread (last lines kept).
    type Child(exe: string, args: string list, redirectStdin: bool, onStderrLine: string -> unit) =
        let psi =
            ProcessStartInfo(exe, UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true,
                             RedirectStandardInput = redirectStdin, CreateNoWindow = true)
        do for a in args do psi.ArgumentList.Add a
        let proc = Process.Start psi
        let tail = ConcurrentQueue<string>()
        let stderrDone = new ManualResetEventSlim(false)
        let reader =
            Thread((fun () ->
                try
                    try
                        let mutable line = proc.StandardError.ReadLine()
                        while not (isNull line) do
                            onStderrLine line
                            if not (line.Contains "Parsed_showinfo") then
                                tail.Enqueue line
                                while tail.Count > 20 do tail.TryDequeue() |> ignore
                            line <- proc.StandardError.ReadLine()
                    with _ -> ()
                finally
                    stderrDone.Set()), IsBackground = true, Name = "ffmpeg-stderr")
        do reader.Start()
        member _.Process = proc
        member _.Stdout : Stream = proc.StandardOutput.BaseStream
        member _.Stdin : Stream = proc.StandardInput.BaseStream
        /// The last meaningful stderr line (for error messages).
        member _.LastError =
            tail.ToArray()
            |> Array.filter (fun l -> l.Trim() <> "" && not (l.StartsWith "  ") && not (l.StartsWith "Stream mapping"))
            |> Array.tryLast
            |> Option.map (fun l -> l.Trim())
            |> Option.defaultValue "no message"
        /// Waits for the exit (and the stderr reader); returns the exit code.
        member _.Wait() =
            proc.WaitForExit()
            stderrDone.Wait(5000) |> ignore
            proc.ExitCode
        member _.Kill() =
            try if not proc.HasExited then proc.Kill true with _ -> ()
        interface IDisposable with
            member this.Dispose() =
                this.Kill()
                proc.Dispose()

    /// A local file as an ffmpeg/ffprobe input or output argument: the `file:` protocol and a full path, so that no
    /// name (one that starts with '-', holds ':' or quotes) is read as an option or a protocol.
    let fileArg (path: string) = "file:" + Path.GetFullPath path

    /// Runs a program to the end; returns (exit code, stdout, last stderr line).
    let run (exe: string) (args: string list) : int * string * string =
        use c = new Child(exe, args, false, ignore)
        let out = c.Process.StandardOutput.ReadToEnd()
        let code = c.Wait()
        code, out, c.LastError

