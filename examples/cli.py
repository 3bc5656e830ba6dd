"""The digits example through Lightning's LightningCLI: the monitors come from a YAML config.

    pip install -e ".[cli]"   # jsonargparse[signatures], which LightningCLI needs
    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs 4
    python examples/cli.py fit --print_config     # every option, with its default, as YAML

The callbacks are listed under trainer.callbacks in examples/config.yaml, each as a class_path
(cm_monitor.CMDimensionMonitor, ...) with its init_args: the same arguments as in Python
(docs/cli.md). The model and data are those of examples/train_digits.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_digits.py beside this file

from train_digits import Classifier, digits_cnn, digits_data


class DigitsModel(Classifier):
    """The small CNN of train_digits.py for 1 x 8 x 8 digits, 10 classes.

    Args:
        lr: AdamW learning rate (small, so that the first epochs of the curves are visible).
        weight_decay: AdamW weight decay.
    """

    def __init__(self, lr: float = 3e-4, weight_decay: float = 1e-4) -> None:
        super().__init__(digits_cnn(), num_classes=10, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()


class DigitsData(pl.LightningDataModule):
    """scikit-learn's 8 x 8 digits (offline): 80% train, 20% validation.

    Args:
        batch_size: training batch size.
        seed: seed of the stratified train/validation split.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self._loaders: tuple[DataLoader, DataLoader] | None = None

    def setup(self, stage: str) -> None:
        if self._loaders is None:
            self._loaders = digits_data(self.batch_size, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loaders[0]

    def val_dataloader(self) -> DataLoader:
        return self._loaders[1]


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run LightningCLI on the digits model and data (``args``: the command line, default ``sys.argv``)."""
    return LightningCLI(DigitsModel, DigitsData, args=args, run=run)


if __name__ == "__main__":
    main()
