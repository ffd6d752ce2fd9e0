"""Health sweeps: probe every node at once, score, drive breakers, record transitions.

The imperative shell around ``ugrod.core.health`` and ``ugrod.core.gpus``. A sweep runs
one probe per node concurrently, each under its own deadline, and each node
records its own transitions as soon as it is done, so a slow node never holds
up the others. How a node is probed (a long-lived probe process per node) and
the on-demand checks are ``probing.py``'s; GPU use per job is ``gpu_use.py``'s.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ugrod.config.schema import HealthConfig
from ugrod.core import events as ev
from ugrod.core import gpus
from ugrod.core import health as hl
from ugrod.core.state import Job, JobState, NodeHealth, State
from ugrod.loops.gpu_use import GpuUse
from ugrod.loops.node_watch import Host, NodeWatches
from ugrod.loops.probing import ProbeLinks, latency_ms, on_demand, thresholds_from, with_latency
from ugrod.loops.schedule import Schedule
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import (
    NodeUnreachable,
    Transport,
    TransportError,
)

logger = logging.getLogger("ugrod.loops.monitor")

JOB_ID = "health-sweep"
_ACTIVITY = (ev.JobSubmitted, ev.JobPlaced, ev.JobRunning, ev.JobEnded, ev.JobResumed,
             ev.JobCancelRequested)


def intervals_from(cfg: HealthConfig) -> hl.Intervals:
    i = cfg.intervals
    return hl.Intervals(active_s=i.active_s, recent_s=i.recent_s, idle_s=i.idle_s,
                        long_idle_s=i.long_idle_s, max_s=i.max_s,
                        recent_window_s=i.recent_window_s, idle_window_s=i.idle_window_s)


class Monitor:
    """Owns the per-node breakers and sample buffers; sweeps on a scheduled job."""

    def __init__(self, host: Host, agents: Mapping[str, NodeAgent],
                 transports: Mapping[str, Transport], *,
                 agent_for: Callable[[Job, str], NodeAgent] | None = None,
                 job_dir: Callable[[str], Path] | None = None,
                 clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        self._host = host
        # the agent a job's ranks use on a node (default: the node's own)
        self._agent_for = agent_for
        self._agents: Mapping[str, NodeAgent] = agents
        self._transports: Mapping[str, Transport] = transports
        self._clock = clock
        # what is known of each node between sweeps, and its transitions to the log
        self.nodes = NodeWatches(host, clock=clock, jitter=jitter)
        # GPU use per job and rank, kept in the job's directory (gpu_use.json) for restarts
        self.gpu_use = GpuUse(job_dir)
        self._lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._links = ProbeLinks()
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
        for name in self._links.names():
            if agents.get(name) is not self._links.agent(name):
                self._links.drop(name)
        self.nodes.forget_missing(agents)

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
        await self._links.close()

    # ---- reading -------------------------------------------------------------------

    def latest_samples(self) -> dict[str, gpus.NodeSample]:
        """Each node's newest sample."""
        return self.nodes.latest_samples()

    def latest_scores(self) -> dict[str, float | None]:
        """Each node's newest score, recorded or not."""
        return self.nodes.latest_scores()

    def history(self, name: str) -> list[gpus.NodeSample]:
        """The node's samples, oldest first."""
        return self.nodes.history(name)

    def last_answer(self, name: str) -> float | None:
        """When ``name`` last answered a check (this monitor's clock), None if never."""
        return self.nodes.last_answer(name)

    def unanswered_s(self, name: str) -> float | None:
        """Seconds since ``name`` last answered a check; None if it has not since start."""
        return self.nodes.unanswered_s(name)

    def breaker(self, name: str) -> hl.Breaker | None:
        """The node's circuit breaker (None: never checked)."""
        return self.nodes.breaker(name)

    def view(self, name: str) -> dict[str, Any] | None:
        """What the API adds to a node: latest sample, check time, breaker, live score."""
        return self.nodes.view(name)

    def job_resources(self, job: Job) -> dict[str, Any]:
        """Average and peak GPU use per rank and GPU over the job's current attempt."""
        return self.gpu_use.job_resources(job)

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
            self.gpu_use.prune(self._host.ledger.state)
            self.gpu_use.save()
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

    async def check_node(self, name: str, *, force: bool = False) -> None:
        """One sweep's check of one node: probe (if the breaker allows), score, record."""
        state = self._host.ledger.state
        node = state.nodes.get(name)
        agent = self._agents.get(name)
        if node is None or agent is None:
            return
        w = self.nodes.for_node(name, state)
        now = self._clock()
        breaker = w.breaker.at(now)
        if not breaker.due(now):
            # A node that went silent is tried as soon as it answers again (a cheap poke
            # each sweep), not only when its backoff ends: it takes work again at once.
            if not force and not (w.silent and await self._answers_again(name, agent)):
                return
            breaker = msgspec.structs.replace(breaker, state=hl.BreakerState.HALF_OPEN)
        self.nodes.set_breaker(name, w, breaker)
        expect_gpus = len(node.gpus)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self._cfg.check_timeout_s):
                pid_files, running_ranks = await self._rank_pid_files(name, state, agent)
                res, wall = await self._links.probe(name, agent, pid_files,
                                                    smi_timeout_s=self._smi_timeout_s())
        except (TransportError, TimeoutError, OSError) as exc:
            why = str(exc) if not isinstance(exc, TimeoutError) else \
                f"node {name}: probe did not answer within {self._cfg.check_timeout_s:g} s"
            w.silent = isinstance(exc, NodeUnreachable | TimeoutError)
            await self.nodes.failed(name, w, breaker, now, time.monotonic() - t0, why,
                               exc.reason if isinstance(exc, NodeUnreachable) else None)
            return
        self.nodes.set_breaker(name, w, breaker.record(True, now))
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
                sample = with_latency(sample, latency_ms(wall, sample, w.latencies))
                new = hl.score(sample, thresholds_from(self._cfg),
                               expect_ranks=bool(running_ranks), expect_gpus=expect_gpus)
                w.samples.append(sample)
                self.gpu_use.account(state, name, sample)
        self._host.stats.health_check(name, wall, sample is not None)
        w.last_error = None if sample is not None else new.reason
        w.score = new.score
        extra: list[ev.Event] = []
        if sample is not None and node.inventory is None and sample.gpu_error is None:
            found = gpus.inventory(sample.gpus)
            extra.append(ev.NodeInventoried(
                node=name, gpus=found, mismatch=gpus.compare_inventory(node.spec.gpus, found)))
        await self.nodes.record(name, w, new, sample, extra)
        self.on_answer(name)

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
            w = self.nodes.for_node(name, state)
            w.silent = True
            await self.nodes.record(name, w, hl.unreachable(self.nodes.prev(name, w), why),
                                    None, [])
        await self.check_now(name)

    # ---- the node's probe process ---------------------------------------------------

    def _smi_timeout_s(self) -> float:
        return min(5.0, self._cfg.check_timeout_s / 2)

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

    # ---- on demand -------------------------------------------------------------------

    async def check(self, name: str, *, deep: bool = False) -> list[dict[str, Any]]:
        """``ugroctl health NODE [--deep]``: checks as ``{"name","ok","detail"}``.

        Runs a probe now (and with ``deep`` the readiness script); records nothing,
        unless the log's word on the node's reachability turns out wrong (``check_now``).
        """
        state = self._host.ledger.state
        node = state.nodes.get(name)
        agent = self._agents.get(name)
        if node is None or agent is None:
            return [{"name": "reachable", "ok": False, "detail": f"no node named {name}"}]
        return await on_demand(node, agent, self._cfg, deep=deep, clock=self._clock,
                               ranks=lambda: self._rank_pid_files(name, state, agent),
                               recheck=lambda: self.check_now(name))


def _last_activity(state: State) -> float | None:
    """When jobs last started or ended, from state (so a restart keeps the ladder)."""
    times = [t for j in state.jobs.values()
             for t in (j.submitted_at, j.started_at, j.running_at, j.ended_at) if t]
    return max(times) if times else None
