"""Rank launch on 3 real sshd nodes: NodeAgent.spawn vs the seeds' one-ssh-per-node way.

Usage: python bench/bench_launch.py [--rounds N] [--python PY] [--as-user USER]

As root, ranks get a cgroup each (cgroup v2); ``--as-user USER`` logs in as that account
instead (a per-user account of cluster.yaml's users:; both ways alike): no cgroup then, the
subreaper supervisor alone.

Starts three OpenSSH sshd nodes on 127.0.0.1-3 (tests/sshd_nodes.py), then measures:
  1. launch: time from "go" until a trivial rank is running on all 3 nodes (each rank
     records time.time() as its first act), median of N rounds, for
     - baseline: the seeds' way, one `ssh user@host 'cd DIR && nohup CMD > LOG 2>&1 &'`
       subprocess per node, started one after another;
     - ugrod warm: NodeAgent.spawn on all nodes concurrently over the persistent
       connections and wrapper sessions ugrod keeps (the steady state);
     - ugrod cold: new transports, so connect + wrapper check + session + spawn.
     Target: warm <= 0.3x the baseline.
  2. exit -> event: time from a rank's exit (its last act records time.time()) until
     NodeAgent.watch yields RankExit, median and max over N ranks per node.
     Target: < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import aclosing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshd_nodes import SshdCluster, SshdNode, start_sshd_nodes  # noqa: E402

from ugrod.nodes.agent import NodeAgent, RankExit  # noqa: E402

# The rank: note when it started running, then end (an ssh that ran `nohup CMD &` returns
# only once CMD ends, here as in the seeds; a short rank keeps that out of the baseline).
RANK = "import sys, time; open(sys.argv[1], 'w').write(repr(time.time()))"
# A rank that exits after a moment and records the instant it exits (a shell: no
# interpreter teardown between its last act and its exit).
EXITING = 'sleep 0.3; date +%s.%N > "$0"'


def wait_files(paths: list[Path], timeout_s: float = 30) -> float:
    """The latest of the times the ranks wrote into ``paths`` (waits for all)."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() and p.read_text() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks never started: {paths}")
        time.sleep(0.005)
    return max(float(p.read_text()) for p in paths)


def seeds_way(cluster: SshdCluster, python: str, tag: str) -> float:
    """One ssh per node, one after another, each starting the rank with nohup."""
    markers = [work_dir(n) / f"{tag}.started" for n in cluster]
    began = time.time()
    for node, marker in zip(cluster, markers, strict=True):
        remote = (
            f"cd {shlex.quote(str(work_dir(node)))} && nohup {python} -c {shlex.quote(RANK)} "
            f"{shlex.quote(str(marker))} > {tag}.log 2>&1 &"
        )
        subprocess.run(
            [
                "ssh",
                "-p",
                str(node.port),
                "-i",
                str(node.identity),
                "-o",
                f"UserKnownHostsFile={node.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                f"{AS_USER or node.user}@{node.host}",
                remote,
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    return wait_files(markers) - began


async def ugrod_way(agents: list[NodeAgent], nodes: list[SshdNode], python: str) -> float:
    """NodeAgent.spawn on every node at once."""
    job = f"b{uuid.uuid4().hex[:8]}"
    markers = [work_dir(n) / f"{job}.started" for n in nodes]
    began = time.time()
    await asyncio.gather(
        *(
            a.spawn(job, 0, r, [python, "-c", RANK, str(m)], {"UGRO_JOB_ID": job})
            for r, (a, m) in enumerate(zip(agents, markers, strict=True))
        )
    )
    return await asyncio.to_thread(wait_files, markers) - began


async def exit_latency(agent: NodeAgent, node: SshdNode, python: str) -> float:
    """Seconds from the rank's exit to the RankExit event."""
    job = f"x{uuid.uuid4().hex[:8]}"
    marker = work_dir(node) / f"{job}.ended"
    await agent.spawn(job, 0, 0, ["sh", "-c", EXITING, str(marker)], {"UGRO_JOB_ID": job})
    async with aclosing(agent.watch(job, 0, 0)) as events:
        async for event in events:
            if isinstance(event, RankExit):
                seen = time.time()
    return seen - float(marker.read_text())


AS_USER: str | None = None


def work_dir(node: SshdNode) -> Path:
    """Where ranks run and write their markers: the node's, or the account's own."""
    return node.dir / f"work-{AS_USER}" if AS_USER else node.work_dir


def agent(node: SshdNode, python: str) -> NodeAgent:
    return NodeAgent(node.transport(user=AS_USER), str(work_dir(node)), python=python)


def as_user_dirs(cluster: SshdCluster) -> None:
    """The account's own work dir on each node, and its login (sshd reads the keys as it)."""
    import os
    import pwd

    pw = pwd.getpwnam(AS_USER or "")
    cluster.root.chmod(0o711)
    (cluster.root / "authorized_keys").chmod(0o644)
    for node in cluster:
        node.dir.chmod(0o711)
        work_dir(node).mkdir(mode=0o700)
        os.chown(work_dir(node), pw.pw_uid, pw.pw_gid)


async def main(rounds: int, python: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ugro-bench-") as tmp:
        cluster = start_sshd_nodes(Path(tmp))
        try:
            if AS_USER:
                Path(tmp).chmod(0o711)
                as_user_dirs(cluster)
            nodes = list(cluster)
            base = [seeds_way(cluster, python, f"s{i}") for i in range(rounds)]

            agents = [agent(n, python) for n in nodes]
            # ugrod keeps these up: connection, wrapper checked, wrapper session open
            await asyncio.gather(*(a.free_port() for a in agents))
            warm = [await ugrod_way(agents, nodes, python) for _ in range(rounds)]

            cold = []
            for _ in range(rounds):
                fresh = [agent(n, python) for n in nodes]
                cold.append(await ugrod_way(fresh, nodes, python))
                for a in fresh:
                    await a.close()
                    await a.transport.close()

            lat: list[float] = []
            for _ in range(rounds):
                lat += await asyncio.gather(
                    *(exit_latency(a, n, python) for a, n in zip(agents, nodes, strict=True))
                )
            for a in agents:
                await a.close()
                await a.transport.close()
        finally:
            cluster.close()

    b, w, c = statistics.median(base), statistics.median(warm), statistics.median(cold)
    print(f"launch on 3 sshd nodes, median of {rounds} (python: {python}; login: "
          f"{AS_USER or 'root, a cgroup per rank' if AS_USER is None else AS_USER})")
    print(f"  baseline, one ssh per node in turn : {b * 1000:7.0f} ms")
    print(f"  ugrod warm, spawn x3 concurrently  : {w * 1000:7.0f} ms  = {w / b:.2f}x", end="")
    print("  (target <= 0.30x)")
    print(f"  ugrod cold, connect+check+spawn    : {c * 1000:7.0f} ms  = {c / b:.2f}x")
    print(f"exit -> RankExit event, {len(lat)} ranks on 3 nodes (baseline: none, seeds poll)")
    print(
        f"  median {statistics.median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
        "(target < 1000 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--python", default="python3", help="interpreter on the nodes")
    parser.add_argument("--as-user", default=None, help="log in as this account (both ways)")
    args = parser.parse_args()
    AS_USER = args.as_user
    asyncio.run(main(args.rounds, args.python))
