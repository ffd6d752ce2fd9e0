"""Cluster state as a pure fold over events: ``apply(state, record) -> state``.

No I/O, no clock, no randomness: every time comes from the record. State is
immutable (msgspec frozen Structs in ``immutables.Map``s), so a rejected event
leaves the old state untouched and replay is byte-for-byte repeatable.

Job lifecycle (``JOB_MOVES`` is the table)::

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

from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Any

import immutables
import msgspec

from ugrod import events as ev


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

# Which job states each job event may apply to. Events not listed create jobs.
JOB_MOVES: dict[type[ev.Event], frozenset[JobState]] = {
    ev.JobWaiting: WAITING,
    ev.JobPlaced: WAITING,
    ev.RankStarted: ACTIVE,
    ev.JobRunning: frozenset({JobState.STARTING}),
    ev.RankExited: ACTIVE,
    ev.JobStopping: ACTIVE,
    ev.JobEnded: ACTIVE,
    ev.JobCancelRequested: WAITING,
    ev.JobPrioritySet: WAITING | ACTIVE,
    ev.JobHeld: WAITING,
    ev.JobReleased: WAITING,
    ev.JobResumed: frozenset({JobState.FAILED, JobState.CANCELLED}),
    ev.CheckpointRequested: frozenset({JobState.RUNNING}),
    ev.CheckpointSaved: frozenset(JobState),
    ev.JobStalled: frozenset({JobState.RUNNING}),
}


class RankRun(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    node: str
    pid: int | None = None
    exit_code: int | None = None


class Job(msgspec.Struct, frozen=True, kw_only=True):
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

    @property
    def name(self) -> str:
        return self.id

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(p.node for p in self.placement)

    @property
    def gpu_count(self) -> int:
        return sum(len(p.gpus) for p in self.placement)


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    alert: str
    severity: str
    message: str
    since: float


class Node(msgspec.Struct, frozen=True, kw_only=True):
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


class Sweep(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    owner: str
    jobs: tuple[str, ...]
    params: dict[str, tuple[str, ...]]
    max_parallel: int = 0
    created_at: float = 0.0


class State(msgspec.Struct, frozen=True, kw_only=True):
    seq: int = 0
    nodes: immutables.Map[str, Node] = immutables.Map()
    jobs: immutables.Map[str, Job] = immutables.Map()
    active: immutables.Map[str, int] = immutables.Map()  # non-terminal job -> submit_seq
    requests: immutables.Map[str, str] = immutables.Map()  # client request id -> job
    sweeps: immutables.Map[str, Sweep] = immutables.Map()
    started_at: float | None = None

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
        held: dict[tuple[str, int], str] = {}
        for job_id in self.active:
            job = self.jobs[job_id]
            if job.state in ACTIVE:
                for p in job.placement:
                    for g in p.gpus:
                        held[(p.node, g)] = job_id
        return held

    def jobs_on(self, node: str) -> list[str]:
        return sorted(
            j for j in self.active
            if self.jobs[j].state in ACTIVE and node in self.jobs[j].nodes
        )


def apply(state: State, record: ev.Record) -> State:
    """The one rule per event. Raises InvalidEvent and leaves ``state`` as it was."""
    if record.seq != state.seq + 1:
        raise InvalidEvent(f"event seq {record.seq} does not follow {state.seq}")
    e, ts = record.event, record.ts
    allowed = JOB_MOVES.get(type(e))
    if allowed is not None:
        job = state.job(e.job)  # type: ignore[attr-defined]
        if job.state not in allowed:
            raise InvalidEvent(f"job {job.id} is {job.state}: cannot apply {e.kind}")
        if isinstance(e, ev.JobPlaced | ev.RankStarted | ev.JobRunning | ev.RankExited
                      | ev.JobStopping | ev.JobEnded | ev.JobStalled):
            want = job.attempt + 1 if isinstance(e, ev.JobPlaced) else job.attempt
            if e.attempt != want:
                raise InvalidEvent(f"job {job.id}: event for attempt {e.attempt}, "
                                   f"current attempt is {job.attempt}")
        new_job = _job_rule(state, job, e, ts)
        state = _put_job(state, new_job)
    else:
        state = _other_rule(state, record)
    return msgspec.structs.replace(state, seq=record.seq)


def replay(state: State, records: Iterable[ev.Record]) -> State:
    """fold(apply, records): kept as the one name tests and tools call."""
    for r in records:
        state = apply(state, r)
    return state


def _put_job(state: State, job: Job) -> State:
    active = state.active
    if job.state in TERMINAL:
        if job.id in active:
            active = active.delete(job.id)
    elif job.id not in active:
        active = active.set(job.id, job.submit_seq)
    return msgspec.structs.replace(state, jobs=state.jobs.set(job.id, job), active=active)


def _job_rule(state: State, job: Job, e: ev.Event, ts: float) -> Job:
    rep = msgspec.structs.replace
    match e:
        case ev.JobWaiting(reason=reason):
            return rep(job, waiting_reason=reason)
        case ev.JobPlaced():
            _check_placement(state, job, e)
            return rep(
                job, state=JobState.STARTING, attempt=e.attempt, placement=e.ranks,
                rdzv_host=e.rdzv_host, rdzv_port=e.rdzv_port,
                ranks=tuple(RankRun(rank=p.rank, node=p.node) for p in e.ranks),
                started_at=ts, running_at=None, ended_at=None, exit_code=None,
                first_started_at=job.first_started_at if job.first_started_at else ts,
                resume_from=e.resume_from, reason=e.reason, waiting_reason="",
                stopping=None, retry_at=None, stalled=False, checkpoint_requested=False,
            )
        case ev.RankStarted(rank=rank, pid=pid):
            return rep(job, ranks=_set_rank(job, rank, pid=pid))
        case ev.JobRunning():
            return rep(job, state=JobState.RUNNING, running_at=ts)
        case ev.RankExited(rank=rank, exit_code=code):
            return rep(job, ranks=_set_rank(job, rank, exit_code=code))
        case ev.JobStopping(outcome=outcome, reason=reason):
            if outcome not in ("failed", "cancelled", "retrying", "succeeded"):
                raise InvalidEvent(f"job {job.id}: unknown outcome {outcome!r}")
            if job.stopping is not None and outcome != "cancelled":
                return job  # already stopping; the first reason stands
            return rep(job, stopping=outcome, reason=reason)
        case ev.JobEnded():
            return _ended(job, e, ts)
        case ev.JobCancelRequested(reason=reason):
            return rep(job, state=JobState.CANCELLED, ended_at=ts, reason=reason,
                       waiting_reason="")
        case ev.JobPrioritySet(priority=p):
            return rep(job, priority=p)
        case ev.JobHeld():
            return rep(job, held=True)
        case ev.JobReleased():
            return rep(job, held=False)
        case ev.JobResumed(spec=spec, resume_from=resume_from):
            return rep(job, state=JobState.QUEUED, spec=spec, resume_from=resume_from,
                       ended_at=None, exit_code=None, reason="resumed", stopping=None,
                       no_progress_failures=0, retry_at=None)
        case ev.CheckpointRequested():
            return rep(job, checkpoint_requested=True)
        case ev.CheckpointSaved(path=path):
            return rep(job, checkpoints=(*job.checkpoints, path), checkpoint_requested=False)
        case ev.JobStalled():
            return rep(job, stalled=True)
    raise InvalidEvent(f"no rule for {e.kind}")


def _ended(job: Job, e: ev.JobEnded, ts: float) -> Job:
    outcome = ENDINGS.get(e.outcome)
    if outcome is None:
        raise InvalidEvent(f"job {job.id}: unknown outcome {e.outcome!r}")
    failed = outcome in (JobState.FAILED, JobState.RETRYING)
    best = job.best_step
    if e.last_step is not None and (best is None or e.last_step > best):
        best = e.last_step
    failed_nodes = job.failed_nodes
    if e.failed_node and e.failed_node not in failed_nodes:
        failed_nodes = (*failed_nodes, e.failed_node)
    return msgspec.structs.replace(
        job, state=outcome, ended_at=ts, exit_code=e.exit_code, reason=e.reason,
        stopping=None, best_step=best, failed_nodes=failed_nodes,
        failures=job.failures + failed,
        no_progress_failures=(0 if e.made_progress else job.no_progress_failures + 1)
        if failed else job.no_progress_failures,
        retry_at=e.retry_at if outcome is JobState.RETRYING else None,
        resume_from=e.resume_from if e.resume_from is not None else job.resume_from,
    )


def _set_rank(job: Job, rank: int, **changes: Any) -> tuple[RankRun, ...]:
    if not any(r.rank == rank for r in job.ranks):
        raise InvalidEvent(f"job {job.id} has no rank {rank}")
    return tuple(msgspec.structs.replace(r, **changes) if r.rank == rank else r
                 for r in job.ranks)


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
    held = state.allocations()
    for p in e.ranks:
        node = state.node(p.node)
        have = {g.index for g in node.gpus}
        if len(p.gpus) != job.spec.gpus_per_node:
            raise InvalidEvent(f"job {job.id}: rank {p.rank} got {len(p.gpus)} GPUs, "
                               f"needs {job.spec.gpus_per_node}")
        for g in p.gpus:
            if g not in have:
                raise InvalidEvent(f"node {p.node} has no GPU {g}")
            if (p.node, g) in held:
                raise InvalidEvent(f"GPU {g} on {p.node} is held by {held[(p.node, g)]}")


def _other_rule(state: State, record: ev.Record) -> State:
    e, ts, rep = record.event, record.ts, msgspec.structs.replace
    match e:
        case ev.JobSubmitted(job=job_id, spec=spec):
            if job_id in state.jobs:
                raise InvalidEvent(f"a job named {job_id!r} already exists")
            job = Job(id=job_id, spec=spec, owner=record.actor.user, uid=record.actor.uid,
                      priority=e.priority, held=e.held, submit_seq=record.seq,
                      submitted_at=ts, request_id=e.request_id)
            state = _put_job(state, job)
            if e.request_id:
                state = rep(state, requests=state.requests.set(e.request_id, job_id))
            return state
        case ev.SweepCreated(sweep=name):
            if name in state.sweeps:
                raise InvalidEvent(f"a sweep named {name!r} already exists")
            for j in e.jobs:
                state.job(j)
            sweep = Sweep(name=name, owner=record.actor.user, jobs=e.jobs, params=e.params,
                          max_parallel=e.max_parallel, created_at=ts)
            return rep(state, sweeps=state.sweeps.set(name, sweep))
        case ev.NodeAdded(node=spec):
            if spec.name in state.nodes:
                raise InvalidEvent(f"node {spec.name!r} already exists")
            return _put_node(state, Node(spec=spec, health_since=ts))
        case ev.NodeUpdated(node=spec):
            return _put_node(state, rep(state.node(spec.name), spec=spec))
        case ev.NodeRemoved(node=name):
            state.node(name)
            busy = state.jobs_on(name)
            if busy:
                raise InvalidEvent(f"node {name} runs {', '.join(busy)}: drain it and wait "
                                   f"for the jobs to end before removing it")
            return rep(state, nodes=state.nodes.delete(name))
        case ev.NodeInventoried(node=name, gpus=gpus, mismatch=mismatch):
            return _put_node(state, rep(state.node(name), inventory=gpus,
                                        inventory_mismatch=mismatch))
        case ev.NodeHealthChanged(node=name):
            node = state.node(name)
            try:
                health = NodeHealth(e.health)
            except ValueError:
                raise InvalidEvent(f"unknown node health {e.health!r}") from None
            return _put_node(state, rep(node, health=health, score=e.score,
                                        health_reason=e.reason, health_since=ts))
        case ev.NodeDrained(node=name, reason=reason):
            return _put_node(state, rep(state.node(name), drained=True, drain_reason=reason))
        case ev.NodeUndrained(node=name):
            return _put_node(state, rep(state.node(name), drained=False, drain_reason=""))
        case ev.AlertRaised(node=name):
            node = state.node(name)
            alert = Alert(alert=e.alert, severity=e.severity, message=e.message, since=ts)
            kept = tuple(a for a in node.alerts if a.alert != e.alert)
            return _put_node(state, rep(node, alerts=(*kept, alert)))
        case ev.AlertCleared(node=name, alert=key):
            node = state.node(name)
            return _put_node(state, rep(node, alerts=tuple(a for a in node.alerts
                                                           if a.alert != key)))
        case ev.DaemonStarted():
            return rep(state, started_at=ts)
    raise InvalidEvent(f"no rule for {e.kind}")


def _put_node(state: State, node: Node) -> State:
    return msgspec.structs.replace(state, nodes=state.nodes.set(node.name, node))


# ---- snapshots -------------------------------------------------------------

STATE_VERSION = 1


class _Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    seq: int
    nodes: dict[str, Node]
    jobs: dict[str, Job]
    requests: dict[str, str]
    sweeps: dict[str, Sweep]
    started_at: float | None


_snapshot_decoder = msgspec.json.Decoder(_Snapshot)


def to_snapshot(state: State) -> bytes:
    """State as bytes for a snapshot file; ``from_snapshot`` reads it back."""
    snap = _Snapshot(version=STATE_VERSION, seq=state.seq, nodes=dict(state.nodes),
                     jobs=dict(state.jobs), requests=dict(state.requests),
                     sweeps=dict(state.sweeps), started_at=state.started_at)
    return msgspec.json.encode(snap)


def from_snapshot(data: bytes) -> State:
    """Inverse of ``to_snapshot``; raises ValueError for another state version or bad data."""
    try:
        snap = _snapshot_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"unreadable snapshot: {exc}") from None
    if snap.version != STATE_VERSION:
        raise ValueError(f"snapshot state version {snap.version}, this ugrod reads "
                         f"{STATE_VERSION}")
    jobs = immutables.Map(snap.jobs)
    active = immutables.Map({j.id: j.submit_seq for j in snap.jobs.values()
                             if j.state not in TERMINAL})
    return State(seq=snap.seq, nodes=immutables.Map(snap.nodes), jobs=jobs, active=active,
                 requests=immutables.Map(snap.requests), sweeps=immutables.Map(snap.sweeps),
                 started_at=snap.started_at)
