"""The example DDP job under real torchrun (2 processes, gloo, CPU) and as a plain process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch  # noqa: F401  (installed by scripts/test.sh: the job needs it)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "train_ddp.py"
HELPER = REPO / "exporters" / "ugro_metrics.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun(nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        f"--rdzv_id={uuid.uuid4().hex[:12]}",
    ]


class Job:
    """A UGRO-like rank environment in tmp_path: run dir, metrics file, checkpoint dir."""

    def __init__(self, root: Path) -> None:
        self.run_dir = root / "attempt-1" / "rank-0"
        self.run_dir.mkdir(parents=True)
        self.metrics = self.run_dir / "metrics.jsonl"
        self.checkpoints = root / "checkpoints"
        self.checkpoints.mkdir()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_")}
        env.update(
            PYTHONPATH=str(REPO),
            OMP_NUM_THREADS="1",
            UGRO_JOB_ID="test-job",
            UGRO_JOB_DIR=str(self.run_dir),
            UGRO_METRICS_FILE=str(self.metrics),
            UGRO_CHECKPOINT_DIR=str(self.checkpoints),
            UGRO_ATTEMPT="1",
        )
        env.update(extra)
        return env

    def run(self, *args: str, nproc: int = 2, **extra: str) -> subprocess.CompletedProcess[str]:
        """torchrun with nproc processes; nproc=0: plain python, a world of one."""
        launcher = torchrun(nproc) if nproc else [sys.executable]
        return subprocess.run(
            [*launcher, str(SCRIPT), *args],
            env=self.env(**extra),
            cwd=self.run_dir,
            capture_output=True,
            text=True,
            timeout=100,
        )

    def lines(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        text = self.metrics.read_text()
        assert text == "" or text.endswith("\n"), "torn last line"
        return [json.loads(line, parse_constant=_no_constants) for line in text.splitlines()]

    def progress(self) -> list[dict[str, Any]]:
        return [g for g in self.lines() if "event" not in g]

    def checkpoint_events(self) -> list[dict[str, Any]]:
        return [g for g in self.lines() if g.get("event") == "checkpoint"]

    def files(self) -> list[str]:
        return sorted(p.name for p in self.checkpoints.iterdir())


def _no_constants(name: str) -> None:
    raise AssertionError(f"metrics line holds {name}: not JSON")


@pytest.fixture
def job(tmp_path: Path) -> Job:
    return Job(tmp_path)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_train_report_and_checkpoint(job: Job) -> None:
    out = ok(job.run("--steps", "60", "--log-every", "5", "--checkpoint-every", "20"))
    assert "training: world 2, backend gloo" in out.stdout

    progress = job.progress()
    assert [g["step"] for g in progress] == list(range(5, 61, 5)), "rank 0 only, every 5 steps"
    for g in progress:
        assert isinstance(g["ts"], float)
        assert isinstance(g["loss"], float) and g["loss"] >= 0
        assert isinstance(g["throughput"], float) and g["throughput"] > 0
        assert "rank" not in g
    first, last = progress[0]["loss"], progress[-1]["loss"]
    assert last < first / 3, f"loss did not fall: {first} -> {last}"

    assert job.files() == ["step-000020.pt", "step-000040.pt", "step-000060.pt"], "no temp files"
    events = job.checkpoint_events()
    assert [(e["step"], e["path"]) for e in events] == [
        (s, str(job.checkpoints / f"step-{s:06d}.pt")) for s in (20, 40, 60)
    ]

    import torch

    state = torch.load(job.checkpoints / "step-000040.pt", weights_only=True)
    assert state["step"] == 40
    assert {"model", "optimizer", "args"} <= set(state)
    assert state["optimizer"]["state"], "Adam moments are saved"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resume_continues_from_the_checkpoint_step(job: Job) -> None:
    ok(job.run("--steps", "20", "--checkpoint-every", "10"))
    fresh = job.progress()
    job.metrics.unlink()

    resume_from = job.checkpoints / "step-000010.pt"
    out = ok(job.run("--steps", "25", UGRO_RESUME_FROM=str(resume_from), UGRO_ATTEMPT="2"))
    assert f"resumed from step 10 ({resume_from})" in out.stdout
    resumed = job.progress()
    assert [g["step"] for g in resumed] == list(range(11, 26))
    # the model and optimizer really came back: the same loss curve as the first run
    assert resumed[0]["loss"] == pytest.approx(fresh[10]["loss"], rel=1e-4)
    assert job.files()[-1] == "step-000025.pt"

    # --resume-latest picks the newest file when UGRO_RESUME_FROM is not set
    out = ok(job.run("--steps", "27", "--resume-latest", nproc=0))
    assert "resumed from step 25" in out.stdout
    assert job.progress()[-1]["step"] == 27


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resume_from_a_missing_file_fails_clearly(job: Job) -> None:
    missing = job.checkpoints / "step-000999.pt"
    out = job.run("--steps", "5", UGRO_RESUME_FROM=str(missing))
    assert out.returncode != 0
    assert f"cannot resume from {missing}" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fail_at_step_exits_non_zero_and_fail_once_only_on_attempt_one(job: Job) -> None:
    args = ("--steps", "12", "--checkpoint-every", "5", "--fail-at-step", "8", "--fail-rank", "1")
    out = job.run(*args, "--fail-once")
    assert out.returncode != 0
    assert "failing at step 8 as asked" in out.stderr
    assert max(g["step"] for g in job.progress()) == 7, "steps 1..7 done, 8 never ran"
    assert job.files() == ["step-000005.pt"]

    # the retry: attempt 2 resumes from the checkpoint and is not failed again
    resume = str(job.checkpoints / "step-000005.pt")
    out = ok(job.run(*args, "--fail-once", UGRO_ATTEMPT="2", UGRO_RESUME_FROM=resume))
    assert "resumed from step 5" in out.stdout
    assert job.progress()[-1]["step"] == 12

    # without --fail-once every attempt fails
    out = job.run("--steps", "3", "--fail-at-step", "2", nproc=0, UGRO_ATTEMPT="2")
    assert out.returncode == 1
    assert "failing at step 2 as asked" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_checkpoint_on_request_under_ddp(job: Job) -> None:
    proc = subprocess.Popen(
        [
            *torchrun(2),
            str(SCRIPT),
            "--steps",
            "2000",
            "--checkpoint-every",
            "0",
            "--sleep-per-step",
            "0.02",
        ],
        env=job.env(),
        cwd=job.run_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(job.progress()) >= 3, 60, "training to start")
        request = job.run_dir / "checkpoint.request"
        request.touch()
        wait_for(lambda: bool(job.checkpoint_events()), 20, "the requested checkpoint")
        (event,) = job.checkpoint_events()
        # The request stays for every rank to see (each remembers the last one it acted
        # on), so one request is one checkpoint: later steps must not save again.
        seen = len(job.progress())
        wait_for(lambda: len(job.progress()) >= seen + 5, 30, "five more steps")
        assert len(job.checkpoint_events()) == 1, "one request, one checkpoint"
        path = Path(event["path"])
        assert path.parent == job.checkpoints
        assert path.name == f"step-{event['step']:06d}.pt"
        assert path.is_file()
        assert event["step"] >= 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hang_at_step_stops_advancing(job: Job) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--steps", "50", "--hang-at-step", "4"],
        env=job.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: bool(job.progress()) and job.progress()[-1]["step"] == 3, 60, "step 3")
        time.sleep(1.0)
        assert proc.poll() is None, "still running"
        assert job.progress()[-1]["step"] == 3, "and not advancing"
    finally:
        proc.kill()
        proc.communicate(timeout=20)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plain_python_outside_ugro_writes_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = ok(
        subprocess.run(
            [sys.executable, str(SCRIPT), "--steps", "40", "--log-every", "10"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=80,
        )
    )
    assert "training: world 1, backend gloo" in out.stdout
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert list(tmp_path.iterdir()) == [], "no metrics, no checkpoints outside UGRO"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_runs_from_a_copy_on_a_node_with_the_helper_beside_it(tmp_path: Path, job: Job) -> None:
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(SCRIPT, node / "train_ddp.py")
    shutil.copy(HELPER, node / "ugro_metrics.py")
    # a node without ugro installed: `from exporters import ...` must fail there
    shadow = tmp_path / "shadow" / "exporters"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ugro is not installed here')\n")
    env = job.env(PYTHONPATH=str(shadow.parent))
    ok(
        subprocess.run(
            [*torchrun(2), str(node / "train_ddp.py"), "--steps", "6", "--checkpoint-every", "3"],
            env=env,
            cwd=node,
            capture_output=True,
            text=True,
            timeout=100,
        )
    )
    assert [g["step"] for g in job.progress()] == [1, 2, 3, 4, 5, 6]
    assert job.files() == ["step-000003.pt", "step-000006.pt"]


@pytest.mark.timeout(60)
def test_job_file_matches_the_cli_schema_and_the_script() -> None:
    from ugroctl import jobfile
    body = jobfile.load(str(REPO / "examples" / "job.yaml"))
    assert body["name"] == "ddp-demo"
    assert body["torchrun"] is True
    assert body["argv"][0] == "examples/train_ddp.py"
    assert body["nodes"] == 2 and body["max_retries"] >= 1
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *body["argv"][1:], "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    # every option the job file passes is one the script knows
    for arg in body["argv"][1:]:
        if arg.startswith("--"):
            assert arg in done.stdout, arg
