"""Figures of a measurement in every logger of a Trainer.

:class:`FigureWriter` builds each figure once and hands it to every logger, in the way that logger
takes images:

* :class:`~lightning.pytorch.loggers.TensorBoardLogger`: ``experiment.add_figure`` (IMAGES tab);
* :class:`~lightning.pytorch.loggers.WandbLogger`: ``log_image`` (the figure as an RGB array);
* :class:`~lightning.pytorch.loggers.MLFlowLogger`: ``experiment.log_figure`` as the run's artifact
  ``{tag}/step_{step:06d}.png``;
* any other logger (:class:`~lightning.pytorch.loggers.CSVLogger`, your own): a PNG file
  ``{log_dir}/figures/{tag}/step_{step:06d}.png`` under the logger's ``log_dir`` (its ``save_dir``
  if it has no ``log_dir``); a logger with neither gets no figures.

A figure that cannot be built or written never ends a run: the failure becomes one warning (rank
zero) per logger kind and tag, and the run goes on. Figures are closed after use, whatever happened.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def figure_dir(logger: Logger) -> str | None:
    """Where figures go for a logger that takes no images: its ``log_dir``, else its ``save_dir``."""
    for attr in ("log_dir", "save_dir"):
        try:
            path = getattr(logger, attr, None)
        except Exception:  # a property that needs a run that does not exist
            path = None
        if isinstance(path, str | os.PathLike) and str(path):
            return os.fspath(path)
    return None


def figure_file(root: str | os.PathLike, tag: str, step: int) -> str:
    """The PNG path of figure ``tag`` (e.g. ``cm/curves``) at ``step`` under ``root``."""
    return os.path.join(os.fspath(root), "figures", *tag.split("/"), f"step_{step:06d}.png")


def log_figure(logger: Logger, tag: str, figure: Any, step: int) -> None:
    """Send one matplotlib figure to one logger (see the module docstring); raises on failure."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[_rgb(figure)], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_figure(logger.run_id, figure, artifact_file=f"{tag}/step_{step:06d}.png")
    else:
        root = figure_dir(logger)
        if root is None:
            raise ValueError(f"{type(logger).__name__} takes no images and has no `log_dir` or `save_dir` for a PNG")
        path = figure_file(root, tag, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        figure.savefig(path, format="png")


def close_figure(figure: Any) -> None:
    """Release a figure: from ``pyplot``'s registry if it is there, and its artists."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
    clear = getattr(figure, "clear", None)
    if callable(clear):
        clear()


def _rgb(figure: Any) -> Any:
    """The figure as an ``[H, W, 3]`` uint8 array (drawn on an Agg canvas)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class FigureWriter:
    """Writes a measurement's figures to every logger; each failure is warned about once.

    Args:
        owner: the name used in warnings (e.g. the monitor's class name).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._warned: set[tuple[str, str]] = set()

    def write(self, loggers: Sequence[Logger], figures: Mapping[str, Callable[[], Any]], step: int) -> list[str]:
        """Build each figure once, send it to every logger, close it. Never raises.

        Args:
            loggers: the Trainer's loggers (nothing is built when there is none).
            figures: tag (with the monitor's prefix, e.g. ``cm/curves``) → function building the figure.
            step: the step the figure is logged at.

        Returns:
            The failures (``"tag → logger: Type: message"``), also those already warned about.
        """
        failures: list[str] = []
        if not loggers:
            return failures
        for tag, build in figures.items():
            try:
                figure = build()
            except Exception as err:
                failures.append(self._fail(tag, "building the figure", err))
                continue
            try:
                for logger in loggers:
                    try:
                        log_figure(logger, tag, figure, step)
                    except Exception as err:
                        failures.append(self._fail(tag, type(logger).__name__, err))
            finally:
                close_figure(figure)
        return failures

    def _fail(self, tag: str, where: str, err: Exception) -> str:
        message = f"{tag} → {where}: {type(err).__name__}: {err}"
        if (tag, where) not in self._warned:
            self._warned.add((tag, where))
            rank_zero_warn(
                f"{self.owner}: the figure {tag!r} could not be logged ({where}: {type(err).__name__}: {err}). "
                "Training goes on; this is not repeated for this figure and logger.",
                category=RuntimeWarning,
            )
        return message
