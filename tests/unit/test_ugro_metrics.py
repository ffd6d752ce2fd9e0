"""The training-metrics helper against real files, env and signals."""

from __future__ import annotations

import decimal
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporters import ugro_metrics

UGRO_VARS = (
    "UGRO_METRICS_FILE",
    "UGRO_JOB_DIR",
    "UGRO_JOB_ID",
    "UGRO_CHECKPOINT_DIR",
    "UGRO_RESUME_FROM",
    "UGRO_ATTEMPT",
    "RANK",
    "LOCAL_RANK",
)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in UGRO_VARS:
        monkeypatch.delenv(var, raising=False)
    ugro_metrics._reset()
    yield
    ugro_metrics._reset()


@pytest.fixture
def ugro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run as rank 0 of a UGRO job; return the metrics file path."""
    job_dir = tmp_path / "rank-0"
    job_dir.mkdir()
    metrics = job_dir / "metrics.jsonl"
    monkeypatch.setenv("UGRO_JOB_DIR", str(job_dir))
    monkeypatch.setenv("UGRO_METRICS_FILE", str(metrics))
    return metrics


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_appends_one_json_line_per_call(ugro: Path) -> None:
    before = time.time()
    ugro_metrics.report(step=1, loss=0.5, throughput=100)
    ugro_metrics.report(step=2, loss=0.25, throughput=120.5)
    got = lines(ugro)
    assert [(g["step"], g["loss"], g["throughput"]) for g in got] == [
        (1, 0.5, 100),
        (2, 0.25, 120.5),
    ]
    for g in got:
        assert isinstance(g["ts"], float)
        assert before <= g["ts"] <= time.time()
    assert ugro.read_text().endswith("\n")


def test_report_appends_to_existing_file_and_is_readable_without_close(ugro: Path) -> None:
    ugro.write_text('{"ts":1.0,"step":0}\n')
    ugro_metrics.report(step=1, loss=1.0)
    # no close, no flush: the line is already in the file
    assert [g["step"] for g in lines(ugro)] == [0, 1]


def test_report_creates_missing_parent_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a" / "b" / "metrics.jsonl"
    monkeypatch.setenv("UGRO_METRICS_FILE", str(path))
    ugro_metrics.report(step=3, loss=2.0)
    assert lines(path)[0]["step"] == 3


def test_report_follows_a_changed_metrics_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    monkeypatch.setenv("UGRO_METRICS_FILE", str(first))
    ugro_metrics.report(step=1, loss=1.0)
    monkeypatch.setenv("UGRO_METRICS_FILE", str(second))
    ugro_metrics.report(step=2, loss=1.0)
    assert [g["step"] for g in lines(first)] == [1]
    assert [g["step"] for g in lines(second)] == [2]


def test_report_without_step_omits_it(ugro: Path) -> None:
    ugro_metrics.report(lr=0.001)
    (got,) = lines(ugro)
    assert "step" not in got
    assert got["lr"] == 0.001


def test_report_with_nothing_to_say_writes_nothing(ugro: Path) -> None:
    ugro_metrics.report()
    ugro_metrics.report(loss=float("nan"))
    assert not ugro.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_dropped_and_the_line_stays_valid_json(
    ugro: Path, bad: float
) -> None:
    ugro_metrics.report(step=7, loss=bad, throughput=10.0)
    text = ugro.read_text()
    assert "NaN" not in text and "Infinity" not in text
    (got,) = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert got["step"] == 7 and got["throughput"] == 10.0 and "loss" not in got


def test_number_like_values_become_json_numbers(ugro: Path) -> None:
    class Scalar:
        """Stands for a numpy/torch scalar: float() works, index() does not."""

        def __float__(self) -> float:
            return 1.5

    class IntLike:
        def __index__(self) -> int:
            return 9

    ugro_metrics.report(
        step=IntLike(),  # type: ignore[arg-type]
        a=True,
        b=decimal.Decimal("0.25"),
        c=Scalar(),
        d=IntLike(),
        e=10**20,
    )
    (got,) = lines(ugro)
    assert got == {"ts": got["ts"], "step": 9, "a": 1, "b": 0.25, "c": 1.5, "d": 9, "e": 10**20}


def test_numpy_and_torch_scalars(ugro: Path) -> None:
    import numpy as np
    import torch
    ugro_metrics.report(
        step=np.int64(4),
        a=np.float32(0.5),
        b=np.int32(3),
        c=torch.tensor(0.75),
        d=torch.tensor(2),
        e=np.float64("nan"),
        f=torch.tensor([1.0, 2.0]),
    )
    (got,) = lines(ugro)
    assert got == {"ts": got["ts"], "step": 4, "a": 0.5, "b": 3, "c": 0.75, "d": 2}


def test_bad_values_and_names_are_dropped_with_one_warning_each(
    ugro: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        bad_name: dict[str, object] = {"//": 1, "rank": 2}
        ugro_metrics.report(step=1, loss=1.0, note="text", blob=b"x", nested=[1.0], ts=5)
        ugro_metrics.report(step=1, loss=1.0, **bad_name)  # type: ignore[arg-type]
    for got in lines(ugro):
        assert set(got) == {"ts", "step", "loss"}
        assert got["ts"] != 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6, err
    assert all(line.startswith("ugro_metrics: ") for line in err)
    assert any("'note'" in line and "str" in line for line in err)
    assert any("'ts'" in line for line in err)


def test_non_integer_step_is_omitted(ugro: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ugro_metrics.report(step=1.5, loss=1.0)  # type: ignore[arg-type]
    (got,) = lines(ugro)
    assert "step" not in got and got["loss"] == 1.0
    assert "step must be an int" in capsys.readouterr().err


def test_write_error_is_reported_once_and_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "is-a-dir"
    target.mkdir()
    monkeypatch.setenv("UGRO_METRICS_FILE", str(target))
    ugro_metrics.report(step=1, loss=1.0)
    ugro_metrics.report(step=2, loss=1.0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot write metrics" in err[0]
    # recovers once the path is writable again
    target.rmdir()
    ugro_metrics.report(step=3, loss=1.0)
    assert [g["step"] for g in lines(target)] == [3]


def test_outside_ugro_nothing_is_written_or_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGUSR1)
    ugro_metrics.report(step=1, loss=1.0, junk="not checked outside")
    ugro_metrics.saved_checkpoint("x.pt", 1)
    assert ugro_metrics.checkpoint_requested() is False
    assert signal.getsignal(signal.SIGUSR1) is before
    assert list(tmp_path.iterdir()) == []
    assert ugro_metrics.enabled() is False
    assert ugro_metrics.checkpoint_dir() is None
    assert ugro_metrics.resume_from() is None
    assert ugro_metrics.attempt() == 1


def test_outside_ugro_report_costs_almost_nothing() -> None:
    n = 100_000
    start = time.process_time()  # CPU time: a busy machine does not make it flaky
    for i in range(n):
        ugro_metrics.report(step=i, loss=0.5, throughput=1.0)
    per_call = (time.process_time() - start) / n
    assert per_call < 5e-6, f"{per_call * 1e6:.2f} µs per call"


@pytest.mark.parametrize("rank", ["1", "7"])
def test_only_rank_zero_writes_unless_all_ranks(
    ugro: Path, monkeypatch: pytest.MonkeyPatch, rank: str
) -> None:
    monkeypatch.setenv("RANK", rank)
    ugro_metrics.report(loss=1.0)  # no step: not even a heartbeat
    ugro_metrics.saved_checkpoint("a.pt", 1)
    assert not ugro.exists()
    ugro_metrics.report(step=1, loss=2.0, all_ranks=True)
    (got,) = lines(ugro)
    assert got["rank"] == int(rank) and got["loss"] == 2.0


def test_other_ranks_write_a_heartbeat_of_their_step_at_most_once_a_second(
    ugro: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job's progress by the node's own path: ugrod sees training go on on a node
    # whose rank 0 it cannot reach (ugrod/core/node_loss.py).
    monkeypatch.setenv("RANK", "3")
    for step in range(1, 50):
        ugro_metrics.report(step=step, loss=1.0)
    (beat,) = lines(ugro)
    assert beat["step"] == 1 and beat["rank"] == 3 and beat["event"] == "heartbeat"
    assert "loss" not in beat
    monkeypatch.setattr(ugro_metrics, "_last_beat", time.monotonic() - 1.5)
    ugro_metrics.report(step=50, loss=1.0)
    assert [b["step"] for b in lines(ugro)] == [1, 50]
    ugro_metrics._reset()
    monkeypatch.setenv("LOCAL_RANK", "1")  # one heartbeat per node: its first process's
    ugro_metrics.report(step=51)
    assert [b["step"] for b in lines(ugro)] == [1, 50]


def test_rank_zero_explicit_writes(ugro: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    ugro_metrics.report(step=1, loss=1.0)
    assert "rank" not in lines(ugro)[0]


def test_concurrent_writers_never_interleave_within_a_line(ugro: Path) -> None:
    # one process-wide fd, O_APPEND, one write(2) per line: whole lines only
    wide = {f"v{i}": float(i) for i in range(200)}

    def work(k: int) -> None:
        for step in range(200):
            ugro_metrics.report(step=step, writer=k, **wide)  # type: ignore[arg-type]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # and a second process appending to the same file at the same time
    code = (
        "from exporters import ugro_metrics\n"
        "for s in range(200): ugro_metrics.report(step=s, writer=9, "
        + ", ".join(f"v{i}={i}.0" for i in range(200))
        + ")\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2])
        for _ in range(2)
    ]
    for k in range(4):
        work(k)
    assert all(p.wait(timeout=30) == 0 for p in procs)
    got = lines(ugro)
    assert len(got) == 4 * 200 * 2 + 2 * 200
    assert all(len(g) == 3 + 200 for g in got)


def test_saved_checkpoint_writes_an_event_line_with_absolute_path(
    ugro: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ugro_metrics.saved_checkpoint(Path("ckpt") / "step-000400.pt", 400)
    (got,) = lines(ugro)
    assert got["event"] == "checkpoint"
    assert got["path"] == str(tmp_path / "ckpt" / "step-000400.pt")
    assert got["step"] == 400
    assert list(got) == ["ts", "event", "path", "step"]


def _request(run_dir: Path, n: int) -> None:
    """What the rank wrapper does at each request: a new file replaces the old one."""
    tmp = run_dir / "checkpoint.request.tmp"
    tmp.write_text(f"{n}\n")
    os.replace(tmp, run_dir / "checkpoint.request")


def test_checkpoint_request_is_seen_once_per_request_and_not_consumed(ugro: Path) -> None:
    request = ugro.parent / "checkpoint.request"
    assert ugro_metrics.checkpoint_requested() is False
    _request(ugro.parent, 1)
    assert ugro_metrics.checkpoint_requested() is True
    assert request.exists(), "the file stays for the other ranks on the node"
    assert ugro_metrics.checkpoint_requested() is False
    _request(ugro.parent, 2)
    assert ugro_metrics.checkpoint_requested() is True
    assert ugro_metrics.checkpoint_requested() is False


def test_checkpoint_request_reaches_other_ranks_with_all_ranks(
        ugro: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _request(ugro.parent, 1)
    monkeypatch.setenv("RANK", "1")
    assert ugro_metrics.checkpoint_requested() is False  # the default: rank 0 saves
    assert ugro_metrics.checkpoint_requested(all_ranks=True) is True
    assert ugro_metrics.checkpoint_requested(all_ranks=True) is False


def test_names_are_normalised(ugro: Path) -> None:
    ugro_metrics.report(step=3, **{"train/loss": 0.5, "eval/f1@0.5": 0.9, "lr": 1e-4})
    (got,) = lines(ugro)
    assert got == {"ts": got["ts"], "step": 3, "train_loss": 0.5, "eval_f1_0_5": 0.9,
                   "lr": 1e-4}


def test_sigusr1_requests_a_checkpoint_once(ugro: Path) -> None:
    assert ugro_metrics.checkpoint_requested() is False  # installs the handler
    os.kill(os.getpid(), signal.SIGUSR1)
    assert ugro_metrics.checkpoint_requested() is True
    assert ugro_metrics.checkpoint_requested() is False


def test_signal_and_file_for_the_same_request_give_one_checkpoint(ugro: Path) -> None:
    ugro_metrics.checkpoint_requested()
    (ugro.parent / "checkpoint.request").touch()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert ugro_metrics.checkpoint_requested() is True
    assert ugro_metrics.checkpoint_requested() is False


def test_sigusr1_handler_chains_to_a_previous_handler(ugro: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        ugro_metrics.checkpoint_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ugro_metrics.checkpoint_requested() is True
        assert seen == [signal.SIGUSR1]
    finally:
        ugro_metrics._reset()
        signal.signal(signal.SIGUSR1, previous)


def test_handler_is_not_installed_from_a_thread(ugro: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    t = threading.Thread(target=ugro_metrics.checkpoint_requested)
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_sigusr1_before_any_call_in_a_subprocess_is_not_fatal_after_first_call(
    tmp_path: Path,
) -> None:
    # a real training process: first call installs, the signal then sets the flag
    code = (
        "import os, signal, sys\n"
        "from exporters import ugro_metrics as m\n"
        "assert m.checkpoint_requested() is False\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print(m.checkpoint_requested())\n"
    )
    env = {**os.environ, "UGRO_JOB_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "True"


def test_paths_and_attempt_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UGRO_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("UGRO_RESUME_FROM", str(tmp_path / "ckpt" / "step-000010.pt"))
    monkeypatch.setenv("UGRO_ATTEMPT", "3")
    assert ugro_metrics.checkpoint_dir() == tmp_path / "ckpt"
    assert ugro_metrics.resume_from() == tmp_path / "ckpt" / "step-000010.pt"
    assert ugro_metrics.attempt() == 3
    monkeypatch.setenv("UGRO_RESUME_FROM", "")
    assert ugro_metrics.resume_from() is None


def test_works_as_a_single_copied_file(tmp_path: Path) -> None:
    source = Path(ugro_metrics.__file__).read_text()
    (tmp_path / "ugro_metrics.py").write_text(source)
    metrics = tmp_path / "m.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in UGRO_VARS and k != "PYTHONPATH"}
    env["UGRO_METRICS_FILE"] = str(metrics)
    subprocess.run(
        [
            sys.executable,
            "-E",
            "-s",
            "-c",
            "import ugro_metrics; ugro_metrics.report(step=1, loss=0.5)",
        ],
        cwd=tmp_path,
        env=env,
        timeout=30,
        check=True,
    )
    assert lines(metrics)[0]["loss"] == 0.5
