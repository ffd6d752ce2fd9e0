"""The scheduler end to end: a real ugrod, three real sshd nodes, the real ugroctl.

Each node has one (fake) 12 GB GPU: the config states it and a fake nvidia-smi on
the node's PATH reports it, so the inventory agrees. Jobs are examples/train_ddp.py
under torchrun (one process, gloo on CPU) where training matters, and a short
Python sleep where only the scheduling does. Several scenarios share one ugrod
and run side by side on different nodes to keep the wall time down.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Ugrod, _kill_leftovers
from tests.sshd_nodes import SshdCluster, wait_no_job_processes

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train_ddp.py")
FAKE_DIR = ROOT / "tests" / "fake_nvidia_smi"
PY = sys.executable
USER = getpass.getuser()
pytestmark = pytest.mark.timeout(180)


def cluster_config(path: Path, nodes: SshdCluster, *, only: tuple[int, ...] = (0, 1, 2),
                   scheduler: dict[str, Any] | None = None) -> Path:
    """cluster.yaml for the sshd nodes, each with the one GPU the fake nvidia-smi reports."""
    cfg: dict[str, Any] = {
        # torchrun's ports away from the default range other test sessions on this
        # machine use (every sshd "node" shares its port space)
        "cluster": {"name": "sched", "known_hosts": str(nodes.known_hosts),
                    "rdzv_port_range": [42000, 42999]},
        "nodes": {
            n.name: {"host": n.host, "port": n.port, "user": n.user,
                     "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                     "transport": "ssh", "python": PY, "rank": i,
                     "gpus": [{"model": "RTX 4070", "vram_gb": 12}]}
            for i, n in enumerate(nodes) if i in only},
        "metrics": {"enabled": False},
    }
    if scheduler:
        cfg["scheduler"] = scheduler
    path.write_text(yaml.safe_dump(cfg))
    return path


class GpuCluster(Ugrod):
    """A ugrod over the sshd nodes; ``nodes`` are those nodes."""

    def __init__(self, base: Path, nodes: SshdCluster) -> None:
        super().__init__(base, config=cluster_config(base / "cluster.yaml", nodes), grace_s=2.0)
        self.nodes = nodes


@pytest.fixture
def gpu_cluster(short_tmp: Path, node_guard: SshdCluster) -> Iterator[GpuCluster]:
    """A ugrod over the three sshd nodes, one 12 GB GPU each (fake nvidia-smi)."""
    for n in node_guard:
        n.bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(FAKE_DIR / "nvidia-smi", n.bin_dir / "nvidia-smi")
        (n.bin_dir / "state.json").write_text(
            (FAKE_DIR / "scenarios" / "one_gpu.json").read_text())
    d = GpuCluster(short_tmp, node_guard)
    d.start()
    try:
        # ugrod serves before slow nodes are inventoried: wait until all three are
        def inventoried() -> list[dict[str, Any]] | None:
            nodes = d.api("GET", "/v1/nodes")[1]["nodes"]
            return nodes if all(n["health"] != "unreachable" and [
                g["vram_bytes"] >> 30 for g in n["gpus"]] == [11] for n in nodes) else None
        nodes = wait_for("every node inventoried", inventoried, timeout_s=30)
        for n in nodes:  # the inventory read from the node agrees with the config
            assert n["inventory_mismatch"] is None, n
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        for n in node_guard:
            _kill_leftovers(n.work_dir)
            for f in ("nvidia-smi", "state.json"):
                (n.bin_dir / f).unlink(missing_ok=True)


# ---- helpers ------------------------------------------------------------------------


def submit(d: Ugrod, name: str, argv: list[str], **kw: Any) -> dict[str, Any]:
    status, body = d.api("POST", "/v1/jobs", {"name": name, "argv": argv, **kw})
    assert status == 201, body
    return body["job"]  # type: ignore[no-any-return]


def sleeper(seconds: float) -> list[str]:
    return [PY, "-c", f"import time; time.sleep({seconds})"]


def train(d: Ugrod, name: str, *args: str, gpus: int = 1, **kw: Any) -> dict[str, Any]:
    """examples/train_ddp.py under torchrun, one process per node."""
    return submit(d, name, [TRAIN, "--samples", "256", "--batch-size", "16", *args],
                  gpus_per_node=gpus, torchrun=True, **kw)


def job(d: Ugrod, name: str) -> dict[str, Any]:
    status, body = d.api("GET", f"/v1/jobs/{name}")
    assert status == 200, body
    return body["job"]  # type: ignore[no-any-return]


def wait_for(what: str, pred: Callable[[], Any], timeout_s: float = 60.0,
             d: Ugrod | None = None, seen: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {seen or got!r})\n"
                         f"{d.log() if d else ''}")


def wait_step(d: Ugrod, name: str, step: int, attempt: int = 1, timeout_s: float = 60) -> None:
    def reached() -> bool:
        j = job(d, name)
        assert j["state"] in ("queued", "starting", "running", "retrying"), (j["reason"], j)
        got = j["metrics"].get("step")
        return j["attempt"] == attempt and isinstance(got, int | float) and got >= step
    wait_for(f"{name} attempt {attempt} at step {step}", reached, timeout_s, d)


def queue(d: Ugrod) -> dict[str, dict[str, Any]]:
    status, body = d.api("GET", "/v1/queue")
    assert status == 200
    return {e["job"]["id"]: e for e in body["queue"]}


def why(d: Ugrod, name: str) -> list[str]:
    status, body = d.api("GET", f"/v1/jobs/{name}/why")
    assert status == 200, body
    return [h["text"] for h in body["history"]]


def events(d: Ugrod, name: str) -> list[dict[str, Any]]:
    status, raw = d.api("GET", f"/v1/events?job={name}")
    assert status == 200
    return [json.loads(line) for line in raw.splitlines()]


def rank_log(d: Ugrod, name: str, rank: int = 0) -> str:
    return (d.state_dir / "jobs" / name / f"rank_{rank}.log").read_text(errors="replace")


OOM_SCRIPT = """\
import sys
print("step 1/10 loss 0.5", flush=True)
print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
      "11.72 GiB total capacity)", file=sys.stderr, flush=True)
sys.exit(1)
"""


def checkpoint_step(path: str) -> int:
    m = re.search(r"step-(\d+)\.pt$", path)
    assert m, path
    return int(m.group(1))


# ---- failure handling ----------------------------------------------------------------


def test_retry_resume_checkpoint_and_crash_loop(gpu_cluster: GpuCluster) -> None:
    """A killed job resumes from its newest checkpoint on another node; `checkpoint`
    saves one on request; a cancelled job resumed with --set restarts from its
    checkpoint with the new value; a crash loop stops after its budget."""
    d = gpu_cluster
    train(d, "rt", "--steps", "40", "--sleep-per-step", "0.15", "--checkpoint-every", "10",
          max_retries=2, retry_backoff_s=0.5)
    train(d, "rs", "--steps", "400", "--sleep-per-step", "0.15", "--checkpoint-every", "5",
          "--lr", "0.003")
    submit(d, "loop", [TRAIN, "--samples", "64", "--fail-at-step", "1"], torchrun=True,
           max_retries=2, retry_backoff_s=0.2)
    oom = d.base / "oom.py"
    oom.write_text(OOM_SCRIPT)
    submit(d, "oom", [str(oom), "--batch-size", "32"], torchrun=True)

    # -- checkpoint on request, then kill rank 0 of rt mid-run
    wait_step(d, "rt", 3)
    before = job(d, "rt")["checkpoints"]
    res = d.ctl("--json", "checkpoint", "rt", "--wait", "30")
    assert res.returncode == 0, res.stderr
    new = [c for c in json.loads(res.stdout)["checkpoints"] if c not in before]
    assert new, (before, res.stdout)
    saved = {e["data"]["path"]: e["data"]["step"] for e in events(d, "rt")
             if e["type"] == "checkpoint_saved"}
    assert saved[new[0]] == checkpoint_step(new[0]) >= 3, saved
    wait_for("the requested checkpoint in the log", lambda: "(requested)" in rank_log(d, "rt"),
             10, d)
    wait_step(d, "rt", 12)
    first = job(d, "rt")
    first_node = first["nodes"][0]
    newest = max(first["checkpoints"], key=checkpoint_step)
    resumed_step = checkpoint_step(newest)
    assert resumed_step >= 10
    os.killpg(first["ranks"][0]["pid"], signal.SIGKILL)

    # -- cancel rs, resume it with a changed learning rate
    wait_step(d, "rs", 6)
    res = d.ctl("cancel", "rs")
    assert res.returncode == 0, res.stderr
    cancelled = d.wait_job("rs", ("cancelled",), timeout_s=60)
    rs_ckpt = max(cancelled["checkpoints"], key=checkpoint_step)
    res = d.ctl("--json", "resume", "rs", "--set", "lr=0.001")
    assert res.returncode == 0, res.stderr
    resumed = json.loads(res.stdout)
    assert resumed["attempt"] == 1 and resumed["state"] == "queued"
    assert resumed["argv"][resumed["argv"].index("--lr") + 1] == "0.001"
    rs_step = checkpoint_step(resumed["resume_from"])  # the newest on the node
    assert rs_step >= checkpoint_step(rs_ckpt), (resumed, rs_ckpt)

    # -- rt: retried on another node, from the newest checkpoint, made progress
    done = d.wait_job("rt", timeout_s=90)
    assert done["state"] == "succeeded", (done["reason"], rank_log(d, "rt"))
    assert done["attempt"] == 2 and done["nodes"][0] != first_node, done
    # rank 0's new node resumed from its own copy of the checkpoint saved on the old one
    new_node = next(n for n in d.nodes if n.name == done["nodes"][0])
    log = rank_log(d, "rt")
    assert f"resumed from step {resumed_step} ({new_node.work_dir}/jobs/rt/checkpoints/" \
        f"step-{resumed_step:06d}.pt)" in log, log
    story = why(d, "rt")
    text = "\n".join(story)
    assert f"rank 0 on {first_node} exited with code" in text, text
    assert "retry 1 (made progress: budget kept)" in text, text
    placed2 = next(t for t in story if t.startswith("attempt 2 placed on"))
    assert done["nodes"][0] in placed2 and f"avoiding {first_node}" in placed2, placed2
    assert f"from step {resumed_step}" in placed2, placed2
    told = d.ctl("why", "rt", check=True).stdout
    assert "rt: succeeded" in told and "retry at" in told, told
    assert re.search(rf"attempt 2 placed on {done['nodes'][0]} \(GPU 0\), resuming from step "
                     rf"{resumed_step} ", told), told
    steps = [json.loads(x)["step"] for x in
             (d.state_dir / "jobs" / "rt" / "metrics.jsonl").read_text().splitlines()
             if "loss" in x]
    assert steps[-1] == 40 and min(s for s in steps if s > resumed_step) == resumed_step + 1

    # -- rs: attempt 2 from its checkpoint with lr=0.001
    wait_step(d, "rs", rs_step + 2, attempt=2)
    rs = job(d, "rs")
    assert rs["metrics"]["lr"] == pytest.approx(0.001)
    assert f"resumed from step {rs_step} (" in rank_log(d, "rs")
    config = json.loads((d.state_dir / "jobs" / "rs" / "config.json").read_text())
    assert config["attempt"] == 2 and "0.001" in config["spec"]["argv"], config
    lrs = [json.loads(x)["lr"] for x in
           (d.state_dir / "jobs" / "rs" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in x]
    assert lrs[0] == pytest.approx(0.003) and lrs[-1] == pytest.approx(0.001), lrs
    assert any("resumed by" in t and "lr=0.001" in t for t in why(d, "rs"))
    d.ctl("cancel", "rs", check=True)

    # -- the crash loop stopped after its budget, with a clear reason
    loop = d.wait_job("loop", ("failed",), timeout_s=60)
    assert loop["attempt"] == 3, loop
    assert "crash loop" in loop["reason"] and "2 retries without progress" in loop["reason"]
    # the script's own last words, not torchrun's report about it
    assert "failing at step 1 as asked" in loop["reason"], loop["reason"]
    assert "ChildFailedError" not in loop["reason"], loop["reason"]
    res = d.ctl("why", "loop")
    assert res.returncode == 0 and "crash loop" in res.stdout, res.stdout
    d.wait_job("rs", ("cancelled",), timeout_s=60)

    # -- CUDA out of memory (under torchrun) is recognised, with rank and node; resume
    # offers half the batch size
    failed = d.wait_job("oom", timeout_s=60)
    node = failed["nodes"][0]
    assert failed["state"] == "failed" and failed["reason"].startswith(
        f"rank 0 on {node} ran out of GPU memory (CUDA out of memory); last lines: "), failed
    assert "Tried to allocate 2.00 GiB" in failed["reason"], failed["reason"]
    res = d.ctl("--json", "resume", "oom", "-y")
    assert res.returncode == 0, res.stderr
    assert "ran out of GPU memory" in res.stderr, res.stderr
    again = json.loads(res.stdout)
    assert again["argv"][-2:] == ["--batch-size", "16"], again
    assert d.wait_job("oom", ("failed",), timeout_s=60)["attempt"] == 2
    for name in ("rt", "rs", "loop", "oom"):
        wait_no_job_processes(name, timeout_s=10)


# ---- the queue ---------------------------------------------------------------------


GATED = [PY, "-c", "import os, time\nwhile not os.path.exists(os.environ['GATE']): "
         "time.sleep(0.05)"]


def gated_job(d: Ugrod, name: str, node: str = "node0", **kw: Any) -> None:
    """A one-GPU job on ``node`` that runs until ``open_gate(d, name)``; one argv for all."""
    submit(d, name, GATED, gpus_per_node=1, node_names=[node], torchrun=False,
           env={"GATE": str(d.base / f"gate-{name}")}, **kw)


def open_gate(d: Ugrod, name: str) -> None:
    (d.base / f"gate-{name}").touch()


def test_contention_reasons_estimates_priority_and_hold(gpu_cluster: GpuCluster) -> None:
    """The second job for a GPU waits with the right reason and an estimated start, and
    starts when the first ends; priority, hold and release order the rest."""
    d = gpu_cluster
    gated_job(d, "a", expected_runtime_s=30)
    a = d.wait_job("a", ("running",), timeout_s=60)
    gated_job(d, "b")
    res = d.ctl("submit", "--name", "c", "--gpus-per-node", "1", "--node", "node0", "--hold",
                "--no-torchrun", "--env", f"GATE={d.base / 'gate-c'}", "--", *GATED)
    assert res.returncode == 0, res.stderr
    gated_job(d, "dd")
    gated_job(d, "e")
    d.ctl("priority", "e", "5", check=True)
    d.ctl("hold", "dd", check=True)
    seen: list[Any] = []

    def settled() -> dict[str, dict[str, Any]] | None:
        q = queue(d)
        seen[:] = [q]
        reasons = [q[j]["reason"] for j in ("e", "b", "c", "dd") if j in q]
        ok = len(reasons) == 4 and all("next planner round" not in r for r in reasons) \
            and "held" in q["dd"]["reason"]
        return q if ok else None
    q = wait_for("queue reasons", settled, 20, d, seen)
    assert [q[j]["position"] for j in ("e", "b", "c", "dd")] == [1, 2, 3, 4], q
    assert q["e"]["reason"].startswith("waiting for a node with a GPU among node0: "
                                       "node0 busy with a until about "), q["e"]
    assert q["c"]["reason"].startswith("held: `ugroctl release c`"), q["c"]
    # a's run time is known (expected_runtime_s): e, first in line, starts when a ends
    est = q["e"]["estimated_start"]
    assert est is not None, q["e"]
    assert abs(ev_ts(est) - (ev_ts(a["running_at"]) + 30)) < 1.0, (est, a)
    assert q["b"]["estimated_start"] is None, q["b"]  # e's run time is unknown
    text = d.ctl("queue", check=True).stdout
    row_e = next(line for line in text.splitlines() if re.match(r"\s*1\s+e\s", line))
    assert "busy with a" in row_e and not row_e.rstrip().endswith("-"), text
    assert "held" in next(line for line in text.splitlines() if " dd " in line), text
    d.ctl("release", "c", check=True)

    # e runs when a ends; a's run time now makes the typical run time of this command
    open_gate(d, "a")
    assert d.wait_job("a", timeout_s=60)["state"] == "succeeded"
    d.wait_job("e", ("running",), timeout_s=60)
    seen.clear()

    def b_estimated() -> dict[str, Any] | None:
        qb = queue(d)["b"]
        seen[:] = [qb]
        return qb if qb["estimated_start"] is not None else None
    qb = wait_for("an estimated start for b", b_estimated, 20, d, seen)
    assert "node0 busy with e" in qb["reason"], qb
    open_gate(d, "e")
    # then b; c kept its place ahead of dd while it was held; dd waits held
    assert d.wait_job("b", ("running",), timeout_s=60)
    open_gate(d, "b")
    d.wait_job("c", ("running",), timeout_s=60)
    assert "held" in queue(d)["dd"]["reason"]
    open_gate(d, "c")
    assert d.wait_job("c", timeout_s=60)["state"] == "succeeded"
    time.sleep(0.5)
    assert job(d, "dd")["state"] == "queued"
    d.ctl("release", "dd", check=True)
    open_gate(d, "dd")
    assert d.wait_job("dd", timeout_s=60)["state"] == "succeeded"
    jobs = {j: job(d, j) for j in ("a", "b", "c", "dd", "e")}
    order = sorted(jobs, key=lambda j: jobs[j]["started_at"])
    assert order == ["a", "e", "b", "c", "dd"], order
    for prev, nxt in itertools.pairwise(order):  # one GPU: never two at once
        assert ev_ts(jobs[nxt]["started_at"]) >= ev_ts(jobs[prev]["ended_at"]), (prev, nxt)
    story = why(d, "b")
    for holder in ("a", "e"):
        assert any(t.startswith("waiting: waiting for a node with a GPU among node0: node0 "
                                f"busy with {holder}") for t in story), story
    assert any(t.startswith("attempt 1 placed on node0 (GPU 0)") for t in story), story
    assert any("priority set to 5" in t for t in why(d, "e"))
    assert [t.split(" by ")[0] for t in why(d, "dd") if t.startswith(("held", "released"))] \
        == ["held", "released"]


def test_drain_chains_and_jobs_that_can_never_fit(gpu_cluster: GpuCluster) -> None:
    """Drain lets the running job finish and keeps new work off the node until undrain;
    --after chains run in order (and never after a failure); impossible jobs are refused."""
    d = gpu_cluster
    # -- refused at submit, with why
    for opts, why_not in [
        (["--gpus-per-node", "2"], "needs 2 GPUs on one node; no node has them"),
        (["--gpus-per-node", "1", "--min-vram", "16"], "needs a GPU ≥ 16 GB; no node has one"),
        (["--gpus-per-node", "1", "--nodes", "4"],
         "needs 4 nodes with a GPU; only node0, node1 and node2 have one"),
        (["--node", "node9"], "needs node node9, which is not in the cluster"),
    ]:
        res = d.ctl("submit", "--name", "never", *opts, "--no-torchrun", "--", PY, "-c", "0")
        assert res.returncode == 1, (opts, res.stdout, res.stderr)
        assert f"job can never run here: {why_not}" in res.stderr, res.stderr
        assert res.stderr.startswith("ugroctl:"), res.stderr
    assert d.api("GET", "/v1/jobs/never")[0] == 404

    # -- drain while a job runs
    gated_job(d, "d1", node="node1")
    d.wait_job("d1", ("running",), timeout_s=60)
    d.ctl("drain", "node1", "--reason", "replacing fan", check=True)
    node1 = next(n for n in d.ctl_json("nodes")["nodes"] if n["name"] == "node1")
    assert node1["state"] == "draining" and node1["jobs"] == ["d1"], node1
    gated_job(d, "d2", node="node1")
    submit(d, "cpu1", sleeper(0.1), node_names=["node1"])  # needs no GPU, only the node
    seen: list[Any] = []

    def reasons() -> list[str] | None:
        got = [job(d, j)["waiting_reason"] for j in ("d2", "cpu1")]
        seen[:] = [got]
        return got if all("draining" in r for r in got) else None
    assert wait_for("jobs waiting for the drained node", reasons, 20, d, seen) == [
        "waiting for a node with a GPU among node1: node1 is draining (replacing fan)",
        "waiting for a node among node1: node1 is draining (replacing fan)"]
    open_gate(d, "d1")
    assert d.wait_job("d1", timeout_s=60)["state"] == "succeeded"  # the running job finished
    time.sleep(1.0)
    # nothing new lands on node1, though its GPU is free now
    assert [job(d, j)["state"] for j in ("d2", "cpu1")] == ["queued", "queued"]
    assert job(d, "d2")["waiting_reason"].endswith("node1 is draining (replacing fan)")
    d.ctl("undrain", "node1", check=True)
    assert d.wait_job("d2", ("running",), timeout_s=60)["nodes"] == ["node1"]
    assert d.wait_job("cpu1", timeout_s=60)["nodes"] == ["node1"]
    open_gate(d, "d2")
    assert d.wait_job("d2", timeout_s=60)["state"] == "succeeded"

    # -- --after chains: c1 -> c2 -> c3 in order; f2 never runs after f1 fails
    gated_job(d, "c1", node="node2")
    for name, after in (("c2", "c1"), ("c3", "c2")):
        d.ctl("submit", "--name", name, "--after", after, "--no-torchrun", "--",
              *sleeper(0.1), check=True)
    submit(d, "f1", [PY, "-c", "raise SystemExit(3)"], held=True)
    d.ctl("submit", "--name", "f2", "--after", "f1", "--no-torchrun", "--", *sleeper(0.1),
          check=True)
    seen.clear()

    def c2_reason() -> str | None:
        r = job(d, "c2")["waiting_reason"]
        seen[:] = [r]
        return r if "running" in r else None
    assert wait_for("c2 waiting for c1", c2_reason, 20, d, seen) == \
        "waiting for c1 to succeed (c1 is running)"
    d.ctl("release", "f1", check=True)
    f2 = d.wait_job("f2", timeout_s=60)
    assert f2["state"] == "cancelled" and "f1 failed" in f2["reason"] \
        and "never run" in f2["reason"], f2
    assert f2["started_at"] is None
    open_gate(d, "c1")
    c3 = d.wait_job("c3", timeout_s=60)
    assert c3["state"] == "succeeded"
    c1, c2 = job(d, "c1"), job(d, "c2")
    assert ev_ts(c1["ended_at"]) <= ev_ts(c2["started_at"])
    assert ev_ts(c2["ended_at"]) <= ev_ts(c3["started_at"])
    assert any("after c1" in t for t in why(d, "c2"))


def test_user_limits_and_reload(gpu_cluster: GpuCluster) -> None:
    """Per-user GPU limits from the config hold; reload adds and removes idle nodes
    without touching running jobs, and refuses to remove a node that runs one."""
    d = gpu_cluster
    assert d.config is not None
    nodes = d.nodes
    limits = {"user_limits": {USER: {"max_gpus": 1}}}
    cluster_config(d.config, nodes, scheduler=limits)
    assert d.ctl_json("reload") == {"added": [], "removed": [], "changed": []}

    status, body = d.api("POST", "/v1/jobs", {"name": "big", "argv": sleeper(1),
                                              "nodes": 2, "gpus_per_node": 1})
    assert status == 400 and body["error"] == \
        f"job needs 2 GPUs; {USER} may use at most 1 at once", body
    submit(d, "u1", GATED, gpus_per_node=1, torchrun=False,
           env={"GATE": str(d.base / "gate-u1")})
    u1 = d.wait_job("u1", ("running",), timeout_s=60)
    submit(d, "u2", GATED, gpus_per_node=1, torchrun=False,
           env={"GATE": str(d.base / "gate-u2")})
    seen: list[Any] = []

    def u2_reason() -> str | None:
        r = job(d, "u2")["waiting_reason"]
        seen[:] = [r]
        return r or None
    assert wait_for("u2's reason", u2_reason, 20, d, seen) == \
        f"user {USER} at limit: 1 of 1 GPUs running, needs 1"

    # -- removing the node that runs u1 is refused, and nothing changes
    busy = u1["nodes"][0]
    keep = tuple(i for i, n in enumerate(nodes) if n.name != busy)
    cluster_config(d.config, nodes, only=keep, scheduler=limits)
    res = d.ctl("reload")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"cannot remove nodes that run jobs: {busy} (runs u1)" in res.stderr, res.stderr
    assert busy in {n["name"] for n in d.ctl_json("nodes")["nodes"]}

    # -- removing an idle node and adding it back leaves u1 running as it was
    idle = next(n.name for n in nodes if n.name != busy)
    cluster_config(d.config, nodes, only=tuple(i for i, n in enumerate(nodes) if n.name != idle),
                   scheduler=limits)
    assert d.ctl_json("reload") == {"added": [], "removed": [idle], "changed": []}
    assert idle not in {n["name"] for n in d.ctl_json("nodes")["nodes"]}
    cluster_config(d.config, nodes, scheduler=limits)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # the other way to reload
    back = wait_for(f"{idle} back", lambda: next(
        (n for n in d.ctl_json("nodes")["nodes"] if n["name"] == idle and n["gpus"]
         and n["gpus"][0]["uuid"]), None), 30, d)  # inventoried: the uuid comes from the node
    assert [g["vram_bytes"] >> 30 for g in back["gpus"]] == [11], back
    now = job(d, "u1")
    assert now["state"] == "running" and now["ranks"] == u1["ranks"], now
    kinds = [e["type"] for e in events(d, "u1")]
    assert kinds == ["job_submitted", "job_placed", "rank_started", "job_running"], kinds

    # -- u2 starts only when u1 has ended
    open_gate(d, "u1")
    assert d.wait_job("u1", timeout_s=60)["state"] == "succeeded"
    u2 = d.wait_job("u2", ("running",), timeout_s=60)
    assert ev_ts(u2["started_at"]) >= ev_ts(job(d, "u1")["ended_at"])
    open_gate(d, "u2")
    assert d.wait_job("u2", timeout_s=60)["state"] == "succeeded"


# ---- sweeps ------------------------------------------------------------------------


def test_sweep_of_four_trials_ranked_by_final_loss(gpu_cluster: GpuCluster) -> None:
    d = gpu_cluster
    res = d.ctl("sweep", "--name", "S", "--param", "lr=0.0003,0.01", "--param", "hidden=8,32",
                "--max-parallel", "2", "--torchrun", "--", TRAIN, "--samples", "256",
                "--batch-size", "16", "--steps", "15", "--lr", "0.1")
    assert res.returncode == 0, res.stderr
    seen: list[Any] = []

    def limited() -> list[str] | None:
        q = queue(d)
        seen[:] = [q]
        got = [e["reason"] for e in q.values() if "at its limit" in e["reason"]]
        return got if len(got) == 2 else None
    assert wait_for("two trials held back", limited, 20, d, seen) == \
        ["sweep S at its limit: 2 of 2 trials running"] * 2
    for i in range(4):
        assert d.wait_job(f"S-{i}", timeout_s=120)["state"] == "succeeded"
    doc = d.ctl_json("sweep", "status", "S")
    assert doc["sweep"]["done"] == doc["sweep"]["total"] == 4
    trials = doc["trials"]
    losses = [t["final_loss"] for t in trials]
    assert all(isinstance(x, float) for x in losses) and losses == sorted(losses), trials
    assert {(t["params"]["lr"], t["params"]["hidden"]) for t in trials} == {
        ("0.0003", "8"), ("0.0003", "32"), ("0.01", "8"), ("0.01", "32")}
    for t in trials:
        argv = job(d, t["job"])["argv"]
        assert argv[argv.index("--lr") + 1] == t["params"]["lr"]
        assert argv[argv.index("--hidden") + 1] == t["params"]["hidden"]
        lines = (d.state_dir / "jobs" / t["job"] / "metrics.jsonl").read_text().splitlines()
        last = [json.loads(x) for x in lines if '"loss"' in x][-1]
        assert last["step"] == 15 and last["loss"] == t["final_loss"], (t, last)
    text = d.ctl("sweep", "status", "S", check=True).stdout
    assert text.index(trials[0]["job"]) < text.index(trials[-1]["job"]), text


def ev_ts(iso: str) -> float:
    from ugrod.core.codec import parse_ts
    return parse_ts(iso)
