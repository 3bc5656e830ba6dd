"""Maximum-entropy diffeomorphisms of images and the relative stability R_f.

Source: Petrini, Favero, Geiger, Wyart, *Relative stability toward diffeomorphisms indicates
performance in deep nets* (arXiv 2105.02468). See ``docs/diffeo.md``.

Conventions used throughout (ours, stated once): pixel coordinates of each axis are mapped to
``u ∈ [0, 1]`` (first pixel at 0, last at 1), the displacement field is in **pixels**, and a
``temperature`` is in the *pixel convention* of the authors' current code::

    τ_a(u, v) = sqrt(T) · Σ_{i, j >= 1, sqrt(i² + j²) < c + 1/2} ξ_ij^a / sqrt(i² + j²) · sin(iπu) sin(jπv)

for each axis ``a`` independently, with ``ξ ~ N(0, 1)``. The paper's unit-square convention is
``T_paper = T / n²`` (:func:`temperature_from_paper`). The user's main knob is the typical
displacement ``delta`` in pixels: the root-mean-square length of the displacement vector at the
image centre, computed exactly for the modes in use (:func:`displacement_for_temperature`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cm_monitor._model import (
    HALF_PRECISION,
    ModelLike,
    OutputTransform,
    as_members,
    check_float_inputs,
    logits_models,
    make_generator,
    measuring,
    model_device,
    model_float_dtype,
)
from cm_monitor._parts import check_part, check_shares, owned

# ---------------------------------------------------------------------------------------------
# Temperature and displacement


def _check_cutoff(cutoff: float) -> float:
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | float) or not cutoff >= 1:
        raise ValueError(f"`cutoff` must be a number >= 1 (the highest mode frequency), got {cutoff!r}.")
    return float(cutoff)


def _modes(cutoff: float) -> Tensor:
    """``[c, c]`` weights ``1 / sqrt(i² + j²)`` of the allowed modes (0 for the others)."""
    n = math.floor(cutoff + 0.5)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    r = (i[:, None] ** 2 + i[None, :] ** 2).sqrt()
    return torch.where(r < cutoff + 0.5, 1 / r, torch.zeros_like(r))


def displacement_for_temperature(temperature: float, cutoff: float = 3) -> float:
    """Exact root-mean-square length (pixels) of the displacement vector at the image centre.

    ``δ² = 2 T Σ sin²(iπ/2) sin²(jπ/2) / (i² + j²)`` over the allowed modes (both axes): at
    ``c = 3`` the sum is ``1/2 + 1/10 + 1/10 = 0.7``, so ``δ = sqrt(1.4 T)``, whatever the image size
    (``temperature`` is in the pixel convention).

    Example::

        >>> from cm_monitor.diffeo import displacement_for_temperature
        >>> round(displacement_for_temperature(1.0, cutoff=3) ** 2, 12)
        1.4
    """
    w = _modes(_check_cutoff(cutoff))
    i = torch.arange(1, w.shape[0] + 1, dtype=torch.float64)
    s = torch.sin(i * math.pi / 2) ** 2
    per_axis = float((w**2 * s[:, None] * s[None, :]).sum())
    return math.sqrt(2 * temperature * per_axis)


def temperature_for_displacement(delta: float, cutoff: float = 3) -> float:
    """The temperature (pixel convention) whose exact centre displacement is ``delta`` pixels.

    At ``c = 3``, ``T = δ² / 1.4`` for any image size; the paper's unit-square temperature of an
    ``n × n`` image is ``T / n²`` (``docs/diffeo.md`` has a table).

    Example::

        >>> from cm_monitor.diffeo import temperature_for_displacement
        >>> [round(temperature_for_displacement(d, cutoff=3), 4) for d in (0.5, 1.0, 2.0)]
        [0.1786, 0.7143, 2.8571]
    """
    return float(delta) ** 2 / displacement_for_temperature(1.0, cutoff) ** 2


def approximate_displacement(temperature: float, cutoff: float = 3) -> float:
    """The paper's large-``c`` formula ``δ ≈ sqrt(T) (0.28 ln c + 0.7)``, in pixels."""
    return math.sqrt(temperature) * (0.28 * math.log(_check_cutoff(cutoff)) + 0.7)


#: Centre displacement (pixels) of the smallest natural deformation, ``T_min``.
MIN_DISPLACEMENT = 0.5


def temperature_range(size: int, cutoff: float = 3) -> tuple[float, float]:
    """``(T_min, T_max)`` of natural deformations of an ``size × size`` image (pixel convention).

    ``T_min`` displaces the centre by exactly half a pixel (:data:`MIN_DISPLACEMENT`, with the exact
    :func:`temperature_for_displacement`, so ``delta=0.5`` is never clipped); the reference code's
    ``(0.5 / (0.28 ln c + 0.7))²`` uses the large-``c`` approximation and displaces the centre by
    0.59 pixel at ``c = 3``. ``T_max = (0.4 · size · c^-1.1)²`` is the reference's; many
    deformations fold there already (see ``docs/diffeo.md``). For non-square images pass the
    smaller side.
    """
    c = _check_cutoff(cutoff)
    return temperature_for_displacement(MIN_DISPLACEMENT, c), (0.4 * size * c ** (-1.1)) ** 2


def temperature_from_paper(temperature: float, size: int) -> float:
    """Convert a temperature of the paper's unit-square convention to the pixel convention.

    The paper (and an older version of the reference code) puts the coefficients in unit-square
    coordinates, ``C_ij ~ N(0, T_paper / (i² + j²))``, so the displacement in pixels is ``size``
    times larger: ``T = size² · T_paper``.

    Example::

        >>> from cm_monitor.diffeo import temperature_from_paper
        >>> temperature_from_paper(0.01, 32)  # 32 x 32 images (CIFAR-10)
        10.24
    """
    return temperature * size**2


# ---------------------------------------------------------------------------------------------
# Fields and deformations


def sample_coefficients(
    num: int,
    temperature: float,
    cutoff: float = 3,
    *,
    generator: torch.Generator | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random mode coefficients ``[num, 2, c, c]`` (already scaled by ``sqrt(T) / sqrt(i² + j²)``).

    Drawn on the CPU from ``generator`` (default seed 0), so the same seed gives the same
    deformations on every device.
    """
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"`temperature` must be a finite number >= 0, got {temperature!r}.")
    w = _modes(_check_cutoff(cutoff))
    xi = torch.randn(num, 2, *w.shape, generator=make_generator(generator), dtype=torch.float64)
    return (xi * w * math.sqrt(temperature)).to(dtype)


def _sine_basis(n: int, modes: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[modes, n]`` values ``sin(iπu)`` at the pixels, exactly 0 on the first and last pixel."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    i = torch.arange(1, modes + 1, dtype=torch.float64)
    s = torch.sin(math.pi * i[:, None] * u[None, :])
    s[:, 0] = 0
    s[:, -1] = 0
    return s.to(device=device, dtype=dtype)


def displacement_field(coefficients: Tensor, height: int, width: int) -> Tensor:
    """Displacement in pixels ``[N, 2, H, W]`` (rows, then columns) of the given coefficients."""
    if coefficients.dim() != 4 or coefficients.shape[1] != 2 or coefficients.shape[2] != coefficients.shape[3]:
        raise ValueError(f"`coefficients` has shape {tuple(coefficients.shape)}; expected [N, 2, c, c].")
    m = coefficients.shape[2]
    su = _sine_basis(height, m, coefficients.dtype, coefficients.device)
    sv = _sine_basis(width, m, coefficients.dtype, coefficients.device)
    return torch.einsum("nkij,ih,jw->nkhw", coefficients, su, sv)


#: The fold check evaluates at most this many displacement values (float64) at once: a few such
#: arrays are alive, so about 0.3 GiB at most, whatever the number of deformations (a 224 × 224
#: image has 1.6 million on the 4 × finer grid: 5 deformations per block).
FOLD_CHECK_ELEMENTS = 2**23


def min_jacobian_determinant(coefficients: Tensor, height: int, width: int, upsample: int = 4) -> Tensor:
    """``[N]`` smallest determinant of the map ``p -> p + τ(p)`` over the image, per deformation.

    Evaluated by finite differences on a grid ``upsample`` times finer than the pixels, in blocks
    of deformations of at most :data:`FOLD_CHECK_ELEMENTS` grid values. A deformation is a
    diffeomorphism (no fold-over) when it is positive.
    """
    rows, cols = upsample * (height - 1) + 1, upsample * (width - 1) + 1
    block = max(1, FOLD_CHECK_ELEMENTS // (2 * rows * cols))
    parts = [_min_determinant(c, height, width, rows, cols) for c in coefficients.split(block)]
    return torch.cat(parts) if parts else coefficients.new_zeros(0, dtype=torch.float64)


def _min_determinant(coefficients: Tensor, height: int, width: int, rows: int, cols: int) -> Tensor:
    """:func:`min_jacobian_determinant` of one block, on a grid of ``rows × cols`` points."""
    tau = displacement_field(coefficients.double(), rows, cols)
    d_r = torch.diff(tau, dim=2)[:, :, :, :-1] * (rows - 1) / (height - 1)  # d tau / d row (pixels)
    d_c = torch.diff(tau, dim=3)[:, :, :-1, :] * (cols - 1) / (width - 1)  # d tau / d column
    det = (1 + d_r[:, 0]) * (1 + d_c[:, 1]) - d_c[:, 0] * d_r[:, 1]
    return det.amin((1, 2))


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise a clear error unless ``images`` is a finite float batch ``[N, C, H, W]``."""
    check_float_inputs(images, name)
    if images.dim() != 4:
        raise ValueError(
            f"`{name}` has shape {tuple(images.shape)}; expected images [N, C, H, W] (a batch of "
            "N images with C channels, H rows and W columns). Deformations need 2-D images: "
            "reshape flat inputs, e.g. x.view(N, 1, 28, 28)."
        )
    if images.shape[2] < 3 or images.shape[3] < 3:
        raise ValueError(f"`{name}` has shape {tuple(images.shape)}; expected images of at least 3 × 3 pixels.")


def deform(images: Tensor, coefficients: Tensor) -> Tensor:
    """Apply the deformations of ``coefficients`` (one per image) to ``images`` ``[N, C, H, W]``.

    The deformed image at pixel ``p`` is the original sampled at ``p + τ(p)`` by bilinear
    interpolation, coordinates clamped to the image. The field vanishes on the border.

    Half-precision images (float16, bfloat16) are sampled in float32 and the result is cast back:
    the sampling grid holds coordinates normalized to ``[-1, 1]``, which bfloat16 resolves to
    0.22 pixel at 224 pixels, a fifth of a 1-pixel deformation (and CPU half ``grid_sample`` can
    return NaN). Other dtypes are sampled in their own.
    """
    check_images(images)
    n, _, h, w = images.shape
    if coefficients.shape[0] != n:
        raise ValueError(f"`coefficients` holds {coefficients.shape[0]} deformations for {n} images.")
    dtype = images.dtype
    if dtype in HALF_PRECISION:
        return deform(images.float(), coefficients).to(dtype)
    tau = displacement_field(coefficients.to(device=images.device, dtype=torch.float64), h, w)
    rows = torch.arange(h, dtype=torch.float64, device=images.device)[:, None] + tau[:, 0]
    cols = torch.arange(w, dtype=torch.float64, device=images.device)[None, :] + tau[:, 1]
    # grid_sample with align_corners=True maps -1 and 1 to the centres of the first and last pixel
    grid = torch.stack([2 * cols / (w - 1) - 1, 2 * rows / (h - 1) - 1], dim=-1).to(dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


# ---------------------------------------------------------------------------------------------
# Relative stability


@dataclass(frozen=True)
class StabilityEstimate:
    """Result of :func:`relative_stability`.

    Attributes:
        rf: relative stability ``R_f = D_f / G_f``.
        df: stability to deformations ``D_f`` (output change under deformation / typical distance).
        gf: stability to noise ``G_f`` (output change under noise of the same norm / typical distance).
        rf_std: bootstrap standard deviation of ``R_f`` over images (NaN without bootstrap).
        log10_rf, log10_rf_std: ``log10 R_f`` and its bootstrap standard deviation.
        temperature: the temperature used (pixel convention), after clipping.
        delta: the exact centre displacement in pixels of that temperature.
        cutoff, reduction: as passed.
        num_images, num_deformations: probe images and deformations per image.
        fold_fraction: fraction of the deformations used that fold over (not diffeomorphisms);
            more than 5 % gives a warning: use a smaller ``delta``.
        identity_rf: ``R_f`` of the identity map ``f(x) = x`` on the same images, deformations and
            noise, with the same reduction: 1 with ``"mean"`` (exactly, up to round-off); with
            ``"median"`` it shows how much the median alone moves ``R_f`` on these images (far
            below 1 on sparse images, see :func:`relative_stability`). NaN when the deformations
            change nothing (zero temperature).
        failed: the model returned NaN/inf; every value that depends on the model is then NaN (and a
            RuntimeWarning was issued).
        part: ``(index, count)`` for a partial estimate (``relative_stability(..., part=)``): only
            the images of that share were measured and the values are NaN until :meth:`merge`
            combines the shares; ``None``: a complete estimate.
    """

    rf: float
    df: float
    gf: float
    rf_std: float
    log10_rf: float
    log10_rf_std: float
    temperature: float
    delta: float
    cutoff: float
    reduction: str
    num_images: int
    num_deformations: int
    fold_fraction: float = 0.0
    identity_rf: float = math.nan
    failed: bool = False
    part: tuple[int, int] | None = None
    raw: _StabilityRaw | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def merge(parts: Sequence[StabilityEstimate]) -> StabilityEstimate:
        """The estimate of the whole measurement from its ``count`` shares (``part=(i, count)`` for every
        ``i``, any order): the model's outputs on each image come from the share that measured it,
        then the statistics are those of a measurement in one piece, which this equals."""
        if check_shares([p.part for p in parts], "estimates") == 1:
            return parts[0]
        return _statistics(_merge_raw(parts), stacklevel=3)

    def __repr__(self) -> str:
        """A one-line summary: ``R_f`` and ``log10 R_f`` ± std, ``D_f``, ``G_f``, the deformations, flags."""
        flag = ", failed (NaN/inf)" if self.failed else ""
        return (
            f"StabilityEstimate(rf={self.rf:.4g} ± {self.rf_std:.2g}, log10_rf={self.log10_rf:.3g} ± "
            f"{self.log10_rf_std:.2g}, df={self.df:.4g}, gf={self.gf:.4g}; {self.num_images} images × "
            f"{self.num_deformations} deformations, delta={self.delta:.3g} px (T={self.temperature:.3g}), "
            f"cutoff={self.cutoff:g}, reduction={self.reduction!r}, fold_fraction={self.fold_fraction:.2g}{flag})"
        )

    def as_dict(self) -> dict[str, float]:
        """The headline values as plain floats."""
        return {"rf": self.rf, "df": self.df, "gf": self.gf, "log10_rf": self.log10_rf}


OutputFn = Callable[[Tensor], Tensor]


def _output_fn(output: str | OutputFn) -> OutputFn:
    if callable(output):
        return output
    if output == "logits":
        return lambda out: out
    if output == "probabilities":
        return lambda out: out.float().softmax(dim=1)
    raise ValueError(f"`output` must be 'logits', 'probabilities' or a callable, got {output!r}.")


def resolve_temperature(size: int, delta: float | None, temperature: float | None, cutoff: float, clip: bool) -> float:
    """The temperature for ``delta`` pixels (or the given one), clipped into the natural range."""
    if (delta is None) == (temperature is None):
        raise ValueError("Pass exactly one of `delta` (pixels) and `temperature` (pixel convention).")
    if delta is not None:
        if not (isinstance(delta, int | float) and math.isfinite(delta) and delta >= 0):
            raise ValueError(f"`delta` must be a finite number of pixels >= 0, got {delta!r}.")
        temperature = temperature_for_displacement(delta, cutoff)
    assert temperature is not None
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"`temperature` must be a finite number >= 0, got {temperature!r}.")
    t_min, t_max = temperature_range(size, cutoff)
    if clip and temperature > 0 and not t_min <= temperature <= t_max:
        clipped = min(max(temperature, t_min), t_max)
        warnings.warn(
            f"Temperature {temperature:.4g} is outside the natural range [{t_min:.4g}, {t_max:.4g}] of "
            f"{size}-pixel images with cutoff {cutoff:g}; clipped to {clipped:.4g} (pass clip=False to keep it).",
            UserWarning,
            stacklevel=3,
        )
        temperature = clipped
    return float(temperature)


#: ``reduction="median"`` warns when it moves the identity map's ``R_f`` by more than this factor.
MEDIAN_BIAS_FACTOR = 2.0
#: A warning is issued when more than this fraction of the deformations fold over.
MAX_FOLD_FRACTION = 0.05


def fold_fraction_of(coefficients: Tensor, height: int, width: int) -> float:
    """Fraction of the deformations of ``coefficients`` that fold over (:func:`min_jacobian_determinant` <= 0)."""
    return float((min_jacobian_determinant(coefficients, height, width) <= 0).double().mean())


def _check_fold_fraction(value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1):
        raise ValueError(f"`fold_fraction` must be None or a fraction in [0, 1], got {value!r}.")


#: The words of the warning that the deformations fold (the monitor says it once per fit).
FOLD_WARNING = "of the deformations fold over"


def _warn_folds(fold_fraction: float, temperature: float, cutoff: float, h: int, w: int, stacklevel: int = 3) -> None:
    if fold_fraction > MAX_FOLD_FRACTION:
        warnings.warn(
            f"{fold_fraction:.0%} {FOLD_WARNING} at {displacement_for_temperature(temperature, cutoff):.2g} "
            f"pixels on {h} × {w} images: they are not diffeomorphisms. Use a smaller `delta`.",
            UserWarning,
            stacklevel=stacklevel,
        )


def _identity_rf(change: Tensor, eta: Tensor, reduction: str) -> float:
    """``R_f`` of ``f(x) = x`` from the input changes ``[M, D]`` (the pair denominators cancel).

    The median on the CPU: CUDA's has no deterministic implementation (``Trainer(deterministic=True)``
    would raise)."""
    if reduction == "mean":
        return float(change.pow(2).sum() / eta.pow(2).sum())
    change, eta = change.cpu(), eta.cpu()
    return float(change.pow(2).median(0).values.sum() / eta.pow(2).median(0).values.sum())


def _warn_median_bias(identity_rf: float, stacklevel: int = 3) -> None:
    if not math.isfinite(identity_rf) or 1 / MEDIAN_BIAS_FACTOR <= identity_rf <= MEDIAN_BIAS_FACTOR:
        return  # NaN: the deformations change nothing (zero temperature)
    warnings.warn(
        f"reduction='median' is biased by these images: the identity map f(x) = x gets R_f = {identity_rf:.2g} "
        "on them (same deformations and noise) instead of 1. In sparse images (a digit on a blank background) "
        "most pixels are background in most images, so the median over images of their squared change under a "
        "deformation is 0, while noise changes every pixel. Compare R_f with StabilityEstimate.identity_rf, or "
        "use reduction='mean' (the identity map then gets exactly 1).",
        UserWarning,
        stacklevel=stacklevel,
    )


def relative_stability(
    model: ModelLike,
    images: Tensor,
    *,
    delta: float | None = 1.0,
    temperature: float | None = None,
    cutoff: float = 3,
    num_deformations: int = 1,
    reduction: Literal["mean", "median"] = "mean",
    output: str | OutputFn = "logits",
    clip: bool = True,
    generator: torch.Generator | int | None = None,
    num_bootstrap: int = 200,
    chunk_size: int = 1024,
    fold_fraction: float | None = None,
    output_transform: OutputTransform | None = None,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
) -> StabilityEstimate:
    """Relative stability ``R_f`` of a model's output to small diffeomorphisms vs matched noise.

    For every probe image ``x`` and each of ``num_deformations`` random deformations ``τ``, noise
    ``η`` of exactly the norm of the deformation's change ``‖τx − x‖`` is drawn, and::

        D_f = ⟨‖f(τx) − f(x)‖²⟩ / ⟨‖f(x) − f(z)‖²⟩      G_f = ⟨‖f(x + η) − f(x)‖²⟩ / ⟨‖f(x) − f(z)‖²⟩

    with ``z`` another probe image; ``R_f = D_f / G_f``. ``⟨·⟩`` is the mean, or with
    ``reduction="median"`` the reference code's robust version (median per output component, then
    summed; median of pairwise squared distances in the denominator).

    Args:
        model: an ``nn.Module`` (or a list: the mean of the members' outputs) taking ``[N, C, H, W]``.
        images: ``[N, C, H, W]`` probe images, ``N >= 2``; any size, not only square.
        delta: typical displacement in pixels (exact centre RMS); default 1 pixel. It maps to the
            temperature ``temperature_for_displacement(delta, cutoff)``: ``T = δ² / 1.4`` at
            ``c = 3`` (``delta=1``: ``T = 0.714``), for any image size.
        temperature: alternatively the temperature, in the pixel convention of the authors'
            current code (``T = size² · T_paper`` for the paper's unit-square convention, see
            :func:`temperature_from_paper`); pass ``delta=None`` with it.
        cutoff: highest mode frequency ``c`` (default 3).
        num_deformations: deformations (and noise draws) per image.
        reduction: ``"mean"`` (default; the identity map gives exactly 1) or ``"median"``.
        output: what ``f`` is: ``"logits"`` (the model's logits, default), ``"probabilities"``
            (softmax), or a callable applied to the logits (after ``output_transform``).
        clip: clip the temperature into :func:`temperature_range` (smaller side), with a warning.
        generator: CPU ``torch.Generator`` or int seed (default 0) for deformations and noise.
        num_bootstrap: bootstrap resamples of the images for ``rf_std``.
        chunk_size: images per forward pass.
        fold_fraction: the fold fraction of these deformations, when it is already known: the
            fold check (:func:`min_jacobian_determinant` on a grid 4 × finer than the pixels, the
            costliest step for small models) is skipped and this value reported. The deformations
            depend only on ``generator`` (its seed or state), the number of images, ``num_deformations``,
            the temperature, ``cutoff`` and the image size, so the value of an earlier call with all
            of these equal is exact (:class:`~cm_monitor.DiffeoStabilityMonitor` does this).
            ``None`` (default): computed.
        output_transform: maps the model's output to its logits ``[N, C]`` before ``output`` is
            applied; default :func:`~cm_monitor.default_output_transform` (a tensor, the first
            element of a tuple, ``out["logits"]`` or ``out.logits``). A single logit ``[N, 1]`` is
            read as two classes ``[0, z]``.
        progress: called as ``progress(done, total)`` after each forward pass of ``chunk_size``
            images: passes done and their total (clean, deformed and noisy images). For a progress
            display; it must not raise.
        part: ``(index, count)``: run the model only on share ``index`` of ``count`` of the images
            (every ``count``-th; the deformations and noise are those of the whole measurement) and
            return a partial estimate; :meth:`StabilityEstimate.merge` combines the ``count``
            shares into the estimate of the whole. ``None``: the whole measurement.

    A model that draws random numbers in its forward (noise layers, MC dropout) draws the same ones
    for the clean, deformed and noisy images (every forward pass of the measurement starts from
    one seed, and the three are batched alike), so its own noise cancels from ``D_f`` and ``G_f``;
    the global random state is left as it was.

    Warns:
        UserWarning: when the temperature is clipped; when more than 5 % of the deformations fold
            over; with ``reduction="median"``, when the median moves the identity map's ``R_f`` by
            more than a factor 2 (``identity_rf`` outside ``[0.5, 2]``): on sparse images, such as
            MNIST digits on a blank background, the median of a pixel's squared change under a
            deformation is 0 for the many pixels that are background in most images, and the
            identity map gets ``R_f ≈ 0.1`` instead of 1.
        RuntimeWarning: when the model returns NaN/inf.
    """
    members = logits_models(as_members(model), output_transform)
    check_images(images)
    if images.shape[0] < 2:
        raise ValueError(
            f"`images` holds {images.shape[0]} image; expected at least 2 (the denominator compares pairs)."
        )
    for name, value, minimum in (
        ("num_deformations", num_deformations, 1),
        ("chunk_size", chunk_size, 1),
        ("num_bootstrap", num_bootstrap, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if reduction not in ("mean", "median"):
        raise ValueError(f"`reduction` must be 'mean' or 'median', got {reduction!r}.")
    _check_fold_fraction(fold_fraction)
    part = check_part(part)
    fn = _output_fn(output)
    cutoff = _check_cutoff(cutoff)
    n, _, h, w = images.shape
    temperature = resolve_temperature(min(h, w), delta, temperature, cutoff, clip)
    gen = make_generator(generator)

    device = model_device(members, images.device)
    dtype = model_float_dtype(members, images.dtype)
    x = images.detach().to(device=device, dtype=dtype)
    reps = num_deformations
    xr = x.repeat_interleave(reps, 0)  # [N·R, C, H, W]
    coeffs = sample_coefficients(n * reps, temperature, cutoff, generator=gen, dtype=torch.float64)
    z = torch.randn(xr.shape, generator=gen, dtype=torch.float64).to(device)
    boot_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    mine = owned(n, part).repeat_interleave(reps)  # this share's rows: its images' deformations
    folded = torch.full((n * reps,), math.nan, dtype=torch.float64)
    if fold_fraction is None and bool(mine.any()):
        folded[mine] = (min_jacobian_determinant(coeffs[mine], h, w) <= 0).double()

    passes = [0, 3 * math.ceil(int(mine.sum()) / chunk_size)]  # done, total (this share's images)

    def f(batch: Tensor) -> Tensor:
        outs = []
        for start in range(0, batch.shape[0], chunk_size):
            chunk = batch[start : start + chunk_size]
            out = sum(fn(m(chunk)) for m in members) / len(members)
            if not isinstance(out, Tensor) or out.shape[0] != chunk.shape[0]:
                raise ValueError(
                    f"The model's output (after `output`) must be a tensor [N, ...]; got {type(out).__name__} {getattr(out, 'shape', '')}."
                )
            outs.append(out.reshape(chunk.shape[0], -1).double())
            passes[0] += 1
            if progress is not None:
                progress(min(passes[0], passes[1]), passes[1])
        return torch.cat(outs)

    with measuring(members, grad=False):
        deformed = deform(xr, coeffs)  # every image's (no model: cheap), for identity_rf
        change = (deformed.double() - xr.double()).flatten(1)
        sigma = change.norm(dim=1)
        zf = z.flatten(1)
        eta = (zf / zf.norm(dim=1, keepdim=True) * sigma[:, None]).view_as(xr)
        noisy = (xr.double() + eta).to(dtype)
        identity_rf = _identity_rf(change, eta.flatten(1), reduction)
        # the clean images batched like the deformed and noisy ones: the same random numbers for each
        rows = mine.to(device)
        outputs = torch.stack([f(xr[rows]), f(deformed[rows]), f(noisy[rows])]) if bool(mine.any()) else None
    raw = _StabilityRaw(
        outputs=None if outputs is None else _expand_rows(outputs.cpu(), mine),
        folded=folded,
        known_folds=None if fold_fraction is None else float(fold_fraction),
        identity_rf=identity_rf,
        boot_seed=boot_seed,
        reps=reps,
        reduction=reduction,
        num_bootstrap=num_bootstrap,
        temperature=temperature,
        cutoff=cutoff,
        size=(h, w),
    )
    if part is None:
        return _statistics(raw, stacklevel=3)
    nan = math.nan
    return StabilityEstimate(
        *(nan,) * 6, temperature, displacement_for_temperature(temperature, cutoff), cutoff, reduction, n, reps,
        fold_fraction=nan, identity_rf=identity_rf, part=part, raw=raw,
    )  # fmt: skip


def _expand_rows(outputs: Tensor, mine: Tensor) -> Tensor:
    """``[3, N·R, F]`` from the rows ``mine`` (NaN in the other rows)."""
    full = torch.full((outputs.shape[0], mine.numel(), outputs.shape[2]), math.nan, dtype=outputs.dtype)
    full[:, mine] = outputs
    return full


@dataclass(frozen=True)
class _StabilityRaw:
    """What :func:`relative_stability` measured before its statistics: enough to merge shares."""

    outputs: Tensor | None  # [3, N·R, F]: f(x), f(τx), f(x + η) (NaN rows: another share's); None: no rows
    folded: Tensor  # [N·R] 1.0 where the deformation folds over, 0.0 where not, NaN where not checked
    known_folds: float | None  # the fold fraction passed in
    identity_rf: float
    boot_seed: int
    reps: int
    reduction: str
    num_bootstrap: int
    temperature: float
    cutoff: float
    size: tuple[int, int]


def _merge_raw(parts: Sequence[StabilityEstimate]) -> _StabilityRaw:
    """The raw outcome of the whole measurement from its shares (rows taken from their owners)."""
    raws = [p.raw for p in parts]
    if any(r is None for r in raws):
        raise ValueError("Only estimates of `relative_stability(..., part=)` can be merged.")
    first = raws[0]
    assert first is not None
    outs = [r.outputs for r in raws if r is not None and r.outputs is not None]
    if not outs:
        raise ValueError("None of the shares measured an image.")
    outputs, folded = outs[0].clone(), first.folded.clone()
    for p, r in zip(parts, raws, strict=True):
        assert r is not None and p.part is not None
        if (r.boot_seed, r.folded.numel(), r.reps) != (first.boot_seed, first.folded.numel(), first.reps):
            raise ValueError("The estimates to merge are shares of different measurements.")
        mine = owned(p.num_images, p.part).repeat_interleave(r.reps)
        if r.outputs is not None:
            outputs[:, mine] = r.outputs[:, mine]
        folded[mine] = r.folded[mine]
    return replace(first, outputs=outputs, folded=folded)


def _statistics(raw: _StabilityRaw, stacklevel: int) -> StabilityEstimate:
    """``R_f``, ``D_f``, ``G_f``, their bootstrap uncertainties and the checks, from the raw outcome."""
    assert raw.outputs is not None
    fxr, ftau, feta = raw.outputs
    reps, reduction, temperature, cutoff = raw.reps, raw.reduction, raw.temperature, raw.cutoff
    n = fxr.shape[0] // reps
    h, w = raw.size
    fold_fraction = raw.known_folds if raw.known_folds is not None else float(raw.folded.mean())
    _warn_folds(fold_fraction, temperature, cutoff, h, w, stacklevel + 1)
    if reduction == "median":
        _warn_median_bias(raw.identity_rf, stacklevel + 1)
    common = {
        "temperature": temperature,
        "delta": displacement_for_temperature(temperature, cutoff),
        "cutoff": cutoff,
        "reduction": reduction,
        "num_images": n,
        "num_deformations": reps,
        "fold_fraction": fold_fraction,
        "identity_rf": raw.identity_rf,
    }
    if not all(bool(torch.isfinite(t).all()) for t in (fxr, ftau, feta)):
        warnings.warn(
            "The model returned NaN/inf on the probe images or their deformed/noisy versions; "
            "R_f, D_f and G_f are reported as NaN (StabilityEstimate.failed).",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        nan = math.nan
        return StabilityEstimate(nan, nan, nan, nan, nan, nan, **common, failed=True)
    fx = fxr[::reps]
    d_sq = (ftau - fxr).pow(2)  # [N·R, F]
    g_sq = (feta - fxr).pow(2)
    pair = torch.cdist(fx, fx).pow(2)  # [N, N]

    pair.fill_diagonal_(0)  # x = z contributes nothing; the counts below exclude those pairs
    d_img = d_sq.sum(-1).view(n, reps).mean(-1)  # [N] mean over deformations of ‖f(τx) − f(x)‖²
    g_img = g_sq.sum(-1).view(n, reps).mean(-1)

    def ratios(img: Tensor) -> tuple[Tensor, Tensor]:
        """D_f and G_f for a (resampled) list of image indices ``[..., M]``."""
        if reduction == "mean":
            # with multiplicities c of the images in the list: means over rows and over pairs x != z
            c = torch.zeros(*img.shape[:-1], n, dtype=pair.dtype, device=img.device)
            c.scatter_add_(-1, img, torch.ones_like(img, dtype=pair.dtype))
            m = img.shape[-1]
            num_d, num_g = (c * d_img).sum(-1) / m, (c * g_img).sum(-1) / m
            pairs_sum = ((c @ pair) * c).sum(-1)
            den = pairs_sum / (m * m - c.pow(2).sum(-1)).clamp_min(1)
            return num_d / den, num_g / den
        rows = (img[..., :, None] * reps + torch.arange(reps, device=img.device)).flatten(-2)
        dn, gn = d_sq[rows], g_sq[rows]
        pairs = pair[img[..., :, None], img[..., None, :]]
        mask = img[..., :, None] != img[..., None, :]  # pairs x != z (a resample may repeat an image)
        num_d, num_g = dn.median(-2).values.sum(-1), gn.median(-2).values.sum(-1)
        den = torch.where(mask, pairs, math.nan).flatten(-2).nanmedian(-1).values
        return num_d / den, num_g / den

    idx = torch.arange(n, device=pair.device)
    df, gf = (float(v) for v in ratios(idx))
    rf = df / gf if gf > 0 else math.nan
    rf_std = log_std = math.nan
    if raw.num_bootstrap > 0:
        bgen = torch.Generator().manual_seed(raw.boot_seed)
        boot_idx = torch.randint(0, n, (raw.num_bootstrap, n), generator=bgen).to(pair.device)
        bd, bg = ratios(boot_idx)
        brf = (bd / bg)[torch.isfinite(bd / bg) & (bg > 0)]
        if brf.numel() > 1:
            rf_std = float(brf.std())
            log_std = float(brf.clamp_min(1e-300).log10().std())
    return StabilityEstimate(
        rf=rf,
        df=df,
        gf=gf,
        rf_std=rf_std,
        log10_rf=math.log10(rf) if rf > 0 else (-math.inf if rf == 0 else math.nan),
        log10_rf_std=log_std,
        **common,
    )
