"""Issue 6, live: a real Prometheus scrapes a real ugrod and GPU exporters while DDP trains.

Three real sshd nodes, each with the fake nvidia-smi first on its PATH (two GPUs
on node0, one on the others; the values below), the same GPUs stated in
cluster.yaml; ugrod with ``metrics: {port: 0}`` (the bound port read from
``/v1/ping``); ``python -m exporters.gpu_exporter`` per node, bound to that
node's address and run with that node's PATH; Debian's prometheus at a 1 s
scrape interval with the scrape config ``ugroctl prometheus-config`` generates
and the project's recording and alert rules. After the first scrape a real
``examples/train_ddp.py`` runs under torchrun on the three nodes (one GPU per
node: the fake GPUs are inventory, the example falls back to gloo on CPU).

Everything is then asked of Prometheus' HTTP API: the job's states, its loss
against the last line of its central metrics.jsonl, node health, GPU values
equal to the fake's, the job-to-GPU join, rule health and every dashboard
panel; ``promtool check metrics`` reads ugrod's and the exporter's output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards_live import (
    AlertmanagerServer,
    Prometheus,
    PrometheusServer,
    Webhook,
    empty_queries,
    free_port,
)

from tests.conftest import Ugrod, _kill_leftovers, ugroctl_argv
from tests.sshd_nodes import SshdCluster, wait_no_job_processes

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train_ddp.py")
FAKE_SMI = ROOT / "tests" / "fake_nvidia_smi" / "nvidia-smi"
JOB = "obs-train"
SHORT = "obs-short"
OOM = "obs-oom"  # fails with CUDA's out-of-memory words: UgroJobFailed, reason oom
MIB = 1024 * 1024
pytestmark = pytest.mark.timeout(240)

# What each node's fake nvidia-smi answers. node0's second GPU runs warm (82 °C,
# over the 80 °C warning, under the 85 °C critical) so node0 carries an active
# alert (the node-detail "Active alerts" panel) while staying schedulable.
GPUS: dict[str, list[dict[str, Any]]] = {
    "node0": [
        {"index": 0, "uuid": "GPU-0b5e0000-0000-4000-8000-00000000a000",
         "name": "NVIDIA GeForce RTX 4070", "utilization.gpu": 37, "memory.used": 3000,
         "memory.total": 12288, "temperature.gpu": 55, "power.draw": 110.25},
        {"index": 1, "uuid": "GPU-0b5e0000-0000-4000-8000-00000000a001",
         "name": "NVIDIA GeForce RTX 4070", "utilization.gpu": 3, "memory.used": 512,
         "memory.total": 12288, "temperature.gpu": 82, "power.draw": 35.5},
    ],
    "node1": [
        {"index": 0, "uuid": "GPU-0b5e0000-0000-4000-8000-00000000b000",
         "name": "NVIDIA GeForce RTX 4060", "utilization.gpu": 64, "memory.used": 2048,
         "memory.total": 8192, "temperature.gpu": 61, "power.draw": 90.75},
    ],
    "node2": [
        {"index": 0, "uuid": "GPU-0b5e0000-0000-4000-8000-00000000c000",
         "name": "NVIDIA GeForce RTX 4060", "utilization.gpu": 12, "memory.used": 4096,
         "memory.total": 8192, "temperature.gpu": 48, "power.draw": 70.5},
    ],
}

# Dashboard queries that may return nothing in this run, and why:
MAY_BE_EMPTY = (
    # ugro_job_stalled == 1 only while the watchdog finds the step counter stopped;
    # this job makes progress every step, so a stall here would itself be a bug.
    r"annotation 'Stalled'",
    # The job panels are looked at while the job runs: it has not ended yet.
    r"job-detail: annotation 'Ended'",
    # No node changes state during the run (a change here would itself be a bug).
    r"annotation 'Node state changed'",
    # Energy comes from NVML only; the exporters here read the fake nvidia-smi.
    r"'GPU energy'",
)


def install_fake(node_bin: Path, gpus: list[dict[str, Any]]) -> None:
    node_bin.mkdir(parents=True, exist_ok=True)
    shutil.copy(FAKE_SMI, node_bin / "nvidia-smi")
    tmp = node_bin / "state.json.tmp"
    tmp.write_text(json.dumps({"gpus": gpus}))
    tmp.replace(node_bin / "state.json")


def write_config(path: Path, nodes: SshdCluster, metrics_port: int) -> Path:
    cfg = {
        "cluster": {"name": "obs", "known_hosts": str(nodes.known_hosts)},
        "nodes": {
            n.name: {"host": n.host, "port": n.port, "user": n.user,
                     "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                     "transport": "ssh", "python": sys.executable, "rank": i,
                     "gpu_exporter": True,
                     "gpus": [{"model": g["name"], "vram_gb": g["memory.total"] / 1024,
                               "uuid": g["uuid"]} for g in GPUS[n.name]]}
            for i, n in enumerate(nodes)},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "health": {
            # A sample a second, so Prometheus' 1 s scrapes see fresh values.
            "intervals": {"active_s": 1, "recent_s": 1, "idle_s": 1, "long_idle_s": 1},
            # Only the fake GPUs decide health here: not this test machine's disk,
            # memory or the ssh session set-up time on a busy CI runner.
            "thresholds": {"latency_ms": {"warn": 5000, "crit": 10000},
                           "memory_percent": {"warn": 99, "crit": 100},
                           "disk_percent": {"warn": 99, "crit": 100}},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Live:
    ugrod: Ugrod
    prom: Prometheus
    server: PrometheusServer
    exporter_port: int
    metrics_port: int
    started: float
    webhook: Webhook
    scrape_config: str


def start_exporters(nodes: SshdCluster, port: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    """One exporter per node, on the node's own address, with the node's PATH."""
    procs = []
    for n in nodes:
        env = dict(os.environ)
        env.pop("FAKE_NVIDIA_SMI_STATE", None)
        env.update(PYTHONPATH=str(ROOT),
                   PATH=os.pathsep.join([str(n.bin_dir), str(Path(sys.executable).parent),
                                         "/usr/local/bin", "/usr/bin", "/bin"]))
        with (logs / f"exporter-{n.name}.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "exporters.gpu_exporter", "--address", n.host,
                 "--port", str(port), "--interval", "1"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body


def wait_for(what: str, check: Any, timeout_s: float = 30.0, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def series(prom: Prometheus, expr: str, at: float | None = None) -> dict[tuple[str, ...], float]:
    """Instant vector as {(label values sorted by name, without __name__): value}."""
    out = {}
    for s in prom.query(expr, at)["result"]:
        labels = tuple(f"{k}={v}" for k, v in sorted(s["metric"].items()) if k != "__name__")
        out[labels] = float(s["value"][1])
    return out


def by(prom: Prometheus, expr: str, *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(s["metric"].get(k, "") for k in keys): float(s["value"][1])
            for s in prom.query(expr)["result"]}


def promtool_metrics(body: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=body.decode(),
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def live(short_tmp: Path, node_guard: SshdCluster) -> Iterator[Live]:
    nodes = node_guard
    for n in nodes:
        install_fake(n.bin_dir, GPUS[n.name])
    d = Ugrod(short_tmp, config=write_config(short_tmp / "cluster.yaml", nodes, 0), grace_s=3.0)
    exporters: list[subprocess.Popen[bytes]] = []
    server: PrometheusServer | None = None
    webhook = Webhook()
    am = AlertmanagerServer(short_tmp / "am", webhook.url)
    try:
        am.start()
        d.start()
        status, ping = d.api("GET", "/v1/ping")
        assert status == 200 and isinstance(ping["metrics_port"], int), ping
        metrics_port = ping["metrics_port"]
        exporter_port = free_port()
        exporters = start_exporters(nodes, exporter_port, short_tmp)
        # The config exactly as `ugroctl prometheus-config` writes it for this cluster
        # (metrics port fixed to the one ugrod bound), at a 1 s interval, with the rules
        # rendered from this cluster.yaml's thresholds and alerts sent to Alertmanager.
        fixed = write_config(short_tmp / "cluster-fixed.yaml", nodes, metrics_port)
        rules = short_tmp / "rules"
        rules.mkdir()
        gen = subprocess.run(
            [*ugroctl_argv(), "prometheus-config", "--config", str(fixed),
             "--rules-dir", str(rules), "--rules-out", str(rules),
             "--alertmanager", am.url,
             "--exporter-port", str(exporter_port), "--scrape-interval", "1s"],
            capture_output=True, text=True, timeout=60, env=d.env)
        assert gen.returncode == 0, gen.stderr
        server = PrometheusServer(short_tmp / "prom", gen.stdout)
        server.start()
        yield Live(d, Prometheus(server.url), server, exporter_port, metrics_port, time.time(),
                   webhook, gen.stdout)
    finally:
        am.stop()
        webhook.stop()
        if server is not None:
            server.stop()
        stop(exporters)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        for n in nodes:
            _kill_leftovers(n.work_dir)
            for f in ("nvidia-smi", "state.json"):
                (n.bin_dir / f).unlink(missing_ok=True)


def file_losses(d: Ugrod) -> list[float]:
    path = d.state_dir / "jobs" / JOB / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row:
                out.append(float(row["loss"]))
    return out


def same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)  # float text round trips


def test_prometheus_sees_ugrod_exporters_and_a_ddp_job_live(live: Live) -> None:
    d, prom = live.ugrod, live.prom
    all_gpus = [(node, g) for node, gs in GPUS.items() for g in gs]

    # ---- first scrapes: every target up, every fake GPU sampled by ugrod and exporters
    def targets_up() -> bool:
        ts = prom.targets()
        return len(ts) == 4 and all(t["health"] == "up" for t in ts)

    wait_for("ugrod and 3 exporters up", targets_up)
    wait_for("4 GPUs from ugrod", lambda: len(series(prom, "ugro_gpu_temperature_celsius")) == 4)
    wait_for("4 GPUs from the exporters", lambda: len(series(prom, "DCGM_FI_DEV_GPU_TEMP")) == 4)
    assert by(prom, "ugro_gpu_exporter_collect_success", "node") == {
        (n,): 1.0 for n in GPUS}
    assert by(prom, "ugro_gpu_exporter_gpus", "node") == {(n,): len(g) for n, g in GPUS.items()}
    wait_for("node0's warm-GPU alert",
             lambda: series(prom, 'ugro_node_alert{node="node0",alert="gpu_temperature"}'))

    # ---- a real DDP job across the three nodes, one (fake) GPU each, and beside it a
    # short CPU job that ends while the DDP job runs (so a finished job's wait and
    # run times are in the histograms by the time the dashboards are looked at)
    submitted = time.time()
    status, body = d.api("POST", "/v1/jobs", {"name": SHORT, "torchrun": False,
                                              "argv": ["sleep", "1"]})
    assert status == 201, body
    status, body = d.api("POST", "/v1/jobs", {"name": OOM, "torchrun": False, "argv": [
        sys.executable, "-c", "import sys; print('torch.OutOfMemoryError: CUDA out of "
        "memory. Tried to allocate 2.00 GiB', flush=True); sys.exit(1)"]})
    assert status == 201, body
    status, body = d.api("POST", "/v1/jobs", {
        "name": JOB, "nodes": 3, "gpus_per_node": 1, "torchrun": True,
        "argv": [TRAIN, "--samples", "512", "--batch-size", "16", "--steps", "30",
                 "--sleep-per-step", "0.25", "--log-every", "5", "--checkpoint-every", "0"]})
    assert status == 201, body

    # While it runs: the loss Prometheus holds catches up with the last line of
    # the central metrics.jsonl (a new line every ~1.5 s, scrapes every 1 s).
    matched_running: list[float] = []
    ugrod_body = b""
    while True:
        job = d.api("GET", f"/v1/jobs/{JOB}")[1]["job"]
        if job["state"] not in ("queued", "starting", "running"):
            break
        if job["state"] == "running":
            if not ugrod_body and job["metrics"].get("loss") is not None:
                ugrod_body = fetch(f"http://127.0.0.1:{live.metrics_port}/metrics")
            losses = file_losses(d)
            held = series(prom, f'ugro_job_training_loss{{job_name="{JOB}"}}')
            if losses and len(held) == 1 and same(next(iter(held.values())), losses[-1]) \
                    and losses[-1] not in matched_running:
                matched_running.append(losses[-1])
        assert time.time() - submitted < 120, f"{JOB} still {job['state']}:\n{d.log()}"
        time.sleep(0.2)
    assert job["state"] == "succeeded", (job["reason"], d.log())
    assert d.api("GET", f"/v1/jobs/{SHORT}")[1]["job"]["state"] == "succeeded"
    wait_no_job_processes(JOB, timeout_s=10)
    ended = time.time()
    time.sleep(2.5)  # the scrapes and rule evaluations after the end
    window = (live.started - 1, time.time())

    # ---- the job's states as Prometheus saw them
    rng = prom.query_range(f'ugro_job_state{{job_name="{JOB}"}} == 1', *window, 0.5)["result"]
    seen = sorted((float(t), s["metric"]["state"]) for s in rng for t, _ in s["values"])
    states = [st for _, st in seen]
    assert "running" in states, seen
    assert states == sorted(states, key=("starting", "running").index), \
        f"starting seen after running: {seen}"
    assert not prom.query(f'ugro_job_state{{job_name="{JOB}"}}')["result"], \
        "a finished job keeps its per-job series"
    # ... but one series says how it ended, for 30 minutes (alerts name the job)
    ended_series = by(prom, f'ugro_job_ended_timestamp_seconds{{job_name="{JOB}"}}',
                      "outcome", "reason", "job")
    assert list(ended_series) == [("succeeded", "", "ugrod")], ended_series
    assert submitted < next(iter(ended_series.values())) <= time.time(), ended_series
    span = f"{int(ended - submitted)}s"
    running = series(prom, f'max_over_time(ugro_jobs{{state="running"}}[{span}])')
    assert running and max(running.values()) >= 1, running
    finished = prom.query_range('ugro_jobs_finished_total{outcome="succeeded"}', *window, 1.0)
    values = [float(v) for s in finished["result"] for _, v in s["values"]]
    assert values and values[-1] - values[0] >= 1, finished
    kinds = [json.loads(line)["type"] for line in
             d.api("GET", f"/v1/events?job={JOB}")[1].splitlines()]
    assert {"job_submitted", "job_placed", "job_running", "job_ended"} <= set(kinds), kinds

    # ---- loss: every scraped value is a line of metrics.jsonl, and the latest one
    # Prometheus held while the job ran equalled the file's last line at that moment
    losses = file_losses(d)
    assert len(losses) == 30 // 5, losses  # --steps 30 --log-every 5
    assert matched_running, "Prometheus never held the job's latest loss while it ran"
    loss_rng = prom.query_range(f'ugro_job_training_loss{{job_name="{JOB}"}}', *window, 0.5)
    scraped = [float(v) for s in loss_rng["result"] for _, v in s["values"]]
    assert scraped and all(any(same(x, y) for y in losses) for x in scraped), (scraped, losses)
    last_scraped = prom.query(
        f'last_over_time(ugro_job_training_loss{{job_name="{JOB}"}}'
        f'[{int(time.time() - submitted)}s])')
    assert len(last_scraped["result"]) == 1
    last_value = float(last_scraped["result"][0]["value"][1])
    # The last report (step 40) lands shortly before the ranks exit; the scrape that
    # follows it must still find the job active.
    assert same(last_value, losses[-1]), (last_value, losses[-3:], d.log())

    # ---- node health for the three nodes
    state = by(prom, "ugro_node_state == 1", "node", "state")
    assert state == {("node0", "healthy"): 1, ("node1", "healthy"): 1,
                     ("node2", "healthy"): 1}, state
    # Settled: a node that ran the short-lived jobs may briefly score a missing rank
    # process (the job ended between two probes) until its next probe on a loaded box.
    def settled() -> dict[tuple[str, ...], float]:
        s = by(prom, "ugro_node_health_score", "node")
        return s if s.get(("node1",)) == s.get(("node2",)) == 100 else {}

    scores = wait_for("node1 and node2 back to 100", settled, timeout_s=20)
    assert set(scores) == {("node0",), ("node1",), ("node2",)}, scores
    assert scores[("node0",)] < scores[("node1",)] == scores[("node2",)] == 100, scores
    assert all(80 <= s <= 100 for s in scores.values()), scores

    # ---- GPU values equal the fake nvidia-smi's, from ugrod and from the exporters
    key = ("node", "UUID")
    for expr, field, scale in (
            ("ugro_gpu_temperature_celsius", "temperature.gpu", 1.0),
            ("ugro_gpu_memory_used_bytes", "memory.used", MIB),
            ("ugro_gpu_memory_total_bytes", "memory.total", MIB),
            ("ugro_gpu_utilization_ratio", "utilization.gpu", 0.01),
            ("ugro_gpu_power_watts", "power.draw", 1.0),
            ("DCGM_FI_DEV_GPU_TEMP", "temperature.gpu", 1.0),
            ("DCGM_FI_DEV_FB_USED", "memory.used", 1.0),
            ("DCGM_FI_DEV_FB_FREE", "memory.total", 1.0),  # minus used, below
            ("DCGM_FI_DEV_GPU_UTIL", "utilization.gpu", 1.0),
            ("DCGM_FI_DEV_POWER_USAGE", "power.draw", 1.0),
            ("node_gpu:ugro_gpu_temperature_celsius:max", "temperature.gpu", 1.0),
            ("node_gpu:ugro_gpu_memory_used_bytes:max", "memory.used", MIB),
            ("node_gpu:ugro_gpu_memory_total_bytes:max", "memory.total", MIB)):
        got = by(prom, expr, *key)
        want = {(node, g["uuid"]): (g[field] - (g["memory.used"] if expr.endswith("FREE")
                                                else 0)) * scale for node, g in all_gpus}
        assert set(got) == set(want), (expr, got)
        for k, v in want.items():
            assert math.isclose(got[k], v, rel_tol=1e-9), (expr, k, got[k], v)

    # ---- ugro_job_gpu_allocation joins the job to one GPU per node
    alloc_rng = prom.query_range(f'ugro_job_gpu_allocation{{job_name="{JOB}"}}', *window, 1.0)
    alloc = {(s["metric"]["node"], s["metric"]["gpu"], s["metric"]["UUID"], s["metric"]["rank"])
             for s in alloc_rng["result"]}
    placed = {(r["node"], str(g)) for r in job["gpus"] for g in r["gpus"]}
    uuid_of = {(node, str(g["index"])): g["uuid"] for node, g in all_gpus}
    rank_of = {r["node"]: str(r["rank"]) for r in job["gpus"]}
    assert {(n, g) for n, g, _, _ in alloc} == placed and len(placed) == 3, (alloc, job["gpus"])
    assert all(u == uuid_of[(n, g)] and r == rank_of[n] for n, g, u, r in alloc), alloc
    joined = prom.query_range(f'job_gpu:ugro_gpu_utilization_ratio:max{{job_name="{JOB}"}}',
                              *window, 1.0)
    util_of = {(node, str(g["index"])): g["utilization.gpu"] / 100 for node, g in all_gpus}
    got_join = {(s["metric"]["node"], s["metric"]["gpu"]): float(s["values"][-1][1])
                for s in joined["result"]}
    assert got_join == {k: util_of[k] for k in placed}, got_join

    # ---- the OOM job: failed, counted by reason, and named (with the reason) in a firing
    # alert that Prometheus sent to a real Alertmanager, which delivered it to a receiver
    oom = d.api("GET", f"/v1/jobs/{OOM}")[1]["job"]
    assert oom["state"] == "failed", oom
    assert set(by(prom, f'ugro_job_ended_timestamp_seconds{{job_name="{OOM}"}}',
                  "outcome", "reason")) == {("failed", "oom")}
    assert by(prom, "ugro_job_attempt_failures_total", "reason")[("oom",)] == 1
    assert by(prom, 'ugro_jobs_finished_total{outcome="failed"}', "job") == {("ugrod",): 1}

    def delivered() -> list[dict[str, Any]]:
        return [a for a in live.webhook.alerts() if a["labels"].get("alertname") ==
                "UgroJobFailed" and a["labels"].get("job_name") == OOM]

    alert = wait_for("UgroJobFailed delivered through Alertmanager", delivered,
                     timeout_s=30)[0]
    assert alert["status"] == "firing", alert
    assert {k: alert["labels"].get(k) for k in ("reason", "severity", "owner", "cluster",
                                                 "job")} == {
        "reason": "oom", "severity": "warning", "owner": oom["owner"], "cluster": "obs",
        "job": "ugrod"}, alert
    assert alert["annotations"]["summary"] == f"Job {OOM} failed (oom)", alert
    assert alert["annotations"]["runbook_url"] == \
        "file:///opt/ugro/share/doc/ugro/operations.md#ugrojobfailed", alert
    # The config Prometheus ran is the generated one: no honor_labels, yet every per-job
    # series kept both labels (the training job's job_name, the scrape job's job).
    assert "honor_labels" not in live.scrape_config
    assert "alerting:" in live.scrape_config

    # ---- every rule loaded and evaluated without error
    rules = prom.rules()
    assert len(rules) >= 30
    assert all(r["health"] == "ok" for r in rules), \
        [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]

    # ---- every dashboard panel has data over the test's window, job variable = this job
    # Looked at as a person would while the job ran (table panels are instant queries
    # of running jobs): at the last scrape that saw it running.
    at = max(t for t, st in seen if st == "running")
    # Queue wait is observed at placement: while the DDP job still ran, all three jobs'
    # waits were in the histogram (it counted only ended jobs before: 2 here).
    assert by(prom, "ugro_job_wait_seconds_count", "job") and \
        float(prom.query("max(ugro_job_wait_seconds_count)", at)["result"][0]["value"][1]) \
        >= 3
    empty = empty_queries(prom.url, prefer={"job": JOB, "node": "node0"}, allow=MAY_BE_EMPTY,
                          window_s=at - live.started + 1, at=at)
    assert not empty, "\n".join(empty)

    # ---- promtool accepts ugrod's /metrics (taken while the job ran) and the exporter's
    assert f'job_name="{JOB}"'.encode() in ugrod_body, "no scrape of ugrod while the job ran"
    checked = promtool_metrics(ugrod_body)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, ""), checked
    exporter_body = fetch(f"http://127.0.0.1:{live.exporter_port}/metrics")
    assert b"DCGM_FI_DEV_GPU_TEMP" in exporter_body
    checked = promtool_metrics(exporter_body)
    # Exit 3 is lint only; the one lint allowed is on DCGM-exporter's own label names
    # (UUID, modelName), kept so dashboards serve nodes running either exporter.
    lint = [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.strip() and not (
        ln.startswith("DCGM_FI_") and "should be written in 'snake_case'" in ln)]
    assert checked.returncode in (0, 3) and not lint, checked
