"""Shared machinery of the geometry monitors (Lightning callbacks).

:class:`GeometryMonitor` does everything that does not depend on what is measured:

* **anchors**: at the start of fit, a stratified random sample of ``num_anchors`` validation inputs
  per class is drawn (with a private generator, inside
  :func:`~lightning.pytorch.utilities.seed.isolate_rng`, after the module's batch-transfer hooks)
  from the whole validation set: each rank samples its own shard with keys that depend on each
  input's content (:class:`~cm_monitor.anchors.StratifiedReservoir`), and the ranks' samples are
  gathered and merged (:func:`~cm_monitor.anchors.merge_samples`), so every rank gets the same
  anchors, whatever the number of ranks and however the data is sharded. Errors (no validation
  data, an unrecognized batch, too few examples of a class the monitor was told to measure) are
  raised then, on every rank, not in the middle of the run;
* **schedule**: measure at the first validation of the run, then at the first validation at least
  ``every_n_epochs`` epochs after the previous measurement; never during the sanity check or
  outside ``trainer.fit``;
* **logging**: through :meth:`~lightning.pytorch.core.LightningModule.log` from
  ``on_validation_epoch_end``, so every logger, ``EarlyStopping`` and ``ModelCheckpoint`` see the
  values; at validations without a measurement the last measured values are logged again;
  figures go to every logger (:mod:`cm_monitor.callbacks.figures`: TensorBoard, W&B, MLflow, a
  PNG file under the ``log_dir`` of any other), and a figure that cannot be logged is a warning;
* **progress**: a measurement that runs longer than a few seconds shows how many of its problems
  are done and the time left, in the Trainer's progress bar (rank zero; nothing when the progress
  bar is disabled; :mod:`cm_monitor.callbacks.progress`);
* **cost**: each measurement is timed; its seconds and its share of the time since the epoch (or
  the previous validation) started are logged and reported in one line (rank zero); with
  ``max_cost_frac`` a budget postpones measurements that would take more than that fraction of
  the fit's wall time. Both count the time other monitors of the Trainer spent measuring as
  neither this monitor's time nor training time, so each monitor's share is its own;
* **keys known at fit start**: a key under this monitor's prefix that ``EarlyStopping`` or
  ``ModelCheckpoint`` watches and that this configuration never logs (a typo, ``cm/boundary_dim``
  with ``num_pairs=0``) is an error at the start of fit, before any training; so is an
  ``EarlyStopping`` on a key of the monitor that the repeated values alone would make end the fit
  early, even if every measurement improved (:mod:`cm_monitor.callbacks.patience` replays the
  schedule);
* **work split across ranks**: rank ``r`` of ``n`` measures share ``(r, n)`` of the work
  (:meth:`_measure_part`: every ``n``-th (target, anchor) group, probe image or SGD step), the
  shares are gathered (one collective, which carries the failures too) and every rank merges them
  (:meth:`_finish`) into the values one process would measure; then global rank 0's values, notes
  and timing are broadcast, so all ranks log the same keys and the same values, and
  ``EarlyStopping`` decides the same on all of them;
* **failures never end training**: an exception in a measurement (CUDA out of memory after one
  retry with half the ``chunk_size``) becomes a warning, the last values are logged again with
  ``{prefix}/failed = 1``, and training goes on (``strict=True`` raises instead). A failure on any
  rank reaches every rank (a flag gathered from all of them), so they log the same keys;
* **a broken model is visible**: when the model returned NaN/inf (the subclass reports it in
  :attr:`Measurement.nonfinite`) the validation logs ``{prefix}/nonfinite = 1`` and, by
  ``on_nonfinite``, NaN (``"log_nan"``), the last finite values (``"keep_last"``) or raises.
  Other non-finite values (a quantity undefined for this model, e.g. an uncertainty without
  resolved classes) are not logged: the key keeps its last finite value, with a warning. A key
  that another callback (``EarlyStopping``, ``ModelCheckpoint``) monitors and that has no value
  is logged as the worst finite value for that callback (−3.4e38 for ``mode="max"``, +3.4e38 for
  ``"min"``, at most an ``EarlyStopping``'s ``divergence_threshold``) rather than left missing,
  with a warning;
* **incomplete validation data**: classes with fewer than ``num_anchors`` validation examples are
  left out of the measurement with a warning (an error if the monitor was told to measure them);
* **state**: anchors, seed, chosen targets and the last values are in :meth:`state_dict`, so a run
  resumed from a checkpoint continues the same series. Each ``trainer.fit`` that does not resume
  from a checkpoint starts a new series (anchors drawn again, last values forgotten).

A subclass sets :attr:`prefix`, implements :meth:`_measure_part` and :meth:`_finish` (and optionally :meth:`_setup_targets`,
:meth:`_check_targets`, :meth:`_explicit_classes`, :meth:`_measured_classes`, :meth:`_config`,
:meth:`_extra_state`, :meth:`_load_extra_state`, :meth:`_summary`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
import lightning.pytorch.strategies as strategies
import torch
from lightning.pytorch.callbacks import Callback
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
    lazy_modules,
    logits_models,
    measuring,
    model_device,
    model_float_dtype,
    synchronize,
)
from cm_monitor.anchors import (
    _LISTED,
    AnchorSample,
    BatchReader,
    OwnIterator,
    generators_kept,
    make_batch_reader,
    merge_samples,
    sample_anchors,
)
from cm_monitor.callbacks.figures import FigureWriter
from cm_monitor.callbacks.progress import MeasurementProgress
from cm_monitor.callbacks.watchers import Watchers

_STATE_VERSION = 1

#: The values of ``on_nonfinite``.
NONFINITE_POLICIES = ("log_nan", "keep_last", "raise")

#: Without a budget, a measurement that takes at least this share of its interval (a quarter of the
#: interval's own time, or more) and at least :data:`COSTLY_SECONDS` is warned about once per fit,
#: with what makes it cheaper.
COSTLY_FRACTION = 0.2
COSTLY_SECONDS = 1.0


#: CUDA out of memory (``torch.cuda.OutOfMemoryError`` before torch 2.5).
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None}
)


@dataclass
class Measurement:
    """What a monitor's :meth:`GeometryMonitor._finish` returns.

    Attributes:
        values: metric name (without the monitor's prefix, e.g. ``"dim"``) → value. NaN/inf marks
            a value that could not be measured. Without :attr:`nonfinite` it is not logged (its
            last finite value is logged again); with it, ``on_nonfinite`` decides. Keys missing
            here keep their last value.
        figures: tag (without prefix) → function that builds a matplotlib figure (called on global
            rank zero only, once per measurement, and only when the Trainer has a logger).
        notes: short warnings to report (rank zero) about this measurement.
        nonfinite: set when the model returned NaN/inf (on the anchors or on the inputs the
            measurement built from them): what came out non-finite, for the warning or the error.
    """

    values: dict[str, float]
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    nonfinite: str | None = None


@dataclass
class _Outcome:
    """What one validation's measurement came to, the same on every rank."""

    seconds: float = 0.0
    fraction: float = 0.0
    failed: bool = False
    nonfinite: bool = False

    @property
    def measured(self) -> bool:
        return self.seconds > 0 and not (self.failed or self.nonfinite)


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


def gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (one collective; every rank must call it)."""
    if trainer.world_size <= 1:
        return [obj]
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    # another kind of strategy: one broadcast from each rank
    return [trainer.strategy.broadcast(obj, src=r) for r in range(trainer.world_size)]


@contextlib.contextmanager
def logging_off(pl_module: pl.LightningModule) -> Iterator[None]:
    """``pl_module.log`` and ``log_dict`` do nothing inside (the monitor's forwards): a forward that
    logs (activation statistics, say) must not add what it computes on the monitor's inputs to the
    validation's values, nor, under ``torch.func`` transforms, leave batched tensors among them."""
    names = ("log", "log_dict")
    own = {n: pl_module.__dict__[n] for n in names if n in pl_module.__dict__}  # rare: set on the instance
    for n in names:
        object.__setattr__(pl_module, n, _ignore)  # an instance attribute hides the method
    try:
        yield
    finally:
        for n in names:
            if n in own:
                object.__setattr__(pl_module, n, own[n])
            else:
                object.__delattr__(pl_module, n)


def _shards_parameters(strategy: strategies.Strategy) -> bool:
    """Whether ``strategy`` splits the parameters across several ranks: FSDP (but ``NO_SHARD``),
    model parallelism (Lightning >= 2.3), DeepSpeed ZeRO stage 3."""
    if getattr(strategy, "world_size", 1) <= 1:
        return False
    if isinstance(strategy, strategies.FSDPStrategy):
        return getattr(strategy.sharding_strategy, "name", None) != "NO_SHARD"
    model_parallel = getattr(strategies, "ModelParallelStrategy", ())
    deepspeed = getattr(strategies, "DeepSpeedStrategy", ())
    return isinstance(strategy, model_parallel) or (
        isinstance(strategy, deepspeed) and bool(getattr(strategy, "zero_stage_3", False))
    )


def check_strategy(strategy: strategies.Strategy, name: str) -> None:
    """Refuse strategies that shard the parameters across ranks (FSDP, model parallelism, DeepSpeed
    ZeRO stage 3): each forward of such a model gathers its parameters from every rank, but the
    ranks measure different shares of the work, so their forwards would not match (a hang)."""
    if _shards_parameters(strategy):
        raise MisconfigurationException(
            f"{name}: `{type(strategy).__name__}` shards the model's parameters across ranks, and the monitors "
            "measure with unsharded forwards split across ranks (single device or DDP). Train without the "
            "monitor and measure the saved checkpoints with `cm-monitor analyze` (docs/analyze.md)."
        )


def _ignore(*args: Any, **kwargs: Any) -> None:
    """What ``self.log`` does during the monitor's forwards."""


def _part(trainer: pl.Trainer) -> tuple[int, int]:
    """This rank's share of a measurement's work: ``(global rank, world size)``."""
    return (trainer.global_rank, trainer.world_size) if trainer.world_size > 1 else (0, 1)


class GeometryMonitor(Watchers, Callback):
    """Base class of the monitors: anchors, schedule, logging, cost and state (see the module docstring).

    Args:
        every_n_epochs: measure at most once every this many epochs (the first validation of a
            run is always measured); validations in between log the last measured values again.
            A training epoch without an end (a stream validated every ``val_check_interval``)
            counts validations instead: every this many of them.
        num_anchors: anchors drawn per class from the validation data.
        max_cost_frac: a budget: at most this fraction of the fit's wall time (since its start, this
            process; the time other monitors spend measuring is not counted) is spent measuring. A due measurement is postponed to a later validation
            (the last values are logged again, ``{prefix}/measured = 0``) while the previous
            measurement's duration says it would exceed the budget; the first measurement of
            each ``trainer.fit`` (a resumed one included) always runs, and so does one that an
            ``EarlyStopping`` on a key of the monitor would otherwise stop the fit for (the repeats
            before the next validation would bring it to its patience): the budget yields then.
            ``None``: no budget. The schedule then depends on the machine's speed.
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
            the whole validation dataloader: each rank reads its shard of it; ``limit_val_batches``
            and ``fast_dev_run`` do not shrink it. A dataloader without a length is read for as
            many batches as one validation epoch reads). Under DDP each rank reads this many
            batches of its own shard, so the anchors then depend on the number of ranks.
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
        log_figures: also send figures to the Trainer's loggers (TensorBoard, W&B, MLflow; a PNG
            file under the ``log_dir`` of any other logger, e.g. ``CSVLogger``).
        prog_bar: show the headline metric in the progress bar.
        verbose: report each measurement (value, seconds, fraction of the epoch) in one line.
        strict: raise when a measurement fails (an exception in it, CUDA out of memory included)
            instead of warning and going on with ``{prefix}/failed = 1``. The errors of the start of
            fit (no validation data, unreadable batches, ...) are raised either way.
        on_nonfinite: what a validation logs when the model returned NaN/inf during the measurement
            (``{prefix}/nonfinite = 1``): ``"log_nan"`` (default) logs NaN for the monitor's values,
            so a diverged run looks broken and ``EarlyStopping(check_finite=True)`` (its default)
            stops it; ``"keep_last"`` logs the last finite values again (for a key that has none yet and
            that another callback monitors, the worst finite value for that callback, see above);
            ``"raise"`` raises a ``RuntimeError``.
    """

    #: Prefix of the logged keys, e.g. ``"cm"`` → ``cm/dim``. Set by subclasses (the default of
    #: the ``prefix`` argument).
    prefix: str = "geometry"
    #: Keys shown in the progress bar when ``prog_bar=True`` (without prefix).
    prog_bar_keys: tuple[str, ...] = ()
    #: The argument(s) that name classes to measure (for messages), if the monitor has any.
    _explicit_classes_arg: str | None = None
    #: Every key (without prefix, as regular expressions) the monitor logs with some configuration:
    #: a watched key that matches one but that this configuration does not log is an error at fit start.
    _key_patterns: tuple[str, ...] = ()

    #: measure a fixed random subset of this many classes when there are more (None: every class)
    max_classes: int | None = None
    #: Arguments besides ``every_n_epochs`` and ``max_cost_frac`` that make a measurement cheaper
    #: (named by the warning on a costly measurement).
    _cost_arguments: tuple[str, ...] = ()

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
        strict: bool = False,
        on_nonfinite: str = "log_nan",
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
        for name, flag in (
            ("log_figures", log_figures),
            ("prog_bar", prog_bar),
            ("verbose", verbose),
            ("strict", strict),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
        self.log_figures, self.prog_bar, self.verbose, self.strict = log_figures, prog_bar, verbose, strict
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"`on_nonfinite` must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {on_nonfinite!r}."
            )
        self.on_nonfinite = on_nonfinite
        self._figure_writer = FigureWriter(type(self).__name__)

        # state (see state_dict)
        self.anchors: Tensor | None = None
        self.anchor_labels: Tensor | None = None
        self.num_classes: int | None = None
        self.last_values: dict[str, float] = {}
        self.last_measured_epoch: int | None = None
        #: validations of the run so far (the sanity check's not counted), and the one of the last
        #: measurement: the schedule of a training epoch without an end
        self.num_validations = 0
        self.last_measured_validation: int | None = None
        self.num_measurements = 0
        # run-time only
        #: total seconds spent measuring in this process (not saved in checkpoints)
        self.total_seconds = 0.0
        self._interval_start: float | None = None
        self._restored = False  # load_state_dict ran after this fit's `setup` (which clears the flag)
        self._fresh_fit = False  # set at on_train_start: a new fit (not resumed) at epoch 0, step 0
        self._set_up_pending = False  # lazy modules at fit start: set up after the first training batch
        self._target_generator: torch.Generator | None = None  # set by a second anchor pass
        self._trained = "nothing was trained yet"  # what fit-start errors say about training so far
        self._fit_start: float | None = None
        self._fit_seconds = 0.0  # seconds spent measuring in this fit (for the budget)
        self._last_seconds: float | None = None  # duration of the last measurement in this fit
        self._cost_warned = False  # the warning on a costly measurement was given in this fit
        # other monitors' measuring seconds (their `total_seconds`) when the fit / interval started
        self._others_at_fit_start = 0.0
        self._others_at_interval_start = 0.0

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

    def _explicit_classes(self) -> set[int]:
        """Classes the user asked to measure by name: too few validation examples of them is an error."""
        return set()

    def _measured_classes(self) -> list[int]:
        """The classes a measurement covers (default: those of the anchors)."""
        if self.anchor_labels is None:
            return []
        return sorted(set(self.anchor_labels.tolist()))

    def _measure_part(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: nn.Module | list[nn.Module],
        part: tuple[int, int],
    ) -> Any:
        """Measure share ``part = (index, count)`` of the work on :attr:`anchors` (``(rank, world size)``).

        Returns what :meth:`_finish` needs, picklable and on the CPU: it is gathered from every rank.
        No collectives here: a rank that fails must not leave the others waiting.
        """
        raise NotImplementedError

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, parts: list[Any]) -> Measurement:
        """Combine the shares of all ranks (in rank order) into the values to log. Runs on every rank
        with the same ``parts``, so all ranks get the same values; no model call here."""
        raise NotImplementedError

    def _plan_passes(self, model: nn.Module | list[nn.Module]) -> None:
        """Size the passes to the memory of the model's device, as the start of a fit does (for
        :func:`~cm_monitor.analysis.draw_anchors`, which has no fit); nothing to size by default."""

    def _pass_size(self, part: tuple[int, int]) -> int | None:
        """The largest batch one forward pass of a measurement holds on this rank (share ``part``):
        the out-of-memory retry halves it. None: the monitor has no ``chunk_size`` to lower."""
        chunk = getattr(self, "chunk_size", None)
        return chunk if isinstance(chunk, int) else None

    def _loggable_keys(self) -> set[str]:
        """The keys (without prefix) a measurement can log with this configuration; called at the start of
        fit, after the targets are chosen. The keys logged at every validation are added by the base class."""
        return set()

    def _forget_estimates(self) -> None:
        """Drop what the last measurement left for the next one (a new series starts: other anchors,
        or a resume); the subclass's hook."""

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
        if stage == "fit":
            check_strategy(trainer.strategy, type(self).__name__)
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
        self._others_at_fit_start = self._others_at_interval_start = self._others_seconds(trainer)
        self._fit_seconds, self._last_seconds, self._cost_warned = 0.0, None, False
        self._fresh_fit = not self._restored and trainer.current_epoch == 0 and trainer.global_step == 0
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
        lazy = lazy_modules(as_members(model))
        self._set_up_pending = bool(lazy)
        if lazy:  # a forward now would initialize them, with random numbers training did not draw
            if self.verbose:
                rank_zero_info(
                    f"{type(self).__name__}: the model has parameters that are not initialized yet (lazy "
                    f"modules: {', '.join(lazy[:5])}); the anchors are drawn and the cost is estimated after "
                    "the first training batch, which initializes them."
                )
            return
        self._set_up_at_start(trainer, pl_module, model)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Set up after the first training batch when the model had lazy modules at the start."""
        if not self._set_up_pending:
            return
        model = self._model(pl_module)
        lazy = lazy_modules(as_members(model))
        self._set_up_pending = False
        if not lazy:
            self._set_up_at_start(trainer, pl_module, model, after_batch=True)
            return
        rank_zero_warn(
            f"{type(self).__name__}: the model still has parameters that are not initialized after the first "
            f"training batch (lazy modules its forward does not use: {', '.join(lazy[:5])}), so it cannot be "
            "measured: this monitor stays off for this fit and logs nothing. Remove the unused lazy modules, or "
            "pass `get_model=` the network that the forward uses.",
            category=UserWarning,
        )

    def _set_up_at_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: nn.Module | list[nn.Module],
        after_batch: bool = False,
    ) -> None:
        """:meth:`_set_up`; an error of the model's own (say a ``RuntimeError`` from its forward) is
        raised again with the monitor's name, so that it is clear where it came from.
        ``after_batch``: after the first training batch (lazy modules), which errors then say."""
        self._trained = (
            "one training batch ran (to initialize the lazy modules)" if after_batch else "nothing was trained yet"
        )
        try:
            with logging_off(pl_module):
                self._set_up(trainer, pl_module, model)
        except RuntimeError as err:
            if type(err) is not RuntimeError:  # a subclass (out of memory, ...) keeps its type for handlers
                raise
            raise RuntimeError(
                f"{type(self).__name__} could not set up at the start of fit (drawing its anchors from the "
                "validation data, a forward of two of them to count the classes, timing a pass for the cost "
                f"estimate) on {'the LightningModule' if self.get_model is None else 'the model get_model returns'}: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module | list[nn.Module]) -> None:
        """Draw the anchors (or check the restored ones), check the targets and estimate the cost."""
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
        self._check_watchers(trainer)
        self._preflight(trainer, model)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interval_start = time.perf_counter()
        self._others_at_interval_start = self._others_seconds(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validations inside an epoch (val_check_interval < 1): the next interval starts now
        if not trainer.sanity_checking:
            self._interval_start = time.perf_counter()
            self._others_at_interval_start = self._others_seconds(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure (when due) and log; every rank runs this and logs the same keys."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.anchors is None:
            return
        epoch = trainer.current_epoch
        self.num_validations += 1
        outcome = _Outcome()
        if self._due(trainer) and self._within_budget(trainer, epoch):
            with logging_off(pl_module):  # the monitor's own values are logged below
                outcome = self._run_measurement(trainer, pl_module, epoch)
        values = dict(self.last_values)
        values[f"{self.prefix}/seconds"] = outcome.seconds
        values[f"{self.prefix}/cost_frac"] = outcome.fraction
        values[f"{self.prefix}/measured"] = float(outcome.measured)
        values[f"{self.prefix}/failed"] = float(outcome.failed)
        values[f"{self.prefix}/nonfinite"] = float(outcome.nonfinite)
        values[f"{self.prefix}/num_classes_measured"] = float(len(self._measured_classes()))
        self._log_values(pl_module, values)

    def _always_logged(self) -> set[str]:
        """Keys logged at every validation, whatever the measurement gave."""
        names = ("seconds", "cost_frac", "measured", "failed", "nonfinite", "num_classes_measured")
        return {f"{self.prefix}/{k}" for k in names}

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
            "num_validations": self.num_validations,
            "last_measured_validation": self.last_measured_validation,
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
        # absent from checkpoints written before 2026-12-06
        self.num_validations = state_dict.get("num_validations", 0)
        self.last_measured_validation = state_dict.get("last_measured_validation")
        self.num_measurements = state_dict["num_measurements"]
        self._load_extra_state(state_dict)
        self._forget_estimates()  # a resumed series starts its next measurement afresh
        self._restored = True

    def _reset_series(self) -> None:
        """Forget the anchors and values of an earlier run (targets are chosen again with the anchors)."""
        self._forget_estimates()
        self.anchors = self.anchor_labels = self.num_classes = None
        self.last_values = {}
        self.last_measured_epoch = self.last_measured_validation = None
        self.num_measurements = self.num_validations = 0

    # ------------------------------------------------------------------ internals

    def _due(self, trainer: pl.Trainer) -> bool:
        """At least ``every_n_epochs`` epochs after the last measurement; in a training epoch without
        an end (a stream, validated by steps or by time), at least ``every_n_epochs`` validations
        after it (and at the first validation after a resume from a checkpoint that does not count
        them)."""
        if self.last_measured_epoch is None:
            return True
        if math.isinf(trainer.num_training_batches):
            last = self.last_measured_validation
            return last is None or self.num_validations - last >= self.every_n_epochs
        return trainer.current_epoch - self.last_measured_epoch >= self.every_n_epochs

    def _within_budget(self, trainer: pl.Trainer, epoch: int) -> bool:
        """Whether one more measurement, as long as the last one, keeps within ``max_cost_frac``."""
        if self.max_cost_frac is None or self._last_seconds is None or self._fit_start is None:
            return True
        # the fit's wall time without the other monitors' measurements: each monitor's own share
        others = self._others_seconds(trainer) - self._others_at_fit_start
        elapsed = time.perf_counter() - self._fit_start - others
        spent, next_cost = self._fit_seconds, self._last_seconds
        fits = spent + next_cost <= self.max_cost_frac * (elapsed + next_cost)
        stopper = None if fits else self._stopper_at_stake(trainer)
        # rank 0's clock and its EarlyStopping counts decide for all ranks
        fits, forced = trainer.strategy.broadcast((fits, stopper is not None), src=0)
        if forced:  # the budget must not end the fit: measure anyway
            if self.verbose and stopper is not None:
                rank_zero_info(
                    f"{type(self).__name__} epoch {epoch}: measured although it exceeds max_cost_frac = "
                    f"{self.max_cost_frac:g}: EarlyStopping(monitor={stopper.monitor!r}, patience={stopper.patience}) "
                    "would stop the fit before the next validation if the last values were logged again."
                )
            return True
        if not fits and self.verbose:
            rank_zero_info(
                f"{type(self).__name__} epoch {epoch}: measurement postponed (budget): {spent:.1f} s of "
                f"{elapsed:.1f} s measured so far, another {next_cost:.1f} s would exceed "
                f"max_cost_frac = {self.max_cost_frac:g}; the last values are logged again."
            )
        return bool(fits)

    def _others_seconds(self, trainer: pl.Trainer) -> float:
        """Seconds the Trainer's other monitors have spent measuring (in this process)."""
        return sum(
            cb.total_seconds
            for cb in getattr(trainer, "callbacks", ())
            if cb is not self and isinstance(cb, GeometryMonitor)
        )

    def _cost_fraction(self, trainer: pl.Trainer, seconds: float, end: float) -> float:
        """``seconds`` as a share of the time since the epoch (or the previous validation) started, not
        counting the other monitors' measurements in it: what the share would be with this monitor alone."""
        if self._interval_start is None:
            return 1.0
        others = self._others_seconds(trainer) - self._others_at_interval_start
        interval = end - self._interval_start - others
        return min(1.0, seconds / interval) if interval > 0 else 1.0

    def _progress(self, trainer: pl.Trainer, unit: str = "problems") -> MeasurementProgress:
        """The progress display of one measurement (use it as a context manager; see
        :mod:`cm_monitor.callbacks.progress`); pass ``progress.part(...)`` or ``progress`` to the core."""
        return MeasurementProgress(trainer, f"{self.prefix} measurement", unit)

    def _model(self, pl_module: pl.LightningModule) -> nn.Module | list[nn.Module]:
        model = pl_module if self.get_model is None else self.get_model(pl_module)
        try:
            members = as_members(model, "get_model(pl_module)")
        except (TypeError, ValueError) as err:
            raise TypeError(f"{type(self).__name__}: {err}") from err
        members = logits_models(members, self.output_transform)  # logits [N, C] from any output
        return members[0] if len(members) == 1 else members

    def _run_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> _Outcome:
        name = type(self).__name__
        device = pl_module.device
        synchronize(device)
        start = time.perf_counter()
        with isolate_rng():  # a model that draws random numbers in eval mode must not shift training's
            part, error, notes = self._attempt(trainer, pl_module)  # this rank's share of the work
            # A failure on any rank is a failure on all of them: every rank learns it here (one
            # collective, which every rank reaches, failed or not), so all log the same keys.
            cause = None if error is None else f"{type(error).__name__}: {error}"
            gathered = gather_objects(trainer, (cause, None if error is not None else part))
            if trainer.world_size > 1:
                causes = [f"rank {r}: {c}" for r, (c, _) in enumerate(gathered) if c is not None]
            else:
                causes = [] if cause is None else [cause]
            result = None
            if not causes:  # every rank combines the same shares, so all agree (also on a failure here)
                try:
                    result = self._finish(trainer, pl_module, [p for _, p in gathered])
                except Exception as err:
                    error, cause = err, f"{type(err).__name__}: {err}"
                    causes = [cause]
            del gathered, part
            # drawing and writing the figures is part of the cost (rank 0 only); a failure there
            # must not leave the other ranks waiting in the broadcast below
            if result is not None and self.log_figures and trainer.is_global_zero and result.figures:
                try:
                    self._log_figures(trainer, result.figures)
                except Exception as err:
                    notes.append(f"figures not written ({type(err).__name__}: {err})")
        synchronize(device)
        end = time.perf_counter()
        seconds = end - start
        self.total_seconds += seconds
        fraction = self._cost_fraction(trainer, seconds, end)

        if not self.strict:
            error = None  # its traceback holds the failed attempt's tensors
        if causes and self.strict:
            if error is not None:
                raise error
            raise RuntimeError(f"{name} (epoch {epoch}): the measurement failed on another rank: {'; '.join(causes)}.")

        # Every rank combined the same shares into the same values; rank 0's outcome (its timing,
        # notes and values) is what all of them log, so that they agree on every key and value.
        local = {
            "values": {} if result is None else {f"{self.prefix}/{k}": float(v) for k, v in result.values.items()},
            "notes": notes + ([] if result is None else list(result.notes)),
            "nonfinite": None if result is None else result.nonfinite,
            "seconds": seconds,
            "fraction": fraction,
        }
        shared = trainer.strategy.broadcast(local, src=0)
        seconds, fraction = shared["seconds"], shared["fraction"]
        self._fit_seconds += seconds
        self._last_seconds = seconds
        # a failed attempt counts for the schedule (its cost is paid)
        self.last_measured_epoch, self.last_measured_validation = epoch, self.num_validations
        outcome = _Outcome(seconds=max(seconds, 1e-9), fraction=fraction)
        notes = list(shared["notes"])
        values: dict[str, float] = shared["values"]
        if causes:
            outcome.failed = True
            values = {}
            notes.append(
                f"the measurement failed ({'; '.join(causes)}). Training goes on: the last values are logged "
                f"again, with {self.prefix}/failed = 1 (pass `strict=True` to raise instead)."
            )
        else:
            self.num_measurements += 1
            if shared["nonfinite"] is not None:
                outcome.nonfinite = True
                what = f"the model returned NaN/inf ({shared['nonfinite']})"
                if self.on_nonfinite == "raise":
                    raise RuntimeError(f"{name} (epoch {epoch}): {what}; `on_nonfinite='raise'`.")
                if self.on_nonfinite == "log_nan":
                    # every value of the monitor is NaN now, also those this measurement did not give
                    self.last_values = {k: math.nan for k in self.last_values}
                    self.last_values.update(values)
                    notes.append(f"{what}: its values are logged as NaN, with {self.prefix}/nonfinite = 1.")
                else:
                    notes.append(
                        f"{what}: its last finite values are logged again (`on_nonfinite='keep_last'`), with "
                        f"{self.prefix}/nonfinite = 1."
                    )
                    self._keep_finite(values, notes, "non-finite values")
            else:  # the model's outputs were finite: a NaN here is a value this model does not define
                self._keep_finite(
                    values, notes, "values undefined for this model (NaN; the model's outputs were finite)"
                )
        notes += self._fill_watched_keys(trainer, None if causes else set(values))
        for note in notes:
            rank_zero_warn(f"{name} (epoch {epoch}): {note}", category=RuntimeWarning)
        if not outcome.failed:
            self._warn_if_costly(epoch, seconds, fraction)

        if self.verbose and outcome.measured:
            n = len(self.prefix) + 1
            fresh = {k[n:]: v for k, v in values.items() if math.isfinite(v)}
            rank_zero_info(
                f"{name} epoch {epoch}: {self._summary(fresh)} | measured in {seconds:.2f} s, "
                f"{100 * fraction:.0f}% of the epoch"
            )
        return outcome

    def _warn_if_costly(self, epoch: int, seconds: float, fraction: float) -> None:
        """Once per fit, without a budget: a measurement of at least :data:`COSTLY_SECONDS` that took at
        least :data:`COSTLY_FRACTION` of its interval (the time since the epoch or the previous
        validation started, itself included) says how it compares with that interval and what makes
        it cheaper."""
        costly = seconds >= COSTLY_SECONDS and COSTLY_FRACTION <= fraction < 1
        if self._cost_warned or self.max_cost_frac is not None or not costly:
            return
        self._cost_warned = True
        rest = seconds * (1 - fraction) / fraction  # the interval's training and validation
        cheaper = ", ".join(f"`{a}`" for a in ("every_n_epochs", *self._cost_arguments))
        rank_zero_warn(
            f"{type(self).__name__} (epoch {epoch}): the measurement took {seconds:.1f} s, {seconds / rest:.1f} times "
            f"the {rest:.1f} s of training and validation since the epoch (or the previous validation) started "
            f"(later measurements may cost less). To spend less: {cheaper}, or a budget such as "
            "`max_cost_frac=0.1`. (Said once per fit.)",
            category=UserWarning,
        )

    def _attempt(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, Exception | None, list[str]]:
        """Measure this rank's share: ``(part, None, notes)``, or ``(None, error, notes)`` when it raised.

        CUDA out of memory is retried once with ``chunk_size`` half the largest pass the measurement
        makes (:meth:`_pass_size`; kept from then on). ``KeyboardInterrupt`` and ``SystemExit`` are
        not caught.
        """
        notes: list[str] = []
        try:
            return self._measure_part(trainer, pl_module, self._model(pl_module), _part(trainer)), None, notes
        except _OOM_ERRORS as err:
            chunk = self._pass_size(_part(trainer))  # what the passes really held, maybe below chunk_size
            if not (isinstance(chunk, int) and chunk > 1):
                return None, err, notes
            first = f"{type(err).__name__}: {err}"
        except Exception as err:
            return None, err, notes
        # retried outside the `except` block, so that the tensors of the first attempt (held by
        # its traceback) are freed first
        self.chunk_size = chunk // 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            result = self._measure_part(trainer, pl_module, self._model(pl_module), _part(trainer))
        except Exception as err:
            notes.append(f"out of memory with chunk_size = {chunk} ({first}); the retry with {chunk // 2} failed too.")
            return None, err, notes
        notes.append(
            f"out of memory with chunk_size = {chunk} ({first}); measured with chunk_size = {chunk // 2}, "
            "which is kept from now on."
        )
        return result, None, notes

    def _keep_finite(self, values: Mapping[str, float], notes: list[str], what: str) -> None:
        """Take the finite values; a non-finite one keeps the key's last finite value (noted)."""
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        self.last_values.update({k: v for k, v in values.items() if k not in bad})
        kept = [k for k in bad if math.isfinite(self.last_values.get(k, math.nan))]
        missing = [k for k in bad if k not in kept]
        if kept:
            notes.append(f"{what} not logged, their last value is logged again: {kept}")
        if missing:
            notes.append(f"{what} not logged, and there is no earlier value to log instead: {missing}")

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
        """Every figure to every logger (built once each, closed after); failures are warned once, never raised."""
        # the step Lightning gives the scalars logged at this validation, so that they line up
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        tagged = {f"{self.prefix}/{tag}": build for tag, build in figures.items()}
        self._figure_writer.write(trainer.loggers, tagged, step)

    # -------------------------------------------------------------- anchors at fit start

    def _draw_anchors(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module | list[nn.Module]
    ) -> None:
        name = type(self).__name__
        start = time.perf_counter()
        loader, max_batches = self._val_dataloader(trainer)  # on every rank (setup has a barrier)
        sample = self._draw_sample(lambda **kw: self._sample_everywhere(trainer, pl_module, loader, max_batches, **kw))
        if sample.labels.numel() == 0:
            raise ValueError(
                f"{name} could not draw anchors from the validation data: no examples were read from the "
                "validation dataloader (it is empty)."
            )
        device = pl_module.device  # the sample is on the CPU (also for the gather); measured on the device
        sample = replace(sample, inputs=sample.inputs.to(device), labels=sample.labels.to(device))
        inputs, _, num_classes = self._adopt_anchors(sample, model)
        if self.verbose:
            rank_zero_info(
                f"{name}: drew {inputs.shape[0]} anchors ({self.num_anchors} per class, "
                f"{len(self._measured_classes())} of the model's {num_classes} classes measured, shape "
                f"{tuple(inputs.shape[1:])}) from {sample.num_batches} validation batches in "
                f"{time.perf_counter() - start:.2f} s; they stay fixed for the run."
            )

    def _sample_everywhere(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any, max_batches: int | None, **kw: Any
    ) -> AnchorSample:
        """The anchor sample of the whole validation data (``kw``: of :func:`sample_anchors`): every rank
        samples its own shard and the samples merge (keys from the inputs' content), so the anchors do
        not depend on how the data is sharded."""
        name = type(self).__name__
        error: BaseException | None = None
        local: AnchorSample | str
        try:
            local = self._sample(trainer, pl_module, loader, max_batches, **kw)
        except Exception as err:
            error, local = err, f"{type(err).__name__}: {err}"
        # every rank takes part in the gather, also when its sampling failed, and then all raise
        gathered = gather_objects(trainer, local)
        failures = [f"rank {r}: {g}" for r, g in enumerate(gathered) if isinstance(g, str)]
        if error is not None:
            if isinstance(error, ValueError | TypeError):
                raise type(error)(f"{name} could not draw anchors from the validation data: {error}") from error
            raise error
        if failures:
            raise RuntimeError(f"{name} could not draw anchors on another rank: {'; '.join(failures)}")
        return merge_samples(gathered, self.num_anchors)  # type: ignore[arg-type]

    def _draw_sample(self, read: Callable[..., AnchorSample]) -> AnchorSample:
        """The anchor sample of the validation data; ``read(**kw)`` reads it once with these keywords of
        :func:`sample_anchors`. One pass, or two when there are more classes than :meth:`_class_limit`:
        the first holds the inputs of at most that many classes, the second those of the chosen ones."""
        self._target_generator, limit = None, self._class_limit()
        sample = read(max_classes=limit)
        if limit is not None and len(sample.counts) > limit:  # more classes than are measured: draw those only
            sample = self._sample_chosen_classes(read, sample.counts)
        return sample

    def _sample_chosen_classes(self, read: Callable[..., AnchorSample], counts: dict[int, int]) -> AnchorSample:
        """A second pass over the validation data (``read``, see :meth:`_draw_sample`) that draws anchors
        of the classes to measure only (:meth:`_pick_classes` among those with ``num_anchors`` examples
        in ``counts``, those of the first pass, which held no inputs); the others' counts are kept."""
        available = sorted(c for c, n in counts.items() if n >= self.num_anchors)
        if not available:  # as one pass would say: every class is short, with the counts
            try:
                AnchorSample(torch.zeros(0), torch.zeros(0, dtype=torch.long), counts, 0).check_classes(
                    counts, self.num_anchors
                )
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}: {err}") from err
        self._target_generator = torch.Generator().manual_seed(self.seed + 1)
        chosen = self._pick_classes(available, self._target_generator)
        sample = read(classes=chosen)
        return replace(sample, counts=counts | {c: sample.counts.get(c, 0) for c in chosen})

    def _class_limit(self) -> int | None:
        """Anchors are held for at most this many classes (None: for all); with more classes in the
        validation data a second pass draws those of :meth:`_pick_classes` only."""
        return self.max_classes

    def _pick_classes(self, available: list[int], generator: torch.Generator) -> list[int]:
        """The classes to measure among those ``available`` (enough validation examples): all of
        them, or a fixed random subset of ``max_classes`` when there are more."""
        if self.max_classes is None or len(available) <= self.max_classes:
            return list(available)
        pick = torch.randperm(len(available), generator=generator)[: self.max_classes]
        subset = torch.tensor(available)[pick].sort().values.tolist()
        if self.verbose:
            rank_zero_info(
                f"{type(self).__name__}: there are {len(available)} classes to measure, more than `max_classes` = "
                f"{self.max_classes}: measuring the fixed random subset {subset} (anchors of these classes only)."
            )
        return subset

    def _adopt_anchors(self, sample: AnchorSample, model: nn.Module | list[nn.Module]) -> tuple[Tensor, Tensor, int]:
        """Take ``sample`` (on the model's device) as this run's anchors: check its class ids against the
        model's classes, leave out short classes, choose the targets. Returns ``(inputs, labels, num_classes)``."""
        num_classes = self._num_classes(model, sample.inputs)
        top = max(sample.counts, default=int(sample.labels.max()))  # every class read, also those without anchors
        if top >= num_classes:
            raise ValueError(
                f"{type(self).__name__}: the validation data has class id {top}, but the model returns logits for "
                f"{num_classes} classes."
            )
        inputs, labels = self._drop_short_classes(sample, num_classes)
        self.anchors, self.anchor_labels, self.num_classes = inputs, labels, num_classes
        generator = self._target_generator or torch.Generator().manual_seed(self.seed + 1)
        self._target_generator = None  # (the second pass's, past the choice of classes)
        self._setup_targets(num_classes, generator)
        return inputs, labels, num_classes

    def _drop_short_classes(self, sample: AnchorSample, num_classes: int) -> tuple[Tensor, Tensor]:
        """The anchors without the classes that have fewer than ``num_anchors`` validation examples.

        Those classes are left out with a warning, unless the monitor was told to measure them
        (:meth:`_explicit_classes`), or no class is left: then an error names them.
        """
        name = type(self).__name__
        counts = {c: sample.counts.get(c, 0) for c in range(num_classes)}
        short = sorted(c for c, n in counts.items() if n < self.num_anchors)
        named = sorted(c for c in self._explicit_classes() if c in short)
        try:
            if named:
                sample.check_classes(named, self.num_anchors)
            if len(short) == num_classes:
                sample.check_classes(short, self.num_anchors)
        except ValueError as err:
            why = f" ({self._explicit_classes_arg} names {named})" if named else ""
            raise ValueError(f"{name}: {err}{why}") from err
        if not short:
            return sample.inputs, sample.labels
        keep = ~torch.isin(sample.labels, torch.tensor(short, device=sample.labels.device))
        listed = ", ".join(f"class {c}: {counts[c]}" for c in short[:_LISTED])
        if len(short) > _LISTED:  # a 1000-class model with a small validation set: not every class
            listed += f", and {len(short) - _LISTED} more classes"
        hint = (
            f", or name them in {self._explicit_classes_arg} to make this an error"
            if self._explicit_classes_arg
            else ""
        )
        rank_zero_warn(
            f"{name}: {len(short)} of the model's {num_classes} classes have fewer than `num_anchors` = "
            f"{self.num_anchors} validation examples ({listed}; read {sample.num_batches} batches): they are left "
            f"out of the measurement (no anchors of them; `{self.prefix}/num_classes_measured` says how many "
            f"classes are measured). Lower `num_anchors` to include them{hint}.",
            category=UserWarning,
        )
        return sample.inputs[keep], sample.labels[keep]

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
            # hand the set-up back: Lightning sets the validation data up at its usual time (the
            # first validation), with the random state, epoch and model it would have had without
            # the monitor; the hook runs once more (see docs/callback.md)
            val_loop._combined_loader = None
            if reload_epoch is not None:
                val_loop._last_val_dl_reload_epoch = reload_epoch
        return loader, max_batches

    def _sample(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any, max_batches: int | None, **kw: Any
    ) -> AnchorSample:
        idx = self.dataloader_idx

        def transfer(batch: Any) -> Any:
            # what `validation_step` receives: the precision plugin's conversion (e.g. float64 for
            # "64-true"), the module's batch-transfer hooks, then the device
            batch = trainer.precision_plugin.convert_input(batch)
            hook = getattr(pl_module, "_on_before_batch_transfer", None)
            batch = hook(batch, dataloader_idx=idx) if hook is not None else batch
            return trainer.strategy.batch_to_device(batch, dataloader_idx=idx)

        stage, batches = trainer.state.stage, OwnIterator(loader)
        trainer.validating = True  # hooks that branch on the stage see a validation batch
        try:
            # creating a DataLoader iterator draws from the global RNG (and shuffling or workers
            # more): isolate it so that training sees exactly the random numbers it would without us
            # a loader with persistent workers is read through an iterator of our own (OwnIterator),
            # and the loader's own generators are restored after (a seeded shuffle must not move)
            with isolate_rng(), generators_kept(loader), torch.no_grad():
                return self._sample_from(
                    batches, max_batches, transfer, allow_empty=True, **kw
                )  # a rank may have no data
        finally:
            batches.close()
            trainer.state.stage = stage

    def _sample_from(
        self,
        loader: Any,
        max_batches: int | None,
        transform: Callable[[Any], Any],
        allow_empty: bool = False,
        **kw: Any,
    ) -> AnchorSample:
        """The anchor sample of this monitor's ``num_anchors`` and ``seed`` from ``loader`` (no Trainer needed);
        ``allow_empty``: a loader without data gives an empty sample (a rank's shard) instead of an error."""
        return sample_anchors(
            loader,
            self.num_anchors,
            generator=torch.Generator().manual_seed(self.seed),
            read_batch=self._read_batch,
            max_batches=max_batches,
            transform=transform,
            allow_empty=allow_empty,
            **kw,
        )

    def _num_classes(self, model: nn.Module | list[nn.Module], anchors: Tensor) -> int:
        """Number of classes: one forward pass on two anchors, in eval mode, modes restored."""
        members = as_members(model)
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
