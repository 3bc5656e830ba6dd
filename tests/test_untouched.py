"""A measurement leaves the model exactly as it found it, whatever its forward does.

Models whose forward updates buffers (a counter, quantization-aware training's observers) or draws
random numbers (a noise layer, MC dropout): after each core function their parameters and buffers
are bit-identical, the global random states unchanged, modes and ``.grad`` as they were; a model
with random numbers is measured as one fixed function (known answers below). The monitors leave
training bit-identical on the same models.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from odd_models import ODD, ClipsWeights
from torch import nn

from cm_monitor import cm_dimension, linear_baseline_similarity, local_elasticity, relative_stability
from cm_monitor import elasticity as elasticity_module

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization


def images(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


MEASURE = {
    "cm_dimension": lambda m, x, y: cm_dimension(
        m, x, y, classes=[0, 1], dims=[1, 8, 64], max_steps=15, num_bootstrap=0, anchors_per_target=2
    ),
    "relative_stability": lambda m, x, y: relative_stability(m, x, delta=0.6, num_bootstrap=0),
    "local_elasticity": lambda m, x, y: local_elasticity(m, x, y, cluster=False),
}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_state(before, model):
    after = state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k


def test_controls_these_forwards_do_change_buffers_or_draw_random_numbers():
    """Without the guard, one forward pass in eval mode changes the buffers or the global RNG."""
    x, _ = images()
    for name, factory in ODD.items():
        torch.manual_seed(0)
        model = factory().eval()
        before, rng = state(model), torch.get_rng_state()
        model(x)
        changed = any(not torch.equal(v, state(model)[k]) for k, v in before.items())
        drew = not torch.equal(rng, torch.get_rng_state())
        assert changed or drew, name


@pytest.mark.parametrize("model_name", list(ODD))
@pytest.mark.parametrize("measure", list(MEASURE))
@pytest.mark.filterwarnings("ignore:The SGD step is not in the linear regime")
def test_model_and_random_state_are_left_as_they_were(model_name, measure):
    torch.manual_seed(0)
    model = ODD[model_name]()
    model.train()
    model.net[0].eval() if hasattr(model, "net") else None  # a submodule in another mode keeps it
    modes = [m.training for m in model.modules()]
    before = state(model)
    x, y = images()
    torch.manual_seed(123)
    random.seed(5)
    rng, py_rng = torch.get_rng_state(), random.getstate()

    est = MEASURE[measure](model, x, y)

    assert_same_state(before, model)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    values = {
        "cm_dimension": lambda e: e.scores[e.probed],  # a bisection leaves the other grid points NaN
        "relative_stability": lambda e: torch.tensor([e.rf, e.df, e.gf]),
        "local_elasticity": lambda e: e.similarity,
    }[measure](est)
    assert bool(torch.isfinite(values).all()), (model_name, measure)


@pytest.mark.parametrize("measure", list(MEASURE))
def test_a_model_with_random_numbers_is_measured_as_one_fixed_function(measure):
    """Two measurements agree exactly; they do not depend on the global RNG's state."""
    torch.manual_seed(0)
    model = ODD["noise"]()
    x, y = images()
    torch.manual_seed(1)
    a = MEASURE[measure](model, x, y)
    torch.manual_seed(2)
    b = MEASURE[measure](model, x, y)
    assert (
        a == b
        if measure == "relative_stability"
        else torch.equal(*((e.scores.nan_to_num(-1) if measure == "cm_dimension" else e.similarity) for e in (a, b)))
    )


class NoisyLinear(nn.Module):
    """A linear softmax classifier plus Gaussian noise on its logits."""

    def __init__(self, d=5, c=3, sigma=1.0):
        super().__init__()
        self.linear, self.sigma = nn.Linear(d, c), sigma

    def forward(self, x):
        z = self.linear(x.flatten(1))
        return z + self.sigma * torch.randn_like(z)


def test_elasticity_of_a_noisy_linear_model_is_the_linear_closed_form():
    """The noise is the same before and after each step, so it cancels: S_rel is the linear
    baseline |<x, x'> + 1| / (|x|^2 + 1) exactly, as for the model without noise."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.arange(12) % 3
    torch.manual_seed(0)
    model = NoisyLinear().double()
    est = local_elasticity(model, x, y, lr=0.5, cluster=False)
    torch.testing.assert_close(est.similarity, linear_baseline_similarity(x), rtol=1e-9, atol=1e-9)


def test_relative_stability_of_a_model_with_output_noise_is_that_of_the_clean_model():
    """The clean, deformed and noisy images get the same noise draws, which cancel from D_f and G_f."""
    torch.manual_seed(0)
    clean = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4))

    class OutputNoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.clean = clean

        def forward(self, x):
            z = self.clean(x)
            return z + torch.randn_like(z)

    x, _ = images()
    for reps in (1, 3):
        a = relative_stability(clean, x, delta=0.6, num_deformations=reps, num_bootstrap=0)
        b = relative_stability(OutputNoise(), x, delta=0.6, num_deformations=reps, num_bootstrap=0)
        assert b.rf == pytest.approx(a.rf, rel=1e-5), reps


def test_elasticity_one_step_at_a_time_equals_the_batched_path(monkeypatch):
    """The path for models vmap cannot batch gives the batched path's result on a plain model."""
    x, y = images(12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    batched = local_elasticity(model, x.double(), y, cluster=False, chunk_size=5)
    monkeypatch.setattr(elasticity_module._Passes, "batched", False)
    looped = local_elasticity(model, x.double(), y, cluster=False, chunk_size=5)
    torch.testing.assert_close(looped.similarity, batched.similarity, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(looped.kernel, batched.kernel, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(looped.lr, batched.lr, rtol=1e-12, atol=0)


@pytest.mark.parametrize("measure", list(MEASURE))
def test_parameters_changed_in_place_by_the_forward_are_restored(measure):
    torch.manual_seed(0)
    model = ClipsWeights()
    with torch.no_grad():
        model.net[0].weight.mul_(10)  # outside the clipping range
    before = state(model)
    x, y = images()
    with pytest.warns(RuntimeWarning, match=r"changed parameters \['Conv2d.weight'\] in place.*restored"):
        MEASURE[measure](model, x, y)
    assert_same_state(before, model)


def test_parameters_changed_in_place_without_a_copy_is_an_error(monkeypatch):
    from cm_monitor import _model

    monkeypatch.setattr(_model, "PARAMETER_COPY_BYTES", 0)
    model = ClipsWeights()
    with torch.no_grad():
        model.net[0].weight.mul_(10)
    x, _ = images()
    with pytest.raises(RuntimeError, match=r"changed parameters \['Conv2d.weight'\].*PARAMETER_COPY_BYTES"):
        relative_stability(model, x, num_bootstrap=0)


def test_buffers_replaced_by_the_forward_are_put_back():
    class Replaces(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.register_buffer("seen", torch.zeros(3))

        def forward(self, x):
            self.seen = self.seen + 1  # a new tensor object, not an in-place change
            self.register_buffer("extra", torch.ones(1))  # and a new buffer
            return self.net(x)

    model = Replaces()
    seen, before = model.seen, state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: parameters untouched
        relative_stability(model, images()[0], delta=0.6, num_bootstrap=0)
    assert model.seen is seen and "extra" not in dict(model.named_buffers())
    assert_same_state(before, model)


# ------------------------------------------------------------------ the monitors, in training

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn.datasets")
from modules import NetModule  # noqa: E402


class OddModule(NetModule):
    def __init__(self, name: str):
        super().__init__(ODD[name](), lr=3e-3)


def fit_odd(tmp_path, name, callbacks):
    import lightning
    from test_callback import loaders, trainer

    lightning.seed_everything(0, verbose=False)
    module = OddModule(name)
    train, val = loaders(num_val=100)
    t = trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=5)
    t.fit(module, train, val)
    return module, t


def monitors():
    from test_callback import FAST
    from test_monitors import DIFFEO_FAST, ELASTIC_FAST

    from cm_monitor import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor

    return [
        CMDimensionMonitor(**{**FAST, "num_pairs": 0, "max_classes": 3, "dims": [1, 64], "max_steps": 20}),
        DiffeoStabilityMonitor(**DIFFEO_FAST),
        ElasticityMonitor(**{**ELASTIC_FAST, "num_anchors": 2}),
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(ODD))
def test_training_is_bit_identical_with_and_without_the_monitors(tmp_path, name):
    plain, t0 = fit_odd(tmp_path / "plain", name, [])
    watched, t1 = fit_odd(tmp_path / "watched", name, monitors())
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # buffers updated in the forward (observers, counters) included
    assert torch.equal(t0.callback_metrics["val_loss"], t1.callback_metrics["val_loss"])
    for key in ("cm/dim", "diffeo/rf", "elasticity/ratio"):
        assert key in t1.callback_metrics, key


def fit_with_workers(tmp_path, callbacks, persistent=True):
    """A fit whose validation loader has a worker process that persists across passes, and no sanity check."""
    import lightning
    from test_callback import loaders, trainer
    from torch.utils.data import DataLoader

    lightning.seed_everything(0, verbose=False)
    module = OddModule("mc_dropout")  # draws random numbers in the forward: any shift shows
    train, val = loaders(num_val=100)
    val = DataLoader(val.dataset, batch_size=50, num_workers=1, persistent_workers=persistent)
    t = trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=5, num_sanity_val_steps=0)
    t.fit(module, train, val)
    return module, t, torch.get_rng_state()


def test_anchors_are_read_without_taking_over_a_persistent_worker_pool():
    from torch.utils.data import DataLoader, TensorDataset

    from cm_monitor.anchors import OwnIterator, sample_anchors

    loader = DataLoader(
        TensorDataset(torch.randn(40, 3), torch.arange(40) % 4), batch_size=8, num_workers=1, persistent_workers=True
    )
    batches = OwnIterator(loader)
    try:
        sample = sample_anchors(batches, 2, generator=0)
    finally:
        batches.close()
    assert sample.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert loader._iterator is None  # the loader's own first pass is still to come, with its seed draw
    sum(1 for _ in loader)  # control: reading the loader itself keeps its iterator (and its seed) for later
    assert loader._iterator is not None
    loader._iterator._shutdown_workers()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_training_is_bit_identical_with_a_persistent_validation_worker(tmp_path):
    plain, t0, rng0 = fit_with_workers(tmp_path / "plain", [])
    watched, t1, rng1 = fit_with_workers(tmp_path / "watched", monitors())
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(rng0, rng1)  # the worker pool's seed was drawn where training draws it
    assert torch.equal(t0.callback_metrics["val_loss"], t1.callback_metrics["val_loss"])
    assert t1.callback_metrics["cm/measured"] == 1.0


def lazy_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))


def fit_lazy(tmp_path, callbacks):
    import lightning
    from test_callback import loaders, trainer

    lightning.seed_everything(0, verbose=False)
    module = NetModule(lazy_net(), lr=3e-3)
    train, val = loaders(num_val=100)
    t = trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=5, num_sanity_val_steps=0)
    t.fit(module, train, val)
    return module, t


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_a_model_with_lazy_modules_is_set_up_after_the_first_batch_and_trains_as_without(tmp_path):
    plain, _ = fit_lazy(tmp_path / "plain", [])
    watched, t1 = fit_lazy(tmp_path / "watched", monitors())
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # the lazy layer is initialized by training's forward, not by a monitor's
    for key in ("cm/measured", "diffeo/measured", "elasticity/measured"):
        assert t1.callback_metrics[key] == 1.0, key


def test_measuring_a_model_with_lazy_modules_asks_for_a_forward_first():
    from cm_monitor import cm_dimension

    model, x = lazy_net(), torch.randn(6, 1, 8, 8)
    with pytest.raises(ValueError, match=r"not initialized yet.*LazyLinear.*forward pass"):
        cm_dimension(model, x, torch.arange(6) % 3, num_bootstrap=0)
    from cm_monitor import local_elasticity

    with pytest.raises(ValueError, match=r"not initialized yet.*LazyLinear"):
        local_elasticity(model, x, torch.arange(6) % 3)
    with pytest.raises(ValueError, match=r"not initialized yet.*LazyLinear"):
        relative_stability(model, x, delta=0.5, num_bootstrap=0)
    model(x)  # control: initialized, it is measured
    assert cm_dimension(
        model, x, torch.arange(6) % 3, dims=[1, 64], num_bootstrap=0, max_steps=5
    ).cutting_dim.shape == (10,)


class LogsInForward(NetModule):
    """Logs a statistic of its activations in ``forward`` (a common pattern)."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), lr=3e-3)

    def forward(self, x):
        z = self.net(x)
        self.log("act_mean", z.detach().mean())
        return z


def fit_logging(tmp_path, callbacks):
    import lightning
    from test_callback import loaders, trainer

    lightning.seed_everything(0, verbose=False)
    module = LogsInForward()
    train, val = loaders(num_val=100)
    t = trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=3)
    t.fit(module, train, val)
    return t.callback_metrics, module


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_what_a_forward_logs_is_not_mixed_with_the_monitors_forwards(tmp_path):
    plain, _ = fit_logging(tmp_path / "plain", [])
    watched, module = fit_logging(tmp_path / "watched", monitors())  # ElasticityMonitor's vmap made this crash
    assert torch.equal(plain["act_mean"], watched["act_mean"])  # only the validation's own forwards
    for key in ("cm/measured", "diffeo/measured", "elasticity/measured"):
        assert watched[key] == 1.0, key
    assert "log" not in module.__dict__  # the method is back after the measurements


def test_logging_off_silences_only_inside_and_keeps_an_instance_attribute():
    from cm_monitor.callbacks.base import logging_off

    module = LogsInForward()
    calls = []
    module.log_dict = lambda *a, **k: calls.append(a)  # set on the instance by the user
    with logging_off(module):
        module.log("x", 1.0)
        module.log_dict({"x": 1.0})
    assert calls == [] and "log" not in module.__dict__
    module.log_dict({"y": 2.0})
    assert calls == [({"y": 2.0},)]


class ScaledLoader(torch.utils.data.DataLoader):
    """A DataLoader subclass whose own ``__iter__`` changes the batches."""

    def __iter__(self):
        for x, y in super().__iter__():
            yield 1000 * x, y


def test_a_loader_subclass_is_read_through_its_own_iter_without_keeping_its_workers():
    from torch.utils.data import TensorDataset

    from cm_monitor.anchors import OwnIterator, sample_anchors

    data = TensorDataset(torch.rand(40, 3), torch.arange(40) % 4)
    loader = ScaledLoader(data, batch_size=8, num_workers=1, persistent_workers=True)
    batches = OwnIterator(loader)
    try:
        sample = sample_anchors(batches, 2, generator=0)
    finally:
        batches.close()
    assert sample.inputs.abs().max() > 1  # through the subclass's __iter__ (inputs in [0, 1) times 1000)
    assert loader._iterator is None  # the worker pool that made is gone: the loader's first pass is to come


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_lazy_modules_that_the_forward_never_uses_leave_the_monitor_off_with_a_warning(tmp_path):
    import lightning
    from test_callback import FAST, loaders, trainer

    from cm_monitor import CMDimensionMonitor

    class Unused(NetModule):
        def __init__(self):
            super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), lr=1e-3)
            self.spare = nn.LazyLinear(4)  # never called

    lightning.seed_everything(0, verbose=False)
    monitor = CMDimensionMonitor(**FAST)
    train, val = loaders(num_val=100)
    t = trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"not initialized after the first training batch.*LazyLinear.*stays off"):
        t.fit(Unused(), train, val)
    assert monitor.anchors is None and not any(k.startswith("cm/") for k in t.callback_metrics)
    assert t.global_step == 2  # training went on


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is, counting compilations and calls."""

    def __init__(self) -> None:
        self.compiled, self.calls = 0, 0

    def __call__(self, graph_module, example_inputs):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


@pytest.mark.parametrize("name", sorted(MEASURE))
def test_a_compiled_model_is_measured_eagerly_and_stays_compiled(name):
    # the elasticity's vmap of grad made Dynamo skip the module's forward for good (training then
    # ran uncompiled: other weights in a fit); other measurements compiled graphs for their batch
    # sizes and used up Dynamo's recompile limit
    torch._dynamo.reset()
    backend = CountingBackend()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    compiled = torch.compile(net, backend=backend)
    x, y = images()
    batch = x[:8].requires_grad_()
    compiled(batch).sum().backward()  # a training step: one graph
    before = (backend.compiled, backend.calls)
    eager = MEASURE[name](net, x, y)
    measured = MEASURE[name](compiled, x, y)
    assert (backend.compiled, backend.calls) == before  # nothing compiled or run compiled inside
    for field in ("scores", "rf", "kernel"):  # measured as the plain module is
        if hasattr(eager, field):
            a, b = torch.as_tensor(getattr(eager, field)), torch.as_tensor(getattr(measured, field))
            assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)), field
    compiled(batch).sum().backward()  # the next training step still runs the compiled graph
    assert backend.calls == before[1] + 1 and backend.compiled == before[0]
    torch._dynamo.reset()


class CompiledNetModule(NetModule):
    """The LightningModule's network is ``torch.compile(net)`` with a counting backend."""

    def __init__(self, backend: CountingBackend):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
        super().__init__(torch.compile(net, backend=backend, dynamic=False), lr=3e-3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_fit_with_a_compiled_network_runs_the_same_compiled_graphs_with_the_monitors(tmp_path):
    import lightning
    from test_callback import loaders, trainer

    counts = []
    for callbacks in ([], monitors()):
        torch._dynamo.reset()
        backend = CountingBackend()
        lightning.seed_everything(0, verbose=False)
        train, val = loaders(num_val=100)
        trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=5).fit(CompiledNetModule(backend), train, val)
        counts.append((backend.compiled, backend.calls))
    torch._dynamo.reset()
    assert counts[0] == counts[1]  # every training and validation step compiled and run as without them
