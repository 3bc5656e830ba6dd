"""Shared machinery of the geometry monitors (Lightning callbacks).

:class:`GeometryMonitor` does everything that does not depend on what is measured:

* **anchors**: at the start of fit, a stratified random sample of ``num_anchors`` validation inputs
  per class is drawn on global rank 0 (with a private generator, inside
  :func:`~lightning.pytorch.utilities.seed.isolate_rng`, after the module's batch-transfer hooks)
  and broadcast to every rank, so all ranks measure the same anchors although each one sees its
  own shard of the validation data. Errors (no validation data, too few examples of a class, an
  unrecognized batch) are raised then, on every rank, not in the middle of the run;
* **schedule**: measure at the first validation of the run, then at the first validation at least
  ``every_n_epochs`` epochs after the previous measurement; never during the sanity check or
  outside ``trainer.fit``;
* **logging**: through :meth:`~lightning.pytorch.core.LightningModule.log` from
  ``on_validation_epoch_end``, so every logger, ``EarlyStopping`` and ``ModelCheckpoint`` see the
  values; at validations without a measurement the last measured values are logged again;
  figures go to every :class:`~lightning.pytorch.loggers.TensorBoardLogger`;
* **cost**: each measurement is timed; its seconds and its fraction of the epoch are logged and
  reported in one line (rank zero); with ``max_cost_frac`` a budget postpones measurements that
  would take more than that fraction of the fit's wall time;
* **agreement across ranks**: every rank measures (a model may issue collectives in its forward),
  then global rank 0's values, notes and timing are broadcast, so all ranks log the same keys and
  the same values, and ``EarlyStopping`` decides the same on all of them;
* **numerical failure**: non-finite values are never logged. A key keeps its last finite value
  (with a warning); a key that has no finite value yet is not logged, and if another callback
  (``EarlyStopping``, ``ModelCheckpoint``) monitors it the monitor raises a clear error instead
  of letting that callback fail on a missing key;
* **state**: anchors, seed, chosen targets and the last values are in :meth:`state_dict`, so a run
  resumed from a checkpoint continues the same series. Each ``trainer.fit`` that does not resume
  from a checkpoint starts a new series (anchors drawn again, last values forgotten).

A subclass sets :attr:`prefix`, implements :meth:`_measure` (and optionally :meth:`_setup_targets`,
:meth:`_check_targets`, :meth:`_config`, :meth:`_extra_state`, :meth:`_load_extra_state`,
:meth:`_summary`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from cm_monitor._model import (
    ModelCallError,
    OutputTransform,
    as_members,
    check_logits,
    logits_models,
    measuring,
    model_device,
    model_float_dtype,
    synchronize,
)
from cm_monitor.anchors import AnchorSample, BatchReader, make_batch_reader, sample_anchors

_STATE_VERSION = 1


@dataclass
class Measurement:
    """What a monitor's :meth:`GeometryMonitor._measure` returns.

    Attributes:
        values: metric name (without the monitor's prefix, e.g. ``"dim"``) → value. NaN/inf marks
            a value that could not be measured: it is not logged (its last finite value is logged
            again). Keys missing here also keep their last value.
        figures: tag (without prefix) → function that builds a matplotlib figure (called on global
            rank zero only, and only when a TensorBoard logger is attached).
        notes: short warnings to report (rank zero) about this measurement.
    """

    values: dict[str, float]
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_int(value: object, name: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer ``>= minimum`` (or None when allowed), else a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}{extra}, got {value!r}.")
    return value


def check_probability(value: object, name: str) -> float:
    """``value`` if it is a number in (0, 1], else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}.")
    return float(value)


class GeometryMonitor(Callback):
    """Base class of the monitors: anchors, schedule, logging, cost and state (see the module docstring).

    Args:
        every_n_epochs: measure at most once every this many epochs (the first validation of a
            run is always measured); validations in between log the last measured values again.
        num_anchors: anchors drawn per class from the validation data.
        max_cost_frac: a budget: at most this fraction of the fit's wall time (since its start, this
            process) is spent measuring. A due measurement is postponed to a later validation
            (the last values are logged again, ``{prefix}/measured = 0``) while the previous
            measurement's duration says it would exceed the budget; the first measurement of
            each ``trainer.fit`` (a resumed one included) always runs. ``None``: no budget. The
            schedule then depends on the machine's speed.
        seed: seeds the anchor sample and the measurement's random numbers, which stay fixed for
            the run (common random numbers).
        batch_to_inputs: a function mapping a validation batch (after the module's batch-transfer
            hooks) to ``(inputs, labels)``; default: tuples/lists ``(inputs, labels, ...)`` or dicts.
        input_key: the key of the inputs in dict batches (default: the first present of ``x``,
            ``input``, ``inputs``, ``image``, ``images``, ``pixel_values``, ``features``, ``data``).
        label_key: the key of the labels in dict batches (default: the first present of ``y``,
            ``label``, ``labels``, ``target``, ``targets``, ``class``, ``classes``).
        dataloader_idx: which validation dataloader the anchors come from, when there are several.
        max_scan_batches: read at most this many validation batches when drawing anchors (default:
            the whole validation dataloader, i.e. this rank's shard of it; ``limit_val_batches``
            and ``fast_dev_run`` do not shrink it. A dataloader without a length is read for as
            many batches as one validation epoch reads).
        get_model: maps the LightningModule to the ``nn.Module`` (or list of them: an ensemble)
            that returns logits ``[N, C]`` for a batch of inputs; default: the LightningModule
            itself. The monitor calls ``model(inputs)`` with the tensor of inputs only: a
            LightningModule whose ``forward`` takes a dict batch or other arguments needs, e.g.,
            ``get_model=lambda module: module.net`` (the network inside it), or an ``nn.Module``
            around it whose ``forward`` takes the tensor.
        output_transform: maps what the model returns to its logits ``[N, C]``; default
            :func:`~cm_monitor.default_output_transform` (a tensor, the first element of a tuple,
            ``out["logits"]`` or ``out.logits``, as HuggingFace models return). A single logit
            ``[N, 1]`` (a binary classifier) is read as two classes ``[0, z]``.
        prefix: the logged keys are ``{prefix}/...`` (default: the monitor's, e.g. ``cm``). Two
            monitors of the same kind in one Trainer (other settings, or one per validation
            dataloader) need different prefixes.
        log_figures: also send figures to TensorBoard loggers.
        prog_bar: show the headline metric in the progress bar.
        verbose: report each measurement (value, seconds, fraction of the epoch) in one line.
    """

    #: Prefix of the logged keys, e.g. ``"cm"`` → ``cm/dim``. Set by subclasses (the default of
    #: the ``prefix`` argument).
    prefix: str = "geometry"
    #: Keys shown in the progress bar when ``prog_bar=True`` (without prefix).
    prog_bar_keys: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        every_n_epochs: int = 1,
        num_anchors: int = 4,
        max_cost_frac: float | None = None,
        seed: int = 0,
        batch_to_inputs: BatchReader | None = None,
        input_key: str | None = None,
        label_key: str | None = None,
        dataloader_idx: int = 0,
        max_scan_batches: int | None = None,
        get_model: Callable[[pl.LightningModule], nn.Module | Sequence[nn.Module]] | None = None,
        output_transform: OutputTransform | None = None,
        prefix: str | None = None,
        log_figures: bool = True,
        prog_bar: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if prefix is not None:
            if not isinstance(prefix, str):
                raise TypeError(f"`prefix` must be a string or None, got {prefix!r}.")
            if not prefix or "/" in prefix or any(c.isspace() for c in prefix):
                raise ValueError(f"`prefix` must be a non-empty name without '/' or whitespace, got {prefix!r}.")
            self.prefix = prefix
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs")
        self.num_anchors = check_int(num_anchors, "num_anchors")
        if max_cost_frac is not None:
            max_cost_frac = check_probability(max_cost_frac, "max_cost_frac")
        self.max_cost_frac = max_cost_frac
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
        self.seed = seed
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"`{name}` must be a string or None, got {key!r}.")
        if batch_to_inputs is not None and (input_key is not None or label_key is not None):
            raise ValueError("Pass either `batch_to_inputs` or `input_key`/`label_key`, not both.")
        self._read_batch = make_batch_reader(batch_to_inputs, input_key=input_key, label_key=label_key)
        self.input_key, self.label_key = input_key, label_key
        self.dataloader_idx = check_int(dataloader_idx, "dataloader_idx", minimum=0)
        self.max_scan_batches = check_int(max_scan_batches, "max_scan_batches", allow_none=True)
        if get_model is not None and not callable(get_model):
            raise TypeError(f"`get_model` must be callable (LightningModule -> nn.Module), got {get_model!r}.")
        self.get_model = get_model
        if output_transform is not None and not callable(output_transform):
            raise TypeError(
                f"`output_transform` must be None or a function (model output -> logits [N, C]), got {output_transform!r}."
            )
        self.output_transform = output_transform
        for name, flag in (("log_figures", log_figures), ("prog_bar", prog_bar), ("verbose", verbose)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
        self.log_figures, self.prog_bar, self.verbose = log_figures, prog_bar, verbose

        # state (see state_dict)
        self.anchors: Tensor | None = None
        self.anchor_labels: Tensor | None = None
        self.num_classes: int | None = None
        self.last_values: dict[str, float] = {}
        self.last_measured_epoch: int | None = None
        self.num_measurements = 0
        # run-time only
        #: total seconds spent measuring in this process (not saved in checkpoints)
        self.total_seconds = 0.0
        self._interval_start: float | None = None
        self._restored = False  # load_state_dict ran after this fit's `setup` (which clears the flag)
        self._fit_start: float | None = None
        self._fit_seconds = 0.0  # seconds spent measuring in this fit (for the budget)
        self._last_seconds: float | None = None  # duration of the last measurement in this fit

    # ------------------------------------------------------------------ subclass interface

    def _config(self) -> dict[str, Any]:
        """The subclass's settings that change the measured series (go into :attr:`state_key`)."""
        return {}

    def _setup_targets(self, num_classes: int, generator: torch.Generator) -> None:
        """Choose what to measure, once per run, when the anchors are first drawn (not on resume)."""

    def _preflight(self, trainer: pl.Trainer, model: nn.Module | list[nn.Module]) -> None:
        """Estimate (and possibly refuse) the cost of a measurement at the start of fit."""

    def _check_targets(self, num_classes: int) -> None:
        """Raise a clear error if the configured targets do not fit a model with ``num_classes`` classes."""

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module | list[nn.Module]
    ) -> Measurement:
        """Measure ``model`` on :attr:`anchors` and return the values to log."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _summary(self, values: Mapping[str, float]) -> str:
        """One-line summary of the values (keys without prefix; used in the per-measurement report)."""
        return ", ".join(f"{k} = {v:.4g}" for k, v in values.items())

    # ------------------------------------------------------------------ Lightning hooks

    @property
    def state_key(self) -> str:
        # what changes the series: where the anchors come from, how many, the seed, and the
        # subclass's settings (functions such as `get_model` or `batch_to_inputs` are not included)
        return self._generate_state_key(
            prefix=self.prefix,
            num_anchors=self.num_anchors,
            seed=self.seed,
            dataloader_idx=self.dataloader_idx,
            max_scan_batches=self.max_scan_batches,
            input_key=self.input_key,
            label_key=self.label_key,
            **self._config(),
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # runs before Lightning restores a checkpoint's callback states: only a restore after
        # this point (this fit's `ckpt_path`) continues a series
        self._restored = False
        for other in trainer.callbacks:
            if other is not self and isinstance(other, GeometryMonitor) and other.prefix == self.prefix:
                raise MisconfigurationException(
                    f"{type(self).__name__} and {type(other).__name__} in one Trainer both log under "
                    f"'{self.prefix}/', so one would overwrite the other's values: pass another `prefix=` "
                    f"to one of them (e.g. prefix='{self.prefix}_2')."
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the anchors (new run) or check the restored ones (run resumed from a checkpoint)."""
        self._interval_start = self._fit_start = time.perf_counter()
        self._fit_seconds, self._last_seconds = 0.0, None
        model = self._model(pl_module)
        if not self._restored:  # a new series, also when this monitor served an earlier fit
            if self.anchors is not None and trainer.current_epoch > 0:
                rank_zero_warn(
                    f"{type(self).__name__}: this fit continues at epoch {trainer.current_epoch} without restoring "
                    "the monitor from a checkpoint, so a new series starts (anchors drawn again, first validation "
                    "measured). Pass `ckpt_path=` to `trainer.fit` to continue the series.",
                    category=UserWarning,
                )
            self._reset_series()
        if self.anchors is None:
            self._draw_anchors(trainer, pl_module, model)
        else:  # restored from a checkpoint (saved on the CPU): back to the model's device
            self.anchors = self.anchors.to(pl_module.device)
            self.anchor_labels = self.anchor_labels.to(pl_module.device)
            num_classes = self._num_classes(model, self.anchors)
            if self.num_classes is not None and num_classes != self.num_classes:
                raise MisconfigurationException(
                    f"{type(self).__name__}: the restored anchors were drawn for a model with "
                    f"{self.num_classes} classes, but this model returns {num_classes}."
                )
            self.num_classes = num_classes
        self._check_targets(self.num_classes)
        self._preflight(trainer, model)
        self._warn_budget_with_watchers(trainer)

    def _warn_budget_with_watchers(self, trainer: pl.Trainer) -> None:
        if self.max_cost_frac is None:
            return
        watched = sorted(self._watched_keys(trainer))
        if watched:
            rank_zero_warn(
                f"{type(self).__name__}: with `max_cost_frac` measurements may be postponed, and the "
                f"validations in between log the last values again; a callback watching {watched} (e.g. "
                "EarlyStopping's patience) counts them as validations without improvement.",
                category=UserWarning,
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interval_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validations inside an epoch (val_check_interval < 1): the next interval starts now
        if not trainer.sanity_checking:
            self._interval_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure (when due) and log; every rank runs this and logs the same keys."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.anchors is None:
            return
        epoch = trainer.current_epoch
        seconds = fraction = 0.0
        if self._due(epoch) and self._within_budget(trainer, epoch):
            seconds, fraction = self._run_measurement(trainer, pl_module, epoch)
        values = dict(self.last_values)
        values[f"{self.prefix}/seconds"] = seconds
        values[f"{self.prefix}/cost_frac"] = fraction
        values[f"{self.prefix}/measured"] = 1.0 if seconds > 0 else 0.0
        self._log_values(pl_module, values)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            # on the CPU, so that a checkpoint written on a GPU loads anywhere
            "anchors": None if self.anchors is None else self.anchors.cpu(),
            "anchor_labels": None if self.anchor_labels is None else self.anchor_labels.cpu(),
            "num_classes": self.num_classes,
            "last_values": dict(self.last_values),
            "last_measured_epoch": self.last_measured_epoch,
            "num_measurements": self.num_measurements,
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds monitor state of version {version!r} "
                f"(this version reads {_STATE_VERSION}); new anchors will be drawn.",
                category=RuntimeWarning,
            )
            return
        self.seed = state_dict["seed"]
        self.anchors = state_dict["anchors"]
        self.anchor_labels = state_dict["anchor_labels"]
        self.num_classes = state_dict["num_classes"]
        self.last_values = dict(state_dict["last_values"])
        self.last_measured_epoch = state_dict["last_measured_epoch"]
        self.num_measurements = state_dict["num_measurements"]
        self._load_extra_state(state_dict)
        self._restored = True

    def _reset_series(self) -> None:
        """Forget the anchors and values of an earlier run (targets are chosen again with the anchors)."""
        self.anchors = self.anchor_labels = self.num_classes = None
        self.last_values = {}
        self.last_measured_epoch = None
        self.num_measurements = 0

    # ------------------------------------------------------------------ internals

    def _due(self, epoch: int) -> bool:
        last = self.last_measured_epoch
        return last is None or epoch - last >= self.every_n_epochs

    def _within_budget(self, trainer: pl.Trainer, epoch: int) -> bool:
        """Whether one more measurement, as long as the last one, keeps within ``max_cost_frac``."""
        if self.max_cost_frac is None or self._last_seconds is None or self._fit_start is None:
            return True
        elapsed = time.perf_counter() - self._fit_start
        spent, next_cost = self._fit_seconds, self._last_seconds
        fits = spent + next_cost <= self.max_cost_frac * (elapsed + next_cost)
        fits = bool(trainer.strategy.broadcast(fits, src=0))  # rank 0's clock decides for all ranks
        if not fits and self.verbose:
            rank_zero_info(
                f"{type(self).__name__} epoch {epoch}: measurement postponed (budget): {spent:.1f} s of "
                f"{elapsed:.1f} s measured so far, another {next_cost:.1f} s would exceed "
                f"max_cost_frac = {self.max_cost_frac:g}; the last values are logged again."
            )
        return fits

    def _model(self, pl_module: pl.LightningModule) -> nn.Module | list[nn.Module]:
        model = pl_module if self.get_model is None else self.get_model(pl_module)
        try:
            members = as_members(model, "get_model(pl_module)")
        except (TypeError, ValueError) as err:
            raise TypeError(f"{type(self).__name__}: {err}") from err
        members = logits_models(members, self.output_transform)  # logits [N, C] from any output
        return members[0] if len(members) == 1 else members

    def _run_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> tuple[float, float]:
        device = pl_module.device
        synchronize(device)
        start = time.perf_counter()
        with isolate_rng():  # a model that draws random numbers in eval mode must not shift training's
            result = self._measure(trainer, pl_module, self._model(pl_module))
            # drawing and writing the figures is part of the cost (rank 0 only); a failure there
            # must not leave the other ranks waiting in the broadcast below
            if self.log_figures and trainer.is_global_zero and result.figures:
                try:
                    self._log_figures(trainer, result.figures)
                except Exception as err:
                    result.notes.append(f"figures not written ({type(err).__name__}: {err})")
        synchronize(device)
        end = time.perf_counter()
        seconds = end - start
        self.total_seconds += seconds
        interval = end - self._interval_start if self._interval_start is not None else seconds
        fraction = seconds / interval if interval > 0 else 1.0

        # Every rank measured the same anchors with the same random numbers; rank 0's outcome is
        # what all of them log, so that they agree on the keys (finite or not) and the values.
        local = {
            "values": {f"{self.prefix}/{k}": float(v) for k, v in result.values.items()},
            "notes": list(result.notes),
            "seconds": seconds,
            "fraction": fraction,
        }
        shared = trainer.strategy.broadcast(local, src=0)
        seconds, fraction = shared["seconds"], shared["fraction"]
        self._fit_seconds += seconds
        self._last_seconds = seconds
        bad = sorted(k for k, v in shared["values"].items() if not math.isfinite(v))
        fresh = {k: v for k, v in shared["values"].items() if k not in bad}
        self.last_values.update(fresh)
        self.last_measured_epoch = epoch
        self.num_measurements += 1
        notes = list(shared["notes"])
        kept = [k for k in bad if k in self.last_values]
        missing = [k for k in bad if k not in self.last_values]
        if kept:
            notes.append(f"non-finite values not logged, their last value is logged again: {kept}")
        if missing:
            notes.append(f"non-finite values not logged, and there is no earlier value to log instead: {missing}")
        for note in notes:
            rank_zero_warn(f"{type(self).__name__} (epoch {epoch}): {note}", category=RuntimeWarning)
        self._check_watched_keys(trainer, epoch)

        if self.verbose:
            n = len(self.prefix) + 1
            rank_zero_info(
                f"{type(self).__name__} epoch {epoch}: {self._summary({k[n:]: v for k, v in fresh.items()})} | "
                f"measured in {seconds:.2f} s, {100 * fraction:.0f}% of the epoch"
            )
        return max(seconds, 1e-9), fraction

    def _watched_keys(self, trainer: pl.Trainer, strict_only: bool = False) -> set[str]:
        """Keys under this monitor's prefix that other callbacks monitor (``strict_only``: those that
        fail on a missing key, i.e. all but ``EarlyStopping(strict=False)``)."""
        return {
            key
            for cb in trainer.callbacks
            if cb is not self
            and isinstance(key := getattr(cb, "monitor", None), str)
            and key.startswith(f"{self.prefix}/")
            and (getattr(cb, "strict", True) or not strict_only)
        }

    def _check_watched_keys(self, trainer: pl.Trainer, epoch: int) -> None:
        """Raise a clear error if another callback strictly monitors one of our keys that has no value.

        Such a callback (``EarlyStopping(strict=True)``, ``ModelCheckpoint``) would fail on the
        missing key anyway; this says why. Keys that something else logs are left alone.
        """
        always = {f"{self.prefix}/{k}" for k in ("seconds", "cost_frac", "measured")}
        watched = self._watched_keys(trainer, strict_only=True)
        absent = sorted(k for k in watched if k not in self.last_values and k not in always)
        absent = [k for k in absent if k not in trainer.callback_metrics]
        if absent:
            raise RuntimeError(
                f"{type(self).__name__}: another callback monitors {absent}, but after the measurement at epoch "
                f"{epoch} this monitor has no value to log for it: either it came out NaN/inf or could not be "
                "measured, and no earlier measurement of this run gave a value (see the warnings above), or "
                f"this monitor does not log it with its configuration. It logs: {sorted(set(self.last_values) | always)}."
            )

    def _log_values(self, pl_module: pl.LightningModule, values: Mapping[str, float]) -> None:
        # All ranks hold rank 0's values (broadcast above): `max` over identical values is exact.
        prog = {f"{self.prefix}/{k}" for k in self.prog_bar_keys} if self.prog_bar else set()
        for key, value in values.items():
            pl_module.log(
                key,
                float(value),
                on_step=False,
                on_epoch=True,
                prog_bar=key in prog,
                logger=None,  # True when the Trainer has a logger, without a warning when it has none
                sync_dist=True,
                reduce_fx="max",
                batch_size=1,
            )

    def _log_figures(self, trainer: pl.Trainer, figures: Mapping[str, Callable[[], Any]]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        # the step Lightning gives the scalars logged at this validation, so that they line up
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for tag, build in figures.items():
            for lg in loggers:
                lg.experiment.add_figure(f"{self.prefix}/{tag}", build(), global_step=step, close=True)

    # -------------------------------------------------------------- anchors at fit start

    def _draw_anchors(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module | list[nn.Module]
    ) -> None:
        name = type(self).__name__
        start = time.perf_counter()
        loader, max_batches = self._val_dataloader(trainer)  # on every rank (setup has a barrier)
        payload: dict[str, Any] | None = None
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                sample = self._sample(trainer, pl_module, loader, max_batches)
                payload = {
                    "inputs": sample.inputs,
                    "labels": sample.labels,
                    "counts": sample.counts,
                    "n": sample.num_batches,
                }
            except Exception as err:
                error = err
                payload = {"error": f"{type(err).__name__}: {err}"}
        # every rank takes part in the broadcast, also when rank 0 failed, and then all raise
        payload = trainer.strategy.broadcast(payload, src=0)
        if "error" in payload:
            if error is not None:
                if isinstance(error, ValueError | TypeError):
                    raise type(error)(f"{name} could not draw anchors from the validation data: {error}") from error
                raise error
            raise RuntimeError(f"{name} could not draw anchors on global rank 0: {payload['error']}")
        device = pl_module.device  # the sample is on the CPU (also for the broadcast); measured on the device
        sample = AnchorSample(
            payload["inputs"].to(device), payload["labels"].to(device), payload["counts"], payload["n"]
        )
        num_classes = self._num_classes(model, sample.inputs)
        top = int(sample.labels.max())
        if top >= num_classes:
            raise ValueError(
                f"{name}: the validation data has class id {top}, but the model returns logits for "
                f"{num_classes} classes."
            )
        try:
            sample.check_classes(range(num_classes), self.num_anchors)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        self.anchors, self.anchor_labels, self.num_classes = sample.inputs, sample.labels, num_classes
        self._setup_targets(num_classes, torch.Generator().manual_seed(self.seed + 1))
        if self.verbose:
            rank_zero_info(
                f"{name}: drew {sample.inputs.shape[0]} anchors ({self.num_anchors} per class, "
                f"{num_classes} classes, shape {tuple(sample.inputs.shape[1:])}) from "
                f"{sample.num_batches} validation batches in {time.perf_counter() - start:.2f} s; they stay "
                "fixed for the run."
            )

    def _val_dataloader(self, trainer: pl.Trainer) -> tuple[Any, int | None]:
        name = type(self).__name__
        loaders = trainer.val_dataloaders
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        set_up_here = loaders is None
        if set_up_here:
            # Lightning sets the validation data up before `on_train_start` only when the first
            # epoch validates (or after the sanity check); do it the way its fit loop does, with
            # the global RNG isolated (a `val_dataloader()` hook may draw random numbers).
            stage = trainer.state.stage
            reload_epoch = getattr(val_loop, "_last_val_dl_reload_epoch", None)
            trainer.validating = True
            try:
                with isolate_rng():
                    val_loop.setup_data()
            except Exception as err:  # e.g. the module's default `val_dataloader()` hook
                raise MisconfigurationException(
                    f"{name} measures on validation data, but the validation dataloader could not "
                    f"be set up ({type(err).__name__}: {err}). Pass `val_dataloaders=` to "
                    "`trainer.fit` or define `val_dataloader()`."
                ) from err
            finally:
                trainer.state.stage = stage
            loaders = trainer.val_dataloaders
        if loaders is None:
            raise MisconfigurationException(
                f"{name} measures on validation data, but this run has none: pass "
                "`val_dataloaders=` to `trainer.fit` (or define `val_dataloader()`), define "
                "`validation_step`, and do not set `limit_val_batches=0`."
            )
        if isinstance(loaders, Mapping):
            flat = list(loaders.values())
        elif isinstance(loaders, list | tuple):
            flat = list(loaders)
        else:
            flat = [loaders]
        if self.dataloader_idx >= len(flat):
            raise MisconfigurationException(
                f"{name}: `dataloader_idx={self.dataloader_idx}` but there are {len(flat)} validation dataloaders."
            )
        loader = flat[self.dataloader_idx]
        max_batches = self.max_scan_batches
        if max_batches is None:
            try:
                len(loader)  # a sized loader is read to the end (`limit_val_batches` does not apply)
            except TypeError:
                n = trainer.num_val_batches[self.dataloader_idx] if trainer.num_val_batches else math.inf
                if not math.isfinite(n):
                    raise MisconfigurationException(
                        f"{name}: the validation dataloader has no length, so the anchors cannot be "
                        "drawn from all of it; pass `max_scan_batches=` (batches to read)."
                    ) from None
                max_batches = int(n)
        if set_up_here and hasattr(val_loop, "_combined_loader"):
            # hand the set-up back: Lightning sets the validation data up at its usual time, with
            # the random state it would have had without the monitor (the hook runs twice)
            val_loop._combined_loader = None
            if reload_epoch is not None:
                val_loop._last_val_dl_reload_epoch = reload_epoch
        return loader, max_batches

    def _sample(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any, max_batches: int | None
    ) -> AnchorSample:
        idx = self.dataloader_idx

        def transfer(batch: Any) -> Any:
            # what `validation_step` receives: the precision plugin's conversion (e.g. float64 for
            # "64-true"), the module's batch-transfer hooks, then the device
            batch = trainer.precision_plugin.convert_input(batch)
            hook = getattr(pl_module, "_on_before_batch_transfer", None)
            batch = hook(batch, dataloader_idx=idx) if hook is not None else batch
            return trainer.strategy.batch_to_device(batch, dataloader_idx=idx)

        stage = trainer.state.stage
        trainer.validating = True  # hooks that branch on the stage see a validation batch
        try:
            # creating a DataLoader iterator draws from the global RNG (and shuffling or workers
            # more): isolate it so that training sees exactly the random numbers it would without us
            with isolate_rng(), torch.no_grad():
                return sample_anchors(
                    loader,
                    self.num_anchors,
                    generator=torch.Generator().manual_seed(self.seed),
                    read_batch=self._read_batch,
                    max_batches=max_batches,
                    transform=transfer,
                )
        finally:
            trainer.state.stage = stage

    def _num_classes(self, model: nn.Module | list[nn.Module], anchors: Tensor) -> int:
        """Number of classes: one forward pass on two anchors, in eval mode, modes restored."""
        members = model if isinstance(model, list) else [model]
        device = model_device(members, anchors.device)
        x = anchors[:2].to(device, model_float_dtype(members, anchors.dtype))
        # eval mode, every submodule's mode restored after; a model that draws random numbers in
        # eval mode (noise layers, MC dropout) must not shift training's random stream
        try:
            with isolate_rng(), measuring(members, grad=False):
                out = members[0](x)
        except ModelCallError as err:
            raise TypeError(
                f"{type(self).__name__}: {err} The model is the LightningModule unless `get_model=` is given: pass "
                "`get_model=` a function returning the nn.Module that maps the input tensor to logits, e.g. "
                "`get_model=lambda module: module.net`, and `output_transform=` if its output is not the logits."
            ) from err
        try:
            check_logits(out, x.shape[0], None, "the model")
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"{type(self).__name__}: {err} (the model is the LightningModule unless `get_model=` is given)."
            ) from err
        return int(out.shape[1])
