"""Build grafana/dashboards/*.json: cluster overview, job detail, node detail.

    python3 grafana/build_dashboards.py          # rewrite the JSON files
    python3 grafana/build_dashboards.py --check  # exit 1 if they are out of date

The JSON files are what Grafana provisions and what the tests check (schema
typecheck, layout, references, every query against a real Prometheus); this
script keeps the conventions in one place: the ``datasource`` variable on
every panel and query, a unit and a description on every panel,
``$__rate_interval`` in every rate, a left-to-right 24-column layout.

GPU panels use the ``node_gpu:*`` recording rules, which take the node's
GPU exporter (DCGM names) when it runs and ugrod's own samples otherwise.
Table rows link to the job and node dashboards; the job variable is
multi-select (a sweep's loss curves overlaid); annotations mark job ends
(with the reason), node state changes and ugrod restarts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 41  # Grafana 11.6 (@grafana/schema 11.6.x); newer Grafana migrates it
DS = {"type": "prometheus", "uid": "${datasource}"}
Json = dict[str, Any]

LEGEND = {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []}
TABLE_LEGEND = {"displayMode": "table", "placement": "right", "showLegend": True,
                "calcs": ["lastNotNull", "max"]}
TOOLTIP = {"mode": "multi", "sort": "desc"}
REDUCE_LAST = {"calcs": ["lastNotNull"], "fields": "", "values": False}
GREEN = {"color": "green", "value": None}


def thresholds(*steps: tuple[str, float]) -> Json:
    return {"mode": "absolute", "steps": [GREEN, *({"color": c, "value": v} for c, v in steps)]}


def q(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> Json:
    target: Json = {"refId": "", "datasource": DS, "expr": expr, "editorMode": "code",
                    "range": not instant, "instant": instant}
    if legend:
        target["legendFormat"] = legend
    if table:
        target["format"] = "table"
    return target


class Board:
    """Panels placed left to right in 24 columns, wrapping; ids and refIds assigned."""

    def __init__(self) -> None:
        self.panels: list[Json] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "id": len(self.panels) + 1, "title": title,
                            "collapsed": False, "panels": [],
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0

    def add(self, kind: str, title: str, description: str, targets: list[Json], *,
            unit: str, w: int, h: int = 8, options: Json | None = None,
            custom: Json | None = None, defaults: Json | None = None,
            overrides: list[Json] | None = None,
            transformations: list[Json] | None = None) -> None:
        if self.x + w > 24:
            self._newline()
        for i, t in enumerate(targets):
            t["refId"] = chr(ord("A") + i)
        field_defaults: Json = {"unit": unit, **(defaults or {})}
        if custom:
            field_defaults["custom"] = custom
        panel: Json = {
            "type": kind, "id": len(self.panels) + 1, "title": title,
            "description": description, "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "targets": targets, "options": options or {},
            "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
        }
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    # ---- panel kinds with house defaults ----------------------------------------

    def timeseries(self, title: str, description: str, targets: list[Json], *, unit: str,
                   w: int = 12, h: int = 8, stack: bool = False, legend: Json | None = None,
                   defaults: Json | None = None, overrides: list[Json] | None = None,
                   custom: Json | None = None) -> None:
        c: Json = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                   "showPoints": "never", "spanNulls": False}
        if stack:
            c["stacking"] = {"mode": "normal", "group": "A"}
        c.update(custom or {})
        self.add("timeseries", title, description, targets, unit=unit, w=w, h=h,
                 options={"legend": legend or LEGEND, "tooltip": TOOLTIP}, custom=c,
                 defaults=defaults, overrides=overrides)

    def stat(self, title: str, description: str, targets: list[Json], *, unit: str,
             w: int = 4, h: int = 4, text_mode: str = "auto", graph: bool = False,
             defaults: Json | None = None) -> None:
        self.add("stat", title, description, targets, unit=unit, w=w, h=h, options={
            "reduceOptions": REDUCE_LAST, "colorMode": "value", "justifyMode": "auto",
            "graphMode": "area" if graph else "none", "textMode": text_mode,
            "orientation": "auto"}, defaults=defaults)

    def bargauge(self, title: str, description: str, targets: list[Json], *, unit: str,
                 w: int = 12, h: int = 8, defaults: Json | None = None) -> None:
        self.add("bargauge", title, description, targets, unit=unit, w=w, h=h, options={
            "reduceOptions": REDUCE_LAST, "displayMode": "gradient", "orientation": "horizontal",
            "showUnfilled": True, "namePlacement": "auto", "valueMode": "color"},
            defaults=defaults)

    def table(self, title: str, description: str, targets: list[Json], *, w: int = 24,
              h: int = 8, overrides: list[Json] | None = None,
              transformations: list[Json] | None = None, unit: str = "none") -> None:
        self.add("table", title, description, targets, unit=unit, w=w, h=h,
                 options={"showHeader": True, "cellHeight": "sm"},
                 custom={"align": "auto", "cellOptions": {"type": "auto"}},
                 overrides=overrides, transformations=transformations)

    def timeline(self, title: str, description: str, targets: list[Json], *,
                 mappings: list[Json], w: int = 24, h: int = 6) -> None:
        self.add("state-timeline", title, description, targets, unit="none", w=w, h=h,
                 options={"mergeValues": True, "showValue": "never", "alignValue": "left",
                          "rowHeight": 0.9, "legend": LEGEND, "tooltip": TOOLTIP},
                 custom={"fillOpacity": 80, "lineWidth": 0},
                 defaults={"mappings": mappings, "color": {"mode": "thresholds"},
                           "thresholds": thresholds()})


def unit_override(column: str, unit: str, **more: Any) -> Json:
    props = [{"id": "unit", "value": unit}]
    props += [{"id": k, "value": v} for k, v in more.items()]
    return {"matcher": {"id": "byName", "options": column}, "properties": props}


def organize(rename: dict[str, str], exclude: tuple[str, ...] = ()) -> Json:
    return {"id": "organize", "options": {
        "excludeByName": {name: True for name in ("Time", "__name__", "instance", *exclude)},
        "renameByName": rename, "indexByName": {}}}


def value_map(values: dict[str, tuple[str, str]]) -> list[Json]:
    """Value mappings: number -> (text, colour)."""
    return [{"type": "value", "options": {
        k: {"text": text, "color": color, "index": i}
        for i, (k, (text, color)) in enumerate(values.items())}}]


def datasource_var() -> Json:
    return {"name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "hide": 0, "refresh": 1, "regex": "",
            "includeAll": False, "multi": False, "options": []}


def query_var(name: str, label: str, query: str, *, multi: bool = False) -> Json:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": query, "hide": 0, "refresh": 2, "regex": "",
            "sort": 1, "includeAll": False, "multi": multi, "options": []}


def link(column: str, title: str, uid: str, var: str) -> Json:
    """A data link on a table column: the row's value opens another dashboard."""
    return {"matcher": {"id": "byName", "options": column}, "properties": [{
        "id": "links", "value": [{
            "title": title, "targetBlank": False,
            "url": f"/d/{uid}?var-{var}=${{__value.raw}}"}]}]}


# Annotations from what ugrod exports (Grafana places each at the value's time).
ANNOTATIONS = [
    {"name": "Job ended", "enable": True, "hide": False, "iconColor": "red",
     "datasource": DS, "expr": 'ugro_job_ended_timestamp_seconds{outcome!="succeeded"} * 1000',
     "step": "60s", "titleFormat": "{{job_name}} {{outcome}}", "tagKeys": "outcome,reason",
     "textFormat": "job {{job_name}} of {{owner}}: {{outcome}} ({{reason}})",
     "useValueForTime": True},
    {"name": "Node state changed", "enable": True, "hide": False, "iconColor": "orange",
     "datasource": DS, "step": "60s",
     "expr": "ugro_node_state == 1 and changes(ugro_node_state[2m]) > 0",
     "titleFormat": "{{node}} {{state}}", "tagKeys": "node,state",
     "textFormat": "node {{node}} became {{state}}", "useValueForTime": False},
    {"name": "ugrod started", "enable": True, "hide": False, "iconColor": "purple",
     "datasource": DS, "expr": "max(ugro_daemon_last_start_timestamp_seconds) * 1000",
     "step": "60s", "titleFormat": "ugrod started", "tagKeys": "",
     "textFormat": "ugrod (re)started: the event log was replayed", "useValueForTime": True},
]
GPU_STATUS = {"0": ("free", "transparent"), "1": ("allocated", "green"),
              "2": ("allocated, idle", "yellow"), "3": ("hot", "orange"),
              "4": ("error / missing", "red")}


def dashboard(uid: str, title: str, description: str, board: Board, *,
              variables: list[Json], annotations: list[Json] | None = None) -> Json:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["ugro"],
        "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "timezone": "browser", "refresh": "30s", "liveNow": False,
        "time": {"from": "now-6h", "to": "now"},
        "links": [{"title": "UGRO dashboards", "type": "dashboards", "tags": ["ugro"],
                   "asDropdown": True, "includeVars": False, "keepTime": True,
                   "targetBlank": False, "icon": "external link", "tooltip": "",
                   "url": ""}],
        "templating": {"list": [datasource_var(), *variables]},
        "annotations": {"list": annotations or []},
        "panels": board.panels,
    }


# ---- cluster overview ------------------------------------------------------------------

NODE_STATES = {"1": ("healthy", "green"), "2": ("degraded", "yellow"),
               "3": ("unhealthy", "red"), "4": ("unreachable", "dark-red"),
               "5": ("draining", "blue")}
NODE_STATE_CODE = " + ".join(
    f'{code} * max by (node) (ugro_node_state{{state="{name}"}})'
    for code, (name, _) in NODE_STATES.items())


def cluster_overview() -> Json:
    b = Board()
    b.row("Cluster")
    b.stat("Nodes by state", "How many nodes are in each state (healthy, degraded, "
           "unhealthy, unreachable, draining).",
           [q("sum by (state) (ugro_node_state)", "{{state}}", instant=True)], unit="none",
           w=6, text_mode="value_and_name")
    b.stat("GPUs allocated", "GPUs held by running jobs, out of all GPUs ugrod knows.",
           [q("cluster:ugro_gpu_allocated:sum", "allocated", instant=True),
            q("cluster:ugro_gpus:count", "total", instant=True)], unit="none", w=4,
           text_mode="value_and_name")
    b.stat("Cluster GPU utilisation", "Mean utilisation of every GPU in the cluster.",
           [q("cluster:ugro_gpu_utilization_ratio:avg")], unit="percentunit", w=3, graph=True,
           defaults={"min": 0, "max": 1})
    b.stat("Running jobs", "Jobs whose ranks are all up.",
           [q('sum(ugro_jobs{state="running"})')], unit="none", w=3, graph=True)
    b.stat("Queue", "Jobs waiting to be placed (queued or retrying), held jobs excepted.",
           [q("sum(ugro_queue_length)")], unit="none", w=2)
    b.stat("Oldest wait", "How long the longest-waiting job has waited.",
           [q("max(ugro_queue_oldest_wait_seconds)")], unit="s", w=3,
           defaults={"thresholds": thresholds(("orange", 900), ("red", 3600))})
    b.stat("Idle allocated GPUs", "GPUs held by a job but under 5 % busy: a job that "
           "is stuck, loading data, or asked for more GPUs than it uses.",
           [q("cluster:ugro_gpus_allocated_idle:count")], unit="none", w=3,
           defaults={"thresholds": thresholds(("orange", 1))})
    b.row("Nodes")
    b.timeline("Node state", "Each node's state over time.",
               [q(NODE_STATE_CODE, "{{node}}")], mappings=value_map(NODE_STATES))
    b.table("Node health", "Per node: health score, GPU count and utilisation, memory "
            "and disk use, and seconds since the last successful health check. Click a "
            "node for its dashboard.", [
                q("max by (node) (ugro_node_health_score)", instant=True, table=True),
                q("max by (node) (ugro_node_gpus)", instant=True, table=True),
                q("node:ugro_gpu_utilization_ratio:avg", instant=True, table=True),
                q("max by (node) (ugro_node_memory_used_ratio)", instant=True, table=True),
                q("max by (node) (ugro_node_disk_used_ratio)", instant=True, table=True),
                q("time() - max by (node) (ugro_node_last_check_success_timestamp_seconds)",
                  instant=True, table=True),
            ], h=8, w=14, transformations=[
                {"id": "merge", "options": {}},
                organize({"Value #A": "score", "Value #B": "GPUs", "Value #C": "GPU util",
                          "Value #D": "memory", "Value #E": "disk",
                          "Value #F": "since last check"})],
            overrides=[unit_override("GPU util", "percentunit"),
                       unit_override("memory", "percentunit"),
                       unit_override("disk", "percentunit"),
                       unit_override("since last check", "s"),
                       link("node", "Node detail", "ugro-node-detail", "node")])
    b.timeseries("Health score", "Node health score (100 = no findings; healthy >= 80, "
                 "degraded >= 60).", [q("max by (node) (ugro_node_health_score)", "{{node}}")],
                 unit="none", w=10, defaults={"min": 0, "max": 100,
                                              "thresholds": thresholds(("orange", 60),
                                                                       ("green", 80))})
    b.row("GPUs")
    b.timeline("GPU status", "Every GPU over time: free, allocated, allocated but idle "
               "(under 5 %), hot (over the warning temperature) or failed (an error, or "
               "missing from nvidia-smi). One thin row per GPU stays readable at 160 GPUs.",
               [q("node_gpu:ugro_gpu_status:max", "{{node}}/{{gpu}}")],
               mappings=value_map(GPU_STATUS), h=10)
    b.bargauge("GPU utilisation now", "Every GPU's utilisation, node by node.",
               [q("node_gpu:ugro_gpu_utilization_ratio:max", "{{node}} GPU {{gpu}}", instant=True)],
               unit="percentunit", w=8, h=10, defaults={"min": 0, "max": 1})
    b.timeseries("GPU utilisation", "Utilisation per node and GPU.",
                 [q("node_gpu:ugro_gpu_utilization_ratio:max", "{{node}}/{{gpu}}")], unit="percentunit",
                 w=16, h=10, defaults={"min": 0, "max": 1})
    b.timeseries("GPU memory used", "Memory in use per GPU.",
                 [q("node_gpu:ugro_gpu_memory_used_bytes:max", "{{node}}/{{gpu}}")], unit="bytes", w=8)
    b.timeseries("GPU temperature", "Temperature per GPU; alerts at 80 °C (warning) and "
                 "85 °C (critical).", [q("node_gpu:ugro_gpu_temperature_celsius:max", "{{node}}/{{gpu}}")],
                 unit="celsius", w=8, custom={"thresholdsStyle": {"mode": "line"}},
                 defaults={"thresholds": thresholds(("orange", 80), ("red", 85))})
    b.timeseries("GPU power", "Power draw per GPU, and the cluster total.",
                 [q("node_gpu:ugro_gpu_power_watts:max", "{{node}}/{{gpu}}"),
                  q("cluster:ugro_gpu_power_watts:sum", "total")], unit="watt", w=8)
    b.row("Jobs")
    b.timeseries("Jobs by state", "Jobs queued, starting, running and retrying.",
                 [q('sum by (state) (ugro_jobs{state=~"queued|starting|running|retrying"})',
                    "{{state}}")], unit="none", w=8, stack=True)
    b.timeseries("Queue wait (p50, p90)", "Time jobs waited in the queue, observed when "
                 "they were placed, over the last hour.", [
                     q("cluster:ugro_job_wait_seconds:p50_rate1h", "p50"),
                     q("cluster:ugro_job_wait_seconds:p90_rate1h", "p90")], unit="s", w=8)
    b.timeseries("Jobs finished", "Jobs that ended in each interval, by outcome.",
                 [q("sum by (outcome) (increase(ugro_jobs_finished_total[$__rate_interval]))",
                    "{{outcome}}")], unit="none", w=8, custom={"drawStyle": "bars"})
    b.timeseries("Failed attempts by reason", "Attempts that ended without success in "
                 "each interval: oom, exit, lost, stalled, cancelled, time_limit.",
                 [q("sum by (reason) (increase(ugro_job_attempt_failures_total"
                    "[$__rate_interval]))", "{{reason}}")], unit="none", w=8,
                 custom={"drawStyle": "bars"})
    b.timeseries("GPUs held per user", "GPUs each owner's jobs held (GPU-seconds per "
                 "second, averaged over 5 minutes).",
                 [q("owner:ugro_gpu_allocated_seconds:rate5m", "{{owner}}")], unit="none",
                 w=8, stack=True)
    b.bargauge("GPU-hours per user", "GPU-hours each owner's jobs held over the "
               "dashboard's time range.",
               [q("sum by (owner) (increase(ugro_gpu_allocated_seconds_total[$__range])) "
                  "/ 3600", "{{owner}}", instant=True)], unit="none", w=8)
    b.table("Running jobs", "Active jobs: owner, state, GPUs held, run time and the "
            "latest training step, loss and throughput they reported. Click a job for "
            "its dashboard.", [
                q("max by (job_name, owner, state) (ugro_job_state == 1)", instant=True,
                  table=True),
                q("count by (job_name) (ugro_job_gpu_allocation)", instant=True, table=True),
                q("time() - max by (job_name) (ugro_job_start_timestamp_seconds)",
                  instant=True, table=True),
                q("max by (job_name) (ugro_job_training_step)", instant=True, table=True),
                q("max by (job_name) (ugro_job_training_loss)", instant=True, table=True),
                q("max by (job_name) (ugro_job_training_throughput)", instant=True,
                  table=True),
            ], transformations=[
                {"id": "merge", "options": {}},
                organize({"job_name": "job", "Value #B": "GPUs", "Value #C": "run time",
                          "Value #D": "step", "Value #E": "loss",
                          "Value #F": "throughput"},
                         exclude=("Value #A", "job"))],
            overrides=[unit_override("run time", "s"),
                       link("job", "Job detail", "ugro-job-detail", "job")])
    b.table("Recently ended jobs", "Jobs that ended in the last 30 minutes, how and why "
            "(reason: oom, exit, lost, stalled, cancelled, time_limit). Click a job for "
            "its dashboard.",
            [q("max by (job_name, owner, outcome, reason) "
               "(ugro_job_ended_timestamp_seconds) * 1000", instant=True, table=True)],
            transformations=[organize({"job_name": "job", "Value": "ended"}, exclude=("job",))],
            overrides=[unit_override("ended", "dateTimeAsIso"),
                       link("job", "Job detail", "ugro-job-detail", "job")])
    b.row("ugrod")
    b.timeseries("API requests", "Requests to ugrod's API per second, by route.",
                 [q("sum by (route) (rate(ugro_api_requests_total[$__rate_interval]))",
                    "{{route}}")], unit="reqps", w=8)
    b.timeseries("API latency p99", "99th percentile of API request latency, by route.",
                 [q("histogram_quantile(0.99, sum by (le, route) (rate("
                    "ugro_api_request_duration_seconds_bucket[$__rate_interval])))",
                    "{{route}}")], unit="s", w=8)
    b.timeseries("Scheduler and event log", "99th percentile of a scheduler pass and of "
                 "the event log's fdatasync (every command waits for it).", [
                     q("histogram_quantile(0.99, sum by (le) (rate("
                       "ugro_scheduler_tick_duration_seconds_bucket[$__rate_interval])))",
                       "scheduler pass p99"),
                     q("histogram_quantile(0.99, sum by (le) (rate("
                       "ugro_event_log_fsync_seconds_bucket[$__rate_interval])))",
                       "fsync p99")], unit="s", w=8)
    return dashboard(
        "ugro-cluster-overview", "UGRO / Cluster overview",
        "Nodes, GPUs, the queue and running jobs of a UGRO cluster, and ugrod itself.", b,
        variables=[], annotations=ANNOTATIONS)


# ---- job detail ------------------------------------------------------------------------

JOB = 'job_name=~"$job"'


def job_detail() -> Json:
    b = Board()
    b.stat("State", "The job's state (starting, running); empty once it has ended.",
           [q(f"max by (state) (ugro_job_state{{{JOB}}} == 1)", "{{state}}", instant=True)],
           unit="none", text_mode="name")
    b.stat("Step", "Latest training step the job reported.",
           [q(f"max(ugro_job_training_step{{{JOB}}})")], unit="none")
    b.stat("Loss", "Latest training loss the job reported.",
           [q(f"max(ugro_job_training_loss{{{JOB}}})")], unit="none", graph=True)
    b.stat("Run time", "Time since the current attempt was placed.",
           [q(f"time() - max(ugro_job_start_timestamp_seconds{{{JOB}}})")], unit="s")
    b.stat("GPUs", "GPUs the job holds, all nodes together.",
           [q(f"count(ugro_job_gpu_allocation{{{JOB}}})")], unit="none")
    b.stat("Stalled", "Whether ugrod's watchdog found the step counter stopped.",
           [q(f"max(ugro_job_stalled{{{JOB}}})")], unit="none",
           defaults={"mappings": value_map({"0": ("no", "green"), "1": ("STALLED", "red")})})
    b.timeseries("Loss", "Training loss as each selected job reported it (pick several "
                 "jobs, e.g. a sweep's, to overlay their curves).",
                 [q(f"max by (job_name) (ugro_job_training_loss{{{JOB}}})", "{{job_name}}")],
                 unit="none")
    # Loss against step: the two series of each job joined on their timestamps into
    # one (step, loss) frame per job, then plotted x = step, y = loss.
    b.add("xychart", "Loss by step", "Training loss against training step, one line per "
          "selected job: runs of a sweep compare at equal steps whatever their speed.", [
              q(f'label_replace(max by (job_name) (ugro_job_training_step{{{JOB}}}), '
                f'"field", "step", "", "")'),
              q(f'label_replace(max by (job_name) (ugro_job_training_loss{{{JOB}}}), '
                f'"field", "loss", "", "")')],
          unit="none", w=12, options={
              # auto: per frame (job), x = its first number field (step), y = loss
              "mapping": "auto", "series": [], "legend": LEGEND,
              "tooltip": {"mode": "single", "sort": "none"}},
          custom={"show": "lines", "lineWidth": 1, "pointSize": {"fixed": 4}},
          transformations=[
              {"id": "joinByLabels", "options": {"value": "field", "join": ["job_name"]}},
              {"id": "partitionByValues", "options": {"fields": ["job_name"],
                                                      "keepFields": False}}])
    b.timeseries("Throughput", "Throughput as the job reported it (its own unit, "
                 "e.g. samples/s), and steps per second.", [
                     q(f"max by (job_name) (ugro_job_training_throughput{{{JOB}}})",
                       "{{job_name}} throughput"),
                     q(f"max by (job_name) (deriv(ugro_job_training_step{{{JOB}}}"
                       "[$__rate_interval]))", "{{job_name}} steps/s")], unit="short")
    b.timeseries("GPU utilisation per rank", "Utilisation of each GPU the job holds.",
                 [q(f"job_gpu:ugro_gpu_utilization_ratio:max{{{JOB}}}",
                    "{{job_name}} rank {{rank}} {{node}}/{{gpu}}")], unit="percentunit", w=12,
                 defaults={"min": 0, "max": 1})
    b.timeseries("GPU memory per rank", "Memory in use on each GPU the job holds.",
                 [q(f"job_gpu:ugro_gpu_memory_used_bytes:max{{{JOB}}}",
                    "{{job_name}} rank {{rank}} {{node}}/{{gpu}}")], unit="bytes", w=12)
    b.timeseries("GPU temperature", "Temperature of the job's GPUs.",
                 [q(f"node_gpu:ugro_gpu_temperature_celsius:max * on (node, gpu) group_left (job_name, rank) "
                    f"ugro_job_gpu_allocation{{{JOB}}}", "{{job_name}} rank {{rank}} {{node}}/{{gpu}}")],
                 unit="celsius", w=12, custom={"thresholdsStyle": {"mode": "line"}},
                 defaults={"thresholds": thresholds(("orange", 80), ("red", 85))})
    b.timeseries("GPU power", "Power draw of the job's GPUs.",
                 [q(f"node_gpu:ugro_gpu_power_watts:max * on (node, gpu) group_left (job_name, rank) "
                    f"ugro_job_gpu_allocation{{{JOB}}}", "{{job_name}} rank {{rank}} {{node}}/{{gpu}}")],
                 unit="watt", w=12)
    b.table("Placement", "Which node and GPU each rank holds. Click a node for its "
            "dashboard.",
            [q(f"ugro_job_gpu_allocation{{{JOB}}}", instant=True, table=True)],
            transformations=[organize({"job_name": "job name"}, exclude=("Value", "job"))],
            overrides=[link("node", "Node detail", "ugro-node-detail", "node")])
    annotations = [
        {"name": "Job state", "enable": True, "hide": False, "iconColor": "blue",
         "datasource": DS, "expr": f"ugro_job_state{{{JOB}}} == 1", "step": "15s",
         "titleFormat": "{{state}}", "tagKeys": "state",
         "textFormat": "job {{job_name}} {{state}}", "useValueForTime": False},
        {"name": "Stalled", "enable": True, "hide": False, "iconColor": "red",
         "datasource": DS, "expr": f"ugro_job_stalled{{{JOB}}} == 1", "step": "15s",
         "titleFormat": "stalled", "tagKeys": "job_name",
         "textFormat": "ugrod's watchdog: step counter stopped", "useValueForTime": False},
        {**ANNOTATIONS[0], "expr": f"ugro_job_ended_timestamp_seconds{{{JOB}}} * 1000",
         "name": "Ended"},
    ]
    return dashboard(
        "ugro-job-detail", "UGRO / Job detail",
        "One job: its state changes (annotations), loss and throughput curves, and the "
        "GPUs each rank uses.", b,
        variables=[query_var("job", "Job", "label_values(ugro_job_state, job_name)",
                             multi=True)],
        annotations=annotations)


# ---- node detail -------------------------------------------------------------------------

NODE = 'node="$node"'


def node_detail() -> Json:
    b = Board()
    b.stat("State", "The node's state as ugrod sees it.",
           [q(f"max by (state) (ugro_node_state{{{NODE}}} == 1)", "{{state}}",
              instant=True)], unit="none", text_mode="name")
    b.stat("Health score", "100 = no findings; healthy >= 80, degraded >= 60.",
           [q(f"max(ugro_node_health_score{{{NODE}}})")], unit="none",
           defaults={"thresholds": thresholds(("red", 0), ("orange", 60), ("green", 80))})
    b.stat("Circuit breaker", "Closed: checked every sweep; open: unreachable, probed "
           "with backoff; half-open: one trial probe.",
           [q(f"max by (state) (ugro_node_circuit_breaker_state{{{NODE}}} == 1)",
              "{{state}}", instant=True)], unit="none", text_mode="name")
    b.stat("Since last good check", "Time since a health check of this node succeeded.",
           [q(f"time() - max(ugro_node_last_check_success_timestamp_seconds{{{NODE}}})")],
           unit="s", defaults={"thresholds": thresholds(("orange", 120), ("red", 600))})
    b.stat("Probe latency", "Round trip of the last health probe.",
           [q(f"max(ugro_node_check_latency_seconds{{{NODE}}})")], unit="s", graph=True)
    b.stat("GPUs", "GPUs on the node (inventory, else config).",
           [q(f"max(ugro_node_gpus{{{NODE}}})")], unit="none")
    b.bargauge("GPU utilisation now", "Each GPU's utilisation.",
               [q(f"node_gpu:ugro_gpu_utilization_ratio:max{{{NODE}}}", "GPU {{gpu}}", instant=True)],
               unit="percentunit", w=8, defaults={"min": 0, "max": 1})
    b.timeseries("GPU utilisation", "Utilisation per GPU.",
                 [q(f"node_gpu:ugro_gpu_utilization_ratio:max{{{NODE}}}", "GPU {{gpu}}")],
                 unit="percentunit", w=16, defaults={"min": 0, "max": 1})
    b.timeseries("GPU memory used", "Memory in use per GPU, and installed.", [
        q(f"node_gpu:ugro_gpu_memory_used_bytes:max{{{NODE}}}", "GPU {{gpu}} used"),
        q(f"node_gpu:ugro_gpu_memory_total_bytes:max{{{NODE}}}", "GPU {{gpu}} total")], unit="bytes", w=8)
    b.timeseries("GPU temperature", "Temperature per GPU; alerts at 80 and 85 °C.",
                 [q(f"node_gpu:ugro_gpu_temperature_celsius:max{{{NODE}}}", "GPU {{gpu}}")],
                 unit="celsius", w=8, custom={"thresholdsStyle": {"mode": "line"}},
                 defaults={"thresholds": thresholds(("orange", 80), ("red", 85))})
    b.timeseries("GPU power", "Power draw per GPU.",
                 [q(f"node_gpu:ugro_gpu_power_watts:max{{{NODE}}}", "GPU {{gpu}}")], unit="watt", w=8)
    b.timeseries("GPU clocks", "SM and memory clocks from the node's GPU exporter "
                 "(empty where only ugrod's own samples exist).", [
                     q(f"max by (gpu) (DCGM_FI_DEV_SM_CLOCK{{{NODE}}}) * 1e6", "GPU {{gpu}} SM"),
                     q(f"max by (gpu) (DCGM_FI_DEV_MEM_CLOCK{{{NODE}}}) * 1e6",
                       "GPU {{gpu}} memory")], unit="hertz", w=12)
    b.timeseries("CPU, memory and disk", "CPU busy share, memory in use and use of the "
                 "filesystem holding the work dir.", [
                     q(f'sum(rate(ugro_node_cpu_seconds_total{{{NODE},mode="busy"}}'
                       f"[$__rate_interval])) / sum(rate(ugro_node_cpu_seconds_total{{{NODE}}}"
                       "[$__rate_interval]))", "CPU"),
                     q(f"max(ugro_node_memory_used_ratio{{{NODE}}})", "memory"),
                     q(f"max(ugro_node_disk_used_ratio{{{NODE}}})", "disk")],
                 unit="percentunit", w=12, defaults={"min": 0, "max": 1})
    b.timeseries("Health checks", "Duration of the last check, and failed checks per "
                 "second.", [
                     q(f"max(ugro_health_check_last_duration_seconds{{{NODE}}})", "duration"),
                     q(f"sum(rate(ugro_health_check_failures_total{{{NODE}}}"
                       "[$__rate_interval]))", "failures/s")], unit="s", w=12,
                 overrides=[unit_override("failures/s", "ops")])
    b.table("Jobs on this node", "Active jobs holding GPUs here, with how many. Click a "
            "job for its dashboard.",
            [q(f"count by (job_name) (ugro_job_gpu_allocation{{{NODE}}})", instant=True,
               table=True)], w=12,
            transformations=[organize({"job_name": "job", "Value": "GPUs"})],
            overrides=[link("job", "Job detail", "ugro-job-detail", "job")])
    b.timeseries("GPU energy", "Average power from the exporter's energy counter "
                 "(NVML only; empty with nvidia-smi or without the exporter).",
                 [q(f"node_gpu:dcgm_fi_dev_total_energy_consumption_watts:rate5m{{{NODE}}}",
                    "GPU {{gpu}}")], unit="watt", w=12)
    b.table("Active alerts", "Alerts ugrod has raised on this node and not cleared.",
            [q(f"ugro_node_alert{{{NODE}}}", instant=True, table=True)], w=24,
            transformations=[organize({}, exclude=("Value", "job", "node"))])
    return dashboard(
        "ugro-node-detail", "UGRO / Node detail",
        "One node: state, health, circuit breaker, every GPU, host resources and the "
        "jobs on it.", b,
        variables=[query_var("node", "Node", "label_values(ugro_node_state, node)")],
        annotations=ANNOTATIONS[1:])


DASHBOARDS = {
    "cluster-overview.json": cluster_overview,
    "job-detail.json": job_detail,
    "node-detail.json": node_detail,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, build in DASHBOARDS.items():
        text, path = render(build), OUT / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python3 grafana/build_dashboards.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
