"""Known-answer tests of the cutting-plane estimator (methods.md section 1, sanity cases)."""

import pytest
import torch
from torch import nn

from cm_monitor import boundary_dimension, cm_dimension, default_dims
from cm_monitor.synthetic import HalfSpace, Tube

D = 64


def zeros(n):
    return torch.zeros(n, dtype=torch.long)


def test_linear_two_class_cm_and_boundary_are_d_minus_one():
    model = HalfSpace(D)
    anchors = torch.randn(20, D, generator=torch.Generator().manual_seed(3))
    labels = model(anchors).argmax(1)
    assert set(labels.tolist()) == {0, 1}

    cm = cm_dimension(model, anchors, labels)
    assert cm.targets == [0, 1]
    assert cm.cutting_dim.tolist() == [1.0, 1.0]
    assert cm.dimension.tolist() == [D - 1, D - 1]
    assert cm.dimension_frac.tolist() == pytest.approx([(D - 1) / D] * 2)

    bd = boundary_dimension(model, anchors, labels)
    assert bd.targets == [(0, 1)]
    # a two-class model has no anchor outside the pair: all anchors are used
    assert int((bd.anchor_index >= 0).sum()) == 20
    assert bd.dimension.tolist() == [D - 1]


@pytest.mark.parametrize("k", [8, 32])
def test_tube_dimension_is_k(k):
    model = Tube(D, k)
    anchors = model.sample_outside(12)
    assert float(model(anchors).softmax(1)[:, 1].max()) < 1e-6  # anchors are far outside the tube
    est = cm_dimension(model, anchors, zeros(12), classes=[1])
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
    default = cm_dimension(model, anchors, zeros(8), classes=[1])
    long_run = cm_dimension(model, anchors, zeros(8), classes=[1], lr=0.05, max_steps=4000)
    assert abs(float(default.dimension[0]) - float(long_run.dimension[0])) <= 1.0
    assert abs(float(long_run.dimension[0]) - 32) <= 5


def test_scale_invariance():
    """Inputs multiplied by 100 and a model dividing by 100: the same dimension."""
    small, big = Tube(D, 16), Tube(D, 16, input_scale=100.0)
    anchors = small.sample_outside(8)
    a = cm_dimension(small, anchors, zeros(8), classes=[1])
    b = cm_dimension(big, anchors * 100, zeros(8), classes=[1])
    assert abs(float(a.dimension[0]) - float(b.dimension[0])) < 0.1
    assert abs(float(a.dimension[0]) - 16) <= 5


def test_input_shape_does_not_matter():
    """Images [N, C, H, W] and sequences [N, L, F] are flattened for the geometry."""
    model = Tube(D, 16)
    flat = model.sample_outside(6)
    kw = dict(classes=[1], dims=[40, 44, 48, 52, 56])
    a = cm_dimension(model, flat, zeros(6), **kw)
    img = cm_dimension(model, flat.view(6, 1, 8, 8), zeros(6), **kw)
    seq = cm_dimension(model, flat.view(6, 16, 4), zeros(6), **kw)
    assert img.input_dim == seq.input_dim == D
    assert torch.equal(a.scores, img.scores) and torch.equal(a.scores, seq.scores)


def test_a_grid_that_starts_above_one_flags_censored_targets():
    # the half-space is reached by a line: with a grid starting at 4, d* <= 4 is only bounded
    from cm_monitor.callbacks.cm import _read

    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(3))
    labels = model(anchors).argmax(1)
    coarse = cm_dimension(model, anchors, labels, dims=[4, 16, 64])
    assert coarse.censored.tolist() == [True, True]
    assert coarse.cutting_dim.tolist() == [4.0, 4.0]
    notes = []
    per_class, mean, _ = _read(coarse, "class", notes)
    assert mean == D - 4 and per_class == {0: D - 4, 1: D - 4}
    assert any("already at the smallest plane dimension d = 4" in n and "at least 60" in n for n in notes)
    fine = cm_dimension(model, anchors, labels, dims=[1, 4, 16, 64])
    assert fine.censored.tolist() == [False, False]
    # a target that is never reached within a grid that stops below D: the note says where it stopped
    tube = Tube(D, 16)
    est = cm_dimension(tube, tube.sample_outside(4), zeros(4), classes=[1], dims=[1, 2, 4])
    notes = []
    assert _read(est, "class", notes)[0] == {1: 0.0}
    assert any("even at d = 4, the largest of `dims`" in n for n in notes)


def test_as_dict_uses_the_monitor_keys():
    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(3))
    labels = model(anchors).argmax(1)
    cm = cm_dimension(model, anchors, labels).as_dict()
    assert cm == {
        "dim": D - 1,
        "dim_std": pytest.approx(0.0),
        "dim_frac": pytest.approx((D - 1) / D),
        "dim_class_0": D - 1,
        "dim_class_1": D - 1,
    }
    bd = boundary_dimension(model, anchors, labels).as_dict()
    assert set(bd) == {"boundary_dim", "boundary_dim_std", "boundary_dim_frac", "boundary_dim_pair_0_1"}
    assert bd["boundary_dim"] == bd["boundary_dim_pair_0_1"] == D - 1


def test_chunking_does_not_change_the_result():
    model = Tube(D, 16)
    anchors = model.sample_outside(6)
    kw = dict(classes=[1], dims=[40, 48, 56])
    one = cm_dimension(model, anchors, zeros(6), chunk_size=3, **kw)  # one anchor per pass
    all_ = cm_dimension(model, anchors, zeros(6), chunk_size=10_000, **kw)
    torch.testing.assert_close(one.scores, all_.scores)


def test_basis_memory_bounds_the_chunk(monkeypatch):
    # large inputs: the bases (D × max(dims) per group), not chunk_size, bound what one pass holds
    from cm_monitor import cutting

    model = Tube(D, 16)
    anchors = model.sample_outside(6)
    kw = dict(classes=[1], dims=[40, 48, 56], chunk_size=10_000)
    whole = cm_dimension(model, anchors, zeros(6), **kw)
    groups = []
    real = cutting.nested_bases

    def spy(seeds, *args, **kwargs):
        groups.append(len(seeds))
        return real(seeds, *args, **kwargs)

    monkeypatch.setattr(cutting, "nested_bases", spy)
    monkeypatch.setattr(cutting, "MAX_BASIS_ELEMENTS", 2 * D * 56)
    capped = cm_dimension(model, anchors, zeros(6), **kw)
    assert groups == [2, 2, 2]
    torch.testing.assert_close(capped.scores, whole.scores)


def test_reread_at_another_threshold_matches_a_fresh_run():
    model = Tube(D, 16)
    anchors = model.sample_outside(8)
    est = cm_dimension(model, anchors, zeros(8), classes=[1], threshold=0.5)
    fresh = cm_dimension(model, anchors, zeros(8), classes=[1], threshold=0.9)
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
    single = cm_dimension(a, anchors, zeros(8), classes=[1])
    both = cm_dimension([a, b], anchors, zeros(8), classes=[1])
    assert abs(float(single.dimension[0]) - 48) <= 5
    assert float(both.dimension[0]) < float(single.dimension[0]) - 8
    assert abs(float(both.dimension[0]) - 32) <= 6


def test_anchors_of_the_target_class_are_not_used():
    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 5)
    est = cm_dimension(model, anchors, labels, dims=[1, 2])
    for i, c in enumerate(est.targets):
        used = est.anchor_index[i][est.anchor_index[i] >= 0]
        assert bool((labels[used] != c).all()) and used.numel() == 5


def test_anchors_per_target_limits_the_anchors():
    model = HalfSpace(D)
    anchors = torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    est = cm_dimension(model, anchors, zeros(10), classes=[1], dims=[1, 2], anchors_per_target=4)
    assert int((est.anchor_index >= 0).sum()) == 4


def test_boundary_of_three_classes_uses_outside_anchors():
    model = nn.Linear(D, 4)
    anchors = torch.randn(12, D, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 4
    est = boundary_dimension(model, anchors, labels, pairs=[(0, 1, 2)], dims=[1, 8, 64])
    used = est.anchor_index[0][est.anchor_index[0] >= 0]
    assert bool((labels[used] == 3).all()) and used.numel() == 3
    assert est.targets == [(0, 1, 2)]


def test_default_grid_is_log_spaced_and_ends_at_d():
    grid = default_dims(3072)
    assert grid[0] == 1 and grid[-1] == 3072 and grid == sorted(set(grid))
    assert default_dims(1) == [1]


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]


def test_trained_mlp_on_digits_has_higher_cm_dimension_than_at_init():
    Xtr, ytr, Xte, yte = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    anchors = torch.cat([Xte[yte == c][:3] for c in range(10)])
    labels = torch.cat([yte[yte == c][:3] for c in range(10)])
    kw = dict(anchors_per_target=6, generator=1)
    before = cm_dimension(model, anchors, labels, **kw)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(Xtr), ytr).backward()
        opt.step()
    assert float((model(Xte).argmax(1) == yte).float().mean()) > 0.9
    after = cm_dimension(model, anchors, labels, **kw)
    assert after.mean_dimension > before.mean_dimension + 3 * max(after.mean_dimension_std, before.mean_dimension_std)
    assert 0 < after.mean_dimension <= 64


def test_plane_seeds_are_fixed_numbers():
    """Saved seeds must give the same planes on every Python version: the hash is our own."""
    from cm_monitor.planes import nested_bases, plane_seed

    assert plane_seed(1, (2,), 3) == plane_seed(1, (2,), 3)
    assert len({plane_seed(1, (2,), 3), plane_seed(1, (3,), 2), plane_seed(1, (2, 3), 0), plane_seed(2, (2,), 3)}) == 4
    assert plane_seed(0, (1,), 0) == 8837795482129047433
    q = nested_bases([plane_seed(0, (1,), 0)], 16, 4)
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(4), atol=1e-5, rtol=0)
