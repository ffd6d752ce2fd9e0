"""Bounded resources on the control socket, against a real ugrod subprocess (issue 11, item 3).

On the old code ~1,100 idle connections at a 1024-descriptor limit made every accept()
fail and ugrod answered nobody; idle connections were never closed.
"""

from __future__ import annotations

import resource
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Ugrod, _kill_leftovers

PY = sys.executable


class LimitedUgrod(Ugrod):
    """ugrod started under ``prlimit --nofile=N:N`` (its soft and hard descriptor limits)."""

    def __init__(self, base: Path, nofile: int, config: Path | None = None) -> None:
        super().__init__(base, config)
        self.nofile = nofile

    def start(self, *extra: str, wait: bool = True, timeout_s: float = 30.0) -> None:
        import subprocess

        argv = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--",
                sys.executable, "-m", "ugrod.cli", "--grace", str(self.grace_s),
                "--log-level", "debug", *extra]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        self._err = open(self.stderr_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self._err, stderr=self._err)
        if wait:
            self.wait_ready(timeout_s)


def _config(base: Path, **api: object) -> Path:
    lines = ["metrics:", "  port: 0", "api:"] + [f"  {k}: {v}" for k, v in api.items()]
    path = base / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def more_fds() -> Iterator[None]:
    """This test process opens ~1,300 sockets: raise its own soft limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_1200_idle_connections_at_a_1024_limit_do_not_stop_ugrod(short_tmp: Path,
                                                                  more_fds: None) -> None:
    d = LimitedUgrod(short_tmp, nofile=1024, config=_config(short_tmp))
    d.start()
    idle: list[socket.socket] = []
    try:
        for i in range(1200):
            idle.append(_connect(d.socket))
            if i % 100 == 99:  # another client keeps getting answers meanwhile
                t0 = time.monotonic()
                status, body = d.api("GET", "/v1/ping", timeout=10)
                assert status == 200 and body["ok"], body
                assert time.monotonic() - t0 < 5
        status, job = d.api("POST", "/v1/jobs", {"argv": [PY, "-c", "print('still here')"],
                                                 "name": "after-flood"})
        assert status == 201, job
        assert d.wait_job("after-flood", timeout_s=60)["state"] == "succeeded"
        assert d.api("GET", "/v1/jobs/after-flood/logs")[1] == b"still here\n"
        # ugrod kept itself under its limit by closing the oldest idle connections
        deadline = time.monotonic() + 10
        while sum(_closed_by_peer(s) for s in idle) < 1200 - 256:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for s in idle:
            s.close()
        d.stop()
        _kill_leftovers(d.state_dir)


def test_idle_connections_close_and_busy_ones_are_capped_per_user(short_tmp: Path) -> None:
    d = Ugrod(short_tmp, config=_config(short_tmp, idle_timeout_s=1,
                                        max_connections_per_user=4))
    d.start()
    streams: list[socket.socket] = []
    try:
        silent = _connect(d.socket)  # connects and never sends a request
        t0 = time.monotonic()
        silent.settimeout(15)
        assert silent.recv(1) == b""  # closed by ugrod
        assert time.monotonic() - t0 < 10
        silent.close()
        # four slow clients are busy (a request in progress, its body still coming): a
        # fifth connection cannot evict them and is refused with a clear 503
        def slow() -> socket.socket:
            s = _connect(d.socket)
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: 1000\r\n\r\n{\"argv\": ")
            return s

        streams = [slow() for _ in range(4)]
        deadline = time.monotonic() + 10
        while True:  # (a ping accepted before a slow client's bytes were read evicts it)
            status, body = d.api("GET", "/v1/ping")
            if status == 503:
                break
            assert time.monotonic() < deadline, (status, body)
            streams = [s if not _closed_by_peer(s) else slow() for s in streams]
        assert status == 503, body
        assert "too many connections from uid" in body["error"]
        assert body["code"] == "unavailable"
        streams.pop().close()
        deadline = time.monotonic() + 10
        while d.api("GET", "/v1/ping")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for s in streams:
            s.close()
        d.stop()
