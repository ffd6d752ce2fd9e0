"""The retry decision (core/retry.py): budget, backoff, crash loop, the node to avoid. Pure."""

from __future__ import annotations

import math

import pytest

from ugrod.core import events as ev
from ugrod.core import retry
from ugrod.core.state import Job, JobState, State, apply

NOW = 5000.0


def job(*, max_retries: int = 2, backoff_s: float = 10.0, failures: int = 0,
        no_progress: int = 0, best_step: int | None = None) -> Job:
    return Job(id="j", owner="alice", uid=1000, state=JobState.RUNNING, attempt=failures + 1,
               spec=ev.JobSpec(argv=("t",), max_retries=max_retries,
                               retry_backoff_s=backoff_s),
               failures=failures, no_progress_failures=no_progress, best_step=best_step)


# (the job, its last step, outcome given, retryable) -> (outcome, wait, what the reason adds)
TABLE: list[tuple[Job, object, str, bool, str, float | None, str]] = [
    # no retries asked for: a failure is final, and nothing is added to the reason
    (job(max_retries=0), None, "failed", True, "failed", None, ""),
    # the budget counts failures without progress in a row
    (job(), None, "failed", True, "retrying", 10.0,
     "; retry 1 (1 of 2 retries without progress used)"),
    (job(failures=1, no_progress=1), None, "failed", True, "retrying", 20.0,
     "; retry 2 (2 of 2 retries without progress used)"),
    (job(failures=2, no_progress=2), None, "failed", True, "failed", None,
     "; not retried: 2 retries without progress used up (crash loop)"),
    # progress past the best step keeps the budget (the backoff still counts what is used)
    (job(failures=2, no_progress=2, best_step=100), 150, "failed", True, "retrying", 20.0,
     "; retry 3 (made progress: budget kept)"),
    (job(failures=2, no_progress=2, best_step=100), 100, "failed", True, "failed", None,
     "; not retried: 2 retries without progress used up (crash loop)"),
    # never past 4 * max_retries + 4 failures, progress or not (no crash-loop note)
    (job(failures=12, best_step=1), 9, "failed", True, "failed", None, ""),
    (job(failures=11, best_step=1), 9, "failed", True, "retrying", 10.0,
     "; retry 12 (made progress: budget kept)"),
    # only a failure the ranks caused is retried; never a cancel or a success
    (job(), None, "failed", False, "failed", None, ""),
    (job(), None, "cancelled", True, "cancelled", None, ""),
    (job(), 5, "succeeded", False, "succeeded", None, ""),
    # backoff: doubled per retry without progress, at most 600 s, never below 0
    (job(max_retries=9, failures=6, no_progress=6, backoff_s=30.0), None, "failed", True,
     "retrying", 600.0, "; retry 7 (7 of 9 retries without progress used)"),
    (job(backoff_s=-1e308), None, "failed", True, "retrying", 0.0,
     "; retry 1 (1 of 2 retries without progress used)"),
    (job(backoff_s=math.inf), None, "failed", True, "retrying", 600.0,
     "; retry 1 (1 of 2 retries without progress used)"),
    (job(max_retries=100, failures=80, no_progress=80, backoff_s=1e300), None, "failed",
     True, "retrying", 600.0, "; retry 81 (81 of 100 retries without progress used)"),
]


@pytest.mark.parametrize(("j", "step", "outcome", "retryable", "want", "wait", "added"), TABLE)
def test_retry_decisions(j: Job, step: object, outcome: str, retryable: bool, want: str,
                         wait: float | None, added: str) -> None:
    ended = retry.ended(j, outcome, "rank 0 exited 1", now=NOW, latest_step=step,
                        exit_code=1, failed_rank=0, failed_node="n2", retryable=retryable)
    assert ended.outcome == want
    assert ended.reason == "rank 0 exited 1" + added
    assert ended.retry_at == (None if wait is None else NOW + wait)
    assert (ended.job, ended.attempt, ended.exit_code) == ("j", j.attempt, 1)
    assert ended.failed_node == "n2" and ended.resume_from is None  # the shell's to find


@pytest.mark.parametrize(("latest", "step"), [
    (12, 12), (12.7, 12), (0, 0), ((1 << 63) - 1, (1 << 63) - 1), (None, None),
    (-1, None), (1 << 63, None), (math.nan, None), (math.inf, None), ("12", None),
])
def test_only_a_step_an_event_can_hold_counts(latest: object, step: int | None) -> None:
    assert retry.last_step(latest) == step
    ended = retry.ended(job(), "failed", "x", now=NOW, latest_step=latest, retryable=True)
    assert ended.last_step == step and ended.made_progress == (step is not None)


def test_the_decision_applies_and_the_retry_avoids_the_failed_node() -> None:
    actor = ev.Actor(user="alice", uid=1000)
    s = State()
    for e in (ev.NodeAdded(node=ev.NodeSpec(name="n1", host="127.0.0.1")),
              ev.JobSubmitted(job="j", spec=ev.JobSpec(argv=("t",), max_retries=1)),
              ev.JobPlaced(job="j", attempt=1, ranks=(ev.RankPlacement(rank=0, node="n1"),)),
              ev.JobRunning(job="j", attempt=1)):
        s = apply(s, ev.Record(seq=s.seq + 1, ts=1000.0, actor=actor, event=e))
    ended = retry.ended(s.jobs["j"], "failed", "rank 0 exited 1", now=NOW, latest_step=3,
                        failed_node="n1", retryable=True)
    s = apply(s, ev.Record(seq=s.seq + 1, ts=NOW, actor=ev.DAEMON, event=ended))
    j = s.jobs["j"]
    assert (j.state, j.retry_at, j.failed_nodes) == (JobState.RETRYING, NOW + 10.0, ("n1",))
    assert (j.best_step, j.no_progress_failures, j.failures) == (3, 0, 1)
    again = retry.ended(j, "failed", "again", now=NOW, latest_step=3, retryable=True)
    assert again.outcome == "retrying" and not again.made_progress  # 1 of 1 used now


def test_a_long_reason_is_cut_to_what_an_event_keeps() -> None:
    ended = retry.ended(job(), "failed", "x" * 10_000, now=NOW, retryable=True)
    assert len(ended.reason) == retry.MAX_REASON


def test_an_attempt_lost_to_the_cluster_keeps_the_budget() -> None:
    # A partition, a node lost, a launch that could not reach its node: not the job's fault.
    spent = job(failures=2, no_progress=2)  # a failure of its own now would be a crash loop
    ended = retry.ended(spent, "failed", "node lost", now=NOW, retryable=True,
                        cluster_fault=True)
    assert ended.outcome == "retrying" and ended.cluster_fault and not ended.made_progress
    assert ended.reason == "node lost; retry 3 (lost to the cluster, not to the job: budget kept)"
    assert ended.retry_at == NOW + 20.0  # the backoff still counts what is used
    capped = retry.ended(job(failures=12), "failed", "node lost", now=NOW, retryable=True,
                         cluster_fault=True)
    assert capped.outcome == "failed"  # still never past 4 * max_retries + 4 failures
