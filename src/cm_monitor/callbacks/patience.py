"""Whether an ``EarlyStopping`` on a monitor key would end a run on the repeated values alone.

A monitor logs its last values again at the validations without a measurement, and
``EarlyStopping`` counts each of them as a check without improvement. :func:`forced_stop` replays
the checks of a new fit's schedule (which validations a monitor measures, when ``EarlyStopping``
checks) assuming the best case, that every measurement improves: a stop it finds is certain and
caused by the repeats alone. It is a pure function of the :class:`Schedule`, so it is tested
against what Lightning does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """A fit's validation schedule, as Lightning resolved it at the start of training.

    Attributes:
        every_n_epochs: the monitor's; counted in validations when ``batches_per_epoch`` is
            infinite (a stream).
        batches_per_epoch: training batches per epoch (``trainer.num_training_batches``).
        val_check_batch: validate every this many batches (``trainer.val_check_batch``; infinite:
            at the end of an epoch of a stream, never mid-epoch).
        check_val_every_n_epoch: validate only in every this many epochs; ``None``: every
            ``val_check_batch`` batches counted across epochs.
        end_epoch: the fit ends before this epoch (``max_epochs``, or from ``max_steps``); ``None``:
            no end known.
        min_epochs: ``EarlyStopping`` cannot end the fit before this many epochs.
        max_validations: a stream's validations in this fit (from ``max_steps``), if bounded.
    """

    every_n_epochs: int
    batches_per_epoch: float
    val_check_batch: float
    check_val_every_n_epoch: int | None
    end_epoch: int | None = None
    min_epochs: int = 0
    max_validations: int | None = None

    @property
    def stream(self) -> bool:
        return math.isinf(self.batches_per_epoch)


@dataclass(frozen=True)
class Stop:
    """A stop that the repeats alone force: at ``epoch`` (a stream: after ``validations``);
    ``repeats``: the most checks without a measurement in a row in the fit's schedule."""

    epoch: int | None
    validations: int
    repeats: int


def _validations_in(schedule: Schedule, epoch: int) -> int:
    """How many validations run in ``epoch`` of a finite epoch length."""
    batches, every = int(schedule.batches_per_epoch), schedule.val_check_batch
    if math.isinf(every):
        return 1 if schedule.check_val_every_n_epoch is not None else 0
    step = int(every)
    if schedule.check_val_every_n_epoch is None:  # counted across epochs
        before, after = epoch * batches, (epoch + 1) * batches
        return after // step - before // step
    if (epoch + 1) % schedule.check_val_every_n_epoch:
        return 0
    return batches // step


def epochs_between_validations(check_val_every_n_epoch: int | None, val_check_batch: float, batches: float) -> int:
    """Epochs from one validating epoch to the next: ``check_val_every_n_epoch``, or with validation
    every ``val_check_batch`` batches counted across epochs of ``batches`` batches, as many epochs
    as that takes (1 when it is not known)."""
    if check_val_every_n_epoch is not None:
        return check_val_every_n_epoch
    if not batches or math.isinf(val_check_batch) or math.isinf(batches):
        return 1
    return max(1, math.ceil(val_check_batch / batches))


def _horizon(schedule: Schedule) -> int:
    """The epoch to replay to when the fit ends later or never: a few windows between two
    measurements, which then repeat."""
    per = epochs_between_validations(
        schedule.check_val_every_n_epoch, schedule.val_check_batch, schedule.batches_per_epoch
    )
    return 4 * (schedule.every_n_epochs + per) + 2


def checks(schedule: Schedule, on_train_epoch_end: bool) -> Iterator[tuple[int, bool, int]]:
    """The checks an ``EarlyStopping`` makes once the monitor has a value, as ``(epoch, measured,
    repeats)``: a check that may see a new measurement, then ``repeats`` checks that cannot (the
    other validations of that epoch: only an epoch's first validation can be measured). Checks are
    at validations, or with ``on_train_epoch_end`` at each epoch's end (measured when a validation
    of that epoch was). A stream yields one check per validation, its index as the epoch."""
    last: int | None = None
    if schedule.stream:
        replay = 2 * schedule.every_n_epochs + 2  # two windows, which then repeat
        count = replay if schedule.max_validations is None else min(schedule.max_validations, replay)
        for k in range(count):
            measured = last is None or k - last >= schedule.every_n_epochs
            last = k if measured else last
            yield k, measured, 0
        return
    end = _horizon(schedule)
    if schedule.end_epoch is not None:
        end = min(end, schedule.end_epoch)
    for epoch in range(end):
        validations = _validations_in(schedule, epoch)
        measured = validations > 0 and (last is None or epoch - last >= schedule.every_n_epochs)
        last = epoch if measured else last
        if on_train_epoch_end and last is not None:
            yield epoch, measured, 0
        elif not on_train_epoch_end and validations:
            yield epoch, measured, validations - 1


def forced_stop(schedule: Schedule, patience: int, on_train_epoch_end: bool = False) -> Stop | None:
    """The stop an ``EarlyStopping(patience=patience)`` makes before the fit's end even if every
    measurement improves, or ``None``. Its ``repeats`` is :func:`repeats_in_a_row`: ``patience >
    repeats`` lets every measurement be compared."""
    patience = max(patience, 1)  # patience 0 stops at the first check without improvement, as 1 does
    wait = seen = 0
    for epoch, measured, repeats in checks(schedule, on_train_epoch_end):
        wait = 0 if measured else wait + 1
        if wait + repeats >= patience:
            return _stop_before_the_end(schedule, epoch, seen + 1 + max(0, patience - wait), on_train_epoch_end)
        wait += repeats
        seen += 1 + repeats
    return None


def _stop_before_the_end(schedule: Schedule, epoch: int, validations: int, on_train_epoch_end: bool) -> Stop | None:
    """A stop requested at ``epoch`` (a stream: at check ``validations``), or None when the fit
    ends there anyway (``min_epochs`` delays it)."""
    longest = repeats_in_a_row(schedule, on_train_epoch_end)
    if schedule.stream:
        ends = schedule.max_validations
        return Stop(None, validations, longest) if ends is None or validations < ends else None
    effective = max(epoch, schedule.min_epochs - 1)
    if schedule.end_epoch is not None and effective >= schedule.end_epoch - 1:
        return None
    return Stop(effective, validations, longest)


def validated_epochs(schedule: Schedule) -> tuple[list[int], list[int], bool]:
    """The epochs of a new fit that validate, those whose (first) validation a monitor measures,
    and whether that is all of them (False: the fit goes on past the replay, which repeats)."""
    if schedule.stream:
        return [], [], False
    events = list(checks(schedule, on_train_epoch_end=False))
    complete = schedule.end_epoch is not None and schedule.end_epoch <= _horizon(schedule)
    return [epoch for epoch, _, _ in events], [epoch for epoch, m, _ in events if m], complete


def repeats_in_a_row(schedule: Schedule, on_train_epoch_end: bool = False) -> int:
    """The most checks without a measurement in a row in a new fit (0: every check sees one)."""
    wait = longest = 0
    for _, measured, repeats in checks(schedule, on_train_epoch_end):
        wait = (0 if measured else wait + 1) + repeats
        longest = max(longest, wait)
    return longest
