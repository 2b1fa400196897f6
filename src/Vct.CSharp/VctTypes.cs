namespace Vct;

/// <summary>The AVSBench subsets: S4 (single sound source), MS3 (multiple sources), AVSS (semantic, 71 classes).</summary>
public enum VctSubset
{
    /// <summary>Single sound source, 5 frames of 1 s, binary masks.</summary>
    S4,
    /// <summary>Multiple sound sources, 5 frames of 1 s, binary masks.</summary>
    MS3,
    /// <summary>Semantic labels (background + 70 classes), up to 10 frames.</summary>
    AVSS,
}

/// <summary>What pre-SAM models do on inputs without Semantic-SAM mask images.</summary>
public enum MissingMasksPolicy
{
    /// <summary>Refuse with a message that explains the choice (default).</summary>
    Refuse,
    /// <summary>Feed a black mask image (runs, less accurate).</summary>
    Blank,
    /// <summary>Skip the mask-prior branch (runs, less accurate).</summary>
    Skip,
}

internal static class VctTypeConversions
{
    internal static Core.Subset ToCore(this VctSubset s) => s switch
    {
        VctSubset.S4 => Core.Subset.S4,
        VctSubset.MS3 => Core.Subset.MS3,
        VctSubset.AVSS => Core.Subset.AVSS,
        _ => throw new ArgumentOutOfRangeException(nameof(s), s, "not a subset"),
    };

    internal static VctSubset FromCore(Core.Subset s) =>
        s.IsS4 ? VctSubset.S4 : s.IsMS3 ? VctSubset.MS3 : VctSubset.AVSS;

    internal static Core.Fusion.MissingMasks ToCore(this MissingMasksPolicy m) => m switch
    {
        MissingMasksPolicy.Refuse => Core.Fusion.MissingMasks.Refuse,
        MissingMasksPolicy.Blank => Core.Fusion.MissingMasks.BlankMaskImage,
        MissingMasksPolicy.Skip => Core.Fusion.MissingMasks.SkipBranch,
        _ => throw new ArgumentOutOfRangeException(nameof(m), m, "not a missing-masks policy"),
    };
}
