#!/usr/bin/env python3
"""The same cases as bench.fsx, measured on the official modules (Debian torch, OpenBLAS via vct_env).
   VCT_MIRROR=<git dir of spyflying/VCT_AVS> /usr/bin/python3 bench/vision/bench_official.py [case|all] [repeats]
Prints: case, median s, min s, peak RSS MiB, threads (one process per case). Threads: $VCT_BENCH_THREADS (2)."""
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.environ.get("VCT_OFFICIAL_REF", os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "tools", "official-ref"))))
import vct_env  # noqa: E402

CASES = ["swin1", "swin5", "presam1", "presam5", "pixdec5"]


def swin_b(ns):
    m = ns.swinb.SwinTransformer(pretrain_img_size=384, patch_size=4, in_chans=3, embed_dim=128, depths=[2, 2, 18, 2],
                                    num_heads=[4, 8, 16, 32], window_size=12, drop_path_rate=0.3, out_indices=(0, 1, 2, 3))
    m.eval()  # the official SwinTransformer.train() override returns None, so .eval() cannot be chained
    return m


def run(case, repeats):
    vct_env.setup_blas("openblas", verbose=False)
    import torch
    ns = vct_env.import_official(verbose=False)
    torch.set_num_threads(int(os.environ.get("VCT_BENCH_THREADS", "2")))  # Debian's torch defaults to 1 here
    torch.manual_seed(0)
    frames = 5 if case.endswith("5") else 1
    with torch.no_grad():
        if case.startswith("swin") or case.startswith("presam"):
            rgb = swin_b(ns)
            x = torch.randn(frames, 3, 384, 384)
            if case.startswith("presam"):
                pre = swin_b(ns)
                blocks = [ns.misc.channel_weighted_block(d) for d in (128, 256, 512, 1024)]
                m = torch.randn(frames, 3, 384, 384)

                def f():
                    a = rgb(x)
                    p = pre(m)
                    return [a[k] + blk(p[k]) * p[k] for k, blk in zip(a.keys(), blocks)]
            else:
                def f():
                    return rgb(x)
        else:
            from detectron2.layers import ShapeSpec
            shapes = {k: ShapeSpec(channels=c, stride=s) for k, c, s in
                      [("res2", 128, 4), ("res3", 256, 8), ("res4", 512, 16), ("res5", 1024, 32)]}
            pd = ns.msdeform.MSDeformAttnPixelDecoder(shapes, transformer_dropout=0.0, transformer_nheads=8,
                                                      transformer_dim_feedforward=1024, transformer_enc_layers=6,
                                                      conv_dim=256, mask_dim=256, norm="GN",
                                                      transformer_in_features=["res3", "res4", "res5"],
                                                      common_stride=4).eval()
            feats = {k: torch.randn(frames, c, s, s) for k, c, s in
                     [("res2", 128, 96), ("res3", 256, 48), ("res4", 512, 24), ("res5", 1024, 12)]}

            def f():
                return pd.forward_features(feats)
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    ts.sort()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{case}\t{ts[len(ts) // 2]:.3f}\t{ts[0]:.3f}\t{rss:.0f}\t{torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    case = sys.argv[1] if len(sys.argv) > 1 else "all"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if case == "all":
        for c in CASES:
            subprocess.run([sys.executable, __file__, c, str(repeats)], check=True)
    else:
        run(case, repeats)
