namespace Vct.Core.Checkpoint

open System
open System.Collections.Generic
open System.Numerics
open Vct.Core
open Vct.Core.Platform

/// A Python value as read from a pickle. Containers are mutable because the pickle machine fills them
/// after creation (APPEND, SETITEMS, BUILD), and memoised references share one instance.
[<RequireQualifiedAccess; NoComparison; CustomEquality>]
type PyValue =
    | None
    | Bool of bool
    | Int of int64
    /// An integer outside the int64 range (pickle LONG).
    | BigInt of BigInteger
    | Float of float
    | Str of string
    | Bytes of byte[]
    | Tuple of PyValue[]
    | List of ResizeArray<PyValue>
    | Dict of PyDict
    | Set of ResizeArray<PyValue>
    /// A class or function referenced by name (`module.name`) but not called.
    | Global of moduleName: string * name: string
    /// An instance of a class this reader does not model: a placeholder that keeps what the pickle said.
    | Object of PyObject
    /// A tensor rebuilt on the CPU with its original dtype, shape, strides and storage sharing.
    | Tensor of Tensor
    /// A storage saved on its own (not through a tensor), as a 1-D tensor over the whole storage.
    | Storage of key: string * data: Tensor

    /// Equality of two values that are not both tuples.
    static member private ShallowEquals(x: PyValue, y: PyValue) =
        match x, y with
        | PyValue.None, PyValue.None -> true
        | PyValue.Bool a, PyValue.Bool b -> a = b
        | PyValue.Int a, PyValue.Int b -> a = b
        | PyValue.BigInt a, PyValue.BigInt b -> a = b
        | PyValue.Float a, PyValue.Float b -> a.Equals b
        | PyValue.Str a, PyValue.Str b -> a = b
        | PyValue.Bytes a, PyValue.Bytes b -> a.AsSpan().SequenceEqual(ReadOnlySpan b)
        | PyValue.Global(m1, n1), PyValue.Global(m2, n2) -> m1 = m2 && n1 = n2
        | PyValue.List a, PyValue.List b -> obj.ReferenceEquals(a, b)
        | PyValue.Dict a, PyValue.Dict b -> obj.ReferenceEquals(a, b)
        | PyValue.Set a, PyValue.Set b -> obj.ReferenceEquals(a, b)
        | PyValue.Object a, PyValue.Object b -> obj.ReferenceEquals(a, b)
        | PyValue.Tensor a, PyValue.Tensor b -> obj.ReferenceEquals(a, b)
        | PyValue.Storage(k1, _), PyValue.Storage(k2, _) -> k1 = k2
        | _ -> false

    /// Python-like equality for hashable keys: numbers and strings by value, tuples item by item, other containers
    /// by reference. Iterative (an explicit stack), so a deeply nested tuple from a hostile pickle cannot overflow
    /// the thread's stack.
    override this.Equals(other: obj) =
        match other with
        | :? PyValue as o ->
            let pending = Stack<struct (PyValue * PyValue)>()
            pending.Push(struct (this, o))
            let mutable same = true
            while same && pending.Count > 0 do
                let struct (x, y) = pending.Pop()
                match x, y with
                | PyValue.Tuple a, PyValue.Tuple b ->
                    if not (obj.ReferenceEquals(a, b)) then
                        if a.Length <> b.Length then same <- false
                        else for i in a.Length - 1 .. -1 .. 0 do pending.Push(struct (a[i], b[i]))
                | _ -> same <- PyValue.ShallowEquals(x, y)
            same
        | _ -> false

    /// Hash of one value that is not a tuple.
    static member private ShallowHash(v: PyValue) =
        match v with
        | PyValue.None -> 0
        | PyValue.Bool b -> hash b
        | PyValue.Int i -> hash i
        | PyValue.BigInt i -> hash i
        | PyValue.Float f -> hash f
        | PyValue.Str s -> hash s
        | PyValue.Bytes b -> b.Length
        | PyValue.Tuple a -> a.Length
        | PyValue.Global(m, n) -> hash (m, n)
        | PyValue.Storage(k, _) -> hash k
        | PyValue.List a -> LanguagePrimitives.PhysicalHash a
        | PyValue.Dict a -> LanguagePrimitives.PhysicalHash a
        | PyValue.Set a -> LanguagePrimitives.PhysicalHash a
        | PyValue.Object a -> LanguagePrimitives.PhysicalHash a
        | PyValue.Tensor a -> LanguagePrimitives.PhysicalHash a

    /// Iterative and bounded: the first PyValue.HashBudget values of a tuple tree in depth-first order (equal
    /// values visit the same ones, so equal values hash alike), whatever its depth or width.
    override this.GetHashCode() =
        let pending = Stack<PyValue>()
        pending.Push this
        let mutable h = 17
        let mutable budget = PyValue.HashBudget
        while budget > 0 && pending.Count > 0 do
            let v = pending.Pop()
            budget <- budget - 1
            h <- h * 31 + PyValue.ShallowHash v
            match v with
            | PyValue.Tuple a -> for i in min (a.Length - 1) budget .. -1 .. 0 do pending.Push a[i]
            | _ -> ()
        h

    /// Values of a tuple tree that its hash looks at.
    static member HashBudget = 64

    /// Short text for messages: the Python type name, or the class of a placeholder.
    member this.TypeName =
        match this with
        | PyValue.None -> "None"
        | PyValue.Bool _ -> "bool"
        | PyValue.Int _ | PyValue.BigInt _ -> "int"
        | PyValue.Float _ -> "float"
        | PyValue.Str _ -> "str"
        | PyValue.Bytes _ -> "bytes"
        | PyValue.Tuple _ -> "tuple"
        | PyValue.List _ -> "list"
        | PyValue.Dict _ -> "dict"
        | PyValue.Set _ -> "set"
        | PyValue.Global(m, n) -> $"<class {m}.{n}>"
        | PyValue.Object o -> $"{o.Module}.{o.Name}"
        | PyValue.Tensor _ -> "torch.Tensor"
        | PyValue.Storage _ -> "torch.Storage"

    /// The value under a string key of a dict (None when this is not a dict or the key is absent).
    member this.TryItem(key: string) =
        match this with
        | PyValue.Dict d -> d.TryFind(PyValue.Str key)
        | _ -> Option.None

/// An insertion-ordered Python dict (also OrderedDict). `Attributes` holds the instance state that BUILD
/// gives a dict subclass, e.g. the `_metadata` of a PyTorch state dict.
and PyDict() =
    let keys = ResizeArray<PyValue>()
    let values = ResizeArray<PyValue>()
    let index = Dictionary<PyValue, int>()
    /// Number of items.
    member _.Count = keys.Count
    /// Sets or replaces an item; a new key goes last, a replaced key keeps its place (as in Python).
    member _.Set(key: PyValue, value: PyValue) =
        match index.TryGetValue key with
        | true, i -> values[i] <- value
        | _ ->
            index[key] <- keys.Count
            keys.Add key
            values.Add value
    /// The value of `key`, if present.
    member _.TryFind(key: PyValue) =
        match index.TryGetValue key with
        | true, i -> Some values[i]
        | _ -> Option.None
    /// Items in insertion order.
    member _.Items = Seq.init keys.Count (fun i -> keys[i], values[i])
    /// Instance attributes set by BUILD (None when there were none).
    member val Attributes = PyValue.None with get, set
    /// Class of a dict subclass ("builtins.dict" for a plain dict).
    member val ClassName = "builtins.dict" with get, set

/// Placeholder for an object of a class this reader does not model (numpy arrays, optimizer or scheduler
/// objects, ...): the callable's name, its arguments, and the state and items the pickle gave it.
and PyObject(moduleName: string, name: string, args: PyValue[]) =
    /// Module of the class or factory function, e.g. "numpy.core.multiarray".
    member _.Module = moduleName
    /// Name of the class or factory function, e.g. "_reconstruct".
    member _.Name = name
    /// Arguments of the call (REDUCE) or of `cls.__new__` (NEWOBJ).
    member _.Args = args
    /// The `__setstate__` argument given by BUILD (None when there was none).
    member val State = PyValue.None with get, set
    /// Items appended to a list subclass (APPEND, APPENDS).
    member val ListItems = ResizeArray<PyValue>()
    /// Items set on a dict subclass (SETITEM, SETITEMS).
    member val DictItems = PyDict()
    override _.ToString() = $"<{moduleName}.{name} placeholder>"
