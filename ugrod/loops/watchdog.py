"""The watchdog: fails jobs whose ranks vanished or whose node died, and catches stalled training.

Runs every second on the daemon's schedule and looks at what the jobs' progress and
the monitor already know; it starts no probe of its own. Its decisions:

* **Vanished rank.** The health probe found a running rank's process (pid and start
  time) gone, and the executor's watch has reported no exit for ``vanish_grace_s``:
  the rank's supervisor died with it (node reboot, OOM killer, ``kill -9`` of the
  tree), so no exit status will ever come. The job is stopped as failed (its retry
  policy applies), and once the node confirms none of the rank's processes is left,
  the rank is recorded as exited with ``exits.VANISHED_EXIT_CODE``.
* **Dead node**, only on two independent signals, so a cut link alone never kills
  a healthy job: (1) the node's circuit breaker is not closed (``failures_to_open``
  health checks in a row failed) and (2) the job's progress has stopped on the nodes
  that still answer: steps reach ugrod from every node (rank 0's metrics, the other
  nodes' heartbeats), and the job is stopped only when none of those paths showed an
  advance for longer than ``silence_limit`` (its ``stall_timeout_s`` when the user set
  one, else max(60 s, 3 x its median step interval)), or when the node has been out of
  reach longer than the job's tolerance (``unreachable_tolerance_s``, else the config's
  ``health.unreachable_tolerance_s``); the decision is ugrod/core/node_loss.py's. For a
  job that reports no steps (or whose rank 0 has exited) the silence is counted from
  when the node stopped answering. The job is stopped
  as failed; its processes on the dead node cannot be confirmed gone, so the executor
  is told to stop waiting for them (``Exits.abandon``): ``job_ended`` comes once every
  reachable rank is confirmed gone and says which processes could not be, and the node
  is fenced first (drained until ugrod has cleared it: ugrod/loops/fencing.py). A job
  already being stopped (cancel, another rank failed) gives up on an unreachable node
  the same way.
* **Leftovers.** Every node whose breaker opens is handed to the fencer, which kills
  whatever of an ended attempt runs there as soon as it answers again.
* **Stall.** A running job whose step has not advanced for longer than
  ``stall_timeout`` (``spec.stall_timeout_s``, else max(120 s, 10 x the median step
  interval) once 5 steps are known; never before the first step nor once a rank has
  exited, as rank 0's steps then say nothing about the rest) is recorded as
  ``job_stalled`` once per stall, with the ranks' Python stacks captured by ``py-spy
  dump`` on every node that has it into ``JOBDIR/stacks-<time>.txt`` (ugrod/loops/stacks.py).
  Its policy:
  ``alert`` (the event and ``ugro_job_stalled``) or ``requeue`` (stopped as failed,
  so the retry policy requeues it from its newest checkpoint).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ugrod.core import events as ev
from ugrod.core import node_loss
from ugrod.core.health import BreakerState
from ugrod.core.state import ACTIVE, InvalidEvent, Job, JobState, NodeHealth, State
from ugrod.loops import stacks
from ugrod.loops.exits import Exits
from ugrod.loops.fencing import Fencer
from ugrod.loops.monitor import Monitor
from ugrod.loops.progress import Progress
from ugrod.loops.schedule import Schedule
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import TransportError
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.watchdog")

JOB_ID = "watchdog"
TICK_S = 1.0
VANISH_GRACE_S = 15.0
SILENCE_MIN_S = 60.0
SILENCE_INTERVALS = 3.0
STALL_MIN_S = 120.0
STALL_INTERVALS = 10.0
STALL_MIN_STEPS = 5


# ---- decisions (pure) ------------------------------------------------------------------


def median_interval(times: Sequence[float]) -> float | None:
    """Median time between consecutive step advances; None with fewer than two."""
    if len(times) < 2:
        return None
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def stall_timeout(spec_timeout_s: float | None, times: Sequence[float]) -> float | None:
    """How long without a step advance is a stall; None while it cannot be known yet."""
    if spec_timeout_s is not None:
        return spec_timeout_s
    step = median_interval(times)
    if len(times) < STALL_MIN_STEPS or step is None:
        return None
    return max(STALL_MIN_S, STALL_INTERVALS * step)


def silence_limit(spec_timeout_s: float | None, times: Sequence[float]) -> float:
    """How long the job's metrics may be silent before that counts against a failing node.

    The user's own stall timeout when set (their statement of how long no progress is
    abnormal for this job), else max(60 s, 3 x the median step interval).
    """
    if spec_timeout_s is not None:
        return spec_timeout_s
    step = median_interval(times)
    return max(SILENCE_MIN_S, SILENCE_INTERVALS * step) if step is not None else SILENCE_MIN_S


class Watchdog:
    """Watches running jobs through their progress and the monitor's eyes; see the module doc."""

    def __init__(self, ledger: Ledger, exits: Exits, progress: Progress, monitor: Monitor,
                 fleet: Fleet, fencer: Fencer, job_dir: Callable[[str], Path], *,
                 vanish_grace_s: float = VANISH_GRACE_S,
                 tick_s: float = TICK_S,
                 tolerance_s: Callable[[], float] = lambda: 1800.0) -> None:
        self._ledger = ledger
        self._exits = exits  # where the ranks it gives up on are reported
        self._progress = progress
        self._job_dir = job_dir
        self._monitor = monitor
        self._fleet = fleet
        self._fencer = fencer
        self._tolerance_s = tolerance_s  # the config's health.unreachable_tolerance_s
        self.vanish_grace_s = vanish_grace_s
        self.tick_s = tick_s
        self._busy: dict[tuple[str, int], asyncio.Task[None]] = {}  # attempt -> its handling
        self._dead_seen: dict[tuple[str, int, int], float] = {}  # rank -> first seen gone
        self._stalls: dict[tuple[str, int], float] = {}  # attempt -> last advance reported
        self._progress_sent: set[tuple[str, int]] = set()
        self._down_since: dict[str, float] = {}  # node -> when its breaker was first not closed
        self._abandoned: set[tuple[str, int, str]] = set()
        self._closed = False

    def schedule(self, sched: Schedule) -> None:
        """Add the watchdog to the daemon's schedule."""
        # A tick late under load runs late instead of being skipped with a warning.
        sched.every(JOB_ID, self.tick_s, self.tick, run_late=True)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._busy.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the tick --------------------------------------------------------------------

    async def tick(self) -> None:
        """One look at every running job and every node; slow work goes to tasks."""
        if self._closed:
            return
        now = asyncio.get_running_loop().time()
        state = self._ledger.state
        self._track_nodes(state, now)
        for job in state.active_jobs():
            if job.state is not JobState.RUNNING:
                continue
            key = (job.id, job.attempt)
            if job.stopping is not None:
                await self._give_up_unreachable(job)
                continue
            if key in self._busy:
                continue
            try:
                await self._check(job, now)
            except Exception:
                logger.exception("watchdog check of %s failed", job.id)
        self._prune(state)

    async def _check(self, job: Job, now: float) -> None:
        times = self._progress.step_times(job)
        # Steps come from rank 0: once it (or any rank) has exited, the gang is winding
        # down and a frozen step counter says nothing about progress.
        winding_down = any(r.exit_code is not None for r in job.ranks)
        last = times[-1] if times and not winding_down else None
        for node in dict.fromkeys(p.node for p in job.placement):
            why = self._node_dead(job, node, last, times, now)
            if why is not None:
                self._start(job, self._node_died(job, node, why))
                return
        vanished = await self._vanished(job, now)
        if vanished is not None:
            self._start(job, self._rank_vanished(job, *vanished))
            return
        if last is None:
            return  # no step yet (or no more): nothing to call a stall
        limit = stall_timeout(job.spec.stall_timeout_s, times)
        key = (job.id, job.attempt)
        if job.stalled and limit is not None and now - last <= limit \
                and self._stalls.get(key) != last and key not in self._progress_sent:
            self._progress_sent.add(key)  # steps advance again: the stall is over
            self._start(job, self._progressed(job))
            return
        if limit is not None and now - last > limit and self._stalls.get(key) != last:
            self._stalls[key] = last
            self._start(job, self._stalled(job, now - last, limit))

    def _start(self, job: Job, work: Coroutine[Any, Any, None]) -> None:
        key = (job.id, job.attempt)
        task = asyncio.get_running_loop().create_task(work, name=f"watchdog {job.id}")
        self._busy[key] = task
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._busy.get(key) is task:
            del self._busy[key]
        if not task.cancelled() and task.exception() is not None:
            logger.error("watchdog handling of %s failed", key[0], exc_info=task.exception())

    def _prune(self, state: State) -> None:
        def active(job_id: str, attempt: int) -> bool:
            job = state.jobs.get(job_id)
            return job is not None and job.state in ACTIVE and job.attempt == attempt
        for k3 in [k for k in self._dead_seen if not active(k[0], k[1])]:
            del self._dead_seen[k3]
        for k2 in [k for k in self._stalls if not active(*k)]:
            del self._stalls[k2]
        self._abandoned = {k for k in self._abandoned if active(k[0], k[1])}

    # ---- dead nodes ------------------------------------------------------------------

    def _track_nodes(self, state: State, now: float) -> None:
        for name in state.nodes:
            b = self._monitor.breaker(name)
            if b is not None and b.state is not BreakerState.CLOSED:
                if name not in self._down_since:
                    self._down_since[name] = now
                    self._fencer.watch(name)  # leftovers are cleared when it answers
            else:
                self._down_since.pop(name, None)

    def _failing(self, node: str) -> str | None:
        """Signal one: the node's breaker is open; a line saying so, else None."""
        b = self._monitor.breaker(node)
        if b is None or b.state is BreakerState.CLOSED:
            return None
        view = self._monitor.view(node) or {}
        last = view.get("last_error") or "no answer"
        return f"its last {b.failures} health checks failed (breaker {b.state.value}; last: {last})"

    def _node_dead(self, job: Job, node: str, last: float | None, times: list[float],
                   now: float) -> str | None:
        failing = self._failing(node)
        if failing is None:
            return None
        step = self._progress.step(job.id)
        # The other paths: each node of the job that still answers, and when the step
        # seen through it last advanced (rank 0's metrics, the others' heartbeats).
        advanced = self._progress.advanced(job) if last is not None else {}
        elsewhere = [now - at for n, at in advanced.items()
                     if n != node and self._failing(n) is None]
        newest = max([last, *advanced.values()]) if last is not None else None
        down_s = now - self._down_since.get(node, now)
        return node_loss.judge(node_loss.Silence(
            node=node, ranks=", ".join(str(r.rank) for r in job.ranks if r.node == node),
            failing=failing, gone_s=self._gone_s(node, down_s),
            tolerance_s=job.spec.unreachable_tolerance_s or self._tolerance_s(),
            silence_limit_s=silence_limit(job.spec.stall_timeout_s, times),
            silent_s=now - newest if newest is not None else None,
            last_step=int(step) if isinstance(step, int | float) else None,
            down_s=down_s, elsewhere_s=min(elsewhere) if elsewhere else None))

    def _gone_s(self, node: str, down_s: float) -> float:
        """Since the node last answered: the monitor's word, else (nothing heard since
        ugrod started) since the log says it became unreachable, else since its breaker
        opened."""
        unanswered = self._monitor.unanswered_s(node)
        if unanswered is not None:
            return unanswered
        n = self._ledger.state.nodes.get(node)
        if n is not None and n.health is NodeHealth.UNREACHABLE and n.health_since:
            return max(down_s, time.time() - n.health_since)
        return down_s

    async def _node_died(self, job: Job, node: str, why: str) -> None:
        logger.warning("job %s: %s", job.id, why)
        if not await self._stop(job, why):
            return
        await self._abandon(job, node)

    async def _give_up_unreachable(self, job: Job) -> None:
        """A job being stopped waits for nothing on a node whose breaker is open."""
        left = {r.node for r in job.ranks if r.exit_code is None}
        for node in left:
            if (job.id, job.attempt, node) in self._abandoned or self._failing(node) is None:
                continue
            logger.warning("job %s: giving up on its ranks on unreachable node %s",
                           job.id, node)
            await self._abandon(job, node)

    async def _abandon(self, job: Job, node: str) -> None:
        """Stop waiting for the job's ranks on ``node``: the executor fences the node as the
        attempt ends (drained until ugrod has cleared it: ugrod/loops/fencing.py)."""
        self._abandoned.add((job.id, job.attempt, node))
        self._fencer.watch(node)
        self._exits.abandon(job.id, job.attempt, node)

    # ---- vanished ranks --------------------------------------------------------------

    async def _vanished(self, job: Job, now: float) -> tuple[int, str, int, float] | None:
        """(rank, node, pid, seconds gone) of a rank gone past the grace period, if any."""
        samples = self._monitor.latest_samples()
        for r in job.ranks:
            if r.exit_code is not None:
                continue
            sample = samples.get(r.node)
            agent = self._fleet.job_agent(job, r.node)
            if sample is None or agent is None:
                continue
            pid_file = f"{await agent.run_dir(job.id, job.attempt, r.rank)}/pid"
            seen = next((x for x in sample.ranks if x.file == pid_file), None)
            key = (job.id, job.attempt, r.rank)
            if seen is None or seen.error is not None or seen.pid is None:
                continue
            if seen.alive:
                self._dead_seen.pop(key, None)
                continue
            first = self._dead_seen.setdefault(key, now)
            if now - first > self.vanish_grace_s:
                return r.rank, r.node, seen.pid, now - first
        return None

    async def _rank_vanished(self, job: Job, rank: int, node: str, pid: int,
                             gone_s: float) -> None:
        why = (f"rank {rank} on {node} vanished: its process (pid {pid}) is gone and no exit "
               f"status came for {gone_s:.0f} s (its supervisor is gone too: node reboot, "
               f"OOM killer or kill -9?)")
        logger.warning("job %s: %s", job.id, why)
        if not await self._stop(job, why):
            return
        agent = self._fleet.job_agent(job, node)
        if agent is None:
            return
        # The executor now kills what is left of the gang (this rank's descendants too);
        # once the node confirms nothing of the rank remains, its watch is ended for it.
        while not self._closed:
            current = self._ledger.state.jobs.get(job.id)
            if current is None or current.attempt != job.attempt or current.state not in ACTIVE:
                return
            try:
                async with asyncio.timeout(15):
                    st = await agent.status(job.id, job.attempt, rank)
            except (TransportError, TimeoutError) as exc:
                logger.info("status of %s rank %d: %s", job.id, rank, exc)
                st = None
            if st is not None and st.exit_code is not None:
                return  # the supervisor was only slow: its watch reports the real exit
            if st is not None and not st.alive:
                self._exits.rank_gone(job.id, job.attempt, rank)
                return
            await asyncio.sleep(1.0)

    # ---- stalls ----------------------------------------------------------------------

    async def _progressed(self, job: Job) -> None:
        step = self._progress.step(job.id)
        try:
            await self._ledger.record(ev.DAEMON, ev.JobProgressed(
                job=job.id, attempt=job.attempt,
                step=int(step) if isinstance(step, int | float) else None))
        except InvalidEvent as exc:
            logger.info("progress of %s not recorded: %s", job.id, exc)
        finally:
            self._progress_sent.discard((job.id, job.attempt))

    async def _stalled(self, job: Job, idle_s: float, limit_s: float) -> None:
        step = self._progress.step(job.id)
        last = int(step) if isinstance(step, int | float) else None
        what = (f"stalled: no step advance for {idle_s:.0f} s (last step {last}; stall "
                f"timeout {limit_s:.0f} s)")
        logger.warning("job %s: %s", job.id, what)
        path = await stacks.capture(job, {n: self._fleet.agent_for(job, n)
                                          for n in self._fleet.agents},
                                    self._job_dir(job.id), what)
        try:
            await self._ledger.record(ev.DAEMON, ev.JobStalled(
                job=job.id, attempt=job.attempt, step=last, idle_s=round(idle_s, 1),
                stacks=str(path) if path is not None else None))
        except InvalidEvent as exc:
            logger.info("stall of %s not recorded: %s", job.id, exc)
            return
        if job.spec.stall_action == "requeue":
            await self._stop(job, f"{what}; stall_action requeue: stopped to be retried from "
                                  f"its newest checkpoint"
                             + (f"; stacks in {path}" if path is not None else ""))

    # ---- recording -------------------------------------------------------------------

    async def _stop(self, job: Job, reason: str) -> bool:
        """Record the attempt as stopping with outcome failed; False if it changed meanwhile."""
        try:
            await self._ledger.record(ev.DAEMON, ev.JobStopping(
                job=job.id, attempt=job.attempt, outcome="failed", reason=reason[:4000]))
        except InvalidEvent as exc:
            logger.info("job %s not stopped: %s", job.id, exc)
            return False
        return True

