"""One scrape of ugrod's /metrics at 100 nodes x 8 GPUs and 1,000 active jobs, vs plain Gauges.

Usage: python bench/bench_metrics.py [--nodes N] [--gpus G] [--jobs J] [--runs R] [--dump FILE]

State is built with real events through ``ugrod.core.state.apply``; samples are
real ``ugrod.core.gpus.NodeSample`` values. Prints, in one run:
- the baseline: prometheus-client's own exposition (``generate_latest``) of
  the same number of series, held in plain ``Gauge`` objects (no computing);
- ugrod: a full HTTP GET of /metrics from its aiohttp listener (the collector
  computing every series from state, then the text renderer), and the same
  collector through prometheus-client's registry path for reference.
Target: the HTTP scrape < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import generate_latest

from ugrod.core import events as ev
from ugrod.core.gpus import GpuSample, NodeSample
from ugrod.core.state import State, apply
from ugrod.metrics.collector import (
    NodeSampleView,
    UgroCollector,
    bound_port,
    make_registry,
    start_metrics_server,
)
from ugrod.metrics.exposition import Family
from ugrod.metrics.runtime_stats import RuntimeStats

GB = 1 << 30
T0 = 1_700_000_000.0


def build(n_nodes: int, n_gpus: int, n_jobs: int) -> tuple[State, dict[str, NodeSample],
                                                             dict[str, dict[str, float]],
                                                             RuntimeStats]:
    state, ts = State(), T0
    stats = RuntimeStats()
    alice = ev.Actor(user="alice", uid=1000)

    def record(e: ev.Event, actor: ev.Actor = ev.DAEMON) -> None:
        nonlocal state, ts
        ts += 0.001
        r = ev.Record(seq=state.seq + 1, ts=ts, actor=actor, event=e)
        state = apply(state, r)
        stats.jobs_committed([r], state)

    names = [f"node{n:03d}" for n in range(n_nodes)]
    for n, name in enumerate(names):
        record(ev.NodeAdded(node=ev.NodeSpec(
            name=name, host=f"10.0.{n // 250}.{n % 250 + 1}", transport="ssh",
            gpus=tuple(ev.Gpu(index=i, model="NVIDIA H100 80GB HBM3", vram_bytes=80 * GB,
                              uuid=f"GPU-{n:04d}-{i}") for i in range(n_gpus)))))
    slots = [(name, i) for name in names for i in range(n_gpus)]
    for j in range(n_jobs):
        job = f"job-{j:05d}"
        gpu_job = j < len(slots)
        record(ev.JobSubmitted(job=job, spec=ev.JobSpec(argv=("python3", "train.py"),
                                                        gpus_per_node=1 if gpu_job else 0)),
               alice)
        node, gpus = (slots[j][0], (slots[j][1],)) if gpu_job else (names[j % n_nodes], ())
        record(ev.JobPlaced(job=job, attempt=1,
                            ranks=(ev.RankPlacement(rank=0, node=node, gpus=gpus),)))
        record(ev.RankStarted(job=job, attempt=1, rank=0, node=node, pid=10_000 + j))
        record(ev.JobRunning(job=job, attempt=1))
    samples = {
        name: NodeSample(
            ts=ts, latency_ms=2.5, smi_s=0.06, cpu_count=64, cpu_ticks=(10**9, 6 * 10**8),
            load=(12.0, 11.0, 10.0), mem_total_bytes=512 * GB, mem_available_bytes=200 * GB,
            disk_total_bytes=4000 * GB, disk_used_bytes=1000 * GB, disk_avail_bytes=3000 * GB,
            gpus=tuple(GpuSample(uuid=f"GPU-{n:04d}-{i}", index=i, name="NVIDIA H100 80GB HBM3",
                                 util_percent=97.0, memory_used_bytes=70 * GB,
                                 memory_total_bytes=80 * GB, temperature_c=64.0, power_w=650.5)
                       for i in range(n_gpus)))
        for n, name in enumerate(names)}
    training = {f"job-{j:05d}": {"ts": ts, "step": 1200.0 + j, "loss": 0.25, "throughput": 812.5}
                for j in range(n_jobs)}
    for route in ("/v1/ping", "/v1/jobs", "/v1/jobs/{id}", "/v1/nodes", "/v1/queue",
                  "/v1/events", "/v1/jobs/{id}/cancel", "/v1/jobs/{id}/logs"):
        for code in (200, 404):
            stats.api_request(route, "GET", code, 0.002)
    for name in names:
        stats.health_check(name, 0.05, ok=True)
    stats.log_batch(4, 1200, 0.0003)
    return state, samples, training, stats


def gauge_baseline(collector: UgroCollector) -> CollectorRegistry:
    """The same series (names, label names and values) held in plain Gauges."""
    registry = CollectorRegistry(auto_describe=False)
    for fam in collector.families():
        if isinstance(fam, Family):
            rows = [(fam.name, fam.labelnames, v, x) for v, x in fam.rows]
        else:
            rows = list(fam.samples())
        gauges: dict[str, Gauge] = {}
        for name, labelnames, values, value in rows:
            g = gauges.get(name)
            if g is None:
                g = gauges[name] = Gauge(name.removesuffix("_total"), fam.doc, labelnames,
                                         registry=registry)
            (g.labels(*values) if labelnames else g).set(value)
    return registry


Timing = tuple[list[float], list[float]]  # wall ms, CPU ms (this process)


def timed(fn: Callable[[], object], runs: int) -> Timing:
    fn()  # warm up
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - t0) * 1000)
    return wall, cpu


def show(label: str, t: Timing) -> str:
    wall, cpu = t
    p95 = sorted(wall)[max(0, round(0.95 * len(wall)) - 1)]
    return (f"{label:<50} median {statistics.median(wall):6.1f} ms  p95 {p95:6.1f} ms  "
            f"(CPU {statistics.median(cpu):6.1f} ms)")


async def http_scrapes(collector: UgroCollector, runs: int) -> tuple[Timing, bytes]:
    """GETs through a real TCP connection; server and client share this process's CPU."""
    runner = await start_metrics_server("127.0.0.1", 0, collector)
    url = f"http://127.0.0.1:{bound_port(runner)}/metrics"
    wall: list[float] = []
    cpu: list[float] = []
    body = b""
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(runs + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                async with session.get(url) as resp:
                    body = await resp.read()
                if i:
                    cpu.append((time.process_time() - c0) * 1000)
                    wall.append((time.perf_counter() - t0) * 1000)
    finally:
        await runner.cleanup()
    return (wall, cpu), body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--dump", type=Path, help="write one /metrics body here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    state, samples, training, stats = build(args.nodes, args.gpus, args.jobs)
    built_s = time.perf_counter() - t0

    def get_samples() -> Mapping[str, NodeSampleView]:
        return samples

    collector = UgroCollector(lambda: state, get_samples, lambda: training, stats)
    baseline = gauge_baseline(collector)
    series = sum(1 for ln in collector.exposition().splitlines() if not ln.startswith(b"#"))
    base_series = sum(1 for ln in generate_latest(baseline).splitlines()
                      if not ln.startswith(b"#"))
    print(f"cluster: {args.nodes} nodes x {args.gpus} GPUs, {args.jobs} active jobs; state from "
          f"{state.seq} events via apply() in {built_s:.1f} s")
    print(f"series: ugrod {series}, baseline {base_series}")
    base = timed(lambda: generate_latest(baseline), args.runs)
    print(show("baseline: generate_latest() of plain Gauges", base))
    http, body = asyncio.run(http_scrapes(collector, args.runs))
    print(show("ugrod: HTTP GET /metrics (compute+render+send)", http))
    fast = timed(collector.exposition, args.runs)
    print(show("ugrod: collector.exposition() (compute+render)", fast))
    registry = make_registry(collector, process=False)
    slow = timed(lambda: generate_latest(registry), args.runs)
    print(show("for reference: collector via client registry", slow))
    median = statistics.median(http[0])
    ratio = median / statistics.median(base[0])
    verdict = "meets" if median < 50 else "MISSES"
    print(f"HTTP scrape: {median:.1f} ms = {ratio:.2f}x the baseline; target < 50 ms: {verdict}")
    if args.dump:
        args.dump.write_bytes(body)


if __name__ == "__main__":
    main()
