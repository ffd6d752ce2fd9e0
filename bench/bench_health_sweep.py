"""One full health sweep over 50 nodes: ugrod's Monitor against the seeds' way, same run.

Usage: python bench/bench_health_sweep.py [--nodes 50] [--sweeps 5] [--baseline-nodes N]

Nodes: 50 real OpenSSH ``sshd`` processes on 127.0.0.1-50 (tests/sshd_nodes.py), not
asyncssh servers inside this process. Why: the cost of a sweep is on the far side of the
link (a session and a process started per command on every node) as much as on ours, and an
in-process asyncssh server would put the servers' crypto and process spawning in the same
event loop as the monitor being measured, making the figure meaningless; real sshd
processes are what a node runs, each costs a few MB, and the tests already use them. Every
node has a stand-in ``nvidia-smi`` first on its PATH, for both ways, so both pay for one
GPU query process per node: a ``/bin/sh`` script printing one real-format row (the real
binary is a C program; the tests' Python fake would add a Python start-up per query to both
sides and mostly measure that).

  ugrod: ``Monitor.sweep()`` over persistent SSH connections (asyncssh, one per node), all
    nodes at once, one round trip per node to the node's long-lived probe process (see
    ugrod/loops/monitor.py); the first sweep connects and starts the probes and is not counted.
    Figure: median wall time of ``--sweeps`` sweeps. Target: <= 1 s.
  baseline, the seeds' way (000_*.txt ``_collect_node_metrics`` and 004_*.txt
    ``_check_node_health``): a new ``ssh`` process per command, nodes one after another:
    ``echo OK``, the nvidia-smi query, the top/free/df line, ``ps aux | grep``, one each.
    Figure: the wall time of one such sweep over ``--baseline-nodes`` nodes (default all),
    scaled to --nodes. Target: ugrod >= 20x faster.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshd_nodes import SshdCluster, start_sshd_nodes  # noqa: E402

from ugrod.config import schema as cfgmod
from ugrod.core import events as ev
from ugrod.loops.monitor import Monitor  # noqa: E402
from ugrod.metrics.runtime_stats import RuntimeStats  # noqa: E402
from ugrod.nodes import probe  # noqa: E402
from ugrod.nodes.agent import NodeAgent  # noqa: E402
from ugrod.nodes.transport.base import Transport  # noqa: E402
from ugrod.store.ledger import Ledger  # noqa: E402

# The seeds' commands, one ssh each (quoted as the seeds' shell strings were).
SEED_COMMANDS = [
    "echo OK",
    "nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total,temperature.gpu,"
    "power.draw --format=csv,noheader,nounits",
    "echo \"CPU:$(top -bn1 | grep 'Cpu(s)' | awk '{print $2}' | cut -d'%' -f1);"
    "MEM:$(free | grep Mem | awk '{printf \"%.1f\", $3/$2 * 100.0}');"
    "DISK:$(df -h / | tail -1 | awk '{print $5}' | cut -d'%' -f1)\"",
    "ps aux | grep -E '(python|torch|cuda)' | grep -v grep | awk '{print $2, $11, $12}' "
    "| head -10",
]


@dataclass
class Host:
    ledger: Ledger
    config: cfgmod.Config
    stats: RuntimeStats = field(default_factory=RuntimeStats)


FAKE_SMI = ("#!/bin/sh\n"
            "echo '0, GPU-5d2f3a1e-8c4b-4e7a-9f10-2b6c8d0e4a11, NVIDIA GeForce RTX 4070, "
            "37, 2315, 12282, 52, 118.47'\n")


def install_fake(cluster: SshdCluster) -> None:
    for n in cluster:
        smi = n.bin_dir / "nvidia-smi"
        smi.write_text(FAKE_SMI)
        smi.chmod(0o755)


def seeds_sweep(cluster: SshdCluster, count: int) -> float:
    """The seeds' way over the first ``count`` nodes; wall seconds."""
    t0 = time.perf_counter()
    for n in list(cluster)[:count]:
        for cmd in SEED_COMMANDS:
            subprocess.run(
                ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                 "-o", f"UserKnownHostsFile={cluster.known_hosts}",
                 "-o", "StrictHostKeyChecking=yes", "-i", str(cluster.identity),
                 "-p", str(n.port), f"{n.user}@{n.host}", cmd],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=30, check=False)
    return time.perf_counter() - t0


async def ugrod_sweeps(cluster: SshdCluster, state_dir: Path, sweeps: int) -> list[float]:
    """Monitor.sweep() times (the first, connecting, sweep excluded)."""
    ncs = [cfgmod.NodeConfig(name=n.name, host=n.host, port=n.port, user=n.user,
                             work_dir=str(n.work_dir), python=sys.executable) for n in cluster]
    # Latency is scored against a loaded 2-core test box: keep alerts out of the way.
    lenient = cfgmod.Thresholds(latency_ms=cfgmod.Level(5000.0, 10000.0))
    config = cfgmod.Config(nodes=tuple(ncs), health=cfgmod.HealthConfig(
        check_timeout_s=20.0, thresholds=lenient))
    ledger = Ledger.open(state_dir)
    host = Host(ledger=ledger, config=config)
    await ledger.record(ev.DAEMON, *(ev.NodeAdded(node=nc.spec()) for nc in ncs))
    transports: dict[str, Transport] = {n.name: n.transport(connect_timeout_s=20.0)
                                        for n in cluster}
    agents = {nc.name: NodeAgent(transports[nc.name], nc.work_dir, nc.python) for nc in ncs}
    monitor = Monitor(host, agents, transports)
    times: list[float] = []
    try:
        t0 = time.perf_counter()
        await monitor.sweep()
        first = time.perf_counter() - t0
        ok = len(monitor.latest_samples())
        print(f"first sweep (connect {len(ncs)} nodes, start probes): {first:.2f} s, "
              f"{ok}/{len(ncs)} nodes answered")
        for _ in range(sweeps):
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            await monitor.sweep()
            times.append(time.perf_counter() - t0)
        # For comparison: the one-shot probe (a Python process and an SSH session per node
        # per sweep), which is what sweeps did before the long-lived probe process.
        oneshot: list[float] = []
        argvs = [(a.transport, probe.probe_argv(a.python, await a.work_dir()))
                 for a in agents.values()]
        for _ in range(min(3, sweeps)):
            t0 = time.perf_counter()
            await asyncio.gather(*(t.run(argv) for t, argv in argvs))
            oneshot.append(time.perf_counter() - t0)
        print(f"one-shot probe per node (python -c per sweep), {len(ncs)} nodes at once: "
              f"median {statistics.median(oneshot):.3f} s")
        fails = sum(c.value for c in host.stats.health_failures.values())
        if fails:
            print(f"WARNING: {fails:.0f} failed checks")
        samples = monitor.latest_samples()
        if len(samples) != len(ncs):
            print(f"WARNING: only {len(samples)}/{len(ncs)} nodes have a sample")
        bad = [n for n, s in samples.items() if len(s.gpus) != 1 or s.gpu_error]
        if bad:
            print(f"WARNING: GPU reading wrong on {len(bad)} nodes, e.g. {bad[0]}: "
                  f"{samples[bad[0]].gpu_error}")
    finally:
        await monitor.close()
        for t in transports.values():
            await t.close()
        await ledger.close()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--sweeps", type=int, default=5)
    p.add_argument("--baseline-nodes", type=int, default=0, help="0: all nodes")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ugb-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        cluster = start_sshd_nodes(root / "sshd", count=args.nodes)
        print(f"{args.nodes} sshd nodes up in {time.perf_counter() - t0:.1f} s")
        try:
            install_fake(cluster)
            times = asyncio.run(ugrod_sweeps(cluster, root / "state", args.sweeps))
            n_base = args.baseline_nodes or args.nodes
            base = seeds_sweep(cluster, n_base) * args.nodes / n_base
        finally:
            cluster.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median(times)
    print(f"ugrod sweep, {args.nodes} nodes: median {med:.3f} s, max {max(times):.3f} s over "
          f"{len(times)} sweeps  (target <= 1 s: {'ok' if med <= 1.0 else 'MISSED'})")
    print(f"seeds' way, {args.nodes} nodes: {base:.2f} s per sweep"
          + (f" (measured on {n_base}, scaled)" if n_base != args.nodes else ""))
    print(f"speed-up: {base / med:.0f}x  (target >= 20x: "
          f"{'ok' if base / med >= 20 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
