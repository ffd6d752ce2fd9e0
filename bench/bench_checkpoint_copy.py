"""Checkpoint copies to the head: a 1 GB checkpoint against `scp`, and a job's step time
while its checkpoint is copied against the same job's steps without a copy.

Usage: python bench/bench_checkpoint_copy.py [--mb 1024] [--rounds 3] [--rate-mb-s 50]

Starts an OpenSSH sshd node on 127.0.0.1 (tests/sshd_nodes.py) and a real ugrod over it.
1. Speed (copies unlimited, ``checkpoints.max_mb_s: 0``): a job reports a checkpoint of
   MB random bytes; ugrod copies it to the head's job directory (the niced program on the
   node reads and hashes it, the head writes and hashes it, sha256 compared). Timed from
   the ``checkpoint_saved`` event to the ``checkpoint_copied`` one, so listing, the
   manifest and the fsync count. Baseline: `scp` of the same file from the same node, in
   the same run, alternating with ugrod's copies. Target: >= 0.8x scp's speed.
2. Training (the cluster's rate, ``--rate-mb-s``, default 50 MB/s as shipped): a job
   doing a fixed amount of torch work per step (one thread) runs while ugrod copies an
   MB checkpoint from its node, then goes on with no copy; the mean step time during the
   copy against the mean over an equally long stretch after it. Target: <= 5 % slower.
This machine is both the head and the node, so the copy's CPU (SSH encryption, two
sha256s) competes with the job here; on a cluster only the node's reading side does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import Ugrod  # noqa: E402
from sshd_nodes import SshdNode, start_sshd_nodes  # noqa: E402

from ugrod.core import codec  # noqa: E402

# Links the checkpoint it was given to a new name per gate file (same bytes, no disk
# write in the timed part) and reports it; ends at GATE-end.
REPORTER = """\
import json, os, sys, time
ck, metrics, src, gate = (os.environ["UGRO_CHECKPOINT_DIR"], os.environ["UGRO_METRICS_FILE"],
                          sys.argv[1], sys.argv[2])
step = 0
while not os.path.exists(gate + "-end"):
    if os.path.exists(f"{gate}-{step + 1}"):
        step += 1
        path = os.path.join(ck, f"round-{step}.pt")
        os.link(src, path)
        with open(metrics, "a") as f:
            f.write(json.dumps({"event": "checkpoint", "path": path, "step": step}) + "\\n")
    time.sleep(0.02)
"""

# Fixed work per step (one thread), each step's time reported, for SECONDS.
WORKER = """\
import json, os, sys, time
import torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
metrics, seconds = os.environ["UGRO_METRICS_FILE"], float(sys.argv[1])
# the checkpoint, written before the job started (a link: no disk write while timed)
os.link(sys.argv[2], os.path.join(os.environ["UGRO_CHECKPOINT_DIR"], "big.pt"))
end = time.time() + seconds
step = 0
with open(metrics, "a") as f:
    while time.time() < end:
        t0 = time.perf_counter()
        for _ in range(40):
            b = a @ a
        step += 1
        f.write(json.dumps({"step": step, "ts": time.time(),
                            "step_s": time.perf_counter() - t0}) + "\\n")
        f.flush()
"""


def config(path: Path, node: SshdNode, **checkpoints: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "cluster": {"name": "bench", "known_hosts": str(node.known_hosts)},
        "nodes": {node.name: {"host": node.host, "port": node.port, "user": node.user,
                              "identity_file": str(node.identity),
                              "work_dir": str(node.work_dir), "transport": "ssh",
                              "python": sys.executable}},
        "metrics": {"enabled": False},
        "checkpoints": {"interval_s": 1, "min_free_gb": 1, "keep": 1, **checkpoints},
    }))
    return path


def events(d: Ugrod, job: str, kind: str) -> list[dict[str, Any]]:
    _, raw = d.api("GET", f"/v1/events?job={job}")
    return [e for e in map(json.loads, raw.splitlines()) if e["type"] == kind]


def wait(what: str, check: Any, timeout_s: float, d: Ugrod) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}\n{d.log()[-3000:]}")


def scp(node: SshdNode, src: Path, dest: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", "-P", str(node.port), "-i", str(node.identity), "-o",
                    f"UserKnownHostsFile={node.known_hosts}", "-o", "BatchMode=yes",
                    f"{node.user}@{node.host}:{src}", str(dest)], check=True)
    took = time.perf_counter() - t0
    dest.unlink()
    return took


def speed(base: Path, node: SshdNode, mb: int, rounds: int) -> tuple[list[float], list[float]]:
    data = node.work_dir / "bench-src.bin"
    with open(data, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    d = Ugrod(base / "speed", config=config(base / "speed.yaml", node, max_mb_s=0))
    (base / "speed").mkdir()
    d.start()
    ugro: list[float] = []
    base_s: list[float] = []
    gate = str(base / "gate")
    try:
        status, body = d.api("POST", "/v1/jobs", {"name": "cp", "argv": [
            sys.executable, "-c", REPORTER, str(data), gate]})
        assert status == 201, body
        wait("the job running", lambda: d.api("GET", "/v1/jobs/cp")[1]["job"]["state"]
             == "running", 60, d)
        for i in range(1, rounds + 1):
            base_s.append(scp(node, data, base / "scp.bin"))
            Path(f"{gate}-{i}").touch()
            copied = wait(f"round {i} copied",
                          lambda i=i: [e for e in events(d, "cp", "checkpoint_copied")
                                       if e["data"]["step"] == i], 600, d)
            saved = next(e for e in events(d, "cp", "checkpoint_saved")
                         if e["data"]["step"] == i)
            ugro.append(codec.parse_ts(copied[0]["ts"]) - codec.parse_ts(saved["ts"]))
        Path(gate + "-end").touch()
    finally:
        d.stop()
        data.unlink(missing_ok=True)
    return ugro, base_s


def training(base: Path, node: SshdNode, mb: int, rate: float) -> tuple[float, float, float]:
    """(mean step s during the copy, mean step s after it, the copy's seconds)."""
    # Written before the job starts, linked into its checkpoint dir by the job (a job dir
    # is the job's own: one there before the job would be an earlier job's, moved aside).
    src = node.work_dir / "bench-big.pt"
    with open(src, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    os.utime(src, (time.time() - 60, time.time() - 60))
    d = Ugrod(base / "train", config=config(base / "train.yaml", node, max_mb_s=rate))
    (base / "train").mkdir()
    d.start()
    try:
        seconds = mb / rate * 2.2 + 10
        status, body = d.api("POST", "/v1/jobs", {
            "name": "train", "argv": [sys.executable, "-c", WORKER, str(seconds), str(src)],
            "env": {"OMP_NUM_THREADS": "1"}})
        assert status == 201, body
        parts = d.state_dir / "jobs" / "train" / "checkpoints" / ".ugro" / "parts"
        wait("the copy to start", lambda: parts.is_dir() and any(parts.iterdir()), 120, d)
        start = time.time()
        copied = wait("the copy", lambda: events(d, "train", "checkpoint_copied"),
                      seconds + 120, d)
        done = codec.parse_ts(copied[0]["ts"])
        d.wait_job("train", timeout_s=seconds + 120)
        rows = [json.loads(x) for x in (d.state_dir / "jobs" / "train" / "metrics.jsonl")
                .read_text().splitlines() if '"step_s"' in x]
    finally:
        d.stop()
        src.unlink(missing_ok=True)
    during = [r["step_s"] for r in rows if start <= r["ts"] <= done]
    length = done - start
    after = [r["step_s"] for r in rows if done + 2 <= r["ts"] <= done + 2 + length]
    return statistics.mean(during), statistics.mean(after), length


def main(mb: int, rounds: int, rate: float) -> None:
    with tempfile.TemporaryDirectory(prefix="ugbc-", dir="/tmp") as tmp:
        base = Path(tmp)
        cluster = start_sshd_nodes(base / "nodes", count=1)
        try:
            ugro, scp_s = speed(base, cluster[0], mb, rounds)
            during, after, length = training(base, cluster[0], mb, rate)
        finally:
            cluster.close()
    mbs = mb * (1 << 20) / 1e6
    best_u, best_s = min(ugro), min(scp_s)
    print(f"checkpoint copy of {mb} MiB from an sshd node to the head (same run, "
          f"{rounds} rounds each, alternating)")
    print(f"  baseline scp     : best {best_s:6.2f} s = {mbs / best_s:6.1f} MB/s   "
          f"(all: {', '.join(f'{s:.2f}' for s in scp_s)})")
    print(f"  ugro copy (0 cap): best {best_u:6.2f} s = {mbs / best_u:6.1f} MB/s   "
          f"(all: {', '.join(f'{s:.2f}' for s in ugro)}); {best_s / best_u:.2f}x scp "
          f"(target >= 0.8x)")
    print(f"job step time with its checkpoint copied at {rate:g} MB/s ({length:.0f} s of copy)")
    print(f"  baseline, no copy: {after * 1000:7.2f} ms/step")
    print(f"  during the copy  : {during * 1000:7.2f} ms/step ({(during / after - 1) * 100:+.1f} %,"
          f" target <= +5 %)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate-mb-s", type=float, default=50.0)
    args = parser.parse_args()
    main(args.mb, args.rounds, args.rate_mb_s)
