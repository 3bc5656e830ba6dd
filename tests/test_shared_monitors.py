"""What the monitors share in one Trainer: each one's cost against training time, and the keys that
other callbacks watch, checked at the start of fit."""

from __future__ import annotations

import inspect
import types
import warnings

import pytest
from fakes import FakeMonitor, tiny_loaders, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cm_monitor import CMDimensionMonitor
from cm_monitor.callbacks import base


class TrainClock(Callback):
    """Every training batch takes one (fake) second, or ``seconds``."""

    def __init__(self, clock: list[float], seconds: float = 1.0) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, *args) -> None:
        self.clock[0] += self.seconds


def test_each_monitors_cost_frac_is_its_own_share(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock[0])
    slow = FakeMonitor(seconds=6.0, clock=clock, prefix="slow")
    quick = FakeMonitor(seconds=2.0, clock=clock, prefix="quick")
    t = tiny_trainer(tmp_path, [TrainClock(clock), slow, quick], max_epochs=2)
    t.fit(tiny_module(), *tiny_loaders())  # 2 batches (2 s) per epoch, then slow (6 s), then quick (2 s)
    # each against the epoch without the other monitor: 6 / (2 + 6) and 2 / (2 + 2), at both epochs;
    # counting the other's time as the epoch's, quick would report 2 / (2 + 6 + 2) = 0.2
    assert t.callback_metrics["slow/cost_frac"].item() == pytest.approx(0.75)
    assert t.callback_metrics["quick/cost_frac"].item() == pytest.approx(0.5)
    assert t.callback_metrics["quick/seconds"].item() == pytest.approx(2.0)
    assert slow.total_seconds == pytest.approx(12.0) and quick.total_seconds == pytest.approx(4.0)


def test_a_lone_monitors_cost_frac_is_its_share_of_the_epoch(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock[0])
    t = tiny_trainer(tmp_path, [TrainClock(clock), FakeMonitor(seconds=6.0, clock=clock)], max_epochs=1)
    t.fit(tiny_module(), *tiny_loaders())
    assert t.callback_metrics["fake/cost_frac"].item() == pytest.approx(6 / 8)


def costly_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "To spend less" in str(w.message)]


@pytest.mark.parametrize(
    ("seconds", "batch", "kwargs", "expected"),
    [
        (6.0, 1.0, {}, "took 6.0 s, 3.0 times the 2.0 s of training"),  # 2 batches of 1 s per epoch
        (6.0, 1.0, {"every_n_epochs": 3}, "3.0 times the 2.0 s"),
        (4.0, 10.0, {}, None),  # 4 / 24 = 0.17 of the epoch: under COSTLY_FRACTION
        (6.0, 10.0, {}, "took 6.0 s, 0.3 times the 20.0 s"),  # 6 / 26 = 0.23
        (0.9, 0.1, {}, None),  # a costly share, but under COSTLY_SECONDS
        (6.0, 1.0, {"max_cost_frac": 1.0}, None),  # a budget was chosen: no advice
    ],
)
def test_a_costly_measurement_is_warned_about_once_per_fit(tmp_path, monkeypatch, seconds, batch, kwargs, expected):
    clock = [0.0]
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock[0])
    monitor = FakeMonitor(seconds=seconds, clock=clock, **kwargs)
    for _fit in range(2):  # said once per fit, again in the next fit
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer = tiny_trainer(tmp_path, [TrainClock(clock, batch), monitor], max_epochs=4)
            trainer.fit(tiny_module(), *tiny_loaders())
        said = costly_warnings(record)
        if expected is None:
            assert said == []
        else:
            assert len(said) == 1 and expected in said[0], said
            assert "FakeMonitor (epoch 0)" in said[0] and "`every_n_epochs`" in said[0] and "max_cost_frac" in said[0]


def test_the_costly_warning_names_what_makes_each_monitor_cheaper():
    from cm_monitor import DiffeoStabilityMonitor, ElasticityMonitor

    assert "anchors_per_target" in CMDimensionMonitor._cost_arguments
    assert "num_anchors" in DiffeoStabilityMonitor._cost_arguments
    assert "num_anchors" in ElasticityMonitor._cost_arguments
    for cls in (CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor):  # real arguments
        assert set(cls._cost_arguments) <= set(inspect.signature(cls).parameters), cls


def test_the_budget_does_not_count_other_monitors_time(monkeypatch):
    monitor = FakeMonitor(max_cost_frac=0.25)
    other = FakeMonitor(prefix="other")
    fake = types.SimpleNamespace(
        strategy=types.SimpleNamespace(broadcast=lambda obj, src=0: obj), callbacks=[monitor, other]
    )
    monitor._fit_start, monitor._fit_seconds, monitor._last_seconds = 100.0, 2.0, 2.0
    monitor._others_at_fit_start, other.total_seconds = 3.0, 13.0  # the other measured 10 s in this fit
    # measure iff 2 + 2 <= 0.25 * (elapsed - 10 + 2), i.e. elapsed >= 24 (14 without the other)
    for now, expected in ((114.0, False), (123.9, False), (124.0, True)):
        monkeypatch.setattr(base.time, "perf_counter", lambda now=now: now)
        assert monitor._within_budget(fake, epoch=3) is expected, now


# ---------------------------------------------------------------- watched keys, at the start of fit


class Counting(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    ("watcher", "match"),
    [
        (EarlyStopping(monitor="fake/valeu"), r"EarlyStopping\(monitor='fake/valeu'\).*Did you mean 'fake/value'\?"),
        (EarlyStopping(monitor="fake/value_std", strict=False), r"never logs with its configuration\. It logs: "),
        (ModelCheckpoint(monitor="fake/seconds_"), r"Did you mean 'fake/seconds'"),
    ],
)
def test_a_watched_key_this_configuration_never_logs_is_an_error_before_training(tmp_path, watcher, match):
    counting = Counting()
    t = tiny_trainer(tmp_path, [FakeMonitor(), watcher, counting])
    with pytest.raises(MisconfigurationException, match=match):
        t.fit(tiny_module(), *tiny_loaders())
    assert counting.steps == 0


def test_logged_keys_and_keys_of_others_pass(tmp_path):
    class LogsUnderFake(type(tiny_module())):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log("fake/my_probe", 1.0)

    watchers = [
        EarlyStopping(monitor="fake/value_std", patience=10),  # logged with with_std=True
        EarlyStopping(monitor="fake/measured", patience=10),  # logged at every validation
        EarlyStopping(monitor="val_loss", patience=10),  # not under the prefix: not this monitor's business
        EarlyStopping(monitor="fake/my_probe", patience=10),  # the module logs it: a warning only
    ]
    t = tiny_trainer(tmp_path, [FakeMonitor(with_std=True), *watchers])
    with pytest.warns(UserWarning, match=r"watches 'fake/my_probe', which is not a key of this monitor"):
        t.fit(LogsUnderFake(tiny_module().net, lr=0.1), *tiny_loaders())
    assert t.callback_metrics["fake/my_probe"] == 1.0 and t.current_epoch == 2


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"num_pairs": 0}, "cm/boundary_dim"),
        ({"classes": [0]}, "cm/dim_class_1"),
        ({"num_bootstrap": 0}, "cm/dim_std"),
        ({}, "cm/dims"),
        ({}, "cm/dim_p80"),
    ],
)
def test_cm_keys_are_checked_at_fit_start(tmp_path, config, key):
    monitor = CMDimensionMonitor(num_anchors=2, dims=[1, 2, 4], max_steps=5, verbose=False, every_n_epochs=1, **config)
    counting = Counting()
    t = tiny_trainer(tmp_path, [monitor, EarlyStopping(monitor=key), counting])
    with pytest.raises(MisconfigurationException, match=rf"monitor='{key}'\) watches a key this monitor never logs"):
        t.fit(tiny_module(), *tiny_loaders())
    assert counting.steps == 0 and monitor.num_measurements == 0


def test_every_key_the_cm_monitor_logs_is_one_it_lists(tmp_path):
    monitor = CMDimensionMonitor(
        num_anchors=2, dims=[1, 2, 4], max_steps=5, extra_thresholds=[0.8], num_pairs=1, verbose=False
    )
    t = tiny_trainer(tmp_path, [monitor], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(tiny_module(), *tiny_loaders())
    logged = {k[3:] for k in t.callback_metrics if k.startswith("cm/")}
    listed = monitor._loggable_keys() | {k[3:] for k in monitor._always_logged()}
    assert logged <= listed
    assert {"dim", "dim_class_0", "dim_class_1", "dim_p80", "boundary_dim"} <= logged
