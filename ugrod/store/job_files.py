"""The job's central directory on the head: per-attempt files, the ranks' logs and metrics
as copied from their nodes, and the first result.json.

Only ugrod reads it (0700): owners read it through the API, which shows each job's logs,
metrics and checkpoints to its owner alone. Writes that follow a running job survive
someone deleting the directory (``append_kept``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ugrod.core import events as ev
from ugrod.core.state import Job

logger = logging.getLogger("ugrod.store.job_files")


def rank_log(jobdir: Path, rank: int) -> Path:
    """Where a rank's log is kept (its node's log: every process of the rank)."""
    return jobdir / f"rank_{rank}.log"


def rank_metrics(jobdir: Path, rank: int) -> Path:
    """Where a rank's metrics lines are kept: rank 0's are the job's."""
    return jobdir / ("metrics.jsonl" if rank == 0 else f"metrics_rank_{rank}.jsonl")


def start_attempt(job: Job, jobdir: Path) -> None:
    """Make the job dir ready for a new attempt: config.json, a log per rank (marked with
    the attempt), and where each rank's log and metrics begin for this attempt."""
    # Only ugrod reads the central job dir (0700): owners read it through the API,
    # which shows each job's logs, metrics and checkpoints to its owner alone.
    jobdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (jobdir / "checkpoints").mkdir(exist_ok=True, mode=0o700)
    config = {"job": job.id, "attempt": job.attempt, "owner": job.owner,
              "spec": ev.to_builtins(job.spec),
              "placement": ev.to_builtins(job.placement),
              "rendezvous": f"{job.rdzv_host}:{job.rdzv_port}"}
    write_atomic(jobdir / "config.json", json.dumps(config, indent=2).encode())
    bases = {}
    for p in job.placement:
        log_path = rank_log(jobdir, p.rank)
        if job.attempt > 1:
            append(log_path, f"----- ugro: attempt {job.attempt}, rank {p.rank} on "
                             f"{p.node} -----\n".encode())
        else:
            append(log_path, b"")  # every rank has a log, even one that prints nothing
        metrics = rank_metrics(jobdir, p.rank)
        bases[str(p.rank)] = {"log": size(log_path), "metrics": size(metrics)}
    attempts = jobdir / ".attempts"
    attempts.mkdir(exist_ok=True)
    write_atomic(attempts / f"{job.attempt}.json", json.dumps(bases).encode())


def bases(job: Job, jobdir: Path) -> dict[int, dict[str, int]]:
    """Where each rank's log and metrics began for the job's current attempt (bytes)."""
    try:
        raw = json.loads((jobdir / ".attempts" / f"{job.attempt}.json").read_bytes())
        return {int(k): {"log": int(v["log"]), "metrics": int(v["metrics"])}
                for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {p.rank: {"log": 0, "metrics": 0} for p in job.placement}


def write_result(jobdir: Path, job: Job, metrics: Any) -> None:
    """The first result.json of an ended job: how it ended and its newest metrics."""
    if not jobdir.exists():
        return
    result = {"job": job.id, "state": job.state.value, "attempt": job.attempt,
              "exit_code": job.exit_code, "reason": job.reason,
              "metrics": metrics,
              "started_at": job.first_started_at, "ended_at": job.ended_at}
    with contextlib.suppress(OSError):
        write_atomic(jobdir / "result.json", json.dumps(result, indent=2).encode())


def size(path: Path) -> int:
    """A file's size in bytes; 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def append(path: Path, data: bytes) -> None:
    """Append to a file (made 0600 if new)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def append_kept(path: Path, data: bytes) -> None:
    """Append to a file of the central job directory, making it again if it was removed.

    Someone deleting the job directory while the job runs must not stop its supervision
    (the watcher once died on FileNotFoundError and the job never ended); a write that
    still fails (disk full, permissions) drops that piece of output with a warning.
    """
    try:
        append(path, data)
        return
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot write %s: %s; output dropped", path, exc)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        append(path, data)
    except OSError as exc:
        logger.warning("cannot write %s: %s; output dropped", path, exc)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a file whole (temp file, fsync, rename): a reader sees the old or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a file's last 16 KiB ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]
