"""Progress of a measurement in the Trainer's progress bar.

The measurement core reports progress through an optional ``progress(done, total)`` function
(problems, passes or steps done out of ``total``) and knows nothing of Lightning.
:class:`MeasurementProgress` is that function for a monitor. Where it shows:

* nothing on ranks other than global rank zero, nothing while a measurement is younger than
  :data:`DELAY_SECONDS` (short ones stay silent), and nothing when the Trainer has no progress
  bar (``enable_progress_bar=False``) or its bar is disabled;
* with a :class:`~lightning.pytorch.callbacks.TQDMProgressBar`: a bar of its own below the
  validation bar (``"cm measurement: 40%|████      | 120/300 problems, 0:00:12 left"``), removed
  when the measurement ends;
* with a :class:`~lightning.pytorch.callbacks.RichProgressBar`: a task in its progress display (its
  columns show the count and the time left), removed when the measurement ends;
* with any other progress bar: a log line (``rank_zero_info``) at most every
  :data:`LOG_INTERVAL_SECONDS` seconds.

The time left is the time so far scaled by the work left, ``elapsed · (total − done) / done``.
A failure to show progress never fails the measurement: progress is then off for it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info

#: What the measurement core calls: ``progress(done, total)``.
ProgressFn = Callable[[int, int], None]

#: Seconds a measurement runs before its progress is shown.
DELAY_SECONDS = 2.0
#: Seconds between two progress lines when they go to the log.
LOG_INTERVAL_SECONDS = 10.0
#: Seconds between two redraws of a progress bar.
REDRAW_SECONDS = 0.5


def format_left(seconds: float) -> str:
    """``h:mm:ss`` for a finite number of seconds, ``"?"`` otherwise."""
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) and seconds >= 0 else "?"


class MeasurementProgress:
    """Shows the progress of one measurement (see the module docstring); call it as ``progress(done, total)``.

    Args:
        trainer: the Trainer whose progress bar shows it.
        label: what is measured, e.g. ``"cm measurement"``.
        unit: what ``done`` and ``total`` count, e.g. ``"problems"``.
        clock: seconds (for tests); default :func:`time.monotonic`.
    """

    def __init__(
        self, trainer: pl.Trainer, label: str, unit: str = "problems", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.label, self.unit, self.clock = label, unit, clock
        self.start = clock()
        self.kind = self._kind(trainer)
        self.bar: Any = trainer.progress_bar_callback if self.kind else None
        self._tqdm: Any = None
        self._task: Any = None
        self._last_shown = -math.inf

    @staticmethod
    def _kind(trainer: pl.Trainer) -> str | None:
        """``"tqdm"``, ``"rich"``, ``"log"`` or None (nothing shown)."""
        bar = getattr(trainer, "progress_bar_callback", None)
        if not getattr(trainer, "is_global_zero", False) or bar is None or getattr(bar, "is_disabled", False):
            return None
        if isinstance(bar, TQDMProgressBar):
            return "tqdm"
        if isinstance(bar, RichProgressBar) and getattr(bar, "progress", None) is not None:
            return "rich"
        return "log"

    @property
    def enabled(self) -> bool:
        """Whether anything can be shown (global rank zero, an enabled progress bar)."""
        return self.kind is not None

    def part(self, start: int, size: int, total: int) -> ProgressFn | None:
        """A ``progress(done, n)`` for one part of the measurement that spans ``[start, start + size)`` of
        ``total`` (e.g. the boundaries after the classes); None when nothing is shown."""
        if not self.enabled:
            return None

        def report(done: int, n: int) -> None:
            self(start + round(size * min(done, n) / n) if n > 0 else start + size, total)

        return report

    def time_left(self, done: int, total: int) -> float:
        """Seconds left, from the time so far and the work left (inf before any work is done)."""
        if done <= 0:
            return math.inf
        return (self.clock() - self.start) * max(total - done, 0) / done

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self.start < DELAY_SECONDS:
            return
        try:
            if self.kind == "tqdm":
                self._show_tqdm(done, total, now)
            elif self.kind == "rich":
                self._show_rich(done, total)
            elif now - self._last_shown >= LOG_INTERVAL_SECONDS:
                self._last_shown = now
                rank_zero_info(
                    f"{self.label}: {done}/{total} {self.unit} done, about {format_left(self.time_left(done, total))} left"
                )
        except Exception:  # never fail a measurement because progress could not be shown
            self.close()
            self.kind = None

    def _show_tqdm(self, done: int, total: int, now: float) -> None:
        if self._tqdm is None:
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._tqdm = Tqdm(
                desc=self.label,
                total=total,
                initial=done,
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} " + self.unit + "{postfix}",
            )
        elif now - self._last_shown < REDRAW_SECONDS and done < total:
            return
        self._last_shown = now
        self._tqdm.total = total
        self._tqdm.n = done
        self._tqdm.set_postfix_str(f"{format_left(self.time_left(done, total))} left", refresh=False)
        self._tqdm.refresh()

    def _show_rich(self, done: int, total: int) -> None:
        progress = self.bar.progress
        if self._task is None:
            self._task = progress.add_task(self.label, total=total, completed=done)
        else:
            progress.update(self._task, total=total, completed=done)
        self.bar.refresh()

    def close(self) -> None:
        """Remove what was shown (the measurement ended). Never raises."""
        try:
            if self._tqdm is not None:
                self._tqdm.close()
            if self._task is not None:
                self.bar.progress.remove_task(self._task)
                self.bar.refresh()
        except Exception:
            pass
        self._tqdm = self._task = None

    def __enter__(self) -> MeasurementProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
