"""RuntimeStats: the one place ugrod's shell records its own operational figures.

The ledger, the event log, the API, the scheduler and the health monitor call a
few cheap methods here (plain fields and fixed-bucket histograms, no locks: all
callers run on the one event loop); ``ugrod.metrics.collector.UgroCollector`` reads them
at scrape time. Nothing here imports prometheus_client, so callers stay free
of it.

Job wait/run-time histograms and the recently ended jobs are kept
incrementally from committed events (``jobs_committed``, shaped as a
``Ledger.on_commit`` listener), so a scrape never rescans every finished job.
Lifetime job counters are not here: they are ``State.tally`` (ugrod/core/tally.py),
folded from the event log, so they survive restarts and never step down.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from ugrod.core import events as ev
from ugrod.core.state import TERMINAL, Job, JobState, State
from ugrod.core.tally import failure_reason

# Bucket upper bounds (seconds unless said otherwise); +Inf is implicit.
FSYNC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)  # events
API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0)
HEALTH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SCHEDULER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_WAIT_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                    7200.0, 14400.0, 28800.0, 86400.0, 259200.0, 604800.0)
JOB_RUN_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
                   28800.0, 86400.0, 259200.0, 604800.0, 2419200.0)

# An ended job's series stay this long (alerts name the job and why it ended), and
# at most this many of them (a sweep of thousands ending at once stays bounded).
ENDED_KEEP_S = 1800.0
ENDED_KEEP_MAX = 500
BREAKER_STATES = ("closed", "half-open", "open")  # ugrod.core.health.BreakerState values


class Histogram:
    """Fixed buckets, non-cumulative counts; the collector makes them cumulative."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above the top bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, cumulative count), ..., ("+Inf", count)]`` as exposition wants it."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((_le(bound), total))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return str(int(bound)) + ".0" if bound == int(bound) else repr(bound)


class Counter:
    """A monotonically increasing number (plain float: one event loop, no locks)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class RecentEnd(NamedTuple):
    """A job's latest end (or failed attempt), kept ``ENDED_KEEP_S`` for its series."""

    job: str
    owner: str
    outcome: str  # succeeded | failed | cancelled | retrying
    reason: str  # ugrod.core.tally.FAILURE_REASONS value; "" when it succeeded
    ended_at: float


class RuntimeStats:
    """ugrod's own figures, updated by a few methods and read by the metrics collector."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # event log
        self.log_events = Counter()
        self.log_batches = Counter()
        self.log_bytes = Counter()
        self.log_fsync = Histogram(FSYNC_BUCKETS)
        self.log_batch_events = Histogram(BATCH_BUCKETS)
        self.log_torn_tail_repairs = Counter()
        self.metric_lines_dropped = Counter()  # training metrics lines too long, deep or bad
        self.replay_seconds: float | None = None
        self.replay_events = 0
        self.snapshot_seconds = Histogram(SNAPSHOT_BUCKETS)
        self.snapshot_last_success: float | None = None
        self.snapshot_last_bytes: int | None = None
        self.snapshot_failures = Counter()
        self.snapshot_last_failure: float | None = None
        self.state_dir_size_bytes: float | None = None
        self.state_dir_avail_bytes: float | None = None
        # API: (route, method, status) -> count; route -> latency histogram
        self.api_requests: dict[tuple[str, str, str], Counter] = {}
        self.api_latency: dict[str, Histogram] = {}
        # scheduler
        self.scheduler_ticks = Histogram(SCHEDULER_BUCKETS)
        self.scheduler_placements = Counter()
        # health checks
        self.health_duration = Histogram(HEALTH_BUCKETS)
        self.health_checks: dict[str, Counter] = {}
        self.health_failures: dict[str, Counter] = {}
        self.health_last_duration: dict[str, float] = {}
        self.health_last_success: dict[str, float] = {}
        self.breakers: dict[str, str] = {}
        # checkpoint copies to the head (ugrod/loops/checkpoints.py)
        self.checkpoint_copy_bytes = Counter()
        self.checkpoint_copies = Counter()
        self.checkpoint_copy_failures = Counter()
        self.checkpoint_copy_stopped = False  # the head's disk reached its floor
        self.checkpoint_head_free_bytes: float | None = None
        self.checkpoint_floor_bytes: float | None = None
        # jobs: histograms since this start; lifetime counters are State.tally
        self.job_wait = Histogram(JOB_WAIT_BUCKETS)
        self.job_run = Histogram(JOB_RUN_BUCKETS)
        self.recent_ends: dict[str, RecentEnd] = {}  # job -> its latest end, oldest first
        self._queued_since: dict[str, float] = {}  # retrying/resumed job -> back in queue

    # ---- event log (ugrod/store/log.py, ugrod/store/ledger.py) --------------------------

    def log_batch(self, n_events: int, n_bytes: int, fsync_s: float) -> None:
        """One group-committed batch: its size and how long its fdatasync took."""
        self.log_events.inc(n_events)
        self.log_batches.inc()
        self.log_bytes.inc(n_bytes)
        self.log_fsync.observe(fsync_s)
        self.log_batch_events.observe(n_events)

    def log_repaired(self) -> None:
        """A torn tail was cut off at start-up."""
        self.log_torn_tail_repairs.inc()

    def replay_done(self, seconds: float, n_events: int) -> None:
        """Start-up replay (snapshot load + tail) finished."""
        self.replay_seconds = seconds
        self.replay_events = n_events

    def snapshot_written(self, seconds: float, size_bytes: int) -> None:
        self.snapshot_seconds.observe(seconds)
        self.snapshot_last_success = self._clock()
        self.snapshot_last_bytes = size_bytes

    def snapshot_failed(self) -> None:
        self.snapshot_failures.inc()
        self.snapshot_last_failure = self._clock()

    def state_dir_usage(self, total: int, used: int, free: int) -> None:
        """``shutil.disk_usage`` of the state directory (read off the event loop)."""
        self.state_dir_size_bytes = float(total)
        self.state_dir_avail_bytes = float(free)

    # ---- API (ugrod/api/app.py's middleware) ------------------------------------

    def api_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """``route`` is the route template (``/v1/jobs/{id}``), never the raw path."""
        key = (route, method, str(status))
        counter = self.api_requests.get(key)
        if counter is None:
            counter = self.api_requests[key] = Counter()
        counter.inc()
        hist = self.api_latency.get(route)
        if hist is None:
            hist = self.api_latency[route] = Histogram(API_BUCKETS)
        hist.observe(seconds)

    # ---- scheduler -----------------------------------------------------------

    def scheduler_tick(self, seconds: float, placed: int = 0) -> None:
        self.scheduler_ticks.observe(seconds)
        self.scheduler_placements.inc(placed)

    # ---- health monitor ------------------------------------------------------

    def health_check(self, node: str, seconds: float, ok: bool) -> None:
        """One check of one node finished (``ok``: the node answered and was read)."""
        self.health_duration.observe(seconds)
        self.health_last_duration[node] = seconds
        self.health_checks.setdefault(node, Counter()).inc()
        failures = self.health_failures.setdefault(node, Counter())
        if ok:
            self.health_last_success[node] = self._clock()
        else:
            failures.inc()

    def breaker(self, node: str, state: str) -> None:
        """The node's circuit breaker moved: ``closed``, ``half-open`` or ``open``."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}")
        self.breakers[node] = state

    def forget_node(self, node: str) -> None:
        """A node left the config: drop its per-node figures."""
        for table in (self.health_checks, self.health_failures, self.health_last_duration,
                      self.health_last_success, self.breakers):
            table.pop(node, None)

    # ---- jobs ------------------------------------------------------------------

    def jobs_committed(self, records: Iterable[ev.Record], state: State) -> None:
        """Ledger listener (``ledger.on_commit(stats.jobs_committed)``): placements and ends.

        ``state`` is the state right after ``records``; it supplies each job's times.
        Queue wait is observed when a job is placed (a job waiting still counts in
        ``ugro_queue_oldest_wait_seconds``); run time when an attempt ends.
        """
        for record in records:
            e = record.event
            if isinstance(e, ev.JobPlaced):
                since = self._queued_since.pop(e.job, None)
                job = state.jobs.get(e.job)
                if since is None and job is not None and job.first_started_at == record.ts:
                    since = job.submitted_at  # first placement
                if since is not None:
                    self.job_wait.observe(max(record.ts - since, 0.0))
            elif isinstance(e, ev.JobEnded | ev.JobCancelRequested):
                job = state.jobs.get(e.job)
                if job is None:
                    continue
                if job.state is JobState.RETRYING:
                    self._queued_since[e.job] = record.ts
                else:
                    self._queued_since.pop(e.job, None)
                if isinstance(e, ev.JobEnded) and job.started_at is not None:
                    self.job_run.observe(max(record.ts - job.started_at, 0.0))
                self._ended(job, record.ts)
            elif isinstance(e, ev.JobResumed):
                self._queued_since[e.job] = record.ts
                self.recent_ends.pop(e.job, None)
            elif isinstance(e, ev.JobSubmitted):
                self._queued_since.pop(e.job, None)

    def _ended(self, job: Job, ts: float) -> None:
        recent = self.recent_ends
        recent.pop(job.id, None)  # re-inserted last: the dict stays in end order
        recent[job.id] = RecentEnd(job=job.id, owner=job.owner, outcome=job.state.value,
                                   reason=failure_reason(job.state.value, job.reason)
                                   if job.state is not JobState.SUCCEEDED else "",
                                   ended_at=ts)
        self.expire_ends(ts)

    def expire_ends(self, now: float) -> None:
        """Forget ends older than ``ENDED_KEEP_S`` (or beyond ``ENDED_KEEP_MAX``)."""
        recent = self.recent_ends
        while recent:
            first = next(iter(recent.values()))
            if first.ended_at >= now - ENDED_KEEP_S and len(recent) <= ENDED_KEEP_MAX:
                break
            del recent[first.job]

    def rebuild(self, state: State) -> None:
        """At start-up: the jobs that ended within ``ENDED_KEEP_S`` (their series come back).

        Counters are not rebuilt here: they are ``state.tally``, folded from the log.
        """
        now = self._clock()
        ends = sorted((j.ended_at, j.id) for j in state.jobs.values()
                      if j.ended_at is not None and j.ended_at >= now - ENDED_KEEP_S
                      and (j.state in TERMINAL or j.state is JobState.RETRYING))
        self.recent_ends = {}
        for ended_at, job_id in ends[-ENDED_KEEP_MAX:]:
            self._ended(state.jobs[job_id], ended_at)
        self._queued_since = {j.id: j.ended_at for j in state.jobs.values()
                              if j.state is JobState.RETRYING and j.ended_at is not None}
