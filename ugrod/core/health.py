"""Health decisions as pure functions: score a sample, drive a breaker, pick an interval.

No I/O, no clock, no randomness: ``now`` and the breaker's jitter come from
the caller (``ugrod/loops/monitor.py``), so every decision replays the same.

Scoring follows the seeds' monitor (weights out of 100, penalty per finding):

    GPU temperature   > 80 °C  -15    > 85 °C  -30    (hottest GPU)
    GPU memory        > 90 %   -10    > 95 %   -20    (fullest GPU; the seed compared a
                                                       ratio with 95 and never fired)
    host memory       > 90 %   -10    > 95 %   -25
    disk (work dir)   > 90 %   -10    > 95 %   -20
    probe latency     > 50 ms   -5    > 100 ms -15
    no rank process alive during an active job  -10

and, beyond the seeds, a GPU reading ``[GPU requires reset]``/``[Unknown
Error]``, a failed GPU check on a GPU node, or fewer GPUs than the node is
known to have cost 100: such a node is unhealthy whatever else it says.
healthy ≥ 80 > degraded ≥ 60 > unhealthy. One override: a *critical* GPU
temperature makes the node unhealthy even though the seeds' -30 alone leaves
70 (``Thresholds.unhealthy_when_critical``): an overheating GPU must not be
given new work. GPU memory is deliberately not in that list: a training job
routinely fills 95 % of its GPU.

Events are emitted per *transition* (``transitions``): health changed, an
alert appeared or changed severity, an alert went away; never once per sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import msgspec

from ugrod.core import events as ev
from ugrod.core.gpus import NodeSample
from ugrod.core.state import Node, NodeHealth


class Thresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Warn/critical limits and what each finding costs; all configurable."""

    gpu_temp_warn_c: float = 80.0
    gpu_temp_crit_c: float = 85.0
    gpu_memory_warn_percent: float = 90.0
    gpu_memory_crit_percent: float = 95.0
    memory_warn_percent: float = 90.0
    memory_crit_percent: float = 95.0
    disk_warn_percent: float = 90.0
    disk_crit_percent: float = 95.0
    latency_warn_ms: float = 50.0
    latency_crit_ms: float = 100.0
    healthy_min: float = 80.0
    degraded_min: float = 60.0
    # penalties (seeds' weights)
    gpu_temp_warn_cost: float = 15.0
    gpu_temp_crit_cost: float = 30.0
    gpu_memory_warn_cost: float = 10.0
    gpu_memory_crit_cost: float = 20.0
    memory_warn_cost: float = 10.0
    memory_crit_cost: float = 25.0
    disk_warn_cost: float = 10.0
    disk_crit_cost: float = 20.0
    latency_warn_cost: float = 5.0
    latency_crit_cost: float = 15.0
    no_ranks_cost: float = 10.0
    gpu_fault_cost: float = 100.0
    # Alerts that make a node unhealthy at critical level whatever its score.
    unhealthy_when_critical: tuple[str, ...] = ("gpu_temperature",)


DEFAULT_THRESHOLDS = Thresholds()


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


# Stable alert keys (they name alerts in the log, the API and Prometheus).
GPU_TEMPERATURE = "gpu_temperature"
GPU_MEMORY = "gpu_memory"
GPU_ERROR = "gpu_error"  # a GPU reads [GPU requires reset] / [Unknown Error]
GPU_CHECK = "gpu_check"  # nvidia-smi failed, hung or printed garbage
GPU_MISSING = "gpu_missing"  # fewer GPUs than the node has
MEMORY = "memory"
DISK = "disk"
LATENCY = "latency"
RANK_PROCESSES = "rank_processes"
PROBE = "probe"  # the node answered, but not with a probe result


class AlertFinding(msgspec.Struct, frozen=True):
    key: str
    severity: Severity
    message: str


class Assessment(msgspec.Struct, frozen=True, kw_only=True):
    """A node's health at one sweep; ``score`` is None when it could not be measured."""

    score: float | None
    health: NodeHealth
    alerts: tuple[AlertFinding, ...] = ()
    reason: str = ""


def health_for(score: float, thresholds: Thresholds) -> NodeHealth:
    if score >= thresholds.healthy_min:
        return NodeHealth.HEALTHY
    if score >= thresholds.degraded_min:
        return NodeHealth.DEGRADED
    return NodeHealth.UNHEALTHY


def _level(value: float, warn: float, crit: float) -> Severity | None:
    if value > crit:
        return Severity.CRITICAL
    if value > warn:
        return Severity.WARNING
    return None


def _fmt(x: float) -> str:
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def score(sample: NodeSample, thresholds: Thresholds = DEFAULT_THRESHOLDS, *,
          expect_ranks: bool = False, expect_gpus: int = 0) -> Assessment:
    """Sample -> score, health and the alerts that explain them (worst first)."""
    t = thresholds
    found: list[tuple[AlertFinding, float]] = []

    def check(key: str, value: float | None, warn: float, crit: float, warn_cost: float,
              crit_cost: float, what: str, unit: str) -> None:
        if value is None:
            return
        level = _level(value, warn, crit)
        if level is None:
            return
        limit = crit if level is Severity.CRITICAL else warn
        found.append((AlertFinding(key, level, f"{what} {_fmt(value)}{unit} > "
                                   f"{_fmt(limit)}{unit}"),
                      crit_cost if level is Severity.CRITICAL else warn_cost))

    temps = [(g.temperature_c, g) for g in sample.gpus if g.temperature_c is not None]
    if temps:
        temp, g = max(temps, key=lambda tg: tg[0])
        check(GPU_TEMPERATURE, temp, t.gpu_temp_warn_c, t.gpu_temp_crit_c,
              t.gpu_temp_warn_cost, t.gpu_temp_crit_cost, f"GPU {g.index} temperature", " °C")
    mems = [(g.memory_percent, g) for g in sample.gpus if g.memory_percent is not None]
    if mems:
        pct, g = max(mems, key=lambda pg: pg[0] or 0.0)
        check(GPU_MEMORY, pct, t.gpu_memory_warn_percent, t.gpu_memory_crit_percent,
              t.gpu_memory_warn_cost, t.gpu_memory_crit_cost, f"GPU {g.index} memory", "%")
    check(MEMORY, sample.mem_percent, t.memory_warn_percent, t.memory_crit_percent,
          t.memory_warn_cost, t.memory_crit_cost, "memory", "%")
    check(DISK, sample.disk_percent, t.disk_warn_percent, t.disk_crit_percent,
          t.disk_warn_cost, t.disk_crit_cost,
          f"disk {sample.disk_path}" if sample.disk_path else "disk", "%")
    check(LATENCY, sample.latency_ms, t.latency_warn_ms, t.latency_crit_ms,
          t.latency_warn_cost, t.latency_crit_cost, "probe latency", " ms")

    # Ranks that ended with an exit code are a job ending (the daemon records it in a
    # moment), not a missing process: only ranks gone without one raise this.
    if expect_ranks and not any(r.alive or r.ended for r in sample.ranks):
        found.append((AlertFinding(RANK_PROCESSES, Severity.WARNING,
                                   "no rank process alive during an active job"
                                   if sample.ranks else
                                   "no rank process known during an active job"),
                      t.no_ranks_cost))
    sick = [g for g in sample.gpus if g.error]
    if sick:
        found.append((AlertFinding(GPU_ERROR, Severity.CRITICAL, "; ".join(
            f"GPU {g.index} ({g.uuid}): {g.error}" for g in sick)), t.gpu_fault_cost))
    if sample.gpu_error:
        gpu_node = expect_gpus > 0
        found.append((AlertFinding(GPU_CHECK, Severity.CRITICAL if gpu_node
                                   else Severity.WARNING, sample.gpu_error),
                      t.gpu_fault_cost if gpu_node else 0.0))
    elif expect_gpus and len(sample.gpus) < expect_gpus:
        found.append((AlertFinding(GPU_MISSING, Severity.CRITICAL,
                                   f"nvidia-smi lists {len(sample.gpus)} of "
                                   f"{expect_gpus} GPUs"), t.gpu_fault_cost))

    value = max(0.0, 100.0 - sum(cost for _, cost in found))
    alerts = tuple(sorted((a for a, _ in found),
                          key=lambda a: (a.severity is not Severity.CRITICAL, a.key)))
    health = health_for(value, t)
    if any(a.severity is Severity.CRITICAL and a.key in t.unhealthy_when_critical
           for a in alerts):
        health = NodeHealth.UNHEALTHY
    return Assessment(score=value, health=health, alerts=alerts, reason=_reason(alerts))


def _reason(alerts: Sequence[AlertFinding]) -> str:
    return "; ".join(a.message for a in alerts) or "all checks pass"


def probe_failed(message: str) -> Assessment:
    """The node answered, but not with a probe result (no python3, a crash, garbage)."""
    alert = AlertFinding(PROBE, Severity.CRITICAL, message)
    return Assessment(score=0.0, health=NodeHealth.UNHEALTHY, alerts=(alert,), reason=message)


NOT_CONTACTED = "not contacted yet: ugrod is connecting to it"
"""The reason a node added to the cluster carries until its first check says otherwise."""


def unreachable(prev: Assessment | None, reason: str) -> Assessment:
    """Breaker open: health unknown. Alerts are kept as they were (nothing was measured)."""
    return Assessment(score=None, health=NodeHealth.UNREACHABLE,
                      alerts=prev.alerts if prev else (), reason=reason)


def known(node: Node) -> Assessment:
    """What the log last said about a node: the ``prev`` to compare the first sweep with."""
    return Assessment(
        score=node.score, health=node.health, reason=node.health_reason,
        alerts=tuple(AlertFinding(a.alert, Severity(a.severity), a.message)
                     for a in node.alerts if a.severity in _SEVERITIES),
    )


_SEVERITIES = frozenset(s.value for s in Severity)


# ---- transitions ----------------------------------------------------------


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    health: NodeHealth | None = None  # the new health when it changed
    raised: tuple[AlertFinding, ...] = ()  # new alerts, or ones whose severity changed
    cleared: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.health is not None or bool(self.raised) or bool(self.cleared)


def transitions(prev: Assessment | None, new: Assessment) -> Transition:
    """What changed between two sweeps; empty when nothing did (the usual case)."""
    before = {a.key: a for a in prev.alerts} if prev else {}
    after = {a.key: a for a in new.alerts}
    raised = tuple(a for k, a in after.items()
                   if k not in before or before[k].severity is not a.severity)
    cleared = tuple(sorted(k for k in before if k not in after))
    # A first score is news even at unchanged health: the log then holds a measured
    # score for every node that was ever reached, not only for those that changed.
    first = prev is not None and prev.score is None and new.score is not None
    health = new.health if prev is None or prev.health is not new.health or first else None
    # Why a node is unreachable is what a person acts on (trust its key, start sshd,
    # enable SFTP): a new reason is news.
    if health is None and new.health is NodeHealth.UNREACHABLE and prev is not None \
            and prev.reason != new.reason:
        health = new.health
    return Transition(health=health, raised=raised, cleared=cleared)


def to_events(node: str, change: Transition, new: Assessment,
              sample: dict[str, Any] | None = None) -> list[ev.Event]:
    """The log's record of a transition, with the sample that caused it."""
    data = sample or {}
    out: list[ev.Event] = []
    for key in change.cleared:
        out.append(ev.AlertCleared(node=node, alert=key))
    for a in change.raised:
        out.append(ev.AlertRaised(node=node, alert=a.key, severity=a.severity.value,
                                  message=a.message, sample=data))
    if change.health is not None:
        out.append(ev.NodeHealthChanged(node=node, health=change.health.value,
                                        score=new.score, reason=new.reason, sample=data))
    return out


# ---- circuit breaker ------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker(msgspec.Struct, frozen=True, kw_only=True):
    """Per-node circuit breaker as a value: ``record`` returns the next one.

    Closed: probe every sweep. After ``threshold`` consecutive failures it
    opens: no probes until ``retry_at``, then one trial (half-open). A failed
    trial reopens with the backoff doubled (capped at ``cap_s``, shortened by
    up to 20 % jitter so many nodes that died together do not retry together);
    the first success closes it.
    """

    threshold: int = 3
    base_s: float = 10.0
    cap_s: float = 300.0
    failures: int = 0  # consecutive
    opened: int = 0  # consecutive open periods (the backoff exponent)
    retry_at: float | None = None  # set while open
    state: BreakerState = BreakerState.CLOSED

    def due(self, now: float) -> bool:
        """May the node be probed now? (closed, or open with its backoff elapsed)"""
        return self.state is not BreakerState.OPEN or (
            self.retry_at is not None and now >= self.retry_at)

    def at(self, now: float) -> Breaker:
        """The breaker as of ``now``: an open one whose backoff elapsed is half-open."""
        if self.state is BreakerState.OPEN and self.due(now):
            return msgspec.structs.replace(self, state=BreakerState.HALF_OPEN)
        return self

    def record(self, ok: bool, now: float, *, jitter: float = 0.0) -> Breaker:
        """Outcome of one probe at ``now``; ``jitter`` in [0, 1] (the caller draws it)."""
        rep = msgspec.structs.replace
        if ok:
            return rep(self, failures=0, opened=0, retry_at=None, state=BreakerState.CLOSED)
        failures = self.failures + 1
        if self.state is BreakerState.CLOSED and failures < self.threshold:
            return rep(self, failures=failures)
        opened = self.opened + 1
        jitter = min(1.0, max(0.0, jitter))
        delay = min(self.cap_s, self.base_s * 2.0 ** (opened - 1)) * (1.0 - 0.2 * jitter)
        return rep(self, failures=failures, opened=opened, retry_at=now + delay,
                   state=BreakerState.OPEN)


# ---- adaptive interval ----------------------------------------------------


class Intervals(msgspec.Struct, frozen=True, kw_only=True):
    """The seeds' ladder: 5 s while jobs run, then 10 / 20 / 40 s the longer it is quiet."""

    active_s: float = 5.0
    recent_s: float = 10.0  # activity within recent_window_s
    idle_s: float = 20.0  # activity within idle_window_s
    long_idle_s: float = 40.0
    max_s: float = 60.0
    recent_window_s: float = 30 * 60.0
    idle_window_s: float = 2 * 3600.0


DEFAULT_INTERVALS = Intervals()


def next_interval(now: float, last_activity: float | None, jobs_running: bool,
                  intervals: Intervals = DEFAULT_INTERVALS) -> float:
    """Seconds until the next sweep: short while jobs run, longer the longer it is quiet."""
    i = intervals
    if jobs_running:
        value = i.active_s
    elif last_activity is None:
        value = i.long_idle_s
    else:
        quiet = max(0.0, now - last_activity)
        value = (i.recent_s if quiet < i.recent_window_s
                 else i.idle_s if quiet < i.idle_window_s else i.long_idle_s)
    return min(value, i.max_s)
