"""Replay of a 1,000,000-event log, start-up with a snapshot, and memory after replay.

Figures (issue 2): full replay (read, verify CRCs, decode, apply) ≥ 250,000 events/s;
start-up with a snapshot < 0.5 s whatever the log's length; RSS after replay < 250 MB.
Baseline printed beside the replay: the same log only split into lines and
decoded with the standard library's json (no verification, no state), in this run.

The log is a realistic mix: each job is submitted, placed, started, run, its
rank exits and it ends (6 events); between them the planner records waiting
reasons and the monitor health changes. About 110,000 jobs end up in state.

Usage: python bench/bench_replay.py [--events 1000000] [--dir /tmp/ugro-bench-replay]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.store import log as evlog

ALICE = ev.Actor(user="alice", uid=1000)


def build(state_dir: Path, n_events: int, churn: int = 0) -> int:
    """Write the log with the real encoder and the real log writer; returns events written.

    ``churn``: extra (waiting reason, node health) pairs per job, for a log as long
    with far fewer jobs (a quiet cluster's months of health changes).
    """
    log = evlog.EventLog.open(state_dir)
    seq = 0
    batch: list[bytes] = []
    ts = 1_790_000_000.0

    def emit(actor: ev.Actor, e: ev.Event) -> None:
        nonlocal seq, ts
        seq += 1
        ts += 0.001
        batch.append(codec.encode(ev.Record(seq=seq, ts=ts, actor=actor, event=e)))
        if len(batch) >= 2000:
            log.append_sync(batch)
            batch.clear()

    for i in range(8):
        emit(ev.DAEMON, ev.NodeAdded(node=ev.NodeSpec(
            name=f"gpu{i}", host=f"10.0.0.{i + 1}", transport="ssh",
            gpus=tuple(ev.Gpu(index=g, model="RTX 4070", vram_bytes=8 << 30,
                              uuid=f"GPU-{i}-{g}") for g in range(2)))))
    j = 0
    while seq < n_events - 8:
        job = f"job-{j}"
        node = f"gpu{j % 8}"
        gpu = (j // 8) % 2
        spec = ev.JobSpec(argv=("python3", "train.py", "--lr", f"{1e-4 * (j % 7 + 1):g}"),
                          gpus_per_node=1, max_retries=2)
        emit(ALICE, ev.JobSubmitted(job=job, spec=spec, request_id=f"req-{j}"))
        emit(ev.DAEMON, ev.JobWaiting(job=job, reason=f"waiting for 1 GPU ≥ 8 GB: {node} busy"))
        for k in range(churn):
            emit(ev.DAEMON, ev.JobWaiting(job=job, reason=f"behind {k % 3 + 1} jobs on {node}"))
            emit(ev.DAEMON, ev.NodeHealthChanged(
                node=node, health="degraded" if k % 2 else "healthy", score=70.0 + k % 2,
                reason="GPU temperature 81 °C", sample={"gpu_temp_c": 81 - k % 2}))
        emit(ev.DAEMON, ev.JobPlaced(job=job, attempt=1, ranks=(ev.RankPlacement(
            rank=0, node=node, gpus=(gpu,), gpu_uuids=(f"GPU-{j % 8}-{gpu}",)),),
            rdzv_host="10.0.0.1", rdzv_port=29500, reason=f"placed on {node}"))
        emit(ev.DAEMON, ev.RankStarted(job=job, attempt=1, rank=0, node=node, pid=1000 + j))
        emit(ev.DAEMON, ev.JobRunning(job=job, attempt=1))
        if j % 10 == 0:
            health = "degraded" if j % 20 == 0 else "healthy"
            emit(ev.DAEMON, ev.NodeHealthChanged(node=node, health=health, score=75.0,
                                                 reason="GPU temperature 81 °C",
                                                 sample={"gpu_temp_c": 81, "disk_pct": 40.5}))
        emit(ev.DAEMON, ev.RankExited(job=job, attempt=1, rank=0, node=node, exit_code=0))
        emit(ev.DAEMON, ev.JobEnded(job=job, attempt=1, outcome="succeeded", exit_code=0,
                                    reason="all ranks exited 0", last_step=4000))
        j += 1
    if batch:
        log.append_sync(batch)
    log.close_sync()
    return seq


def baseline(state_dir: Path) -> float:
    """Lines/s for split + stdlib json.loads only."""
    t0 = time.perf_counter()
    n = 0
    for seg in sorted((state_dir / "events").glob("*.jsonl")):
        with open(seg, "rb") as f:
            for line in f:
                json.loads(line)
                n += 1
    return n / (time.perf_counter() - t0)


def child(state_dir: str, what: str) -> None:
    """Run in a fresh process so RSS and timings are ugrod's alone."""
    from ugrod.store.ledger import Ledger
    gc.freeze()
    t0 = time.perf_counter()
    ledger = Ledger.open(Path(state_dir))
    took = time.perf_counter() - t0
    state = ledger.state
    if what == "snapshot":
        ledger.snapshot()
    gc.collect()
    with open("/proc/self/status") as f:  # resident now, after the replay (not the peak)
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ledger.log.close_sync()
    print(json.dumps({"seconds": took, "replayed": ledger.replayed, "seq": state.seq,
                      "jobs": len(state.jobs), "rss_mb": rss, "peak_mb": peak}))


def run_child(state_dir: Path, what: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--dir", str(state_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ugro-bench-replay"))
    p.add_argument("--child", default=None)
    args = p.parse_args()
    if args.child:
        child(str(args.dir), args.child)
        return
    shutil.rmtree(args.dir, ignore_errors=True)
    t0 = time.perf_counter()
    n = build(args.dir, args.events)
    size = sum(f.stat().st_size for f in (args.dir / "events").glob("*.jsonl"))
    print(f"built {n:,} events ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    base = baseline(args.dir)
    full = run_child(args.dir, "snapshot")  # full replay, then writes a snapshot
    rate = full["replayed"] / full["seconds"]
    print(f"full replay: {full['replayed']:,} events in {full['seconds']:.2f} s = "
          f"{rate:,.0f} events/s (target ≥ 250,000); baseline split+json.loads "
          f"{base:,.0f} lines/s; ratio {rate / base:.2f}x")
    print(f"memory after replay: {full['rss_mb']:.0f} MB RSS (peak {full['peak_mb']:.0f} MB) "
          f"with {full['jobs']:,} jobs (target < 250 MB)")
    snap = run_child(args.dir, "open")
    print(f"start-up with snapshot: {snap['seconds']:.3f} s, {snap['replayed']:,} events "
          f"replayed after it, {snap['jobs']:,} jobs in state, {snap['rss_mb']:.0f} MB RSS "
          f"(target < 0.5 s)")
    # The same length of log with 15x fewer jobs: start-up follows the state's size,
    # not the log's length.
    quiet = args.dir.with_name(args.dir.name + "-quiet")
    shutil.rmtree(quiet, ignore_errors=True)
    build(quiet, args.events, churn=50)
    run_child(quiet, "snapshot")
    small = run_child(quiet, "open")
    print(f"start-up with snapshot, a log as long with fewer jobs: {small['seconds']:.3f} s, "
          f"{small['jobs']:,} jobs in state (log {small['seq']:,} events)")
    if os.environ.get("UGRO_BENCH_KEEP") != "1":
        shutil.rmtree(quiet, ignore_errors=True)
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
