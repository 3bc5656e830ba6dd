"""Train a small CNN and watch its class-manifold dimension in TensorBoard next to loss and accuracy.

    python examples/train_digits.py                      # 8x8 digits from scikit-learn, offline, CPU
    python examples/train_digits.py --dataset cifar10    # downloads CIFAR-10 (torchvision); use a GPU
    tensorboard --logdir runs

The run logs val_loss and val_acc and, through cm_monitor.CMDimensionMonitor, cm/dim (the mean
class-manifold dimension D - d*), its uncertainty cm/dim_std, cm/dim_frac, cm/dim_class_{c},
cm/boundary_dim, the cost cm/seconds and a figure cm/curves per measurement. EarlyStopping
watches val_loss: the controls in docs/method.md do not show that cm/dim is a good stopping
signal (it peaks after the first epoch on digits), so it is watched, not acted on.

--monitors cm,diffeo,elasticity also attaches cm_monitor.DiffeoStabilityMonitor (diffeo/rf,
diffeo/log10_rf, diffeo/df, diffeo/gf) and cm_monitor.ElasticityMonitor (elasticity/intra,
/inter, /ratio, /cluster_ari and the figure elasticity/similarity).

On a shared or busy machine run it with OMP_NUM_THREADS=1 (see the README).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from cm_monitor import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor

#: Monitors the example can attach (``--monitors``).
MONITORS = ("cm", "diffeo", "elasticity")


class Classifier(pl.LightningModule):
    """A LightningModule around any network that returns logits; logs val_loss and val_acc."""

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 3e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.net = net
        self.lr, self.weight_decay = lr, weight_decay
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # logits: what the monitors measure

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def digits_cnn() -> nn.Module:
    """A small CNN for 1 x 8 x 8 inputs, with BatchNorm and dropout."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(32 * 4 * 4, 10),
    )


def cifar_cnn() -> nn.Module:
    """A small VGG-style CNN for 3 x 32 x 32 inputs (about 85% test accuracy after ~30 epochs)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 64), *block(64, 128), *block(128, 256), nn.Flatten(), nn.Dropout(0.3), nn.Linear(256 * 4 * 4, 10)
    )


def digits_data(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 8 x 8 digits (1797 images, shipped with scikit-learn): 80% train, 20% validation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)

    def tensors(x, y):
        x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # pixels in [0, 1]
        return (x - 0.3) / 0.4, torch.tensor(y, dtype=torch.long)  # about zero mean, unit std

    train = TensorDataset(*tensors(x_train, y_train))
    val = TensorDataset(*tensors(x_val, y_val))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


def cifar10_data(batch_size: int, data_dir: Path, num_workers: int) -> tuple[DataLoader, DataLoader]:
    """CIFAR-10 from torchvision (downloaded to ``data_dir`` on first use); the test split validates."""
    try:
        from torchvision import datasets, transforms
    except ImportError:
        sys.exit(
            "--dataset cifar10 needs torchvision, which is not installed. Install it with "
            "`pip install torchvision` (matching your torch version), or use --dataset digits."
        )
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    normalize = transforms.Normalize(mean, std)
    train_tf = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    val_tf = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        train = datasets.CIFAR10(str(data_dir), train=True, download=True, transform=train_tf)
        val = datasets.CIFAR10(str(data_dir), train=False, download=True, transform=val_tf)
    except Exception as err:  # URLError, socket errors, HTTP errors, corrupted archives...
        sys.exit(
            f"Could not download CIFAR-10 into {data_dir}: {type(err).__name__}: {err}\n"
            "It needs a network connection the first time. Without one, copy the extracted "
            f"'cifar-10-batches-py' folder into {data_dir}, or run with --dataset digits (offline)."
        )
    kwargs = {
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, **kwargs),
        DataLoader(val, batch_size=512, **kwargs),
    )


def make_monitors(
    names: list[str], dataset: str, every_n_epochs: int, max_cost_frac: float | None = None
) -> list[Callback]:
    monitors: list[Callback] = []
    common = {"every_n_epochs": every_n_epochs, "max_cost_frac": max_cost_frac}
    for name in names:
        if name == "cm":
            if dataset == "digits":
                # D = 64: a coarse grid and few anchors per class manifold keep one measurement at a few
                # CPU seconds; the 10 anchors per class (the default) calibrate the temperature
                monitors.append(CMDimensionMonitor(**common, anchors_per_target=4, dims=8, num_pairs=5))
            else:
                # D = 3072: a finer grid; on a GPU the cost grows little with more anchors
                monitors.append(CMDimensionMonitor(**common, anchors_per_target=16, dims=12, num_pairs=10))
        elif name == "diffeo":
            # 8 x 8 digits fold at 1 pixel (docs/diffeo.md): 0.6 pixel, about the smallest natural size
            delta = 0.6 if dataset == "digits" else 1.0
            monitors.append(DiffeoStabilityMonitor(**common, num_anchors=20, delta=delta))
        elif name == "elasticity":
            monitors.append(ElasticityMonitor(**common, num_anchors=6))
    return monitors


def parse_monitors(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MONITORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown monitor(s) {unknown or [text]}; choose a comma-separated list of {', '.join(MONITORS)}"
        )
    return list(dict.fromkeys(names))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written, and each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:  # the help says what no value means
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits", help="the data and the CNN")
    p.add_argument(
        "--monitors", type=parse_monitors, default="cm", help="comma-separated, any of: " + ", ".join(MONITORS)
    )
    p.add_argument(
        "--max-epochs", type=int, default=None, help="training epochs at most (default: 30 digits, 40 cifar10)"
    )
    p.add_argument(
        "--every-n-epochs",
        type=int,
        default=None,
        help="measure every this many epochs (default: 2 digits; 10 cifar10, where one measurement costs "
        "about as much as a training epoch)",
    )
    p.add_argument(
        "--max-cost-frac",
        type=float,
        default=None,
        help="budget: postpone measurements that would take more than this fraction of the run's time "
        "(postponed validations count as no improvement for --patience; default: no budget)",
    )
    p.add_argument("--patience", type=int, default=5, help="EarlyStopping patience on val_loss, in validations")
    p.add_argument("--min-delta", type=float, default=0.0, help="EarlyStopping min_delta on val_loss")
    p.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard log directory")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where CIFAR-10 is downloaded")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 64 digits, 128 cifar10)")
    p.add_argument("--num-workers", type=int, default=4, help="dataloader workers (cifar10)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the train/validation split and of training (seed_everything)"
    )
    args = p.parse_args(argv)
    if args.max_epochs is None:
        args.max_epochs = 30 if args.dataset == "digits" else 40
    if args.every_n_epochs is None:
        args.every_n_epochs = 2 if args.dataset == "digits" else 10
    if args.batch_size is None:
        args.batch_size = 64 if args.dataset == "digits" else 128
    for name in ("max_epochs", "every_n_epochs", "patience", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_cost_frac is not None and not 0 < args.max_cost_frac <= 1:
        p.error("--max-cost-frac must be in (0, 1]")
    return args


def build(args: argparse.Namespace) -> tuple[pl.Trainer, Classifier, DataLoader, DataLoader, TensorBoardLogger]:
    """Model, data, callbacks and Trainer for ``args`` (also used by ``docs/scripts/cm_curves.py``)."""
    pl.seed_everything(args.seed, workers=True)
    if args.dataset == "digits":
        train, val = digits_data(args.batch_size, args.seed)
        # a small learning rate, so that the first epochs of the curves are visible
        model = Classifier(digits_cnn(), num_classes=10, lr=3e-4)
    else:
        train, val = cifar10_data(args.batch_size, args.data_dir, args.num_workers)
        model = Classifier(cifar_cnn(), num_classes=10, lr=2e-3, weight_decay=5e-4)
    callbacks = make_monitors(args.monitors, args.dataset, args.every_n_epochs, args.max_cost_frac)
    callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=args.patience, min_delta=args.min_delta))
    logger = TensorBoardLogger(args.logdir, name=args.dataset)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_model_summary=False,
        enable_checkpointing=True,
    )
    return trainer, model, train, val, logger


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    trainer, model, train, val, logger = build(args)
    start = time.perf_counter()
    trainer.fit(model, train, val)
    wall = time.perf_counter() - start

    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())}
    seconds = [m.total_seconds for m in trainer.callbacks if hasattr(m, "total_seconds")]
    print(f"\nFinished after {trainer.current_epoch} epochs in {wall:.0f} s.")
    keys = ["val_loss", "val_acc", "cm/dim", "cm/dim_std", "cm/cutting_dim", "cm/temperature", "cm/boundary_dim"]
    keys += ["diffeo/rf", "diffeo/log10_rf", "diffeo/df", "diffeo/gf"]
    keys += ["elasticity/intra", "elasticity/inter", "elasticity/ratio", "elasticity/cluster_ari"]
    keys += ["elasticity/ratio_baseline", "elasticity/cluster_ari_baseline"]
    for key in keys:
        if key in metrics:
            print(f"  {key:22s} {metrics[key]:.4f}")
    if seconds:
        print(f"  {'measurement time':22s} {sum(seconds):.1f} s in total ({100 * sum(seconds) / wall:.0f}% of the run)")
    print(f"\nSee the curves with:\n  tensorboard --logdir {args.logdir}\n(run directory: {logger.log_dir})")


if __name__ == "__main__":
    main()
