"""Class-manifold and boundary dimension by cutting planes: the public estimators.

See ``docs/method.md`` for the method in a user's words and ``docs/api.md`` for every parameter.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor, nn

from cm_monitor._model import (
    ModelLike,
    OutputTransform,
    as_members,
    check_float_inputs,
    check_logits,
    explain_inference_tensors,
    logits_models,
    make_generator,
    measuring,
    model_device,
    model_float_dtype,
)
from cm_monitor._parts import check_part, check_shares, owned
from cm_monitor.calibration import calibrate_temperature
from cm_monitor.cutting import (
    CuttingOutcome,
    OptimizerSettings,
    PlaneSpace,
    data_scale,
    optimize_planes,
    resolve_search,
)
from cm_monitor.planes import check_dims, plane_seed

#: Targets listed by ``repr(DimensionEstimate)`` (the rest are counted).
_REPR_TARGETS = 20


@dataclass(frozen=True)
class DimensionEstimate:
    """Result of :func:`cm_dimension` or :func:`boundary_dimension`.

    Per target (a class for a class manifold, a tuple of classes for a boundary) it gives the
    cutting dimension ``d*`` (the plane dimension at which random planes through the anchors reach
    the target region), the effective dimension ``D - d*`` and its fraction of ``D``, with a
    bootstrap uncertainty over anchors. The raw per-problem outcomes are kept, so
    :meth:`at` re-reads everything at another threshold without optimizing again.

    Attributes:
        kind: ``"cm"`` or ``"boundary"``.
        input_dim: ``D``, the number of elements of one input.
        targets: the targets, in order: class ids (``"cm"``) or tuples of class ids (``"boundary"``).
        dims: ``[K]`` plane dimensions of the grid.
        threshold: success level of the score (target probability for ``"cm"``; for a boundary
            among ``k`` classes, ``k · min`` of their probabilities, so 0.8 means each ``>= 0.8/k``).
        scores: ``[T, A, K]`` best score reached per (target, anchor slot, d); NaN where the slot is
            unused (see ``anchor_index``) or the optimization produced NaN/inf.
        losses: ``[T, A, K]`` lowest cross-entropy reached.
        steps: ``[T, A, K]`` Adam steps taken.
        nonfinite: ``[T, A, K]`` True where a NaN/inf appeared during the optimization.
        anchor_index: ``[T, A]`` index into the anchors passed in for each slot, ``-1`` if unused.
        distance: ``[T, A, K]`` distance from the anchor, ``‖x - x0‖ / ‖x0‖`` (anchor norms), of the
            first point that reached the measurement's threshold (of the best point if none did).
        outside: ``[T, A, K]`` fraction of that point's elements outside the anchors' range (with
            ``clip=True``: the fraction that was clipped).
        temperature: ``T`` that divided the logits (calibrated on the anchors by default).
        readoff: ``"fraction"`` or ``"mean"``: what :attr:`curve` holds (see below).
        curve: ``[T, K]`` the curve ``d*`` is read from, monotone in ``d`` (planes are nested, so the
            best over a plane can only grow with ``d``): with ``readoff="fraction"`` the fraction of
            anchors whose best score reaches ``threshold``, with ``"mean"`` the mean best score.
        cutting_dim: ``[T]`` ``d*``: where ``curve`` crosses its :attr:`level` (one half of the
            anchors, or ``threshold``), interpolated linearly in ``log d`` between grid points. NaN
            when the curve never reaches it or when the optimization produced NaN/inf for the
            target (see :attr:`failed`); ``dims[0]`` when it is reached already there (see
            :attr:`saturated`).
        cutting_dim_std: ``[T]`` bootstrap standard deviation of ``d*`` over resampled anchors; NaN
            for a saturated target (``d*`` is then only bounded).
        dimension: ``[T]`` effective dimension ``D - d*``.
        dimension_frac: ``[T]`` ``(D - d*) / D``.
        num_bootstrap: number of bootstrap resamples; ``bootstrap_seed`` makes them reproducible.
        max_threshold: the highest threshold this run measures: problems stop once their loss is
            within ``tol`` of its minimum, i.e. at a score of about ``exp(-k · tol)``, so higher levels
            are not reached by construction (0.990 with the default ``tol = 0.01`` for classes).
        probed: ``[T, A, K]`` True where the problem was optimized; the other cells of ``scores``,
            ``losses``, ``distance`` and ``outside`` are NaN (None: every cell was).
        search: ``"grid"`` (every grid point optimized) or ``"bisect"`` (per anchor, a bisection for
            the first grid point that reaches ``threshold``; then :meth:`at` can only re-read at
            ``threshold`` itself, and :attr:`scores` of successful problems are only known to be
            ``>= threshold``: they stopped there).
        part: ``(index, count)`` for a partial estimate (measured with ``part=``): only the
            (target, anchor) groups of that share were optimized, the read-off (``curve``,
            ``cutting_dim``, ``dimension``, ...) is NaN; :meth:`merge` combines the shares.
            ``None``: a complete estimate.
    """

    kind: str
    input_dim: int
    targets: list
    dims: Tensor
    threshold: float
    scores: Tensor
    losses: Tensor
    steps: Tensor
    nonfinite: Tensor
    anchor_index: Tensor
    distance: Tensor
    outside: Tensor
    temperature: float
    readoff: str
    curve: Tensor
    cutting_dim: Tensor
    cutting_dim_std: Tensor
    dimension: Tensor
    dimension_frac: Tensor
    num_bootstrap: int
    bootstrap_seed: int
    max_threshold: float = 1.0
    probed: Tensor | None = None
    search: str = "grid"
    part: tuple[int, int] | None = None

    @staticmethod
    def merge(parts: Sequence[DimensionEstimate]) -> DimensionEstimate:
        """The estimate of the whole measurement from its ``count`` shares (measured with
        ``part=(i, count)`` for every ``i``, in any order): each (target, anchor) group is taken
        from the share that optimized it, then ``d*``, the curves and the bootstrap are read off as
        for a measurement in one piece, which this equals.

        Example::

            >>> import torch
            >>> from cm_monitor import DimensionEstimate, OptimizerSettings, cm_dimension
            >>> from cm_monitor.synthetic import HalfSpace
            >>> model = HalfSpace(16)
            >>> anchors = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
            >>> labels = model(anchors).argmax(1)
            >>> kw = dict(dims=[1, 4, 16], settings=OptimizerSettings(max_radius=None))
            >>> halves = [cm_dimension(model, anchors, labels, part=(i, 2), **kw) for i in range(2)]
            >>> DimensionEstimate.merge(halves).dimension.tolist()
            [15.0, 15.0]
        """
        if check_shares([p.part for p in parts], "estimates") == 1:
            return parts[0]
        first = parts[0]
        for p in parts[1:]:
            same = (p.kind, p.targets, p.threshold, p.bootstrap_seed, p.num_bootstrap, p.search) == (
                first.kind, first.targets, first.threshold, first.bootstrap_seed, first.num_bootstrap, first.search
            )  # fmt: skip
            if not (same and torch.equal(p.dims, first.dims) and torch.equal(p.anchor_index, first.anchor_index)):
                raise ValueError(
                    "The estimates to merge are shares of different measurements (targets, dims or anchors differ)."
                )
        valid = first.anchor_index >= 0
        group = torch.full(valid.shape, -1, dtype=torch.long)
        group[valid] = torch.arange(int(valid.sum()))  # the groups' order in the measurement
        fields = ("scores", "losses", "steps", "nonfinite", "distance", "outside", "probed")
        merged = {f: getattr(first, f).clone() for f in fields}
        for p in parts:
            mine = (valid & (group % p.part[1] == p.part[0]))[..., None]  # type: ignore[index]
            for f in fields:
                merged[f] = torch.where(mine, getattr(p, f), merged[f])
        return _complete(replace(first, **merged, part=None), stacklevel=3)

    @property
    def dimension_std(self) -> Tensor:
        """``[T]`` bootstrap standard deviation of the dimension (equal to that of ``d*``)."""
        return self.cutting_dim_std

    @property
    def mean_dimension(self) -> float:
        """Mean of :attr:`dimension` over targets (NaN if any target has none)."""
        return float(self.dimension.mean())

    @property
    def mean_dimension_frac(self) -> float:
        """Mean of :attr:`dimension_frac` over targets."""
        return float(self.dimension_frac.mean())

    @property
    def mean_dimension_std(self) -> float:
        """Uncertainty of :attr:`mean_dimension`, treating targets as independent."""
        return float(self.cutting_dim_std.pow(2).sum().sqrt() / len(self.targets))

    @property
    def failed(self) -> Tensor:
        """``[T]`` True where the optimization produced NaN/inf for some problem of the target."""
        return self.nonfinite.flatten(1).any(1)

    @property
    def level(self) -> float:
        """The level :attr:`curve` is read at: 0.5 (half the anchors) or :attr:`threshold`."""
        return 0.5 if self.readoff == "fraction" else self.threshold

    @property
    def saturated(self) -> Tensor:
        """``[T]`` True where the curve is at or above its level already at the first grid point
        (``d = 1`` included): then ``d* <= dims[0]`` is only bounded, ``cutting_dim`` holds
        ``dims[0]``, ``dimension`` is a lower bound and no uncertainty is given. A saturated
        measurement does not resolve differences between models: raise the threshold, lower
        ``max_radius``, or start the grid at 1."""
        return (self.curve[:, 0] >= self.level) & torch.isfinite(self.cutting_dim)

    @property
    def mean_cutting_dim(self) -> float:
        """Mean of :attr:`cutting_dim` over targets (``d*`` varies over decades where ``D - d*`` does not)."""
        return float(self.cutting_dim.mean())

    def locality(self) -> dict[str, float]:
        """Where the successes lie: over the (target, anchor) pairs that reach :attr:`threshold`, at
        the smallest plane dimension that does, the median and 90th percentile of the distance from
        the anchor of the first point that succeeded (``distance_median``, ``distance_p90``, in anchor
        norms) and the mean fraction of its elements outside the anchors' range (``outside_frac``);
        NaN when nothing succeeds. The points are those of the threshold the measurement ran at; an
        estimate re-read with :meth:`at` selects pairs by its new threshold but keeps those points."""
        hit = (_success(self, self.threshold) == 1) & (self.anchor_index >= 0)[..., None]  # [T, A, K]
        first = hit.to(torch.int64).argmax(-1, keepdim=True)
        reached = hit.any(-1)
        dist = self.distance.gather(-1, first).squeeze(-1)[reached].double()
        out = self.outside.gather(-1, first).squeeze(-1)[reached].double()
        if dist.numel() == 0:
            return {"distance_median": math.nan, "distance_p90": math.nan, "outside_frac": math.nan}
        q = torch.quantile(dist, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
        return {"distance_median": q[0], "distance_p90": q[1], "outside_frac": float(out.mean())}

    def success_rate(self, threshold: float | None = None) -> Tensor:
        """``[T, K]`` fraction of anchors whose (monotone) best score reaches ``threshold``."""
        thr = self.threshold if threshold is None else self._check_reread(threshold)
        valid = self.anchor_index >= 0
        hit = (_success(self, thr) == 1) & valid[..., None]
        return hit.sum(1) / valid.sum(1, keepdim=True).clamp_min(1)

    def at(self, threshold: float) -> DimensionEstimate:
        """The same measurement read at another ``threshold`` (no optimization is re-run)."""
        return _read_off(replace(self, threshold=self._check_reread(threshold)))

    def _check_reread(self, threshold: float) -> float:
        thr = _check_threshold(threshold, "threshold", self.max_threshold)
        if self.search == "bisect" and thr != self.threshold:
            raise ValueError(
                f"This estimate was measured by bisection at threshold {self.threshold:g}, which finds each anchor's "
                f"first success at that threshold only; it cannot be re-read at `threshold` = {thr:g}. Measure with "
                "`settings=OptimizerSettings(search='grid')` to re-read at other thresholds."
            )
        return thr

    def __repr__(self) -> str:
        """A summary: ``D``, threshold, grid, then ``D - d*`` ± std per target with its flags
        (``saturated``: a lower bound; ``unreached``: never reached; ``failed``: NaN/inf), and the mean.
        The tensors are attributes (``est.scores``, ...)."""
        dims = [int(d) for d in self.dims.tolist()]
        grid = dims if len(dims) <= 8 else [*dims[:3], "...", *dims[-2:]]
        lines = [
            f"DimensionEstimate(kind={self.kind!r}, D={self.input_dim}, threshold={self.threshold:g}, "
            f"readoff={self.readoff!r}, search={self.search!r}, dims=[{', '.join(map(str, grid))}] (K={len(dims)}), "
            f"temperature={self.temperature:.3g},"
        ]
        name = "class" if self.kind == "cm" else "classes"
        rows = zip(
            self.targets,
            self.dimension.tolist(),
            self.dimension_std.tolist(),
            self.failed.tolist(),
            self.saturated.tolist(),
            torch.isnan(self.cutting_dim).tolist(),
            strict=True,
        )
        for i, (t, d, s, failed, saturated, unreached) in enumerate(rows):
            if i == _REPR_TARGETS:
                lines.append(f"  ... {len(self.targets) - i} more targets")
                break
            flags = "failed" if failed else "saturated" if saturated else "unreached" if unreached else ""
            label = t if isinstance(t, int) else "-".join(map(str, t))
            lines.append(f"  {name} {label}: {d:.2f} ± {s:.2f}" + (f"  [{flags}]" if flags else ""))
        lines.append(f"  mean: {self.mean_dimension:.2f} ± {self.mean_dimension_std:.2f} of D = {self.input_dim})")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, float]:
        """Mean, uncertainty and per-target dimensions as plain floats, keyed as
        :class:`~cm_monitor.CMDimensionMonitor` logs them (without the ``cm/`` prefix): ``dim``,
        ``dim_std``, ``dim_frac``, ``dim_class_{c}`` for class manifolds; ``boundary_dim``,
        ``boundary_dim_std``, ``boundary_dim_frac`` and ``boundary_dim_pair_{a}_{b}`` (not logged
        by the monitor) for boundaries. Unlike the monitor, a target that was never reached is NaN
        here, not 0."""
        head = "dim" if self.kind == "cm" else "boundary_dim"
        out: dict[str, float] = {
            head: self.mean_dimension,
            f"{head}_std": self.mean_dimension_std,
            f"{head}_frac": self.mean_dimension_frac,
        }
        for t, d in zip(self.targets, self.dimension.tolist(), strict=True):
            key = f"class_{t}" if isinstance(t, int) else "pair_" + "_".join(str(c) for c in t)
            out[f"{head}_{key}"] = d
        return out


def cm_dimension(
    model: ModelLike,
    anchors: Tensor,
    labels: Tensor | Sequence[int],
    *,
    classes: Sequence[int] | None = None,
    dims: Sequence[int] | Tensor | None = None,
    threshold: float = 0.9,
    generator: torch.Generator | int | None = None,
    anchors_per_target: int | None = None,
    chunk_size: int = 2048,
    num_bootstrap: int = 200,
    calibration: tuple[Tensor, Tensor] | None = None,
    settings: OptimizerSettings | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    scale: float | str | None = None,
    output_transform: OutputTransform | None = None,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
    start: DimensionEstimate | None = None,
) -> DimensionEstimate:
    """Effective dimension of each class manifold ``{x : p_c(x) >= threshold}``, by cutting planes.

    For each target class ``c`` and each anchor whose label is not ``c``, random planes of every
    dimension ``d`` in ``dims`` are passed through the anchor and Adam maximizes ``p_c`` inside
    each (by default a bisection over ``dims`` optimizes only the few that decide the answer);
    ``d*`` is where half of the anchors reach ``threshold`` (``readoff="fraction"``, the default;
    with ``"mean"``, where the mean best ``p_c`` over anchors does), interpolated in ``log d``, and
    the class manifold's dimension is ``D - d*``.

    Args:
        model: an ``nn.Module`` mapping a float batch ``[N, *shape]`` to logits ``[N, C]``, or a list
            of them (an ensemble: mean log-softmax in the loss, mean softmax as the probability).
        anchors: ``[A, *shape]`` float inputs (vectors, images, sequences of feature vectors).
        labels: ``[A]`` integer class of each anchor. Anchors of class ``c`` are not used for ``c``.
        classes: target classes (default: all ``C``).
        dims: grid of plane dimensions in ``[1, D]`` (default: ``default_dims(D)``, about 24
            log-spaced values, see :func:`~cm_monitor.planes.default_dims`). :class:`~cm_monitor.CMDimensionMonitor` uses a coarser default
            (``dims=10``: ``default_dims(D, 10)``); ``d*`` is interpolated between grid points, so the two
            defaults give numbers that are not comparable: pass ``dims=monitor.grid()`` to compare.
        threshold: (calibrated) target probability that counts as reaching the class manifold. The
            default 0.9 was chosen by the controls in ``docs/method.md``; the reference reads 0.5.
        generator: a CPU ``torch.Generator`` or an int seed (default seed 0). The global RNG is not used.
        anchors_per_target: use at most this many anchors per target (a random subset).
        chunk_size: at most this many problems (``anchor × d``) in one forward pass, and this many
            anchors in one forward pass of the calibration: bounds memory.
        num_bootstrap: bootstrap resamples of the anchors for the uncertainty.
        calibration: ``(inputs, labels)`` held-out labelled data to calibrate the temperature on
            (with ``settings.temperature="calibrate"``, the default); default: the anchors. A few
            hundred examples give a stable temperature; the anchors alone (tens) are noisy.
        settings: optimizer settings (:class:`~cm_monitor.OptimizerSettings`); ``lr``,
            ``max_steps`` and ``scale`` override its fields.
        output_transform: maps the model's output to logits ``[N, C]``; default
            :func:`~cm_monitor.default_output_transform` (a tensor, the first element of a tuple,
            ``out["logits"]`` or ``out.logits``). A single logit ``[N, 1]`` is read as two classes
            ``[0, z]`` (class 1 has probability ``sigmoid(z)``).
        progress: called as ``progress(done, total)`` each time cutting-plane problems finish, with
            the problems done and their total (with a bisection, ``done`` plus the most it may still
            run, which falls as brackets close; the last call is ``(total, total)``). For a progress
            display; it must not raise.
        part: ``(index, count)``: optimize only share ``index`` of ``count`` of the (target,
            anchor) groups (every ``count``-th group; the anchor subsets, planes and seeds are
            those of the whole measurement) and return a partial estimate; merge the ``count``
            shares with :meth:`DimensionEstimate.merge`. For splitting one measurement across
            processes or devices. ``None``: the whole measurement.
        start: a warm start: an earlier estimate of the same kind, targets, grid and threshold
            (typically the previous measurement of the same anchors during training). Each
            (target, anchor) bisection starts with two problems at that anchor's earlier first
            success and the grid point below it, so an anchor whose ``d*`` has not moved costs two
            problems in one round instead of several in a row. While success is
            monotone in ``d`` (nested planes make it so; an optimization that misses a success a
            smaller plane found breaks it), the answer is the one of a cold start and a start from
            other anchors costs time only. Ignored by the grid search.

    Returns:
        A :class:`DimensionEstimate` with ``targets`` the classes.

    Example::

        >>> import torch
        >>> from cm_monitor import OptimizerSettings, cm_dimension
        >>> from cm_monitor.synthetic import HalfSpace
        >>> model = HalfSpace(16)  # a linear two-class model
        >>> anchors = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
        >>> labels = model(anchors).argmax(1)
        >>> unbounded = OptimizerSettings(max_radius=None)  # planes of any extent
        >>> est = cm_dimension(model, anchors, labels, dims=[1, 4, 16], settings=unbounded)
        >>> est.dimension.tolist()  # a half-space: every line reaches it, so D - 1
        [15.0, 15.0]
        >>> est.saturated.tolist()  # reached already at the first grid point: d* = 1 is only a bound
        [True, True]
    """
    return _estimate(
        "cm",
        model,
        anchors,
        labels,
        targets=None if classes is None else [_as_class_tuple(c, "classes") for c in classes],
        dims=dims,
        threshold=threshold,
        generator=generator,
        anchors_per_target=anchors_per_target,
        chunk_size=chunk_size,
        num_bootstrap=num_bootstrap,
        calibration=calibration,
        settings=_settings(settings, lr, max_steps, scale),
        output_transform=output_transform,
        k=1,
        progress=progress,
        part=part,
        start=start,
    )


def boundary_dimension(
    model: ModelLike,
    anchors: Tensor,
    labels: Tensor | Sequence[int],
    *,
    pairs: Sequence[Sequence[int]] | None = None,
    dims: Sequence[int] | Tensor | None = None,
    threshold: float = 0.8,
    generator: torch.Generator | int | None = None,
    anchors_per_target: int | None = None,
    chunk_size: int = 2048,
    num_bootstrap: int = 200,
    calibration: tuple[Tensor, Tensor] | None = None,
    settings: OptimizerSettings | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    scale: float | str | None = None,
    output_transform: OutputTransform | None = None,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
    start: DimensionEstimate | None = None,
) -> DimensionEstimate:
    """Effective dimension of the low-confidence boundaries among sets of classes.

    For a set ``Y`` of ``k`` classes the plane coordinates minimize the cross-entropy to the uniform
    distribution on ``Y``; a plane succeeds when every class of ``Y`` reaches probability
    ``>= threshold / k`` at the same point (default 0.8: for two classes, both ``>= 0.4``).
    Anchors come from classes outside ``Y``; when ``Y`` holds every class (a two-class model),
    anchors of all classes are used.

    Args:
        pairs: the class sets ``Y`` (default: every pair of classes). Tuples of ``k >= 2`` distinct
            classes; all of one length.
        threshold: ``τ`` in ``(0, 1]``; see above.

    The other arguments are those of :func:`cm_dimension`. ``targets`` of the result are tuples.
    """
    pairs, k = _check_pairs(pairs)
    return _estimate(
        "boundary",
        model,
        anchors,
        labels,
        targets=pairs,
        dims=dims,
        threshold=threshold,
        generator=generator,
        anchors_per_target=anchors_per_target,
        chunk_size=chunk_size,
        num_bootstrap=num_bootstrap,
        calibration=calibration,
        settings=_settings(settings, lr, max_steps, scale),
        output_transform=output_transform,
        k=k,
        progress=progress,
        part=part,
        start=start,
    )


# ----------------------------------------------------------------------------------------------


def _settings(
    settings: OptimizerSettings | None, lr: float | None, max_steps: int | None, scale: float | str | None
) -> OptimizerSettings:
    if settings is None:
        settings = OptimizerSettings()
    elif not isinstance(settings, OptimizerSettings):
        raise TypeError(f"`settings` is a {type(settings).__name__}; expected an OptimizerSettings.")
    overrides = {k: v for k, v in {"lr": lr, "max_steps": max_steps, "scale": scale}.items() if v is not None}
    return replace(settings, **overrides) if overrides else settings


def _as_class_tuple(c: object, name: str) -> tuple[int, ...]:
    if isinstance(c, Tensor):
        c = c.tolist()
    if isinstance(c, int) and not isinstance(c, bool):
        return (c,)
    if isinstance(c, Sequence) and not isinstance(c, str):
        out = tuple(c)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in out):
            if len(set(out)) != len(out):
                raise ValueError(f"`{name}` holds {out!r}, which repeats a class.")
            return out
    raise TypeError(f"`{name}` holds {c!r}; expected integer class ids.")


def _check_threshold(threshold: float, name: str, maximum: float = 1.0) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1], got {threshold!r}.")
    if threshold > maximum + 1e-12:
        raise ValueError(
            f"`{name}` = {threshold:g} is above {maximum:.4g}, the highest level this measurement reaches: "
            "each problem stops once its loss is within `tol` of the minimum (score about exp(-k · tol)). "
            "To measure higher levels pass smaller `tol` and `plateau_tol` in `settings` (and a larger `max_steps`)."
        )
    return float(threshold)


def _check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_labels(labels: Tensor | Sequence[int], num_anchors: int, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"`{name}` could not be read as integer class ids: {err}") from err
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`{name}` has dtype {labels.dtype}; expected integer class ids.")
    if labels.dim() != 1 or labels.shape[0] != num_anchors:
        raise ValueError(f"`{name}` has shape {tuple(labels.shape)}; expected [{num_anchors}], one class per input.")
    return labels.detach().to("cpu", torch.long)


def cm_and_boundary_dimension(
    model: ModelLike,
    anchors: Tensor,
    labels: Tensor | Sequence[int],
    *,
    classes: Sequence[int] | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
    threshold: float = 0.9,
    boundary_threshold: float = 0.8,
    dims: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | int | None = None,
    anchors_per_target: int | None = None,
    chunk_size: int = 2048,
    num_bootstrap: int = 200,
    calibration: tuple[Tensor, Tensor] | None = None,
    settings: OptimizerSettings | None = None,
    output_transform: OutputTransform | None = None,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
    start: DimensionEstimate | None = None,
    boundary_start: DimensionEstimate | None = None,
) -> tuple[DimensionEstimate, DimensionEstimate]:
    """:func:`cm_dimension` and :func:`boundary_dimension` of the same anchors in one go.

    The estimates are those of the two calls with the same arguments (the same targets, anchor
    subsets, planes and bootstrap: each kind draws its seeds from ``generator`` as its own call
    would; a ``torch.Generator`` serves the classes first, then the boundaries). The problems of
    both run in one work pool after one temperature calibration, so the boundaries' problems fill
    the rows that the class manifolds' slowest problems leave free instead of running after them.
    ``threshold`` and ``start`` are the class manifolds', ``boundary_threshold`` and
    ``boundary_start`` the boundaries'; the other arguments are those of :func:`cm_dimension`, but
    for its ``lr``, ``max_steps`` and ``scale`` overrides (set them in ``settings``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cm_monitor import cm_and_boundary_dimension
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> x, y = torch.randn(12, 8), torch.arange(12) % 3
        >>> cm, boundary = cm_and_boundary_dimension(net, x, y, pairs=[(0, 1)], dims=[1, 2, 4, 8], num_bootstrap=0)
        >>> cm.kind, boundary.targets
        ('cm', [(0, 1)])
    """
    pairs, k = _check_pairs(pairs)
    classes_ = None if classes is None else [_as_class_tuple(c, "classes") for c in classes]
    kinds = [
        _Kind("cm", classes_, 1, threshold, start),
        _Kind("boundary", pairs, k, boundary_threshold, boundary_start),
    ]
    common = dict(dims=dims, generator=generator, anchors_per_target=anchors_per_target, chunk_size=chunk_size)
    common |= dict(num_bootstrap=num_bootstrap, calibration=calibration, settings=_settings(settings, None, None, None))
    cm, boundary = _measure_kinds(
        model, anchors, labels, kinds, output_transform, progress, part, stacklevel=5, **common
    )
    return cm, boundary


def _check_pairs(pairs: Sequence[Sequence[int]] | None) -> tuple[list[tuple[int, ...]] | None, int]:
    """``pairs`` as tuples of class ids, and their common length ``k`` (2 for the default)."""
    if pairs is None:
        return None, 2
    pairs = [_as_class_tuple(p, "pairs") for p in pairs]
    lengths = {len(p) for p in pairs}
    if not pairs:
        raise ValueError("`pairs` is empty; expected class sets such as [(0, 1), (2, 3)].")
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"`pairs` must hold class sets of one length k >= 2, got lengths {sorted(lengths)}.")
    return pairs, lengths.pop()


def _estimate(
    kind: Literal["cm", "boundary"],
    model: ModelLike,
    anchors: Tensor,
    labels: Tensor | Sequence[int],
    *,
    targets: list[tuple[int, ...]] | None,
    dims: Sequence[int] | Tensor | None,
    threshold: float,
    generator: torch.Generator | int | None,
    anchors_per_target: int | None,
    chunk_size: int,
    num_bootstrap: int,
    calibration: tuple[Tensor, Tensor] | None,
    settings: OptimizerSettings,
    output_transform: OutputTransform | None,
    k: int,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
    start: DimensionEstimate | None = None,
) -> DimensionEstimate:
    kinds = [_Kind(kind, targets, k, threshold, start)]
    common = dict(dims=dims, generator=generator, anchors_per_target=anchors_per_target, chunk_size=chunk_size)
    common |= dict(num_bootstrap=num_bootstrap, calibration=calibration, settings=settings)
    (est,) = _measure_kinds(model, anchors, labels, kinds, output_transform, progress, part, stacklevel=6, **common)
    return est


@dataclass(frozen=True)
class _Kind:
    """What one kind of target of a measurement asks for: class manifolds (``k = 1``) or
    boundaries among ``k`` classes, their targets (None: the default), level and warm start."""

    kind: Literal["cm", "boundary"]
    targets: list[tuple[int, ...]] | None
    k: int
    threshold: float
    start: DimensionEstimate | None


@dataclass
class _Plan:
    """One kind's (target, anchor) groups: targets, their anchors, plane seeds and warm-start hints."""

    kind: str
    k: int
    threshold: float
    max_threshold: float
    targets: list[tuple[int, ...]]
    per_target: list[Tensor]
    seeds: list[int]
    bootstrap_seed: int
    hints: list[int | None] | None
    mine: Tensor  # [G] bool: this share's groups

    def group_anchor(self) -> Tensor:
        return torch.cat(self.per_target)

    def group_targets(self) -> Tensor:
        flat = [t for t, u in zip(self.targets, self.per_target, strict=True) for _ in range(u.numel())]
        return torch.tensor(flat, dtype=torch.long).view(-1, self.k)


def _measure_kinds(
    model: ModelLike,
    anchors: Tensor,
    labels: Tensor | Sequence[int],
    kinds: list[_Kind],
    output_transform: OutputTransform | None,
    progress: Callable[[int, int], None] | None,
    part: tuple[int, int] | None,
    *,
    dims: Sequence[int] | Tensor | None,
    generator: torch.Generator | int | None,
    anchors_per_target: int | None,
    chunk_size: int,
    num_bootstrap: int,
    calibration: tuple[Tensor, Tensor] | None,
    settings: OptimizerSettings,
    stacklevel: int,
) -> list[DimensionEstimate]:
    """Measure each of ``kinds`` on the same anchors, with one calibration and one work pool: the
    estimates are those of one call per kind (each kind draws its seeds as its own call does).
    ``stacklevel``: of the user's line for warnings, counted from :func:`_complete`."""
    part = check_part(part)
    members = logits_models(as_members(model), output_transform)
    check_float_inputs(anchors, "anchors")
    labels = _check_labels(labels, anchors.shape[0])
    names = ["threshold"] if len(kinds) == 1 else ["threshold", "boundary_threshold"]
    kinds = [
        replace(kd, threshold=_check_threshold(kd.threshold, name, math.exp(-kd.k * settings.tol)))
        for kd, name in zip(kinds, names, strict=True)
    ]
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    num_bootstrap = _check_positive_int(num_bootstrap, "num_bootstrap", minimum=0)
    if anchors_per_target is not None:
        anchors_per_target = _check_positive_int(anchors_per_target, "anchors_per_target")
    input_dim = anchors[0].numel()
    dim_grid = check_dims(dims, input_dim)
    scale = data_scale(anchors) if settings.scale == "auto" else float(settings.scale)
    device = model_device(members, anchors.device)
    dtype = model_float_dtype(members, anchors.dtype)
    with measuring(members):
        x = anchors.detach().to(device).clone()  # a normal tensor even if made in inference mode
        logits = _forward_logits(members, x.to(dtype), chunk_size)
        num_classes = logits[0].shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"`labels` must be class ids in [0, {num_classes - 1}] (the model has {num_classes} classes), got values in [{int(labels.min())}, {int(labels.max())}]."
            )
        temperature = _temperature(settings, members, logits, labels, calibration, dtype, chunk_size)
        space = PlaneSpace(
            scale=scale,
            temperature=temperature,
            radius_norms=settings.max_radius,
            low=float(x.min()),
            high=float(x.max()),
            clip=settings.clip,
            level=kinds[0].threshold,
        )
        plans = [
            _plan(kd, labels, num_classes, make_generator(generator), anchors_per_target, dim_grid, settings, part)
            for kd in kinds
        ]
        outcomes = _optimize(plans, members, x, dim_grid, settings, space, chunk_size, num_classes, dtype, progress)
    common = dict(input_dim=input_dim, dims=dim_grid, temperature=temperature, settings=settings)
    estimates = []
    for plan, outcome in zip(plans, outcomes, strict=True):  # a loop, not a comprehension: warnings' stacklevel
        estimates.append(
            _assemble(plan, outcome, num_bootstrap=num_bootstrap, part=part, stacklevel=stacklevel, **common)
        )
    return estimates


def _plan(
    kd: _Kind,
    labels: Tensor,
    num_classes: int,
    gen: torch.Generator,
    anchors_per_target: int | None,
    dims: list[int],
    settings: OptimizerSettings,
    part: tuple[int, int] | None,
) -> _Plan:
    """The groups of one kind: its targets, a subset of the anchors of other classes per target
    (``anchors_per_target``, drawn from ``gen``), one plane seed per group."""
    targets = _check_targets(kd.kind, kd.targets, num_classes, kd.k)
    base_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    bootstrap_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    per_target = []
    for t in targets:
        usable = _usable_anchors(labels, t, num_classes)
        if usable.numel() == 0:
            name = "class" if kd.kind == "cm" else "class set"
            raise ValueError(
                f"No usable anchor for target {name} {t if kd.kind == 'boundary' else t[0]}: every anchor's label is in the target. Pass anchors of other classes."
            )
        if anchors_per_target is not None and usable.numel() > anchors_per_target:
            pick = torch.randperm(usable.numel(), generator=gen)[:anchors_per_target]
            usable = usable[pick.sort().values]
        per_target.append(usable)
    seeds = [plane_seed(base_seed, t, int(a)) for t, u in zip(targets, per_target, strict=True) for a in u.tolist()]
    return _Plan(
        kind=kd.kind,
        k=kd.k,
        threshold=kd.threshold,
        max_threshold=math.exp(-kd.k * settings.tol),
        targets=targets,
        per_target=per_target,
        seeds=seeds,
        bootstrap_seed=bootstrap_seed,
        hints=_start_hints(kd.start, kd.kind, targets, per_target, dims, kd.threshold),
        mine=owned(len(seeds), part),  # this share's groups (all of them without `part`)
    )


def _optimize(
    plans: list[_Plan],
    members: list[nn.Module],
    x: Tensor,
    dims: list[int],
    settings: OptimizerSettings,
    space: PlaneSpace,
    chunk_size: int,
    num_classes: int,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None,
) -> list[CuttingOutcome]:
    """This share's groups of every plan in one work pool; the outcome of each plan, ``[G, K]``
    (cells of other shares' groups NaN and not probed)."""
    K, kmax = len(dims), max(plan.k for plan in plans)
    anchor, targets, seeds, hints, ks, levels = [], [], [], [], [], []
    for plan in plans:
        m = plan.mine
        anchor.append(plan.group_anchor()[m])
        t = plan.group_targets()[m]
        targets.append(torch.cat([t, t[:, :1].expand(-1, kmax - plan.k)], 1))  # padding repeats a target
        seeds += [seed for seed, keep in zip(plan.seeds, m.tolist(), strict=True) if keep]
        hints += [h for h, keep in zip(plan.hints or [None] * m.numel(), m.tolist(), strict=True) if keep]
        ks.append(torch.full((int(m.sum()),), plan.k))
        levels.append(torch.full((int(m.sum()),), plan.threshold))
    mixed = len(plans) > 1
    any_hint = any(plan.hints is not None for plan in plans)
    outcome = None
    if seeds:
        outcome = optimize_planes(
            members,
            x,
            torch.cat(anchor).to(x.device),
            torch.cat(targets).to(x.device),
            seeds,
            dims,
            settings,
            space,
            chunk_size=chunk_size,
            num_classes=num_classes,
            model_dtype=dtype,
            progress=progress,
            hints=hints if any_hint else None,
            group_k=torch.cat(ks) if mixed else None,
            group_level=torch.cat(levels) if mixed else None,
        )
    out, offset = [], 0
    for plan in plans:
        n = int(plan.mine.sum())
        piece = None if outcome is None or n == 0 else _rows(outcome, slice(offset, offset + n))
        out.append(_expand(piece, plan.mine, K))
        offset += n
    return out


def _rows(outcome: CuttingOutcome, rows: slice) -> CuttingOutcome:
    """The groups ``rows`` of an outcome."""
    return CuttingOutcome(**{f.name: getattr(outcome, f.name)[rows] for f in fields(CuttingOutcome)})


def _assemble(
    plan: _Plan,
    outcome: CuttingOutcome,
    *,
    input_dim: int,
    dims: list[int],
    temperature: float,
    settings: OptimizerSettings,
    num_bootstrap: int,
    part: tuple[int, int] | None,
    stacklevel: int,
) -> DimensionEstimate:
    """The estimate of one plan from its ``[G, K]`` outcome (read off unless it is a share)."""
    per_target = plan.per_target
    T, A, K = len(plan.targets), max(u.numel() for u in per_target), len(dims)
    scores = torch.full((T, A, K), math.nan)
    losses = torch.full((T, A, K), math.nan)
    steps = torch.zeros((T, A, K), dtype=torch.long)
    nonfinite = torch.zeros((T, A, K), dtype=torch.bool)
    distance = torch.full((T, A, K), math.nan)
    outside = torch.full((T, A, K), math.nan)
    probed = torch.zeros((T, A, K), dtype=torch.bool)
    anchor_index = torch.full((T, A), -1, dtype=torch.long)
    offset = 0
    for i, u in enumerate(per_target):
        n = u.numel()
        rows = slice(offset, offset + n)
        scores[i, :n], losses[i, :n] = outcome.score[rows], outcome.loss[rows]
        steps[i, :n], nonfinite[i, :n] = outcome.steps[rows], outcome.nonfinite[rows]
        distance[i, :n], outside[i, :n] = outcome.distance[rows], outcome.outside[rows]
        probed[i, :n] = outcome.probed[rows]
        anchor_index[i, :n] = u
        offset += n

    nan = torch.full((T,), math.nan)
    est = DimensionEstimate(
        kind=plan.kind,
        input_dim=input_dim,
        targets=[t[0] for t in plan.targets] if plan.kind == "cm" else plan.targets,
        dims=torch.tensor(dims, dtype=torch.long),
        threshold=plan.threshold,
        scores=scores,
        losses=losses,
        steps=steps,
        nonfinite=nonfinite,
        anchor_index=anchor_index,
        distance=distance,
        outside=outside,
        temperature=temperature,
        readoff=settings.readoff,
        curve=torch.full((T, K), math.nan),
        cutting_dim=nan,
        cutting_dim_std=nan,
        dimension=nan,
        dimension_frac=nan,
        num_bootstrap=num_bootstrap,
        bootstrap_seed=plan.bootstrap_seed,
        max_threshold=plan.max_threshold,
        probed=probed,
        search=resolve_search(settings),
        part=part,
    )
    return est if part is not None else _complete(est, stacklevel=stacklevel)


def _start_hints(
    start: DimensionEstimate | None,
    kind: str,
    targets: list[tuple[int, ...]],
    per_target: list[Tensor],
    dims: list[int],
    threshold: float,
) -> list[int | None] | None:
    """Per (target, anchor) group, in the order of the groups, the grid index of its first success
    in ``start`` (``K``: never reached; None: not measured there, or NaN/inf); None without ``start``."""
    if start is None:
        return None
    if not isinstance(start, DimensionEstimate) or start.part is not None:
        raise TypeError(f"`start` must be a complete DimensionEstimate (or None), got {type(start).__name__}.")
    theirs = [t if isinstance(t, tuple) else (t,) for t in start.targets]
    same = start.kind == kind and theirs == targets and start.dims.tolist() == list(dims)
    if not (same and math.isclose(start.threshold, threshold)):
        raise ValueError(
            "`start` must be an estimate of the same kind, targets, grid `dims` and `threshold` as this "
            f"measurement; got {start.kind} targets {start.targets}, dims {start.dims.tolist()}, threshold "
            f"{start.threshold:g}."
        )
    first = first_success(start)
    hints: list[int | None] = []
    for i, u in enumerate(per_target):
        known = {
            int(a): int(f) for a, f in zip(start.anchor_index[i].tolist(), first[i].tolist(), strict=True) if f >= 0
        }
        hints.extend(known.get(int(a)) for a in u.tolist())
    return hints


def first_success(est: DimensionEstimate) -> Tensor:
    """``[T, A]``: per (target, anchor slot) the first grid index whose plane reached the estimate's
    threshold, ``K`` when none did, ``-1`` when unknown (an unused slot, nothing probed, or NaN/inf)."""
    probed = torch.ones_like(est.nonfinite) if est.probed is None else est.probed
    hit = probed & (est.scores >= est.threshold)
    first = torch.where(hit.any(-1), hit.to(torch.int64).argmax(-1), len(est.dims))
    known = (est.anchor_index >= 0) & probed.any(-1) & ~est.nonfinite.any(-1)
    return torch.where(known, first, -1)


def _complete(est: DimensionEstimate, stacklevel: int) -> DimensionEstimate:
    """Read off ``d*`` and the rest from the raw outcomes; warn about targets whose optimization failed."""
    est = _read_off(est)
    if bool(est.failed.any()):
        bad = [t for t, f in zip(est.targets, est.failed.tolist(), strict=True) if f]
        warnings.warn(
            f"NaN/inf appeared while optimizing cutting planes for targets {bad}; their dimension "
            "is reported as NaN (see DimensionEstimate.nonfinite).",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return est


def _expand(outcome: CuttingOutcome | None, mine: Tensor, K: int) -> CuttingOutcome:
    """The outcome of all ``G`` groups from that of the groups ``mine`` (the others: not probed)."""
    G = mine.numel()
    full = CuttingOutcome(
        score=torch.full((G, K), math.nan),
        loss=torch.full((G, K), math.nan),
        steps=torch.zeros((G, K), dtype=torch.long),
        nonfinite=torch.zeros((G, K), dtype=torch.bool),
        distance=torch.full((G, K), math.nan),
        outside=torch.full((G, K), math.nan),
        probed=torch.zeros((G, K), dtype=torch.bool),
    )
    if outcome is None:
        return full
    if bool(mine.all()):
        return outcome
    for name in ("score", "loss", "steps", "nonfinite", "distance", "outside", "probed"):
        getattr(full, name)[mine] = getattr(outcome, name)
    return full


def _forward_logits(members: list[torch.nn.Module], x: Tensor, chunk_size: int) -> list[Tensor]:
    """Each member's logits for ``x`` (no autograd), ``chunk_size`` inputs per forward pass, checked
    to be ``[N, C]`` with one ``C``."""
    with torch.no_grad():
        try:
            logits = [torch.cat([m(part) for part in x.split(chunk_size)]) for m in members]
        except RuntimeError as err:
            raise explain_inference_tensors(err) from err
    num_classes: int | None = None
    for i, z in enumerate(logits):
        check_logits(z, x.shape[0], num_classes, f"model[{i}]" if len(members) > 1 else "model")
        num_classes = z.shape[1]
    return logits


def _temperature(
    settings: OptimizerSettings,
    members: list[torch.nn.Module],
    anchor_logits: list[Tensor],
    labels: Tensor,
    calibration: tuple[Tensor, Tensor] | None,
    dtype: torch.dtype,
    chunk_size: int,
) -> float:
    """``settings.temperature``, or the one calibrated on ``calibration`` (default: the anchors)."""
    if settings.temperature != "calibrate":
        return float(settings.temperature)
    if calibration is None:
        return calibrate_temperature(anchor_logits, labels)
    inputs, targets = calibration
    check_float_inputs(inputs, "calibration[0]")
    targets = _check_labels(targets, inputs.shape[0], "calibration[1]")
    logits = _forward_logits(members, inputs.to(model_device(members, inputs.device), dtype), chunk_size)
    C = anchor_logits[0].shape[1]
    if int(targets.min()) < 0 or int(targets.max()) >= C:
        raise ValueError(f"`calibration[1]` must hold class ids in [0, {C - 1}] (the model has {C} classes).")
    return calibrate_temperature(logits, targets)


def _check_targets(kind: str, targets: list[tuple[int, ...]] | None, num_classes: int, k: int) -> list[tuple[int, ...]]:
    name = "classes" if kind == "cm" else "pairs"
    if targets is None:
        if kind == "cm":
            return [(c,) for c in range(num_classes)]
        if k > num_classes:
            raise ValueError(
                f"Boundaries among {k} classes need a model with at least {k} classes; it has {num_classes}."
            )
        return list(itertools.combinations(range(num_classes), k))
    if not targets:
        raise ValueError(f"`{name}` is empty; expected at least one target.")
    for t in targets:
        for c in t:
            if not 0 <= c < num_classes:
                raise ValueError(
                    f"`{name}` holds class {c}, outside [0, {num_classes - 1}] (the model has {num_classes} classes)."
                )
    if len(set(targets)) != len(targets):
        raise ValueError(f"`{name}` repeats a target: {targets}.")
    return targets


def _usable_anchors(labels: Tensor, target: tuple[int, ...], num_classes: int) -> Tensor:
    """Anchors whose label is outside the target set; all anchors if the set covers every class."""
    if len(target) > 1 and len(set(target)) == num_classes:
        return torch.arange(labels.numel())
    outside = ~torch.isin(labels, torch.tensor(target, dtype=torch.long))
    return outside.nonzero().squeeze(1)


def _monotone(scores: Tensor) -> Tensor:
    """Running maximum over the ``d`` axis (NaN propagates)."""
    return torch.cummax(scores, dim=-1).values


def _success(est: DimensionEstimate, threshold: float) -> Tensor:
    """``[T, A, K]``: 1 where the anchor's plane reaches ``threshold`` at this ``d`` or a smaller probed
    one (nested planes), else 0; NaN for an anchor whose optimization produced NaN/inf."""
    probed = torch.ones_like(est.nonfinite) if est.probed is None else est.probed
    hit = (probed & (est.scores >= threshold)).to(torch.float32)
    reached = torch.cummax(hit, dim=-1).values
    broken = est.nonfinite.any(-1, keepdim=True)
    return torch.where(broken, math.nan, reached)


def _crossing(curves: Tensor, log_dims: Tensor, threshold: float) -> Tensor:
    """``d*`` where each monotone curve ``[..., K]`` first reaches ``threshold`` (log-d interpolation)."""
    reached = curves >= threshold
    any_reached = reached.any(-1)
    j = reached.to(torch.int64).argmax(-1)  # first index reaching the threshold
    jm = (j - 1).clamp_min(0)
    c_hi = curves.gather(-1, j[..., None]).squeeze(-1)
    c_lo = curves.gather(-1, jm[..., None]).squeeze(-1)
    l_hi, l_lo = log_dims[j], log_dims[jm]
    frac = ((threshold - c_lo) / (c_hi - c_lo).clamp_min(1e-12)).clamp(0, 1)
    log_d = torch.where(j == 0, l_hi, l_lo + frac * (l_hi - l_lo))
    # within the bracket's grid points exactly: exp(log D) may round above D (and D - d* below 0)
    grid = log_dims.exp().round()
    d = torch.minimum(torch.maximum(log_d.exp(), grid[jm]), grid[j])
    nan = torch.full_like(d, math.nan)
    return torch.where(any_reached & torch.isfinite(curves).all(-1), d, nan)


def _read_off(est: DimensionEstimate) -> DimensionEstimate:
    """Fill curve, d*, its bootstrap uncertainty and the dimensions from the raw scores."""
    # per anchor: 1 where its best score reaches the threshold at this d or a smaller one (NaN kept)
    mono = _success(est, est.threshold) if est.readoff == "fraction" else _monotone(est.scores)  # [T, A, K]
    valid = est.anchor_index >= 0
    log_dims = est.dims.double().log()
    level = est.level
    T = mono.shape[0]
    curve = torch.full((T, mono.shape[2]), math.nan, dtype=torch.float64)
    d_star = torch.full((T,), math.nan, dtype=torch.float64)
    d_std = torch.full((T,), math.nan, dtype=torch.float64)
    gen = torch.Generator().manual_seed(est.bootstrap_seed)
    for i in range(T):
        s = mono[i, valid[i]].double()  # [A_i, K]
        curve[i] = s.mean(0)
        d_star[i] = _crossing(curve[i], log_dims, level)
        if est.num_bootstrap > 0 and s.shape[0] > 1:
            idx = torch.randint(0, s.shape[0], (est.num_bootstrap, s.shape[0]), generator=gen)
            boot = _crossing(s[idx].mean(1), log_dims, level)
            if torch.isfinite(d_star[i]) and not curve[i, 0] >= level:  # saturated: d* only bounded
                # resamples that never reach the level count as d* = D (the largest possible)
                boot = torch.where(torch.isfinite(boot), boot, float(est.input_dim))
                d_std[i] = boot.std()
    D = est.input_dim
    return replace(
        est,
        curve=curve.float(),
        cutting_dim=d_star.float(),
        cutting_dim_std=d_std.float(),
        dimension=(D - d_star).float(),
        dimension_frac=((D - d_star) / D).float(),
    )
