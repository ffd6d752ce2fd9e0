"""Pure placement: which waiting jobs start now, where, and why every other one waits.

``plan(state, now)`` reads the state and returns decisions; it does no I/O,
reads no clock, keeps nothing between calls and never mutates its input, so
the same state and ``now`` always give the same plan. ``check_fits`` answers
at submit time whether a job could ever run on the cluster as configured.

The rules, and why each exists:

- **Order** is priority (high first), then submission: users asked for true
  FIFO with priority. Held jobs, jobs in retry backoff, jobs whose ``after``
  dependencies have not succeeded and jobs over a user or sweep limit are
  passed over without blocking anyone behind them.
- **Gang**: a job takes ``spec.nodes`` distinct nodes at once or none, one
  rank per node; half a gang only holds GPUs while it waits for the rest.
- **Smallest GPUs that fit**: on each node the job takes the smallest free
  GPUs with enough VRAM, and nodes are ranked by the VRAM they would give up,
  so the 12 GB card stays free for the job that needs it. Ties go to nodes
  the job has not failed on, then healthy before degraded, then by name.
- **Never over-commit**: GPUs held by starting/running/stopping jobs and GPUs
  placed earlier in the same round are taken.
- **Conservative backfill**: a job that cannot start now gets a reservation
  (up to ``MAX_RESERVATIONS`` a round): the earliest time enough GPUs free
  up, from running jobs' expected ends, and which GPUs it will take then.
  When that time is unknown the GPUs it waits for are held back
  indefinitely. A later job may start now only on GPUs no reservation holds,
  or on reserved GPUs if it is known to end before the reservation starts, so
  backfill can never delay a job ahead of it.
- **Speed**: the free GPUs of every node are computed once a round; each
  distinct job shape keeps its candidate nodes sorted by the VRAM they would
  give up and drops nodes as they fill; a shape that did not fit is not tried
  again for jobs that would run as long or longer; waiting reasons are
  cached per shape.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from types import MappingProxyType

import msgspec

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core.limits import UserLimits, limits_for
from ugrod.core.state import Job, JobState, Node, NodeHealth, State
from ugrod.core.vram import nominal_bytes

INF = math.inf
_ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
MAX_RESERVATIONS = 16  # blocked jobs that get a reservation each round (each costs O(GPUs))
_GIB = 1 << 30

RunTimes = Mapping[tuple[str, tuple[str, ...]], float]
"""(owner, argv) -> typical run time in seconds of that owner's succeeded runs of argv."""


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """GPUs held back for a waiting job; ``at`` is None when their release time is unknown."""

    at: float | None
    gpus: tuple[tuple[str, int], ...]


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """One round's decisions. ``order``: every waiting job, queue order (placed ones included)."""

    placements: tuple[ev.JobPlaced, ...] = ()
    waiting: dict[str, str] = {}
    estimates: dict[str, float] = {}
    reservations: dict[str, Reservation] = {}
    unrunnable: dict[str, str] = {}  # waiting jobs that can never run (a dependency failed)
    order: tuple[str, ...] = ()


_NO_LIMITS: Mapping[str, UserLimits] = MappingProxyType({})

Gpu = tuple[int, int, str]  # (nominal vram_bytes, index, uuid): sorts smallest card first
Shape = tuple[int, int, int, tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def plan(
    state: State,
    now: float,
    *,
    backfill: bool = True,
    user_limits: Mapping[str, UserLimits] = _NO_LIMITS,
    port_for: Callable[[str, int], int] | None = None,
    runtimes: RunTimes | None = None,
) -> Plan:
    """Decide which waiting jobs start now and where; say why each other one waits.

    ``user_limits`` maps a user (or ``"*"``, everyone else) to their caps.
    ``port_for(rank0_node, attempt)``, when given, picks the rendezvous port;
    otherwise it is left 0 for the daemon to reserve. ``runtimes`` is
    ``typical_runtimes(state)``, computed here when needed and not given.
    """
    return _Round(state, now, backfill, user_limits, port_for, runtimes).run()


def check_fits(state: State, spec: ev.JobSpec) -> str | None:
    """None if ``spec`` could run on the configured cluster when idle, else why not in words."""
    if spec.nodes < 1:
        return "a job needs at least 1 node"
    if spec.gpus_per_node < 0:
        return "gpus per node cannot be negative"
    missing = sorted({n for n in spec.node_names if n not in state.nodes})
    if missing:
        if len(missing) == 1:
            return f"needs node {missing[0]}, which is not in the cluster"
        return f"needs nodes {_and(missing)}, which are not in the cluster"
    named = set(spec.node_names)
    if named and len(named) < spec.nodes:
        return f"needs {spec.nodes} nodes but names only {len(named)}: {_and(sorted(named))}"
    if not state.nodes:
        return "the cluster has no nodes"
    shape = spec_shape(spec)
    fits = [n.name for n in _sorted_nodes(state) if _lower_bound(
        shape, n.name, frozenset(n.spec.labels),
        sorted(nominal_bytes(g.vram_bytes) for g in n.gpus)) is not None]
    if len(fits) >= spec.nodes:
        return None
    need = _need(shape)
    them = "one" if spec.gpus_per_node == 1 else "them"
    if not fits:
        return f"needs {need}; no node " + (f"has {them}" if spec.gpus_per_node else "qualifies")
    if spec.gpus_per_node:
        have = f"has {them}" if len(fits) == 1 else f"have {them}"
    else:
        have = "qualifies" if len(fits) == 1 else "qualify"
    return f"needs {need}; only {_and(fits)} {have}"


def typical_runtimes(state: State) -> dict[tuple[str, tuple[str, ...]], float]:
    """Median run time of each (owner, argv)'s succeeded jobs: the estimate for unknown ones."""
    runs: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for job in state.jobs.values():
        if job.state is JobState.SUCCEEDED and job.ended_at is not None:
            start = job.running_at if job.running_at is not None else job.started_at
            if start is not None:
                runs.setdefault((job.owner, job.spec.argv), []).append(job.ended_at - start)
    return {k: statistics.median(v) for k, v in runs.items()}


def spec_shape(spec: ev.JobSpec) -> Shape:
    """What placement depends on: jobs of one shape fit the same nodes."""
    return (spec.gpus_per_node, spec.nodes, spec.min_vram_bytes, spec.labels_required,
            spec.labels_avoided, spec.node_names)


# ---- one round --------------------------------------------------------------


class _Node:
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


class _ShapeInfo:
    __slots__ = ("cand", "fail_end", "full", "never", "reason", "shape", "static")

    def __init__(self, shape: Shape, static: list[tuple[int, str, _Node]],
                 never: str | None) -> None:
        self.shape = shape
        self.static = static  # every node that could ever take it, by (VRAM given up, name)
        self.cand = [c for c in static if c[2].sched]  # pruned as nodes fill up
        self.fail_end: float | None = None  # jobs ending at or after this did not fit now
        self.full = False  # too few nodes have enough free GPUs, reservations aside
        self.reason: str | None = None
        self.never = never


class _Quota:
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


class _Round:
    def __init__(self, state: State, now: float, backfill: bool,
                 user_limits: Mapping[str, UserLimits], port_for: Callable[[str, int], int] | None,
                 runtimes: RunTimes | None) -> None:
        self.state, self.now, self.backfill = state, now, backfill
        self.user_limits, self.port_for, self._runtimes = user_limits, port_for, runtimes
        self.nodes = [_Node(n, now) for n in _sorted_nodes(state)]
        self.by_name = {n.name: n for n in self.nodes}
        self.shapes: dict[Shape, _ShapeInfo] = {}
        self.users: dict[str, _Quota] = {}
        self.sweeps: dict[str, _Quota] = {}
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

    def quota(self, table: dict[str, _Quota], key: str, max_jobs: int | None,
              max_gpus: int | None) -> _Quota:
        q = table.get(key)
        if q is None:
            q = table[key] = _Quota(max_jobs, max_gpus)
        return q

    def user_quota(self, user: str) -> _Quota:
        q = self.users.get(user)
        if q is None:
            lim = limits_for(self.user_limits, user)
            q = self.users[user] = _Quota(lim.max_jobs, lim.max_gpus)
        return q

    def sweep_quota(self, name: str) -> _Quota | None:
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

    def shape_info(self, shape: Shape) -> _ShapeInfo:
        info = self.shapes.get(shape)
        if info is None:
            static = []
            for nd in self.nodes:
                lb = _lower_bound(shape, nd.name, nd.labels, nd.vrams)
                if lb is not None:
                    static.append((lb, nd.name, nd))
            static.sort(key=lambda c: (c[0], c[1]))
            never = None
            if len(static) < shape[1]:
                spec = ev.JobSpec(argv=(), gpus_per_node=shape[0], nodes=shape[1],
                                  min_vram_bytes=shape[2], labels_required=shape[3],
                                  labels_avoided=shape[4], node_names=shape[5])
                never = check_fits(self.state, spec)
            info = self.shapes[shape] = _ShapeInfo(shape, static, never)
        return info

    # -- the round --

    def run(self) -> Plan:
        queue = self.load()
        blocked_head: str | None = None  # first job that could not start (backfill off)
        retrying, shapes, waiting = JobState.RETRYING, self.shapes, self.waiting
        limited = self.user_limits.keys()
        everyone_limited = "*" in limited
        for pos, job in enumerate(queue, 1):
            spec = job.spec
            if job.held or spec.after or job.state is retrying or spec.after_any \
                    or spec.after_failed:
                reason = self.precheck(job)
                if reason is not None:
                    waiting[job.id] = reason
                    continue
            if blocked_head is not None:
                waiting[job.id] = f"queued behind {blocked_head} (backfill is off)"
                continue
            shape = (spec.gpus_per_node, spec.nodes, spec.min_vram_bytes, spec.labels_required,
                     spec.labels_avoided, spec.node_names)
            info = shapes.get(shape) or self.shape_info(shape)
            if info.never is not None:
                waiting[job.id] = self.never_reason(info)
                continue
            # The common case on a busy cluster: nothing of this shape can start now, whoever
            # asks, no limit to report and no reservation left to give. Say so and move on.
            if (info.full or (shape[0] and not self.free_total)) and not (
                    len(self.reservations) < MAX_RESERVATIONS and self.finite) and not (
                    everyone_limited or spec.sweep is not None or job.owner in limited):
                if info.reason is None:
                    info.reason = self.blocked_reason(info, INF)
                waiting[job.id] = info.reason
                if not self.backfill:
                    blocked_head = job.id
                continue
            rt = self.runtime(job)
            end = INF if rt is None else self.now + rt
            reason = self.quota_reason(job, end)
            if reason is not None:
                waiting[job.id] = reason
                continue
            chosen = self.fit_now(info, end, job.failed_nodes)
            if chosen is not None:
                self.place(job, pos, chosen, end)
                continue
            if info.reason is None:
                info.reason = self.blocked_reason(info, end)
            reason = info.reason
            res = self.reserve(job, info, rt) if len(self.reservations) < MAX_RESERVATIONS \
                and self.finite else None
            if res is not None:
                # The estimate is not in the reason: reasons are recorded when they change,
                # and an estimate moves with every overrun.
                if res.at is not None:
                    self.estimates[job.id] = res.at
                else:
                    reason += "; the GPUs it waits for are kept for it"
            waiting[job.id] = reason
            if not self.backfill:
                blocked_head = job.id
        return Plan(placements=tuple(self.placements), waiting=waiting,
                    estimates=self.estimates, reservations=self.reservations,
                    unrunnable=self.unrunnable, order=tuple(map(attrgetter("id"), queue)))

    def never_reason(self, info: _ShapeInfo) -> str:
        """A shape no node known now can take: say so, unless nodes not yet reached may."""
        unknown = gpus_unknown(self.state, info.shape)
        if not unknown:
            return f"cannot run on this cluster as configured: {info.never}"
        words = [self.blocker(self.by_name[n.name], 0, 0, INF) for n in unknown[:3]]
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        return (f"waiting for {_need(info.shape)}: {', '.join(words)}{more} (a node's GPUs "
                f"are known once ugrod reaches it)")

    def precheck(self, job: Job) -> str | None:
        """Why a job is passed over whatever the cluster looks like: hold, backoff, dependencies."""
        if job.held:
            return f"held: `ugroctl release {job.id}` lets it run"
        if job.state is JobState.RETRYING and job.retry_at is not None and job.retry_at > self.now:
            return (f"retry {job.failures} of {job.spec.max_retries} at "
                    f"{self.clock(job.retry_at)} (backoff)")
        for dep in job.spec.after:
            other = self.state.jobs.get(dep)
            if other is None:
                self.unrunnable[job.id] = f"{dep} does not exist"
                return f"waiting for {dep}, which does not exist: it will never run"
            if other.state is JobState.SUCCEEDED:
                continue
            if other.state in (JobState.FAILED, JobState.CANCELLED):
                self.unrunnable[job.id] = f"{dep} {other.state.value}"
                return f"{dep} {other.state.value}: this job runs only after it succeeds"
            return f"waiting for {dep} to succeed ({dep} is {other.state.value})"
        for dep in job.spec.after_any:
            other = self.state.jobs.get(dep)
            if other is None:
                self.unrunnable[job.id] = f"{dep} does not exist"
                return f"waiting for {dep}, which does not exist: it will never run"
            if other.state not in _ENDED:
                return f"waiting for {dep} to end ({dep} is {other.state.value})"
        for dep in job.spec.after_failed:
            other = self.state.jobs.get(dep)
            if other is None:
                self.unrunnable[job.id] = f"{dep} does not exist"
                return f"waiting for {dep}, which does not exist: it will never run"
            if other.state is JobState.SUCCEEDED:
                self.unrunnable[job.id] = f"{dep} succeeded (--after-failed)"
                return f"{dep} succeeded: this job runs only if it fails or is cancelled"
            if other.state not in _ENDED:
                return f"waiting for {dep} to fail ({dep} is {other.state.value})"
        return None

    def quota_reason(self, job: Job, end: float) -> str | None:
        need = job.spec.gpus_per_node * job.spec.nodes
        uq = self.users.get(job.owner) or self.user_quota(job.owner)
        if uq.max_jobs is None and uq.max_gpus is None and job.spec.sweep is None:
            return None
        if uq.max_gpus is not None and need > uq.max_gpus:
            return f"needs {need} GPUs; user {job.owner} may run at most {uq.max_gpus}"
        over = uq.over(need, end)
        if over is not None:
            jobs, _, held = over
            kept = f" (counting {_and(held)}, which will start first)" if held else ""
            if uq.max_jobs is not None and jobs > uq.max_jobs:
                return (f"user {job.owner} at limit: {uq.jobs} of {uq.max_jobs} jobs "
                        f"running{kept}")
            return (f"user {job.owner} at limit: {uq.gpus} of {uq.max_gpus} GPUs running, "
                    f"needs {need}{kept}")
        sweep = job.spec.sweep
        if sweep is not None and (sq := self.sweep_quota(sweep)) and sq.over(0, end) is not None:
            return (f"sweep {job.spec.sweep} at its limit: {sq.jobs} of {sq.max_jobs} "
                        f"trials running")
        return None

    def fit_now(self, info: _ShapeInfo, end: float,
                failed: tuple[str, ...]) -> list[tuple[_Node, list[Gpu]]] | None:
        """The best nodes and GPUs for a job ending at ``end``, starting now; None if none fit."""
        gpn, count, min_vram = info.shape[0], info.shape[1], info.shape[2]
        if (info.fail_end is not None and end >= info.fail_end) or (gpn and not self.free_total):
            return None
        best: list[tuple[tuple[bool, int, bool, str], _Node, list[Gpu]]] = []
        cand, keep, i = info.cand, None, 0
        while i < len(cand):
            item = cand[i]
            lb, name, nd = item
            if len(best) == count and (False, lb, False, name) > best[-1][0]:
                break  # every later node gives up at least as much VRAM
            i += 1
            chosen: list[Gpu] = []
            if gpn:
                usable = 0
                for g in nd.free:
                    if g[0] >= min_vram:
                        usable += 1
                        if len(chosen) < gpn and nd.res_at.get(g[1], INF) >= end:
                            chosen.append(g)
                if usable < gpn:  # full for this shape for the rest of the round
                    if keep is None:
                        keep = cand[:i - 1]
                    continue
                if keep is not None:
                    keep.append(item)
                if len(chosen) < gpn:
                    continue
                given_up = sum(g[0] for g in chosen)
            else:
                if keep is not None:
                    keep.append(item)
                given_up = lb
            # A node the job failed on comes last: a retry goes elsewhere while others fit.
            key = (name in failed, given_up, nd.degraded, name)
            bisect.insort(best, (key, nd, chosen), key=lambda b: b[0])
            del best[count:]
        if keep is not None:
            info.cand = keep + cand[i:]
        if len(best) < count:
            info.fail_end = end if info.fail_end is None else min(info.fail_end, end)
            # every node was looked at: those left in cand are the ones with enough free GPUs
            info.full = len(info.cand) < count
            return None
        return [(nd, chosen) for _, nd, chosen in best]

    def set_avail(self, nd: _Node, idx: int, t: float) -> None:
        self.finite += (t < INF) - (nd.avail[idx] < INF)
        nd.avail[idx] = t

    def place(self, job: Job, pos: int, chosen: list[tuple[_Node, list[Gpu]]],
              end: float) -> None:
        order = sorted(range(len(chosen)), key=lambda k: (
            chosen[k][0].pref is None, chosen[k][0].pref or 0, k))
        ranks: list[ev.RankPlacement] = []
        where: list[str] = []
        backfilled: set[str] = set()
        for rank, k in enumerate(order):
            nd, gpus = chosen[k]
            for g in gpus:
                nd.free.remove(g)
                nd.held_by[g[1]], nd.until[g[1]] = job.id, end
                self.set_avail(nd, g[1], max(nd.avail[g[1]], end))
                if g[1] in nd.res_by:
                    backfilled.add(nd.res_by[g[1]])
            self.free_total -= len(gpus)
            gpus = sorted(gpus, key=lambda g: g[1])
            uuids = tuple(g[2] for g in gpus)
            ranks.append(ev.RankPlacement(rank=rank, node=nd.name,
                                          gpus=tuple(g[1] for g in gpus),
                                          gpu_uuids=uuids if all(uuids) else ()))
            where.append(f"{nd.name} ({_gpu_words(gpus)})")
        uq = self.user_quota(job.owner)
        uq.jobs += 1
        uq.gpus += job.spec.gpus_per_node * job.spec.nodes
        if job.spec.sweep is not None and (sq := self.sweep_quota(job.spec.sweep)):
            sq.jobs += 1
        words = ["smallest GPUs that fit" if job.spec.gpus_per_node else "CPU only"]
        names = [r.node for r in ranks]
        avoided = [n for n in job.failed_nodes if n not in names]
        again = [n for n in job.failed_nodes if n in names]
        if avoided:
            words.append(f"avoiding {_and(avoided)}, where it failed before")
        if again:
            words.append(f"on {_and(again)} again, where it failed before: no other node fits")
        if backfilled:
            words.append(f"backfilled: expected to end by {self.clock(end)}, before "
                         f"{_and(sorted(backfilled))} needs its GPUs")
        elif self.reservations:
            words.append(f"backfilled on GPUs not kept for {_few(sorted(self.reservations))}")
        if job.attempt:
            words.append(f"attempt {job.attempt + 1}"
                         + (f", resuming from {job.resume_from}" if job.resume_from else ""))
        words.append(f"priority {job.priority}, {_ordinal(pos)} in the queue")
        rank0 = self.by_name[ranks[0].node]
        self.placements.append(ev.JobPlaced(
            job=job.id, attempt=job.attempt + 1, ranks=tuple(ranks),
            rdzv_host=rank0.node.spec.host,
            rdzv_port=self.port_for(rank0.name, job.attempt + 1) if self.port_for else 0,
            resume_from=job.resume_from,
            reason=f"placed on {', '.join(where)}: {'; '.join(words)}",
        ))

    def reserve(self, job: Job, info: _ShapeInfo, rt: float | None) -> Reservation | None:
        """Hold back the GPUs a blocked job will start on, from the earliest time they free up."""
        gpn, count, min_vram = info.shape[0], info.shape[1], info.shape[2]
        if not gpn:
            return None  # a CPU job waits only for nodes to come back: nothing to hold
        ready: list[tuple[float, _Node, list[Gpu]]] = []  # when each node could take it
        for _, _, nd in info.static:
            if nd.sched:
                timed = sorted((nd.avail[g[1]], g) for g in nd.gpus if g[0] >= min_vram)
                ready.append((timed[gpn - 1][0], nd, [g for _, g in timed]))
        if len(ready) < count:
            return None
        at = sorted(r[0] for r in ready)[count - 1]
        picks: list[tuple[tuple[bool, float, int, bool, str], _Node, list[Gpu]]] = []
        gpus: list[Gpu]
        for t, nd, qual in ready:
            if at < INF:
                if t > at:
                    continue
                gpus = sorted(g for g in qual if nd.avail[g[1]] <= at)[:gpn]
                key = (nd.name in job.failed_nodes, 0.0, sum(g[0] for g in gpus), nd.degraded,
                       nd.name)
            else:  # unknown: hold the GPUs that free up first (free ones before busy ones)
                gpus = qual[:gpn]
                key = (nd.name in job.failed_nodes, t, sum(g[0] for g in gpus), nd.degraded,
                       nd.name)
            picks.append((key, nd, gpus))
        picks.sort(key=lambda p: p[0])
        picks = picks[:count]
        if at == INF and all(nd.avail[g[1]] == INF for _, nd, gpus in picks for g in gpus):
            return None  # everything it could wait for is already held back for others
        start = at if at < INF else -INF
        free_for_good = at + rt if at < INF and rt is not None else INF
        held = []
        for _, nd, gpus in picks:
            for g in gpus:
                idx = g[1]
                if start == -INF and idx not in nd.held_by and nd.res_at.get(idx, INF) > -INF:
                    self.free_total -= 1  # free now, but no one may use it any more
                if start < nd.res_at.get(idx, INF):
                    nd.res_at[idx], nd.res_by[idx] = start, job.id
                self.set_avail(nd, idx, free_for_good)
                held.append((nd.name, idx))
        res = Reservation(at=at if at < INF else None, gpus=tuple(sorted(held)))
        self.reservations[job.id] = res
        need = gpn * count
        uq = self.user_quota(job.owner)
        if uq.max_gpus is not None or uq.max_jobs is not None:
            uq.reserved.append((start, need, job.id))
        if job.spec.sweep is not None and (sq := self.sweep_quota(job.spec.sweep)):
            sq.reserved.append((start, 0, job.id))
        return res

    def holder(self, job_id: str) -> str:
        return f"{job_id} (stopping)" if job_id in self.stopping else job_id

    def blocked_reason(self, info: _ShapeInfo, end: float) -> str:
        """Why a shape cannot start now, naming the nodes it would use and what holds them."""
        gpn, count, min_vram = info.shape[0], info.shape[1], info.shape[2]
        shown: list[str] = []
        ready: list[str] = []
        blocked = 0
        # A one-node shape that failed has no node ready, and a full cluster none either:
        # then the first few blockers are all there is to say and the rest are counted.
        scan_all = count > 1 and (self.free_total > 0 or not gpn)
        for n, (_, name, nd) in enumerate(info.static):
            if not nd.sched:
                is_ready = False
            elif gpn:
                usable = 0
                for g in nd.free:
                    if g[0] >= min_vram and nd.res_at.get(g[1], INF) >= end:
                        usable += 1
                is_ready = usable >= gpn
            else:
                is_ready = True
            if is_ready:
                ready.append(name)
                continue
            blocked += 1
            if len(shown) < 3:
                shown.append(self.blocker(nd, gpn, min_vram, end))
            elif not scan_all:
                blocked += len(info.static) - n - 1
                break
        text = f"waiting for {_need(info.shape)}: "
        if ready:
            text += f"only {_and(sorted(ready[:3]))}{' and more' if len(ready) > 3 else ''} free; "
        text += ", ".join(shown)
        others = blocked - len(shown)
        if others:
            text += f" and {others} more node{'s' if others > 1 else ''} busy"
        return text

    def blocker(self, nd: _Node, gpn: int, min_vram: int, end: float) -> str:
        """What keeps one node from taking the shape now, in words."""
        name = nd.name
        if not nd.sched:
            node = nd.node
            why = f"{name} is {node.state.value}"
            if node.drained and node.drain_reason:
                why += f" ({node.drain_reason})"
            elif node.health_reason and not node.drained:  # what to do about it, in words
                why += f" ({node.health_reason})"
            return why
        qual = [g for g in nd.gpus if g[0] >= min_vram]
        free = [g for g in qual if g[1] not in nd.held_by]
        if len(free) >= gpn:
            keepers = sorted({nd.res_by[g[1]] for g in free if g[1] in nd.res_by})
            return f"{name} kept for {_few(keepers)}"
        holders = sorted({nd.held_by[g[1]] for g in qual if g[1] in nd.held_by})
        until = sorted(nd.until.get(g[1], -INF) for g in qual)[gpn - 1]
        why = f"{name} busy with {_few([self.holder(h) for h in holders])}"
        if self.now <= until < INF:
            why += f" until about {self.clock(until)}"
        elif -INF < until < self.now:
            why += f" (expected to end by {self.clock(until)})"
        return why

    def clock(self, t: float) -> str:
        text = self.clocks.get(t)
        if text is None:
            text = self.clocks[t] = _clock(t, self.now)
        return text


# ---- words and small helpers ----------------------------------------------


def gpus_unknown(state: State, shape: Shape) -> list[Node]:
    """Nodes not reached yet whose GPUs are unknown (never inventoried, none named in the
    config) and that would qualify for a GPU job of ``shape`` by name and labels: such a
    job may fit once they are reached."""
    if not shape[0]:
        return []
    return [n for n in _sorted_nodes(state) if n.inventory is None and not n.spec.gpus
            and not n.schedulable
            and _lower_bound((0, *shape[1:]), n.name, frozenset(n.spec.labels), [])
            is not None]


def _sorted_nodes(state: State) -> list[Node]:
    return [state.nodes[k] for k in sorted(state.nodes.keys())]


def _lower_bound(shape: Shape, name: str, labels: frozenset[str],
                 vrams: list[int]) -> int | None:
    """VRAM the shape would give up on an idle node (GPU count for CPU jobs); None: never.

    ``vrams`` is the node's GPUs' VRAM, sorted.
    """
    gpn, _, min_vram, required, avoided, names = shape
    if names and name not in names:
        return None
    if required and not labels.issuperset(required):
        return None
    if avoided and not labels.isdisjoint(avoided):
        return None
    if not gpn:
        return len(vrams)
    pos = bisect.bisect_left(vrams, min_vram)
    return sum(vrams[pos:pos + gpn]) if len(vrams) - pos >= gpn else None


def _need(shape: Shape) -> str:
    """'2 nodes with a GPU ≥ 8 GB', 'a GPU ≥ 10 GB', '3 nodes labelled ib'..."""
    gpn, count, min_vram, required, avoided, names = shape
    gpus = "" if not gpn else ("a GPU" if gpn == 1 else f"{gpn} GPUs")
    if gpus and min_vram:
        gpus += f" ≥ {_gb(min_vram)}"
    plain = not (required or avoided or names)
    if count == 1 and gpus and plain:
        text = gpus if gpn == 1 else f"{gpus} on one node"
    else:
        text = "a node" if count == 1 else f"{count} nodes"
        if gpus:
            text += f" with {gpus}"
    if required:
        text += f" labelled {', '.join(required)}"
    if avoided:
        text += f" not labelled {', '.join(avoided)}"
    if names:
        text += f" among {', '.join(names)}"
    return text


def _gb(vram_bytes: int) -> str:
    x = vram_bytes / _GIB
    return f"{round(x)} GB" if abs(x - round(x)) < 0.01 else f"{x:.1f} GB"


def _gpu_words(gpus: list[Gpu]) -> str:
    """'GPU 0, 8 GB', 'GPUs 0,1, 8 GB each', 'GPU 0 8 GB, GPU 1 12 GB', 'no GPU'."""
    if not gpus:
        return "no GPU"
    sizes = {g[0] for g in gpus}
    if len(sizes) == 1:
        size = f", {_gb(gpus[0][0])}" if gpus[0][0] else ""
        if len(gpus) == 1:
            return f"GPU {gpus[0][1]}{size}"
        return f"GPUs {','.join(str(g[1]) for g in gpus)}{size}{' each' if size else ''}"
    return ", ".join(f"GPU {g[1]} {_gb(g[0])}" if g[0] else f"GPU {g[1]}" for g in gpus)


def _clock(t: float, now: float) -> str:
    """'14:20 UTC' today, '2026-11-23 14:20 UTC' another day."""
    if not math.isfinite(t):
        return "an unknown time"
    at, today = codec.format_ts(t), codec.format_ts(now)
    return f"{at[11:16]} UTC" if at[:10] == today[:10] else f"{at[:10]} {at[11:16]} UTC"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _and(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _few(items: list[str]) -> str:
    return _and(items) if len(items) <= 3 else f"{', '.join(items[:2])} and {len(items) - 2} more"
