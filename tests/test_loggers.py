"""Figures in every logger: TensorBoard, CSV (a PNG under its log_dir), W&B offline, MLflow file store.

A figure that cannot be logged never fails the run: one warning per logger kind, the other loggers
still get it, and the figure is closed either way.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib
import pytest
from fakes import FakeMonitor, tiny_loaders, tiny_module, tiny_trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from cm_monitor.callbacks.figures import FigureWriter, figure_file

PNG = b"\x89PNG"


def _fit(tmp_path, loggers, monitor=None, **kwargs):
    monitor = monitor or FakeMonitor()
    t = tiny_trainer(tmp_path, [monitor], logger=loggers, **kwargs)
    t.fit(tiny_module(), *tiny_loaders())
    return t, monitor


def _tb(log_dir) -> tuple[list, list[int]]:
    """The images ``fake/plot`` and the steps of the scalar ``fake/value`` in a TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    images = acc.Images("fake/plot") if "fake/plot" in acc.Tags()["images"] else []
    return images, [e.step for e in acc.Scalars("fake/value")]


def test_tensorboard_and_csv_each_get_every_figure_built_once(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    _, monitor = _fit(tmp_path, [tb, csv])
    assert monitor.num_measurements == 2 and monitor.builds == 2  # once per measurement, not per logger
    images, scalar_steps = _tb(tb.log_dir)
    assert len(images) == 2 and all(im.encoded_image_string[:4] == PNG for im in images)
    steps = [im.step for im in images]
    assert steps == scalar_steps and steps[0] < steps[1]  # at the step of that validation's scalars
    files = sorted((Path(csv.log_dir) / "figures" / "fake" / "plot").glob("*.png"))
    assert files == [Path(figure_file(csv.log_dir, "fake/plot", step)) for step in steps]
    assert all(f.read_bytes()[:4] == PNG for f in files)


class Broken(Logger):
    """A logger that logs scalars but has nowhere to put a figure (no log_dir, no save_dir)."""

    name, version = "broken", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class FailingTB(TensorBoardLogger):
    """TensorBoard whose figure writing raises."""

    @property
    def experiment(self):
        exp = super().experiment

        def add_figure(*args, **kwargs):
            raise OSError("disk full")

        exp.add_figure = add_figure
        return exp


def test_a_figure_that_cannot_be_logged_is_one_warning_and_the_run_goes_on(tmp_path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    csv = CSVLogger(tmp_path, name="csv", version=0)
    failing = FailingTB(tmp_path, name="tb", version=0)
    monitor = FakeMonitor(build=lambda: plt.figure(figsize=(2, 2)))  # registered with pyplot
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, _ = _fit(tmp_path, [failing, Broken(), csv], monitor=monitor, max_epochs=3)
    figure_warnings = [str(w.message) for w in caught if "could not be logged" in str(w.message)]
    assert len(figure_warnings) == 2  # one per failing logger, not one per measurement
    assert any("FailingTB" in m and "disk full" in m for m in figure_warnings)
    assert any("Broken" in m and "no `log_dir`" in m for m in figure_warnings)
    assert t.current_epoch == 3 and monitor.num_measurements == 3  # the run went on
    assert len(list((Path(csv.log_dir) / "figures" / "fake" / "plot").glob("*.png"))) == 3
    assert plt.get_fignums() == []  # every figure closed, also after a failure
    assert t.callback_metrics["fake/value"] == 1.0


def test_a_figure_that_cannot_be_built_is_a_warning(tmp_path):
    def fail():
        raise ValueError("no data to plot")

    csv = CSVLogger(tmp_path, name="csv", version=0)
    with pytest.warns(RuntimeWarning, match=r"'fake/plot' could not be logged \(building the figure: ValueError"):
        t, monitor = _fit(tmp_path, [csv], monitor=FakeMonitor(build=fail))
    assert monitor.num_measurements == 2 and t.callback_metrics["fake/failed"] == 0.0


def test_no_logger_no_figure_built(tmp_path):
    _, monitor = _fit(tmp_path, False)
    assert monitor.num_measurements == 2 and monitor.builds == 0
    # log_figures=False: not built either, with a logger
    _, monitor = _fit(tmp_path, [CSVLogger(tmp_path)], monitor=FakeMonitor(log_figures=False))
    assert monitor.builds == 0


def test_writer_reports_failures_without_raising():
    writer = FigureWriter("Owner")
    with pytest.warns(RuntimeWarning, match="Owner: the figure 'x/y' could not be logged"):
        failures = writer.write([Broken()], {"x/y": lambda: __import__("fakes").small_figure()}, step=1)
    assert len(failures) == 1 and failures[0].startswith("x/y → Broken: ValueError")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is not warned about again
        assert len(writer.write([Broken()], {"x/y": lambda: __import__("fakes").small_figure()}, step=2)) == 1


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="cm-monitor-test")
    try:
        t, monitor = _fit(tmp_path, [logger])
    finally:
        import wandb

        wandb.finish()
    assert monitor.builds == 2
    images = sorted(Path(tmp_path).rglob("media/images/fake/plot_*.png"))
    assert len(images) == 2 and all(p.read_bytes()[:4] == PNG for p in images)
    assert math.isclose(float(t.callback_metrics["fake/value"]), 1.0)


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    logger = MLFlowLogger(experiment_name="cm-monitor-test", tracking_uri=(tmp_path / "mlruns").as_uri())
    _, monitor = _fit(tmp_path, [logger])
    assert monitor.builds == 2
    listed = logger.experiment.list_artifacts(logger.run_id, "fake/plot")
    assert len(listed) == 2 and all(a.path.startswith("fake/plot/step_") and a.path.endswith(".png") for a in listed)
