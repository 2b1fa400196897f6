namespace Vct.Core.Platform

open System
open System.Buffers.Binary
open System.Text

/// One version that a shared object needs from one of its dependencies (an ELF `Vernaux` entry).
type VersionNeed =
    { /// The dependency, e.g. "libstdc++.so.6" (`vn_file`).
      File: string
      /// The version name, e.g. "GLIBCXX_3.4.32" (`vna_name`).
      Name: string
      /// `vna_flags`; bit 0x2 is VER_FLG_WEAK.
      Flags: uint16
      /// The version index that `.gnu.version` uses for symbols bound to this version (`vna_other`).
      Index: uint16
      /// Byte offset of `vna_flags` inside the file: where the weak-flag patch writes.
      FlagsOffset: int }

/// Minimal reader and patcher for 64-bit little-endian ELF shared objects: just enough to read the
/// symbol-version tables (`.gnu.version_r`, `.gnu.version_d`, `.gnu.version`) and the dynamic
/// relocations, and to mark a needed version weak. Pure functions over byte arrays.
[<RequireQualifiedAccess>]
module Elf =
    /// VER_FLG_WEAK in `vna_flags`: the loader does not fail when the version is missing.
    [<Literal>]
    let VerFlagWeak = 0x2us

    let private SHT_RELA = 4u
    let private SHT_DYNSYM = 11u
    let private SHT_GNU_verdef = 0x6ffffffdu
    let private SHT_GNU_verneed = 0x6ffffffeu
    let private SHT_GNU_versym = 0x6fffffffu

    type private Section =
        { Type: uint32
          Offset: int
          Size: int
          Link: int
          Info: int
          EntSize: int }

    let private u16 (b: byte[]) (o: int) = BinaryPrimitives.ReadUInt16LittleEndian(ReadOnlySpan(b, o, 2))
    let private u32 (b: byte[]) (o: int) = BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(b, o, 4))
    let private u64 (b: byte[]) (o: int) = BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan(b, o, 8))

    let private check (what: string) (cond: bool) =
        if not cond then invalidArg "bytes" $"not a readable 64-bit little-endian ELF file: {what}"

    let private cstring (b: byte[]) (o: int) =
        check "string offset out of range" (o >= 0 && o < b.Length)
        let e = Array.IndexOf(b, 0uy, o)
        check "unterminated string" (e >= 0)
        Encoding.ASCII.GetString(b, o, e - o)

    let private sections (b: byte[]) =
        check "too short" (b.Length >= 64)
        check "bad magic" (b[0] = 0x7Fuy && b[1] = byte 'E' && b[2] = byte 'L' && b[3] = byte 'F')
        check "not ELFCLASS64" (b[4] = 2uy)
        check "not little-endian" (b[5] = 1uy)
        let shoff = int (u64 b 40)
        let shentsize = int (u16 b 58)
        let shnum = int (u16 b 60)
        check "section table out of range" (shoff > 0 && shentsize >= 64 && shoff + shnum * shentsize <= b.Length)
        [| for i in 0 .. shnum - 1 ->
               let o = shoff + i * shentsize
               { Type = u32 b (o + 4)
                 Offset = int (u64 b (o + 24))
                 Size = int (u64 b (o + 32))
                 Link = int (u32 b (o + 40))
                 Info = int (u32 b (o + 44))
                 EntSize = int (u64 b (o + 56)) } |]

    /// The sections of type `t`, each checked to lie inside the file with a valid linked section.
    let private ofType t (secs: Section[]) (b: byte[]) =
        secs
        |> Array.filter (fun s -> s.Type = t)
        |> Array.map (fun s ->
            check "section out of range" (s.Offset >= 0 && s.Size >= 0 && s.Offset <= b.Length - s.Size)
            check "bad section link" (s.Link >= 0 && s.Link < secs.Length)
            s)

    /// Entry counts from the file are bounded by what the section can hold (no runaway loops).
    let private bounded (count: int) (s: Section) (entrySize: int) = max 0 (min count (s.Size / entrySize))

    /// Every version the object needs (`.gnu.version_r`), in file order.
    let versionNeeds (bytes: byte[]) : VersionNeed list =
        let secs = sections bytes
        [ for s in ofType SHT_GNU_verneed secs bytes do
              let strtab = secs[s.Link].Offset
              let mutable vn = s.Offset
              for _ in 1 .. bounded s.Info s 16 do
                  let cnt = bounded (int (u16 bytes (vn + 2))) s 16
                  let file = cstring bytes (strtab + int (u32 bytes (vn + 4)))
                  let mutable aux = vn + int (u32 bytes (vn + 8))
                  for _ in 1 .. cnt do
                      yield
                          { File = file
                            Name = cstring bytes (strtab + int (u32 bytes (aux + 8)))
                            Flags = u16 bytes (aux + 4)
                            Index = u16 bytes (aux + 6) &&& 0x7fffus
                            FlagsOffset = aux + 4 }
                      aux <- aux + int (u32 bytes (aux + 12))
                  vn <- vn + int (u32 bytes (vn + 12)) ]

    /// Every version the object defines (`.gnu.version_d`), e.g. "GLIBCXX_3.4.30" for libstdc++.
    let versionDefinitions (bytes: byte[]) : Set<string> =
        let secs = sections bytes
        set [ for s in ofType SHT_GNU_verdef secs bytes do
                  let strtab = secs[s.Link].Offset
                  let mutable vd = s.Offset
                  for _ in 1 .. bounded s.Info s 20 do
                      let aux = vd + int (u32 bytes (vd + 12))
                      yield cstring bytes (strtab + int (u32 bytes aux))
                      vd <- vd + int (u32 bytes (vd + 16)) ]

    /// Names of the dynamic symbols bound to version index `index` (from `.gnu.version`).
    let symbolsOfVersion (bytes: byte[]) (index: uint16) : (int * string) list =
        let secs = sections bytes
        match ofType SHT_DYNSYM secs bytes, ofType SHT_GNU_versym secs bytes with
        | [| dynsym |], [| versym |] ->
            let strtab = secs[dynsym.Link].Offset
            let count = min (dynsym.Size / 24) (versym.Size / 2)
            [ for i in 0 .. count - 1 do
                  if u16 bytes (versym.Offset + 2 * i) &&& 0x7fffus = index then
                      yield i, cstring bytes (strtab + int (u32 bytes (dynsym.Offset + 24 * i))) ]
        | _ -> []

    /// Indices of dynamic symbols referenced by any relocation in a RELA section tied to `.dynsym`.
    let relocatedSymbols (bytes: byte[]) : Set<int> =
        let secs = sections bytes
        let dynsymIdx = secs |> Array.tryFindIndex (fun s -> s.Type = SHT_DYNSYM) |> Option.defaultValue -1
        set [ for s in ofType SHT_RELA secs bytes do
                  if s.Link = dynsymIdx then
                      for i in 0 .. s.Size / 24 - 1 do
                          yield int (u64 bytes (s.Offset + 24 * i + 8) >>> 32) ]

    /// Returns a copy with VER_FLG_WEAK set on each of `needs` (2 bytes each); the input is unchanged.
    let markWeak (needs: VersionNeed seq) (bytes: byte[]) : byte[] =
        let copy = Array.copy bytes
        for n in needs do
            BinaryPrimitives.WriteUInt16LittleEndian(Span(copy, n.FlagsOffset, 2), n.Flags ||| VerFlagWeak)
        copy
