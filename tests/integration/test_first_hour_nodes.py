"""The first hour with real nodes, played as a user would (issue "Day one", items 5-7).

Three real sshd nodes whose fake nvidia-smi reports the seeds' cards: a 12 GB RTX 4070
(12282 MiB) on node0 and 8 GB cards on node1 (8192 MiB) and node2 (8188 MiB). The real
ugrod runs as a subprocess and every step goes through the real ``ugroctl``:

- a node whose host key is unknown, or changed, is ``unreachable`` with that reason in
  ``nodes``, ``health``, ``submit --dry-run``, ``queue`` and ``why``; after ``nodes trust``
  the job waiting for it runs within 5 s; ``--min-vram 12`` lands on the 12 GB card;
- a node that refuses SFTP is unreachable with that reason, not an endless wait;
- a node killed mid-job is named in the reason and the retry goes elsewhere;
- ugrod's socket answers within a second of start while a node hangs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Ugrod, _kill_leftovers
from tests.sshd_nodes import SshdCluster, SshdNode, processes_with_env, start_sshd_nodes
from ugrod.core import codec

ROOT = Path(__file__).resolve().parents[2]
FAKE_SMI = ROOT / "tests" / "fake_nvidia_smi" / "nvidia-smi"
TRAIN = str(ROOT / "examples" / "train_ddp.py")
PY = sys.executable
SLEEP = [PY, "-c", "import time; time.sleep(120)"]
CARDS = [("NVIDIA GeForce RTX 4070", 12282), ("NVIDIA GeForce RTX 3070", 8192),
         ("NVIDIA GeForce RTX 2080", 8188)]
MIB = 1 << 20
pytestmark = pytest.mark.timeout(240)


# ---- the lab ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdCluster]:
    """Three sshd nodes, each with its own fake nvidia-smi and card."""
    cluster = start_sshd_nodes(tmp_path_factory.mktemp("lab"), 3)
    try:
        for i, node in enumerate(cluster):
            shutil.copy(FAKE_SMI, node.bin_dir / "nvidia-smi")
            name, total = CARDS[i]
            (node.bin_dir / "state.json").write_text(json.dumps({"gpus": [{
                "index": 0, "uuid": f"GPU-{i:08d}-0000-0000-0000-000000000000", "name": name,
                "utilization.gpu": 0, "memory.used": 1, "memory.total": total,
                "temperature.gpu": 40, "power.draw": 20.0}]}))
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def nodes(lab: SshdCluster) -> Iterator[SshdCluster]:
    """The lab, put back as it was after each test (sshd running, SFTP on, resumed)."""
    yield lab
    for node in lab:
        node.resume()
        if "write_config" in vars(node):  # a test turned SFTP off
            del node.write_config
            node.stop()
        if not node.running:
            node.start()
        _kill_leftovers(node.work_dir)


def write_config(path: Path, nodes: SshdCluster, known_hosts: Path) -> Path:
    cfg = {
        "cluster": {"name": "lab", "known_hosts": str(known_hosts), "ssh_keepalive_s": 2},
        "nodes": {n.name: {"host": n.host, "port": n.port, "user": n.user,
                           "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                           "transport": "ssh", "python": PY, "rank": i}
                  for i, n in enumerate(nodes)},
        "metrics": {"enabled": False},
        "scheduler": {"retry_backoff_s": 1},
        # quick sweeps, and a breaker that opens at the first failed check
        "health": {"check_timeout_s": 10, "failures_to_open": 1,
                   "intervals": {"active_s": 1, "recent_s": 1, "idle_s": 1, "long_idle_s": 1},
                   "thresholds": {"latency_ms": {"warn": 5000, "crit": 10000}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def ugrod_for(tmp: Path, nodes: SshdCluster, known_hosts: Path | None = None) -> Ugrod:
    return Ugrod(tmp, config=write_config(tmp / "cluster.yaml", nodes,
                                          known_hosts or nodes.known_hosts), grace_s=2.0)


def fingerprint(node: SshdNode) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", f"{node.host_key}.pub"], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]  # "256 SHA256:... comment (ED25519)"


def wait_for(what: str, probe: Callable[[], Any], d: Ugrod, timeout_s: float = 30) -> Any:
    """probe() until it returns something true; its last answer in the failure."""
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {got!r})\n{d.log()}")


def node_docs(d: Ugrod) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in d.ctl_json("nodes")["nodes"]}


def job_doc(d: Ugrod, job: str) -> dict[str, Any]:
    return dict(d.ctl_json("status", job))


def events(d: Ugrod, job: str) -> list[dict[str, Any]]:
    status, raw = d.api("GET", f"/v1/events?job={job}")
    assert status == 200
    return [json.loads(line) for line in raw.splitlines()]


def settled(d: Ugrod, *names: str) -> Callable[[], dict[str, dict[str, Any]] | None]:
    """Nodes once each named one has been checked (no longer "not contacted yet")."""
    def probe() -> dict[str, dict[str, Any]] | None:
        docs = node_docs(d)
        if any("not contacted" in docs[n]["health_reason"] for n in names):
            return None
        return docs
    return probe


# ---- host keys, trust, VRAM ------------------------------------------------------------


def test_untrusted_nodes_are_unreachable_until_trusted_then_the_job_runs(
        short_tmp: Path, nodes: SshdCluster) -> None:
    n0, n1, _ = nodes
    known = short_tmp / "known_hosts"
    # node1's entry holds another machine's key (as after a reinstall, or an impostor);
    # node2 has none (never trusted).
    known.write_text(f"{n0.host_key_line()}\n"
                     f"{n1.host_key_line().split(' ')[0]} {n0.host_key_line().split(' ', 1)[1]}\n")
    known.chmod(0o600)
    d = ugrod_for(short_tmp, nodes, known)
    d.start()
    try:
        docs = wait_for("nodes checked", settled(d, "node0", "node1", "node2"), d)
        assert docs["node0"]["state"] == "healthy", docs["node0"]["health_reason"]
        assert (docs["node1"]["state"], docs["node2"]["state"]) == ("unreachable", "unreachable")
        assert "CHANGED" in docs["node1"]["health_reason"]
        assert f"is not in {known}" in docs["node2"]["health_reason"]
        assert "ugroctl nodes trust node2" in docs["node2"]["health_reason"]
        assert docs["node0"]["gpus"][0]["vram_bytes"] == 12282 * MIB  # exact, as reported
        assert docs["node0"]["gpus"][0]["nominal_gb"] == 12

        text = d.ctl("nodes", check=True).stdout
        line2 = next(ln for ln in text.splitlines() if ln.startswith("node2"))
        assert "unreachable" in line2 and "ugroctl nodes trust node2" in line2, text
        health = d.ctl("health", check=True).stdout
        line1 = next(ln for ln in health.splitlines() if ln.startswith("node1"))
        assert "unreachable: host key" in line1 and "CHANGED" in line1, health

        job = ["--nodes", "3", "--gpus-per-node", "1", "--no-torchrun", "--", *SLEEP]
        dry = d.ctl("submit", "--dry-run", *job, check=True).stdout
        assert "nodes: none free now: waiting for 3 nodes with a GPU: node1 is unreachable" \
            in dry, dry
        assert "node node2 is unreachable: host key" in dry, dry
        assert "node node1 is unreachable: host key" in dry and "CHANGED" in dry, dry

        d.ctl("submit", "--name", "three", *job, check=True)
        reason = wait_for("three's waiting reason", lambda: (
            job_doc(d, "three")["waiting_reason"] if "node2 is unreachable (host key"
            in job_doc(d, "three")["waiting_reason"] else None), d)
        assert "node1 is unreachable (host key" in reason and "CHANGED" in reason, reason
        assert "node2 is unreachable (host key" in d.ctl("queue", check=True).stdout
        assert "ugroctl nodes trust node2" in d.ctl("why", "three", check=True).stdout

        # A changed key: without --yes (no terminal to ask on) nothing is trusted, but
        # the user is told it CHANGED, with the old and the new fingerprint.
        res = d.ctl("nodes", "trust", "node1")
        assert res.returncode == 1, res
        assert "CHANGED" in res.stderr, res.stderr
        assert f"old (in {known}):\n  {fingerprint(n0)}" in res.stderr, res.stderr
        assert f"new (offered now):\n  {fingerprint(n1)}" in res.stderr, res.stderr
        res = d.ctl("nodes", "trust", "node1", "--yes", check=True)
        assert "node1 is reachable: healthy" in res.stdout, res.stdout

        res = d.ctl("nodes", "trust", "node2", "--yes", check=True)
        trusted = time.time()  # (the command returns once node2 has been checked)
        assert "node2 is reachable: healthy" in res.stdout, res.stdout
        started = wait_for("three started", lambda: d.api("GET", "/v1/jobs/three")[1]["job"][
            "started_at"], d, timeout_s=5)
        assert codec.parse_ts(started) - trusted < 5  # placed on all three nodes
        wait_for("three running", lambda: job_doc(d, "three")["state"] == "running", d)
        assert sorted(job_doc(d, "three")["nodes"]) == ["node0", "node1", "node2"]
        assert {n["name"]: n["state"] for n in node_docs(d).values()} == {
            "node0": "healthy", "node1": "healthy", "node2": "healthy"}
        d.ctl("cancel", "three", check=True)
        d.wait_job("three", timeout_s=30)

        # --min-vram 12 means the 12 GB card, which reports 12282 MiB
        d.ctl("submit", "--name", "big", "--gpus-per-node", "1", "--min-vram", "12",
              "--no-torchrun", "--", PY, "-c", "print('ok')", check=True)
        done = d.wait_job("big", timeout_s=60)
        assert (done["state"], done["nodes"]) == ("succeeded", ["node0"]), done
        assert "GPU 0, 12 GB" in next(e for e in events(d, "big")
                                      if e["type"] == "job_placed")["data"]["reason"]
    finally:
        d.stop()


# ---- SFTP refused --------------------------------------------------------------------------


def test_a_node_that_refuses_sftp_is_unreachable_with_the_reason(
        short_tmp: Path, nodes: SshdCluster) -> None:
    n1 = nodes[1]
    plain = n1.write_config

    def without_sftp() -> None:
        plain()
        n1.config_path.write_text(n1.config_path.read_text().replace(
            "Subsystem sftp internal-sftp\n", ""))
    n1.write_config = without_sftp  # type: ignore[method-assign]
    n1.restart()
    d = ugrod_for(short_tmp, nodes)
    d.start()
    try:
        docs = wait_for("node1 checked", settled(d, "node1"), d)
        assert docs["node1"]["state"] == "unreachable", docs["node1"]
        assert "refused SFTP" in docs["node1"]["health_reason"], docs["node1"]
        d.ctl("submit", "--name", "onn1", "--node", "node1", "--no-torchrun", "--", *SLEEP,
              check=True)
        reason = wait_for("onn1's waiting reason", lambda: job_doc(d, "onn1")["waiting_reason"],
                          d)
        assert "node1 is unreachable" in reason and "refused SFTP" in reason, reason
        assert "next planner round" not in d.ctl("queue", check=True).stdout
        check = d.ctl("health", "node1")
        assert check.returncode == 1 and "refused SFTP" in check.stdout, check
        assert job_doc(d, "onn1")["state"] == "queued"  # waits, burns no attempt

        # a launch that fails on a node is that node's failure: recorded, so a retry
        # goes elsewhere
        d.ctl("submit", "--name", "nocmd", "--node", "node2", "--no-torchrun", "--",
              "/nope/train.sh", check=True)
        done = d.wait_job("nocmd", timeout_s=60)
        assert done["state"] == "failed" and "/nope/train.sh" in done["reason"], done
        ended = next(e for e in events(d, "nocmd") if e["type"] == "job_ended")["data"]
        assert (ended["failed_node"], ended["failed_rank"]) == ("node2", 0), ended
    finally:
        d.stop()


# ---- a node killed mid-job -----------------------------------------------------------------


def test_a_node_killed_mid_job_is_named_and_the_retry_avoids_it(
        short_tmp: Path, nodes: SshdCluster) -> None:
    d = ugrod_for(short_tmp, nodes)
    d.start()
    try:
        wait_for("nodes checked", settled(d, "node0", "node1", "node2"), d)
        # two 8 GB cards are the smallest that fit: node1 (rank 0) and node2 (rank 1)
        d.ctl("submit", "--name", "ddp", "--nodes", "2", "--gpus-per-node", "1",
              "--max-retries", "1", "--stall-timeout", "20", "--", TRAIN,
              "--steps", "400", "--sleep-per-step", "0.1", "--samples", "512",
              "--batch-size", "16", check=True)
        wait_for("ddp training", lambda: (d.api("GET", "/v1/jobs/ddp")[1]["job"]["metrics"]
                                          .get("step") or 0) >= 1, d, timeout_s=90)
        first = job_doc(d, "ddp")
        assert sorted(first["nodes"]) == ["node1", "node2"], first
        victim = nodes[2]
        victim.stop()  # its sshd and every session: the node is gone from the LAN
        for pid in processes_with_env(f"UGRO_RUN_DIR={victim.work_dir}/".encode(),
                                      prefix=True):
            os.kill(pid, signal.SIGKILL)  # and everything it ran
        ended = wait_for("attempt 1 ended", lambda: next(
            (e for e in events(d, "ddp") if e["type"] == "job_ended"), None), d, timeout_s=90)
        data = ended["data"]
        assert data["outcome"] == "retrying", data
        assert data["failed_node"] == "node2" and data["failed_rank"] == 1, data
        assert data["reason"].startswith("rank 1 on node2 lost: node unreachable"), data
        placed = wait_for("attempt 2 placed", lambda: [
            e for e in events(d, "ddp") if e["type"] == "job_placed"][1:], d, timeout_s=30)
        again = placed[0]["data"]
        assert "node2" not in [r["node"] for r in again["ranks"]], again
        assert "avoiding node2, where it failed before" in again["reason"], again
        nodes_now = node_docs(d)
        assert nodes_now["node2"]["health"] == "unreachable", nodes_now["node2"]
        assert "refused" in nodes_now["node2"]["health_reason"], nodes_now["node2"]
    finally:  # (attempt 2's ranks outlive ugrod: the fixture kills them)
        d.stop()


# ---- a job name used again after the state dir was wiped --------------------------------


def test_a_name_used_again_after_a_wiped_state_dir_runs_as_a_new_job(
        short_tmp: Path, nodes: SshdCluster) -> None:
    # The first run of "train" fails (exit 3) and saves a checkpoint on node0.
    script = ("import os, sys\n"
              "d = os.environ['UGRO_CHECKPOINT_DIR']\n"
              "print('resume from', os.environ.get('UGRO_RESUME_FROM'), flush=True)\n"
              "open(os.path.join(d, 'ckpt-' + sys.argv[1]), 'w').write(sys.argv[1])\n"
              "sys.exit(int(sys.argv[2]))\n")
    (short_tmp / "a").mkdir()
    d = ugrod_for(short_tmp / "a", nodes)
    d.start()
    try:
        d.ctl("submit", "--name", "train", "--node", "node0", "--max-retries", "0", "--",
              PY, "-c", script, "first", "3", check=True)
        assert d.wait_job("train", timeout_s=60)["exit_code"] == 3
    finally:
        d.stop()
    # The user wipes ugrod's state (a reinstall, a new head) and submits "train" again.
    shutil.rmtree(short_tmp / "a")
    (short_tmp / "b").mkdir()
    d = ugrod_for(short_tmp / "b", nodes)
    d.start()
    try:
        d.ctl("submit", "--name", "train", "--node", "node0", "--max-retries", "0", "--",
              PY, "-c", script, "second", "0", check=True)
        done = d.wait_job("train", timeout_s=60)
        # It runs as the new job it is: not "ended" at once with the old run's exit code,
        # not resumed from the old run's checkpoint.
        assert done["state"] == "succeeded" and done["exit_code"] == 0, done
        log = d.ctl("logs", "train", check=True).stdout
        assert "resume from None" in log, log
        jobs = nodes[0].work_dir / "jobs"
        ckpts = sorted(p.name for p in (jobs / "train" / "checkpoints").iterdir())
        assert ckpts == ["ckpt-second"], ckpts
        # The old run's files are kept aside on the node, not deleted, and the log says so.
        kept = jobs / ".replaced" / "train.1"
        assert (kept / "checkpoints" / "ckpt-first").read_text() == "first"
        assert (kept / "attempt-1" / "rank-0" / "exit_code").read_text().strip() == "3"
        assert f"moved it to {kept}" in d.log(), d.log()
    finally:
        d.stop()


# ---- start-up while a node hangs -----------------------------------------------------------


def test_socket_answers_within_a_second_while_a_node_hangs(
        short_tmp: Path, nodes: SshdCluster) -> None:
    nodes[2].pause()  # TCP accepts, sshd never answers: each SSH step waits for its deadline
    d = ugrod_for(short_tmp, nodes)
    d.start(wait=False)
    try:
        d.wait_ready(timeout_s=30)
        m = wait_for("ready line", lambda: re.search(
            r"ready on \S+ in ([0-9.]+) s \(3 nodes; ([0-9.]+) s of it waiting", d.log()), d)
        # Start-up waits for the nodes' inventory at most 0.25 s whatever they do (it was 8 s
        # and more: the hung node's inventory first). The whole start takes ~0.45 s on an
        # idle 2-core VM; 5 s here only because a loaded box can be that slow.
        assert float(m.group(2)) < 0.5 and float(m.group(1)) < 5.0, d.log()
        docs = node_docs(d)
        # served while node2 is still being connected to (nothing waits for it), and
        # never shown "healthy" meanwhile
        assert docs["node2"]["state"] == "unreachable", docs["node2"]
        assert "not contacted yet" in docs["node2"]["health_reason"], docs["node2"]
        assert "node2" not in d.ctl("queue", check=True).stdout
    finally:
        nodes[2].resume()
        d.stop()
