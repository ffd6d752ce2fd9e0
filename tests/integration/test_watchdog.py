"""The watchdog against real processes: stalls caught with py-spy stacks, vanished ranks, dead nodes.

Local tests run a real ugrod on the built-in one-node cluster with examples/train_ddp.py;
the multi-node tests use real sshd nodes (tests/sshd_nodes.py), stop or pause one, and
check that a job on a dead node is failed while a flaky link alone kills nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Ugrod, served
from tests.sshd_nodes import SshdCluster, job_processes, processes_with_env

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train_ddp.py")
PY = sys.executable
SMALL = ["--samples", "512", "--batch-size", "16"]
pytestmark = pytest.mark.timeout(240)


def submit(d: Ugrod, name: str, argv: list[str], **kw: object) -> None:
    status, body = d.api("POST", "/v1/jobs", {"name": name, "argv": argv, **kw})
    assert status == 201, body


def events(d: Ugrod, job: str) -> list[dict[str, Any]]:
    status, raw = d.api("GET", f"/v1/events?job={job}")
    assert status == 200
    return [json.loads(line) for line in raw.splitlines()]


def wait_event(d: Ugrod, job: str, kind: str, timeout_s: float = 60,
               n: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in events(d, job) if e["type"] == kind]
        if len(found) >= n:
            return found[n - 1]
        time.sleep(0.2)
    raise AssertionError(f"no {kind} #{n} for {job} in {timeout_s} s: "
                         f"{[e['type'] for e in events(d, job)]}\n{d.log()}")


def get_job(d: Ugrod, job: str) -> dict[str, Any]:
    status, body = d.api("GET", f"/v1/jobs/{job}")
    assert status == 200, body
    return body["job"]  # type: ignore[no-any-return]


def wait_step(d: Ugrod, job: str, step: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        j = get_job(d, job)
        got = j["metrics"].get("step")
        if isinstance(got, int | float) and got >= step:
            return
        assert j["state"] in ("queued", "starting", "running"), (
            f"{job} left the running states before step {step}: {j['state']}, "
            f"{j.get('reason')}\n"
            f"{[(e['type'], e['data'].get('reason')) for e in events(d, job)]}\n{d.log()}")
        time.sleep(0.2)
    raise AssertionError(f"{job} never reached step {step}:\n{d.log()}")


# ---- stalls (local) -----------------------------------------------------------------


def test_stalled_job_gets_stacks_and_is_requeued_from_its_checkpoint(ugrod: Ugrod) -> None:
    assert shutil.which("py-spy") or Path(PY).with_name("py-spy").exists(), \
        "py-spy is missing: pip install -e '.[test]'"
    submit(ugrod, "hang", [PY, TRAIN, "--steps", "12", "--hang-at-step", "5", "--fail-once",
                           "--checkpoint-every", "4", *SMALL],
           stall_timeout_s=5, stall_action="requeue", max_retries=1, retry_backoff_s=1)
    wait_step(ugrod, "hang", 4)
    t0 = time.monotonic()
    stalled = wait_event(ugrod, "hang", "job_stalled", timeout_s=30)
    assert time.monotonic() - t0 < 25  # 5 s timeout + a tick + the py-spy dump (busy box)
    data = stalled["data"]
    assert data["step"] == 4 and data["attempt"] == 1 and data["idle_s"] >= 5
    stacks = Path(data["stacks"])
    assert stacks.parent == ugrod.state_dir / "jobs" / "hang"
    assert stacks.name.startswith("stacks-")
    text = stacks.read_text()
    assert "=== rank 0 on local" in text
    assert "main (train_ddp.py:" in text, text  # the frame it hangs in, from py-spy
    # requeue: stopped as failed, retried (progress was made: budget kept), resumed at 4
    stopping = wait_event(ugrod, "hang", "job_stopping")
    assert stopping["data"]["outcome"] == "failed"
    assert "stalled: no step advance" in stopping["data"]["reason"]
    ended = wait_event(ugrod, "hang", "job_ended")
    assert ended["data"]["outcome"] == "retrying", ended
    assert ended["data"]["resume_from"].endswith("step-000004.pt")
    done = ugrod.wait_job("hang", timeout_s=90)
    assert done["state"] == "succeeded" and done["attempt"] == 2, [
        (e["type"], e["data"].get("attempt"), e["data"].get("reason") or e["data"].get("step"))
        for e in events(ugrod, "hang")]
    assert not done["stalled"]  # a new attempt starts unstalled
    _, log = ugrod.api("GET", "/v1/jobs/hang/logs")
    assert b"resumed from step 4" in log


def test_stall_alert_only_flags_the_job_once_and_keeps_it_running(ugrod: Ugrod) -> None:
    submit(ugrod, "alertme", [PY, TRAIN, "--steps", "50", "--hang-at-step", "4", *SMALL],
           stall_timeout_s=1)
    wait_event(ugrod, "alertme", "job_stalled", timeout_s=30)
    time.sleep(3)  # several more ticks: still one event per stall
    j = get_job(ugrod, "alertme")
    assert j["state"] == "running" and j["stalled"] is True
    assert [e["type"] for e in events(ugrod, "alertme")].count("job_stalled") == 1
    _, why = ugrod.api("GET", "/v1/jobs/alertme/why")
    assert any("stalled: no step advance" in h["text"] for h in why["history"])
    assert ugrod.ctl("cancel", "alertme").returncode == 0
    assert ugrod.wait_job("alertme", timeout_s=60)["state"] == "cancelled"


def test_a_stall_that_ends_clears_the_flag_and_a_new_stall_is_reported_again(
        ugrod: Ugrod) -> None:
    # Steps 1-3, a 4 s pause, steps 4-6, another pause, then the end.
    script = ("import json, os, time\n"
              "f = open(os.environ['UGRO_METRICS_FILE'], 'a')\n"
              "def step(n):\n"
              "    f.write(json.dumps({'ts': time.time(), 'step': n, 'loss': 1.0 / n}) + '\\n')\n"
              "    f.flush(); time.sleep(0.2)\n"
              "for n in (1, 2, 3): step(n)\n"
              "time.sleep(4)\n"
              "for n in (4, 5, 6): step(n)\n"
              "time.sleep(4)\n")
    submit(ugrod, "pauses", [PY, "-c", script], stall_timeout_s=1.5)
    wait_event(ugrod, "pauses", "job_stalled", timeout_s=30)
    progressed = wait_event(ugrod, "pauses", "job_progressed", timeout_s=30)
    assert progressed["data"]["step"] >= 4
    wait_event(ugrod, "pauses", "job_stalled", timeout_s=30, n=2)
    assert ugrod.wait_job("pauses", timeout_s=60)["state"] == "succeeded"
    kinds = [e["type"] for e in events(ugrod, "pauses")]
    assert kinds.count("job_stalled") == 2 and kinds.count("job_progressed") == 1


def test_job_without_steps_is_never_called_stalled(ugrod: Ugrod) -> None:
    submit(ugrod, "quiet", [PY, "-c", "import time; time.sleep(4)"], stall_timeout_s=1)
    assert ugrod.wait_job("quiet", timeout_s=60)["state"] == "succeeded"
    assert "job_stalled" not in [e["type"] for e in events(ugrod, "quiet")]


# ---- vanished rank (local) ------------------------------------------------------------


def rank_and_supervisor(d: Ugrod, job: str) -> tuple[int, int]:
    deadline = time.monotonic() + 30
    while (pid := (get_job(d, job)["ranks"] or [{}])[0].get("pid")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    supervisor = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert supervisor not in (0, 1)
    return pid, supervisor


LOOP = [PY, "-c", "import time\nwhile True: time.sleep(0.1)"]


def test_rank_that_vanishes_with_its_supervisor_fails_the_job(ugrod: Ugrod) -> None:
    submit(ugrod, "vanish", LOOP)
    pid, supervisor = rank_and_supervisor(ugrod, "vanish")
    os.kill(supervisor, signal.SIGKILL)  # nobody is left to write the exit code
    os.killpg(pid, signal.SIGKILL)
    done = ugrod.wait_job("vanish", timeout_s=60)
    assert done["state"] == "failed", done
    assert "rank 0 on local vanished" in done["reason"], done["reason"]
    assert done["exit_code"] == -1
    assert wait_event(ugrod, "vanish", "rank_exited")["data"]["exit_code"] == -1


def test_rank_gone_while_its_supervisor_hangs_is_caught_by_the_probe(ugrod: Ugrod) -> None:
    submit(ugrod, "stuck", LOOP)
    pid, supervisor = rank_and_supervisor(ugrod, "stuck")
    os.kill(supervisor, signal.SIGSTOP)  # alive but stuck: no exit code, no LOST either
    try:
        os.killpg(pid, signal.SIGKILL)
        done = ugrod.wait_job("stuck", timeout_s=90)  # probe every 5 s + 15 s of grace
    finally:
        os.kill(supervisor, signal.SIGKILL)
    assert done["state"] == "failed", done
    reason = done["reason"]
    assert "rank 0 on local vanished: its process (pid" in reason, reason
    assert "no exit status came for" in reason, reason
    kinds = [e["type"] for e in events(ugrod, "stuck")]
    assert kinds[-3:] == ["job_stopping", "rank_exited", "job_ended"], kinds
    assert wait_event(ugrod, "stuck", "rank_exited")["data"]["exit_code"] == -1


# ---- dead nodes (real sshd) -----------------------------------------------------------


def write_config(path: Path, nodes: SshdCluster) -> Path:
    cfg = {
        "cluster": {"name": "test", "known_hosts": str(nodes.known_hosts)},
        "nodes": {
            n.name: {"host": n.host, "port": n.port, "user": n.user,
                     "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                     "transport": "ssh", "python": PY, "rank": i}
            for i, n in enumerate(nodes)},
        "metrics": {"enabled": False},
        # quick sweeps so a breaker opens within seconds (3 failures in a row)
        "health": {"check_timeout_s": 2, "intervals": {"active_s": 1, "recent_s": 1,
                                                        "idle_s": 1, "long_idle_s": 1},
                   "thresholds": {"latency_ms": {"warn": 5000, "crit": 10000}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def cluster(short_tmp: Path, node_guard: SshdCluster) -> Iterator[Ugrod]:
    d = Ugrod(short_tmp, config=write_config(short_tmp / "cluster.yaml", node_guard),
              grace_s=2.0)
    with served(d, *(n.work_dir for n in node_guard)):
        yield d


def drained(d: Ugrod, node: str) -> str:
    """The node's drain reason ('' when not drained)."""
    n = next(n for n in d.api("GET", "/v1/nodes")[1]["nodes"] if n["name"] == node)
    return str(n["drain_reason"]) if n["drained"] else ""


def node_ranks(node_dir: Path, job: str) -> list[int]:
    """Live processes of the job's ranks on one sshd node (by their run dir under it)."""
    return processes_with_env(f"UGRO_RUN_DIR={node_dir}/jobs/{job}/".encode(), prefix=True)


def test_dead_node_fails_the_gang_and_its_leftovers_are_killed_on_return(
        cluster: Ugrod, node_guard: SshdCluster) -> None:
    # Two independent processes that hang together at step 6, as a DDP gang whose
    # collective waits for a dead peer would; stall_timeout_s is also the silence limit.
    submit(cluster, "gang", [PY, TRAIN, "--steps", "400", "--hang-at-step", "6",
                             "--sleep-per-step", "0.05", *SMALL],
           nodes=2, torchrun=False, node_names=["node0", "node1"], stall_timeout_s=3,
           max_retries=0)
    wait_step(cluster, "gang", 5)
    wait_event(cluster, "gang", "job_stalled", timeout_s=30)  # signal two: no progress
    assert get_job(cluster, "gang")["state"] == "running"  # a stall alone kills nothing
    node1 = node_guard[1]
    assert node_ranks(node1.work_dir, "gang")
    node1.stop()  # signal one: its health checks fail; its rank keeps running, unseen
    done = cluster.wait_job("gang", ("failed", "retrying"), timeout_s=60)
    reason = done["reason"]
    assert done["state"] == "failed", done
    assert "node node1 declared dead" in reason and "health checks failed" in reason, reason
    assert "has not advanced" in reason, reason
    assert "rank 1 on node1 could not be confirmed gone" in reason, reason
    assert not node_ranks(node_guard[0].work_dir, "gang")  # the reachable rank is gone
    assert "ugrod fence" in drained(cluster, "node1")
    assert node_ranks(node1.work_dir, "gang")  # left behind on the dead node
    node1.start()
    deadline = time.monotonic() + 90
    while node_ranks(node1.work_dir, "gang") or drained(cluster, "node1"):
        assert time.monotonic() < deadline, cluster.log()
        time.sleep(0.3)
    assert not job_processes("gang")


def test_node_lost_with_its_ranks_requeues_a_ddp_job(cluster: Ugrod,
                                                    node_guard: SshdCluster) -> None:
    submit(cluster, "ddp", [TRAIN, "--steps", "400", "--sleep-per-step", "0.1", *SMALL],
           nodes=2, torchrun=True, node_names=["node0", "node1"], max_retries=1,
           retry_backoff_s=600)
    wait_step(cluster, "ddp", 3)
    node1 = node_guard[1]
    node1.stop()
    for pid in node_ranks(node1.work_dir, "ddp"):
        os.kill(pid, signal.SIGKILL)
    done = cluster.wait_job("ddp", ("failed", "retrying"), timeout_s=120)
    assert done["state"] == "retrying", done
    # rank 0 fails on its own (gloo sees the peer gone); node1 is given up on
    assert "rank 1 on node1 could not be confirmed gone" in done["reason"], done["reason"]
    assert not node_ranks(node_guard[0].work_dir, "ddp")
    assert cluster.ctl("cancel", "ddp").returncode == 0


def test_flaky_link_does_not_kill_a_job_that_keeps_reporting_steps(
        cluster: Ugrod, node_guard: SshdCluster) -> None:
    submit(cluster, "steady", [PY, TRAIN, "--steps", "300", "--sleep-per-step", "0.1",
                               *SMALL],
           nodes=2, torchrun=False, node_names=["node0", "node1"], stall_timeout_s=3)
    wait_step(cluster, "steady", 3)
    node1 = node_guard[1]
    node1.pause()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the breaker opens: signal one is on
            nodes = {n["name"]: n for n in cluster.api("GET", "/v1/nodes")[1]["nodes"]}
            if nodes["node1"]["health"] == "unreachable":
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"node1 never became unreachable:\n{cluster.log()}")
        time.sleep(5)  # beyond the 3 s silence limit, had the job stopped reporting
        assert get_job(cluster, "steady")["state"] == "running"
    finally:
        node1.resume()
    done = cluster.wait_job("steady", timeout_s=120)
    assert done["state"] == "succeeded", done["reason"]
    kinds = [e["type"] for e in events(cluster, "steady")]
    assert "job_stopping" not in kinds and "job_stalled" not in kinds
