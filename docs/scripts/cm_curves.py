"""Write docs/cm_curves.png: what CMDimensionMonitor shows while the digits example trains.

    python docs/scripts/cm_curves.py            # about a minute on a 2-core CPU

It trains the model of ``examples/train_digits.py`` (same data, model and monitor settings, but a
measurement at every epoch and no early stopping) for 16 epochs, reads the logged scalars back from
the TensorBoard event files, and draws three panels:

(a) ``cm/dim`` and ``cm/boundary_dim`` (± ``*_std``) against the epoch, with ``val_acc``;
(b) the fraction of anchors reaching the threshold against the plane dimension, per class, at the
    first measurement;
(c) the same after the last epoch (the figure TensorBoard shows under ``cm/curves``).
It prints the series and the measured cost.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import train_digits  # noqa: E402

from cm_monitor import CMDimensionMonitor  # noqa: E402
from cm_monitor.plotting import _new_figure, history_figure, plot_curves  # noqa: E402


class KeepEstimates(Callback):
    """Keeps the monitor's estimate after each measurement (for panels b and c)."""

    def __init__(self, monitor: CMDimensionMonitor):
        self.monitor, self.estimates = monitor, {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor.last_measured_epoch == trainer.current_epoch:
            self.estimates[trainer.current_epoch] = self.monitor.last_cm


def main() -> None:
    import tbparse

    logdir = Path(tempfile.mkdtemp(prefix="cm_curves_"))
    args = train_digits.parse_args(
        ["--logdir", str(logdir), "--every-n-epochs", "1", "--max-epochs", "16", "--patience", "1000"]
    )
    trainer, model, train, val, logger = train_digits.build(args)
    monitor = next(c for c in trainer.callbacks if isinstance(c, CMDimensionMonitor))
    keep = KeepEstimates(monitor)
    trainer.callbacks.insert(trainer.callbacks.index(monitor) + 1, keep)
    trainer.fit(model, train, val)

    df = tbparse.SummaryReader(logger.log_dir).scalars
    series = {tag: df[df.tag == tag].sort_values("step") for tag in df.tag.unique()}
    epochs = list(range(len(series["cm/dim"])))
    D = monitor.anchors[0].numel()

    fig, axes = _new_figure(3, width=4.6, height=3.9)
    steps = series["cm/dim"].step.tolist()

    def aligned(tag: str) -> list[float]:
        """The series of ``tag`` at the steps of ``cm/dim`` (NaN where it was not logged, e.g. a std
        that no class had)."""
        got = dict(zip(series[tag].step.tolist(), series[tag].value.tolist(), strict=True)) if tag in series else {}
        return [got.get(step, float("nan")) for step in steps]

    history_figure(
        epochs,
        {"cm/dim": aligned("cm/dim"), "cm/boundary_dim": aligned("cm/boundary_dim")},
        stds={"cm/dim": aligned("cm/dim_std"), "cm/boundary_dim": aligned("cm/boundary_dim_std")},
        ylabel="effective dimension D − d*  (D = 64)",
        title="(a) logged while training (± bootstrap std)",
        ax=axes[0],
    )
    acc = axes[0].twinx()
    acc.plot(epochs, series["val_acc"].value.tolist(), color="gray", ls=":", marker=".", label="val_acc")
    acc.set_ylabel("val_acc", color="gray")
    acc.set_ylim(0.5, 1.0)
    first, last = min(keep.estimates), max(keep.estimates)
    plot_curves(
        axes[1],
        keep.estimates[first],
        title=f"(b) epoch {first}: cm/dim = {keep.estimates[first].mean_dimension:.1f}",
        legend=False,
    )
    plot_curves(
        axes[2], keep.estimates[last], title=f"(c) epoch {last}: cm/dim = {keep.estimates[last].mean_dimension:.1f}"
    )
    for ax in axes[1:]:
        ax.set_xlim(0.9, D * 1.1)
    out = ROOT / "docs" / "cm_curves.png"
    fig.savefig(out, dpi=110)

    print(f"wrote {out}")
    for tag in ("cm/dim", "cm/dim_std", "cm/cutting_dim", "cm/temperature", "cm/boundary_dim", "val_acc", "cm/seconds"):
        print(f"{tag:18s}", " ".join(f"{v:6.2f}" for v in aligned(tag)))
    seconds = series["cm/seconds"].value
    print(f"measurement: {seconds.mean():.2f} s on average, {series['cm/cost_frac'].value.mean():.0%} of each epoch")


if __name__ == "__main__":
    main()
