"""A cheap GeometryMonitor and a tiny fit, for tests of the monitors' shared machinery.

:class:`FakeMonitor` measures nothing: it logs fixed values, builds a small figure, can advance a
fake clock by a fixed number of seconds and report progress; it has the anchors, schedule, logging,
cost and key checks of every monitor.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from modules import NetModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cm_monitor.callbacks.base import GeometryMonitor, Measurement


def small_figure() -> Figure:
    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    return fig


class FakeMonitor(GeometryMonitor):
    """Logs ``fake/value = 1`` (and ``fake/value_std`` with ``with_std``) and the figure ``fake/plot``."""

    prefix = "fake"
    _key_patterns = (r"value(_std)?",)

    def __init__(
        self,
        *,
        seconds: float = 0.0,
        clock: list[float] | None = None,
        with_std: bool = False,
        build: Callable[[], object] = small_figure,
        progress_steps: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("num_anchors", 2)
        kwargs.setdefault("verbose", False)
        super().__init__(**kwargs)
        self.seconds, self.clock, self.with_std, self.build = seconds, clock, with_std, build
        self.progress_steps = progress_steps
        self.builds = 0

    def _loggable_keys(self) -> set[str]:
        return {"value"} | ({"value_std"} if self.with_std else set())

    def _finish(self, trainer, pl_module, parts) -> Measurement:
        return parts[0]  # one process in these tests

    def _measure_part(self, trainer, pl_module, model, part) -> Measurement:
        if self.clock is not None:
            self.clock[0] += self.seconds
        with self._progress(trainer, "steps") as progress:
            report = progress.part(0, self.progress_steps, self.progress_steps)
            for k in range(self.progress_steps):
                if self.clock is not None:
                    self.clock[0] += 1.0
                if report is not None:
                    report(k + 1, self.progress_steps)

        def figure():
            self.builds += 1
            return self.build()

        values = {"value": 1.0} | ({"value_std": 0.1} if self.with_std else {})
        return Measurement(values=values, figures={"plot": figure})


def tiny_module() -> NetModule:
    torch.manual_seed(0)
    return NetModule(nn.Linear(4, 2), lr=0.1)


def tiny_loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long()
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=16)


def tiny_trainer(tmp_path, callbacks, logger=False, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("enable_progress_bar", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        **kwargs,
    )
