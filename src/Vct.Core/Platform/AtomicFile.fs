namespace Vct.Core.Platform

open System
open System.IO

/// Files written by temp + rename in the target's own folder: a reader never sees a torn file, and a failure
/// leaves the previous file (if any) untouched.
[<RequireQualifiedAccess>]
module AtomicFile =
    /// Writes `path` atomically through `write`, which receives the temporary path to create (the folder must exist).
    let writeWith (path: string) (write: string -> unit) =
        let full = Path.GetFullPath path
        let tmp = Path.Combine(Path.GetDirectoryName full, $".{Path.GetFileName full}.{Guid.NewGuid():N}.tmp")
        try
            write tmp
            File.Move(tmp, full, true)
        with _ ->
            (try File.Delete tmp with _ -> ())
            reraise ()

    /// Writes `bytes` to `path` atomically (the folder must exist).
    let writeAllBytes (path: string) (bytes: byte[]) =
        writeWith path (fun tmp -> File.WriteAllBytes(tmp, bytes))

    /// Writes text (UTF-8, no BOM) atomically.
    let writeAllText (path: string) (text: string) =
        writeAllBytes path (Text.UTF8Encoding(false).GetBytes text)
