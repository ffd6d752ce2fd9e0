"""Lightning with UGRO in one line: ``Trainer(logger=UgroLogger(), callbacks=[UgroCallback()])``.

``UgroLogger`` reports every number ``self.log`` records (names normalised: ``train/loss``
-> ``train_loss``) with the global step, the hyperparameters (with the script's digest),
and the checkpoints ModelCheckpoint saves. ``UgroCallback`` turns ``ugroctl checkpoint
JOB`` into ``trainer.save_checkpoint`` on every rank at the same step (into
``$UGRO_CHECKPOINT_DIR``). Use ``UgroLogger`` beside another logger with ``logger=[...]``.

Importable without lightning and inert outside UGRO.
Cancel: ugrod sends SIGINT first, which Lightning turns into a clean shutdown.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

try:
    from exporters import ugro_metrics, ugro_torch
except ImportError:  # copied next to the training script
    import ugro_metrics  # type: ignore[import-not-found,no-redef,unused-ignore]
    import ugro_torch  # type: ignore[import-not-found,no-redef,unused-ignore]

try:
    from lightning.pytorch.callbacks import Callback as _Callback
    from lightning.pytorch.loggers.logger import Logger as _Logger
except ImportError:  # no Lightning: plain bases keep this module importable
    _Callback = object  # type: ignore[assignment,misc]
    _Logger = object  # type: ignore[assignment,misc]

__all__ = ["UgroCallback", "UgroLogger"]


def _flat(params: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and depth < 3:
            out.update(_flat(v, f"{name}/", depth + 1))
        elif isinstance(v, str | int | float | bool):
            out[name] = v
    return out


class UgroLogger(_Logger):  # type: ignore[misc,valid-type,unused-ignore]
    """A Lightning logger writing to UGRO's metrics file (rank 0)."""

    @property
    def name(self) -> str:
        return "ugro"

    @property
    def version(self) -> str:
        return f"{os.environ.get('UGRO_JOB_ID', 'local')}-{ugro_metrics.attempt()}"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ugro_torch.report(metrics, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, Namespace):
            params = vars(params)
        if isinstance(params, Mapping):
            ugro_metrics.report_run(**_flat(params))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        path = getattr(checkpoint_callback, "last_model_path", "") or getattr(
            checkpoint_callback, "best_model_path", "")
        if path:
            step = _step_of(checkpoint_callback)
            ugro_metrics.saved_checkpoint(path, step if step is not None else 0)


def _step_of(checkpoint_callback: Any) -> int | None:
    trainer = getattr(checkpoint_callback, "_trainer", None)
    step = getattr(trainer, "global_step", None)
    return step if isinstance(step, int) else None


class UgroCallback(_Callback):  # type: ignore[misc,valid-type,unused-ignore]
    """Saves a checkpoint on every rank when ``ugroctl checkpoint`` asks."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not ugro_metrics.enabled():
            return
        if not getattr(trainer, "is_global_zero", True):  # a heartbeat by this node's path
            ugro_metrics.report(step=int(trainer.global_step))
        asked = ugro_metrics.checkpoint_requested(all_ranks=True)
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):
            return
        folder = ugro_metrics.checkpoint_dir() or os.path.join(trainer.default_root_dir,
                                                               "checkpoints")
        step = int(trainer.global_step)
        path = os.path.join(os.fspath(folder), f"ugro-step-{step:06d}.ckpt")
        trainer.save_checkpoint(path)  # every rank calls it; the strategy writes it once
        ugro_torch.saved(path, step)
