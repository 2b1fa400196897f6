using System.CommandLine;
using Vct.Cli;

var root = new RootCommand("vct: audio-visual segmentation with the Vision-Centric Transformer (VCT)");
root.Subcommands.Add(InfoCommand.Create());
root.Subcommands.Add(ModelCommands.Convert());
root.Subcommands.Add(ModelCommands.Forward());
root.Subcommands.Add(TrainCommand.Create());
root.Subcommands.Add(EvalCommand.Create());
root.Subcommands.Add(AudioCommand.Create());
root.Subcommands.Add(ScoreCommand.Create());
root.Subcommands.Add(SynthCommand.Create());
root.Subcommands.Add(DataCommand.Create());
root.Subcommands.Add(PredictCommand.Create());
root.Subcommands.Add(WeightsCommand.Create());
try
{
    return root.Parse(args).Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (Exception e) when (e is ArgumentException or InvalidOperationException or IOException or InvalidDataException or NotSupportedException)
{
    // Bad input or environment: one clear line, no stack trace (set VCT_DEBUG=1 for it).
    Console.Error.WriteLine($"vct: {e.Message}");
    if (Environment.GetEnvironmentVariable("VCT_DEBUG") == "1") Console.Error.WriteLine(e);
    return 1;
}
