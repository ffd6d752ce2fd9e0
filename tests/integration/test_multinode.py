"""End to end over three real sshd nodes with real torchrun DDP (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import Ugrod, served
from tests.sshd_nodes import SshdCluster, job_processes, wait_no_job_processes

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train_ddp.py")
pytestmark = pytest.mark.timeout(240)


def write_config(path: Path, nodes: SshdCluster, *, known_hosts: Path | None = None,
                 user: str | None = None, only: list[int] | None = None,
                 keepalive_s: float | None = None) -> Path:
    cluster: dict[str, object] = {"name": "test",
                                  "known_hosts": str(known_hosts or nodes.known_hosts)}
    if keepalive_s is not None:
        cluster["ssh_keepalive_s"] = keepalive_s
    cfg = {
        "cluster": cluster,
        "nodes": {
            n.name: {"host": n.host, "port": n.port, "user": user or n.user,
                     "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                     "transport": "ssh", "python": sys.executable, "rank": i}
            for i, n in enumerate(nodes) if only is None or i in only},
        "metrics": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def cluster(short_tmp: Path, node_guard: SshdCluster) -> Iterator[Ugrod]:
    d = Ugrod(short_tmp, config=write_config(short_tmp / "cluster.yaml", node_guard),
              grace_s=3.0)
    with served(d, *(n.work_dir for n in node_guard)):
        yield d


def ddp(d: Ugrod, name: str, *args: str, nodes: int = 3, **kw: object) -> None:
    status, body = d.api("POST", "/v1/jobs", {
        "name": name, "nodes": nodes, "torchrun": True,
        "argv": [TRAIN, "--samples", "512", "--batch-size", "16", *args], **kw})
    assert status == 201, body


def metrics(d: Ugrod, job: str) -> list[dict[str, object]]:
    path = d.state_dir / "jobs" / job / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_step(d: Ugrod, job: str, step: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s, body = d.api("GET", f"/v1/jobs/{job}")
        got = body["job"]["metrics"].get("step")
        if isinstance(got, int | float) and got >= step:
            return
        assert body["job"]["state"] in ("queued", "starting", "running"), body["job"]
        time.sleep(0.2)
    raise AssertionError(f"{job} never reached step {step}:\n{d.log()}")


def test_ddp_job_across_three_nodes(cluster: Ugrod) -> None:
    ddp(cluster, "exp1", "--steps", "30", "--checkpoint-every", "10")
    done = cluster.wait_job("exp1", timeout_s=180)
    assert done["state"] == "succeeded", done["reason"]
    assert done["nodes"] == ["node0", "node1", "node2"]
    m = [x for x in metrics(cluster, "exp1") if "loss" in x]
    assert len(m) >= 10 and m[-1]["loss"] < m[0]["loss"]  # type: ignore[operator]
    jobdir = cluster.state_dir / "jobs" / "exp1"
    for r in range(3):  # ranks 1 and 2 print nothing (torchrun's node_rank warning is gone)
        assert "node_rank" not in (jobdir / f"rank_{r}.log").read_text()
    status, res = cluster.api("GET", "/v1/jobs/exp1/results")
    assert res["summary"]["final_loss"] == m[-1]["loss"]
    names = [Path(c["path"]).name for c in res["checkpoints"]]
    assert any("step-000010" in n for n in names) and any("step-000030" in n for n in names)
    # node_rank 0 ran on node0, the rendezvous host
    cfg = json.loads((jobdir / "config.json").read_text())
    assert cfg["rendezvous"].startswith(f"{cluster_host(cluster, 0)}:")
    wait_no_job_processes("exp1")


def cluster_host(d: Ugrod, i: int) -> str:
    assert d.config is not None
    return str(list(yaml.safe_load(d.config.read_text())["nodes"].values())[i]["host"])


def test_rank_killed_mid_run_fails_the_gang_and_leaves_nothing(cluster: Ugrod) -> None:
    ddp(cluster, "killrank", "--steps", "400", "--sleep-per-step", "0.05")
    wait_step(cluster, "killrank", 3)
    job = cluster.api("GET", "/v1/jobs/killrank")[1]["job"]
    rank1 = next(r for r in job["ranks"] if r["rank"] == 1)
    os.killpg(rank1["pid"], signal.SIGKILL)
    done = cluster.wait_job("killrank", timeout_s=60)
    assert done["state"] == "failed"
    assert "rank 1 on node1" in done["reason"], done["reason"]
    wait_no_job_processes("killrank", timeout_s=10)


def test_cancel_mid_run_leaves_no_process_on_any_node(cluster: Ugrod) -> None:
    ddp(cluster, "cancelme", "--steps", "400", "--sleep-per-step", "0.05")
    wait_step(cluster, "cancelme", 2)
    assert len(job_processes("cancelme")) >= 6  # torchrun + worker on each node
    res = cluster.ctl("cancel", "cancelme")
    assert res.returncode == 0, res.stderr
    done = cluster.wait_job("cancelme", timeout_s=60)
    assert done["state"] == "cancelled"
    wait_no_job_processes("cancelme", timeout_s=5)


def test_ugrod_killed_mid_job_reattaches_and_records_the_end(cluster: Ugrod) -> None:
    ddp(cluster, "survive", "--steps", "60", "--sleep-per-step", "0.05")
    wait_step(cluster, "survive", 3)
    cluster.kill9()
    time.sleep(1.0)
    assert job_processes("survive")  # ranks outlived the daemon
    cluster.start()
    done = cluster.wait_job("survive", timeout_s=120)
    assert done["state"] == "succeeded", done["reason"]
    steps = [x["step"] for x in metrics(cluster, "survive") if "loss" in x]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # nothing lost or duplicated
    kinds = [json.loads(line)["type"] for line in
             cluster.api("GET", "/v1/events?job=survive")[1].splitlines()]
    assert kinds.count("job_ended") == 1 and kinds.count("rank_exited") == 3


def test_rank_exit_while_ugrod_is_down_is_recorded(cluster: Ugrod) -> None:
    ddp(cluster, "downexit", "--steps", "400", "--sleep-per-step", "0.05")
    wait_step(cluster, "downexit", 3)
    job = cluster.api("GET", "/v1/jobs/downexit")[1]["job"]
    cluster.kill9()
    os.killpg(next(r for r in job["ranks"] if r["rank"] == 2)["pid"], signal.SIGKILL)
    time.sleep(1.0)
    cluster.start()
    done = cluster.wait_job("downexit", timeout_s=90)
    assert done["state"] == "failed" and "rank 2 on node2" in done["reason"], done
    wait_no_job_processes("downexit", timeout_s=10)


def test_training_command_that_does_not_exist(cluster: Ugrod) -> None:
    status, body = cluster.api("POST", "/v1/jobs", {"name": "nocmd", "nodes": 3,
                                                    "torchrun": False,
                                                    "argv": ["/nope/train.sh"]})
    assert status == 201
    done = cluster.wait_job("nocmd", timeout_s=60)
    assert done["state"] == "failed"
    assert "/nope/train.sh" in done["reason"]
    wait_no_job_processes("nocmd")


@pytest.mark.parametrize("fault", ["unknown_key", "changed_key", "wrong_user", "stopped",
                                   "paused"])
def test_node_faults_give_one_clear_error_naming_the_node(
        short_tmp: Path, node_guard: SshdCluster, fault: str) -> None:
    known = node_guard.known_hosts
    user = None
    bad = node_guard[1]
    if fault == "unknown_key":
        known = short_tmp / "known_hosts"
        known.write_text("".join(f"{n.host_key_line()}\n" for n in node_guard if n is not bad))
    elif fault == "changed_key":
        known = short_tmp / "known_hosts"
        other = node_guard[2].host_key_line().split(" ", 1)[1]
        known.write_text("".join(
            f"{n.host_key_line() if n is not bad else bad.host_key_line().split(' ')[0] + ' ' + other}\n"
            for n in node_guard))
    elif fault == "wrong_user":
        user = "nobody-such-user"
    # A frozen node is noticed after 3 keepalives without an answer: 3 x 2 s here.
    d = Ugrod(short_tmp, config=write_config(short_tmp / "c.yaml", node_guard, known_hosts=known,
                                             user=user, keepalive_s=2), grace_s=2.0)
    d.start()
    try:
        if fault == "stopped":
            bad.stop()
        elif fault == "paused":
            bad.pause()
        status, body = d.api("POST", "/v1/jobs", {"name": "f", "nodes": 3, "torchrun": False,
                                                  "argv": ["sleep", "60"]})
        assert status == 201, body
        # A node ugrod cannot reach is `unreachable` and the job waits, saying why; one that
        # went away after its last check may still be placed on: that attempt then fails
        # naming it. Either way the one line names the node and the problem.
        deadline = time.monotonic() + 150
        while True:
            job = d.api("GET", "/v1/jobs/f")[1]["job"]
            reason = job["reason"] if job["state"] == "failed" else job["waiting_reason"]
            if job["state"] == "failed" or (job["state"] == "queued"
                                            and f"{bad.name} is unreachable" in reason
                                            and "not contacted" not in reason):
                break
            assert time.monotonic() < deadline, (job, d.log())
            time.sleep(0.2)
        if fault in ("unknown_key", "changed_key", "wrong_user"):
            assert job["state"] == "queued", job  # never placed on a node it cannot reach
        if fault == "wrong_user":
            assert "node" in reason  # every node refuses this user
        else:
            assert bad.name in reason, reason
        expect = {"unknown_key": "not in", "changed_key": "CHANGED", "wrong_user": "user",
                  "stopped": "", "paused": ""}[fault]
        assert expect in reason, reason
        wait_no_job_processes("f", timeout_s=10)
    finally:
        d.stop()
        bad.resume() if fault == "paused" else None
