"""Health sweeps: probe every node at once, score, drive breakers, record transitions.

The imperative shell around ``ugrod.core.health`` and ``ugrod.core.gpus``. A sweep runs
one probe per node concurrently, each under its own deadline, and each node
records its own transitions as soon as it is done, so a slow node never holds
up the others. The probe is one request line to a long-lived probe process on
the node (``remote/probe_server.py``, started at first contact over the node's
transport, no shell), so a sweep starts no process and opens no SSH session:
that is what keeps a 50-node sweep well under a second. Where that process
cannot be started (no usable Python there), the one-shot ``remote/probe.py`` runs
instead, so the failure is reported with its exit code and stderr.
Sweeps never overlap. Samples go to a bounded buffer per node (read by
``/metrics``, ``ugroctl health`` and per-job resource figures), never to the
event log: only transitions do (health changed, alert raised or cleared,
node unreachable), each once.

The sweep interval adapts (``health.next_interval``): its job on the daemon's
``Schedule`` is rescheduled whenever job activity moves it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ugrod.config.schema import Config, HealthConfig
from ugrod.core import codec, gpus
from ugrod.core import events as ev
from ugrod.core import health as hl
from ugrod.core.state import InvalidEvent, Job, JobState, NodeHealth, State
from ugrod.loops.schedule import Schedule
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.nodes import probe
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import (
    CommandResult,
    NodeUnreachable,
    Stream,
    Transport,
    TransportError,
)
from ugrod.store import job_results
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.monitor")

JOB_ID = "health-sweep"
HISTORY = 120  # samples kept per node: 10 min at the busiest interval
DEEP_TIMEOUT_S = 120.0  # `import torch` on a cold disk is slow
MIN_FREE_BYTES = 10 * 1024**3
LATENCY_WINDOW = 3  # sweeps; the latency scored is the minimum over them
_ACTIVITY = (ev.JobSubmitted, ev.JobPlaced, ev.JobRunning, ev.JobEnded, ev.JobResumed,
             ev.JobCancelRequested)


class Host(Protocol):
    """What the monitor needs of the daemon."""

    ledger: Ledger
    config: Config
    stats: RuntimeStats


def thresholds_from(cfg: HealthConfig) -> hl.Thresholds:
    """cluster.yaml's health section -> the scoring's thresholds and weights."""
    t, w = cfg.thresholds, cfg.weights
    return hl.Thresholds(
        gpu_temp_warn_c=t.gpu_temp_c.warn, gpu_temp_crit_c=t.gpu_temp_c.crit,
        gpu_memory_warn_percent=t.gpu_memory_percent.warn,
        gpu_memory_crit_percent=t.gpu_memory_percent.crit,
        memory_warn_percent=t.memory_percent.warn, memory_crit_percent=t.memory_percent.crit,
        disk_warn_percent=t.disk_percent.warn, disk_crit_percent=t.disk_percent.crit,
        latency_warn_ms=t.latency_ms.warn, latency_crit_ms=t.latency_ms.crit,
        healthy_min=cfg.healthy_min, degraded_min=cfg.degraded_min,
        gpu_temp_warn_cost=w.gpu_temp_c.warn, gpu_temp_crit_cost=w.gpu_temp_c.crit,
        gpu_memory_warn_cost=w.gpu_memory_percent.warn,
        gpu_memory_crit_cost=w.gpu_memory_percent.crit,
        memory_warn_cost=w.memory_percent.warn, memory_crit_cost=w.memory_percent.crit,
        disk_warn_cost=w.disk_percent.warn, disk_crit_cost=w.disk_percent.crit,
        latency_warn_cost=w.latency_ms.warn, latency_crit_cost=w.latency_ms.crit,
        no_ranks_cost=w.no_rank_process, gpu_fault_cost=w.gpu_error,
    )


def intervals_from(cfg: HealthConfig) -> hl.Intervals:
    i = cfg.intervals
    return hl.Intervals(active_s=i.active_s, recent_s=i.recent_s, idle_s=i.idle_s,
                        long_idle_s=i.long_idle_s, max_s=i.max_s,
                        recent_window_s=i.recent_window_s, idle_window_s=i.idle_window_s)


@dataclass
class _Usage:
    """Running GPU figures of one rank's GPU during a job attempt."""

    rank: int
    node: str
    gpu: int
    samples: int = 0
    util_sum: float = 0.0
    util_n: int = 0
    util_peak: float | None = None
    mem_sum: float = 0.0
    mem_n: int = 0
    mem_peak: int | None = None

    def add(self, g: gpus.GpuSample) -> None:
        self.samples += 1
        if g.util_percent is not None:
            self.util_sum += g.util_percent
            self.util_n += 1
            self.util_peak = max(self.util_peak or 0.0, g.util_percent)
        if g.memory_used_bytes is not None:
            self.mem_sum += g.memory_used_bytes
            self.mem_n += 1
            self.mem_peak = max(self.mem_peak or 0, g.memory_used_bytes)

    def saved(self) -> dict[str, Any]:
        """The running figures as gpu_use.json keeps them (``from_saved`` reads them back)."""
        return {"rank": self.rank, "node": self.node, "gpu": self.gpu, "samples": self.samples,
                "util_sum": self.util_sum, "util_n": self.util_n, "util_peak": self.util_peak,
                "mem_sum": self.mem_sum, "mem_n": self.mem_n, "mem_peak": self.mem_peak}

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> _Usage | None:
        try:
            return cls(rank=int(d["rank"]), node=str(d["node"]), gpu=int(d["gpu"]),
                       samples=int(d["samples"]), util_sum=float(d["util_sum"]),
                       util_n=int(d["util_n"]), util_peak=None if d["util_peak"] is None
                       else float(d["util_peak"]), mem_sum=float(d["mem_sum"]),
                       mem_n=int(d["mem_n"]),
                       mem_peak=None if d["mem_peak"] is None else int(d["mem_peak"]))
        except (KeyError, TypeError, ValueError):
            return None

    def view(self) -> dict[str, Any]:
        return {"rank": self.rank, "node": self.node, "gpu": self.gpu, "samples": self.samples,
                "util_avg": round(self.util_sum / self.util_n, 1) if self.util_n else None,
                "util_peak": self.util_peak,
                "mem_avg_bytes": round(self.mem_sum / self.mem_n) if self.mem_n else None,
                "mem_peak_bytes": self.mem_peak}


@dataclass
class _Watch:
    """What the monitor keeps of one node between sweeps."""

    breaker: hl.Breaker
    prev: hl.Assessment | None = None  # as last recorded in the log
    score: float | None = None  # latest, recorded or not
    samples: deque[gpus.NodeSample] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last_check: float | None = None
    last_answer: float | None = None  # when the node last answered a check (the clock's)
    silent: bool = False  # the last check failed for want of an answer (not a bad one)
    last_error: str | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class _ProbeLink:
    """A node's long-lived probe process: its stream and the last request id."""

    def __init__(self, stream: Stream, agent: NodeAgent) -> None:
        self.stream = stream
        self.agent = agent
        self.last_id = 0


class Monitor:
    """Owns the per-node breakers and sample buffers; sweeps on a scheduled job."""

    def __init__(self, host: Host, agents: Mapping[str, NodeAgent],
                 transports: Mapping[str, Transport], *,
                 agent_for: Callable[[Job, str], NodeAgent] | None = None,
                 clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        self._host = host
        # the agent a job's ranks use on a node (default: the node's own)
        self._agent_for = agent_for
        self._agents: Mapping[str, NodeAgent] = agents
        self._transports: Mapping[str, Transport] = transports
        self._clock = clock
        self._jitter = jitter
        self._watch: dict[str, _Watch] = {}
        self._usage: dict[str, tuple[int, dict[tuple[int, int], _Usage]]] = {}
        self._usage_dirty: set[str] = set()
        # job -> its directory on the head: GPU use is kept there (gpu_use.json) for restarts
        self.job_dir: Callable[[str], Path] | None = None
        self._lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._links: dict[str, _ProbeLink] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sched: Schedule | None = None
        self._interval: float | None = None
        self._closed = False
        self.sweeps = 0
        # Called with a node's name each time it answers a check (the fencer clears it then).
        self.on_answer: Callable[[str], None] = lambda name: None
        self.last_activity = _last_activity(host.ledger.state)
        host.ledger.on_commit(self._on_commit)

    # ---- configuration -----------------------------------------------------------

    @property
    def _cfg(self) -> HealthConfig:
        return self._host.config.health

    def set_nodes(self, agents: Mapping[str, NodeAgent],
                  transports: Mapping[str, Transport]) -> None:
        """After a reload: new nodes start fresh, removed ones are forgotten."""
        self._agents, self._transports = agents, transports
        for name, link in list(self._links.items()):
            if agents.get(name) is not link.agent:
                self._drop_link(name)
        for name in list(self._watch):
            if name not in agents:
                del self._watch[name]
                self._host.stats.forget_node(name)

    def schedule(self, sched: Schedule) -> None:
        """Add the sweep to the daemon's schedule (first sweep right away)."""
        self._sched = sched
        self._interval = self.interval()
        sched.every(JOB_ID, self._interval, self.sweep, first_in_s=0)

    def interval(self) -> float:
        state = self._host.ledger.state
        running = state.n_running > 0
        return hl.next_interval(self._clock(), self.last_activity, running,
                                intervals_from(self._cfg))

    def _reschedule(self) -> None:
        if self._sched is None or self._closed:
            return
        new = self.interval()
        if new != self._interval:
            self._interval = new
            self._sched.reschedule(JOB_ID, new)
            logger.debug("health sweep every %g s", new)

    def _on_commit(self, records: list[ev.Record], state: State) -> None:
        if any(isinstance(r.event, _ACTIVITY) for r in records):
            self.last_activity = records[-1].ts
            self._reschedule()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in list(self._links):
            self._drop_link(name)
        await asyncio.gather(*self._closing, return_exceptions=True)

    # ---- reading -------------------------------------------------------------------

    def latest_samples(self) -> dict[str, gpus.NodeSample]:
        return {n: w.samples[-1] for n, w in self._watch.items() if w.samples}

    def latest_scores(self) -> dict[str, float | None]:
        return {n: w.score for n, w in self._watch.items()}

    def history(self, name: str) -> list[gpus.NodeSample]:
        w = self._watch.get(name)
        return list(w.samples) if w else []

    def last_answer(self, name: str) -> float | None:
        """When ``name`` last answered a check (this monitor's clock), None if never."""
        w = self._watch.get(name)
        return w.last_answer if w else None

    def unanswered_s(self, name: str) -> float | None:
        """Seconds since ``name`` last answered a check; None if it has not since start."""
        last = self.last_answer(name)
        return None if last is None else max(0.0, self._clock() - last)

    def breaker(self, name: str) -> hl.Breaker | None:
        w = self._watch.get(name)
        return w.breaker if w else None

    def view(self, name: str) -> dict[str, Any] | None:
        """What the API adds to a node: latest sample, check time, breaker, live score."""
        w = self._watch.get(name)
        if w is None:
            return None
        sample = None
        if w.samples:
            latest = w.samples[-1]
            sample = gpus.to_json(latest)
            prev = w.samples[-2] if len(w.samples) > 1 else None
            sample["cpu_percent"] = _round(gpus.cpu_percent(prev, latest))
        return {"last_check": codec.format_ts(w.last_check) if w.last_check else None,
                "sample": sample, "breaker": w.breaker.at(self._clock()).state.value,
                "score": w.score, "last_error": w.last_error}

    def job_resources(self, job: Job) -> dict[str, Any]:
        """Average and peak GPU use per rank and GPU over the job's current attempt."""
        entry = self._usage.get(job.id)
        if entry is None or entry[0] != job.attempt:
            entry = self._saved_usage(job)
            if entry is None:
                return {"ranks": []}
        rows = sorted(entry[1].values(), key=lambda u: (u.rank, u.gpu))
        return {"ranks": [u.view() for u in rows], "attempt": job.attempt}

    # ---- sweeping ---------------------------------------------------------------------

    async def sweep(self) -> None:
        """Probe every node whose breaker allows it, concurrently.

        Sweeps never overlap, and no node is ever checked twice at once. A sweep
        waits for its checks at most one interval: a node still inside its own
        deadline (a paused host, a hung link) stays in flight on its own and is
        skipped by the next sweep, so every other node keeps its pace.
        """
        if self._lock.locked() or self._closed:
            return
        async with self._lock:
            state = self._host.ledger.state
            started: list[asyncio.Task[None]] = []
            for name in state.nodes:
                if name in self._inflight or name not in self._agents:
                    continue
                task = asyncio.get_running_loop().create_task(self._guarded(name))
                self._inflight[name] = task
                task.add_done_callback(functools.partial(self._landed, name))
                started.append(task)
            if started:
                await asyncio.wait(started, timeout=self._interval or self.interval())
            self.sweeps += 1
            self._prune_usage(self._host.ledger.state)
            self._save_usage()
        self._reschedule()

    def _landed(self, name: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]

    async def _guarded(self, name: str, force: bool = False) -> None:
        try:
            await self.check_node(name, force=force)
        except Exception:
            logger.exception("health check of %s failed", name)

    async def check_now(self, name: str) -> None:
        """Probe ``name`` at once, whatever its breaker says, and record what it finds.

        For ``nodes trust``, a reload and an on-demand check that disagrees with the log:
        the node's reachability is then what the log says within one probe, for the
        planner, ``nodes`` and ``health`` alike. A check already in flight is let finish.
        """
        if self._closed or name not in self._agents:
            return
        prior = self._inflight.get(name)
        if prior is not None:
            await asyncio.wait({prior}, timeout=self._cfg.check_timeout_s)
        task = asyncio.get_running_loop().create_task(self._guarded(name, force=True))
        self._inflight[name] = task
        task.add_done_callback(functools.partial(self._landed, name))
        await asyncio.shield(task)

    def _watch_for(self, name: str, state: State) -> _Watch:
        w = self._watch.get(name)
        if w is None:
            cfg = self._cfg
            w = _Watch(breaker=hl.Breaker(threshold=max(1, cfg.failures_to_open),
                                          cap_s=cfg.max_backoff_s))
            node = state.nodes.get(name)
            w.prev = hl.known(node) if node is not None else None
            w.score = node.score if node is not None else None
            self._watch[name] = w
        return w

    async def check_node(self, name: str, *, force: bool = False) -> None:
        """One sweep's check of one node: probe (if the breaker allows), score, record."""
        state = self._host.ledger.state
        node = state.nodes.get(name)
        agent = self._agents.get(name)
        if node is None or agent is None:
            return
        w = self._watch_for(name, state)
        now = self._clock()
        breaker = w.breaker.at(now)
        if not breaker.due(now):
            # A node that went silent is tried as soon as it answers again (a cheap poke
            # each sweep), not only when its backoff ends: it takes work again at once.
            if not force and not (w.silent and await self._answers_again(name, agent)):
                return
            breaker = msgspec.structs.replace(breaker, state=hl.BreakerState.HALF_OPEN)
        self._set_breaker(name, w, breaker)
        expect_gpus = len(node.gpus)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self._cfg.check_timeout_s):
                pid_files, running_ranks = await self._rank_pid_files(name, state, agent)
                res, wall = await self._probe(name, agent, pid_files)
        except (TransportError, TimeoutError, OSError) as exc:
            why = str(exc) if not isinstance(exc, TimeoutError) else \
                f"node {name}: probe did not answer within {self._cfg.check_timeout_s:g} s"
            w.silent = isinstance(exc, NodeUnreachable | TimeoutError)
            await self._failed(name, w, breaker, now, time.monotonic() - t0, why,
                               exc.reason if isinstance(exc, NodeUnreachable) else None)
            return
        self._set_breaker(name, w, breaker.record(True, now))
        w.last_check = now
        w.last_answer = self._clock()
        w.silent = False
        sample: gpus.NodeSample | None = None
        if res.exit_code != 0:
            new = hl.probe_failed(f"probe exited with code {res.exit_code}: "
                                  f"{res.stderr_line()}")
        else:
            try:
                sample = gpus.parse_probe(res.stdout, expect_gpus=expect_gpus, ts=now)
            except gpus.ProbeError as exc:
                new = hl.probe_failed(str(exc))
            else:
                sample = _with_latency(sample, _latency_ms(wall, sample, w.latencies))
                new = hl.score(sample, thresholds_from(self._cfg),
                               expect_ranks=bool(running_ranks), expect_gpus=expect_gpus)
                w.samples.append(sample)
                self._account(state, name, sample)
        self._host.stats.health_check(name, wall, sample is not None)
        w.last_error = None if sample is not None else new.reason
        w.score = new.score
        extra: list[ev.Event] = []
        if sample is not None and node.inventory is None and sample.gpu_error is None:
            found = gpus.inventory(sample.gpus)
            extra.append(ev.NodeInventoried(
                node=name, gpus=found, mismatch=gpus.compare_inventory(node.spec.gpus, found)))
        await self._record(name, w, new, sample, extra)
        self.on_answer(name)

    async def _failed(self, name: str, w: _Watch, breaker: hl.Breaker, now: float,
                      seconds: float, why: str, unreachable: str | None = None) -> None:
        """A check failed. ``unreachable``: no connection could be made at all (refused, no
        answer, host key, login, SFTP), said at once; other failures (a probe that hangs
        on a working link) count towards the breaker, which says it after a few."""
        self._host.stats.health_check(name, seconds, False)
        w.last_check = now
        w.last_error = why
        # The backoff runs from the failure, not from the check's start (a check may take
        # its whole timeout): else the breaker reads half-open, due, the moment it opens.
        after = breaker.record(False, self._clock(), jitter=self._jitter())
        self._set_breaker(name, w, after)
        logger.info("%s (failure %d)", why, after.failures)
        prev = self._prev(name, w)
        if unreachable is not None:
            reason = unreachable
        elif after.state is hl.BreakerState.OPEN:
            if prev is not None and prev.health is NodeHealth.UNREACHABLE \
                    and prev.reason != hl.NOT_CONTACTED:
                return  # already said, with its reason; a count that grows is not news
            reason = (f"{after.failures} consecutive checks failed, last: {why}"
                      if after.failures > 1 else f"its check failed: {why}")
        else:
            return
        w.score = None
        await self._record(name, w, hl.unreachable(prev, reason), None, [])

    async def _answers_again(self, name: str, agent: NodeAgent) -> bool:
        """Whether a silent node's transport answers now (then its reconnect backoff is
        forgotten, so the trial that follows connects at once)."""
        transport = agent.transport
        if not await transport.poke(min(1.0, self._cfg.check_timeout_s)):
            return False
        logger.info("node %s answers again: checking it now", name)
        forget = getattr(transport, "forget_failures", None)
        if forget is not None:
            forget()
        return True

    async def suspect(self, name: str, why: str) -> None:
        """Something other than a check failed to reach ``name`` (a launch, a kill): the log
        says unreachable now, for the planner too, and a check runs at once; the node is
        reachable again as soon as a check passes."""
        state = self._host.ledger.state
        node = state.nodes.get(name)
        if self._closed or node is None or name not in self._agents:
            return
        if node.health is not NodeHealth.UNREACHABLE:
            w = self._watch_for(name, state)
            w.silent = True
            await self._record(name, w, hl.unreachable(self._prev(name, w), why), None, [])
        await self.check_now(name)

    def _prev(self, name: str, w: _Watch) -> hl.Assessment | None:
        """What the log says of the node now: the one record every reader goes by."""
        node = self._host.ledger.state.nodes.get(name)
        return hl.known(node) if node is not None else w.prev

    # ---- the node's probe process ---------------------------------------------------

    async def _probe(self, name: str, agent: NodeAgent,
                     pid_files: list[str]) -> tuple[CommandResult, float]:
        """One probe of the node: (its output as a command result, round-trip seconds).

        Asks the node's long-lived probe process, starting it first if needed. The
        caller's deadline applies; a request that fails or is cut short takes the
        process down with it (the next sweep starts a fresh one), so a late answer can
        never be read as the answer to a later request.
        """
        link = self._links.get(name)
        if link is None:
            link = await self._start_link(name, agent)
            if link is None:  # no probe process possible there: the one-shot form says why
                t1 = time.monotonic()
                res = await agent.transport.run(probe.probe_argv(
                    agent.python, await agent.work_dir(), pid_files,
                    smi_timeout_s=self._smi_timeout_s()))
                return res, time.monotonic() - t1
        link.last_id += 1
        rid = link.last_id
        try:
            t1 = time.monotonic()
            await link.stream.write(probe.probe_request(rid, pid_files))
            while True:
                line = await link.stream.readline()
                if not line:
                    raise TransportError(name, "the probe process ended")
                if probe.probe_line_kind(line) == ("answer", rid):
                    return CommandResult(0, line, b""), time.monotonic() - t1
        except BaseException:
            self._drop_link(name)
            raise

    async def _start_link(self, name: str, agent: NodeAgent) -> _ProbeLink | None:
        """Start the node's probe process; None when it does not come up (not a link error)."""
        argv = probe.probe_server_argv(agent.python, await agent.work_dir(),
                                      smi_timeout_s=self._smi_timeout_s())
        try:
            stream = await agent.transport.open_stream(argv)
        except TransportError:
            return None  # a local exec failure lands here too; the one-shot run tells which
        try:
            while True:
                line = await stream.readline()
                if not line:
                    break
                if probe.probe_line_kind(line)[0] == "ready":
                    link = self._links[name] = _ProbeLink(stream, agent)
                    return link
        except BaseException:
            self._close_later(stream)
            raise
        self._close_later(stream)
        return None

    def _smi_timeout_s(self) -> float:
        return min(5.0, self._cfg.check_timeout_s / 2)

    def _drop_link(self, name: str) -> None:
        link = self._links.pop(name, None)
        if link is not None:
            self._close_later(link.stream)

    def _close_later(self, stream: Stream) -> None:
        """Close a stream without making the caller wait (an SSH close may take seconds)."""
        task = asyncio.get_running_loop().create_task(stream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _set_breaker(self, name: str, w: _Watch, new: hl.Breaker) -> None:
        if new.state is not w.breaker.state:
            self._host.stats.breaker(name, new.state.value)
            if new.state is hl.BreakerState.OPEN:
                logger.warning("node %s: breaker open, next try in %.0f s", name,
                               (new.retry_at or 0.0) - self._clock())
            elif new.state is hl.BreakerState.CLOSED:
                logger.info("node %s: breaker closed", name)
        w.breaker = new

    async def _record(self, name: str, w: _Watch, new: hl.Assessment,
                      sample: gpus.NodeSample | None, extra: list[ev.Event]) -> None:
        # Compared with the log, not with the monitor's memory: others record a node's
        # health too (ugrod marks a new SSH node unreachable until its first contact).
        change = hl.transitions(self._prev(name, w), new)
        events = [*extra, *hl.to_events(name, change, new,
                                         gpus.sample_summary(sample) if sample else {})]
        if not events:
            w.prev = new
            return
        try:
            await self._host.ledger.record(ev.DAEMON, *events)
        except InvalidEvent as exc:  # the node was removed while it was being probed
            logger.info("health of %s not recorded: %s", name, exc)
            return
        w.prev = new
        if change.health is not None:
            log = logger.warning if change.health is not NodeHealth.HEALTHY else logger.info
            log("node %s is %s: %s", name, change.health.value, new.reason)

    async def _rank_pid_files(self, name: str, state: State,
                              agent: NodeAgent) -> tuple[list[str], int]:
        """Pid files of the ranks that should be running on this node right now."""
        files: list[str] = []
        for job_id in state.jobs_on(name):
            job = state.jobs[job_id]
            if job.state is not JobState.RUNNING or job.stopping is not None:
                continue
            own = self._agent_for(job, name) if self._agent_for is not None else agent
            for r in job.ranks:
                if r.node == name and r.exit_code is None:
                    files.append(f"{await own.run_dir(job.id, job.attempt, r.rank)}/pid")
        return files, len(files)

    def _account(self, state: State, name: str, sample: gpus.NodeSample) -> None:
        by_uuid = {g.uuid: g for g in sample.gpus}
        by_index = {g.index: g for g in sample.gpus}
        for job_id in state.jobs_on(name):
            job = state.jobs[job_id]
            if job.state is not JobState.RUNNING:
                continue
            attempt, table = self._usage.get(job.id) or self._saved_usage(job) \
                or (job.attempt, {})
            if attempt != job.attempt:
                table = {}
            self._usage[job.id] = (job.attempt, table)
            self._usage_dirty.add(job.id)
            for p in job.placement:
                if p.node != name:
                    continue
                for i, index in enumerate(p.gpus):
                    uuid = p.gpu_uuids[i] if i < len(p.gpu_uuids) else ""
                    g = by_uuid.get(uuid) if uuid else by_index.get(index)
                    if g is None:
                        continue
                    u = table.setdefault((p.rank, index), _Usage(rank=p.rank, node=name,
                                                                 gpu=index))
                    u.add(g)

    def _saved_usage(self, job: Job) -> tuple[int, dict[tuple[int, int], _Usage]] | None:
        """A job's figures as gpu_use.json kept them (after a restart), or None."""
        if self.job_dir is None:
            return None
        table = {}
        for row in job_results.load_usage(self.job_dir(job.id), job.attempt):
            u = _Usage.from_saved(row)
            if u is not None:
                table[(u.rank, u.gpu)] = u
        return (job.attempt, table) if table else None

    def _save_usage(self) -> None:
        """Write the figures that changed this sweep (per job: gpu_use.json)."""
        dirty, self._usage_dirty = self._usage_dirty, set()
        if self.job_dir is None:
            return
        for job_id in dirty:
            entry = self._usage.get(job_id)
            if entry is None:
                continue
            rows = [u.saved() for u in entry[1].values()]
            try:
                job_results.store_usage(self.job_dir(job_id), entry[0], rows)
            except OSError as exc:
                logger.warning("cannot save the GPU use of %s: %s", job_id, exc)

    def _prune_usage(self, state: State) -> None:
        for job_id in list(self._usage):
            job = state.jobs.get(job_id)
            if job is None:
                del self._usage[job_id]
        while len(self._usage) > 500:  # ended jobs' figures: keep the newest few hundred
            del self._usage[next(iter(self._usage))]

    # ---- on demand -------------------------------------------------------------------

    async def check(self, name: str, *, deep: bool = False) -> list[dict[str, Any]]:
        """``ugroctl health NODE [--deep]``: checks as ``{"name","ok","detail"}``.

        Runs a probe now (and with ``deep`` the readiness script); records nothing.
        """
        state = self._host.ledger.state
        node = state.nodes.get(name)
        agent = self._agents.get(name)
        if node is None or agent is None:
            return [{"name": "reachable", "ok": False, "detail": f"no node named {name}"}]
        expect_gpus = len(node.gpus)
        out: list[dict[str, Any]] = []
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self._cfg.check_timeout_s):
                pid_files, running = await self._rank_pid_files(name, state, agent)
                work_dir = await agent.work_dir()
                t0 = time.monotonic()
                res = await agent.transport.run(probe.probe_argv(agent.python, work_dir,
                                                                pid_files))
        except (TransportError, TimeoutError, OSError) as exc:
            if isinstance(exc, NodeUnreachable) and node.health is not NodeHealth.UNREACHABLE:
                await self.check_now(name)  # the log must not say reachable any more
            return [{"name": "reachable", "ok": False,
                     "detail": str(exc) or f"no answer within {self._cfg.check_timeout_s:g} s"}]
        wall = time.monotonic() - t0
        if node.health is NodeHealth.UNREACHABLE:
            await self.check_now(name)  # it answers: the log and the planner learn it now
        out.append({"name": "reachable", "ok": True, "detail": f"answered in {wall * 1000:.0f} ms"})
        try:
            if res.exit_code != 0:
                raise gpus.ProbeError(f"probe exited with code {res.exit_code}",
                                      res.stderr.decode("utf-8", "replace"))
            sample = gpus.parse_probe(res.stdout, expect_gpus=expect_gpus, ts=self._clock())
        except gpus.ProbeError as exc:
            out.append({"name": "probe", "ok": False, "detail": str(exc)})
            return out
        sample = _with_latency(sample, _latency_ms(wall, sample, deque(maxlen=1)))
        a = hl.score(sample, thresholds_from(self._cfg), expect_ranks=bool(running),
                     expect_gpus=expect_gpus)
        out += _quick_checks(sample, a, expect_gpus, bool(running))
        if deep:
            out += await self._deep(agent, work_dir, expect_gpus)
        return out

    async def _deep(self, agent: NodeAgent, work_dir: str,
                    expect_gpus: int) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(DEEP_TIMEOUT_S):
                res = await agent.transport.run(probe.readiness_argv(
                    agent.python, work_dir, timeout_s=DEEP_TIMEOUT_S - 10))
            checks = gpus.parse_readiness(res.stdout, expect_gpus=expect_gpus,
                                          min_free_bytes=MIN_FREE_BYTES)
        except (TransportError, TimeoutError, OSError) as exc:
            return [{"name": "readiness", "ok": False,
                     "detail": str(exc) or f"no answer within {DEEP_TIMEOUT_S:g} s"}]
        except gpus.ProbeError as exc:
            return [{"name": "readiness", "ok": False, "detail": str(exc)}]
        return [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]


def _quick_checks(s: gpus.NodeSample, a: hl.Assessment, expect_gpus: int,
                  ranks: bool) -> list[dict[str, Any]]:
    alerts = {x.key: x for x in a.alerts}

    def row(name: str, keys: tuple[str, ...], fine: str) -> dict[str, Any]:
        bad = [alerts[k] for k in keys if k in alerts]
        crit = any(x.severity is hl.Severity.CRITICAL for x in bad)
        return {"name": name, "ok": not crit,
                "detail": "; ".join(x.message for x in bad) or fine}

    temps = [g.temperature_c for g in s.gpus if g.temperature_c is not None]
    out = [
        row("gpus", (hl.GPU_CHECK, hl.GPU_MISSING, hl.GPU_ERROR),
            f"{len(s.gpus)} GPU(s)" + (f", expected {expect_gpus}" if expect_gpus else "")),
        row("gpu_temperature", (hl.GPU_TEMPERATURE,),
            f"max {max(temps):.0f} °C" if temps else "no reading"),
        row("gpu_memory", (hl.GPU_MEMORY,), "below thresholds"),
        row("memory", (hl.MEMORY,), f"{s.mem_percent:.0f}% used"
            if s.mem_percent is not None else "no reading"),
        row("disk", (hl.DISK,), f"{s.disk_percent:.0f}% used in {s.disk_path}"
            if s.disk_percent is not None else "no reading"),
        row("latency", (hl.LATENCY,), f"{s.latency_ms:.0f} ms" if s.latency_ms is not None
            else "no reading"),
    ]
    if ranks:
        out.append(row("rank_processes", (hl.RANK_PROCESSES,),
                       f"{sum(r.alive for r in s.ranks)} of {len(s.ranks)} alive"))
    out.append({"name": "score", "ok": a.health in (NodeHealth.HEALTHY,
                                                    NodeHealth.DEGRADED),
                "detail": f"{a.score:.0f} ({a.health.value})" if a.score is not None
                else a.health.value})
    return out


def _latency_ms(wall_s: float, sample: gpus.NodeSample, window: deque[float]) -> float:
    """The link's share of a probe's round trip, in ms.

    Round trip minus the time the probe process existed on the node: what is
    left is the network, the SSH channel and the node's session setup. The
    minimum over the last few sweeps (``window`` keeps the raw values), as RTT
    estimators do, so one busy moment on either end raises no latency alert.
    """
    window.append(max(0.0, wall_s - (sample.node_s or 0.0)) * 1000.0)
    return min(window)


def _with_latency(sample: gpus.NodeSample, latency_ms: float) -> gpus.NodeSample:
    return msgspec.structs.replace(sample, latency_ms=round(latency_ms, 2))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _last_activity(state: State) -> float | None:
    """When jobs last started or ended, from state (so a restart keeps the ladder)."""
    times = [t for j in state.jobs.values()
             for t in (j.submitted_at, j.started_at, j.running_at, j.ended_at) if t]
    return max(times) if times else None
