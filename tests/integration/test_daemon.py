"""ugrod as a subprocess on a real Unix socket: jobs, audit trail, hostile input, signals."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Ugrod, UnixHTTPConnection, pids_with_env

PY = sys.executable


def submit(d: Ugrod, argv: list[str], **kw: object) -> dict[str, object]:
    status, body = d.api("POST", "/v1/jobs", {"argv": argv, **kw})
    assert status == 201, body
    return body["job"]  # type: ignore[no-any-return]


def events(d: Ugrod, **query: str) -> list[dict[str, object]]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    status, raw = d.api("GET", f"/v1/events?{q}")
    assert status == 200
    return [json.loads(line) for line in raw.splitlines()]


def test_cpu_job_runs_and_every_change_is_in_the_log(ugrod: Ugrod) -> None:
    job = submit(ugrod, [PY, "-c", "import os; print('hello', os.environ['UGRO_JOB_ID'])"],
                 name="hello")
    assert job["state"] == "queued" and job["owner"] == getpass.getuser()
    done = ugrod.wait_job("hello")
    assert done["state"] == "succeeded" and done["exit_code"] == 0
    assert done["nodes"] == ["local"]
    status, log = ugrod.api("GET", "/v1/jobs/hello/logs")
    assert status == 200 and log == b"hello hello\n"
    jobdir = ugrod.state_dir / "jobs" / "hello"
    assert json.loads((jobdir / "config.json").read_text())["spec"]["argv"][0] == PY
    assert json.loads((jobdir / "result.json").read_text())["state"] == "succeeded"
    kinds = [e["type"] for e in events(ugrod, job="hello")]
    assert kinds == ["job_submitted", "job_placed", "rank_started", "job_running",
                     "rank_exited", "job_ended"]
    first = events(ugrod, job="hello")[0]
    assert first["actor"] == {"user": getpass.getuser(), "uid": os.getuid()}
    # the files on disk are plain JSONL that jq reads
    seg = sorted((ugrod.state_dir / "events").glob("*.jsonl"))
    out = subprocess.run(["jq", "-c", "select(.type == \"job_ended\") | .data.outcome"],
                         stdin=open(seg[-1], "rb"), capture_output=True, text=True, check=True)
    assert '"succeeded"' in out.stdout


def test_failed_job_reports_exit_code_and_last_lines(ugrod: Ugrod) -> None:
    submit(ugrod, [PY, "-c", "import sys; print('boom at step 3'); sys.exit(7)"], name="bad")
    done = ugrod.wait_job("bad")
    assert done["state"] == "failed" and done["exit_code"] == 7
    assert "rank 0 on local exited with code 7" in str(done["reason"])
    assert "boom at step 3" in str(done["reason"])


def test_command_that_does_not_exist_fails_clearly(ugrod: Ugrod) -> None:
    submit(ugrod, ["/nonexistent/train-xyz", "--lr", "1"], name="nocmd")
    done = ugrod.wait_job("nocmd")
    assert done["state"] == "failed"
    assert "/nonexistent/train-xyz" in str(done["reason"])


def test_cancel_kills_the_whole_process_group(ugrod: Ugrod) -> None:
    # The job forks a grandchild that ignores nothing special: both must go.
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              "print('started', flush=True); time.sleep(600)")
    submit(ugrod, [PY, "-c", script], name="long")
    ugrod.wait_job("long", ("running",))
    deadline = time.monotonic() + 10
    while b"started" not in ugrod.api("GET", "/v1/jobs/long/logs")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    needle = b"UGRO_JOB_ID=long\x00"
    assert len(pids_with_env(needle)) >= 2
    status, body = ugrod.api("POST", "/v1/jobs/long/cancel")
    assert status == 202 and body["job"]["stopping"] == "cancelled"
    done = ugrod.wait_job("long")
    assert done["state"] == "cancelled"
    assert pids_with_env(needle) == []


def test_jobs_queue_fifo_on_one_gpu_less_node(ugrod: Ugrod) -> None:
    submit(ugrod, [PY, "-c", "print(1)"], name="a1")
    submit(ugrod, [PY, "-c", "print(2)"], name="a2")
    assert ugrod.wait_job("a1")["state"] == "succeeded"
    assert ugrod.wait_job("a2")["state"] == "succeeded"


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"argv": ["x"], "name": "x; rm -rf ~"}, 400, "invalid job name"),
    ({"argv": ["x"], "name": "../../etc/passwd"}, 400, "invalid job name"),
    ({"argv": ["x"], "name": "a" * 10_000}, 400, "invalid job name"),
    ({"argv": ["x"], "name": ""}, 201, ""),
    ({"argv": []}, 400, "missing the command"),
    ({"name": "n"}, 400, "missing the command"),
    ({"argv": "python train.py"}, 400, "invalid request"),
    ({"argv": ["x"], "nodes": "three"}, 400, "invalid request"),
    ({"argv": ["x"], "nodes": 0}, 400, "nodes must be"),
    ({"argv": ["x"], "nodes": 3}, 400, "can never run here"),
    ({"argv": ["x"], "gpus_per_node": 1}, 400, "can never run here"),
    ({"argv": ["x"], "surprise": 1}, 400, "unknown field"),
    ({"argv": ["x\x00y"]}, 400, "NUL"),
    ({"argv": ["x"], "env": {"A=B": "1"}}, 400, "environment variable"),
    ({"argv": ["x"], "after": ["nope"]}, 400, "no such job"),
    ({"argv": ["x"], "max_retries": -1}, 400, "max_retries"),
], ids=lambda v: str(v)[:40] if not isinstance(v, int) else str(v))
def test_bad_submissions_get_a_clear_error_and_change_nothing(
        ugrod: Ugrod, body: dict[str, object], status: int, needle: str) -> None:
    seq = ugrod.api("GET", "/v1/ping")[1]["seq"]
    dry, dry_answer = ugrod.api("POST", "/v1/jobs?dry_run=1", body)  # the same checks
    assert dry == (200 if status == 201 else status), dry_answer
    assert (needle in dry_answer["error"]) if status != 201 else dry_answer["dry_run"]
    got, answer = ugrod.api("POST", "/v1/jobs", body)
    assert got == status, answer
    if status != 201:
        assert needle in answer["error"] and answer["code"] == "bad_request"
        assert ugrod.recorded_since(seq) == []


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"not json", 400, "bad_request"),
    (b"\xff\xfe\x00garbage", 400, "bad_request"),
    (b"[1, 2, 3]", 400, "bad_request"),
    (b'{"argv": ["x"]', 400, "bad_request"),
    (b"{" + b'"a":' * 50_000 + b"1", 400, "bad_request"),
    (b'{"argv": ["' + b"x" * (2 << 20) + b'"]}', 413, "too_large"),
], ids=["text", "binary", "list", "truncated", "deep", "huge"])
def test_bodies_that_are_not_a_job(ugrod: Ugrod, raw: bytes, status: int, code: str) -> None:
    got, answer = ugrod.api("POST", "/v1/jobs", raw=raw)
    assert got == status and answer["code"] == code, answer


def test_unknown_things_are_404_with_json(ugrod: Ugrod) -> None:
    for method, path in [("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/cancel"),
                         ("GET", "/v1/nope"), ("POST", "/v1/nodes/zz/drain"),
                         ("GET", "/v1/jobs/..%2F..%2Fetc/logs")]:
        status, body = ugrod.api(method, path)
        assert status == 404 and body["code"] == "not_found", (path, body)


def test_garbage_and_hanging_clients_do_not_block_others(ugrod: Ugrod) -> None:
    hang = socket.socket(socket.AF_UNIX)
    hang.connect(str(ugrod.socket))
    hang.sendall(b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # then nothing
    junk = socket.socket(socket.AF_UNIX)
    junk.connect(str(ugrod.socket))
    junk.sendall(os.urandom(4096) + b"\r\n\r\n")
    junk.settimeout(5)
    try:
        reply = junk.recv(100)
    except OSError:
        reply = b""
    assert reply == b"" or reply.startswith(b"HTTP/1.")
    t0 = time.monotonic()
    assert ugrod.api("GET", "/v1/ping")[0] == 200
    assert time.monotonic() - t0 < 2
    hang.close()
    junk.close()
    assert ugrod.api("GET", "/v1/ping")[0] == 200


def test_socket_is_0660_and_second_daemon_refuses_the_state_dir(ugrod: Ugrod,
                                                                short_tmp: Path) -> None:
    assert ugrod.socket.stat().st_mode & 0o777 == 0o660
    other = Ugrod(short_tmp / "b")
    (short_tmp / "b").mkdir()
    env = other.env
    env["UGRO_STATE_DIR"] = str(ugrod.state_dir)
    res = subprocess.run([PY, "-m", "ugrod.cli"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode != 0
    assert "lock" in res.stderr.lower() or "another ugrod" in res.stderr.lower(), res.stderr
    assert ugrod.api("GET", "/v1/ping")[0] == 200


def test_sigterm_snapshots_and_exits_0_then_restart_keeps_state(short_tmp: Path) -> None:
    d = Ugrod(short_tmp)
    d.start()
    submit(d, [PY, "-c", "print(1)"], name="s1")
    d.wait_job("s1")
    assert d.stop(signal.SIGTERM) == 0
    assert list((d.state_dir / "snapshots").glob("snapshot-*"))
    assert not d.socket.exists()
    d.start()
    try:
        assert d.wait_job("s1")["state"] == "succeeded"
        assert len(events(d, job="s1")) == 6
    finally:
        d.stop()


def test_crash_under_concurrent_clients_loses_no_acknowledged_event(short_tmp: Path) -> None:
    """kill -9 while 8 clients submit and cancel: every acknowledged job is there, once."""
    d = Ugrod(short_tmp)
    d.start()
    acked: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            name = f"c{n}-{i}"
            i += 1
            try:
                conn = UnixHTTPConnection(str(d.socket), timeout=5)
                conn.request("POST", "/v1/jobs", json.dumps(
                    {"argv": ["sleep", "30"], "name": name, "held": True}),
                    {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status == 201:
                    with lock:
                        acked[name] = "queued"
                conn.request("POST", f"/v1/jobs/{name}/cancel")
                r = conn.getresponse()
                r.read()
                if r.status in (200, 202):
                    with lock:
                        acked[name] = "cancelled"
                conn.close()
            except (OSError, http_errors()):
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    d.kill9()
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 20
    d.start()
    try:
        status, body = d.api("GET", "/v1/jobs?all=1")
        jobs = {j["id"]: j["state"] for j in body["jobs"]}
        for name, state in acked.items():
            assert name in jobs, f"acknowledged job {name} lost"
            if state == "cancelled":
                assert jobs[name] == "cancelled", name
        submitted = [e["data"]["job"] for e in events(d) if e["type"] == "job_submitted"]
        assert len(submitted) == len(set(submitted))
        seqs = [e["seq"] for e in events(d)]
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        d.stop()


def http_errors() -> type[Exception]:
    import http.client
    return http.client.HTTPException


def _event_lines(state_dir: Path) -> tuple[Path, list[bytes]]:
    seg = sorted((state_dir / "events").glob("*.jsonl"))[0]
    return seg, seg.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("damage", ["flip", "gap", "duplicate"])
def test_corruption_before_the_tail_stops_ugrod_and_touches_nothing(
        short_tmp: Path, damage: str) -> None:
    d = Ugrod(short_tmp)
    d.start()
    for i in range(5):
        submit(d, ["true"], name=f"k{i}", held=True)
    d.stop()
    seg, lines = _event_lines(d.state_dir)
    idx = next(i for i, ln in enumerate(lines) if b'"job":"k1"' in ln)
    if damage == "flip":
        lines[idx] = lines[idx].replace(b'"k1"', b'"k7"')
    elif damage == "gap":
        del lines[idx]
    else:
        lines.insert(idx, lines[idx])
    seg.write_bytes(b"".join(lines))
    before = seg.read_bytes()
    for p in (d.state_dir / "snapshots").glob("*"):
        p.unlink()
    res = subprocess.run([PY, "-m", "ugrod.cli"], env=d.env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode != 0
    assert seg.name in res.stderr and "line" in res.stderr, res.stderr
    assert seg.read_bytes() == before


def test_torn_tail_is_cut_kept_and_reported(short_tmp: Path) -> None:
    d = Ugrod(short_tmp)
    d.start()
    submit(d, ["true"], name="t1", held=True)
    d.stop()
    seg, _ = _event_lines(d.state_dir)
    with open(seg, "ab") as f:
        f.write(b'{"seq":999,"v":1,"type":"job_held","ts":"2026-')
    d.start()
    try:
        assert d.api("GET", "/v1/jobs/t1")[0] == 200
        broken = list((d.state_dir / "events").glob("*.broken*"))
        assert broken and b'"seq":999' in broken[0].read_bytes()
        assert "torn" in d.log().lower() or "broken" in d.log().lower()
    finally:
        d.stop()


@pytest.mark.parametrize(("line", "why"), [
    (b'{"seq":%d,"v":1,"type":"job_teleported","ts":"2026-11-22T10:00:00.000000Z",'
     b'"actor":{"user":"x","uid":1},"data":{}}', "unknown event type 'job_teleported'"),
    (b'{"seq":%d,"v":7,"type":"job_held","ts":"2026-11-22T10:00:00.000000Z",'
     b'"actor":{"user":"x","uid":1},"data":{"job":"h1"}}', "newer than this ugrod knows"),
], ids=["unknown-type", "newer-version"])
def test_events_this_ugrod_cannot_read_make_it_refuse_to_start(
        short_tmp: Path, line: bytes, why: str) -> None:
    from ugrod.store.log import EventLog
    d = Ugrod(short_tmp)
    d.start()
    submit(d, ["true"], name="h1", held=True)
    d.stop()
    for p in (d.state_dir / "snapshots").glob("*"):
        p.unlink()
    log = EventLog.open(d.state_dir)
    log.append_sync([line % (log.last_seq + 1)])  # a committed batch, checksums and all
    log.close_sync()
    res = subprocess.run([PY, "-m", "ugrod.cli"], env=d.env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode != 0
    assert why in res.stderr and "refusing to start" in res.stderr, res.stderr
