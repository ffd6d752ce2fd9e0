"""Health scoring, transitions, the breaker and the interval ladder: tables, no mocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ugrod.core import events as ev
from ugrod.core.gpus import MIB, GpuSample, NodeSample, RankProcess
from ugrod.core.health import (
    DEFAULT_THRESHOLDS,
    Assessment,
    Breaker,
    BreakerState,
    Severity,
    Thresholds,
    health_for,
    known,
    next_interval,
    probe_failed,
    score,
    to_events,
    transitions,
    unreachable,
)
from ugrod.core.state import NodeHealth, State, apply

G = 1024**3


def gpu(index: int = 0, temp: float | None = 50.0, used_mib: int = 1000,
        total_mib: int = 12288, error: str | None = None) -> GpuSample:
    return GpuSample(uuid=f"GPU-{index}", index=index, name="NVIDIA GeForce RTX 3060",
                     util_percent=50.0, memory_used_bytes=used_mib * MIB,
                     memory_total_bytes=total_mib * MIB, temperature_c=temp, power_w=100.0,
                     error=error)


def sample(*gpus: GpuSample, mem: float = 50.0, disk: float = 50.0,
           latency: float | None = 2.0, ranks: tuple[RankProcess, ...] = (),
           gpu_error: str | None = None) -> NodeSample:
    """A node at the given host-memory % and disk % (df-style)."""
    return NodeSample(
        gpus=gpus, gpu_error=gpu_error, latency_ms=latency,
        mem_total_bytes=1000, mem_available_bytes=round(1000 - 10 * mem),
        disk_path="/w", disk_used_bytes=round(10 * disk), disk_avail_bytes=round(1000 - 10 * disk),
        disk_total_bytes=1000, ranks=ranks,
    )


@pytest.mark.parametrize(("value", "health"), [
    (100.0, NodeHealth.HEALTHY), (80.0, NodeHealth.HEALTHY), (79.9, NodeHealth.DEGRADED),
    (60.0, NodeHealth.DEGRADED), (59.9, NodeHealth.UNHEALTHY), (0.0, NodeHealth.UNHEALTHY),
])
def test_health_boundaries(value: float, health: NodeHealth) -> None:
    assert health_for(value, DEFAULT_THRESHOLDS) is health


@pytest.mark.parametrize(("temp", "severity", "points", "health"), [
    (50.0, None, 100, NodeHealth.HEALTHY),
    (80.0, None, 100, NodeHealth.HEALTHY),            # "> 80", not ">= 80"
    (80.5, Severity.WARNING, 85, NodeHealth.HEALTHY),
    (85.0, Severity.WARNING, 85, NodeHealth.HEALTHY),
    (86.0, Severity.CRITICAL, 70, NodeHealth.UNHEALTHY),  # critical temperature: never schedulable
])
def test_gpu_temperature(temp: float, severity: Severity | None, points: float,
                         health: NodeHealth) -> None:
    a = score(sample(gpu(0, temp=40.0), gpu(1, temp=temp)))
    assert a.score == points
    assert a.health is health
    if severity is None:
        assert a.alerts == ()
    else:
        (alert,) = a.alerts
        assert (alert.key, alert.severity) == ("gpu_temperature", severity)
        assert alert.message.startswith(f"GPU 1 temperature {temp:g} °C >")


@pytest.mark.parametrize(("kwargs", "key", "severity", "points"), [
    ({"mem": 90.0}, None, None, 100),
    ({"mem": 91.0}, "memory", Severity.WARNING, 90),
    ({"mem": 96.0}, "memory", Severity.CRITICAL, 75),
    ({"disk": 90.0}, None, None, 100),
    ({"disk": 91.0}, "disk", Severity.WARNING, 90),
    ({"disk": 96.0}, "disk", Severity.CRITICAL, 80),
    ({"latency": 50.0}, None, None, 100),
    ({"latency": 51.0}, "latency", Severity.WARNING, 95),
    ({"latency": 101.0}, "latency", Severity.CRITICAL, 85),
    ({"latency": None}, None, None, 100),
])
def test_host_thresholds(kwargs: dict[str, float], key: str | None, severity: Severity | None,
                         points: float) -> None:
    a = score(sample(gpu(), **kwargs))  # type: ignore[arg-type]
    assert a.score == pytest.approx(points)
    assert [(x.key, x.severity) for x in a.alerts] == ([] if key is None else [(key, severity)])


@pytest.mark.parametrize(("used", "severity", "points"), [
    (11059, None, 100),  # 90.0 %
    (11100, Severity.WARNING, 90),
    (11700, Severity.CRITICAL, 80),
])
def test_gpu_memory_is_a_percentage(used: int, severity: Severity | None, points: float) -> None:
    a = score(sample(gpu(used_mib=used)))
    assert a.score == points
    assert [x.severity for x in a.alerts] == ([] if severity is None else [severity])
    assert a.health is NodeHealth.HEALTHY  # a training job filling its GPU is normal


def test_everything_wrong_floors_at_zero_and_orders_critical_first() -> None:
    a = score(sample(gpu(temp=90.0, used_mib=12000), mem=99.0, disk=99.0, latency=500.0),
              expect_ranks=True)
    assert a.score == 0.0 and a.health is NodeHealth.UNHEALTHY
    assert [x.severity for x in a.alerts] == [Severity.CRITICAL] * 5 + [Severity.WARNING]
    assert a.alerts[-1].key == "rank_processes"
    assert a.reason.startswith("disk /w 99% > 95%; GPU 0 memory")


@pytest.mark.parametrize(("ranks", "expect", "points"), [
    ((), False, 100),
    ((), True, 90),
    ((RankProcess(file="p", pid=1, alive=False),), True, 90),
    ((RankProcess(file="p", pid=1, alive=False), RankProcess(file="q", pid=2, alive=True)),
     True, 100),
    # every rank gone but each left its exit code: the job is ending, not a vanished process
    ((RankProcess(file="p", pid=1, alive=False, ended=True),), True, 100),
])
def test_rank_processes(ranks: tuple[RankProcess, ...], expect: bool, points: float) -> None:
    assert score(sample(ranks=ranks), expect_ranks=expect).score == points


def test_sick_gpu_makes_node_unhealthy() -> None:
    a = score(sample(gpu(0), gpu(1, temp=None, error="GPU requires reset")), expect_gpus=2)
    assert a.health is NodeHealth.UNHEALTHY and a.score == 0.0
    assert a.alerts[0].key == "gpu_error"
    assert a.alerts[0].message == "GPU 1 (GPU-1): GPU requires reset"


def test_gpu_check_failure_matters_only_on_gpu_nodes() -> None:
    failed = "nvidia-smi exited with code 9: 'NVIDIA-SMI has failed ...'"
    gpu_node = score(sample(gpu_error=failed), expect_gpus=1)
    assert gpu_node.health is NodeHealth.UNHEALTHY
    assert [(a.key, a.severity) for a in gpu_node.alerts] == [("gpu_check", Severity.CRITICAL)]
    cpu_node = score(sample(gpu_error=failed), expect_gpus=0)
    assert cpu_node.health is NodeHealth.HEALTHY and cpu_node.score == 100
    assert [(a.key, a.severity) for a in cpu_node.alerts] == [("gpu_check", Severity.WARNING)]


def test_gpu_fell_off_the_bus() -> None:
    a = score(sample(gpu(0)), expect_gpus=2)
    assert a.health is NodeHealth.UNHEALTHY
    assert a.alerts[0].message == "nvidia-smi lists 1 of 2 GPUs"


def test_thresholds_are_configurable() -> None:
    t = Thresholds(gpu_temp_warn_c=70, gpu_temp_crit_c=75, unhealthy_when_critical=())
    a = score(sample(gpu(temp=76.0)), t)
    assert a.alerts[0].severity is Severity.CRITICAL and a.health is NodeHealth.DEGRADED


@given(st.floats(0, 130), st.floats(0, 100), st.floats(0, 100), st.floats(0, 1000),
       st.booleans())
def test_score_is_bounded_and_health_follows_it(temp: float, mem: float, disk: float,
                                               latency: float, ranks: bool) -> None:
    a = score(sample(gpu(temp=temp), mem=mem, disk=disk, latency=latency), expect_ranks=ranks)
    assert a.score is not None and 0.0 <= a.score <= 100.0
    forced = any(x.key == "gpu_temperature" and x.severity is Severity.CRITICAL
                 for x in a.alerts)
    assert a.health is (NodeHealth.UNHEALTHY if forced else health_for(a.score,
                                                                       DEFAULT_THRESHOLDS))


# ---- transitions -------------------------------------------------------------


def test_heating_and_cooling_emit_once_per_transition() -> None:
    temps = [50, 50, 82, 86, 87, 86, 83, 50, 50]
    prev: Assessment | None = None
    log: list[tuple[str, ...]] = []
    for t in temps:
        new = score(sample(gpu(temp=float(t))))
        for e in to_events("n1", transitions(prev, new), new, {"t": t}):
            if isinstance(e, ev.AlertRaised):
                log.append((t, "raised", e.alert, e.severity))  # type: ignore[arg-type]
            elif isinstance(e, ev.AlertCleared):
                log.append((t, "cleared", e.alert))  # type: ignore[arg-type]
            elif isinstance(e, ev.NodeHealthChanged):
                log.append((t, "health", e.health))  # type: ignore[arg-type]
        prev = new
    assert log == [
        (50, "health", "healthy"),  # first sweep: nothing known before
        (82, "raised", "gpu_temperature", "warning"),
        (86, "raised", "gpu_temperature", "critical"),
        (86, "health", "unhealthy"),
        (83, "raised", "gpu_temperature", "warning"),
        (83, "health", "healthy"),
        (50, "cleared", "gpu_temperature"),
    ]


def test_no_change_is_empty() -> None:
    a = score(sample(gpu(temp=86.0)))
    b = score(sample(gpu(temp=88.0)))  # message differs, severity does not
    assert not transitions(a, b)
    assert to_events("n", transitions(a, b), b) == []


def test_unreachable_keeps_alerts() -> None:
    hot = score(sample(gpu(temp=86.0)))
    gone = unreachable(hot, "3 probes failed: connection refused")
    change = transitions(hot, gone)
    assert change.health is NodeHealth.UNREACHABLE and not change.raised and not change.cleared
    (e,) = to_events("n", change, gone)
    assert isinstance(e, ev.NodeHealthChanged) and e.score is None
    assert e.reason == "3 probes failed: connection refused"


def test_probe_failed() -> None:
    a = probe_failed("probe output is not what it prints: 'bash: python3: not found'")
    assert a.health is NodeHealth.UNHEALTHY and a.alerts[0].key == "probe"


def test_events_apply_to_state_and_read_back() -> None:
    state = State()
    seq = 0

    def put(*events: ev.Event) -> None:
        nonlocal state, seq
        for e in events:
            seq += 1
            state = apply(state, ev.Record(seq=seq, ts=float(seq), actor=ev.DAEMON, event=e))

    put(ev.NodeAdded(node=ev.NodeSpec(name="n1", host="localhost")))
    prev = known(state.node("n1"))
    for t in (50.0, 86.0, 91.0):
        new = score(sample(gpu(temp=t), disk=96.0))
        put(*to_events("n1", transitions(prev, new), new, {"temp": t}))
        prev = new
    back = known(state.node("n1"))
    assert back.health is prev.health is NodeHealth.UNHEALTHY
    assert {(a.key, a.severity) for a in back.alerts} == {(a.key, a.severity)
                                                         for a in prev.alerts}
    assert not transitions(back, prev)  # after a restart the first sweep emits nothing


# ---- breaker ---------------------------------------------------------------------


def test_breaker_opens_after_three_failures_and_backs_off() -> None:
    b = Breaker()
    b = b.record(False, 0.0)
    b = b.record(False, 5.0)
    assert b.state is BreakerState.CLOSED and b.due(5.0)
    b = b.record(False, 10.0)
    assert b.state is BreakerState.OPEN and b.retry_at == 20.0
    assert not b.due(19.9) and b.at(19.9).state is BreakerState.OPEN
    assert b.due(20.0) and b.at(20.0).state is BreakerState.HALF_OPEN
    b = b.at(20.0).record(False, 20.0)
    assert b.state is BreakerState.OPEN and b.retry_at == 40.0  # doubled
    b = b.at(40.0).record(False, 40.0, jitter=1.0)
    assert b.retry_at == pytest.approx(40.0 + 40.0 * 0.8)  # jitter shortens by up to 20 %
    b = b.at(100.0).record(True, 100.0)
    assert b == Breaker()


def test_breaker_backoff_is_capped() -> None:
    b = Breaker()
    now = 0.0
    delays = []
    for _ in range(12):
        b = b.at(now).record(False, now)
        if b.retry_at is not None:
            delays.append(b.retry_at - now)
            now = b.retry_at
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300, 300, 300]


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), max_size=40))
def test_breaker_properties(outcomes: list[tuple[bool, float]]) -> None:
    b, now, run = Breaker(), 0.0, 0
    for ok, jitter in outcomes:
        b = b.at(now).record(ok, now, jitter=jitter)
        run = 0 if ok else run + 1
        assert (b.state is BreakerState.OPEN) == (run >= 3)
        if b.retry_at is not None:
            assert 0 < b.retry_at - now <= 300
        now += 1000.0


# ---- interval ---------------------------------------------------------------------

MIN = 60.0


@pytest.mark.parametrize(("quiet_s", "running", "expected"), [
    (0.0, True, 5.0),
    (10 * 3600.0, True, 5.0),
    (0.0, False, 10.0),
    (29.9 * MIN, False, 10.0),
    (30 * MIN, False, 20.0),
    (119.9 * MIN, False, 20.0),
    (120 * MIN, False, 40.0),
    (30 * 24 * 3600.0, False, 40.0),
    (None, False, 40.0),
    (-5.0, False, 10.0),  # clock stepped back: treat as just active
])
def test_interval_ladder(quiet_s: float | None, running: bool, expected: float) -> None:
    now = 1_000_000.0
    last = None if quiet_s is None else now - quiet_s
    assert next_interval(now, last, running) == expected
    assert next_interval(now, last, running) <= 60.0


def test_first_measured_score_is_recorded_once() -> None:
    never = Assessment(score=None, health=NodeHealth.HEALTHY)  # a node the log never scored
    first = score(sample(gpu()))
    assert transitions(never, first).health is NodeHealth.HEALTHY
    assert not transitions(first, score(sample(gpu(temp=60.0))))


def test_interval_ladder_is_configurable() -> None:
    from ugrod.core.health import Intervals
    i = Intervals(active_s=2, recent_s=3, idle_s=4, long_idle_s=90, max_s=30,
                  recent_window_s=10, idle_window_s=20)
    assert [next_interval(100.0, 100.0 - q, False, i) for q in (0, 10, 20)] == [3, 4, 30]
    assert next_interval(0.0, None, True, i) == 2
