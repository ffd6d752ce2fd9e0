"""Each job's training progress: its newest metrics, when its step last advanced, and
the newest step seen through each of its nodes.

One owner. The executor writes what a job's ranks report (``record``, and per node
``line_from``/``steps_from``), or after a restart what the central files say
(``recall``); the watchdog reads the step times and each node's path (is training
stalled? is a silent node dead?), ``status``, ``results`` and ``/metrics`` read the
newest metrics, and a job's end reads its last step (did the attempt make progress?).
These are samples, not events: nothing here is in the log.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ugrod.core import events as ev
from ugrod.core import progress_formats as pf
from ugrod.core.state import Job, State
from ugrod.loops.node_progress import NodeProgress
from ugrod.store.ledger import Ledger

STEP_TIMES_KEPT = 64  # step advances kept per job: the watchdog's median step interval
_DEFAULT_PROGRESS = ev.ProgressSpec()


class Progress:
    """The newest metrics of every job that reported any, and its recent step advances."""

    def __init__(self, ledger: Ledger, *, clock: Callable[[], float] | None = None) -> None:
        # When a step advanced: the running loop's clock (monotonic), as the watchdog's.
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._latest: dict[str, dict[str, Any]] = {}  # job -> newest training metrics
        # job -> (attempt, clock times of its last step advances)
        self._step_times: dict[str, tuple[int, deque[float]]] = {}
        # the newest step seen through each node (a second path when rank 0's is cut)
        self._paths = NodeProgress()
        ledger.on_commit(self._committed)

    # ---- writing -----------------------------------------------------------------

    def record(self, job: Job, values: Mapping[str, Any]) -> None:
        """Merge one report of ``job``'s training (a metrics line, or progress read from
        its output) into its newest metrics; a new step counts as an advance."""
        latest = self._latest.setdefault(job.id, {})
        step = values.get("step")
        if isinstance(step, int | float) and step != latest.get("step"):
            times = self._step_times.get(job.id)
            if times is None or times[0] != job.attempt:
                times = self._step_times[job.id] = (job.attempt, deque(maxlen=STEP_TIMES_KEPT))
            times[1].append(self._clock())
        progress = job.spec.progress or _DEFAULT_PROGRESS
        pf.merge(latest, values, pf.loss_keys(progress.loss_key))
        if isinstance(values.get("ts"), int | float) and math.isfinite(values["ts"]):
            latest["ts"] = values["ts"]

    def line_from(self, job: Job, node: str, raw: bytes) -> None:
        """A metrics line streamed from ``node`` (any rank's): its step, if it has one, is
        progress seen through that node."""
        self._paths.line(job.id, job.attempt, node, raw, self._clock())

    def steps_from(self, job: Job, node: str, records: Iterable[Mapping[str, Any]]) -> None:
        """Progress read from a rank's output on ``node``: its steps, seen through ``node``."""
        now = self._clock()
        for r in records:
            step = r.get("step")
            if isinstance(step, int) and step >= 0:
                self._paths.saw(job.id, job.attempt, node, step, now)

    def recall(self, job: Job, step: int, ts: float, age_s: float) -> None:
        """After a restart: the attempt's newest step as its central files say (reported at
        ``ts``, ``age_s`` ago), so a silence is counted from then and an end knows whether
        the attempt made progress."""
        now = self._clock()
        at = min(now, now - age_s)
        latest = self._latest.setdefault(job.id, {})
        latest.setdefault("step", step)
        latest.setdefault("ts", ts)
        self._step_times[job.id] = (job.attempt, deque([at], maxlen=STEP_TIMES_KEPT))
        rank0 = next((p.node for p in job.placement if p.rank == 0), None)
        if rank0 is not None:
            self._paths.saw(job.id, job.attempt, rank0, step, at)

    def _committed(self, records: list[ev.Record], state: State) -> None:
        # Step times and paths matter while a job runs: forgotten once it has ended for
        # good (its newest metrics stay, for status and results).
        left = False
        for r in records:
            job = getattr(r.event, "job", None)
            if isinstance(job, str) and job not in state.active:
                self._step_times.pop(job, None)
                left = True
        if left:
            self._paths.forget(state.active)

    # ---- reading -------------------------------------------------------------------

    def latest(self, job_id: str) -> Mapping[str, Any] | None:
        """The job's newest metrics (None: it reported none)."""
        return self._latest.get(job_id)

    def all_latest(self) -> Mapping[str, Mapping[str, Any]]:
        """Every job's newest metrics, by job (read-only: for /metrics and reports)."""
        return self._latest

    def step(self, job_id: str) -> Any:
        """The newest step the job reported, as reported (None: none yet)."""
        latest = self._latest.get(job_id)
        return latest.get("step") if latest is not None else None

    def advanced(self, job: Job) -> Mapping[str, float]:
        """Node -> when the step seen through it last advanced, in the current attempt."""
        return self._paths.advanced(job.id, job.attempt)

    def step_times(self, job: Job) -> list[float]:
        """When the current attempt's step last advanced (clock times, oldest first)."""
        entry = self._step_times.get(job.id)
        return list(entry[1]) if entry is not None and entry[0] == job.attempt else []
