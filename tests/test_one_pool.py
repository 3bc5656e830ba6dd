"""cm_and_boundary_dimension: class manifolds and boundaries in one work pool give the estimates of
the two separate calls (the same problems, steps and d*; scores up to the float rounding of other
batch sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cm_monitor import (
    DimensionEstimate,
    OptimizerSettings,
    boundary_dimension,
    cm_and_boundary_dimension,
    cm_dimension,
)


def _net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=g)
    return net, x, torch.arange(24) % 4


def _alike(one: DimensionEstimate, other: DimensionEstimate) -> None:
    assert one.targets == other.targets and one.kind == other.kind
    for field in ("probed", "steps", "nonfinite", "anchor_index"):
        assert torch.equal(getattr(one, field), getattr(other, field)), field
    for field in ("cutting_dim", "cutting_dim_std", "curve", "dimension"):
        torch.testing.assert_close(getattr(one, field), getattr(other, field), equal_nan=True)
    torch.testing.assert_close(one.scores, other.scores, equal_nan=True, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "settings", [OptimizerSettings(), OptimizerSettings(search="grid", readoff="mean")], ids=["bisect", "grid"]
)
def test_one_pool_gives_the_estimates_of_two_calls(settings):
    net, x, y = _net_and_data()
    kw = dict(dims=[1, 2, 4, 8, 16], anchors_per_target=4, num_bootstrap=20, generator=5, settings=settings)
    pairs = [(0, 1), (2, 3)]
    cm, boundary = cm_and_boundary_dimension(net, x, y, pairs=pairs, threshold=0.7, boundary_threshold=0.6, **kw)
    _alike(cm, cm_dimension(net, x, y, threshold=0.7, **kw))
    _alike(boundary, boundary_dimension(net, x, y, pairs=pairs, threshold=0.6, **kw))
    assert bool((cm.probed.sum(-1) > 0).any()) and bool((boundary.probed.sum(-1) > 0).any())


def test_one_pool_splits_and_warm_starts_like_two_calls():
    net, x, y = _net_and_data()
    kw = dict(pairs=[(0, 1), (1, 2)], dims=[1, 2, 4, 8, 16], num_bootstrap=0, generator=2, threshold=0.7)
    whole = cm_and_boundary_dimension(net, x, y, **kw)
    shares = [cm_and_boundary_dimension(net, x, y, part=(i, 2), **kw) for i in range(2)]
    for kind in range(2):
        _alike(DimensionEstimate.merge([s[kind] for s in shares]), whole[kind])
    warm = cm_and_boundary_dimension(net, x, y, start=whole[0], boundary_start=whole[1], **kw)
    for kind in range(2):
        torch.testing.assert_close(warm[kind].cutting_dim, whole[kind].cutting_dim, equal_nan=True)
        assert int(warm[kind].probed.sum()) < int(whole[kind].probed.sum())


def test_one_pool_names_the_boundary_threshold_in_its_error():
    net, x, y = _net_and_data()
    with pytest.raises(ValueError, match="`boundary_threshold` must be a number in"):
        cm_and_boundary_dimension(net, x, y, boundary_threshold=1.5)


def test_warnings_point_at_the_callers_line():
    import inspect
    import warnings

    net, x, y = _net_and_data()

    class NaNFar(nn.Module):  # NaN for inputs far from the data: the optimization fails there
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z):
            out = self.net(z)
            return torch.where(z.abs().amax(1, keepdim=True) > 2.5, float("nan"), out)

    kw = dict(dims=[1, 4, 16], num_bootstrap=0, settings=OptimizerSettings(max_radius=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        here = inspect.currentframe().f_lineno + 1
        cm_and_boundary_dimension(NaNFar(), x, y, pairs=[(0, 1)], **kw)
    with warnings.catch_warnings(record=True) as caught_cm:
        warnings.simplefilter("always")
        here_cm = inspect.currentframe().f_lineno + 1
        cm_dimension(NaNFar(), x, y, **kw)
    for warned, line in ((caught, here), (caught_cm, here_cm)):
        nan = [w for w in warned if "NaN/inf appeared" in str(w.message)]
        assert nan and all((w.filename, w.lineno) == (__file__, line) for w in nan)


@pytest.mark.gpu
def test_one_pool_and_warm_start_on_cuda_give_the_cpu_answer():
    """The mixed pool (per-row k and level) and a warm start on CUDA: the CPU's d* per target."""
    net, x, y = _net_and_data()
    # temperature 1 and no radius bound: this untrained net reaches 0.7 (a calibrated temperature
    # flattens its probabilities, and every d* would be NaN, which compares equal to NaN)
    settings = OptimizerSettings(temperature=1.0, max_radius=None)
    kw = dict(pairs=[(0, 1), (2, 3)], dims=[1, 2, 4, 8, 16], num_bootstrap=0, generator=3, threshold=0.7)
    kw["settings"] = settings
    cpu = cm_and_boundary_dimension(net, x, y, **kw)
    assert int(torch.isfinite(cpu[0].cutting_dim).sum()) >= 3 and torch.isfinite(cpu[1].cutting_dim).all()
    gpu = cm_and_boundary_dimension(net.cuda(), x.cuda(), y, **kw)
    warm = cm_and_boundary_dimension(net, x.cuda(), y, start=gpu[0], boundary_start=gpu[1], **kw)
    for kind in range(2):
        torch.testing.assert_close(gpu[kind].cutting_dim, cpu[kind].cutting_dim, equal_nan=True, rtol=0.05, atol=0.5)
        torch.testing.assert_close(warm[kind].cutting_dim, gpu[kind].cutting_dim, equal_nan=True)
