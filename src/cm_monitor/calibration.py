"""Temperature scaling (Guo et al. 2017): the temperature that calibrates a model's probabilities.

The cutting-plane threshold (``p_c >= 0.9`` by default) is a statement about confidence. Raw softmax
probabilities are not calibrated: multiplying the logits by a constant changes every probability
and so the measured dimension, although the geometry of the decision regions is the same. Dividing
the logits by the temperature ``T`` that minimizes the cross-entropy on labelled held-out data
removes that: ``T`` scales with the logits, so ``logits / T`` does not depend on their scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Temperatures are searched in ``[RANGE[0], RANGE[1]]`` times the logits' standard deviation.
RANGE = (1e-3, 1e4)


def example_nll(logits: Sequence[Tensor], labels: Tensor, temperature: float) -> Tensor:
    """``[N]`` cross-entropy of the ensemble's mean ``softmax(logits_i / T)`` per example."""
    logp = torch.stack([torch.log_softmax(z.double() / temperature, dim=1) for z in logits])
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(len(logits))
    return -mean_logp.gather(1, labels[:, None]).squeeze(1)


def ensemble_nll(logits: Sequence[Tensor], labels: Tensor, temperature: float) -> float:
    """Mean cross-entropy of the ensemble's mean ``softmax(logits_i / T)`` against ``labels``."""
    return float(example_nll(logits, labels, temperature).mean())


def calibrate_temperature(
    logits: Tensor | Sequence[Tensor], labels: Tensor, *, chance_z: float = 2.0, refine_steps: int = 40
) -> float:
    """The temperature ``T > 0`` that minimizes the cross-entropy of ``softmax(logits / T)``.

    Args:
        logits: ``[N, C]`` logits, or a list of them (an ensemble: mean of the members' softmax).
        labels: ``[N]`` integer classes.
        chance_z: on a few dozen examples the cross-entropy of a model at chance level has its
            minimum at a finite ``T`` by luck, a little below that of the uniform prediction
            (``log C``). Unless the calibrated cross-entropy is below ``log C`` by more than
            ``chance_z`` standard errors (over the examples), the model is treated as
            uninformative and gets the top of the search range (about uniform probabilities).
            An informative model keeps its best ``T``. ``0`` turns the test off.
        refine_steps: golden-section steps after a log-spaced grid search.

    Returns:
        ``T``. A model whose logits carry no information about the labels (chance accuracy, or
        worse than uniform) gets the top of the search range, ``1e4`` times the logits' standard
        deviation: its calibrated probabilities are about uniform. On a set without errors, where
        the cross-entropy has no minimum, ``T`` is raised until the mean top-class probability is
        ``(N + 1) / (N + 2)`` instead of being driven to 0. A constant model gets 1; NaN/inf logits give NaN.

    Example::

        >>> import torch
        >>> from cm_monitor.calibration import calibrate_temperature
        >>> logits, labels = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), torch.tensor([0, 1, 1])
        >>> round(calibrate_temperature(30 * logits, labels) / calibrate_temperature(logits, labels), 3)
        30.0
    """
    members = [logits] if isinstance(logits, Tensor) else list(logits)
    labels = labels.to(members[0].device, torch.long)
    if not all(bool(torch.isfinite(z).all()) for z in members):
        return math.nan  # the model is broken: the measurement reports NaN rather than a made-up T
    sigma = float(torch.stack([z.detach().double().std() for z in members]).mean()) if members[0].numel() > 1 else 0.0
    if not math.isfinite(sigma) or sigma <= 0:
        return 1.0
    grid = torch.logspace(math.log10(RANGE[0]), math.log10(RANGE[1]), 281, dtype=torch.float64) * sigma
    nll = torch.tensor([ensemble_nll(members, labels, float(t)) for t in grid])
    nll = torch.nan_to_num(nll, nan=math.inf)
    i = int(nll.argmin())
    if i == len(grid) - 1:
        return float(grid[-1])
    lo, hi = math.log(float(grid[max(i - 1, 0)])), math.log(float(grid[i + 1]))
    best = math.exp(_golden_min(lambda u: ensemble_nll(members, labels, math.exp(u)), lo, hi, refine_steps))
    if chance_z > 0 and labels.numel() >= 2:
        gain = math.log(members[0].shape[1]) - example_nll(members, labels, best)  # vs the uniform prediction
        if float(gain.mean()) <= chance_z * float(gain.std()) / math.sqrt(labels.numel()):
            return float(grid[-1])
    return _cap_confidence(members, labels, best, float(grid[-1]))


def _cap_confidence(members: list[Tensor], labels: Tensor, temperature: float, top: float) -> float:
    """On a calibration set without errors, raise ``temperature`` until the mean top-class
    probability is the accuracy estimate ``(N + 1) / (N + 2)`` (Laplace's rule of succession).

    Without errors the cross-entropy falls all the way to ``T -> 0``, where every probability is 0
    or 1 and no threshold means anything; ``N`` correct examples support a confidence of about that
    estimate, not 1. With at least one error the cross-entropy has a finite minimum, which is kept.
    """
    n = labels.numel()
    if int((_mean_probs(members, 1.0).argmax(1) == labels).sum()) < n:
        return temperature
    cap = (n + 1) / (n + 2)

    def confidence(t: float) -> float:
        return float(_mean_probs(members, t).amax(1).mean())

    if confidence(temperature) <= cap:
        return temperature
    lo, hi = math.log(temperature), math.log(top)
    for _ in range(60):  # the confidence falls monotonically with T
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if confidence(math.exp(mid)) > cap else (lo, mid)
    return math.exp(hi)


def _mean_probs(members: list[Tensor], temperature: float) -> Tensor:
    """``[N, C]`` the ensemble's mean ``softmax(logits_i / T)``."""
    return torch.stack([torch.softmax(z.double() / temperature, dim=1) for z in members]).mean(0)


def _golden_min(f, lo: float, hi: float, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Minimum of a unimodal ``f`` on ``[lo, hi]`` by golden-section search."""
    r = (math.sqrt(5) - 1) / 2
    a, b = hi - r * (hi - lo), lo + r * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - r * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2
