#!/usr/bin/env python3
"""A Hugging Face Trainer script run with UGRO: one line adds the integration.

    ugroctl submit --name hf1 --nodes 2 --torchrun -- examples/train_hf.py --steps 200

With ``--no-ugro`` it is a plain Trainer script: ugrod still shows its step and
loss, read from the Trainer's own output (docs/frameworks.md). The model is a
tiny GPT-2 built from a config and the data is random tokens, so nothing is
downloaded; on a real job, load your model and dataset instead.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Slow(TrainerCallback):
    """--sleep-per-step: stands in for a real model's step time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--output-dir", default=os.environ.get("UGRO_CHECKPOINT_DIR") or "hf-out")
    p.add_argument("--save-steps", type=int, default=0, help="save every N steps (0: no)")
    p.add_argument("--no-ugro", action="store_true", help="a plain Trainer script")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    callbacks: list[TrainerCallback] = [Slow(args.sleep_per_step)]
    if not args.no_ugro:
        from exporters.ugro_hf import UgroCallback

        callbacks.append(UgroCallback())  # <- the one line
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to=[],
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        use_cpu=True, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1
        else None, dataloader_num_workers=0, disable_tqdm=False, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(256, 16, 64),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=os.environ.get("UGRO_RESUME_FROM") or None)


if __name__ == "__main__":
    main()
