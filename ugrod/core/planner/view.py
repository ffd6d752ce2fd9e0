"""One round's view of the cluster: each node's GPUs (free, held until when, by whom,
reserved from when), each shape's candidate nodes, and the running counts against limits.

Built once a round from the state (``load``) and updated as the round places and
reserves; nothing of it outlives the round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from operator import attrgetter

import msgspec

from ugrod.core import events as ev
from ugrod.core.limits import UserLimits, limits_for
from ugrod.core.planner.shapes import (
    Gpu,
    RunTimes,
    Shape,
    check_fits,
    lower_bound,
    sorted_nodes,
    typical_runtimes,
)
from ugrod.core.planner.words import clock_words
from ugrod.core.state import Job, JobState, Node, NodeHealth, State
from ugrod.core.vram import nominal_bytes

INF = math.inf


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """GPUs held back for a waiting job; ``at`` is None when their release time is unknown."""

    at: float | None
    gpus: tuple[tuple[str, int], ...]


class NodeGpus:
    """A node's GPUs during one round: which are free, until when they are busy, who holds them."""

    __slots__ = ("avail", "degraded", "free", "gpus", "held_by", "labels", "name", "node", "pref",
                 "res_at", "res_by", "sched", "until", "vrams")

    def __init__(self, node: Node, now: float) -> None:
        self.node = node
        self.name = node.name
        self.labels = frozenset(node.spec.labels)
        self.sched = node.schedulable
        self.degraded = node.health is NodeHealth.DEGRADED
        self.pref = node.spec.rank
        # Nominal sizes (ugrod/core/vram.py): a 12 GB card reporting 12282 MiB is a 12 GB card.
        self.gpus: list[Gpu] = sorted((nominal_bytes(g.vram_bytes), g.index, g.uuid)
                                      for g in node.gpus)
        self.vrams = [g[0] for g in self.gpus]
        self.free: list[Gpu] = []
        self.held_by: dict[int, str] = {}  # GPU index -> job holding it
        self.until: dict[int, float] = {}  # GPU index -> when its holder is expected to end
        self.avail: dict[int, float] = {g[1]: now for g in self.gpus}  # free for good from
        self.res_at: dict[int, float] = {}  # GPU index -> start of the first reservation on it
        self.res_by: dict[int, str] = {}


class ShapeInfo:
    __slots__ = ("cand", "fail_end", "full", "never", "reason", "shape", "static")

    def __init__(self, shape: Shape, static: list[tuple[int, str, NodeGpus]],
                 never: str | None) -> None:
        self.shape = shape
        self.static = static  # every node that could ever take it, by (VRAM given up, name)
        self.cand = [c for c in static if c[2].sched]  # pruned as nodes fill up
        self.fail_end: float | None = None  # jobs ending at or after this did not fit now
        self.full = False  # too few nodes have enough free GPUs, reservations aside
        self.reason: str | None = None
        self.never = never


class Quota:
    """Running counts against a cap, plus what reservations will take when they start."""

    __slots__ = ("gpus", "jobs", "max_gpus", "max_jobs", "reserved")

    def __init__(self, max_jobs: int | None, max_gpus: int | None) -> None:
        self.max_jobs, self.max_gpus = max_jobs, max_gpus
        self.jobs = self.gpus = 0
        self.reserved: list[tuple[float, int, str]] = []  # (from, gpus, job)

    def over(self, gpus: int, end: float) -> tuple[int, int, list[str]] | None:
        """(jobs, gpus, reservers) in use at once if a job ending at ``end`` starts now, if over."""
        held = [r for r in self.reserved if r[0] < end]
        jobs = self.jobs + 1 + len(held)
        total = self.gpus + gpus + sum(r[1] for r in held)
        if (self.max_jobs is not None and jobs > self.max_jobs) or (
                self.max_gpus is not None and total > self.max_gpus):
            return jobs, total, [r[2] for r in held]
        return None


class RoundView:
    """The cluster as one round sees it; ``Reasons`` and ``Round`` build on it."""

    def __init__(self, state: State, now: float, backfill: bool,
                 user_limits: Mapping[str, UserLimits], port_for: Callable[[str, int], int] | None,
                 runtimes: RunTimes | None) -> None:
        self.state, self.now, self.backfill = state, now, backfill
        self.user_limits, self.port_for, self._runtimes = user_limits, port_for, runtimes
        self.nodes = [NodeGpus(n, now) for n in sorted_nodes(state)]
        self.by_name = {n.name: n for n in self.nodes}
        self.shapes: dict[Shape, ShapeInfo] = {}
        self.users: dict[str, Quota] = {}
        self.sweeps: dict[str, Quota] = {}
        self.placements: list[ev.JobPlaced] = []
        self.waiting: dict[str, str] = {}
        self.estimates: dict[str, float] = {}
        self.reservations: dict[str, Reservation] = {}
        self.unrunnable: dict[str, str] = {}
        self.stopping: set[str] = set()
        self.clocks: dict[float, str] = {}
        self.free_total = 0  # free GPUs on schedulable nodes not held back indefinitely
        self.finite = 0  # GPUs whose "free for good" time is known

    # -- setup --

    def runtime(self, job: Job) -> float | None:
        if job.spec.expected_runtime_s is not None:
            return job.spec.expected_runtime_s
        if self._runtimes is None:  # no finished job yet: nothing to learn from
            state = self.state
            self._runtimes = typical_runtimes(state) if len(state.jobs) > len(state.active) else {}
        return self._runtimes.get((job.owner, job.spec.argv))

    def expected_end(self, job: Job) -> float:
        """When a job holding GPUs should end (INF if unknown); may be past for an overrun."""
        rt = self.runtime(job)
        if rt is None:
            return INF
        start = job.running_at if job.running_at is not None else job.started_at
        return (start if start is not None else self.now) + rt

    def quota(self, table: dict[str, Quota], key: str, max_jobs: int | None,
              max_gpus: int | None) -> Quota:
        q = table.get(key)
        if q is None:
            q = table[key] = Quota(max_jobs, max_gpus)
        return q

    def user_quota(self, user: str) -> Quota:
        q = self.users.get(user)
        if q is None:
            lim = limits_for(self.user_limits, user)
            q = self.users[user] = Quota(lim.max_jobs, lim.max_gpus)
        return q

    def sweep_quota(self, name: str) -> Quota | None:
        sweep = self.state.sweeps.get(name)
        if sweep is None or sweep.max_parallel <= 0:
            return None
        return self.quota(self.sweeps, name, sweep.max_parallel, None)

    def load(self) -> list[Job]:
        """Mark held GPUs, count usage per user and sweep; return the waiting jobs in order."""
        state, waiting, jobs = self.state, [], self.state.jobs
        starting, running = JobState.STARTING, JobState.RUNNING
        for job_id in state.active:
            job = jobs[job_id]
            if job.state is running or job.state is starting:  # identity: no enum hashing
                # Reasons quote the expected end as is (stable text across rounds); the
                # reservation arithmetic never lets a release happen before now.
                until = self.expected_end(job) if job.stopping is None else -INF
                end = max(self.now, until)
                if job.stopping is not None:
                    self.stopping.add(job_id)
                for p in job.placement:
                    nd = self.by_name.get(p.node)
                    if nd is None:
                        continue
                    for g in p.gpus:
                        if g in nd.avail:
                            nd.held_by[g], nd.until[g], nd.avail[g] = job_id, until, end
                uq = self.user_quota(job.owner)
                uq.jobs += 1
                uq.gpus += job.gpu_count
                if job.spec.sweep is not None and (sq := self.sweep_quota(job.spec.sweep)):
                    sq.jobs += 1
            else:
                waiting.append(job)
        for nd in self.nodes:
            nd.free = [g for g in nd.gpus if g[1] not in nd.held_by]
            if nd.sched:
                self.free_total += len(nd.free)
            self.finite += sum(1 for t in nd.avail.values() if t < INF)
        waiting.sort(key=attrgetter("submit_seq"))
        waiting.sort(key=attrgetter("priority"), reverse=True)  # stable: FIFO within a priority
        return waiting

    def shape_info(self, shape: Shape) -> ShapeInfo:
        info = self.shapes.get(shape)
        if info is None:
            static = []
            for nd in self.nodes:
                lb = lower_bound(shape, nd.name, nd.labels, nd.vrams)
                if lb is not None:
                    static.append((lb, nd.name, nd))
            static.sort(key=lambda c: (c[0], c[1]))
            never = None
            if len(static) < shape[1]:
                spec = ev.JobSpec(argv=(), gpus_per_node=shape[0], nodes=shape[1],
                                  min_vram_bytes=shape[2], labels_required=shape[3],
                                  labels_avoided=shape[4], node_names=shape[5])
                never = check_fits(self.state, spec)
            info = self.shapes[shape] = ShapeInfo(shape, static, never)
        return info

    def set_avail(self, nd: NodeGpus, idx: int, t: float) -> None:
        self.finite += (t < INF) - (nd.avail[idx] < INF)
        nd.avail[idx] = t

    def holder(self, job_id: str) -> str:
        return f"{job_id} (stopping)" if job_id in self.stopping else job_id

    def clock(self, t: float) -> str:
        text = self.clocks.get(t)
        if text is None:
            text = self.clocks[t] = clock_words(t, self.now)
        return text
