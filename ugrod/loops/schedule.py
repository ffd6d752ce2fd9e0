"""Periodic jobs on the daemon's event loop: the one module that imports apscheduler.

The daemon's loops (snapshots, the planner's safety net, health sweeps, the
watchdog) ask a ``Schedule`` for a job by id and interval; none of them sees
apscheduler. Every job runs at most once at a time, and a run that was missed
(the loop was busy) is coalesced into one.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

Work = Callable[[], Awaitable[None] | None]


class Schedule:
    """Interval jobs on the running asyncio loop, by id."""

    def __init__(self) -> None:
        self._sched = AsyncIOScheduler(timezone="UTC")
        self._stopped = False

    def every(self, job_id: str, interval_s: float, work: Work, *,
              first_in_s: float | None = None, run_late: bool = False) -> None:
        """Run ``work`` every ``interval_s`` seconds, the first time after ``first_in_s``
        (None: after one interval). ``run_late``: a run the loop was too busy to start on
        time runs late rather than being skipped with a warning."""
        options: dict[str, Any] = {}
        if first_in_s is not None:  # (apscheduler reads next_run_time=None as "paused")
            options["next_run_time"] = datetime.now(UTC) + timedelta(seconds=first_in_s)
        if run_late:
            options["misfire_grace_time"] = None
        self._sched.add_job(_on_loop(work), "interval", seconds=interval_s, id=job_id,
                            max_instances=1, coalesce=True, **options)

    def reschedule(self, job_id: str, interval_s: float) -> None:
        """A new interval for a job (nothing once the schedule has stopped)."""
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self._sched.reschedule_job(job_id, trigger="interval", seconds=interval_s)

    def interval_s(self, job_id: str) -> float | None:
        """A job's interval now (None: no such job)."""
        job = self._sched.get_job(job_id)
        if job is None or not isinstance(job.trigger, IntervalTrigger):
            return None
        return float(job.trigger.interval.total_seconds())

    def start(self, *, paused: bool = False) -> None:
        """Start running jobs on the current loop (``paused``: add jobs, run none)."""
        self._sched.start(paused=paused)

    def stop(self) -> None:
        """Run nothing more; runs in progress are not waited for."""
        if self._sched.running and not self._stopped:
            self._stopped = True
            self._sched.shutdown(wait=False)



def _on_loop(work: Work) -> Callable[[], Awaitable[None]]:
    """``work`` as a coroutine function. apscheduler's asyncio executor runs a plain function
    in a worker thread; ours read and change the daemon's state and start tasks on its loop,
    so every job runs on the loop (a thread would race the one writer, and find no loop)."""
    if inspect.iscoroutinefunction(work):
        return work

    async def run() -> None:
        result = work()
        if inspect.isawaitable(result):
            await result

    run.__qualname__ = getattr(work, "__qualname__", "work")
    return run
