"""`ugroctl dashboard` in a real browser (Debian's chromium, driven by Playwright).

A real ugrod (the built-in one-node cluster, two fake GPUs from the stand-in
nvidia-smi) runs real jobs submitted with the real `ugroctl`; the dashboard is
the real `ugroctl dashboard` subprocess. A second user's page reaches ugrod
through tests/peer_relay.py running as the local user ``ugro-other`` (ugrod
identifies callers by SO_PEERCRED, so every request of that page is ugro-other's).

Screenshots of each view land in tests/artifacts/dashboard/ for a person to look at.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import ROOT, Ugrod, served, ugroctl_argv
from tests.integration.test_remote import ssh_wrapper
from tests.sshd_nodes import SshdCluster

pytestmark = pytest.mark.timeout(240)

ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
FAKE_DIR = ROOT / "tests" / "fake_nvidia_smi"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OTHER_USER = "ugro-other"

PWNED = "window.__pwned"
HOSTILE = "<img src=x onerror=\"window.__pwned='{}'\">"

# A training job: hostile text in its log and a metric name, ANSI colours, 20 metric
# points, then waits for a gate file (logs keep following) and then runs until cancelled.
JOB = r'''
import json, os, sys, time
gate, n = sys.argv[1], int(sys.argv[2])
print("\x1b[31mred alert\x1b[0m <script>window.__pwned='log-script'</script> "
      + %(hostile_log)r, flush=True)
with open(os.environ["UGRO_METRICS_FILE"], "a") as f:
    for i in range(n):
        f.write(json.dumps({"step": i, "loss": round(3.0 / (i + 1), 6),
                            %(hostile_metric)r: i * 0.5, "ts": time.time()}) + "\n")
        f.flush()
        print("step", i, flush=True)
while not os.path.exists(gate):
    time.sleep(0.05)
print("after the gate: LIVE-MARKER", flush=True)
while True:
    time.sleep(0.2)
'''


# A sweep's trial: three points ending at the loss its parameter says.
SWEEP_TRIAL = """
import json, os
with open(os.environ["UGRO_METRICS_FILE"], "a") as f:
    for step in range(3):
        f.write(json.dumps({"step": step, "loss": float(os.environ["LOSS"]) + 2 - step}) + "\\n")
"""


class GpuUgrod(Ugrod):
    """ugrod on the built-in cluster whose nvidia-smi is the stand-in with two GPUs."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["PATH"] = f"{FAKE_DIR}:{env.get('PATH', '')}"
        env["FAKE_NVIDIA_SMI_STATE"] = str(self.base / "gpus.json")
        return env


@pytest.fixture
def gpu_ugrod(short_tmp: Path) -> Iterator[GpuUgrod]:
    (short_tmp / "gpus.json").write_text((FAKE_DIR / "scenarios" / "two_gpus.json").read_text())
    with served(GpuUgrod(short_tmp)) as d:
        yield d


class Dash:
    """A running `ugroctl dashboard --no-open`: its URL, port and token."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url
        self.port = int(url.split(":")[2].split("/")[0])
        self.token = url.split("token=")[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_dashboard(env: dict[str, str], *extra: str) -> Dash:
    proc = subprocess.Popen([*ugroctl_argv(), *extra, "dashboard", "--no-open"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first line is the address, once it listens
    if not line.startswith("ugroctl dashboard: http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"no address from ugroctl dashboard: {line!r} "
                             f"{proc.stderr.read() if proc.stderr else ''}")
    return Dash(proc, line.split()[2])


@pytest.fixture
def dash(gpu_ugrod: GpuUgrod) -> Iterator[Dash]:
    d = start_dashboard(gpu_ugrod.env)
    try:
        yield d
    finally:
        assert d.stop() == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


def open_page(browser: Browser, d: Dash, **ctx: Any) -> tuple[Page, Console]:
    page = browser.new_context(**ctx).new_page()
    console = Console(page)
    page.goto(d.url)
    page.wait_for_selector("body[data-ready='1']", timeout=15000)
    return page, console


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def request(d: Dash, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        hdrs = {"Host": f"127.0.0.1:{d.port}", **(headers or {})}
        if body is not None:
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def wait_for(what: str, pred: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the door: token, Host, Origin ------------------------------------------------------


def test_token_host_and_origin_are_checked(gpu_ugrod: GpuUgrod, dash: Dash,
                                           browser: Browser) -> None:
    d = dash
    cookie = f"ugro_dashboard_{d.port}={d.token}"
    ok = {"Cookie": cookie}
    # the first address sets the cookie and sends the browser to the bare address
    status, headers, _ = request(d, "GET", f"/?token={d.token}")
    assert status == 303 and headers["Location"] == "/", headers
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert request(d, "GET", "/", ok)[0] == 200
    assert request(d, "GET", "/api/v1/nodes", ok)[0] == 200
    refused = [
        ("no token", "GET", "/", {}),
        ("a wrong token", "GET", "/?token=" + "x" * len(d.token), {}),
        ("a wrong cookie", "GET", "/api/v1/nodes", {"Cookie": cookie[:-2] + "zz"}),
        ("no token, API", "GET", "/api/v1/jobs", {}),
        ("no token, events", "GET", "/api/stream", {}),
        ("no token, files", "GET", "/static/app.js", {}),
        # DNS rebinding: the browser would send the attacker's name as Host
        ("a foreign Host", "GET", "/api/v1/nodes",
         {**ok, "Host": f"evil.example:{d.port}"}),
        ("another port in Host", "GET", "/api/v1/nodes", {**ok, "Host": "127.0.0.1:1"}),
        # CSRF: another site's script or form (the browser names its Origin)
        ("a foreign Origin", "GET", "/api/v1/nodes", {**ok, "Origin": "http://evil.example"}),
        ("a foreign Origin, POST", "POST", "/api/v1/jobs/x/cancel",
         {**ok, "Origin": "http://evil.example", "X-Ugro-Dashboard": "1"}),
        ("a POST without Origin", "POST", "/api/v1/jobs/x/cancel",
         {**ok, "X-Ugro-Dashboard": "1"}),
        ("a POST without the page's header", "POST", "/api/v1/jobs/x/cancel",
         {**ok, "Origin": d.base}),
    ]
    for why, method, path, hdrs in refused:
        status, _, body = request(d, method, path, hdrs, b"{}" if method == "POST" else None)
        assert status == 403, (why, status, body)
    # only the page's routes are relayed: no submit, no node or daemon operations
    page_post = {**ok, "Origin": d.base, "X-Ugro-Dashboard": "1",
                 "Content-Type": "application/json"}
    for method, path in [("POST", "/api/v1/jobs"), ("POST", "/api/v1/nodes/local/drain"),
                         ("POST", "/api/v1/reload"), ("GET", "/api/v1/jobs/../reload"),
                         ("GET", "/api/v1/nodes/local/hostkey"),
                         ("POST", "/api/v1/jobs/%2e%2e/cancel"), ("GET", "/api/v1/jobs/%2E%2e"),
                         ("GET", "/static/../server.py"),
                         ("GET", "/static/%2e%2e/server.py")]:
        status, _, body = request(d, method, path, page_post, b"{}" if method == "POST" else None)
        assert status == 404, (method, path, status, body)
    # security headers on the page
    _, headers, _ = request(d, "GET", "/", ok)
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    # a port already taken: one line, usage exit code
    busy = subprocess.run([*ugroctl_argv(), "dashboard", "--no-open", "--port", str(d.port)],
                          env=gpu_ugrod.env, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{d.port}" in busy.stderr, busy

    # in the browser: the bare address is refused; the printed one loads, and the
    # token is gone from the address bar
    ctx = browser.new_context()
    page = ctx.new_page()
    resp = page.goto(d.base + "/")
    assert resp is not None and resp.status == 403
    assert "token" in page.inner_text("body")
    page.goto(d.url)
    page.wait_for_selector("body[data-ready='1']")
    assert "token" not in page.url and page.url.startswith(d.base)
    ctx.close()


# ---- the page, live, with a real job ------------------------------------------------------


def test_cluster_jobs_curves_logs_actions_and_injection(gpu_ugrod: GpuUgrod, dash: Dash,
                                                        browser: Browser,
                                                        short_tmp: Path) -> None:
    d = gpu_ugrod
    page, console = open_page(browser, dash, viewport={"width": 1280, "height": 900})

    # the topology map: the node and its two fake GPUs, with the stand-in's readings
    card = page.wait_for_selector("article.node[data-node='local']")
    assert card is not None
    wait_for("GPU readings", lambda: "98%" in page.inner_text("[data-gpu='local/0']"), 15)
    gpu0 = page.inner_text("[data-gpu='local/0']")
    gpu1 = page.inner_text("[data-gpu='local/1']")
    assert "RTX 3060" in gpu0 and "12 GiB" in gpu0 and "71°C" in gpu0, gpu0
    assert "RTX 4060" in gpu1 and "34°C" in gpu1 and "idle" in gpu1, gpu1
    assert "0/2" not in page.inner_text("#total-gpus")

    # a job name that is HTML is refused by ugrod, with one line
    bad = d.ctl("submit", "--name", HOSTILE.format("name"), "--", "true")
    assert bad.returncode != 0 and "invalid job name" in bad.stderr, bad.stderr

    # a job submitted from the CLI appears within 1 s of its event being recorded
    page.goto(dash.base + "/#/jobs")
    page.wait_for_selector("#job-tables")
    page.evaluate("""() => {
        window.__seen = {};
        new MutationObserver(() => {
          for (const tr of document.querySelectorAll('tr[data-job]')) {
            window.__seen[tr.dataset.job] ??= Date.now() / 1000;
          }
        }).observe(document.body, {subtree: true, childList: true});
    }""")
    script = short_tmp / "job.py"
    script.write_text(JOB % {"hostile_log": HOSTILE.format("log"),
                             "hostile_metric": HOSTILE.format("metric")})
    gate = short_tmp / "gate"
    d.ctl("submit", "--name", "web1", "--gpus-per-node", "1", "--", str(script), str(gate),
          "20", HOSTILE.format("argv"), check=True)
    submitted = _submitted_event(d, "web1")
    seen = wait_for("the job's row", lambda: page.evaluate("window.__seen['web1']"), 10)
    latency = seen - _epoch(submitted["ts"])
    assert latency < 1.0, f"the job appeared {latency:.2f} s after it was recorded"

    # running on one of the fake GPUs, shown on the map
    job = d.wait_job("web1", ("running",), timeout_s=60)
    place = job["gpus"][0]
    page.goto(dash.base + "/#/cluster")
    chip = f"[data-gpu='local/{place['gpus'][0]}'] a.job-chip"
    page.wait_for_selector(chip, timeout=10000)
    assert page.inner_text(chip) == "web1 · rank 0"
    shot(page, "cluster")

    # the job view: the curve's points are exactly metrics.jsonl's
    metrics = d.state_dir / "jobs" / "web1" / "metrics.jsonl"
    wait_for("20 metric lines", lambda: metrics.exists()
             and len(metrics.read_text().splitlines()) >= 20, 30)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    page.goto(dash.base + "/#/job/web1")
    page.wait_for_selector("#chart-main .uplot", timeout=15000)

    def chart_data() -> Any:
        data = page.evaluate("document.querySelector('#chart-main').uplot.data")
        return data if data and len(data[0]) >= 20 else None
    data = wait_for("the loss curve", chart_data, 15)
    assert data[0] == [r["step"] for r in rows]
    assert data[1] == [r["loss"] for r in rows]

    # logs: the tail, ANSI rendered as colour (no escape bytes), then followed live
    wait_for("the log tail", lambda: "step 19" in page.inner_text("#logs"), 15)
    logs_text = page.inner_text("#logs")
    assert "\x1b" not in logs_text and "[31m" not in logs_text
    assert page.inner_text("#logs .a-f31") == "red alert"
    assert "LIVE-MARKER" not in logs_text
    gate.write_text("")
    wait_for("a line written after the page opened",
             lambda: "LIVE-MARKER" in page.inner_text("#logs"), 15)

    # hostile text is shown as text: in the log, the metric picker, the command
    assert "<script>window.__pwned='log-script'</script>" in page.inner_text("#logs")
    assert HOSTILE.format("log") in page.inner_text("#logs")
    assert HOSTILE.format("metric") in page.inner_text("#metric-picker")
    assert shlex.quote(HOSTILE.format("argv")) in page.inner_text("#command")
    # draw the hostile metric too
    page.locator("#metric-picker label", has_text=HOSTILE.format("metric")).locator(
        "input").click()
    page.wait_for_timeout(200)
    assert page.evaluate(PWNED) is None
    assert page.evaluate("document.querySelectorAll('img, script:not([src])').length") == 0
    page.click("#theme")  # the other theme
    shot(page, "job")
    page.click("#theme")

    # another user's page cannot cancel it: ugrod's owner check, its own message
    other = _other_user_dashboard(d, short_tmp)
    try:
        opage, oconsole = open_page(browser, other, viewport={"width": 390, "height": 844})
        opage.goto(other.base + "/#/job/web1")
        opage.wait_for_selector("button[data-action='cancel']", timeout=15000)
        opage.click("button[data-action='cancel']")
        opage.click("#confirm-ok")
        toast = wait_for("the refusal", lambda: opage.inner_text("#toast")
                         if opage.is_visible("#toast") else None, 15)
        assert "cancel refused" in toast and "only root (the owner)" in toast, toast
        shot(opage, "job-other-user-phone")
        assert d.wait_job("web1", ("running",), timeout_s=5)["state"] == "running"
        assert [e for e in oconsole.errors if "403" not in e] == [], oconsole.errors
    finally:
        other.stop()

    # priority from the page: asked for in the confirmation, recorded by ugrod
    page.click("button[data-action='priority']")
    page.fill("#confirm-input", "7")
    page.click("#confirm-ok")
    wait_for("the priority answer", lambda: page.is_visible("#toast")
             and page.inner_text("#toast").startswith("priority: job web1 is running"), 15)
    assert d.api("GET", "/v1/jobs/web1")[1]["job"]["priority"] == 7
    # a confirmation answered "Back" does nothing
    page.click("button[data-action='cancel']")
    page.click("#confirm button[value='cancel']")
    assert d.api("GET", "/v1/jobs/web1")[1]["job"]["state"] == "running"

    # the owner's page cancels it, after a confirmation, answered with the API's state
    page.click("button[data-action='cancel']")
    assert "Cancel job web1?" in page.inner_text("#confirm-text")
    page.click("#confirm-ok")
    toast = wait_for("the answer", lambda: page.inner_text("#toast")
                     if page.inner_text("#toast").startswith("cancel") else None, 15)
    assert toast.startswith("cancel: job web1 is"), toast
    assert d.wait_job("web1", ("cancelled",), timeout_s=60)["state"] == "cancelled"
    page.wait_for_selector("#job-head .badge.s-cancelled", timeout=10000)

    # the other views, and the live event list
    page.goto(dash.base + "/#/jobs")
    page.wait_for_selector("table.jobs.recent tr[data-job='web1']")
    shot(page, "jobs")
    page.goto(dash.base + "/#/events")
    page.wait_for_selector("table.events td code")
    assert "job_ended" in page.inner_text("table.events")
    shot(page, "events")

    # a sweep: trials ranked by loss, a hostile parameter value shown as text, and
    # their curves overlaid
    trial = short_tmp / "trial.py"
    trial.write_text(SWEEP_TRIAL)
    d.ctl("sweep", "--name", "sw", "--param", "LOSS=0.7,0.2,0.5", "--param",
          f"TAG={HOSTILE.format('param')}", "--", sys.executable, str(trial), check=True)
    for t in ("sw-0", "sw-1", "sw-2"):
        ended = d.wait_job(t, timeout_s=60)
        assert ended["state"] == "succeeded", ended["reason"]
    page.goto(dash.base + "/#/sweeps")
    page.wait_for_selector("section.sweep[data-sweep='sw'] table.trials tbody tr")
    wait_for("the trials ranked", lambda: page.eval_on_selector_all(
        "section.sweep[data-sweep='sw'] tbody tr td:nth-child(2)",
        "tds => tds.map(td => td.textContent)") == ["sw-1", "sw-2", "sw-0"], 15)
    assert HOSTILE.format("param") in page.inner_text("section.sweep[data-sweep='sw']")
    shot(page, "sweeps")
    page.click("section.sweep[data-sweep='sw'] a.button")
    wait_for("three curves overlaid", lambda: page.evaluate(
        "(document.querySelector('#chart-main') || {}).uplot?.series.length") == 4, 15)
    labels = page.evaluate(
        "document.querySelector('#chart-main').uplot.series.map(s => s.label)")
    assert labels[1:] == ["sw-1: loss", "sw-2: loss", "sw-0: loss"], labels
    shot(page, "sweep-overlay")

    # a drained node is marked with its reason (text from a person: shown as text)
    d.ctl("drain", "local", "--reason", HOSTILE.format("drain"), check=True)
    page.goto(dash.base + "/#/cluster")
    wait_for("the drain mark", lambda: "drained: " + HOSTILE.format("drain")
             in page.inner_text("article.node[data-node='local']"), 15)
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "cluster-drained-phone")
    assert page.evaluate(PWNED) is None
    assert console.errors == [], console.errors


def _submitted_event(d: Ugrod, job: str) -> dict[str, Any]:
    status, body = d.api("GET", f"/v1/events?job={job}")
    assert status == 200, body
    events = [json.loads(line) for line in body.splitlines() if line.strip()]
    return next(e for e in events if e["type"] == "job_submitted")


def _epoch(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _other_user_dashboard(d: Ugrod, base: Path) -> Dash:
    """A dashboard whose requests reach ugrod as ugro-other (through the relay)."""
    other = pwd.getpwnam(OTHER_USER)
    # what an admin does for a second user: the socket's group, a way to its directory
    os.chmod(base, 0o711)
    os.chown(d.socket, -1, other.pw_gid)
    relay_dir = base / "other"
    relay_dir.mkdir(mode=0o700)
    os.chown(relay_dir, other.pw_uid, other.pw_gid)
    relay_sock = relay_dir / "s"
    relay = subprocess.Popen(["/usr/bin/python3", str(ROOT / "tests" / "peer_relay.py"),
                              str(relay_sock), str(d.socket)], user=other.pw_uid,
                             group=other.pw_gid, extra_groups=[], stdout=subprocess.PIPE,
                             text=True, env={"PATH": "/usr/bin:/bin"})
    assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
    env = dict(d.env, UGRO_SOCKET=str(relay_sock))
    dash = start_dashboard(env)
    stop = dash.stop

    def stop_both() -> int:
        code = stop()
        relay.kill()
        relay.wait()
        return code
    dash.stop = stop_both  # type: ignore[method-assign]
    return dash


# ---- from a laptop: --host through ssh ----------------------------------------------------


def test_dashboard_through_ssh_host(ugrod: Ugrod, short_tmp: Path,
                                    ssh_nodes: SshdCluster) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("UGRO_SOCKET", "UGRO_HOST")}
    env["UGRO_SSH"] = str(ssh_wrapper(short_tmp, ssh_nodes))
    d = start_dashboard(env, "--host", "head", "--remote-socket", str(ugrod.socket))
    try:
        ok = {"Cookie": f"ugro_dashboard_{d.port}={d.token}"}
        status, _, body = request(d, "GET", "/api/v1/ping", ok)
        assert status == 200 and json.loads(body)["ok"] is True, body
        ugrod.ctl("submit", "--name", "remote1", "--hold", "--", "true", check=True)
        status, _, body = request(d, "GET", "/api/v1/jobs/remote1", ok)
        assert status == 200 and json.loads(body)["job"]["owner"] == "root", body
        # the page's actions reach ugrod as the ssh login's user (SO_PEERCRED on the head)
        post = {**ok, "Origin": d.base, "X-Ugro-Dashboard": "1",
                "Content-Type": "application/json"}
        status, _, body = request(d, "POST", "/api/v1/jobs/remote1/release", post, b"{}")
        assert status == 200 and json.loads(body)["job"]["held"] is False, body
        events = ugrod.api("GET", "/v1/events?job=remote1")[1].splitlines()
        released = [json.loads(e) for e in events if b"job_released" in e]
        assert released and released[0]["actor"]["user"] == ssh_nodes[1].user, released
    finally:
        assert d.stop() == 0
    # a head that does not answer: exit 3 and one line, no server left behind
    env["UGRO_SSH"] = "/bin/false"
    res = subprocess.run([*ugroctl_argv(), "--host", "head", "dashboard", "--no-open"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and res.stderr.startswith("ugroctl: cannot reach ugrod"), \
        (res.returncode, res.stderr)
    assert "http://" not in res.stdout
