"""CMDimensionMonitor: the class-manifold dimension of the model, measured while it trains."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from cm_monitor._model import as_members, model_device
from cm_monitor.anchors import BatchReader
from cm_monitor.callbacks.base import _OOM_ERRORS, GeometryMonitor, Measurement, check_int, check_probability
from cm_monitor.cost import CostEstimate, activation_bytes_per_row, available_bytes, estimate_cost, pool_bytes
from cm_monitor.cutting import OptimizerSettings, problems_per_group, resolve_search, rows_per_pass
from cm_monitor.dimension import DimensionEstimate, cm_and_boundary_dimension, cm_dimension, first_success
from cm_monitor.planes import choose_planes, default_dims
from cm_monitor.search import max_rounds


class CMDimensionMonitor(GeometryMonitor):
    r"""Measure the class-manifold (CM) dimension of the model at the end of validation.

    For each class ``c``, random affine planes of increasing dimension ``d`` are passed through
    fixed validation inputs of other classes ("anchors"), and Adam maximizes ``p_c`` inside each
    plane. ``d*`` is the plane dimension at which the planes reach ``p_c >= threshold`` on
    average; the class manifold's effective dimension is ``D - d*`` (``D`` = number of input
    elements). The same is done for the low-confidence *boundaries* between pairs of classes.
    The method is Fort et al. (2022), arXiv 2210.05546; see ``docs/callback.md``.

    The model is measured as it predicts: in evaluation mode (BatchNorm running statistics,
    no dropout), in its parameters' dtype, on its device; its modes are restored, no gradient
    reaches its parameters and the global random state is not touched, so training is the same
    with and without the monitor.

    Schedule: the first validation of a run is always measured, then the first validation at
    least ``every_n_epochs`` epochs after the last measurement (never the sanity check, never
    ``trainer.validate``). **Validations without a measurement log the last measured values
    again** (and ``cm/measured = 0``), so ``EarlyStopping(monitor="cm/dim", mode="max")`` with
    ``strict=True`` always finds the key. Such repeats count as "no improvement" for the
    early-stopping patience: to wait ``k`` measurements, use ``patience >= k * every_n_epochs``
    (an ``EarlyStopping`` on a ``cm/`` key that the repeats alone would make end the fit early,
    even if every measurement improved, is refused at the start of fit, before any training).
    ``max_cost_frac`` caps the cost: a due measurement is postponed while it would push the time
    spent measuring above that fraction of the fit's wall time (postponed validations also repeat
    the last values; a postponement that would bring an ``EarlyStopping`` on a ``cm/`` key to its
    patience is not made: the monitor measures over the budget then).

    Anchors: ``num_anchors`` per class, a uniform random sample of each class of the validation
    dataloader (read to its end when it has a length, whatever ``limit_val_batches``;
    ``max_scan_batches`` limits it), drawn once at the start of fit from the whole
    validation set (under DDP too: each rank samples its shard, the samples merge, see
    ``docs/callback.md``); they, the random planes (same ``seed``) and the chosen boundary
    pairs stay fixed for the run and are saved in checkpoints (common random numbers: a change in
    the curves is a change in the model).

    Args:
        every_n_epochs: measure every this many epochs (see above). 10 by default: one measurement
            costs about as much forward + backward work as a CIFAR-size training epoch
            (``docs/performance.md``), so every 10 epochs keeps it near a tenth of such a run; pass
            1 to follow the dimension epoch by epoch on small data.
        num_anchors: anchors drawn per class. A class with fewer validation examples is left out
            (with a warning; an error at the start of fit if ``classes`` or ``pairs`` names it). All
            of them calibrate the temperature; ``anchors_per_target`` of them per class anchor the planes.
        classes: the classes whose manifold is measured (default: all classes of the model that have
            ``num_anchors`` validation examples, or a subset of ``max_classes`` of them).
        max_classes: for a model with more classes than this (and ``classes=None``), a fixed random
            subset of ``max_classes`` classes is measured: drawn once with ``seed`` and saved in
            checkpoints (common random numbers), anchors only of these classes, per-class keys only
            for them, ``cm/dim`` the mean over them. ``None``: all classes, whatever their number.
        num_pairs: number of class pairs whose boundary is measured, chosen at random once (among
            the pairs of ``classes``); ``None`` for all pairs, ``0`` for none.
        pairs: explicit class pairs for the boundaries (instead of ``num_pairs``, which must then keep
            its default).
        threshold: calibrated target probability that counts as reaching a class manifold (``p``;
            0.9 by default, chosen by the controls in ``docs/method.md``; the reference reads 0.5).
        boundary_threshold: ``τ``: a boundary between two classes is reached when both have
            probability ``>= τ / 2`` at one point.
        extra_thresholds: further levels ``p`` at which ``cm/dim`` is also read off (no extra
            optimization), logged as ``cm/dim_p{100 p}``, e.g. ``cm/dim_p80``. Re-reading needs every
            grid point's scores, so with extra thresholds ``settings.search="auto"`` means the grid
            (about four times the optimizer steps of the default bisection).
        anchors_per_target: at most this many anchors (a random subset, fixed) per class or pair;
            ``None`` uses all anchors of other classes. The main knob of the cost with ``dims``.
        dims: the grid of plane dimensions: an int (about that many log-spaced values from 1 to
            ``D``: ``default_dims(D, dims)``) or explicit values in ``[1, D]``. Note: the default, 10
            values, is coarser than the default of :func:`~cm_monitor.cm_dimension` (about 24,
            ``default_dims(D)``), to keep the monitor cheap; ``d*`` is interpolated between grid points,
            so numbers measured on the two default grids are not comparable. To compare with the
            function, pass it this monitor's grid: ``cm_dimension(..., dims=monitor.grid())``.
        settings: optimizer settings of each cutting-plane problem
            (:class:`~cm_monitor.OptimizerSettings`; default: the package's).
        max_steps: overrides ``settings.max_steps`` (Adam steps per problem at most).
        chunk_size: at most this many problems, or anchors, in one forward pass (bounds memory).
        num_bootstrap: bootstrap resamples of the anchors for the uncertainties (``*_std``); 0 for
            none (the ``*_std`` keys are then not logged).
        warm_start: start each (target, anchor) bisection of a measurement at its answer of the
            previous measurement of this run (``start=`` of :func:`~cm_monitor.cm_dimension`): an
            anchor whose ``d*`` has not moved costs two problems in one round instead of several
            in a row. While success is monotone in ``d`` (nested planes) the answer
            is the one of a cold start and only the time changes (see ``docs/callback.md`` for when
            it is not). The first measurement of a fit, and the first after a resume, start cold.
            No effect with the grid search (``extra_thresholds``).
        max_seconds: at the start of fit, before any training (after the first batch for a model with
            lazy modules, see ``docs/callback.md``), a probe pass gives an upper bound on
            the time of one measurement (every problem running its whole ``max_steps``; early
            stopping made real measurements 20 to over 170 times shorter in the fits measured,
            see :mod:`cm_monitor.cost`). It is logged and kept as :attr:`cost_estimate`; above
            ``max_seconds`` the fit stops there with an error that says which settings to reduce,
            so set it from that bound, not from a measured ``cm/seconds``. ``None``: no limit.
        seed: seeds the anchors, the pairs and the planes; fixed for the run.

    The other arguments (``max_cost_frac``, ``batch_to_inputs``, ``input_key``, ``label_key``,
    ``dataloader_idx``, ``max_scan_batches``, ``get_model``, ``output_transform``, ``prefix``,
    ``log_figures``, ``prog_bar``, ``verbose``, ``strict``, ``on_nonfinite``) are those of
    :class:`~cm_monitor.callbacks.base.GeometryMonitor`.

    Logged metrics (through ``LightningModule.log``, at every validation of ``trainer.fit``
    after the sanity check; the same values on every rank):

    * ``cm/dim``: mean over the measured classes of ``D - d*`` (higher: larger class manifolds); with
      more than ``max_classes`` classes, the mean over the fixed subset.
    * ``cm/dim_std``: its bootstrap standard deviation over anchors (not logged with
      ``num_bootstrap=0``, nor, with a warning at the first measurement, when a class or pair has
      fewer than two anchors).
    * ``cm/dim_frac``: ``cm/dim / D``.
    * ``cm/cutting_dim``: mean over the measured classes of ``d*`` (``D - cm/dim``; it varies over
      decades where ``cm/dim`` moves by a few units).
    * ``cm/temperature``: the temperature ``T`` the logits were divided by (calibrated on the
      anchors by default: large when the model is no better than chance on them).
    * ``cm/saturated``, ``cm/unreached``: how many classes were reached already at the first grid
      point (their dimension is a bound) or never (logged as 0). Neither has an uncertainty:
      ``cm/dim_std`` combines the other classes only.
    * ``cm/success_dist_median``, ``cm/success_dist_p90``: distance of the successful plane points
      from their anchors, in anchor norms (median, 90th percentile); ``cm/outside_frac``: mean
      fraction of their elements outside the anchors' range. Not logged when nothing succeeded.
    * ``cm/dim_class_{c}``: ``D - d*`` of class ``c``.
    * ``cm/dim_p{100 p}``: ``cm/dim`` read at each level of ``extra_thresholds``.
    * ``cm/boundary_dim``, ``cm/boundary_dim_std``, ``cm/boundary_dim_frac``: the same for the
      boundaries (when there are pairs).
    * ``cm/seconds``: wall time of the measurement (0 at validations without one).
    * ``cm/cost_frac``: that time as a fraction of the epoch so far (training + validation +
      measurement since the epoch, or the previous validation, started), not counting the time other
      monitors of the Trainer spent measuring: each monitor's own share, as if it were alone.
    * ``cm/measured``: 1 when the values were measured at this validation, 0 when repeated (also
      when the measurement failed or the model returned NaN/inf).
    * ``cm/failed``: 1 when the measurement raised (a warning gives the cause; the last values are
      logged again and training goes on), else 0.
    * ``cm/nonfinite``: 1 when the model returned NaN/inf during the measurement, else 0; the values
      are then NaN (``on_nonfinite="log_nan"``) or the last finite ones (``"keep_last"``).
    * ``cm/num_classes_measured``: how many classes are measured (the classes with fewer than
      ``num_anchors`` validation examples are left out; more than ``max_classes`` are subsampled).

    A class whose curve never reaches ``threshold`` even at ``d = D`` is logged with dimension 0
    (``d* = D``) and a warning. A class whose optimization produced NaN/inf (the model returned
    NaN/inf) is NaN, and so are the means, with ``cm/nonfinite = 1`` (``on_nonfinite``). If a key
    that ``EarlyStopping`` or ``ModelCheckpoint`` monitors has no value yet, it is logged as the
    worst finite value for that callback's mode (−3.4e38 for ``"max"``, +3.4e38 for ``"min"``), with a
    warning, so that it neither stops the run nor counts as an improvement. A
    ``cm/`` key that they monitor and that this configuration never logs (a typo such as ``cm/dims``,
    ``cm/boundary_dim`` with ``num_pairs=0``, ``cm/dim_class_{c}`` of a class not measured) is an
    error at the start of fit, before any training.

    Each measurement also adds the figure ``cm/curves`` to every logger (TensorBoard's IMAGES tab,
    W&B, MLflow; a PNG under the ``log_dir`` of any other, e.g. ``CSVLogger``): per class and per
    pair, the reached probability against the plane dimension ``d`` (log axis), the threshold and
    ``d*`` (with many classes, five of them in colour, spread from the smallest ``d*`` to the
    largest). A measurement longer than a few seconds shows its progress (problems done, time left)
    in the Trainer's progress bar.

    Under DDP the (target, anchor) groups are divided among the ranks (rank ``r`` of ``n`` optimizes
    every ``n``-th group with the planes of the whole measurement); the partial estimates are
    gathered and merged (:meth:`~cm_monitor.DimensionEstimate.merge`) on every rank, so ``devices=n``
    logs what one process logs, in about ``1/n`` of the time.

    Raises:
        ValueError, TypeError: on invalid arguments (at construction) and, at the start of fit,
            when the validation batches cannot be read, a class that ``classes`` or ``pairs`` names
            has fewer than ``num_anchors`` validation examples (or fewer than two classes have), or
            the classes/pairs do not fit the model.
        MisconfigurationException: at the start of fit, when the run has no validation data.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> from cm_monitor import CMDimensionMonitor
        >>> monitor = CMDimensionMonitor(every_n_epochs=2, num_anchors=4, num_pairs=5)
        >>> stopper = EarlyStopping(monitor="val_loss", mode="min", patience=5)  # not on cm/dim: docs/callback.md
        >>> trainer = pl.Trainer(max_epochs=20, callbacks=[monitor, stopper])
        >>> # trainer.fit(model, train_loader, val_loader)   # model(x) returns logits [N, C]
    """

    prefix = "cm"
    prog_bar_keys = ("dim",)
    _explicit_classes_arg = "`classes=` or `pairs=`"
    _cost_arguments = ("anchors_per_target", "num_pairs", "max_classes")
    _key_patterns = (
        r"dim(_std|_frac)?",
        r"dim_class_\d+",
        r"dim_p[0-9.]+",
        r"boundary_dim(_std|_frac)?",
        r"cutting_dim|temperature|saturated|unreached|success_dist_(median|p90)|outside_frac",
    )

    def __init__(
        self,
        every_n_epochs: int = 10,
        num_anchors: int = 10,
        *,
        classes: Sequence[int] | None = None,
        max_classes: int | None = 20,
        num_pairs: int | None = 5,
        pairs: Sequence[Sequence[int]] | None = None,
        threshold: float = 0.9,
        boundary_threshold: float = 0.8,
        extra_thresholds: Sequence[float] = (),
        anchors_per_target: int | None = 8,
        dims: int | Sequence[int] = 10,
        settings: OptimizerSettings | None = None,
        max_steps: int | None = None,
        chunk_size: int = 2048,
        num_bootstrap: int = 100,
        warm_start: bool = True,
        max_seconds: float | None = None,
        max_cost_frac: float | None = None,
        seed: int = 0,
        batch_to_inputs: BatchReader | None = None,
        input_key: str | None = None,
        label_key: str | None = None,
        dataloader_idx: int = 0,
        max_scan_batches: int | None = None,
        get_model: Callable[[pl.LightningModule], nn.Module | Sequence[nn.Module]] | None = None,
        output_transform: Callable[[Any], Tensor] | None = None,
        prefix: str | None = None,
        log_figures: bool = True,
        prog_bar: bool = False,
        verbose: bool = True,
        strict: bool = False,
        on_nonfinite: str = "log_nan",
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            num_anchors=num_anchors,
            max_cost_frac=max_cost_frac,
            seed=seed,
            batch_to_inputs=batch_to_inputs,
            input_key=input_key,
            label_key=label_key,
            dataloader_idx=dataloader_idx,
            max_scan_batches=max_scan_batches,
            get_model=get_model,
            output_transform=output_transform,
            prefix=prefix,
            log_figures=log_figures,
            prog_bar=prog_bar,
            verbose=verbose,
            strict=strict,
            on_nonfinite=on_nonfinite,
        )
        self.classes = _check_classes(classes)
        self.max_classes = check_int(max_classes, "max_classes", minimum=2, allow_none=True)
        self.num_pairs = check_int(num_pairs, "num_pairs", minimum=0, allow_none=True)
        self.pairs_arg = _check_pairs(pairs)
        if self.pairs_arg is not None and num_pairs != 5:
            raise ValueError(
                f"Pass either `pairs` (explicit pairs) or `num_pairs` (random pairs), not both (num_pairs={num_pairs!r})."
            )
        self.threshold = check_probability(threshold, "threshold")
        self.boundary_threshold = check_probability(boundary_threshold, "boundary_threshold")
        if isinstance(extra_thresholds, str) or not isinstance(extra_thresholds, Sequence):
            raise TypeError(f"`extra_thresholds` must be a sequence of numbers in (0, 1], got {extra_thresholds!r}.")
        self.extra_thresholds = tuple(check_probability(t, "extra_thresholds") for t in extra_thresholds)
        self.anchors_per_target = check_int(anchors_per_target, "anchors_per_target", allow_none=True)
        self.dims = _check_dims(dims)
        if settings is not None and not isinstance(settings, OptimizerSettings):
            raise TypeError(f"`settings` must be a cm_monitor.OptimizerSettings, got a {type(settings).__name__}.")
        settings = settings if settings is not None else OptimizerSettings()
        if max_steps is not None:
            check_int(max_steps, "max_steps")
            settings = replace(settings, max_steps=max_steps)
        if extra_thresholds and settings.search == "auto":  # re-reading needs every grid point
            settings = replace(settings, search="grid")
        self.settings = settings
        top, top_boundary = math.exp(-settings.tol), math.exp(-2 * settings.tol)
        for name, t, limit in (
            ("threshold", self.threshold, top),
            *(("extra_thresholds", t, top) for t in self.extra_thresholds),
            ("boundary_threshold", self.boundary_threshold, top_boundary),
        ):
            if t > limit:
                raise ValueError(
                    f"`{name}` holds {t:g}, above {limit:.4g}: problems stop once their loss is within "
                    f"`tol` = {settings.tol:g} of the minimum, so higher levels are not measured. Pass "
                    "`settings` with smaller `tol` and `plateau_tol`."
                )
        self.chunk_size = check_int(chunk_size, "chunk_size")
        if max_seconds is not None and not (
            isinstance(max_seconds, int | float) and not isinstance(max_seconds, bool) and max_seconds > 0
        ):
            raise ValueError(f"`max_seconds` must be None or a positive number of seconds, got {max_seconds!r}.")
        self.max_seconds = max_seconds
        self.cost_estimate: CostEstimate | None = None
        self._pass_rows = self.chunk_size
        self._row_bytes: float | None = None  # memory of one row of a pass, measured at fit start
        self._memory_rows: int | None = None  # rows that the free memory holds at this measurement
        self._memory_warned = False  # the passes were made smaller for memory in this fit (warned)
        self.num_bootstrap = check_int(num_bootstrap, "num_bootstrap", minimum=0)
        if not isinstance(warm_start, bool):
            raise TypeError(f"`warm_start` must be a bool, got {warm_start!r}.")
        self.warm_start = warm_start
        if self.num_bootstrap == 1:
            raise ValueError("`num_bootstrap` must be 0 (no uncertainties) or at least 2, got 1.")
        # chosen at the start of fit (saved in the state)
        self.targets: list[int] | None = None
        self.pairs: list[tuple[int, int]] | None = None
        self.last_cm: DimensionEstimate | None = None
        self.last_boundary: DimensionEstimate | None = None

    # ------------------------------------------------------------------ GeometryMonitor interface

    def _config(self) -> dict[str, Any]:
        # everything that changes the measured series (chunk_size only changes the batching)
        return {
            "classes": self.classes,
            "max_classes": self.max_classes,
            "pairs": self.pairs_arg if self.pairs_arg is not None else self.num_pairs,
            "threshold": self.threshold,
            "boundary_threshold": self.boundary_threshold,
            "extra_thresholds": self.extra_thresholds,
            "anchors_per_target": self.anchors_per_target,
            "dims": self.dims,
            "settings": self.settings,
            "num_bootstrap": self.num_bootstrap,
        }  # max_seconds only decides whether to run

    def _explicit_classes(self) -> set[int]:
        return set(self.classes or ()) | {c for p in self.pairs_arg or () for c in p}

    def _measured_classes(self) -> list[int]:
        return list(self.targets or ())

    def _setup_targets(self, num_classes: int, generator: torch.Generator) -> None:
        self._check_targets(num_classes)
        assert self.anchor_labels is not None
        available = sorted(set(self.anchor_labels.tolist()))  # classes with enough validation examples
        if len(available) < 2:
            raise ValueError(
                f"{type(self).__name__} needs anchors of at least two classes, but only class {available} has "
                f"`num_anchors` = {self.num_anchors} validation examples."
            )
        self.targets = list(self.classes) if self.classes is not None else self._class_subset(available, generator)
        if self.pairs_arg is not None:
            self.pairs = list(self.pairs_arg)
        else:
            labels = set(self.anchor_labels.tolist())
            # a pair needs anchors of another class (or to cover every class of the model)
            pool = [p for p in itertools.combinations(sorted(self.targets), 2) if labels - set(p) or num_classes == 2]
            n = len(pool) if self.num_pairs is None else min(self.num_pairs, len(pool))
            pick = torch.randperm(len(pool), generator=generator)[:n].sort().values.tolist()
            self.pairs = [pool[i] for i in pick]

    def _class_subset(self, available: list[int], generator: torch.Generator) -> list[int]:
        """All ``available`` classes, or when there are more than ``max_classes`` a fixed random subset
        of them; the anchors are then reduced to those classes (fewer problems, a smaller checkpoint)."""
        if self.max_classes is None or len(available) <= self.max_classes:
            return list(available)
        subset = torch.tensor(self._pick_classes(available, generator))
        assert self.anchors is not None and self.anchor_labels is not None
        keep = torch.isin(self.anchor_labels, subset.to(self.anchor_labels.device))
        self.anchors, self.anchor_labels = self.anchors[keep], self.anchor_labels[keep]
        return subset.tolist()

    def _class_limit(self) -> int | None:
        return self.max_classes if self.classes is None else None  # named classes measure against all others

    def _num_problems(self, shares: int = 1) -> int:
        """(target, anchor, plane dimension) problems of one measurement, classes and pairs, on one of
        ``shares`` ranks (each optimizes every ``shares``-th (target, anchor) group of each kind)."""
        return sum(self._problem_counts(shares))

    def _problem_counts(self, shares: int = 1) -> tuple[int, int]:
        """Problems of one measurement (at most, with a bisection) on one of ``shares`` ranks: of the
        classes, of the pairs."""
        per_group = self._per_group()
        return tuple(groups * per_group for groups in self._group_counts(shares))  # type: ignore[return-value]

    def _group_counts(self, shares: int = 1) -> tuple[int, int]:
        """(target, anchor) groups of one measurement on one of ``shares`` ranks: of the classes, of
        the pairs."""
        assert self.anchor_labels is not None and self.targets is not None
        labels = self.anchor_labels.cpu()
        cap = self.anchors_per_target or labels.numel()

        def usable(t: tuple[int, ...]) -> int:  # as the core: a set of every class is anchored by all anchors
            if len(set(t)) == self.num_classes:
                return labels.numel()
            return int((~torch.isin(labels, torch.tensor(t))).sum())

        def count(sets: list[tuple[int, ...]]) -> int:
            return math.ceil(sum(min(cap, usable(t)) for t in sets) / shares)

        return count([(c,) for c in self.targets]), count([tuple(p) for p in self.pairs or []])

    def _loggable_keys(self) -> set[str]:
        keys = {"dim", "dim_frac", "cutting_dim", "temperature", "saturated", "unreached", "outside_frac"}
        keys |= {"success_dist_median", "success_dist_p90"}
        keys |= {f"dim_class_{c}" for c in self.targets or ()}
        keys |= {f"dim_p{100 * t:g}" for t in self.extra_thresholds}
        # an uncertainty needs a bootstrap and two anchors per target (see `_measure`)
        with_std = self.num_bootstrap > 0 and (self.anchors_per_target is None or self.anchors_per_target > 1)
        if with_std:
            keys.add("dim_std")
        if self.pairs:
            keys |= {"boundary_dim", "boundary_dim_frac"} | ({"boundary_dim_std"} if with_std else set())
        return keys

    def _preflight(self, trainer: pl.Trainer, model: nn.Module | list[nn.Module]) -> None:
        assert self.anchors is not None
        with isolate_rng():
            rows, per_row = self._rows_within_memory(model)
            self._row_bytes, self._memory_rows, self._memory_warned = per_row, None, False
            local = self._probe_cost(model, trainer.world_size, rows, per_row)
        self.cost_estimate = est = trainer.strategy.broadcast(local, src=0)  # every rank decides alike
        self._pass_rows = max(1, est.rows_per_pass)  # chunk_size, or less where memory says so
        name = type(self).__name__
        if self.verbose:
            rank_zero_info(f"{name}: one measurement: {est}.")
        if self.max_seconds is not None and est.seconds > self.max_seconds:
            raise MisconfigurationException(
                f"{name}: one measurement could take up to {est.seconds:.0f} s ({est}), above `max_seconds` = "
                f"{self.max_seconds:g}. Reduce the problems (`anchors_per_target`, `dims`, `num_pairs`, "
                f"`max_classes`), the step budget (`max_steps`), or raise `max_seconds`; {self._trained}."
            )

    def _probe_cost(self, model: nn.Module | list[nn.Module], shares: int, rows: int, per_row: float) -> CostEstimate:
        """:func:`~cm_monitor.cost.estimate_cost` of this rank's share with passes of ``rows``; a pass that
        runs out of memory is halved (with a warning) until one fits, else a clear error before training."""
        rows = min(rows, self._num_problems(shares))  # the probe pass is at most the problems there are
        while True:
            try:
                return estimate_cost(
                    model,
                    self.anchors,
                    problems=self._num_problems(shares),
                    per_pass=rows,
                    max_steps=self.settings.max_steps,
                    bytes_per_row=per_row,
                    rounds=self._rounds(),
                    in_flight=self._in_flight(shares),
                )
            except _OOM_ERRORS as err:
                if rows <= 1:
                    raise MisconfigurationException(
                        f"{type(self).__name__}: one forward/backward pass of a single input runs out of memory "
                        f"({type(err).__name__}: {err}); {self._trained}."
                    ) from err
                rank_zero_warn(
                    f"{type(self).__name__}: a pass of {rows} rows ran out of memory at the start of fit; "
                    f"measuring with passes of {rows // 2} rows (the answers do not depend on it)."
                )
                rows //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _per_group(self) -> int:
        """Problems of one (target, anchor) group at most, in any measurement of the run (a warm
        start may run more than a cold one: :func:`~cm_monitor.search.max_probes`)."""
        return problems_per_group(self.settings, len(self.grid()), warm=self.warm_start)

    def _rounds(self) -> int:
        """Rounds of problems one after the other in a measurement: a bisection runs one problem per
        (target, anchor) group at a time (two in a warm start's first rounds), at most
        :func:`~cm_monitor.search.max_rounds` in a row; the grid all at once."""
        if resolve_search(self.settings) == "grid":
            return 1
        return max_rounds(len(self.grid()), warm=self.warm_start)

    def _in_flight(self, shares: int) -> int | None:
        """Problems a bisection runs at once at most on one of ``shares`` ranks: one per (target,
        anchor) group, two in a warm start's first rounds; None for the grid (all at once)."""
        if resolve_search(self.settings) == "grid":
            return None
        return sum(self._group_counts(shares)) * (2 if self.warm_start else 1)

    def _rows_within_memory(self, model: nn.Module | list[nn.Module]) -> tuple[int, float]:
        """Rows per pass that fit in half the free memory of the model's device (``chunk_size`` scaled
        down if needed), and the bytes per row (activations and the pool's own state). Refuses when
        not even one row fits."""
        assert self.anchors is not None
        grid = self.grid()
        D = self.anchors[0].numel()
        rows = rows_per_pass(D, grid, self.settings, self.chunk_size)
        state = pool_bytes(D, grid[-1], choose_planes(self.settings.planes, D, grid[-1]) == "dense", 1)
        per_row = activation_bytes_per_row(model, self.anchors) + state
        device, free = self._free_memory(model)
        if free is None or rows * per_row <= free / 2:
            return rows, per_row
        fit = _rows_in_half(free, per_row)
        name = type(self).__name__
        if fit < 1:
            raise MisconfigurationException(
                f"{name}: one plane point needs about {per_row / 2**20:.0f} MiB (activations and the planes' state), "
                f"more than half the {free / 2**20:.0f} MiB free on {device}; {self._trained}."
            )
        rank_zero_warn(
            f"{name}: {rows} plane points per pass would need about {rows * per_row / 2**30:.1f} GiB, more than half "
            f"the {free / 2**30:.1f} GiB free on {device}: running {fit} per pass instead "
            "(`chunk_size` scaled down; the answers do not depend on it, only the time does)."
        )
        return fit, per_row

    def _free_memory(self, model: nn.Module | list[nn.Module]) -> tuple[torch.device, int | None]:
        """The model's device and the bytes free on it now (None: unknown)."""
        assert self.anchors is not None
        device = model_device(as_members(model), self.anchors.device)
        return device, available_bytes(device)

    def _plan_passes(self, model: nn.Module | list[nn.Module]) -> None:
        self._pass_rows, self._row_bytes = self._rows_within_memory(model)

    def _fit_to_free_memory(self, model: nn.Module | list[nn.Module], part: tuple[int, int]) -> None:
        """Before a measurement: :attr:`_memory_rows`, the rows that half the device's free memory
        holds now at the bytes per row measured at fit start (training allocates gradients and
        optimizer state after that estimate: Adam's moments at its first step), or None if unknown.
        This measurement's passes hold no more; the next one looks again. Warned once per fit when
        it makes the passes smaller (on the rank where it does: each rank has its own memory)."""
        self._memory_rows = None
        if self._row_bytes is None or self.anchors is None:
            return
        device, free = self._free_memory(model)
        if free is None:
            return
        planned = self._pass_size(part)
        self._memory_rows = max(1, _rows_in_half(free, self._row_bytes))
        if self._memory_rows < planned and not self._memory_warned:
            self._memory_warned = True
            rank = f" (rank {part[0]})" if part[1] > 1 else ""
            warnings.warn(
                f"{type(self).__name__}{rank}: half the {free / 2**30:.1f} GiB now free on {device} holds "
                f"{self._memory_rows} plane points per pass, fewer than the {planned} this measurement would run "
                "(training's gradients and optimizer state came after the estimate at the start of fit): "
                "measuring with smaller passes while memory is short (the answers do not depend on it).",
                UserWarning,
                stacklevel=2,
            )

    def _check_targets(self, num_classes: int) -> None:
        name = type(self).__name__
        for c in self.classes or ():
            if c >= num_classes:
                raise ValueError(f"{name}: `classes` holds {c}, but the model has {num_classes} classes.")
        for p in self.pairs_arg or ():
            if max(p) >= num_classes:
                raise ValueError(f"{name}: `pairs` holds {p}, but the model has {num_classes} classes.")
        if self.anchors is not None:
            try:
                self.grid()
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err

    def _extra_state(self) -> dict[str, Any]:
        return {"targets": self.targets, "pairs": self.pairs}

    def _forget_estimates(self) -> None:
        self.last_cm = self.last_boundary = None  # no warm start from other anchors or another run

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.targets = state.get("targets")
        pairs = state.get("pairs")
        self.pairs = None if pairs is None else [tuple(p) for p in pairs]

    def _summary(self, values: Mapping[str, float]) -> str:
        D = self.anchors[0].numel() if self.anchors is not None else 0
        parts = []
        if "dim" in values:
            parts.append(f"{self.prefix}/dim = {values['dim']:.2f} ± {values.get('dim_std', math.nan):.2f} (D = {D})")
        if "boundary_dim" in values:
            parts.append(
                f"{self.prefix}/boundary_dim = {values['boundary_dim']:.2f} ± {values.get('boundary_dim_std', math.nan):.2f}"
            )
        return ", ".join(parts) if parts else "no value"

    def grid(self) -> list[int]:
        """The plane dimensions measured (needs the anchors, i.e. after the start of fit)."""
        if self.anchors is None:
            raise RuntimeError("The anchors are drawn at the start of fit; no grid before.")
        D = self.anchors[0].numel()
        if isinstance(self.dims, int):
            return default_dims(D, self.dims)
        bad = [d for d in self.dims if d > D]
        if bad:
            raise ValueError(f"`dims` holds {bad}, above D = {D} (the number of input elements).")
        return list(self.dims)

    def _pass_size(self, part: tuple[int, int]) -> int:
        """Rows of the work pool: at most ``chunk_size`` (and the memory bound), at most the problems in
        flight on this rank: every problem of the grid; by bisection one per (target, anchor) group,
        two for a group with a warm start (classes and pairs share one pool)."""
        if resolve_search(self.settings) == "grid":
            flight = self._num_problems(part[1])
        else:
            flight = sum(self._group_counts(part[1]))
            starts = [self._start(self.last_cm, self.targets, self.threshold)]
            if self.pairs:
                starts.append(self._start(self.last_boundary, self.pairs, self.boundary_threshold))
            flight += sum(math.ceil(_hinted(start) / part[1]) for start in starts if start is not None)
        return max(1, min(self._pass_rows, self.chunk_size, flight, self._memory_rows or flight))

    def _start(self, last: DimensionEstimate | None, targets: list, threshold: float) -> DimensionEstimate | None:
        """The previous measurement as the warm start of this one, if it measured the same targets on
        the same grid at the same threshold (not after a change of configuration or a resume)."""
        if not self.warm_start or last is None or last.part is not None:
            return None
        same = list(last.targets) == [t if isinstance(t, int) else tuple(t) for t in targets]
        same = same and last.dims.tolist() == list(self.grid()) and math.isclose(last.threshold, threshold)
        return last if same else None

    def _measure_part(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: nn.Module | list[nn.Module],
        part: tuple[int, int],
    ) -> tuple[DimensionEstimate, DimensionEstimate | None]:
        """This rank's share of the (target, anchor) groups, classes and pairs (partial estimates)."""
        assert self.anchors is not None and self.anchor_labels is not None and self.targets is not None
        self._fit_to_free_memory(model, part)
        common = {
            "dims": self.grid(),
            "generator": self.seed,  # an int: the same planes and anchor subsets at every evaluation
            "anchors_per_target": self.anchors_per_target,
            # an out-of-memory retry halves chunk_size; the free memory may hold fewer rows
            "chunk_size": min(self._pass_rows, self.chunk_size, self._memory_rows or self.chunk_size),
            "num_bootstrap": self.num_bootstrap,
            "settings": self.settings,
            "part": part,
        }
        n_cm, n_pairs = self._problem_counts(part[1])  # this rank's share
        cm_start = self._start(self.last_cm, self.targets, self.threshold)
        with warnings.catch_warnings(), self._progress(trainer) as progress:
            # the core warns about NaN/inf on every rank; the notes of _finish say it once, on rank 0
            warnings.filterwarnings("ignore", message="NaN/inf appeared while optimizing", category=RuntimeWarning)
            report = progress.part(0, n_cm + n_pairs, n_cm + n_pairs)
            if not self.pairs:
                cm = cm_dimension(
                    model, self.anchors, self.anchor_labels, classes=self.targets, threshold=self.threshold,
                    progress=report, start=cm_start, **common,
                )  # fmt: skip
                return cm, None
            # classes and pairs in one work pool: the pairs fill the rows the classes' tail leaves free
            cm, boundary = cm_and_boundary_dimension(
                model, self.anchors, self.anchor_labels, classes=self.targets, pairs=self.pairs,
                threshold=self.threshold, boundary_threshold=self.boundary_threshold, progress=report,
                start=cm_start, boundary_start=self._start(self.last_boundary, self.pairs, self.boundary_threshold),
                **common,
            )  # fmt: skip
        return cm, boundary

    def _finish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        parts: list[tuple[DimensionEstimate, DimensionEstimate | None]],
    ) -> Measurement:
        """Merge the ranks' shares into the estimates of the whole measurement, and read the values."""
        assert self.anchors is not None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NaN/inf appeared while optimizing", category=RuntimeWarning)
            cm = DimensionEstimate.merge([p[0] for p in parts])
            boundary = None if parts[0][1] is None else DimensionEstimate.merge([p[1] for p in parts])  # type: ignore[misc]
        self.last_cm, self.last_boundary = cm, boundary
        D = self.anchors[0].numel()
        notes: list[str] = []

        values: dict[str, float] = {}
        per_class, mean, std = _read(cm, "class", notes)
        for c, v in per_class.items():
            values[f"dim_class_{c}"] = v
        values["dim"], values["dim_frac"] = mean, mean / D
        values["cutting_dim"] = D - mean  # mean d* (a class never reached counts as d* = D)
        values["temperature"] = cm.temperature
        values["saturated"] = float(cm.saturated.sum())
        values["unreached"] = float((torch.isnan(cm.cutting_dim) & ~cm.failed).sum())
        # where the successes lie; nothing to say when no anchor reached any class
        values.update({k: v for k, v in _locality(cm).items() if math.isfinite(v)})
        # an uncertainty needs a bootstrap and at least two anchors per target; else no *_std keys
        single = [
            t
            for est in (cm, boundary)
            if est is not None
            for t, n in zip(est.targets, (est.anchor_index >= 0).sum(1).tolist(), strict=True)
            if n < 2
        ]
        with_std = self.num_bootstrap > 0 and not single
        if single and self.num_bootstrap > 0 and self.num_measurements == 0:
            notes.append(
                f"targets {single} have fewer than two anchors, so there is no uncertainty: the `*_std` keys are "
                "not logged (raise `num_anchors` or `anchors_per_target`)."
            )
        if with_std:
            values["dim_std"] = std
        for t in self.extra_thresholds:
            _, values[f"dim_p{100 * t:g}"], _ = _read(cm.at(t), f"class (p = {t:g})", [])
        if boundary is not None:
            _, mean, std = _read(boundary, "pair", notes)
            values["boundary_dim"] = mean
            values["boundary_dim_frac"] = mean / D
            if with_std:
                values["boundary_dim_std"] = std

        epoch = trainer.current_epoch

        def figure() -> Any:
            from cm_monitor.plotting import curves_figure

            return curves_figure(cm, boundary, suptitle=f"epoch {epoch}")

        return Measurement(values=values, figures={"curves": figure}, notes=notes, nonfinite=_nonfinite(cm, boundary))


def _nonfinite(cm: DimensionEstimate, boundary: DimensionEstimate | None) -> str | None:
    """What came out NaN/inf because of the model's output, or None."""
    causes = []
    if not math.isfinite(cm.temperature):
        causes.append("on the anchors: no temperature")
    for est, what in ((cm, "class"), (boundary, "pair")):
        bad = [] if est is None else [t for t, f in zip(est.targets, est.failed.tolist(), strict=True) if f]
        if bad:
            causes.append(f"NaN/inf during the optimization for {what} {bad}")
    return "; ".join(causes) or None


def _locality(est: DimensionEstimate) -> dict[str, float]:
    loc = est.locality()
    return {
        "success_dist_median": loc["distance_median"],
        "success_dist_p90": loc["distance_p90"],
        "outside_frac": loc["outside_frac"],
    }


def _read(est: DimensionEstimate, what: str, notes: list[str]) -> tuple[dict[Any, float], float, float]:
    """Per-target dimensions, their mean and its uncertainty; NaN where the optimization failed."""
    failed = est.failed.tolist()
    dims = est.dimension.tolist()
    stds = est.dimension_std.tolist()
    per_target: dict[Any, float] = {}
    unreached, bad = [], []
    var, resolved = 0.0, 0
    for t, d, s, f, sat in zip(est.targets, dims, stds, failed, est.saturated.tolist(), strict=True):
        if f:
            bad.append(t)
            per_target[t] = math.nan
            continue
        if not math.isfinite(d):  # the curve never reaches the threshold, even at d = D
            unreached.append(t)
            per_target[t] = 0.0
            continue  # a floor, with no uncertainty of its own
        per_target[t] = d
        if not sat:  # a saturated target's d* is only a bound: it has no uncertainty either
            var += s * s  # NaN without a bootstrap (num_bootstrap = 0 or a single anchor): no std then
            resolved += 1
    top = int(est.dims[-1])
    if unreached:
        at = f"d = D = {top}" if top == est.input_dim else f"d = {top}, the largest of `dims`"
        notes.append(
            f"{what} {unreached} never reached the threshold {est.threshold:g} even at {at}; logged as dimension 0."
        )
    saturated = [t for t, c in zip(est.targets, est.saturated.tolist(), strict=True) if c]
    if saturated:
        low = int(est.dims[0])
        hint = "start `dims` at 1" if low > 1 else "a smaller `max_radius` or a higher threshold resolves them"
        notes.append(
            f"{what} {saturated} are saturated: they reached the threshold {est.threshold:g} already at the smallest "
            f"plane dimension d = {low}, so their dimension is at least {est.input_dim - low}, logged as that, "
            f"without uncertainty ({hint})."
        )
    if bad:  # a mean over the other targets would not be comparable with earlier ones (see _nonfinite)
        return per_target, math.nan, math.nan
    n = len(per_target)
    # the uncertainty of the mean from the targets that have one (none if no target has one)
    return per_target, sum(per_target.values()) / n, math.sqrt(var) / n if resolved else math.nan


def _check_classes(classes: Sequence[int] | None) -> list[int] | None:
    if classes is None:
        return None
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"`classes` must be a sequence of class ids or None, got {classes!r}.")
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"`classes` must hold non-negative integer class ids, got {c!r}.")
        out.append(c)
    if not out:
        raise ValueError("`classes` is empty; pass None for all classes.")
    if len(set(out)) != len(out):
        raise ValueError(f"`classes` repeats a class: {out}.")
    return out


def _check_pairs(pairs: Sequence[Sequence[int]] | None) -> list[tuple[int, int]] | None:
    if pairs is None:
        return None
    if isinstance(pairs, str) or not isinstance(pairs, Sequence):
        raise TypeError(f"`pairs` must be a sequence of class pairs such as [(0, 1), (2, 3)], got {pairs!r}.")
    out = []
    for p in pairs:
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) != 2:
            raise ValueError(f"`pairs` must hold pairs of class ids such as (0, 1), got {p!r}.")
        a, b = p
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in (a, b)) or a == b:
            raise ValueError(f"`pairs` must hold pairs of two different non-negative class ids, got {p!r}.")
        out.append((a, b))
    if len(set(out)) != len(out):
        raise ValueError(f"`pairs` repeats a pair: {out}.")
    return out


def _check_dims(dims: int | Sequence[int]) -> int | list[int]:
    if isinstance(dims, int) and not isinstance(dims, bool):
        if dims < 2:
            raise ValueError(f"`dims` as a number of grid points must be >= 2, got {dims}.")
        return dims
    if isinstance(dims, str) or not isinstance(dims, Sequence) or not dims:
        raise TypeError(f"`dims` must be an int (grid size) or a non-empty sequence of plane dimensions, got {dims!r}.")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"`dims` must hold positive integers, got {d!r}.")
        out.append(d)
    return sorted(set(out))


def _rows_in_half(free: int, per_row: float) -> int:
    """Rows of ``per_row`` bytes that half of ``free`` bytes holds (a pass may take half the free memory)."""
    return int(free / 2 // per_row)


def _hinted(est: DimensionEstimate) -> int:
    """(target, anchor) groups of ``est`` whose first success is known (``K`` for never): a warm start
    from ``est`` runs two problems of each at once, in its first round or, from an end of the grid, in
    its second."""
    return int((first_success(est) >= 0).sum())
