#!/usr/bin/env python3
"""The official audio front end (VCT_AVS's torchvggish `vggish_input.waveform_to_examples`: resampy kaiser_best
resampling + numpy log-mel) on the benchmark's test signal, for the `audio` suite. Uses the shared official-ref
harness to import the official code (nothing of it is stored here) and Debian's numpy, resampy and torch.

usage: audio_official.py RUNS OURS_DIR
  prints one JSON line {"<rate>": {"seconds": median s per 10 s clip, "max_abs_diff": vs OURS_DIR/ours_<rate>.npy}}
"""
import json
import os
import statistics
import sys
import time

REF = os.environ.get("VCT_OFFICIAL_REF") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "tools", "official-ref"))
sys.path.insert(0, REF)
import vct_env  # noqa: E402

vct_env.setup_blas("openblas", verbose=False)
import numpy as np  # noqa: E402

vct_env.import_official(verbose=False)
from models.modeling.audio_backbone.torchvggish import vggish_input  # noqa: E402  (official, imported at run time)

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ours_dir = sys.argv[2] if len(sys.argv) > 2 else None
SECONDS = 10.0


def signal(rate):
    """Same formula as AudioBench.fs: three tones, a chirp and a 3 Hz amplitude modulation."""
    t = np.arange(int(rate * SECONDS)) / rate
    return (0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 1234.5 * t)
            + 0.1 * np.sin(2 * np.pi * 6000.0 * t) + 0.1 * np.sin(2 * np.pi * (100.0 + 400.0 * t) * t)
            * (0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)))


out = {}
for rate in [16000, 22050, 44100, 48000]:
    x = signal(rate)
    vggish_input.waveform_to_examples(x, rate)  # warm-up: numba compiles resampy's kernel
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        ex = vggish_input.waveform_to_examples(x, rate)
        times.append(time.perf_counter() - t0)
    entry = {"seconds": statistics.median(times)}
    if ours_dir:
        ours = np.load(os.path.join(ours_dir, f"ours_{rate}.npy"))
        theirs = ex.detach().numpy() if hasattr(ex, "detach") else np.asarray(ex)
        entry["shape_equal"] = list(ours.shape) == list(theirs.shape)
        entry["max_abs_diff"] = float(np.abs(ours - theirs).max()) if entry["shape_equal"] else None
    out[str(rate)] = entry
print(json.dumps(out))
