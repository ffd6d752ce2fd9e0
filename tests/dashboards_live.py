"""UGRO's Grafana dashboards without Grafana: walk them, start a real Prometheus, run their queries.

Used by tests/integration/test_dashboards.py (every query parses) and by the
end-to-end test (every panel returns data while a real job runs)::

    with PrometheusServer(tmp, scrape_config_text) as prom:
        ...  # ugrod, a job, a few scrapes
        missing = empty_queries(prom.url, prefer={"job": "train-1"})
        assert not missing, missing

Variables are resolved the way Grafana does it: in order, each
``label_values(metric, label)`` asked of Prometheus over the time window, the
preferred value when given and present, else the first value. Grafana's own
variables ($__rate_interval, $__range, ...) get values fit for the window.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.rules.yml"))

# Grafana's built-in variables, as Grafana would fill them for a short window
# at a 1 s scrape interval ($__rate_interval = max(4 x scrape, interval + scrape)).
GLOBALS = {"__rate_interval": "4s", "__interval": "1s", "__interval_ms": "1000",
           "__range": "5m", "__range_s": "300", "__range_ms": "300000"}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard, with where it came from."""

    dashboard: str
    where: str  # "panel 3 'GPU power' A", "annotation 'Job state'", "variable job"
    expr: str
    instant: bool = False  # a table/stat instant query (else range, as time series)

    def __str__(self) -> str:
        return f"{self.dashboard}: {self.where}: {self.expr}"


def load_dashboards(paths: Sequence[Path] | None = None) -> dict[str, dict[str, Any]]:
    """name (file stem) -> dashboard JSON."""
    files = paths if paths is not None else sorted(DASHBOARDS.glob("*.json"))
    return {p.stem: json.loads(p.read_text()) for p in files}


def panels(dash: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves excluded)."""
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def variables(dash: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(dash.get("templating", {}).get("list", []))


def queries(name: str, dash: Mapping[str, Any]) -> list[Query]:
    """Panel targets, annotation expressions and variable queries, in dashboard order."""
    out: list[Query] = []
    for var in variables(dash):
        if var.get("type") == "query":
            out.append(Query(name, f"variable {var['name']}", _var_query(var)))
    for ann in dash.get("annotations", {}).get("list", []):
        expr = ann.get("expr") or (ann.get("target") or {}).get("expr")
        if expr:
            out.append(Query(name, f"annotation {ann.get('name')!r}", expr))
    for p in panels(dash):
        for t in p.get("targets", []):
            if t.get("expr") and not t.get("hide"):
                out.append(Query(name, f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}",
                                 t["expr"], instant=bool(t.get("instant"))
                                 and not t.get("range", False)))
    return out


def _var_query(var: Mapping[str, Any]) -> str:
    query = var.get("query", "")
    return str(query.get("query", "") if isinstance(query, dict) else query)


def referenced(text: str) -> set[str]:
    """Variable names used in ``text`` ($x, ${x}, ${x:fmt}, [[x]])."""
    return {a or b or c for a, b, c in VAR_RE.findall(text)}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Fill variables (Grafana's globals included); an unknown variable raises KeyError."""
    def fill(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in values:
            return values[name]
        return GLOBALS[name]

    return VAR_RE.sub(fill, text)


def label_values_query(query: str) -> tuple[str | None, str] | None:
    """``label_values(metric, label)`` -> (metric selector or None, label)."""
    m = LABEL_VALUES_RE.match(query)
    return (m.group(1), m.group(2)) if m else None


# ---- Prometheus ----------------------------------------------------------------------


class PrometheusError(Exception):
    """Prometheus answered an error (``error_type`` is e.g. bad_data for a parse error)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type


class Prometheus:
    """A few /api/v1 calls over urllib (no extra dependency)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: Sequence[tuple[str, str]], *, post: bool = False) -> Any:
        query = urllib.parse.urlencode(params)
        if post:  # long expressions: POST, as Grafana's data source is set to
            req = urllib.request.Request(f"{self.url}{path}", data=query.encode(),
                                         method="POST")
        else:
            req = urllib.request.Request(f"{self.url}{path}?{query}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(body.get("errorType", "?"), body.get("error", "?"))
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = [("query", expr)] + ([("time", repr(at))] if at is not None else [])
        result: dict[str, Any] = self._get("/api/v1/query", params, post=True)
        return result

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> dict[str, Any]:
        result: dict[str, Any] = self._get("/api/v1/query_range", [
            ("query", expr), ("start", repr(start)), ("end", repr(end)),
            ("step", repr(step_s))], post=True)
        return result

    def label_values(self, label: str, match: str | None, start: float,
                     end: float) -> list[str]:
        params = [("start", repr(start)), ("end", repr(end))]
        if match:
            params.append(("match[]", match))
        path = f"/api/v1/label/{urllib.parse.quote(label)}/values"
        data = self._get(path, params)
        return sorted(str(v) for v in data)

    def rules(self) -> list[dict[str, Any]]:
        groups = self._get("/api/v1/rules", [])["groups"]
        return [r for g in groups for r in g["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._get("/api/v1/targets", [])["activeTargets"]
        return active


def finite_values(data: Mapping[str, Any]) -> int:
    """How many finite sample values a query result holds (vector, matrix or scalar)."""
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return int(math.isfinite(float(result[1])))
    if kind == "vector":
        return sum(math.isfinite(float(s["value"][1])) for s in result)
    if kind == "matrix":
        return sum(math.isfinite(float(v[1])) for s in result for v in s["values"])
    return 0


def resolve_variables(prom: Prometheus, dash: Mapping[str, Any], start: float, end: float,
                      prefer: Mapping[str, str] | None = None) -> dict[str, str]:
    """Values for the dashboard's variables, resolved in order as Grafana does."""
    prefer = prefer or {}
    values: dict[str, str] = {}
    for var in variables(dash):
        name, kind = var["name"], var.get("type")
        if kind == "datasource":
            values[name] = "prometheus"
            continue
        if kind != "query":
            values[name] = str((var.get("current") or {}).get("value", ""))
            continue
        parsed = label_values_query(substitute(_var_query(var), values))
        if parsed is None:
            raise ValueError(f"variable {name}: only label_values(...) queries are supported")
        match, label = parsed
        found = prom.label_values(label, match, start, end)
        if name in prefer and prefer[name] in found:
            values[name] = prefer[name]
        elif found:
            values[name] = found[0]
        else:
            values[name] = ""
    return values


@dataclass(frozen=True)
class Outcome:
    query: Query
    values: int  # finite sample values returned (range or instant)
    error: str | None = None


def run_queries(url: str, *, prefer: Mapping[str, str] | None = None, window_s: float = 300.0,
                step_s: float = 1.0, dashboards: Mapping[str, Mapping[str, Any]] | None = None,
                at: float | None = None) -> list[Outcome]:
    """Every query of every dashboard, variables resolved, as instant and range queries."""
    prom = Prometheus(url)
    end = at if at is not None else time.time()
    start = end - window_s
    outcomes: list[Outcome] = []
    for name, dash in (dashboards or load_dashboards()).items():
        values = resolve_variables(prom, dash, start, end, prefer)
        for q in queries(name, dash):
            if q.where.startswith("variable "):
                continue
            expr = substitute(q.expr, values)
            try:
                n = finite_values(prom.query(expr, end))
                if not q.instant:
                    n += finite_values(prom.query_range(expr, start, end, step_s))
                outcomes.append(Outcome(q, n))
            except PrometheusError as exc:
                outcomes.append(Outcome(q, 0, str(exc)))
    return outcomes


def empty_queries(url: str, *, prefer: Mapping[str, str] | None = None,
                  allow: Sequence[str] = (), **kw: Any) -> list[str]:
    """Queries that failed or returned no finite value, less those matching ``allow``.

    ``allow``: regular expressions matched against ``str(query)`` for panels
    that may legitimately be empty (e.g. DCGM clocks when no GPU exporter runs).
    """
    out = []
    for o in run_queries(url, prefer=prefer, **kw):
        if o.error is None and o.values:
            continue
        if any(re.search(a, str(o.query)) for a in allow):
            continue
        out.append(f"{o.query}: {o.error or 'no data'}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """Debian's /usr/bin/prometheus on a free port with its own TSDB under ``base``."""

    def __init__(self, base: Path, config_text: str = "", *, rule_files: Sequence[Path] = (),
                 scrape_interval: str = "1s", binary: str | None = None) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        self.config_text = config_text or (
            f"global:\n  scrape_interval: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\n"
            + ("rule_files:\n" + "".join(f"  - {p}\n" for p in rule_files) if rule_files
               else ""))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "prometheus.log"

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "prometheus.yml"
        config.write_text(self.config_text)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.base / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s} s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---- Alertmanager and a webhook receiver (alerts that reach people) -------------------


class Webhook:
    """An HTTP receiver on a free loopback port: what Alertmanager posts, kept in order."""

    def __init__(self) -> None:
        import http.server
        import threading

        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(min(length, 1 << 20))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every notification received so far."""
        return [a for body in list(self.received) for a in body.get("alerts", [])]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AlertmanagerServer:
    """Debian's prometheus-alertmanager on a free loopback port, routing to ``webhook_url``."""

    def __init__(self, base: Path, webhook_url: str) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.webhook_url = webhook_url
        self.binary = (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
                       or "/usr/bin/prometheus-alertmanager")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "alertmanager.log"

    def start(self, timeout_s: float = 30.0) -> AlertmanagerServer:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "alertmanager.yml"
        config.write_text(
            "route:\n  receiver: hook\n  group_by: [alertname, job_name]\n"
            "  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"
            f"receivers:\n  - name: hook\n    webhook_configs:\n"
            f"      - url: {self.webhook_url}\n")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.path={self.base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--cluster.listen-address=", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"alertmanager not ready after {timeout_s} s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
