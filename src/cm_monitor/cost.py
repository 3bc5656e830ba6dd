"""What one cutting-plane measurement will cost, known before it is paid.

One measurement optimizes ``problems`` (target, anchor, plane dimension) problems in passes of at
most ``per_pass`` plane points (``chunk_size``, or fewer where the planes' memory bound says so),
each problem for at most ``max_steps`` steps. A probe times one
forward/backward pass of the model on a full chunk, which gives an upper bound on the time: every
problem running its whole budget. Early stopping makes real measurements cheaper (on the digits and
MNIST controls problems stopped after 40-70 steps of 500 on average), so the bound is loose by a
factor of up to about ten; the logged ``{prefix}/seconds`` says what a measurement really took.
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
        passes: forward/backward passes at most (chunks × (max_steps + 1)).
        seconds_per_pass: measured time of one pass on a full chunk.
        seconds: ``passes × seconds_per_pass``, the time if no problem stopped early.
    """

    problems: int
    passes: int
    seconds_per_pass: float
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.problems} problems, at most {self.passes} passes of {self.seconds_per_pass * 1e3:.1f} ms: "
            f"at most {self.seconds:.0f} s per measurement (early stopping usually makes it several times less)"
        )


def time_pass(model: ModelLike, inputs: Tensor, rows: int, repeats: int = 3) -> float:
    """Median seconds of one forward/backward pass (gradient with respect to the inputs, as the
    cutting planes take it) on ``rows`` inputs built from ``inputs``, in eval mode (modes restored)."""
    members = as_members(model)
    device = model_device(members, inputs.device)
    dtype = model_float_dtype(members, inputs.dtype)
    index = torch.arange(rows, device=inputs.device) % inputs.shape[0]
    times = []
    with measuring(members):
        x = inputs.detach()[index].to(device, dtype).clone().requires_grad_(True)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            logp, _ = ensemble_log_probs(members, x)
            torch.autograd.grad(logp[:, 0].sum(), x)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def estimate_cost(model: ModelLike, inputs: Tensor, *, problems: int, per_pass: int, max_steps: int) -> CostEstimate:
    """Upper bound on one measurement of ``problems`` problems run ``per_pass`` at a time (see
    :func:`cm_monitor.cutting.groups_per_pass`; the module docstring says what is bounded)."""
    if problems < 1 or per_pass < 1:
        raise ValueError(f"`problems` and `per_pass` must be >= 1, got {problems} and {per_pass}.")
    seconds = time_pass(model, inputs, min(per_pass, problems))
    passes = math.ceil(problems / per_pass) * (max_steps + 1)
    return CostEstimate(problems=problems, passes=passes, seconds_per_pass=seconds, seconds=passes * seconds)
