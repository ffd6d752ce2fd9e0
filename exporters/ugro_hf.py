"""Hugging Face Trainer with UGRO in one line: ``Trainer(..., callbacks=[UgroCallback()])``.

It reports every number the Trainer logs (``loss``, ``grad_norm``, ``learning_rate``,
``epoch``, ``eval/...``; names normalised, ``train/loss`` -> ``train_loss``) with the
global step, what was run (model, learning rate, epochs, batch size, the script's
digest), every checkpoint the Trainer saves (from every rank), and turns
``ugroctl checkpoint JOB`` into a save by the Trainer on every rank at the same step.

Importable without transformers (the callback then has no Trainer to attach to) and
inert outside UGRO: no file is written and no rank communicates.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from exporters import ugro_metrics, ugro_torch
except ImportError:  # copied next to the training script
    import ugro_metrics  # type: ignore[import-not-found,no-redef,unused-ignore]
    import ugro_torch  # type: ignore[import-not-found,no-redef,unused-ignore]

try:
    from transformers import TrainerCallback as _Base
except ImportError:  # transformers absent: a plain base keeps this module importable
    _Base = object  # type: ignore[assignment,misc]

__all__ = ["UgroCallback"]

_PREFIX = "checkpoint"  # the Trainer's PREFIX_CHECKPOINT_DIR


class UgroCallback(_Base):  # type: ignore[misc,valid-type,unused-ignore]
    """Reports logs, run parameters and checkpoints; saves on ``ugroctl checkpoint``."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not ugro_metrics.enabled() or not state.is_world_process_zero:
            return
        model = kwargs.get("model")
        config = getattr(model, "config", None)
        ugro_metrics.report_run(
            model=getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
            or type(model).__name__,
            learning_rate=args.learning_rate, epochs=args.num_train_epochs,
            max_steps=state.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
            world_size=args.world_size, seed=args.seed)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs or not ugro_metrics.enabled() or not state.is_world_process_zero:
            return
        numbers = {k: v for k, v in logs.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:
            ugro_torch.report(numbers, step=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if ugro_metrics.enabled() and not state.is_world_process_zero:
            ugro_metrics.report(step=state.global_step)  # a heartbeat by this node's path
        if ugro_torch.should_checkpoint():
            control.should_save = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if ugro_metrics.enabled():
            path = os.path.join(args.output_dir, f"{_PREFIX}-{state.global_step}")
            ugro_torch.saved(path, state.global_step)
