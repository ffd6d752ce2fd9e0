"""The Prometheus side checked by the real promtool: rules, their tests, scrape config, output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import ugroctl_argv
from ugrod.config import loading
from ugrod.config import schema as config
from ugrod.core import events as ev
from ugrod.core.gpus import GpuSample, NodeSample
from ugrod.core.state import State, apply
from ugrod.metrics.collector import NodeSampleView, UgroCollector, bound_port, start_metrics_server
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.setup import prometheus_rules as pr
from ugrod.setup.prometheus_config import ScrapeConfigError, scrape_config, scrape_config_dict

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.test.yml"))
ALERTS = ROOT / "prometheus" / "rules" / "ugro-alerts.rules.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
REQUIRED_ALERTS = {
    "UgroDaemonDown", "UgroDaemonRestartLoop", "UgroNodeDown", "UgroNodeUnhealthy",
    "UgroGpuMissing", "UgroGpuError", "UgroGpuQueryFailing", "UgroGpuXid",
    "UgroGpuEccDoubleBit", "UgroGpuRowRemapFailed", "UgroGpuThrottled", "UgroGpuTooHot",
    "UgroGpuMemoryNearlyFull", "UgroGpuAllocatedIdle", "UgroDiskNearlyFull",
    "UgroStateDiskFilling", "UgroSnapshotsFailing", "UgroJobFailed", "UgroJobStalled",
    "UgroRankProcessesGone", "UgroJobsWaitingWhileGpusIdle", "UgroEventLogFsyncSlow",
    "UgroGpuExporterFailing", "UgroCheckpointCopyStopped",
}
CLUSTER_YAML = """
cluster:
  name: test-lab
nodes:
  head:
    host: 127.0.0.1
    transport: local
    gpus: []
  gpu1:
    ip: 192.168.1.101
    user: ugro
    gpu: "RTX 4080"
    vram_gb: 16
    gpu_exporter: true
  gpu3:
    ip: 192.168.1.103
    user: ugro
    gpu_exporter: true
  gpu2:
    host: gpu2.lan
    user: ugro
metrics:
  host: 0.0.0.0
  port: 9327
"""


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: scripts/test.sh installs Debian's prometheus package"
    return subprocess.run([exe, *args], input=None if stdin is None else stdin.decode(),
                          capture_output=True, text=True, timeout=60, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}: {result.stdout}{result.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_rule_files_pass_lint() -> None:
    assert len(RULES) == 2
    ok(promtool("check", "rules", "--lint=all", "--lint-fatal", *map(str, RULES)))


def test_rule_unit_tests_pass() -> None:
    assert len(RULE_TESTS) == 2
    ok(promtool("test", "rules", *map(str, RULE_TESTS)))


def test_alert_tests_are_current_with_the_rules() -> None:
    generated = subprocess.run(
        [sys.executable, str(ROOT / "prometheus" / "tests" / "generate_alert_tests.py")],
        capture_output=True, text=True, check=True, timeout=60).stdout
    assert generated == (ROOT / "prometheus" / "tests" / "alerts.test.yml").read_text(), \
        "regenerate: python3 prometheus/tests/generate_alert_tests.py > " \
        "prometheus/tests/alerts.test.yml"


def test_every_alert_is_complete_and_has_a_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)}
    for r in rules:
        name = r["alert"]
        assert re.fullmatch(r"Ugro[A-Z][A-Za-z]+", name)
        assert "for" in r, name
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = r["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == pr.DEFAULT_RUNBOOK_BASE and anchor == name.lower(), name
        assert anchor in anchors, f"docs/operations.md has no section for {name}"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, set[bool]] = {}
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                cases.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    for name in REQUIRED_ALERTS:
        assert cases.get(name) == {True, False}, f"{name}: {cases.get(name)}"
    fired = {(name, a["exp_labels"]["severity"])
             for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]
             for check in test.get("alert_rule_test", []) for name in [check["alertname"]]
             for a in check["exp_alerts"]}
    assert fired == {(r["alert"], r["labels"]["severity"]) for r in alert_rules()}


def test_generated_scrape_config_passes_promtool(tmp_path: Path) -> None:
    cfg = loading.loads(CLUSTER_YAML, env={"USER": "ugro"})
    data = scrape_config_dict(cfg, alertmanagers=["http://127.0.0.1:9093",
                                                  "https://am.lan/prefix/"])
    ugrod, gpu = data["scrape_configs"]
    # ugrod's training-job label is job_name: Prometheus's own `job` label stays, so a
    # scrape config written by hand needs no honor_labels either.
    assert ugrod == {"job_name": "ugrod", "static_configs": [{"targets": ["127.0.0.1:9327"]}]}
    # Only the nodes that say they run the exporter are targets (else: down forever).
    assert gpu["static_configs"] == [
        {"targets": ["192.168.1.101:9400"], "labels": {"node": "gpu1"}},
        {"targets": ["192.168.1.103:9400"], "labels": {"node": "gpu3"}},
    ]
    assert data["alerting"] == {"alertmanagers": [
        {"static_configs": [{"targets": ["127.0.0.1:9093"]}]},
        {"static_configs": [{"targets": ["am.lan:443"]}], "scheme": "https",
         "path_prefix": "/prefix"}]}
    assert data["global"]["external_labels"] == {"cluster": "test-lab"}
    path = tmp_path / "prometheus.yml"
    path.write_text(scrape_config(cfg, rules_dir=str(ROOT / "prometheus" / "rules"),
                                  alertmanagers=["http://127.0.0.1:9093"]))
    result = promtool("check", "config", str(path))
    ok(result)
    assert "2 rule files found" in result.stdout
    no_exporter = loading.loads("nodes:\n  a: {host: 10.0.0.1, user: u}\n", env={})
    assert [j["job_name"] for j in scrape_config_dict(no_exporter)["scrape_configs"]] == ["ugrod"]


@pytest.mark.parametrize("url", ["127.0.0.1:9093", "ftp://am", "http://am:99999",
                                 "http://user@am:9093", "http://am:9093/?x=1"])
def test_alertmanager_url_is_checked(url: str) -> None:
    cfg = loading.loads(CLUSTER_YAML, env={"USER": "ugro"})
    with pytest.raises(ScrapeConfigError, match="--alertmanager"):
        scrape_config(cfg, alertmanagers=[url])


def test_example_scrape_config_is_current() -> None:
    cfg = loading.loads(CLUSTER_YAML, env={"USER": "ugro"})
    example = ROOT / "prometheus" / "prometheus.example.yml"
    assert example.read_text() == scrape_config(cfg, alertmanagers=["http://127.0.0.1:9093"]), \
        "regenerate prometheus/prometheus.example.yml from this test's CLUSTER_YAML"


def test_rule_files_are_the_default_rendering() -> None:
    """prometheus/rules/ is what `ugroctl prometheus-config --rules-out` writes by default."""
    t = config.Thresholds()
    assert (ROOT / "prometheus" / "rules" / pr.ALERTS_FILE).read_text() == pr.alert_rules(t)
    assert (ROOT / "prometheus" / "rules" / pr.RECORDING_FILE).read_text() == \
        pr.recording_rules(t)


def test_every_recording_rule_is_used() -> None:
    """By an alert, another rule or a dashboard: none computed for nothing."""
    text = "".join(p.read_text() for p in RULES) + "".join(
        p.read_text() for p in (ROOT / "grafana" / "dashboards").glob("*.json"))
    for group in yaml.safe_load((ROOT / "prometheus" / "rules" /
                                 pr.RECORDING_FILE).read_text())["groups"]:
        for rule in group["rules"]:
            name = rule["record"]
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name
            assert text.count(name) >= 2, f"{name} is recorded but used nowhere"


def test_alertmanager_example_passes_amtool() -> None:
    amtool = shutil.which("amtool")
    assert amtool, "amtool is missing: scripts/test.sh installs prometheus-alertmanager"
    result = subprocess.run([amtool, "check-config",
                             str(ROOT / "prometheus" / "alertmanager.example.yml")],
                            capture_output=True, text=True, timeout=60, check=False)
    ok(result)
    assert "2 receivers" in result.stdout


CUSTOM_THRESHOLDS = CLUSTER_YAML + """
health:
  thresholds:
    gpu_temp_c: {warn: 70, crit: 78}
    gpu_memory_percent: {warn: 80, crit: 88}
    disk_percent: {warn: 75, crit: 85}
"""


def test_thresholds_from_cluster_yaml_reach_the_alerts(tmp_path: Path) -> None:
    """`ugroctl prometheus-config --rules-out`: 72 °C, 90 % GPU memory and an 80 % disk
    alert with this cluster.yaml; the defaults (80 °C, 95 %, 90 %) would stay quiet."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CUSTOM_THRESHOLDS)
    rules = tmp_path / "rules"
    rules.mkdir()
    base = "https://wiki.example.org/ugro/operations.md"
    run = subprocess.run(
        [*ugroctl_argv(), "prometheus-config", "--config", str(cluster), "--rules-out",
         str(rules), "--rules-dir", str(rules), "--runbook-base", base,
         "--alertmanager", "http://127.0.0.1:9093"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "USER": "ugro"})
    assert run.returncode == 0, run.stderr
    assert "alerting:" in run.stdout
    (tmp_path / "prometheus.yml").write_text(run.stdout)
    ok(promtool("check", "config", str(tmp_path / "prometheus.yml")))
    alerts = yaml.safe_load((rules / pr.ALERTS_FILE).read_text())["groups"][0]["rules"]
    assert all(r["annotations"]["runbook_url"] == f"{base}#{r['alert'].lower()}"
               for r in alerts)
    gpu = 'node="gpu1",gpu="0",UUID="GPU-1",job="ugrod",instance="h:9327"'
    test = {"rule_files": [str(rules / pr.RECORDING_FILE), str(rules / pr.ALERTS_FILE)],
            "evaluation_interval": "1m", "tests": [{
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="ugrod",instance="h:9327"}', "values": "1x20"},
                    {"series": f"ugro_gpu_temperature_celsius{{{gpu}}}", "values": "72x20"},
                    {"series": f"ugro_gpu_memory_used_bytes{{{gpu}}}", "values": "90x20"},
                    {"series": f"ugro_gpu_memory_total_bytes{{{gpu}}}", "values": "100x20"},
                    {"series": 'ugro_node_disk_used_ratio{node="gpu1",job="ugrod",'
                               'instance="h:9327"}', "values": "0.8x20"}],
                "promql_expr_test": [{
                    "expr": 'count by (alertname, severity) (ALERTS{alertstate="firing"})',
                    "eval_time": "17m",
                    "exp_samples": [
                        {"labels": '{alertname="UgroGpuTooHot",severity="warning"}',
                         "value": 1},
                        {"labels": '{alertname="UgroGpuMemoryNearlyFull",severity="warning"}',
                         "value": 1},
                        {"labels": '{alertname="UgroDiskNearlyFull",severity="warning"}',
                         "value": 1}]}]}]}
    (tmp_path / "custom.test.yml").write_text(yaml.safe_dump(test))
    ok(promtool("test", "rules", str(tmp_path / "custom.test.yml")))
    # The same inputs against the shipped (default) rules: nothing fires.
    test["rule_files"] = [str(p) for p in RULES]
    test["tests"][0]["promql_expr_test"][0]["exp_samples"] = []  # type: ignore[index]
    (tmp_path / "default.test.yml").write_text(yaml.safe_dump(test))
    ok(promtool("test", "rules", str(tmp_path / "default.test.yml")))


def test_runbook_base_must_be_absolute(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER_YAML)
    run = subprocess.run(
        [*ugroctl_argv(), "prometheus-config", "--config", str(cluster), "--rules-out",
         str(tmp_path), "--runbook-base", "docs/operations.md"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "USER": "ugro"})
    assert run.returncode != 0
    assert "--runbook-base 'docs/operations.md': give an absolute URL" in run.stderr
    assert not list(tmp_path.glob("*.rules.yml"))


@pytest.mark.parametrize(("metrics", "problem"), [
    ("metrics: {port: 0}", "metrics.port is 0"),
    ("metrics: {enabled: false}", "metrics.enabled is false"),
])
def test_scrape_config_refuses_what_prometheus_cannot_find(metrics: str, problem: str) -> None:
    text = "nodes:\n  a: {host: 10.0.0.1, user: u}\n" + metrics
    with pytest.raises(ScrapeConfigError, match=problem):
        scrape_config(loading.loads(text, env={}))


def _busy_cluster() -> tuple[State, dict[str, NodeSample], RuntimeStats]:
    state, stats, t = State(), RuntimeStats(), 1_700_000_000.0
    alice = ev.Actor(user="alice", uid=1000)
    events: list[tuple[ev.Event, ev.Actor]] = [
        (ev.NodeAdded(node=ev.NodeSpec(name=n, host=f"10.0.0.{i}", transport="ssh", gpus=(
            ev.Gpu(index=0, model="NVIDIA L40S", vram_bytes=48 << 30, uuid=f"GPU-{n}-0"),
            ev.Gpu(index=1, model="NVIDIA L40S", vram_bytes=48 << 30, uuid=f"GPU-{n}-1"),
        ))), ev.DAEMON) for i, n in enumerate(("a", "b"), 1)
    ] + [
        (ev.JobSubmitted(job="train", spec=ev.JobSpec(argv=("python3", "t.py"), nodes=2,
                                                       gpus_per_node=1)), alice),
        (ev.JobPlaced(job="train", attempt=1, ranks=(
            ev.RankPlacement(rank=0, node="a", gpus=(0,)),
            ev.RankPlacement(rank=1, node="b", gpus=(1,)))), ev.DAEMON),
        (ev.JobRunning(job="train", attempt=1), ev.DAEMON),
        (ev.JobSubmitted(job="done", spec=ev.JobSpec(argv=("true",))), alice),
        (ev.JobPlaced(job="done", attempt=1, ranks=(ev.RankPlacement(rank=0, node="a"),)),
         ev.DAEMON),
        (ev.JobEnded(job="done", attempt=1, outcome="failed", exit_code=1), ev.DAEMON),
        (ev.NodeHealthChanged(node="b", health="degraded", score=70.0), ev.DAEMON),
    ]
    for e, actor in events:
        t += 5
        r = ev.Record(seq=state.seq + 1, ts=t, actor=actor, event=e)
        state = apply(state, r)
        stats.jobs_committed([r], state)
    stats.log_batch(2, 600, 0.0004)
    stats.api_request("/v1/jobs", "POST", 201, 0.004)
    stats.health_check("a", 0.1, ok=True)
    samples = {"a": NodeSample(
        ts=t, latency_ms=3.0, cpu_ticks=(1000, 400), cpu_count=8, load=(1.0, 1.0, 1.0),
        mem_total_bytes=64 << 30, mem_available_bytes=32 << 30, disk_total_bytes=1 << 40,
        disk_used_bytes=1 << 39, disk_avail_bytes=1 << 39,
        gpus=(GpuSample(uuid="GPU-a-0", index=0, name="NVIDIA L40S", util_percent=99.0,
                        memory_used_bytes=40 << 30, memory_total_bytes=48 << 30,
                        temperature_c=70.0, power_w=300.0),))}
    return state, samples, stats


async def test_promtool_check_metrics_accepts_ugrod_output() -> None:
    """The whole /metrics body as served (process_* series included)."""
    state, samples, stats = _busy_cluster()

    def get_samples() -> Mapping[str, NodeSampleView]:
        return samples

    collector = UgroCollector(lambda: state, get_samples,
                              lambda: {"train": {"step": 10, "loss": 1.5, "throughput": 99.0}},
                              stats)
    runner = await start_metrics_server("127.0.0.1", 0, collector)
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{bound_port(runner)}/metrics") as resp:
            body = await resp.read()
    finally:
        await runner.cleanup()
    assert b'ugro_job_training_loss{job_name="train",owner="alice"} 1.5' in body
    assert b"process_resident_memory_bytes" in body
    result = promtool("check", "metrics", stdin=body)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
