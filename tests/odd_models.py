"""Models whose forward does more than compute logits: it updates buffers or draws random numbers.

All take 8 × 8 single-channel images (the digits data) and return logits for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)
    )


class Counter(nn.Module):
    """Counts its forward passes and keeps a running mean of its inputs that it subtracts (buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("center", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            self.center.mul_(0.9).add_(0.1 * x.mean())
        return self.net(x - self.center)


class Noise(nn.Module):
    """Adds Gaussian noise to its input in every forward pass, eval mode included."""

    def __init__(self, sigma: float = 0.3) -> None:
        super().__init__()
        self.net, self.sigma = _cnn(), sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.sigma * torch.randn_like(x))


class MCDropout(nn.Module):
    """Dropout that is always on (Monte Carlo dropout), eval mode included."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head, self.p = nn.Linear(4 * 4 * 4, 10), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.features(x), self.p, training=True))


def qat() -> nn.Module:
    """Quantization-aware training (eager mode): fake-quantized weights and activations whose
    observers update their min/max buffers in every forward pass, eval mode included."""
    try:
        from torch.ao.quantization import get_default_qat_qconfig, prepare_qat
    except ImportError:  # removed from a future torch
        import pytest

        pytest.skip("torch.ao.quantization is not available")

    model = _cnn()
    model.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(model.train())


class ClipsWeights(nn.Module):
    """Clips its weights in place in every forward pass (behind autograd's back, through ``.data``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net[0].weight.data.clamp_(-0.05, 0.05)
        return self.net(x)


#: name -> factory of the models whose forward updates buffers or draws random numbers
ODD = {"counter": Counter, "qat": qat, "noise": Noise, "mc_dropout": MCDropout}


class OOMAbove(nn.Module):
    """``net``, but raises CUDA's out-of-memory error for batches larger than ``limit`` (on any device)."""

    def __init__(self, net: nn.Module, limit: int) -> None:
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, batch of {x.shape[0]})")
        return self.net(x)
