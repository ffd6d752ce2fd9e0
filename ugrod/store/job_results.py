"""What ``ugroctl results`` shows, made durable: summaries of a job's metrics files,
``result.json`` written once at the job's end, and per-rank GPU use kept on disk.

``result.json`` holds the whole results document (written to a temp file, fsynced,
renamed, the directory fsynced); ``results`` of an ended job is read from it, so it
is the same before and after any ugrod restart. ``gpu_use.json`` holds the running
per-rank GPU figures of the current attempt, rewritten as samples come in, so a
restart mid-job loses none of them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ugrod.core import progress_formats as pf

RESULT = "result.json"
GPU_USE = "gpu_use.json"
VERSION = 1
MAX_PARAMS = 64


def summarise(jobdir: Path, loss_keys: tuple[str, ...] = pf.DEFAULT_LOSS_KEYS) -> dict[str, Any]:
    """The job's figures from what it reported (metrics.jsonl), else from what ugrod read
    in its output (progress.jsonl): final and best loss, steps, steps/s, throughput, the
    last value of every number, and what was run (``report_run``)."""
    reported = _summary(jobdir / "metrics.jsonl", loss_keys)
    if reported["reports"] or not (jobdir / "progress.jsonl").exists():
        reported["source"] = "metrics.jsonl"
        return reported
    read = _summary(jobdir / "progress.jsonl", loss_keys)
    read["source"] = "progress.jsonl"
    read["run"] = reported["run"]
    return read


def _summary(path: Path, loss_keys: tuple[str, ...]) -> dict[str, Any]:
    first_step = last_step = None
    final_loss = best_loss = best_step = throughput = None
    step_ts: tuple[float, float] | None = None  # (ts, step) of the last line with a step
    first_step_ts: tuple[float, float] | None = None
    lines = 0
    values: dict[str, int | float] = {}
    run: dict[str, Any] = {}
    for raw in _read_lines(path):
        try:
            m = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(m, dict):
            continue
        if m.get("event") == "params":
            for k, v in m.items():
                if k not in ("ts", "event") and len(run) < MAX_PARAMS and \
                        isinstance(v, str | int | float) and not isinstance(v, bool):
                    run[k] = v
            continue
        if m.get("event"):
            continue
        lines += 1
        pf.merge(values, m, loss_keys)
        one: dict[str, int | float] = {}
        pf.merge(one, m, loss_keys)
        ts, step, loss = pf.finite(m.get("ts")), one.get("step"), one.get("loss")
        if step is not None:
            first_step = step if first_step is None else first_step
            last_step = step
            if ts is not None:
                step_ts = (ts, step)
                first_step_ts = first_step_ts or step_ts
        if loss is not None:
            final_loss = loss
            if best_loss is None or loss < best_loss:
                best_loss, best_step = loss, last_step
        tput = pf.finite(m.get("throughput"))
        if tput is not None:
            throughput = tput
    out: dict[str, Any] = {"final_loss": final_loss, "best_loss": best_loss,
                           "best_step": best_step, "steps": last_step, "reports": lines,
                           "throughput": throughput}
    if first_step_ts and step_ts and step_ts[0] > first_step_ts[0]:
        rate = (step_ts[1] - first_step_ts[1]) / (step_ts[0] - first_step_ts[0])
        if math.isfinite(rate):
            out["steps_per_s"] = round(rate, 3)
    values.pop("ts", None)
    out["values"] = values
    out["run"] = run
    return out


def _read_lines(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            yield from f
    except FileNotFoundError:
        return


def load(jobdir: Path, attempt: int, ended_at: float | None) -> dict[str, Any] | None:
    """The stored results of this attempt's end, or None (absent, older, unreadable)."""
    try:
        doc = json.loads((jobdir / RESULT).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("results_version") != VERSION:
        return None
    if doc.get("attempt") != attempt or doc.get("ended_at_ts") != ended_at:
        return None
    return doc


def store(jobdir: Path, doc: dict[str, Any]) -> None:
    """Write result.json atomically and durably (temp file, fsync, rename, fsync the dir)."""
    write_atomic(jobdir / RESULT, json.dumps(doc, indent=2, sort_keys=False).encode(),
                 durable=True)


def load_usage(jobdir: Path, attempt: int) -> list[dict[str, Any]]:
    """The per-rank GPU figures saved for ``attempt`` (running sums and peaks), or []."""
    try:
        doc = json.loads((jobdir / GPU_USE).read_bytes())
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("attempt") != attempt:
        return []
    rows = doc.get("ranks")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def store_usage(jobdir: Path, attempt: int, rows: list[dict[str, Any]]) -> None:
    if jobdir.is_dir():
        write_atomic(jobdir / GPU_USE, json.dumps({"attempt": attempt, "ranks": rows}).encode(),
                     durable=False)


def write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
