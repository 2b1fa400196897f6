#!/usr/bin/env python3
"""Official Swin-B (384) forward latency on 1 and 5 frames, alone and with the pre-SAM branch (a second Swin-B on
the mask images, the four channel_weighted_block scale modules and the fusion F + s(P) * P), for the benchmark
target. Uses the shared official-ref harness (official code, stand-ins for detectron2, OpenBLAS).

usage: swin_official.py RUNS      prints one JSON line {"swin_1": s, "swin_5": s, "presam_1": s, "presam_5": s}
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
import torch  # noqa: E402

torch.set_num_threads(2)
ns = vct_env.import_official(verbose=False)
from models.utils.misc import channel_weighted_block  # noqa: E402  (official module, imported at run time)

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
tmp = vct_env.tmpdir()
vgg = vct_env.make_vggish_weights(ns, os.path.join(tmp, "vggish.pth"), 7)
cfg = vct_env.build_cfg(ns, "s4", vgg, use_pre_sam=True)
torch.manual_seed(0)
rgb = ns.d2modeling.build_backbone(cfg)
pre = ns.d2modeling.build_backbone(cfg)
scales = [channel_weighted_block(d) for d in (128, 256, 512, 1024)]
for module in [rgb, pre] + scales:
    module.eval()  # the official Swin's train() override returns None: no chaining
os.remove(vgg)
os.rmdir(tmp)


def timed(fn):
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


out = {}
for n in (1, 5):
    x = torch.randn(n, 3, 384, 384)
    m = torch.randn(n, 3, 384, 384)

    def swin():
        with torch.no_grad():
            return rgb(x)

    def presam():
        with torch.no_grad():
            f = rgb(x)
            p = pre(m)
            return {k: f[k] + s(p[k]) * p[k] for k, s in zip(("res2", "res3", "res4", "res5"), scales)}

    out[f"swin_{n}"] = timed(swin)
    out[f"presam_{n}"] = timed(presam)
print(json.dumps(out))
