"""ElasticityMonitor: local elasticity of the model, measured while it trains."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm_monitor._model import measuring, model_float_dtype
from cm_monitor.anchors import BatchReader
from cm_monitor.callbacks.base import GeometryMonitor, Measurement, check_int
from cm_monitor.elasticity import ElasticityEstimate, check_groups, local_elasticity

#: ``groups=`` of :class:`ElasticityMonitor`: a function ``(inputs, labels) -> [N] group ids`` or a
#: label map (``groups[label]`` is the group of that class).
GroupsSpec = Callable[[Tensor, Tensor], Tensor] | Sequence[int] | Tensor


def _check_groups_spec(groups: GroupsSpec | None) -> Callable[[Tensor, Tensor], Tensor] | Tensor | None:
    if groups is None or callable(groups):
        return groups
    if isinstance(groups, str | bytes) or not isinstance(groups, Sequence | Tensor):
        raise TypeError(
            f"`groups` must be None, a function (inputs, labels) -> [N] group ids, or a label map "
            f"(a sequence of group ids indexed by class), got {type(groups).__name__}."
        )
    table = torch.as_tensor(groups)
    if table.dim() != 1 or table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise ValueError(
            f"`groups` as a label map must be a sequence of integer group ids (groups[c] is the group of "
            f"class c), got {table.dtype} {tuple(table.shape)}."
        )
    return table.cpu()


class ElasticityMonitor(GeometryMonitor):
    r"""Measure the local elasticity of the model: how one SGD step at ``x`` moves its prediction at ``x'``.

    For every probe input one SGD step is taken on a functional copy of the weights (the trained
    weights are never touched) and the change of the logits is read at every probe input. The
    relative similarity ``S[i, j]`` (change at ``x_j`` over change at ``x_i``) is summarized by its
    mean over pairs of the same class and of different classes, their ratio, and how well spectral
    clustering of the similarity recovers the classes (or the ``groups``), next to the same
    summaries of an input-space baseline. He & Su (2020, arXiv 1910.06943) find trained
    nonlinear networks *locally elastic*: steps move same-class predictions much more. See
    ``docs/elasticity.md``.

    The probe inputs are ``num_anchors`` validation inputs per class, drawn once at the start of fit
    and fixed for the run. Scheduling, logging at validations without a measurement (the last values
    again), checkpointing and cost reporting are those of :class:`~cm_monitor.CMDimensionMonitor`.
    Under DDP the SGD steps are divided among the ranks (rank ``r`` of ``n`` takes the steps at every
    ``n``-th probe, each read at every probe: its rows of the similarity matrices), and the rows are
    merged on every rank before the summaries (:meth:`~cm_monitor.ElasticityEstimate.merge`):
    ``devices=n`` logs what one process logs.

    Args:
        every_n_epochs: measure every this many epochs (the first validation is always measured).
        num_anchors: probe inputs per class (the cost grows with the square of the total).
        lr: one SGD step size for every input; default: per input, a step that changes the parameters
            by ``relative_step`` of their norm.
        relative_step: see ``lr``.
        loss_fn: the training loss ``loss_fn(logits, labels) -> scalar`` (cross-entropy by default).
        check_linearity: also step with half the size and log ``elasticity/linearity_error``.
        chunk_size: SGD steps taken together (memory: up to twice that many copies of the
            parameters, and the activations of a pass of at most ``max(16 · chunk_size, N)`` inputs;
            see :func:`~cm_monitor.local_elasticity`).
        max_classes: with more classes than this in the validation data, the probe inputs come from a
            fixed random subset of ``max_classes`` classes (drawn once with ``seed``, kept in
            checkpoints; the anchors are then drawn in two passes that hold only the subset's
            inputs, as for :class:`~cm_monitor.CMDimensionMonitor`); ``None``: every class.
        groups: what the summaries compare, when not the classes: a label map (``groups[c]`` is the
            group of class ``c``, e.g. ``[0, 0, 1, 1]`` to compare two pairs of classes) or a
            function ``(inputs, labels) -> [N]`` integer group ids, applied to the probe inputs once
            per run. The SGD steps still use the labels. For He & Su's merged-label setting (two
            classes trained under one label, groups finer than the labels) the groups must be
            recoverable from the probe inputs, e.g. by looking them up in the validation set: the
            probes carry only the inputs and the training labels.
        seed: seeds the probe inputs and the clustering.

    The other arguments (``max_cost_frac``, ``batch_to_inputs``, ``input_key``, ``label_key``,
    ``dataloader_idx``, ``max_scan_batches``, ``get_model``, ``output_transform``, ``prefix``,
    ``log_figures``, ``prog_bar``, ``verbose``, ``strict``, ``on_nonfinite``) are those of
    :class:`~cm_monitor.callbacks.base.GeometryMonitor`;
    ``get_model`` must return one ``nn.Module`` (no ensembles).

    Logged metrics (through ``LightningModule.log``, at every validation of ``trainer.fit`` after
    the sanity check):

    * ``elasticity/intra``: mean symmetrized similarity over pairs of the same class (group).
    * ``elasticity/inter``: the same over pairs of different classes (groups).
    * ``elasticity/ratio``: ``intra / inter`` (above 1: locally elastic).
    * ``elasticity/cluster_ari``: adjusted Rand index of spectral clustering of the similarity
      against the labels, or the groups (1: the classes are recovered, 0: chance).
    * ``elasticity/ratio_baseline``, ``elasticity/cluster_ari_baseline``: the same two summaries
      of the input-space baseline ``|⟨x, x'⟩ + 1| / (‖x‖² + 1)`` of the probe inputs (what a linear
      softmax classifier gives, :func:`~cm_monitor.linear_baseline_similarity`); constant over a
      run. A ``ratio`` near ``ratio_baseline`` says no more than the inputs' own similarity.
    * ``elasticity/linearity_error``: relative change of the kernelized similarity when the step is
      halved (with ``check_linearity``).
    * ``elasticity/seconds``, ``elasticity/cost_frac``, ``elasticity/measured``, ``elasticity/failed``,
      ``elasticity/nonfinite``, ``elasticity/num_classes_measured``: cost and state of the
      measurement, as for ``cm/`` (a probe whose loss gradient is exactly zero, so that there is no
      SGD step to take, makes the measurement fail: ``elasticity/failed = 1``).

    Each measurement also adds the figure ``elasticity/similarity`` to every logger (see
    :class:`~cm_monitor.CMDimensionMonitor`): the similarity matrix with the inputs sorted by class.

    Example::

        >>> import lightning.pytorch as pl
        >>> from cm_monitor import ElasticityMonitor
        >>> monitor = ElasticityMonitor(every_n_epochs=2, num_anchors=6)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[monitor])
        >>> # trainer.fit(model, train_loader, val_loader)   # model(x) returns logits [N, C]
    """

    prefix = "elasticity"
    prog_bar_keys = ("ratio",)
    _key_patterns = (r"intra|inter|ratio(_baseline)?|cluster_ari(_baseline)?|linearity_error",)
    _cost_arguments = ("num_anchors", "max_classes")

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_anchors: int = 6,
        *,
        lr: float | None = None,
        relative_step: float = 1e-3,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        check_linearity: bool = True,
        chunk_size: int = 64,
        max_classes: int | None = 20,
        groups: GroupsSpec | None = None,
        max_cost_frac: float | None = None,
        seed: int = 0,
        batch_to_inputs: BatchReader | None = None,
        input_key: str | None = None,
        label_key: str | None = None,
        dataloader_idx: int = 0,
        max_scan_batches: int | None = None,
        get_model: Callable[[pl.LightningModule], nn.Module] | None = None,
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
        if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"`lr` must be a positive number or None, got {lr!r}.")
        if not (isinstance(relative_step, int | float) and 0 < relative_step < 1):
            raise ValueError(f"`relative_step` must be in (0, 1), got {relative_step!r}.")
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable (logits, labels) -> scalar, got {loss_fn!r}.")
        if not isinstance(check_linearity, bool):
            raise TypeError(f"`check_linearity` must be a bool, got {check_linearity!r}.")
        self.lr, self.relative_step, self.loss_fn, self.check_linearity = lr, relative_step, loss_fn, check_linearity
        self.chunk_size = check_int(chunk_size, "chunk_size")
        self.max_classes = check_int(max_classes, "max_classes", minimum=2, allow_none=True)
        self.groups = _check_groups_spec(groups)
        self.anchor_groups: Tensor | None = None  # the probes' groups (set with the probes)
        self.last_estimate: ElasticityEstimate | None = None

    def _config(self) -> dict[str, Any]:
        return {
            "max_classes": self.max_classes,
            "lr": self.lr,
            "relative_step": self.relative_step,
            "loss_fn": getattr(self.loss_fn, "__name__", "callable"),
            "groups": self._groups_name(),
        }

    def _groups_name(self) -> str | None:
        if self.groups is None:
            return None
        if isinstance(self.groups, Tensor):
            return f"map{tuple(self.groups.tolist())}"
        return getattr(self.groups, "__name__", "callable")

    def _check_targets(self, num_classes: int) -> None:
        """Compute the probes' groups (errors at the start of fit, naming ``groups``)."""
        assert self.anchors is not None and self.anchor_labels is not None
        if self.groups is None:
            self.anchor_groups = None
        elif isinstance(self.groups, Tensor):
            if self.groups.numel() < num_classes:
                raise ValueError(
                    f"`groups` maps {self.groups.numel()} classes, but the model has {num_classes}: "
                    "give a group to every class."
                )
            self.anchor_groups = self.groups.to(self.anchor_labels.device)[self.anchor_labels]
        else:
            found = self.groups(self.anchors, self.anchor_labels)
            self.anchor_groups = check_groups(found, self.anchors.shape[0], "groups(inputs, labels)")

    def _loggable_keys(self) -> set[str]:
        keys = {"intra", "inter", "ratio", "cluster_ari", "ratio_baseline", "cluster_ari_baseline"}
        return keys | {"linearity_error"} if self.check_linearity else keys

    def _preflight(self, trainer: pl.Trainer, model: nn.Module | list[nn.Module]) -> None:
        if isinstance(model, list):  # at the start of fit, not as a failed measurement later
            raise TypeError(f"{type(self).__name__} measures one model; `get_model` returned a list of {len(model)}.")

    def _summary(self, values: Mapping[str, float]) -> str:
        if "ratio" not in values:
            return "no value"
        return (
            f"{self.prefix}/ratio = {values['ratio']:.3g} (intra {values.get('intra', math.nan):.3g}, "
            f"inter {values.get('inter', math.nan):.3g}; input baseline {values.get('ratio_baseline', math.nan):.3g}), "
            f"cluster ARI = {values.get('cluster_ari', math.nan):.2f} (baseline {values.get('cluster_ari_baseline', math.nan):.2f})"
        )

    def _keys(self) -> list[str]:
        keys = ["intra", "inter", "ratio", "cluster_ari", "ratio_baseline", "cluster_ari_baseline"]
        return [*keys, "linearity_error"] if self.check_linearity else keys

    def _pass_size(self, part: tuple[int, int]) -> int:
        """SGD steps evaluated together: ``chunk_size``, or this rank's steps (probes) if fewer."""
        assert self.anchors is not None
        return max(1, min(self.chunk_size, math.ceil(self.anchors.shape[0] / part[1])))

    def _measure_part(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        model: nn.Module | list[nn.Module],
        part: tuple[int, int],
    ) -> tuple[ElasticityEstimate | None, list[str]]:
        """This rank's share of the SGD steps (a partial estimate; None when the model returned NaN/inf
        on the probes) and the core's warnings."""
        assert self.anchors is not None and self.anchor_labels is not None
        if isinstance(model, list):
            raise TypeError(f"{type(self).__name__} measures one model; `get_model` returned a list of {len(model)}.")
        # a model that returns NaN/inf has no loss gradient to step along: say so, rather than the
        # core's "zero gradient" error (one forward pass of the probes, the same on every rank)
        with measuring([model], grad=False):
            out = model(self.anchors.to(model_float_dtype([model], self.anchors.dtype)))
        if isinstance(out, Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
            return None, []
        with warnings.catch_warnings(record=True) as caught, self._progress(trainer, "passes") as progress:
            warnings.simplefilter("always")
            # raises (a failed measurement) e.g. when a probe is fitted exactly: no SGD step to take
            est = local_elasticity(
                model,
                self.anchors,
                self.anchor_labels,
                groups=self.anchor_groups,
                lr=self.lr,
                relative_step=self.relative_step,
                loss_fn=self.loss_fn,
                check_linearity=self.check_linearity,
                generator=self.seed,
                chunk_size=self.chunk_size,
                progress=progress if progress.enabled else None,
                part=part,
            )
        return est, [str(w.message) for w in caught]

    def _finish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        parts: list[tuple[ElasticityEstimate | None, list[str]]],
    ) -> Measurement:
        """Merge the ranks' shares into the similarities of all probes and their summaries."""
        if any(est is None for est, _ in parts):
            return Measurement(values=dict.fromkeys(self._keys(), math.nan), nonfinite="on the probe inputs")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = ElasticityEstimate.merge([p[0] for p in parts])  # type: ignore[misc]
        self.last_estimate = est
        values = {key: getattr(est, key) for key in self._keys()}
        nonfinite = None
        if not (bool(torch.isfinite(est.similarity).all()) and bool(torch.isfinite(est.kernel).all())):
            nonfinite = "in the similarities: the model returned NaN/inf after an SGD step, or a step did not move its own prediction"
        epoch = trainer.current_epoch

        def figure() -> Any:
            from cm_monitor.plotting import similarity_figure

            return similarity_figure(est.symmetric_similarity, est.groups, title=f"local elasticity, epoch {epoch}")

        messages = {note for _, part_notes in parts for note in part_notes} | {str(w.message) for w in caught}
        notes = sorted(m for m in messages if nonfinite is None or "NaN/inf" not in m)
        return Measurement(values=values, figures={"similarity": figure}, notes=notes, nonfinite=nonfinite)
