"""Grafana dashboards proven without Grafana: schema typecheck, layout, references, queries.

The schema check needs ``npm ci`` in grafana/schema-check (scripts/test.sh
runs it); the query checks start Debian's prometheus over an empty TSDB.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards_live import (
    DASHBOARDS,
    GLOBALS,
    RULES,
    Prometheus,
    PrometheusError,
    PrometheusServer,
    empty_queries,
    label_values_query,
    load_dashboards,
    panels,
    queries,
    referenced,
    substitute,
    variables,
)

from ugrod.core import events as ev
from ugrod.core.gpus import GpuSample, NodeSample
from ugrod.core.state import State, apply
from ugrod.metrics.collector import NodeSampleView, UgroCollector, bound_port, start_metrics_server
from ugrod.metrics.exposition import Family
from ugrod.metrics.runtime_stats import RuntimeStats

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_CHECK = ROOT / "grafana" / "schema-check"
EXPECTED = {"cluster-overview", "job-detail", "node-detail"}
# The per-node GPU exporter speaks DCGM-exporter's names (docs/metrics.md).
EXPORTER_METRICS = {
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "and", "or", "unless", "inf", "nan", "atan2"}

DASHES = load_dashboards()


def all_panels() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, dash in DASHES.items():
        for p in panels(dash):
            yield name, p


def exported_metric_names() -> set[str]:
    """Every name ugrod's collector can emit, the exporter's, and the recording rules'."""
    state, t = State(), 1_700_000_000.0
    for e in [ev.NodeAdded(node=ev.NodeSpec(name="a", host="h", gpus=(ev.Gpu(index=0),))),
              ev.DaemonStarted(version="1")]:
        t += 1
        state = apply(state, ev.Record(seq=state.seq + 1, ts=t, actor=ev.DAEMON, event=e))
    stats = RuntimeStats()
    stats.replay_done(1.0, 10)
    stats.snapshot_written(0.1, 100)
    sample = NodeSample(ts=t, gpus=(GpuSample(uuid="u", index=0, name="m"),))
    collector = UgroCollector(lambda: state, lambda: {"a": sample}, dict, stats)
    names = {"up"}
    for fam in collector.families():
        if isinstance(fam, Family):
            names.add(fam.name)
        else:
            names |= {fam.name + s for s in ("_bucket", "_count", "_sum")}
    names |= EXPORTER_METRICS
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, matchers, ranges and label
    lists stripped; function names are followed by a parenthesis)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


# ---- schema and structure ---------------------------------------------------------------


def test_dashboards_are_current_with_their_builder() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "grafana" / "build_dashboards.py"),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(DASHES) == EXPECTED


def _schema_check(*files: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, "node is missing: scripts/test.sh installs npm (and node)"
    assert (SCHEMA_CHECK / "node_modules" / "@grafana" / "schema").is_dir(), \
        "run: (cd grafana/schema-check && npm ci)"
    return subprocess.run([node, str(SCHEMA_CHECK / "check.mjs"), *map(str, files)],
                          capture_output=True, text=True, timeout=180, cwd=SCHEMA_CHECK)


def test_dashboards_typecheck_against_grafana_schema() -> None:
    pinned = json.loads((SCHEMA_CHECK / "package.json").read_text())["devDependencies"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned["@grafana/schema"])
    lock = json.loads((SCHEMA_CHECK / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@grafana/schema"]["version"] == \
        pinned["@grafana/schema"]
    result = _schema_check()
    assert result.returncode == 0, result.stdout + result.stderr


BREAKAGES: list[tuple[str, Any, str]] = [
    ("unknown-field", lambda d: d["panels"][1].update(bogus=1), "'\"bogus\"' does not exist"),
    ("enum-value", lambda d: d["panels"][1]["fieldConfig"]["defaults"].update(
        thresholds={"mode": "absolutely", "steps": []}), '"absolutely"'),
    ("panel-option", lambda d: d["panels"][1]["options"].update(colorMode="rainbow"),
     '"rainbow"'),
    ("other-panels-option", lambda d: d["panels"][1]["options"].update(
        legend={"showLegend": True}), "'\"legend\"' does not exist"),
    ("no-unit", lambda d: d["panels"][1]["fieldConfig"]["defaults"].pop("unit"), "unit"),
    ("wrong-type", lambda d: d.update(schemaVersion="41"), "not assignable to type '41'"),
    ("no-datasource-var", lambda d: d["panels"][1].update(
        datasource={"type": "prometheus", "uid": "prom1"}), '"prom1"'),
]


def test_schema_check_catches_what_grafana_would_reject(tmp_path: Path) -> None:
    """Negative controls: each broken copy fails the typecheck, naming what is wrong."""
    files = []
    for label, change, _ in BREAKAGES:
        dash = json.loads((DASHBOARDS / "cluster-overview.json").read_text())
        change(dash)
        files.append(tmp_path / f"broken-{label}.json")
        files[-1].write_text(json.dumps(dash, indent=2))
    result = _schema_check(*files)
    assert result.returncode != 0
    errors: dict[str, str] = {}
    for line in result.stdout.splitlines():
        m = re.match(r"generated/broken-([\w-]+)\.ts\(", line)
        if m:
            errors[m.group(1)] = errors.get(m.group(1), "") + line
    for label, _, expected in BREAKAGES:
        assert expected in errors.get(label, ""), f"{label}: {result.stdout}"


def test_uids_and_schema_version_are_pinned_and_unique() -> None:
    uids = [d["uid"] for d in DASHES.values()]
    assert len(set(uids)) == len(uids)
    for name, dash in DASHES.items():
        assert re.fullmatch(r"[a-z0-9-]{1,40}", dash["uid"]), name
        assert dash["schemaVersion"] == 41, name
        assert dash["description"] and "ugro" in dash["tags"], name
        text = json.dumps(dash)
        assert "__inputs" not in text and "DS_PROMETHEUS" not in text, name


def test_panel_ids_unique_and_grid_sound() -> None:
    for name, dash in DASHES.items():
        everything = dash["panels"]
        ids = [p["id"] for p in everything]
        assert len(set(ids)) == len(ids), name
        cells: dict[tuple[int, int], int] = {}
        for p in everything:
            g = p["gridPos"]
            assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, (name, p["id"])
            assert g["x"] + g["w"] <= 24, f"{name}: panel {p['id']} goes past 24 columns"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    other = cells.setdefault((x, y), p["id"])
                    assert other == p["id"], f"{name}: panels {other} and {p['id']} overlap"


def test_every_panel_has_unit_description_and_the_datasource_variable() -> None:
    for name, p in all_panels():
        where = f"{name}: panel {p['id']} {p['title']!r}"
        assert p["description"].strip(), where
        assert p["fieldConfig"]["defaults"].get("unit"), where
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], where
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], where
    for name, dash in DASHES.items():
        for ann in dash["annotations"]["list"]:
            assert ann["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        ds = [v for v in variables(dash) if v["type"] == "datasource"]
        assert [(v["name"], v["query"]) for v in ds] == [("datasource", "prometheus")], name


def test_every_variable_reference_resolves() -> None:
    for name, dash in DASHES.items():
        defined: set[str] = set()
        for var in variables(dash):
            used = referenced(json.dumps(var)) - set(GLOBALS)
            assert used <= defined, f"{name}: variable {var['name']} uses {used - defined}"
            defined.add(var["name"])
        used_anywhere = referenced(json.dumps({k: v for k, v in dash.items()
                                               if k != "templating"}))
        assert used_anywhere - set(GLOBALS) <= defined, \
            f"{name}: undefined variables {used_anywhere - set(GLOBALS) - defined}"
        # Every variable is used somewhere (no leftovers).
        assert defined <= used_anywhere | {"datasource"}, name
    assert "job" in {v["name"] for v in variables(DASHES["job-detail"])}
    assert "node" in {v["name"] for v in variables(DASHES["node-detail"])}
    assert DASHES["job-detail"]["annotations"]["list"], "job events as annotations"


def test_rates_use_rate_interval_and_counters_stay_inside_rates() -> None:
    for name, dash in DASHES.items():
        for q in queries(name, dash):
            for fn, window in re.findall(r"\b(rate|irate|increase|deriv)\(\s*[^\[]*\[([^\]]*)\]",
                                         q.expr):
                # [$__range]: a total over the dashboard's time range (GPU-hours per user)
                assert window == "$__rate_interval" or (fn == "increase" and window ==
                                                        "$__range"), f"{q}: {fn} over [{window}]"
            bare = re.sub(r"\b(rate|irate|increase)\(\s*[\w:]+_total(?![\w:])", "", q.expr)
            assert not re.search(r"[\w:]+_total(?![\w:])", bare), \
                f"{q}: counter outside rate()"


# ---- queries against a real Prometheus ------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with PrometheusServer(tmp_path_factory.mktemp("prom"), rule_files=RULES) as server:
        yield Prometheus(server.url)


def test_every_query_parses(prometheus: Prometheus) -> None:
    checked = 0
    for name, dash in DASHES.items():
        values = {v["name"]: "x" for v in variables(dash)}
        for q in queries(name, dash):
            expr = substitute(q.expr, values)
            parsed = label_values_query(expr)
            if parsed is not None:  # a variable query: check its selector instead
                expr = parsed[0] or "up"
            try:
                prometheus.query(expr)
            except PrometheusError as exc:
                pytest.fail(f"{q}: {exc}")
            checked += 1
    assert checked > 60


def test_parse_errors_do_come_back_as_bad_data(prometheus: Prometheus) -> None:
    with pytest.raises(PrometheusError) as info:
        prometheus.query("sum by (node (ugro_node_state)")
    assert info.value.error_type == "bad_data"


def test_rules_load_in_prometheus(prometheus: Prometheus) -> None:
    rules = prometheus.rules()
    # every rule in the shipped files is loaded (prometheus_rules.py renders them; the
    # files' own count, so a rule added there is checked here without editing a number)
    in_files = sorted(r.get("alert") or r["record"] for path in RULES
                      for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"])
    assert len(in_files) > 40
    assert sorted(r["name"] for r in rules) == in_files
    assert all(r["health"] in ("ok", "unknown") for r in rules), \
        [(r["name"], r.get("lastError")) for r in rules if r["health"] not in ("ok", "unknown")]


def test_queries_name_only_metrics_the_project_exports() -> None:
    known = exported_metric_names()
    seen: set[str] = set()
    for name, dash in DASHES.items():
        for q in queries(name, dash):
            parsed = label_values_query(q.expr)
            names = metric_names(parsed[0] or "" if parsed else q.expr)
            assert names, f"{q}: selects no metric"
            assert names <= known, f"{q}: unknown metrics {names - known}"
            seen |= names
    # The dashboards cover the headline figures.
    assert {"ugro_node_state", "ugro_job_training_loss", "ugro_job_gpu_allocation",
            "node_gpu:ugro_gpu_utilization_ratio:max", "ugro_queue_length"} <= seen


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (node) (rate(ugro_x_total{mode="busy"}[$__rate_interval])) '
                        '/ on (node) group_left (gpu) up == bool 1') == {"ugro_x_total", "up"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m])))") == \
        {"a_bucket"}
    assert metric_names("time() - max(ugro:x:y{job=\"$job\"}) * 1e6") == {"ugro:x:y"}


# ---- every panel has data: a real Prometheus scraping ugrod's real metrics listener ------
#
# ugrod's shell is replaced by state built from real events and RuntimeStats fed
# as the daemon feeds them; the end-to-end test does the same with a real ugrod,
# real jobs and sshd nodes (tests/dashboards_live.py is shared).

MAY_BE_EMPTY = (
    r"DCGM_FI_DEV_(SM|MEM)_CLOCK",  # only with the GPU exporter running
    r"'GPU energy'",  # only with the GPU exporter on NVML
    r"annotation 'Ended'",  # only once a selected job has ended ("train" runs on)
    r"annotation 'Stalled'",  # only while the job is stalled
)


class Synthetic:
    """A two-node cluster whose job trains while Prometheus watches."""

    def __init__(self) -> None:
        self.state = State()
        self.stats = RuntimeStats()
        self.now = time.time()
        self.samples: dict[str, NodeSample] = {}
        self.training: dict[str, dict[str, float]] = {}
        self.step = 0

    def record(self, *events: ev.Event) -> None:
        records = []
        for e in events:
            r = ev.Record(seq=self.state.seq + 1, ts=time.time(), actor=ev.Actor(
                user="alice", uid=1000), event=e)
            self.state = apply(self.state, r)
            records.append(r)
        self.stats.jobs_committed(records, self.state)

    def setup(self) -> None:
        gpus = tuple(ev.Gpu(index=i, model="NVIDIA L40S", vram_bytes=48 << 30,
                            uuid=f"GPU-{i}") for i in range(2))
        self.record(*(ev.NodeAdded(node=ev.NodeSpec(name=n, host=f"10.0.0.{i}", gpus=tuple(
            ev.Gpu(index=g.index, model=g.model, vram_bytes=g.vram_bytes,
                   uuid=f"{g.uuid}-{n}") for g in gpus))) for i, n in enumerate("ab", 1)))
        self.record(ev.AlertRaised(node="a", alert="disk", severity="warning",
                                   message="disk 91 %"))
        self.record(ev.DaemonStarted(version="1"))
        self.run_job("train", 2)
        self.record(ev.JobSubmitted(job="waiting", spec=ev.JobSpec(argv=("x",), gpus_per_node=2)))
        self.stats.replay_done(0.2, 10)

    def run_job(self, job: str, nodes: int) -> None:
        self.record(ev.JobSubmitted(job=job, spec=ev.JobSpec(argv=("x",), nodes=nodes,
                                                             gpus_per_node=1)))
        self.record(ev.JobPlaced(job=job, attempt=1, ranks=tuple(
            ev.RankPlacement(rank=i, node=n, gpus=(0,)) for i, n in enumerate("ab"[:nodes]))),
            ev.JobRunning(job=job, attempt=1))

    def tick(self) -> None:
        """One second of activity: samples, training, API, log, health, scheduler."""
        self.step += 10
        now = time.time()
        self.training["train"] = {"ts": now, "step": self.step, "loss": 2.0 / self.step,
                                  "throughput": 800.0 + self.step}
        for n in "ab":
            self.samples[n] = NodeSample(
                ts=now, latency_ms=2.0, smi_s=0.05, cpu_count=8, load=(1.0, 1.0, 1.0),
                cpu_ticks=(1000 * self.step, 600 * self.step), mem_total_bytes=64 << 30,
                mem_available_bytes=30 << 30, disk_total_bytes=1 << 40,
                disk_used_bytes=1 << 39, disk_avail_bytes=1 << 39,
                gpus=tuple(GpuSample(uuid=f"GPU-{i}-{n}", index=i, name="NVIDIA L40S",
                                     util_percent=90.0 + i, memory_used_bytes=20 << 30,
                                     memory_total_bytes=48 << 30, temperature_c=60.0 + i,
                                     power_w=250.0) for i in range(2)))
            self.stats.health_check(n, 0.05, ok=True)
            self.stats.breaker(n, "closed")
        self.stats.api_request("/v1/jobs", "GET", 200, 0.003)
        self.stats.log_batch(2, 600, 0.0004)
        self.stats.scheduler_tick(0.001, 0)
        if self.step % 30 == 0:  # a short job comes and goes every 3 s
            job = f"short-{self.step}"
            if "short" not in "".join(self.state.active):
                self.record(ev.JobSubmitted(job=job, spec=ev.JobSpec(argv=("x",))),
                            ev.JobPlaced(job=job, attempt=1, ranks=(
                                ev.RankPlacement(rank=0, node="b"),)))
            else:
                done = next(j for j in self.state.active if j.startswith("short"))
                self.record(ev.JobEnded(job=done, attempt=1, outcome="failed",
                                        reason="rank 0 on b ran out of GPU memory"))
        if self.step == 150:  # node b's health changes once, well after the first scrape
            self.record(ev.NodeHealthChanged(node="b", health="degraded", score=70.0))


async def test_every_panel_has_data_from_a_scraped_ugrod(tmp_path: Path) -> None:
    cluster = Synthetic()
    cluster.setup()
    cluster.tick()

    def samples() -> Mapping[str, NodeSampleView]:
        return cluster.samples

    collector = UgroCollector(lambda: cluster.state, samples, lambda: cluster.training,
                              cluster.stats, get_scores=lambda: {"a": 95.0, "b": 70.0})
    runner = await start_metrics_server("127.0.0.1", 0, collector)
    config = (f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
              f"rule_files: [{', '.join(str(p) for p in RULES)}]\n"
              f"scrape_configs:\n  - job_name: ugrod\n"
              f"    static_configs: [{{targets: ['127.0.0.1:{bound_port(runner)}']}}]\n")
    server = PrometheusServer(tmp_path / "prom", config)
    await asyncio.to_thread(server.start)
    try:
        for _ in range(20):  # 20 s of activity, scraped every second
            cluster.tick()
            await asyncio.sleep(1)
        prom = Prometheus(server.url)
        targets = await asyncio.to_thread(prom.targets)
        assert [t["health"] for t in targets] == ["up"], targets
        rules = await asyncio.to_thread(prom.rules)
        assert all(r["health"] == "ok" for r in rules), \
            [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        empty = await asyncio.to_thread(
            empty_queries, server.url, prefer={"job": "train", "node": "a"},
            allow=MAY_BE_EMPTY, window_s=25.0)
        assert not empty, "\n".join(empty)
        loss = await asyncio.to_thread(
            prom.query, 'ugro_job_training_loss{job_name="train",job="ugrod"}')
        assert float(loss["result"][0]["value"][1]) == cluster.training["train"]["loss"]
    finally:
        await asyncio.to_thread(server.stop)
        await runner.cleanup()
