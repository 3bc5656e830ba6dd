"""Would speculative probes shorten a bisection enough to pay? Counted on a real outcome table.

    python benchmarks/speculation.py                  # about half a minute on a 2-core CPU
    python benchmarks/speculation.py --device cuda    # the costs of a GPU (benchmarks/gpu_check.sh)

The case of ``speedup_vs_sequential`` in ``benchmarks/estimator.py``: the digits CNN trained for one
epoch, 5 classes × 4 anchors, the reference optimizer, threshold 0.5, the package's bisection. A
bisection runs the probes of a (target, anchor) group one after the other, so a measurement takes
as many passes as its longest chain of probes. Starting the two probes that may follow a running
one (one per outcome) at the same time, and dropping the one its outcome rules out, would shorten
the chains at the price of more rows.

This script does not change the package. It runs the package's bisection (timed, passes and rows
counted by a forward hook), then every grid point of every group with the bisection's stopping
rule (so each cell holds the steps its probe would take), and replays the bisection on that table
without and with speculative probes (``depth`` levels of them). The replay of depth 0 must count
the passes and rows the real run counted: that checks the replay. The time of the others is
predicted from this run's own costs: a plain forward + backward timed at two sizes (fixed cost per
pass and cost per row), and the rest of the real run's time per pass (the pool's own work).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator import digits_cnn, load_digits_data, per_class, train_one_epoch

import cm_monitor.cutting as cutting
from cm_monitor import REFERENCE_SETTINGS, cm_dimension, default_dims, search
from cm_monitor._model import synchronize
from cm_monitor.cost import time_pass


class EveryPointStopAtLevel(search.GridSearch):
    """Every grid point, each stopped at the level as a bisection's probe is."""

    stop_at_level = True


def counted_run(model, anchors, labels, **kw) -> tuple[float, int, int, object]:
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    synchronize(anchors.device)
    start = time.perf_counter()
    est = cm_dimension(model, anchors, labels, **kw)
    synchronize(anchors.device)
    seconds = time.perf_counter() - start
    hook.remove()
    return seconds, len(sizes) - 1, sum(sizes[1:]), est  # the first forward is the calibration's


def resolve(known: dict[int, bool], K: int) -> tuple[int, int, int | None]:
    """The bisection's bracket given the outcomes known so far, and its next probe (None: closed)."""
    lo, hi = -1, K
    while hi - lo > 1:
        j = search.split(lo, hi)
        if j not in known:
            return lo, hi, j
        lo, hi = (lo, j) if known[j] else (j, hi)
    return lo, hi, None


def wanted(lo: int, hi: int, j: int, depth: int) -> set[int]:
    """The next probe and, ``depth`` levels down, the probes that may follow it."""
    out, frontier = {j}, [(lo, hi, j)]
    for _ in range(depth):
        nxt = []
        for a, b, p in frontier:
            for lo2, hi2 in ((a, p), (p, b)):  # success, failure
                if hi2 - lo2 > 1:
                    c = search.split(lo2, hi2)
                    out.add(c)
                    nxt.append((lo2, hi2, c))
        frontier = nxt
    return out


def replay(passes: list[int], success: list[bool], depth: int) -> tuple[int, int]:
    """(passes, rows) of one group: ``passes[j]`` forwards of probe ``j`` (its steps + 1)."""
    K, known, running, now, rows = len(passes), {}, {}, 0, 0
    while True:
        lo, hi, j = resolve(known, K)
        if j is None:
            return now, rows
        want = wanted(lo, hi, j, depth)
        for w in want - known.keys() - running.keys():
            running[w] = now
        for r in [r for r in running if r not in want]:  # ruled out: dropped
            rows += now - running.pop(r)
        now = min(start + passes[r] for r, start in running.items())
        for r in [r for r, start in running.items() if start + passes[r] <= now]:
            rows += passes[r]
            known[r] = success[r]
            del running[r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the package's runs and the timed passes run")
    device = torch.device(parser.parse_args().device)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = digits_cnn()
    X, y, Xv, yv = load_digits_data()
    train_one_epoch(model, X, y, torch.device("cpu"))
    anchors, labels = per_class(Xv, yv, 10)
    model, anchors = model.to(device), anchors.to(device)
    print(f"device {device}")
    dims = default_dims(64)
    kw = dict(classes=[0, 1, 2, 3, 4], anchors_per_target=4, dims=dims, threshold=0.5, num_bootstrap=0)
    bisect = replace(REFERENCE_SETTINGS, readoff="fraction", search="bisect")
    counted_run(model, anchors, labels, settings=bisect, **kw)  # warm-up
    seconds, passes, rows, _ = counted_run(model, anchors, labels, settings=bisect, **kw)

    make = cutting.make_search
    cutting.make_search = lambda kind, g, k, hints=None: EveryPointStopAtLevel(g, k)
    try:
        table = cm_dimension(model, anchors, labels, settings=replace(bisect, search="grid"), **kw)
    finally:
        cutting.make_search = make
    small, large = time_pass(model, anchors, 4, repeats=20), time_pass(model, anchors, 64, repeats=20)
    per_row = (large - small) / 60
    fixed = small - 4 * per_row
    pool = (seconds - passes * fixed - rows * per_row) / passes

    T, A, _ = table.steps.shape
    groups = [
        ((table.steps[t, a] + 1).tolist(), (table.scores[t, a] >= 0.5).tolist()) for t in range(T) for a in range(A)
    ]
    print(f"real run: {seconds:.2f} s, {passes} passes, {rows} rows; plain pass {fixed * 1e3:.3f} ms + "
          f"{per_row * 1e3:.4f} ms/row, pool {pool * 1e3:.3f} ms/pass (the rest of the run's time)")  # fmt: skip
    print(f"{'depth':>5} {'passes':>7} {'rows':>7} {'rows/pass':>9} {'predicted s':>11} {'vs depth 0':>10}")
    base = None
    for depth in (0, 1, 2):
        runs = [replay(p, s, depth) for p, s in groups]
        P, R = max(p for p, _ in runs), sum(r for _, r in runs)  # the longest chain sets the passes
        predicted = P * (fixed + pool) + R * per_row
        base = base or predicted
        print(f"{depth:>5} {P:>7} {R:>7} {R / P:>9.1f} {predicted:>11.2f} {base / predicted:>9.2f}x")
        if depth == 0 and (passes, rows) != (P, R):
            print(f"  (the replay counts {P} passes and {R} rows, the real run {passes} and {rows})")


if __name__ == "__main__":
    main()
