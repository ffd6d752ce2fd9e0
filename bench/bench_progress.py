"""Progress parsing on the log stream: rank-0 output at 50 MB/s, parsing on against off.

Usage: python bench/bench_progress.py [--mb 200] [--seconds 4] [--rounds 3]

The real path of a rank's log to the head: the rank wrapper's ``watch`` on a local
node (LocalTransport), NodeAgent decoding its chunks, and what the executor does with
each chunk: append it to the central rank log and, with parsing on, feed it to
``ugrod.core.progress_formats.ProgressReader`` and write what it finds to progress.jsonl
and the job's latest values. The log is Trainer-like (the worst case: every line is a
candidate): a tqdm bar redraw and a log dictionary a step, and a warning now and then.

1. drain: a log of --mb MB already written; MB/s until the head has all of it.
2. paced: a writer process appends at 50 MB/s for --seconds; MB/s delivered from the
   first byte until the head has the last one (50 = keeping up), and the head's CPU.
Target: parsing on >= 0.9x parsing off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from ugrod.core import progress_formats as pf
from ugrod.nodes.agent import LogChunk, NodeAgent, RankExit  # noqa: E402
from ugrod.nodes.transport.local import LocalTransport  # noqa: E402


def trainer_like(total: int, log_every: int = 1, chatter: int = 0) -> bytes:
    """Trainer output: a bar redraw a step, a log dict every ``log_every`` steps, and
    ``chatter`` lines of the script's own prints a step (e.g. per-batch debug output)."""
    out, step = [], 0
    size = 0
    while size < total:
        step += 1
        text = (f"\r {step % 100:2d}%|{'#' * (step % 10):<10}| {step}/{10**7} "
                f"[00:{step % 60:02d}<01:00, 45.{step % 100:02d}it/s]")
        if step % log_every == 0:
            text += ("\r" + " " * 40 + "\r"
                     f"{{'loss': '{1 / (1 + step):.4g}', 'grad_norm': '{step % 7 + 0.5:.4g}', "
                     f"'learning_rate': '5e-05', 'epoch': '{step / 1000:.4g}'}}\n")
        for i in range(chatter):
            text += (f"\rbatch {step}.{i}: tokens 2048, padding 0.13, shard /data/train-"
                     f"{step % 977:05d}.arrow, rss 12.3 GB, host latency 0.{i}2 ms\n")
        out.append(text)
        size += len(text)
    return "".join(out).encode()[:total]


MIXES = {  # name -> (log_every, chatter)
    "worst case (a log dict every step)": (1, 0),
    "Trainer + prints (dict every 10 steps, 20 lines a step)": (10, 20),
}


async def stream(agent: NodeAgent, job: str, head: Path, parse: bool) -> tuple[int, float]:
    """Watch rank 0 until its exit; (bytes received, when the last byte arrived)."""
    reader = pf.ProgressReader(pf.DEFAULT_FORMATS) if parse else None
    latest: dict[str, pf.Number] = {}
    got, last = 0, time.perf_counter()
    log = head / "rank_0.log"
    progress = head / "progress.jsonl"
    async for item in agent.watch(job, 1, 0):
        if isinstance(item, LogChunk):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.write(fd, item.data)
            os.close(fd)
            if reader is not None:
                records = reader.feed(item.data)
                if records:
                    lines = b"".join(msgspec.json.encode({"ts": 0.0, **r}) + b"\n"
                                     for r in records)
                    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                    os.write(fd, lines)
                    os.close(fd)
                    for r in records:
                        pf.merge(latest, r)
            got += len(item.data)
            last = time.perf_counter()
        elif isinstance(item, RankExit):
            break
    if parse:
        assert latest.get("loss") is not None and latest.get("step"), latest
    return got, last


def run_dir(work: Path, job: str) -> Path:
    d = work / "jobs" / job / "attempt-1" / "rank-0"
    d.mkdir(parents=True)
    return d


PACER = """
import os, sys, time
path, data = sys.argv[1], open(sys.argv[2], 'rb').read()
rate, seconds = float(sys.argv[3]), float(sys.argv[4])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
chunk = 64 * 1024
t0 = time.perf_counter(); sent = 0; off = 0
while sent < rate * seconds:
    due = t0 + sent / rate
    now = time.perf_counter()
    if due > now:
        time.sleep(due - now)
    piece = data[off:off + chunk] or data[:chunk]
    off = off + chunk if off + chunk < len(data) else 0
    os.write(fd, piece); sent += len(piece)
open(os.path.join(os.path.dirname(path), 'exit_code'), 'w').write('0\\n')
"""


async def one(work: Path, n: str, parse: bool, data: Path, mb: int,
              seconds: float, paced: bool) -> tuple[float, float]:
    job = f"b{n}{'p' if parse else 'o'}"
    rd = run_dir(work, job)
    head = work / "head" / job
    head.mkdir(parents=True)
    agent = NodeAgent(LocalTransport(), str(work))
    await agent.prepare()
    cpu0 = time.process_time()
    if not paced:  # drain a log already written
        os.link(data, rd / "rank.log")
        (rd / "exit_code").write_text("0\n")
        t0 = time.perf_counter()
        got, last = await stream(agent, job, head, parse)
    else:
        writer = subprocess.Popen([sys.executable, "-c", PACER, str(rd / "rank.log"),
                                   str(data), str(50 << 20), str(seconds)])
        t0 = time.perf_counter()
        got, last = await stream(agent, job, head, parse)
        writer.communicate()
    cpu = time.process_time() - cpu0
    await agent.close()
    return got / (1 << 20) / (last - t0), cpu


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ugro-bench-") as tmp:
        work = Path(tmp)
        for m, (mix, (every, chatter)) in enumerate(MIXES.items()):
            sample = work / f"sample{m}.log"
            sample.write_bytes(trainer_like(args.mb << 20, every, chatter))
            print(mix)
            for paced in (False, True):
                label = "paced 50 MB/s" if paced else f"drain {args.mb} MB"
                rates: dict[bool, list[float]] = {False: [], True: []}
                cpus: dict[bool, list[float]] = {False: [], True: []}
                for r in range(args.rounds):
                    for parse in (False, True) if r % 2 == 0 else (True, False):
                        rate, cpu = await one(work, f"{m}{int(paced)}{r}", parse, sample,
                                              args.mb, args.seconds, paced)
                        rates[parse].append(rate)
                        cpus[parse].append(cpu)
                        for f in work.glob("head/*/*"):
                            f.unlink()
                        for f in work.glob("jobs/*/*/*/rank.log"):
                            f.unlink()
                off, on = statistics.median(rates[False]), statistics.median(rates[True])
                print(f"  {label:14s} parsing off {off:6.1f} MB/s  on {on:6.1f} MB/s  ratio "
                      f"{on / off:.2f}x  head CPU off {statistics.median(cpus[False]):.2f} s"
                      f" on {statistics.median(cpus[True]):.2f} s", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
