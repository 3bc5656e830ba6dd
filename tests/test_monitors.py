"""DiffeoStabilityMonitor and ElasticityMonitor in real (small) Lightning fits on the digits data.

The shared machinery (anchors, schedule, state, errors) is tested with CMDimensionMonitor in
test_callback.py; here: what these two log, that they are invisible to training together with
CMDimensionMonitor, that their probes stay fixed for the run, and their own errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from test_callback import FAST, DigitsCNN, loaders, scalars, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cm_monitor import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor

DIFFEO_FAST = {"num_anchors": 3, "delta": 0.6, "num_bootstrap": 20}
ELASTIC_FAST = {"num_anchors": 3}


def fit(tmp_path, callbacks, seed=0, logger=None, **kwargs):
    import lightning

    lightning.seed_everything(seed, verbose=False)
    model = DigitsCNN()
    train, val = loaders()
    t = trainer(tmp_path, callbacks, logger=logger, **kwargs)
    t.fit(model, train, val)
    return model, t


def test_all_monitors_together_leave_training_bit_identical(tmp_path):
    plain, t0 = fit(tmp_path / "plain", [])
    monitors = [CMDimensionMonitor(**FAST), DiffeoStabilityMonitor(**DIFFEO_FAST), ElasticityMonitor(**ELASTIC_FAST)]
    watched, t1 = fit(tmp_path / "watched", monitors)
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # BatchNorm running statistics included
    assert torch.equal(t0.callback_metrics["val_loss"], t1.callback_metrics["val_loss"])
    for key in ("cm/dim", "diffeo/rf", "elasticity/ratio"):
        assert key in t1.callback_metrics


def test_logged_values_in_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [DiffeoStabilityMonitor(**DIFFEO_FAST), ElasticityMonitor(**ELASTIC_FAST)], logger=logger)
    s = scalars(logger.log_dir)
    for key in ("diffeo/rf", "diffeo/df", "diffeo/gf", "diffeo/log10_rf", "diffeo/rf_std", "diffeo/seconds"):
        assert len(s[key]) == 2, key  # two epochs, one value each
    for _, rf in s["diffeo/rf"]:
        assert 0 < rf < 100
    for (_, rf), (_, log_rf) in zip(s["diffeo/rf"], s["diffeo/log10_rf"], strict=True):
        assert log_rf == pytest.approx(math.log10(rf), rel=1e-5, abs=1e-6)
    for (_, rf), (_, df), (_, gf) in zip(s["diffeo/rf"], s["diffeo/df"], s["diffeo/gf"], strict=True):
        assert rf == pytest.approx(df / gf, rel=1e-5)
    for key in ("elasticity/intra", "elasticity/inter", "elasticity/ratio", "elasticity/cluster_ari"):
        assert len(s[key]) == 2, key
    for key in ("elasticity/ratio_baseline", "elasticity/cluster_ari_baseline"):  # the probes' own: constant
        assert len(s[key]) == 2 and s[key][0][1] == s[key][1][1], key
    assert s["elasticity/ratio_baseline"][0][1] > 1
    for (_, ratio), (_, intra), (_, inter) in zip(
        s["elasticity/ratio"], s["elasticity/intra"], s["elasticity/inter"], strict=True
    ):
        assert ratio == pytest.approx(intra / inter, rel=1e-5) and intra > 0 and inter > 0
    assert all(-1 <= v <= 1 for _, v in s["elasticity/cluster_ari"])
    assert all(0 <= v < 0.05 for _, v in s["elasticity/linearity_error"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["elasticity/similarity"]
    assert len(acc.Images("elasticity/similarity")) == 2  # one per measurement


class Frozen(DigitsCNN):
    """Trains with a zero learning rate and no BatchNorm: the model never changes."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_probes_deformations_and_noise_stay_fixed_for_the_run(tmp_path):
    """Common random numbers: an unchanged model gives exactly the same values at every epoch."""
    diffeo, elastic = DiffeoStabilityMonitor(**DIFFEO_FAST), ElasticityMonitor(**ELASTIC_FAST)
    train, val = loaders()
    t = trainer(tmp_path, [diffeo, elastic], max_epochs=3)
    seen = []

    class Record(EarlyStopping):  # a callback after the monitors that reads what they logged
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            seen.append(
                {
                    k: float(v)
                    for k, v in trainer.callback_metrics.items()
                    if "/" in k and "seconds" not in k and "cost" not in k and "measured" not in k
                }
            )

    t.callbacks.append(Record(monitor="diffeo/rf"))
    t.fit(Frozen(), train, val)
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    assert diffeo.num_measurements == elastic.num_measurements == 3


def test_the_fold_check_runs_once_per_run(tmp_path, monkeypatch):
    """The deformations are the same at every measurement: their fold fraction is computed once."""
    import cm_monitor.callbacks.diffeo as callback_module
    import cm_monitor.diffeo as core

    calls, folds = [], []
    check, measure = core.min_jacobian_determinant, callback_module.relative_stability
    monkeypatch.setattr(core, "min_jacobian_determinant", lambda *a, **k: calls.append(1) or check(*a, **k))

    def recording(*args, **kwargs):
        est = measure(*args, **kwargs)
        folds.append(est.fold_fraction)
        return est

    monkeypatch.setattr(callback_module, "relative_stability", recording)
    monitor = DiffeoStabilityMonitor(num_anchors=3, delta=1.0, num_bootstrap=0)  # 1 pixel on 8 x 8 folds often
    with pytest.warns(RuntimeWarning, match=r"fold over") as said:
        trainer(tmp_path, [monitor], max_epochs=3).fit(Frozen(), *loaders())
    assert monitor.num_measurements == 3 and len(calls) == 1
    assert len([w for w in said if "fold over" in str(w.message)]) == 1  # said at the first measurement only
    with pytest.warns(UserWarning, match=r"fold over"):  # a one-off call computes it itself
        one_off = core.relative_stability(
            nn.Flatten(), monitor.anchors, delta=1.0, generator=monitor.seed, num_bootstrap=0
        )
    assert len(calls) == 2 and one_off.fold_fraction > 0.1
    assert folds == [one_off.fold_fraction] * 3
    with pytest.warns(RuntimeWarning, match=r"fold over") as said:  # a new fit says it again, once
        trainer(tmp_path, [monitor], max_epochs=2).fit(Frozen(), *loaders())
    assert len([w for w in said if "fold over" in str(w.message)]) == 1 and len(calls) == 2  # not computed again
    monitor.seed = 1  # other deformations: checked again
    with pytest.warns(RuntimeWarning, match=r"fold over"):
        trainer(tmp_path, [monitor], max_epochs=1).fit(Frozen(), *loaders())
    assert len(calls) == 3 and folds[-1] != folds[0]


@pytest.mark.parametrize("kind", ["map", "function"])
def test_elasticity_groups(tmp_path, kind):
    """The summaries compare the groups (here digits < 5 against >= 5); the steps still use the labels."""
    from cm_monitor import class_contrast, linear_baseline_similarity

    table = [0] * 5 + [1] * 5

    def below_five(inputs, labels):
        return (labels >= 5).long()

    monitor = ElasticityMonitor(groups=table if kind == "map" else below_five, **ELASTIC_FAST)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(DigitsCNN(), *loaders())
    est = monitor.last_estimate
    assert torch.equal(est.groups, (monitor.anchor_labels.cpu() >= 5).long())
    assert torch.equal(est.labels, monitor.anchor_labels.cpu())
    assert t.callback_metrics["elasticity/ratio"].item() == pytest.approx(
        class_contrast(est.symmetric_similarity, est.groups)[2], rel=1e-5
    )
    base = linear_baseline_similarity(monitor.anchors)
    assert t.callback_metrics["elasticity/ratio_baseline"].item() == pytest.approx(
        class_contrast((base + base.T) / 2, est.groups)[2], rel=1e-5
    )
    assert ElasticityMonitor(groups=table).state_key != ElasticityMonitor().state_key


@pytest.mark.parametrize(
    "groups, error, match",
    [
        ([0, 1, 0], ValueError, r"`groups` maps 3 classes, but the model has 10"),
        (lambda x, y: y[:3], ValueError, r"`groups\(inputs, labels\)` must be \[N\] = \[30\] integer group ids"),
        (lambda x, y: y.double(), ValueError, r"`groups\(inputs, labels\)` must be"),
    ],
)
def test_elasticity_groups_errors_at_the_start_of_fit(tmp_path, groups, error, match):
    t = trainer(tmp_path, [ElasticityMonitor(groups=groups, **ELASTIC_FAST)], max_epochs=1)
    with pytest.raises(error, match=match):
        t.fit(DigitsCNN(), *loaders())


def test_elasticity_one_group_is_a_warning_not_silent_nan(tmp_path):
    monitor = ElasticityMonitor(groups=lambda x, y: torch.zeros_like(y), **ELASTIC_FAST)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"all 30 inputs are in one group"):
        t.fit(DigitsCNN(), *loaders())
    for key in ("intra", "inter", "ratio", "cluster_ari", "ratio_baseline", "cluster_ari_baseline"):
        assert f"elasticity/{key}" not in t.callback_metrics, key  # NaN is not logged
    assert "elasticity/linearity_error" in t.callback_metrics  # the measurement itself ran


def test_early_stopping_on_log10_rf_with_every_n_epochs(tmp_path):
    stopper = EarlyStopping(monitor="diffeo/log10_rf", mode="min", patience=100, strict=True)
    _, t = fit(tmp_path, [DiffeoStabilityMonitor(every_n_epochs=2, **DIFFEO_FAST), stopper], max_epochs=3)
    assert t.current_epoch == 3 and "diffeo/log10_rf" in t.callback_metrics


def test_diffeo_monitor_needs_images(tmp_path):
    class Flat(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 10))

    train, val = loaders()
    flat = [
        DataLoader(TensorDataset(x.flatten(1), y), batch_size=100)
        for x, y in (train.dataset.tensors, val.dataset.tensors)
    ]
    t = trainer(tmp_path, [DiffeoStabilityMonitor(**DIFFEO_FAST)])
    with pytest.raises(ValueError, match=r"needs validation inputs of shape \[N, C, H, W\].*\[N, 64\]"):
        t.fit(Flat(), *flat)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DiffeoStabilityMonitor, {"delta": None}, r"exactly one of `delta`"),
        (DiffeoStabilityMonitor, {"delta": -1.0}, r"`delta` must be a finite number >= 0"),
        (DiffeoStabilityMonitor, {"reduction": "max"}, r"`reduction` must be 'mean' or 'median'"),
        (DiffeoStabilityMonitor, {"cutoff": 0}, r"`cutoff` must be a number >= 1"),
        (DiffeoStabilityMonitor, {"num_deformations": 0}, r"`num_deformations` must be an integer >= 1"),
        (DiffeoStabilityMonitor, {"output": "softmax!"}, r"`output` must be"),
        (DiffeoStabilityMonitor, {"num_bootstrap": 1}, r"`num_bootstrap` must be 0"),
        (ElasticityMonitor, {"lr": 0.0}, r"`lr` must be a positive number"),
        (ElasticityMonitor, {"relative_step": 2.0}, r"`relative_step` must be in \(0, 1\)"),
        (ElasticityMonitor, {"loss_fn": "ce"}, r"`loss_fn` must be callable"),
        (ElasticityMonitor, {"every_n_epochs": 0}, r"`every_n_epochs` must be an integer >= 1"),
        (ElasticityMonitor, {"groups": "digits"}, r"`groups` must be None, a function"),
        (ElasticityMonitor, {"groups": [0.5, 1.5]}, r"`groups` as a label map must be a sequence of integer"),
    ],
)
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**kwargs)


def test_state_keys_differ_by_configuration():
    a, b = DiffeoStabilityMonitor(delta=0.6), DiffeoStabilityMonitor(delta=1.0)
    assert a.state_key != b.state_key
    assert ElasticityMonitor(seed=1).state_key != ElasticityMonitor(seed=2).state_key


def test_cm_thresholds_above_the_early_stop_level_fail_at_construction():
    with pytest.raises(ValueError, match=r"`extra_thresholds` holds 0.999, above 0.99"):
        CMDimensionMonitor(extra_thresholds=(0.8, 0.999))
    with pytest.raises(ValueError, match=r"`threshold` holds 0.995"):
        CMDimensionMonitor(threshold=0.995)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_monitors_under_trainer_precision(tmp_path, precision):
    """Measured as the model predicts: anchors as validation_step receives them, the parameters' dtype."""
    seen = {}

    class Probe(DigitsCNN):
        def validation_step(self, batch, batch_idx):
            seen["dtype"] = batch[0].dtype
            return super().validation_step(batch, batch_idx)

    monitors = [CMDimensionMonitor(**FAST), DiffeoStabilityMonitor(**DIFFEO_FAST), ElasticityMonitor(**ELASTIC_FAST)]
    train, val = loaders()
    t = trainer(tmp_path, monitors, max_epochs=1, precision=precision)
    t.fit(Probe(), train, val)
    for monitor in monitors:
        assert monitor.anchors.dtype == seen["dtype"], type(monitor).__name__
    for key in ("cm/dim", "cm/boundary_dim", "diffeo/rf", "elasticity/ratio"):
        assert math.isfinite(t.callback_metrics[key].item()), key
    assert 0 < t.callback_metrics["cm/dim"].item() <= 64


@pytest.mark.gpu
def test_monitors_measure_on_the_gpu_and_leave_training_bit_identical(tmp_path):
    """On a CUDA device: anchors and measurement on the model's device, training unchanged."""
    import lightning

    out = []
    for monitors in ([], [CMDimensionMonitor(**FAST), DiffeoStabilityMonitor(**DIFFEO_FAST)]):
        lightning.seed_everything(0, verbose=False)
        model = DigitsCNN()
        t = lightning.pytorch.Trainer(
            accelerator="cuda",
            devices=1,
            max_epochs=2,
            logger=False,
            callbacks=monitors,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        t.fit(model, *loaders())
        out.append({k: v.cpu() for k, v in model.state_dict().items()})
        for monitor in monitors:
            assert monitor.anchors.device.type == "cuda"
            assert monitor.state_dict()["anchors"].device.type == "cpu"  # checkpoints load anywhere
            assert monitor.num_measurements == 2
    assert 0 < t.callback_metrics["cm/dim"].item() <= 64 and math.isfinite(t.callback_metrics["diffeo/rf"].item())
    for key in out[0]:
        assert torch.equal(out[0][key], out[1][key]), key


@pytest.mark.parametrize("strict", [True, False])
def test_a_first_measurement_without_values(tmp_path, monkeypatch, strict):
    """ElasticityMonitor cannot measure (e.g. a zero-gradient probe): a failed measurement, a warning,
    training goes on; a key a strict EarlyStopping watches gets the worst finite value for its mode
    rather than missing (a NaN would stop the fit with check_finite=True)."""
    import cm_monitor.callbacks.elasticity as module

    def no_step(*args, **kwargs):
        raise ValueError("no SGD step to take (zero gradient)")

    monkeypatch.setattr(module, "local_elasticity", no_step)
    stopper = EarlyStopping(monitor="elasticity/ratio", mode="max", strict=strict)
    t = trainer(tmp_path, [ElasticityMonitor(**ELASTIC_FAST), stopper], max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"measurement failed \(ValueError: no SGD step"):
        t.fit(DigitsCNN(), *loaders())
    assert t.callback_metrics["elasticity/failed"] == 1.0 and t.callback_metrics["elasticity/measured"] == 0.0
    if strict:
        assert t.callback_metrics["elasticity/ratio"].item() == -torch.finfo(torch.float32).max
    else:
        assert "elasticity/ratio" not in t.callback_metrics


@pytest.mark.parametrize("kind", ["diffeo", "elasticity"])
def test_the_other_monitors_measure_a_fixed_subset_of_many_classes(tmp_path, kind):
    """Digits have 10 classes; with `max_classes=4` the probe images come from a fixed random subset
    of 4 (the same classes as CMDimensionMonitor's with the same seed); `max_classes=None` keeps
    every class (the control)."""
    make = {
        "diffeo": lambda **k: DiffeoStabilityMonitor(**DIFFEO_FAST, **k),
        "elasticity": lambda **k: ElasticityMonitor(**ELASTIC_FAST, **k),
    }[kind]
    subset, every = make(max_classes=4), make(max_classes=None, prefix="every")
    cm = CMDimensionMonitor(**{**FAST, "max_classes": 4})
    model, t = fit(tmp_path, [subset, every, cm], max_epochs=1)
    classes = sorted(set(subset.anchor_labels.tolist()))
    assert len(classes) == 4 and classes == cm.targets
    assert subset.anchors.shape[0] == 4 * subset.num_anchors
    assert t.callback_metrics[f"{subset.prefix}/num_classes_measured"] == 4.0
    assert sorted(set(every.anchor_labels.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="max_classes"):
        make(max_classes=1)
    # `cm-monitor analyze` draws the same anchors after the fit (two passes there too)
    from cm_monitor.analysis import draw_anchors

    offline = make(max_classes=4)
    draw_anchors(offline, [loaders()[1]], model)
    assert torch.equal(offline.anchors, subset.anchors) and torch.equal(offline.anchor_labels, subset.anchor_labels)
