"""A minimal LightningModule around any classifier, shared by the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn


class NetModule(pl.LightningModule):
    """``net`` trained with cross-entropy and Adam at ``lr``; logs ``val_loss``."""

    def __init__(self, net: nn.Module, lr: float):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
