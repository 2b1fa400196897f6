using System.CommandLine;

namespace Vct.Cli;

/// <summary>Options every command shares (--device, --threads) and the choices options accept, listed by help and completion.</summary>
internal static class CommonOptions
{
    public static Option<string> Device()
    {
        var o = new Option<string>("--device")
        {
            Description = "auto | cpu | cuda | cuda:N (auto = CUDA when available)",
            DefaultValueFactory = _ => "auto",
        };
        o.Validators.Add(r =>
        {
            var v = r.GetValueOrDefault<string>();
            if (!VctDevices.IsValid(v)) r.AddError($"unknown device '{v}': expected auto, cpu, cuda or cuda:N");
        });
        o.CompletionSources.Add([.. VctDevices.Names, "cuda:0"]);
        return o;
    }

    public static Option<int?> Threads() => new("--threads")
    {
        Description = "Intra-op threads for LibTorch (default: LibTorch's choice)",
    };

    /// <summary>An option that accepts only <paramref name="choices"/> (help lists them, completion offers them).</summary>
    public static Option<string> Choice(string name, string description, string? defaultValue, params string[] choices)
    {
        var o = new Option<string>(name) { Description = description };
        if (defaultValue is not null) o.DefaultValueFactory = _ => defaultValue;
        o.AcceptOnlyFromAmong(choices);
        return o;
    }

    /// <summary>--subset s4 | ms3 | avss (optional unless <paramref name="required"/>).</summary>
    public static Option<string> Subset(string description, bool required = false, params string[] choices)
    {
        var o = Choice("--subset", description, null, choices.Length > 0 ? choices : ["s4", "ms3", "avss"]);
        o.Required = required;
        return o;
    }

    /// <summary>--missing-masks refuse | blank | skip.</summary>
    public static Option<string> MissingMasks(string description) => Choice("--missing-masks", description, "refuse", "refuse", "blank", "skip");

    /// <summary>--precision fp32 | bf16 | fp16.</summary>
    public static Option<string> Precision() =>
        Choice("--precision", "Numeric precision of inference: fp32 | bf16 | fp16 (reduced precisions where the device and this build support them)", "fp32", "fp32", "bf16", "fp16");

    /// <summary>A subset name (s4, ms3, avss) as the facade's enum; null stays null.</summary>
    public static VctSubset? ParseSubset(string? name) => name is null ? null : Enum.Parse<VctSubset>(name, ignoreCase: true);

    /// <summary>A --missing-masks value as the facade's enum.</summary>
    public static MissingMasksPolicy ParseMissingMasks(string name) => Enum.Parse<MissingMasksPolicy>(name, ignoreCase: true);

    /// <summary>A --precision value as the facade's enum.</summary>
    public static VctPrecision ParsePrecision(string name) => name switch
    {
        "bf16" => VctPrecision.BFloat16,
        "fp16" => VctPrecision.Float16,
        _ => VctPrecision.Float32,
    };

    /// <summary>Initialises the runtime and applies --threads (the device is validated by the parser and resolved by the facade).</summary>
    public static void Apply(int? threads)
    {
        if (threads is int t && (t < 1 || t > 1024)) throw new ArgumentException($"--threads must be in 1..1024, got {t}");
        VctRuntime.Initialize();
        if (threads is int n) VctRuntime.SetThreads(n);
    }
}
