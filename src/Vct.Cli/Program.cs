using System.CommandLine;
using Vct;
using Vct.Cli;

var root = new RootCommand("vct: audio-visual segmentation with the Vision-Centric Transformer (VCT)");
root.Subcommands.Add(InfoCommand.Create());
root.Subcommands.Add(ModelCommands.Convert());
root.Subcommands.Add(ModelCommands.Inspect());
root.Subcommands.Add(ModelCommands.Forward());
root.Subcommands.Add(TrainCommand.Create());
root.Subcommands.Add(EvalCommand.Create());
root.Subcommands.Add(AudioCommand.Create());
root.Subcommands.Add(ScoreCommand.Create());
root.Subcommands.Add(SynthCommand.Create());
root.Subcommands.Add(DataCommand.Create());
root.Subcommands.Add(PredictCommand.Create());
root.Subcommands.Add(WeightsCommand.Create());
// A failure on a background thread would otherwise abort the process (exit 134) with a stack trace.
AppDomain.CurrentDomain.UnhandledException += (_, e) =>
{
    if (e.ExceptionObject is Exception ex) Errors.Report(ex);
    else Console.Error.WriteLine($"vct: {e.ExceptionObject}");
    VctRuntime.PrepareForExit(); // a step may hold the finalizer gate; exit would wait for it
    Environment.Exit(1);
};
try
{
    var parsed = root.Parse(args);
    // A value outside its choices, an unknown option or a missing argument: one line per problem, as every other
    // error (help, --help and completions still work: they parse without errors).
    if (parsed.Errors.Count > 0)
    {
        foreach (var error in parsed.Errors)
            Console.Error.WriteLine($"vct: {System.Text.RegularExpressions.Regex.Replace(error.Message, @"\s*\n\s*", " ")}");
        Console.Error.WriteLine("vct: see 'vct --help' or 'vct <command> --help'");
        return 1;
    }
    return parsed.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (Exception e)
{
    // Bad input or environment: one clear line naming the file, no stack trace (set VCT_DEBUG=1 for it).
    var code = Errors.Report(e);
    VctRuntime.PrepareForExit();
    return code;
}
