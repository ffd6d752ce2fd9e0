"""ugrod's metrics: the collector's series from real state, RuntimeStats, and the listener."""

from __future__ import annotations

import re
from collections.abc import Mapping

import aiohttp
import pytest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.parser import text_string_to_metric_families

from ugrod.core import events as ev
from ugrod.core.gpus import GpuSample, NodeSample
from ugrod.core.state import State, apply, from_snapshot, to_snapshot
from ugrod.metrics.collector import (
    NodeSampleView,
    UgroCollector,
    bound_port,
    make_registry,
    start_metrics_server,
)
from ugrod.metrics.exposition import render
from ugrod.metrics.runtime_stats import ENDED_KEEP_S, RuntimeStats

ALICE = ev.Actor(user="alice", uid=1000)
GB = 1 << 30
T0 = 1_700_000_000.0
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Cluster:
    """State built with real events through ``apply``, and RuntimeStats fed like the ledger."""

    def __init__(self) -> None:
        self.state = State()
        self.now = T0
        self.stats = RuntimeStats(clock=lambda: self.now)
        self.samples: dict[str, NodeSample] = {}
        self.training: dict[str, dict[str, float]] = {}

    def record(self, *events: ev.Event, actor: ev.Actor = ev.DAEMON, dt: float = 1.0) -> None:
        records = []
        for e in events:
            self.now += dt
            r = ev.Record(seq=self.state.seq + 1, ts=self.now, actor=actor, event=e)
            self.state = apply(self.state, r)
            records.append(r)
        self.stats.jobs_committed(records, self.state)

    def node(self, name: str, gpus: int = 2) -> None:
        self.record(ev.NodeAdded(node=ev.NodeSpec(
            name=name, host=f"10.0.0.{len(self.state.nodes) + 1}", transport="ssh",
            gpus=tuple(ev.Gpu(index=i, model="NVIDIA L40S", vram_bytes=48 * GB,
                              uuid=f"GPU-{name}-{i}") for i in range(gpus)))))

    def submit(self, job: str, gpus: int = 1, nodes: int = 1) -> None:
        self.record(ev.JobSubmitted(job=job, spec=ev.JobSpec(
            argv=("python3", "train.py"), gpus_per_node=gpus, nodes=nodes)), actor=ALICE)

    def start(self, job: str, *ranks: tuple[str, tuple[int, ...]], attempt: int = 1) -> None:
        self.record(ev.JobPlaced(job=job, attempt=attempt, ranks=tuple(
            ev.RankPlacement(rank=i, node=n, gpus=g) for i, (n, g) in enumerate(ranks))), dt=10)
        for i, (n, _) in enumerate(ranks):
            self.record(ev.RankStarted(job=job, attempt=attempt, rank=i, node=n, pid=100 + i))
        self.record(ev.JobRunning(job=job, attempt=attempt))

    def end(self, job: str, outcome: str, attempt: int = 1, dt: float = 100.0,
            reason: str = "") -> None:
        self.record(ev.JobEnded(job=job, attempt=attempt, outcome=outcome, reason=reason,
                                retry_at=self.now + dt + 5 if outcome == "retrying" else None),
                    dt=dt)

    def restart(self) -> None:
        """What ugrod does at start: state from a snapshot, RuntimeStats anew, rebuild."""
        self.state = from_snapshot(to_snapshot(self.state))
        self.stats = RuntimeStats(clock=lambda: self.now)
        self.stats.rebuild(self.state)

    def collector(self) -> UgroCollector:
        def samples() -> Mapping[str, NodeSampleView]:
            return self.samples

        return UgroCollector(lambda: self.state, samples, lambda: self.training, self.stats,
                             clock=lambda: self.now, version="9.9.9")

    def series(self) -> Series:
        text = self.collector().exposition().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def pick(series: Series, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Series of one name whose labels include ``labels``."""
    return {lab: v for (n, lab), v in series.items()
            if n == name and set(labels.items()) <= set(lab)}


def one(series: Series, name: str, **labels: str) -> float:
    found = pick(series, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def gpu(index: int, **kw: object) -> GpuSample:
    return GpuSample(uuid=f"GPU-a-{index}", index=index, name="NVIDIA L40S", **kw)  # type: ignore[arg-type]


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster()
    c.node("a")
    c.node("b")
    return c


def test_empty_state_lists_every_current_job_state_with_zero() -> None:
    s = Cluster().series()
    assert {dict(lab)["state"]: v for lab, v in pick(s, "ugro_jobs").items()} == {
        "queued": 0, "starting": 0, "running": 0, "retrying": 0}
    assert {dict(lab)["reason"] for lab in pick(s, "ugro_job_attempt_failures_total")} == {
        "oom", "exit", "lost", "stalled", "cancelled", "time_limit"}
    assert one(s, "ugro_queue_length") == 0
    assert one(s, "ugro_queue_oldest_wait_seconds") == 0
    assert one(s, "ugro_build_info", version="9.9.9") == 1
    assert one(s, "ugro_jobs_finished_total", outcome="failed") == 0
    assert one(s, "ugro_job_wait_seconds_count") == 0
    assert not pick(s, "ugro_job_state")


def test_active_job_series_and_gpu_allocation(cluster: Cluster) -> None:
    cluster.submit("train", gpus=2, nodes=2)
    cluster.start("train", ("a", (0, 1)), ("b", (1, 0)))
    cluster.training["train"] = {"ts": cluster.now, "step": 400, "loss": 0.25,
                                 "throughput": 812.5}
    s = cluster.series()
    assert one(s, "ugro_job_state", job_name="train", owner="alice", state="running") == 1
    assert one(s, "ugro_job_state", job_name="train", state="starting") == 0
    assert one(s, "ugro_job_training_step", job_name="train", owner="alice") == 400
    assert one(s, "ugro_job_training_loss", job_name="train") == 0.25
    assert one(s, "ugro_job_training_throughput", job_name="train") == 812.5
    assert one(s, "ugro_job_stalled", job_name="train") == 0
    alloc = pick(s, "ugro_job_gpu_allocation", job_name="train")
    assert sorted((d["node"], d["gpu"], d["UUID"], d["rank"])
                  for d in map(dict, alloc)) == [
        ("a", "0", "GPU-a-0", "0"), ("a", "1", "GPU-a-1", "0"),
        ("b", "0", "GPU-b-0", "1"), ("b", "1", "GPU-b-1", "1")]
    assert set(alloc.values()) == {1.0}
    assert one(s, "ugro_gpu_allocated", node="a", gpu="1", UUID="GPU-a-1",
               model_name="NVIDIA L40S") == 1
    assert one(s, "ugro_jobs", state="running") == 1


def test_every_other_reported_number_is_a_value_series_with_a_cap(cluster: Cluster) -> None:
    cluster.submit("train", gpus=1)
    cluster.start("train", ("a", (0,)))
    values: dict[str, float] = {"step": 3, "loss": 0.5, "grad_norm": 1.5, "train_acc": 0.9}
    values.update({f"m{i}": float(i) for i in range(100)})
    values["bad"] = float("nan")
    cluster.training["train"] = values
    s = cluster.series()
    series = {dict(k)["name"]: v for k, v in pick(s, "ugro_job_training_value", job_name="train",
                                                  owner="alice").items()}
    assert series["grad_norm"] == 1.5 and series["train_acc"] == 0.9
    assert len(series) == 32
    assert not {"step", "loss", "bad"} & set(series)


def test_ended_job_keeps_one_series_saying_how_it_ended(cluster: Cluster) -> None:
    cluster.submit("j")
    cluster.start("j", ("a", (0,)))
    cluster.training["j"] = {"step": 1, "loss": 2.0}
    cluster.end("j", "succeeded")
    s = cluster.series()
    assert [k[0] for k in s if ("job_name", "j") in k[1]] == ["ugro_job_ended_timestamp_seconds"]
    assert one(s, "ugro_job_ended_timestamp_seconds", job_name="j", owner="alice",
               outcome="succeeded", reason="") == cluster.now
    assert one(s, "ugro_jobs", state="running") == 0
    assert one(s, "ugro_jobs_finished_total", outcome="succeeded") == 1
    assert one(s, "ugro_job_run_seconds_count") == 1
    job = cluster.state.jobs["j"]
    assert job.ended_at is not None and job.started_at is not None
    assert one(s, "ugro_job_run_seconds_sum") == job.ended_at - job.started_at
    assert one(s, "ugro_gpu_allocated", node="a", gpu="0") == 0
    # One GPU held from placement to end.
    assert one(s, "ugro_gpu_allocated_seconds_total", owner="alice") == \
        job.ended_at - job.started_at
    cluster.now += ENDED_KEEP_S + 1
    assert not pick(cluster.series(), "ugro_job_ended_timestamp_seconds")


def test_queue_wait_is_observed_at_placement(cluster: Cluster) -> None:
    """Three jobs placed, none ended: three waits (it was one, at the end, before)."""
    for name in ("p1", "p2", "p3"):
        cluster.submit(name)
    cluster.start("p1", ("a", (0,)))
    cluster.start("p2", ("a", (1,)))
    cluster.start("p3", ("b", (0,)))
    s = cluster.series()
    assert one(s, "ugro_job_wait_seconds_count") == 3
    assert one(s, "ugro_job_run_seconds_count") == 0
    # p1 was placed 10 s after p3's submission, 12 s after its own.
    assert one(s, "ugro_job_wait_seconds_bucket", le="10.0") == 0
    assert one(s, "ugro_job_wait_seconds_bucket", le="30.0") == 2
    # A retry's wait runs from the failed attempt's end to its next placement.
    cluster.end("p1", "retrying")
    cluster.start("p1", ("a", (0,)), attempt=2)
    s = cluster.series()
    assert one(s, "ugro_job_wait_seconds_count") == 4
    assert one(s, "ugro_job_wait_seconds_bucket", le="10.0") == 1


def test_gpu_seconds_grow_while_running_and_stay_after_the_end(cluster: Cluster) -> None:
    cluster.submit("g", gpus=2)
    cluster.start("g", ("a", (0, 1)))
    placed = cluster.state.jobs["g"].started_at
    assert placed is not None
    cluster.now += 50
    running = one(cluster.series(), "ugro_gpu_allocated_seconds_total", owner="alice")
    assert running == 2 * (cluster.now - placed)
    cluster.end("g", "failed", dt=25)
    ended = one(cluster.series(), "ugro_gpu_allocated_seconds_total", owner="alice")
    assert ended == 2 * (cluster.now - placed) > running
    cluster.restart()
    assert one(cluster.series(), "ugro_gpu_allocated_seconds_total", owner="alice") == ended


def test_retry_cancel_and_resume_counts(cluster: Cluster) -> None:
    cluster.submit("r")
    cluster.start("r", ("a", (0,)))
    cluster.end("r", "retrying")
    cluster.submit("c")
    cluster.record(ev.JobCancelRequested(job="c"))
    cluster.submit("f")
    cluster.start("f", ("b", (0,)))
    cluster.end("f", "failed")
    s = cluster.series()
    assert one(s, "ugro_job_retries_total") == 1
    assert one(s, "ugro_jobs", state="retrying") == 1
    assert one(s, "ugro_jobs_finished_total", outcome="cancelled") == 1
    assert one(s, "ugro_jobs_finished_total", outcome="failed") == 1
    assert one(s, "ugro_job_run_seconds_count") == 2
    assert one(s, "ugro_queue_length") == 1  # r waits for its retry
    assert one(s, "ugro_job_ended_timestamp_seconds", job_name="r", outcome="retrying",
               reason="exit") > 0
    cluster.record(ev.JobResumed(job="f", spec=cluster.state.jobs["f"].spec), actor=ALICE)
    s = cluster.series()
    assert one(s, "ugro_jobs", state="queued") == 1
    assert one(s, "ugro_jobs_finished_total", outcome="failed") == 1  # counters never go down
    assert one(s, "ugro_job_resumes_total") == 1
    assert not pick(s, "ugro_job_ended_timestamp_seconds", job_name="f")


FAILED_40 = [f"job{i}" for i in range(40)]


def test_terminal_counters_never_step_down_across_resume_and_restart(
        cluster: Cluster) -> None:
    """40 failed, one resumed, ugrod restarted: still 40 (it read 39 before: a false alert)."""
    for name in FAILED_40:
        cluster.submit(name)
        cluster.start(name, ("a", (0,)))
        cluster.end(name, "failed", reason="rank 0 on a exited with code 1")
    assert one(cluster.series(), "ugro_jobs_finished_total", outcome="failed") == 40
    cluster.record(ev.JobResumed(job="job7", spec=cluster.state.jobs["job7"].spec),
                   actor=ALICE)
    cluster.restart()
    s = cluster.series()
    assert one(s, "ugro_jobs_finished_total", outcome="failed") == 40
    assert one(s, "ugro_job_attempt_failures_total", reason="exit") == 40
    assert one(s, "ugro_job_resumes_total") == 1
    # The resumed job runs out of GPU memory this time: one more failure, by reason.
    cluster.start("job7", ("a", (0,)), attempt=2)
    cluster.end("job7", "failed", attempt=2,
                reason="rank 0 on a ran out of GPU memory (CUDA out of memory)")
    cluster.restart()
    s = cluster.series()
    assert one(s, "ugro_jobs_finished_total", outcome="failed") == 41
    assert one(s, "ugro_job_attempt_failures_total", reason="oom") == 1
    # Ended within the last half hour: the series came back after the restart.
    assert one(s, "ugro_job_ended_timestamp_seconds", job_name="job7", outcome="failed",
               reason="oom") == cluster.now


@pytest.mark.parametrize(("outcome", "reason", "expected"), [
    ("failed", "rank 1 on b ran out of GPU memory (CUDA out of memory); last lines: x", "oom"),
    ("failed", "rank 0 on a exited with code 137 (SIGKILL)", "exit"),
    ("failed", "rank 0 on a vanished: its process (pid 7) is gone (node reboot, OOM killer "
               "or kill -9?)", "lost"),
    ("retrying", "node b declared dead: its last 3 health checks failed", "lost"),
    ("failed", "stalled: no step advance for 600 s (last step 9)", "stalled"),
    ("cancelled", "cancelled by alice", "cancelled"),
    ("failed", "time limit of 3600 s reached", "time_limit"),
])
def test_failure_reasons(outcome: str, reason: str, expected: str) -> None:
    from ugrod.core.tally import failure_reason
    assert failure_reason(outcome, reason) == expected


def test_queue_age_ignores_held_jobs(cluster: Cluster) -> None:
    cluster.submit("old")
    cluster.record(ev.JobHeld(job="old"), actor=ALICE)
    submitted = cluster.now + 1
    cluster.submit("new")
    cluster.now += 60
    s = cluster.series()
    assert one(s, "ugro_queue_length") == 1
    assert one(s, "ugro_jobs_held") == 1
    assert one(s, "ugro_queue_oldest_wait_seconds") == pytest.approx(cluster.now - submitted)


def test_node_state_set_breaker_and_alerts(cluster: Cluster) -> None:
    cluster.record(ev.NodeDrained(node="a", reason="maintenance"),
                   ev.NodeHealthChanged(node="b", health="unreachable", score=None),
                   ev.AlertRaised(node="b", alert="gpu_temperature", severity="critical",
                                  message="GPU 0 at 90 C"))
    cluster.stats.breaker("a", "half-open")
    s = cluster.series()
    for node in ("a", "b"):
        states = pick(s, "ugro_node_state", node=node)
        assert len(states) == 5
        assert sum(states.values()) == 1
    assert one(s, "ugro_node_state", node="a", state="draining") == 1
    assert one(s, "ugro_node_state", node="b", state="unreachable") == 1
    assert one(s, "ugro_node_circuit_breaker_state", node="a", state="half-open") == 1
    assert one(s, "ugro_node_circuit_breaker_state", node="b", state="open") == 1
    assert one(s, "ugro_node_alert", node="b", alert="gpu_temperature",
               severity="critical") == 1
    assert one(s, "ugro_node_info", node="a", transport="ssh") == 1


def test_samples_become_gpu_and_node_series(cluster: Cluster) -> None:
    cluster.samples["a"] = NodeSample(
        ts=T0 + 5, latency_ms=12.5, smi_s=0.08, cpu_count=16, cpu_ticks=(10_000, 7_500),
        load=(1.5, 1.0, 0.5), mem_total_bytes=64 * GB, mem_available_bytes=16 * GB,
        disk_total_bytes=100 * GB, disk_used_bytes=91 * GB, disk_avail_bytes=9 * GB,
        gpus=(gpu(0, util_percent=97.0, memory_used_bytes=40 * GB, memory_total_bytes=48 * GB,
                  temperature_c=71.0, power_w=250.5),
              gpu(1, temperature_c=90.0, error="GPU requires reset")))
    cluster.stats.health_check("a", 0.25, ok=True)
    cluster.stats.health_check("b", 3.0, ok=False)
    s = cluster.series()
    labels = {"node": "a", "gpu": "0", "UUID": "GPU-a-0", "model_name": "NVIDIA L40S"}
    assert one(s, "ugro_gpu_utilization_ratio", **labels) == 0.97
    assert one(s, "ugro_gpu_memory_used_bytes", **labels) == 40 * GB
    assert one(s, "ugro_gpu_memory_total_bytes", **labels) == 48 * GB
    assert one(s, "ugro_gpu_temperature_celsius", **labels) == 71.0
    assert one(s, "ugro_gpu_power_watts", **labels) == 250.5
    assert one(s, "ugro_gpu_error", **labels) == 0
    # GPU 1 had only a temperature: no made-up zeros for the rest.
    assert not pick(s, "ugro_gpu_utilization_ratio", gpu="1")
    assert one(s, "ugro_gpu_error", node="a", gpu="1") == 1
    assert one(s, "ugro_node_check_latency_seconds", node="a") == 0.0125
    assert one(s, "ugro_node_memory_used_ratio", node="a") == 0.75
    assert one(s, "ugro_node_disk_used_ratio", node="a") == 0.91
    assert one(s, "ugro_node_cpu_seconds_total", node="a", mode="idle") == 75.0
    assert one(s, "ugro_node_cpu_seconds_total", node="a", mode="busy") == 25.0
    assert one(s, "ugro_node_gpu_query_ok", node="a") == 1
    assert not pick(s, "ugro_node_disk_used_ratio", node="b")  # b has no sample yet
    assert one(s, "ugro_health_checks_total", node="b") == 1
    assert one(s, "ugro_health_check_failures_total", node="b") == 1
    assert one(s, "ugro_health_check_failures_total", node="a") == 0
    assert one(s, "ugro_node_last_check_success_timestamp_seconds", node="a") == cluster.now
    assert one(s, "ugro_health_check_duration_seconds_count") == 2


def test_runtime_stats_series() -> None:
    c = Cluster()
    c.stats.log_batch(3, 900, 0.0004)
    c.stats.log_batch(1, 300, 0.02)
    c.stats.replay_done(0.5, 1234)
    c.stats.snapshot_written(0.2, 4096)
    c.stats.api_request("/v1/jobs/{id}", "GET", 200, 0.003)
    c.stats.api_request("/v1/jobs/{id}", "GET", 404, 0.001)
    c.stats.scheduler_tick(0.002, placed=2)
    s = c.series()
    assert one(s, "ugro_event_log_appended_events_total") == 4
    assert one(s, "ugro_event_log_batches_total") == 2
    assert one(s, "ugro_event_log_fsync_seconds_bucket", le="0.0005") == 1
    assert one(s, "ugro_event_log_fsync_seconds_bucket", le="+Inf") == 2
    assert one(s, "ugro_event_log_batch_events_sum") == 4
    assert one(s, "ugro_event_log_replay_duration_seconds") == 0.5
    assert one(s, "ugro_snapshot_size_bytes") == 4096
    assert one(s, "ugro_api_requests_total", route="/v1/jobs/{id}", code="404") == 1
    assert one(s, "ugro_api_request_duration_seconds_count", route="/v1/jobs/{id}") == 2
    assert one(s, "ugro_scheduler_placements_total") == 2


def test_fast_exposition_equals_prometheus_client_output(cluster: Cluster) -> None:
    cluster.submit("odd", gpus=1)
    cluster.start("odd", ("a", (0,)))
    cluster.stats.api_request('/v1/"quoted"\\path\nnext', "GET", 200, 0.01)
    collector = cluster.collector()
    registry = make_registry(collector, process=False)
    from prometheus_client.exposition import generate_latest

    def parsed(text: bytes) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {(s.name, tuple(sorted(s.labels.items())), s.value)
                for fam in text_string_to_metric_families(text.decode())
                for s in fam.samples if s.name != "ugro_metrics_collect_duration_seconds"}

    slow = parsed(generate_latest(registry))
    fast = parsed(collector.exposition())
    assert fast == slow
    assert ("ugro_api_requests_total", (("code", "200"), ("method", "GET"),
                                        ("route", '/v1/"quoted"\\path\nnext')), 1.0) in fast
    # OpenMetrics (what Prometheus 2.42 asks for) carries no *_created series.
    assert b"_created" not in openmetrics_latest(registry)  # type: ignore[no-untyped-call]


def test_render_escapes_and_formats() -> None:
    from ugrod.metrics.exposition import Family

    fam = Family("x_total", "a\\b\nc", "counter", ("l",))
    fam.add(('say "hi"\n',), float("inf"))
    fam.add(("plain",), 2.5)
    assert render([fam]).decode() == (
        "# HELP x_total a\\\\b\\nc\n# TYPE x_total counter\n"
        'x_total{l="say \\"hi\\"\\n"} +Inf\nx_total{l="plain"} 2.5\n')
    with pytest.raises(ValueError, match="_total"):
        Family("x", "doc", "counter")


def test_collect_reads_each_source_once_per_scrape(cluster: Cluster) -> None:
    calls = {"state": 0, "samples": 0, "jobs": 0}

    def state() -> State:
        calls["state"] += 1
        return cluster.state

    def samples() -> Mapping[str, NodeSampleView]:
        calls["samples"] += 1
        return {}

    def jobs() -> Mapping[str, Mapping[str, float]]:
        calls["jobs"] += 1
        return {}

    UgroCollector(state, samples, jobs, cluster.stats).exposition()
    assert calls == {"state": 1, "samples": 1, "jobs": 1}


async def test_metrics_listener_serves_text_format(cluster: Cluster) -> None:
    runner = await start_metrics_server("127.0.0.1", 0, cluster.collector())
    try:
        port = bound_port(runner)
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/metrics",
                headers={"Accept": "application/openmetrics-text;version=1.0.0"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = await resp.text()
    finally:
        await runner.cleanup()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"ugro_jobs", "ugro_node_state", "process_resident_memory_bytes"} <= names


def test_docs_list_every_metric(cluster: Cluster) -> None:
    from pathlib import Path

    cluster.record(ev.DaemonStarted(version="1"))
    cluster.stats.replay_done(1.0, 1)
    cluster.stats.snapshot_written(0.1, 10)
    cluster.stats.snapshot_failed()
    cluster.stats.state_dir_usage(1000, 600, 400)
    cluster.stats.checkpoint_head_free_bytes = 5e9
    cluster.stats.checkpoint_floor_bytes = 1e9
    cluster.samples["a"] = NodeSample(ts=T0, gpus=(gpu(0),))
    names = {f.name for f in cluster.collector().families()}
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(ugro_[a-z0-9_]+)` \|", doc, re.M))
    assert names == documented
