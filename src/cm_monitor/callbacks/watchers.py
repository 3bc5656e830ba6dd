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

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from cm_monitor.callbacks.patience import Schedule, Stop, checks, forced_stop, measured_epochs, repeats_in_a_row


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
    if not getattr(cb, "_check_on_train_epoch_end", False):
        return 1
    every = trainer.check_val_every_n_epoch
    if every is None:  # validation every val_check_batch batches, counted across epochs
        batches, every_batches = trainer.num_training_batches, trainer.val_check_batch
        finite = every_batches and batches and not math.isinf(every_batches) and not math.isinf(batches)
        return max(1, math.ceil(every_batches / batches)) if finite else 1
    return every


class Watchers:
    """The watched-keys part of a monitor (mixed into ``GeometryMonitor``, whose attributes it reads:
    ``prefix``, ``every_n_epochs``, ``max_cost_frac``, ``verbose``, ``last_values`` and the key lists)."""

    prefix: str
    every_n_epochs: int
    max_cost_frac: float | None
    verbose: bool
    last_values: dict[str, float]
    _restored: bool

    def _loggable_keys(self) -> set[str]:
        raise NotImplementedError

    def _always_logged(self) -> set[str]:
        raise NotImplementedError

    def _schedule(self, trainer: pl.Trainer) -> Schedule | None:
        """A new fit's validation schedule as Lightning resolved it, or None where it is not known
        ahead: validation by time, ``fast_dev_run``, ``min_steps``, ``max_steps`` with manual
        optimization (its optimizer steps per batch are the module's), and a resumed fit (it may
        resume inside an epoch, after some of its validations, and ``EarlyStopping`` brings back its
        count; the fit was checked when it started)."""
        every_batches = trainer.val_check_batch
        if every_batches is None or trainer.fast_dev_run or trainer.min_steps or self._time_validated(trainer):
            return None
        batches = trainer.num_training_batches
        if not batches or trainer.current_epoch or trainer.global_step or self._restored:
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

    @staticmethod
    def _time_validated(trainer: pl.Trainer) -> bool:
        return getattr(trainer, "_val_check_time_interval", None) is not None

    def _announce_schedule(self, trainer: pl.Trainer) -> None:
        """At the start of a new fit: which epochs are measured (``verbose``); a warning when a fit
        with validations in several epochs is measured only once (the later values are the first
        one's, repeated)."""
        schedule = self._schedule(trainer)
        measured, complete = ([], False) if schedule is None else measured_epochs(schedule)
        if not measured:
            return
        name, every = type(self).__name__, self.every_n_epochs
        validated = [epoch for epoch, _, _ in checks(schedule, on_train_epoch_end=False)]
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
            budget = ", unless the budget postpones it" if self.max_cost_frac is not None else ""
            rank_zero_info(
                f"{name}: measures the first validation of epochs {shown} (the first validation of the fit, then "
                f"every {every} epochs{budget}); the others log the last values again ({self.prefix}/measured = 0)."
            )

    def _values_repeat(self, trainer: pl.Trainer) -> bool:
        """Whether some validations of this fit log the last values again (a budget may make them)."""
        if self.max_cost_frac is not None:
            return True
        schedule = self._schedule(trainer)
        if schedule is None:
            return self.every_n_epochs > 1 or trainer.val_check_batch != trainer.num_training_batches
        return any(not measured or repeats for _, measured, repeats in checks(schedule, on_train_epoch_end=False))

    def _check_patience(self, trainer: pl.Trainer) -> None:
        """At the start of fit: an ``EarlyStopping`` on a key of this monitor that would end the fit
        on the repeated values alone, even if every measurement improved, is an error."""
        schedule = self._schedule(trainer)
        if schedule is None:
            return
        for cb in self._early_stoppings(trainer):
            on_epoch_end = getattr(cb, "_check_on_train_epoch_end", None)
            stop = forced_stop(schedule, cb.patience, bool(on_epoch_end))
            if stop is not None:
                several = (
                    not (on_epoch_end or schedule.stream) and schedule.val_check_batch < schedule.batches_per_epoch
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

    def _warn_budget_with_watchers(self, trainer: pl.Trainer) -> None:
        """Say how the repeated values at validations without a measurement meet the callbacks that
        watch this monitor's keys: a budget's postponements, and a ``ModelCheckpoint`` top k."""
        watched = sorted(self._watched_keys(trainer))
        if self.max_cost_frac is not None and watched:
            rank_zero_warn(
                f"{type(self).__name__}: with `max_cost_frac` measurements may be postponed, and the "
                f"validations in between log the last values again; a callback watching {watched} counts them "
                "as validations without improvement (a postponement never brings an EarlyStopping on them to "
                "its patience: the monitor then measures whatever the budget).",
                category=UserWarning,
            )
            self._warn_budget_without_effect(trainer)
        repeats = self._values_repeat(trainer)
        for cb in trainer.callbacks:
            key, top = getattr(cb, "monitor", None), getattr(cb, "save_top_k", None)
            if repeats and isinstance(cb, ModelCheckpoint) and key in watched and top not in (-1, 0, 1):
                rank_zero_warn(
                    f"{type(self).__name__}: ModelCheckpoint(monitor={key!r}, save_top_k={top}) ranks the "
                    "validations without a measurement by the last measured value, so models that were never "
                    "measured take places in its top k, tied with the measured one before them. Keep "
                    "save_top_k=1 (a tie keeps the first, measured, checkpoint).",
                    category=UserWarning,
                )

    def _warn_budget_without_effect(self, trainer: pl.Trainer) -> None:
        """A budget that an ``EarlyStopping``'s patience leaves no room to postpone anything."""
        schedule = self._schedule(trainer)
        if schedule is None:
            return
        for cb in self._early_stoppings(trainer):
            on_epoch_end = bool(getattr(cb, "_check_on_train_epoch_end", False))
            needed = repeats_in_a_row(schedule, on_epoch_end) + _checks_to_next_validation(trainer, cb)
            if max(cb.patience, 1) <= needed:
                rank_zero_warn(
                    f"{type(self).__name__}: `max_cost_frac` cannot postpone any measurement in this fit: one "
                    f"postponement would bring EarlyStopping(monitor={cb.monitor!r}, patience={cb.patience}) to "
                    f"its patience, so the monitor measures whatever the budget. A patience of at least "
                    f"{needed + 1} leaves room for one postponement at a time.",
                    category=UserWarning,
                )
                return

    def _stopper_at_stake(self, trainer: pl.Trainer) -> EarlyStopping | None:
        """An ``EarlyStopping`` on a key of this monitor that the repeats before the next validation
        (the next chance to measure) would make stop the fit, if any."""
        for cb in self._early_stoppings(trainer):
            if cb.wait_count + _checks_to_next_validation(trainer, cb) >= max(cb.patience, 1):
                return cb
        return None

    def _early_stoppings(self, trainer: pl.Trainer) -> list[EarlyStopping]:
        """The ``EarlyStopping`` callbacks on a key of this monitor that count a repeated value as no
        improvement (all but those with a negative ``min_delta``)."""
        found = []
        for cb in trainer.callbacks:
            key = getattr(cb, "monitor", None)
            if not (isinstance(cb, EarlyStopping) and isinstance(key, str) and key.startswith(f"{self.prefix}/")):
                continue
            zero = torch.zeros(())
            if not cb.monitor_op(zero - cb.min_delta, zero):  # a negative min_delta: a repeat improves
                found.append(cb)
        return found

    def _check_watched_keys(self, trainer: pl.Trainer) -> None:
        """At the start of fit: a key under this prefix that another callback monitors and that this
        configuration never logs is an error (close to a logged key, or one the monitor logs only with
        another configuration); any other unknown key under the prefix is a warning (the module may log it)."""
        n = len(self.prefix) + 1
        known = self._loggable_keys() | {k[n:] for k in self._always_logged()}
        for cb in trainer.callbacks:
            key = getattr(cb, "monitor", None)
            if cb is self or not isinstance(key, str) or not key.startswith(f"{self.prefix}/"):
                continue
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

    def _watched_keys(self, trainer: pl.Trainer, strict_only: bool = False) -> set[str]:
        """Keys under this monitor's prefix that other callbacks monitor (``strict_only``: those that
        fail on a missing key, i.e. all but ``EarlyStopping(strict=False)``)."""
        return set(self._watchers(trainer, strict_only))

    def _fill_watched_keys(self, trainer: pl.Trainer, epoch: int, produced: set[str] | None) -> list[str]:
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
        watchers = self._watchers(trainer, strict_only=True)
        known = set(self.last_values) | self._always_logged() | set(trainer.callback_metrics)
        loggable = {f"{self.prefix}/{k}" for k in self._loggable_keys()}
        absent = sorted(k for k in watchers if k not in known and k in loggable)
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
        watching = [cb for cb in trainer.callbacks if cb is not self and getattr(cb, "monitor", None) == key]
        value = _worst_value(getattr(watching[0], "mode", "min"))
        for cb in watching:
            threshold = getattr(cb, "divergence_threshold", None)
            if threshold is not None:
                value = min(value, threshold) if value > 0 else max(value, threshold)
        return value

    def _watchers(self, trainer: pl.Trainer, strict_only: bool) -> dict[str, str]:
        """``{key: mode}`` of the keys under this monitor's prefix that other callbacks monitor."""
        return {
            cb.monitor: getattr(cb, "mode", "min")
            for cb in trainer.callbacks
            if cb is not self
            and isinstance(getattr(cb, "monitor", None), str)
            and cb.monitor.startswith(f"{self.prefix}/")
            and (getattr(cb, "strict", True) or not strict_only)
        }
