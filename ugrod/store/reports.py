"""What `results` and `sweep status` show: summaries read from a job's metrics.jsonl."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ugrod.core import render_json as rj
from ugrod.core.state import TERMINAL, State, Sweep


def summarise_metrics(path: Path) -> dict[str, Any]:
    """final loss, steps, steps/s from a job's metrics.jsonl (bad lines are skipped)."""
    first_ts = last_ts = None
    first_step = last_step = None
    final_loss = None
    lines = 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    m = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(m, dict) or m.get("event"):
                    continue
                lines += 1
                ts, step, loss = m.get("ts"), m.get("step"), m.get("loss")
                if isinstance(ts, int | float):
                    first_ts = ts if first_ts is None else first_ts
                    last_ts = ts
                if isinstance(step, int | float):
                    first_step = step if first_step is None else first_step
                    last_step = step
                if isinstance(loss, int | float):
                    final_loss = loss
    except FileNotFoundError:
        pass
    out: dict[str, Any] = {"final_loss": final_loss, "steps": last_step, "reports": lines}
    if first_ts is not None and last_ts is not None and last_ts > first_ts \
            and first_step is not None and last_step is not None:
        out["steps_per_s"] = round((last_step - first_step) / (last_ts - first_ts), 3)
    return out


def sweep_view(state: State, sweep: Sweep, job_dir: Callable[[str], Path],
               latest: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    trials = []
    for job_id in sweep.jobs:
        job = state.jobs[job_id]
        summary = summarise_metrics(job_dir(job_id) / "metrics.jsonl")
        live = latest.get(job_id, {})  # the newest metrics this ugrod has seen
        duration = (job.ended_at or time.time()) - job.first_started_at \
            if job.first_started_at else None
        trials.append({"job": job_id, "params": dict(job.spec.params),
                       "state": job.state.value,
                       "latest_loss": live.get("loss", summary.get("final_loss")),
                       "final_loss": summary.get("final_loss")
                       if job.state in TERMINAL else None,
                       "duration_s": round(duration, 3) if duration else None})

    def key(t: dict[str, Any]) -> tuple[int, float]:
        loss = t["final_loss"] if t["final_loss"] is not None else t["latest_loss"]
        return (0, loss) if isinstance(loss, int | float) else (1, 0.0)
    trials.sort(key=key)
    states = [state.jobs[j].state for j in sweep.jobs]
    return {"sweep": {"name": sweep.name, "owner": sweep.owner, "params": {
        k: list(v) for k, v in sweep.params.items()}, "max_parallel": sweep.max_parallel,
        "created_at": rj.iso(sweep.created_at),
        "done": sum(s in TERMINAL for s in states), "total": len(states)},
        "trials": trials}
