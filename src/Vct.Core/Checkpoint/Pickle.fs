namespace Vct.Core.Checkpoint

open System
open System.Collections.Generic
open System.IO
open System.Numerics
open System.Text

/// A small pickle machine (protocols 0 to 5) that builds `PyValue`s and never runs code: callables are
/// resolved by `Resolve` or become `PyValue.Object` placeholders. Reference: CPython Lib/pickle.py,
/// `_Unpickler`, and Lib/pickletools.py for the opcode list.
[<RequireQualifiedAccess>]
module Pickle =
    /// Hooks that give meaning to persistent ids and to selected callables.
    type Hooks =
        { /// Persistent ids (PERSID, BINPERSID) -> value; raises when the id is not understood.
          PersistentLoad: PyValue -> PyValue
          /// (module, name, args) -> Some value for callables this reader understands, None for a placeholder.
          Resolve: string -> string -> PyValue[] -> PyValue option }

    /// No persistent ids allowed; only the built-in resolutions.
    let noHooks =
        { PersistentLoad = fun pid -> raise (InvalidDataException $"unexpected persistent id {pid.TypeName} in a plain pickle")
          Resolve = fun _ _ _ -> Option.None }

    let private fail (pos: int64) (msg: string) = raise (InvalidDataException $"pickle: {msg} (at byte {pos})")

    /// Byte reader over a stream that reports truncation as InvalidDataException.
    type private Reader(stream: Stream) =
        let buf = Array.zeroCreate<byte> 8
        member _.Position = stream.Position
        member _.Byte() =
            let b = stream.ReadByte()
            if b < 0 then fail stream.Position "unexpected end of data (truncated file?)"
            byte b
        member _.Bytes(n: int64) =
            if n < 0L || n > int64 Array.MaxLength then fail stream.Position $"bad length {n}"
            // A declared length is checked against the bytes that remain before anything is allocated.
            if stream.CanSeek && n > stream.Length - stream.Position then
                fail stream.Position $"a length of {n} bytes, but only {stream.Length - stream.Position} remain (truncated file?)"
            let a = Array.zeroCreate<byte> (int n)
            let mutable got = 0
            while got < a.Length do
                let r = stream.Read(a, got, a.Length - got)
                if r <= 0 then fail stream.Position $"unexpected end of data: wanted {n} bytes, got {got} (truncated file?)"
                got <- got + r
            a
        member this.Fixed(n: int) =
            for i in 0 .. n - 1 do buf[i] <- this.Byte()
            buf
        member this.U8() = int (this.Byte())
        member this.U16() = let b = this.Fixed 2 in int b[0] ||| (int b[1] <<< 8)
        member this.I32() = BitConverter.ToInt32(this.Fixed 4, 0)
        member this.U32() = BitConverter.ToUInt32(this.Fixed 4, 0)
        member this.I64() = BitConverter.ToInt64(this.Fixed 8, 0)
        member this.Line() =
            let sb = StringBuilder()
            let mutable c = this.Byte()
            while c <> byte '\n' do
                sb.Append(char c) |> ignore
                c <- this.Byte()
            sb.ToString().TrimEnd('\r')

    let private ofBigInt (v: BigInteger) =
        if v >= BigInteger Int64.MinValue && v <= BigInteger Int64.MaxValue then PyValue.Int(int64 v) else PyValue.BigInt v

    /// Little-endian two's-complement bytes (LONG1, LONG4) -> int.
    let private decodeLong (b: byte[]) =
        if b.Length = 0 then PyValue.Int 0L else ofBigInt (BigInteger(ReadOnlySpan b, false, false))

    let private latin1 (b: byte[]) = Encoding.Latin1.GetString b

    /// Body of a Python 2 string literal (protocol 0 STRING) -> bytes: \\, \', \", \n, \r, \t, \xHH, \ooo.
    let private unescapeBytes (pos: int64) (s: string) =
        let out = ResizeArray<byte>()
        let mutable i = 0
        while i < s.Length do
            if s[i] <> '\\' || i + 1 >= s.Length then
                out.Add(byte s[i])
                i <- i + 1
            else
                let c = s[i + 1]
                i <- i + 2
                match c with
                | 'n' -> out.Add 10uy
                | 'r' -> out.Add 13uy
                | 't' -> out.Add 9uy
                | 'x' when i + 2 <= s.Length ->
                    out.Add(Convert.ToByte(s.Substring(i, 2), 16))
                    i <- i + 2
                | c when c >= '0' && c <= '7' ->
                    let mutable j = i - 1
                    while j < s.Length && j < i + 2 && s[j] >= '0' && s[j] <= '7' do j <- j + 1
                    out.Add(byte (Convert.ToInt32(s.Substring(i - 1, j - i + 1), 8)))
                    i <- j
                | '\\' | '\'' | '"' -> out.Add(byte c)
                | _ -> fail pos $"unsupported escape \\{c} in STRING"
        out.ToArray()

    /// raw-unicode-escape text (protocol 0 UNICODE) -> string: only \uXXXX and \UXXXXXXXX are escapes.
    let private unescapeUnicode (s: string) =
        let sb = StringBuilder()
        let mutable i = 0
        while i < s.Length do
            if s[i] = '\\' && i + 5 < s.Length && s[i + 1] = 'u' then
                sb.Append(char (Convert.ToInt32(s.Substring(i + 2, 4), 16))) |> ignore
                i <- i + 6
            elif s[i] = '\\' && i + 9 < s.Length && s[i + 1] = 'U' then
                sb.Append(Char.ConvertFromUtf32(Convert.ToInt32(s.Substring(i + 2, 8), 16))) |> ignore
                i <- i + 10
            else
                sb.Append(s[i]) |> ignore
                i <- i + 1
        sb.ToString()

    /// Python 2 `str` literal of protocol 0 (STRING): quoted, with escapes.
    let private unquote (pos: int64) (s: string) =
        if s.Length < 2 || s[0] <> s[s.Length - 1] || (s[0] <> '\'' && s[0] <> '"') then fail pos "bad STRING literal"
        unescapeBytes pos (s.Substring(1, s.Length - 2))

    /// Calls that every reader understands: containers and Python 3's encoding of bytes in protocol 2.
    let private builtin (moduleName: string) (name: string) (args: PyValue[]) : PyValue option =
        match moduleName, name, args with
        | "collections", "OrderedDict", [||] ->
            let d = PyDict()
            d.ClassName <- "collections.OrderedDict"
            Some(PyValue.Dict d)
        | ("builtins" | "__builtin__"), "dict", [||] -> Some(PyValue.Dict(PyDict()))
        | ("builtins" | "__builtin__"), "list", [||] -> Some(PyValue.List(ResizeArray()))
        | ("builtins" | "__builtin__"), ("set" | "frozenset"), [||] -> Some(PyValue.Set(ResizeArray()))
        | ("builtins" | "__builtin__"), ("set" | "frozenset"), [| PyValue.List items |] -> Some(PyValue.Set(ResizeArray items))
        | ("builtins" | "__builtin__"), ("bytes" | "bytearray"), [||] -> Some(PyValue.Bytes [||])
        | ("builtins" | "__builtin__"), ("bytes" | "bytearray"), [| PyValue.Bytes b |] -> Some(PyValue.Bytes b)
        | ("builtins" | "__builtin__"), ("bytes" | "bytearray"), [| PyValue.List items |] ->
            Some(PyValue.Bytes [| for v in items -> match v with PyValue.Int i -> byte i | _ -> 0uy |])
        | "_codecs", "encode", [| PyValue.Str s; PyValue.Str "latin1" |]
        | "_codecs", "encode", [| PyValue.Str s; PyValue.Str "latin-1" |] -> Some(PyValue.Bytes(Encoding.Latin1.GetBytes s))
        | "_codecs", "encode", [| PyValue.Str s; PyValue.Str("utf-8" | "utf8") |] -> Some(PyValue.Bytes(Encoding.UTF8.GetBytes s))
        | _ -> Option.None

    let private call (hooks: Hooks) (pos: int64) (callable: PyValue) (args: PyValue[]) =
        match callable with
        | PyValue.Global(m, n) ->
            match builtin m n args with
            | Some v -> v
            | Option.None ->
                match hooks.Resolve m n args with
                | Some v -> v
                | Option.None -> PyValue.Object(PyObject(m, n, args))
        | other -> fail pos $"cannot call a {other.TypeName}"

    let private setItem (pos: int64) (target: PyValue) (k: PyValue) (v: PyValue) =
        match target with
        | PyValue.Dict d -> d.Set(k, v)
        | PyValue.Object o -> o.DictItems.Set(k, v)
        | other -> fail pos $"SETITEM on a {other.TypeName}"

    let private append (pos: int64) (target: PyValue) (v: PyValue) =
        match target with
        | PyValue.List l -> l.Add v
        | PyValue.Set s -> s.Add v
        | PyValue.Object o -> o.ListItems.Add v
        | other -> fail pos $"APPEND on a {other.TypeName}"

    let private build (target: PyValue) (state: PyValue) =
        match target with
        | PyValue.Object o -> o.State <- state
        | PyValue.Dict d -> d.Attributes <- state
        | _ -> () // a tensor's or list's __dict__: nothing this reader needs

    /// Reads one pickle from the current position of `stream` up to and including its STOP opcode;
    /// the stream is left just after STOP. Truncation and unknown opcodes raise InvalidDataException.
    let load (hooks: Hooks) (stream: Stream) : PyValue =
        let r = Reader stream
        let stack = Stack<PyValue>()
        let marks = Stack<int>()
        let memo = Dictionary<int64, PyValue>()
        // A sentinel on the stack for MARK would need a PyValue case; marks keep stack depths instead.
        let pop () = if stack.Count = 0 then fail r.Position "stack underflow" else stack.Pop()
        let popMark () =
            if marks.Count = 0 then fail r.Position "MARK missing"
            let depth = marks.Pop()
            let n = stack.Count - depth
            if n < 0 then fail r.Position "stack underflow below MARK"
            let items = Array.zeroCreate<PyValue> n
            for i in n - 1 .. -1 .. 0 do items[i] <- stack.Pop()
            items
        let top () = if stack.Count = 0 then fail r.Position "stack underflow" else stack.Peek()
        let memoGet (i: int64) =
            match memo.TryGetValue i with
            | true, v -> stack.Push v
            | _ -> fail r.Position $"memo key {i} not found"
        let mutable result = Option.None
        while result.IsNone do
            let pos = r.Position
            let op = r.Byte()
            match char op with
            | '\x80' -> // PROTO
                let v = r.U8()
                if v > 5 then fail pos $"unsupported pickle protocol {v}"
            | '\x95' -> r.Fixed 8 |> ignore // FRAME: a size hint only
            | '.' -> result <- Some(pop ()) // STOP
            | '(' -> marks.Push stack.Count // MARK
            | '0' -> // POP; protocol 0 also pops a MARK this way (recursive tuples)
                if marks.Count > 0 && marks.Peek() = stack.Count then marks.Pop() |> ignore else pop () |> ignore
            | '1' -> popMark () |> ignore // POP_MARK
            | '2' -> stack.Push(top ()) // DUP
            | 'N' -> stack.Push PyValue.None
            | '\x88' -> stack.Push(PyValue.Bool true)
            | '\x89' -> stack.Push(PyValue.Bool false)
            | 'J' -> stack.Push(PyValue.Int(int64 (r.I32()))) // BININT
            | 'K' -> stack.Push(PyValue.Int(int64 (r.U8()))) // BININT1
            | 'M' -> stack.Push(PyValue.Int(int64 (r.U16()))) // BININT2
            | 'I' -> // INT (protocol 0), also "I01\n" / "I00\n" for booleans
                match r.Line() with
                | "01" -> stack.Push(PyValue.Bool true)
                | "00" -> stack.Push(PyValue.Bool false)
                | s ->
                    match BigInteger.TryParse s with
                    | true, v -> stack.Push(ofBigInt v)
                    | _ -> fail pos $"bad INT literal '{s}'"
            | 'L' -> // LONG (protocol 0)
                let s = r.Line().TrimEnd('L')
                match BigInteger.TryParse s with
                | true, v -> stack.Push(ofBigInt v)
                | _ -> fail pos $"bad LONG literal '{s}'"
            | '\x8a' -> stack.Push(decodeLong (r.Bytes(int64 (r.U8())))) // LONG1
            | '\x8b' -> // LONG4
                let n = r.I32()
                stack.Push(decodeLong (r.Bytes(int64 n)))
            | 'F' -> // FLOAT (protocol 0)
                let s = r.Line()
                match Double.TryParse(s, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
                | true, v -> stack.Push(PyValue.Float v)
                | _ -> fail pos $"bad FLOAT literal '{s}'"
            | 'G' -> // BINFLOAT: big-endian double
                let b = r.Fixed 8
                stack.Push(PyValue.Float(Buffers.Binary.BinaryPrimitives.ReadDoubleBigEndian(ReadOnlySpan(b, 0, 8))))
            | 'S' -> stack.Push(PyValue.Str(latin1 (unquote pos (r.Line())))) // STRING (Python 2 str)
            | 'T' -> stack.Push(PyValue.Str(latin1 (r.Bytes(int64 (r.U32()))))) // BINSTRING
            | 'U' -> stack.Push(PyValue.Str(latin1 (r.Bytes(int64 (r.U8()))))) // SHORT_BINSTRING
            | 'V' -> stack.Push(PyValue.Str(unescapeUnicode (r.Line()))) // UNICODE (raw-unicode-escape)
            | 'X' -> stack.Push(PyValue.Str(Encoding.UTF8.GetString(r.Bytes(int64 (r.U32()))))) // BINUNICODE
            | '\x8c' -> stack.Push(PyValue.Str(Encoding.UTF8.GetString(r.Bytes(int64 (r.U8()))))) // SHORT_BINUNICODE
            | '\x8d' -> stack.Push(PyValue.Str(Encoding.UTF8.GetString(r.Bytes(r.I64())))) // BINUNICODE8
            | 'B' -> stack.Push(PyValue.Bytes(r.Bytes(int64 (r.U32())))) // BINBYTES
            | 'C' -> stack.Push(PyValue.Bytes(r.Bytes(int64 (r.U8())))) // SHORT_BINBYTES
            | '\x8e' | '\x96' -> stack.Push(PyValue.Bytes(r.Bytes(r.I64()))) // BINBYTES8, BYTEARRAY8
            | '\x98' -> () // READONLY_BUFFER: no-op on our values
            | '\x97' -> fail pos "out-of-band buffers (NEXT_BUFFER) are not supported"
            | ')' -> stack.Push(PyValue.Tuple [||])
            | '\x85' -> let a = pop () in stack.Push(PyValue.Tuple [| a |])
            | '\x86' ->
                let b = pop ()
                let a = pop ()
                stack.Push(PyValue.Tuple [| a; b |])
            | '\x87' ->
                let c = pop ()
                let b = pop ()
                let a = pop ()
                stack.Push(PyValue.Tuple [| a; b; c |])
            | 't' -> stack.Push(PyValue.Tuple(popMark ()))
            | ']' -> stack.Push(PyValue.List(ResizeArray()))
            | 'l' -> stack.Push(PyValue.List(ResizeArray(popMark ())))
            | '}' -> stack.Push(PyValue.Dict(PyDict()))
            | 'd' -> // DICT
                let items = popMark ()
                if items.Length % 2 <> 0 then fail pos "odd number of items for DICT"
                let d = PyDict()
                for i in 0 .. 2 .. items.Length - 1 do d.Set(items[i], items[i + 1])
                stack.Push(PyValue.Dict d)
            | '\x8f' -> stack.Push(PyValue.Set(ResizeArray())) // EMPTY_SET
            | '\x91' -> stack.Push(PyValue.Set(ResizeArray(popMark ()))) // FROZENSET
            | 'a' -> // APPEND
                let v = pop ()
                append pos (top ()) v
            | 'e' | '\x90' -> // APPENDS, ADDITEMS
                let items = popMark ()
                let target = top ()
                for v in items do append pos target v
            | 's' -> // SETITEM
                let v = pop ()
                let k = pop ()
                setItem pos (top ()) k v
            | 'u' -> // SETITEMS
                let items = popMark ()
                if items.Length % 2 <> 0 then fail pos "odd number of items for SETITEMS"
                let target = top ()
                for i in 0 .. 2 .. items.Length - 1 do setItem pos target items[i] items[i + 1]
            | 'p' -> // PUT
                let s = r.Line()
                match Int64.TryParse s with
                | true, i -> memo[i] <- top ()
                | _ -> fail pos $"bad PUT index '{s}'"
            | 'q' -> memo[int64 (r.U8())] <- top () // BINPUT
            | 'r' -> memo[int64 (r.U32())] <- top () // LONG_BINPUT
            | '\x94' -> memo[int64 memo.Count] <- top () // MEMOIZE
            | 'g' -> // GET
                let s = r.Line()
                match Int64.TryParse s with
                | true, i -> memoGet i
                | _ -> fail pos $"bad GET index '{s}'"
            | 'h' -> memoGet (int64 (r.U8())) // BINGET
            | 'j' -> memoGet (int64 (r.U32())) // LONG_BINGET
            | 'c' -> // GLOBAL
                let m = r.Line()
                let n = r.Line()
                stack.Push(PyValue.Global(m, n))
            | '\x93' -> // STACK_GLOBAL
                let n = pop ()
                let m = pop ()
                match m, n with
                | PyValue.Str m, PyValue.Str n -> stack.Push(PyValue.Global(m, n))
                | _ -> fail pos "STACK_GLOBAL needs two strings"
            | 'R' -> // REDUCE
                let args = pop ()
                let f = pop ()
                match args with
                | PyValue.Tuple a -> stack.Push(call hooks pos f a)
                | PyValue.None -> stack.Push(call hooks pos f [||]) // very old pickles
                | other -> fail pos $"REDUCE arguments must be a tuple, got {other.TypeName}"
            | '\x81' -> // NEWOBJ
                let args = pop ()
                let cls = pop ()
                match args with
                | PyValue.Tuple a -> stack.Push(call hooks pos cls a)
                | other -> fail pos $"NEWOBJ arguments must be a tuple, got {other.TypeName}"
            | '\x92' -> // NEWOBJ_EX: kwargs are dropped
                pop () |> ignore
                let args = pop ()
                let cls = pop ()
                match args with
                | PyValue.Tuple a -> stack.Push(call hooks pos cls a)
                | other -> fail pos $"NEWOBJ_EX arguments must be a tuple, got {other.TypeName}"
            | 'o' -> // OBJ
                let items = popMark ()
                if items.Length = 0 then fail pos "OBJ without a class"
                stack.Push(call hooks pos items[0] items[1..])
            | 'i' -> // INST
                let m = r.Line()
                let n = r.Line()
                stack.Push(call hooks pos (PyValue.Global(m, n)) (popMark ()))
            | 'b' -> // BUILD
                let state = pop ()
                build (top ()) state
            | 'P' -> stack.Push(hooks.PersistentLoad(PyValue.Str(r.Line()))) // PERSID
            | 'Q' -> stack.Push(hooks.PersistentLoad(pop ())) // BINPERSID
            | '\x82' | '\x83' | '\x84' -> fail pos "extension registry codes (EXT1/2/4) are not supported"
            | _ -> fail pos $"unknown opcode 0x{int op:x2} (not a pickle, or a corrupt one)"
        result.Value
