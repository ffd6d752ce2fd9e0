"""--sync of a 50 MB, 2,000-file project to 3 sshd nodes, against `rsync -a` over ssh.

Usage: python bench/bench_sync.py [--files 2000] [--mb 50]

Starts three OpenSSH sshd nodes on 127.0.0.1-3 (tests/sshd_nodes.py) and a real ugrod,
writes a project tree (random bytes: nothing compresses), then measures in one run:
  - baseline: `rsync -a -e ssh` of the tree to the 3 nodes at once (3 rsyncs in
    parallel), first copy and an unchanged re-run;
  - ugro: what `--sync` does for a job on the 3 nodes: ugroctl's upload to ugrod (walk,
    sha256, manifest, the contents ugrod lacks) and ugrod's push to each node at launch
    (the node's store is asked what it lacks, only that is streamed over the node's
    SSH link, the node links the tree into the job's directory, read-only). The push runs here
    with the same code ugrod runs (ugrod.nodes.codesync.push over NodeAgent/SshTransport),
    over connections already open, as ugrod keeps them.
Targets: first sync >= 0.8x rsync's speed; an unchanged re-sync < 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import Ugrod  # noqa: E402
from sshd_nodes import SshdCluster, start_sshd_nodes  # noqa: E402

from ugroctl import syncing  # noqa: E402
from ugroctl.client import Client  # noqa: E402
from ugrod.nodes.agent import NodeAgent  # noqa: E402
from ugrod.nodes.codesync import HeadStore, push  # noqa: E402


def make_tree(top: Path, files: int, total_mb: int) -> int:
    """``files`` files in 40 directories, ``total_mb`` MB of random bytes in all."""
    size = total_mb * 1_000_000 // files
    for i in range(files):
        d = top / f"pkg{i % 40}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_bytes(os.urandom(size))
    return size * files


def rsync_all(cluster: SshdCluster, src: Path, dest: str) -> float:
    """3 rsyncs at once, one per node; seconds until all are done."""
    began = time.perf_counter()
    procs = []
    for n in cluster:
        ssh = shlex.join(["ssh", "-p", str(n.port), "-i", str(n.identity), "-o",
                          f"UserKnownHostsFile={n.known_hosts}", "-o",
                          "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        procs.append(subprocess.Popen(
            ["rsync", "-a", "-e", ssh, f"{src}/", f"{n.user}@{n.host}:{n.work_dir}/{dest}/"],
            stdin=subprocess.DEVNULL))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"rsync failed with {p.returncode}")
    return time.perf_counter() - began


async def ugro_sync(client: Client, store: HeadStore, agents: list[NodeAgent], top: Path,
                    job: str) -> tuple[float, float, int]:
    """(upload s, push to 3 nodes s, bytes uploaded) of one --sync."""
    t0 = time.perf_counter()
    tree, _files, _size, sent = await asyncio.to_thread(syncing.upload, client, str(top))
    t1 = time.perf_counter()
    await asyncio.gather(*(push(a, store, os.getuid(), job, tree) for a in agents))
    return t1 - t0, time.perf_counter() - t1, sent


def config(cluster: SshdCluster, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "cluster": {"known_hosts": str(cluster.known_hosts)},
        "nodes": {n.name: {"host": n.host, "port": n.port, "user": n.user,
                           "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                           "python": sys.executable} for n in cluster},
        "metrics": {"enabled": False},
        "sync": {"max_mb": 1000}}))
    return path


async def main(files: int, mb: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ugro-bsync-", dir="/tmp") as tmp:
        base = Path(tmp)
        top = base / "proj"
        total = make_tree(top, files, mb)
        cluster = start_sshd_nodes(base / "sshd")
        d = Ugrod(base, config=config(cluster, base / "c.yaml"))
        d.start()
        try:
            r_first = rsync_all(cluster, top, "rsync-copy")
            r_again = rsync_all(cluster, top, "rsync-copy")
            agents = [NodeAgent(n.transport(), str(n.work_dir), python=sys.executable)
                      for n in cluster]
            await asyncio.gather(*(a.free_port() for a in agents))  # warm, as in ugrod
            client = Client(socket_path=str(d.socket))
            store = HeadStore(d.state_dir / "sync")
            up1, push1, sent1 = await ugro_sync(client, store, agents, top, "bench-1")
            up2, push2, sent2 = await ugro_sync(client, store, agents, top, "bench-2")
            client.close()
            for a in agents:
                await a.close()
                await a.transport.close()
        finally:
            d.stop()
            cluster.close()
    first, again = up1 + push1, up2 + push2
    mbs = total / 1e6
    print(f"--sync of {files} files, {mbs:.0f} MB, to 3 sshd nodes (same run)")
    print(f"  baseline rsync -a over ssh, 3 at once : first {r_first:6.2f} s "
          f"({3 * mbs / r_first:6.1f} MB/s), unchanged again {r_again:5.2f} s")
    print(f"  ugro --sync, first                    : {first:6.2f} s "
          f"({3 * mbs / first:6.1f} MB/s) = {r_first / first:.2f}x rsync's speed "
          f"(target >= 0.80x); upload {up1:.2f} s ({sent1 / 1e6:.0f} MB), push {push1:.2f} s")
    print(f"  ugro --sync, unchanged                : {again:6.2f} s (target < 0.5 s); "
          f"upload {up2:.2f} s ({sent2 / 1e6:.0f} MB sent), push {push2:.2f} s "
          f"(nothing sent; each node links the tree into the job's directory)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.files, args.mb))
