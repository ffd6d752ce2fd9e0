"""Day one, the Slurm habits and the paper cuts: the real ugrod (a subprocess) and the real
ugroctl, as a user would drive them.

--time cancels a job (also across a restart), --after/--after-any/--after-failed,
sinfo-like GPU counts in `nodes`, `sweep list`, bulk cancel/hold/release/priority by
filter in one request, unique names under concurrent unnamed submits, followers
that end when their client goes or ugrod stops, the socket from the config, and the
paper cuts (user words, requeued views, bounded notes, --check-config).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Ugrod, _kill_leftovers, ugroctl_argv

PY = sys.executable
pytestmark = pytest.mark.timeout(120)


def until(what: str, check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def events_of(d: Ugrod, job: str | None = None) -> list[dict[str, Any]]:
    doc = d.ctl_json("events", *(["--job", job] if job else []))
    return list(doc["events"])


# ---- names under concurrency ------------------------------------------------------------


def test_unnamed_submits_from_eight_clients_are_all_accepted_with_unique_names(
        ugrod: Ugrod) -> None:
    """Today's bug: 8 clients, 444 of 500 refused with 409 (two picked one job-N)."""
    answers: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(25):
            got = ugrod.api("POST", "/v1/jobs", {"argv": ["true"], "held": True})
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [s for s, _ in answers] == [201] * 200, [b for s, b in answers if s != 201][:3]
    names = [b["job"]["id"] for _, b in answers]
    assert len(set(names)) == 200 and all(n.startswith("job-") for n in names)

    # one request sent by 8 clients at once (a retry racing its original): one job
    twins: list[tuple[int, Any]] = []

    def twin() -> None:
        got = ugrod.api("POST", "/v1/jobs", {"argv": ["true"], "held": True,
                                             "request_id": "same-request"})
        with lock:
            twins.append(got)

    threads = [threading.Thread(target=twin) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(s for s, _ in twins) == [200] * 7 + [201]
    assert len({b["job"]["id"] for _, b in twins}) == 1
    assert len(ugrod.api("GET", "/v1/jobs?all=1")[1]["jobs"]) == 201


# ---- followers -----------------------------------------------------------------------------


def _followers(d: Ugrod) -> list[subprocess.Popen[bytes]]:
    argvs = [["events", "-f"], ["logs", "s1", "-f"], ["submit", "--wait", "--", "sleep", "300"]]
    return [subprocess.Popen([*ugroctl_argv(), *a], env=d.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE) for a in argvs]


def _streams(d: Ugrod) -> int:
    return int(d.api("GET", "/v1/ping")[1]["streams"])


def test_followers_end_when_their_client_goes_and_sigterm_stops_ugrod_at_once(
        short_tmp: Path) -> None:
    d = Ugrod(short_tmp)
    d.start()
    clients: list[subprocess.Popen[bytes]] = []
    try:
        d.ctl("submit", "--name", "s1", "--", PY, "-c",
              "import time; print('up', flush=True); time.sleep(300)", check=True)
        d.wait_job("s1", ("running",))
        clients = _followers(d)
        until("three followers served", lambda: _streams(d) == 3)
        for c in clients:  # the clients go away without a word (kill -9, a closed laptop)
            c.kill()
            c.wait()
        until("their handlers to end", lambda: _streams(d) == 0, timeout_s=5)

        clients = _followers(d)
        until("three followers again", lambda: _streams(d) == 3)
        t0 = time.monotonic()
        code = d.stop(signal.SIGTERM, timeout_s=10)
        took = time.monotonic() - t0
        assert code == 0 and took < 2.0, f"SIGTERM took {took:.2f} s"
        assert "Traceback" not in d.log() and "Error handling request" not in d.log(), d.log()
        for c in clients:  # each follower sees its stream end, none hangs
            c.wait(10)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        _kill_leftovers(d.state_dir)


# ---- --time ----------------------------------------------------------------------------------


def test_time_limit_cancels_a_sleeping_job_with_the_reason_even_across_a_restart(
        short_tmp: Path) -> None:
    d = Ugrod(short_tmp)
    d.start()
    try:
        res = d.ctl("submit", "--time", "soon", "--", "sleep", "1")
        assert res.returncode == 1 and "time limit 'soon'" in res.stderr
        assert "1:30:00" in res.stderr  # says which forms work
        d.ctl("submit", "--name", "t1", "--time", "3s", "--", "sleep", "300", check=True)
        d.wait_job("t1", ("running",))
        # The limit is in the job's submit event: a restart keeps it, and enforces it.
        assert d.stop() == 0
        d.start()
        t1 = d.wait_job("t1", timeout_s=30)
        assert t1["state"] == "cancelled"
        assert t1["reason"] == "time limit: ran past its --time of 0:00:03"
        started = events_of(d, "t1")
        placed = next(e["ts"] for e in started if e["type"] == "job_placed")
        from ugroctl.render import parse_time
        assert parse_time(t1["ended_at"]) - parse_time(placed) >= 3  # type: ignore[operator]
        why = d.ctl("why", "t1", check=True).stdout
        assert "time limit 0:00:03" in why and "time limit: ran past" in why
        # and the live path: a job placed by this ugrod, Slurm's M:S form
        d.ctl("submit", "--name", "t2", "--time", "0:02", "--", "sleep", "300", check=True)
        assert d.wait_job("t2", ("running",))["time_limit"] == "0:00:02"
        t2 = d.wait_job("t2", timeout_s=20)
        assert t2["state"] == "cancelled" and "time limit" in t2["reason"]
        assert "time limit" in d.ctl("status", check=True).stdout
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        _kill_leftovers(d.state_dir)


# ---- dependencies, user words, requeued views, bounded notes -------------------------------


def test_dependencies_are_refused_with_the_reason_or_honoured(ugrod: Ugrod) -> None:
    d = ugrod
    d.ctl("submit", "--name", "bad", "--", "false", check=True)
    d.ctl("submit", "--name", "ok", "--", "true", check=True)
    assert d.wait_job("bad")["state"] == "failed" and d.wait_job("ok")["state"] == "succeeded"
    before = len(d.ctl_json("status", "--all")["jobs"])

    res = d.ctl("submit", "--after", "bad", "--", "true")
    assert res.returncode == 1 and "submitted" not in res.stdout
    assert "--after bad: bad already failed" in res.stderr and "--after-any" in res.stderr
    res = d.ctl("submit", "--after-failed", "ok", "--", "true")
    assert res.returncode == 1 and "ok already succeeded" in res.stderr
    res = d.ctl("submit", "--after-any", "nope", "--", "true")
    assert res.returncode == 1 and "--after-any nope: no such job" in res.stderr
    assert len(d.ctl_json("status", "--all")["jobs"]) == before  # nothing was recorded

    d.ctl("submit", "--name", "af", "--after-failed", "bad", "--", "true", check=True)
    d.ctl("submit", "--name", "aa", "--after-any", "bad", "--after", "ok", "--", "true",
          check=True)
    d.ctl("submit", "--name", "h", "--hold", "--", "true", check=True)
    d.ctl("submit", "--name", "w", "--after-any", "h", "--", "true", check=True)
    d.ctl("submit", "--name", "w2", "--after-failed", "h", "--", "true", check=True)
    assert d.wait_job("af")["state"] == "succeeded" and d.wait_job("aa")["state"] == "succeeded"
    until("w's reason", lambda: d.ctl_json("status", "w")["waiting_reason"]
          == "waiting for h to end (h is queued)")
    d.ctl("release", "h", check=True)
    assert d.wait_job("h")["state"] == "succeeded"
    assert d.wait_job("w")["state"] == "succeeded"
    assert "after any end of h" in d.ctl("why", "w", check=True).stdout
    w2 = d.wait_job("w2")
    assert w2["state"] == "cancelled" and "h succeeded (--after-failed)" in w2["reason"]

    # An internal event name never reaches the user: refusals are in their words.
    res = d.ctl("priority", "ok", "5")
    assert res.returncode == 1 and "job_priority_set" not in res.stderr
    assert "job ok already succeeded: only waiting or running jobs have a priority" in res.stderr


def test_a_requeued_job_does_not_show_the_previous_attempt_as_current(ugrod: Ugrod) -> None:
    d = ugrod
    status, body = d.api("POST", "/v1/jobs", {
        "name": "rq", "max_retries": 1, "retry_backoff_s": 600, "argv": [
            PY, "-c", "import json,os,sys; open(os.environ['UGRO_METRICS_FILE'],'a').write("
                      "json.dumps({'step': 7, 'loss': 1.5})+'\\n'); sys.exit('E' * 300)"]})
    assert status == 201, body
    job = d.wait_job("rq", ("retrying",))
    assert job["nodes"] == [] and job["ranks"] == [] and job["metrics"] == {}
    assert job["started_at"] is None and job["rendezvous"] is None
    assert job["last_attempt"]["attempt"] == 1 and job["last_attempt"]["exit_code"] == 1
    text = d.ctl("status", "rq", check=True).stdout
    assert "RANK" not in text and "placed:" not in text and "step:" not in text
    assert "last try:" in text and "attempt 1 on" in text
    # and the NOTE column of `status` is bounded: a 300-character reason fits 80 columns
    wide = subprocess.run([*ugroctl_argv(), "status"], env={**d.env, "COLUMNS": "80"},
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert all(len(line) <= 80 for line in wide.splitlines()), wide
    assert "…" in wide


# ---- bulk actions and sweeps ---------------------------------------------------------------


def test_bulk_cancel_hold_release_priority_by_filter_in_one_request(ugrod: Ugrod) -> None:
    d = ugrod
    for q in ("q1", "q2", "q3", "q4"):
        d.ctl("submit", "--name", q, "--hold", "--", "true", check=True)
    d.ctl("submit", "--name", "r1", "--", "sleep", "300", check=True)
    d.ctl("sweep", "--name", "sw", "--param", "x=1,2", "--", PY, "-c",
          "import time; time.sleep(300)", check=True)  # a trial gets --x N appended
    d.wait_job("r1", ("running",))

    doc = d.ctl_json("priority", "--state", "queued", "7")
    assert sorted(j["id"] for j in doc["jobs"]) == ["q1", "q2", "q3", "q4"]
    assert {j["priority"] for j in doc["jobs"]} == {7} and doc["refused"] == []
    res = d.ctl("release", "q3", "q4", "--json")
    assert res.returncode == 0 and len(json.loads(res.stdout)["jobs"]) == 2
    res = d.ctl("hold", "--state", "queued")  # q1 and q2 are held already
    assert res.returncode == 1 and "job q1 is already held" in res.stderr
    assert d.wait_job("q4")["state"] == "succeeded"

    seq = d.api("GET", "/v1/ping")[1]["seq"]
    doc = d.ctl_json("cancel", "--state", "queued")
    assert sorted(j["id"] for j in doc["jobs"]) == ["q1", "q2"]
    batch = [e for e in d.ctl_json("events", "--after", str(seq))["events"]
             if e["type"] == "job_cancel_requested"]
    # one request, one atomic batch: consecutive seqs, one commit time
    assert [e["seq"] for e in batch] == [seq + 1, seq + 2]
    assert len({e["ts"] for e in batch}) == 1

    res = d.ctl("cancel", "--sweep", "sw")
    assert res.returncode == 0, res.stderr
    assert "sw-0: stopping" in res.stdout and "cancelled 2 jobs" in res.stderr
    res = d.ctl("cancel", "r1", "q1", "nosuch")
    assert res.returncode == 4  # the worst refusal: not found
    assert "r1: stopping" in res.stdout
    assert "ugroctl: q1: job q1 already cancelled" in res.stderr
    assert "ugroctl: nosuch: no job named 'nosuch'" in res.stderr
    assert d.wait_job("r1")["state"] == "cancelled"
    for t in ("sw-0", "sw-1"):
        assert d.wait_job(t)["state"] == "cancelled"
    res = d.ctl("cancel", "--state", "queued")
    assert res.returncode == 0 and "no job matches" in res.stderr

    sweeps = d.ctl_json("sweep", "list")["sweeps"]
    assert [(w["name"], w["trials"], w["states"]) for w in sweeps] == [
        ("sw", 2, {"cancelled": 2})]
    assert "2 cancelled" in d.ctl("sweep", "list", check=True).stdout


# ---- nodes: sinfo's free/total --------------------------------------------------------------


class FakeGpuUgrod(Ugrod):
    """The built-in one-node cluster, with a fake nvidia-smi reporting two GPUs."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["PATH"] = f"{self.base / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["FAKE_NVIDIA_SMI_STATE"] = str(self.base / "bin" / "state.json")
        return env


def test_nodes_shows_free_and_total_gpus_per_node_and_for_the_cluster(short_tmp: Path) -> None:
    fake = ROOT / "tests" / "fake_nvidia_smi"
    (short_tmp / "bin").mkdir()
    shutil.copy(fake / "nvidia-smi", short_tmp / "bin" / "nvidia-smi")
    shutil.copy(fake / "scenarios" / "two_gpus.json", short_tmp / "bin" / "state.json")
    d = FakeGpuUgrod(short_tmp)
    d.start()
    try:
        until("two GPUs found", lambda: d.ctl_json("nodes")["cluster"]["gpus_total"] == 2)
        d.ctl("submit", "--name", "g", "--gpus-per-node", "1", "--no-torchrun", "--",
              "sleep", "300", check=True)
        d.wait_job("g", ("running",))
        doc = d.ctl_json("nodes")
        node = doc["nodes"][0]
        assert (node["gpus_free"], node["gpus_used"], node["gpus_total"]) == (1, 1, 2)
        assert doc["cluster"] == {"nodes": 1, "nodes_schedulable": 1, "gpus_total": 2,
                                  "gpus_used": 1, "gpus_free": 1, "gpus_unavailable": 0}
        text = d.ctl("nodes", check=True).stdout
        assert " 1/2 " in text
        assert "cluster: 1 of 1 node taking work; GPUs 1 free of 2, 1 in use" in text
        d.ctl("drain", node["name"], check=True)
        assert d.ctl_json("nodes")["cluster"]["gpus_unavailable"] == 1
        d.ctl("cancel", "g", check=True)
        d.wait_job("g")
    finally:
        d.stop()
        _kill_leftovers(d.state_dir)


# ---- finding ugrod, checking the config ------------------------------------------------------


def test_ugroctl_uses_cluster_socket_from_the_config_and_says_how_to_point_it(
        ugrod: Ugrod, short_tmp: Path) -> None:
    cfg = short_tmp / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"cluster": {"socket": str(ugrod.socket)}}))
    env = {k: v for k, v in ugrod.env.items() if k != "UGRO_SOCKET"}
    res = subprocess.run([*ugroctl_argv(), "status"], env={**env, "UGRO_CONFIG": str(cfg)},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*ugroctl_argv(), "--config", str(cfg), "--json", "nodes"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and json.loads(res.stdout)["nodes"], res.stderr

    elsewhere = short_tmp / "other.yaml"
    elsewhere.write_text(yaml.safe_dump({"cluster": {"socket": str(short_tmp / "no.sock")}}))
    res = subprocess.run([*ugroctl_argv(), "--config", str(elsewhere), "status"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 3
    assert f"(cluster.socket in {elsewhere})" in res.stderr
    assert "--socket PATH" in res.stderr and "UGRO_SOCKET" in res.stderr


def test_check_config_fails_on_a_missing_identity_file(short_tmp: Path) -> None:
    cfg = short_tmp / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": {
        "gpu1": {"ip": "10.0.0.2", "transport": "ssh", "identity_file": "keys/gone"}}}))
    res = subprocess.run([PY, "-m", "ugrod.cli", "--check-config", str(cfg)],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1
    assert (f"{cfg}: nodes.gpu1.identity_file: no such file: "
            f"{short_tmp / 'keys' / 'gone'}") in res.stderr
    (short_tmp / "keys").mkdir()
    (short_tmp / "keys" / "gone").write_text("key\n")
    res = subprocess.run([PY, "-m", "ugrod.cli", "--check-config", str(cfg)],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
