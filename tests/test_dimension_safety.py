"""The estimator must leave the model, the RNG and autograd state exactly as it found them."""

import pytest
import torch
from torch import nn

from cm_monitor import OptimizerSettings, boundary_dimension, cm_dimension
from cm_monitor.synthetic import Tube

KW = dict(dims=[1, 8, 32, 64], max_steps=30, num_bootstrap=20, threshold=0.5)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


def data(n=9):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 64, generator=g), torch.arange(n) % 3


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def test_model_state_is_bit_identical_and_modes_restored():
    model = bn_model()
    model.train()
    model[3].eval()  # a submodule in another mode than its parent must keep it
    model[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    # gradients mid-accumulation must be left alone
    model[4].weight.grad = torch.full_like(model[4].weight, 0.25)
    before = snapshot(model)
    grad_before = model[4].weight.grad.clone()
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]

    cm_dimension(model, *data(), **KW)
    boundary_dimension(model, *data(), **KW)

    after = snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # BN running stats and num_batches_tracked too
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[4].weight.grad, grad_before)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "4.weight")


def test_global_rng_is_untouched():
    model = bn_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    cm_dimension(model, *data(), **KW)
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_result_other_seed_other_planes():
    model = bn_model()
    # below D (the whole space is the same plane for every seed) and at T = 1 (calibrating this
    # untrained net makes every probability 1/3 wherever the plane goes)
    kw = KW | {"dims": [1, 8, 32], "settings": OptimizerSettings(temperature=1.0)}
    a = cm_dimension(model, *data(), generator=7, **kw)
    b = cm_dimension(model, *data(), generator=torch.Generator().manual_seed(7), **kw)
    c = cm_dimension(model, *data(), generator=8, **kw)
    assert torch.equal(a.scores.nan_to_num(-1), b.scores.nan_to_num(-1))
    torch.testing.assert_close(a.cutting_dim_std, b.cutting_dim_std, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(a.scores.nan_to_num(-1), c.scores.nan_to_num(-1))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    model = Tube(64, 16)
    anchors = model.sample_outside(4)
    labels = torch.zeros(4, dtype=torch.long)
    kw = dict(classes=[1], dims=[40, 48, 56])
    plain = cm_dimension(model, anchors, labels, **kw)
    with context():
        inner_anchors = anchors.clone()  # an inference tensor under inference_mode
        inside = cm_dimension(model, inner_anchors, labels, **kw)
        assert torch.is_inference_mode_enabled() == (context is torch.inference_mode)
    assert torch.equal(plain.scores.nan_to_num(-1), inside.scores.nan_to_num(-1))


def test_a_callers_autocast_does_not_reach_the_measurement():
    """Inside ``torch.autocast`` the model still runs in float32: the same scores to the bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(dims=[2, 8, 16], num_bootstrap=0, settings=OptimizerSettings(search="grid"))
    plain = cm_dimension(model, x, torch.arange(9) % 3, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cm_dimension(model, x, torch.arange(9) % 3, **kw)
        assert model(x).dtype == torch.bfloat16  # autocast is on again after the measurement
    assert torch.equal(plain.scores.nan_to_num(-1), inside.scores.nan_to_num(-1))


class SeesCudnnAutotuning(nn.Module):
    """Records ``torch.backends.cudnn.benchmark`` at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.seen = nn.Linear(16, 3), []

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.benchmark)
        return self.linear(x)


def test_cudnn_autotuning_is_off_inside_a_measurement_and_restored(monkeypatch):
    # Trainer(benchmark=True) sets it; the pool's changing pass sizes would re-tune every convolution
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = SeesCudnnAutotuning()
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    cm_dimension(model, x, torch.arange(9) % 3, dims=[2, 8], num_bootstrap=0)
    assert model.seen and not any(model.seen)
    assert torch.backends.cudnn.benchmark is True
    model(x)
    assert model.seen[-1] is True  # the caller's setting outside


def test_model_made_in_inference_mode_gives_a_clear_error():
    with torch.inference_mode():
        model = nn.Linear(64, 3)
    with pytest.raises(RuntimeError, match="inference tensors"):
        cm_dimension(model, *data(), **KW)


def test_runs_on_the_models_dtype():
    model = Tube(64, 16).double()
    anchors = model.sample_outside(4).double()
    est = cm_dimension(model, anchors, torch.zeros(4, dtype=torch.long), classes=[1], dims=[40, 56])
    assert est.probed.any() and torch.isfinite(est.scores[est.probed]).all()  # (a bisection skips some points)


@pytest.mark.gpu
def test_runs_on_the_models_device():
    from cm_monitor import OptimizerSettings

    model = Tube(64, 16).cuda()
    anchors = model.sample_outside(4).cpu()  # anchors elsewhere are moved to the model's device
    unbounded = OptimizerSettings(max_radius=None, temperature=1.0)
    est = cm_dimension(model, anchors, torch.zeros(4, dtype=torch.long), classes=[1], settings=unbounded)
    assert abs(float(est.dimension[0]) - 16) <= 5


@pytest.mark.gpu
@pytest.mark.parametrize("planes", ["dense", "structured"])
@pytest.mark.parametrize("search", ["grid", "bisect"])
def test_cuda_gives_the_cpu_answer(planes, search):
    """The work pool, both plane families and both searches on CUDA: the CPU's d* within one grid step."""
    from cm_monitor import OptimizerSettings
    from cm_monitor.cost import available_bytes

    settings = OptimizerSettings(max_radius=None, temperature=1.0, planes=planes, search=search)
    model = Tube(1024, 64)
    anchors = model.sample_outside(6)
    kw = dict(classes=[1], dims=[512, 768, 896, 960, 992, 1024], settings=settings)
    cpu = cm_dimension(model, anchors, torch.zeros(6, dtype=torch.long), **kw)
    gpu = cm_dimension(model.cuda(), anchors, torch.zeros(6, dtype=torch.long), **kw)
    ratio = float(gpu.cutting_dim[0]) / float(cpu.cutting_dim[0])
    assert 960 / 1024 <= ratio <= 1024 / 960
    # a tube of dimension 64 (the CPU reads 48.1: one anchor that succeeds at 992 or not moves it)
    assert 16 <= float(gpu.dimension[0]) <= 128
    assert available_bytes(torch.device("cuda")) > 0


def test_cost_estimate_counts_passes_and_leaves_the_model_alone():
    from cm_monitor.cost import estimate_cost

    model = bn_model()
    model.train()
    before = snapshot(model)
    est = estimate_cost(model, data()[0], problems=5000, per_pass=2048, max_steps=99)
    assert est.passes == 3 * 100 and est.problems == 5000
    assert est.seconds == pytest.approx(est.passes * est.seconds_per_pass) and est.seconds_per_pass > 0
    assert "at most" in str(est)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="problems"):
        estimate_cost(model, data()[0], problems=0, per_pass=8, max_steps=1)


def test_cost_of_a_bisection_counts_its_rounds_of_one_problem_per_group():
    """A cold bisection runs one problem per group at a time, several rounds in a row: the bound counts
    passes of one row per group, timed at that size (true also when a pass costs the same whatever its
    rows), while the pool's rows (memory) stay those of every problem at once."""
    from cm_monitor.cost import estimate_cost

    model = bn_model()
    est = estimate_cost(model, data()[0], problems=60, per_pass=2048, max_steps=9, rounds=6)  # 10 groups
    assert (est.rows_per_pass, est.timed_rows, est.passes) == (60, 10, 6 * 10)
    assert est.seconds == pytest.approx(est.passes * est.seconds_per_pass) and "passes of 10 rows" in str(est)
    narrow = estimate_cost(model, data()[0], problems=60, per_pass=4, max_steps=9, rounds=6)  # 3 passes a round
    assert (narrow.rows_per_pass, narrow.timed_rows, narrow.passes) == (4, 4, 6 * 3 * 10)
    grid = estimate_cost(model, data()[0], problems=60, per_pass=2048, max_steps=9)
    assert (grid.timed_rows, grid.passes) == (60, 10)
    # a warm start runs two problems per group in its first rounds: passes timed at 20 rows
    warm = estimate_cost(model, data()[0], problems=90, per_pass=2048, max_steps=9, rounds=7, in_flight=20)
    assert (warm.timed_rows, warm.passes) == (20, 7 * 10)
    with pytest.raises(ValueError, match="rounds"):
        estimate_cost(model, data()[0], problems=6, per_pass=8, max_steps=1, rounds=0)
    with pytest.raises(ValueError, match="in_flight"):
        estimate_cost(model, data()[0], problems=6, per_pass=8, max_steps=1, in_flight=0)


def test_passes_hold_what_the_planes_memory_bound_allows():
    from cm_monitor import OptimizerSettings, default_dims
    from cm_monitor.cutting import MAX_BASIS_ELEMENTS, MAX_PROBLEM_ELEMENTS, rows_per_pass

    small = default_dims(64)
    assert rows_per_pass(64, small, OptimizerSettings(), 2048) == 2048  # chunk_size bounds
    assert rows_per_pass(256, [1, 256], OptimizerSettings(), 10_000) == MAX_BASIS_ELEMENTS // 256**2  # dense bases
    D = 3 * 224 * 224
    rows = rows_per_pass(D, default_dims(D), OptimizerSettings(), 2048)  # structured planes: rows × D bounded
    assert rows == MAX_PROBLEM_ELEMENTS // D == 111


@pytest.mark.gpu
def test_free_cuda_memory_counts_the_allocators_cache():
    from cm_monitor.cost import available_bytes

    block = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB, then back to the cache
    del block
    free, device = torch.cuda.mem_get_info()[0], torch.device("cuda")
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= 2**28 and available_bytes(device) >= free + 2**28


def test_the_calibration_forward_is_chunked_too():
    """The anchors' logits (for the temperature) come in passes of at most ``chunk_size`` inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    kw = dict(dims=[2, 8, 16], num_bootstrap=0, classes=[0])
    whole = cm_dimension(model, x, torch.arange(12) % 3, **kw)
    assert sizes[0] == 12
    sizes.clear()
    calib = (x[:10], torch.arange(10) % 3)
    chunked = cm_dimension(model, x, torch.arange(12) % 3, chunk_size=5, calibration=calib, **kw)
    assert max(sizes) <= 5 and sizes[:5] == [5, 5, 2, 5, 5]  # the anchors, then the calibration set
    assert whole.temperature != chunked.temperature  # (another calibration set: a control)
    again = cm_dimension(model, x, torch.arange(12) % 3, chunk_size=5, **kw)
    assert again.temperature == pytest.approx(whole.temperature, rel=1e-12)
    torch.testing.assert_close(again.scores, whole.scores, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_measured_in_their_precision(dtype):
    """A model trained with ``precision="16-true"``/``"bf16-true"`` keeps half weights: the plane
    points are cast to them, the bookkeeping stays float32, and the answer is the float32 one to
    within a grid step (bfloat16 keeps 8 bits of mantissa)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    settings = OptimizerSettings(temperature=1.0, max_radius=None)
    kw = dict(dims=[2, 4, 8, 16], num_bootstrap=0, settings=settings, threshold=0.7)
    full = cm_dimension(net, x, torch.arange(12) % 3, **kw)
    half = cm_dimension(net.to(dtype), x, torch.arange(12) % 3, **kw)
    assert next(net.parameters()).dtype == dtype  # left in its precision
    assert half.scores.dtype == torch.float32 and torch.isfinite(full.cutting_dim).all()
    ratio = half.cutting_dim / full.cutting_dim
    assert ((ratio >= 0.5) & (ratio <= 2.0)).all()  # the grid's step is a factor 2


def test_float64_losses_beyond_float32s_range_are_finite():
    """A float64 model whose loss exceeds float32's largest number (3.4e38) is not NaN/inf: the
    finiteness test runs in the model's dtype, before the loss is kept in float32."""

    class Huge(nn.Module):
        def forward(self, x):
            z = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([z * 0, z * 0 + 1e39], 1)  # class 0 has probability exp(-1e39)

    anchors = torch.randn(4, 8, dtype=torch.float64)
    unbounded = OptimizerSettings(max_radius=None, temperature=1.0, max_steps=3)
    est = cm_dimension(Huge(), anchors, torch.ones(4, dtype=torch.long), classes=[0], dims=[4, 8], settings=unbounded)
    assert est.probed.any() and not est.nonfinite.any()
