"""Commands per second through the Unix-socket API, against a no-op route of the same app.

Figure (issue 2): durable commands (POST /v1/jobs, answered only after fdatasync)
with 64 concurrent clients reach ≥ 0.7× the rate of the same aiohttp app answering
GET /v1/ping (no state change, no disk) in the same run: durability costs ≤ 30 %.

A third rate isolates durability itself: the same submit with ``?dry_run=1``
makes every check and builds the job the same way, but records nothing (no
apply into live state, no encode, no append, no fdatasync, no wait).

ugrod runs as a subprocess on the built-in cluster; the clients are 64
keep-alive connections in this process speaking HTTP/1.1 directly (like wrk),
each sending requests back to back.

Usage: python bench/bench_api.py [--clients 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def load(sock: str, clients: int, seconds: float,
               command: str | None) -> tuple[int, list[float]]:
    """Requests/s with ``clients`` keep-alive connections, each sending back to back.

    The clients speak HTTP/1.1 straight over asyncio streams (like wrk): building
    and parsing requests with a full client library would make the load generator,
    which shares this machine's cores, the thing being measured.
    """
    latencies: list[float] = []
    done = 0
    stop = time.perf_counter() + seconds
    tag = os.getpid()

    async def client(n: int) -> None:
        nonlocal done
        reader, writer = await asyncio.open_unix_connection(sock)
        i = 0
        while time.perf_counter() < stop:
            if command is not None:
                body = (b'{"name":"b%d-%d-%d","argv":["true"],"held":true}' % (n, i, tag))
                req = (b"POST /v1/jobs%s HTTP/1.1\r\nHost: u\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n"
                       % (command.encode(), len(body))) + body
                want = b"200" if command else b"201"
            else:
                req = b"GET /v1/ping HTTP/1.1\r\nHost: u\r\n\r\n"
                want = b"200"
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            assert status == want, head
            latencies.append(time.perf_counter() - t0)
            done += 1
            i += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return int(done / (time.perf_counter() - t0)), latencies


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ugb-", dir="/tmp"))
    sock = base / "s.sock"
    env = dict(os.environ, UGRO_STATE_DIR=str(base / "state"), UGRO_SOCKET=str(sock),
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ugrod.cli", "--log-level", "warning"],
                            env=env, cwd=ROOT)
    try:
        for _ in range(300):
            if sock.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        noop, noop_lat = asyncio.run(load(str(sock), args.clients, args.seconds, None))
        dry, dry_lat = asyncio.run(load(str(sock), args.clients, args.seconds, "?dry_run=1"))
        cmds, cmd_lat = asyncio.run(load(str(sock), args.clients, args.seconds, ""))
        print(f"no-op GET /v1/ping: {noop:,}/s (p50 {pct(noop_lat, .5):.1f} ms, "
              f"p99 {pct(noop_lat, .99):.1f} ms) with {args.clients} clients")
        print(f"dry-run POST /v1/jobs?dry_run=1: {dry:,}/s (p50 {pct(dry_lat, .5):.1f} ms, "
              f"p99 {pct(dry_lat, .99):.1f} ms)")
        print(f"durable POST /v1/jobs: {cmds:,}/s (p50 {pct(cmd_lat, .5):.1f} ms, "
              f"p99 {pct(cmd_lat, .99):.1f} ms)")
        print(f"ratio: {cmds / noop:.2f}x the no-op route (target ≥ 0.7x); "
              f"{cmds / dry:.2f}x the same submit not recorded (durability's own cost)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
