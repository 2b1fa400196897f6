using System.CommandLine;
using Vct.Cli;

var root = new RootCommand("vct: audio-visual segmentation with the Vision-Centric Transformer (VCT)");
root.Subcommands.Add(InfoCommand.Create());
return root.Parse(args).Invoke();
