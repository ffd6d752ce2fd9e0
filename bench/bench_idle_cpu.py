"""ugrod's CPU use while idle with 50 nodes: utime+stime from /proc/PID/stat.

Usage: python bench/bench_idle_cpu.py [--nodes 50] [--seconds 40]

Starts 50 real OpenSSH sshd nodes on 127.0.0.1-50 (tests/sshd_nodes.py; see
bench_health_sweep.py for why real sshd), each with a one-GPU stand-in nvidia-smi,
and a real ugrod (``python -m ugrod.cli``, log level info) on a cluster.yaml naming
them all, with the default health settings. Once every node has been checked (first
contact: SSH connections opened, inventories read, probe processes started), it reads
the daemon's utime+stime over ``--seconds`` of idling and prints the share of one core.

No job runs, so the health sweep runs at its idle interval (40 s; the window default
is one interval, so it holds one full 50-node sweep) and the watchdog ticks every
second with nothing to do; the SSH keepalives of the 50 connections run too.

Target: < 2 % of one core. Baseline: the seeds' own claim for their optimized monitor,
"15% CPU utilization with adaptive intervals" (000_*.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench_health_sweep import install_fake  # noqa: E402
from conftest import UnixHTTPConnection  # noqa: E402
from sshd_nodes import SshdCluster, start_sshd_nodes  # noqa: E402

SEEDS_CPU_PERCENT = 15.0
TARGET_PERCENT = 2.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(sock: Path, path: str) -> object:
    conn = UnixHTTPConnection(str(sock), timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def checks_total(port: int) -> float:
    conn = __import__("http.client").client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ugro_health_checks_total{"))


def write_config(path: Path, cluster: SshdCluster, metrics_port: int) -> None:
    cfg = {
        "cluster": {"name": "bench", "known_hosts": str(cluster.known_hosts)},
        "nodes": {n.name: {"host": n.host, "port": n.port, "user": n.user,
                           "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                           "transport": "ssh", "python": sys.executable} for n in cluster},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
    }
    path.write_text(yaml.safe_dump(cfg))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--seconds", type=float, default=40.0)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ugc-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    cluster = start_sshd_nodes(root / "sshd", count=args.nodes)
    try:
        install_fake(cluster)
        port = free_port()
        write_config(root / "cluster.yaml", cluster, port)
        sock = root / "ugrod.sock"
        env = dict(os.environ, UGRO_STATE_DIR=str(root / "state"), UGRO_SOCKET=str(sock),
                   PYTHONPATH=str(ROOT))
        with open(root / "ugrod.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ugrod.cli", "--config",
                                     str(root / "cluster.yaml"), "--log-level", "info"],
                                    env=env, stdout=log, stderr=log, cwd=ROOT)
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"ugrod exited:\n{(root / 'ugrod.log').read_text()[-3000:]}")
            try:
                nodes = api(sock, "/v1/nodes")["nodes"]  # type: ignore[index]
                if sum(1 for n in nodes if n["last_check"]) == args.nodes:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > 180:
                raise SystemExit("not every node was checked within 180 s")
            time.sleep(0.5)
        print(f"ugrod up and all {args.nodes} nodes checked in {time.monotonic() - t0:.1f} s "
              f"(start-up, connections, inventories, probe processes)")
        time.sleep(2.0)  # let the first sweep's bookkeeping settle
        c0, w0, k0 = cpu_seconds(proc.pid), time.monotonic(), checks_total(port)
        time.sleep(args.seconds)
        c1, w1, k1 = cpu_seconds(proc.pid), time.monotonic(), checks_total(port)
        errors = [ln for ln in (root / "ugrod.log").read_text().splitlines()
                  if " ERROR " in ln or " WARNING " in ln]
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    share = 100.0 * (c1 - c0) / (w1 - w0)
    print(f"ugrod idle CPU with {args.nodes} nodes over {w1 - w0:.0f} s: {share:.2f} % of one "
          f"core ({c1 - c0:.3f} CPU s; {k1 - k0:.0f} node checks = "
          f"{(k1 - k0) / args.nodes:.1f} sweeps in the window)")
    print(f"target < {TARGET_PERCENT:g} %: {'ok' if share < TARGET_PERCENT else 'MISSED'}; "
          f"seeds' optimized monitor (their claim): {SEEDS_CPU_PERCENT:g} %")
    if errors:
        kinds: dict[str, int] = {}
        for line in errors:
            what = re.sub(r"node\d+", "NODE", line.split(" ", 3)[-1])[:120]
            kinds[what] = kinds.get(what, 0) + 1
        print(f"ugrod logged {len(errors)} warnings/errors (start-up included):")
        for what, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {n} x {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
