namespace Vct.Core

open System
open TorchSharp

/// Versions and environment, as `vct info` prints them.
type SystemInfo =
    { VctVersion: string
      TorchSharpVersion: string
      LibTorchVersion: string
      DotNetVersion: string
      Device: string
      CudaAvailable: bool
      Threads: int
      Runtime: RuntimeReport }

/// The F# entry points that the C# facade, the CLI and notebooks call.
[<RequireQualifiedAccess>]
module Api =
    /// Collects versions, the default device, the thread count and the runtime report.
    let systemInfo () : SystemInfo =
        let report = Runtime.init ()
        let asmVersion (t: Type) =
            let a = t.Assembly
            match a.GetCustomAttributes(typeof<Reflection.AssemblyInformationalVersionAttribute>, false) with
            | [| :? Reflection.AssemblyInformationalVersionAttribute as v |] -> v.InformationalVersion.Split('+')[0]
            | _ -> string (a.GetName().Version)
        let cuda = torch.cuda.is_available ()
        { VctVersion = asmVersion typeof<RuntimeReport>
          TorchSharpVersion = asmVersion typeof<torch>
          LibTorchVersion = torch.__version__
          DotNetVersion = Environment.Version.ToString()
          Device = (if cuda then "cuda" else "cpu")
          CudaAvailable = cuda
          Threads = torch.get_num_threads ()
          Runtime = report }
