"""The work pool's own cost per pass, next to the model's forward + backward at the same rows.

    python benchmarks/pool_overhead.py                        # this checkout (PYTHONPATH=src)
    python benchmarks/pool_overhead.py --against OTHER/src    # A/B: interleaved runs, medians

For the digits CNN (8 × 8) and the LeNet (28 × 28) of ``benchmarks/estimator.py``, each trained
for one epoch, ``cm_dimension`` at its defaults on 3 classes × 4 anchors (as ``estimator.py
--quick``). Per pass (one forward of the pool's rows, counted by a forward hook) it prints:

* ``top ops``: aten operators called from Python (``torch.profiler``, outermost only), ``all ops``:
  every aten operator including those nested in others. Load-independent: the primary evidence.
* ``ms/pass``: the estimator's wall time per pass (median of ``--repeats`` runs);
* ``plain ms``: a plain forward + backward (gradient w.r.t. the input) on ``rows/pass`` rows;
* ``pool ms``: the difference, the pool's own work per pass (planes, optimizer, bookkeeping).

With ``--against`` it runs itself alternately on the other source tree and on this one, in fresh
processes, ``--repeats`` times each, and prints the medians of both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measure(repeats: int) -> dict:
    """Worker: ops and times per pass of both models with the cm_monitor on the path."""
    sys.path.insert(0, str(HERE))
    from estimator import digits_cnn, lenet, load_digits_data, load_mnist_data

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return {
        "digits CNN": measure_model(digits_cnn(), load_digits_data(), repeats),
        "LeNet": measure_model(lenet(), load_mnist_data(), repeats),
    }


def measure_model(model: torch.nn.Module, data: tuple[torch.Tensor, ...], repeats: int) -> dict:
    """Train ``model`` one epoch on ``data``, then count and time the passes of ``cm_dimension``."""
    from estimator import per_class, train_one_epoch

    from cm_monitor import cm_dimension
    from cm_monitor.cost import time_pass

    X, y, Xv, yv = data
    train_one_epoch(model, X, y, torch.device("cpu"))
    anchors, labels = per_class(Xv, yv, 10)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))

    def run() -> None:
        sizes.clear()
        cm_dimension(model, anchors, labels, classes=[0, 1, 2], anchors_per_target=4, num_bootstrap=0, generator=0)

    run()  # warm-up
    with torch.profiler.profile() as prof:
        run()
    passes = len(sizes) - 1  # the first forward is the calibration's
    rows = sum(sizes[1:]) / passes
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in events if e.cpu_parent is None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    hook.remove()
    ms = statistics.median(times) / passes * 1e3
    plain = time_pass(model, anchors, round(rows), repeats=20) * 1e3
    return {
        "passes": passes,
        "rows_per_pass": round(rows, 2),
        "top_ops_per_pass": round(top / passes, 1),
        "all_ops_per_pass": round(len(events) / passes, 1),
        "ms_per_pass": round(ms, 3),
        "plain_ms": round(plain, 3),
        "pool_ms": round(ms - plain, 3),
    }


def compare(against: str, repeats: int) -> None:
    """Run the worker alternately on ``against`` and on this checkout's ``src``; print medians."""
    trees = {"other": str(Path(against).resolve()), "this": str(HERE.parent / "src")}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(repeats):
        for key, src in trees.items():
            env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
            cmd = [sys.executable, __file__, "--worker", "--repeats", "3"]
            res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[key].append(json.loads(res.stdout.strip().splitlines()[-1]))
    medians = {
        key: {model: {f: round(statistics.median(r[model][f] for r in rs), 3) for f in rs[0][model]} for model in rs[0]}
        for key, rs in runs.items()
    }
    print(f"median of {repeats} interleaved runs each; other = {trees['other']}, this = {trees['this']}")
    show(medians)
    print(json.dumps(medians))


def show(results: dict) -> None:
    cols = ("rows_per_pass", "top_ops_per_pass", "all_ops_per_pass", "ms_per_pass", "plain_ms", "pool_ms")
    print(f"{'tree':<6} {'model':<11} " + " ".join(f"{c:>16}" for c in cols))
    for key, models in results.items():
        for model, r in models.items():
            print(f"{key:<6} {model:<11} " + " ".join(f"{r[c]:>16}" for c in cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="another checkout's src/ to compare with (A/B, interleaved)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against:
        compare(args.against, args.repeats)
        return
    result = measure(args.repeats)
    if not args.worker:
        show({"this": result})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
