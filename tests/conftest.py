"""Shared fixtures: a real ugrod subprocess on a real Unix socket, and the real ugroctl."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """A daemon run in-process sets the process umask (0077) for its files; restore it, so
    a later test's directories do not depend on which tests ran before it."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp: Unix socket paths must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ugt-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def ugroctl_argv() -> list[str]:
    exe = shutil.which("ugroctl")
    return [exe] if exe else [sys.executable, "-m", "ugroctl.cli"]


class Ugrod:
    """A ugrod subprocess; ``start`` waits until its socket answers."""

    def __init__(self, base: Path, config: Path | None = None, grace_s: float = 3.0) -> None:
        self.base = base
        self.state_dir = base / "state"
        self.socket = base / "ugrod.sock"
        self.config = config
        self.grace_s = grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = base / "ugrod.stderr"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(UGRO_STATE_DIR=str(self.state_dir), UGRO_SOCKET=str(self.socket),
                   PYTHONPATH=str(ROOT))
        env.pop("UGRO_CONFIG", None)
        env.pop("UGRO_HOST", None)
        return env

    def start(self, *extra: str, wait: bool = True, timeout_s: float = 30.0) -> None:
        argv = [sys.executable, "-m", "ugrod.cli", "--grace", str(self.grace_s),
                "--log-level", "debug", *extra]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        self._err = open(self.stderr_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self._err, stderr=self._err,
                                     cwd=ROOT)
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"ugrod exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.api("GET", "/v1/ping")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"ugrod not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
            timeout: float = 30.0) -> tuple[int, Any]:
        conn = UnixHTTPConnection(str(self.socket), timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                                else None)
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            ctype = resp.getheader("Content-Type", "")
            if "json" in ctype and "ndjson" not in ctype:
                return resp.status, json.loads(payload)
            return resp.status, payload
        finally:
            conn.close()

    def recorded_since(self, seq: int) -> list[str]:
        """Types of the events recorded after ``seq``, less the node monitor's and the
        daemon's own (those may come at any moment): what a request caused."""
        lines = self.api("GET", f"/v1/events?after={seq}")[1].splitlines()
        return [t for t in (json.loads(line)["type"] for line in lines)
                if not t.startswith(("node_", "daemon_"))]

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*ugroctl_argv(), *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, input=input.decode() if input else None)
        if check and res.returncode != 0:
            raise AssertionError(f"ugroctl {' '.join(args)} -> {res.returncode}\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def ctl_json(self, *args: str, timeout: float = 60.0) -> Any:
        res = self.ctl("--json", *args, timeout=timeout, check=True)
        return json.loads(res.stdout)

    def wait_job(self, job: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
                 timeout_s: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            status, body = self.api("GET", f"/v1/jobs/{job}")
            if status == 200:
                last = body["job"]
                if last["state"] in states:
                    return dict(last)
            time.sleep(0.1)
        raise AssertionError(f"job {job} not in {states} after {timeout_s} s: {last}\n"
                             f"{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"ugrod ignored signal {sig}:\n{self.log()}") from None
        self._err.close()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._err.close()


@contextlib.contextmanager
def served(d: Ugrod, *job_roots: Path) -> Iterator[Ugrod]:
    """Start ``d``; on the way out stop it and kill what its jobs left running under
    ``job_roots`` (default: its state directory; on sshd nodes, their work dirs)."""
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        for root in job_roots or (d.state_dir,):
            _kill_leftovers(root)


@pytest.fixture
def ugrod(short_tmp: Path) -> Iterator[Ugrod]:
    """A started ugrod on the built-in one-node cluster (this machine)."""
    with served(Ugrod(short_tmp)) as d:
        yield d


def _kill_leftovers(state_dir: Path) -> None:
    """Kill any rank a failed test left behind (found by its UGRO_JOB_DIR under state_dir)."""
    needle = f"UGRO_JOB_DIR={state_dir}".encode()
    for pid in pids_with_env(needle):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def pids_with_env(needle: bytes) -> list[int]:
    """Processes (of any user we can read) whose environment contains ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env:
            found.append(int(entry))
    return found
