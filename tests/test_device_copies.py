"""What the work pool sends to the model's device, and how often it waits for it."""

from __future__ import annotations

import warnings

import pytest
import torch

from cm_monitor import OptimizerSettings
from cm_monitor._model import QUEUED_COPY_BYTES, to_device
from cm_monitor.cutting import PlaneSpace, optimize_planes
from cm_monitor.planes import plane_seed
from cm_monitor.synthetic import Tube


def test_to_device_on_the_cpu_is_a_plain_conversion():
    host = torch.arange(6).view(2, 3)
    same = to_device(host, "cpu")
    assert same is host  # nothing to copy
    converted = to_device(host, torch.device("cpu"), torch.float64)
    assert converted.dtype == torch.float64 and torch.equal(converted, host.double())
    assert host.dtype == torch.long and not converted.is_pinned()


@pytest.mark.gpu
@pytest.mark.parametrize("size", [16, QUEUED_COPY_BYTES // 4 + 1], ids=["queued", "large"])
def test_to_device_copies_to_the_gpu(size):
    host = torch.randn(size)
    gpu = to_device(host, "cuda", torch.float64)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    assert torch.equal(gpu.cpu(), host.double())


@pytest.mark.gpu
def test_to_device_copies_when_the_host_refuses_pinned_memory(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("cannot lock memory")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    host = torch.arange(5)
    assert torch.equal(to_device(host, "cuda").cpu(), host)


@pytest.mark.gpu
@pytest.mark.parametrize("search", ["grid", "bisect"])
def test_a_pass_waits_for_the_gpu_once(search):
    """The pool reads its rows' stop flags back once per pass and queues its copies to the device
    (the indices of the problems that start, finish or move, and their structured planes). A pool
    of 3 rows for 6 groups makes problems start and finish in many passes; CUDA's sync debug mode
    counts every wait of ``optimize_planes``: one per pass, two when it sets up (the grid's plane
    dimensions) and six when it hands back its results. Before the copies were queued, each pass where
    problems started or finished waited two to five times more."""
    model = Tube(64, 16).cuda().eval()
    anchors = model.sample_outside(6).cuda()
    readoff = "fraction" if search == "bisect" else "mean"
    settings = OptimizerSettings(planes="structured", search=search, readoff=readoff, max_radius=None, max_steps=40)
    space = PlaneSpace(scale=1.0, temperature=1.0, radius_norms=None, low=-10.0, high=10.0, clip=False, level=0.9)
    G, passes = 6, []
    hook = model.register_forward_pre_hook(lambda _, args: passes.append(args[0].shape[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = optimize_planes(
                [model], anchors, torch.arange(G, device="cuda"), torch.ones(G, 1, dtype=torch.long, device="cuda"),
                [plane_seed(0, (1,), a) for a in range(G)], [8, 16, 32, 48, 56, 64], settings, space,
                chunk_size=3, num_classes=2, model_dtype=torch.float32,
            )  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode(0)
            hook.remove()
    waits = sum("synchroniz" in str(w.message) for w in caught)
    assert int(out.probed.sum()) > 2 * 3 and len(passes) > 20  # problems started in many passes
    assert waits <= len(passes) + 12, (waits, len(passes))
