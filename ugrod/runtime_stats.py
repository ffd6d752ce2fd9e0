"""RuntimeStats: the one place ugrod's shell records its own operational figures.

The ledger, the event log, the API, the scheduler and the health monitor call a
few cheap methods here (plain fields and fixed-bucket histograms, no locks: all
callers run on the one event loop); ``ugrod.metrics.UgroCollector`` reads them
at scrape time. Nothing here imports prometheus_client, so callers stay free
of it.

Job wait/run-time histograms and finished-by-outcome counts are kept
incrementally from committed events (``jobs_committed``, shaped as a
``Ledger.on_commit`` listener) and rebuilt once from state at start-up
(``rebuild``), so a scrape never rescans every finished job.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from ugrod import events as ev
from ugrod.state import TERMINAL, Job, JobState, State

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

OUTCOMES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
BREAKER_STATES = ("closed", "half-open", "open")  # ugrod.health.BreakerState values


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


def job_timings(job: Job, ended_at: float) -> tuple[float, float | None]:
    """(wait_s, run_s) of a job that ended at ``ended_at``.

    Wait: submission to first placement (to the end when it never started).
    Run: the last attempt, placement to end; None when it never started.
    """
    first = job.first_started_at
    wait = (first if first is not None else ended_at) - job.submitted_at
    run = None if job.started_at is None or first is None else ended_at - job.started_at
    return max(wait, 0.0), None if run is None else max(run, 0.0)


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
        # jobs
        self.job_wait = Histogram(JOB_WAIT_BUCKETS)
        self.job_run = Histogram(JOB_RUN_BUCKETS)
        self.jobs_finished: dict[JobState, Counter] = {o: Counter() for o in OUTCOMES}
        self.job_retries = Counter()
        self.job_resumes = Counter()
        self.terminal: dict[JobState, int] = dict.fromkeys(OUTCOMES, 0)
        self._terminal_of: dict[str, JobState] = {}

    # ---- event log (ugrod/log.py, ugrod/ledger.py) --------------------------

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

    # ---- API (ugrod/api.py's middleware) ------------------------------------

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

    def job_finished(self, outcome: JobState | str, wait_s: float,
                     run_s: float | None) -> None:
        """A job reached succeeded/failed/cancelled (not a retry)."""
        state = JobState(outcome)
        self.jobs_finished[state].inc()
        self.job_wait.observe(wait_s)
        if run_s is not None:
            self.job_run.observe(run_s)

    def job_retried(self) -> None:
        """An attempt ended and the job waits to be retried."""
        self.job_retries.inc()

    def jobs_committed(self, records: Iterable[ev.Record], state: State) -> None:
        """Ledger listener (``ledger.on_commit(stats.jobs_committed)``): job ends and resumes.

        ``state`` is the state right after ``records``; it supplies each job's times.
        """
        for record in records:
            e = record.event
            if isinstance(e, ev.JobEnded):
                if e.outcome == JobState.RETRYING:
                    self.job_retried()
                    continue
                self._ended(state, e.job, record.ts)
            elif isinstance(e, ev.JobCancelRequested):
                self._ended(state, e.job, record.ts)
            elif isinstance(e, ev.JobResumed):
                self.job_resumes.inc()
                before = self._terminal_of.pop(e.job, None)
                if before is not None:
                    self.terminal[before] -= 1

    def _ended(self, state: State, job_id: str, ts: float) -> None:
        job = state.jobs.get(job_id)
        if job is None or job.state not in TERMINAL:
            return
        wait, run = job_timings(job, ts)
        self.job_finished(job.state, wait, run)
        previous = self._terminal_of.get(job_id)
        if previous is not None:
            self.terminal[previous] -= 1
        self._terminal_of[job_id] = job.state
        self.terminal[job.state] += 1

    def rebuild(self, state: State) -> None:
        """Job histograms and counts from replayed state (once, at start-up)."""
        self.job_wait = Histogram(JOB_WAIT_BUCKETS)
        self.job_run = Histogram(JOB_RUN_BUCKETS)
        self.jobs_finished = {o: Counter() for o in OUTCOMES}
        self.terminal = dict.fromkeys(OUTCOMES, 0)
        self._terminal_of = {}
        retries = 0
        for job in state.jobs.values():
            # Failed or retried attempts, less the one that left the job failed:
            # exact unless a job was resumed (the log has the full story).
            retries += job.failures - (job.state is JobState.FAILED)
            if job.state in TERMINAL and job.ended_at is not None:
                wait, run = job_timings(job, job.ended_at)
                self.job_finished(job.state, wait, run)
                self._terminal_of[job.id] = job.state
                self.terminal[job.state] += 1
        self.job_retries = Counter()
        self.job_retries.inc(max(retries, 0))
