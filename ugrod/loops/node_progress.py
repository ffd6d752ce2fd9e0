"""Progress per path: the newest training step seen through each node of a running attempt.

The executor streams every rank's metrics from its own node. Rank 0's lines carry the
job's figures; the ranks on the other nodes write a heartbeat line with the newest step
(``exporters/ugro_metrics.report``), so each node that answers is a path of its own by
which progress reaches ugrod. The watchdog asks which paths still show the step advancing
when one node stops answering (``ugrod/core/node_loss.py``).

Also the job's progress after a ugrod restart: the newest step and when it was reached,
read back from the central metrics files (the watch then goes on from where they stop),
so an attempt ended right after a restart knows it made progress and for how long it has
been silent.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

_TAIL = 64 * 1024  # bytes read back from the end of a metrics file at start


class _Step(msgspec.Struct):
    step: int | None = None
    ts: float | None = None


_step_decoder = msgspec.json.Decoder(_Step)


def step_of(raw: bytes) -> int | None:
    """A metrics or heartbeat line's step (a non-negative integer), else None; never raises."""
    try:
        step = _step_decoder.decode(raw).step
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return step if step is not None and 0 <= step < 1 << 63 else None


class NodeProgress:
    """Job -> (attempt, node -> (newest step seen through it, when it last advanced))."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, dict[str, tuple[int, float]]]] = {}

    def saw(self, job: str, attempt: int, node: str, step: int, now: float) -> None:
        entry = self._seen.get(job)
        if entry is None or entry[0] != attempt:
            entry = self._seen[job] = (attempt, {})
        prior = entry[1].get(node)
        if prior is None or step > prior[0]:
            entry[1][node] = (step, now)

    def line(self, job: str, attempt: int, node: str, raw: bytes, now: float) -> None:
        """A metrics line streamed from ``node``: its step, if it has one."""
        step = step_of(raw)
        if step is not None:
            self.saw(job, attempt, node, step, now)

    def advanced(self, job: str, attempt: int) -> Mapping[str, float]:
        """Node -> when the step seen through it last advanced (the caller's clock)."""
        entry = self._seen.get(job)
        if entry is None or entry[0] != attempt:
            return {}
        return {node: at for node, (_, at) in entry[1].items()}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop every job not in ``keep`` (the active ones)."""
        kept = set(keep)
        for job in [j for j in self._seen if j not in kept]:
            del self._seen[job]


def newest_step(jobdir: Path, *, metrics_from: int = 0, since_ts: float = 0.0
                ) -> tuple[int, float] | None:
    """The highest step of the current attempt in the tails of the job's central files
    (rank 0's ``metrics.jsonl`` from byte ``metrics_from``, where the attempt's part
    begins; ``progress.jsonl`` from time ``since_ts``) and the wall time (``ts``) it was
    reported; None when neither has one."""
    best: tuple[int, float] | None = None
    for name, start, since in (("metrics.jsonl", metrics_from, -math.inf),
                               ("progress.jsonl", 0, since_ts)):
        for values in _tail_lines(jobdir / name, start):
            step, ts = values.get("step"), values.get("ts")
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                continue
            if not isinstance(ts, int | float) or not math.isfinite(ts) or ts < since:
                continue
            if best is None or step > best[0]:
                best = (step, float(ts))
    return best


def _tail_lines(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """The JSON objects of the file's last lines from byte ``start`` (at most _TAIL bytes)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            begin = max(start, size - _TAIL)
            f.seek(begin)
            data = f.read()
    except OSError:
        return []
    lines = data.splitlines()
    if begin > start and lines:
        lines = lines[1:]  # cut by the tail's start
    out = []
    for line in lines:
        try:
            values = json.loads(line)
        except ValueError:
            continue
        if isinstance(values, dict):
            out.append(values)
    return out
