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

    const BindingFlags All = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;

    /// <summary>Visible outside the assembly: public, protected or protected internal.</summary>
    static bool Visible(MethodBase? m) => m is not null && (m.IsPublic || m.IsFamily || m.IsFamilyOrAssembly);
    static bool Visible(FieldInfo f) => f.IsPublic || f.IsFamily || f.IsFamilyOrAssembly;

    static IEnumerable<(string Where, Type Type)> Signatures(Type owner)
    {
        if (owner.BaseType is { } b) yield return ($"{owner.Name} base type", b);
        foreach (var i in owner.GetInterfaces()) yield return ($"{owner.Name} interface", i);
        if (owner.IsGenericTypeDefinition)
            foreach (var g in owner.GetGenericArguments())
                foreach (var c in g.GetGenericParameterConstraints()) yield return ($"{owner.Name}<{g.Name}> constraint", c);
        if (typeof(Delegate).IsAssignableFrom(owner) && owner.GetMethod("Invoke") is { } invoke)
        {
            yield return ($"{owner.Name} delegate return", invoke.ReturnType);
            foreach (var p in invoke.GetParameters()) yield return ($"{owner.Name} delegate({p.Name})", p.ParameterType);
        }
        foreach (var m in owner.GetMethods(All).Where(m => Visible(m)))
        {
            yield return ($"{owner.Name}.{m.Name} return", m.ReturnType);
            foreach (var p in m.GetParameters()) yield return ($"{owner.Name}.{m.Name}({p.Name})", p.ParameterType);
            foreach (var g in m.GetGenericArguments())
                foreach (var c in g.GetGenericParameterConstraints()) yield return ($"{owner.Name}.{m.Name}<{g.Name}> constraint", c);
        }
        foreach (var c in owner.GetConstructors(All).Where(c => Visible(c)))
            foreach (var p in c.GetParameters()) yield return ($"{owner.Name}..ctor({p.Name})", p.ParameterType);
        foreach (var p in owner.GetProperties(All).Where(p => Visible(p.GetMethod) || Visible(p.SetMethod)))
        {
            yield return ($"{owner.Name}.{p.Name}", p.PropertyType);
            foreach (var i in p.GetIndexParameters()) yield return ($"{owner.Name}.{p.Name}[{i.Name}]", i.ParameterType);
        }
        foreach (var f in owner.GetFields(All).Where(Visible)) yield return ($"{owner.Name}.{f.Name}", f.FieldType);
        foreach (var e in owner.GetEvents(All).Where(e => Visible(e.AddMethod))) yield return ($"{owner.Name}.{e.Name}", e.EventHandlerType!);
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
        // ...also inside generic arguments, arrays and nested generics.
        Assert.Contains(Expand(typeof(IReadOnlyList<Microsoft.FSharp.Core.FSharpOption<int>[]>)), t => Why(t) is not null);
        Assert.Contains(Expand(typeof(Dictionary<string, List<(int, int)>>)), t => Why(t) is not null);
    }

    /// <summary>A public type whose only F# use is in a protected member, a property, an event and a nested generic.</summary>
    public class Leaky
    {
        /// <summary>Protected, yet visible to subclasses in other assemblies.</summary>
        protected Microsoft.FSharp.Core.FSharpOption<int>? Hidden() => null;
        /// <summary>A property.</summary>
        public IReadOnlyList<Microsoft.FSharp.Collections.FSharpList<int>> Lists { get; } = [];
        /// <summary>An event.</summary>
        public event Action<Microsoft.FSharp.Core.Unit>? Changed { add { } remove { } }
    }

    [Fact]
    public void The_check_sees_protected_members_properties_and_events()
    {
        var found = Signatures(typeof(Leaky)).SelectMany(s => Expand(s.Type).Select(t => (s.Where, Why: Why(t)))).Where(x => x.Why is not null)
            .Select(x => x.Where).ToHashSet();
        Assert.Contains("Leaky.Hidden return", found);
        Assert.Contains("Leaky.Lists", found);
        Assert.Contains("Leaky.Changed", found);
    }

    static string RepoRoot()
    {
        var d = new DirectoryInfo(AppContext.BaseDirectory);
        while (d is not null && !File.Exists(Path.Combine(d.FullName, "Vct.sln"))) d = d.Parent;
        return d?.FullName ?? throw new DirectoryNotFoundException("Vct.sln not found above the test's folder");
    }

    [Fact]
    public void The_CLI_is_a_client_of_the_facade_only()
    {
        var cli = Path.Combine(RepoRoot(), "src", "Vct.Cli");
        var offenders =
            (from f in Directory.GetFiles(cli, "*.cs", SearchOption.AllDirectories)
             where !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}") && !f.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}")
             from line in File.ReadLines(f).Select((text, i) => (text, i))
             where line.text.Contains("Vct.Core") || line.text.Contains("Microsoft.FSharp") || line.text.Contains("FSharpOption")
             select $"{Path.GetFileName(f)}:{line.i + 1}: {line.text.Trim()}").ToList();
        Assert.True(offenders.Count == 0, "the CLI uses the core directly:\n" + string.Join("\n", offenders));
        Assert.DoesNotContain("Vct.Core", File.ReadAllText(Path.Combine(cli, "Vct.Cli.csproj")));
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

        // Members too: every method, property, field and event a caller can see (compiler-generated record members aside).
        string[] generated = ["Equals", "GetHashCode", "ToString", "Deconstruct", "PrintMembers", "<Clone>$", "get_EqualityContract", "Dispose"];
        var undocumentedMembers =
            (from t in Facade.GetExportedTypes()
             where !t.IsEnum && !typeof(Delegate).IsAssignableFrom(t)
             let name = t.FullName!.Replace('+', '.')
             from id in t.GetMethods(All).Where(m => Visible(m) && !m.IsSpecialName && !generated.Contains(m.Name)).Select(m => $"M:{name}.{m.Name}")
                 .Concat(t.GetProperties(All).Where(p => (Visible(p.GetMethod) || Visible(p.SetMethod)) && p.Name != "EqualityContract").Select(p => $"P:{name}.{p.Name}"))
                 .Concat(t.GetFields(All).Where(Visible).Select(f => $"F:{name}.{f.Name}"))
                 .Concat(t.GetEvents(All).Select(e => $"E:{name}.{e.Name}"))
             where !documented.Any(d => d == id || d.StartsWith(id + "(", StringComparison.Ordinal) || d.StartsWith(id + "``", StringComparison.Ordinal))
             select id).Distinct().ToList();
        Assert.True(undocumentedMembers.Count == 0, "undocumented public members:\n" + string.Join("\n", undocumentedMembers));
    }
}
