"""What one cutting-plane measurement will cost, time and memory, known before it is paid.

One measurement optimizes ``problems`` (target, anchor, plane dimension) problems in passes of at
most ``per_pass`` plane points (``chunk_size``, or fewer where the planes' memory bound says so),
each problem for at most ``max_steps`` steps. A probe times one forward/backward pass of the model
on a full chunk (with a bisection, on one row per (target, anchor) group: it runs one problem per
group at a time, in rounds; see :func:`estimate_cost`), which gives an upper bound on the time:
every problem running its whole budget. Early stopping makes real measurements much cheaper (on the
digits and MNIST controls problems stopped after 40-70 steps of 500 on average, and a bisection runs
fewer rounds than its worst case), so the bound is loose: in fits of a tiny conv net on 224 × 224 × 3
images (10 classes, defaults; 2026-12-06) it was 1873 s against 63-74 s measured, 25-30 times more,
and over 170 times for the same net at initialization, whose problems stop after a few steps (21 times
for 20 of 300 classes). The logged ``{prefix}/seconds`` says what a measurement really took; ``max_seconds`` compares the bound.

Memory is the work pool's own state (plane points, plane coordinates, optimizer moments, the
planes: :func:`pool_bytes`) plus the model's activations of one pass, measured per row as the bytes
of the tensors autograd saves for the backward pass of a small probe batch
(:func:`activation_bytes_per_row`) and scaled to the pass size.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_monitor._model import (
    ModelLike,
    as_members,
    ensemble_log_probs,
    input_gradient,
    measuring,
    model_device,
    model_float_dtype,
    synchronize,
)


@dataclass(frozen=True)
class CostEstimate:
    """Upper bound on the cost of one cutting-plane measurement.

    Attributes:
        problems: (target, anchor, plane dimension) problems.
        passes: forward/backward passes at most (rounds × chunks per round × (max_steps + 1)).
        seconds_per_pass: measured time of one pass of ``timed_rows`` rows.
        seconds: ``passes × seconds_per_pass``, the time if no problem stopped early.
        rows_per_pass: plane points per pass at most (the work pool's rows; memory).
        memory_bytes: estimated peak memory of one pass: the pool's state and the activations.
        timed_rows: rows of the passes the bound counts (``rows_per_pass``, or fewer when the
            problems run in rounds: a bisection holds one problem per (target, anchor) group).
    """

    problems: int
    passes: int
    seconds_per_pass: float
    seconds: float
    rows_per_pass: int = 0
    memory_bytes: int = 0
    timed_rows: int = 0

    def __str__(self) -> str:
        return (
            f"{self.problems} problems, at most {self.passes} passes of {self.timed_rows or self.rows_per_pass} "
            f"rows, {self.seconds_per_pass * 1e3:.1f} ms each: at most {self.seconds:.0f} s per measurement (early "
            f"stopping made measurements 20 to over 170 times shorter in the fits measured); about {self.memory_bytes / 2**20:.0f} MiB"
        )


def time_pass(model: ModelLike, inputs: Tensor, rows: int, repeats: int = 3) -> float:
    """Median seconds of one forward/backward pass (gradient with respect to the inputs, as the
    cutting planes take it) on ``rows`` inputs built from ``inputs``, in eval mode (modes restored)."""
    members = as_members(model)
    device = model_device(members, inputs.device)
    times = []
    with measuring(members):
        x = _probe_batch(members, inputs, rows)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            logp, _ = ensemble_log_probs(members, x)
            input_gradient(logp[:, 0].sum(), x)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def activation_bytes_per_row(model: ModelLike, inputs: Tensor, rows: int = 4) -> float:
    """Bytes autograd saves for the backward pass of one input row (the model's activations), from
    a forward pass of ``rows`` inputs built from ``inputs`` in eval mode (modes restored)."""
    members = as_members(model)
    saved = 0
    weights = {t.data_ptr() for m in members for t in (*m.parameters(), *m.buffers())}

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if t.data_ptr() not in weights:  # the weights are there anyway; activations grow with the rows
            saved += t.numel() * t.element_size()
        return t

    with measuring(members), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ensemble_log_probs(members, _probe_batch(members, inputs, rows))
    return saved / rows


def _probe_batch(members: list, inputs: Tensor, rows: int) -> Tensor:
    """``rows`` inputs cycled from ``inputs``, on the model's device and in its dtype, requiring grad."""
    index = torch.arange(rows, device=inputs.device) % inputs.shape[0]
    device = model_device(members, inputs.device)
    dtype = model_float_dtype(members, inputs.dtype)
    return inputs.detach()[index].to(device, dtype).clone().requires_grad_(True)


def pool_bytes(input_dim: int, max_dim: int, dense: bool, rows: int, bytes_per_element: int = 4) -> int:
    """The work pool's own memory: per row about ten ``D``-sized tensors (anchor, plane point, its
    transform and gradient, ...), five ``max_dim``-sized ones (coordinates, mask, Adam's moments,
    gradient) and the plane: a ``D × max_dim`` basis (dense; twice, since the pool's
    :class:`~cm_monitor.planes.PlaneCache` keeps up to one basis per row) or signs and
    coordinates (structured)."""
    plane = 2 * input_dim * max_dim if dense else input_dim + 2 * max_dim
    return rows * bytes_per_element * (10 * input_dim + 5 * max_dim + plane)


def estimate_cost(
    model: ModelLike,
    inputs: Tensor,
    *,
    problems: int,
    per_pass: int,
    max_steps: int,
    bytes_per_row: float | None = None,
    rounds: int = 1,
    in_flight: int | None = None,
) -> CostEstimate:
    """Upper bound on the time of one measurement of ``problems`` problems run ``per_pass`` at a
    time (see :func:`cm_monitor.cutting.rows_per_pass`; the module docstring says what is bounded),
    and its memory: ``per_pass`` rows of ``bytes_per_row`` each (default: the activations alone,
    :func:`activation_bytes_per_row`; add :func:`pool_bytes` for the pool's own state).

    ``rounds``: the problems run in this many rounds one after the other, at most ``in_flight`` at
    a time (default ``problems / rounds``; a cold bisection: one problem per (target, anchor) group
    at a time, at most :func:`~cm_monitor.search.max_rounds` of them in a row; a warm start runs two
    per group in its first rounds). The bound then counts passes
    of that many rows, timed at that size, which holds whether a pass's time grows with its rows
    (compute-bound) or not (bound by per-pass overhead, as small passes on a GPU). A full pass of
    ``per_pass`` rows is still run once, so that running out of memory shows here."""
    if problems < 1 or per_pass < 1 or rounds < 1 or (in_flight is not None and in_flight < 1):
        raise ValueError(
            f"`problems`, `per_pass`, `rounds` and `in_flight` must be >= 1, got {problems}, {per_pass}, {rounds} "
            f"and {in_flight}."
        )
    rows = min(per_pass, problems)
    if bytes_per_row is None:
        bytes_per_row = activation_bytes_per_row(model, inputs)
    memory = int(rows * bytes_per_row)
    at_once = math.ceil(problems / rounds) if in_flight is None else min(in_flight, problems)
    timed = min(rows, at_once)
    if timed < rows:
        time_pass(model, inputs, rows, repeats=1)  # the largest pass the pool may run must fit
    seconds = time_pass(model, inputs, timed)
    passes = rounds * math.ceil(at_once / timed) * (max_steps + 1)
    return CostEstimate(
        problems=problems,
        passes=passes,
        seconds_per_pass=seconds,
        seconds=passes * seconds,
        rows_per_pass=rows,
        memory_bytes=memory,
        timed_rows=timed,
    )


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory plus what PyTorch's caching allocator holds
    unused (it serves new tensors from it), or the host's available memory (Linux); None if unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
