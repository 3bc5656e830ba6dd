"""Cost of one measurement of each monitor as a fraction of one training epoch of the digits example.

    python benchmarks/monitor_cost.py

Builds the model and data of ``examples/train_digits.py``, times one training epoch (a plain loop
over its training dataloader, forward + backward + AdamW step) and then one measurement of each
monitor with the example's settings on fixed validation anchors, all in this one process, and
prints the ratios. Each timing is the median of three repeats.
"""

import importlib.util
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from cm_monitor import boundary_dimension, cm_dimension, default_dims, local_elasticity, relative_stability

_spec = importlib.util.spec_from_file_location(
    "train_digits", Path(__file__).parents[1] / "examples" / "train_digits.py"
)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    train, val = example.digits_data(64, 0)
    net = example.digits_cnn()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)

    def epoch() -> None:
        net.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    epoch()  # warm-up, and a model that has seen some data
    t_epoch = median_time(epoch)

    x, y = val.dataset.tensors

    def per_class(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cat([torch.nonzero(y == c).squeeze(1)[:n] for c in range(10)])
        return x[idx], y[idx]

    cm_x, cm_y = per_class(10)  # the monitor's default num_anchors; 4 per class manifold
    dims = default_dims(64, 8)
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    d_x, _ = per_class(20)
    e_x, e_y = per_class(6)
    costs = {
        "CMDimensionMonitor (cm + 5 boundaries)": median_time(
            lambda: (
                cm_dimension(net, cm_x, cm_y, dims=dims, anchors_per_target=4, num_bootstrap=100),
                boundary_dimension(net, cm_x, cm_y, pairs=pairs, dims=dims, anchors_per_target=4, num_bootstrap=100),
            )
        ),
        "DiffeoStabilityMonitor (200 images)": median_time(lambda: relative_stability(net, d_x, delta=0.6)),
        "ElasticityMonitor (60 inputs)": median_time(lambda: local_elasticity(net, e_x, e_y)),
    }
    print(
        f"one training epoch of the digits example: {t_epoch:.3f} s ({len(train.dataset)} images, torch threads {torch.get_num_threads()})"
    )
    for name, seconds in costs.items():
        print(f"{name:40s} {seconds:7.3f} s = {seconds / t_epoch:6.2f} x one training epoch")


if __name__ == "__main__":
    main()
