"""Wall time of ``ugroctl status --json`` against ``python -c 'import click'``, same run.

The CLI runs as a fresh subprocess (as people run it) against a tiny Unix-socket
HTTP server in this process that answers the status request with a realistic
job list, so the figure is the CLI's own cost: interpreter start, imports, one
request, rendering. Target: median ratio ≤ 1.5.

    python bench/bench_cli_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _jobs(n: int) -> bytes:
    jobs = []
    for i in range(n):
        jobs.append({
            "id": f"exp{i}", "name": f"exp{i}", "state": "running" if i < 3 else "succeeded",
            "owner": "alice", "uid": 1000, "nodes": ["gpu-master", "gpu1", "gpu2"],
            "gpus": [{"node": n, "rank": r, "gpus": [0]}
                     for r, n in enumerate(["gpu-master", "gpu1", "gpu2"])],
            "exit_code": None if i < 3 else 0, "reason": "", "waiting_reason": "",
            "submitted_at": "2026-01-20T12:00:00.000000Z",
            "started_at": "2026-01-20T12:00:05.000000Z",
            "ended_at": None if i < 3 else "2026-01-20T13:00:00.000000Z",
            "priority": 0, "held": False, "attempt": 1, "argv": ["train.py", "--lr", "2e-4"],
            "spec": {"argv": ["train.py"], "nodes": 3, "gpus_per_node": 1},
            "ranks": [], "metrics": {"step": 4000, "loss": 1.234, "throughput": 812.5},
            "stopping": None, "retry_at": None, "checkpoints": [],
        })
    return json.dumps({"jobs": jobs}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _time(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=60, help="jobs in the status answer")
    args = ap.parse_args()

    _Handler.body = _jobs(args.jobs)
    with tempfile.TemporaryDirectory(prefix="ugro-bench-", dir="/tmp") as tmp:
        sock = os.path.join(tmp, "s.sock")
        server = _Server(sock, _Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
            "PYTHONPATH", ""), UGRO_SOCKET=sock)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        ctl = [sys.executable, "-c", "import sys; from ugroctl.cli import main; "
               "sys.exit(main())", "status", "--json"]
        base = [sys.executable, "-c", "import click"]
        for _ in range(3):  # warm the page cache and the .pyc files
            _time(ctl, env)
            _time(base, env)
        ctl_s, base_s = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            ctl_s.append(_time(ctl, env))
            base_s.append(_time(base, env))
        server.shutdown()
        server.server_close()
    c, b = statistics.median(ctl_s), statistics.median(base_s)
    print(f"ugroctl status --json   median {c * 1000:7.1f} ms  (min {min(ctl_s) * 1000:.1f}, "
          f"{args.runs} runs, {args.jobs} jobs)")
    print(f"python -c 'import click' median {b * 1000:7.1f} ms  (min {min(base_s) * 1000:.1f})"
          f"  <- baseline")
    ratio = c / b
    print(f"ratio {ratio:.2f} of medians (target <= 1.5): "
          f"{'ok' if ratio <= 1.5 else 'OVER TARGET'}; ratio of minima "
          f"{min(ctl_s) / min(base_s):.2f}")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
