"""Per-rank GPU use over a job's attempt, from the health sweeps' samples.

The monitor hands each node's sample here (``account``); each running job's
ranks' GPUs add to running sums and peaks, kept on disk per job (``gpu_use.json``
through ``store/job_results.py``) so a restart mid-job loses none of them.
``ugroctl results`` shows them (``job_resources``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ugrod.core import gpus
from ugrod.core.state import Job, JobState, State
from ugrod.store import job_results

logger = logging.getLogger("ugrod.loops.gpu_use")

KEPT_JOBS = 500  # ended jobs' figures kept in memory: the newest few hundred


@dataclass
class Usage:
    """Running GPU figures of one rank's GPU during a job attempt."""

    rank: int
    node: str
    gpu: int
    samples: int = 0
    util_sum: float = 0.0
    util_n: int = 0
    util_peak: float | None = None
    mem_sum: float = 0.0
    mem_n: int = 0
    mem_peak: int | None = None

    def add(self, g: gpus.GpuSample) -> None:
        """One sample of this GPU."""
        self.samples += 1
        if g.util_percent is not None:
            self.util_sum += g.util_percent
            self.util_n += 1
            self.util_peak = max(self.util_peak or 0.0, g.util_percent)
        if g.memory_used_bytes is not None:
            self.mem_sum += g.memory_used_bytes
            self.mem_n += 1
            self.mem_peak = max(self.mem_peak or 0, g.memory_used_bytes)

    def saved(self) -> dict[str, Any]:
        """The running figures as gpu_use.json keeps them (``from_saved`` reads them back)."""
        return {"rank": self.rank, "node": self.node, "gpu": self.gpu, "samples": self.samples,
                "util_sum": self.util_sum, "util_n": self.util_n, "util_peak": self.util_peak,
                "mem_sum": self.mem_sum, "mem_n": self.mem_n, "mem_peak": self.mem_peak}

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> Usage | None:
        try:
            return cls(rank=int(d["rank"]), node=str(d["node"]), gpu=int(d["gpu"]),
                       samples=int(d["samples"]), util_sum=float(d["util_sum"]),
                       util_n=int(d["util_n"]), util_peak=None if d["util_peak"] is None
                       else float(d["util_peak"]), mem_sum=float(d["mem_sum"]),
                       mem_n=int(d["mem_n"]),
                       mem_peak=None if d["mem_peak"] is None else int(d["mem_peak"]))
        except (KeyError, TypeError, ValueError):
            return None

    def view(self) -> dict[str, Any]:
        """The figures as ``results`` shows them: averages and peaks."""
        return {"rank": self.rank, "node": self.node, "gpu": self.gpu, "samples": self.samples,
                "util_avg": round(self.util_sum / self.util_n, 1) if self.util_n else None,
                "util_peak": self.util_peak,
                "mem_avg_bytes": round(self.mem_sum / self.mem_n) if self.mem_n else None,
                "mem_peak_bytes": self.mem_peak}


class GpuUse:
    """Every running job's GPU use per rank and GPU, over its current attempt."""

    def __init__(self, job_dir: Callable[[str], Path] | None = None) -> None:
        # job -> its directory on the head: figures are kept there for restarts
        self.job_dir = job_dir
        self._usage: dict[str, tuple[int, dict[tuple[int, int], Usage]]] = {}
        self._dirty: set[str] = set()

    def job_resources(self, job: Job) -> dict[str, Any]:
        """Average and peak GPU use per rank and GPU over the job's current attempt."""
        entry = self._usage.get(job.id)
        if entry is None or entry[0] != job.attempt:
            entry = self._saved(job)
            if entry is None:
                return {"ranks": []}
        rows = sorted(entry[1].values(), key=lambda u: (u.rank, u.gpu))
        return {"ranks": [u.view() for u in rows], "attempt": job.attempt}

    def account(self, state: State, name: str, sample: gpus.NodeSample) -> None:
        """Add node ``name``'s sample to the figures of the jobs running there."""
        by_uuid = {g.uuid: g for g in sample.gpus}
        by_index = {g.index: g for g in sample.gpus}
        for job_id in state.jobs_on(name):
            job = state.jobs[job_id]
            if job.state is not JobState.RUNNING:
                continue
            attempt, table = self._usage.get(job.id) or self._saved(job) \
                or (job.attempt, {})
            if attempt != job.attempt:
                table = {}
            self._usage[job.id] = (job.attempt, table)
            self._dirty.add(job.id)
            for p in job.placement:
                if p.node != name:
                    continue
                for i, index in enumerate(p.gpus):
                    uuid = p.gpu_uuids[i] if i < len(p.gpu_uuids) else ""
                    g = by_uuid.get(uuid) if uuid else by_index.get(index)
                    if g is None:
                        continue
                    u = table.setdefault((p.rank, index), Usage(rank=p.rank, node=name,
                                                                gpu=index))
                    u.add(g)

    def _saved(self, job: Job) -> tuple[int, dict[tuple[int, int], Usage]] | None:
        """A job's figures as gpu_use.json kept them (after a restart), or None."""
        if self.job_dir is None:
            return None
        table = {}
        for row in job_results.load_usage(self.job_dir(job.id), job.attempt):
            u = Usage.from_saved(row)
            if u is not None:
                table[(u.rank, u.gpu)] = u
        return (job.attempt, table) if table else None

    def save(self) -> None:
        """Write the figures that changed this sweep (per job: gpu_use.json)."""
        dirty, self._dirty = self._dirty, set()
        if self.job_dir is None:
            return
        for job_id in dirty:
            entry = self._usage.get(job_id)
            if entry is None:
                continue
            rows = [u.saved() for u in entry[1].values()]
            try:
                job_results.store_usage(self.job_dir(job_id), entry[0], rows)
            except OSError as exc:
                logger.warning("cannot save the GPU use of %s: %s", job_id, exc)

    def prune(self, state: State) -> None:
        """Forget jobs gone from the state; keep the newest few hundred."""
        for job_id in list(self._usage):
            job = state.jobs.get(job_id)
            if job is None:
                del self._usage[job_id]
        while len(self._usage) > KEPT_JOBS:  # ended jobs' figures: keep the newest few hundred
            del self._usage[next(iter(self._usage))]
