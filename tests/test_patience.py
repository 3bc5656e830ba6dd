"""An EarlyStopping on a monitor key that the repeated values alone would end the fit with is
refused at the start of fit: the replay of the schedule (``callbacks.patience``) against what
Lightning does, on real fits where every measurement improves (the best case the check assumes)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace

import pytest
import torch
from fakes import FakeMonitor, tiny_loaders, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from modules import NetModule
from test_shared_monitors import TrainClock
from torch.utils.data import DataLoader, IterableDataset

from cm_monitor import CMDimensionMonitor
from cm_monitor.callbacks import base
from cm_monitor.callbacks.patience import Schedule, checks, forced_stop


class Rising(FakeMonitor):
    """Every measurement improves (its value is its count). ``check=False``: no start-of-fit
    check, but its prediction is kept (``predicted``) to compare with what the fit does."""

    def __init__(self, check: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check, self.predicted = check, "not set"

    def _check_patience(self, trainer, schedule) -> None:
        if self.check:
            return super()._check_patience(trainer, schedule)
        (watcher,) = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
        self.predicted = forced_stop(schedule, watcher.patience, watcher._check_on_train_epoch_end)

    def _measure_part(self, trainer, pl_module, model, part):
        out = super()._measure_part(trainer, pl_module, model, part)
        return replace(out, values={"value": float(self.num_measurements + 1)})


class Counting(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


# (monitor every_n_epochs, EarlyStopping kwargs, Trainer kwargs, epoch the fit is stopped at or None);
# the tiny loaders have 2 training batches per epoch
CASES = [
    (3, {"patience": 2}, {"max_epochs": 6}, 2),
    (3, {"patience": 3}, {"max_epochs": 6}, None),
    (1, {"patience": 1}, {"max_epochs": 3, "val_check_interval": 0.5}, 0),  # 2 validations an epoch
    (3, {"patience": 3}, {"max_epochs": 6, "val_check_interval": 0.5}, 1),
    (3, {"patience": 6}, {"max_epochs": 6, "val_check_interval": 0.5}, None),
    (10, {"patience": 3}, {"max_epochs": 15, "check_val_every_n_epoch": 3}, 11),
    (10, {"patience": 4}, {"max_epochs": 15, "check_val_every_n_epoch": 3}, None),
    (2, {"patience": 1}, {"max_epochs": 8, "val_check_interval": 3, "check_val_every_n_epoch": None}, 2),
    (4, {"patience": 2, "check_on_train_epoch_end": True}, {"max_epochs": 8, "check_val_every_n_epoch": 2}, 3),
    (1, {"patience": 0}, {"max_epochs": 3}, None),
    (10, {"patience": 3}, {"max_epochs": 4}, None),  # it stops at the last epoch: the fit ends there anyway
    (10, {"patience": 3}, {"max_epochs": 6}, 3),  # only one measurement in the fit, but it would lose epochs
    (3, {"patience": 2}, {"max_epochs": 8, "min_epochs": 5}, 4),  # the stop waits for min_epochs
    (10, {"patience": 3}, {"max_steps": 11, "max_epochs": -1}, 3),  # 11 steps: 5 whole epochs and a half
]


@pytest.mark.parametrize(("every", "stopper", "kwargs", "stopped_at"), CASES)
def test_the_replay_predicts_what_the_fit_does(tmp_path, every, stopper, kwargs, stopped_at):
    monitor = Rising(check=False, every_n_epochs=every)
    watcher = EarlyStopping(monitor="fake/value", mode="max", strict=False, **stopper)
    t = tiny_trainer(tmp_path, [monitor, watcher], **kwargs)
    t.fit(tiny_module(), *tiny_loaders())
    end = kwargs["max_epochs"] if kwargs.get("max_epochs", -1) > 0 else math.ceil(kwargs["max_steps"] / 2)
    if stopped_at is None:
        assert monitor.predicted is None and t.current_epoch == end  # it ran to its end
    else:
        assert monitor.predicted.epoch == stopped_at
        assert t.current_epoch == stopped_at + 1 < end  # it ended after that epoch, early


@pytest.mark.parametrize(("every", "stopper", "kwargs", "stopped_at"), CASES)
def test_the_check_refuses_exactly_the_fits_it_would_end(tmp_path, every, stopper, kwargs, stopped_at):
    counting = Counting()
    monitor = Rising(every_n_epochs=every)
    watcher = EarlyStopping(monitor="fake/value", mode="max", strict=False, **stopper)
    t = tiny_trainer(tmp_path, [monitor, watcher, counting], **kwargs)
    if stopped_at is None:
        t.fit(tiny_module(), *tiny_loaders())
        return
    with pytest.raises(MisconfigurationException, match=rf"would stop this fit at epoch {stopped_at}, on repeated"):
        t.fit(tiny_module(), *tiny_loaders())
    assert counting.steps == 0 and monitor.num_measurements == 0  # before any training


def test_the_message_names_the_patience_that_reaches_the_next_measurement(tmp_path):
    t = tiny_trainer(tmp_path, [CMDimensionMonitor(), EarlyStopping(monitor="cm/dim", mode="max")], max_epochs=30)
    with pytest.raises(
        MisconfigurationException, match=r"patience=3\) would stop this fit at epoch 3.*every 10 epochs"
    ):
        t.fit(tiny_module(), *tiny_loaders())
    t = tiny_trainer(tmp_path, [Rising(every_n_epochs=10), EarlyStopping(monitor="fake/value")], max_epochs=30)
    with pytest.raises(MisconfigurationException, match=r"\(9 in a row here\).*patience=10 to compare.*\(30 to wait"):
        t.fit(tiny_module(), *tiny_loaders())
    ok = [Rising(every_n_epochs=10), EarlyStopping(monitor="fake/value", mode="max", patience=10)]
    tiny_trainer(tmp_path, ok, max_epochs=12).fit(tiny_module(), *tiny_loaders())


def test_what_the_check_leaves_alone(tmp_path):
    loaders = tiny_loaders()
    # a negative min_delta counts the repeats as improvements; other keys and prefixes are not the monitor's
    for watcher in (
        EarlyStopping(monitor="fake/value", mode="max", patience=1, min_delta=-0.5),
        EarlyStopping(monitor="val_loss", patience=1),
        EarlyStopping(monitor="fake2/value", patience=1, strict=False),
    ):
        tiny_trainer(tmp_path, [Rising(every_n_epochs=5), watcher], max_epochs=6).fit(tiny_module(), *loaders)
    # fast_dev_run turns EarlyStopping off
    stopper = EarlyStopping(monitor="fake/value", patience=1)
    tiny_trainer(tmp_path, [Rising(every_n_epochs=5), stopper], fast_dev_run=True).fit(tiny_module(), *loaders)


class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(16, 4, generator=g)
            yield x, (x[:, 0] > 0).long()


@pytest.mark.parametrize(("every", "patience", "stops"), [(3, 2, True), (3, 3, False), (1, 1, False)])
def test_a_stream_counts_validations(tmp_path, every, patience, stops):
    # an endless epoch validated every 2 batches: the monitor measures every `every` validations
    monitor = Rising(check=False, every_n_epochs=every)
    watcher = EarlyStopping(monitor="fake/value", mode="max", patience=patience)
    kw = dict(max_steps=16, max_epochs=None, val_check_interval=2, check_val_every_n_epoch=None)
    t = tiny_trainer(tmp_path, [monitor, watcher], **kw)
    t.fit(tiny_module(), DataLoader(Stream(), batch_size=None), tiny_loaders()[1])
    assert (monitor.predicted is not None) == stops == (t.global_step < 16)
    if stops:
        assert monitor.predicted.validations * 2 == t.global_step  # stopped at that validation


def test_known_answers_of_the_replay():
    every_epoch = Schedule(10, batches_per_epoch=100, val_check_batch=100, check_val_every_n_epoch=1)
    assert forced_stop(every_epoch, patience=3).epoch == 3 and forced_stop(every_epoch, patience=3).repeats == 9
    assert forced_stop(every_epoch, patience=10) is None
    assert forced_stop(replace(every_epoch, end_epoch=4), patience=3) is None
    stream = Schedule(4, batches_per_epoch=math.inf, val_check_batch=50, check_val_every_n_epoch=None)
    assert forced_stop(stream, patience=3).validations == 4 and forced_stop(stream, patience=4) is None
    assert forced_stop(replace(stream, max_validations=4), patience=3) is None  # the fit ends there


def test_the_replay_is_quick_whatever_the_length_of_the_fit():
    # a long fit, many validations an epoch and a huge patience: a bounded replay, not one per check
    long = Schedule(7, batches_per_epoch=10**6, val_check_batch=1, check_val_every_n_epoch=1, end_epoch=10**6)
    assert forced_stop(long, patience=3).epoch == 0 and forced_stop(long, patience=10**9) is None
    assert len(list(checks(long, on_train_epoch_end=False))) < 100
    stream = Schedule(5, batches_per_epoch=math.inf, val_check_batch=1, check_val_every_n_epoch=None)
    assert len(list(checks(replace(stream, max_validations=10**9), on_train_epoch_end=False))) < 100


def test_the_options_the_message_gives_fit_the_schedule(tmp_path):
    # measured at every epoch, validated twice an epoch: the second validation repeats
    callbacks = [Rising(every_n_epochs=1), EarlyStopping(monitor="fake/value", patience=1, mode="max")]
    t = tiny_trainer(tmp_path, callbacks, max_epochs=3, val_check_interval=0.5)
    with pytest.raises(MisconfigurationException, match="check_on_train_epoch_end=True") as caught:
        t.fit(tiny_module(), *tiny_loaders())
    assert "every_n_epochs`)" not in str(caught.value)  # it cannot measure more often than every epoch
    callbacks = [
        Rising(every_n_epochs=1),
        EarlyStopping(monitor="fake/value", mode="max", check_on_train_epoch_end=True),
    ]
    tiny_trainer(tmp_path, callbacks, max_epochs=3, val_check_interval=0.5).fit(tiny_module(), *tiny_loaders())


def test_a_resumed_fit_is_not_checked(tmp_path):
    # a fit resumed at epoch 12 of 14 (from a checkpoint written without an EarlyStopping), measured
    # every 4 epochs, with patience 3: a new fit with these settings would stop at epoch 3 (refused),
    # but the rest of this one measures at 12 and ends at 14.
    # A resumed fit may also restart inside an epoch, after some of its validations, with the
    # EarlyStopping's count restored: its start was checked when the fit began, not again here
    def callbacks(watched: bool):
        watcher = [EarlyStopping(monitor="fake/value", mode="max", patience=3)] if watched else []
        return [Rising(every_n_epochs=4), *watcher, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]

    tiny_trainer(tmp_path, callbacks(False), max_epochs=12).fit(tiny_module(), *tiny_loaders())
    resumed = tiny_trainer(tmp_path, callbacks(True), max_epochs=14)
    resumed.fit(tiny_module(), *tiny_loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.current_epoch == 14
    with pytest.raises(MisconfigurationException, match="would stop this fit at epoch 3"):
        tiny_trainer(tmp_path, callbacks(True), max_epochs=14).fit(tiny_module(), *tiny_loaders())


class TwoSteps(NetModule):
    """Manual optimization with two optimizer steps per batch: global_step counts both."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(torch.nn.Linear(4, 2), lr=0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(2):
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))
            opt.step()


def test_max_steps_with_manual_optimization_is_not_checked(tmp_path):
    # 20 steps are 5 epochs here, not 10 as with one step a batch: a check would refuse a fit that ends first
    callbacks = [Rising(every_n_epochs=6), EarlyStopping(monitor="fake/value", mode="max", patience=5)]
    t = tiny_trainer(tmp_path, callbacks, max_steps=20, max_epochs=-1)
    t.fit(TwoSteps(), *tiny_loaders())
    assert t.global_step == 20 and t.current_epoch == 5


BUDGET_CASES = [  # (EarlyStopping kwargs, Trainer kwargs, measurements with the guard, epoch stopped without it)
    ({"patience": 2}, {}, 5, 2),  # measured whenever one more repeat would stop it: every second epoch
    # checks at every epoch's end, validations every second epoch: two checks before the next chance
    ({"patience": 3, "check_on_train_epoch_end": True, "strict": False}, {"check_val_every_n_epoch": 2}, 5, 4),
]


@pytest.mark.parametrize(("stopper", "kwargs", "measurements", "stopped_at"), BUDGET_CASES)
@pytest.mark.parametrize("guarded", [True, False])
def test_a_postponement_never_brings_an_early_stopping_to_its_patience(
    tmp_path, monkeypatch, guarded, stopper, kwargs, measurements, stopped_at
):
    # a measurement costs 6 s against 2 s of training an epoch: a 10 % budget postpones every one
    clock = [0.0]
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock[0])
    if not guarded:  # the control: what the budget alone does
        monkeypatch.setattr(Rising, "_stopper_at_stake", lambda self, trainer: None)
    monitor = Rising(every_n_epochs=1, max_cost_frac=0.1, seconds=6.0, clock=clock)
    watcher = EarlyStopping(monitor="fake/value", mode="max", **stopper)
    t = tiny_trainer(tmp_path, [TrainClock(clock), monitor, watcher], max_epochs=10, **kwargs)
    with pytest.warns(UserWarning, match="a postponement never brings an EarlyStopping"):
        t.fit(tiny_module(), *tiny_loaders())
    if guarded:
        assert t.current_epoch == 10 and monitor.num_measurements == measurements and not watcher.stopped_epoch
    else:
        assert watcher.stopped_epoch == stopped_at and monitor.num_measurements == 1


@pytest.mark.parametrize(("patience", "warned"), [(1, True), (2, False)])
def test_a_budget_that_the_patience_leaves_no_room_is_warned_about(tmp_path, patience, warned):
    monitor = Rising(every_n_epochs=1, max_cost_frac=0.1)
    watcher = EarlyStopping(monitor="fake/value", mode="max", patience=patience)
    t = tiny_trainer(tmp_path, [monitor, watcher], max_epochs=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(tiny_module(), *tiny_loaders())
    said = [str(w.message) for w in record if "cannot postpone any measurement" in str(w.message)]
    assert len(said) == int(warned)
    if warned:
        assert "A patience of at least 2 leaves room" in said[0]


@pytest.mark.parametrize(
    ("every", "top_k", "kwargs", "warned"),
    [
        (2, 2, {}, True),
        (2, 1, {}, False),
        (2, -1, {}, False),
        (1, 3, {}, False),
        (1, 3, {"val_check_interval": 0.5}, True),  # the second validation of each epoch repeats
        (2, 2, {"check_val_every_n_epoch": 2}, False),  # every validation is measured
        (2, 2, {"max_epochs": 1}, False),  # one validation
    ],
)
def test_a_checkpoint_top_k_over_repeated_values_is_warned_about(tmp_path, every, top_k, kwargs, warned):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="fake/value", mode="max", save_top_k=top_k)
    t = tiny_trainer(tmp_path, [Rising(every_n_epochs=every), checkpoint], **{"max_epochs": 4, **kwargs})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(tiny_module(), *tiny_loaders())
    said = [str(w.message) for w in record if "models that were never measured" in str(w.message)]
    assert len(said) == int(warned)


@pytest.mark.parametrize(
    ("every", "kwargs", "warned"),
    [
        (10, {"max_epochs": 5}, "validated at epochs 0, 1, 2, 3, 4, is measured only once, at epoch 0; .* <= 4 "),
        (10, {"max_epochs": 5, "check_val_every_n_epoch": 2}, "validated at epochs 1, 3, is .* <= 2 "),
        (10, {"max_epochs": 11}, None),  # measured at 0 and 10
        (1, {"max_epochs": 5}, None),
        (10, {"max_epochs": 1}, None),  # one validation: nothing to measure again
        (10, {"max_epochs": 3, "check_val_every_n_epoch": 2}, None),
    ],
)
def test_a_fit_measured_only_once_is_warned_about(tmp_path, every, kwargs, warned):
    t = tiny_trainer(tmp_path, [Rising(every_n_epochs=every)], **kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(tiny_module(), *tiny_loaders())
    said = [str(w.message) for w in record if "is measured only once" in str(w.message)]
    assert len(said) == (warned is not None)
    if warned:
        assert re.search(warned, said[0]), said[0]


def test_the_measured_epochs_are_announced(tmp_path, caplog):
    monitor = Rising(every_n_epochs=3, verbose=True)
    with caplog.at_level("INFO"):
        tiny_trainer(tmp_path, [monitor], max_epochs=8, check_val_every_n_epoch=2).fit(tiny_module(), *tiny_loaders())
    expected = (
        "measures the first validation of epochs 1, 5 (the first validation of the fit, then the first at least 3"
    )
    assert expected in caplog.text
    assert monitor.num_measurements == 2  # validations at 1, 3, 5, 7: measured at 1 and 5


def test_a_model_with_lazy_modules_is_checked_after_its_first_batch(tmp_path):
    # its set-up waits for the first training batch (which initializes the lazy modules): still a new fit
    counting = Counting()
    module = NetModule(torch.nn.LazyLinear(2), lr=0.1)
    callbacks = [Rising(every_n_epochs=10), EarlyStopping(monitor="fake/value", mode="max"), counting]
    with pytest.raises(MisconfigurationException, match="would stop this fit at epoch 3"):
        tiny_trainer(tmp_path, callbacks, max_epochs=30).fit(module, *tiny_loaders())
    assert counting.steps == 1


def test_keys_logged_afresh_at_every_validation_are_not_refused(tmp_path):
    # {prefix}/seconds, /measured, ... are logged anew at every validation: they do not repeat
    watcher = EarlyStopping(monitor="fake/seconds", mode="min", patience=3)
    tiny_trainer(tmp_path, [Rising(every_n_epochs=10), watcher], max_epochs=5).fit(tiny_module(), *tiny_loaders())
