namespace Vct.Core.Data

open System
open System.IO

/// Confinement of dataset paths: names read from metadata CSVs become single path components, and writers stay
/// inside their output folder.
[<RequireQualifiedAccess>]
module SafePath =
    /// Why `value` cannot be used as one file or folder name, or None when it can: empty, NUL, '.' or '..', a path
    /// separator ('/' or '\'), an absolute or drive path.
    let problem (value: string) : string option =
        if String.IsNullOrEmpty value then Some "is empty"
        elif value.Contains '\000' then Some "holds a NUL character"
        elif value = "." || value = ".." then Some "is a folder reference"
        elif value.Contains '/' || value.Contains '\\' then Some "holds a path separator"
        elif Path.IsPathRooted value || (value.Length >= 2 && value[1] = ':' && Char.IsAsciiLetter value[0]) then
            Some "is an absolute path"
        else None

    /// `value` (a name, category, split or uid read from line `line` of `csv`) when it is one plain name; otherwise
    /// an InvalidDataException naming the CSV, the line and the problem.
    let name (csv: string) (line: int) (what: string) (value: string) : string =
        match problem value with
        | None -> value
        | Some why ->
            let shown = if isNull value then "" else value.Replace("\000", "\\0")
            raise (InvalidDataException($"{csv}: line {line}: {what} '{shown}' {why} (it must be a plain file name)"))

    /// `path` after checking that writing it stays inside `root`: its full path lies below `root`, and no part of it
    /// that exists below `root` (a folder on the way or the file itself) is a symbolic link leading outside `root`.
    /// Otherwise an IOException naming the path and the link.
    let checkWrite (root: string) (path: string) : string =
        let rootFull = Path.TrimEndingDirectorySeparator(Path.GetFullPath root)
        let full = Path.GetFullPath path
        let inside (p: string) =
            p = rootFull || p.StartsWith(rootFull + string Path.DirectorySeparatorChar, StringComparison.Ordinal)
        if not (inside full) then raise (IOException($"{path}: refusing to write outside the output folder {rootFull}"))
        let mutable cur = rootFull
        for part in Path.GetRelativePath(rootFull, full).Split(Path.DirectorySeparatorChar) do
            cur <- Path.Combine(cur, part)
            let info = FileInfo cur
            if not (isNull info.LinkTarget) then
                let target = info.ResolveLinkTarget true
                let resolved = if isNull target then info.LinkTarget else Path.GetFullPath target.FullName
                if not (inside resolved) then
                    raise (IOException($"{path}: refusing to write through the symbolic link {cur} -> {resolved}, which leads outside the output folder {rootFull}"))
        path
