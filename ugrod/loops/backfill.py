"""Back-fill of a rank's log and metrics from its node's copy, once the node answers again.

The central ``rank_N.log`` and metrics files are copies that the executor streams from
each rank's run dir while it supervises the attempt. An attempt that ended while one of
its nodes was cut off (given up on, fenced) stops being streamed there, so the central copy
stops where the partition began, although the node's copy goes on: the steps the rank
made unseen, the traceback that explains its end. When such an attempt ends, a mark is
left in its job dir (``.fences/ATTEMPT-RANK.json``: node and how much of each file the
central copy holds); once the node answers and the rank is confirmed gone
(ugrod/loops/fencing.py), the rest is streamed from the node's copy and appended, so
``logs`` shows the whole run and its end. A later attempt may have appended to the same
central file meanwhile: the back-filled part then follows it under a header line saying
whose it is (its metrics lines are then not appended: after the newer attempt's they
would read as the job's latest figures).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from ugrod.core.state import Job
from ugrod.nodes.agent import LogChunk, MetricLine, NodeAgent, RankExit

logger = logging.getLogger("ugrod.loops.backfill")

MARKS = ".fences"


class Mark(msgspec.Struct, frozen=True, kw_only=True):
    """What the central copy of one rank of one attempt holds, as its supervision ended."""

    job: str
    attempt: int
    rank: int
    node: str
    log: int  # bytes of the node's rank.log already in the central copy
    metrics: int  # and of its metrics.jsonl
    log_end: int  # size of the central log then (another size later: a later attempt wrote)
    metrics_end: int


def log_file(jobdir: Path, rank: int) -> Path:
    return jobdir / f"rank_{rank}.log"


def metrics_file(jobdir: Path, rank: int) -> Path:
    return jobdir / ("metrics.jsonl" if rank == 0 else f"metrics_rank_{rank}.jsonl")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _bases(jobdir: Path, attempt: int, rank: int) -> tuple[int, int]:
    """Where the attempt's part of the central files began (``.attempts/N.json``)."""
    try:
        raw = json.loads((jobdir / ".attempts" / f"{attempt}.json").read_bytes())
        entry = raw[str(rank)]
        return int(entry["log"]), int(entry["metrics"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def mark(jobdir: Path, job: Job, rank: int, node: str) -> Mark:
    """Leave a mark for a rank of the job's current attempt whose node's copy may hold more
    than the central one (call it once the attempt's streams have stopped)."""
    log_base, met_base = _bases(jobdir, job.attempt, rank)
    log_end, met_end = _size(log_file(jobdir, rank)), _size(metrics_file(jobdir, rank))
    m = Mark(job=job.id, attempt=job.attempt, rank=rank, node=node,
             log=max(0, log_end - log_base), metrics=max(0, met_end - met_base),
             log_end=log_end, metrics_end=met_end)
    d = jobdir / MARKS
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = d / f".{m.attempt}-{m.rank}.tmp"
    tmp.write_bytes(msgspec.json.encode(m))
    os.replace(tmp, d / f"{m.attempt}-{m.rank}.json")
    return m


def marks(jobdir: Path) -> list[Mark]:
    """The job's back-fills still to do (unreadable marks are dropped with a warning)."""
    d = jobdir / MARKS
    out = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(d.glob("*.json")):
            try:
                out.append(msgspec.json.decode(path.read_bytes(), type=Mark))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("dropping back-fill mark %s: %s", path, exc)
                path.unlink(missing_ok=True)
    return out


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def run(agent: NodeAgent, jobdir: Path, m: Mark,
              on_metric: Callable[[bytes], Awaitable[Any]] | None = None) -> tuple[int, int]:
    """Stream what the central copy lacks from the node and append it; the mark goes.

    The rank must be gone (its watch ends only at its exit). Callers own the deadline;
    TransportError when the node does not answer (the mark stays for the next try).
    Returns the bytes of log and metrics added.
    """
    log_path, met_path = log_file(jobdir, m.rank), metrics_file(jobdir, m.rank)
    added = [0, 0]
    header_due = [_size(log_path) != m.log_end, _size(met_path) != m.metrics_end]
    header = (f"----- ugro: attempt {m.attempt}, rank {m.rank} on {m.node}, back-filled "
              f"from the node's copy (from byte {m.log}) -----\n").encode()
    async for item in agent.watch(m.job, m.attempt, m.rank, m.log, m.metrics):
        if isinstance(item, LogChunk) and item.data:
            if header_due[0]:
                _append(log_path, header)
                header_due[0] = False
            _append(log_path, item.data)
            added[0] += len(item.data)
        elif isinstance(item, MetricLine):
            if on_metric is not None:
                await on_metric(item.data)
            if header_due[1]:
                continue  # a later attempt's metrics follow: older lines after them would
                # read as the newest figures (the log above keeps the whole story)
            line = item.data.rstrip(b"\n") + b"\n"
            _append(met_path, line)
            added[1] += len(line)
        elif isinstance(item, RankExit):
            break
    (jobdir / MARKS / f"{m.attempt}-{m.rank}.json").unlink(missing_ok=True)
    if any(added):
        logger.info("job %s attempt %d rank %d: back-filled %d bytes of log and %d of "
                    "metrics from %s", m.job, m.attempt, m.rank, added[0], added[1], m.node)
    return added[0], added[1]
