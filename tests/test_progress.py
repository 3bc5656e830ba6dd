"""Progress of a measurement: the core's ``progress(done, total)`` and the monitors' display of it.

Shown (after DELAY_SECONDS) in Lightning's TQDM or Rich progress bar, as a rate-limited log line
with another progress bar; nothing on other ranks or with the progress bar disabled.
"""

from __future__ import annotations

import logging
import math
import types

import pytest
import torch
from fakes import FakeMonitor, tiny_loaders, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from cm_monitor import CMDimensionMonitor, OptimizerSettings, cm_dimension, local_elasticity, relative_stability
from cm_monitor.callbacks import progress as progress_mod
from cm_monitor.callbacks.progress import MeasurementProgress, format_left
from cm_monitor.search import max_probes
from cm_monitor.synthetic import HalfSpace


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_trainer(bar, rank_zero: bool = True):
    return types.SimpleNamespace(progress_bar_callback=bar, is_global_zero=rank_zero)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def assert_counts_up_to_total(calls: list[tuple[int, int]], total: int) -> None:
    assert calls and all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] > 0 and done[-1] == total


# ---------------------------------------------------------------- the core reports progress


def test_cm_dimension_reports_every_problem_on_the_grid():
    model = HalfSpace(16)
    anchors = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    labels = model(anchors).argmax(1)
    rec = Recorder()
    est = cm_dimension(
        model, anchors, labels, dims=[1, 4, 16], settings=OptimizerSettings(search="grid", max_steps=20), progress=rec
    )
    usable = (est.anchor_index >= 0).sum().item()  # (target, anchor) groups
    assert_counts_up_to_total(rec.calls, usable * 3)  # every grid point of every group


def test_cm_dimension_bisection_total_falls_to_what_it_ran():
    # the total is an upper bound that falls as brackets close, from at most the worst case of
    # every group to the problems actually run
    model = HalfSpace(16)
    anchors = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    labels = model(anchors).argmax(1)
    rec = Recorder()
    est = cm_dimension(model, anchors, labels, dims=[1, 2, 4, 8, 16, 16 - 1, 12], max_steps=20, progress=rec)
    groups = (est.anchor_index >= 0).sum().item()
    ran = int(est.probed.sum())
    assert est.search == "bisect"
    done, totals = [d for d, _ in rec.calls], [t for _, t in rec.calls]
    assert done == sorted(done) and done[0] > 0 and done[-1] == totals[-1] == ran
    assert totals == sorted(totals, reverse=True) and totals[0] <= groups * max_probes(len(est.dims))
    assert all(d <= t for d, t in rec.calls) and totals[len(totals) // 2] < totals[0]  # it does fall


def test_the_bisections_remaining_bound_holds_at_every_step():
    from cm_monitor.search import BisectionSearch

    g = torch.Generator().manual_seed(0)
    for hints in (None, [3, 0, 9, None, 5, 7]):
        answers = torch.randint(0, 10, (6,), generator=g).tolist()  # 9 = never reached on 9 points
        search, finished, bounds = BisectionSearch(6, 9, hints), 0, []
        while batch := search.take(4):
            for group, j in batch:
                search.report(group, j, j >= answers[group])
                finished += 1
                bounds.append((finished, search.remaining()))
                assert search.remaining() == sum(search._group_bound(k) for k in range(6))  # kept up to date
        assert search.remaining() == 0
        for k, bound in bounds:  # what was still to come after k problems never exceeded the bound
            assert finished - k <= bound


def test_relative_stability_reports_each_forward_pass():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    relative_stability(model, images, delta=0.5, num_deformations=2, chunk_size=4, num_bootstrap=0, progress=rec)
    assert rec.calls == [(k, 9) for k in range(1, 10)]  # clean, deformed, noisy: 3 × ceil(10 / 4) passes


@pytest.mark.parametrize(("lr", "total"), [(None, 6), (0.1, 3)])
def test_local_elasticity_reports_each_chunk(lr, total):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    local_elasticity(model, inputs, torch.tensor([0, 1] * 3), lr=lr, chunk_size=2, cluster=False, progress=rec)
    assert rec.calls == [(k, total) for k in range(1, total + 1)]  # 3 chunks; with lr=None the norms too


# ---------------------------------------------------------------- the display


def test_tqdm_shows_problems_done_and_time_left_after_the_delay(capsys):
    clock = Clock()
    progress = MeasurementProgress(fake_trainer(TQDMProgressBar()), "cm measurement", clock=clock)
    clock.now += 1.0
    progress(10, 100)  # younger than DELAY_SECONDS: nothing
    assert progress._tqdm is None
    clock.now += 3.0
    progress(40, 100)  # 4 s for 40: 6 s for the other 60
    clock.now += 4.0
    progress(80, 100)  # 8 s for 80: 2 s left
    out = capsys.readouterr().out
    assert "cm measurement:  40%" in out and "40/100 problems, 0:00:06 left" in out
    assert "80/100 problems, 0:00:02 left" in out
    bar = progress._tqdm
    progress.close()
    assert bar.disable or bar.n == 80  # closed (removed: leave=False)
    assert progress._tqdm is None


def test_a_part_maps_onto_the_whole_measurement():
    clock = Clock()
    progress = MeasurementProgress(fake_trainer(TQDMProgressBar()), "cm", clock=clock)
    seen = []
    progress.__class__ = type("Spy", (MeasurementProgress,), {"__call__": lambda self, d, t: seen.append((d, t))})
    first, second = progress.part(0, 30, 40), progress.part(30, 10, 40)
    first(3, 6)
    first(6, 6)
    second(1, 2)
    second(2, 2)
    assert seen == [(15, 40), (30, 40), (35, 40), (40, 40)]


def test_rich_gets_a_task_that_is_removed_at_the_end():
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    class FakeRich:
        def __init__(self):
            self.events = []

        def add_task(self, description, total, completed):
            self.events.append(("add", description, completed, total))
            return 7

        def update(self, task, total, completed):
            self.events.append(("update", task, completed, total))

        def remove_task(self, task):
            self.events.append(("remove", task))

        def refresh(self):
            pass

        soft_refresh = refresh

    bar = RichProgressBar()
    bar.progress = FakeRich()
    clock = Clock()
    progress = MeasurementProgress(fake_trainer(bar), "diffeo measurement", unit="passes", clock=clock)
    assert progress.kind == "rich"
    clock.now += 3
    progress(2, 9)
    progress(5, 9)
    progress.close()
    assert bar.progress.events == [
        ("add", "diffeo measurement", 2, 9),
        ("update", 7, 5, 9),
        ("remove", 7),
    ]


class OtherBar(ProgressBar):
    """A progress bar the monitors do not know how to draw into."""


def test_another_progress_bar_gets_a_log_line_at_most_every_ten_seconds(caplog):
    clock = Clock()
    progress = MeasurementProgress(fake_trainer(OtherBar()), "cm measurement", clock=clock)
    with caplog.at_level(logging.INFO):
        for t, done in ((1, 5), (3, 30), (5, 40), (13, 60), (14, 70), (26, 90)):
            clock.now = 100.0 + t
            progress(done, 100)
    lines = [r.getMessage() for r in caplog.records if "cm measurement" in r.getMessage()]
    assert lines == [
        "cm measurement: 30/100 problems done, about 0:00:07 left",  # 3 s for 30
        "cm measurement: 60/100 problems done, about 0:00:09 left",  # 13 s for 60 (10 s after the first line)
        "cm measurement: 90/100 problems done, about 0:00:03 left",  # 26 s for 90 (13 s after)
    ]


@pytest.mark.parametrize("case", ["no progress bar", "disabled bar", "other rank"])
def test_nothing_is_shown(case, capsys, caplog):
    bar = None if case == "no progress bar" else TQDMProgressBar()
    if case == "disabled bar":
        bar.disable()
    clock = Clock()
    progress = MeasurementProgress(fake_trainer(bar, rank_zero=case != "other rank"), "cm", clock=clock)
    assert not progress.enabled
    assert progress.part(0, 10, 10) is None  # the core gets no function to call
    clock.now += 60
    with caplog.at_level(logging.INFO):
        progress(5, 10)
    progress.close()
    assert capsys.readouterr().out == "" and not caplog.records


def test_a_failing_display_turns_itself_off():
    class Exploding(OtherBar):
        pass

    clock = Clock()
    progress = MeasurementProgress(fake_trainer(Exploding()), "cm", clock=clock)
    progress.kind = "rich"  # a bar without the Rich API: drawing raises
    clock.now += 5
    progress(1, 2)  # does not raise
    assert not progress.enabled


def test_format_left():
    assert format_left(3725.4) == "1:02:05" and format_left(math.inf) == "?"


# ---------------------------------------------------------------- in a fit


def test_a_fit_shows_the_monitors_progress_in_the_tqdm_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "DELAY_SECONDS", 0.0)
    monkeypatch.setattr(progress_mod, "REDRAW_SECONDS", 0.0)
    monitor = FakeMonitor(progress_steps=4)
    t = tiny_trainer(tmp_path, [monitor, TQDMProgressBar()], max_epochs=1, enable_progress_bar=True)
    t.fit(tiny_module(), *tiny_loaders())
    out = capsys.readouterr().out
    assert "fake measurement:" in out and "4/4 steps" in out and "left" in out


def test_the_cm_monitor_reports_its_problems(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "DELAY_SECONDS", 0.0)
    monkeypatch.setattr(progress_mod, "REDRAW_SECONDS", 0.0)
    monitor = CMDimensionMonitor(
        num_anchors=2, anchors_per_target=2, dims=[1, 2, 4], max_steps=10, num_bootstrap=0, num_pairs=1, verbose=False
    )
    t = tiny_trainer(tmp_path, [monitor, TQDMProgressBar()], max_epochs=1, enable_progress_bar=True)
    t.fit(tiny_module(), *tiny_loaders())
    # 2 classes + 1 pair (anchored by anchors of both classes: it holds every class), 2 anchors each,
    # at most max_probes(3) = 3 problems each by bisection
    total = monitor._num_problems()
    assert total == 3 * 2 * 3
    out = capsys.readouterr().out
    assert "cm measurement: 100%" in out and f"{total}/{total} problems" in out


def test_a_fit_without_progress_bar_shows_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "DELAY_SECONDS", 0.0)
    monitor = FakeMonitor(progress_steps=4)
    tiny_trainer(tmp_path, [monitor], max_epochs=1, enable_progress_bar=False).fit(tiny_module(), *tiny_loaders())
    assert "fake measurement" not in capsys.readouterr().out
