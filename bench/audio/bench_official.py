#!/usr/bin/python3
"""The official numpy/resampy front end on the same signal as Program.fs: timing, and equality with our .npy.

    /usr/bin/python3 bench/audio/bench_official.py --official-git <VCT_AVS git dir> [--out DIR] [--reps N]
Needs Debian's python3-torch, numpy, python3-resampy, python3-soundfile. The official vggish_input/mel_features/
vggish_params are copied from the given repository into a temporary folder at run time.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--official-git", required=True)
ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "vct-audio-bench"))
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()

tmp = tempfile.mkdtemp()
pkg = os.path.join(tmp, "official_vggish")
os.makedirs(pkg)
open(os.path.join(pkg, "__init__.py"), "w").close()
for name in ["vggish_input.py", "mel_features.py", "vggish_params.py"]:
    src = subprocess.check_output(["git", "--git-dir", args.official_git, "show",
                                   f"HEAD:models/modeling/audio_backbone/torchvggish/{name}"])
    open(os.path.join(pkg, name), "wb").write(src)
sys.path.insert(0, tmp)
from official_vggish import vggish_input  # noqa: E402


def signal(rate, seconds=10.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 1234.5 * t)
            + 0.1 * np.sin(2 * np.pi * 6000.0 * t) + 0.1 * np.sin(2 * np.pi * (100.0 + 400.0 * t) * t)
            * (0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)))


print("rate_hz\tseconds_of_audio_per_second\tms_per_10s_clip\tmax_abs_diff_vs_dotnet")
for rate in [16000, 22050, 44100, 48000]:
    x = signal(rate)
    vggish_input.waveform_to_examples(x, rate)  # warm-up (numba compiles resampy's kernel)
    t0 = time.perf_counter()
    for _ in range(args.reps):
        ex = vggish_input.waveform_to_examples(x, rate)
    s = (time.perf_counter() - t0) / args.reps
    ours = os.path.join(args.out, f"dotnet_{rate}.npy")
    diff = float(np.abs(np.load(ours) - ex.detach().numpy()).max()) if os.path.exists(ours) else float("nan")
    print(f"{rate}\t{10.0 / s:.1f}\t{1000 * s:.1f}\t{diff:.2e}")
shutil.rmtree(tmp)
