"""The planner loop: runs ``planner.plan`` when something changed and records its decisions.

A round is asked for (``kick``) by every committed event that may change a
decision, by a timer at each retry time and ``--time`` deadline, and by the
daemon's schedule as a safety net; asks coalesce, so a burst of events makes
one round. A round ends the jobs past their time limit, records why each
waiting job waits, then places what fits, one placement at a time, each with
its rendezvous port reserved on rank 0's node first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from ugrod.config.schema import SchedulerConfig
from ugrod.core import events as ev
from ugrod.core import planner, time_limits
from ugrod.core.state import ACTIVE, WAITING, InvalidEvent, Job, JobState, State
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import NodeUnreachable, TransportError
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.planning")

PORT_TIMEOUT_S = 10.0  # reserving a rendezvous port on rank 0's node
COALESCE_S = 0.02  # a round waits this long after the last: bursts of events make one round

# Events after which the planner may decide differently (or word a waiting reason
# differently: "c1 is running", "busy with x (stopping)").
_REPLAN = (ev.JobSubmitted, ev.JobRunning, ev.JobStopping, ev.JobEnded, ev.JobCancelRequested,
           ev.JobHeld, ev.JobReleased,
           ev.JobPrioritySet, ev.JobResumed, ev.NodeAdded, ev.NodeUpdated, ev.NodeRemoved,
           ev.NodeDrained, ev.NodeUndrained, ev.NodeHealthChanged, ev.NodeInventoried,
           ev.SweepCreated)

class Planning:
    """Owns the planner's rounds, its timers and what the last round found."""

    def __init__(self, ledger: Ledger, fleet: Fleet, settings: Callable[[], SchedulerConfig],
                 stats: RuntimeStats, *, clock: Callable[[], float] | None = None) -> None:
        self._ledger = ledger
        self._fleet = fleet
        self._settings = settings  # read each round: a reload may change them
        self._stats = stats
        self._clock = clock or ledger.stamp  # the ledger's clock: one "now" for all decisions
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._limited: set[str] = set()  # active jobs with a --time limit
        self._runtimes: planner.RunTimes | None = None
        self.order: tuple[str, ...] = ()  # the last round's queue order
        self.estimates: Mapping[str, float] = {}  # job -> its estimated start
        ledger.on_commit(self._committed)

    def start(self) -> None:
        """Arm the timers the log asks for (retries, time limits) and run the first round."""
        state = self._ledger.state
        self._task = asyncio.get_running_loop().create_task(self._loop())
        for job in state.active_jobs():
            if job.state is JobState.RETRYING and job.retry_at is not None:
                self._arm_timer(job.retry_at)
            elif job.state in ACTIVE:
                self._watch_time_limit(job)
        self.kick()

    async def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def kick(self) -> None:
        """Ask for a planner round soon (coalesced)."""
        self._kick.set()

    def runtimes(self) -> planner.RunTimes:
        """Median run times as the last round used them (for a dry run's plan)."""
        return self._runtimes or {}

    def plan(self, state: State) -> planner.Plan:
        """The planner's decision on ``state`` now, with the daemon's settings (pure)."""
        settings = self._settings()
        return planner.plan(state, self._clock(), backfill=settings.backfill,
                            user_limits=settings.user_limits, runtimes=self.runtimes())

    # ---- what asks for a round ---------------------------------------------------

    def _committed(self, records: list[ev.Record], state: State) -> None:
        # A job submitted held changes no decision: no planner round for it.
        if any(isinstance(r.event, _REPLAN)
               and not (isinstance(r.event, ev.JobSubmitted) and r.event.held)
               for r in records):
            self.kick()
        for r in records:
            if isinstance(r.event, ev.JobEnded):
                self._limited.discard(r.event.job)
                if r.event.retry_at is not None:
                    self._arm_timer(r.event.retry_at)
                if r.event.outcome == "succeeded":
                    self._runtimes = None
            elif isinstance(r.event, ev.JobPlaced):
                self._watch_time_limit(state.jobs[r.event.job])

    def _watch_time_limit(self, job: Job) -> None:
        """A placed job with --time: checked by every planner round, and one is due then."""
        end = time_limits.deadline(job.started_at, job.spec.time_limit_s)
        if end is not None:
            self._limited.add(job.id)
            self._arm_timer(end)

    def _arm_timer(self, at: float) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, at - self._clock()) + 0.05
        self._timers.append(loop.call_later(delay, self.kick))
        self._timers = [t for t in self._timers if not t.cancelled()][-1000:]

    # ---- the rounds ------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self._round()
            except Exception:
                logger.exception("planner round failed")
            await asyncio.sleep(COALESCE_S)

    async def _enforce_time_limits(self) -> None:
        """Cancel the jobs past their --time (the decision is time_limits.expired's)."""
        if not self._limited:
            return
        over = time_limits.expired(self._ledger.state, sorted(self._limited), self._clock())
        for stop in over:
            logger.info("job %s: %s", stop.job, stop.reason)
            with contextlib.suppress(InvalidEvent):  # it ended meanwhile
                await self._ledger.record(ev.DAEMON, stop)

    async def _round(self) -> None:
        await self._enforce_time_limits()
        t0 = time.perf_counter()
        state = self._ledger.state
        if self._runtimes is None:  # median run times; recomputed when a job succeeds
            self._runtimes = planner.typical_runtimes(state)
        p = self.plan(state)
        self.estimates, self.order = p.estimates, p.order
        decided: list[ev.Event] = [
            ev.JobCancelRequested(job=j, reason=f"will never run: {why}")
            for j, why in p.unrunnable.items()]
        decided += [
            ev.JobWaiting(job=j, reason=r) for j, r in p.waiting.items()
            if j in state.jobs and j not in p.unrunnable and not state.jobs[j].held
            and state.jobs[j].waiting_reason != r and state.jobs[j].state in WAITING]
        if decided:
            with contextlib.suppress(InvalidEvent):
                await self._ledger.record(ev.DAEMON, *decided)
        placed = 0
        for placement in p.placements:
            job = self._ledger.state.jobs.get(placement.job)
            if job is None or job.state not in WAITING:
                continue
            if await self._place(job, placement):
                placed += 1
        self._stats.scheduler_tick(time.perf_counter() - t0, placed)

    async def _place(self, job: Job, placement: ev.JobPlaced) -> bool:
        """Record one placement, its rendezvous port reserved first; False if it was not."""
        try:
            async with asyncio.timeout(PORT_TIMEOUT_S):
                placement = await self._fleet.with_port(job, placement)
            await self._ledger.record(ev.DAEMON, placement)
            return True
        except InvalidEvent as exc:
            logger.info("placement of %s rejected: %s", placement.job, exc)
            self.kick()
        except (TransportError, TimeoutError) as exc:
            logger.warning("cannot reserve a rendezvous port for %s: %s", placement.job, exc)
            node = placement.ranks[0].node
            why = str(exc) or f"no answer within {PORT_TIMEOUT_S:g} s"
            with contextlib.suppress(InvalidEvent):  # never a silent wait: say why
                await self._ledger.record(ev.DAEMON, ev.JobWaiting(
                    job=placement.job, reason=f"could not reserve a rendezvous port on "
                    f"{node}: {why}; trying again"))
            if isinstance(exc, NodeUnreachable):  # the log learns it: no more tries there
                self._fleet.check_soon(node)
        return False
