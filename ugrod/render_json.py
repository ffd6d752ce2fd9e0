"""Jobs and nodes as the plain JSON objects of the API (shape fixed in docs/CONTRACTS.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ugrod import events as ev
from ugrod.state import Job, Node


def iso(ts: float | None) -> str | None:
    return ev.format_ts(ts) if ts is not None else None


def job(j: Job, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A job object: at least id, name, state, owner, nodes, exit_code, submitted_at."""
    return {
        "id": j.id, "name": j.id, "state": j.state.value, "owner": j.owner, "uid": j.uid,
        "nodes": list(j.nodes),
        "gpus": [{"node": p.node, "rank": p.rank, "gpus": list(p.gpus)} for p in j.placement],
        "exit_code": j.exit_code, "reason": j.reason, "waiting_reason": j.waiting_reason,
        "submitted_at": iso(j.submitted_at), "started_at": iso(j.started_at),
        "running_at": iso(j.running_at), "ended_at": iso(j.ended_at),
        "priority": j.priority, "held": j.held, "attempt": j.attempt,
        "argv": list(j.spec.argv), "spec": ev.to_builtins(j.spec),
        "ranks": [{"rank": r.rank, "node": r.node, "pid": r.pid, "exit_code": r.exit_code}
                  for r in j.ranks],
        "metrics": dict(metrics or {}), "stopping": j.stopping, "retry_at": iso(j.retry_at),
        "checkpoints": list(j.checkpoints), "resume_from": j.resume_from,
        "failures": j.failures, "best_step": j.best_step, "stalled": j.stalled,
        "rendezvous": f"{j.rdzv_host}:{j.rdzv_port}" if j.rdzv_port else None,
    }


def node(n: Node, jobs: list[str], view: Mapping[str, Any] | None) -> dict[str, Any]:
    """A node object; ``view`` adds the monitor's latest sample and check time."""
    view = view or {}
    return {
        "name": n.name, "host": n.spec.host, "port": n.spec.port, "user": n.spec.user,
        "transport": n.spec.transport, "state": n.state.value, "health": n.health.value,
        "score": n.score, "health_reason": n.health_reason, "drained": n.drained,
        "drain_reason": n.drain_reason, "labels": list(n.spec.labels),
        "gpus": [ev.to_builtins(g) for g in n.gpus],
        "alerts": [{"alert": a.alert, "severity": a.severity, "message": a.message,
                    "since": iso(a.since)} for a in n.alerts],
        "jobs": jobs, "last_check": view.get("last_check"), "sample": view.get("sample"),
        "breaker": view.get("breaker"), "inventory_mismatch": n.inventory_mismatch,
    }
