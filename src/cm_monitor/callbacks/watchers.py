"""What a monitor owes the callbacks that watch its keys (``EarlyStopping``, ``ModelCheckpoint``).

:class:`Watchers` is a part of :class:`~cm_monitor.callbacks.base.GeometryMonitor`: at the start
of fit it checks the watched keys against the keys the monitor logs, refuses an ``EarlyStopping``
that the repeated values at validations without a measurement would make end the fit (the replay
of :mod:`cm_monitor.callbacks.patience`), says which epochs are measured, and warns where repeats
meet a budget or a checkpoint top k; during the fit it keeps a budget from bringing an
``EarlyStopping`` to its patience and gives a watched key without a value a placeholder.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from cm_monitor.callbacks.patience import (
    Schedule,
    Stop,
    epochs_between_validations,
    forced_stop,
    repeats_in_a_row,
    validated_epochs,
)


def _worst_value(mode: str) -> float:
    """The worst finite value for a watcher of ``mode`` (``"min"`` or ``"max"``): the float32 extreme."""
    big = float(torch.finfo(torch.float32).max)
    return -big if mode == "max" else big


def _epochs_of(steps: int | None, batches: float, per_step: int) -> int | None:
    """The whole epochs a fit of ``steps`` optimizer steps runs (a last one in part is not counted:
    its end-of-epoch validation does not run)."""
    if steps is None:
        return None
    return steps // math.ceil(batches / per_step)


def _checks_to_next_validation(trainer: pl.Trainer, cb: EarlyStopping) -> int:
    """How many checks ``cb`` makes from this validation to the next one (included, not that one's):
    one at validation ends, or one per epoch end until the next validating epoch."""
    if not _on_epoch_end(cb):
        return 1
    return epochs_between_validations(
        trainer.check_val_every_n_epoch, trainer.val_check_batch or math.inf, trainer.num_training_batches
    )


def _on_epoch_end(cb: EarlyStopping) -> bool:
    """Whether ``cb`` checks at the end of training epochs (as its ``setup`` resolved it)."""
    return bool(getattr(cb, "_check_on_train_epoch_end", False))


class Watchers:
    """The watched-keys part of a monitor (mixed into ``GeometryMonitor``, whose attributes and key
    lists it reads: ``prefix``, ``every_n_epochs``, ``max_cost_frac``, ``verbose``, ``last_values``,
    ``_key_patterns``, ``_loggable_keys()``, ``_always_logged()``)."""

    prefix: str
    every_n_epochs: int
    max_cost_frac: float | None
    verbose: bool
    last_values: dict[str, float]
    _key_patterns: tuple[str, ...]
    _fresh_fit: bool  # set at on_train_start: a new fit, not resumed, at epoch 0 and step 0
    _loggable_keys: Callable[[], set[str]]
    _always_logged: Callable[[], set[str]]

    def _check_watchers(self, trainer: pl.Trainer) -> None:
        """At the start of fit: the watched keys are keys of the monitor, no ``EarlyStopping`` would
        end the fit on repeated values, and what the schedule means for the watchers is said."""
        self._check_watched_keys(trainer)
        schedule = self._schedule(trainer)
        if schedule is not None:
            self._check_patience(trainer, schedule)
            self._announce_schedule(schedule)
        self._warn_budget_with_watchers(trainer, schedule)
        self._warn_checkpoint_top_k(trainer, schedule)

    def _schedule(self, trainer: pl.Trainer) -> Schedule | None:
        """A new fit's validation schedule as Lightning resolved it, or None where it is not known
        ahead: a fit that is not new (resumed from a checkpoint: it may restart inside an epoch,
        after some of its validations, with ``EarlyStopping``'s count restored; a fit that continues
        without one), no training batches, validation by time, a stream validated only at its end,
        ``fast_dev_run``, ``min_steps``, and ``max_steps`` with manual optimization (its optimizer
        steps per batch are the module's)."""
        every_batches, batches = trainer.val_check_batch, trainer.num_training_batches
        if not self._fresh_fit or every_batches is None or not batches or trainer.fast_dev_run or trainer.min_steps:
            return None
        if getattr(trainer, "_val_check_time_interval", None) is not None:
            return None
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if steps is not None and not trainer.lightning_module.automatic_optimization:
            return None
        per_step = max(1, trainer.accumulate_grad_batches)
        if math.isinf(batches):  # a stream: the monitor counts validations
            if math.isinf(every_batches):
                return None
            validations = None if steps is None else steps * per_step // int(every_batches)
            return Schedule(self.every_n_epochs, batches, every_batches, None, max_validations=validations)
        ends = [e for e in (trainer.max_epochs, _epochs_of(steps, batches, per_step)) if e is not None and e >= 0]
        return Schedule(
            self.every_n_epochs, batches, every_batches, trainer.check_val_every_n_epoch,
            end_epoch=min(ends) if ends else None, min_epochs=trainer.min_epochs or 0,
        )  # fmt: skip

    def _announce_schedule(self, schedule: Schedule) -> None:
        """Which epochs are measured (``verbose``); a warning when a fit with validations in several
        epochs is measured only once (the later values are the first one's, repeated)."""
        validated, measured, complete = validated_epochs(schedule)
        if not measured:
            return
        name, every = type(self).__name__, self.every_n_epochs
        if complete and len(measured) == 1 and len(validated) > 1:
            rank_zero_warn(
                f"{name}: with every_n_epochs = {every} this fit, validated at epochs "
                f"{', '.join(map(str, validated[:6]))}{', ...' if len(validated) > 6 else ''}, is measured only once, "
                f"at epoch {measured[0]}; later validations log that measurement again ({self.prefix}/measured = 0). "
                f"Pass every_n_epochs <= {validated[-1] - measured[0]} to measure it again.",
                category=UserWarning,
            )
        elif self.verbose:
            shown = ", ".join(str(e) for e in measured[:5]) + ("" if complete and len(measured) <= 5 else ", ...")
            budget = "; a budget may postpone them" if self.max_cost_frac is not None else ""
            rank_zero_info(
                f"{name}: measures the first validation of epochs {shown} (the first validation of the fit, then "
                f"the first at least {every} epochs after the last measurement{budget}); the others log the last "
                f"values again ({self.prefix}/measured = 0)."
            )

    def _check_patience(self, trainer: pl.Trainer, schedule: Schedule) -> None:
        """An ``EarlyStopping`` on a repeated key of this monitor that would end the fit on the
        repeated values alone, even if every measurement improved, is an error."""
        for cb in self._early_stoppings(trainer):
            stop = forced_stop(schedule, cb.patience, _on_epoch_end(cb))
            if stop is not None:
                several = (
                    not (_on_epoch_end(cb) or schedule.stream) and schedule.val_check_batch < schedule.batches_per_epoch
                )
                raise MisconfigurationException(self._patience_message(cb, stop, several))

    def _patience_message(self, cb: EarlyStopping, stop: Stop, several: bool) -> str:
        """``several``: validations more than once an epoch, each one a check of ``cb``."""
        when = f"at epoch {stop.epoch}" if stop.epoch is not None else f"after {stop.validations} validations"
        unit = "validations" if stop.epoch is None else "epochs"
        need = stop.repeats + 1
        options = [f"give it patience={need} to compare each measurement with the best one ({3 * need} to wait three)"]
        if self.every_n_epochs > 1:
            options.append("measure more often (`every_n_epochs`)")
        if several:
            options.append("let it check once an epoch (`EarlyStopping(check_on_train_epoch_end=True)`)")
        options.append("stop on a validation loss instead (docs/callback.md)")
        return (
            f"EarlyStopping(monitor={cb.monitor!r}, patience={cb.patience}) would stop this fit {when}, on "
            f"repeated values alone, even if every measurement improved: {type(self).__name__} measures every "
            f"{self.every_n_epochs} {unit} and logs its last values again at the checks in between ({stop.repeats} "
            f"in a row here), which count as no improvement. To keep the fit: {'; '.join(options)}."
        )

    def _warn_budget_with_watchers(self, trainer: pl.Trainer, schedule: Schedule | None) -> None:
        """A budget's postponements repeat values, which the watchers count; a patience that leaves
        the budget no room to postpone anything makes it have no effect."""
        watched = sorted(self._watched_keys(trainer))
        if self.max_cost_frac is None or not watched:
            return
        rank_zero_warn(
            f"{type(self).__name__}: with `max_cost_frac` measurements may be postponed, and the "
            f"validations in between log the last values again; a callback watching {watched} counts them "
            "as validations without improvement (a postponement never brings an EarlyStopping on them to "
            "its patience: the monitor then measures whatever the budget).",
            category=UserWarning,
        )
        for cb in self._early_stoppings(trainer) if schedule is not None else []:
            needed = repeats_in_a_row(schedule, _on_epoch_end(cb)) + _checks_to_next_validation(trainer, cb)
            if max(cb.patience, 1) <= needed:
                rank_zero_warn(
                    f"{type(self).__name__}: `max_cost_frac` cannot postpone any measurement in this fit: one "
                    f"postponement would bring EarlyStopping(monitor={cb.monitor!r}, patience={cb.patience}) to "
                    f"its patience, so the monitor measures whatever the budget. A patience of at least "
                    f"{needed + 1} leaves room for one postponement at a time.",
                    category=UserWarning,
                )
                return

    def _warn_checkpoint_top_k(self, trainer: pl.Trainer, schedule: Schedule | None) -> None:
        """A ``ModelCheckpoint`` top k > 1 on a repeated key keeps models that were never measured."""
        if self.max_cost_frac is None and schedule is not None:
            repeats = repeats_in_a_row(schedule) > 0
        else:
            repeats = (
                self.every_n_epochs > 1
                or self.max_cost_frac is not None
                or trainer.val_check_batch != trainer.num_training_batches
            )
        for cb in self._watching(trainer, repeated_only=True):
            top = getattr(cb, "save_top_k", None)
            if repeats and isinstance(cb, ModelCheckpoint) and top not in (-1, 0, 1):
                rank_zero_warn(
                    f"{type(self).__name__}: ModelCheckpoint(monitor={cb.monitor!r}, save_top_k={top}) ranks the "
                    "validations without a measurement by the last measured value, so models that were never "
                    "measured take places in its top k, tied with the measured one before them. Keep "
                    "save_top_k=1 (a tie keeps the first, measured, checkpoint).",
                    category=UserWarning,
                )

    def _stopper_at_stake(self, trainer: pl.Trainer) -> EarlyStopping | None:
        """An ``EarlyStopping`` on a key of this monitor that the repeats before the next validation
        (the next chance to measure) would make stop the fit, if any."""
        for cb in self._early_stoppings(trainer):
            if cb.wait_count + _checks_to_next_validation(trainer, cb) >= max(cb.patience, 1):
                return cb
        return None

    def _early_stoppings(self, trainer: pl.Trainer) -> list[EarlyStopping]:
        """The ``EarlyStopping`` callbacks on a repeated key of this monitor that count a repeat as no
        improvement (all but those with a negative ``min_delta``)."""
        zero = torch.zeros(())
        return [
            cb
            for cb in self._watching(trainer, repeated_only=True)
            if isinstance(cb, EarlyStopping) and not cb.monitor_op(zero - cb.min_delta, zero)
        ]

    def _watching(self, trainer: pl.Trainer, repeated_only: bool = False, strict_only: bool = False) -> list[Any]:
        """The other callbacks that monitor a key under this monitor's prefix (``repeated_only``: not
        one of the keys logged afresh at every validation, such as ``{prefix}/seconds``;
        ``strict_only``: that fail on a missing key, all but ``EarlyStopping(strict=False)``)."""
        fresh = self._always_logged() if repeated_only else set()
        return [
            cb
            for cb in trainer.callbacks
            if cb is not self
            and isinstance(getattr(cb, "monitor", None), str)
            and cb.monitor.startswith(f"{self.prefix}/")
            and cb.monitor not in fresh
            and (getattr(cb, "strict", True) or not strict_only)
        ]

    def _watched_keys(self, trainer: pl.Trainer, strict_only: bool = False) -> set[str]:
        """Keys under this monitor's prefix that other callbacks monitor (see :meth:`_watching`)."""
        return {cb.monitor for cb in self._watching(trainer, strict_only=strict_only)}

    def _check_watched_keys(self, trainer: pl.Trainer) -> None:
        """A key under this prefix that another callback monitors and that this configuration never
        logs is an error (close to a logged key, or one the monitor logs only with another
        configuration); any other unknown key under the prefix is a warning (the module may log it)."""
        n = len(self.prefix) + 1
        known = self._loggable_keys() | {k[n:] for k in self._always_logged()}
        for cb in self._watching(trainer):
            key = cb.monitor
            name = key[n:]
            if name in known:
                continue
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
            listed = ", ".join(f"{self.prefix}/{k}" for k in sorted(known))
            where = f"{type(cb).__name__}(monitor={key!r})"
            if close or any(re.fullmatch(p, name) for p in self._key_patterns):
                hint = f" Did you mean {' or '.join(repr(f'{self.prefix}/{k}') for k in close)}?" if close else ""
                raise MisconfigurationException(
                    f"{type(self).__name__}: {where} watches a key this monitor never logs with its configuration."
                    f"{hint} It logs: {listed}. Nothing was trained yet."
                )
            rank_zero_warn(
                f"{type(self).__name__}: {where} watches {key!r}, which is not a key of this monitor (it logs: "
                f"{listed}). Unless the LightningModule logs it, the first measurement raises.",
                category=UserWarning,
            )

    def _fill_watched_keys(self, trainer: pl.Trainer, produced: set[str] | None) -> list[str]:
        """A value for each key of this monitor that another callback strictly monitors and that has
        none yet; notes saying so.

        Such a callback (``EarlyStopping(strict=True)``, ``ModelCheckpoint``) would fail on the
        missing key and end the fit. It happens when the first measurement failed (``produced`` is
        None), came out NaN/inf with ``on_nonfinite="keep_last"``, or did not give the key (a
        ``cm/success_dist_*`` key when no plane reached the threshold). The key gets the worst
        finite value for the watcher (:meth:`_placeholder`): ``EarlyStopping`` neither stops on it
        (a NaN would stop it with ``check_finite=True``) nor counts it as an improvement over a real
        value, and ``ModelCheckpoint`` ranks it last. Only keys this configuration logs are filled:
        others are left to whoever logs them (the LightningModule may, also in its own
        ``on_validation_epoch_end``, which runs after this hook); the start of fit warned about them.
        """
        known = set(self.last_values) | self._always_logged() | set(trainer.callback_metrics)
        loggable = {f"{self.prefix}/{k}" for k in self._loggable_keys()}
        absent = sorted(k for k in self._watched_keys(trainer, strict_only=True) if k not in known and k in loggable)
        if not absent:
            return []
        self.last_values.update({k: self._placeholder(trainer, k) for k in absent})
        why = "the measurement failed" if produced is None else "the measurement did not give them"
        return [
            f"{absent} monitored by another callback but without a value yet ({why}): logged as the worst "
            "finite value for its watcher (+-3.4e38, or its divergence threshold), so that it neither stops "
            "the run nor counts as an improvement."
        ]

    def _placeholder(self, trainer: pl.Trainer, key: str) -> float:
        """The value for a watched ``key`` without one: the worst finite value for the mode of the
        callbacks that watch it, within an ``EarlyStopping``'s ``divergence_threshold`` (a value at
        the threshold does not trip it)."""
        watching = [cb for cb in self._watching(trainer) if cb.monitor == key]
        value = _worst_value(getattr(watching[0], "mode", "min"))
        for cb in watching:
            threshold = getattr(cb, "divergence_threshold", None)
            if threshold is not None:
                value = min(value, threshold) if value > 0 else max(value, threshold)
        return value
