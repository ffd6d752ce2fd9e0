"""Third-party training code under UGRO on two real sshd nodes: a Hugging Face Trainer script
(with and without the one-line integration) and a Lightning script, through the real CLI.

Kept lean (transformers and lightning are slow to import): one Trainer job with the
callback, one plain Trainer job, one Lightning job, a few steps each.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Ugrod, served
from tests.integration.test_multinode import write_config
from tests.sshd_nodes import SshdCluster, wait_no_job_processes

ROOT = Path(__file__).resolve().parents[2]
HF = str(ROOT / "examples" / "train_hf.py")
PL = str(ROOT / "examples" / "train_lightning.py")
ENV = ["--env", f"PYTHONPATH={ROOT}", "--env", "HF_HUB_OFFLINE=1",
       "--env", "TRANSFORMERS_OFFLINE=1", "--env", "OMP_NUM_THREADS=1"]
pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def two_nodes(short_tmp: Path, node_guard: SshdCluster) -> Iterator[Ugrod]:
    cfg = write_config(short_tmp / "cluster.yaml", node_guard, only=[0, 1])
    with served(Ugrod(short_tmp, config=cfg, grace_s=3.0),
                *(n.work_dir for n in node_guard)) as d:
        yield d


def until(what: str, check: Callable[[], Any], timeout_s: float = 180,
          logs: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    tails = "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}"
                    for p in sorted(logs.glob("rank_*.log"))) if logs else ""
    raise AssertionError(f"timed out waiting for {what}{tails}")


def status(d: Ugrod, job: str) -> dict[str, Any]:
    doc: dict[str, Any] = d.ctl_json("status", job)
    return dict(doc.get("job", doc))


def running_with(d: Ugrod, job: str, *keys: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        j = status(d, job)
        assert j["state"] in ("queued", "starting", "running"), (j["reason"], d.log())
        m = j.get("metrics") or {}
        return m if all(k in m for k in keys) and (m.get("step") or 0) >= 2 else None
    return check


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def checkpoint_everywhere(d: Ugrod, job: str) -> None:
    """``ugroctl checkpoint`` makes both ranks save: each node's metrics file says so."""
    res = d.ctl("checkpoint", job, "--wait", "120", timeout=150)
    assert res.returncode == 0, res.stdout + res.stderr + d.log()
    jobdir = d.state_dir / "jobs" / job
    saved = until("a checkpoint line from every rank", lambda: (
        [x for x in lines(jobdir / "metrics.jsonl") if x.get("event") == "checkpoint"],
        [x for x in lines(jobdir / "metrics_rank_1.jsonl") if x.get("event") == "checkpoint"],
    ) if all(any(x.get("event") == "checkpoint" for x in lines(p)) for p in (
        jobdir / "metrics.jsonl", jobdir / "metrics_rank_1.jsonl")) else None, 60)
    r0, r1 = saved
    assert r0[-1]["rank"] == 0 and r1[-1]["rank"] == 1
    assert r0[-1]["step"] == r1[-1]["step"]  # the ranks agreed on the step
    # the same checkpoint, each in its own node's UGRO_CHECKPOINT_DIR (issue 14: nodes 1..N
    # were told node 0's path before)
    p0, p1 = Path(r0[-1]["path"]), Path(r1[-1]["path"])
    assert p0.name == p1.name and p0.parent.name == p1.parent.name == "checkpoints"
    assert "/node0/" in str(p0) and "/node1/" in str(p1), (p0, p1)


def cancel_promptly(d: Ugrod, job: str, within_s: float) -> None:
    t0 = time.monotonic()
    d.ctl("cancel", job, check=True)
    done = d.wait_job(job, timeout_s=90)
    took = time.monotonic() - t0
    assert done["state"] == "cancelled", done
    assert took < within_s, f"cancel took {took:.1f} s"
    wait_no_job_processes(job, timeout_s=10)


def test_trainer_scripts_progress_checkpoint_cancel_and_lasting_results(
        two_nodes: Ugrod) -> None:
    d = two_nodes
    # 1. A hostile job: its output must change nothing but what its good line says.
    hostile = ("import sys; w=sys.stdout.write\n"
               "w(\"{'loss': nan}\\n{'loss': 1e999}\\n{'loss': '0.5', 'x': [1]}\\n\")\n"
               "w('{\"a\": ' * 5000 + '\\n'); w('{' + 'x' * 100000 + '\\n')\n"
               "w('\\x00\\xff' * 1000 + '\\n{\"loss\": 1e400}\\n')\n"
               "w(\"{'step': 7, 'loss': '0.25', 'ok/x': 3}\\n\")\n")
    d.ctl("submit", "--name", "hostile", "--no-torchrun", "--", sys.executable, "-c", hostile,
          check=True)
    # 2. A plain Trainer script (no UGRO code) and one with the callback, on both nodes.
    # It saves where the Trainer does by default (its output dir), found by --checkpoints.
    workdir = d.base / "plain-wd"
    workdir.mkdir()
    d.ctl("submit", "--name", "plain", "--no-torchrun", *ENV, "--cwd", str(workdir),
          "--checkpoints", "out/checkpoint-*", "--", sys.executable, HF, "--no-ugro",
          "--output-dir", "out", "--save-steps", "2", "--steps", "400",
          "--sleep-per-step", "0.1", check=True)
    d.ctl("submit", "--name", "hf", "--nodes", "2", "--torchrun", *ENV, "--stop-grace", "60",
          "--", HF,
          "--steps", "400", "--sleep-per-step", "0.1", check=True)

    done = d.wait_job("hostile", timeout_s=60)
    assert done["state"] == "succeeded", done
    assert {k: v for k, v in done["metrics"].items() if k != "ts"} == {
        "step": 7, "loss": 0.25, "ok_x": 3}

    plain = until("the plain Trainer's step and loss", running_with(d, "plain", "loss", "step"))
    assert {"grad_norm", "learning_rate", "epoch"} <= set(plain)
    text = d.ctl("status", "plain", check=True).stdout
    assert "loss" in text and "step" in text, text

    m = until("the callback's numbers", running_with(d, "hf", "loss", "grad_norm"))
    assert {"learning_rate", "epoch"} <= set(m)
    checkpoint_everywhere(d, "hf")
    # SIGINT, then SIGTERM at 30 s: a Trainer under torchrun may sit in a collective
    # until SIGTERM (docs/frameworks.md), but never needs the SIGKILL at 60 s.
    cancel_promptly(d, "hf", within_s=50)
    cancel_promptly(d, "plain", within_s=25)  # one process: SIGINT stops it, before SIGTERM

    before = d.ctl_json("results", "hf")
    assert before["summary"]["run"]["learning_rate"] == 0.001
    assert len(before["summary"]["run"]["code_sha256"]) == 64
    assert {"loss", "grad_norm"} <= set(before["summary"]["values"])
    assert before["summary"]["best_loss"] <= before["summary"]["final_loss"]
    assert (d.state_dir / "jobs" / "hf" / "result.json").exists()
    plain_before = d.ctl_json("results", "plain")
    assert plain_before["summary"]["source"] == "progress.jsonl"
    assert plain_before["summary"]["final_loss"] is not None
    found = [c["path"] for c in plain_before["checkpoints"]]
    assert found and all(p.startswith(str(workdir / "out" / "checkpoint-")) for p in found)
    d.stop()
    d.start()
    assert d.ctl_json("results", "hf") == before
    assert d.ctl_json("results", "plain") == plain_before


def test_lightning_script_reports_checkpoints_on_every_rank_and_cancels_promptly(
        two_nodes: Ugrod) -> None:
    d = two_nodes
    d.ctl("submit", "--name", "pl", "--nodes", "2", "--torchrun", *ENV, "--stop-grace", "60",
          "--", PL,
          "--steps", "2000", "--sleep-per-step", "0.05", check=True)
    m = until("Lightning's logged numbers", running_with(d, "pl", "train_loss",
                                                         "train_weight_norm"),
              logs=d.state_dir / "jobs" / "pl")
    assert m["loss"] == m["train_loss"]  # train/loss is the job's loss by default
    checkpoint_everywhere(d, "pl")
    path = lines(d.state_dir / "jobs" / "pl" / "metrics.jsonl")
    ckpt = [x for x in path if x.get("event") == "checkpoint"][-1]["path"]
    assert os.path.basename(ckpt).startswith("ugro-step-")
    assert status(d, "pl")["checkpoints"][-1] == ckpt
    # Lightning catches SIGTERM (sent at 30 s); SIGINT stops it well before (a loaded box
    # slows its shutdown: the bound leaves room for that, not for the SIGTERM stage)
    cancel_promptly(d, "pl", within_s=25)
