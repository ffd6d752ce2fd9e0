"""Replay I/O: EventLog.open() and read() over a 1M-event log, beside plain file reading.

Usage: python bench/bench_replay_io.py [--events N] [--dir DIR]

The log holds real canonical event lines (ugrod.core.events.encode) of ~330 B,
written in batches of 1 (a quiet daemon: one command per fsync) and of 64 (a
busy one). For each it prints, in one run:
  baseline   reading the files and splitting lines, no checks at all
  open       EventLog.open() with every segment verified (CRC, commit lines, seqs)
  open-fast  EventLog.open(verify_sealed=False): active segment only (start with a snapshot)
  read       read() after open (segments open() verified are not re-checked)
  read-verify  read(verify=True): every batch checked again (an audit)
  decode     read() + events.decode of every line (the replay's I/O + decode share)
The full replay target (decode + apply) is >= 250k events/s; read() must stay
well above it so decode + apply dominate.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.store.log import EventLog


def template() -> tuple[bytes, bytes]:
    """A canonical ~330 B job_placed line, split around its seq."""
    placed = ev.JobPlaced(job="train-resnet50-0001", attempt=1, ranks=(ev.RankPlacement(
        rank=0, node="gpu1", gpus=(0,), gpu_uuids=("GPU-8f3e2a1b-1c2d-4e5f-a6b7-c8d9e0f1a2b3",)),),
        rdzv_host="192.168.1.10", rdzv_port=29500)
    rec = ev.Record(seq=123456789, ts=1_790_000_000.123456,
                    actor=ev.Actor(user="alice", uid=1000), event=placed)
    line = codec.encode(rec)
    head, tail = line.split(b"123456789", 1)
    return head, tail


def build(d: Path, n: int, batch: int) -> None:
    """Write ``n`` events in batches of ``batch`` (no fsync: this measures reading)."""
    head, tail = template()
    log = EventLog.open(d, fdatasync=lambda fd: None)
    seq = 1
    while seq <= n:
        k = min(batch, n - seq + 1)
        log.append_sync([b"%s%d%s" % (head, s, tail) for s in range(seq, seq + k)])
        seq += k
    log.close_sync()


def timed(fn: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(d: Path, n: int, batch: int) -> None:
    """Print every figure for one log."""
    files = sorted((d / "events").glob("*.jsonl"))
    size = sum(f.stat().st_size for f in files)

    def baseline() -> None:
        got = 0
        for f in files:
            got += len(f.read_bytes().split(b"\n"))
        assert got >= n

    def count(verify: bool = False, decode: bool = False) -> None:
        log = EventLog.open(d)
        got = 0
        for lines in log.read(verify=verify):
            if decode:
                for line in lines:
                    codec.decode(line)
            got += len(lines)
        log.close_sync()
        assert got == n, (got, n)

    figures = {
        "baseline (read+split)": timed(baseline),
        "open (verify all)": timed(lambda: EventLog.open(d).close_sync()),
        "open-fast (verify_sealed=False)": timed(
            lambda: EventLog.open(d, verify_sealed=False).close_sync()),
    }
    t_open = figures["open (verify all)"]
    figures["read (after open)"] = timed(count) - t_open
    figures["read-verify"] = timed(lambda: count(verify=True)) - t_open
    figures["read + events.decode"] = timed(lambda: count(decode=True)) - t_open
    print(f"{n} events in batches of {batch} ({size / 1e6:.0f} MB, {len(files)} segments):")
    for name, secs in figures.items():
        print(f"  {name:34s} {secs:6.3f} s  {n / secs:12,.0f} events/s")


def main() -> None:
    """Build the logs and measure them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ugro-replay-", dir=args.dir))
    try:
        for batch in (64, 1):
            d = root / f"b{batch}"
            build(d, args.events, batch)
            run(d, args.events, batch)
            shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
