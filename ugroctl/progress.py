"""``launch``'s progress: where each rank goes, then each step until training has started.

Polls the job (a local socket: a request costs well under a millisecond) rather than
following the event stream, because the last two steps are not events: every rank
joining the rendezvous shows as the first training step reported by rank 0.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import click

from ugroctl import render
from ugroctl.client import EXIT_FAILED, Client, seg

POLL_S = 0.25


def gpu_names(nodes: list[Mapping[str, Any]]) -> dict[tuple[str, int], str]:
    """(node, GPU index) -> "RTX 5070 Ti, 12 GB" (the card's model and nominal size)."""
    out = {}
    for n in nodes:
        for g in n.get("gpus") or []:
            model = str(g.get("model") or "GPU").removeprefix("NVIDIA ").removeprefix(
                "GeForce ")
            gib = (g.get("vram_bytes") or 0) / (1 << 30)
            out[(str(n.get("name")), int(g.get("index", 0)))] = (
                f"{render.clean(model)}, {round(gib)} GB" if gib else render.clean(model))
    return out


def placement_lines(job: Mapping[str, Any], names: dict[tuple[str, int], str]) -> list[str]:
    """"rank 0 → gpu-master (RTX 5070 Ti, 12 GB)", one line per rank."""
    lines = []
    for g in sorted(job.get("gpus") or [], key=lambda g: g.get("rank", 0)):
        node = str(g.get("node"))
        cards = [names.get((node, int(i)), f"GPU {i}") for i in g.get("gpus") or []]
        what = "; ".join(cards) if cards else "no GPU"
        lines.append(f"rank {g.get('rank')} → {render.clean(node)} ({what})")
    return lines


def say(text: str) -> None:
    click.echo(text, err=True)


def follow(client: Client, job_id: str) -> int:
    """Print the job's progress until training has started or it ended; the exit code."""
    path = f"/v1/jobs/{seg(job_id)}"
    say(f"{job_id}: queued (Ctrl-C stops watching, not the job)")
    seen_reason = seen_pos = None
    placed_attempt = running_attempt = 0
    last_queue = 0.0
    while True:
        job = client.get(path)["job"]
        state = job.get("state")
        attempt = int(job.get("attempt") or 0)
        if state in ("queued", "retrying"):
            now = time.monotonic()
            if now - last_queue > 1.0:
                last_queue = now
                pos = next((q.get("position") for q in client.get("/v1/queue")["queue"]
                            if (q.get("job") or {}).get("id") == job_id), None)
                reason = job.get("waiting_reason") or ""
                if (pos, reason) != (seen_pos, seen_reason):
                    seen_pos, seen_reason = pos, reason
                    where = f"position {pos} in the queue" if pos else "in the queue"
                    say(f"{job_id}: {where}" + (f": {render.clean(reason)}" if reason else ""))
        if state in ("starting", "running") and placed_attempt != attempt:
            placed_attempt = attempt
            names = gpu_names(client.get("/v1/nodes")["nodes"])
            for line in placement_lines(job, names):
                click.echo(line)
        if state == "running" and running_attempt != attempt:
            running_attempt = attempt
            where = job.get("rendezvous")
            n = len(job.get("ranks") or [])
            say(f"{job_id}: all {n} rank(s) started; " + (
                f"rendezvous at {where}, waiting for every rank to join and the first step"
                if where else "waiting for the first step"))
        step = (job.get("metrics") or {}).get("step")
        if state == "running" and isinstance(step, int | float):
            loss = (job.get("metrics") or {}).get("loss")
            extra = f", loss {render.number(loss)}" if isinstance(loss, int | float) else ""
            click.echo(f"{job_id}: training: step {render.number(step)}{extra}")
            say(f"follow it: ugroctl logs {job_id} -f")
            return 0
        if state in render.TERMINAL_STATES:
            reason = job.get("reason") or ""
            click.echo(f"{job_id}: {state}" + (f": {render.clean(reason)}" if reason else ""))
            return 0 if state == "succeeded" else EXIT_FAILED
        time.sleep(POLL_S)
