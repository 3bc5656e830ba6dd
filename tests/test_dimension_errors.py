"""Bad input gets a clear error naming the argument; numerical failure is reported, not logged."""

import math
import warnings

import pytest
import torch
from torch import nn

from cm_monitor import OptimizerSettings, boundary_dimension, cm_dimension
from cm_monitor.synthetic import HalfSpace

D = 16
KW = dict(dims=[1, 4, 16], max_steps=20)


@pytest.fixture
def setup():
    model = nn.Linear(D, 3)
    anchors = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    return model, anchors, torch.arange(6) % 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_anchors(setup, bad):
    model, anchors, labels = setup
    anchors[2, 3] = bad
    with pytest.raises(ValueError, match=r"`anchors` contains NaN or inf"):
        cm_dimension(model, anchors, labels, **KW)


def test_integer_inputs_point_to_embeddings(setup):
    model, _, labels = setup
    tokens = torch.randint(0, 100, (6, D))
    with pytest.raises(TypeError, match=r"`anchors` has integer dtype.*continuous.*embeddings"):
        cm_dimension(model, tokens, labels, **KW)


class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda x: x.sum(1), r"returned shape \(6,\).*expected logits \[6, C\]"),
        (lambda x: x.view(6, 4, 4), r"returned shape \(6, 4, 4\)"),
        (lambda x: ("aux", x[:, :3]), r"returned a tuple; expected logits.*`output_transform=`"),
        (lambda x: {"scores": x[:, :3]}, r"keys \['scores'\] and no tensor under 'logits'.*`output_transform=`"),
        (lambda x: x[:, :0], r"C >= 2"),
    ],
)
def test_model_output_must_be_logits(setup, fn, match):
    _, anchors, labels = setup
    with pytest.raises((ValueError, TypeError), match=match):
        cm_dimension(Returns(fn), anchors, labels, **KW)


def test_classes_out_of_range(setup):
    with pytest.raises(ValueError, match=r"`classes` holds class 3, outside \[0, 2\]"):
        cm_dimension(*setup, classes=[0, 3], **KW)
    with pytest.raises(ValueError, match=r"`classes` holds class -1"):
        cm_dimension(*setup, classes=[-1], **KW)


def test_pairs_out_of_range_or_malformed(setup):
    with pytest.raises(ValueError, match=r"`pairs` holds class 5, outside \[0, 2\]"):
        boundary_dimension(*setup, pairs=[(0, 5)], **KW)
    with pytest.raises(ValueError, match=r"`pairs` holds \(1, 1\), which repeats a class"):
        boundary_dimension(*setup, pairs=[(1, 1)], **KW)
    with pytest.raises(ValueError, match=r"`pairs` must hold class sets of one length k >= 2"):
        boundary_dimension(*setup, pairs=[(0, 1), (0, 1, 2)], **KW)


def test_labels_of_the_wrong_length_or_type(setup):
    model, anchors, labels = setup
    with pytest.raises(ValueError, match=r"`labels` has shape \(5,\); expected \[6\]"):
        cm_dimension(model, anchors, labels[:5], **KW)
    with pytest.raises(TypeError, match=r"`labels` has dtype torch.float32"):
        cm_dimension(model, anchors, labels.float(), **KW)
    with pytest.raises(ValueError, match=r"`labels` must be class ids in \[0, 2\]"):
        cm_dimension(model, anchors, labels + 1, **KW)


@pytest.mark.parametrize("dims", [[0, 4], [1, D + 1], []])
def test_dims_outside_one_to_d(setup, dims):
    with pytest.raises(ValueError, match=r"`dims`"):
        cm_dimension(*setup, dims=dims)


def test_no_usable_anchor_for_a_target(setup):
    model, anchors, _ = setup
    labels = torch.ones(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"No usable anchor for target class 1"):
        cm_dimension(model, anchors, labels, classes=[1], **KW)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=0.0), r"`threshold` must be a number in \(0, 1\]"),
        (dict(threshold=1.5), r"`threshold`"),
        (dict(lr=-1.0), r"`lr` must be a positive"),
        (dict(max_steps=0), r"`max_steps` must be a positive integer"),
        (dict(scale="big"), r"`scale` must be 'auto' or a positive number"),
        (dict(chunk_size=0), r"`chunk_size` must be an integer >= 1"),
        (dict(generator="seed"), r"`generator` is a str"),
    ],
)
def test_bad_settings(setup, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cm_dimension(*setup, **{**KW, **kwargs})


def test_not_a_model(setup):
    _, anchors, labels = setup
    with pytest.raises(TypeError, match=r"`model` is a function"):
        cm_dimension(lambda x: x, anchors, labels, **KW)
    with pytest.raises(ValueError, match=r"`model` is an empty sequence"):
        cm_dimension([], anchors, labels, **KW)


def test_constant_anchors_need_an_explicit_scale():
    model = nn.Linear(D, 2)
    with pytest.raises(ValueError, match=r"pass `scale=`"):
        cm_dimension(model, torch.ones(4, D), torch.zeros(4, dtype=torch.long), **KW)


class BlowsUp(HalfSpace):
    """A half-space whose output turns NaN once the input leaves a ball of radius 3."""

    def forward(self, x):
        out = super().forward(x)
        far = x.flatten(1).norm(dim=1, keepdim=True) > 3
        return torch.where(far, torch.full_like(out, math.nan), out)


def test_nan_during_optimization_is_reported_not_turned_into_a_number():
    model = BlowsUp(D)
    anchors = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    anchors = anchors / anchors.norm(dim=1, keepdim=True) * 2.5  # inside the ball
    labels = model(anchors).argmax(1)
    with pytest.warns(RuntimeWarning, match=r"NaN/inf appeared"):
        est = cm_dimension(model, anchors, labels, settings=OptimizerSettings(max_radius=None), **KW)
    assert bool(est.failed.any())
    assert all(math.isnan(d) for d, f in zip(est.dimension.tolist(), est.failed.tolist(), strict=True) if f)
    assert bool(est.nonfinite.any())


def test_thresholds_above_what_the_early_stop_reaches_are_refused():
    """Problems stop at loss <= tol, i.e. p ~ exp(-tol): higher levels would be silently wrong."""
    model = HalfSpace(D)
    anchors = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    labels = model(anchors).argmax(1)
    with pytest.raises(ValueError, match=r"`threshold` = 0.999 is above 0.99"):
        cm_dimension(model, anchors, labels, threshold=0.999, **KW)
    est = cm_dimension(model, anchors, labels, **KW)
    assert est.max_threshold == pytest.approx(math.exp(-0.01))
    with pytest.raises(ValueError, match=r"is above"):
        est.at(0.995)
    with pytest.raises(ValueError, match=r"is above"):
        est.success_rate(0.995)
    # a smaller tol measures higher levels: the half-space is still D - 1 at 0.999
    fine = cm_dimension(
        model,
        anchors,
        labels,
        threshold=0.999,
        dims=[1, 4, 16],
        settings=OptimizerSettings(tol=1e-4, plateau_tol=1e-6, max_steps=2000, max_radius=None, temperature=0.1),
    )
    assert fine.dimension.tolist() == pytest.approx([D - 1, D - 1], abs=0.1)


def test_a_row_that_turns_nan_leaves_the_rows_beside_it_untouched():
    """Rows blow up while others share their passes: those others step exactly as when alone."""
    model = BlowsUp(D)
    anchors = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    anchors = anchors / anchors.norm(dim=1, keepdim=True) * torch.linspace(1.0, 2.9, 6)[:, None]
    labels = model(anchors).argmax(1)
    kw = {**KW, "settings": OptimizerSettings(max_radius=None, search="grid")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shared = cm_dimension(model, anchors, labels, **kw)
        alone = cm_dimension(model, anchors, labels, chunk_size=1, **kw)
    blown = shared.nonfinite.any(-1)  # [T, A]
    assert bool(blown.any()) and bool((~blown & (shared.anchor_index >= 0)).any())
    assert torch.equal(shared.nonfinite, alone.nonfinite)
    assert torch.equal(shared.steps[~blown], alone.steps[~blown])
    torch.testing.assert_close(shared.scores[~blown], alone.scores[~blown], atol=1e-5, rtol=1e-4, equal_nan=True)
