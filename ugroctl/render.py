"""Text for people (aligned tables, relative times, sizes) and JSON for programs.

Pure functions from API documents to strings; ``now`` is passed in so output is
testable. Anything that came from the daemon is cleaned of control characters
before it reaches a terminal (a job named ``\\x1b[2J`` must not clear the screen).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

GIB = 1024**3

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


def dump_json(doc: Any, pretty: bool | None = None) -> str:
    """Exactly one JSON document (ASCII-safe: a lone surrogate never breaks stdout).

    Indented for a terminal, compact for a pipe (json's C encoder only runs
    without indent: 5-10x faster on a long job list).
    """
    if pretty is None:
        import sys

        pretty = sys.stdout.isatty()
    if pretty:
        return json.dumps(doc, indent=2)
    return json.dumps(doc, separators=(",", ":"))


# ---- small formats ----------------------------------------------------------


def clean(value: Any) -> str:
    """A value as one printable line: control characters shown as ``?``, None as ``-``."""
    if value is None or value == "":
        return "-"
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def parse_time(value: Any) -> float | None:
    """ISO-8601 (``...Z`` or with an offset) or epoch seconds -> epoch seconds; else None."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def ago(value: Any, now: float) -> str:
    """"3m ago", "in 5m", "just now"; "-" when unknown."""
    ts = parse_time(value)
    if ts is None:
        return "-"
    delta = now - ts
    if -5 < delta < 5:
        return "just now"
    span = _span(abs(delta))
    return f"{span} ago" if delta > 0 else f"in {span}"


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def duration(seconds: Any) -> str:
    """1h02m, 3m05s, 45s, 0.4s; "-" when unknown."""
    if not _is_number(seconds):
        return "-"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 3600:
        m, sec = divmod(whole, 60)
        return f"{m}m{sec:02d}s" if m else f"{sec}s"
    h, rem = divmod(whole, 3600)
    if h < 48:
        return f"{h}h{rem // 60:02d}m"
    return f"{h // 24}d{h % 24}h"


def size(nbytes: Any) -> str:
    """Bytes as GB (GiB, as nvidia-smi and the config count), MB below 1 GB."""
    if not _is_number(nbytes):
        return "-"
    n = float(nbytes)
    if n >= GIB:
        return f"{n / GIB:.1f} GB"
    if n >= 1024**2:
        return f"{n / 1024**2:.0f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{int(n)} B"


def number(value: Any, digits: int = 4) -> str:
    """A compact number: ints as is, floats to ``digits`` significant digits."""
    if not _is_number(value):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def percent(value: Any) -> str:
    return "-" if not _is_number(value) else f"{float(value):.0f}%"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right``: right-aligned columns."""
    cells = [[clean(c) for c in row] for row in rows]
    widths = [_width(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], _width(c))
    right_cols = set(right)

    def line(row: Sequence[str]) -> str:
        parts = []
        for i, c in enumerate(row):
            pad = " " * (widths[i] - _width(c))
            parts.append(pad + c if i in right_cols else c + pad)
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column ``key: value`` block, keys aligned; rows with value None are skipped."""
    kept = [(k, clean(v)) for k, v in pairs if v is not None]
    width = max((len(k) for k, _ in kept), default=0)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in kept)


# ---- jobs ---------------------------------------------------------------------


def _gpu_summary(job: Mapping[str, Any]) -> str:
    gpus = job.get("gpus") or []
    total = sum(len(g.get("gpus") or []) for g in gpus if isinstance(g, Mapping))
    nodes = job.get("nodes") or []
    if not nodes:
        spec = job.get("spec") or {}
        want = spec.get("nodes")
        per = spec.get("gpus_per_node")
        if _is_number(want) and _is_number(per):
            return f"({want}x{per} GPU)" if per else f"({want} node{'s' if want != 1 else ''})"
        return "-"
    return f"{','.join(clean(n) for n in nodes)} ({total} GPU)" if total else ",".join(
        clean(n) for n in nodes)


def _job_note(job: Mapping[str, Any]) -> str:
    state = job.get("state")
    if job.get("held"):
        return _held(job.get("waiting_reason"))
    if state in ("queued", "retrying"):
        return str(job.get("waiting_reason") or job.get("reason") or "")
    if state in TERMINAL_STATES:
        code = job.get("exit_code")
        reason = str(job.get("reason") or "")
        return f"exit {code}: {reason}" if code not in (None, 0) and reason else reason
    if job.get("stopping"):
        return f"stopping ({job.get('reason') or job['stopping']})"
    metrics = job.get("metrics") or {}
    bits = []
    if job.get("cpu_only_on_gpu_nodes"):
        bits.append("no GPU asked for")
    if _is_number(metrics.get("step")):
        bits.append(f"step {metrics['step']}")
    if _is_number(metrics.get("loss")):
        bits.append(f"loss {number(metrics['loss'])}")
    return ", ".join(bits)


def _held(reason: Any) -> str:
    text = str(reason or "")
    return text if text.startswith("held") else "held" + (f": {text}" if text else "")


def _job_when(job: Mapping[str, Any], now: float) -> str:
    state = job.get("state")
    if state in TERMINAL_STATES and job.get("ended_at"):
        return f"ended {ago(job['ended_at'], now)}"
    if state in ("starting", "running") and job.get("started_at"):
        return f"started {ago(job['started_at'], now)}"
    return f"submitted {ago(job.get('submitted_at'), now)}"


NOTE_MIN = 10  # the NOTE column keeps at least this much, however narrow the terminal
NOTE_MAX = 200  # and at most this much when there is no terminal to fit


def jobs_table(jobs: Sequence[Mapping[str, Any]], now: float,
               width: int | None = None) -> str:
    """``status`` with no job: active jobs first (submission order), then recent ended ones.

    The NOTE column (reasons can be long: a traceback's last line, a waiting reason)
    is cut with an ellipsis so each row fits ``width`` columns (a terminal's width),
    or NOTE_MAX characters when ``width`` is None.
    """
    if not jobs:
        return "no jobs (submit one with `ugroctl submit -- CMD` or `ugroctl launch`)"
    active = [j for j in jobs if j.get("state") not in TERMINAL_STATES]
    ended = [j for j in jobs if j.get("state") in TERMINAL_STATES]
    ended.sort(key=lambda j: parse_time(j.get("ended_at")) or 0.0, reverse=True)
    rows = [
        [j.get("id"), j.get("state"), j.get("owner"), _gpu_summary(j), j.get("attempt"),
         _job_when(j, now), " ".join(_job_note(j).split())]
        for j in (*active, *ended)
    ]
    headers = ["JOB", "STATE", "OWNER", "NODES", "TRY", "WHEN", "NOTE"]
    room = NOTE_MAX
    if width is not None:
        used = sum(max([_width(clean(r[i])) for r in rows] + [len(headers[i])]) + 2
                   for i in range(len(headers) - 1))
        room = max(NOTE_MIN, width - used)
    for r in rows:
        r[-1] = ellipsize(clean(r[-1]), room)
    return table(headers, rows, right=[4])


def ellipsize(text: str, room: int) -> str:
    """``text`` cut to ``room`` columns, ending in "…" when cut."""
    if _width(text) <= room:
        return text
    out, used = [], 0
    for c in text:
        w = _width(c)
        if used + w > room - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def _fenced(fenced: Any, now: float) -> str | None:
    """Ranks of ended attempts found running and killed (ugrod's fencing), newest last."""
    rows = [f for f in fenced or [] if isinstance(f, Mapping)]
    if not rows:
        return None
    return "; ".join(
        f"attempt {f.get('attempt')} rank {f.get('rank')} on {clean(f.get('node'))}, found "
        f"running after its attempt ended and killed {ago(f.get('at'), now)}"
        for f in rows[-3:])


def job_detail(job: Mapping[str, Any], now: float) -> str:
    """``status JOB``: everything a person asks about one job."""
    spec = job.get("spec") or {}
    metrics = job.get("metrics") or {}
    state = str(job.get("state") or "?")
    if job.get("held"):
        state += " (held)"
    if job.get("stopping"):
        state += f" (stopping: {job['stopping']})"
    gpus = job.get("gpus") or []
    placement = "; ".join(
        f"rank {g.get('rank')} on {clean(g.get('node'))}"
        + (f" GPU {','.join(str(i) for i in g.get('gpus') or [])}" if g.get("gpus") else "")
        for g in gpus if isinstance(g, Mapping)
    )
    want = f"{spec.get('nodes', '?')} node(s) x {spec.get('gpus_per_node', 0)} GPU"
    if spec.get("min_vram_bytes"):
        want += f" ≥ {size(spec['min_vram_bytes'])}"
    pairs: list[tuple[str, Any]] = [
        ("job", job.get("id")),
        ("state", state),
        ("owner", job.get("owner")),
        ("priority", job.get("priority")),
        ("attempt", job.get("attempt")),
        ("wants", want),
        ("placed", placement or None),
        ("GPUs", _cpu_only(job.get("cpu_only_on_gpu_nodes"))),
        ("submitted", _when(job.get("submitted_at"), now)),
        ("started", _when(job.get("started_at"), now)),
        ("ended", _when(job.get("ended_at"), now)),
        ("time limit", _time_limit(job, now)),
        ("waiting", job.get("waiting_reason") or None),
        ("reason", job.get("reason") or None),
        ("exit code", job.get("exit_code") if not job.get("last_attempt") else None),
        ("retry at", _when(job.get("retry_at"), now)),
        ("last try", _last_attempt(job.get("last_attempt"), now)),
        ("fenced", _fenced(job.get("fenced"), now)),
    ]
    if metrics:
        pairs += [("step", number(metrics.get("step")) if "step" in metrics else None),
                  ("loss", number(metrics.get("loss")) if "loss" in metrics else None),
                  ("throughput", number(metrics.get("throughput"))
                   if "throughput" in metrics else None)]
    argv = job.get("argv") or spec.get("argv")
    if argv:
        import shlex

        pairs.append(("command", shlex.join(str(a) for a in argv)))
    if spec.get("sync"):
        pairs.append(("code", f"{clean(spec['sync'])}, copied to each node (--sync)"))
    elif spec.get("cwd"):
        pairs.append(("directory", spec["cwd"]))
    ckpts = job.get("checkpoints") or []
    found = [c for c in job.get("checkpoints_found") or [] if isinstance(c, Mapping)]
    if found:
        newest, copied = found[-1], sum(1 for c in found if c.get("central"))
        where = f"{clean(newest.get('node'))}:{_ckpt_path(newest.get('path'))}" \
            if newest.get("path") else f"head:{_ckpt_path(newest.get('central'))}"
        step = f"step {number(newest.get('step'))}, " if newest.get("step") is not None else ""
        pairs.append(("checkpoint", f"{where} ({step}{len(found)} found, {copied} copied "
                                    f"to the head)"))
    elif ckpts:
        pairs.append(("checkpoint", f"{_ckpt_path(ckpts[-1])} ({len(ckpts)} in all)"))
    if job.get("copy_error"):
        pairs.append(("copy error", job["copy_error"]))
    out = fields(pairs)
    ranks = [r for r in job.get("ranks") or [] if isinstance(r, Mapping)]
    if ranks:
        out += "\n\n" + table(
            ["RANK", "NODE", "PID", "EXIT"],
            [[r.get("rank"), r.get("node"), r.get("pid"), r.get("exit_code")] for r in ranks],
            right=[0, 2, 3])
    return out


def _time_limit(job: Mapping[str, Any], now: float) -> str | None:
    limit = job.get("time_limit")
    if not limit:
        return None
    end = parse_time(job.get("deadline"))
    return f"{clean(limit)}" + (f" (cancelled {ago(job['deadline'], now)})" if end is not None
                                  and end > now else "")


def _last_attempt(last: Any, now: float) -> str | None:
    """The previous attempt of a job waiting for its next one: where it ran, how it ended."""
    if not isinstance(last, Mapping):
        return None
    nodes = ",".join(clean(n) for n in last.get("nodes") or []) or "-"
    code = last.get("exit_code")
    return (f"attempt {clean(last.get('attempt'))} on {nodes}, ended "
            f"{ago(last.get('ended_at'), now)}" + (f" (exit {code})" if code is not None else ""))


def _cpu_only(nodes: Any) -> str | None:
    if not nodes or not isinstance(nodes, list):
        return None
    names = ", ".join(clean(n) for n in nodes)
    return (f"none asked for: runs on CPU although {names} "
            f"{'has GPUs' if len(nodes) == 1 else 'have GPUs'} (CUDA_VISIBLE_DEVICES is "
            f"empty; --gpus-per-node N gives it N)")


def _ckpt_path(c: Any) -> str:
    return clean(c.get("path") if isinstance(c, Mapping) else c)


def _when(value: Any, now: float) -> str | None:
    ts = parse_time(value)
    if ts is None:
        return None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({ago(value, now)})"


def queue_table(entries: Sequence[Mapping[str, Any]], jobs: Mapping[str, Mapping[str, Any]],
                now: float) -> str:
    """``queue``: position, job, priority, owner, why it waits, estimated start."""
    if not entries:
        return "the queue is empty"
    rows = []
    for e in entries:
        ref = e.get("job")
        job: Mapping[str, Any] = ref if isinstance(ref, Mapping) else jobs.get(str(ref), {})
        job_id = job.get("id", ref)
        reason = e.get("reason") or job.get("waiting_reason")
        if job.get("held"):
            reason = _held(reason)
        est = e.get("estimated_start")
        rows.append([e.get("position"), job_id, job.get("priority"), job.get("owner"),
                     reason, _start(est, now)])
    return table(["POS", "JOB", "PRIO", "OWNER", "WAITING FOR", "EST. START"], rows,
                 right=[0, 2])


def _start(value: Any, now: float) -> str:
    ts = parse_time(value)
    if ts is None:
        return "-"
    if ts <= now:
        return "now"
    return f"{time.strftime('%H:%M', time.localtime(ts))} ({ago(value, now)})"


def results_view(doc: Mapping[str, Any], now: float) -> str:
    """``results``: final loss, duration, steps/s, checkpoints, per-rank GPU use."""
    job = doc.get("job") or {}
    summary = doc.get("summary") or {}
    pairs: list[tuple[str, Any]] = [
        ("job", job.get("id")),
        ("state", job.get("state")),
        ("exit code", job.get("exit_code")),
        ("final loss", number(summary.get("final_loss"))),
        ("steps", number(summary.get("steps"))),
        ("duration", duration(summary.get("duration_s"))),
        ("steps/s", number(summary.get("steps_per_s"), 3)),
    ]
    known = {"final_loss", "steps", "duration_s", "steps_per_s"}
    for k, v in summary.items():
        if k not in known and (_is_number(v) or isinstance(v, str)):
            pairs.append((k.replace("_", " "), number(v) if _is_number(v) else v))
    if job.get("reason"):
        pairs.append(("reason", job["reason"]))
    spec = job.get("spec") or {}
    if spec.get("sync"):
        pairs.append(("code", f"{clean(spec['sync'])} (synced with --sync)"))
    elif spec.get("cwd"):
        pairs.append(("code", f"{clean(spec['cwd'])} on each node (not synced)"))
    out = [fields(pairs)]
    for title, key in (("run", "run"), ("last values", "values")):
        part = summary.get(key)
        if isinstance(part, Mapping) and part:
            out.append(f"{title}:\n" + fields(
                [(str(k), number(v) if _is_number(v) else str(v)) for k, v in part.items()]))
    ckpts = [c for c in doc.get("checkpoints") or [] if isinstance(c, Mapping)]
    errors = [c["error"] for c in ckpts if c.get("error")]
    ckpts = [c for c in ckpts if not c.get("error")]
    if errors:
        out.append(f"checkpoints: could not list them: {clean(errors[0])}")
    elif ckpts:
        out.append(f"checkpoints ({len(ckpts)}):")
        out.append(table(["NAME", "STEP", "SIZE", "SAVED", "ON", "HEAD COPY"],
                         [[c.get("name") or c.get("path"), number(c.get("step")),
                           size(c.get("size_bytes")), ago(c.get("mtime"), now),
                           f"{c['node']}:{c['path']}" if c.get("node") else "-",
                           c.get("central") or "-"]
                          for c in ckpts], right=[1, 2]))
    else:
        out.append("checkpoints: none")
    res = _resource_rows(doc.get("resources"))
    if res:
        out.append("GPU use per rank:")
        out.append(table(["RANK", "NODE", "GPU", "UTIL AVG", "UTIL PEAK", "MEM AVG",
                          "MEM PEAK"], res, right=[0, 2, 3, 4, 5, 6]))
    return "\n\n".join(out)


def _resource_rows(resources: Any) -> list[list[Any]]:
    """Accepts ``{"ranks": [...]}`` or a list of per-rank/GPU dicts; unknown shapes: none."""
    items = resources.get("ranks") if isinstance(resources, Mapping) else resources
    if not isinstance(items, list | tuple):
        return []
    rows = []
    for r in items:
        if not isinstance(r, Mapping):
            continue
        rows.append([r.get("rank"), r.get("node"), r.get("gpu", r.get("gpus")),
                     percent(r.get("util_avg")), percent(r.get("util_peak")),
                     size(r.get("mem_avg_bytes")), size(r.get("mem_peak_bytes"))])
    return rows


# ---- nodes --------------------------------------------------------------------


def _gpu_cell(node: Mapping[str, Any]) -> str:
    """Per GPU ``util/mem/temp`` from the latest sample, else the inventory."""
    sample = node.get("sample") or {}
    live = sample.get("gpus") if isinstance(sample, Mapping) else None
    if isinstance(live, list | tuple) and live:
        parts = []
        for g in live:
            if not isinstance(g, Mapping):
                continue
            if g.get("error"):
                parts.append(f"{g.get('index', '?')}:{clean(g['error'])}")
                continue
            used = g.get("memory_used_bytes", g.get("mem_used_bytes"))
            total = g.get("memory_total_bytes", g.get("mem_total_bytes"))
            mem = (f"{used / total * 100:.0f}%" if _is_number(used) and _is_number(total)
                   and total else size(used))
            temp = g.get("temperature_c")
            temp_text = f"{temp:.0f}C" if _is_number(temp) else "-"
            parts.append(f"{g.get('index', '?')}:{percent(g.get('util_percent'))}/{mem}/"
                         f"{temp_text}")
        return " ".join(parts)
    if isinstance(sample, Mapping) and sample.get("gpu_error"):
        return f"error: {clean(sample['gpu_error'])}"
    gpus = [g for g in node.get("gpus") or [] if isinstance(g, Mapping)]
    if not gpus:
        return "none"
    return " ".join(f"{g.get('index', '?')}:{_vram(g)}" for g in gpus)


def _alerts_cell(node: Mapping[str, Any]) -> str:
    alerts = node.get("alerts") or []
    texts = []
    for a in alerts:
        if isinstance(a, Mapping):
            texts.append(str(a.get("message") or a.get("alert") or "?"))
        else:
            texts.append(str(a))
    if node.get("inventory_mismatch"):
        texts.append(f"inventory: {node['inventory_mismatch']}")
    if node.get("drained") and node.get("drain_reason"):
        texts.append(f"drained: {node['drain_reason']}")
    if node.get("health") == "unreachable" and node.get("health_reason"):
        texts.insert(0, f"unreachable: {node['health_reason']}")
    return "; ".join(texts)


def _node_note(node: Mapping[str, Any]) -> str:
    """Why a node takes no work: drained, or its health and the reason for it."""
    if node.get("drained"):
        return f"drained: {node['drain_reason']}" if node.get("drain_reason") else "drained"
    if node.get("health") not in (None, "healthy") and node.get("health_reason"):
        return f"{node.get('health')}: {node['health_reason']}"
    return ""


def _vram(g: Mapping[str, Any]) -> str:
    """A card's size as people say it ("12 GB"); the exact figure is in --json."""
    nominal = g.get("nominal_gb")
    if _is_number(nominal) and nominal:
        return f"{nominal:.0f} GB" if float(nominal).is_integer() else f"{nominal:.1f} GB"
    return size(g.get("vram_bytes"))


def health_table(nodes: Sequence[Mapping[str, Any]], now: float) -> str:
    """``health``: node, status, score, GPUs (util/mem/temp), last check, alerts."""
    if not nodes:
        return "no nodes configured"
    rows = [[n.get("name"), n.get("state"), number(n.get("score"), 3), _gpu_cell(n),
             ago(n.get("last_check"), now), _alerts_cell(n)] for n in nodes]
    return table(["NODE", "STATUS", "SCORE", "GPUS util/mem/temp", "CHECKED", "ALERTS"], rows,
                 right=[2])


def nodes_table(nodes: Sequence[Mapping[str, Any]],
                cluster: Mapping[str, Any] | None = None) -> str:
    """``nodes``: where each node is, how it is reached, its GPUs (free/total, as sinfo
    counts them), labels and jobs; then the cluster's totals."""
    if not nodes:
        return "no nodes configured"
    rows = []
    for n in nodes:
        gpus = [g for g in n.get("gpus") or [] if isinstance(g, Mapping)]
        gpu_text = ", ".join(f"{clean(g.get('model')) if g.get('model') else 'GPU'} "
                             f"{_vram(g)}" for g in gpus) or "none"
        addr = f"{n.get('user')}@{n.get('host')}" if n.get("user") else str(n.get("host"))
        if n.get("port") not in (None, 22) and n.get("transport") == "ssh":
            addr += f":{n['port']}"
        rows.append([n.get("name"), n.get("state"), n.get("transport"), addr,
                     _free_of_total(n), gpu_text,
                     ",".join(str(x) for x in n.get("labels") or []),
                     ",".join(str(x) for x in n.get("jobs") or []), _node_note(n)])
    out = table(["NODE", "STATE", "VIA", "ADDRESS", "FREE/GPUS", "GPUS", "LABELS", "JOBS",
                 "NOTE"], rows, right=[4])
    if isinstance(cluster, Mapping):
        out += "\n\n" + cluster_line(cluster)
    return out


def _free_of_total(n: Mapping[str, Any]) -> str:
    total, free = n.get("gpus_total"), n.get("gpus_free")
    if not _is_number(total) or not _is_number(free):
        return "-"
    return f"{free}/{total}"


def cluster_line(c: Mapping[str, Any]) -> str:
    """The cluster's totals: nodes taking work, GPUs free/in use/unavailable of all."""
    nodes, sched = c.get("nodes", 0), c.get("nodes_schedulable", 0)
    total, free, used = c.get("gpus_total", 0), c.get("gpus_free", 0), c.get("gpus_used", 0)
    off = c.get("gpus_unavailable", 0)
    text = (f"cluster: {sched} of {nodes} node{'s' if nodes != 1 else ''} taking work; "
            f"GPUs {free} free of {total}, {used} in use")
    if off:
        text += f", {off} on nodes not taking work"
    return text


def checks_table(doc: Mapping[str, Any]) -> str:
    """``health NODE [--deep]``: one line per check."""
    checks = [c for c in doc.get("checks") or [] if isinstance(c, Mapping)]
    head = f"node {clean(doc.get('node'))}"
    if not checks:
        return head + ": no checks ran"
    rows = [["ok" if c.get("ok") else "FAIL", c.get("name"), c.get("detail")] for c in checks]
    return head + "\n" + table(["", "CHECK", "DETAIL"], rows)


# ---- history, events, sweeps ------------------------------------------------


def _clock(value: Any) -> str:
    ts = parse_time(value)
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def why_view(doc: Mapping[str, Any], now: float) -> str:
    """``why``: the job's state now, then its decisions from the event log, oldest first."""
    job = doc.get("job") or {}
    head = f"{clean(job.get('id'))}: {clean(job.get('state'))}"
    why = job.get("waiting_reason") or job.get("reason")
    if why:
        head += f" ({clean(why)})"
    history = [h for h in doc.get("history") or [] if isinstance(h, Mapping)]
    if not history:
        return head + "\nno recorded history"
    rows = [[h.get("seq"), _clock(h.get("ts")), h.get("text") or h.get("type")]
            for h in history]
    return head + "\n" + table(["SEQ", "TIME", "WHAT"], rows, right=[0])


def actor_name(actor: Any) -> str:
    if isinstance(actor, Mapping):
        return str(actor.get("user") or actor.get("uid") or "?")
    return str(actor) if actor else "?"


def _data_summary(data: Any, limit: int = 100) -> str:
    if not isinstance(data, Mapping):
        return ""
    parts = []
    for k, v in data.items():
        if v is None or v is False or v == [] or v == {} or k == "request_id":
            continue
        if k in ("sample", "spec", "node") and isinstance(v, Mapping | list):
            if k == "node" and isinstance(v, Mapping) and "name" in v:
                parts.append(f"node={v['name']}")
            continue
        if isinstance(v, Mapping | list):
            v = json.dumps(v, separators=(",", ":"))
        parts.append(f"{k}={v}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def event_line(event: Mapping[str, Any]) -> str:
    """One event for people: seq, local time, actor, type, the data in short."""
    return "  ".join([
        f"{event.get('seq', '?'):>6}", _clock(event.get("ts")),
        clean(actor_name(event.get("actor"))), clean(event.get("type")),
        clean(_data_summary(event.get("data"))),
    ]).rstrip()


def sweep_view(doc: Mapping[str, Any], now: float) -> str:
    """``sweep status``: each trial's parameters, state, loss and duration, best first."""
    sweep = doc.get("sweep") or {}
    trials = [t for t in doc.get("trials") or [] if isinstance(t, Mapping)]
    head = fields([("sweep", sweep.get("name")), ("owner", sweep.get("owner")),
                   ("trials", len(trials)),
                   ("max parallel", sweep.get("max_parallel") or "unlimited")])
    if not trials:
        return head
    rows = []
    for i, t in enumerate(trials, 1):
        job = t.get("job")
        job_id = job.get("id") if isinstance(job, Mapping) else job
        params = t.get("params") or {}
        ptext = " ".join(f"{k}={v}" for k, v in params.items()) if isinstance(
            params, Mapping) else str(params)
        state = t.get("state") or (job.get("state") if isinstance(job, Mapping) else None)
        loss = t.get("final_loss")
        if loss is None:
            loss = t.get("latest_loss", t.get("loss"))
        rows.append([i, job_id, ptext, state, number(loss), number(t.get("step")),
                     duration(t.get("duration_s"))])
    return head + "\n\n" + table(["#", "JOB", "PARAMS", "STATE", "LOSS", "STEP", "TIME"], rows,
                                 right=[0, 4, 5, 6])


def sweeps_table(sweeps: Sequence[Mapping[str, Any]], now: float) -> str:
    """``sweep list``: each sweep, its owner, trials by state, and when it was created."""
    if not sweeps:
        return "no sweeps (create one with `ugroctl sweep --name S --param k=v1,v2 -- CMD`)"
    order = ("running", "starting", "queued", "retrying", "succeeded", "failed", "cancelled")
    rows = []
    for w in sweeps:
        states = w.get("states") if isinstance(w.get("states"), Mapping) else {}
        assert isinstance(states, Mapping)
        counts = ", ".join(f"{states[k]} {k}" for k in order if states.get(k))
        rows.append([w.get("name"), w.get("owner"), w.get("trials"), counts or "-",
                     w.get("max_parallel") or "-", ago(w.get("created_at"), now)])
    return table(["SWEEP", "OWNER", "TRIALS", "STATES", "PARALLEL", "CREATED"], rows,
                 right=[2, 4])


def reload_view(doc: Mapping[str, Any]) -> str:
    lines = []
    for key in ("added", "removed", "changed"):
        items = doc.get(key) or []
        lines.append(f"{key}: {', '.join(clean(i) for i in items) if items else 'none'}")
    return "\n".join(lines)


def launch_plan(plan: Mapping[str, Any]) -> str:
    """A dry run's plan: torchrun or not, the directory, and per rank its node and argv."""
    import shlex

    lines = [f"torchrun: {'yes' if plan.get('torchrun') else 'no (the command runs as is)'}"]
    if plan.get("sync"):
        lines.append(f"code: {clean(plan['sync'])}, copied to each node; ranks start in "
                     f"that copy")
    else:
        lines.append(f"directory: {clean(plan.get('cwd') or 'the login directory on each node')}")
    ranks = [r for r in plan.get("ranks") or [] if isinstance(r, Mapping)]
    if not ranks:
        why = plan.get("waiting")
        lines.append(f"nodes: none free now{': ' + clean(why) if why else ''}")
    for r in ranks:
        gpus = ",".join(str(g) for g in r.get("gpus") or [])
        lines.append(f"rank {r.get('rank')} on {clean(r.get('node'))}"
                     + (f" GPU {gpus}" if gpus else " (no GPU)") + ":")
        lines.append(f"  {clean(shlex.join(str(a) for a in r.get('argv') or []))}")
    for n in plan.get("unreachable") or []:  # nodes ugrod cannot reach now, and why
        if isinstance(n, Mapping):
            lines.append(f"node {clean(n.get('node'))} is unreachable: {clean(n.get('reason'))}")
    return "\n".join(lines)
