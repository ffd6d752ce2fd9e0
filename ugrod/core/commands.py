"""Client commands as pure decisions: state + request -> events, or ``Refused`` in user words.

The ledger runs these on its newest state inside the writer (``record_decided``),
so what they decide cannot be overtaken by a concurrent command: two unnamed
submits never pick one name, and a batch over many jobs is judged job by job
against the state its events will be applied to, then recorded as one batch.

No I/O, no clock. Who may change which job is the caller's rule (``may_change``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgspec

from ugrod.core import events as ev
from ugrod.core import jobspec
from ugrod.core.state import TERMINAL, Job, JobState, Node, State, Sweep, allows

ACTIONS = ("cancel", "hold", "release", "priority")
MAX_BATCH = 10_000  # jobs one bulk request may name or select


class Refused(Exception):
    """A command that cannot be done: ``code`` is the API's code word, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# ---- looking up what a command names ------------------------------------------------


def job(state: State, job_id: str) -> Job:
    """The job ``job_id`` names, or Refused (not found) saying where to look."""
    found = state.jobs.get(job_id)
    if found is None:
        raise Refused("not_found", f"no job named {job_id!r} (see `ugroctl status`)")
    return found


def node(state: State, name: str) -> Node:
    """The node ``name`` names, or Refused (not found) saying where to look."""
    found = state.nodes.get(name)
    if found is None:
        raise Refused("not_found", f"no node named {name!r} (see `ugroctl nodes`)")
    return found


def sweep(state: State, name: str) -> Sweep:
    found = state.sweeps.get(name)
    if found is None:
        raise Refused("not_found", f"no sweep named {name!r}")
    return found


# ---- submit -------------------------------------------------------------------------


def next_job_name(state: State) -> str:
    """``job-N``: the first free N from the number of jobs on (jobs are never removed)."""
    jobs = state.jobs
    for n in itertools.count(len(jobs) + 1):
        name = f"job-{n}"
        if name not in jobs:
            return name
    raise AssertionError("unreachable")


def submit(state: State, submitted: ev.JobSubmitted) -> list[ev.Event]:
    """A submit checked against ``state``: a name given to an unnamed job, dependencies that
    can still be met. ``submitted.job`` empty means "pick a name"."""
    name = submitted.job or next_job_name(state)
    prior = state.jobs.get(name)
    if prior is not None:
        raise Refused("conflict", f"a job named {name!r} already exists ({prior.state}); "
                      f"pick another name, or `ugroctl resume {name}`")
    check_dependencies(state, submitted.spec)
    return [msgspec.structs.replace(submitted, job=name)]


def submit_once(state: State, submitted: ev.JobSubmitted, *,
                name_in_argv: bool = False) -> tuple[list[ev.Event], str, bool]:
    """``submit`` at most once per client request id: (events, the job, whether it is new).

    A client retrying after a lost answer names the job its first try made (no event).
    ``name_in_argv``: the argv holds jobspec.NAME_PLACEHOLDER (a launch), replaced by the
    name picked here.
    """
    prior = state.requests.get(submitted.request_id) if submitted.request_id else None
    if prior is not None:
        return [], prior, False
    events = submit(state, submitted)
    first = events[0]
    assert isinstance(first, ev.JobSubmitted)
    if name_in_argv and not submitted.job:
        events[0] = jobspec.with_name(first, first.job)
    return events, first.job, True


def check_dependencies(state: State, spec: ev.JobSpec) -> None:
    """Refuse dependencies that name no job, or that can no longer be met."""
    for flag, deps in (("--after", spec.after), ("--after-any", spec.after_any),
                       ("--after-failed", spec.after_failed)):
        for dep in deps:
            other = state.jobs.get(dep)
            if other is None:
                raise Refused("bad_request", f"{flag} {dep}: no such job (see `ugroctl status "
                              f"--all`)")
            if flag == "--after" and other.state in (JobState.FAILED, JobState.CANCELLED):
                raise Refused("conflict", f"--after {dep}: {dep} already {other.state} "
                              f"({other.reason or 'no reason recorded'}), and --after waits "
                              f"for success, so this job could never start; use --after-any "
                              f"{dep} to run it however {dep} ended, or --after-failed {dep}")
            if flag == "--after-failed" and other.state is JobState.SUCCEEDED:
                raise Refused("conflict", f"--after-failed {dep}: {dep} already succeeded, so "
                              f"this job could never start; use --after {dep} or --after-any "
                              f"{dep}")


# ---- one job, one action ------------------------------------------------------------
# Each asks the lifecycle table (state.allows) whether the job may take the event, and
# says why not in the words of the person who asked.


def cancel(job: Job, actor: ev.Actor, reason: str | None = None) -> ev.Event:
    """The one cancel choice: a job that has not started is cancelled at once; a placed one
    is stopped (its processes killed, then job_ended); an ended one is refused."""
    why = reason or f"cancelled by {actor.user}"
    if allows(job.state, ev.JobCancelRequested):
        return ev.JobCancelRequested(job=job.id, reason=why)
    if not allows(job.state, ev.JobStopping):
        raise Refused("conflict", f"job {job.id} already {job.state}: nothing to cancel")
    if job.stopping == "cancelled":
        raise Refused("conflict", f"job {job.id} is already being cancelled (its "
                      f"processes are being killed)")
    return ev.JobStopping(job=job.id, attempt=job.attempt, outcome="cancelled", reason=why)


def hold(job: Job) -> ev.Event:
    if not allows(job.state, ev.JobHeld):
        raise Refused("conflict", f"job {job.id} is {job.state}: only waiting jobs can be "
                      f"held")
    if job.held:
        raise Refused("conflict", f"job {job.id} is already held")
    return ev.JobHeld(job=job.id)


def release(job: Job) -> ev.Event:
    """Only a held job that still waits can be released (the table lets any waiting job
    take the event; ``held`` is a flag, not a state)."""
    if not job.held:
        raise Refused("conflict", f"job {job.id} is not held")
    if not allows(job.state, ev.JobReleased):  # held, then cancelled before it started
        raise Refused("conflict", f"job {job.id} is {job.state}: only waiting jobs can be "
                      f"released")
    return ev.JobReleased(job=job.id)


def set_priority(job: Job, priority: int | None) -> ev.Event:
    if priority is None:
        raise Refused("bad_request", "priority: missing the new priority")
    if not allows(job.state, ev.JobPrioritySet):
        raise Refused("conflict", f"job {job.id} already {job.state}: only waiting or "
                      f"running jobs have a priority to change")
    return ev.JobPrioritySet(job=job.id, priority=priority)


def checkpoint(job: Job) -> ev.Event:
    """Ask a running job to save a checkpoint now."""
    if not allows(job.state, ev.CheckpointRequested):
        raise Refused("conflict", f"job {job.id} is {job.state}: only a running job can be "
                      f"asked to checkpoint")
    return ev.CheckpointRequested(job=job.id)


def resume(job: Job, changes: Mapping[str, str]) -> ev.JobResumed:
    """Queue a failed or cancelled job again, its argv/env changed by ``changes``
    (``resume --set``; SpecError for a bad one). The shell then fills in ``resume_from``
    (the newest checkpoint: I/O) before recording it."""
    if not allows(job.state, ev.JobResumed):
        raise Refused("conflict", f"job {job.id} is {job.state}: only failed or cancelled "
                      f"jobs can be resumed")
    return ev.JobResumed(job=job.id, spec=jobspec.with_overrides(job.spec, changes))


def job_action(job: Job, action: str, actor: ev.Actor, priority: int | None = None,
               reason: str | None = None) -> ev.Event:
    """The event doing ``action`` (one of ACTIONS) to ``job`` now, or Refused saying why not."""
    if action == "cancel":
        return cancel(job, actor, reason)
    if action == "hold":
        return hold(job)
    if action == "release":
        return release(job)
    if action == "priority":
        return set_priority(job, priority)
    raise Refused("bad_request", f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")


# ---- nodes ----------------------------------------------------------------------------


def drain(state: State, name: str, reason: str) -> ev.Event:
    """Stop placing jobs on a node (running ones go on); the reason is kept, cut to 500."""
    node(state, name)
    return ev.NodeDrained(node=name, reason=reason[:500])


def undrain(state: State, name: str) -> ev.Event:
    """Only a drained node can be undrained."""
    if not node(state, name).drained:
        raise Refused("conflict", f"node {name} is not drained")
    return ev.NodeUndrained(node=name)


# ---- many jobs at once ----------------------------------------------------------------


class Filter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which jobs a bulk request means besides those it names.

    ``user`` None selects the caller's own jobs, unless ``all_users`` or ``sweep`` is
    given (a sweep names its jobs). Only jobs that have not ended are selected.
    """

    user: str | None = None
    all_users: bool = False
    states: tuple[str, ...] = ()
    sweep: str | None = None

    @property
    def empty(self) -> bool:
        return self.user is None and not self.all_users and not self.states \
            and self.sweep is None


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    job: str
    code: str
    reason: str


def check_states(states: Iterable[str]) -> tuple[str, ...]:
    """Job states as the user typed them (``pending`` is ``queued``), checked."""
    known = {s.value for s in JobState}
    out = []
    for s in states:
        s = "queued" if s == "pending" else s
        if s not in known:
            raise Refused("bad_request", f"--state {s!r}: use one of "
                          f"{', '.join(sorted(known))}")
        out.append(s)
    return tuple(dict.fromkeys(out))


def select(state: State, actor: ev.Actor, names: Sequence[str],
           where: Filter) -> tuple[list[str], list[Refusal]]:
    """The jobs named plus those matching the filter, in submission order; unknown names
    are refused (not found)."""
    chosen: dict[str, int] = {}
    refused = []
    for name in names:
        job = state.jobs.get(name)
        if job is None:
            refused.append(Refusal(job=name, code="not_found", reason=f"no job named {name!r}"))
        else:
            chosen[name] = job.submit_seq
    if not where.empty:
        if where.sweep is not None:
            sweep = state.sweeps.get(where.sweep)
            if sweep is None:
                raise Refused("not_found", f"--sweep {where.sweep}: no such sweep (see "
                              f"`ugroctl sweep list`)")
            pool: Iterable[str] = sweep.jobs
        else:
            pool = state.active
        user = where.user if where.user is not None else (
            None if where.all_users or where.sweep is not None else actor.user)
        states = set(where.states)
        for job_id in pool:
            job = state.jobs[job_id]
            if job.state in TERMINAL and job_id not in chosen:
                continue
            if user is not None and job.owner != user:
                continue
            if states and job.state.value not in states:
                continue
            chosen[job_id] = job.submit_seq
    if len(chosen) > MAX_BATCH:
        raise Refused("bad_request", f"{len(chosen)} jobs selected; at most {MAX_BATCH} at once")
    return sorted(chosen, key=chosen.__getitem__), refused


def cancel_sweep(state: State, actor: ev.Actor, name: str) -> list[ev.Event]:
    """Cancel every trial of sweep ``name`` that can still be cancelled, as one batch
    (who may is the caller's rule: all or nothing, before this)."""
    reason = f"sweep {name} cancelled by {actor.user}"
    events = []
    for job_id in sweep(state, name).jobs:
        try:
            events.append(cancel(state.jobs[job_id], actor, reason))
        except Refused:
            continue  # ended, or being cancelled already
    return events


def bulk(state: State, actor: ev.Actor, action: str, jobs: Sequence[str],
         may_change: Callable[[Job], bool], priority: int | None = None,
         reason: str | None = None) -> tuple[list[ev.Event], list[str], list[Refusal]]:
    """One event per job that can take ``action``; the others refused, each with its reason.

    Returns (events, the jobs they change, refusals). The events go to the log as one
    batch: all of them or, if the log fails, none.
    """
    if action not in ACTIONS:
        raise Refused("bad_request", f"unknown action {action!r}; use one of "
                      f"{', '.join(ACTIONS)}")
    events: list[ev.Event] = []
    done: list[str] = []
    refused: list[Refusal] = []
    verb = {"priority": "change the priority of"}.get(action, action)
    for job_id in jobs:
        job = state.jobs[job_id]
        if not may_change(job):
            refused.append(Refusal(job=job_id, code="forbidden", reason=(
                f"only {job.owner} (the owner) or root may {verb} job {job.id}")))
            continue
        try:
            events.append(job_action(job, action, actor, priority, reason))
        except Refused as exc:
            refused.append(Refusal(job=job_id, code=exc.code, reason=exc.message))
            continue
        done.append(job_id)
    return events, done, refused
