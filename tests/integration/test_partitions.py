"""Real partitions: one sshd node's SSH path cut (iptables DROP, tests/partition.py) while
its ranks still reach the others, on three sshd nodes with one fake GPU each.

What must hold: a rank that may have started during a cut is fenced (its GPU booked again
only once ugrod has confirmed on the node that it is gone, and a rank found running for no
live attempt is killed and recorded as ``rank_fenced``); a cut of the rank-0 node's or of a
worker's SSH path does not stop a job that keeps training; a node gone longer than the
job's tolerance does, and its rank's log is back-filled after the heal; progress survives
a ugrod restart during a cut; and a node that answers again is schedulable at once. No GPU
is ever used by two attempts, as seen from the processes on the nodes (their UGRO_ATTEMPT
and CUDA_VISIBLE_DEVICES), not only from the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Ugrod, _kill_leftovers
from tests.partition import Partitions
from tests.sshd_nodes import SshdCluster, SshdNode, processes_with_env

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train_ddp.py")
FAKE_DIR = ROOT / "tests" / "fake_nvidia_smi"
PY = sys.executable
SMALL = ["--samples", "4096", "--batch-size", "16"]
pytestmark = pytest.mark.timeout(200)


def cluster_config(path: Path, nodes: SshdCluster) -> Path:
    """Fast health checks (a breaker opens in a few seconds), 1 s SSH keepalives (a dead
    link is dropped in ~3 s), one 12 GB GPU per node (the fake nvidia-smi agrees)."""
    cfg: dict[str, Any] = {
        "cluster": {"name": "part", "known_hosts": str(nodes.known_hosts),
                    "rdzv_port_range": [43000, 43999], "ssh_keepalive_s": 1},
        "nodes": {
            n.name: {"host": n.host, "port": n.port, "user": n.user,
                     "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                     "transport": "ssh", "python": PY, "rank": i,
                     "gpus": [{"model": "RTX 4070", "vram_gb": 12}]}
            for i, n in enumerate(nodes)},
        "metrics": {"enabled": False},
        "health": {"check_timeout_s": 2,
                   "intervals": {"active_s": 1, "recent_s": 1, "idle_s": 1, "long_idle_s": 1},
                   "thresholds": {"latency_ms": {"warn": 5000, "crit": 10000}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def gpus(short_tmp: Path, node_guard: SshdCluster,
         partition: Partitions) -> Iterator[tuple[Ugrod, SshdCluster, Partitions]]:
    """A ugrod over the three sshd nodes (one fake GPU each), every node inventoried."""
    for n in node_guard:
        shutil.copy(FAKE_DIR / "nvidia-smi", n.bin_dir / "nvidia-smi")
        (n.bin_dir / "state.json").write_text(
            (FAKE_DIR / "scenarios" / "one_gpu.json").read_text())
    d = Ugrod(short_tmp, config=cluster_config(short_tmp / "cluster.yaml", node_guard),
              grace_s=2.0)
    d.start()
    try:
        wait_for("every node inventoried", lambda: all(
            n["health"] == "healthy" and len(n["gpus"]) == 1 for n in nodes(d).values()),
            timeout_s=40, d=d)
        yield d, node_guard, partition
    finally:
        partition.heal_all()
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        for n in node_guard:
            _kill_leftovers(n.work_dir)
            for f in ("nvidia-smi", "state.json"):
                (n.bin_dir / f).unlink(missing_ok=True)


# ---- helpers ----------------------------------------------------------------------------


def wait_for(what: str, pred: Callable[[], Any], timeout_s: float = 60.0,
             d: Ugrod | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    got: Any = None
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {got!r})\n"
                         f"{d.log() if d else ''}")


def submit(d: Ugrod, name: str, argv: list[str], **kw: Any) -> None:
    """Submit a job; its ranks import this checkout's exporters (the heartbeats)."""
    kw.setdefault("env", {"PYTHONPATH": str(ROOT)})
    status, body = d.api("POST", "/v1/jobs", {"name": name, "argv": argv, **kw})
    assert status == 201, body


def job(d: Ugrod, name: str) -> dict[str, Any]:
    status, body = d.api("GET", f"/v1/jobs/{name}")
    assert status == 200, body
    return body["job"]  # type: ignore[no-any-return]


def nodes(d: Ugrod) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in d.api("GET", "/v1/nodes")[1]["nodes"]}


def events(d: Ugrod, name: str) -> list[dict[str, Any]]:
    status, raw = d.api("GET", f"/v1/events?job={name}")
    assert status == 200
    return [json.loads(line) for line in raw.splitlines()]


def of_type(d: Ugrod, name: str, kind: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events(d, name) if e["type"] == kind]


def wait_step(d: Ugrod, name: str, step: int, timeout_s: float = 90) -> int:
    def reached() -> int | None:
        j = job(d, name)
        assert j["state"] in ("queued", "starting", "running"), j
        got = j["metrics"].get("step")
        return int(got) if isinstance(got, int | float) and got >= step else None
    return int(wait_for(f"{name} at step {step}", reached, timeout_s, d))


def run_dir(node: SshdNode, name: str, attempt: int, rank: int) -> Path:
    return node.work_dir / "jobs" / name / f"attempt-{attempt}" / f"rank-{rank}"


def ranks_on(node: SshdNode, name: str, attempt: int | None = None) -> list[int]:
    """Live processes of the job's ranks on one node (by their run dir there)."""
    where = f"{node.work_dir}/jobs/{name}/" + (f"attempt-{attempt}/" if attempt else "")
    return processes_with_env(f"UGRO_RUN_DIR={where}".encode(), prefix=True)


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw.split(b"\0") if e)


class GpuWatch:
    """Samples the rank processes on the nodes every 0.1 s: which attempt uses which GPU
    (UGRO_ATTEMPT and CUDA_VISIBLE_DEVICES of the live processes). Two attempts on one GPU
    at the same moment is a double booking."""

    def __init__(self, cluster: SshdCluster) -> None:
        self.roots = {n.name: f"{n.work_dir}/jobs/" for n in cluster}
        self.seen: set[tuple[str, int, str, int]] = set()  # (node, gpu, job, attempt)
        self.shared: list[dict[tuple[str, int], set[tuple[str, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        users: dict[tuple[str, int], set[tuple[str, int]]] = {}
        for pid in processes_with_env(b"UGRO_RUN_DIR=", prefix=True):
            env = environ(pid)
            node = next((n for n, root in self.roots.items()
                         if env.get("UGRO_RUN_DIR", "").startswith(root)), None)
            devices = env.get("CUDA_VISIBLE_DEVICES", "")
            if node is None or not devices or "UGRO_ATTEMPT" not in env:
                continue
            who = (env.get("UGRO_JOB_ID", "?"), int(env["UGRO_ATTEMPT"]))
            for gpu in devices.split(","):
                users.setdefault((node, int(gpu)), set()).add(who)
                self.seen.add((node, int(gpu), *who))
        double = {k: v for k, v in users.items() if len(v) > 1}
        if double:
            self.shared.append(double)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def wrapper_session(node: SshdNode) -> int:
    """The pid of the node's long-lived ``rank_wrapper.py serve`` process."""
    wrapper = f"{node.work_dir}/.ugro/rank_wrapper.py".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wrapper in argv and b"serve" in argv:
            return int(entry)
    raise AssertionError(f"no rank wrapper session on {node.name}")


def unread_input(pid: int) -> int:
    """Bytes waiting on the process's stdin (a pipe from sshd) that it has not read."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)
    finally:
        os.close(fd)


def node_copy(node: SshdNode, name: str, attempt: int, rank: int, file: str) -> bytes:
    return (run_dir(node, name, attempt, rank) / file).read_bytes()


def central(d: Ugrod, name: str, file: str) -> bytes:
    return (d.state_dir / "jobs" / name / file).read_bytes()


# ---- 1, 4, 6: a cut during launch ----------------------------------------------------


def test_a_rank_started_during_a_cut_is_fenced_before_its_gpu_is_booked_again(
        gpus: tuple[Ugrod, SshdCluster, Partitions]) -> None:
    """The rank wrapper on node0 starts the rank while the link is cut (its answer is
    lost): the launch fails on node0 (failed_node, no-progress budget kept), node0 is
    drained until ugrod has confirmed there that attempt 1 is gone, and it is killed and
    recorded as soon as node0 answers; only then does attempt 2 get the GPU."""
    d, cluster, partition = gpus
    node0 = cluster[0]
    submit(d, "warm", [PY, "-c", "pass"], gpus_per_node=1, node_names=["node0"])
    assert d.wait_job("warm", timeout_s=60)["state"] == "succeeded"
    session = wrapper_session(node0)  # kept open by ugrod for the next start
    with GpuWatch(cluster) as watch:
        with stopped(session):
            submit(d, "orphan", [PY, TRAIN, "--steps", "100000", "--sleep-per-step", "0.1",
                                 *SMALL], gpus_per_node=1, node_names=["node0"],
                   max_retries=1, retry_backoff_s=1)
            wait_for("the start request on node0", lambda: unread_input(session) > 0, 60, d)
            partition.cut(node0)  # the session now starts the rank; its answer is dropped
        wait_for("attempt 1 running on node0 unseen", lambda: ranks_on(node0, "orphan", 1),
                 30, d)
        ended = wait_for("attempt 1 ended", lambda: of_type(d, "orphan", "job_ended"), 60, d)[0]
        assert ended["outcome"] == "retrying", ended
        assert ended["failed_node"] == "node0", ended
        assert "budget kept" in ended["reason"], ended["reason"]
        drain = nodes(d)["node0"]
        assert drain["drained"] and "orphan" in drain["drain_reason"], drain
        time.sleep(3)  # the retry is due, but node0 is fenced: nothing placed there
        assert job(d, "orphan")["state"] == "retrying"
        assert ranks_on(node0, "orphan", 1), "the orphan died during the cut: no test"
        healed = time.monotonic()
        partition.heal(node0)
        fenced = wait_for("rank_fenced", lambda: of_type(d, "orphan", "rank_fenced"), 30, d)
        back = time.monotonic() - healed
        assert fenced[0]["attempt"] == 1 and fenced[0]["node"] == "node0", fenced
        assert back < 10, f"fenced {back:.1f} s after the heal"
        wait_for("attempt 2 running", lambda: job(d, "orphan")["state"] == "running"
                 and job(d, "orphan")["attempt"] == 2, 30, d)
        assert not ranks_on(node0, "orphan", 1)
        assert not nodes(d)["node0"]["drained"]
        time.sleep(1)
    assert ("node0", 0, "orphan", 1) in watch.seen and ("node0", 0, "orphan", 2) in watch.seen
    assert not watch.shared, watch.shared[:3]
    status = d.ctl("status", "orphan", check=True).stdout
    assert "fenced" in status and "attempt 1" in status, status
    why = d.ctl("why", "orphan", check=True).stdout
    assert "fenced" in why, why
    assert "next try in -" not in d.log()
    assert d.ctl("cancel", "orphan").returncode == 0
    assert d.wait_job("orphan", timeout_s=30)["state"] == "cancelled"


# ---- 2, 5: cuts that a healthy job rides out ----------------------------------------


def test_cuts_of_the_rank0_node_and_of_a_worker_leave_a_ddp_job_running(
        gpus: tuple[Ugrod, SshdCluster, Partitions]) -> None:
    """DDP over node0 (rank 0) and node1: each SSH path is cut in turn for several times
    the job's silence limit (its stall timeout, 4 s) while the ranks keep training; the
    job runs on, and after each heal the central logs hold all the node wrote meanwhile."""
    d, cluster, partition = gpus
    submit(d, "ddp", [TRAIN, "--steps", "100000", "--sleep-per-step", "0.1", *SMALL],
           nodes=2, gpus_per_node=1, torchrun=True, node_names=["node0", "node1"],
           stall_timeout_s=4, max_retries=0)
    wait_step(d, "ddp", 3, timeout_s=120)
    for rank, node in ((0, cluster[0]), (1, cluster[1])):
        with partition.cutting(node):
            wait_for(f"{node.name} unreachable",
                     lambda n=node: nodes(d)[n.name]["health"] == "unreachable", 20, d)
            until = time.monotonic() + 6  # the breaker's first backoff is 8-10 s
            while time.monotonic() < until:
                j = job(d, "ddp")
                assert j["state"] == "running" and not j["stopping"], (j["reason"], d.log())
                assert nodes(d)[node.name]["breaker"] != "half-open"  # it has just opened
                time.sleep(0.5)
            during = node_copy(node, "ddp", 1, rank, "rank.log")
            metrics = node_copy(cluster[0], "ddp", 1, 0, "metrics.jsonl")
        if rank == 0:
            assert len(during) > len(central(d, "ddp", "rank_0.log")), \
                "rank 0 printed nothing unseen during the cut: no test"
        wait_for(f"{node.name} back", lambda n=node: nodes(d)[n.name]["health"]
                 != "unreachable", 15, d)
        wait_for(f"rank {rank}'s log and metrics from the cut in the central copy",
                 lambda r=rank, log=during, m=metrics:
                 central(d, "ddp", f"rank_{r}.log").startswith(log)
                 and central(d, "ddp", "metrics.jsonl").startswith(m), 30, d)
    assert job(d, "ddp")["state"] == "running"
    kinds = [e["type"] for e in events(d, "ddp")]
    assert "job_stopping" not in kinds, kinds
    assert d.ctl("cancel", "ddp").returncode == 0
    assert d.wait_job("ddp", timeout_s=30)["state"] == "cancelled"


# ---- 1, 2, 5: a node gone longer than the job's tolerance --------------------------------


def test_a_node_gone_past_the_tolerance_is_fenced_and_its_log_back_filled(
        gpus: tuple[Ugrod, SshdCluster, Partitions]) -> None:
    """Two independent ranks; node1 is cut past the job's tolerance (6 s) while its rank
    keeps training: the job is stopped, node1 fenced; after the heal its rank is killed
    (rank_fenced) and its log and metrics are back-filled from node1's copy."""
    d, cluster, partition = gpus
    node1 = cluster[1]
    submit(d, "pair", [PY, TRAIN, "--steps", "100000", "--sleep-per-step", "0.1", *SMALL],
           nodes=2, gpus_per_node=1, node_names=["node0", "node1"],
           unreachable_tolerance_s=6, max_retries=0)
    wait_step(d, "pair", 3)
    with partition.cutting(node1):
        done = d.wait_job("pair", ("failed",), timeout_s=40)
        assert "node1" in done["reason"] and "tolerance" in done["reason"], done["reason"]
        assert "could not be confirmed gone" in done["reason"], done["reason"]
        assert nodes(d)["node1"]["drained"]
        assert ranks_on(node1, "pair", 1), "node1's rank must outlive the stop (unseen)"
        time.sleep(2)  # it trains on, unseen
    fenced = wait_for("rank_fenced", lambda: of_type(d, "pair", "rank_fenced"), 30, d)
    assert fenced[0]["rank"] == 1 and fenced[0]["node"] == "node1", fenced
    wait_for("node1 undrained", lambda: not nodes(d)["node1"]["drained"], 15, d)
    assert not ranks_on(node1, "pair")

    def complete() -> bool:
        return (central(d, "pair", "rank_1.log") == node_copy(node1, "pair", 1, 1, "rank.log")
                and central(d, "pair", "metrics_rank_1.jsonl")
                == node_copy(node1, "pair", 1, 1, "metrics.jsonl"))
    wait_for("rank 1's log and metrics back-filled", complete, 20, d)
    why = d.ctl("why", "pair", check=True).stdout
    assert "fenced" in why, why


# ---- 4, 6: a ugrod restart during a cut --------------------------------------------------


def test_progress_survives_a_restart_during_a_cut(
        gpus: tuple[Ugrod, SshdCluster, Partitions]) -> None:
    """kill -9 of ugrod, node2 cut, ugrod started again: it serves at once, knows the
    job's last step from its files, ends the attempt with the real silence (not the
    time since the restart) and made_progress, and keeps the no-progress budget."""
    d, cluster, partition = gpus
    node2 = cluster[2]
    submit(d, "solo", [PY, TRAIN, "--steps", "100000", "--sleep-per-step", "0.1", *SMALL],
           gpus_per_node=1, node_names=["node2"], stall_timeout_s=6, max_retries=1,
           retry_backoff_s=1)
    step = wait_step(d, "solo", 5)
    d.kill9()
    partition.cut(node2)
    d.start()
    ready = re.findall(r"ready on .* in ([0-9.]+) s", d.log())
    assert ready and float(ready[-1]) < 1.0, d.log()
    ended = wait_for("attempt 1 ended", lambda: of_type(d, "solo", "job_ended"), 60, d)[0]
    assert ended["last_step"] is not None and ended["last_step"] >= step, ended
    assert ended["made_progress"], ended
    assert ended["outcome"] == "retrying" and "budget kept" in ended["reason"], ended
    # The silence it states runs from the last step ugrod saw (before the kill), not
    # from its restart: as long as it really was when the attempt was stopped.
    last_seen = max(json.loads(line)["ts"] for line in central(d, "solo", "metrics.jsonl")
                    .splitlines() if b'"step"' in line)
    stopped = next(e for e in events(d, "solo") if e["type"] == "job_stopping")
    silent = datetime.fromisoformat(stopped["ts"].replace("Z", "+00:00")).timestamp() \
        - last_seen
    said = re.search(r"has not advanced for (\d+) s", ended["reason"])
    assert said and int(said.group(1)) >= silent - 2, (silent, ended["reason"])
    partition.heal(node2)
    wait_for("rank_fenced", lambda: of_type(d, "solo", "rank_fenced"), 30, d)
    wait_for("attempt 2 running", lambda: job(d, "solo")["attempt"] == 2
             and job(d, "solo")["state"] == "running", 40, d)
    assert d.ctl("cancel", "solo").returncode == 0
    assert d.wait_job("solo", timeout_s=30)["state"] == "cancelled"
