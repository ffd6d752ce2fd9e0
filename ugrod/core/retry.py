"""The retry decision as a pure function: how an attempt's end is recorded, and whether it
comes back.

``ended(job, outcome, ...)`` gives the ``job_ended`` event; the executor (the shell) reads
the job's last step, finds the checkpoint a retry resumes from (I/O, only when this says
"retrying") and records it. The rules:

- **Budget**: ``max_retries`` counts failures *without progress* in a row. An attempt
  that got past the job's best step so far keeps the budget (a long run that fails now
  and then is not a crash loop); one that did not uses one retry of it.
- **Lost to the cluster**: an attempt lost to a fault of the cluster, not of the job (a
  partition, a node lost with its ranks, a launch that could not reach its node, ugrod
  stopped while it started: ``cluster_fault``) keeps the budget too, progress or not.
- **Crash loop**: once the budget is used up, the job fails for good and the reason says
  so. Progress or not, no job is retried past ``4 * max_retries + 4`` failures in all.
- **Backoff**: ``retry_backoff_s`` doubled for each retry without progress used, capped
  at 600 s (and at 0 from below, even for a spec recorded before submit checked it).
- **Node to avoid**: the node of the rank that failed first is recorded in the event
  (``failed_node``); the planner places the retry elsewhere when it can.

No I/O, no clock: ``now`` comes from the ledger.
"""

from __future__ import annotations

import math

from ugrod.core import events as ev
from ugrod.core.state import Job

MAX_STEP = (1 << 63) - 1  # steps are recorded in events: a signed 64-bit integer
MAX_BACKOFF_S = 600.0  # the longest wait before a retry, whatever the spec says
MAX_REASON = 4000  # characters of reason one job_ended keeps


def last_step(latest: object) -> int | None:
    """The step a job's metrics reported last, if it can be recorded (else None)."""
    if isinstance(latest, int | float) and math.isfinite(latest) and 0 <= latest <= MAX_STEP:
        return int(latest)
    return None


def made_progress(job: Job, step: int | None) -> bool:
    """Whether an attempt got past the best step of the job's earlier attempts."""
    return step is not None and (job.best_step is None or step > job.best_step)


def backoff_s(job: Job, budget_used: int) -> float:
    """The wait before the retry that uses ``budget_used`` retries without progress."""
    wait = job.spec.retry_backoff_s * (2 ** min(max(budget_used - 1, 0), 30))
    # Bounded both ways even for a spec recorded before submit checked it (a backoff of
    # -1e308 once made a retry time no event could hold).
    return min(max(wait, 0.0), MAX_BACKOFF_S) if math.isfinite(wait) else MAX_BACKOFF_S


def ended(job: Job, outcome: str, reason: str, *, now: float, latest_step: object = None,
          exit_code: int | None = None, failed_rank: int | None = None,
          failed_node: str | None = None, retryable: bool = False,
          cluster_fault: bool = False) -> ev.JobEnded:
    """The ``job_ended`` for the current attempt of ``job``, ending in ``outcome``.

    ``retryable``: a failure the job's own ranks caused (not a cancel, not a failed start);
    such a failure becomes "retrying" while the budget lasts. ``latest_step``: the step
    the job's metrics reported last (any value; only a recordable step counts).
    ``resume_from`` is left to the shell (it lists the checkpoints).
    """
    step = last_step(latest_step)
    progress = made_progress(job, step)
    retry_at = None
    max_retries = job.spec.max_retries
    if retryable and outcome == "failed" and max_retries > 0:
        budget_used = job.no_progress_failures + (0 if progress or cluster_fault else 1)
        if budget_used <= max_retries and job.failures < 4 * max_retries + 4:
            outcome = "retrying"
            retry_at = now + backoff_s(job, budget_used)
            reason = f"{reason}; retry {job.failures + 1} " + (
                "(made progress: budget kept)" if progress else
                "(lost to the cluster, not to the job: budget kept)" if cluster_fault else
                f"({budget_used} of {max_retries} retries without progress used)")
        elif budget_used > max_retries:
            reason = (f"{reason}; not retried: {max_retries} retries without progress "
                      f"used up (crash loop)")
    return ev.JobEnded(job=job.id, attempt=job.attempt, outcome=outcome,
                       reason=reason[:MAX_REASON], exit_code=exit_code,
                       failed_rank=failed_rank, failed_node=failed_node, last_step=step,
                       made_progress=progress, retry_at=retry_at, cluster_fault=cluster_fault)
