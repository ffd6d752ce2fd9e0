"""``ugroctl prometheus-config``: a Prometheus config (and rules) generated from cluster.yaml.

Two scrape jobs: ``ugrod`` (the daemon's /metrics on the head node) and
``ugro-gpu`` (the GPU exporter, DCGM-exporter names, on the nodes whose
cluster.yaml entry says ``gpu_exporter: true``: a target for a node that runs
none would be down, and alerting, forever). Each exporter target carries a
``node`` label with the node's name from cluster.yaml, which is what
dashboards, recording rules and alerts join on (DCGM's own ``Hostname`` label
is dropped: upstream renamed it across versions).

ugrod names training jobs in a ``job_name`` label, so Prometheus's own ``job``
target label is never overwritten and no ``honor_labels`` is needed: a scrape
config written by hand works the same. ``alertmanagers`` adds the ``alerting:``
section (without one, alerts never leave Prometheus); ``write_rules`` renders
the rule files with cluster.yaml's thresholds (``ugrod.setup.prometheus_rules``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import yaml

from ugrod.setup import prometheus_rules as pr

DEFAULT_EXPORTER_PORT = 9400
DEFAULT_RULES_DIR = "/etc/prometheus/ugro"
UGROD_JOB = "ugrod"
EXPORTER_JOB = "ugro-gpu"
RULE_FILES = (pr.RECORDING_FILE, pr.ALERTS_FILE)


class _Node(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...


class _Metrics(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class _Cluster(Protocol):
    @property
    def name(self) -> str: ...


class _Health(Protocol):
    @property
    def thresholds(self) -> pr.ThresholdsView: ...


class ClusterView(Protocol):
    """What the generator reads of ``ugrod.config.schema.Config``."""

    @property
    def cluster(self) -> _Cluster: ...
    @property
    def nodes(self) -> Sequence[_Node]: ...
    @property
    def metrics(self) -> _Metrics: ...
    @property
    def health(self) -> _Health: ...


class ScrapeConfigError(ValueError):
    """The config cannot yield a usable scrape config (says which key to change)."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ugrod_target(cfg: ClusterView) -> str:
    """Where Prometheus (on the head node) finds ugrod's /metrics."""
    m = cfg.metrics
    if not m.enabled:
        raise ScrapeConfigError("metrics.enabled is false: ugrod serves no /metrics to scrape")
    if m.port == 0:
        raise ScrapeConfigError("metrics.port is 0 (any free port): set a fixed port so "
                                "Prometheus can find ugrod")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(m.host, m.host)
    return _hostport(host, m.port)


def alertmanager_target(url: str) -> dict[str, Any]:
    """One ``alerting.alertmanagers`` entry for an Alertmanager's base URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username:
        raise ScrapeConfigError(f"--alertmanager {url!r}: give the Alertmanager's base URL, "
                                f"e.g. http://127.0.0.1:9093")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ScrapeConfigError(f"--alertmanager {url!r}: the port is not a number "
                                f"in 1..65535") from None
    entry: dict[str, Any] = {"static_configs": [{"targets": [_hostport(parts.hostname, port)]}]}
    if parts.scheme == "https":
        entry["scheme"] = "https"
    if parts.path.strip("/"):
        entry["path_prefix"] = "/" + parts.path.strip("/")
    return entry


def exporter_nodes(cfg: ClusterView) -> list[_Node]:
    """Nodes whose cluster.yaml entry says they run the GPU exporter."""
    return [n for n in cfg.nodes if getattr(n, "gpu_exporter", False)]


def scrape_config_dict(cfg: ClusterView, *, rules_dir: str = DEFAULT_RULES_DIR,
                       exporter_port: int = DEFAULT_EXPORTER_PORT,
                       scrape_interval: str = "15s",
                       alertmanagers: Sequence[str] = ()) -> dict[str, Any]:
    """The config as plain data (``scrape_config`` dumps it as YAML)."""
    exporters = [{"targets": [_hostport(n.host, exporter_port)], "labels": {"node": n.name}}
                 for n in exporter_nodes(cfg)]
    out: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
            "external_labels": {"cluster": cfg.cluster.name},
        },
    }
    if alertmanagers:
        out["alerting"] = {"alertmanagers": [alertmanager_target(u) for u in alertmanagers]}
    out["rule_files"] = [f"{rules_dir.rstrip('/')}/{f}" for f in RULE_FILES]
    jobs: list[dict[str, Any]] = [
        {"job_name": UGROD_JOB, "static_configs": [{"targets": [ugrod_target(cfg)]}]},
    ]
    if exporters:
        jobs.append({
            "job_name": EXPORTER_JOB,
            "static_configs": exporters,
            "metric_relabel_configs": [{"action": "labeldrop", "regex": "Hostname"}],
        })
    out["scrape_configs"] = jobs
    return out


def scrape_config(cfg: ClusterView, *, rules_dir: str = DEFAULT_RULES_DIR,
                  exporter_port: int = DEFAULT_EXPORTER_PORT,
                  scrape_interval: str = "15s", alertmanagers: Sequence[str] = ()) -> str:
    """prometheus.yml text for this cluster (``promtool check config`` accepts it)."""
    source = getattr(cfg, "source", None)
    head = (f"# Generated by `ugroctl prometheus-config` from {source or 'the built-in config'}.\n"
            "# Regenerate after adding or removing nodes; see docs/operations.md.\n")
    body = yaml.safe_dump(scrape_config_dict(cfg, rules_dir=rules_dir,
                                             exporter_port=exporter_port,
                                             scrape_interval=scrape_interval,
                                             alertmanagers=alertmanagers),
                          sort_keys=False, default_flow_style=False)
    return head + body


def rule_files(cfg: ClusterView, runbook_base: str = pr.DEFAULT_RUNBOOK_BASE
               ) -> dict[str, str]:
    """File name -> text of the rule files, with cluster.yaml's thresholds."""
    t = cfg.health.thresholds
    try:
        return {pr.RECORDING_FILE: pr.recording_rules(t),
                pr.ALERTS_FILE: pr.alert_rules(t, runbook_base)}
    except pr.RulesError as exc:
        raise ScrapeConfigError(str(exc)) from None


def write_rules(cfg: ClusterView, directory: Path,
                runbook_base: str = pr.DEFAULT_RUNBOOK_BASE) -> list[Path]:
    """Write the rule files into ``directory`` (each via a temporary file and a rename)."""
    files = rule_files(cfg, runbook_base)
    if not directory.is_dir():
        raise ScrapeConfigError(f"--rules-out {directory}: not a directory (create it first)")
    written = []
    for name, text in files.items():
        path = directory / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        written.append(path)
    return written
