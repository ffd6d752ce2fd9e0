"""How a node is probed: its long-lived probe process, the probe's latency, the config's
thresholds, and the on-demand checks (``ugroctl health NODE [--deep]``).

A health check is one request line to a process started at first contact over the
node's transport (``python3 -c`` the probe server, no shell), so a sweep starts no
process and opens no SSH session: that is what keeps a 50-node sweep well under a
second. Where that process cannot be started (no usable Python there), the one-shot
probe runs instead, so the failure is reported with its exit code and stderr.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ugrod.config.schema import HealthConfig
from ugrod.core import gpus
from ugrod.core import health as hl
from ugrod.core.state import Node, NodeHealth
from ugrod.nodes import probe
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import CommandResult, NodeUnreachable, Stream, TransportError

DEEP_TIMEOUT_S = 120.0  # `import torch` on a cold disk is slow
MIN_FREE_BYTES = 10 * 1024**3


class _ProbeLink:
    """A node's long-lived probe process: its stream and the last request id."""

    def __init__(self, stream: Stream, agent: NodeAgent) -> None:
        self.stream = stream
        self.agent = agent
        self.last_id = 0


class ProbeLinks:
    """The probe process of every node that has one, by node name."""

    def __init__(self) -> None:
        self._links: dict[str, _ProbeLink] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def agent(self, name: str) -> NodeAgent | None:
        """The agent the node's probe process was started through (None: no process)."""
        link = self._links.get(name)
        return link.agent if link is not None else None

    def names(self) -> list[str]:
        """The nodes with a probe process now."""
        return list(self._links)

    async def close(self) -> None:
        """End every probe process and wait for their streams to close."""
        for name in list(self._links):
            self.drop(name)
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def probe(self, name: str, agent: NodeAgent, pid_files: list[str], *,
                    smi_timeout_s: float) -> tuple[CommandResult, float]:
        """One probe of the node: (its output as a command result, round-trip seconds).

        Asks the node's long-lived probe process, starting it first if needed. The
        caller's deadline applies; a request that fails or is cut short takes the
        process down with it (the next sweep starts a fresh one), so a late answer can
        never be read as the answer to a later request.
        """
        link = self._links.get(name)
        if link is None:
            link = await self._start(name, agent, smi_timeout_s)
            if link is None:  # no probe process possible there: the one-shot form says why
                t1 = time.monotonic()
                res = await agent.transport.run(probe.probe_argv(
                    agent.python, await agent.work_dir(), pid_files,
                    smi_timeout_s=smi_timeout_s))
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
            self.drop(name)
            raise

    async def _start(self, name: str, agent: NodeAgent,
                     smi_timeout_s: float) -> _ProbeLink | None:
        """Start the node's probe process; None when it does not come up (not a link error)."""
        argv = probe.probe_server_argv(agent.python, await agent.work_dir(),
                                      smi_timeout_s=smi_timeout_s)
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

    def drop(self, name: str) -> None:
        """End the node's probe process (the next probe starts a fresh one)."""
        link = self._links.pop(name, None)
        if link is not None:
            self._close_later(link.stream)

    def _close_later(self, stream: Stream) -> None:
        """Close a stream without making the caller wait (an SSH close may take seconds)."""
        task = asyncio.get_running_loop().create_task(stream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


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


def latency_ms(wall_s: float, sample: gpus.NodeSample, window: deque[float]) -> float:
    """The link's share of a probe's round trip, in ms.

    Round trip minus the time the probe process existed on the node: what is
    left is the network, the SSH channel and the node's session setup. The
    minimum over the last few sweeps (``window`` keeps the raw values), as RTT
    estimators do, so one busy moment on either end raises no latency alert.
    """
    window.append(max(0.0, wall_s - (sample.node_s or 0.0)) * 1000.0)
    return min(window)


def with_latency(sample: gpus.NodeSample, latency: float) -> gpus.NodeSample:
    """The sample with its latency (ms) filled in."""
    return msgspec.structs.replace(sample, latency_ms=round(latency, 2))


async def on_demand(node: Node, agent: NodeAgent, cfg: HealthConfig, *, deep: bool,
                    clock: Callable[[], float],
                    ranks: Callable[[], Awaitable[tuple[list[str], int]]],
                    recheck: Callable[[], Awaitable[None]]) -> list[dict[str, Any]]:
    """``ugroctl health NODE [--deep]``'s checks as ``{"name","ok","detail"}``: a probe now
    (``ranks``: the pid files of the ranks that should run there, and how many), and with
    ``deep`` the readiness script. ``recheck`` has the monitor probe the node and record
    what it finds: called when its reachability is not what the log says."""
    expect_gpus = len(node.gpus)
    out: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(cfg.check_timeout_s):
            pid_files, running = await ranks()
            work_dir = await agent.work_dir()
            t0 = time.monotonic()
            res = await agent.transport.run(probe.probe_argv(agent.python, work_dir,
                                                             pid_files))
    except (TransportError, TimeoutError, OSError) as exc:
        if isinstance(exc, NodeUnreachable) and node.health is not NodeHealth.UNREACHABLE:
            await recheck()  # the log must not say reachable any more
        return [{"name": "reachable", "ok": False,
                 "detail": str(exc) or f"no answer within {cfg.check_timeout_s:g} s"}]
    wall = time.monotonic() - t0
    if node.health is NodeHealth.UNREACHABLE:
        await recheck()  # it answers: the log and the planner learn it now
    out.append({"name": "reachable", "ok": True, "detail": f"answered in {wall * 1000:.0f} ms"})
    try:
        if res.exit_code != 0:
            raise gpus.ProbeError(f"probe exited with code {res.exit_code}",
                                  res.stderr.decode("utf-8", "replace"))
        sample = gpus.parse_probe(res.stdout, expect_gpus=expect_gpus, ts=clock())
    except gpus.ProbeError as exc:
        out.append({"name": "probe", "ok": False, "detail": str(exc)})
        return out
    sample = with_latency(sample, latency_ms(wall, sample, deque(maxlen=1)))
    a = hl.score(sample, thresholds_from(cfg), expect_ranks=bool(running),
                 expect_gpus=expect_gpus)
    out += _quick_checks(sample, a, expect_gpus, bool(running))
    if deep:
        out += await _deep(agent, work_dir, expect_gpus)
    return out


async def _deep(agent: NodeAgent, work_dir: str, expect_gpus: int) -> list[dict[str, Any]]:
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
