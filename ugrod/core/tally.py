"""Lifetime job counters folded from the event log (pure): what /metrics' ``*_total`` read.

``State.tally`` is updated by ``apply`` whenever a job changes state, and is
written in snapshots, so the counters never step down: not across a restart
(replay folds the same events again), not across ``resume`` (a resumed job's
old ending stays counted) and not when finished jobs leave live state. A
counter rebuilt from the jobs still in state would step down in each case,
and Prometheus's ``increase()`` reads a step down as a reset: 40 -> 39 looks
like 39 new failures.

No I/O, no clock: every time comes from the record being applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:  # only for annotations: state.py imports this module
    from ugrod.core.state import Job

OUTCOMES = ("succeeded", "failed", "cancelled")
# Why an attempt ended without success; ``failure_reason`` picks one.
FAILURE_REASONS = ("oom", "exit", "lost", "stalled", "cancelled", "time_limit")
_ACTIVE = frozenset({"starting", "running"})
_TERMINAL = frozenset(OUTCOMES)

# Phrases the executor and the watchdog write into a job's reason (checked in order).
_MARKERS = (
    ("oom", ("out of memory", "ran out of GPU memory", "OutOfMemoryError")),
    ("time_limit", ("time limit", "time_limit")),
    ("lost", ("vanished", "declared dead", "could not be confirmed gone",
              "lost: node unreachable")),
    ("stalled", ("stalled:",)),
)


class Tally(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """Counts since the log began; dict values are replaced, never mutated."""

    finished: dict[str, int] = {}  # outcome -> jobs that ended so (a resumed job again)
    retries: int = 0  # attempts that failed and left their job waiting for a retry
    resumes: int = 0  # failed/cancelled jobs queued again
    attempt_failures: dict[str, int] = {}  # FAILURE_REASONS value -> attempts
    gpu_seconds: dict[str, float] = {}  # owner -> GPU-seconds of ended attempts


EMPTY = Tally()


def failure_reason(outcome: str, reason: str) -> str:
    """One of FAILURE_REASONS for an attempt that ended ``outcome`` with ``reason``."""
    if outcome == "cancelled":
        return "cancelled"
    for name, phrases in _MARKERS:
        if any(p in reason for p in phrases):
            return name
    return "exit"


def _plus(table: dict[str, int], key: str) -> dict[str, int]:
    return {**table, key: table.get(key, 0) + 1}


def count(tally: Tally, old: Job, new: Job, ts: float) -> Tally:
    """The tally after ``old`` became ``new`` (a change of state) at time ``ts``.

    Replay runs this once per job state change: placement and start return at once.
    """
    after = new.state.value
    if after in _ACTIVE:
        return tally  # placed or running: nothing to count yet
    before = old.state.value
    finished, retries, resumes = tally.finished, tally.retries, tally.resumes
    failures, gpu_seconds = tally.attempt_failures, tally.gpu_seconds
    if after in _TERMINAL:
        finished = _plus(finished, after)
    elif after == "retrying":
        retries += 1
    elif before in _TERMINAL:  # resumed
        resumes += 1
    if before in _ACTIVE:
        if after != "succeeded":
            why = failure_reason("cancelled" if after == "cancelled" else "failed", new.reason)
            failures = _plus(failures, why)
        gpus = old.gpu_count
        if gpus and old.started_at is not None:
            owner = old.owner
            gpu_seconds = {**gpu_seconds, owner: gpu_seconds.get(owner, 0.0)
                           + gpus * max(ts - old.started_at, 0.0)}
    return Tally(finished=finished, retries=retries, resumes=resumes,
                 attempt_failures=failures, gpu_seconds=gpu_seconds)
