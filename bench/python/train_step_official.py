#!/usr/bin/env python3
"""Official VCT training step on the CPU, for the `training` bench suite: the released config of a subset
(Swin-B 384, pre-SAM on), train mode, one video of 5 frames at SIZE, forward with the loss (VCT.forward in
training mode: Hungarian matching and the criterion), backward, full-model gradient clipping at 0.01 and an
AdamW step (lr 1e-4, weight decay 0.05), as train_net.py runs it. Ground truth as the official mappers build it:
S4 training has one annotated frame per video (all 5 frames still run), MS3 annotates all 5 frames; each
annotated frame gives one instance per class present (background 0 and foreground 1).

usage: train_step_official.py SUBSET RUNS [SIZE]
  prints one JSON line {"seconds": median step seconds, "steps": [...], "peak_mib": peak RSS, "threads": n}
"""
import json
import os
import resource
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
torch.Tensor.cuda = lambda self, *a, **k: self  # the S4 criterion moves an index to CUDA; this is a CPU run
ns = vct_env.import_official(verbose=False)
from detectron2.structures import Instances  # noqa: E402  (the harness's stand-in)

subset = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
size = int(sys.argv[3]) if len(sys.argv) > 3 else 384

tmp = vct_env.tmpdir()
vgg = vct_env.make_vggish_weights(ns, os.path.join(tmp, "vggish.pth"), 7)
cfg = vct_env.build_cfg(ns, subset, vgg, use_pre_sam=True)
model, _ = vct_env.build_model(ns, cfg, 0, perturb=False)
os.remove(vgg)
os.rmdir(tmp)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

batch = vct_env.make_inputs(subset, 3, num_frames=5, size=size)
g = torch.Generator().manual_seed(5)
annotated = [0] if subset == "s4" else list(range(5))
instances = []
for _ in annotated:
    sem = torch.zeros(size, size, dtype=torch.int64)
    y0, x0 = [int(v) for v in torch.randint(0, size // 2, (2,), generator=g)]
    sem[y0:y0 + size // 3, x0:x0 + size // 3] = 1
    inst = Instances((size, size))
    inst.gt_classes = torch.tensor([0, 1], dtype=torch.int64)
    inst.gt_masks = torch.stack([sem == 0, sem == 1]).to(torch.uint8)
    instances.append(inst)
batch[0]["instances"] = instances


def step():
    losses = model(batch)
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    opt.step()
    return float(total)


step()  # warm-up
times = []
for _ in range(runs):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"seconds": statistics.median(times), "steps": times, "peak_mib": peak, "threads": torch.get_num_threads()}))
