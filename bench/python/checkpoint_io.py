#!/usr/bin/env python3
"""Baseline for the checkpoint I/O benchmark (Debian's python3-torch).

make  MANIFEST OUT.pth   writes a detectron2-style checkpoint {"model": state_dict, "iteration": 0} whose keys,
                         shapes and dtypes are those of an official manifest (random values, seed 0)
time  PTH REPEATS        prints JSON {"load_s": [...], "numel": N}: torch.load(PTH, map_location="cpu") wall times
"""
import json
import sys
import time

import torch


def make(manifest, out):
    torch.manual_seed(0)
    sd = {}
    dtypes = {"float32": torch.float32, "int64": torch.int64, "float16": torch.float16}
    with open(manifest) as f:
        next(f)
        for line in f:
            key, shape, dtype, _ = line.rstrip("\n").split("\t")
            dims = [] if shape in ("", "scalar") else [int(d) for d in shape.split("x")]
            dt = dtypes[dtype]
            sd[key] = torch.randn(dims).to(dt) if dt.is_floating_point else torch.randint(0, 100, dims, dtype=dt)
    torch.save({"model": sd, "iteration": 0}, out)


def time_load(path, repeats):
    times = []
    numel = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ckpt = torch.load(path, map_location="cpu")
        times.append(time.perf_counter() - t0)
        numel = sum(t.numel() for t in ckpt["model"].values())
        del ckpt
    print(json.dumps({"load_s": times, "numel": numel, "torch": torch.__version__}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "time":
        time_load(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
