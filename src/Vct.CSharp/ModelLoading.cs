using Vct.Core;

namespace Vct;

/// <summary>How every facade entry point gets a model: hub references resolved, the subset of a released name implied.</summary>
internal static class ModelLoading
{
    /// <summary>
    /// Loads a Vct checkpoint (.safetensors) or an official one (.pth, which needs <paramref name="subset"/>) on
    /// <paramref name="device"/>; <paramref name="checkpoint"/> may be a hub reference. The caller owns the model.
    /// </summary>
    internal static (VctModel Model, CheckpointLoadReport Report, string Path) Load(string checkpoint, VctSubset? subset, string device)
    {
        ArgumentException.ThrowIfNullOrEmpty(checkpoint);
        subset ??= VctWeights.SubsetOf(checkpoint);
        var path = VctWeights.Resolve(checkpoint);
        VctRuntime.Initialize();
        var (model, report) = Inference.loadModel(path, VctTypeConversions.OptRef(subset?.ToCore()), VctRuntime.ResolveDevice(device)).ToValueTuple();
        return (model, report.FromCore(), path);
    }
}
