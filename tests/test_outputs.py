"""Models as users write them: logits in a tuple, a dict or ``.logits``, a single binary logit, a
forward that takes a dict batch, a model that returns NaN. Each is measured like the plain model,
or gets an error that names the argument to pass."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cm_monitor import cm_dimension, default_output_transform, local_elasticity, relative_stability
from cm_monitor._model import ModelCallError, as_two_classes
from cm_monitor.synthetic import HalfSpace


def images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))


class ModelOutput(OrderedDict):
    """Like HuggingFace's ModelOutput: a dict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


class Returns(nn.Module):
    def __init__(self, inner, wrap):
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, x):
        return self.wrap(self.inner(x))


WRAPS = {
    "tuple": lambda z: (z, z.detach() * 0),
    "list": lambda z: [z],
    "dict": lambda z: {"loss": None, "logits": z},
    "attribute": lambda z: SimpleNamespace(logits=z, hidden_states=None),
    "model_output": lambda z: ModelOutput(logits=z),
}

MEASURE = {
    "cm_dimension": lambda m, x, y, **kw: cm_dimension(m, x, y, dims=[1, 8, 64], max_steps=15, num_bootstrap=0, **kw),
    "relative_stability": lambda m, x, y, **kw: relative_stability(m, x, delta=0.6, num_bootstrap=0, **kw),
    "local_elasticity": lambda m, x, y, **kw: local_elasticity(m, x, y, cluster=False, **kw),
}


def values(est):
    if hasattr(est, "scores"):
        return est.scores
    if hasattr(est, "similarity"):
        return est.similarity
    return torch.tensor([est.rf, est.df, est.gf])


def test_default_output_transform():
    z = torch.randn(4, 3)
    for wrap in WRAPS.values():
        assert default_output_transform(wrap(z)) is z
    with pytest.raises(TypeError, match=r"keys \['scores'\] and no tensor under 'logits'.*`output_transform=`"):
        default_output_transform({"scores": z})
    with pytest.raises(TypeError, match=r"returned a str.*`output_transform=`"):
        default_output_transform("logits")


@pytest.mark.parametrize("measure", list(MEASURE))
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_logits_inside_containers_are_measured_like_the_plain_model(measure, wrap):
    x, y = images()
    inner = net()
    plain = MEASURE[measure](inner, x, y)
    wrapped = MEASURE[measure](Returns(inner, WRAPS[wrap]), x, y)
    torch.testing.assert_close(values(plain), values(wrapped), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("measure", list(MEASURE))
def test_an_output_transform_picks_the_logits(measure):
    x, y = images()
    inner = net()
    model = Returns(inner, lambda z: {"scores": z})
    with pytest.raises(TypeError, match=r"no tensor under 'logits'.*pass `output_transform=`"):
        MEASURE[measure](model, x, y)
    picked = MEASURE[measure](model, x, y, output_transform=lambda out: out["scores"])
    torch.testing.assert_close(values(picked), values(MEASURE[measure](inner, x, y)), rtol=0, atol=0, equal_nan=True)


def test_an_output_transform_that_fails_is_named():
    x, y = images()
    model = Returns(net(), lambda z: {"scores": z})
    with pytest.raises(ModelCallError, match=r"`output_transform` could not read the output.*KeyError"):
        relative_stability(model, x, delta=0.6, output_transform=lambda out: out["logits"], num_bootstrap=0)
    with pytest.raises(TypeError, match=r"`output_transform` must be None or a function"):
        cm_dimension(model, x, y, output_transform="scores")


@pytest.mark.parametrize("measure", list(MEASURE))
def test_a_single_logit_is_two_classes_zero_and_z(measure):
    """A binary classifier returning z [N, 1] is measured exactly as one returning [0, z] (softmax:
    class 1 has probability sigmoid(z))."""
    x, _ = images()
    two = HalfSpace(64)
    one = nn.Sequential(nn.Flatten(), two.linear)  # the same weights, one logit
    y = two(x).argmax(1)
    y[:2] = torch.tensor([0, 1])  # both classes among the labels
    a, b = MEASURE[measure](two, x, y), MEASURE[measure](one, x, y)
    torch.testing.assert_close(values(a), values(b), rtol=0, atol=0, equal_nan=True)
    z = torch.randn(5, 1)
    torch.testing.assert_close(as_two_classes(z).softmax(1)[:, 1], torch.sigmoid(z[:, 0]))


def test_relative_stability_of_a_tuple_output_model_is_not_a_type_error():
    """It used to fail with `unsupported operand type(s) for +: 'int' and 'tuple'`."""
    x, _ = images()
    est = relative_stability(Returns(net(), lambda z: (z, "aux")), x, delta=0.6, num_bootstrap=0)
    assert est.rf > 0


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x):
        return self.linear(x.flatten(1)) * torch.nan


def test_elasticity_of_a_model_that_outputs_nan_says_so():
    x, y = images()
    with pytest.warns(RuntimeWarning, match=r"the model produced NaN/inf logits at 12 of the 12 inputs"):
        est = local_elasticity(NaNModel(), x, y)
    assert torch.isnan(est.similarity).all() and torch.isnan(est.kernel).all()
    assert all(v != v for v in (est.ratio, est.intra, est.inter, est.cluster_ari))
    assert est.baseline_similarity is not None  # the input-space baseline does not need the model


class TakesDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, batch):
        return self.net(batch["image"])


@pytest.mark.parametrize("measure", list(MEASURE))
def test_a_forward_that_takes_a_dict_batch_gets_an_error_that_says_what_to_do(measure):
    x, y = images()
    with pytest.raises(ModelCallError, match=r"`model` raised IndexError when called on a tensor batch.*only argument"):
        MEASURE[measure](TakesDict(), x, y)


# ------------------------------------------------------------------ the monitors

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn.datasets")


def monitors(**kwargs):
    from test_callback import FAST
    from test_monitors import DIFFEO_FAST, ELASTIC_FAST

    from cm_monitor import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor

    cm = {**FAST, "num_pairs": 0, "max_classes": 3, "dims": [1, 64], "max_steps": 20}
    return [
        CMDimensionMonitor(**cm, **kwargs),
        DiffeoStabilityMonitor(**DIFFEO_FAST, **kwargs),
        ElasticityMonitor(**{**ELASTIC_FAST, "num_anchors": 2}, **kwargs),
    ]


class Module(pl.LightningModule):
    """A digits CNN whose forward returns ``wrap(logits)`` or, with ``dict_batch``, takes a dict."""

    def __init__(self, wrap=lambda z: z, dict_batch=False, single_logit=False):
        super().__init__()
        classes = 1 if single_logit else 10
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))
        self.wrap, self.dict_batch, self.single_logit = wrap, dict_batch, single_logit

    def forward(self, x):
        return self.wrap(self.net(x["image"] if self.dict_batch else x))

    def _loss(self, batch):
        x, y = (batch, batch["label"]) if self.dict_batch else batch
        out = self(x)
        z = out["scores"] if isinstance(out, dict) and "scores" in out else default_output_transform(out)
        if self.single_logit:
            return nn.functional.binary_cross_entropy_with_logits(z[:, 0], (y % 2).float())
        return nn.functional.cross_entropy(z, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def fit(tmp_path, module, callbacks, dict_batch=False, parity=False):
    from test_callback import loaders, trainer

    train, val = loaders(num_val=100, dict_keys=("image", "label") if dict_batch else None)
    if parity:  # a binary task: even and odd digits
        for loader in (train, val):
            loader.dataset.tensors = (loader.dataset.tensors[0], loader.dataset.tensors[1] % 2)
    t = trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, train, val)
    return t


def test_monitors_measure_a_module_whose_forward_returns_a_tuple(tmp_path):
    t = fit(tmp_path, Module(wrap=lambda z: (z, z.mean())), monitors())
    for key in ("cm/dim", "diffeo/rf", "elasticity/ratio"):
        assert key in t.callback_metrics, key


def test_monitors_take_an_output_transform(tmp_path):
    t = fit(tmp_path, Module(wrap=lambda z: {"scores": z}), monitors(output_transform=lambda out: out["scores"]))
    for key in ("cm/dim", "diffeo/rf", "elasticity/ratio"):
        assert key in t.callback_metrics, key


def test_monitors_measure_a_single_logit_binary_classifier(tmp_path):
    t = fit(tmp_path, Module(single_logit=True), monitors(), parity=True)
    for key in ("cm/dim_class_0", "cm/dim_class_1", "diffeo/rf", "elasticity/ratio"):
        assert key in t.callback_metrics, key


@pytest.mark.parametrize("cls", [0, 1, 2])
def test_a_module_whose_forward_takes_a_dict_batch_is_told_to_pass_get_model(tmp_path, cls):
    monitor = monitors()[cls]
    with pytest.raises(TypeError, match=r"raised IndexError when called on a tensor batch.*pass `get_model=`"):
        fit(tmp_path, Module(dict_batch=True), [monitor], dict_batch=True)


def test_get_model_measures_the_network_inside_a_dict_batch_module(tmp_path):
    t = fit(tmp_path, Module(dict_batch=True), monitors(get_model=lambda m: m.net), dict_batch=True)
    for key in ("cm/dim", "diffeo/rf", "elasticity/ratio"):
        assert key in t.callback_metrics, key
