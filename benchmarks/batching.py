"""Speed-up of batching all (target, d, anchor) problems vs one anchor's problems per pass.

    python benchmarks/batching.py

Runs the same class-manifold measurement of an MLP on 8x8 digits twice in one process: with
``chunk_size`` large enough for every problem in one pass, and with ``chunk_size`` equal to the
number of plane dimensions (one anchor and target per pass, i.e. what a loop over anchors does).
The results are identical; the printed ratio is the wall-time speed-up of batching.
"""

import time

import torch
from torch import nn

from cm_monitor import cm_dimension, default_dims


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    anchors = torch.randn(30, 64)
    labels = torch.arange(30) % 10
    dims = default_dims(64)
    kw = dict(anchors_per_target=6, max_steps=200, num_bootstrap=0)
    cm_dimension(model, anchors[:4], labels[:4], classes=[0], dims=[1, 2], max_steps=5)  # warm-up
    t0 = time.perf_counter()
    batched = cm_dimension(model, anchors, labels, chunk_size=100_000, **kw)
    t1 = time.perf_counter()
    looped = cm_dimension(model, anchors, labels, chunk_size=len(dims), **kw)
    t2 = time.perf_counter()
    problems = len(batched.targets) * 6 * len(dims)
    same = torch.allclose(batched.scores, looped.scores, atol=1e-4, equal_nan=True)
    print(f"problems: {problems}  torch threads: {torch.get_num_threads()}  identical results: {same}")
    print(f"batched: {t1 - t0:.2f} s   one anchor per pass: {t2 - t1:.2f} s   speed-up: {(t2 - t1) / (t1 - t0):.1f}x")


if __name__ == "__main__":
    main()
