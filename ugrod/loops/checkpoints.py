"""Checkpoints that follow the job: copied to the head, put where a retry needs them.

In the background, each job with a copy policy (``latest``, ``every``) has its nodes
listed every ``interval_s`` and after each ``checkpoint_saved``; what
``core.checkpoints.to_copy`` picks is copied into the head's job directory
(``checkpoints/NAME``), one copy at a time cluster-wide, at the cluster's rate, by a
niced program on the node. Files are copied one by one (what is already there and
verified is skipped), into ``checkpoints/.ugro/parts/`` first: a partial file continues
where it stopped, and only a file whose sha256 on the head equals the node's is moved
into place. A failure is recorded (``checkpoint_copy_failed``) and retried with
backoff; copying stops, with that event and an alert, before the head's disk would
fall below ``checkpoints.min_free_gb``.

Before a retry or a resumed job starts, ``stage`` puts the newest checkpoint that
exists anywhere (recorded, listed on a node that answers, or copied to the head) on the
new rank 0's node (or every node), so ``UGRO_RESUME_FROM`` names a file there.

This module decides when and what (one background task per job) and keeps the listings;
``checkpoint_copy.HeadCopies`` copies one checkpoint to the head and ``checkpoint_stage.
Staging`` puts one on a retry's nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ugrod.core import checkpoints as ck
from ugrod.core import events as ev
from ugrod.core.render_json import iso
from ugrod.core.state import ACTIVE, TERMINAL, InvalidEvent, Job, State
from ugrod.loops.checkpoint_copy import DiskFloor, HeadCopies
from ugrod.loops.checkpoint_stage import Staging
from ugrod.nodes.agent import NodeAgent, RunAs, job_cwd, no_switch
from ugrod.nodes.transport.base import TransportError
from ugrod.store import log as evlog

if TYPE_CHECKING:
    from ugrod.metrics.runtime_stats import RuntimeStats
    from ugrod.nodes.fleet import Fleet
    from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.checkpoints")

LIST_TIMEOUT_S = 15.0


@dataclass
class CopySettings:
    """The cluster's ``checkpoints:`` section (a job's own policy and keep win)."""

    copy: str = "latest"
    keep: int = 2
    rate_bytes_s: float = 50e6
    floor_bytes: int = 10 << 30
    interval_s: float = 30.0
    stage: str = "rank0"


class Checkpoints:
    """Copies of every job's checkpoints on the head, and staging for retries."""

    def __init__(self, ledger: Ledger, fleet: Fleet, job_dir: Callable[[str], Path],
                 run_as: RunAs = no_switch, *, settings: CopySettings | None = None,
                 stats: RuntimeStats | None = None) -> None:
        self.ledger = ledger
        self.fleet = fleet  # the job's agent on each node
        self.job_dir = job_dir  # the job's directory on the head
        self.run_as = run_as  # the account the copies run as on each node (the job owner's)
        self.settings = settings or CopySettings()  # replaced on a config reload
        self.stats = stats
        self.copies = HeadCopies(self)
        self.staging = Staging(self)
        self._listed: dict[str, dict[str, list[ck.Listed]]] = {}  # job -> node -> listing
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._one_at_a_time = asyncio.Lock()
        self._closing = False
        self.ledger.on_commit(self._on_commit)

    @property
    def stopped(self) -> str | None:
        """Why copying stopped (the disk floor), or None."""
        return self.copies.stopped

    # ---- when to copy ----------------------------------------------------------------

    def _on_commit(self, records: list[ev.Record], state: State) -> None:
        for r in records:
            e = r.event
            if isinstance(e, ev.JobRunning | ev.CheckpointSaved | ev.JobEnded):
                self._ensure(e.job)
                wake = self._wake.get(e.job)
                if wake is not None:
                    wake.set()

    def reattach(self) -> None:
        """After a restart: watch every job that may still have checkpoints to copy."""
        for job in self.ledger.state.active_jobs():
            if job.state in ACTIVE or job.attempt > 0:
                self._ensure(job.id)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def policy(self, job: Job) -> tuple[str, int]:
        keep = job.spec.checkpoint_keep
        return (job.spec.checkpoint_copy or self.settings.copy,
                self.settings.keep if keep is None else keep)

    def _ensure(self, job_id: str) -> None:
        job = self.ledger.state.jobs.get(job_id)
        if self._closing or job_id in self._tasks or job is None \
                or self.policy(job)[0] == "none":
            return
        self._wake[job_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._job_loop(job_id),
                                                      name=f"checkpoints {job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda t, j=job_id: self._done(j, t))  # type: ignore[misc]

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._wake.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("copying the checkpoints of %s crashed", job_id,
                         exc_info=task.exception())

    async def _job_loop(self, job_id: str) -> None:
        failures = 0
        while True:
            job = self.ledger.state.jobs.get(job_id)
            if job is None or self.policy(job)[0] == "none":
                return
            ended = job.state in TERMINAL
            delay = self.settings.interval_s
            try:
                await self.sync(job)
                failures = 0
            except DiskFloor:
                delay = self.settings.interval_s
            except (asyncio.CancelledError, evlog.LogWriteFailed):
                raise
            except (TransportError, OSError, ValueError) as exc:
                failures += 1
                give_up = ended and failures >= ck.MAX_FAILURES_AFTER_END
                delay = ck.backoff_s(failures)
                if self.stats is not None:
                    self.stats.checkpoint_copy_failures.inc()
                what = getattr(exc, "path", "") or ""
                logger.warning("job %s: checkpoint copy failed (%d in a row): %s", job_id,
                               failures, exc)
                await self.record(ev.CheckpointCopyFailed(
                    job=job_id, path=what, node=getattr(exc, "node", None),
                    reason=_short(exc), failures=failures,
                    retry_in_s=None if give_up else delay))
                if give_up:
                    return
            if ended and failures == 0:
                return  # the pass after the job's end: everything there is copied
            wake = self._wake[job_id]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            wake.clear()

    async def sync(self, job: Job) -> None:
        """One pass over a job: list its nodes, copy what the policy wants, prune."""
        policy, keep = self.policy(job)
        found = await self.refresh(job)
        for f in ck.to_copy(found, policy):
            async with self._one_at_a_time:
                current = self.ledger.state.jobs.get(job.id, job)
                await self.copies.copy(current, f)
        current = self.ledger.state.jobs.get(job.id, job)
        names = ck.to_prune(current.central, keep)
        if names:
            await self.copies.remove(current, names, f"keeping the newest {keep}")

    # ---- what there is ---------------------------------------------------------------

    def _nodes_of(self, job: Job, extra: Iterable[str] = ()) -> list[str]:
        names = {p.node for p in job.placement} | set(job.failed_nodes) | set(extra)
        names |= {r.node for r in job.reported if r.node} | {c.node for c in job.central}
        names |= set(self._listed.get(job.id, {}))
        return sorted(n for n in names if n in self.fleet.agents)

    async def refresh(self, job: Job, extra: Iterable[str] = ()) -> list[ck.Found]:
        """List the job's checkpoints on every node it used (at once, bounded): the one
        list ``status``, ``results``, ``why`` and resume use (``discovered`` reads it)."""
        nodes = self._nodes_of(job, extra)
        answers = await asyncio.gather(*(self._list(job, n) for n in nodes))
        listed = self._listed.setdefault(job.id, {})
        for node, answer in zip(nodes, answers, strict=True):
            if answer is None:
                listed.pop(node, None)
            else:
                listed[node] = answer
        return self.discovered(job)

    def discovered(self, job: Job) -> list[ck.Found]:
        """The job's checkpoints as last listed (no I/O), oldest first."""
        listed = self._listed.get(job.id, {})
        return ck.discover(job.reported, [x for xs in listed.values() for x in xs],
                           job.central, listed)

    async def _list(self, job: Job, node: str) -> list[ck.Listed] | None:
        try:
            agent = self.fleet.agent_for(job, node)
            patterns = [r.path for r in job.reported[-100:] if r.node in (node, None)]
            if job.spec.checkpoints:
                patterns.append(job.spec.checkpoints)
            async with asyncio.timeout(LIST_TIMEOUT_S):
                files = await agent.list_checkpoints(job.id, patterns,
                                                     await job_cwd(job, agent))
        except (TransportError, TimeoutError, KeyError, ValueError) as exc:
            logger.debug("job %s: cannot list checkpoints on %s: %r", job.id, node, exc)
            return None
        return [ck.Listed(node, f.path, f.size_bytes, f.mtime) for f in files]

    def describe(self, job: Job, found: Iterable[ck.Found]) -> list[dict[str, Any]]:
        """The list as the API shows it (results, status)."""
        central = self.central_dir(job)
        sources = {c.name: ck.Where(c.node, c.path) for c in job.central}
        out = []
        for f in found:
            saved = f.at[0] if f.at else sources.get(f.central or "")
            out.append({"name": f.name, "path": saved.path if saved else None,
                        "node": saved.node if saved else None, "size_bytes": f.size_bytes,
                        "mtime": iso(f.mtime), "step": f.step,
                        "on": [f"{w.node}:{w.path}" for w in f.at],
                        "central": str(central / f.central) if f.central else None})
        return out

    async def newest(self, job: Job) -> str | None:
        """The path the newest checkpoint was saved at (a retry's ``resume_from``)."""
        found = await self.refresh(job)
        best = ck.resume_candidates(found, self._listed.get(job.id, {}))
        if not best:
            return job.resume_from
        f = best[0]
        if f.at:
            return f.at[0].path
        source = next((c for c in job.central if c.name == f.central), None)
        return source.path if source is not None else job.resume_from

    # ---- shared with the copier and staging ------------------------------------------

    def central_dir(self, job: Job) -> Path:
        return self.job_dir(job.id) / "checkpoints"

    def listed(self, job_id: str) -> dict[str, list[ck.Listed]]:
        """node -> the job's checkpoints as last listed there (nodes that answered)."""
        return self._listed.get(job_id, {})

    async def record(self, event: ev.Event) -> None:
        with contextlib.suppress(InvalidEvent):
            await self.ledger.record(ev.DAEMON, event)

    async def stage(self, job: Job, agents: list[NodeAgent]) -> dict[int, str]:
        """rank -> UGRO_RESUME_FROM on its node (``Staging.stage``)."""
        return await self.staging.stage(job, agents)


def _short(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, TransportError) else str(exc) or repr(exc)
    return text if len(text) <= 500 else text[:500] + "…"

