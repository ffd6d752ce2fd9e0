"""Checkpoints that follow the job, on real sshd nodes with a real ugrod and ugroctl:
copies to the head that survive an interruption (a partial file continues) and a
corruption (found by sha256, copied again), policy ``none``, the head's disk floor,
a retry on another node resuming from the head's copy, ``--expand-env`` with each
node's own ``UGRO_CHECKPOINT_DIR``, and job directories under ``paths.results``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Ugrod, served
from tests.sshd_nodes import SshdCluster, wait_no_job_processes

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train_ddp.py")
PY = sys.executable
pytestmark = pytest.mark.timeout(300)

# Writes a checkpoint of SIZE random bytes per gate file GATE-N (N = 1, 2, ...) into
# $UGRO_CHECKPOINT_DIR and reports it, until GATE-end appears.
WRITER = """\
import json, os, sys, time
ck, metrics, gate, size = (os.environ["UGRO_CHECKPOINT_DIR"], os.environ["UGRO_METRICS_FILE"],
                           sys.argv[1], int(sys.argv[2]))
step = 0
while not os.path.exists(gate + "-end"):
    if os.path.exists(f"{gate}-{step + 1}"):
        step += 1
        path = os.path.join(ck, f"step-{step}.pt")
        with open(path + ".tmp", "wb") as f:
            f.write(os.urandom(size))
        os.replace(path + ".tmp", path)
        with open(metrics, "a") as f:
            f.write(json.dumps({"event": "checkpoint", "path": path, "step": step}) + "\\n")
    time.sleep(0.05)
"""


def config(path: Path, nodes: SshdCluster, only: tuple[int, ...] = (0, 1, 2),
           **extra: Any) -> Path:
    cfg: dict[str, Any] = {
        "cluster": {"name": "ck", "known_hosts": str(nodes.known_hosts),
                    "rdzv_port_range": [43000, 43999]},
        "nodes": {n.name: {"host": n.host, "port": n.port, "user": n.user,
                           "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                           "transport": "ssh", "python": PY, "rank": i}
                  for i, n in enumerate(nodes) if i in only},
        "metrics": {"enabled": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def until(what: str, check: Callable[[], Any], d: Ugrod, timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{d.log()[-6000:]}")


def events(d: Ugrod, job: str, kind: str) -> list[dict[str, Any]]:
    status, raw = d.api("GET", f"/v1/events?job={job}")
    assert status == 200
    return [e for e in map(json.loads, raw.splitlines()) if e["type"] == kind]


def submit(d: Ugrod, name: str, argv: list[str], **kw: Any) -> None:
    status, body = d.api("POST", "/v1/jobs", {"name": name, "argv": argv, **kw})
    assert status == 201, body


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def nodes(node_guard: SshdCluster) -> SshdCluster:
    return node_guard


def test_copies_continue_after_an_interruption_and_a_corrupted_part_is_copied_again(
        short_tmp: Path, nodes: SshdCluster) -> None:
    cfg = config(short_tmp / "cluster.yaml", nodes, only=(0, 1),
                 checkpoints={"max_mb_s": 4, "interval_s": 1, "min_free_gb": 0})
    gate = str(short_tmp / "gate")
    size = 24 << 20
    d = Ugrod(short_tmp, config=cfg)
    with served(d, *(n.work_dir for n in nodes)):
        submit(d, "big", [PY, "-c", WRITER, gate, str(size)], node_names=["node0"])
        # policy none: its checkpoints stay where they are
        submit(d, "nocopy", [PY, "-c", WRITER, gate + "n", "1000"], node_names=["node1"],
               checkpoint_copy="none")
        Path(gate + "n-1").touch()
        central = d.state_dir / "jobs" / "big" / "checkpoints"
        parts = central / ".ugro" / "parts"
        source = nodes[0].work_dir / "jobs" / "big" / "checkpoints"

        def interrupted(step: int) -> int:
            """ugrod stopped while step-N.pt is half copied: how much of it had arrived."""
            Path(f"{gate}-{step}").touch()
            part = until(f"a partial copy of step-{step}.pt", lambda: next(
                (p for p in parts.glob("*") if 3 << 20 < p.stat().st_size < size - (4 << 20)),
                None), d)
            assert d.stop() == 0
            return int(part.stat().st_size)

        # 1. interrupted: the next ugrod continues the file where it stopped, and checks it
        have = interrupted(1)
        assert not (central / "step-1.pt").exists()  # nothing unverified is in place
        d.start()
        done = until("step-1.pt copied", lambda: events(d, "big", "checkpoint_copied"), d)
        assert done[0]["data"]["name"] == "step-1.pt" and done[0]["data"]["step"] == 1
        assert sha(central / "step-1.pt") == sha(source / "step-1.pt")
        went_on = re.findall(r"continuing the copy of node0:\S+step-1\.pt at byte (\d+)",
                             d.log())
        assert went_on and int(went_on[-1]) >= have - (1 << 20), (have, went_on)

        # 2. the partial copy is damaged while ugrod is down: the sha256 says so, it is
        # copied again, and the failure is on record
        have = interrupted(2)
        part = next(p for p in parts.glob("*") if p.stat().st_size == have)
        with open(part, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        d.start()
        until("step-2.pt copied", lambda: len(events(d, "big", "checkpoint_copied")) == 2, d)
        failed = events(d, "big", "checkpoint_copy_failed")
        assert any("sha256" in e["data"]["reason"] and e["data"]["retry_in_s"]
                   for e in failed), failed
        assert sha(central / "step-2.pt") == sha(source / "step-2.pt")
        why = d.ctl("why", "big", check=True).stdout
        assert "checkpoint copy of node0:" in why and "copied again" in why, why
        assert "checkpoint copied to the head as checkpoints/step-2.pt" in why, why

        # results lists the head's copies; status shows the checkpoints found
        Path(gate + "-end").touch()
        assert d.wait_job("big", timeout_s=60)["state"] == "succeeded"
        res = d.ctl_json("results", "big")
        heads = {c["name"]: c["central"] for c in res["checkpoints"]}
        assert heads == {"step-1.pt": str(central / "step-1.pt"),
                         "step-2.pt": str(central / "step-2.pt")}, res["checkpoints"]
        text = d.ctl("results", "big", check=True).stdout
        assert str(central / "step-2.pt") in text, text

        until("nocopy's checkpoint", lambda: events(d, "nocopy", "checkpoint_saved"), d)
        Path(gate + "n-end").touch()
        nocopy = d.wait_job("nocopy", timeout_s=60)
        assert nocopy["state"] == "succeeded", nocopy
        assert (nodes[1].work_dir / "jobs" / "nocopy" / "checkpoints" / "step-1.pt").exists()
        assert not events(d, "nocopy", "checkpoint_copied")
        assert not events(d, "nocopy", "checkpoint_copy_failed")
        assert not [p for p in (d.state_dir / "jobs" / "nocopy" / "checkpoints").iterdir()]


def test_the_disk_floor_stops_copying_with_an_alert(short_tmp: Path,
                                                    nodes: SshdCluster) -> None:
    cfg = config(short_tmp / "cluster.yaml", nodes, only=(0,),
                 checkpoints={"interval_s": 1, "min_free_gb": 1e6},
                 metrics={"enabled": True, "host": "127.0.0.1", "port": 0})
    gate = str(short_tmp / "gate")
    d = Ugrod(short_tmp, config=cfg)
    with served(d, *(n.work_dir for n in nodes)):
        submit(d, "floor", [PY, "-c", WRITER, gate, "1000"])
        Path(gate + "-1").touch()
        failed = until("copying stopped", lambda: events(d, "floor", "checkpoint_copy_failed"),
                       d)
        assert "below its floor" in failed[0]["data"]["reason"], failed
        assert "checkpoints.min_free_gb" in failed[0]["data"]["reason"]
        port = d.api("GET", "/v1/ping")[1]["metrics_port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "ugro_checkpoint_copy_stopped 1.0" in text, text
        job = d.api("GET", "/v1/jobs/floor")[1]["job"]
        assert "below its floor" in job["copy_error"], job
        Path(gate + "-end").touch()
        assert d.wait_job("floor", timeout_s=60)["state"] == "succeeded"
        assert len(events(d, "floor", "checkpoint_copy_failed")) == 1  # said once, not per pass
        assert not events(d, "floor", "checkpoint_copied")


def test_a_retry_on_another_node_resumes_from_the_copy_on_the_head(
        short_tmp: Path, nodes: SshdCluster) -> None:
    """Its first node is drained and then unreachable: the newest checkpoint there cannot
    be had, so the retry's rank 0 gets the head's newest copy, put on its own node."""
    cfg = config(short_tmp / "cluster.yaml", nodes,
                 checkpoints={"interval_s": 1, "min_free_gb": 0})
    d = Ugrod(short_tmp, config=cfg)
    with served(d, *(n.work_dir for n in nodes)):
        # a name no other test uses: processes are found by UGRO_JOB_ID (other suites run beside)
        submit(d, "ckrt", [TRAIN, "--samples", "256", "--batch-size", "16", "--steps", "80",
                         "--sleep-per-step", "0.15", "--checkpoint-every", "10"],
               torchrun=True, max_retries=1, retry_backoff_s=4,
               env={"OMP_NUM_THREADS": "1"})
        copied = until("a checkpoint copied to the head",
                       lambda: events(d, "ckrt", "checkpoint_copied"), d, 120)
        first = d.api("GET", "/v1/jobs/ckrt")[1]["job"]
        node = next(n for n in nodes if n.name == first["nodes"][0])
        d.ctl("drain", node.name, "--reason", "test", check=True)
        os.killpg(first["ranks"][0]["pid"], signal.SIGKILL)
        until("the job waiting to retry",
              lambda: d.api("GET", "/v1/jobs/ckrt")[1]["job"]["state"] == "retrying", d)
        node.stop()  # the checkpoints on it are out of reach now
        done = d.wait_job("ckrt", timeout_s=180)
        assert done["state"] == "succeeded", (done["reason"], d.log()[-4000:])
        assert done["attempt"] == 2 and done["nodes"][0] != node.name, done
        heads = {e["data"]["step"] for e in events(d, "ckrt", "checkpoint_copied")}
        staged = events(d, "ckrt", "checkpoint_staged")
        assert len(staged) == 1 and staged[0]["data"]["source"].startswith("head:"), staged
        step = staged[0]["data"]["step"]
        assert step in heads and step >= copied[0]["data"]["step"], (step, heads)
        new = next(n for n in nodes if n.name == done["nodes"][0])
        log = (d.state_dir / "jobs" / "ckrt" / "rank_0.log").read_text(errors="replace")
        assert f"resumed from step {step} ({new.work_dir}/jobs/ckrt/checkpoints/" \
            f"step-{step:06d}.pt)" in log, log[-3000:]
        why = d.ctl("why", "ckrt", check=True).stdout
        assert f"attempt 2 resumes from step {step} (head:checkpoints/" in why, why
        wait_no_job_processes("ckrt", timeout_s=10)


def test_expand_env_gives_each_node_its_own_checkpoint_dir_and_paths_results(
        short_tmp: Path, nodes: SshdCluster) -> None:
    results = short_tmp / "experiments"
    cfg = config(short_tmp / "cluster.yaml", nodes, only=(0, 1),
                 paths={"results": str(results)})
    d = Ugrod(short_tmp, config=cfg)
    with served(d, *(n.work_dir for n in nodes)):
        bad = d.ctl("submit", "--name", "bad", "--expand-env", "--", PY, "-c", "pass",
                    "${UGRO_NOPE}")
        assert bad.returncode != 0 and "${UGRO_NOPE}" in bad.stderr, bad.stderr
        res = d.ctl("submit", "--name", "env", "--nodes", "2", "--expand-env", "--", PY, "-c",
                    "import sys; print('dir=' + sys.argv[1], 'job=' + sys.argv[2])",
                    "${UGRO_CHECKPOINT_DIR}", "${UGRO_JOB_ID}", "$HOME")
        assert res.returncode == 0, res.stderr
        done = d.wait_job("env", timeout_s=60)
        assert done["state"] == "succeeded", done
        (jobdir,) = results.glob("env_*")
        assert re.fullmatch(r"env_\d{8}_\d{6}", jobdir.name), jobdir
        assert not (d.state_dir / "jobs" / "env").exists()
        for rank, n in enumerate(nodes[:2]):
            log = (jobdir / f"rank_{rank}.log").read_text()
            assert f"dir={n.work_dir}/jobs/env/checkpoints job=env" in log, log
        assert d.ctl_json("results", "env")["job_dir"] == str(jobdir)
        assert "job=env" in d.ctl("logs", "env", check=True).stdout
