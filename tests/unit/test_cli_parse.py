"""ugroctl's parsing, request shapes and error mapping, against a real Unix-socket HTTP peer.

The peer is a small stdlib ``socketserver`` server run by the test (not a mock):
it records every request it gets and answers from a table, so we see exactly
what ugroctl sends and how it turns answers (and garbage) into exit codes.
The lead's end-to-end tests run the same CLI against the real ugrod.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ugroctl import client as ctl_client
from ugroctl.cli import cli, find_batch_size, main
from ugroctl.client import Client, SshTunnel, seg

ROOT = Path(__file__).resolve().parents[2]

JOB = {"id": "exp1", "name": "exp1", "state": "queued", "owner": "alice", "uid": 1000,
       "nodes": [], "gpus": [], "exit_code": None, "reason": "", "waiting_reason": "",
       "submitted_at": "2026-01-20T12:00:00.000000Z", "started_at": None, "ended_at": None,
       "priority": 0, "held": False, "attempt": 0, "argv": ["train.py"],
       "spec": {"argv": ["train.py"], "nodes": 1, "gpus_per_node": 0}, "ranks": [],
       "metrics": {}, "stopping": None, "retry_at": None, "checkpoints": []}


class Answer:
    """What the peer sends for one route: JSON with a status, raw bytes, or a chunked body."""

    def __init__(self, status: int = 200, doc: Any = None, raw: bytes | None = None,
                 chunks: list[bytes] | None = None) -> None:
        self.status, self.doc, self.raw, self.chunks = status, doc, raw, chunks


class Peer:
    """A real HTTP/1.1 server on a Unix socket, recording requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], list[Answer]] = {}
        self.requests: list[dict[str, Any]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                peer.requests.append({
                    "method": self.command, "path": path, "query": query,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(body) if body else None})
                queue = peer.routes.get((self.command, path))
                ans = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else None
                if ans is None:
                    ans = Answer(404, {"error": f"no route {self.command} {path}",
                                       "code": "not_found"})
                if ans.raw is not None:
                    self.wfile.write(ans.raw)
                    self.close_connection = True
                    return
                if ans.chunks is not None:
                    self.send_response(ans.status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for c in ans.chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                data = json.dumps(ans.doc).encode()
                self.send_response(ans.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def on(self, method: str, path: str, *answers: Answer) -> None:
        """Answer requests in turn; the last answer repeats."""
        self.routes[(method, path)] = list(answers)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ugc-", dir="/tmp"))  # socket paths: < 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def peer(sock_dir: Path) -> Iterator[Peer]:
    p = Peer(str(sock_dir / "s.sock"))
    try:
        yield p
    finally:
        p.close()


def run(peer: Peer | None, *args: str, input: str | None = None) -> Any:
    sock = peer.path if peer is not None else "/tmp/ugro-test-nowhere/none.sock"
    res = CliRunner().invoke(cli, ["--socket", sock, *args], input=input,
                             catch_exceptions=False)
    return res


def subprocess_ctl(*args: str | bytes, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[bytes]:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ugroctl", *args], env=e,
                          capture_output=True, timeout=60)


# ---- argument parsing that never reaches a daemon --------------------------------


def test_submit_without_a_command_is_a_usage_error(peer: Peer) -> None:
    res = run(peer, "submit", "--name", "x")
    assert res.exit_code == 2
    assert "CMD" in res.output
    assert peer.requests == []


@pytest.mark.parametrize("bad", ["NOEQUALS", "=v", "1X=2", "A B=1", "A-B=1"])
def test_bad_env_is_a_usage_error(peer: Peer, bad: str) -> None:
    res = run(peer, "submit", "--env", bad, "--", "true")
    assert res.exit_code == 2
    assert "--env" in res.output and "NAME=VALUE" in res.output
    assert peer.requests == []


@pytest.mark.parametrize("bad", ["lr", "lr=", "lr=1,,2", "=1,2", "lr=1,1", "a b=1"])
def test_bad_param_is_a_usage_error(peer: Peer, bad: str) -> None:
    res = run(peer, "sweep", "--name", "s", "--param", bad, "--", "train.py")
    assert res.exit_code == 2
    assert "--param" in res.output
    assert peer.requests == []


def test_param_given_twice_is_a_usage_error(peer: Peer) -> None:
    res = run(peer, "sweep", "--name", "s", "--param", "lr=1", "--param", "lr=2", "--", "x")
    assert res.exit_code == 2
    assert "twice" in res.output


@pytest.mark.parametrize("bad", ["batch_size", "=16", "a b=1"])
def test_set_without_equals_is_a_usage_error(peer: Peer, bad: str) -> None:
    res = run(peer, "resume", "exp1", "--set", bad)
    assert res.exit_code == 2
    assert "key=value" in res.output
    assert peer.requests == []


@pytest.mark.parametrize("args", [["--nodes", "0", "--", "x"], ["--min-vram", "-1", "--", "x"],
                                  ["--max-retries", "-2", "--", "x"], ["--nodes", "two", "x"]])
def test_bad_numbers_are_usage_errors(peer: Peer, args: list[str]) -> None:
    assert run(peer, "submit", *args).exit_code == 2
    assert peer.requests == []


def test_host_and_socket_together_is_a_usage_error() -> None:
    res = CliRunner().invoke(cli, ["--host", "head", "--socket", "/tmp/x.sock", "status"])
    assert res.exit_code == 2
    assert "--remote-socket" in res.output


def test_watch_with_json_is_a_usage_error(peer: Peer) -> None:
    assert run(peer, "health", "--watch", "--json").exit_code == 2


def test_options_after_a_job_file_are_refused(peer: Peer) -> None:
    res = run(peer, "submit", "job.yaml", "--priority", "5")
    assert res.exit_code == 2
    assert "before the job file" in res.output


def test_non_utf8_argument_is_refused_before_any_request(peer: Peer) -> None:
    res = subprocess_ctl("status", b"exp\xff\xfe", env={"UGRO_SOCKET": peer.path})
    assert res.returncode == 2
    assert b"not valid UTF-8" in res.stderr
    assert b"ugroctl:" in res.stderr
    assert peer.requests == []


def test_help_teaches_every_command() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    commands = ["health", "nodes", "launch", "submit", "status", "queue", "logs", "cancel",
                "results", "events", "replay", "why", "priority", "hold", "release",
                "checkpoint", "resume", "sweep", "drain", "undrain", "reload",
                "prometheus-config"]
    for name in commands:
        assert name in top.output
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Examples:" in res.output and f"ugroctl {name}" in res.output, name
    for sub in (["nodes", "trust"], ["sweep", "status"], ["sweep", "cancel"]):
        assert runner.invoke(cli, [*sub, "--help"]).exit_code == 0


def test_version() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("ugroctl ")


# ---- reaching the daemon -------------------------------------------------------------


def test_unreachable_socket_exits_3_naming_the_path() -> None:
    res = run(None, "status")
    assert res.exit_code == 3
    assert "/tmp/ugro-test-nowhere/none.sock" in res.output
    assert "start it with `ugrod`" in res.output


def test_socket_that_refuses_exits_3(sock_dir: Path) -> None:
    import socket

    path = str(sock_dir / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # bound, never listening: connect() is refused
    try:
        res = CliRunner().invoke(cli, ["--socket", path, "queue"])
    finally:
        s.close()
    assert res.exit_code == 3
    assert path in res.output


def test_env_socket_is_used_and_flag_wins(peer: Peer) -> None:
    peer.on("GET", "/v1/jobs", Answer(200, {"jobs": []}))
    res = CliRunner().invoke(cli, ["status"], env={"UGRO_SOCKET": peer.path})
    assert res.exit_code == 0
    res = CliRunner().invoke(cli, ["--socket", "/tmp/ugro-none/x.sock", "status"],
                             env={"UGRO_SOCKET": peer.path})
    assert res.exit_code == 3


def test_default_socket_path_follows_the_daemons_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from ugrod.config import paths

    assert ctl_client.default_socket_path() == str(paths.default_socket_path())


# ---- request shapes ----------------------------------------------------------------


def test_submit_sends_only_the_given_fields_and_a_request_id(peer: Peer) -> None:
    peer.on("POST", "/v1/jobs", Answer(201, {"job": JOB}))
    res = run(peer, "--json", "submit", "--name", "exp1", "--nodes", "3", "--gpus-per-node",
              "1", "--min-vram", "10", "--env", "SEED=1", "--env", "HF_HOME=/data/h=f",
              "--after", "exp0", "--hold", "--priority", "-5", "--",
              "train.py", "--lr", "2e-4", "; rm -rf ~")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["id"] == "exp1"
    req = peer.requests[0]
    body = req["body"]
    rid = body.pop("request_id")
    assert uuid.UUID(rid).version == 4
    assert req["headers"]["x-request-id"] == rid
    assert body == {"name": "exp1", "argv": ["train.py", "--lr", "2e-4", "; rm -rf ~"],
                    "nodes": 3, "gpus_per_node": 1, "min_vram_gb": 10.0,
                    "env": {"SEED": "1", "HF_HOME": "/data/h=f"}, "after": ["exp0"],
                    "held": True, "priority": -5, "submit_dir": os.getcwd()}


def test_submit_without_dashes_keeps_the_commands_own_options(peer: Peer) -> None:
    peer.on("POST", "/v1/jobs", Answer(201, {"job": JOB}))
    res = run(peer, "submit", "--no-torchrun", "python", "prep.py", "--nodes", "9")
    assert res.exit_code == 0, res.output
    body = peer.requests[0]["body"]
    assert body["argv"] == ["python", "prep.py", "--nodes", "9"]
    assert body["torchrun"] is False and "nodes" not in body
    assert "submitted exp1" in res.output


def test_ten_kilobyte_name_is_passed_through_for_the_server_to_judge(peer: Peer) -> None:
    name = "n" * 10_240
    peer.on("POST", "/v1/jobs", Answer(400, {"error": "invalid job name 'nnnn…'",
                                             "code": "bad_request"}))
    res = run(peer, "submit", "--name", name, "--", "true")
    assert res.exit_code == 1
    assert peer.requests[0]["body"]["name"] == name
    assert "ugroctl: invalid job name" in res.output


def test_job_names_are_one_path_segment(peer: Peer) -> None:
    run(peer, "status", "../../etc/passwd")
    run(peer, "logs", "a b?c#d")
    assert peer.requests[0]["path"] == "/v1/jobs/..%2F..%2Fetc%2Fpasswd"
    assert peer.requests[1]["path"] == "/v1/jobs/a%20b%3Fc%23d/logs"


def test_launch_sends_the_template_values(peer: Peer) -> None:
    peer.on("POST", "/v1/jobs", Answer(201, {"job": JOB}))
    res = run(peer, "launch", "--name", "exp1", "--model", "llama-7b", "--dataset",
              "wikitext", "--epochs", "3", "--lr", "2e-4", "--nodes", "3", "--detach")
    assert res.exit_code == 0, res.output
    body = peer.requests[0]["body"]
    assert body["launch"] == {"model": "llama-7b", "dataset": "wikitext", "epochs": 3,
                              "lr": 2e-4}
    assert body["name"] == "exp1" and body["nodes"] == 3 and "argv" not in body


def test_job_actions(peer: Peer) -> None:
    for action in ("priority", "hold", "release", "checkpoint", "resume", "cancel"):
        peer.on("POST", f"/v1/jobs/exp1/{action}", Answer(200, {"job": JOB}))
    assert run(peer, "priority", "exp1", "-5").exit_code == 0
    assert run(peer, "hold", "exp1").exit_code == 0
    assert run(peer, "release", "exp1").exit_code == 0
    assert run(peer, "checkpoint", "exp1").exit_code == 0
    assert run(peer, "resume", "exp1", "--set", "batch_size=16", "--set", "lr=1e-5"
               ).exit_code == 0
    bodies = {r["path"].rsplit("/", 1)[1]: r["body"] for r in peer.requests}
    assert bodies["priority"] == {"priority": -5}
    assert bodies["resume"] == {"set": {"batch_size": "16", "lr": "1e-5"}}
    assert bodies["hold"] == {}
    assert all("x-request-id" in r["headers"] for r in peer.requests)


def test_cancel_many_is_one_request_reporting_each_and_exits_with_the_worst(
        peer: Peer) -> None:
    peer.on("POST", "/v1/jobs/actions", Answer(200, {
        "action": "cancel",
        "jobs": [{**JOB, "id": "a", "state": "cancelled"},
                 {**JOB, "id": "b", "state": "running", "stopping": "cancelled"}],
        "refused": [{"job": "nope", "code": "not_found", "reason": "no job named 'nope'"}]}))
    res = run(peer, "cancel", "a", "b", "nope")
    assert res.exit_code == 4
    assert "a: cancelled" in res.output
    assert "b: stopping" in res.output
    assert "ugroctl: nope: no job named 'nope'" in res.output
    assert [r["body"]["jobs"] for r in peer.requests] == [["a", "b", "nope"]]


def test_bulk_filters_travel_as_one_request(peer: Peer) -> None:
    peer.on("POST", "/v1/jobs/actions", Answer(200, {"action": "priority", "jobs": [],
                                                     "refused": []}))
    assert run(peer, "priority", "--state", "queued,retrying", "--sweep", "lrs", "7"
               ).exit_code == 0
    assert run(peer, "hold", "--user", "bob").exit_code == 0
    bodies = [r["body"] for r in peer.requests]
    assert bodies[0] == {"action": "priority", "jobs": [], "states": ["queued", "retrying"],
                         "sweep": "lrs", "priority": 7}
    assert bodies[1] == {"action": "hold", "jobs": [], "user": "bob"}
    assert run(peer, "cancel").exit_code == 2  # nothing named or selected: a usage error
    assert run(peer, "priority", "a", "high").exit_code == 2


def test_sweep_body(peer: Peer) -> None:
    view = {"sweep": {"name": "lrs", "owner": "alice", "max_parallel": 2},
            "trials": [{"job": "lrs-0", "params": {"lr": "1e-5"}, "state": "queued",
                        "latest_loss": None, "final_loss": None, "duration_s": None}]}
    peer.on("POST", "/v1/sweeps", Answer(201, {"sweep": view}))
    res = run(peer, "sweep", "--name", "lrs", "--param", "lr=1e-5,2e-5", "--param",
              "lora_r=8,16", "--max-parallel", "2", "--gpus-per-node", "1", "--",
              "train.py", "--epochs", "1")
    assert res.exit_code == 0, res.output
    body = peer.requests[0]["body"]
    body.pop("request_id")
    assert body == {"name": "lrs", "params": {"lr": ["1e-5", "2e-5"], "lora_r": ["8", "16"]},
                    "argv": ["train.py", "--epochs", "1"], "gpus_per_node": 1,
                    "max_parallel": 2, "submit_dir": os.getcwd()}
    assert "lrs-0" in res.output


def test_drain_and_undrain(peer: Peer) -> None:
    peer.on("POST", "/v1/nodes/gpu1/drain", Answer(200, {"node": {"name": "gpu1"}}))
    peer.on("POST", "/v1/nodes/gpu1/undrain", Answer(200, {"node": {"name": "gpu1"}}))
    assert run(peer, "drain", "gpu1", "--reason", "fan").exit_code == 0
    assert run(peer, "undrain", "gpu1").exit_code == 0
    assert peer.requests[0]["body"] == {"reason": "fan"}


def test_events_query_and_json(peer: Peer) -> None:
    line = (b'{"seq":7,"v":1,"type":"job_submitted","ts":"2026-01-20T12:00:00.000000Z",'
            b'"actor":{"user":"alice","uid":1000},"data":{"job":"exp1"}}\n')
    peer.on("GET", "/v1/events", Answer(200, chunks=[line[:20], line[20:], line]))
    res = run(peer, "events", "--job", "exp1", "--since", "2026-01-20T12:00:00Z", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [e["seq"] for e in doc["events"]] == [7, 7]
    q = peer.requests[0]["query"]
    assert "job=exp1" in q and "since=2026-01-20T12%3A00%3A00.000000Z" in q
    res = run(peer, "events")
    assert "job_submitted" in res.output and "alice" in res.output


def test_logs_stream_bytes_as_they_come(peer: Peer) -> None:
    chunks = [b"step 1 loss 2.0\n", b"step 2 ", b"loss 1.5\n\xff raw bytes\n"]
    peer.on("GET", "/v1/jobs/exp1/logs", Answer(200, chunks=chunks))
    res = CliRunner().invoke(cli, ["--socket", peer.path, "logs", "exp1", "--rank", "1",
                                   "--tail", "5", "-f"])
    assert res.exit_code == 0
    assert res.stdout_bytes == b"".join(chunks)
    q = peer.requests[0]["query"]
    assert "rank=1" in q and "follow=1" in q and "tail=5" in q
    res = run(peer, "logs", "exp1", "--json")
    assert json.loads(res.output) == {"job": "exp1", "rank": None, "node_rank": None,
                                      "lines": ["step 1 loss 2.0", "step 2 loss 1.5",
                                                "\ufffd raw bytes"]}
    res = run(peer, "logs", "exp1", "--node-rank", "2")
    assert "node_rank=2" in peer.requests[-1]["query"]
    res = CliRunner().invoke(cli, ["--socket", peer.path, "logs", "exp1", "--rank", "1",
                                   "--node-rank", "1"])
    assert res.exit_code == 2 and "give one" in res.output


def test_status_json_is_one_document(peer: Peer) -> None:
    peer.on("GET", "/v1/jobs", Answer(200, {"jobs": [JOB]}))
    peer.on("GET", "/v1/jobs/exp1", Answer(200, {"job": JOB}))
    res = run(peer, "status", "--json")
    assert json.loads(res.output) == {"jobs": [JOB]}
    res = run(peer, "--json", "status", "exp1")
    assert json.loads(res.output) == JOB
    res = run(peer, "status")
    assert res.output.splitlines()[0].split() == ["JOB", "STATE", "OWNER", "NODES", "TRY",
                                                  "WHEN", "NOTE"]


def test_requests_share_one_connection(peer: Peer) -> None:
    peer.on("GET", "/v1/queue", Answer(200, {"queue": [{"position": 1, "job": "exp1",
                                                       "reason": "waiting for 2 GPUs",
                                                       "estimated_start": None}]}))
    peer.on("GET", "/v1/jobs", Answer(200, {"jobs": [JOB]}))
    res = run(peer, "queue")
    assert res.exit_code == 0, res.output
    assert "waiting for 2 GPUs" in res.output and "alice" in res.output
    assert [r["path"] for r in peer.requests] == ["/v1/queue", "/v1/jobs"]


# ---- error mapping -------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "exit_code"), [
    (404, "not_found", 4), (403, "forbidden", 5), (409, "conflict", 1),
    (400, "bad_request", 1), (503, "unavailable", 1)])
def test_api_errors_map_to_exit_codes(peer: Peer, status: int, code: str,
                                      exit_code: int) -> None:
    peer.on("POST", "/v1/jobs/exp1/cancel", Answer(status, {"error": f"it went {code}",
                                                            "code": code}))
    res = run(peer, "cancel", "exp1")
    assert res.exit_code == exit_code
    assert f"ugroctl: it went {code}" in res.output


def test_error_without_json_body_still_maps_by_status(peer: Peer) -> None:
    peer.on("GET", "/v1/jobs/x", Answer(raw=b"HTTP/1.1 404 Not Found\r\nContent-Length: 9"
                                            b"\r\n\r\nnot here!"))
    res = run(peer, "status", "x")
    assert res.exit_code == 4
    assert "HTTP 404" in res.output and "not here!" in res.output


@pytest.mark.parametrize("raw", [
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{bad}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"jobs\": []}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"\x00\xff" * 100,
])
def test_garbage_answers_are_a_clear_error(peer: Peer, raw: bytes) -> None:
    peer.on("GET", "/v1/jobs", Answer(raw=raw))
    res = run(peer, "status")
    assert res.exit_code == 1
    assert res.output.startswith("ugroctl: ")
    assert "Traceback" not in res.output
    assert any(w in res.output for w in ("does not speak", "not JSON", "cut off"))


def test_peer_closing_without_an_answer_is_unreachable(peer: Peer) -> None:
    peer.on("GET", "/v1/jobs", Answer(raw=b""))
    res = run(peer, "status")
    assert res.exit_code == 3
    assert "without an answer" in res.output


# ---- job files -------------------------------------------------------------------------


def test_job_file_submit(peer: Peer, sock_dir: Path) -> None:
    f = sock_dir / "job.yaml"
    f.write_text("name: exp1\ncommand: [python, train.py, --lr, 2e-4]\nnodes: 3\n"
                 "gpus_per_node: 1\nmin_vram_gb: 8\nenv: {HF_HOME: /data}\nmax_retries: 2\n")
    peer.on("POST", "/v1/jobs", Answer(201, {"job": JOB}))
    res = run(peer, "submit", "--priority", "5", str(f))
    assert res.exit_code == 0, res.output
    body = peer.requests[0]["body"]
    body.pop("request_id")
    assert body == {"name": "exp1", "argv": ["python", "train.py", "--lr", "2e-4"],
                    "nodes": 3, "gpus_per_node": 1, "min_vram_gb": 8.0,
                    "env": {"HF_HOME": "/data"}, "max_retries": 2, "priority": 5,
                    "submit_dir": os.getcwd()}


@pytest.mark.parametrize(("text", "where"), [
    ("command: [x]\ngpu: 1\n", "gpu: unknown key"),
    ("command: [x]\ngpus-per-node: 1\n", "did you mean 'gpus_per_node'"),
    ("command: [x]\nnodes: three\n", "nodes: expected a whole number"),
    ("command: [x]\nnodes: true\n", "nodes: expected a whole number"),
    ("command: [x]\nenv: {1BAD: x}\n", "env.1BAD"),
    ("nodes: 2\n", "command: missing"),
    ("command: [x\n", ": line 2, column 1: invalid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("command: 'python \"unclosed'\n", "command: cannot split"),
])
def test_bad_job_files_name_the_file_and_key(peer: Peer, sock_dir: Path, text: str,
                                             where: str) -> None:
    f = sock_dir / "job.yaml"
    f.write_text(text)
    res = run(peer, "submit", str(f))
    assert res.exit_code == 2
    assert f"ugroctl: {f}: " in res.output
    assert where in res.output
    assert peer.requests == []


def test_missing_job_file(peer: Peer) -> None:
    res = run(peer, "submit", "/tmp/no-such-dir-ugro/job.yml")
    assert res.exit_code == 2 and "cannot read" in res.output


# ---- resume after out-of-memory ------------------------------------------------------


def test_resume_after_oom_offers_half_the_batch(peer: Peer) -> None:
    failed = {**JOB, "state": "failed", "reason": "rank 1 on gpu1: CUDA out of memory",
              "argv": ["train.py", "--batch-size", "32"]}
    peer.on("GET", "/v1/jobs/exp1", Answer(200, {"job": failed}))
    peer.on("POST", "/v1/jobs/exp1/resume", Answer(200, {"job": JOB}))
    res = run(peer, "resume", "exp1", "--yes")
    assert res.exit_code == 0, res.output
    assert "out of GPU memory" in res.output
    assert peer.requests[-1]["body"] == {"set": {"batch_size": "16"}}


def test_find_batch_size() -> None:
    assert find_batch_size({"argv": ["t.py", "--batch_size=8"]}) == ("batch_size", 8)
    assert find_batch_size({"spec": {"params": {"batch_size": "4"}}}) == ("batch_size", 4)
    assert find_batch_size({"argv": ["t.py", "--lr", "1"]}) is None


# ---- remote control over ssh -W ------------------------------------------------------

FAKE_SSH = r'''
import os, socket, sys, threading
args = sys.argv[1:]
local, remote = args[args.index("-L") + 1].split(":", 1)
assert args[-2] == "--" and "-N" in args, args
open(os.environ["FAKE_SSH_LOG"], "w").write(" ".join(args).replace(local, "LOCAL"))
def pump(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(conn):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    up.connect(remote)
    threading.Thread(target=pump, args=(conn, up), daemon=True).start()
    pump(up, conn)
    conn.close()
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(local)
srv.listen()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def test_host_runs_http_through_an_ssh_streamlocal_forward(peer: Peer, sock_dir: Path) -> None:
    """A stand-in ssh (the real one needs sshd: see the integration tests) that does what
    ``ssh -N -L LOCAL:REMOTE HEAD`` does, checked with the argv ugroctl gives it."""
    fake = sock_dir / "ssh"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SSH}")
    fake.chmod(0o755)
    log = sock_dir / "ssh.log"
    peer.on("GET", "/v1/jobs", Answer(200, {"jobs": [JOB]}))
    peer.on("GET", "/v1/jobs/exp1/logs", Answer(200, chunks=[b"hello\n", b"world\n"]))
    env = {"UGRO_SSH": str(fake), "FAKE_SSH_LOG": str(log)}
    tunnels_before = set(Path("/tmp").glob("ugroctl-*"))
    res = subprocess_ctl("--host", "gpu-master", "--remote-socket", peer.path, "status",
                         env=env)
    assert res.returncode == 0, res.stderr
    assert b"exp1" in res.stdout
    assert log.read_text() == ("-N -T -o ExitOnForwardFailure=yes -o StreamLocalBindUnlink=yes "
                               f"-o ControlPath=none -L LOCAL:{peer.path} -- gpu-master")
    res = subprocess_ctl("--host", "gpu-master", "--remote-socket", peer.path, "logs", "exp1",
                         env=env)
    assert res.returncode == 0 and res.stdout == b"hello\nworld\n"
    assert set(Path("/tmp").glob("ugroctl-*")) <= tunnels_before  # its socket dir is gone


def test_ssh_argv_cannot_be_turned_into_options() -> None:
    argv = SshTunnel("-oProxyCommand=evil", "/run/ugro/ugrod.sock").argv()
    assert argv[-2:] == ["--", "-oProxyCommand=evil"]


def test_ssh_that_fails_is_unreachable(sock_dir: Path) -> None:
    fake = sock_dir / "ssh"
    fake.write_text("#!/bin/sh\necho 'ssh: connect to host head port 22: refused' >&2\n"
                    "exit 255\n")
    fake.chmod(0o755)
    res = subprocess_ctl("--host", "head", "status", env={"UGRO_SSH": str(fake)})
    assert res.returncode == 3
    assert b"head:/run/ugro/ugrod.sock (via ssh)" in res.stderr
    assert b"ssh exited with code 255" in res.stderr
    assert b"port 22: refused" in res.stderr  # ssh's own words reach the user


def test_client_reuses_its_connection(peer: Peer) -> None:
    peer.on("GET", "/v1/ping", Answer(200, {"ok": True}))
    with Client(socket_path=peer.path) as c:
        assert c.get("/v1/ping") == {"ok": True}
        first = c._conn
        assert c.get("/v1/ping") == {"ok": True}
        assert c._conn is first


def test_seg_encodes_everything_but_unreserved() -> None:
    assert seg("exp-1_a.b~") == "exp-1_a.b~"
    assert seg("a/b") == "a%2Fb"


def test_main_returns_exit_status(peer: Peer) -> None:
    assert main(["--socket", "/tmp/ugro-none/x.sock", "status"]) == 3


# ---- without the daemon: replay, prometheus-config ----------------------------------


def _write_log(state_dir: Path) -> None:
    """A real event log (ugrod's own writer): a node, then a job submitted, placed, ended."""
    from ugrod.core import codec
    from ugrod.core import events as ev
    from ugrod.store import log as evlog

    alice = ev.Actor(user="alice", uid=1000)
    spec = ev.JobSpec(argv=("train.py",))
    facts: list[tuple[ev.Actor, ev.Event]] = [
        (ev.DAEMON, ev.NodeAdded(node=ev.NodeSpec(name="local", host="127.0.0.1"))),
        (alice, ev.JobSubmitted(job="exp1", spec=spec)),
        (ev.DAEMON, ev.JobPlaced(job="exp1", attempt=1,
                                 ranks=(ev.RankPlacement(rank=0, node="local"),))),
        (ev.DAEMON, ev.JobEnded(job="exp1", attempt=1, outcome="failed", exit_code=1,
                                reason="rank 0 on local exited with code 1")),
    ]
    log = evlog.EventLog.open(state_dir)
    try:
        for seq, (actor, event) in enumerate(facts, 1):
            rec = ev.Record(seq=seq, ts=1_769_000_000.0 + seq * 60, actor=actor, event=event)
            log.append_sync([codec.encode(rec)])
    finally:
        log.close_sync()


@pytest.mark.parametrize(("until", "state"), [("2", "queued"), ("4", "failed"),
                                               ("2026-01-21T12:56:30Z", "starting")])
def test_replay_reads_the_log_with_no_daemon(sock_dir: Path, until: str, state: str) -> None:
    _write_log(sock_dir / "state")
    res = CliRunner().invoke(cli, ["--socket", "/tmp/ugro-none/x.sock", "replay", "--until",
                                   until, "--state-dir", str(sock_dir / "state"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [(j["id"], j["state"], j["owner"]) for j in doc["jobs"]] == [("exp1", state,
                                                                         "alice")]
    assert [n["name"] for n in doc["nodes"]] == ["local"]
    text = CliRunner().invoke(cli, ["replay", "--until", until, "--state-dir",
                                    str(sock_dir / "state")])
    assert text.exit_code == 0 and "state after event" in text.output


def test_replay_without_a_log_says_where_it_looked(sock_dir: Path) -> None:
    res = CliRunner().invoke(cli, ["replay", "--until", "5", "--state-dir", str(sock_dir)])
    assert res.exit_code == 1
    assert f"no event log in {sock_dir}" in res.output
    res = CliRunner().invoke(cli, ["replay", "--until", "last tuesday", "--state-dir",
                                   str(sock_dir)])
    assert res.exit_code == 2 and "expected a time" in res.output


def test_prometheus_config_for_the_builtin_cluster() -> None:
    import yaml

    from ugrod.config.paths import ROOT_CONFIG

    if ROOT_CONFIG.exists():
        pytest.skip(f"{ROOT_CONFIG} exists here")
    res = CliRunner().invoke(cli, ["prometheus-config", "--exporter-port", "9500"],
                             env={"UGRO_CONFIG": ""})
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    # This machine runs no GPU exporter unless cluster.yaml says `gpu_exporter: true`.
    assert [j["job_name"] for j in doc["scrape_configs"]] == ["ugrod"]
    # Not silently: the person and the file both say which cluster this is.
    assert "describes the built-in one-node cluster" in res.stderr
    assert res.stdout.startswith("# no cluster.yaml given")


def test_prometheus_config_exporter_targets_and_alertmanager(sock_dir: Path) -> None:
    import yaml

    cfg = sock_dir / "cluster.yaml"
    cfg.write_text("nodes:\n  a: {host: 10.0.0.1, user: u, gpu_exporter: true}\n"
                   "  b: {host: 10.0.0.2, user: u}\n")
    res = CliRunner().invoke(cli, ["prometheus-config", "--config", str(cfg),
                                   "--exporter-port", "9500",
                                   "--alertmanager", "http://10.0.0.9:9093"])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["ugro-gpu"]["static_configs"] == [
        {"targets": ["10.0.0.1:9500"], "labels": {"node": "a"}}]
    assert doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == \
        ["10.0.0.9:9093"]


def test_prometheus_config_with_a_bad_config_names_the_file(sock_dir: Path) -> None:
    bad = sock_dir / "cluster.yaml"
    bad.write_text("nodes: [\n")
    res = CliRunner().invoke(cli, ["prometheus-config", "--config", str(bad)])
    assert res.exit_code == 1
    assert str(bad) in res.output


# ---- trust, wait ------------------------------------------------------------------------


def test_nodes_trust_shows_the_key_and_sends_back_the_line_it_showed(peer: Peer) -> None:
    key = {"node": "gpu1", "host": "192.168.1.101", "port": 22, "key_type": "ssh-ed25519",
           "fingerprint": "SHA256:abc", "line": "[192.168.1.101]:22 ssh-ed25519 AAAA",
           "known_hosts": "/root/.ssh/known_hosts"}
    peer.on("GET", "/v1/nodes/gpu1/hostkey", Answer(200, key))
    peer.on("POST", "/v1/nodes/gpu1/trust", Answer(200, {"node": "gpu1",
                                                          "trusted": "SHA256:abc"}))
    res = run(peer, "nodes", "trust", "gpu1")  # no terminal, no --yes: refuse
    assert res.exit_code == 1
    assert "SHA256:abc" in res.output and "--yes" in res.output
    assert [r["method"] for r in peer.requests] == ["GET"]
    res = run(peer, "nodes", "trust", "gpu1", "--yes")
    assert res.exit_code == 0, res.output
    assert peer.requests[-1]["body"] == {"line": key["line"]}
    assert "trusted gpu1's key SHA256:abc" in res.output


@pytest.mark.parametrize(("outcome", "exit_code"), [("succeeded", 0), ("failed", 1)])
def test_submit_wait_follows_the_jobs_events(peer: Peer, outcome: str, exit_code: int) -> None:
    ended = {**JOB, "state": outcome, "exit_code": 0 if outcome == "succeeded" else 2}
    peer.on("POST", "/v1/jobs", Answer(201, {"job": JOB}))
    peer.on("GET", "/v1/jobs/exp1", Answer(200, {"job": JOB}), Answer(200, {"job": ended}))
    line = json.dumps({"seq": 9, "type": "job_ended", "data": {"job": "exp1",
                                                               "outcome": outcome}})
    peer.on("GET", "/v1/events", Answer(200, chunks=[
        b'{"seq":8,"type":"job_running","data":{"job":"exp1"}}\n', line.encode() + b"\n"]))
    res = run(peer, "submit", "--wait", "--name", "exp1", "--", "true")
    assert res.exit_code == exit_code, res.output
    assert f"exp1: {outcome}" in res.output
    q = next(r["query"] for r in peer.requests if r["path"] == "/v1/events")
    assert "job=exp1" in q and "follow=1" in q
