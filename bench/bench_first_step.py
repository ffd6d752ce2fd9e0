"""Submit -> all ranks training on 3 sshd nodes (first step reported) vs the seeds' way.

Usage: python bench/bench_first_step.py [--rounds N]

Starts three OpenSSH sshd nodes on 127.0.0.1-3 (tests/sshd_nodes.py) and a real ugrod on
them, then runs examples/train_ddp.py under torchrun on the 3 nodes (gloo, CPU; the nodes
use this interpreter, which has torch) and measures, from the command until the first
training step is reported, in the same run:
  - baseline: the seeds' way, one `ssh host 'cd DIR && torchrun ...'` started per node,
    0.5 s apart (with --node_rank as the seeds pass it), until a metrics line has a step;
  - ugro: `ugroctl submit --nodes 3 --torchrun -- train_ddp.py ...` to the running ugrod,
    until the job shows step 1.
Both start 3 torchruns that each import torch; what differs is the launch path (and that
ugrod checks every node's rendezvous port before anything starts).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshd_nodes import SshdCluster, start_sshd_nodes  # noqa: E402

TRAIN = ROOT / "examples" / "train_ddp.py"
TRAIN_ARGS = ["--steps", "3", "--samples", "96", "--batch-size", "8"]


def seeds_first_step(cluster: SshdCluster, python: str, tag: str) -> float:
    """The seeds' launch of train_ddp.py on 3 nodes; seconds until a step is reported.

    As the seeds do it: one `ssh host 'cd DIR && torchrun ...'` Popen per node, 0.5 s
    apart (their "thundering herd" pause), torchrun in the foreground of each ssh.
    """
    metrics = [n.work_dir / f"{tag}.metrics" for n in cluster]
    port = 29400 + int(tag[2:]) + int(time.time()) % 40
    began = time.time()
    procs = []
    for rank, (node, path) in enumerate(zip(cluster, metrics, strict=True)):
        torchrun = [python, "-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=1",
                    f"--rdzv_id={tag}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={cluster[0].host}:{port}", f"--node_rank={rank}",
                    # (the 3 "nodes" share one machine: every one would think it hosts
                    # the store at 127.0.0.1, so who does is said, as ugrod does)
                    f"--local_addr={node.host}", f"--rdzv_conf=is_host={int(rank == 0)}",
                    str(TRAIN), *TRAIN_ARGS]
        remote = (f"cd {shlex.quote(str(ROOT))} && UGRO_METRICS_FILE={shlex.quote(str(path))} "
                  f"{shlex.join(torchrun)}")
        procs.append(subprocess.Popen(
            ["ssh", "-p", str(node.port), "-i", str(node.identity), "-o",
             f"UserKnownHostsFile={node.known_hosts}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", f"{node.user}@{node.host}", remote],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
    deadline = time.monotonic() + 300
    while not any(p.exists() and '"step"' in p.read_text() for p in metrics):
        if time.monotonic() > deadline:
            raise TimeoutError("the seeds' launch never reported a step")
        time.sleep(0.02)
    took = time.time() - began
    for proc in procs:
        proc.wait(timeout=120)
    return took


def ugro_first_step(d: Any, tag: str) -> float:
    """`ugroctl submit` of the same job to a running ugrod; seconds until step 1 shows."""
    from conftest import ugroctl_argv

    began = time.time()
    subprocess.run([*ugroctl_argv(), "submit", "--name", tag, "--nodes", "3", "--torchrun",
                    "--", str(TRAIN), *TRAIN_ARGS], env=d.env, cwd=ROOT, check=True,
                   capture_output=True)
    deadline = time.monotonic() + 300
    while True:
        job = d.api("GET", f"/v1/jobs/{tag}")[1]["job"]
        if isinstance(job["metrics"].get("step"), int | float):
            return time.time() - began
        if job["state"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"{tag}: {job['state']}: {job['reason']}")
        time.sleep(0.02)


def first_step(cluster: SshdCluster, python: str, rounds: int, base: Path) -> tuple[
        list[float], list[float]]:
    import yaml
    from conftest import Ugrod

    cfg = base / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "cluster": {"known_hosts": str(cluster.known_hosts)},
        "nodes": {n.name: {"host": n.host, "port": n.port, "user": n.user,
                           "identity_file": str(n.identity), "work_dir": str(n.work_dir),
                           "python": python, "rank": i} for i, n in enumerate(cluster)},
        "metrics": {"enabled": False}}))
    d = Ugrod(base / "u", config=cfg)
    (base / "u").mkdir()
    d.start()
    try:
        seeds, ugro = [], []
        for i in range(rounds):
            seeds.append(seeds_first_step(cluster, python, f"fs{i}"))
            ugro.append(ugro_first_step(d, f"fu{i}"))
            d.wait_job(f"fu{i}", timeout_s=120)
        return seeds, ugro
    finally:
        d.stop()


def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ugro-bfs-", dir="/tmp") as tmp:
        cluster = start_sshd_nodes(Path(tmp) / "sshd")
        try:
            seeds, ugro = first_step(cluster, sys.executable, rounds, Path(tmp))
        finally:
            cluster.close()
    fb, fu = statistics.median(seeds), statistics.median(ugro)
    print(f"submit -> first training step on 3 sshd nodes (torchrun, gloo), median of {rounds}")
    print(f"  baseline, the seeds' ssh + torchrun per node       : {fb:6.2f} s")
    print(f"  ugroctl submit --nodes 3 --torchrun to ugrod       : {fu:6.2f} s  = {fu / fb:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    main(parser.parse_args().rounds)
