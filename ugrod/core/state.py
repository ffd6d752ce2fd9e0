"""Cluster state as a pure fold over events: ``apply(state, record) -> state``.

No I/O, no clock, no randomness: every time comes from the record. State is
immutable (msgspec frozen Structs in ``immutables.Map``s), so a rejected event
leaves the old state untouched and replay is byte-for-byte repeatable.

Job lifecycle (``JOB_LIFECYCLE`` is the table)::

    queued ──placed──▶ starting ──all ranks up──▶ running ──all exit 0──▶ succeeded
      │  ▲                │                          │
      │  │                └───────── ended ─────────┴──▶ failed | cancelled
      │  └── retry (backoff elapsed, planner places) ◀── retrying ◀─┘ (retry budget left)
      └── cancel before start ──▶ cancelled          failed|cancelled ──resume──▶ queued

- ``starting`` exists because a gang is not running until every rank is up:
  a rank that fails to start must take the whole attempt down.
- A job being killed stays ``starting``/``running`` with ``stopping`` set until
  ``job_ended`` says every process is confirmed gone: only then are its GPUs free.
- ``retrying`` is a failed attempt waiting out its backoff; the planner may
  place it again once ``retry_at`` has passed.
- ``held`` is a flag on a waiting job, not a state: hold/release never lose
  the job's place in the queue.

Node health: healthy ≥ degraded ≥ unhealthy, and unreachable when its circuit
breaker is open. ``draining`` is shown as the node's state while drained, but
kept apart from health so undrain restores the health last measured.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Any

import immutables
import msgspec

from ugrod.core import checkpoints as ck
from ugrod.core import events as ev
from ugrod.core import tally as tl
from ugrod.core.names import RECORDED_NAME_RE


class InvalidEvent(ValueError):
    """An event that does not apply to the current state; nothing is written."""


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeHealth(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNREACHABLE = "unreachable"


class NodeState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNREACHABLE = "unreachable"
    DRAINING = "draining"


WAITING = frozenset({JobState.QUEUED, JobState.RETRYING})
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING})
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ENDINGS = {
    "succeeded": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
    "retrying": JobState.RETRYING,
}

# The job lifecycle, one table: (state, job event) -> the state after it. A job event
# whose pair is not here does not apply (InvalidEvent; a command refuses it first, in its
# user's words); events not listed create jobs. ``apply`` moves the job to the state this
# table names, and the commands ask it what a job may still do. job_ended names its end
# itself: its target is ENDINGS, read by the event's outcome.
Move = tuple[JobState, type[ev.Event]]
Target = JobState | Mapping[str, JobState]


def _stays(event: type[ev.Event], states: Iterable[JobState]) -> dict[Move, Target]:
    return {(s, event): s for s in states}


def _moves(event: type[ev.Event], states: Iterable[JobState],
           to: Target) -> dict[Move, Target]:
    return {(s, event): to for s in states}


JOB_LIFECYCLE: Mapping[Move, Target] = {
    **_stays(ev.JobWaiting, WAITING),
    **_moves(ev.JobPlaced, WAITING, JobState.STARTING),
    **_stays(ev.RankStarted, ACTIVE),
    **_moves(ev.JobRunning, {JobState.STARTING}, JobState.RUNNING),
    **_stays(ev.RankExited, ACTIVE),
    **_stays(ev.JobStopping, ACTIVE),
    **_moves(ev.JobEnded, ACTIVE, ENDINGS),
    **_moves(ev.JobCancelRequested, WAITING, JobState.CANCELLED),
    **_stays(ev.JobPrioritySet, WAITING | ACTIVE),
    **_stays(ev.JobHeld, WAITING),
    **_stays(ev.JobReleased, WAITING),
    **_moves(ev.JobResumed, {JobState.FAILED, JobState.CANCELLED}, JobState.QUEUED),
    **_stays(ev.CheckpointRequested, {JobState.RUNNING}),
    **_stays(ev.CheckpointSaved, JobState),
    **_stays(ev.CheckpointCopied, JobState),
    **_stays(ev.CheckpointCopyFailed, JobState),
    **_stays(ev.CheckpointPruned, JobState),
    **_stays(ev.CheckpointStaged, ACTIVE),
    **_stays(ev.JobStalled, {JobState.RUNNING}),
    **_stays(ev.JobProgressed, {JobState.RUNNING}),
    **_stays(ev.RankFenced, JobState),  # an old attempt's rank: whatever the job does now
}

# Per job event: source state -> target (what ``apply`` looks up, once per event).
_TARGETS: dict[type[ev.Event], dict[JobState, Target]] = {}
for (_source, _event), _target in JOB_LIFECYCLE.items():
    _TARGETS.setdefault(_event, {})[_source] = _target


def allows(state: JobState, event: type[ev.Event]) -> bool:
    """Whether a job in ``state`` may take ``event`` (the lifecycle table's answer)."""
    return (state, event) in JOB_LIFECYCLE


# What each job event does, in the words of the person whose command it was: the
# refusal "job x is succeeded: cannot change its priority" may reach them.
_DOING: dict[type[ev.Event], str] = {
    ev.JobWaiting: "wait for resources", ev.JobPlaced: "be placed",
    ev.RankStarted: "start a rank", ev.JobRunning: "be marked running",
    ev.RankExited: "record a rank's exit", ev.JobStopping: "stop it",
    ev.JobEnded: "end it", ev.JobCancelRequested: "cancel it before it started",
    ev.JobPrioritySet: "change its priority", ev.JobHeld: "hold it",
    ev.JobReleased: "release it", ev.JobResumed: "resume it (only failed or cancelled "
    "jobs can be resumed)", ev.CheckpointRequested: "ask it for a checkpoint (it is not "
    "running)", ev.CheckpointSaved: "record a checkpoint",
    ev.CheckpointCopied: "record a checkpoint copy", ev.CheckpointCopyFailed: "record a "
    "failed checkpoint copy", ev.CheckpointPruned: "remove checkpoint copies",
    ev.CheckpointStaged: "stage its checkpoint", ev.JobStalled: "mark it stalled",
    ev.JobProgressed: "mark it progressing", ev.RankFenced: "record a fenced rank",
}


class RankRun(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    rank: int
    node: str
    pid: int | None = None
    exit_code: int | None = None


class FencedRank(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    """A rank of an attempt no longer live, found running on its node and killed there."""

    attempt: int
    rank: int
    node: str
    at: float
    pids: int = 0


MAX_FENCED = 20  # kept per job (the log keeps every one)


class Job(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    id: str
    spec: ev.JobSpec
    owner: str
    uid: int | None
    state: JobState = JobState.QUEUED
    priority: int = 0
    held: bool = False
    submit_seq: int = 0
    submitted_at: float = 0.0
    request_id: str | None = None
    attempt: int = 0
    placement: tuple[ev.RankPlacement, ...] = ()
    rdzv_host: str = ""
    rdzv_port: int = 0
    ranks: tuple[RankRun, ...] = ()
    started_at: float | None = None  # this attempt placed
    running_at: float | None = None
    first_started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    reason: str = ""
    waiting_reason: str = ""
    stopping: str | None = None  # outcome being driven to while processes are killed
    failures: int = 0
    no_progress_failures: int = 0
    best_step: int | None = None
    retry_at: float | None = None
    resume_from: str | None = None
    failed_nodes: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    checkpoint_requested: bool = False
    stalled: bool = False
    # The newest checkpoint_saved reports (with their nodes), the verified copies in the
    # head's job directory, and why copying last failed ("" once a copy succeeds).
    reported: tuple[ck.Reported, ...] = ()
    central: tuple[ck.Central, ...] = ()
    copy_error: str = ""
    fenced: tuple[FencedRank, ...] = ()

    @property
    def name(self) -> str:
        return self.id

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(p.node for p in self.placement)

    @property
    def gpu_count(self) -> int:
        return sum(len(p.gpus) for p in self.placement)


class Alert(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    alert: str
    severity: str
    message: str
    since: float


class Node(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    spec: ev.NodeSpec
    health: NodeHealth = NodeHealth.HEALTHY
    score: float | None = None
    health_reason: str = ""
    health_since: float = 0.0
    drained: bool = False
    drain_reason: str = ""
    inventory: tuple[ev.Gpu, ...] | None = None  # read from the node; None until then
    inventory_mismatch: str | None = None
    alerts: tuple[Alert, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> NodeState:
        return NodeState.DRAINING if self.drained else NodeState(self.health.value)

    @property
    def gpus(self) -> tuple[ev.Gpu, ...]:
        """What the node really has when known, else what the config says."""
        return self.inventory if self.inventory is not None else self.spec.gpus

    @property
    def schedulable(self) -> bool:
        return not self.drained and self.health in (NodeHealth.HEALTHY, NodeHealth.DEGRADED)


class Sweep(msgspec.Struct, frozen=True, gc=False, kw_only=True, array_like=True):
    name: str
    owner: str
    jobs: tuple[str, ...]
    params: dict[str, tuple[str, ...]]
    max_parallel: int = 0
    created_at: float = 0.0


class State(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    seq: int = 0
    nodes: immutables.Map[str, Node] = immutables.Map()
    jobs: immutables.Map[str, Job] = immutables.Map()
    active: immutables.Map[str, int] = immutables.Map()  # non-terminal job -> submit_seq
    requests: immutables.Map[str, str] = immutables.Map()  # client request id -> job
    sweeps: immutables.Map[str, Sweep] = immutables.Map()
    gpus_held: immutables.Map[tuple[str, int], str] = immutables.Map()  # (node, gpu) -> job
    n_running: int = 0  # jobs starting or running
    started_at: float | None = None
    tally: tl.Tally = tl.EMPTY  # lifetime counters (ugrod/core/tally.py), kept in snapshots

    def job(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise InvalidEvent(f"no job named {job_id!r}") from None

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise InvalidEvent(f"no node named {name!r}") from None

    def active_jobs(self) -> Iterator[Job]:
        """Non-terminal jobs in submission order."""
        for job_id, _ in sorted(self.active.items(), key=lambda kv: kv[1]):
            yield self.jobs[job_id]

    def allocations(self) -> dict[tuple[str, int], str]:
        """(node, gpu index) -> job holding it; a stopping job still holds its GPUs."""
        return dict(self.gpus_held)

    def jobs_on(self, node: str) -> list[str]:
        return sorted(
            j for j in self.active
            if self.jobs[j].state in ACTIVE and node in self.jobs[j].nodes
        )


def apply(state: State, record: ev.Record) -> State:
    """The one rule per event. Raises InvalidEvent and leaves ``state`` as it was."""
    if record.seq != state.seq + 1:
        raise InvalidEvent(f"event seq {record.seq} does not follow {state.seq}")
    e = record.event
    # Replay runs this a million times: one table lookup gives the rule, the job
    # states it may apply to and the attempt it must name (see _DISPATCH).
    how = _DISPATCH.get(e.__class__)
    if how is None:
        raise InvalidEvent(f"no rule for {e.kind}")
    rule, targets, attempt = how
    if targets is None:
        return _rep(rule(state, record), seq=record.seq)  # type: ignore[no-any-return]
    job = state.jobs.get(e.job)  # type: ignore[attr-defined]
    if job is None:
        raise InvalidEvent(f"no job named {e.job!r}")  # type: ignore[attr-defined]
    to = targets.get(job.state)
    if to is None:
        raise InvalidEvent(f"job {job.id} is {job.state}: cannot "
                           f"{_DOING.get(e.__class__, 'change it that way')}")
    if attempt is not None and e.attempt != job.attempt + attempt:  # type: ignore[attr-defined]
        raise InvalidEvent(f"job {job.id}: event for attempt "
                           f"{e.attempt}, current attempt is {job.attempt}")  # type: ignore[attr-defined]
    if to.__class__ is not JobState:  # job_ended: its outcome names the state
        to = to.get(e.outcome)  # type: ignore[attr-defined,union-attr]
        if to is None:
            raise InvalidEvent(f"job {job.id}: unknown outcome "
                               f"{e.outcome!r}")  # type: ignore[attr-defined]
    new: Job = rule(state, job, e, record.ts, to)
    if new.state is not to:  # the rules that move a job set the state the table names
        new = _rep(new, state=to)
    if new.state is not job.state:
        state = _rep(state, tally=tl.count(state.tally, job, new, record.ts))
    if new.state is job.state and new.placement is job.placement:
        # The common case (a rank started, a reason recorded): no index changes.
        return _rep(state, jobs=state.jobs.set(job.id, new), seq=record.seq)
    return _put_job(state, job, new, record.seq)


def replay(state: State, records: Iterable[ev.Record]) -> State:
    """fold(apply, records): kept as the one name tests and tools call."""
    for r in records:
        state = apply(state, r)
    return state


def _put_job(state: State, old: Job | None, job: Job, seq: int | None = None) -> State:
    """Store ``job``, keeping the active-job and held-GPU indexes in step."""
    jobs = state.jobs.set(job.id, job)
    if old is not None and old.state is job.state and old.placement is job.placement:
        # The common case (a rank started, a reason recorded): no index changes.
        return msgspec.structs.replace(state, jobs=jobs, seq=state.seq if seq is None else seq)
    active, held = state.active, state.gpus_held
    if job.state in TERMINAL:
        if job.id in active:
            active = active.delete(job.id)
    elif job.id not in active:
        active = active.set(job.id, job.submit_seq)
    was = old is not None and old.state in ACTIVE
    now = job.state in ACTIVE
    n_running = state.n_running + now - was
    if was != now or (now and old is not None and old.placement is not job.placement):
        with held.mutate() as m:
            if was and old is not None:
                for key in _gpus_of(old):
                    m.pop(key, None)
            if now:
                for key in _gpus_of(job):
                    m[key] = job.id
            held = m.finish()
    return msgspec.structs.replace(state, jobs=jobs, active=active, gpus_held=held,
                                   n_running=n_running, seq=state.seq if seq is None else seq)


def _gpus_of(job: Job) -> Iterator[tuple[str, int]]:
    for p in job.placement:
        for g in p.gpus:
            yield (p.node, g)


_rep = msgspec.structs.replace
JobRule = Callable[[State, Job, Any, float, JobState], Job]  # (.., ts, target state)
Rule = Callable[[State, ev.Record], State]
_ATTEMPT_EVENTS = frozenset({ev.JobPlaced, ev.RankStarted, ev.JobRunning, ev.RankExited,
                             ev.JobStopping, ev.JobEnded, ev.JobStalled,
                             ev.JobProgressed, ev.CheckpointStaged})
MAX_REPORTED = 100  # checkpoint_saved reports kept per job (with their nodes), newest


# Memory: 100k jobs repeat a few node names, commands and reasons. Every decoded
# event brings its own copies; interning them keeps one of each (values unchanged).
_intern = sys.intern
_NO_STRINGS: dict[str, str] = {}


def _shared_spec(spec: ev.JobSpec) -> ev.JobSpec:
    return _rep(spec, argv=tuple(map(_intern, spec.argv)),
                env=spec.env or _NO_STRINGS, params=spec.params or _NO_STRINGS)


def _placed(state: State, job: Job, e: ev.JobPlaced, ts: float, to: JobState) -> Job:
    _check_placement(state, job, e)
    placement = tuple(_rep(p, node=_intern(p.node),
                           gpu_uuids=tuple(map(_intern, p.gpu_uuids))) for p in e.ranks)
    return _rep(
        job, state=to, attempt=e.attempt, placement=placement,
        rdzv_host=_intern(e.rdzv_host), rdzv_port=e.rdzv_port,
        ranks=tuple(RankRun(rank=p.rank, node=p.node) for p in placement),
        started_at=ts, running_at=None, ended_at=None, exit_code=None,
        first_started_at=job.first_started_at if job.first_started_at else ts,
        resume_from=e.resume_from, reason=_intern(e.reason), waiting_reason="",
        stopping=None, retry_at=None, stalled=False, checkpoint_requested=False,
    )


def _stopping(state: State, job: Job, e: ev.JobStopping, ts: float, to: JobState) -> Job:
    if e.outcome not in ("failed", "cancelled", "retrying", "succeeded"):
        raise InvalidEvent(f"job {job.id}: unknown outcome {e.outcome!r}")
    if job.stopping is not None and e.outcome != "cancelled":
        return job  # already stopping; the first reason stands
    return _rep(job, stopping=e.outcome, reason=e.reason)


def _resumed(state: State, job: Job, e: ev.JobResumed, ts: float, to: JobState) -> Job:
    return _rep(job, state=to, spec=_shared_spec(e.spec),
                resume_from=e.resume_from,
                ended_at=None, exit_code=None, reason="resumed", stopping=None,
                no_progress_failures=0, retry_at=None)


_JOB_RULES: dict[type[ev.Event], JobRule] = {
    ev.JobWaiting: lambda s, j, e, ts, to: _rep(j, waiting_reason=_intern(e.reason)),
    ev.JobPlaced: _placed,
    ev.RankStarted: lambda s, j, e, ts, to: _rep(j, ranks=_set_rank(j, e.rank, pid=e.pid)),
    ev.JobRunning: lambda s, j, e, ts, to: _rep(j, state=to, running_at=ts),
    ev.RankExited: lambda s, j, e, ts, to: _rep(j, ranks=_set_rank(j, e.rank,
                                                                   exit_code=e.exit_code)),
    ev.JobStopping: _stopping,
    ev.JobEnded: lambda s, j, e, ts, to: _ended(j, e, ts, to),
    ev.JobCancelRequested: lambda s, j, e, ts, to: _rep(
        j, state=to, ended_at=ts, reason=e.reason, waiting_reason=""),
    ev.JobPrioritySet: lambda s, j, e, ts, to: _rep(j, priority=e.priority),
    ev.JobHeld: lambda s, j, e, ts, to: _rep(j, held=True),
    ev.JobReleased: lambda s, j, e, ts, to: _rep(j, held=False),
    ev.JobResumed: _resumed,
    ev.CheckpointRequested: lambda s, j, e, ts, to: _rep(j, checkpoint_requested=True),
    ev.CheckpointSaved: lambda s, j, e, ts, to: _rep(
        j, checkpoints=(*j.checkpoints, e.path), checkpoint_requested=False,
        reported=(*j.reported[-(MAX_REPORTED - 1):], ck.Reported(
            e.path, e.node or (j.placement[0].node if j.placement else None), e.step, ts))),
    ev.CheckpointCopied: lambda s, j, e, ts, to: _rep(j, copy_error="", central=(
        *(c for c in j.central if c.name != e.name),
        ck.Central(e.name, e.node, e.path, e.size_bytes, e.mtime, e.step))),
    ev.CheckpointCopyFailed: lambda s, j, e, ts, to: _rep(j, copy_error=e.reason),
    ev.CheckpointPruned: lambda s, j, e, ts, to: _rep(
        j, central=tuple(c for c in j.central if c.name not in e.names)),
    ev.CheckpointStaged: lambda s, j, e, ts, to: j,
    ev.JobStalled: lambda s, j, e, ts, to: _rep(j, stalled=True),
    ev.JobProgressed: lambda s, j, e, ts, to: _rep(j, stalled=False),
    ev.RankFenced: lambda s, j, e, ts, to: _rep(j, fenced=(*j.fenced, FencedRank(
        attempt=e.attempt, rank=e.rank, node=_intern(e.node), at=ts,
        pids=e.pids))[-MAX_FENCED:]),
}
assert set(_JOB_RULES) == set(_TARGETS) == set(_DOING)


def _ended(job: Job, e: ev.JobEnded, ts: float, outcome: JobState) -> Job:
    failed = outcome in (JobState.FAILED, JobState.RETRYING)
    best = job.best_step
    if e.last_step is not None and (best is None or e.last_step > best):
        best = e.last_step
    failed_nodes = job.failed_nodes
    if e.failed_node and e.failed_node not in failed_nodes:
        failed_nodes = (*failed_nodes, e.failed_node)
    return _rep(
        job, state=outcome, ended_at=ts, exit_code=e.exit_code, reason=_intern(e.reason),
        stopping=None, best_step=best, failed_nodes=failed_nodes,
        failures=job.failures + failed,
        # An attempt lost to the cluster (e.cluster_fault) leaves the count as it was.
        no_progress_failures=(0 if e.made_progress else job.no_progress_failures
                              + (0 if e.cluster_fault else 1))
        if failed else job.no_progress_failures,
        retry_at=e.retry_at if outcome is JobState.RETRYING else None,
        resume_from=e.resume_from if e.resume_from is not None else job.resume_from,
    )


def _set_rank(job: Job, rank: int, **changes: Any) -> tuple[RankRun, ...]:
    ranks = job.ranks
    # Ranks are stored in placement order, which is almost always rank order.
    i = rank if 0 <= rank < len(ranks) and ranks[rank].rank == rank else next(
        (k for k, r in enumerate(ranks) if r.rank == rank), -1)
    if i < 0:
        raise InvalidEvent(f"job {job.id} has no rank {rank}")
    return (*ranks[:i], _rep(ranks[i], **changes), *ranks[i + 1:])


def _check_placement(state: State, job: Job, e: ev.JobPlaced) -> None:
    """Never over-commit: every GPU placed must exist, be free, and the gang be whole."""
    if job.held:
        raise InvalidEvent(f"job {job.id} is held")
    if len(e.ranks) != job.spec.nodes:
        raise InvalidEvent(f"job {job.id} needs {job.spec.nodes} nodes, placed on "
                           f"{len(e.ranks)}")
    if sorted(p.rank for p in e.ranks) != list(range(len(e.ranks))):
        raise InvalidEvent(f"job {job.id}: ranks must be 0..{len(e.ranks) - 1}")
    if len({p.node for p in e.ranks}) != len(e.ranks):
        raise InvalidEvent(f"job {job.id}: two ranks on one node")
    held = state.gpus_held
    for p in e.ranks:
        node = state.node(p.node)
        have = {g.index for g in node.gpus}
        if len(p.gpus) != job.spec.gpus_per_node:
            raise InvalidEvent(f"job {job.id}: rank {p.rank} got {len(p.gpus)} GPUs, "
                               f"needs {job.spec.gpus_per_node}")
        if len(set(p.gpus)) != len(p.gpus):
            raise InvalidEvent(f"job {job.id}: rank {p.rank} got one GPU twice")
        for g in p.gpus:
            if g not in have:
                raise InvalidEvent(f"node {p.node} has no GPU {g}")
            if (p.node, g) in held:
                raise InvalidEvent(f"GPU {g} on {p.node} is held by {held[(p.node, g)]}")


def _submitted(state: State, record: ev.Record) -> State:
    e = record.event
    assert isinstance(e, ev.JobSubmitted)
    if e.job in state.jobs:
        raise InvalidEvent(f"a job named {e.job!r} already exists")
    if not RECORDED_NAME_RE.fullmatch(e.job):  # new names are checked where they come in
        raise InvalidEvent(f"invalid job name {e.job[:60]!r}")
    job = Job(id=e.job, spec=_shared_spec(e.spec), owner=_intern(record.actor.user),
              uid=record.actor.uid,
              priority=e.priority, held=e.held, submit_seq=record.seq,
              submitted_at=record.ts, request_id=e.request_id)
    # A new job is queued: it joins the active index and holds no GPU (_put_job's
    # rules, written out once for the event submitted most often).
    requests = state.requests.set(e.request_id, e.job) if e.request_id else state.requests
    return _rep(state, jobs=state.jobs.set(e.job, job),
                active=state.active.set(e.job, record.seq), requests=requests)


def _sweep(state: State, record: ev.Record) -> State:
    e = record.event
    assert isinstance(e, ev.SweepCreated)
    if e.sweep in state.sweeps:
        raise InvalidEvent(f"a sweep named {e.sweep!r} already exists")
    if not RECORDED_NAME_RE.fullmatch(e.sweep):
        raise InvalidEvent(f"invalid sweep name {e.sweep[:60]!r}")
    for j in e.jobs:
        state.job(j)
    sweep = Sweep(name=e.sweep, owner=record.actor.user, jobs=e.jobs, params=e.params,
                  max_parallel=e.max_parallel, created_at=record.ts)
    return _rep(state, sweeps=state.sweeps.set(e.sweep, sweep))


def _node_added(state: State, record: ev.Record) -> State:
    spec = record.event.node  # type: ignore[attr-defined]
    if spec.name in state.nodes:
        raise InvalidEvent(f"node {spec.name!r} already exists")
    return _put_node(state, Node(spec=spec, health_since=record.ts))


def _node_removed(state: State, record: ev.Record) -> State:
    name = record.event.node  # type: ignore[attr-defined]
    state.node(name)
    busy = state.jobs_on(name)
    if busy:
        raise InvalidEvent(f"node {name} runs {', '.join(busy)}: drain it and wait "
                           f"for the jobs to end before removing it")
    return _rep(state, nodes=state.nodes.delete(name))


def _health(state: State, record: ev.Record) -> State:
    e = record.event
    assert isinstance(e, ev.NodeHealthChanged)
    node = state.node(e.node)
    try:
        health = NodeHealth(e.health)
    except ValueError:
        raise InvalidEvent(f"unknown node health {e.health!r}") from None
    return _put_node(state, _rep(node, health=health, score=e.score,
                                 health_reason=e.reason, health_since=record.ts))


def _alert(state: State, record: ev.Record) -> State:
    e = record.event
    assert isinstance(e, ev.AlertRaised)
    node = state.node(e.node)
    alert = Alert(alert=e.alert, severity=e.severity, message=e.message, since=record.ts)
    kept = tuple(a for a in node.alerts if a.alert != e.alert)
    return _put_node(state, _rep(node, alerts=(*kept, alert)))


def _node_change(**fixed: Any) -> Rule:
    def rule(state: State, record: ev.Record) -> State:
        e = record.event
        node = state.node(e.node)  # type: ignore[attr-defined]
        changes = {k: (getattr(e, v[1:]) if isinstance(v, str) and v.startswith("$") else v)
                   for k, v in fixed.items()}
        return _put_node(state, _rep(node, **changes))
    return rule


def _alert_cleared(state: State, record: ev.Record) -> State:
    e = record.event
    assert isinstance(e, ev.AlertCleared)
    node = state.node(e.node)
    return _put_node(state, _rep(node, alerts=tuple(a for a in node.alerts
                                                    if a.alert != e.alert)))


_RULES: dict[type[ev.Event], Rule] = {
    ev.JobSubmitted: _submitted,
    ev.SweepCreated: _sweep,
    ev.NodeAdded: _node_added,
    ev.NodeUpdated: lambda s, r: _put_node(s, _rep(s.node(r.event.node.name),  # type: ignore[attr-defined]
                                                   spec=r.event.node)),  # type: ignore[attr-defined]
    ev.NodeRemoved: _node_removed,
    ev.NodeInventoried: _node_change(inventory="$gpus", inventory_mismatch="$mismatch"),
    ev.NodeHealthChanged: _health,
    ev.NodeDrained: _node_change(drained=True, drain_reason="$reason"),
    ev.NodeUndrained: _node_change(drained=False, drain_reason=""),
    ev.AlertRaised: _alert,
    ev.AlertCleared: _alert_cleared,
    ev.DaemonStarted: lambda s, r: _rep(s, started_at=r.ts),
}
assert set(_RULES) | set(_JOB_RULES) == set(ev.EVENT_TYPES.values())

# type -> (rule, source state -> target (None: not a job event), the attempt it
# must name relative to the job's current one (None: names none; JobPlaced: +1)).
_DISPATCH: dict[type[ev.Event], tuple[Callable[..., Any], dict[JobState, Target] | None,
                                      int | None]] = {
    **{t: (r, None, None) for t, r in _RULES.items()},
    **{t: (r, _TARGETS[t], (1 if t is ev.JobPlaced else 0) if t in _ATTEMPT_EVENTS else None)
       for t, r in _JOB_RULES.items()},
}


def _put_node(state: State, node: Node) -> State:
    return msgspec.structs.replace(state, nodes=state.nodes.set(node.name, node))


# ---- snapshots -------------------------------------------------------------

# 2: the state-only structs (Job, RankRun, Node, Alert, Sweep) as MessagePack
# arrays, not maps, in lists, not keyed maps (each name is read once, from the
# object); the request index is rebuilt from the jobs. Snapshots are ~60 % smaller
# and read ~30 % faster than in version 1. A snapshot of another version is not
# read; start-up replays the log instead (a snapshot is a cache of the log).
STATE_VERSION = 2


class _Snapshot(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    version: int
    seq: int
    nodes: list[Node]
    jobs: list[Job]
    sweeps: list[Sweep]
    started_at: float | None
    tally: tl.Tally = tl.EMPTY  # absent from older snapshots: counters start again at 0


class _SnapshotVersion(msgspec.Struct):
    version: int


# MessagePack, not JSON: snapshots are a cache of the log (which stays plain JSONL),
# and start-up reads them ~3x faster in this form.
_snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot)
_version_decoder = msgspec.msgpack.Decoder(_SnapshotVersion)


def to_snapshot(state: State) -> bytes:
    """State as bytes for a snapshot file; ``from_snapshot`` reads it back."""
    snap = _Snapshot(version=STATE_VERSION, seq=state.seq, nodes=list(state.nodes.values()),
                     jobs=list(state.jobs.values()), sweeps=list(state.sweeps.values()),
                     started_at=state.started_at, tally=state.tally)
    return msgspec.msgpack.encode(snap)


def from_snapshot(data: bytes) -> State:
    """Inverse of ``to_snapshot``; raises ValueError for another state version or bad data."""
    try:
        snap = _snapshot_decoder.decode(data)
    except msgspec.DecodeError as exc:
        try:  # another version's layout fails to decode: say which version it is
            version = _version_decoder.decode(data).version
        except msgspec.DecodeError:
            version = STATE_VERSION
        if version != STATE_VERSION:
            raise ValueError(f"snapshot state version {version}, this ugrod reads "
                             f"{STATE_VERSION}") from None
        raise ValueError(f"unreadable snapshot: {exc}") from None
    if snap.version != STATE_VERSION:
        raise ValueError(f"snapshot state version {snap.version}, this ugrod reads "
                         f"{STATE_VERSION}")
    jobs: dict[str, Job] = {}
    requests: dict[str, Job] = {}
    active: dict[str, int] = {}
    held: dict[tuple[str, int], str] = {}
    for j in snap.jobs:
        jobs[j.id] = j
        if j.request_id is not None:
            # The submit recorded last wins a request id, as in _submitted.
            prior = requests.get(j.request_id)
            if prior is None or prior.submit_seq < j.submit_seq:
                requests[j.request_id] = j
        if j.state not in TERMINAL:
            active[j.id] = j.submit_seq
            if j.state in ACTIVE:
                for key in _gpus_of(j):
                    held[key] = j.id
    if len(jobs) != len(snap.jobs):
        raise ValueError("unreadable snapshot: a job name appears twice")
    return State(seq=snap.seq, nodes=immutables.Map({n.name: n for n in snap.nodes}),
                 jobs=immutables.Map(jobs), active=immutables.Map(active),
                 requests=immutables.Map({r: j.id for r, j in requests.items()}),
                 sweeps=immutables.Map({w.name: w for w in snap.sweeps}),
                 gpus_held=immutables.Map(held),
                 n_running=sum(1 for j in active if jobs[j].state in ACTIVE),
                 started_at=snap.started_at, tally=snap.tally)
