"""CMDimensionMonitor in real (small) Lightning fits on the digits data.

Covers: invisibility to training (bit-identical weights and val_loss), what lands in the
TensorBoard event files, every_n_epochs with strict EarlyStopping, resume from a checkpoint,
dict batches and custom batch readers, and each error raised at the start of fit.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from modules import NetModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cm_monitor import CMDimensionMonitor, OptimizerSettings, cm_dimension
from cm_monitor.plotting import curves_figure

sklearn_datasets = pytest.importorskip("sklearn.datasets")

D = 64
#: A monitor configuration that measures in a fraction of a second on a CPU. These tests are about
#: the callback's mechanics and need values that are neither the floor 0 nor saturated: with two
#: anchors the fraction read-off takes only the values 0, 1/2 and 1, so they read the mean score,
#: and a CNN trained for two short epochs at lower levels within a wider radius.
FAST = {
    "every_n_epochs": 1,  # the monitor's default is 10; these tests follow measurements epoch by epoch
    "settings": OptimizerSettings(readoff="mean", max_radius=1.0),
    "threshold": 0.7,
    "boundary_threshold": 0.5,
    "num_anchors": 2,
    "anchors_per_target": 2,
    "dims": [1, 4, 16, 64],
    "max_steps": 60,
    "num_pairs": 2,
    "num_bootstrap": 20,
}


def assert_reached(values: dict[str, float], boundaries: bool = True) -> None:
    """Every class (and the boundaries) reached its threshold: no dimension is the floor value 0."""
    dims = [values[f"cm/dim_class_{c}"] for c in range(10)]
    assert all(0 < d <= D for d in dims), dims
    if boundaries:
        assert 0 < values["cm/boundary_dim"] <= D


def digits(num_val: int = 300):
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = (torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16 - 0.3) / 0.4
    y = torch.tensor(y, dtype=torch.long)
    return (x[:-num_val], y[:-num_val]), (x[-num_val:], y[-num_val:])


class DictDataset(Dataset):
    def __init__(self, x, y, keys=("image", "label")):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


class DigitsCNN(pl.LightningModule):
    """A small CNN with BatchNorm and dropout; `batch_keys` makes it read dict batches."""

    def __init__(self, batch_keys: tuple[str, str] | None = None):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(16 * 16, 10),
        )
        self.batch_keys = batch_keys
        self.train_steps = 0

    def forward(self, x):
        return self.net(x)

    def _xy(self, batch):
        if self.batch_keys is None:
            return batch[0], batch[1]
        return batch[self.batch_keys[0]], batch[self.batch_keys[1]]

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        x, y = self._xy(batch)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loaders(batch_size=64, dict_keys=None, num_val=300):
    (xt, yt), (xv, yv) = digits(num_val)
    if dict_keys is None:
        train, val = TensorDataset(xt, yt), TensorDataset(xv, yv)
    else:
        train, val = DictDataset(xt, yt, dict_keys), DictDataset(xv, yv, dict_keys)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=100)


def trainer(tmp_path, callbacks=(), logger=None, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("log_every_n_steps", 5)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        deterministic=True,
        **kwargs,
    )


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    # skips only the tests that read event files: the GPU machine's image may lack tbparse
    tbparse = pytest.importorskip("tbparse")
    df = tbparse.SummaryReader(str(log_dir)).scalars
    out: dict[str, list[tuple[int, float]]] = {}
    for tag, group in df.groupby("tag"):
        out[tag] = sorted(zip(group["step"].tolist(), group["value"].tolist(), strict=True))
    return out


class MonitorLog(logging.Handler):
    """Collects the lines the monitors report through Lightning's rank-zero logger."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


# ------------------------------------------------------------------ one pair of runs, shared


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fits with the same seed, without and with the monitor (TensorBoard logger on both)."""
    out = {}
    for name in ("plain", "monitored"):
        root = tmp_path_factory.mktemp(name)
        pl.seed_everything(0, workers=True)
        model = DigitsCNN()
        train, val = loaders()
        callbacks = [CMDimensionMonitor(**FAST, extra_thresholds=[0.8])] if name == "monitored" else []
        logger = TensorBoardLogger(root, name="tb", version=0)
        with MonitorLog() as log:
            trainer(root, callbacks, logger=logger).fit(model, train, val)
        out[name] = {"model": model, "log_dir": logger.log_dir, "lines": log.lines, "callbacks": callbacks}
    return out


def test_training_is_bit_identical_with_and_without_monitor(runs):
    plain, monitored = runs["plain"]["model"].state_dict(), runs["monitored"]["model"].state_dict()
    assert plain.keys() == monitored.keys()
    for key in plain:
        assert torch.equal(plain[key], monitored[key]), key  # BatchNorm running stats included
    a, b = scalars(runs["plain"]["log_dir"]), scalars(runs["monitored"]["log_dir"])
    assert len(a["val_loss"]) == 2
    assert a["val_loss"] == b["val_loss"]
    assert a["train_loss"] == b["train_loss"]


def test_tensorboard_scalars(runs):
    s = scalars(runs["monitored"]["log_dir"])
    for i in range(2):  # the values below are measured values, not the floor of unreached classes
        assert_reached({key: series[i][1] for key, series in s.items()})
    expected = {
        "cm/dim",
        "cm/dim_std",
        "cm/dim_frac",
        "cm/boundary_dim",
        "cm/boundary_dim_std",
        "cm/boundary_dim_frac",
        "cm/seconds",
        "cm/cost_frac",
        "cm/measured",
        "cm/dim_p80",
        "cm/cutting_dim",
        "cm/temperature",
        "cm/saturated",
        "cm/unreached",
        *(f"cm/dim_class_{c}" for c in range(10)),
    }
    assert expected <= set(s)
    val_steps = [step for step, _ in s["val_loss"]]
    for key in expected:
        assert [step for step, _ in s[key]] == val_steps, key  # logged at every validation, not the sanity check
        assert all(math.isfinite(v) for _, v in s[key]), key
    for (_, dim), (_, frac), (_, std) in zip(s["cm/dim"], s["cm/dim_frac"], s["cm/dim_std"], strict=True):
        assert 0 < dim <= D
        assert frac == pytest.approx(dim / D, rel=1e-6)
        assert 0 <= std < D
    for c in range(10):
        assert all(0 <= v <= D for _, v in s[f"cm/dim_class_{c}"])
    means = [sum(s[f"cm/dim_class_{c}"][i][1] for c in range(10)) / 10 for i in range(2)]
    assert [v for _, v in s["cm/dim"]] == pytest.approx(means, rel=1e-5)
    assert [v for _, v in s["cm/cutting_dim"]] == pytest.approx([D - m for m in means], rel=1e-5)
    assert all(v > 0 for _, v in s["cm/temperature"])
    assert all(float(v).is_integer() and 0 <= v <= 10 for _, v in s["cm/saturated"])  # counts of classes
    assert all(0 < v <= D for _, v in s["cm/boundary_dim"])
    # a higher level is harder to reach: a smaller manifold
    assert all(hi <= lo + 1e-4 for (_, hi), (_, lo) in zip(s["cm/dim_p80"], s["cm/dim"], strict=True))
    assert [v for _, v in s["cm/measured"]] == [1.0, 1.0]
    assert all(v > 0 for _, v in s["cm/seconds"])
    assert all(0 < v <= 1 for _, v in s["cm/cost_frac"])


def test_tensorboard_figure(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["monitored"]["log_dir"]), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["cm/curves"]
    images = acc.Images("cm/curves")
    assert len(images) == 2  # one per measurement
    assert [im.step for im in images] == [step for step, _ in scalars(runs["monitored"]["log_dir"])["cm/dim"]]
    assert images[0].width > 300 and images[0].encoded_image_string[:4] == b"\x89PNG"


def test_cost_is_reported_once_per_measurement(runs):
    lines = [line for line in runs["monitored"]["lines"] if "measured in" in line]
    assert len(lines) == 2
    assert "epoch 0" in lines[0] and "epoch 1" in lines[1]
    assert "cm/dim = " in lines[0] and "% of the epoch" in lines[0]
    assert any("drew 20 anchors" in line and "validation batches in " in line for line in runs["monitored"]["lines"])


def test_state_dict_holds_anchors_pairs_and_last_values(runs):
    (monitor,) = runs["monitored"]["callbacks"]
    state = monitor.state_dict()
    assert state["anchors"].shape == (20, 1, 8, 8)
    assert state["anchor_labels"].tolist() == sorted(list(range(10)) * 2)
    assert len(state["pairs"]) == 2 and state["targets"] == list(range(10))
    assert state["last_measured_epoch"] == 1 and state["num_measurements"] == 2
    assert math.isfinite(state["last_values"]["cm/dim"])
    other = CMDimensionMonitor(**FAST, extra_thresholds=[0.8])
    assert other.state_key == monitor.state_key
    assert CMDimensionMonitor(**{**FAST, "seed": 1}).state_key != monitor.state_key
    other.load_state_dict(state)
    assert torch.equal(other.anchors, monitor.anchors) and other.pairs == monitor.pairs


def test_curves_figure(runs):
    (monitor,) = runs["monitored"]["callbacks"]
    fig = curves_figure(monitor.last_cm, monitor.last_boundary)
    assert len(fig.axes) == 2
    assert all(ax.get_xscale() == "log" for ax in fig.axes)


class Noisy(DigitsCNN):
    """Draws from the global RNG in every forward pass, eval mode included (noise layers, MC dropout)."""

    def forward(self, x):
        return self.net(x + 0.01 * torch.randn_like(x))


class RandomValSubset(DigitsCNN):
    """Its own dataloader hooks; `val_dataloader` draws a random subset from the global RNG."""

    def train_dataloader(self):
        return loaders()[0]

    def val_dataloader(self):
        (_, _), (xv, yv) = digits()
        idx = torch.randperm(len(yv))[:250]
        return DataLoader(TensorDataset(xv[idx], yv[idx]), batch_size=100)


@pytest.mark.parametrize(
    ("model_cls", "kwargs"),
    [
        (Noisy, {}),
        # the validation data is first set up by the monitor (no sanity check, no validation in epoch 0)
        (RandomValSubset, {"num_sanity_val_steps": 0, "check_val_every_n_epoch": 2}),
    ],
    ids=["rng-in-forward", "random-val-dataloader-hook"],
)
def test_training_is_bit_identical_when_the_model_draws_random_numbers(tmp_path, model_cls, kwargs):
    out = []
    for callbacks in ([], [CMDimensionMonitor(**FAST)]):
        pl.seed_everything(0)
        model = model_cls()
        t = trainer(tmp_path, callbacks, max_epochs=3, limit_train_batches=5, **kwargs)
        if model_cls is RandomValSubset:
            t.fit(model)
        else:
            t.fit(model, *loaders())
        out.append((model.state_dict(), t.callback_metrics["val_loss"]))
        if callbacks:
            assert callbacks[0].num_measurements >= 1
    (plain, plain_loss), (watched, watched_loss) = out
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key
    assert torch.equal(plain_loss, watched_loss)


class SeededShuffleVal(DigitsCNN):
    """A validation loader shuffled by its own seeded generator; records each validation's first labels."""

    def __init__(self):
        super().__init__()
        self.first = []

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.first.append(batch[1][:8].tolist())
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("sanity", [0, 2])
def test_reading_the_anchors_leaves_the_val_loaders_own_generator_alone(tmp_path, sanity):
    # with a sanity check the monitor reads Lightning's own loader; without one, a loader from a
    # second call of the hook (the same generator object here): either way the shuffle must not move
    out = []
    for callbacks in ([], [CMDimensionMonitor(**FAST)]):
        pl.seed_everything(0)
        train, val = loaders()
        shuffled = DataLoader(val.dataset, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
        model = SeededShuffleVal()
        trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=3, num_sanity_val_steps=sanity).fit(
            model, train, shuffled
        )
        out.append(model.first)
    assert out[0] == out[1] and len(out[0]) >= 2


# ------------------------------------------------------------------ schedule and early stopping


def test_every_n_epochs_relogs_and_strict_early_stopping_works(tmp_path):
    pl.seed_everything(0)
    monitor = CMDimensionMonitor(**{**FAST, "every_n_epochs": 2})
    stopper = EarlyStopping(monitor="cm/dim", mode="max", patience=10)  # strict=True by default
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    train, val = loaders()
    trainer(tmp_path, [monitor, stopper], logger=logger, max_epochs=3).fit(DigitsCNN(), train, val)
    s = scalars(logger.log_dir)
    assert [v for _, v in s["cm/measured"]] == [1.0, 0.0, 1.0]
    assert_reached({key: series[0][1] for key, series in s.items()})
    dims = [v for _, v in s["cm/dim"]]
    assert dims[1] == dims[0] and dims[2] != dims[0]  # epoch 1 repeats epoch 0's value; epoch 2 is new
    for c in range(10):
        assert s[f"cm/dim_class_{c}"][1][1] == s[f"cm/dim_class_{c}"][0][1]
    assert s["cm/seconds"][1][1] == 0.0
    assert monitor.num_measurements == 2
    assert stopper.best_score.item() == max(dims)


class NaNOutside(nn.Module):
    """The model's logits, but NaN once ``broken`` is set (or for inputs far from the data):
    how a measurement fails numerically while training goes on."""

    def __init__(self, net, limit=math.inf):
        super().__init__()
        self.net, self.limit, self.broken = net, limit, False

    def forward(self, x):
        out = self.net(x)
        far = x.flatten(1).abs().amax(1, keepdim=True) > self.limit
        return torch.where(far | self.broken, math.nan, out)


class BreakAt(Callback):
    def __init__(self, wrapper, epoch):
        self.wrapper, self.epoch = wrapper, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        self.wrapper.broken = trainer.current_epoch >= self.epoch


def test_numerical_failure_keeps_the_last_value(tmp_path):
    model = DigitsCNN()
    wrapper = NaNOutside(model.net)
    monitor = CMDimensionMonitor(**FAST, get_model=lambda m: wrapper, on_nonfinite="keep_last")
    stopper = EarlyStopping(monitor="cm/dim", mode="max", patience=10)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    train, val = loaders()
    with pytest.warns(RuntimeWarning, match=r"(?s)epoch 1.*NaN/inf during the optimization for class \[0, 1,"):
        trainer(tmp_path, [monitor, stopper, BreakAt(wrapper, 1)], logger=logger).fit(model, train, val)
    s = scalars(logger.log_dir)
    assert [v for _, v in s["cm/measured"]] == [1.0, 0.0]  # epoch 1 was not measured: the model was broken
    assert [v for _, v in s["cm/nonfinite"]] == [0.0, 1.0]
    assert [v for _, v in s["cm/failed"]] == [0.0, 0.0]
    for key in ("cm/dim", "cm/dim_std", "cm/boundary_dim", "cm/dim_class_3"):
        assert len(s[key]) == 2 and s[key][1][1] == s[key][0][1], key  # epoch 1 logs epoch 0's value
        assert all(math.isfinite(v) for _, v in s[key])
    assert s["cm/dim"][0][1] > 0


def test_numerical_failure_at_the_first_measurement(tmp_path):
    # keep_last with nothing to keep: the keys are missing (a warning says so) and training goes on ...
    model = DigitsCNN()
    monitor = CMDimensionMonitor(**FAST, get_model=lambda m: NaNOutside(m.net, limit=0.0), on_nonfinite="keep_last")
    t = trainer(tmp_path, [monitor], max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"no earlier value to log instead: \['cm/boundary_dim'"):
        t.fit(model, *loaders())
    assert "cm/dim" not in t.callback_metrics and "cm/dim_class_0" not in t.callback_metrics
    assert t.callback_metrics["cm/nonfinite"] == 1.0 and t.callback_metrics["cm/measured"] == 0.0
    assert t.callback_metrics["cm/seconds"] > 0
    assert "val_loss" in t.callback_metrics and model.train_steps > 0

    # ... unless a callback monitors one of them: then the worst finite value for its mode, not
    # EarlyStopping's "not available" error (nor a NaN, on which check_finite would stop the fit):
    # EarlyStopping does not stop on it, ModelCheckpoint ranks it last, and training goes on
    for watcher in (
        EarlyStopping(monitor="cm/dim", mode="max"),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="cm/boundary_dim", mode="max"),
    ):
        monitor = CMDimensionMonitor(**FAST, get_model=lambda m: NaNOutside(m.net, limit=0.0), on_nonfinite="keep_last")
        t = trainer(tmp_path, [monitor, watcher], max_epochs=2, limit_train_batches=2)
        with pytest.warns(
            RuntimeWarning, match=rf"\['{watcher.monitor}'\] monitored by another callback but without a value"
        ):
            t.fit(DigitsCNN(), *loaders())
        assert t.callback_metrics[watcher.monitor].item() == -torch.finfo(torch.float32).max  # mode "max"
        assert t.current_epoch == 2


def test_a_second_fit_starts_a_new_series(tmp_path):
    monitor = CMDimensionMonitor(**{**FAST, "every_n_epochs": 2})
    train, val = loaders()
    trainer(tmp_path, [monitor], max_epochs=1).fit(DigitsCNN(), train, val)
    first_anchors, first_value = monitor.anchors, monitor.last_values["cm/dim"]
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(DigitsCNN(), train, val)  # a new model: epoch 0 is measured again, not skipped
    assert monitor.num_measurements == 1 and monitor.last_measured_epoch == 0
    assert t.callback_metrics["cm/measured"] == 1.0
    assert torch.equal(monitor.anchors, first_anchors)  # same seed, same data: the same anchors
    assert t.callback_metrics["cm/dim"].item() != first_value


class TwoValLoaders(DigitsCNN):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_two_monitors_need_different_prefixes(tmp_path):
    same = [CMDimensionMonitor(**FAST), CMDimensionMonitor(**{**FAST, "threshold": 0.6})]
    _fit_expecting(tmp_path, MisconfigurationException, r"both log under 'cm/'.*`prefix=`", monitor=same)

    # one monitor per validation dataloader, each under its own prefix, both in one checkpoint
    (_, _), (xv, yv) = digits()
    val = [DataLoader(TensorDataset(xv, yv), batch_size=100), DataLoader(TensorDataset(-xv, yv), batch_size=100)]
    a, b = CMDimensionMonitor(**FAST), CMDimensionMonitor(**FAST, dataloader_idx=1, prefix="cm_neg")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    train, _ = loaders()
    trainer(tmp_path, [a, b, ckpt], logger=logger, max_epochs=1).fit(TwoValLoaders(), train, val)
    # each monitor drew from its own loader (anchors are keyed by content, so not the same positions)
    flat = xv.flatten(1)
    assert all((flat == row).all(1).any() for row in a.anchors.flatten(1).cpu())
    assert all((flat == -row).all(1).any() for row in b.anchors.flatten(1).cpu())
    s = scalars(logger.log_dir)
    assert {"cm/dim", "cm_neg/dim", "cm_neg/boundary_dim", "cm_neg/dim_class_3", "cm_neg/seconds"} <= set(s)
    assert s["cm/dim"] != s["cm_neg/dim"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["cm/curves", "cm_neg/curves"]
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert a.state_key in states and b.state_key in states
    assert torch.equal(states[b.state_key]["anchors"], b.anchors)


def test_monitoring_a_key_the_monitor_does_not_log_is_a_clear_error(tmp_path):
    # known from the configuration: an error at the start of fit, before any training step
    stopper = EarlyStopping(monitor="cm/boundary_dim", mode="max")
    model = DigitsCNN()
    with pytest.raises(
        MisconfigurationException, match=r"monitor='cm/boundary_dim'\) watches a key this monitor never"
    ):
        trainer(tmp_path, [CMDimensionMonitor(**{**FAST, "num_pairs": 0}), stopper], max_epochs=1).fit(
            model, *loaders()
        )
    assert model.train_steps == 0


def test_uncertainties_are_never_a_made_up_zero(tmp_path):
    # no bootstrap: no *_std keys at all
    t = trainer(tmp_path, [CMDimensionMonitor(**{**FAST, "num_bootstrap": 0})], max_epochs=1)
    t.fit(DigitsCNN(), *loaders())
    assert "cm/dim" in t.callback_metrics and "cm/dim_std" not in t.callback_metrics
    assert "cm/boundary_dim_std" not in t.callback_metrics
    # a single anchor per target: no uncertainty can be computed; reported, not logged as 0
    t = trainer(tmp_path, [CMDimensionMonitor(**{**FAST, "anchors_per_target": 1})], max_epochs=2)
    with pytest.warns(RuntimeWarning, match="fewer than two anchors, so there is no uncertainty"):
        t.fit(DigitsCNN(), *loaders())
    assert "cm/dim" in t.callback_metrics and "cm/dim_std" not in t.callback_metrics
    assert "cm/boundary_dim_std" not in t.callback_metrics
    with pytest.raises(ValueError, match="`num_bootstrap` must be 0"):
        CMDimensionMonitor(num_bootstrap=1)


def test_keys_the_module_logs_under_the_prefix_are_left_alone(tmp_path):
    class LogsUnderCm(DigitsCNN):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log("cm/my_probe", batch[0].abs().mean())

    stopper = EarlyStopping(monitor="cm/my_probe", mode="min", patience=5)
    t = trainer(tmp_path, [CMDimensionMonitor(**FAST), stopper], max_epochs=1)
    t.fit(LogsUnderCm(), *loaders())
    assert "cm/my_probe" in t.callback_metrics and "cm/dim" in t.callback_metrics


def test_the_budget_rule(monkeypatch):
    # measure when (spent + last) <= max_cost_frac * (elapsed + last), judged on rank 0's clock
    import types

    from cm_monitor.callbacks import base

    monitor = CMDimensionMonitor(**FAST, max_cost_frac=0.25, verbose=False)
    fake = types.SimpleNamespace(strategy=types.SimpleNamespace(broadcast=lambda obj, src=0: obj), callbacks=[])
    monitor._fit_start, monitor._fit_seconds, monitor._last_seconds = 100.0, 2.0, 2.0
    for now, expected in ((110.0, False), (113.9, False), (114.0, True), (130.0, True)):
        monkeypatch.setattr(base.time, "perf_counter", lambda now=now: now)
        # elapsed = now - 100; measure iff 4 <= 0.25 * (elapsed + 2), i.e. elapsed >= 14
        assert monitor._within_budget(fake, epoch=3) is expected, now
    monitor._last_seconds = None  # nothing measured yet in this fit: always measure
    assert monitor._within_budget(fake, epoch=0)


def test_continuing_a_fit_without_checkpoint_warns_that_a_new_series_starts(tmp_path):
    monitor = CMDimensionMonitor(**FAST)
    train, val = loaders()
    model = DigitsCNN()
    t = trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2)
    t.fit(model, train, val)
    t.fit_loop.max_epochs = 2
    with pytest.warns(UserWarning, match="continues at epoch 1 without restoring the monitor"):
        t.fit(model, train, val)
    assert monitor.num_measurements == 1 and monitor.last_measured_epoch == 1


def test_validate_from_a_checkpoint_then_fit_starts_a_new_series(tmp_path):
    # Lightning restores callback states for validate/test/predict too; that must not turn the
    # next fit (without ckpt_path) into a continuation of the checkpoint's series
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    train, val = loaders()
    trainer(tmp_path, [CMDimensionMonitor(**{**FAST, "every_n_epochs": 2}), ckpt], max_epochs=3).fit(
        DigitsCNN(), train, val
    )
    monitor = CMDimensionMonitor(**{**FAST, "every_n_epochs": 2})
    trainer(tmp_path, [monitor]).validate(DigitsCNN(), val, ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    assert monitor.last_measured_epoch == 2  # the checkpoint's state was loaded ...
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(DigitsCNN(), train, val)  # ... but this fit is a new run: epoch 0 is measured
    assert monitor.num_measurements == 1 and monitor.last_measured_epoch == 0
    assert t.callback_metrics["cm/measured"] == 1.0


@pytest.mark.parametrize(
    "change",
    [
        {"dims": [1, 8, 64]},
        {"max_steps": 31},
        {"anchors_per_target": 1},
        {"extra_thresholds": [0.7]},
        {"num_bootstrap": 10},
        {"threshold": 0.6},
        {"classes": [0, 1]},
        {"num_pairs": 3},
        {"seed": 1},
        {"dataloader_idx": 1},
        {"max_scan_batches": 2},
        {"input_key": "x", "label_key": "y"},
        {"prefix": "cm_b"},
    ],
)
def test_state_key_holds_what_changes_the_series(change):
    assert CMDimensionMonitor(**{**FAST, **change}).state_key != CMDimensionMonitor(**FAST).state_key
    assert CMDimensionMonitor(**{**FAST, "chunk_size": 7}).state_key == CMDimensionMonitor(**FAST).state_key


@pytest.mark.parametrize(("budget", "measured"), [(1e-6, [1.0, 0.0, 0.0]), (1.0, [1.0, 1.0, 1.0]), (None, [1.0] * 3)])
def test_cost_budget_postpones_measurements(tmp_path, budget, measured):
    monitor = CMDimensionMonitor(**FAST, max_cost_frac=budget)
    stopper = EarlyStopping(monitor="cm/dim", mode="max", patience=10)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    import contextlib

    # a budget next to an EarlyStopping on its keys: a warning that postponements count as no improvement
    warns = pytest.warns(UserWarning, match=r"max_cost_frac.*\['cm/dim'\]") if budget else contextlib.nullcontext()
    with MonitorLog() as log, warns:
        trainer(tmp_path, [monitor, stopper], logger=logger, max_epochs=3).fit(DigitsCNN(), *loaders())
    s = scalars(logger.log_dir)
    assert [v for _, v in s["cm/measured"]] == measured
    assert monitor.num_measurements == sum(measured)
    dims = [v for _, v in s["cm/dim"]]
    assert len(dims) == 3 and (dims[0] == dims[1] == dims[2]) == (budget == 1e-6)
    postponed = [line for line in log.lines if "postponed (budget)" in line]
    assert len(postponed) == measured.count(0.0)
    if postponed:
        assert "epoch 1" in postponed[0] and "max_cost_frac = 1e-06" in postponed[0]


def test_anchors_drawn_when_first_epoch_does_not_validate(tmp_path):
    # no sanity check and check_val_every_n_epoch=2: Lightning has not set up the validation
    # data at on_train_start; the monitor sets it up itself
    monitor = CMDimensionMonitor(**FAST)
    train, val = loaders()
    t = trainer(
        tmp_path, [monitor], max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0, check_val_every_n_epoch=2
    )
    t.fit(DigitsCNN(), train, val)
    assert monitor.anchors is not None
    assert monitor.last_measured_epoch == 1 and monitor.num_measurements == 1
    assert "cm/dim" in t.callback_metrics


def test_measures_in_eval_mode_and_restores_modes(tmp_path):
    seen = []

    class Spy(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append([m.training for m in pl_module.modules()])

    monitor = CMDimensionMonitor(**FAST)
    train, val = loaders()
    model = DigitsCNN()
    model.net[1].train()  # a mode the monitor must leave as it found it (validation has set eval)
    trainer(tmp_path, [monitor, Spy()], max_epochs=1, limit_train_batches=2).fit(model, train, val)
    assert seen and not any(any(flags) for flags in seen)  # Lightning's eval mode is intact
    assert monitor.num_measurements == 1


# ------------------------------------------------------------------ resume


def test_resume_from_checkpoint_continues_the_series(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = CMDimensionMonitor(**FAST)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    train, val = loaders()
    trainer(tmp_path, [first, ckpt], logger=logger, max_epochs=2).fit(DigitsCNN(), train, val)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    assert_reached(first.last_values)

    # the checkpoint alone reproduces the last value: same anchors, same planes, same settings
    second = CMDimensionMonitor(**FAST)
    restored_model = DigitsCNN.load_from_checkpoint(last)
    second.load_state_dict(torch.load(last, weights_only=False)["callbacks"][second.state_key])
    assert torch.equal(second.anchors, first.anchors) and second.pairs == first.pairs
    est = cm_dimension(
        restored_model,
        second.anchors,
        second.anchor_labels,
        classes=second.targets,
        dims=second.grid(),
        generator=second.seed,
        anchors_per_target=second.anchors_per_target,
        num_bootstrap=second.num_bootstrap,
        settings=second.settings,
        threshold=second.threshold,
    )
    for c, d in zip(est.targets, est.dimension.tolist(), strict=True):
        assert d == pytest.approx(first.last_values[f"cm/dim_class_{c}"], rel=1e-6)

    # resuming with a fresh monitor (same configuration) keeps the anchors and continues
    # (the validation data is other data this time: anchors drawn again would differ)
    from cm_monitor.anchors import sample_anchors

    resumed = CMDimensionMonitor(**FAST)
    logger2 = TensorBoardLogger(tmp_path, name="tb", version=0)
    train, val = loaders()
    xv, yv = val.dataset.tensors
    val = DataLoader(TensorDataset(xv.flip(0) + 0.01, yv.flip(0)), batch_size=100)
    assert not torch.equal(sample_anchors(val, 2, generator=0).inputs, first.anchors)
    trainer(
        tmp_path,
        [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        logger=logger2,
        max_epochs=4,
    ).fit(DigitsCNN(), train, val, ckpt_path=last)
    assert torch.equal(resumed.anchors, first.anchors)
    assert resumed.pairs == first.pairs
    assert resumed.num_measurements == 4 and resumed.last_measured_epoch == 3
    s = scalars(logger.log_dir)
    steps = [step for step, _ in s["cm/dim"]]
    assert len(steps) == 4 and steps == sorted(steps)  # epochs 0-1, then 2-3 after the resume


# ------------------------------------------------------------------ batches


@pytest.mark.parametrize(
    ("keys", "kwargs"),
    [
        (("image", "label"), {}),
        (("pix", "cls"), {"input_key": "pix", "label_key": "cls"}),
        (("pix", "cls"), {"batch_to_inputs": lambda b: (b["pix"], b["cls"])}),
    ],
)
def test_dict_batches(tmp_path, keys, kwargs):
    monitor = CMDimensionMonitor(**FAST, **kwargs)
    train, val = loaders(dict_keys=keys)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(DigitsCNN(batch_keys=keys), train, val)
    assert monitor.anchors.shape == (20, 1, 8, 8)
    assert sorted(monitor.anchor_labels.tolist()) == sorted(list(range(10)) * 2)
    assert_reached({k: v.item() for k, v in t.callback_metrics.items()})


def test_get_model_and_on_after_batch_transfer(tmp_path):
    class Wrapped(DigitsCNN):
        def forward(self, x):  # not logits: the monitor needs `get_model`
            return {"scores": self.net(x)}

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0])["scores"], batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0])["scores"], batch[1]))

        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return x * 2, y  # the anchors must be what validation_step receives

    monitor = CMDimensionMonitor(**FAST, get_model=lambda m: m.net)
    train, val = loaders()
    trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2).fit(Wrapped(), train, val)
    xv = val.dataset.tensors[0]
    anchor = monitor.anchors[0]
    assert any(torch.equal(anchor, 2 * x) for x in xv)

    with pytest.raises(TypeError, match=r"returned a dict.*no tensor under 'logits'.*`output_transform=`.*get_model"):
        trainer(tmp_path, [CMDimensionMonitor(**FAST)], max_epochs=1).fit(Wrapped(), *loaders())


# ------------------------------------------------------------------ errors at the start of fit


def _fit_expecting(tmp_path, error, match, monitor=None, model=None, train=None, val=None, **trainer_kwargs):
    model = model or DigitsCNN()
    default_train, default_val = loaders()
    train = train if train is not None else default_train
    with pytest.raises(error, match=match):
        monitors = monitor if isinstance(monitor, list) else [monitor or CMDimensionMonitor(**FAST)]
        trainer(tmp_path, monitors, **trainer_kwargs).fit(model, train, val if val is not None else default_val)
    assert model.train_steps == 0  # raised before the first training step


class NoValidationStep(DigitsCNN):
    validation_step = None


def test_error_without_validation(tmp_path):
    model = DigitsCNN()
    train, _ = loaders()
    # validation_step without validation data (Lightning would just skip validation)
    with pytest.raises(MisconfigurationException, match=r"measures on validation data.*`val_dataloader` must be"):
        trainer(tmp_path, [CMDimensionMonitor(**FAST)]).fit(model, train)
    assert model.train_steps == 0
    # no validation_step: Lightning skips validation; the monitor says it cannot measure
    model = NoValidationStep()
    with pytest.raises(MisconfigurationException, match="measures on validation data"):
        trainer(tmp_path, [CMDimensionMonitor(**FAST)]).fit(model, train)
    assert model.train_steps == 0


def test_error_when_validation_is_disabled(tmp_path):
    _fit_expecting(tmp_path, MisconfigurationException, "limit_val_batches=0", limit_val_batches=0)


def test_error_too_few_examples_of_a_class_named_in_classes(tmp_path):
    # a short class is an error only where `classes` or `pairs` names it (else it is left out: test_robustness.py)
    (_, _), (xv, yv) = digits()
    keep = torch.cat([(yv != 3).nonzero().squeeze(1), (yv == 3).nonzero().squeeze(1)[:1]])
    val = DataLoader(TensorDataset(xv[keep], yv[keep]), batch_size=100)
    match = r"Too few validation examples.*class 3: 1\b.*num_anchors.*`classes=` or `pairs=` names \[3\]"
    _fit_expecting(tmp_path, ValueError, match, monitor=CMDimensionMonitor(**{**FAST, "classes": [0, 3]}), val=val)
    with_pairs = {k: v for k, v in FAST.items() if k != "num_pairs"} | {"pairs": [(3, 5)]}
    _fit_expecting(tmp_path, ValueError, match, monitor=CMDimensionMonitor(**with_pairs), val=val)


def test_error_every_class_too_short(tmp_path):
    (_, _), (xv, yv) = digits()
    one = torch.stack([(yv == c).nonzero()[0, 0] for c in range(10)])  # one example of each class
    val = DataLoader(TensorDataset(xv[one], yv[one]), batch_size=100)
    _fit_expecting(
        tmp_path, ValueError, r"Too few validation examples to draw 2 anchors.*class 0: 1, class 1: 1", val=val
    )


class TensorOnly(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


class ValOnTensors(DigitsCNN):
    def validation_step(self, batch, batch_idx):
        self.log("val_norm", batch.norm())


def test_error_unrecognized_batch(tmp_path):
    (_, _), (xv, _) = digits()
    val = DataLoader(TensorOnly(xv), batch_size=100)
    _fit_expecting(tmp_path, TypeError, "not recognized.*batch_to_inputs", model=ValOnTensors(), val=val)


def test_error_dict_batch_with_unknown_keys(tmp_path):
    train, val = loaders(dict_keys=("pix", "cls"))
    _fit_expecting(
        tmp_path,
        ValueError,
        r"keys \['pix', 'cls'\].*input_key",
        model=DigitsCNN(batch_keys=("pix", "cls")),
        train=train,
        val=val,
    )


def test_error_integer_inputs(tmp_path):
    (_, _), (xv, yv) = digits()
    val = DataLoader(TensorDataset((xv * 10).long(), yv), batch_size=100)

    class IntVal(DigitsCNN):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0].float()), batch[1]))

    _fit_expecting(tmp_path, TypeError, "floating-point inputs", model=IntVal(), val=val)


def test_error_classes_outside_the_model(tmp_path):
    _fit_expecting(tmp_path, ValueError, "`classes` holds 12", monitor=CMDimensionMonitor(**FAST, classes=[0, 12]))
    _fit_expecting(
        tmp_path,
        ValueError,
        r"`pairs` holds \(3, 10\)",
        monitor=CMDimensionMonitor(**{**FAST, "num_pairs": 5}, pairs=[(3, 10)]),
    )


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"every_n_epochs": 1.5}, ValueError, "every_n_epochs"),
        ({"num_anchors": 0}, ValueError, "num_anchors"),
        ({"max_cost_frac": 0}, ValueError, r"`max_cost_frac` must be a number in \(0, 1\]"),
        ({"max_cost_frac": 1.5}, ValueError, "max_cost_frac"),
        ({"num_pairs": -1}, ValueError, "num_pairs"),
        ({"pairs": [(1, 1)]}, ValueError, "pairs"),
        ({"pairs": [(1, 2)], "num_pairs": 3}, ValueError, "either `pairs`"),
        ({"pairs": [(1, 2)], "num_pairs": None}, ValueError, "either `pairs`"),
        ({"pairs": [(1, 2, 3)]}, ValueError, "pairs"),
        ({"classes": []}, ValueError, "classes"),
        ({"classes": [1, 1]}, ValueError, "classes"),
        ({"threshold": 0}, ValueError, "threshold"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"boundary_threshold": -0.1}, ValueError, "boundary_threshold"),
        ({"extra_thresholds": [2.0]}, ValueError, "extra_thresholds"),
        ({"extra_thresholds": 0.8}, TypeError, "extra_thresholds"),
        ({"anchors_per_target": 0}, ValueError, "anchors_per_target"),
        ({"dims": 1}, ValueError, "dims"),
        ({"dims": [0, 4]}, ValueError, "dims"),
        ({"dims": "auto"}, TypeError, "dims"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"settings": {"lr": 0.1}}, TypeError, "settings"),
        ({"seed": -1}, ValueError, "seed"),
        ({"input_key": 3}, TypeError, "input_key"),
        ({"batch_to_inputs": lambda b: b, "input_key": "x"}, ValueError, "either `batch_to_inputs`"),
        ({"batch_to_inputs": 3}, TypeError, "batch_to_inputs"),
        ({"get_model": "net"}, TypeError, "get_model"),
        ({"dataloader_idx": -1}, ValueError, "dataloader_idx"),
        ({"max_scan_batches": 0}, ValueError, "max_scan_batches"),
        ({"prefix": ""}, ValueError, "prefix"),
        ({"prefix": "cm/"}, ValueError, "prefix"),
        ({"prefix": "cm/b"}, ValueError, "prefix"),
        ({"prefix": "c m"}, ValueError, "prefix"),
        ({"prefix": 3}, TypeError, "prefix"),
        ({"verbose": "yes"}, TypeError, "verbose"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CMDimensionMonitor(**kwargs)


def test_error_dims_above_input_dimension(tmp_path):
    _fit_expecting(tmp_path, ValueError, "above D = 64", monitor=CMDimensionMonitor(**{**FAST, "dims": [1, 100]}))


# ------------------------------------------------------------------ distributed (2 CPU processes)


class RecordingMonitor(CMDimensionMonitor):
    """Writes, per rank, the anchors at the start, the values this rank computed from the shares of
    all ranks (before rank 0's are broadcast) and the values it logged, at every measured epoch."""

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = str(out_dir)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        torch.save(
            {"anchors": self.anchors, "labels": self.anchor_labels, "pairs": self.pairs},
            f"{self.out_dir}/start_{trainer.global_rank}.pt",
        )

    def _finish(self, trainer, pl_module, parts):
        result = super()._finish(trainer, pl_module, parts)
        self._local = {f"cm/{k}": v for k, v in result.values.items()}
        if trainer.global_rank > 0:  # pretend the other rank measured something else: rank 0's must win
            result.values = {k: v + 1000.0 for k, v in result.values.items()}
        return result

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking:
            torch.save(
                {"local": self._local, "logged": dict(self.last_values)},
                f"{self.out_dir}/epoch{trainer.current_epoch}_{trainer.global_rank}.pt",
            )


@pytest.mark.slow
def test_ddp_ranks_agree_on_anchors_and_values(tmp_path):
    # each rank sees its own half of the validation data (DistributedSampler), yet all must
    # measure the same anchors, compute the same values and log rank 0's values
    pl.seed_everything(0)
    train, val = loaders()
    t = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordingMonitor(tmp_path, **FAST), EarlyStopping("cm/dim", mode="max")],
    )
    t.fit(DigitsCNN(), train, val)
    start = [torch.load(tmp_path / f"start_{r}.pt") for r in range(2)]
    assert torch.equal(start[0]["anchors"], start[1]["anchors"])
    assert torch.equal(start[0]["labels"], start[1]["labels"]) and start[0]["pairs"] == start[1]["pairs"]
    assert sorted(start[0]["labels"].tolist()) == sorted(list(range(10)) * 2)  # stratified, not a shard's
    for epoch in range(2):
        ranks = [torch.load(tmp_path / f"epoch{epoch}_{r}.pt") for r in range(2)]
        assert_reached(ranks[0]["local"], boundaries=False)  # half an epoch per rank: boundaries not yet
        # the same model, anchors and planes on both ranks: the same measurement
        assert ranks[1]["local"] == pytest.approx(ranks[0]["local"], rel=1e-5, nan_ok=True)
        for r in range(2):  # every rank logs what rank 0 measured (rank 1's were shifted), to the last digit
            assert {k: ranks[r]["logged"][k] for k in ranks[0]["local"]} == ranks[0]["local"]


def test_validate_and_sanity_check_do_not_measure(tmp_path):
    monitor = CMDimensionMonitor(**FAST)
    train, val = loaders()
    t = trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2)
    t.validate(DigitsCNN(), val)  # outside fit: nothing to measure, nothing logged
    assert monitor.anchors is None and "cm/dim" not in t.callback_metrics
    t.fit(DigitsCNN(), train, val)  # the sanity check runs first; one measurement, at epoch 0
    assert monitor.num_measurements == 1


# ------------------------------------------------------------------ the example


@pytest.fixture
def example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_arguments(example):
    args = example.parse_args(["--monitors", "cm"])
    assert args.monitors == ["cm"] and args.max_epochs == 30 and args.patience == 5 and args.every_n_epochs == 2
    assert example.parse_args(["--dataset", "cifar10"]).every_n_epochs == 10  # a measurement costs about an epoch
    assert example.parse_args(["--dataset", "cifar10", "--every-n-epochs", "1"]).every_n_epochs == 1
    with pytest.raises(SystemExit):
        example.parse_args(["--monitors", "cm,bogus"])
    with pytest.raises(example.argparse.ArgumentTypeError, match=r"unknown monitor.*bogus.*choose"):
        example.parse_monitors("cm,bogus")


def test_example_cifar10_fails_clearly_without_torchvision(example, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(SystemExit, match="needs torchvision"):
        example.cifar10_data(128, tmp_path, 0)


def test_example_cifar10_fails_clearly_without_network(example, tmp_path, monkeypatch):
    import sys
    import types
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=offline)
    fake.transforms = types.SimpleNamespace(
        **{n: lambda *a, **k: None for n in ("Compose", "Normalize", "RandomCrop", "RandomHorizontalFlip", "ToTensor")}
    )
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(SystemExit, match=r"(?s)Could not download CIFAR-10.*network connection.*--dataset digits"):
        example.cifar10_data(128, tmp_path, 0)


def test_example_runs(example, tmp_path, capsys):
    example.main(["--max-epochs", "1", "--logdir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "cm/dim" in out and "val_acc" in out and f"tensorboard --logdir {tmp_path / 'runs'}" in out
    s = scalars(next((tmp_path / "runs" / "digits").iterdir()))
    assert 0 < s["cm/dim"][0][1] <= D


def test_default_settings_in_a_fit(tmp_path):
    """The monitor's own defaults (calibrated 0.9, radius 0.5, fraction read-off), only the cost reduced."""
    monitor = CMDimensionMonitor(num_pairs=0, anchors_per_target=4, num_bootstrap=20)
    train, val = loaders()
    trainer(tmp_path, [monitor], max_epochs=2).fit(DigitsCNN(), train, val)
    values = monitor.last_values
    assert monitor.anchors.shape[0] == 100  # 10 per class calibrate the temperature
    assert 0 <= values["cm/dim"] <= D and values["cm/cutting_dim"] == pytest.approx(D - values["cm/dim"])
    assert values["cm/temperature"] > 0
    assert values["cm/saturated"] + values["cm/unreached"] <= 10
    if "cm/success_dist_p90" in values:  # something succeeded: never beyond the radius
        assert values["cm/success_dist_median"] <= values["cm/success_dist_p90"] <= 0.5 + 1e-4
        assert 0 <= values["cm/outside_frac"] <= 1
    assert monitor.last_cm.readoff == "fraction" and monitor.last_cm.threshold == 0.9


class ManyClasses(NetModule):
    """A linear model on 16-dimensional Gaussian blobs of 30 classes."""

    def __init__(self):
        super().__init__(nn.Linear(16, 30), lr=1e-2)


def blobs(n_per_class=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(30, 16, generator=torch.Generator().manual_seed(99))
    y = torch.arange(30).repeat_interleave(n_per_class)
    return DataLoader(TensorDataset(centers[y] + torch.randn(len(y), 16, generator=g), y), batch_size=60)


def test_a_warning_about_many_short_classes_names_twenty_of_them(tmp_path):
    """A 30-class model whose validation data holds 4 of its classes: the 26 others are left out,
    and the warning names 20 of them with their counts and says how many more."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(6)
    val = DataLoader(TensorDataset(torch.randn(len(y), 16, generator=g), y), batch_size=60)
    monitor = CMDimensionMonitor(**{**FAST, "num_pairs": 0, "dims": [1, 16]})
    with pytest.warns(UserWarning, match=r"26 of the model's 30 classes .*class 23: 0, and 6 more classes;") as rec:
        trainer(tmp_path, [monitor], max_epochs=1).fit(ManyClasses(), blobs(seed=1), val)
    (message,) = [str(w.message) for w in rec if "more classes" in str(w.message)]
    assert "class 24" not in message and monitor.targets == [0, 1, 2, 3]


def test_many_classes_measure_a_fixed_subset(tmp_path):
    kw = dict(FAST, max_classes=5, num_pairs=0, dims=[1, 4, 16])
    runs = []
    for _ in range(2):
        monitor = CMDimensionMonitor(**kw)
        trainer(tmp_path, [monitor], max_epochs=1).fit(ManyClasses(), blobs(seed=1), blobs())
        runs.append(monitor)
    first, second = runs
    assert len(first.targets) == 5 and first.targets == second.targets  # the same subset: common random numbers
    assert set(first.anchor_labels.tolist()) == set(first.targets)  # anchors of these classes only
    assert first.anchors.shape[0] == 5 * FAST["num_anchors"]
    per_class = {k for k in first.last_values if k.startswith("cm/dim_class_")}
    assert per_class == {f"cm/dim_class_{c}" for c in first.targets}
    mean = sum(first.last_values[k] for k in per_class) / 5
    assert first.last_values["cm/dim"] == pytest.approx(mean, rel=1e-6)
    # explicit classes are measured as given; no limit measures every class
    explicit = CMDimensionMonitor(**{**kw, "classes": [0, 29]})
    trainer(tmp_path, [explicit], max_epochs=1).fit(ManyClasses(), blobs(seed=1), blobs())
    assert explicit.targets == [0, 29] and explicit.anchors.shape[0] == 30 * FAST["num_anchors"]
    assert CMDimensionMonitor(**{**kw, "max_classes": None}).max_classes is None
    # two measured classes of thirty: their pair has no anchor of another class, so no boundary is drawn
    two = CMDimensionMonitor(**{**kw, "max_classes": 2, "num_pairs": 3})
    trainer(tmp_path, [two], max_epochs=1).fit(ManyClasses(), blobs(seed=1), blobs())
    assert len(two.targets) == 2 and two.pairs == [] and "cm/dim" in two.last_values
    assert not any(k.startswith("cm/boundary") for k in two.last_values)
    with pytest.raises(ValueError, match="max_classes"):
        CMDimensionMonitor(max_classes=1)


def test_cost_is_estimated_before_training_and_a_limit_refuses(tmp_path):
    monitor = CMDimensionMonitor(**FAST)
    train, val = loaders()
    trainer(tmp_path, [monitor], max_epochs=1).fit(DigitsCNN(), train, val)
    est = monitor.cost_estimate
    # 10 classes and 2 pairs, 2 anchors each (of 20 anchors, none of the target's class), 4 plane dimensions
    assert est.problems == (10 + 2) * 2 * 4
    assert est.passes == FAST["max_steps"] + 1  # one chunk
    assert est.seconds == pytest.approx(est.passes * est.seconds_per_pass) and est.seconds_per_pass > 0
    # the default bisection: max_rounds(4) = 4 rounds (a 4-point grid is probed at most 4 times, warm
    # or cold) of one problem per (target, anchor) group, two in a warm start's first round: passes of 48 rows
    bisecting = CMDimensionMonitor(**{**FAST, "settings": OptimizerSettings(max_radius=1.0)})
    trainer(tmp_path, [bisecting], max_epochs=1).fit(DigitsCNN(), train, val)
    est = bisecting.cost_estimate
    assert (est.problems, est.timed_rows, est.rows_per_pass) == ((10 + 2) * 2 * 4, (10 + 2) * 2 * 2, (10 + 2) * 2 * 4)
    assert est.passes == 4 * (FAST["max_steps"] + 1)

    # on 10 grid points a warm start may run more in a row than a cold one: the bound holds for both
    ten = {**FAST, "settings": OptimizerSettings(max_radius=1.0), "dims": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]}
    # (and a warm start runs two problems per group at once in its first rounds: the pass is timed at that size)
    for warm, (rounds, per_group, width) in ((False, (6, 6, 1)), (True, (7, 9, 2))):
        monitor = CMDimensionMonitor(**ten, warm_start=warm)
        trainer(tmp_path, [monitor], max_epochs=1).fit(DigitsCNN(), train, val)
        est = monitor.cost_estimate
        assert est.problems == (10 + 2) * 2 * per_group and est.passes == rounds * (FAST["max_steps"] + 1)
        assert est.timed_rows == (10 + 2) * 2 * width

    model = DigitsCNN()
    refusing = CMDimensionMonitor(**FAST, max_seconds=1e-6)
    with pytest.raises(MisconfigurationException, match=r"up to .* above `max_seconds` = 1e-06.*nothing was trained"):
        trainer(tmp_path, [refusing], max_epochs=1).fit(model, train, val)
    assert model.train_steps == 0  # refused before the first training step
    with pytest.raises(ValueError, match="max_seconds"):
        CMDimensionMonitor(max_seconds=0)


def test_memory_is_estimated_and_the_pass_scaled_down_before_training(tmp_path, monkeypatch):
    import cm_monitor.callbacks.cm as cm_module
    from cm_monitor.cost import activation_bytes_per_row, pool_bytes

    train, val = loaders()
    free = {"bytes": 2**40}
    monkeypatch.setattr(cm_module, "available_bytes", lambda device: free["bytes"])
    roomy = CMDimensionMonitor(**FAST)
    torch.manual_seed(0)
    trainer(tmp_path, [roomy], max_epochs=1).fit(DigitsCNN(), train, val)
    per_row = activation_bytes_per_row(DigitsCNN(), roomy.anchors) + pool_bytes(64, 64, True, 1)
    assert roomy.cost_estimate.rows_per_pass == roomy.cost_estimate.problems  # all problems fit in one pass
    assert roomy.cost_estimate.memory_bytes == pytest.approx(per_row * roomy.cost_estimate.rows_per_pass, rel=0.01)

    free["bytes"] = int(2 * 7.5 * per_row)  # half of it holds 7 rows
    tight = CMDimensionMonitor(**FAST)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="running 7 per pass instead"):
        trainer(tmp_path, [tight], max_epochs=1).fit(DigitsCNN(), train, val)
    assert tight.cost_estimate.rows_per_pass == 7
    assert tight.last_values["cm/dim"] == pytest.approx(roomy.last_values["cm/dim"], abs=1e-3)  # same answers

    free["bytes"] = int(per_row)  # not even one row in half of it
    model = DigitsCNN()
    with pytest.raises(MisconfigurationException, match=r"one plane point needs about .* nothing was trained"):
        trainer(tmp_path, [CMDimensionMonitor(**FAST)], max_epochs=1).fit(model, train, val)
    assert model.train_steps == 0


def test_activation_and_pool_bytes():
    from cm_monitor.cost import activation_bytes_per_row, pool_bytes

    x = torch.randn(8, 64)
    narrow = activation_bytes_per_row(nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10)), x)
    wide = activation_bytes_per_row(nn.Sequential(nn.Linear(64, 1100), nn.ReLU(), nn.Linear(1100, 10)), x)
    assert 4 * 1000 <= wide - narrow <= 4 * 1000 * 3  # one to three saved copies of the hidden layer
    # a dense basis twice: the row's and the plane cache's copy
    assert pool_bytes(100, 10, dense=False, rows=2) == 2 * 4 * (10 * 100 + 5 * 10 + 100 + 20)
    assert pool_bytes(100, 10, dense=True, rows=1) == 4 * (10 * 100 + 5 * 10 + 2 * 1000)


def test_many_classes_hold_anchors_of_the_measured_subset_only_and_draw_the_same(tmp_path, monkeypatch):
    """With more classes than `max_classes` the first pass over the validation data only counts
    (no inputs held beyond `max_classes` classes) and a second draws the subset's anchors: the same
    targets, pairs and anchors, bit for bit, as one pass that holds every class (the control)."""
    from cm_monitor.anchors import StratifiedReservoir

    kw = dict(FAST, max_classes=5, num_pairs=3, dims=[1, 4, 16])
    held = []
    add = StratifiedReservoir.add

    def spy(self, inputs, labels):
        add(self, inputs, labels)
        held.append(len(self._inputs))

    monkeypatch.setattr(StratifiedReservoir, "add", spy)
    two_pass = CMDimensionMonitor(**kw)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [two_pass], max_epochs=1).fit(ManyClasses(), blobs(seed=1), blobs())
    assert max(held) <= 5  # never more than max_classes classes' inputs at once
    monkeypatch.setattr(CMDimensionMonitor, "_class_limit", lambda self: None)  # control: one pass, every class held
    held.clear()
    one_pass = CMDimensionMonitor(**kw)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [one_pass], max_epochs=1).fit(ManyClasses(), blobs(seed=1), blobs())
    assert max(held) == 30
    assert two_pass.targets == one_pass.targets and two_pass.pairs == one_pass.pairs and len(one_pass.pairs) == 3
    assert torch.equal(two_pass.anchors, one_pass.anchors) and torch.equal(
        two_pass.anchor_labels, one_pass.anchor_labels
    )
    assert two_pass.last_values == one_pass.last_values


def duplicated_blobs():
    """``blobs()`` with the 12 inputs of each of classes 0-9 all one input: short for `num_anchors=2`."""
    x, y = blobs().dataset.tensors
    x = x.clone()
    for c in range(10):
        x[y == c] = x[y == c][0]
    return DataLoader(TensorDataset(x, y), batch_size=60)


def test_the_two_passes_count_distinct_inputs_as_one_pass_does(tmp_path, monkeypatch):
    """Classes whose inputs are one input repeated are short (one distinct input): the subset is
    chosen among the others in both draws (the first pass counted raw examples before: it chose short
    classes and measured two)."""
    kw = dict(FAST, max_classes=5, num_pairs=3, dims=[1, 4, 16], num_anchors=2)
    runs = []
    for limit in (True, False):
        if not limit:  # control: one pass that holds every class
            monkeypatch.setattr(CMDimensionMonitor, "_class_limit", lambda self: None)
        monitor = CMDimensionMonitor(**kw)
        with pytest.warns(UserWarning, match="10 of the model's 30 classes have fewer"):
            trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=1).fit(
                ManyClasses(), blobs(seed=1), duplicated_blobs()
            )
        runs.append(monitor)
    two_pass, one_pass = runs
    assert two_pass.targets == one_pass.targets and len(two_pass.targets) == 5 and min(two_pass.targets) >= 10
    assert two_pass.pairs == one_pass.pairs and torch.equal(two_pass.anchors, one_pass.anchors)


def test_a_class_id_beyond_the_model_is_an_error_also_outside_the_measured_subset(tmp_path):
    x, y = blobs().dataset.tensors
    y = torch.where(y == 29, 30, y)  # a 30-logit model, validation labels up to 30
    val = DataLoader(TensorDataset(x, y), batch_size=60)
    for seed in range(3):  # whichever subset is drawn
        monitor = CMDimensionMonitor(**{**FAST, "max_classes": 5, "num_pairs": 0, "seed": seed})
        with pytest.raises(ValueError, match="class id 30, but the model returns logits for 30 classes"):
            trainer(tmp_path, [monitor], max_epochs=1).fit(ManyClasses(), blobs(seed=1), val)


@pytest.mark.parametrize("usable", [0, 1])
def test_too_few_usable_classes_among_many_give_the_one_pass_errors(tmp_path, usable):
    """All but `usable` of 30 classes are one input repeated (short for `num_anchors=2`): the errors
    (and the warning) of one pass, with the counts, also when the two-pass draw is taken."""
    x, y = blobs().dataset.tensors
    x = x.clone()
    for c in range(usable, 30):
        x[y == c] = x[y == c][0]
    val = DataLoader(TensorDataset(x, y), batch_size=60)
    monitor = CMDimensionMonitor(**{**FAST, "max_classes": 5, "num_pairs": 0, "num_anchors": 2, "dims": [1, 16]})
    t = trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=1)
    if usable == 0:
        with pytest.raises(ValueError, match=r"Too few validation examples .*class 0: 1, class 1: 1"):
            t.fit(ManyClasses(), blobs(seed=1), val)
    else:
        with (
            pytest.warns(UserWarning, match="29 of the model's 30 classes have fewer"),
            pytest.raises(ValueError, match=r"only class \[0\] has"),
        ):
            t.fit(ManyClasses(), blobs(seed=1), val)
