namespace Vct.Tests;

using System.Reflection;

/// <summary>The facade's public surface is plain C#: no F# type (options, lists, maps, records, unions, functions) and no tuple.</summary>
public sealed class PublicApiTests
{
    static readonly Assembly Facade = typeof(VctSegmenter).Assembly;
    static readonly Assembly Core = typeof(Vct.Core.Subset).Assembly;

    static IEnumerable<Type> Expand(Type t)
    {
        yield return t;
        if (t.HasElementType) foreach (var e in Expand(t.GetElementType()!)) yield return e;
        if (t.IsGenericType) foreach (var a in t.GetGenericArguments()) foreach (var e in Expand(a)) yield return e;
    }

    static string? Why(Type t)
    {
        if (t.IsGenericParameter) return null;
        if (t.Namespace?.StartsWith("Microsoft.FSharp", StringComparison.Ordinal) == true) return "an F# type";
        if (t.Assembly == Core) return "a Vct.Core (F#) type";
        if (t.FullName?.StartsWith("System.ValueTuple", StringComparison.Ordinal) == true || t.FullName?.StartsWith("System.Tuple", StringComparison.Ordinal) == true)
            return "a tuple";
        return null;
    }

    static IEnumerable<(string Where, Type Type)> Signatures(Type owner)
    {
        const BindingFlags flags = BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;
        if (owner.BaseType is { } b) yield return ($"{owner.Name} base type", b);
        foreach (var i in owner.GetInterfaces()) yield return ($"{owner.Name} interface", i);
        foreach (var m in owner.GetMethods(flags))
        {
            yield return ($"{owner.Name}.{m.Name} return", m.ReturnType);
            foreach (var p in m.GetParameters()) yield return ($"{owner.Name}.{m.Name}({p.Name})", p.ParameterType);
        }
        foreach (var c in owner.GetConstructors(flags))
            foreach (var p in c.GetParameters()) yield return ($"{owner.Name}..ctor({p.Name})", p.ParameterType);
        foreach (var p in owner.GetProperties(flags)) yield return ($"{owner.Name}.{p.Name}", p.PropertyType);
        foreach (var f in owner.GetFields(flags)) yield return ($"{owner.Name}.{f.Name}", f.FieldType);
        foreach (var e in owner.GetEvents(flags)) yield return ($"{owner.Name}.{e.Name}", e.EventHandlerType!);
    }

    [Fact]
    public void No_public_signature_of_the_facade_uses_an_FSharp_type_or_a_tuple()
    {
        var offenders =
            (from t in Facade.GetExportedTypes()
             from s in Signatures(t)
             from part in Expand(s.Type)
             let why = Why(part)
             where why is not null
             select $"{s.Where}: {part.FullName} is {why}").Distinct().ToList();
        Assert.True(offenders.Count == 0, "F# types in the public API:\n" + string.Join("\n", offenders));
    }

    [Fact]
    public void The_check_itself_sees_F_sharp_types()
    {
        // The rule would catch an F# option, an F# list, a Vct.Core record and a tuple.
        Assert.NotNull(Why(typeof(Microsoft.FSharp.Core.FSharpOption<int>)));
        Assert.NotNull(Why(typeof(Microsoft.FSharp.Collections.FSharpList<string>)));
        Assert.NotNull(Why(typeof(Vct.Core.Checkpoint.LoadReport)));
        Assert.NotNull(Why(typeof((int, string))));
        Assert.Null(Why(typeof(IReadOnlyList<string>)));
    }

    [Fact]
    public void Every_public_member_has_XML_documentation()
    {
        var xml = Path.ChangeExtension(Facade.Location, ".xml");
        Assert.True(File.Exists(xml), $"{xml}: the facade's XML documentation file");
        var documented = System.Xml.Linq.XDocument.Load(xml).Descendants("member")
            .Select(m => (string)m.Attribute("name")!).ToHashSet();
        var missing = Facade.GetExportedTypes()
            .Where(t => !typeof(Delegate).IsAssignableFrom(t))
            .Select(t => "T:" + t.FullName!.Replace('+', '.'))
            .Where(id => !documented.Contains(id)).ToList();
        Assert.True(missing.Count == 0, "undocumented public types:\n" + string.Join("\n", missing));
    }
}
