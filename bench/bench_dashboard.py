"""`ugroctl dashboard` in a real browser: load times, event latency, ugrod CPU with idle pages.

Usage: python bench/bench_dashboard.py [--nodes 20] [--jobs 1000] [--points 100000]
                                       [--events 100] [--pages 5] [--seconds 30]

Set-up (all real): ``--nodes`` OpenSSH sshd nodes (tests/sshd_nodes.py) whose stand-in
nvidia-smi reports 8 GPUs each, a ugrod over them, one job per node holding its 8
GPUs (a sleeping process), one finished job whose metrics.jsonl has ``--points``
lines, and held jobs up to ``--jobs`` in all; `ugroctl dashboard --no-open`; Debian's
chromium driven by Playwright.

Figures:
1. First paint and loaded time of each view in a fresh page (cookie already set):
   the cluster map, the jobs list (every job), the job with ``--points`` points
   (loaded = its curve drawn, downsampled by ugrod). Target: loaded < 1 s.
2. Event recorded -> visible on the page: ``--events`` priority changes, 50 ms
   apart; for each, the event's own timestamp (the ledger's clock) to the moment its
   row appears in the page's event list (Date.now() in a MutationObserver; one
   machine, one clock). Target: p99 < 1 s.
3. ugrod's CPU (utime+stime) over ``--seconds`` with ``--pages`` pages open and idle
   on the cluster view, against the same window with no page open (same run).
   Target: the pages add < 1 % of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import UnixHTTPConnection  # noqa: E402
from sshd_nodes import SshdCluster, start_sshd_nodes  # noqa: E402

FAKE = ROOT / "tests" / "fake_nvidia_smi"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = UnixHTTPConnection(str(sock), timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        if "ndjson" in resp.getheader("Content-Type", ""):
            return resp.status, [json.loads(x) for x in raw.splitlines() if x.strip()]
        return resp.status, json.loads(raw)
    finally:
        conn.close()


def wait(what: str, pred: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise SystemExit(f"timed out: {what}")


def write_config(path: Path, cluster: SshdCluster) -> None:
    cfg = {"cluster": {"name": "bench", "known_hosts": str(cluster.known_hosts),
                       "rdzv_port_range": [43000, 43999]},
           "nodes": {n.name: {"host": n.host, "port": n.port, "user": n.user,
                              "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                              "transport": "ssh", "python": sys.executable} for n in cluster},
           "metrics": {"enabled": False}}
    path.write_text(yaml.safe_dump(cfg))


def setup(root: Path, args: argparse.Namespace, cluster: SshdCluster,
          procs: list[subprocess.Popen[bytes]]) -> tuple[Path, dict[str, str]]:
    """The nodes' stand-in GPUs, ugrod (appended to ``procs`` at once, so a failed
    set-up still stops it), the jobs and the 100,000-point metrics file."""
    for n in cluster:
        n.bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(FAKE / "nvidia-smi", n.bin_dir / "nvidia-smi")
        # eight H100s, lightly used (a busy GPU's memory would keep the planner off it)
        scenario = json.loads((FAKE / "scenarios" / "eight_gpus.json").read_text())
        for g in scenario["gpus"]:
            g.update({"memory.used": 300 + 40 * g["index"], "utilization.gpu": 5 * g["index"],
                      "temperature.gpu": 40 + 3 * g["index"]})
        (n.bin_dir / "state.json").write_text(json.dumps(scenario))
    write_config(root / "cluster.yaml", cluster)
    sock = root / "ugrod.sock"
    env = dict(os.environ, UGRO_STATE_DIR=str(root / "state"), UGRO_SOCKET=str(sock),
               PYTHONPATH=str(ROOT))
    log = open(root / "ugrod.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "ugrod.cli", "--config",
                             str(root / "cluster.yaml"), "--log-level", "warning"],
                            env=env, stdout=log, stderr=log, cwd=ROOT)
    procs.append(proc)

    def all_checked() -> bool:
        try:
            nodes = api(sock, "GET", "/v1/nodes")[1]["nodes"]
        except OSError:
            return False
        return sum(1 for n in nodes if n["last_check"] and len(n["gpus"]) == 8) == args.nodes
    wait("every node checked, 8 GPUs each", all_checked, 240)
    # one job per node on all 8 GPUs, a finished job with many points, held jobs to --jobs
    sleeper = [sys.executable, "-c", "import time; time.sleep(3600)"]
    for i in range(args.nodes):
        st, body = api(sock, "POST", "/v1/jobs", {"name": f"train-{i}", "argv": sleeper,
                                                 "gpus_per_node": 8, "torchrun": False})
        assert st == 201, body
    st, body = api(sock, "POST", "/v1/jobs", {"name": "big", "argv": ["/bin/true"]})
    assert st == 201, body
    for i in range(args.jobs - args.nodes - 1):
        st, body = api(sock, "POST", "/v1/jobs", {"name": f"q-{i}", "argv": ["/bin/true"],
                                                 "gpus_per_node": 1, "held": True})
        assert st == 201, body
    def running() -> bool:
        jobs = api(sock, "GET", "/v1/jobs")[1]["jobs"]
        states = [j["state"] for j in jobs if j["id"].startswith("train-")]
        if any(s in ("failed", "cancelled") for s in states):
            raise SystemExit(f"a training job ended: {[j for j in jobs if j['id'] == 'train-0']}")
        return states.count("running") == args.nodes
    wait("the training jobs running", running, 240)
    wait("the finished job", lambda: api(sock, "GET", "/v1/jobs/big")[1]["job"]["state"]
         in ("succeeded", "failed"), 120)
    metrics = root / "state" / "jobs" / "big" / "metrics.jsonl"
    t0 = 1.79e9
    with open(metrics, "w") as f:
        for i in range(args.points):
            f.write(json.dumps({"step": i, "loss": round(2.5 / (1 + i / 500) + 0.05 * ((i * 7919)
                                % 100) / 100, 6), "lr": 3e-4, "ts": t0 + i * 0.05}) + "\n")
    return sock, env


def load_times(browser: Any, url: str, base: str) -> dict[str, dict[str, float]]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    first = ctx.new_page()
    first.goto(url)  # sets the cookie
    first.wait_for_selector("body[data-ready='1']")
    first.close()
    out = {}
    # baseline: the same browser painting a one-line page (no server): what this
    # machine's load costs any page right now
    runs = []
    for _ in range(3):
        page = ctx.new_page()
        page.goto("data:text/html,<p>baseline</p>")
        wait("a paint", lambda pg=page: pg.evaluate(
            "performance.getEntriesByType('paint').length > 0"), 30)
        runs.append(page.evaluate("performance.getEntriesByType('paint')[0].startTime"))
        page.close()
    out["baseline"] = {"first_paint_ms": round(statistics.median(runs)), "loaded_ms": 0,
                       "rows": 0, "gpus": 0, "points": 0}
    for view, mark in [("cluster", "ugro-ready"), ("jobs", "ugro-ready"),
                       ("job/big", "ugro-chart")]:
        runs = []
        for _ in range(3):
            page = ctx.new_page()
            page.goto(f"{base}/#/{view}")
            # (a polling loop: wait_for_function evaluates a string, which the page's
            # Content-Security-Policy forbids)
            wait(f"the {view} view", lambda m=mark, pg=page: pg.evaluate(
                f"performance.getEntriesByName('{m}').length > 0"), 60)
            t = page.evaluate(f"""() => ({{
                paint: (performance.getEntriesByName('first-contentful-paint')[0]
                        || performance.getEntriesByName('first-paint')[0] || {{}}).startTime,
                loaded: performance.getEntriesByName('{mark}')[0].startTime,
                rows: document.querySelectorAll('tr[data-job]').length,
                gpus: document.querySelectorAll('[data-gpu]').length,
                points: (document.querySelector('#chart-main') || {{}}).uplot
                        ? document.querySelector('#chart-main').uplot.data[0].length : 0}})""")
            runs.append(t)
            page.close()
        best = min(runs, key=lambda r: r["loaded"])
        out[view] = {"first_paint_ms": round(statistics.median(r["paint"] or 0 for r in runs)),
                     "loaded_ms": round(statistics.median(r["loaded"] for r in runs)),
                     "rows": best["rows"], "gpus": best["gpus"], "points": best["points"]}
    ctx.close()
    return out


def event_latency(browser: Any, url: str, base: str, sock: Path, env: dict[str, str],
                  n: int) -> tuple[list[float], list[float]]:
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    page.goto(f"{base}/#/events")
    page.wait_for_selector("table.events")
    page.evaluate("""() => {
        window.__seen = {};
        new MutationObserver(() => {
          for (const tr of document.querySelectorAll('tr[data-seq]')) {
            window.__seen[tr.dataset.seq] ??= Date.now() / 1000;
          }
        }).observe(document.body, {subtree: true, childList: true});
    }""")
    # baseline: the same events as `ugroctl events -f` prints them (ugrod's own stream)
    import threading
    _, ping0 = api(sock, "GET", "/v1/ping")
    cli_seen: dict[int, float] = {}
    follower = subprocess.Popen([sys.executable, "-m", "ugroctl.cli", "--json", "events", "-f",
                                 "--after", str(ping0["seq"])], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            cli_seen.setdefault(json.loads(line)["seq"], time.time())
    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)
    for i in range(n):
        st, body = api(sock, "POST", f"/v1/jobs/q-{i % 50}/priority", {"priority": i % 100})
        assert st == 200, body
        time.sleep(0.05)
    _, ping = api(sock, "GET", "/v1/ping")
    _, events = api(sock, "GET", f"/v1/events?after={ping['seq'] - n - 50}")
    ours = [e for e in events if e["type"] == "job_priority_set"][-n:]
    seqs = [e["seq"] for e in ours]
    wait("the last event on the page", lambda: page.evaluate(
        f"Object.keys(window.__seen).includes('{seqs[-1]}')"), 30)
    seen = page.evaluate("window.__seen")
    wait("the last event from ugroctl events -f", lambda: seqs[-1] in cli_seen, 30)
    follower.terminate()
    follower.wait(10)
    ctx.close()
    from datetime import datetime

    def at(e: dict[str, Any]) -> float:
        return datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
    page_lat = [seen[str(e["seq"])] - at(e) for e in ours if str(e["seq"]) in seen]
    cli_lat = [cli_seen[e["seq"]] - at(e) for e in ours if e["seq"] in cli_seen]
    return page_lat, cli_lat


def idle_cpu(browser: Any, url: str, pid: int, dash_pid: int, pages: int,
             seconds: float) -> dict[str, float]:
    def window() -> tuple[float, float]:
        c0, d0, w0 = cpu_seconds(pid), cpu_seconds(dash_pid), time.monotonic()
        time.sleep(seconds)
        w = time.monotonic() - w0
        return 100 * (cpu_seconds(pid) - c0) / w, 100 * (cpu_seconds(dash_pid) - d0) / w
    base_ugrod, base_dash = window()
    ctxs = []
    for _ in range(pages):
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        ctxs.append(ctx)
    time.sleep(3)
    open_ugrod, open_dash = window()
    visible = ctxs[0].pages[0].evaluate("document.visibilityState")
    for ctx in ctxs:
        ctx.close()
    return {"no_page": base_ugrod, "pages": open_ugrod, "dash_no_page": base_dash,
            "dash_pages": open_dash, "visible": visible == "visible"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--pages", type=int, default=5)
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="ugd-", dir="/tmp"))
    cluster = dash = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        cluster = start_sshd_nodes(root / "sshd", count=args.nodes)
        try:
            sock, env = setup(root, args, cluster, procs)
        except SystemExit:
            log = root / "ugrod.log"
            print(log.read_text()[-3000:] if log.exists() else "(no ugrod log)", file=sys.stderr)
            raise
        proc = procs[0]
        print(f"set-up: {args.nodes} nodes x 8 GPUs, {args.jobs} jobs ({args.nodes} running), "
              f"a job with {args.points:,} metric points ({time.monotonic() - t0:.0f} s)")
        dash = subprocess.Popen([sys.executable, "-m", "ugroctl.cli", "dashboard", "--no-open"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, cwd=ROOT)
        assert dash.stdout is not None
        url = dash.stdout.readline().split()[2]
        base = url.split("/?")[0]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            loads = load_times(browser, url, base)
            lat, cli_lat = event_latency(browser, url, base, sock, env, args.events)
            cpu = idle_cpu(browser, url, proc.pid, dash.pid, args.pages, args.seconds)
            browser.close()
    finally:
        if dash is not None:
            dash.terminate()
            dash.wait(10)
        for child in procs:  # ugrod stops its jobs' ranks on the nodes as it ends
            if child.poll() is None:
                child.terminate()
                child.wait(60)
        if cluster is not None:
            cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    print("\n1. page loads (median of 3 fresh pages; target loaded < 1000 ms)")
    print(f"   baseline: a one-line page paints in {loads.pop('baseline')['first_paint_ms']} ms "
          f"in the same browser")
    for view, r in loads.items():
        what = {"cluster": f"{r['gpus']} GPUs drawn",
                "jobs": f"{r['rows']} rows drawn of {args.jobs} jobs, the rest behind show-all",
                "job/big": f"{args.points:,} points drawn as {r['points']}"}[view]
        print(f"   {view:8} first paint {r['first_paint_ms']:4} ms, loaded {r['loaded_ms']:4} ms "
              f"({what}) {'ok' if r['loaded_ms'] < 1000 else 'MISSED'}")
    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]
    p99 = pct(lat, 0.99)
    print(f"\n2. event recorded -> visible, {len(lat)} events: median "
          f"{1000 * statistics.median(lat):.0f} ms, p99 {1000 * p99:.0f} ms, max "
          f"{1000 * max(lat):.0f} ms (target p99 < 1000 ms) {'ok' if p99 < 1 else 'MISSED'}; "
          f"baseline `ugroctl events -f`: median {1000 * statistics.median(cli_lat):.0f} ms, "
          f"p99 {1000 * pct(cli_lat, 0.99):.0f} ms")
    extra = cpu["pages"] - cpu["no_page"]
    print(f"\n3. ugrod CPU over {args.seconds:.0f} s: no page {cpu['no_page']:.2f} %, "
          f"{args.pages} idle pages {cpu['pages']:.2f} % of a core -> the pages add "
          f"{extra:.2f} % (target < 1 %) {'ok' if extra < 1 else 'MISSED'}; "
          f"the dashboard process: {cpu['dash_no_page']:.2f} % -> {cpu['dash_pages']:.2f} % "
          f"(pages visible: {cpu['visible']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
