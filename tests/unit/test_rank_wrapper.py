"""The node-side rank wrapper, run as the real program it is on nodes (stdlib, subprocesses)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ugrod.nodes.agent import WRAPPER_SOURCE
from ugrod.nodes.remote import rank_wrapper

WRAPPER = ""  # the wrapper as nodes get it (libraries inlined), written by the fixture below


@pytest.fixture(autouse=True, scope="module")
def _shipped_wrapper(tmp_path_factory: pytest.TempPathFactory) -> None:
    global WRAPPER
    path = tmp_path_factory.mktemp("node") / "rank_wrapper.py"
    path.write_bytes(WRAPPER_SOURCE)
    WRAPPER = str(path)


def wrapper(*args: str, input: bytes | None = None, timeout: float = 10) -> Any:
    """Run a wrapper subcommand; its JSON answer (and the exit code as ``_rc``)."""
    done = subprocess.run(
        [sys.executable, WRAPPER, *args], input=input, capture_output=True, timeout=timeout
    )
    answer = json.loads(done.stdout) if done.stdout.strip() else {}
    if isinstance(answer, dict):
        answer["_rc"] = done.returncode
        answer["_stderr"] = done.stderr.decode()
    return answer


def start(run_dir: Path, argv: list[str], **spec: object) -> Any:
    body = json.dumps({"argv": argv, "env": {"UGRO_TEST": "1"}, **spec}).encode()
    return wrapper("start", str(run_dir), "--spec-stdin", input=body)


def wait_for(path: Path, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def starttime(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_start_detaches_records_pid_with_starttime_and_exit_code(tmp_path: Path) -> None:
    began = time.monotonic()
    answer = start(tmp_path, [sys.executable, "-c", "import time; time.sleep(1); print('hi')"])
    assert answer["_rc"] == 0 and time.monotonic() - began < 3  # did not wait for the rank
    pid = answer["pid"]
    assert (tmp_path / "pid").read_text().split() == [str(pid), str(starttime(pid))]
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    assert wait_for(tmp_path / "exit_code").strip() == "0"
    assert (tmp_path / "rank.log").read_text() == "hi\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cgroup", "exit_code", "pid", "rank.log", "spec.json", "start.lock", "supervisor",
    ]  # fmt: skip


def test_concurrent_starts_of_one_rank_start_it_once(tmp_path: Path) -> None:
    body = json.dumps({"argv": ["sleep", "30"]}).encode()
    procs = [
        subprocess.Popen(
            [sys.executable, WRAPPER, "start", str(tmp_path), "--spec-stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    answers = [json.loads(p.communicate(body, timeout=10)[0]) for p in procs]
    pids = {a["pid"] for a in answers}
    assert len(pids) == 1 and sum(1 for a in answers if "existing" in a) == 3
    assert len(wrapper("status", str(tmp_path))["pids"]) == 1
    os.kill(pids.pop(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie; a process that vanishes while being read is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_rank_lost_with_its_supervisor_ends_as_lost(tmp_path: Path) -> None:
    pid = start(tmp_path, ["sleep", "30"])["pid"]
    supervisor = int((tmp_path / "supervisor").read_text().split()[0])
    assert wrapper("status", str(tmp_path))["exit_code"] is None
    os.kill(supervisor, signal.SIGKILL)  # as if the node rebooted: nobody records the end
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = wrapper("status", str(tmp_path))
    assert (status["alive"], status["exit_code"]) == (False, rank_wrapper.LOST)
    assert watch_lines(tmp_path)[-1] == {"t": "exit", "code": rank_wrapper.LOST}
    assert not (tmp_path / "exit_code").exists()


def test_death_by_signal_is_128_plus_signal(tmp_path: Path) -> None:
    pid = start(tmp_path, ["sleep", "30"])["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(tmp_path / "exit_code").strip() == str(128 + signal.SIGKILL)


def test_environment_is_inherited_plus_spec_plus_marker(tmp_path: Path) -> None:
    start(tmp_path, ["sh", "-c", 'echo "$UGRO_TEST $UGRO_RUN_DIR ${HOME:+home}"'])
    wait_for(tmp_path / "exit_code")
    assert (tmp_path / "rank.log").read_text() == f"1 {tmp_path} home\n"


def test_command_not_found_is_reported_at_once_and_recorded(tmp_path: Path) -> None:
    answer = start(tmp_path, ["ugro-no-such-binary"])
    assert answer["_rc"] == 127 and answer["exit_code"] == 127
    assert "cannot start 'ugro-no-such-binary': No such file or directory" in answer["error"]
    assert (tmp_path / "exit_code").read_text().strip() == "127"
    assert "ugro-no-such-binary" in (tmp_path / "rank.log").read_text()
    assert not (tmp_path / "pid").exists()
    again = start(tmp_path, ["ugro-no-such-binary"])  # a retried spawn: same answer
    assert again["exit_code"] == 127 and again["error"] == answer["error"]


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    answer = start(tmp_path / "run", [str(script)])
    assert answer["exit_code"] == 126 and "Permission denied" in answer["error"]


def test_second_start_returns_the_running_rank(tmp_path: Path) -> None:
    first = start(tmp_path, ["sleep", "30"])
    second = start(tmp_path, ["sleep", "30"])
    assert second["pid"] == first["pid"] and second["existing"] is True
    os.kill(first["pid"], signal.SIGKILL)


@pytest.mark.parametrize(
    "spec", [{"argv": []}, {"argv": "ls"}, {"argv": [1, 2]}, {"env": {}}], ids=str
)
def test_bad_spec_is_refused_before_anything_starts(tmp_path: Path, spec: dict[str, Any]) -> None:
    done = subprocess.run(
        [sys.executable, WRAPPER, "start", str(tmp_path), "--spec-stdin"],
        input=json.dumps(spec).encode(),
        capture_output=True,
    )
    assert done.returncode == 1
    assert b"argv must be a non-empty list of strings" in done.stderr
    assert not (tmp_path / "pid").exists() and not (tmp_path / "exit_code").exists()


# ---- watch ---------------------------------------------------------------------------------


def watch_lines(run_dir: Path, log_off: int = 0, met_off: int = 0) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, WRAPPER, "watch", str(run_dir), str(log_off), str(met_off)],
        capture_output=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    for msg in lines:  # an exit says when it happened (exit_code's mtime), when it knows
        if msg.get("t") == "exit" and "at" in msg:
            assert abs(msg.pop("at") - time.time()) < 600
    return lines


def finished_run(tmp_path: Path) -> Path:
    (tmp_path / "pid").write_text("4242 1\n")
    (tmp_path / "rank.log").write_bytes(b"hello\n\xffbinary\n")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step":1}\n{"step":2}\n{"step":3')
    (tmp_path / "exit_code").write_text("0\n")
    return tmp_path


def test_watch_of_a_finished_rank_drains_everything_then_exit(tmp_path: Path) -> None:
    lines = watch_lines(finished_run(tmp_path))
    assert lines == [
        {"t": "pid", "pid": 4242},
        {"t": "log", "o": 0, "d": base64.b64encode(b"hello\n\xffbinary\n").decode()},
        {"t": "metric", "o": 0, "e": 11, "d": '{"step":1}'},
        {"t": "metric", "o": 11, "e": 22, "d": '{"step":2}'},
        {"t": "metric", "o": 22, "e": 31, "d": '{"step":3'},  # the rank ended: last, unfinished
        {"t": "exit", "code": 0},
    ]


def test_status_says_when_the_exit_was_recorded_on_the_node(tmp_path: Path) -> None:
    run = finished_run(tmp_path)
    os.utime(run / "exit_code", (1_700_000_000.25, 1_700_000_000.25))
    # the culprit rule (ugrod/core/culprit.py) compares these times across nodes
    assert wrapper("status", str(run))["exited_at"] == 1_700_000_000.25
    assert wrapper("status", str(tmp_path / "nothing-here"))["exited_at"] is None


def test_watch_resumes_from_offsets(tmp_path: Path) -> None:
    lines = watch_lines(finished_run(tmp_path), 6, 11)
    assert lines[1] == {"t": "log", "o": 6, "d": base64.b64encode(b"\xffbinary\n").decode()}
    assert [ln["o"] for ln in lines if ln["t"] == "metric"] == [11, 22]
    assert watch_lines(tmp_path, 15, 31)[1:] == [{"t": "exit", "code": 0}]


def test_watch_follows_a_live_rank_and_holds_back_half_lines(tmp_path: Path) -> None:
    (tmp_path / "pid").write_text("4242 1\n")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step":1}\n{"st')
    proc = subprocess.Popen(
        [sys.executable, WRAPPER, "watch", str(tmp_path), "0", "0"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        assert json.loads(proc.stdout.readline()) == {"t": "pid", "pid": 4242}
        assert json.loads(proc.stdout.readline())["e"] == 11
        with metrics.open("ab") as f:
            f.write(b'ep":2}\n')
        assert json.loads(proc.stdout.readline()) == {
            "t": "metric", "o": 11, "e": 22, "d": '{"step":2}',
        }  # fmt: skip
        (tmp_path / "exit_code").write_text("7\n")
        began = time.monotonic()
        ended = json.loads(proc.stdout.readline())
        assert abs(ended.pop("at") - time.time()) < 60 and ended == {"t": "exit", "code": 7}
        assert time.monotonic() - began < 0.5
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_watch_exits_when_its_reader_goes_away(tmp_path: Path) -> None:
    (tmp_path / "pid").write_text("4242 1\n")
    proc = subprocess.Popen(
        [sys.executable, WRAPPER, "watch", str(tmp_path), "0", "0"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # nothing more will ever be written: the rank is silent
    assert proc.wait(timeout=2) == 0


def test_watch_of_a_missing_run_dir_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, WRAPPER, "watch", str(tmp_path / "nope"), "0", "0"], capture_output=True
    )
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"t": "error", "message": f"no run directory {tmp_path}/nope"}


# ---- status, kill, helpers -----------------------------------------------------------------


def test_status_and_kill_trust_a_pid_only_with_its_starttime(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "pid").write_text(f"{bystander.pid} {starttime(bystander.pid) + 1}\n")
        status = wrapper("status", str(tmp_path))
        assert (status["pid"], status["alive"], status["exit_code"]) == (bystander.pid, False, None)
        killed = wrapper("kill", str(tmp_path), "KILL")
        assert killed["group"] is False and killed["signalled"] == []
        time.sleep(0.1)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_reaches_descendants_that_left_the_group(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
        "print('ok', flush=True); time.sleep(30)"
    )
    pid = start(tmp_path, [sys.executable, "-c", code])["pid"]
    deadline = time.monotonic() + 10
    while len(wrapper("status", str(tmp_path))["pids"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = wrapper("kill", str(tmp_path), "TERM")
    assert killed["pid"] == pid and killed["group"] is True and len(killed["signalled"]) == 2
    assert wait_for(tmp_path / "exit_code").strip() == str(128 + signal.SIGTERM)
    deadline = time.monotonic() + 5
    while wrapper("status", str(tmp_path))["alive"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert wrapper("alive-pids", str(tmp_path)) == {str(tmp_path): [], "_rc": 0, "_stderr": ""}


def test_checkpoint_request_and_listing(tmp_path: Path) -> None:
    assert wrapper("checkpoint", str(tmp_path))["requested"] is True
    assert (tmp_path / "checkpoint.request").exists()
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-2").mkdir(parents=True)
    (ckpt / "step-1.pt").write_bytes(b"1" * 5)
    (ckpt / "step-2" / "a.bin").write_bytes(b"2" * 7)
    (ckpt / ".step-3.pt.tmp-1").write_bytes(b"partial")
    os.utime(ckpt / "step-1.pt", (1, 1))
    listed = json.loads(
        subprocess.run(
            [sys.executable, WRAPPER, "ls-checkpoints", str(ckpt)], capture_output=True
        ).stdout
    )
    assert [(c["path"], c["size_bytes"]) for c in listed] == [
        (f"{ckpt}/step-1.pt", 5),
        (f"{ckpt}/step-2", 7),
    ]


def test_free_port_and_reach() -> None:
    port = wrapper("free-port", "40000", "40100")["port"]
    assert 40000 <= port <= 40100
    assert wrapper("free-port")["port"] > 0
    assert wrapper("reach", "127.0.0.1", "1", "1")["_rc"] == 1
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert wrapper("reach", "127.0.0.1", str(s.getsockname()[1]), "1")["ok"] is True


def test_parse_signal_and_proc_stat() -> None:
    assert rank_wrapper.parse_signal("TERM") == signal.SIGTERM
    assert rank_wrapper.parse_signal("SIGKILL") == signal.SIGKILL
    assert rank_wrapper.parse_signal("9") == 9
    state, start_time = rank_wrapper.proc_stat(os.getpid()) or ("?", -1)
    assert state in "RS" and start_time == starttime(os.getpid())
    assert rank_wrapper.proc_stat(2**22 + 1) is None


def test_unknown_command_is_usage_error() -> None:
    done = subprocess.run([sys.executable, WRAPPER, "frobnicate"], capture_output=True)
    assert done.returncode == 2 and b"unknown command 'frobnicate'" in done.stderr


def test_serve_answers_requests_until_stdin_ends(tmp_path: Path) -> None:
    spec = json.dumps({"argv": ["sleep", "30"]})
    requests = [
        {"id": 1, "argv": ["start", str(tmp_path / "r"), "--spec-stdin"], "stdin": spec},
        {"id": 2, "argv": ["status", str(tmp_path / "r")]},
        {"id": 3, "argv": ["frobnicate"]},
        {"id": 4, "argv": ["start", str(tmp_path / "bad")], "stdin": '{"argv": []}'},
        {"id": 5, "argv": ["kill", str(tmp_path / "r"), "KILL"]},
    ]
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in requests) + b"not json\n"
    done = subprocess.run(
        [sys.executable, WRAPPER, "serve"], input=lines, capture_output=True, timeout=10
    )
    assert done.returncode == 0
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in replies] == [1, 2, 3, 4, 5, None]
    pid = replies[0]["out"]["pid"]
    assert replies[1]["out"]["pid"] == pid and replies[1]["out"]["alive"] is True
    assert replies[2]["rc"] == 1 and "unknown command 'frobnicate'" in replies[2]["err"]
    assert replies[3]["rc"] == 1 and "argv must be a non-empty list" in replies[3]["err"]
    assert replies[4]["out"]["signalled"] == [pid]
    assert replies[5]["rc"] == 1 and "JSONDecodeError" in replies[5]["err"]
    assert wait_for(tmp_path / "r" / "exit_code").strip() == str(128 + signal.SIGKILL)


def test_checkpoint_listing_with_a_glob_and_reported_paths(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "step-1.pt").write_bytes(b"1")
    out = tmp_path / "wd" / "out"
    for n in (2, 4):
        (out / f"checkpoint-{n}").mkdir(parents=True)
        (out / f"checkpoint-{n}" / "model.bin").write_bytes(b"x" * n)
    (out / "runs").mkdir()
    elsewhere = tmp_path / "saved [1].pt"  # a reported path is itself, brackets and all
    elsewhere.write_bytes(b"abc")
    listed = json.loads(subprocess.run(
        [sys.executable, WRAPPER, "ls-checkpoints", str(ckpt), str(tmp_path / "wd"),
         "out/checkpoint-*", str(elsewhere), str(tmp_path / "gone.pt")],
        capture_output=True).stdout)
    assert sorted((Path(c["path"]).name, c["size_bytes"]) for c in listed) == [
        ("checkpoint-2", 2), ("checkpoint-4", 4), ("saved [1].pt", 3), ("step-1.pt", 1)]


def test_fence_kills_the_rank_and_a_start_delivered_later_refuses(tmp_path: Path) -> None:
    # ugrod fences a run dir of an ended attempt; a start request sent before a partition
    # and delivered after it must not run that attempt again.
    rd = tmp_path / "jobs" / "j" / "attempt-1" / "rank-0"
    pid = start(rd, ["sleep", "30"])["pid"]
    answer = wrapper("fence", str(rd))
    assert answer["_rc"] == 0, answer
    assert pid in answer[str(rd)]["killed"] and answer[str(rd)]["alive"] == []
    assert wait_for(rd / "exit_code").strip() == str(128 + signal.SIGKILL)
    late = start(rd, ["sleep", "30"])
    assert "fenced" in late["error"] and wrapper("status", str(rd))["pids"] == []


def test_fence_of_a_rank_never_started_ends_it(tmp_path: Path) -> None:
    rd = tmp_path / "jobs" / "j" / "attempt-2" / "rank-1"
    answer = wrapper("fence", str(rd))
    assert answer[str(rd)] == {"killed": [], "alive": []}
    assert (rd / "exit_code").read_text().strip() == str(rank_wrapper.LOST)
    assert "fenced" in start(rd, ["sleep", "30"])["error"]
    exit_line = subprocess.run([sys.executable, WRAPPER, "watch", str(rd), "0", "0"],
                               capture_output=True, timeout=10).stdout.splitlines()[-1]
    assert json.loads(exit_line)["code"] == rank_wrapper.LOST  # a watch of it ends



def claimed(token: str, first: bool) -> dict[str, object]:
    return {"claim": {"token": token, "first": first}}


def test_start_moves_an_earlier_jobs_dir_aside_and_the_rank_then_runs(tmp_path: Path) -> None:
    # An earlier job named "train" (a wiped state dir, another head) left its ended rank
    # and a checkpoint in the node's job dir.
    jobs = tmp_path / "jobs"
    rank0 = jobs / "train" / "attempt-1" / "rank-0"
    assert start(rank0, ["sh", "-c", "exit 3"], **claimed("train@1.000000", True))["_rc"] == 0
    assert wait_for(rank0 / "exit_code").strip() == "3"
    (jobs / "train" / "checkpoints").mkdir()
    (jobs / "train" / "checkpoints" / "step-9.pt").write_text("theirs")
    # A new job of that name: its rank runs (not "already ended" with 3), and says where
    # the earlier job's dir went.
    new = start(rank0, ["sh", "-c", "exit 0"], **claimed("train@100.000000", True))
    kept = jobs / ".replaced" / "train.1"
    assert new["_rc"] == 0 and new["pid"] > 0 and new["moved_to"] == str(kept), new
    assert wait_for(rank0 / "exit_code").strip() == "0"
    assert (kept / "checkpoints" / "step-9.pt").read_text() == "theirs"  # moved, not deleted
    assert (kept / "attempt-1" / "rank-0" / "exit_code").read_text().strip() == "3"
    assert (jobs / "train" / "job.token").read_text() == "train@100.000000"
    # Its second rank on the node, and its retry: nothing moves.
    again = start(jobs / "train" / "attempt-1" / "rank-1", ["true"],
                  **claimed("train@100.000000", True))
    retry = start(jobs / "train" / "attempt-2" / "rank-0", ["true"],
                  **claimed("train@100.000000", False))
    assert "moved_to" not in again and "moved_to" not in retry, (again, retry)
    assert (jobs / "train" / "attempt-1" / "rank-0" / "exit_code").exists()
    # A later job of the same name moves this one aside too, to the next free name.
    later = start(rank0, ["true"], **claimed("train@200.000000", False))
    assert later["moved_to"] == str(jobs / ".replaced" / "train.2"), later


def test_a_retry_adopts_a_job_dir_made_before_tokens(tmp_path: Path) -> None:
    # A job running across an upgrade: its dir has no token, and its retry must keep the
    # checkpoint it resumes from.
    ckpt = tmp_path / "jobs" / "run" / "checkpoints" / "step-4.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("mine")
    got = start(tmp_path / "jobs" / "run" / "attempt-2" / "rank-0", ["true"],
                **claimed("run@5.000000", False))
    assert got["_rc"] == 0 and "moved_to" not in got, got
    assert ckpt.read_text() == "mine"
    assert (tmp_path / "jobs" / "run" / "job.token").read_text() == "run@5.000000"


@pytest.mark.parametrize("how", [{"token": "", "first": True}, {"token": "t@1"},
                                 {"token": "t\nx", "first": True}, "t@1"])
def test_a_bad_claim_is_refused_and_changes_nothing(tmp_path: Path, how: object) -> None:
    (tmp_path / "jobs" / "x").mkdir(parents=True)
    (tmp_path / "jobs" / "x" / "keep").write_text("1")
    got = start(tmp_path / "jobs" / "x" / "attempt-1" / "rank-0", ["true"], claim=how)
    assert got["_rc"] == 1 and "bad request" in got["_stderr"] + str(got), got
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["x"]
    assert sorted(p.name for p in (tmp_path / "jobs" / "x").iterdir()) == ["keep"]


def test_a_claim_never_follows_a_link_planted_as_the_job_dir(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "jobs" / "x").symlink_to(tmp_path / "elsewhere")
    got = start(tmp_path / "jobs" / "x" / "attempt-1" / "rank-0", ["true"],
                **claimed("x@1.000000", True))
    assert got["_rc"] == 1 and "is not a directory" in got["_stderr"] + str(got), got
    assert not list((tmp_path / "elsewhere").iterdir())


def test_claim_on_its_own_before_a_retry_is_staged(tmp_path: Path) -> None:
    # A retry placed on a node the job never ran on, where an earlier "train" left a
    # checkpoint: claimed before staging, so that checkpoint is not found as this job's.
    old = tmp_path / "jobs" / "train" / "checkpoints" / "step-99.pt"
    old.parent.mkdir(parents=True)
    old.write_text("theirs")
    (tmp_path / "jobs" / "train" / "job.token").write_text("train@1.000000")
    how = json.dumps({"token": "train@2.000000", "first": False}).encode()
    got = wrapper("claim", str(tmp_path / "jobs" / "train"), input=how)
    assert got["_rc"] == 0 and got["moved_to"] == str(tmp_path / "jobs" / ".replaced"
                                                      / "train.1"), got
    assert not (tmp_path / "jobs" / "train" / "checkpoints").exists()
    assert wrapper("claim", str(tmp_path / "jobs" / "train"), input=how) == {
        "_rc": 0, "_stderr": ""}  # the same job again: nothing moves
    bad = wrapper("claim", str(tmp_path / "jobs" / "train"), input=b'{"token": 3}')
    assert bad["_rc"] == 1 and "bad request" in bad["_stderr"], bad


def test_commands_with_input_work_as_one_command_too(tmp_path: Path) -> None:
    # When the wrapper's serve session fails, ugrod runs the command on its own with the
    # same input on stdin: it must be read there too (sync-missing and sync-tree ignored it).
    import hashlib
    data = b"print('hi')\n"
    digest = hashlib.sha256(data).hexdigest()
    store = tmp_path / "store"
    query = json.dumps([[digest, len(data)]]).encode()
    assert wrapper("sync-missing", str(store), input=query)["missing"] == [digest]
    obj = store / digest[:2] / digest
    obj.parent.mkdir(parents=True)
    obj.write_bytes(data)
    obj.chmod(0o400)
    assert wrapper("sync-missing", str(store), input=query)["missing"] == []
    dest = tmp_path / "jobs" / "j" / "code"
    tree = {"tree": "t1", "entries": [["train.py", 0o644, len(data), digest]],
            "claim": {"token": "j@1.000000", "first": True}}
    got = wrapper("sync-tree", str(store), str(dest), input=json.dumps(tree).encode())
    assert got["_rc"] == 0 and got["files"] == 1, got
    assert (dest / "train.py").read_bytes() == data
    assert (tmp_path / "jobs" / "j" / "job.token").read_text() == "j@1.000000"
