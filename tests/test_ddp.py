"""DDP: the same series on 1 or n processes, and the work is split (issue 13 point 4).

Anchors come from the whole validation set (each rank samples its shard by content keys, the
samples merge), and each measurement's units ((target, anchor) groups, probe images, SGD steps) are
divided among the ranks and merged. The unit tests need no process group; the fit compares one
process with two CPU processes (gloo) on the same weights.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from modules import NetModule
from test_callback import FAST, digits
from test_monitors import DIFFEO_FAST, ELASTIC_FAST
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cm_monitor import (
    CMDimensionMonitor,
    DiffeoStabilityMonitor,
    DimensionEstimate,
    ElasticityEstimate,
    ElasticityMonitor,
    OptimizerSettings,
    StabilityEstimate,
    boundary_dimension,
    cm_dimension,
    local_elasticity,
    relative_stability,
)
from cm_monitor.anchors import merge_samples, sample_anchors

# ------------------------------------------------------------------ anchors: independent of sharding


def _shard_samples(data, replicas, shuffle, per_class, batch_size=16):
    """The samples each of ``replicas`` ranks draws from its DistributedSampler shard (with padding)."""
    samples = []
    for rank in range(replicas):
        sampler = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=3)
        loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
        samples.append(sample_anchors(loader, per_class, generator=7, allow_empty=True))
    return samples


@pytest.mark.parametrize(("replicas", "shuffle"), [(2, False), (3, True), (8, False)])
def test_anchors_do_not_depend_on_the_sharding(replicas, shuffle):
    (x, y), _ = digits(num_val=300)
    data = TensorDataset(x[:301], y[:301])  # 301: the DistributedSampler pads with repeated examples
    whole = sample_anchors(DataLoader(data, batch_size=100), 4, generator=7)
    merged = merge_samples(_shard_samples(data, replicas, shuffle, 4), 4)
    assert torch.equal(merged.inputs, whole.inputs) and torch.equal(merged.labels, whole.labels)
    assert torch.equal(merged.keys, whole.keys)
    assert merged.labels.bincount().tolist() == [4] * 10
    # the order of the batches does not matter either, nor does an input read twice
    shuffled = torch.randperm(301, generator=torch.Generator().manual_seed(0))
    again = TensorDataset(torch.cat([x[:301][shuffled], x[:5]]), torch.cat([y[:301][shuffled], y[:5]]))
    assert torch.equal(sample_anchors(DataLoader(again, batch_size=32), 4, generator=7).inputs, whole.inputs)


def test_short_classes_count_distinct_examples_across_shards():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0] * 7 + [1] * 3)
    data = TensorDataset(x, y)
    whole = sample_anchors(DataLoader(data, batch_size=4), 4, generator=7)
    merged = merge_samples(_shard_samples(data, 3, False, 4, batch_size=2), 4)  # 10 → 12: 2 repeated
    # class 1 is short: 3 distinct examples, not 3 + repeats (class 0's count includes the repeats)
    assert whole.counts == {0: 7, 1: 3} and merged.counts == {0: 9, 1: 3}
    assert torch.equal(merged.inputs, whole.inputs)


# ------------------------------------------------------------------ the cores: shares merge into the whole


def _net(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, classes))


def _images(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("count", [2, 3])
def test_dimension_shares_merge_into_the_whole(count):
    model, (x, y) = _net(), _images()
    kw = dict(dims=[1, 4, 16, 64], anchors_per_target=3, num_bootstrap=20, generator=5, max_steps=40, threshold=0.5)
    kw["settings"] = OptimizerSettings(max_radius=None, search="grid")
    for measure in (cm_dimension, boundary_dimension):
        whole = measure(model, x, y, **kw)
        parts = [measure(model, x, y, part=(i, count), **kw) for i in range(count)]
        assert all(p.part == (i, count) and torch.isnan(p.dimension).all() for i, p in enumerate(parts))
        # each share optimized its own groups only, together all of them once
        probed = torch.stack([p.probed.any(-1) for p in parts])
        assert torch.equal(probed.sum(0), (whole.anchor_index >= 0).long())
        merged = DimensionEstimate.merge(parts[::-1])  # any order
        assert merged.part is None
        torch.testing.assert_close(merged.scores, whole.scores, equal_nan=True, rtol=1e-4, atol=1e-5)
        assert torch.equal(merged.steps, whole.steps) and torch.equal(merged.probed, whole.probed)
        torch.testing.assert_close(merged.dimension, whole.dimension, equal_nan=True)
        torch.testing.assert_close(merged.cutting_dim_std, whole.cutting_dim_std, equal_nan=True)
    with pytest.raises(ValueError, match="shares"):
        DimensionEstimate.merge(parts[:-1])
    with pytest.raises(ValueError, match="part"):
        cm_dimension(model, x, y, part=(2, 2))


@pytest.mark.parametrize("reduction", ["mean", "median"])
def test_stability_shares_merge_into_the_whole(reduction):
    model, (x, _) = _net(), _images()
    kw = dict(delta=0.6, num_deformations=2, reduction=reduction, num_bootstrap=30, generator=3)
    whole = relative_stability(model, x, **kw)
    parts = [relative_stability(model, x, part=(i, 2), **kw) for i in range(2)]
    # each share ran the model on its own images only (the rows of the other share are NaN)
    rows = [torch.isfinite(p.raw.outputs[0]).all(-1) for p in parts]
    assert torch.equal(rows[0], ~rows[1]) and int(rows[0].sum()) == 5 * 2
    merged = StabilityEstimate.merge(parts)
    for key in ("rf", "df", "gf", "rf_std", "log10_rf", "fold_fraction", "identity_rf"):
        assert getattr(merged, key) == pytest.approx(getattr(whole, key), rel=1e-5), key


def test_elasticity_shares_merge_into_the_whole():
    model, (x, y) = _net(), _images()
    whole = local_elasticity(model, x, y, chunk_size=2)
    parts = [local_elasticity(model, x, y, part=(i, 2), chunk_size=2) for i in range(2)]
    rows = [torch.isfinite(p.similarity).all(1) for p in parts]  # the SGD steps each share took
    assert torch.equal(rows[0], ~rows[1]) and int(rows[0].sum()) == 5
    merged = ElasticityEstimate.merge(parts)
    torch.testing.assert_close(merged.similarity, whole.similarity, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(merged.kernel, whole.kernel, rtol=1e-5, atol=1e-8)
    for key, value in whole.as_dict().items():
        assert getattr(merged, key) == pytest.approx(value, rel=1e-5, nan_ok=True), key
    assert merged.linearity_error == pytest.approx(whole.linearity_error, rel=1e-4)


# ------------------------------------------------------------------ a fit on 1 and on 2 CPU processes


def _share_size(kind, part):
    """How much of the measurement one rank's share did: problems, images or SGD steps."""
    if kind == "cm":
        return sum(int(est.probed.sum()) for est in part if est is not None)
    est = part[0]
    if kind == "diffeo":  # one process: a complete estimate, without the raw outputs
        return (
            est.num_images * est.num_deformations
            if est.raw is None
            else int(torch.isfinite(est.raw.outputs[0]).all(-1).sum())
        )
    return int(torch.isfinite(est.similarity).all(1).sum())


class Recording:
    """Writes, per rank, the anchors, the size of this rank's share and the values logged."""

    kind = ""

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = str(out_dir)
        self.share = None

    def _measure_part(self, trainer, pl_module, model, part):
        result = super()._measure_part(trainer, pl_module, model, part)
        self.share = _share_size(self.kind, result)
        return result

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking:
            record = {"anchors": self.anchors, "labels": self.anchor_labels, "share": self.share}
            record["values"] = dict(self.last_values)
            torch.save(record, f"{self.out_dir}/{self.kind}_{trainer.world_size}_{trainer.global_rank}.pt")


class RecordingCM(Recording, CMDimensionMonitor):
    kind = "cm"


class RecordingDiffeo(Recording, DiffeoStabilityMonitor):
    kind = "diffeo"


class RecordingElasticity(Recording, ElasticityMonitor):
    kind = "elasticity"


def _trained_module():
    """A small CNN without BatchNorm, trained a little; `lr=0` so that the fit leaves its weights alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))
    (xt, yt), _ = digits()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(60):
        batch = slice(32 * i % 1400, 32 * i % 1400 + 32)
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
        opt.step()
    return NetModule(net, lr=0.0)


def _fit(module, out_dir, devices):
    (xt, yt), (xv, yv) = digits(num_val=301)  # odd: the 2-rank DistributedSampler pads
    train = DataLoader(TensorDataset(xt, yt), batch_size=64)
    val = DataLoader(TensorDataset(xv, yv), batch_size=50)
    monitors = [
        RecordingCM(out_dir, **FAST, log_figures=False),
        RecordingDiffeo(out_dir, **DIFFEO_FAST),
        RecordingElasticity(out_dir, **ELASTIC_FAST, log_figures=False),
    ]
    strategy = "auto"
    if devices > 1:
        strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60))
    pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=monitors,
    ).fit(module, train, val)


@pytest.mark.slow
def test_two_processes_log_what_one_process_logs(tmp_path):
    module = _trained_module()
    _fit(copy.deepcopy(module), tmp_path, devices=1)
    _fit(copy.deepcopy(module), tmp_path, devices=2)
    for kind in ("cm", "diffeo", "elasticity"):
        one = torch.load(tmp_path / f"{kind}_1_0.pt")
        ranks = [torch.load(tmp_path / f"{kind}_2_{r}.pt") for r in range(2)]
        for rank in ranks:
            # the same anchors, although each rank read only its half of the validation data
            assert torch.equal(rank["anchors"], one["anchors"]) and torch.equal(rank["labels"], one["labels"])
            assert rank["values"] == ranks[0]["values"]  # every rank logs the same
        measured = {k: v for k, v in one["values"].items() if not k.endswith(("/seconds", "/cost_frac"))}
        assert set(measured) <= set(ranks[0]["values"])
        assert len(measured) >= 6
        if kind == "cm":
            assert {"cm/dim", "cm/boundary_dim", "cm/dim_std"} <= set(measured)
        for key, value in measured.items():
            assert ranks[0]["values"][key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        # the work was split: each rank did part of it, together all of it
        shares = [rank["share"] for rank in ranks]
        assert all(0 < s < one["share"] for s in shares) and sum(shares) == one["share"], (kind, shares)
