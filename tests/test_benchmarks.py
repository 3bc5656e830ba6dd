"""benchmarks/estimator.py's pieces on tiny inputs: its read-off has known answers, and every
comparison it prints runs (the full benchmark is minutes; these are seconds)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("estimator")


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    return model, x, torch.arange(12) % 3


def test_crossing_interpolates_on_log_d(bench):
    dims = [1, 2, 4, 8]
    assert bench.crossing(torch.tensor([0.0, 0.25, 0.75, 1.0]), dims, 8) == pytest.approx(2 * math.sqrt(2))
    assert bench.crossing(torch.tensor([0.6, 0.7, 0.8, 0.9]), dims, 8) == 1.0  # reached at the first point
    assert bench.crossing(torch.tensor([0.0, 0.1, 0.2, 0.3]), dims, 8) == 8.0  # never: D


def test_sequential_port_reads_both_ways_from_one_run(bench):
    model, x, y = _tiny()
    seconds, d_star = bench.sequential_reference(model, x, y, classes=[0], dims=[1, 4, 16])
    assert seconds > 0 and set(d_star) == {"mean", "fraction"}
    assert all(1.0 <= d <= 16.0 for d in d_star.values())
    batched = bench.batched_reference(model, x, y, [0], [1, 4, 16], torch.device("cpu"))
    assert set(batched) == {"grid", "bisect"} and all(s > 0 for s, _ in batched.values())


def test_efficiency_counts_rows_and_passes(bench):
    model, x, y = _tiny()
    r = bench.efficiency(model, x, y, [0, 1], torch.device("cpu"))
    assert r["problems"] > 0 and r["batch"] >= 1 and r["mean_steps"] >= 1
    assert r["efficiency"] == pytest.approx(r["estimator_rows_per_s"] / r["plain_rows_per_s"])


@pytest.fixture(scope="module")
def speculation():
    return load_benchmark("speculation")


def test_speculation_replay_of_depth_0_is_the_bisection(speculation):
    # the replay's chain of probes, one after the other, against the package's BisectionSearch
    from cm_monitor.search import BisectionSearch

    g = torch.Generator().manual_seed(0)
    for K in (1, 2, 5, 10, 19):
        for answer in range(K + 1):
            passes = torch.randint(1, 50, (K,), generator=g).tolist()
            success = [j >= answer for j in range(K)]
            search, chain = BisectionSearch(1, K), 0
            while batch := search.take(1):
                ((_, j),) = batch
                chain += passes[j]
                search.report(0, j, success[j])
            assert speculation.replay(passes, success, 0) == (chain, chain), (K, answer)
            # speculative probes never lengthen the chain; the probes of the chain still run in full
            deeper = [speculation.replay(passes, success, d) for d in (1, 2)]
            assert all(p <= chain <= r for p, r in deeper), (K, answer, deeper)
