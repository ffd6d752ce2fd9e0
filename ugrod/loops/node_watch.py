"""What the monitor knows of each node between sweeps, and how it tells the log.

Per node: its circuit breaker, its last samples and score, when it last answered,
and its last error; what it knows is read by ``/metrics``, ``ugroctl health``, the
watchdog and the API. Only transitions reach the event log (health changed, alert
raised or cleared, node unreachable), each once, compared with what the log says of
the node rather than with this memory: others record a node's health too.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ugrod.config.schema import Config, HealthConfig
from ugrod.core import codec, gpus
from ugrod.core import events as ev
from ugrod.core import health as hl
from ugrod.core.state import InvalidEvent, NodeHealth, State
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.monitor")

HISTORY = 120  # samples kept per node: 10 min at the busiest interval
LATENCY_WINDOW = 3  # sweeps; the latency scored is the minimum over them


class Host(Protocol):
    """What the monitor needs of the daemon."""

    ledger: Ledger
    config: Config
    stats: RuntimeStats


@dataclass
class NodeWatch:
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


class NodeWatches:
    """Every monitored node's record, by name."""

    def __init__(self, host: Host, *, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        self._host = host
        self._clock = clock
        self._jitter = jitter
        self._nodes: dict[str, NodeWatch] = {}

    @property
    def _cfg(self) -> HealthConfig:
        return self._host.config.health

    def forget_missing(self, keep: Mapping[str, object]) -> None:
        """Forget the nodes not in ``keep`` (removed by a reload)."""
        for name in list(self._nodes):
            if name not in keep:
                del self._nodes[name]
                self._host.stats.forget_node(name)

    def for_node(self, name: str, state: State) -> NodeWatch:
        """The node's record, begun from what the log says of it the first time."""
        w = self._nodes.get(name)
        if w is None:
            cfg = self._cfg
            w = NodeWatch(breaker=hl.Breaker(threshold=max(1, cfg.failures_to_open),
                                          cap_s=cfg.max_backoff_s))
            node = state.nodes.get(name)
            w.prev = hl.known(node) if node is not None else None
            w.score = node.score if node is not None else None
            self._nodes[name] = w
        return w

    def latest_samples(self) -> dict[str, gpus.NodeSample]:
        """Each node's newest sample."""
        return {n: w.samples[-1] for n, w in self._nodes.items() if w.samples}

    def latest_scores(self) -> dict[str, float | None]:
        """Each node's newest score, recorded or not."""
        return {n: w.score for n, w in self._nodes.items()}

    def history(self, name: str) -> list[gpus.NodeSample]:
        """The node's samples, oldest first."""
        w = self._nodes.get(name)
        return list(w.samples) if w else []

    def last_answer(self, name: str) -> float | None:
        """When ``name`` last answered a check (this monitor's clock), None if never."""
        w = self._nodes.get(name)
        return w.last_answer if w else None

    def unanswered_s(self, name: str) -> float | None:
        """Seconds since ``name`` last answered a check; None if it has not since start."""
        last = self.last_answer(name)
        return None if last is None else max(0.0, self._clock() - last)

    def breaker(self, name: str) -> hl.Breaker | None:
        """The node's circuit breaker (None: never checked)."""
        w = self._nodes.get(name)
        return w.breaker if w else None

    def view(self, name: str) -> dict[str, Any] | None:
        """What the API adds to a node: latest sample, check time, breaker, live score."""
        w = self._nodes.get(name)
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

    def set_breaker(self, name: str, w: NodeWatch, new: hl.Breaker) -> None:
        """A node's new breaker (its state counted and logged when it changes)."""
        if new.state is not w.breaker.state:
            self._host.stats.breaker(name, new.state.value)
            if new.state is hl.BreakerState.OPEN:
                logger.warning("node %s: breaker open, next try in %.0f s", name,
                               (new.retry_at or 0.0) - self._clock())
            elif new.state is hl.BreakerState.CLOSED:
                logger.info("node %s: breaker closed", name)
        w.breaker = new

    async def failed(self, name: str, w: NodeWatch, breaker: hl.Breaker, now: float,
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
        self.set_breaker(name, w, after)
        logger.info("%s (failure %d)", why, after.failures)
        prev = self.prev(name, w)
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
        await self.record(name, w, hl.unreachable(prev, reason), None, [])

    def prev(self, name: str, w: NodeWatch) -> hl.Assessment | None:
        """What the log says of the node now: the one record every reader goes by."""
        node = self._host.ledger.state.nodes.get(name)
        return hl.known(node) if node is not None else w.prev

    async def record(self, name: str, w: NodeWatch, new: hl.Assessment,
                     sample: gpus.NodeSample | None, extra: list[ev.Event]) -> None:
        """Record what changed since the log's word on the node (with ``extra`` events)."""
        # Compared with the log, not with the monitor's memory: others record a node's
        # health too (ugrod marks a new SSH node unreachable until its first contact).
        change = hl.transitions(self.prev(name, w), new)
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


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
