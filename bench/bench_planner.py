"""Planner time per round: 10,000 queued jobs on 100 nodes x 8 GPUs, against a naive re-scan.

Usage: python bench/bench_planner.py [--jobs N] [--rounds R] [--naive-budget S] [--seed X]

Builds each state the way the daemon does (real events through ``state.apply``):
100 nodes (40 x 8 x 24 GB, 40 x 8 x 48 GB, 20 x 8 x 80 GB, a quarter labelled ``ib``),
ten users, and 10,000 queued jobs of mixed shapes (1-8 GPUs a node, 1-4 nodes,
some with a VRAM floor, a label or a known run time). Two scenarios:

- busy: about 90 % of the GPUs held by running jobs (most with a known end);
  the round places a few jobs, reserves GPUs for blocked ones, explains the rest.
- idle: nothing running; the round fills the cluster.

The baseline, in the same run, is the naive re-scan: for each job in queue
order, rebuild the free-GPU map from every job in the state (and the ones
placed this round) and try the nodes one by one, greedily. It stops after
``--naive-budget`` seconds a scenario and is extrapolated linearly from the jobs
it got through (its cost per job is constant: one pass over all jobs).
Target: plan() < 50 ms per round for the 10,000-job scenarios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ugrod.core import codec, planner
from ugrod.core import events as ev
from ugrod.core.state import ACTIVE, State, apply

GB = 1 << 30
NOW = codec.parse_ts("2026-11-22T14:00:00.000000Z")


def put(state: State, event: ev.Event, user: str, ts: float) -> State:
    return apply(state, ev.Record(seq=state.seq + 1, ts=ts, actor=ev.Actor(user=user),
                                  event=event))


def cluster() -> State:
    state = State()
    for i in range(100):
        vram = 24 if i < 40 else 48 if i < 80 else 80
        spec = ev.NodeSpec(
            name=f"node{i:03d}", host=f"10.0.{i // 250}.{i % 250}",
            rank=0 if i == 0 else None, labels=("ib",) if i % 4 == 0 else (),
            gpus=tuple(ev.Gpu(index=g, model=f"{vram}G", vram_bytes=vram * GB,
                              uuid=f"GPU-{i:03d}-{g}") for g in range(8)))
        state = put(state, ev.NodeAdded(node=spec), "ugrod", NOW - 86400)
    return state


def random_spec(rng: random.Random, n: int) -> ev.JobSpec:
    gpus = rng.choice([1, 1, 1, 1, 2, 2, 4, 8])
    return ev.JobSpec(
        argv=("python", "train.py", f"--config=c{n % 50}"),
        gpus_per_node=gpus,
        nodes=rng.choice([1, 1, 1, 1, 1, 2, 2, 4]) if gpus >= 2 else 1,
        min_vram_bytes=rng.choice([0, 0, 0, 16 * GB, 40 * GB, 80 * GB]),
        labels_required=("ib",) if rng.random() < 0.05 else (),
        expected_runtime_s=rng.choice([None, 600.0, 1800.0, 3600.0, 4 * 3600.0]),
    )


def scenario(busy: bool, jobs: int, seed: int) -> State:
    rng = random.Random(seed)
    state = cluster()
    if busy:  # fill ~90 % of the GPUs with running jobs, started over the last hours
        filler = []
        for i in range(720):
            spec = ev.JobSpec(argv=("python", "run.py"), gpus_per_node=1,
                              expected_runtime_s=rng.choice([None, 3600.0, 7200.0, 14400.0]))
            state = put(state, ev.JobSubmitted(job=f"run{i}", spec=spec), f"user{i % 10}",
                        NOW - 7200)
            filler.append(f"run{i}")
        p = planner.plan(state, NOW - 7200)
        for x in p.placements:
            started = NOW - rng.uniform(0, 7000)
            state = put(state, x, "ugrod", started)
            state = put(state, ev.JobRunning(job=x.job, attempt=x.attempt), "ugrod", started)
    for n in range(jobs):
        state = put(state, ev.JobSubmitted(job=f"q{n}", spec=random_spec(rng, n),
                                           priority=rng.choice([0, 0, 0, 1, 2])),
                    f"user{rng.randrange(10)}", NOW - 3600 + n * 0.1)
    return state


def naive_plan(state: State, now: float, budget_s: float) -> tuple[int, int, float]:
    """The re-scan baseline: (jobs scanned, jobs placed, seconds spent)."""
    start = time.perf_counter()
    waiting = sorted((state.jobs[j] for j in state.active
                      if state.jobs[j].state not in ACTIVE),
                     key=lambda j: (-j.priority, j.submit_seq))
    names = sorted(state.nodes.keys())
    placed: list[tuple[str, tuple[ev.RankPlacement, ...]]] = []
    scanned = 0
    for job in waiting:
        if time.perf_counter() - start > budget_s:
            break
        scanned += 1
        taken: set[tuple[str, int]] = set()
        for other in state.jobs.values():  # rebuild the free map from all jobs
            if other.state in ACTIVE:
                taken.update((p.node, g) for p in other.placement for g in p.gpus)
        for _, ranks in placed:
            taken.update((r.node, g) for r in ranks for g in r.gpus)
        spec, chosen = job.spec, list[ev.RankPlacement]()
        for name in names:  # try every node in turn, greedily
            node = state.nodes[name]
            if not node.schedulable or not set(spec.labels_required) <= set(node.spec.labels):
                continue
            free = sorted((g.vram_bytes, g.index) for g in node.gpus
                          if (name, g.index) not in taken and g.vram_bytes >= spec.min_vram_bytes)
            if len(free) >= spec.gpus_per_node:
                chosen.append(ev.RankPlacement(rank=len(chosen), node=name, gpus=tuple(
                    i for _, i in free[:spec.gpus_per_node])))
                if len(chosen) == spec.nodes:
                    placed.append((job.id, tuple(chosen)))
                    break
    return scanned, len(placed), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--naive-budget", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    print(f"planner round: {args.jobs:,} queued jobs on 100 nodes x 8 GPUs "
          f"(Python {sys.version.split()[0]}), {args.rounds} rounds each")
    print(f"{'scenario':<9} {'plan() wall':>12} {'p95':>9} {'cpu':>9} {'placed':>7} "
          f"{'reserved':>9} {'naive re-scan':>14} {'naive placed':>13} {'speed-up':>9}")
    for name, busy in (("busy", True), ("idle", False)):
        state = scenario(busy, args.jobs, args.seed)
        times, cpu, result = [], [], planner.plan(state, NOW)
        for _ in range(args.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            result = planner.plan(state, NOW)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        times.sort()
        med, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
        scanned, naive_placed, spent = naive_plan(state, NOW, args.naive_budget)
        waiting = len(result.order)
        naive = spent * waiting / max(scanned, 1)
        note = "" if scanned == waiting else f"~ (extrapolated from {scanned:,} jobs)"
        print(f"{name:<9} {med * 1e3:>9.1f} ms {p95 * 1e3:>6.1f} ms "
              f"{statistics.median(cpu) * 1e3:>6.1f} ms {len(result.placements):>7} "
              f"{len(result.reservations):>9} {naive:>12.2f} s {naive_placed:>13} "
              f"{naive / med:>8.0f}x {note}")
    print("wall and p95: elapsed per round; cpu: this process's CPU time per round (median),")
    print("steadier where the machine is shared. target: plan() < 50 ms per round")


if __name__ == "__main__":
    main()
