"""Fencing's shell: a node that may run an ended attempt is drained until ugrod has been there.

The decisions are ``ugrod/core/fencing.py``'s. The executor calls ``fence`` when an
attempt ends with ranks that could not be confirmed gone (a launch whose answer never
came, a rank given up on with its node, a kill that did not get through): each such node
is drained with a reason naming the attempt *before* the attempt's end is recorded, so
its GPUs are never free while something may still use them; a back-fill mark is left
for each of those ranks (``ugrod/loops/backfill.py``). The watchdog adds every node whose
breaker opens, so leftovers there are cleared on its return.

A fenced node is cleared as soon as it answers a health check, whatever its breaker did
(the monitor calls ``answered``), and at once when a job fenced there is cancelled: every
known run dir of an ended attempt is fenced on the node (marked, so that a start request
delivered late, after a partition, refuses to run it; and killed), then every other rank
process there that belongs to no live attempt is found and killed the same way. Each rank
found running is recorded (``rank_fenced``); once none is left the drain is lifted and
the ranks' logs are back-filled from the node's copies. Anything that fails (the node
went again) is tried again when it next answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ugrod.core import events as ev
from ugrod.core import fencing as fc
from ugrod.core.fencing import RunDir
from ugrod.core.health import Breaker, BreakerState
from ugrod.core.state import TERMINAL, InvalidEvent, Job, State
from ugrod.loops import backfill
from ugrod.loops.schedule import Schedule
from ugrod.nodes import programs
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import TransportError
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.fencing")

JOB_ID = "fencing"
TICK_S = 1.0
RECENT_S = 7 * 86400.0  # ended jobs whose back-fill marks are looked for at start
# argv: JOBS_DIR KEEP_RUN_DIR...: run dirs under JOBS_DIR with a live process, other than
# the ones to keep; prints one JSON object (nodes/remote/leftovers.py).
LEFTOVERS_SCRIPT = programs.text("leftovers")


class Monitor(Protocol):
    """What fencing needs of the monitor: when a node last answered a check (its clock),
    and its breaker."""

    def last_answer(self, name: str) -> float | None: ...

    def breaker(self, name: str) -> Breaker | None: ...


class Fencer:
    """Owns the fenced nodes; see the module doc."""

    def __init__(self, ledger: Ledger, fleet: Fleet, monitor: Monitor,
                 job_dir: Callable[[str], Path], *,
                 on_metric: Callable[[Job, str, bytes], Awaitable[Any]] | None = None) -> None:
        self._ledger = ledger
        self._fleet = fleet
        self._monitor = monitor
        self._job_dir = job_dir
        self._on_metric = on_metric
        self._pending: dict[str, set[RunDir]] = {}  # node -> ranks that may run there
        self._tried: dict[str, float] = {}  # node -> its last answer when last tried
        self._running: dict[str, asyncio.Task[None]] = {}
        self._marks: dict[str, list[backfill.Mark]] = {}  # node -> back-fills to do there
        self._closed = False
        self._recover(ledger.state)
        ledger.on_commit(self._on_commit)

    def _recover(self, state: State) -> None:
        """After a restart: nodes still fenced, and the back-fills not done yet."""
        for node in state.nodes.values():
            if node.drained and fc.own_drain(node.drain_reason):
                self._pending.setdefault(node.name, set())
        newest = max((j.ended_at or 0.0 for j in state.jobs.values()), default=0.0)
        for job in state.jobs.values():
            if job.state in TERMINAL and (job.ended_at or 0.0) < newest - RECENT_S:
                continue
            jobdir = self._job_dir(job.id)
            if not (jobdir / backfill.MARKS).is_dir():
                continue
            for m in backfill.marks(jobdir):
                self._marks.setdefault(m.node, []).append(m)
                self._pending.setdefault(m.node, set()).add(RunDir(m.job, m.attempt, m.rank))

    def schedule(self, sched: Schedule) -> None:
        """Add the fencing tick to the daemon's schedule."""
        sched.every(JOB_ID, TICK_S, self.tick, run_late=True)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- fencing ----------------------------------------------------------------------

    async def fence(self, job: Job, ranks: Mapping[str, Sequence[int]], why: str) -> None:
        """The job's current attempt is ending with ``ranks`` (node -> ranks) not confirmed
        gone: drain those nodes (before the end is recorded) and clear them when they answer."""
        state = self._ledger.state
        jobdir = self._job_dir(job.id)
        drains: list[ev.Event] = []
        for node, rs in ranks.items():
            if not rs:
                continue
            for rank in rs:
                self._pending.setdefault(node, set()).add(RunDir(job.id, job.attempt, rank))
                try:
                    m = await asyncio.to_thread(backfill.mark, jobdir, job, rank, node)
                except OSError as exc:
                    logger.warning("job %s: cannot leave a back-fill mark: %s", job.id, exc)
                else:
                    self._marks.setdefault(node, []).append(m)
            n = state.nodes.get(node)
            if n is not None and not n.drained:
                drains.append(ev.NodeDrained(node=node, reason=fc.drain_reason(
                    job.id, job.attempt, rs, node, why)))
            logger.warning("job %s attempt %d: rank %s on %s may still run there (%s): "
                           "fenced until ugrod has confirmed it gone", job.id, job.attempt,
                           ", ".join(map(str, rs)), node, why)
        if drains:
            with contextlib.suppress(InvalidEvent):  # a node removed meanwhile
                await self._ledger.record(ev.DAEMON, *drains)
        for node in ranks:
            self._await_answer(node)

    def watch(self, node: str) -> None:
        """Clear ``node`` of ranks of ended attempts once it answers (its breaker opened)."""
        if node not in self._pending:
            self._pending[node] = set()
            self._await_answer(node)

    def _await_answer(self, node: str) -> None:
        """Clear ``node`` at its next answer, not before: a try on a node that does not
        answer would only hang (and hold up the one that follows its return)."""
        if node not in self._running:
            last = self._monitor.last_answer(node)
            self._tried[node] = last if last is not None else -math.inf

    def answered(self, node: str) -> None:
        """The monitor heard from ``node``: clear it now if it is fenced."""
        if node in self._pending:
            self._start(node)

    def tick(self) -> None:
        """Clear every fenced node that answered since it was last tried."""
        if self._closed:
            return
        for node in list(self._pending):
            if node not in self._ledger.state.nodes:
                self._pending.pop(node, None)
                continue
            last = self._monitor.last_answer(node)
            if last is not None and last > self._tried.get(node, -math.inf):
                self._start(node)

    def _on_commit(self, records: list[ev.Record], state: State) -> None:
        for r in records:
            e = r.event
            cancelled = isinstance(e, ev.JobCancelRequested) or (
                isinstance(e, ev.JobEnded) and e.outcome == "cancelled")
            if not cancelled:
                continue
            job = getattr(e, "job", "")
            for node, rds in list(self._pending.items()):
                b = self._monitor.breaker(node)
                if any(rd.job == job for rd in rds) and b is not None \
                        and b.state is BreakerState.CLOSED:
                    self._start(node)  # cancel reaches its orphans: now, if the node answers

    def _start(self, node: str) -> None:
        if self._closed or node in self._running or node not in self._fleet.agents:
            return
        last = self._monitor.last_answer(node)
        self._tried[node] = last if last is not None else -math.inf
        task = asyncio.get_running_loop().create_task(self._clear(node), name=f"fence {node}")
        self._running[node] = task
        task.add_done_callback(lambda t, n=node: self._cleared(n, t))  # type: ignore[misc]

    def _cleared(self, node: str, task: asyncio.Task[None]) -> None:
        self._running.pop(node, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("fencing %s failed", node, exc_info=task.exception())

    # ---- on the node ------------------------------------------------------------------

    async def _clear(self, node: str) -> None:
        agent = self._fleet.agents[node]
        handled = set(self._pending.get(node, ()))
        try:
            async with asyncio.timeout(60):
                killed, alive = await self._kill_ended(node, agent)
        except (TransportError, TimeoutError, ValueError, OSError) as exc:
            logger.info("node %s: not confirmed clear yet: %s", node, str(exc) or "timeout")
            return
        state = self._ledger.state
        # A rank fenced there while this ran is not cleared yet: the drain stays for it.
        added = self._pending.get(node, set()) - handled
        events = [*fc.fence_events(state, node, killed.items()),
                  *fc.lift(state, node, alive + len(added))]
        for e in events:
            if isinstance(e, ev.RankFenced):
                logger.warning("node %s: rank %d of %s (attempt %d) was still running: "
                               "killed (%d processes)", node, e.rank, e.job, e.attempt, e.pids)
        if events:
            try:
                await self._ledger.record(ev.DAEMON, *events)
            except InvalidEvent as exc:
                logger.info("fencing of %s not recorded: %s", node, exc)
        if alive:
            logger.warning("node %s: %d processes of ended attempts still alive after "
                           "SIGKILL; trying again when it next answers", node, alive)
            return
        if added:
            self._pending[node] = added
            self._tried.pop(node, None)  # the next tick clears them
        else:
            self._pending.pop(node, None)
        if any(isinstance(e, ev.NodeUndrained) for e in events):
            logger.info("node %s: nothing of an ended attempt runs there; undrained", node)
        await self._backfill(node, handled)

    async def _kill_ended(self, node: str, agent: NodeAgent) -> tuple[dict[RunDir, int], int]:
        """Fence the known run dirs, then whatever else of no live attempt runs there.
        (run dir -> processes killed, processes still alive)."""
        state = self._ledger.state
        killed: dict[RunDir, int] = {}
        alive = 0
        known = [rd for rd in self._pending.get(node, ()) if not fc.live(state, rd.job,
                                                                          rd.attempt)]
        by_agent: dict[int, tuple[NodeAgent, dict[str, RunDir]]] = {}
        for rd in known:
            job = state.jobs.get(rd.job)
            a = self._fleet.agent_for(job, node) if job is not None else agent
            entry = by_agent.setdefault(id(a), (a, {}))
            entry[1][await a.run_dir(rd.job, rd.attempt, rd.rank)] = rd
        for a, dirs in by_agent.values():
            for path, (n_killed, n_alive) in (await a.fence(list(dirs))).items():
                if path in dirs:
                    killed[dirs[path]] = n_killed
                    alive += n_alive
        jobs_dir = f"{await agent.work_dir()}/jobs"
        for _ in range(3):
            state = self._ledger.state
            keep = [await self._fleet.agent_for(j, node).run_dir(j.id, j.attempt, p.rank)
                    for j in state.active_jobs() for p in j.placement
                    if p.node == node and fc.live(state, j.id, j.attempt)]
            found: dict[str, RunDir] = {}
            for path in await self._leftovers(agent, jobs_dir, keep):
                parsed = fc.parse_run_dir(path, jobs_dir)
                if parsed is not None and not fc.live(state, parsed.job, parsed.attempt):
                    found[path] = parsed
            if not found:
                return killed, alive
            alive = 0
            for path, (n_killed, n_alive) in (await agent.fence(list(found))).items():
                if path in found:
                    killed[found[path]] = killed.get(found[path], 0) + n_killed
                    alive += n_alive
            if not alive:
                await asyncio.sleep(0.25)  # a last look: nothing may have been starting
        return killed, alive

    @staticmethod
    async def _leftovers(agent: NodeAgent, jobs_dir: str, keep: Sequence[str]) -> list[str]:
        """Run dirs under ``jobs_dir`` with a live process, other than ``keep``."""
        res = await agent.transport.run([agent.python, "-c", LEFTOVERS_SCRIPT, jobs_dir, *keep])
        if res.exit_code != 0:
            raise ValueError(f"leftover scan failed: {res.stderr_line()}")
        found = json.loads(res.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        return [str(d) for d in found.get("run_dirs", [])]

    async def _backfill(self, node: str, gone: set[RunDir]) -> None:
        """The logs of the ranks confirmed gone there (``gone``), from the node's copies."""
        marks = self._marks.get(node, [])
        todo = [m for m in marks if RunDir(m.job, m.attempt, m.rank) in gone]
        self._marks[node] = [m for m in marks if m not in todo]
        state = self._ledger.state
        for m in todo:
            job = state.jobs.get(m.job)
            agent = (self._fleet.agent_for(job, node) if job is not None
                     else self._fleet.agents.get(node))
            if agent is None:
                continue

            async def metric(raw: bytes, job: Job | None = job) -> None:
                if self._on_metric is not None and job is not None:
                    await self._on_metric(job, node, raw)
            try:
                async with asyncio.timeout(120):
                    await backfill.run(agent, self._job_dir(m.job), m, metric)
            except (TransportError, TimeoutError, OSError) as exc:
                logger.info("job %s attempt %d rank %d: back-fill from %s not done: %s",
                            m.job, m.attempt, m.rank, node, str(exc) or "timeout")
                self._marks[node].append(m)
                self._pending.setdefault(node, set())
        if not self._marks.get(node):
            self._marks.pop(node, None)
