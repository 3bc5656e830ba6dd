"""Known-answer tests of the cutting-plane estimator (methods.md section 1, sanity cases)."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from cm_monitor import OptimizerSettings, boundary_dimension, cm_dimension, default_dims
from cm_monitor.synthetic import HalfSpace, ScaledLogits, Tube

D = 64
#: The geometry without the locality bound or calibration: the sanity cases of methods.md are about
#: planes of any extent (a line always reaches a half-space, a (D - k)-plane a k-dimensional tube) and
#: about the synthetic models' own probabilities (the tube is where its raw p_1 is high).
UNBOUNDED = OptimizerSettings(max_radius=None, temperature=1.0)


def zeros(n):
    return torch.zeros(n, dtype=torch.long)


def test_linear_two_class_cm_and_boundary_are_d_minus_one():
    model = HalfSpace(D)
    anchors = torch.randn(20, D, generator=torch.Generator().manual_seed(3))
    labels = model(anchors).argmax(1)
    assert set(labels.tolist()) == {0, 1}

    cm = cm_dimension(model, anchors, labels, settings=UNBOUNDED)
    assert cm.targets == [0, 1]
    assert cm.cutting_dim.tolist() == [1.0, 1.0]
    assert cm.dimension.tolist() == [D - 1, D - 1]
    assert cm.dimension_frac.tolist() == pytest.approx([(D - 1) / D] * 2)

    bd = boundary_dimension(model, anchors, labels, settings=UNBOUNDED)
    assert bd.targets == [(0, 1)]
    # a two-class model has no anchor outside the pair: all anchors are used
    assert int((bd.anchor_index >= 0).sum()) == 20
    assert bd.dimension.tolist() == [D - 1]


@pytest.mark.parametrize("k", [8, 32])
def test_tube_dimension_is_k(k):
    model = Tube(D, k)
    anchors = model.sample_outside(12)
    assert float(model(anchors).softmax(1)[:, 1].max()) < 1e-6  # anchors are far outside the tube
    est = cm_dimension(model, anchors, zeros(12), classes=[1], settings=UNBOUNDED)
    assert abs(float(est.dimension[0]) - k) <= 5, est.dimension
    assert 0 < float(est.dimension_std[0]) < 5
    # nested planes: the curve is monotone in d, from "never reached" to "always reached"
    curve = est.curve[0]
    assert bool((curve[1:] >= curve[:-1]).all())
    assert float(curve[0]) < 0.01 and float(curve[-1]) > 0.95


def test_default_settings_converge_on_tube():
    """The default budget gives the same answer as a much longer, finer optimization."""
    model = Tube(D, 32)
    anchors = model.sample_outside(8)
    default = cm_dimension(model, anchors, zeros(8), classes=[1], settings=UNBOUNDED)
    long_run = cm_dimension(model, anchors, zeros(8), classes=[1], lr=0.05, max_steps=4000, settings=UNBOUNDED)
    assert abs(float(default.dimension[0]) - float(long_run.dimension[0])) <= 1.0
    assert abs(float(long_run.dimension[0]) - 32) <= 5


def test_scale_invariance():
    """Inputs multiplied by 100 and a model dividing by 100: the same dimension."""
    small, big = Tube(D, 16), Tube(D, 16, input_scale=100.0)
    anchors = small.sample_outside(8)
    a = cm_dimension(small, anchors, zeros(8), classes=[1], settings=UNBOUNDED)
    b = cm_dimension(big, anchors * 100, zeros(8), classes=[1], settings=UNBOUNDED)
    assert abs(float(a.dimension[0]) - float(b.dimension[0])) < 0.1
    assert abs(float(a.dimension[0]) - 16) <= 5


def test_input_shape_does_not_matter():
    """Images [N, C, H, W] and sequences [N, L, F] are flattened for the geometry."""
    model = Tube(D, 16)
    flat = model.sample_outside(6)
    kw = dict(classes=[1], dims=[40, 44, 48, 52, 56])
    a = cm_dimension(model, flat, zeros(6), **kw, settings=UNBOUNDED)
    img = cm_dimension(model, flat.view(6, 1, 8, 8), zeros(6), **kw, settings=UNBOUNDED)
    seq = cm_dimension(model, flat.view(6, 16, 4), zeros(6), **kw, settings=UNBOUNDED)
    assert img.input_dim == seq.input_dim == D
    assert torch.equal(a.scores.nan_to_num(-1), img.scores.nan_to_num(-1))
    assert torch.equal(a.scores.nan_to_num(-1), seq.scores.nan_to_num(-1))


def test_a_curve_reached_at_the_first_grid_point_is_flagged_saturated():
    # the half-space is reached by a line: d* <= dims[0] is only bounded, whether the grid starts at 4 or 1
    from cm_monitor.callbacks.cm import _read

    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(3))
    labels = model(anchors).argmax(1)
    coarse = cm_dimension(model, anchors, labels, dims=[4, 16, 64], settings=UNBOUNDED)
    assert coarse.saturated.tolist() == [True, True]
    assert coarse.cutting_dim.tolist() == [4.0, 4.0]
    assert torch.isnan(coarse.cutting_dim_std).all()
    notes = []
    per_class, mean, _ = _read(coarse, "class", notes)
    assert mean == D - 4 and per_class == {0: D - 4, 1: D - 4}
    assert any("already at the smallest plane dimension d = 4" in n and "at least 60" in n for n in notes)
    fine = cm_dimension(model, anchors, labels, dims=[1, 4, 16, 64], settings=UNBOUNDED)
    assert fine.saturated.tolist() == [True, True]
    notes = []
    _read(fine, "class", notes)
    assert any("d = 1" in n and "saturated" in n for n in notes)
    # a target that is never reached within a grid that stops below D: the note says where it stopped
    tube = Tube(D, 16)
    est = cm_dimension(tube, tube.sample_outside(4), zeros(4), classes=[1], dims=[1, 2, 4], settings=UNBOUNDED)
    assert est.saturated.tolist() == [False]
    notes = []
    assert _read(est, "class", notes)[0] == {1: 0.0}
    assert any("even at d = 4, the largest of `dims`" in n for n in notes)


def test_as_dict_uses_the_monitor_keys():
    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(3))
    labels = model(anchors).argmax(1)
    cm = cm_dimension(model, anchors, labels, settings=UNBOUNDED).as_dict()
    assert cm == {
        "dim": D - 1,
        "dim_std": pytest.approx(math.nan, nan_ok=True),  # saturated at d = 1: no uncertainty
        "dim_frac": pytest.approx((D - 1) / D),
        "dim_class_0": D - 1,
        "dim_class_1": D - 1,
    }
    bd = boundary_dimension(model, anchors, labels, settings=UNBOUNDED).as_dict()
    assert set(bd) == {"boundary_dim", "boundary_dim_std", "boundary_dim_frac", "boundary_dim_pair_0_1"}
    assert bd["boundary_dim"] == bd["boundary_dim_pair_0_1"] == D - 1


def test_chunking_does_not_change_the_result():
    model = Tube(D, 16)
    anchors = model.sample_outside(6)
    kw = dict(classes=[1], dims=[40, 48, 56])
    one = cm_dimension(model, anchors, zeros(6), chunk_size=3, **kw, settings=UNBOUNDED)  # one anchor per pass
    all_ = cm_dimension(model, anchors, zeros(6), chunk_size=10_000, **kw, settings=UNBOUNDED)
    torch.testing.assert_close(one.scores, all_.scores, equal_nan=True)


def test_basis_memory_bounds_the_chunk(monkeypatch):
    # large inputs: the bases (D × max(dims) per row), not chunk_size, bound what one pass holds
    from cm_monitor import cutting, planes

    model = Tube(D, 16)
    anchors = model.sample_outside(6)
    kw = dict(classes=[1], dims=[40, 48, 56], chunk_size=10_000)
    whole = cm_dimension(model, anchors, zeros(6), **kw, settings=UNBOUNDED)
    loads = []
    real = planes.nested_bases

    def spy(seeds, *args, **kwargs):
        loads.append(len(seeds))
        return real(seeds, *args, **kwargs)

    monkeypatch.setattr(planes, "nested_bases", spy)
    monkeypatch.setattr(cutting, "MAX_BASIS_ELEMENTS", 2 * D * 56)  # two rows of bases
    capped = cm_dimension(model, anchors, zeros(6), **kw, settings=UNBOUNDED)
    # at most two bases drawn at once; each of the 6 groups drawn at least once, and a group's later
    # problems mostly take its basis from the plane cache (which keeps as many as the pool has rows)
    assert max(loads) <= 2 and 6 <= sum(loads) < int(capped.probed.sum())
    torch.testing.assert_close(capped.scores, whole.scores, equal_nan=True)


def test_reread_at_another_threshold_matches_a_fresh_run():
    model = Tube(D, 16)
    anchors = model.sample_outside(8)
    grid = replace(UNBOUNDED, search="grid")  # every grid point's score, to re-read at any threshold
    est = cm_dimension(model, anchors, zeros(8), classes=[1], threshold=0.5, settings=grid)
    fresh = cm_dimension(model, anchors, zeros(8), classes=[1], threshold=0.9, settings=grid)
    reread = est.at(0.9)
    assert reread.threshold == 0.9
    torch.testing.assert_close(reread.cutting_dim, fresh.cutting_dim)
    torch.testing.assert_close(reread.cutting_dim_std, fresh.cutting_dim_std)
    # a higher confidence needs at least as large a plane
    assert float(reread.cutting_dim[0]) >= float(est.cutting_dim[0])
    assert est.at(0.5).cutting_dim.tolist() == est.cutting_dim.tolist()
    assert est.success_rate(0.9).shape == (1, len(est.dims))


def test_ensemble_is_close_to_the_intersection():
    """Two tubes of dimension 48 in R^64 intersect in about 32 dimensions."""
    a, b = Tube(D, 48, seed=0), Tube(D, 48, seed=1)
    anchors = a.sample_outside(8)
    single = cm_dimension(a, anchors, zeros(8), classes=[1], settings=UNBOUNDED)
    both = cm_dimension([a, b], anchors, zeros(8), classes=[1], settings=UNBOUNDED)
    assert abs(float(single.dimension[0]) - 48) <= 5
    assert float(both.dimension[0]) < float(single.dimension[0]) - 8
    assert abs(float(both.dimension[0]) - 32) <= 6


def test_anchors_of_the_target_class_are_not_used():
    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 5)
    est = cm_dimension(model, anchors, labels, dims=[1, 2], settings=UNBOUNDED)
    for i, c in enumerate(est.targets):
        used = est.anchor_index[i][est.anchor_index[i] >= 0]
        assert bool((labels[used] != c).all()) and used.numel() == 5


def test_anchors_per_target_limits_the_anchors():
    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    est = cm_dimension(model, anchors, zeros(10), classes=[1], dims=[1, 2], anchors_per_target=4, settings=UNBOUNDED)
    assert int((est.anchor_index >= 0).sum()) == 4


def test_boundary_of_three_classes_uses_outside_anchors():
    model = nn.Linear(D, 4)
    anchors = torch.randn(12, D, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 4
    est = boundary_dimension(model, anchors, labels, pairs=[(0, 1, 2)], dims=[1, 8, 64], settings=UNBOUNDED)
    used = est.anchor_index[0][est.anchor_index[0] >= 0]
    assert bool((labels[used] == 3).all()) and used.numel() == 3
    assert est.targets == [(0, 1, 2)]


def test_default_grid_is_log_spaced_and_ends_at_d():
    grid = default_dims(3072)
    assert grid[0] == 1 and grid[-1] == 3072 and grid == sorted(set(grid))
    assert default_dims(1) == [1]


def test_plane_seeds_are_fixed_numbers():
    """Saved seeds must give the same planes on every Python version: the hash is our own."""
    from cm_monitor.planes import nested_bases, plane_seed

    assert plane_seed(1, (2,), 3) == plane_seed(1, (2,), 3)
    assert len({plane_seed(1, (2,), 3), plane_seed(1, (3,), 2), plane_seed(1, (2, 3), 0), plane_seed(2, (2,), 3)}) == 4
    assert plane_seed(0, (1,), 0) == 8837795482129047433
    q = nested_bases([plane_seed(0, (1,), 0)], 16, 4)
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(4), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- locality


def _anchors_at_distance(n, h, norm, seed=1):  # seed 0 would draw the weight vector itself
    """Anchors of class 0 of the HalfSpace at distance ``h`` from its hyperplane, each of norm ``norm``."""
    model = HalfSpace(D)
    w = model.linear.weight.detach()[0]
    n_hat = w / w.norm()
    z = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    z = z - (z @ n_hat)[:, None] * n_hat  # orthogonal to the normal
    z = z / z.norm(dim=1, keepdim=True) * (norm**2 - h**2) ** 0.5
    return model, z - h * n_hat


@pytest.mark.parametrize("ratio", [0.35, 0.5])
def test_half_space_within_a_radius(ratio):
    """A d-plane through x0 reaches the hyperplane within radius R iff R · ‖Q_dᵀ n‖ >= h, and
    ‖Q_dᵀ n‖² of a random d-plane has mean d / D: half of the planes succeed at d* ≈ D (h / R)²."""
    model, anchors = _anchors_at_distance(24, h=ratio, norm=1.0)
    assert bool((model(anchors).argmax(1) == 0).all())
    # p_1 >= 0.5 exactly on the hyperplane's far side, whatever the temperature
    est = cm_dimension(
        model, anchors, zeros(24), classes=[1], threshold=0.5, settings=OptimizerSettings(max_radius=1.0)
    )
    expected = D * ratio**2
    assert abs(float(est.cutting_dim[0]) - expected) <= 0.25 * expected + 1, est.cutting_dim
    loc = est.locality()
    assert loc["distance_p90"] <= 1.0 + 1e-4  # never beyond the radius
    assert ratio - 1e-3 <= loc["distance_median"]  # the hyperplane is at least h away
    # without the bound every line reaches it
    unbounded = cm_dimension(model, anchors, zeros(24), classes=[1], threshold=0.5, settings=UNBOUNDED)
    assert unbounded.cutting_dim.tolist() == [1.0]


def test_distance_is_taken_where_the_threshold_is_first_reached():
    # in the full space the optimizer heads straight for the hyperplane (0.5 away) and goes on to
    # p = 0.985 at the radius (1.0): the success is where it crossed, not where it ended
    model, anchors = _anchors_at_distance(12, h=0.5, norm=1.0)
    settings = OptimizerSettings(max_radius=1.0, temperature=1.0, search="grid")  # run on past the threshold
    est = cm_dimension(model, anchors, zeros(12), classes=[1], threshold=0.5, dims=[16, 64], settings=settings)
    assert bool((est.scores[0, :, -1] > 0.95).all())
    assert bool(((est.distance[0, :, -1] >= 0.5) & (est.distance[0, :, -1] < 0.7)).all())


def test_unbounded_planes_report_how_far_they_went():
    model, anchors = _anchors_at_distance(8, h=0.5, norm=1.0)
    est = cm_dimension(model, anchors, zeros(8), classes=[1], settings=UNBOUNDED, dims=[1, 8, 64])
    loc = est.locality()
    # a line through x0 meets the hyperplane at distance h / |cos|, far more than h for most lines
    assert loc["distance_median"] > 1.0
    assert 0.0 <= loc["outside_frac"] <= 1.0


# ---------------------------------------------------------------------------------- calibration


def _soft_half_space():
    """A half-space whose anchors are labelled by sampling its own softmax at temperature 4."""
    model = HalfSpace(D)
    g = torch.Generator().manual_seed(5)
    anchors = torch.randn(400, D, generator=g) * 0.5
    with torch.no_grad():
        p1 = (model(anchors) / 4).softmax(1)[:, 1]
    labels = (torch.rand(400, generator=g) < p1).long()
    return model, anchors, labels


def test_calibrated_temperature_recovers_the_labels_temperature():
    from cm_monitor.calibration import calibrate_temperature

    model, anchors, labels = _soft_half_space()
    with torch.no_grad():
        t = calibrate_temperature(model(anchors), labels)
    assert 3 < t < 5.5  # labels drawn at T = 4; 400 samples
    assert calibrate_temperature(30 * model(anchors).detach(), labels) == pytest.approx(30 * t, rel=1e-3)


def test_a_calibration_set_without_errors_does_not_collapse_the_temperature():
    """Without errors the cross-entropy falls all the way to T -> 0 (probabilities 0 or 1); the
    temperature is raised until the mean confidence is (N + 1) / (N + 2) instead."""
    from cm_monitor.calibration import RANGE, calibrate_temperature

    model = HalfSpace(D)
    anchors = torch.randn(40, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(anchors)
    labels = logits.argmax(1)  # every example right
    t = calibrate_temperature(logits, labels)
    assert t > 10 * RANGE[0] * float(logits.std())
    confidence = float((logits / t).softmax(1).amax(1).mean())
    assert confidence == pytest.approx(41 / 42, abs=1e-6)
    assert math.isnan(calibrate_temperature(torch.full((4, 3), math.nan), torch.zeros(4, dtype=torch.long)))


@pytest.mark.parametrize("factor", [0.3, 30.0])
def test_logit_scale_does_not_change_the_calibrated_dimension(factor):
    model, anchors, labels = _soft_half_space()
    kw = dict(classes=[1], dims=[1, 4, 16, 64], settings=OptimizerSettings(max_radius=2.0))
    base = cm_dimension(model, anchors[labels == 0][:12], zeros(12), calibration=(anchors, labels), **kw)
    scaled = cm_dimension(
        ScaledLogits(model, factor), anchors[labels == 0][:12], zeros(12), calibration=(anchors, labels), **kw
    )
    assert scaled.temperature == pytest.approx(factor * base.temperature, rel=1e-3)
    torch.testing.assert_close(scaled.scores, base.scores, atol=2e-3, rtol=0, equal_nan=True)
    # raw probabilities (T = 1) move with the scale
    raw = dict(kw, settings=OptimizerSettings(max_radius=2.0, temperature=1.0, readoff="mean"))
    a = cm_dimension(model, anchors[labels == 0][:12], zeros(12), **raw)
    b = cm_dimension(ScaledLogits(model, factor), anchors[labels == 0][:12], zeros(12), **raw)
    assert not torch.allclose(a.scores, b.scores, atol=1e-2)


# ---------------------------------------------------------------------------------- read-off


def _estimate_with_scores(first_column, readoff="fraction"):
    """A DimensionEstimate with given best scores at d = 1 (and 1.0 beyond), for read-off tests."""
    from dataclasses import replace

    model = HalfSpace(D)
    anchors = torch.randn(len(first_column), D, generator=torch.Generator().manual_seed(0))
    est = cm_dimension(model, anchors, zeros(len(first_column)), classes=[1], dims=[1, 2, 4], settings=UNBOUNDED)
    scores = torch.ones_like(est.scores)
    scores[0, :, 0] = torch.tensor(first_column)
    scores[0, :, 1] = torch.tensor(first_column)
    from cm_monitor.dimension import _read_off

    return _read_off(replace(est, scores=scores, readoff=readoff, threshold=0.5, probed=None, search="grid"))


def test_fraction_readoff_follows_the_anchors_not_the_mean_probability():
    # four anchors at p = 0.99 and six at p = 0.2: the mean (0.516) crosses 0.5 at d = 1, but only
    # 40 % of the anchors succeed there
    column = [0.99] * 4 + [0.2] * 6
    mean = _estimate_with_scores(column, readoff="mean")
    frac = _estimate_with_scores(column, readoff="fraction")
    assert mean.cutting_dim.tolist() == [1.0] and bool(mean.saturated[0])
    assert float(frac.cutting_dim[0]) > 2.0 and not bool(frac.saturated[0])
    assert frac.curve[0].tolist() == pytest.approx([0.4, 0.4, 1.0])


def test_saturated_targets_have_no_uncertainty():
    est = _estimate_with_scores([0.99] * 10)
    assert est.saturated.tolist() == [True]
    assert est.cutting_dim.tolist() == [1.0]
    assert torch.isnan(est.cutting_dim_std).all()  # never a made-up 0


def test_a_model_at_chance_gets_uniform_calibrated_probabilities():
    """On a few dozen examples a chance-level model's cross-entropy has a finite minimum by luck;
    unless it beats the uniform prediction by two standard errors it is treated as uninformative."""
    from cm_monitor.calibration import RANGE, calibrate_temperature

    g = torch.Generator().manual_seed(1)
    logits, labels = 3 * torch.randn(90, 10, generator=g), torch.randint(0, 10, (90,), generator=g)
    logits[torch.arange(90), labels] += 1.0  # a faint signal, not significant on 90 examples
    lucky = calibrate_temperature(logits, labels, chance_z=0)
    assert lucky < 100 * float(logits.std())  # the plain minimum is at a finite temperature
    assert calibrate_temperature(logits, labels) == pytest.approx(RANGE[1] * float(logits.std()), rel=1e-6)
    # an informative model keeps its best temperature
    informative = logits.clone()
    informative[torch.arange(90), labels] += 5.0
    assert calibrate_temperature(informative, labels) == calibrate_temperature(informative, labels, chance_z=0)


def test_a_crossing_at_a_grid_point_is_that_grid_point_exactly():
    """exp(log D) rounds above D for D = 150,528 (cm/dim was logged as -8.7e-12); the read-off stays
    within its bracket's grid points exactly."""
    import math

    from cm_monitor.dimension import _crossing

    dims = torch.tensor([1, 9, 784, 150528], dtype=torch.float64)
    assert math.exp(math.log(150528)) != 150528  # control: the rounding this guards against
    at_end = _crossing(torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64), dims.log(), 0.5)
    assert float(at_end) == 150528.0
    between = _crossing(torch.tensor([0.0, 0.0, 0.2, 0.8], dtype=torch.float64), dims.log(), 0.5)
    assert float(between) == pytest.approx(math.sqrt(784 * 150528), rel=1e-12)  # the log-midpoint
    first = _crossing(torch.tensor([0.7, 1.0, 1.0, 1.0], dtype=torch.float64), dims.log(), 0.5)
    assert float(first) == 1.0
