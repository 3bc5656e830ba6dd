"""Synthetic classifiers whose class-manifold dimension is known, for validating the estimator.

The test suite and ``benchmarks/`` use them; users can too, to check a setting before trusting it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Tube(nn.Module):
    """Two classes; class 1 is the set of points within ``radius`` of a ``k``-dim affine subspace.

    The logit of class 1 is ``sharpness * (1 - dist² / radius²)``, so ``p_1 >= 0.5`` exactly inside
    the tube. Its class-1 manifold has dimension ``k`` (a random plane through a distant anchor
    reaches a k-dim subspace of R^D when ``d >= D - k``).
    """

    def __init__(
        self,
        input_dim: int,
        k: int,
        radius: float = 1.0,
        sharpness: float = 10.0,
        seed: int = 0,
        input_scale: float = 1.0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(input_dim, k, generator=g))
        self.register_buffer("basis", basis)
        self.register_buffer("center", torch.randn(input_dim, generator=g) * 0.1)
        self.radius, self.sharpness, self.input_scale = radius, sharpness, input_scale

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1) / self.input_scale - self.center
        off = x - (x @ self.basis) @ self.basis.T
        logit = self.sharpness * (1 - off.pow(2).sum(1) / self.radius**2)
        return torch.stack([torch.zeros_like(logit), logit], 1)

    def sample_outside(self, n: int, seed: int = 1) -> Tensor:
        """Anchors far from the tube (distance about sqrt(D - k) radii)."""
        g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same anchors on every device
        noise = torch.randn(n, self.center.numel(), generator=g).to(self.center.device)
        return (self.center + noise * self.radius) * self.input_scale


class HalfSpace(nn.Module):
    """Two-class linear classifier: logit of class 1 is ``w·x + b`` (class 0 has logit 0)."""

    def __init__(self, input_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(input_dim, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, input_dim, generator=g))
            self.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x.flatten(1)).squeeze(1)
        return torch.stack([torch.zeros_like(z), z], 1)


class ScaledLogits(nn.Module):
    """``model`` with its logits multiplied by ``factor``: the confidence control of
    ``docs/method.md``. The decision regions are those of ``model``; only the confidence changes,
    so a geometry signal should not move (the calibrated CM dimension does not)."""

    def __init__(self, model: nn.Module, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: Tensor) -> Tensor:
        return self.factor * self.model(x)
