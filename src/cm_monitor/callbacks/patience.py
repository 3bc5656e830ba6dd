"""Whether an ``EarlyStopping`` on a monitor key would end a run on the repeated values alone.

A monitor logs its last values again at the validations without a measurement, and
``EarlyStopping`` counts each of them as a check without improvement. :func:`forced_stop` replays
the checks of a fit's schedule (which validations a monitor measures, when ``EarlyStopping``
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
        first_epoch: the epoch the fit starts at (``trainer.current_epoch``).
        end_epoch: the fit ends before this epoch (``max_epochs``, or from ``max_steps``); ``None``:
            no end known.
        min_epochs: ``EarlyStopping`` cannot end the fit before this many epochs.
        last_measured: the epoch (stream: the validation) of the monitor's last measurement, when a
            resumed fit has one.
        max_validations: a stream's validations in this fit (from ``max_steps``), if bounded.
    """

    every_n_epochs: int
    batches_per_epoch: float
    val_check_batch: float
    check_val_every_n_epoch: int | None
    first_epoch: int = 0
    end_epoch: int | None = None
    min_epochs: int = 0
    last_measured: int | None = None
    max_validations: int | None = None

    @property
    def stream(self) -> bool:
        return math.isinf(self.batches_per_epoch)


@dataclass(frozen=True)
class Stop:
    """A stop that the repeats alone force: at ``epoch`` (a stream: after ``validations``), with
    ``repeats`` checks without a measurement in a row before it."""

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


def _horizon(schedule: Schedule, patience: int) -> int:
    """How far to replay when the fit has no known end: past ``min_epochs`` and a few windows."""
    per = schedule.check_val_every_n_epoch or 1
    return schedule.first_epoch + schedule.min_epochs + 4 * (schedule.every_n_epochs + per) + patience + 2


def checks(schedule: Schedule, on_train_epoch_end: bool, patience: int) -> Iterator[tuple[int, bool]]:
    """``(epoch, measured)`` for each check an ``EarlyStopping`` makes after the monitor's first
    value exists: at each validation, or with ``on_train_epoch_end`` at each epoch's end (measured
    when a validation of that epoch was). A stream yields validation indices as epochs."""
    last = schedule.last_measured
    if schedule.stream:
        count = schedule.max_validations or schedule.every_n_epochs * (patience + 4)
        for k in range(count):
            measured = last is None or k - last >= schedule.every_n_epochs
            last = k if measured else last
            yield k, measured
        return
    end = schedule.end_epoch if schedule.end_epoch is not None else _horizon(schedule, patience)
    for epoch in range(schedule.first_epoch, end):
        measured_here = False
        for _ in range(_validations_in(schedule, epoch)):
            measured = last is None or epoch - last >= schedule.every_n_epochs
            last = epoch if measured else last
            measured_here |= measured
            if not on_train_epoch_end:
                yield epoch, measured
        if on_train_epoch_end and last is not None:
            yield epoch, measured_here


def forced_stop(schedule: Schedule, patience: int, on_train_epoch_end: bool = False) -> Stop | None:
    """The stop an ``EarlyStopping(patience=patience)`` makes before the fit's end even if every
    measurement improves, or ``None``. Its ``repeats`` is the longest run of checks without a
    measurement seen; ``patience > repeats`` lets every measurement be compared."""
    wait = longest = run = 0
    stop = None
    events = list(checks(schedule, on_train_epoch_end, patience))
    for k, (epoch, measured) in enumerate(events):
        run = 0 if measured else run + 1
        longest = max(longest, run)
        wait = 0 if measured else wait + 1
        if stop is None and wait >= max(patience, 1):
            stop = (k, epoch)
    if stop is None:
        return None
    k, epoch = stop
    if schedule.stream:
        ends = schedule.max_validations
        return Stop(None, k + 1, longest) if ends is None or k + 1 < ends else None
    effective = max(epoch, schedule.min_epochs - 1)
    if schedule.end_epoch is not None and effective >= schedule.end_epoch - 1:
        return None  # the fit ends there anyway
    return Stop(effective, k + 1, longest)
