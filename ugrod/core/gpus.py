"""What a node says about itself: nvidia-smi rows, /proc counters, rank pids, readiness.

Pure parsing only: no I/O, no clock. The node side is small stdlib Python
programs (ugrod/nodes/remote/: probe.py, probe_server.py, readiness.py; their argv in
ugrod/nodes/probe.py) run over the node's transport, no shell; each prints one JSON
object that ``parse_probe`` / ``parse_readiness`` turn into typed values.

nvidia-smi facts this parser relies on (docs OBSERVABILITY.md, and real
captures such as utkuozdemir/nvidia_gpu_exporter internal/captures/
linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt): with
``--format=csv,noheader,nounits`` it prints one row per GPU, cells joined by
``", "``, no quoting (names never contain commas); missing values read
``[N/A]``, ``N/A``, ``[Not Supported]``…; a sick GPU reads ``[Unknown Error]``
or ``[GPU requires reset]``; with MIG on every ``utilization.*`` is ``[N/A]``;
``index`` may change across boots, so everything is keyed on ``uuid``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from ugrod.core.events import Gpu

QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
)

MIB = 1024 * 1024
ABSENT = frozenset({
    "", "N/A", "[N/A]", "[Not Supported]", "[Insufficient Permissions]",
    "[Requested functionality has been deprecated]",
})
GPU_ERRORS = frozenset({"[Unknown Error]", "[GPU requires reset]", "[GPU is lost]"})
NO_DEVICES = "No devices were found"  # nvidia-smi's words, with exit code 6
_QUOTE_MAX = 200
MAX_READING = 1e9  # any value nvidia-smi reports (MiB, %, W, °C) is far below this


def nvidia_smi_argv(binary: str = "nvidia-smi") -> list[str]:
    """The one query the project runs (and the fake answers)."""
    return [binary, "--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv,noheader,nounits"]


class GpuSample(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU at one moment; None where nvidia-smi had no value."""

    uuid: str
    index: int
    name: str
    util_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    error: str | None = None  # "GPU requires reset", "Unknown Error": the GPU is sick

    @property
    def memory_percent(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes


class GpuQueryFailed(msgspec.Struct, frozen=True):
    """nvidia-smi ran but its answer cannot be trusted; ``message`` quotes what it printed."""

    message: str


GpuReading = tuple[GpuSample, ...] | GpuQueryFailed


def _quote(text: str) -> str:
    text = text.strip()
    if len(text) > _QUOTE_MAX:
        text = text[:_QUOTE_MAX] + "…"
    return repr(text)


class _BadRow(Exception):
    pass


def _number(field: str, cell: str, line: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        hint = " (units in the output? the query must use nounits)" if " " in cell else ""
        raise _BadRow(f"nvidia-smi: {field} {cell!r} is not a number{hint} in line "
                      f"{_quote(line)}") from None
    if not math.isfinite(value):
        raise _BadRow(f"nvidia-smi: {field} {cell!r} is not a finite number in line "
                      f"{_quote(line)}")
    if not -MAX_READING <= value <= MAX_READING:
        # 1e308 MiB is finite but its bytes are not: the sweep raised on every round and
        # the node kept its last "healthy" score, unmonitored.
        raise _BadRow(f"nvidia-smi: {field} {cell!r} is out of range (at most "
                      f"{MAX_READING:g}) in line {_quote(line)}")
    return value


def _row(line: str) -> GpuSample:
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != len(QUERY_FIELDS):
        raise _BadRow(f"nvidia-smi: expected {len(QUERY_FIELDS)} columns, got {len(cells)} "
                      f"in line {_quote(line)}")
    index_cell, uuid, name = cells[0], cells[1], cells[2]
    if index_cell in GPU_ERRORS or uuid in GPU_ERRORS:
        raise _BadRow(f"nvidia-smi: GPU unreadable ({index_cell}, {uuid}) in line "
                      f"{_quote(line)}")
    try:
        index = int(index_cell)
    except ValueError:
        raise _BadRow(f"nvidia-smi: index {index_cell!r} is not an integer in line "
                      f"{_quote(line)}") from None
    if not 0 <= index < 1024:
        raise _BadRow(f"nvidia-smi: index {index_cell!r} is out of range in line "
                      f"{_quote(line)}")
    if uuid in ABSENT or " " in uuid:
        raise _BadRow(f"nvidia-smi: no usable uuid {uuid!r} in line {_quote(line)}")
    values: dict[str, float | None] = {}
    error: str | None = None
    for field, cell in zip(QUERY_FIELDS[3:], cells[3:], strict=True):
        if cell in GPU_ERRORS:
            error = error or cell.strip("[]")
            values[field] = None
        elif cell in ABSENT or (cell.startswith("[") and cell.endswith("]")):
            values[field] = None  # an unknown bracketed word is nvidia-smi saying "no value"
        else:
            values[field] = _number(field, cell, line)
    if name in GPU_ERRORS:
        error = error or name.strip("[]")
    if name in ABSENT or name in GPU_ERRORS:
        name = ""
    used, total = values["memory.used"], values["memory.total"]
    return GpuSample(
        uuid=uuid, index=index, name=name,
        util_percent=values["utilization.gpu"],
        memory_used_bytes=None if used is None else round(used * MIB),
        memory_total_bytes=None if total is None else round(total * MIB),
        temperature_c=values["temperature.gpu"],
        power_w=values["power.draw"],
        error=error,
    )


def parse_nvidia_smi(stdout: str, exit_code: int, stderr: str, *,
                     expect_gpus: int = 0) -> GpuReading:
    """Rows of ``nvidia_smi_argv()`` output -> samples, or a failure quoting what was wrong.

    Never raises. Exit code 6 with "No devices were found" means no GPUs, which
    is a failure only when ``expect_gpus`` says there should be some.
    """
    text = stdout.replace("\r", "")
    said = stderr.strip() or text.strip()
    if exit_code != 0:
        if exit_code == 6 and NO_DEVICES in said and not expect_gpus:
            return ()
        return GpuQueryFailed(f"nvidia-smi exited with code {exit_code}: "
                              f"{_quote(said) if said else '(no output)'}")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        if expect_gpus:
            return GpuQueryFailed(f"nvidia-smi printed nothing, expected {expect_gpus} "
                                  f"GPU{'s' if expect_gpus != 1 else ''}"
                                  + (f"; stderr: {_quote(stderr)}" if stderr.strip() else ""))
        return ()
    samples: list[GpuSample] = []
    seen: set[str] = set()
    for line in lines:
        try:
            sample = _row(line)
        except _BadRow as exc:
            return GpuQueryFailed(str(exc))
        if sample.uuid in seen:
            return GpuQueryFailed(f"nvidia-smi: uuid {sample.uuid} listed twice, line "
                                  f"{_quote(line)}")
        seen.add(sample.uuid)
        samples.append(sample)
    return tuple(samples)


# ---- inventory ------------------------------------------------------------


def inventory(samples: Iterable[GpuSample]) -> tuple[Gpu, ...]:
    """The node's GPUs as the config describes them (index, model, VRAM, uuid)."""
    return tuple(
        Gpu(index=s.index, model=s.name, vram_bytes=s.memory_total_bytes or 0, uuid=s.uuid)
        for s in sorted(samples, key=lambda s: s.index)
    )


def _gb(n: int) -> str:
    value = round(n / 1024**3, 1)
    return f"{value:.0f} GB" if value == int(value) else f"{value:.1f} GB"


def _describe(gpus: Sequence[Gpu], *, noun: bool = True) -> str:
    kinds: dict[str, int] = {}
    for g in gpus:
        parts = [p for p in (g.model, _gb(g.vram_bytes) if g.vram_bytes else "") if p]
        key = ", ".join(parts)
        kinds[key] = kinds.get(key, 0) + 1
    n = len(gpus)
    head = f"{n} GPU{'s' if n != 1 else ''}" if noun else str(n)
    if not n or not any(kinds):
        return head
    inner = "; ".join(k if c == 1 or len(kinds) == 1 else f"{c}x {k}"
                      for k, c in kinds.items() if k)
    return f"{head} ({inner})"


def _same_model(configured: str, found: str) -> bool:
    want = " ".join(configured.casefold().split())
    return not want or want in " ".join(found.casefold().split())


# Reported totals sit a little under the marketing size (81559 MiB for "80 GB",
# 8188 MiB for "8 GB"); only a difference beyond this counts as a mismatch.
VRAM_TOLERANCE = 0.10


def compare_inventory(configured: Sequence[Gpu], found: Sequence[Gpu]) -> str | None:
    """How the node's GPUs differ from the config, in one line; None if they agree.

    A config that lists no GPUs agrees with anything (they are read from the node).
    """
    if not configured:
        return None
    if len(configured) != len(found):
        return (f"config says {_describe(configured)}, "
                f"node has {_describe(found, noun=False)}")
    problems: list[str] = []
    by_index = {g.index: g for g in found}
    for want in sorted(configured, key=lambda g: g.index):
        got = by_index.get(want.index)
        if got is None:
            problems.append(f"GPU {want.index}: in config, not on node (node has indices "
                            f"{', '.join(str(i) for i in sorted(by_index))})")
            continue
        if want.uuid and got.uuid and want.uuid != got.uuid:
            problems.append(f"GPU {want.index}: config says {want.uuid}, node has {got.uuid}")
        if want.model and got.model and not _same_model(want.model, got.model):
            problems.append(f"GPU {want.index}: config says {want.model}, node has {got.model}")
        if want.vram_bytes and abs(got.vram_bytes - want.vram_bytes) > \
                VRAM_TOLERANCE * want.vram_bytes:
            problems.append(f"GPU {want.index}: config says {_gb(want.vram_bytes)}, "
                            f"node has {_gb(got.vram_bytes)}")
    return "; ".join(problems) or None


# ---- the probe's answer (printed by ugrod/nodes/remote/probe.py) ------------------


class ProbeError(ValueError):
    """The node's answer is not what the probe prints; ``raw`` is what it did print."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(f"{message}: {_quote(raw) if raw.strip() else '(no output)'}")
        self.raw = raw


class RankProcess(msgspec.Struct, frozen=True, kw_only=True):
    file: str
    pid: int | None = None
    alive: bool = False
    error: str | None = None
    ended: bool = False  # gone, and its exit code is written: it ended, it did not vanish


class NodeSample(msgspec.Struct, frozen=True, kw_only=True):
    """One probe of one node. ``ts`` and ``latency_ms`` are stamped by the caller."""

    ts: float = 0.0
    latency_ms: float | None = None
    gpus: tuple[GpuSample, ...] = ()
    gpu_error: str | None = None  # the GPU check failed (message quotes nvidia-smi)
    nvidia_smi: bool = False  # present on the node
    smi_s: float | None = None
    load: tuple[float, ...] = ()
    cpu_count: int | None = None
    cpu_ticks: tuple[int, int] | None = None  # (total, idle) since boot
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    disk_path: str = ""
    disk_total_bytes: int | None = None
    disk_used_bytes: int | None = None
    disk_avail_bytes: int | None = None
    ranks: tuple[RankProcess, ...] = ()
    boot_id: str = ""
    clock: float | None = None  # the node's own time.time()
    node_s: float | None = None  # time the probe process existed on the node
    errors: tuple[str, ...] = ()

    @property
    def mem_percent(self) -> float | None:
        if not self.mem_total_bytes or self.mem_available_bytes is None:
            return None
        return 100.0 * (self.mem_total_bytes - self.mem_available_bytes) / self.mem_total_bytes

    @property
    def disk_percent(self) -> float | None:
        """Like df's Use%: used / (used + available to users)."""
        if self.disk_used_bytes is None or self.disk_avail_bytes is None:
            return None
        room = self.disk_used_bytes + self.disk_avail_bytes
        return 100.0 * self.disk_used_bytes / room if room else None


class _Run(msgspec.Struct, frozen=True):
    present: bool = False
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    error: str | None = None
    elapsed_s: float | None = None
    stdout_truncated: bool = False


class _Disk(msgspec.Struct, frozen=True):
    path: str
    total: int
    free: int
    avail: int


class _Probe(msgspec.Struct, frozen=True):
    v: int
    smi: _Run
    errors: list[str] = []
    clock: float | None = None
    loadavg: list[float] = []
    meminfo: dict[str, int] = {}
    cpu: list[int] = []
    ncpu: int | None = None
    disk: _Disk | None = None
    boot_id: str = ""
    pids: list[RankProcess] = []
    age_s: float | None = None


class _Readiness(msgspec.Struct, frozen=True):
    v: int
    python: list[int]
    torch: _Run
    smi: _Run
    executable: str = ""
    disk: _Disk | None = None
    errors: list[str] = []


def _last_json_line(stdout: str | bytes) -> str:
    text = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
    # Anything a login script printed comes before; the probe's object is the last line.
    for line in reversed(text.splitlines()):
        if line.strip():
            return line
    raise ProbeError("probe printed nothing", text)


T = TypeVar("T")


def _decode(stdout: str | bytes, kind: type[T], what: str) -> T:
    line = _last_json_line(stdout)
    try:
        value = msgspec.json.decode(line, type=kind)
    except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
        raise ProbeError(f"{what} output is not what it prints ({exc})", line) from None
    if getattr(value, "v", None) != 1:
        raise ProbeError(f"{what} output has an unknown version", line)
    return value


def _gpu_check(smi: _Run, expect_gpus: int, *, timeout_hint: str = "") -> GpuReading:
    if smi.error:
        return GpuQueryFailed(smi.error)
    if not smi.present:
        if expect_gpus:
            return GpuQueryFailed(f"nvidia-smi not found on the node, expected {expect_gpus} "
                                  f"GPU{'s' if expect_gpus != 1 else ''}")
        return ()
    if smi.timed_out or smi.exit_code is None:
        return GpuQueryFailed(f"nvidia-smi did not answer in time{timeout_hint} (hung driver?)")
    if smi.stdout_truncated:
        return GpuQueryFailed("nvidia-smi printed more than 64 KiB: not the answer to the "
                              "query (the rest was read and dropped on the node)")
    return parse_nvidia_smi(smi.stdout, smi.exit_code, smi.stderr, expect_gpus=expect_gpus)


def parse_probe(stdout: str | bytes, *, expect_gpus: int = 0, ts: float = 0.0,
                latency_ms: float | None = None) -> NodeSample:
    """The probe's JSON -> NodeSample. Raises ProbeError (quoting the text), nothing else."""
    p = _decode(stdout, _Probe, "probe")
    reading = _gpu_check(p.smi, expect_gpus)
    cpu = p.cpu
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    ticks = (sum(cpu[:8]), cpu[3] + (cpu[4] if len(cpu) > 4 else 0)) if len(cpu) >= 4 else None
    disk = p.disk
    return NodeSample(
        ts=ts, latency_ms=latency_ms,
        gpus=reading if isinstance(reading, tuple) else (),
        gpu_error=reading.message if isinstance(reading, GpuQueryFailed) else None,
        nvidia_smi=p.smi.present, smi_s=p.smi.elapsed_s,
        load=tuple(p.loadavg[:3]), cpu_count=p.ncpu, cpu_ticks=ticks,
        mem_total_bytes=p.meminfo.get("MemTotal"),
        mem_available_bytes=p.meminfo.get("MemAvailable"),
        disk_path=disk.path if disk else "",
        disk_total_bytes=disk.total if disk else None,
        disk_used_bytes=disk.total - disk.free if disk else None,
        disk_avail_bytes=disk.avail if disk else None,
        ranks=tuple(p.pids), boot_id=p.boot_id, clock=p.clock, node_s=p.age_s,
        errors=tuple(p.errors),
    )


def cpu_percent(prev: NodeSample | None, cur: NodeSample) -> float | None:
    """CPU busy % between two samples of the same boot; None without a usable pair."""
    if prev is None or prev.cpu_ticks is None or cur.cpu_ticks is None \
            or prev.boot_id != cur.boot_id:
        return None
    total = cur.cpu_ticks[0] - prev.cpu_ticks[0]
    idle = cur.cpu_ticks[1] - prev.cpu_ticks[1]
    if total <= 0 or idle < 0 or idle > total:
        return None
    return 100.0 * (total - idle) / total


# ---- readiness (``ugroctl health NODE --deep``) ----------------------------


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str


MIN_PYTHON = (3, 9)


def parse_readiness(stdout: str | bytes, *, expect_gpus: int = 0,
                    min_free_bytes: int = 10 * 1024**3) -> tuple[Check, ...]:
    """The readiness script's JSON -> checks (python, torch, cuda, gpus, disk)."""
    r = _decode(stdout, _Readiness, "readiness check")
    checks: list[Check] = []
    version = ".".join(str(x) for x in r.python)
    checks.append(Check("python", tuple(r.python[:2]) >= MIN_PYTHON,
                        f"{version} at {r.executable}" if r.executable else version))
    torch = _torch_facts(r.torch)
    if isinstance(torch, str):
        checks.append(Check("torch", False, torch))
        checks.append(Check("cuda", not expect_gpus,
                            "not needed (no GPUs expected)" if not expect_gpus
                            else "unknown: torch did not import"))
    else:
        checks.append(Check("torch", True, f"torch {torch.version}"))
        if torch.cuda:
            names = ", ".join(torch.devices)
            checks.append(Check("cuda", True, f"CUDA {torch.cuda_version}: "
                                f"{len(torch.devices)} device(s): {names}"))
        else:
            checks.append(Check("cuda", not expect_gpus,
                                "torch.cuda.is_available() is False"
                                + ("" if expect_gpus else " (no GPUs expected)")))
    checks.append(_smi_list_check(r.smi, expect_gpus))
    if r.disk is None:
        checks.append(Check("disk", False, "; ".join(r.errors) or "not measured"))
    else:
        checks.append(Check("disk", r.disk.avail >= min_free_bytes,
                            f"{_gb(r.disk.avail)} free in {r.disk.path} "
                            f"(need {_gb(min_free_bytes)})"))
    return tuple(checks)


class _TorchFacts(msgspec.Struct, frozen=True):
    version: str
    cuda: bool
    cuda_version: str | None = None
    devices: list[str] = []


def _torch_facts(run: _Run) -> _TorchFacts | str:
    if run.timed_out:
        return "import torch did not finish in time"
    if run.exit_code != 0:
        tail = [ln for ln in run.stderr.splitlines() if ln.strip()]
        return tail[-1].strip() if tail else f"python exited with code {run.exit_code}"
    try:
        return msgspec.json.decode(_last_json_line(run.stdout), type=_TorchFacts)
    except (msgspec.DecodeError, ProbeError):
        return f"unexpected output: {_quote(run.stdout)}"


def _smi_list_check(run: _Run, expect_gpus: int) -> Check:
    if not run.present:
        return Check("gpus", not expect_gpus, "no nvidia-smi on the node"
                     + (f", expected {expect_gpus} GPU(s)" if expect_gpus else " (CPU node)"))
    if run.timed_out or run.exit_code != 0:
        said = run.stderr.strip() or run.stdout.strip()
        why = "did not answer in time" if run.timed_out else \
            f"exited with code {run.exit_code}: {_quote(said)}"
        ok = not expect_gpus and (run.exit_code == 6 and NO_DEVICES in said)
        return Check("gpus", ok, f"nvidia-smi -L {why}")
    names = [ln.split(":", 1)[1].split("(UUID")[0].strip()
             for ln in run.stdout.splitlines() if ln.startswith("GPU ") and ":" in ln]
    ok = len(names) >= expect_gpus
    detail = f"{len(names)} GPU(s)" + (f": {', '.join(names)}" if names else "")
    if expect_gpus and not ok:
        detail += f", expected {expect_gpus}"
    return Check("gpus", ok, detail)


def sample_summary(sample: NodeSample) -> dict[str, Any]:
    """The compact form stored with a health event (the sample that caused it)."""
    out: dict[str, Any] = {
        "gpus": [{"uuid": g.uuid, "index": g.index, "util": g.util_percent,
                  "mem_used": g.memory_used_bytes, "mem_total": g.memory_total_bytes,
                  "temp": g.temperature_c, "power": g.power_w,
                  **({"error": g.error} if g.error else {})} for g in sample.gpus],
        "mem_percent": _round(sample.mem_percent),
        "disk_percent": _round(sample.disk_percent),
        "latency_ms": _round(sample.latency_ms),
        "load1": sample.load[0] if sample.load else None,
        "ranks_alive": sum(r.alive for r in sample.ranks),
        "ranks": len(sample.ranks),
    }
    if sample.gpu_error:
        out["gpu_error"] = sample.gpu_error
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def to_json(sample: NodeSample) -> dict[str, Any]:
    """The whole sample as plain JSON values (API, ``ugroctl health --json``)."""
    data: dict[str, Any] = msgspec.to_builtins(sample)
    data["mem_percent"] = _round(sample.mem_percent)
    data["disk_percent"] = _round(sample.disk_percent)
    return data


__all__ = [
    "QUERY_FIELDS", "Check", "GpuQueryFailed", "GpuReading", "GpuSample", "NodeSample",
    "ProbeError", "RankProcess", "compare_inventory", "cpu_percent", "inventory",
    "nvidia_smi_argv", "parse_nvidia_smi", "parse_probe", "parse_readiness", "sample_summary",
    "to_json",
]
