"""Jobs and nodes as the plain JSON objects of the API (shape fixed in docs/CONTRACTS.md)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from ugrod.core import codec, time_limits
from ugrod.core import events as ev
from ugrod.core.state import WAITING, Job, Node, State, Sweep
from ugrod.core.vram import nominal_gb


def iso(ts: float | None) -> str | None:
    return codec.format_ts(ts) if ts is not None else None


def job(j: Job, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A job object: at least id, name, state, owner, nodes, exit_code, submitted_at.

    A job waiting for its next attempt (retrying, or queued again by resume) shows no
    placement, pids, start time or metrics: those were the previous attempt's, which
    ``last_attempt`` summarises.
    """
    waiting = j.state in WAITING
    current = not waiting or j.attempt == 0
    placement = j.placement if current else ()
    return {
        "id": j.id, "name": j.id, "state": j.state.value, "owner": j.owner, "uid": j.uid,
        "nodes": [p.node for p in placement],
        "gpus": [{"node": p.node, "rank": p.rank, "gpus": list(p.gpus)} for p in placement],
        "exit_code": j.exit_code, "reason": j.reason, "waiting_reason": j.waiting_reason,
        "submitted_at": iso(j.submitted_at), "started_at": iso(j.started_at if current else None),
        "running_at": iso(j.running_at if current else None), "ended_at": iso(j.ended_at),
        "priority": j.priority, "held": j.held, "attempt": j.attempt,
        "argv": list(j.spec.argv), "spec": ev.to_builtins(j.spec),
        "ranks": [{"rank": r.rank, "node": r.node, "pid": r.pid, "exit_code": r.exit_code}
                  for r in (j.ranks if current else ())],
        "metrics": dict(metrics or {}) if current else {}, "stopping": j.stopping,
        "retry_at": iso(j.retry_at),
        "checkpoints": list(j.checkpoints), "resume_from": j.resume_from,
        # verified copies in the head's job directory (checkpoints/NAME), and why
        # copying last failed ("" since the last copy that worked)
        "central_checkpoints": [{"name": c.name, "node": c.node, "path": c.path,
                                 "size_bytes": c.size_bytes, "mtime": iso(c.mtime),
                                 "step": c.step} for c in j.central],
        "copy_error": j.copy_error,
        "failures": j.failures, "best_step": j.best_step, "stalled": j.stalled,
        "fenced": [{"attempt": f.attempt, "rank": f.rank, "node": f.node, "at": iso(f.at),
                    "pids": f.pids} for f in j.fenced],
        "rendezvous": f"{j.rdzv_host}:{j.rdzv_port}" if j.rdzv_port and current else None,
        "time_limit": time_limits.show(j.spec.time_limit_s) if j.spec.time_limit_s else None,
        "deadline": iso(time_limits.deadline(j.started_at, j.spec.time_limit_s))
        if j.state not in WAITING and j.ended_at is None else None,
        "last_attempt": None if current else {
            "attempt": j.attempt, "nodes": [p.node for p in j.placement],
            "exit_code": j.exit_code, "ended_at": iso(j.ended_at), "reason": j.reason},
    }


def node(n: Node, jobs: list[str], view: Mapping[str, Any] | None,
         held: Collection[int] = ()) -> dict[str, Any]:
    """A node object; ``view`` adds the monitor's latest sample and check time."""
    view = view or {}
    return {
        "name": n.name, "host": n.spec.host, "port": n.spec.port, "user": n.spec.user,
        "transport": n.spec.transport, "state": n.state.value, "health": n.health.value,
        "score": n.score, "health_reason": n.health_reason, "drained": n.drained,
        "drain_reason": n.drain_reason, "labels": list(n.spec.labels),
        # vram_bytes is exactly what the node reports; nominal_gb is the card's size as
        # people say it, the one --min-vram is compared with (ugrod/core/vram.py).
        "gpus": [{**ev.to_builtins(g), "nominal_gb": nominal_gb(g.vram_bytes)} for g in n.gpus],
        "alerts": [{"alert": a.alert, "severity": a.severity, "message": a.message,
                    "since": iso(a.since)} for a in n.alerts],
        "jobs": jobs, "last_check": view.get("last_check"), "sample": view.get("sample"),
        "breaker": view.get("breaker"), "inventory_mismatch": n.inventory_mismatch,
        **gpu_counts(n, held),
    }


def gpu_counts(n: Node, held: Collection[int]) -> dict[str, int]:
    """sinfo's view of one node's GPUs: total, in use (held by a job), free (not held, on a
    node that takes work) and unavailable (not held, on a drained or sick node)."""
    total = len(n.gpus)
    used = sum(1 for g in n.gpus if g.index in held)
    idle = total - used
    return {"gpus_total": total, "gpus_used": used, "gpus_free": idle if n.schedulable else 0,
            "gpus_unavailable": 0 if n.schedulable else idle}


def held_gpus(state: State) -> dict[str, set[int]]:
    """Node -> indexes of its GPUs held by a starting, running or stopping job."""
    out: dict[str, set[int]] = {}
    for node, index in state.gpus_held:
        out.setdefault(node, set()).add(index)
    return out


def cluster_summary(nodes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The cluster line of ``nodes``: node and GPU counts summed over the node objects."""
    out = {"nodes": 0, "nodes_schedulable": 0, "gpus_total": 0, "gpus_used": 0,
           "gpus_free": 0, "gpus_unavailable": 0}
    for n in nodes:
        out["nodes"] += 1
        out["nodes_schedulable"] += n["state"] in ("healthy", "degraded")
        for k in ("gpus_total", "gpus_used", "gpus_free", "gpus_unavailable"):
            out[k] += n[k]
    return out


def sweep_summary(w: Sweep, state: State) -> dict[str, Any]:
    """A sweep in a list: name, owner, creation, limit, and its trials counted by state."""
    counts: dict[str, int] = {}
    for job_id in w.jobs:
        job = state.jobs.get(job_id)
        if job is not None:
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
    return {"name": w.name, "owner": w.owner, "created_at": iso(w.created_at),
            "trials": len(w.jobs), "max_parallel": w.max_parallel, "states": counts,
            "params": {k: list(v) for k, v in w.params.items()}}
