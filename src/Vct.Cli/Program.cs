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
    return root.Parse(args).Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (Exception e)
{
    // Bad input or environment: one clear line naming the file, no stack trace (set VCT_DEBUG=1 for it).
    var code = Errors.Report(e);
    VctRuntime.PrepareForExit();
    return code;
}
