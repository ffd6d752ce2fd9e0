"""What clients read about jobs beyond their state: the queue, ``why``, results, sweeps,
and where a dry run would start.

Each is read from the committed state, the event history, a job's directory and the
jobs' progress (``loops/progress.py``); none changes anything but a finished job's ``result.json``
(written once, the first time it is read or when the job ends).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from ugrod.config import schema as cfgmod
from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core import progress_formats as pf
from ugrod.core import render_json as rj
from ugrod.core.state import TERMINAL, WAITING, Job, NodeHealth, State, Sweep
from ugrod.core.why import explain
from ugrod.loops.executor import Executor
from ugrod.loops.planning import Planning
from ugrod.loops.progress import Progress
from ugrod.nodes.fleet import Fleet
from ugrod.store import job_results, reports
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.views")

RECENT_ENDED = 200  # ended jobs remembered for `status` (it shows the last 50)


class Sources(Protocol):
    """Where the views read from (the running daemon's parts, at each use)."""

    @property
    def ledger(self) -> Ledger: ...

    @property
    def executor(self) -> Executor: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def monitor(self) -> Any: ...

    @property
    def planning(self) -> Planning: ...

    @property
    def fleet(self) -> Fleet: ...

    @property
    def config(self) -> cfgmod.Config: ...


class Views:
    """Client reads of jobs; remembers which jobs ended last and writes result.json."""

    def __init__(self, sources: Sources) -> None:
        self._src = sources
        self._ended_order: list[str] = []
        self._storing: dict[str, asyncio.Task[dict[str, Any]]] = {}  # job -> its write

    # ---- jobs that ended ------------------------------------------------------------------

    def remember_ended(self, state: State) -> None:
        """Start the list of recently ended jobs from a replayed state."""
        self._ended_order = [j.id for j in sorted(
            (j for j in state.jobs.values() if j.state in TERMINAL),
            key=lambda j: j.ended_at or 0)][-RECENT_ENDED:]

    def job_ended(self, job: Job) -> None:
        """The executor's word that an attempt ended (a job may retry: not always final)."""
        self._ended_order.append(job.id)
        del self._ended_order[:-RECENT_ENDED]
        if job.state in TERMINAL:  # result.json now, whether or not anyone asks
            task = asyncio.get_running_loop().create_task(self.results(job))
            task.add_done_callback(_result_stored)

    def recent_ended(self, n: int) -> list[str]:
        """The ``n`` jobs that ended last, oldest first."""
        state = self._src.ledger.state
        out: list[str] = []
        for j in reversed(self._ended_order):
            if j not in out and j in state.jobs and state.jobs[j].state in TERMINAL:
                out.append(j)
                if len(out) == n:
                    break
        return out[::-1]

    # ---- the queue and why ----------------------------------------------------------------

    def queue_view(self, render: Callable[[Job], Any] = rj.job) -> list[dict[str, Any]]:
        """Waiting jobs in the planner's queue order, with its reasons and estimates
        (each job as ``render`` makes it: the API's job object unless told otherwise)."""
        state = self._src.ledger.state
        planning = self._src.planning
        ranked = {j: i for i, j in enumerate(planning.order)}
        estimates = planning.estimates
        waiting = sorted((j for j in state.active_jobs() if j.state in WAITING),
                         key=lambda j: (ranked.get(j.id, len(ranked)), -j.priority,
                                        j.submit_seq))

        def reason(j: Job) -> str:
            if j.held:
                return f"held: `ugroctl release {j.id}` lets it run"
            return j.waiting_reason or "waiting for the next planner round"
        return [{"position": i, "job": render(j), "reason": reason(j),
                 "estimated_start": rj.iso(estimates.get(j.id))}
                for i, j in enumerate(waiting, 1)]

    def why(self, job_id: str) -> list[dict[str, Any]]:
        """A job's history from the event log, each event in words (reads the whole log:
        run it in a thread; LogError for a damaged segment)."""
        out = []
        steps: dict[str, int | None] = {}  # checkpoint path -> step, as saved so far
        needle = f'"job":{json.dumps(job_id)}'.encode()
        for line in self._src.ledger.history():
            if needle not in line and b'"sweep_created"' not in line:
                continue
            rec = codec.decode(line)
            e = rec.event
            if getattr(e, "job", None) != job_id and job_id not in getattr(e, "jobs", ()):
                continue
            if isinstance(e, ev.CheckpointSaved):
                steps[e.path] = e.step
            out.append({"seq": rec.seq, "ts": codec.format_ts(rec.ts), "type": e.kind,
                        "actor": rec.actor.user, "text": explain(rec, steps)})
        return out

    # ---- results ----------------------------------------------------------------------------

    async def results(self, job: Job) -> dict[str, Any]:
        """A running job's figures now; an ended job's from its result.json (written once)."""
        if job.state not in TERMINAL:
            return await self._results(job)
        jobdir = self._src.executor.job_dir(job.id)
        stored = await asyncio.to_thread(job_results.load, jobdir, job.attempt, job.ended_at)
        if stored is not None:
            return stored
        task = self._storing.get(job.id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._store_results(job))
            self._storing[job.id] = task
        return await asyncio.shield(task)

    async def _store_results(self, job: Job) -> dict[str, Any]:
        try:
            doc = await self._results(job)
            doc.update(results_version=job_results.VERSION, state=job.state.value,
                       attempt=job.attempt, ended_at_ts=job.ended_at)
            jobdir = self._src.executor.job_dir(job.id)
            if jobdir.is_dir():
                await asyncio.to_thread(job_results.store, jobdir, doc)
            return doc
        finally:
            self._storing.pop(job.id, None)

    async def _results(self, job: Job) -> dict[str, Any]:
        executor, monitor = self._src.executor, self._src.monitor
        jobdir = executor.job_dir(job.id)
        loss_key = job.spec.progress.loss_key if job.spec.progress else None
        summary = await asyncio.to_thread(job_results.summarise, jobdir, pf.loss_keys(loss_key))
        if job.first_started_at is not None:
            end = job.ended_at if job.ended_at is not None else time.time()
            summary["duration_s"] = round(end - job.first_started_at, 3)
        copier = executor.checkpoints
        try:
            async with asyncio.timeout(20):
                found = await copier.refresh(job)
        except TimeoutError:
            found = copier.discovered(job)
        checkpoints = copier.describe(job, found)
        resources = monitor.job_resources(job) if monitor is not None else {}
        return {"job": rj.job(job, self._src.progress.latest(job.id)), "summary": summary,
                "checkpoints": checkpoints, "resources": resources,
                "job_dir": str(jobdir)}

    # ---- a dry run ----------------------------------------------------------------------

    def launch_plan(self, state: State, job_id: str) -> dict[str, Any]:
        """What a dry run would start, from a state holding the job: where, how, in which dir.

        The planner's own decision on that state (pure); the rendezvous port is the first
        of the range here (the real one is reserved when the job is placed).
        """
        src, fleet = self._src, self._src.fleet
        job = state.jobs[job_id]
        p = src.planning.plan(state)
        placed = next((x for x in p.placements if x.job == job_id), None)
        out: dict[str, Any] = {"torchrun": job.spec.torchrun, "cwd": job.spec.cwd,
                               "sync": job.spec.sync, "ranks": [],
                               "unreachable": [{"node": n.name, "reason": n.health_reason}
                                               for n in state.nodes.values()
                                               if n.health is NodeHealth.UNREACHABLE]}
        if placed is None:
            out["waiting"] = p.waiting.get(job_id) or p.unrunnable.get(job_id) or ""
            return out
        ranks = placed.ranks
        if job.spec.torchrun and len(ranks) > 1:
            ranks = fleet.rendezvous_order(ranks)
        rank0 = next(r for r in ranks if r.rank == 0)
        port = src.config.cluster.rdzv_port_range[0] if job.spec.torchrun else 0
        job = msgspec.structs.replace(job, placement=ranks, attempt=1, rdzv_port=port,
                                      rdzv_host=fleet.rendezvous_host(rank0.node))
        for r in sorted(ranks, key=lambda r: r.rank):
            node = state.nodes[r.node]
            argv, _ = src.executor.rank_argv(job, r, node.spec.python)
            cwd = (f"{node.spec.work_dir.rstrip('/')}/jobs/{job_id}/code" if job.spec.sync
                   else job.spec.cwd)
            out["ranks"].append({"rank": r.rank, "node": r.node, "gpus": list(r.gpus),
                                 "argv": argv, "cwd": cwd})
        return out

    # ---- sweeps -----------------------------------------------------------------------------

    def sweep_view(self, sweep: Sweep) -> dict[str, Any]:
        executor = self._src.executor
        return reports.sweep_view(self._src.ledger.state, sweep, executor.job_dir,
                                  self._src.progress.all_latest())


def _result_stored(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("could not write result.json", exc_info=task.exception())
