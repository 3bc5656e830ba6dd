"""The estimates print a short summary, not their tensors."""

from __future__ import annotations

import math

import torch

from cm_monitor import DimensionEstimate, ElasticityEstimate, StabilityEstimate


def hand_made_estimate(num_targets: int = 4) -> DimensionEstimate:
    """Targets with known flags, repeating: normal (d* = 2), saturated (at dims[0]), unreached, failed."""
    T, A, K = num_targets, 1, 2
    reps = T // 4 + 1
    curve = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]).repeat(reps, 1)[:T]
    cutting = torch.tensor([2.0, 1.0, math.nan, math.nan]).repeat(reps)[:T]
    std = torch.tensor([0.25, math.nan, math.nan, math.nan]).repeat(reps)[:T]
    nonfinite = torch.zeros(T, A, K, dtype=torch.bool)
    nonfinite[3::4] = True
    cells = torch.zeros(T, A, K)
    return DimensionEstimate(
        kind="cm",
        input_dim=4,
        targets=list(range(T)),
        dims=torch.tensor([1, 4]),
        threshold=0.9,
        scores=cells,
        losses=cells,
        steps=cells,
        nonfinite=nonfinite,
        anchor_index=torch.zeros(T, A, dtype=torch.long),
        distance=cells,
        outside=cells,
        temperature=1.5,
        readoff="fraction",
        curve=curve,
        cutting_dim=cutting,
        cutting_dim_std=std,
        dimension=4 - cutting,
        dimension_frac=(4 - cutting) / 4,
        num_bootstrap=10,
        bootstrap_seed=0,
    )


def test_dimension_estimate_lists_each_target_with_std_and_flag():
    est = hand_made_estimate()
    assert est.saturated.tolist() == [False, True, False, False] and est.failed.tolist() == [False, False, False, True]
    assert repr(est).splitlines() == [
        "DimensionEstimate(kind='cm', D=4, threshold=0.9, readoff='fraction', search='grid', dims=[1, 4] (K=2), "
        "temperature=1.5,",
        "  class 0: 2.00 ± 0.25",
        "  class 1: 3.00 ± nan  [saturated]",
        "  class 2: nan ± nan  [unreached]",
        "  class 3: nan ± nan  [failed]",
        "  mean: nan ± nan of D = 4)",
    ]
    assert repr(est) == str(est)


def test_dimension_estimate_repr_stays_short_with_many_targets():
    lines = repr(hand_made_estimate(45)).splitlines()  # e.g. the 45 boundaries of 10 classes
    assert len(lines) == 23  # header, 20 targets, the rest counted, the mean
    assert lines[20] == "  class 19: nan ± nan  [failed]" and lines[21] == "  ... 25 more targets"


def test_boundary_targets_and_a_long_grid_are_abbreviated():
    est = hand_made_estimate(2)
    wide = DimensionEstimate(
        **{**est.__dict__, "kind": "boundary", "targets": [(0, 1), (2, 5)], "dims": torch.arange(1, 11)}
    )
    lines = repr(wide).splitlines()
    assert "dims=[1, 2, 3, ..., 9, 10] (K=10)" in lines[0]
    assert lines[1:3] == ["  classes 0-1: 2.00 ± 0.25", "  classes 2-5: 3.00 ± nan  [saturated]"]


def test_stability_estimate_is_one_line():
    est = StabilityEstimate(
        rf=0.25, df=0.1, gf=0.4, rf_std=0.03, log10_rf=math.log10(0.25), log10_rf_std=0.05,
        temperature=0.257, delta=0.6, cutoff=3, reduction="mean", num_images=20, num_deformations=2,
    )  # fmt: skip
    assert repr(est) == (
        "StabilityEstimate(rf=0.25 ± 0.03, log10_rf=-0.602 ± 0.05, df=0.1, gf=0.4; 20 images × 2 deformations, "
        "delta=0.6 px (T=0.257), cutoff=3, reduction='mean', fold_fraction=0)"
    )
    failed = StabilityEstimate(**{**est.__dict__, "rf": math.nan, "failed": True})
    assert repr(failed).startswith("StabilityEstimate(rf=nan ± 0.03") and repr(failed).endswith(", failed (NaN/inf))")


def test_elasticity_estimate_is_one_line():
    n = 6
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    est = ElasticityEstimate(
        similarity=torch.rand(n, n), kernel=torch.rand(n, n), labels=labels, lr=torch.ones(n),
        linearity_error=1e-4, intra=0.8, inter=0.4, ratio=2.0, cluster_ari=0.9, cluster_labels=labels,
        groups=torch.tensor([0, 0, 0, 0, 1, 1]), ratio_baseline=1.25, cluster_ari_baseline=0.3,
    )  # fmt: skip
    assert repr(est) == (
        "ElasticityEstimate(N=6 inputs in 2 groups, intra=0.8, inter=0.4, ratio=2 (input baseline 1.25), "
        "cluster_ari=0.9 (baseline 0.3), linearity_error=0.0001)"
    )
    broken = ElasticityEstimate(**{**est.__dict__, "similarity": torch.full((n, n), math.nan)})
    assert repr(broken).endswith(", non-finite similarities)")
