"""Plain PyTorch with UGRO: report numbers, and save on every rank when ``ugroctl checkpoint`` asks.

::

    from exporters import ugro_torch
    ...
    ugro_torch.report({"train/loss": loss.item(), "lr": lr}, step=step)
    if ugro_torch.should_checkpoint():          # same answer on every rank
        path = save(...)                        # a collective save, or rank 0's
        ugro_torch.saved(path, step)

Standard library only at import (torch is used only if the script already imported it);
outside UGRO every call is a cheap no-op and ``should_checkpoint`` never communicates.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

try:
    from exporters import ugro_metrics
except ImportError:  # copied next to the training script
    import ugro_metrics  # type: ignore[import-not-found,no-redef,unused-ignore]

__all__ = ["agree", "report", "saved", "should_checkpoint"]


def report(metrics: Mapping[str, object], step: int | None = None, *,
           all_ranks: bool = False) -> None:
    """Every number in ``metrics`` (names normalised: ``train/loss`` -> ``train_loss``)."""
    if not ugro_metrics.enabled():
        return
    values = {str(k): v for k, v in metrics.items() if k != "step"}
    ugro_metrics.report(step, all_ranks=all_ranks, **values)


def saved(path: str | os.PathLike[str], step: int, *, all_ranks: bool = True) -> None:
    """Tell ugrod a checkpoint was written (from every rank by default: it shows who saved)."""
    ugro_metrics.saved_checkpoint(path, step, all_ranks=all_ranks)


def should_checkpoint() -> bool:
    """True on every rank at once when a checkpoint request reached any rank.

    Under torch.distributed this is a collective (an all-reduce of one number): call
    it at the same point on every rank, e.g. once a step. Outside UGRO it is False
    everywhere and communicates nothing.
    """
    if not ugro_metrics.enabled():
        return False
    return agree(ugro_metrics.checkpoint_requested(all_ranks=True))


def agree(flag: bool) -> bool:
    """``flag`` OR-ed over every rank of the default process group (as is, if none)."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return flag
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
