"""DiffeoStabilityMonitor: relative stability to diffeomorphisms R_f, measured while the model trains."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from cm_monitor.anchors import BatchReader
from cm_monitor.callbacks.base import GeometryMonitor, Measurement, check_int
from cm_monitor.diffeo import FOLD_WARNING, StabilityEstimate, relative_stability


class DiffeoStabilityMonitor(GeometryMonitor):
    r"""Measure the relative stability ``R_f`` of the model to small image deformations.

    ``R_f = D_f / G_f`` compares how much the model's output moves under small random smooth
    deformations of the probe images (``D_f``) with how much it moves under random noise of the
    same norm (``G_f``); both are relative to the typical output distance between two images. It is
    about 1 at initialization; Petrini et al. (2021, arXiv 2105.02468) find that it falls by decades
    as good image models train. Whether it does for your model is what this monitor measures. See
    ``docs/diffeo.md``.

    The probe images are ``num_anchors`` validation images per class, drawn once at the start of
    fit (like :class:`~cm_monitor.CMDimensionMonitor`'s anchors), and the deformations and noise are
    drawn from ``seed``: both stay fixed for the run, so a change in the curve is a change in the
    model (and the deformations' fold check runs once per run, at the first measurement; each fit
    warns once when they fold). Scheduling, logging at validations without a measurement (the last values again),
    checkpointing and cost reporting are those of :class:`~cm_monitor.CMDimensionMonitor`. Under DDP
    the probe images are divided among the ranks (rank ``r`` of ``n`` runs the model on every
    ``n``-th image and its deformed and noisy versions) and the outputs merged on every rank
    (:meth:`~cm_monitor.StabilityEstimate.merge`): ``devices=n`` logs what one process logs.

    Args:
        every_n_epochs: measure every this many epochs (the first validation is always measured).
        num_anchors: probe images per class.
        delta: typical displacement of the deformations at the image centre, in pixels (default 1;
            for 8 × 8 images use 0.5 or 0.6: larger deformations fold, see ``docs/diffeo.md``). At
            ``cutoff=3`` it is the temperature ``T = δ² / 1.4`` (pixel convention), for any image size.
        temperature: alternatively the temperature, in the pixel convention (``T = n² · T_paper``
            for the paper's unit-square convention on ``n × n`` images); pass ``delta=None`` with it.
        cutoff: highest mode frequency of the deformations (default 3).
        num_deformations: deformations (and noise draws) per probe image.
        reduction: ``"mean"`` or ``"median"`` (the reference code's robust averages; on sparse
            images such as MNIST the median is biased far low, and a warning says so: use the mean).
        output: ``"logits"`` (default), ``"probabilities"`` or a callable on the model's output.
        clip: clip the temperature into the natural range of the image size (with a warning).
        num_bootstrap: bootstrap resamples of the images for the uncertainty; 0 for none (the
            ``*_std`` keys are then not logged).
        chunk_size: images per forward pass.
        max_classes: with more classes than this in the validation data, the probe images come from a
            fixed random subset of ``max_classes`` classes (drawn once with ``seed``, kept in
            checkpoints; the anchors are then drawn in two passes that hold only the subset's
            inputs, as for :class:`~cm_monitor.CMDimensionMonitor`); ``None``: every class.
        seed: seeds the probe images, the deformations and the noise.

    The other arguments (``max_cost_frac``, ``batch_to_inputs``, ``input_key``, ``label_key``,
    ``dataloader_idx``, ``max_scan_batches``, ``get_model``, ``output_transform``, ``prefix``,
    ``log_figures``, ``prog_bar``, ``verbose``, ``strict``, ``on_nonfinite``) are those of
    :class:`~cm_monitor.callbacks.base.GeometryMonitor`.

    Logged metrics (through ``LightningModule.log``, at every validation of ``trainer.fit`` after
    the sanity check):

    * ``diffeo/rf``: relative stability ``R_f`` (lower: more stable to deformations than to noise).
    * ``diffeo/log10_rf``: ``log10 R_f`` (the natural scale of its curve).
    * ``diffeo/rf_std``, ``diffeo/log10_rf_std``: bootstrap standard deviations over images.
    * ``diffeo/df``, ``diffeo/gf``: stability to deformations and to noise.
    * ``diffeo/seconds``, ``diffeo/cost_frac``, ``diffeo/measured``, ``diffeo/failed``,
      ``diffeo/nonfinite``, ``diffeo/num_classes_measured``: cost and state of the measurement, as
      for ``cm/``.

    When the model returns NaN/inf, ``diffeo/nonfinite`` is 1 and the values are NaN or the last
    finite ones (``on_nonfinite``). Other non-finite values (``R_f = 0`` for ``log10``) are not
    logged: the last value is kept and a warning says so; a key that ``EarlyStopping`` or
    ``ModelCheckpoint`` monitors is logged as the worst finite value for its mode while it has no
    value (with a warning).

    Raises:
        ValueError: at the start of fit, when the validation inputs are not images
            ``[N, C, H, W]`` (and for the errors of the anchors, as for ``CMDimensionMonitor``).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> from cm_monitor import DiffeoStabilityMonitor
        >>> monitor = DiffeoStabilityMonitor(every_n_epochs=1, num_anchors=20, delta=1.0)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[monitor])
        >>> # trainer.fit(model, train_loader, val_loader)   # model(images) returns logits
    """

    prefix = "diffeo"
    prog_bar_keys = ("log10_rf",)
    _key_patterns = (r"(log10_)?rf(_std)?", r"df|gf")
    _cost_arguments = ("num_anchors", "num_deformations", "max_classes")

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_anchors: int = 10,
        *,
        delta: float | None = 1.0,
        temperature: float | None = None,
        cutoff: float = 3,
        num_deformations: int = 1,
        reduction: str = "mean",
        output: str | Callable[[Tensor], Tensor] = "logits",
        clip: bool = True,
        num_bootstrap: int = 200,
        chunk_size: int = 1024,
        max_classes: int | None = 20,
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
        if (delta is None) == (temperature is None):
            raise ValueError("Pass exactly one of `delta` (pixels) and `temperature` (pixel convention).")
        for name, value in (("delta", delta), ("temperature", temperature)):
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if isinstance(cutoff, bool) or not isinstance(cutoff, int | float) or not cutoff >= 1:
            raise ValueError(f"`cutoff` must be a number >= 1, got {cutoff!r}.")
        if reduction not in ("mean", "median"):
            raise ValueError(f"`reduction` must be 'mean' or 'median', got {reduction!r}.")
        if not (callable(output) or output in ("logits", "probabilities")):
            raise ValueError(f"`output` must be 'logits', 'probabilities' or a callable, got {output!r}.")
        if not isinstance(clip, bool):
            raise TypeError(f"`clip` must be a bool, got {clip!r}.")
        self.delta, self.temperature, self.cutoff = delta, temperature, cutoff
        self.num_deformations = check_int(num_deformations, "num_deformations")
        self.reduction, self.output, self.clip = reduction, output, clip
        self.num_bootstrap = check_int(num_bootstrap, "num_bootstrap", minimum=0)
        if self.num_bootstrap == 1:
            raise ValueError("`num_bootstrap` must be 0 (no uncertainties) or at least 2, got 1.")
        self.chunk_size = check_int(chunk_size, "chunk_size")
        self.max_classes = check_int(max_classes, "max_classes", minimum=2, allow_none=True)
        self.last_estimate: StabilityEstimate | None = None
        # (what the deformations depend on, their fold fraction), from the first measurement of a
        # run: the deformations are the same at every measurement (common random numbers)
        self._folds: tuple[tuple[Any, ...], float] | None = None
        self._folds_said = False  # whether this series warned about folding deformations already

    def _deformation_key(self) -> tuple[Any, ...]:
        """Everything the deformations, so their fold fraction, depend on (not the anchors' values)."""
        assert self.anchors is not None
        n, _, height, width = self.anchors.shape
        return (
            self.seed,
            n,
            height,
            width,
            self.num_deformations,
            self.delta,
            self.temperature,
            self.cutoff,
            self.clip,
        )

    def _forget_estimates(self) -> None:
        self._folds_said = False  # a new series (or a resumed one) says it again

    def _known_fold_fraction(self) -> float | None:
        if self._folds is not None and self._folds[0] == self._deformation_key():
            return self._folds[1]
        return None

    def _config(self) -> dict[str, Any]:
        return {
            "max_classes": self.max_classes,
            "delta": self.delta,
            "temperature": self.temperature,
            "cutoff": self.cutoff,
            "num_deformations": self.num_deformations,
            "reduction": self.reduction,
            "output": self.output if isinstance(self.output, str) else getattr(self.output, "__name__", "callable"),
            "clip": self.clip,
            "num_bootstrap": self.num_bootstrap,
        }

    def _loggable_keys(self) -> set[str]:
        keys = {"rf", "log10_rf", "df", "gf"}
        return keys | {"rf_std", "log10_rf_std"} if self.num_bootstrap > 0 else keys

    def _check_targets(self, num_classes: int) -> None:
        assert self.anchors is not None
        shape = tuple(self.anchors.shape[1:])
        if len(shape) != 3 or min(shape[1:]) < 3:
            raise ValueError(
                f"{type(self).__name__} deforms images, so it needs validation inputs of shape "
                f"[N, C, H, W] (channels, height, width, at least 3 × 3 pixels); they have shape "
                f"[N, {', '.join(map(str, shape))}]. Reshape them in the dataset or pass `batch_to_inputs=`."
            )

    def _summary(self, values: Mapping[str, float]) -> str:
        if "rf" not in values:
            return "no value"
        return f"{self.prefix}/rf = {values['rf']:.4g} (log10 {values.get('log10_rf', math.nan):.3g} ± {values.get('log10_rf_std', math.nan):.2g})"

    def _pass_size(self, part: tuple[int, int]) -> int:
        """Images per forward pass: ``chunk_size``, or this rank's probe images × deformations if fewer."""
        assert self.anchors is not None
        return max(1, min(self.chunk_size, math.ceil(self.anchors.shape[0] / part[1]) * self.num_deformations))

    def _measure_part(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: nn.Module | list[nn.Module],
        part: tuple[int, int],
    ) -> tuple[StabilityEstimate, list[str]]:
        """This rank's share of the probe images (a partial estimate) and the core's warnings."""
        assert self.anchors is not None
        with warnings.catch_warnings(record=True) as caught, self._progress(trainer, "passes") as progress:
            warnings.simplefilter("always")
            est = relative_stability(
                model,
                self.anchors,
                delta=self.delta,
                temperature=self.temperature,
                cutoff=self.cutoff,
                num_deformations=self.num_deformations,
                reduction=self.reduction,  # type: ignore[arg-type]
                output=self.output,
                clip=self.clip,
                generator=self.seed,  # the same deformations and noise at every evaluation
                num_bootstrap=self.num_bootstrap,
                chunk_size=self.chunk_size,
                fold_fraction=self._known_fold_fraction(),  # checked once per run, not at every measurement
                progress=progress if progress.enabled else None,
                part=part,
            )
        return est, [str(w.message) for w in caught]

    def _finish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, parts: list[tuple[StabilityEstimate, list[str]]]
    ) -> Measurement:
        """Merge the ranks' shares into ``R_f`` of all probe images."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = StabilityEstimate.merge([p[0] for p in parts])
        notes = sorted({note for _, part_notes in parts for note in part_notes} | {str(w.message) for w in caught})
        if self._folds_said and self._known_fold_fraction() is not None:  # said once per series
            notes = [n for n in notes if FOLD_WARNING not in n]
        self._folds_said = True
        self.last_estimate = est
        self._folds = (self._deformation_key(), est.fold_fraction)
        values = {
            "rf": est.rf,
            "log10_rf": est.log10_rf,
            "df": est.df,
            "gf": est.gf,
        }
        if self.num_bootstrap > 0:  # NaN here (without `failed`) is a value that is not defined: not logged
            values["rf_std"], values["log10_rf_std"] = est.rf_std, est.log10_rf_std
        nonfinite = None
        if est.failed:
            nonfinite = "on the probe images or their deformed/noisy versions"
            notes = [n for n in notes if "returned NaN/inf" not in n]  # the monitor's own warning says it
        return Measurement(values=values, notes=notes, nonfinite=nonfinite)
