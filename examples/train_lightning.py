#!/usr/bin/env python3
"""A Lightning script run with UGRO: one line adds the logger and the checkpoint callback.

    ugroctl submit --name pl1 --nodes 2 --torchrun -- examples/train_lightning.py --steps 200

Under torchrun (`--torchrun`) Lightning finds its rank and world
from the environment; ``num_nodes`` comes from ``NNODES``. ``ugroctl checkpoint``
makes every rank save at the same step; ``ugroctl cancel`` sends SIGINT first,
which Lightning turns into a clean shutdown (docs/frameworks.md).
"""

from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch
from torch import nn


class Regression(L.LightningModule):
    def __init__(self, lr: float, sleep_s: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(8, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        self.log("train/weight_norm", self.net.weight.norm())
        if self.hparams.sleep_s:  # stands in for a real model's step time
            time.sleep(self.hparams.sleep_s)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.arange(8.0).unsqueeze(1) + 0.1 * torch.randn(512, 1, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    from exporters.ugro_lightning import UgroCallback, UgroLogger

    trainer = L.Trainer(
        logger=UgroLogger(), callbacks=[UgroCallback()],  # <- the one line
        accelerator="cpu", devices=1, num_nodes=int(os.environ.get("NNODES", "1")),
        strategy="ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto",
        max_steps=args.steps, max_epochs=-1, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(args.lr, args.sleep_per_step), data,
                ckpt_path=os.environ.get("UGRO_RESUME_FROM") or None)


if __name__ == "__main__":
    main()
