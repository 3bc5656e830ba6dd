"""The monitors never take training down (issue 13): failed measurements, NaN/inf from the model,
incomplete validation data, and a failure on one rank of two (DDP on CPU).

Fits are tiny (digits, a few batches); the measurements use the fast settings of test_callback.py.
"""

from __future__ import annotations

import math
import warnings
from datetime import timedelta
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from odd_models import OOMAbove
from test_callback import FAST, DigitsCNN, digits, loaders, trainer
from test_monitors import DIFFEO_FAST, ELASTIC_FAST
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cm_monitor import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor

MONITORS = {"cm": CMDimensionMonitor, "diffeo": DiffeoStabilityMonitor, "elasticity": ElasticityMonitor}
SETTINGS = {"cm": FAST, "diffeo": DIFFEO_FAST, "elasticity": ELASTIC_FAST}
HEADLINE = {"cm": "cm/dim", "diffeo": "diffeo/rf", "elasticity": "elasticity/ratio"}


class Record(Callback):
    """The monitor's logged values after each validation of the fit (the rows EarlyStopping sees)."""

    def __init__(self, prefix: str):
        self.prefix, self.rows = prefix, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.rows.append({k: v.item() for k, v in metrics.items() if k.startswith(f"{self.prefix}/")})

    def series(self, key: str) -> list[float | None]:
        return [row.get(key) for row in self.rows]


def fit(tmp_path, callbacks, model=None, val=None, **kwargs):
    kwargs.setdefault("limit_train_batches", 3)
    model = model if model is not None else DigitsCNN()
    train, default_val = loaders()
    t = trainer(tmp_path, callbacks, **kwargs)
    t.fit(model, train, val if val is not None else default_val)
    return t, model


# ------------------------------------------------------------------ 1. failures never end training


class FailingDiffeo(DiffeoStabilityMonitor):
    """Raises inside the measurement at the given epochs (on the given ranks)."""

    def __init__(self, fail_epochs=(), fail_ranks=(0,), error=RuntimeError, **kwargs):
        super().__init__(**kwargs)
        self.fail_epochs, self.fail_ranks, self.error = set(fail_epochs), set(fail_ranks), error

    def _measure_part(self, trainer, pl_module, model, part):
        if trainer.current_epoch in self.fail_epochs and trainer.global_rank in self.fail_ranks:
            raise self.error(f"boom on rank {trainer.global_rank}")
        return super()._measure_part(trainer, pl_module, model, part)


def test_a_failed_measurement_is_a_warning_and_training_goes_on(tmp_path):
    monitor = FailingDiffeo(fail_epochs={1}, **DIFFEO_FAST)
    record = Record("diffeo")
    match = r"FailingDiffeo \(epoch 1\): the measurement failed \(RuntimeError: boom on rank 0\)"
    with pytest.warns(RuntimeWarning, match=match):
        _, model = fit(tmp_path, [monitor, record], max_epochs=3)
    assert model.train_steps == 9  # every epoch trained
    assert record.series("diffeo/measured") == [1.0, 0.0, 1.0]
    assert record.series("diffeo/failed") == [0.0, 1.0, 0.0]
    assert record.series("diffeo/nonfinite") == [0.0, 0.0, 0.0]
    rf = record.series("diffeo/rf")
    assert rf[1] == rf[0] and rf[2] != rf[0]  # the failed validation logs the last values again
    assert all(row.keys() == record.rows[0].keys() for row in record.rows)  # one consistent set of keys
    assert record.series("diffeo/seconds")[1] > 0  # the failed attempt's time is reported
    assert monitor.num_measurements == 2


class ExplodingNet(nn.Module):
    """The model, but its forward raises after ``after`` calls with autograd on in eval mode (i.e. inside
    a cutting-plane optimization, not training nor validation; the cost probe at the start of fit
    makes four such calls)."""

    def __init__(self, net, after=6):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def forward(self, x):
        if torch.is_grad_enabled() and not self.training:
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError("exploded mid-optimization")
        return self.net(x)


class Snapshot(Callback):
    """Before the monitor: put dropout in training mode, give every parameter a grad, keep modes, weights
    and grads; after it: compare (callbacks run in list order)."""

    def __init__(self):
        self.before, self.checked = None, 0

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        state = (
            [m.training for m in pl_module.modules()],
            {k: v.clone() for k, v in pl_module.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
        )
        if self.before is None:
            pl_module.net[8].train()  # a mode the monitor must leave as it found it
            for p in pl_module.parameters():  # grads the monitor must not touch (e.g. accumulation mid-way)
                p.grad = torch.randn_like(p)
            self.before = (
                [m.training for m in pl_module.modules()],
                state[1],
                [p.grad.clone() for p in pl_module.parameters()],
            )
            return
        modes, weights, grads = state
        assert modes == self.before[0]
        assert all(torch.equal(weights[k], v) for k, v in self.before[1].items())
        assert all(torch.equal(a, b) for a, b in zip(grads, self.before[2], strict=True))
        self.before, self.checked = None, self.checked + 1


def test_a_failure_inside_the_model_leaves_modes_weights_and_grads(tmp_path):
    model = DigitsCNN()
    wrapper = ExplodingNet(model.net)
    snapshot = Snapshot()
    monitor = CMDimensionMonitor(**FAST, get_model=lambda m: wrapper)
    with pytest.warns(RuntimeWarning, match=r"failed \(RuntimeError: exploded mid-optimization\)"):
        t, _ = fit(tmp_path, [snapshot, monitor, snapshot], model=model, max_epochs=1)
    assert snapshot.checked == 1 and wrapper.calls == 7  # four in the cost probe, the third pass explodes
    assert t.callback_metrics["cm/failed"] == 1.0 and t.callback_metrics["cm/measured"] == 0.0
    assert "cm/dim" not in t.callback_metrics  # nothing measured yet, nothing made up

    # strict=True: the error itself, not a warning
    wrapper = ExplodingNet(DigitsCNN().net)
    with pytest.raises(RuntimeError, match="exploded mid-optimization"):
        fit(tmp_path, [CMDimensionMonitor(**FAST, get_model=lambda m: wrapper, strict=True)], max_epochs=1)


def test_interrupts_are_not_swallowed(tmp_path, monkeypatch):
    monitor = CMDimensionMonitor(**FAST)
    monkeypatch.setattr(monitor, "_model", lambda pl_module: None)
    for error in (KeyboardInterrupt, SystemExit):

        def measure(*args, error=error):
            raise error()

        monkeypatch.setattr(monitor, "_measure_part", measure)
        with pytest.raises(error):
            monitor._attempt(SimpleNamespace(world_size=1, global_rank=0), None)
    # and through a fit: SystemExit ends it
    with pytest.raises(SystemExit):
        fit(tmp_path, [FailingDiffeo(fail_epochs={0}, error=SystemExit, **DIFFEO_FAST)], max_epochs=1)


@pytest.mark.parametrize("limit", [8, 4])
def test_out_of_memory_is_retried_once_with_half_the_chunk_size(tmp_path, limit):
    # the probes are forwarded 30 at a time, in chunks of `chunk_size` = 16: 16 > 8 runs out, 8 does not;
    # with a limit of 4, the retry with 8 runs out too
    monitor = DiffeoStabilityMonitor(**DIFFEO_FAST, chunk_size=16, get_model=lambda m: OOMAbove(m.net, limit))
    with pytest.warns(
        RuntimeWarning, match=r"out of memory with chunk_size = 16 \(OutOfMemoryError: CUDA out of memory"
    ):
        t, _ = fit(tmp_path, [monitor], max_epochs=1)
    assert monitor.chunk_size == 8
    if limit == 8:
        assert t.callback_metrics["diffeo/measured"] == 1.0 and t.callback_metrics["diffeo/failed"] == 0.0
        assert math.isfinite(t.callback_metrics["diffeo/rf"].item())
    else:
        assert t.callback_metrics["diffeo/measured"] == 0.0 and t.callback_metrics["diffeo/failed"] == 1.0


# ------------------------------------------------------------------ 3. a broken run is visible


class BreakWeights(Callback):
    """Sets every parameter to NaN at the end of training epoch ``epoch`` (after its validation)."""

    def __init__(self, epoch=0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(math.nan)


@pytest.mark.parametrize("kind", ["cm", "diffeo", "elasticity"])
def test_nan_weights_are_logged_as_nan_and_early_stopping_stops(tmp_path, kind):
    key = HEADLINE[kind]
    record = Record(kind)
    stopper = EarlyStopping(monitor=key, mode="max", patience=10)  # check_finite=True by default
    monitor = MONITORS[kind](**SETTINGS[kind])
    assert monitor.on_nonfinite == "log_nan"  # the default
    with pytest.warns(RuntimeWarning, match=r"\(epoch 1\): the model returned NaN/inf .*logged as NaN"):
        t, _ = fit(tmp_path, [monitor, BreakWeights(0), record, stopper], max_epochs=4)
    assert stopper.stopped_epoch == 1 and t.current_epoch == 2  # stopped by the NaN, not by max_epochs
    assert record.series(f"{kind}/measured") == [1.0, 0.0]
    assert record.series(f"{kind}/nonfinite") == [0.0, 1.0]
    assert record.series(f"{kind}/failed") == [0.0, 0.0]
    first, second = record.series(key)
    assert math.isfinite(first) and math.isnan(second)


def test_nan_weights_keep_last_and_raise(tmp_path):
    record = Record("cm")
    stopper = EarlyStopping(monitor="cm/dim", mode="max", patience=10)
    monitor = CMDimensionMonitor(**FAST, on_nonfinite="keep_last")
    with pytest.warns(RuntimeWarning, match=r"\(epoch 1\): the model returned NaN/inf .*last finite values"):
        t, _ = fit(tmp_path, [monitor, BreakWeights(0), record, stopper], max_epochs=2)
    assert stopper.stopped_epoch == 0 and t.current_epoch == 2  # not stopped: it looks healthy
    assert record.series("cm/nonfinite") == [0.0, 1.0] and record.series("cm/measured") == [1.0, 0.0]
    first, second = record.series("cm/dim")
    assert math.isfinite(first) and second == first
    assert record.series("cm/dim_class_4")[1] == record.series("cm/dim_class_4")[0]

    monitor = CMDimensionMonitor(**FAST, on_nonfinite="raise")
    with pytest.raises(RuntimeError, match=r"\(epoch 1\): the model returned NaN/inf \(.*\); `on_nonfinite='raise'`"):
        fit(tmp_path, [monitor, BreakWeights(0)], max_epochs=2)


@pytest.mark.parametrize("kind", ["cm", "diffeo", "elasticity"])
def test_on_nonfinite_is_validated(kind):
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be one of 'log_nan', 'keep_last', 'raise', got 'nan'"):
        MONITORS[kind](on_nonfinite="nan")
    with pytest.raises(TypeError, match=r"`strict` must be a bool"):
        MONITORS[kind](strict="yes")


# ------------------------------------------------------------------ 5. incomplete validation data


def val_without(cls: int, keep: int = 0) -> DataLoader:
    """The digits validation set with only ``keep`` examples of class ``cls``."""
    (_, _), (xv, yv) = digits()
    idx = torch.cat([(yv != cls).nonzero().squeeze(1), (yv == cls).nonzero().squeeze(1)[:keep]])
    return DataLoader(TensorDataset(xv[idx], yv[idx]), batch_size=100)


@pytest.mark.parametrize("classes", [None, list(range(9))])
def test_a_class_missing_from_validation_data_is_left_out(tmp_path, classes):
    monitor = CMDimensionMonitor(**{**FAST, "classes": classes, "num_pairs": 1, "dims": [1, 8, 64]})
    match = r"1 of the model's 10 classes have fewer than `num_anchors` = 2 validation examples \(class 9: 0;"
    with pytest.warns(UserWarning, match=match):
        t, _ = fit(tmp_path, [monitor], val=val_without(9), max_epochs=1)
    assert monitor.targets == list(range(9)) and 9 not in monitor.anchor_labels.tolist()
    assert all(c in monitor.targets for p in monitor.pairs for c in p)
    m = t.callback_metrics
    assert m["cm/num_classes_measured"] == 9.0 and m["cm/measured"] == 1.0
    assert "cm/dim_class_8" in m and "cm/dim_class_9" not in m
    assert math.isclose(m["cm/dim"].item(), sum(m[f"cm/dim_class_{c}"].item() for c in range(9)) / 9, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["diffeo", "elasticity"])
def test_a_short_class_is_left_out_by_the_other_monitors(tmp_path, kind):
    monitor = MONITORS[kind](**SETTINGS[kind])
    with pytest.warns(UserWarning, match=r"\(class 3: 1;"):
        t, _ = fit(tmp_path, [monitor], val=val_without(3, keep=1), max_epochs=1)
    labels = monitor.anchor_labels.tolist()
    assert 3 not in labels and sorted(set(labels)) == [c for c in range(10) if c != 3]
    assert len(labels) == 9 * SETTINGS[kind]["num_anchors"]
    assert t.callback_metrics[f"{kind}/num_classes_measured"] == 9.0
    assert t.callback_metrics[f"{kind}/measured"] == 1.0


# ------------------------------------------------------------------ 1. under DDP: 2 CPU processes


class RankFailingDiffeo(DiffeoStabilityMonitor):
    """Fails on rank 1 at epoch 0; writes what each rank logged, and rank 0's warnings, to files."""

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = str(out_dir)

    def _measure_part(self, trainer, pl_module, model, part):
        if trainer.current_epoch == 0 and trainer.global_rank == 1:
            raise RuntimeError("boom on rank 1")
        return super()._measure_part(trainer, pl_module, model, part)

    def on_validation_epoch_end(self, trainer, pl_module):

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().on_validation_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking:
            logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("diffeo/")}
            torch.save(
                {"logged": logged, "warnings": [str(w.message) for w in caught]},
                f"{self.out_dir}/epoch{trainer.current_epoch}_{trainer.global_rank}.pt",
            )


def ddp_trainer(callbacks):
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_epochs=2,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


@pytest.mark.slow
def test_ddp_a_failure_on_one_rank_reaches_every_rank(tmp_path):
    pl.seed_everything(0)
    monitor = RankFailingDiffeo(tmp_path, **DIFFEO_FAST, log_figures=False)
    ddp_trainer([monitor]).fit(DigitsCNN(), *loaders())
    ranks = [[torch.load(tmp_path / f"epoch{e}_{r}.pt") for r in range(2)] for e in range(2)]
    for epoch, (failed, measured) in enumerate([(1.0, 0.0), (0.0, 1.0)]):
        zero, one = ranks[epoch]
        assert zero["logged"] == one["logged"]  # the same keys and values on both ranks
        assert zero["logged"]["diffeo/failed"] == failed and zero["logged"]["diffeo/measured"] == measured
    assert "diffeo/rf" not in ranks[0][0]["logged"] and math.isfinite(ranks[1][0]["logged"]["diffeo/rf"])
    # rank 0, which measured fine, reports rank 1's failure
    assert any("the measurement failed (rank 1: RuntimeError: boom on rank 1)" in w for w in ranks[0][0]["warnings"])


def test_a_failed_first_measurement_does_not_stop_an_early_stopping_on_its_key(tmp_path):
    # no earlier value to log again: the watched key gets the worst finite value for its mode, on
    # which EarlyStopping(check_finite=True) does not stop (a NaN would), and the next real value is
    # an improvement over it
    monitor = FailingDiffeo(fail_epochs={0}, **DIFFEO_FAST)
    record = Record("diffeo")
    stopper = EarlyStopping(monitor="diffeo/rf", mode="min", patience=3)
    with pytest.warns(RuntimeWarning, match=r"\['diffeo/rf'\] monitored by another callback but without a value yet"):
        _, model = fit(tmp_path, [monitor, record, stopper], max_epochs=3)
    assert model.train_steps == 9 and stopper.stopped_epoch == 0
    rf = record.series("diffeo/rf")
    assert rf[0] == torch.finfo(torch.float32).max and math.isfinite(rf[1]) and rf[1] < rf[0]
    assert record.series("diffeo/failed") == [1.0, 0.0, 0.0]


def test_a_key_that_one_measurement_does_not_give_does_not_end_the_fit(tmp_path):
    # cm/success_dist_median comes only with a success; with one step per problem nothing succeeds
    monitor = CMDimensionMonitor(**{**FAST, "max_steps": 1, "num_pairs": 0, "threshold": 0.99})
    stopper = EarlyStopping(monitor="cm/success_dist_median", mode="min", patience=5)
    record = Record("cm")
    with pytest.warns(RuntimeWarning, match=r"\['cm/success_dist_median'\] monitored by another callback"):
        _, model = fit(tmp_path, [monitor, record, stopper], max_epochs=2)
    assert model.train_steps == 6
    assert record.series("cm/success_dist_median") == [torch.finfo(torch.float32).max] * 2
    assert record.series("cm/measured") == [1.0, 1.0]


class Arm(Callback):
    """Turns ``flag[0]`` on after the monitors' start-of-fit work (callbacks run in list order)."""

    def __init__(self, flag):
        self.flag = flag

    def on_train_start(self, trainer, pl_module):
        self.flag[0] = True


@pytest.mark.parametrize("kind", ["cm", "diffeo"])
def test_out_of_memory_retries_with_half_the_pass_that_ran_out(tmp_path, kind):
    # at the default chunk_size the passes are smaller than chunk_size (cm: the 96 problems of the
    # grid in flight, classes and pairs; diffeo: the 30 probe images): halving chunk_size alone would change nothing
    limit, expected = {"cm": (50, 48), "diffeo": (20, 15)}[kind]
    armed = [False]  # from the first measurement on (CM's start-of-fit probe has its own test)
    monitor = MONITORS[kind](**SETTINGS[kind], get_model=lambda m: OOMAbove(m.net, limit) if armed[0] else m.net)
    assert monitor.chunk_size > 100
    with pytest.warns(RuntimeWarning, match=rf"out of memory with chunk_size = {2 * expected} "):
        t, _ = fit(tmp_path, [monitor, Arm(armed)], max_epochs=1)
    assert monitor.chunk_size == expected
    assert t.callback_metrics[f"{kind}/measured"] == 1.0 and t.callback_metrics[f"{kind}/failed"] == 0.0


class SqueezeMemory(Callback):
    """Before the monitor's measurement (listed before it), the device's free memory holds
    ``rows[epoch]`` of its rows (as when training's gradients and optimizer state fill memory after
    the estimate at the start of fit); the forwards of each measurement are recorded."""

    def __init__(self, monitor, rows, monkeypatch):
        self.monitor, self.rows, self.monkeypatch, self.passes = monitor, rows, monkeypatch, {}
        self.hook = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        free = 2 * self.rows[trainer.current_epoch] * self.monitor._row_bytes + 1
        self.monkeypatch.setattr("cm_monitor.callbacks.cm.available_bytes", lambda device: free)
        sizes = self.passes.setdefault(trainer.current_epoch, [])
        self.hook = pl_module.net.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))

    def on_validation_end(self, trainer, pl_module):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def test_each_pass_fits_the_memory_free_at_its_measurement(tmp_path, monkeypatch):
    monitor = CMDimensionMonitor(**FAST, get_model=lambda m: m.net, warm_start=False)
    squeeze = SqueezeMemory(monitor, {0: 5, 1: 10**6, 2: 7}, monkeypatch)
    with pytest.warns(UserWarning, match=r"holds 5 plane points per pass, fewer than the \d+ this") as record:
        t, _ = fit(tmp_path, [squeeze, monitor], max_epochs=3)
    monitor._memory_rows = None  # (the last measurement's)
    planned = monitor._pass_size((0, 1))
    assert monitor.cost_estimate.rows_per_pass > 7 and planned > 7  # what the start of fit planned
    largest = {epoch: max(sizes[1:]) for epoch, sizes in squeeze.passes.items()}  # after the calibration's
    assert largest == {0: 5, 1: planned, 2: 7}  # back to the plan when memory is free again
    assert sum("plane points per pass, fewer than" in str(w.message) for w in record) == 1  # once per fit
    assert t.callback_metrics["cm/measured"] == 1.0 and t.callback_metrics["cm/failed"] == 0.0


def test_out_of_memory_at_the_start_of_fit_scales_the_pass_down(tmp_path):
    monitor = CMDimensionMonitor(**FAST, get_model=lambda m: OOMAbove(m.net, 50))
    with pytest.warns(
        UserWarning, match="a pass of 96 rows ran out of memory at the start of fit; measuring with passes of 48"
    ):
        t, _ = fit(tmp_path, [monitor], max_epochs=1)
    assert monitor.cost_estimate.rows_per_pass == 48
    assert t.callback_metrics["cm/measured"] == 1.0 and t.callback_metrics["cm/failed"] == 0.0


def test_the_placeholder_of_a_failed_first_measurement_stays_within_a_divergence_threshold(tmp_path):
    monitor = FailingDiffeo(fail_epochs={0}, **DIFFEO_FAST)
    stopper = EarlyStopping(monitor="diffeo/rf", mode="min", divergence_threshold=1000.0, check_finite=False)
    record = Record("diffeo")
    with pytest.warns(RuntimeWarning, match="without a value yet"):
        _, model = fit(tmp_path, [monitor, record, stopper], max_epochs=2)
    assert model.train_steps == 6 and stopper.stopped_epoch == 0
    assert record.series("diffeo/rf")[0] == 1000.0


class LogsAtEpochEnd(DigitsCNN):
    """Logs a key under the monitor's prefix in its own on_validation_epoch_end (after the callbacks')."""

    def on_validation_epoch_end(self):
        self.log("diffeo/extra", 1.0)


def test_a_key_the_module_logs_after_the_monitor_is_left_to_the_module(tmp_path):
    stopper = EarlyStopping(monitor="diffeo/extra", mode="min", patience=5)
    with pytest.warns(UserWarning, match="'diffeo/extra', which is not a key of this monitor"):
        t, model = fit(tmp_path, [DiffeoStabilityMonitor(**DIFFEO_FAST), stopper], model=LogsAtEpochEnd(), max_epochs=2)
    assert model.train_steps == 6 and t.callback_metrics["diffeo/extra"] == 1.0


class FrozenUnderNoGrad(nn.Module):
    """A linear probe whose backbone runs under torch.no_grad(): no gradient reaches the input."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10)

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


class Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_model_without_an_input_gradient_is_refused_at_the_start_with_the_reason(tmp_path):
    from modules import NetModule

    train, val = loaders(num_val=100)
    steps = Steps()
    t = trainer(tmp_path, [CMDimensionMonitor(**FAST), steps], max_epochs=1, limit_train_batches=2)
    with pytest.raises(RuntimeError, match="CMDimensionMonitor could not set up at the start of fit") as info:
        t.fit(NetModule(FrozenUnderNoGrad(), lr=1e-3), train, val)
    assert "does not depend on its input through autograd" in str(info.value)
    assert steps.steps == 0


def test_the_functions_say_why_a_model_has_no_input_gradient():
    from cm_monitor import cm_dimension

    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 3
    with pytest.raises(RuntimeError, match=r"does not depend on its input through autograd.*no_grad"):
        cm_dimension(FrozenUnderNoGrad(), x, y, dims=[1, 64], num_bootstrap=0, max_steps=5)
    cm_dimension(
        FrozenUnderNoGrad().backbone.append(nn.Linear(16, 10)), x, y, dims=[1, 64], num_bootstrap=0, max_steps=5
    )


class BatchOfTwoFails(nn.Module):
    """Raises ``error`` on a batch of two (the monitor's probe at the start; training batches are larger)."""

    def __init__(self, error: Exception | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.error = error if error is not None else RuntimeError("unsupported batch size 2")

    def forward(self, x):
        if x.shape[0] == 2:
            raise self.error
        return self.net(x)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_error_of_the_model_at_the_start_names_the_monitor(tmp_path):
    from modules import NetModule

    train, val = loaders(num_val=100)
    t = trainer(tmp_path, [DiffeoStabilityMonitor(**DIFFEO_FAST)], max_epochs=1, limit_train_batches=2)
    with pytest.raises(RuntimeError, match=r"DiffeoStabilityMonitor could not set up.*unsupported batch size 2"):
        t.fit(NetModule(BatchOfTwoFails(), lr=1e-3), train, val)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_error_subclass_at_the_start_keeps_its_type(tmp_path):
    from modules import NetModule

    train, val = loaders(num_val=100)
    t = trainer(tmp_path, [DiffeoStabilityMonitor(**DIFFEO_FAST)], max_epochs=1, limit_train_batches=2)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):  # handlers of that type still catch it
        t.fit(NetModule(BatchOfTwoFails(torch.OutOfMemoryError("simulated")), lr=1e-3), train, val)


def with_ranks(cls, n, **attributes):
    """A subclass of the strategy ``cls`` that reports ``n`` ranks (as after Lightning's set-up)."""
    return type(f"My{cls.__name__}", (cls,), {"world_size": property(lambda self: n), **attributes})


def test_strategies_that_shard_the_parameters_are_refused_before_training():
    from lightning.pytorch import strategies

    from cm_monitor.callbacks.base import check_strategy

    refused = [with_ranks(strategies.FSDPStrategy, 2)(), with_ranks(strategies.ModelParallelStrategy, 2)()]

    def no_deepspeed_needed(self, stage):  # Lightning's __init__ needs deepspeed; the check reads these
        self.stage = stage

    deepspeed = with_ranks(
        strategies.DeepSpeedStrategy, 2, __init__=no_deepspeed_needed, zero_stage_3=property(lambda s: s.stage == 3)
    )
    refused.append(deepspeed(3))  # a subclass, found by isinstance
    for strategy in refused:
        name = type(strategy).__name__
        with pytest.raises(
            MisconfigurationException, match=rf"CMDimensionMonitor: `{name}` shards .* `cm-monitor analyze`"
        ):
            check_strategy(strategy, "CMDimensionMonitor")
    accepted = [
        deepspeed(2),  # stage 2 shards the optimizer state only
        with_ranks(strategies.FSDPStrategy, 2)(sharding_strategy="NO_SHARD"),
        with_ranks(strategies.FSDPStrategy, 1)(),  # one rank: nothing to gather from others
        with_ranks(DDPStrategy, 2)(),
        strategies.SingleDeviceStrategy(device="cpu"),
    ]
    for strategy in accepted:
        check_strategy(strategy, "CMDimensionMonitor")


def test_a_sharding_strategy_stops_the_fit_at_setup_but_not_validate(tmp_path, monkeypatch):
    from cm_monitor.callbacks import base

    monkeypatch.setattr(base, "_shards_parameters", lambda strategy: True)
    steps = []
    model = DigitsCNN()
    model.on_train_batch_start = lambda *a: steps.append(1)
    with pytest.raises(MisconfigurationException, match="shards the model's parameters"):
        fit(tmp_path, [CMDimensionMonitor(**FAST)], model=model, max_epochs=1)
    assert steps == []  # before any training
    t = trainer(tmp_path, [CMDimensionMonitor(**FAST)])
    t.validate(model, loaders()[1], verbose=False)  # the monitor does nothing there: not refused


class Stream(torch.utils.data.IterableDataset):
    """An endless stream of digits batches (no length)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randint(0, len(self.y), (32,), generator=g)
            yield self.x[idx], self.y[idx]


@pytest.mark.parametrize(
    ("every", "kwargs", "expected"),
    [(1, {}, [1, 1, 1]), (2, {}, [1, 0, 1]), (1, {"accumulate_grad_batches": 2}, [1] * 6)],
)
def test_a_training_epoch_without_an_end_is_measured_every_n_validations(tmp_path, every, kwargs, expected):
    # a stream validated every 4 batches: one epoch for the whole fit (once per epoch was once per fit)
    (xt, yt), (xv, yv) = digits()
    monitor = DiffeoStabilityMonitor(**DIFFEO_FAST, every_n_epochs=every)
    record = Record(monitor.prefix)
    kw = dict(max_steps=12, max_epochs=None, val_check_interval=4, check_val_every_n_epoch=None, **kwargs)
    t = trainer(tmp_path, [monitor, record], **kw)
    t.fit(DigitsCNN(), DataLoader(Stream(xt, yt), batch_size=None), DataLoader(TensorDataset(xv, yv), batch_size=100))
    assert [row["diffeo/measured"] for row in record.rows] == expected
    state = monitor.state_dict()
    assert state["num_validations"] == len(expected) and state["last_measured_validation"] == len(expected)


def test_a_stream_resumed_from_a_checkpoint_without_the_validation_count_measures_next():
    monitor = DiffeoStabilityMonitor(**DIFFEO_FAST)
    monitor.last_measured_epoch, monitor.num_validations, monitor.last_measured_validation = 0, 5, 5
    state = monitor.state_dict()
    del state["num_validations"], state["last_measured_validation"]  # as written before 2026-12-06
    monitor.load_state_dict(state)
    stream, epochs = (
        SimpleNamespace(num_training_batches=math.inf),
        SimpleNamespace(num_training_batches=10, current_epoch=0),
    )
    assert monitor._due(stream) and not monitor._due(epochs)
