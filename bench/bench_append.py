"""Durable appends/s through EventLog's group commit vs one write+fdatasync per event.

Usage: python bench/bench_append.py [--dir DIR] [--seconds S] [--rounds R] [--read-lines N]

Prints, in one run: the baseline (os.write + os.fdatasync per ~300 B event),
64 and 512 concurrent in-process producers each awaiting its own one-line
append (appends/s, ratio to the baseline, p50/p99 ack latency, events per
fsync), and raw read() throughput over a 1M-line log.
Targets: 64 producers >= 8x with p99 <= 2 ms; 512 producers >= 15x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ugrod.store.log import EventLog

PAD = b"x" * 255


def line(seq: int) -> bytes:
    """A ~300-byte event line (the log only looks at its seq prefix)."""
    return b'{"seq":%d,"v":1,"type":"bench","data":"%s"}' % (seq, PAD)


def baseline(d: Path, seconds: float) -> tuple[float, list[float]]:
    """One os.write + os.fdatasync per event: events/s and per-event latencies."""
    fd = os.open(d / "baseline.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lat: list[float] = []
    seq = 0
    start = time.perf_counter()
    end = start + seconds
    while (t0 := time.perf_counter()) < end:
        seq += 1
        os.write(fd, line(seq) + b"\n")
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return seq / elapsed, lat


async def producers(d: Path, n: int, seconds: float) -> tuple[float, list[float], int]:
    """``n`` tasks, each appending one line at a time: events/s, ack latencies, fsyncs."""
    fsyncs = 0

    def counting_fdatasync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        os.fdatasync(fd)

    log = EventLog.open(d, fdatasync=counting_fdatasync)
    base_fsyncs = fsyncs
    lat: list[float] = []
    next_seq = log.last_seq + 1
    stop = False
    perf = time.perf_counter

    async def one() -> None:
        nonlocal next_seq
        append, record = log.append, lat.append
        while not stop:
            seq = next_seq
            next_seq += 1
            t0 = perf()
            await append((line(seq),))
            record(perf() - t0)

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    start = perf()
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    elapsed = perf() - start
    await log.close()
    return len(lat) / elapsed, lat, fsyncs - base_fsyncs


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile of xs, in milliseconds."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000


def read_throughput(d: Path, n_lines: int, batch: int) -> tuple[float, float]:
    """Write ``n_lines`` in batches of ``batch``; time open (full verify) and read()."""
    log = EventLog.open(d, fdatasync=lambda fd: None)
    seq = log.last_seq
    while seq < n_lines:
        k = min(batch, n_lines - seq)
        log.append_sync([line(s) for s in range(seq + 1, seq + k + 1)])
        seq += k
    log.close_sync()
    t0 = time.perf_counter()
    log = EventLog.open(d)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = 0
    for lines in log.read():
        got += len(lines)
    t_read = time.perf_counter() - t0
    log.close_sync()
    assert got == n_lines, (got, n_lines)
    return n_lines / t_open, n_lines / t_read


def main() -> None:
    """Run every figure and print it beside its baseline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", type=Path, default=None, help="a directory on the disk to measure")
    ap.add_argument("--seconds", type=float, default=6.0, help="per figure, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--read-lines", type=int, default=1_000_000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ugro-bench-", dir=args.dir))
    try:
        # Rounds alternate baseline and group commit so that a burst of load on a
        # shared disk hits both sides alike; figures are over all rounds.
        secs = args.seconds / args.rounds
        count: dict[str, float] = {}
        lats: dict[str, list[float]] = {"base": [], "64": [], "512": []}
        fsyncs = {"64": 0, "512": 0}
        for r in range(args.rounds):
            rate, lat = baseline(root, secs)
            count["base"] = count.get("base", 0) + rate * secs
            lats["base"] += lat
            for n in (64, 512):
                rate, lat, k = asyncio.run(producers(root / f"p{n}-{r}", n, secs))
                count[str(n)] = count.get(str(n), 0) + rate * secs
                lats[str(n)] += lat
                fsyncs[str(n)] += k
        base = count["base"] / args.seconds
        base_lat = lats["base"]
        print(f"baseline write+fdatasync per event: {base:9.0f} events/s   "
              f"p50 {pct(base_lat, 50):.3f} ms  p99 {pct(base_lat, 99):.3f} ms")
        for n, target in ((64, 8), (512, 15)):
            rate, lat = count[str(n)] / args.seconds, lats[str(n)]
            ok = rate >= target * base and (n != 64 or pct(lat, 99) <= 2.0)
            print(f"{n:3d} producers, group commit:     {rate:9.0f} events/s   "
                  f"p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms   "
                  f"{rate / base:5.1f}x baseline (target {target}x"
                  f"{', p99 <= 2 ms' if n == 64 else ''}: {'ok' if ok else 'MISSED'})   "
                  f"{len(lat) / max(fsyncs[str(n)], 1):.1f} events/fsync")
        for batch in (64, 1):
            n_lines = args.read_lines if batch > 1 else args.read_lines // 4
            open_rate, read_rate = read_throughput(root / f"read{batch}", n_lines, batch)
            print(f"read() of {n_lines} lines in batches of {batch:2d}: {read_rate:10.0f} lines/s"
                  f"   open() verifying them: {open_rate:10.0f} lines/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
