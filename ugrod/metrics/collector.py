"""Prometheus metrics: the scrape-time collector and its own TCP listener.

``UgroCollector`` reads committed state, the health monitor's cached samples,
the latest training values and ``RuntimeStats`` when scraped, and has
``ugrod.metrics.families`` (pure) compute every series; it never runs a
command, opens a connection or reads a job's files (it runs on the event loop,
inside the aiohttp handler). The listener renders those families straight to
text (``ugrod.metrics.exposition``); ``collect()`` gives the same series to a
prometheus-client registry. The catalog is docs/metrics.md.

This is the only ugrod module that imports prometheus_client.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from importlib import metadata

# Before prometheus_client is imported: Prometheus 2.42 negotiates OpenMetrics,
# which would otherwise add a *_created series per counter and histogram.
os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

from aiohttp import web
from prometheus_client import exposition as client_exposition
from prometheus_client import metrics as client_metrics
from prometheus_client.core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

from ugrod.core.state import State
from ugrod.metrics import families as mf
from ugrod.metrics.exposition import AnyFamily, Family, render
from ugrod.metrics.families import GpuSampleView, NodeSampleView
from ugrod.metrics.runtime_stats import RuntimeStats

client_metrics.disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "GpuSampleView",
    "NodeSampleView",
    "RuntimeStats",
    "UgroCollector",
    "bound_port",
    "make_metrics_app",
    "make_registry",
    "start_metrics_server",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9327  # ugrod.config.MetricsConfig's default
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _build_version() -> str:
    try:
        return metadata.version("ugro")
    except metadata.PackageNotFoundError:
        return "unknown"


class UgroCollector:
    """Computes ugrod's metrics from state, cached samples and RuntimeStats at scrape time.

    ``get_samples`` returns each node's latest cached health sample (or None
    before the monitor runs); ``get_job_metrics`` returns each job's latest
    training values (``step``, ``loss``, ``throughput``, ``ts``) as numbers;
    ``get_scores`` (optional) each node's latest health score, which state
    only records when the node's health changes.
    """

    def __init__(
        self,
        get_state: Callable[[], State],
        get_samples: Callable[[], Mapping[str, NodeSampleView]] | None,
        get_job_metrics: Callable[[], Mapping[str, Mapping[str, float]]],
        runtime: RuntimeStats,
        *,
        get_scores: Callable[[], Mapping[str, float | None]] | None = None,
        clock: Callable[[], float] = time.time,
        version: str | None = None,
    ) -> None:
        self._get_state = get_state
        self._get_samples = get_samples
        self._get_job_metrics = get_job_metrics
        self._runtime = runtime
        self._get_scores = get_scores
        self._clock = clock
        self._build = (version or _build_version(), platform.python_version())
        self._last_collect_s = 0.0

    # ---- the two ways out: prometheus_client Metrics, or text directly -------

    def describe(self) -> list[Metric]:
        return []  # names are dynamic; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol (for a CollectorRegistry)."""
        for fam in self.families():
            yield _to_metric(fam)

    def exposition(self) -> bytes:
        """The same series in text format 0.0.4, without per-sample objects (the fast path)."""
        return render(self.families())

    def families(self) -> list[AnyFamily]:
        """Every family, computed now from state, samples and RuntimeStats."""
        t0 = time.perf_counter()
        state = self._get_state()
        now = self._clock()
        samples = self._get_samples() if self._get_samples is not None else {}
        scores = self._get_scores() if self._get_scores is not None else {}
        build = mf.gauge("ugro_build_info", "ugrod's version and Python version (always 1).",
                         ("version", "python_version"))
        build.add(self._build, 1.0)
        out: list[AnyFamily] = [
            build,
            mf.single("ugro_event_log_last_seq", "Sequence number of the last committed event.",
                      float(state.seq)),
        ]
        if state.started_at is not None:
            out.append(mf.single("ugro_daemon_last_start_timestamp_seconds",
                                 "When ugrod last started (its daemon_started event), Unix time.",
                                 state.started_at))
        mf.jobs(state, now, self._runtime, out)
        mf.active_jobs(state, self._get_job_metrics(), out)
        mf.nodes(state, samples, scores, self._runtime, out)
        mf.gpus(state, samples, out)
        mf.daemon(self._runtime, out)
        out.append(mf.single("ugro_metrics_collect_duration_seconds",
                             "How long the previous scrape's collection took inside ugrod.",
                             self._last_collect_s))
        self._last_collect_s = time.perf_counter() - t0
        return out

def _to_metric(fam: AnyFamily) -> Metric:
    if isinstance(fam, Family):
        base = fam.name[:-6] if fam.typ == "counter" else fam.name
        m = Metric(base, fam.doc, fam.typ)
        names = fam.labelnames
        m.samples = [Sample(fam.name, dict(zip(names, values, strict=True)), value)
                     for values, value in fam.rows]
        return m
    m = Metric(fam.name, fam.doc, "histogram")
    m.samples = [Sample(name, dict(zip(names, values, strict=True)), value)
                 for name, names, values, value in fam.samples()]
    return m


# ---- registry and HTTP listener ------------------------------------------------


def make_registry(collector: UgroCollector, *, process: bool = True) -> CollectorRegistry:
    """A registry with ugrod's collector (and process_* figures from /proc)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


def make_metrics_app(collector: UgroCollector, *, process: bool = True) -> web.Application:
    """An aiohttp app serving ``/metrics`` in text format 0.0.4 (Prometheus accepts it).

    The collector's series go through the fast renderer; process_* figures
    through prometheus_client.
    """
    extra = CollectorRegistry(auto_describe=False)
    if process:
        ProcessCollector(registry=extra)

    async def metrics(request: web.Request) -> web.Response:
        body = collector.exposition() + client_exposition.generate_latest(extra)
        response = web.Response(body=body)
        response.headers["Content-Type"] = TEXT_CONTENT_TYPE
        return response

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="ugrod metrics: /metrics\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    return app


async def start_metrics_server(host: str, port: int, collector: UgroCollector,
                               *, process: bool = True) -> web.AppRunner:
    """Serve ``/metrics`` on its own TCP listener; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(make_metrics_app(collector, process=process), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a runner listens on (useful with ``port=0``)."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("metrics listener has no TCP address")


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


