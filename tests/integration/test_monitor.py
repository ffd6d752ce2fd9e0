"""Health sweeps against real nodes: local subprocesses and real sshd, fake nvidia-smi.

The fake nvidia-smi (tests/fake_nvidia_smi) sits first on each node's PATH with
its state.json beside it; a test rewrites that file to heat a GPU, break the
driver or hang it. Faults in the link are injected by subclassing the real
LocalTransport, never by mocking our code.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from sshd_nodes import SshdCluster, SshdNode

from ugrod.config import schema as cfgmod
from ugrod.core import events as ev
from ugrod.core.health import BreakerState
from ugrod.core.state import NodeHealth
from ugrod.loops.monitor import JOB_ID, Monitor
from ugrod.loops.schedule import Schedule
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import CommandResult, Transport, TransportError
from ugrod.nodes.transport.local import LocalStream, LocalTransport
from ugrod.store.ledger import Ledger

FAKE_DIR = Path(__file__).resolve().parents[1] / "fake_nvidia_smi"
SCENARIOS = FAKE_DIR / "scenarios"


class Clock:
    """The monitor's clock: real time plus whatever a test skips ahead."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


@dataclass
class Host:
    """What a Monitor needs of the daemon (the real ledger, config and stats)."""

    ledger: Ledger
    config: cfgmod.Config
    stats: RuntimeStats = field(default_factory=RuntimeStats)
    recorded: list[ev.Event] = field(default_factory=list)

    def health_events(self, node: str) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        for e in self.recorded:
            if getattr(e, "node", None) != node:
                continue
            if isinstance(e, ev.NodeHealthChanged):
                out.append(("health", e.health))
            elif isinstance(e, ev.AlertRaised):
                out.append(("raised", e.alert, e.severity))
            elif isinstance(e, ev.AlertCleared):
                out.append(("cleared", e.alert))
        return out


def install_fake(bin_dir: Path, scenario: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(FAKE_DIR / "nvidia-smi", bin_dir / "nvidia-smi")
    set_scenario(bin_dir, scenario)


def set_scenario(bin_dir: Path, scenario: str) -> None:
    tmp = bin_dir / "state.json.tmp"
    tmp.write_text((SCENARIOS / f"{scenario}.json").read_text())
    tmp.replace(bin_dir / "state.json")


async def make_host(tmp: Path, nodes: Sequence[cfgmod.NodeConfig],
                    check_timeout_s: float = 5.0, interval_s: float | None = None) -> Host:
    # Session setup of a local sshd on a busy test machine can take 100+ ms: latency
    # scoring has its own unit tests, here it would only add noise.
    lenient = cfgmod.Thresholds(latency_ms=cfgmod.Level(5000.0, 10000.0))
    health = cfgmod.HealthConfig(check_timeout_s=check_timeout_s, thresholds=lenient)
    if interval_s is not None:
        health = msgspec.structs.replace(health, intervals=cfgmod.Intervals(
            active_s=interval_s, recent_s=interval_s, idle_s=interval_s,
            long_idle_s=interval_s))
    config = cfgmod.Config(nodes=tuple(nodes), health=health)
    ledger = Ledger.open(tmp / "state")
    host = Host(ledger=ledger, config=config)
    ledger.on_commit(lambda records, _: host.recorded.extend(r.event for r in records))
    await ledger.record(ev.DAEMON, *(ev.NodeAdded(node=n.spec()) for n in nodes))
    host.recorded.clear()
    return host


RTX4070 = ev.Gpu(index=0, model="RTX 4070", vram_bytes=12 * 1024**3)


# ---- local nodes -------------------------------------------------------------------


class FlakyTransport(LocalTransport):
    """A LocalTransport whose link can be cut or slowed by the test.

    ``calls`` counts probes: a command run, or a request sent on a stream (to the
    node's long-lived probe process). A stream cannot be opened while the link is cut
    (the monitor then tries the one-shot probe, which counts).
    """

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.down = False
        self.delay_s = 0.0
        self.calls = 0

    async def _through(self) -> None:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.down:
            raise TransportError(self.node, "connection refused")

    async def run(self, argv: Sequence[str], *, input: bytes | None = None) -> CommandResult:
        await self._through()
        return await super().run(argv, input=input)

    async def open_stream(self, argv: Sequence[str]) -> FlakyStream:
        if self.down:
            raise TransportError(self.node, "connection refused")
        return FlakyStream(self, await super().open_stream(argv))


class FlakyStream:
    """A real LocalStream behind the same cut-able link: a cut breaks open streams too."""

    def __init__(self, transport: FlakyTransport, inner: LocalStream) -> None:
        self._t = transport
        self._inner = inner

    async def write(self, data: bytes) -> None:
        await self._t._through()
        await self._inner.write(data)

    async def readline(self) -> bytes:
        if self._t.down:
            raise TransportError(self._t.node, "connection lost")
        return await self._inner.readline()

    async def close(self) -> None:
        await self._inner.close()


@pytest.fixture
def local_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Local nodes run with the fake nvidia-smi first on PATH."""
    bin_dir = tmp_path / "bin"
    install_fake(bin_dir, "two_gpus")
    monkeypatch.delenv("FAKE_NVIDIA_SMI_STATE", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    yield bin_dir


def local_node(tmp: Path, name: str, *, gpus: tuple[ev.Gpu, ...] | None = None,
               python: str = sys.executable) -> cfgmod.NodeConfig:
    return cfgmod.NodeConfig(name=name, host="127.0.0.1", transport="local",
                             work_dir=str(tmp / f"work-{name}"), python=python, gpus=gpus)


@pytest.fixture
async def local(tmp_path: Path, local_bin: Path) -> AsyncIterator[tuple[Host, Monitor,
                                                                         FlakyTransport]]:
    nc = local_node(tmp_path, "n1")
    host = await make_host(tmp_path, [nc])
    t = FlakyTransport("n1")
    agents = {"n1": NodeAgent(t, nc.work_dir, nc.python)}
    monitor = Monitor(host, agents, {"n1": t}, clock=Clock(), jitter=lambda: 0.0)
    try:
        yield host, monitor, t
    finally:
        await monitor.close()
        await host.ledger.close()


async def test_sweep_samples_inventories_and_views(
        local: tuple[Host, Monitor, FlakyTransport]) -> None:
    host, monitor, _ = local
    await monitor.sweep()
    (inv,) = [e for e in host.recorded if isinstance(e, ev.NodeInventoried)]
    assert [g.model for g in inv.gpus] == ["NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 4060"]
    assert inv.mismatch is None  # the config did not state GPUs
    assert host.health_events("n1") == [("health", "healthy")]  # the first measured score
    assert host.ledger.state.node("n1").score == 100.0
    sample = monitor.latest_samples()["n1"]
    assert len(sample.gpus) == 2 and sample.latency_ms is not None and sample.latency_ms < 1000
    assert monitor.latest_scores() == {"n1": 100.0}
    view = monitor.view("n1")
    assert view is not None and view["breaker"] == "closed" and view["last_check"]
    assert view["sample"]["gpus"][0]["temperature_c"] == 71
    assert host.stats.health_checks["n1"].value == 1
    await monitor.sweep()  # a second sweep: nothing new to record
    assert len(host.recorded) == 2
    assert len(monitor.history("n1")) == 2
    assert monitor.view("n1")["sample"]["cpu_percent"] is not None  # type: ignore[index]


async def test_driver_failure_then_recovery(local: tuple[Host, Monitor, FlakyTransport],
                                            local_bin: Path) -> None:
    host, monitor, _ = local
    await monitor.sweep()  # inventory: the node has 2 GPUs
    set_scenario(local_bin, "driver_failed")
    for _ in range(3):
        await monitor.sweep()
    set_scenario(local_bin, "two_gpus")
    await monitor.sweep()
    assert host.health_events("n1") == [
        ("health", "healthy"), ("raised", "gpu_check", "critical"), ("health", "unhealthy"),
        ("cleared", "gpu_check"), ("health", "healthy")]
    assert host.ledger.state.node("n1").health is NodeHealth.HEALTHY


async def test_hung_nvidia_smi_does_not_hang_the_sweep(
        local: tuple[Host, Monitor, FlakyTransport], local_bin: Path) -> None:
    host, monitor, _ = local
    await monitor.sweep()
    set_scenario(local_bin, "hang")
    t0 = time.monotonic()
    await monitor.sweep()
    assert time.monotonic() - t0 < 5.0  # nvidia-smi's own timeout (half the check deadline)
    assert ("raised", "gpu_check", "critical") in host.health_events("n1")
    assert "did not answer in time" in host.ledger.state.node("n1").health_reason


async def test_breaker_opens_backs_off_and_closes(
        local: tuple[Host, Monitor, FlakyTransport]) -> None:
    host, monitor, t = local
    clock = monitor._clock
    assert isinstance(clock, Clock)
    await monitor.sweep()
    t.down = True
    for i in range(3):
        await monitor.sweep()
        b = monitor.breaker("n1")
        assert b is not None
        assert b.state is (BreakerState.OPEN if i == 2 else BreakerState.CLOSED)
    assert host.health_events("n1") == [("health", "healthy"), ("health", "unreachable")]
    assert host.ledger.state.node("n1").score is None
    calls = t.calls
    await monitor.sweep()  # open: not probed until the backoff has passed
    assert t.calls == calls
    assert host.stats.breakers["n1"] == "open"
    clock.skew += 11
    await monitor.sweep()  # the half-open trial fails: open again, longer
    assert t.calls == calls + 1
    assert host.health_events("n1") == [("health", "healthy"), ("health", "unreachable")]
    b = monitor.breaker("n1")
    assert b is not None and b.retry_at is not None and b.retry_at - clock() > 15
    t.down = False
    clock.skew += 21
    await monitor.sweep()
    assert monitor.breaker("n1").state is BreakerState.CLOSED  # type: ignore[union-attr]
    assert host.health_events("n1") == [("health", "healthy"), ("health", "unreachable"),
                                        ("health", "healthy")]


async def test_probe_that_cannot_run_is_unhealthy_not_unreachable(
        tmp_path: Path, local_bin: Path) -> None:
    nc = local_node(tmp_path, "n1", python="/nonexistent/python3")
    host = await make_host(tmp_path, [nc])
    t = LocalTransport("n1")
    monitor = Monitor(host, {"n1": NodeAgent(t, nc.work_dir, nc.python)}, {"n1": t})
    try:
        await monitor.sweep()
        assert host.health_events("n1") == [("raised", "probe", "critical"),
                                            ("health", "unhealthy")]
        assert monitor.breaker("n1").state is BreakerState.CLOSED  # type: ignore[union-attr]
    finally:
        await host.ledger.close()


async def test_slow_node_does_not_hold_up_the_others(tmp_path: Path, local_bin: Path) -> None:
    ncs = [local_node(tmp_path, n) for n in ("fast", "slow")]
    host = await make_host(tmp_path, ncs, check_timeout_s=1.0)
    ts = {n.name: FlakyTransport(n.name) for n in ncs}
    ts["slow"].delay_s = 30
    agents = {n.name: NodeAgent(ts[n.name], n.work_dir, n.python) for n in ncs}
    monitor = Monitor(host, agents, ts, clock=Clock())
    try:
        t0 = time.monotonic()
        sweep = asyncio.ensure_future(monitor.sweep())
        while not any(isinstance(e, ev.NodeInventoried) and e.node == "fast"
                      for e in host.recorded):
            await asyncio.sleep(0.02)
        assert not sweep.done()  # fast's result is in the log while slow is still out
        assert time.monotonic() - t0 < 1.0
        await monitor.sweep()  # overlapping sweep: refused, returns at once
        assert monitor.sweeps == 0
        await sweep
        assert time.monotonic() - t0 < 3.0  # the slow node's deadline, not its 30 s
        assert monitor.sweeps == 1
        assert host.stats.health_failures["slow"].value == 1
    finally:
        await monitor.close()
        await host.ledger.close()


async def test_a_node_stuck_in_its_deadline_is_skipped_not_waited_for(
        tmp_path: Path, local_bin: Path) -> None:
    ncs = [local_node(tmp_path, n) for n in ("fast", "stuck")]
    host = await make_host(tmp_path, ncs, check_timeout_s=8.0, interval_s=0.5)
    ts = {n.name: FlakyTransport(n.name) for n in ncs}
    ts["stuck"].delay_s = 30
    agents = {n.name: NodeAgent(ts[n.name], n.work_dir, n.python) for n in ncs}
    monitor = Monitor(host, agents, ts, clock=Clock())
    try:
        await monitor.sweep()  # starts both probe processes; stuck's first request hangs
        while "fast" not in monitor.latest_samples():  # python start-up on a busy box
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        for _ in range(3):
            await monitor.sweep()
        assert time.monotonic() - t0 < 3.0  # each sweep waited one interval at most
        assert ts["fast"].calls == 4 and ts["stuck"].calls == 1  # never two checks at once
        assert "stuck" not in host.stats.health_checks  # still inside its deadline
        while "stuck" not in host.stats.health_checks:
            assert time.monotonic() - t0 < 15
            await asyncio.sleep(0.1)
        assert host.stats.health_failures["stuck"].value == 1
    finally:
        await monitor.close()
        await host.ledger.close()


async def test_running_job_ranks_and_resources(tmp_path: Path, local_bin: Path) -> None:
    gpu0 = ev.Gpu(index=0, model="RTX 3060", vram_bytes=12 * 1024**3,
                  uuid="GPU-0a1b2c3d-0000-4000-8000-000000000001")
    gpu1 = ev.Gpu(index=1, model="RTX 4060", vram_bytes=8 * 1024**3,
                  uuid="GPU-0a1b2c3d-0000-4000-8000-000000000002")
    nc = local_node(tmp_path, "n1", gpus=(gpu0, gpu1))
    host = await make_host(tmp_path, [nc])
    t = LocalTransport("n1")
    agent = NodeAgent(t, nc.work_dir, nc.python)
    monitor = Monitor(host, {"n1": agent}, {"n1": t}, clock=Clock())
    try:
        spec = ev.JobSpec(argv=("train",), gpus_per_node=1)
        await host.ledger.record(
            ev.DAEMON, ev.JobSubmitted(job="j1", spec=spec),
            ev.JobPlaced(job="j1", attempt=1, ranks=(ev.RankPlacement(
                rank=0, node="n1", gpus=(1,), gpu_uuids=(gpu1.uuid,)),)),
            ev.RankStarted(job="j1", attempt=1, rank=0, node="n1", pid=os.getpid()),
            ev.JobRunning(job="j1", attempt=1))
        pid_file = Path(await agent.run_dir("j1", 1, 0)) / "pid"
        pid_file.parent.mkdir(parents=True)
        start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
        pid_file.write_text(f"{os.getpid()} {start}\n")
        host.recorded.clear()
        await monitor.sweep()
        await monitor.sweep()
        assert host.health_events("n1") == [("health", "healthy")]
        sample = monitor.latest_samples()["n1"]
        assert [r.alive for r in sample.ranks] == [True]
        res = monitor.job_resources(host.ledger.state.jobs["j1"])
        assert res["ranks"] == [{"rank": 0, "node": "n1", "gpu": 1, "samples": 2,
                                 "util_avg": 0.0, "util_peak": 0.0,
                                 "mem_avg_bytes": 1024**2, "mem_peak_bytes": 1024**2}]
        pid_file.write_text(f"{os.getpid()} 1\n")  # the rank is gone (pid reused)
        await monitor.sweep()
        await monitor.sweep()
        assert host.health_events("n1") == [("health", "healthy"),
                                            ("raised", "rank_processes", "warning")]
    finally:
        await monitor.close()
        await host.ledger.close()


async def test_on_demand_checks(local: tuple[Host, Monitor, FlakyTransport]) -> None:
    host, monitor, t = local
    quick = {c["name"]: c for c in await monitor.check("n1")}
    assert quick["reachable"]["ok"] and quick["gpus"]["ok"] and quick["score"]["ok"]
    assert quick["gpu_temperature"]["detail"] == "max 71 °C"
    deep = {c["name"]: c for c in await monitor.check("n1", deep=True)}
    assert {"python", "torch", "cuda", "disk"} <= set(deep)
    assert deep["python"]["ok"]
    assert host.recorded == []  # on-demand checks record nothing
    t.down = True
    (row,) = await monitor.check("n1")
    assert row == {"name": "reachable", "ok": False, "detail": "node n1: connection refused"}


async def test_interval_follows_activity(local: tuple[Host, Monitor, FlakyTransport]) -> None:
    host, monitor, _ = local
    sched = Schedule()
    sched.start(paused=True)
    try:
        monitor.schedule(sched)
        assert sched.interval_s(JOB_ID) == 40  # never active
        await host.ledger.record(ev.DAEMON, ev.JobSubmitted(
            job="j1", spec=ev.JobSpec(argv=("x",))))
        assert sched.interval_s(JOB_ID) == 10
    finally:
        sched.stop()


# ---- real sshd nodes ------------------------------------------------------------------


@pytest.fixture
async def ssh_cluster(tmp_path: Path, node_guard: SshdCluster) -> AsyncIterator[tuple[
        Host, Monitor, list[SshdNode]]]:
    nodes = list(node_guard)
    for n in nodes:
        install_fake(n.bin_dir, "one_gpu")
    ncs = [cfgmod.NodeConfig(name=n.name, host=n.host, port=n.port, user=n.user,
                             work_dir=str(n.work_dir), python=sys.executable, gpus=(RTX4070,))
           for n in nodes]
    host = await make_host(tmp_path, ncs, check_timeout_s=5.0)
    transports: dict[str, Transport] = {n.name: n.transport(connect_timeout_s=2.0)
                                        for n in nodes}
    agents = {nc.name: NodeAgent(transports[nc.name], nc.work_dir, nc.python) for nc in ncs}
    monitor = Monitor(host, agents, transports, clock=Clock(), jitter=lambda: 0.0)
    try:
        yield host, monitor, nodes
    finally:
        await monitor.close()
        for t in transports.values():
            await t.close()
        await host.ledger.close()
        for n in nodes:
            for f in ("nvidia-smi", "state.json"):
                (n.bin_dir / f).unlink(missing_ok=True)


async def test_gpu_heating_over_ssh_emits_once_per_transition(
        ssh_cluster: tuple[Host, Monitor, list[SshdNode]]) -> None:
    host, monitor, nodes = ssh_cluster
    bin0 = nodes[0].bin_dir
    await monitor.sweep()
    assert all(s.gpus[0].temperature_c == 52 for s in monitor.latest_samples().values())
    set_scenario(bin0, "hot_gpu")
    for _ in range(3):
        await monitor.sweep()
    assert host.ledger.state.node("node0").health is NodeHealth.UNHEALTHY
    set_scenario(bin0, "one_gpu")
    for _ in range(2):
        await monitor.sweep()
    assert host.health_events("node0") == [
        ("health", "healthy"),  # first measured score
        ("raised", "gpu_temperature", "critical"), ("health", "unhealthy"),
        ("cleared", "gpu_temperature"), ("health", "healthy")]
    assert host.health_events("node1") == host.health_events("node2") == [("health", "healthy")]
    alert = next(e for e in host.recorded if isinstance(e, ev.AlertRaised))
    assert alert.sample["gpus"][0]["temp"] == 86  # the sample that caused it


async def test_stopped_sshd_opens_breaker_others_keep_their_pace(
        ssh_cluster: tuple[Host, Monitor, list[SshdNode]]) -> None:
    host, monitor, nodes = ssh_cluster
    clock = monitor._clock
    assert isinstance(clock, Clock)
    await monitor.sweep()
    nodes[1].stop()
    for _ in range(3):
        await monitor.sweep()
    assert monitor.breaker("node1").state is BreakerState.OPEN  # type: ignore[union-attr]
    assert host.ledger.state.node("node1").health is NodeHealth.UNREACHABLE
    assert host.health_events("node1") == [("health", "healthy"), ("health", "unreachable")]
    for other in ("node0", "node2"):
        assert host.stats.health_checks[other].value == 4
        assert host.stats.health_failures[other].value == 0
    nodes[1].start()
    deadline = time.monotonic() + 30
    while monitor.breaker("node1").state is not BreakerState.CLOSED:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, monitor.view("node1")
        clock.skew += 15  # let the breaker's backoff pass; the transport's own is real time
        await monitor.sweep()
        await asyncio.sleep(0.5)
    assert host.health_events("node1") == [("health", "healthy"), ("health", "unreachable"),
                                           ("health", "healthy")]


async def test_gpu_use_per_rank_survives_a_restart(tmp_path: Path, local_bin: Path) -> None:
    """gpu_use.json: a new Monitor (ugrod restarted) goes on from the saved figures."""
    gpu1 = ev.Gpu(index=1, model="RTX 4060", vram_bytes=8 * 1024**3,
                  uuid="GPU-0a1b2c3d-0000-4000-8000-000000000002")
    nc = local_node(tmp_path, "n1", gpus=(gpu1,))
    host = await make_host(tmp_path, [nc])
    t = LocalTransport("n1")
    agent = NodeAgent(t, nc.work_dir, nc.python)
    jobs = tmp_path / "jobs"
    (jobs / "j1").mkdir(parents=True)
    monitors = [Monitor(host, {"n1": agent}, {"n1": t}, clock=Clock(),
                        job_dir=lambda job: jobs / job) for _ in range(2)]
    try:
        spec = ev.JobSpec(argv=("train",), gpus_per_node=1)
        await host.ledger.record(
            ev.DAEMON, ev.JobSubmitted(job="j1", spec=spec),
            ev.JobPlaced(job="j1", attempt=1, ranks=(ev.RankPlacement(
                rank=0, node="n1", gpus=(1,), gpu_uuids=(gpu1.uuid,)),)),
            ev.RankStarted(job="j1", attempt=1, rank=0, node="n1", pid=os.getpid()),
            ev.JobRunning(job="j1", attempt=1))
        await monitors[0].sweep()
        await monitors[0].sweep()
        job = host.ledger.state.jobs["j1"]
        before = monitors[0].job_resources(job)
        assert before["ranks"][0]["samples"] == 2
        await monitors[0].close()
        after = monitors[1].job_resources(job)  # nothing sampled yet by the new one
        assert after == before
        await monitors[1].sweep()
        assert monitors[1].job_resources(job)["ranks"][0]["samples"] == 3
    finally:
        for m in monitors:
            await m.close()
        await host.ledger.close()
