"""A warm start (``start=`` of the core, ``warm_start`` of the monitor): the bisection of each
(target, anchor) starts at its earlier answer, which saves problems but never changes the answer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from modules import NetModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cm_monitor import CMDimensionMonitor, OptimizerSettings, boundary_dimension, cm_dimension
from cm_monitor.synthetic import Tube

D = 64
SETTINGS = OptimizerSettings(max_radius=None, temperature=1.0)


def _same(a, b) -> None:
    for field in ("cutting_dim", "cutting_dim_std", "curve", "dimension"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0, equal_nan=True)


def _tube(k: int):
    model = Tube(D, k)
    anchors = model.sample_outside(10)
    return model, anchors, torch.zeros(10, dtype=torch.long)


@pytest.mark.parametrize("k", [8, 32])
def test_a_warm_start_on_the_same_model_gives_the_same_answer_in_one_round(k):
    model, anchors, labels = _tube(k)
    kw = dict(classes=[1], settings=SETTINGS, generator=3)
    cold = cm_dimension(model, anchors, labels, **kw)
    warm = cm_dimension(model, anchors, labels, start=cold, **kw)
    _same(warm, cold)
    assert abs(float(cold.dimension[0]) - k) <= 5  # the known answer
    assert int(warm.probed.sum(-1).max()) <= 2  # every anchor: its answer and the point below
    assert int(cold.probed.sum(-1).min()) >= 3  # a cold bisection of 19 points takes 3 to 8
    # cheaper: the cold search's extra probes are failures below the answer (cost-weighted, it
    # probes high first, so fewer of them than a plain bisection; this tube's d* sits near the top)
    assert float(warm.steps.sum()) < 0.9 * float(cold.steps.sum())
    assert int(warm.probed.sum()) < int(cold.probed.sum())


def test_a_warm_start_from_another_answer_still_finds_the_cold_answer():
    far_model, anchors, labels = _tube(8)
    model = Tube(D, 40)
    kw = dict(classes=[1], settings=SETTINGS, generator=3)
    start = cm_dimension(far_model, anchors, labels, **kw)
    cold = cm_dimension(model, anchors, labels, **kw)
    warm = cm_dimension(model, anchors, labels, start=start, **kw)
    assert float(start.dimension[0]) < 20 < 30 < float(cold.dimension[0])
    _same(warm, cold)


def test_a_warm_start_of_boundaries_gives_the_same_answer():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(18, 12, generator=g)
    y = torch.arange(18) % 3
    kw = dict(pairs=[(0, 1), (1, 2)], generator=1, threshold=0.6)
    cold = boundary_dimension(net, x, y, **kw)
    warm = boundary_dimension(net, x, y, start=cold, **kw)
    _same(warm, cold)
    assert int(warm.probed.sum()) < int(cold.probed.sum())


def test_a_start_that_does_not_match_is_a_clear_error():
    model, anchors, labels = _tube(8)
    est = cm_dimension(model, anchors, labels, classes=[1], settings=SETTINGS, dims=[1, 4, 16, 64])
    with pytest.raises(ValueError, match="`start` must be an estimate of the same kind, targets, grid"):
        cm_dimension(model, anchors, labels, classes=[1], settings=SETTINGS, start=est)
    with pytest.raises(TypeError, match="`start` must be a complete DimensionEstimate"):
        cm_dimension(model, anchors, labels, classes=[1], settings=SETTINGS, start="previous")


class _Counting(CMDimensionMonitor):
    """Records the problems each measurement optimized."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.problems: list[int] = []

    def _measure_part(self, trainer, pl_module, model, part):
        cm, boundary = super()._measure_part(trainer, pl_module, model, part)
        self.problems.append(int(cm.probed.sum()) + int(boundary.probed.sum()))
        return cm, boundary


def _fit(tmp_path, warm_start: bool, monitor=None, shift: float = 0.0, net=None) -> tuple[_Counting, list[int]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 16, generator=g) + shift
    y = (x[:, :4].argmax(1)).long()
    torch.manual_seed(0)
    net = net if net is not None else nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    if monitor is None:
        monitor = _Counting(
            num_anchors=4, anchors_per_target=4, num_pairs=1, num_bootstrap=0, verbose=False, warm_start=warm_start,
            every_n_epochs=1,
        )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[monitor], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    trainer.fit(NetModule(net, lr=0.0), loader, loader)  # lr 0: the same weights at every measurement
    return monitor, monitor.problems


def test_the_monitor_starts_each_measurement_at_the_previous_answer(tmp_path):
    warm, warm_rows = _fit(tmp_path / "warm", warm_start=True)
    cold, cold_rows = _fit(tmp_path / "cold", warm_start=False)
    _same(warm.last_cm, cold.last_cm)
    _same(warm.last_boundary, cold.last_boundary)
    assert warm_rows[0] == cold_rows[0]  # the first measurement starts cold
    assert cold_rows[1] == cold_rows[2] == cold_rows[0]
    assert warm_rows[1] < 0.8 * cold_rows[1] and warm_rows[2] == warm_rows[1]


def test_warm_start_must_be_a_bool():
    with pytest.raises(TypeError, match="`warm_start` must be a bool"):
        CMDimensionMonitor(warm_start=1)


def test_a_new_fit_or_a_resume_starts_cold(tmp_path):
    monitor, problems = _fit(tmp_path / "a", warm_start=True)
    first = problems[0]
    _fit(tmp_path / "b", warm_start=True, monitor=monitor, shift=0.01)  # new data: new anchors, a new series
    assert monitor.problems[3] == first and monitor.problems[4] < first
    monitor.load_state_dict(monitor.state_dict())
    assert monitor.last_cm is None and monitor.last_boundary is None


def test_the_pass_size_is_the_pool_that_ran(tmp_path, monkeypatch):
    # the out-of-memory retry halves _pass_size: it must be the rows the warm-started pool really held
    # (two per hinted group: a round may run two problems of each), and no pass is larger
    import cm_monitor.cutting as cutting

    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    rows: list[int] = []
    net[0].register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].shape[0]) if torch.is_grad_enabled() else None
    )
    monitor, _ = _fit(tmp_path, warm_start=True, net=net)
    size = monitor._pass_size((0, 1))
    pools: list[int] = []
    pool_class = cutting._Pool
    monkeypatch.setattr(cutting, "_Pool", lambda n, *args: pools.append(n) or pool_class(n, *args))
    rows.clear()
    monitor._measure_part(None, None, net, (0, 1))  # what the next measurement does
    assert pools == [size] and max(rows) <= size
