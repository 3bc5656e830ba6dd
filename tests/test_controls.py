"""Controls on real networks (methods.md section 4): does the default CM measurement track quality?

A digits MLP measured at initialization, trained, trained on shuffled labels, and with its logits
multiplied by constants. The orderings are asserted with margins taken from the estimates' own
bootstrap uncertainties, not from fixed numbers.
"""

import math

import pytest
import torch
from torch import nn

from cm_monitor import REFERENCE_SETTINGS, OptimizerSettings, cm_dimension
from cm_monitor.synthetic import ScaledLogits


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def _fit(model, X, y, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def _accuracy(model, X, y):
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def controls():
    """Anchors (16 per class, from held-out data) and the control models."""
    Xtr, ytr, Xte, yte = _digits()
    anchors = torch.cat([Xte[yte == c][:16] for c in range(10)])
    labels = torch.cat([yte[yte == c][:16] for c in range(10)])
    init = _mlp(0).eval()
    trained = _fit(_mlp(0), Xtr, ytr, 300)
    # memorizes 500 examples whose labels were shuffled: chance on held-out data
    shuffled_y = ytr[:500][torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    shuffled = _fit(_mlp(0), Xtr[:500], shuffled_y, 1500)
    assert _accuracy(trained, Xte, yte) > 0.9
    assert _accuracy(shuffled, Xtr[:500], shuffled_y) > 0.9 and _accuracy(shuffled, Xte, yte) < 0.25
    return anchors, labels, {"init": init, "trained": trained, "shuffled": shuffled}


def measure(model, anchors, labels, **kw):
    return cm_dimension(model, anchors, labels, anchors_per_target=6, num_bootstrap=100, generator=1, **kw)


def margin(*estimates):
    """Three combined standard deviations (a target without one counts as zero spread)."""
    var = sum(0.0 if math.isnan(e.mean_dimension_std) else e.mean_dimension_std**2 for e in estimates)
    return 3 * math.sqrt(var)


def mean_dim(est):
    """The monitor's ``cm/dim``: a class never reached counts as dimension 0."""
    return float(est.dimension.nan_to_num(0.0).mean())


@pytest.fixture(scope="module")
def measured(controls):
    anchors, labels, models = controls
    return {name: measure(m, anchors, labels) for name, m in models.items()}


def test_trained_scores_above_initialization(measured):
    trained, init = measured["trained"], measured["init"]
    assert mean_dim(trained) > mean_dim(init) + margin(trained, init) + 5
    assert not bool(trained.saturated.any())  # the value resolves differences: not at the grid's floor


def test_shuffled_labels_score_clearly_below_trained(measured):
    trained, shuffled = measured["trained"], measured["shuffled"]
    assert mean_dim(trained) > mean_dim(shuffled) + margin(trained, shuffled) + 5
    # the memorizing model is no better than chance on the anchors: its calibrated temperature is
    # far above the trained model's, and its probabilities are about uniform near the data
    assert shuffled.temperature > 10 * trained.temperature


@pytest.mark.parametrize("factor", [0.3, 30.0])
def test_logit_scale_leaves_the_dimension_unchanged(controls, measured, factor):
    anchors, labels, models = controls
    base = measured["trained"]
    scaled = measure(ScaledLogits(models["trained"], factor), anchors, labels)
    assert scaled.temperature == pytest.approx(factor * base.temperature, rel=1e-3)
    assert abs(mean_dim(scaled) - mean_dim(base)) <= max(margin(scaled, base), 0.5)


def test_the_reference_settings_follow_logit_scale(controls):
    """The control the defaults fix: raw probabilities at the reference settings move with the logits' scale."""
    anchors, labels, models = controls
    kw = dict(classes=[0, 1, 2], dims=[1, 4, 16, 64], settings=REFERENCE_SETTINGS)
    plain = measure(models["init"], anchors, labels, **kw)
    scaled = measure(ScaledLogits(models["init"], 30.0), anchors, labels, **kw)
    assert mean_dim(scaled) > mean_dim(plain) + margin(scaled, plain) + 2


def test_successes_are_local(measured):
    loc = measured["trained"].locality()
    assert loc["distance_p90"] <= OptimizerSettings().max_radius + 1e-4  # never beyond the radius
    assert 0 <= loc["outside_frac"] <= 1


def _spearman(a, b):
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_rank_correlation_with_accuracy_over_epochs_is_positive(controls):
    """Control (d): one run, minibatch Adam, measured at several epochs (benchmarks/cm_controls.py
    reports +0.82 over nine epochs on this setting)."""
    import copy

    anchors, labels, _ = controls
    Xtr, ytr, Xte, yte = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    kept = {0: copy.deepcopy(model).eval()}
    for epoch in range(1, 21):
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        if epoch in (1, 3, 8, 20):
            kept[epoch] = copy.deepcopy(model).eval()
    accs = [_accuracy(m, Xte, yte) for m in kept.values()]
    dims = [mean_dim(measure(m, anchors, labels)) for m in kept.values()]
    assert accs[-1] > accs[1] > accs[0] + 0.4  # the run does train
    assert dims[0] == 0.0 and dims[-1] > 0  # at initialization no class is reached
    assert _spearman(accs, dims) > 0, (accs, dims)
