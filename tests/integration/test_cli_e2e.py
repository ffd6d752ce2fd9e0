"""The real ugroctl (a subprocess) against a real ugrod: every core verb, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Ugrod, ugroctl_argv

PY = sys.executable
JOB_KEYS = {"id", "name", "state", "owner", "nodes", "exit_code", "submitted_at"}


def test_submit_status_logs_results_events_as_json(ugrod: Ugrod) -> None:
    job = ugrod.ctl_json("submit", "--name", "c1", "--", PY, "-c",
                         "import json,os; print('out'); "
                         "open(os.environ['UGRO_METRICS_FILE'],'a').write("
                         "json.dumps({'step': 1, 'loss': 2.5})+'\\n')")
    assert JOB_KEYS <= set(job) and job["name"] == "c1"
    assert ugrod.wait_job("c1")["state"] == "succeeded"
    status = ugrod.ctl_json("status", "c1")
    assert status["state"] == "succeeded" and status["exit_code"] == 0
    listing = ugrod.ctl_json("status")
    assert any(j["id"] == "c1" for j in listing["jobs"]) if isinstance(listing, dict) else \
        any(j["id"] == "c1" for j in listing)
    assert ugrod.ctl("logs", "c1", check=True).stdout == "out\n"
    results = ugrod.ctl_json("results", "c1")
    assert results["summary"]["final_loss"] == 2.5 and results["summary"]["steps"] == 1
    events = ugrod.ctl_json("events", "--job", "c1")
    kinds = [e["type"] for e in (events["events"] if isinstance(events, dict) else events)]
    assert kinds[0] == "job_submitted" and kinds[-1] == "job_ended"
    table = ugrod.ctl("status", check=True).stdout
    assert "c1" in table and "succeeded" in table


def test_cancel_and_why(ugrod: Ugrod) -> None:
    ugrod.ctl("submit", "--name", "long", "--", "sleep", "300", check=True)
    ugrod.wait_job("long", ("running",))
    res = ugrod.ctl("cancel", "long")
    assert res.returncode == 0, res.stderr
    assert ugrod.wait_job("long")["state"] == "cancelled"
    why = ugrod.ctl("why", "long", check=True).stdout
    assert "submitted by" in why and "cancelled" in why


def test_exit_codes_and_errors(ugrod: Ugrod, short_tmp: Path) -> None:
    res = ugrod.ctl("status", "no-such-job")
    assert res.returncode == 4 and res.stderr.startswith("ugroctl:")
    res = ugrod.ctl("submit", "--name", "x; rm -rf ~", "--", "true")
    assert res.returncode == 1 and "invalid job name" in res.stderr
    res = ugrod.ctl("submit")
    assert res.returncode == 2
    gone = short_tmp / "nothing-here.sock"
    res = subprocess.run([*ugroctl_argv(), "--socket", str(gone), "status"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 3
    assert str(gone) in res.stderr and "ugrod" in res.stderr


def test_replay_reads_the_log_with_the_daemon_stopped(short_tmp: Path) -> None:
    d = Ugrod(short_tmp)
    d.start()
    d.ctl("submit", "--name", "r1", "--hold", "--", "true", check=True)
    seq_after_submit = d.api("GET", "/v1/ping")[1]["seq"]
    d.ctl("cancel", "r1", check=True)
    d.stop()
    past = subprocess.run([*ugroctl_argv(), "--json", "replay", "--until",
                           str(seq_after_submit), "--state-dir", str(d.state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert past.returncode == 0, past.stderr
    state = json.loads(past.stdout)
    jobs = {j["id"]: j for j in state["jobs"]}
    assert jobs["r1"]["state"] == "queued" and jobs["r1"]["held"] is True
    now = subprocess.run([*ugroctl_argv(), "--json", "replay", "--until",
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)),
                          "--state-dir", str(d.state_dir)],
                         capture_output=True, text=True, timeout=60)
    assert now.returncode == 0, now.stderr
    assert {j["id"]: j for j in json.loads(now.stdout)["jobs"]}["r1"]["state"] == "cancelled"


def test_dry_run_checks_and_shows_the_job_and_records_nothing(ugrod: Ugrod) -> None:
    job = ugrod.ctl_json("submit", "--dry-run", "--name", "dry1", "--priority", "5", "--",
                         "python3", "train.py", "--lr", "1e-4")
    assert JOB_KEYS <= set(job) and job["name"] == "dry1" and job["state"] == "queued"
    assert job["priority"] == 5 and job["argv"] == ["python3", "train.py", "--lr", "1e-4"]
    out = ugrod.ctl("submit", "--dry-run", "--name", "dry1", "--", "true", check=True).stdout
    assert out.startswith("dry run: would queue dry1") and "nothing was recorded" in out
    res = ugrod.ctl("submit", "--dry-run", "--gpus-per-node", "1", "--", "train.py")
    assert res.returncode == 1 and "can never run here" in res.stderr  # builtin: no GPU
    res = ugrod.ctl("submit", "--dry-run", "--wait", "--", "true")
    assert res.returncode == 2 and "--dry-run" in res.stderr
    assert ugrod.ctl("status", "dry1").returncode == 4  # no such job
    events = ugrod.ctl_json("events")
    events = events["events"] if isinstance(events, dict) else events
    assert not [e for e in events if e["type"] == "job_submitted"]  # nothing was written
    ugrod.ctl("submit", "--name", "dry1", "--hold", "--", "true", check=True)
    res = ugrod.ctl("submit", "--dry-run", "--name", "dry1", "--", "true")
    assert res.returncode == 1 and "already exists" in res.stderr
