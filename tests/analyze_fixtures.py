"""A tiny digits model and its data, for tests/test_analyze.py and the ``cm-monitor analyze`` command.

Importable as ``analyze_fixtures`` (tests/ is on the path in the tests) and by file path:
``cm-monitor analyze CKPTS --model tests/analyze_fixtures.py:DigitsModule --data tests/analyze_fixtures.py:DigitsData``.
Self-contained: it imports nothing from the tests.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_VAL = 300


def digits_tensors() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8 × 8 digits as images ``[N, 1, 8, 8]`` (about zero mean, unit std): (train, validation)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16 - 0.3) / 0.4
    y = torch.tensor(y, dtype=torch.long)
    return (x[:-NUM_VAL], y[:-NUM_VAL]), (x[-NUM_VAL:], y[-NUM_VAL:])


class DigitsModule(pl.LightningModule):
    """An MLP on 8 × 8 images that returns logits; its hyperparameters are saved in checkpoints."""

    def __init__(self, hidden: int = 16, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsData(pl.LightningDataModule):
    """The digits: shuffled training batches, validation in a fixed order."""

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train, self.val = (TensorDataset(*t) for t in digits_tensors())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=128)


def val_loader(batch_size: int = 128) -> DataLoader:
    """A factory: the validation DataLoader alone."""
    return DataLoader(TensorDataset(*digits_tensors()[1]), batch_size=batch_size)
