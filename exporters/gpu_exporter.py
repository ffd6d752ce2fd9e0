"""Per-node GPU exporter for Prometheus, with DCGM-exporter's metric names and labels.

Run on every worker: ``python -m exporters.gpu_exporter --port 9400 --interval 5``
(or ``--listen 0.0.0.0:9400``; ``--once`` prints one exposition and exits, status 1
when the collection failed). Needs only prometheus-client; it
imports nothing from ugrod, so a worker needs no ugrod install. NVML
(``nvidia-ml-py``, ``import pynvml``) is used when importable and ``nvmlInit()``
works, else ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` with a
timeout (its parser is inline here, following docs OBSERVABILITY.md: exact
column count, ``[N/A]``-style cells are "no value", ``[GPU requires reset]``
and ``[Unknown Error]`` mark a sick GPU).

A background thread collects every ``--interval`` seconds into an immutable
snapshot; the custom Collector only formats the latest snapshot at scrape time
(no command or NVML call inside ``collect()``).

Series (gauges; DCGM's names carry no ``_total``), labels ``gpu``, ``UUID``,
``pci_bus_id``, ``device`` (``nvidia<N>``), ``modelName``, one series per GPU
and only where the GPU reported a value: ``DCGM_FI_DEV_GPU_UTIL`` (%),
``DCGM_FI_DEV_MEM_COPY_UTIL`` (%), ``DCGM_FI_DEV_FB_USED`` / ``_FB_FREE`` /
``_FB_RESERVED`` (MiB, as DCGM), ``DCGM_FI_DEV_GPU_TEMP`` (C),
``DCGM_FI_DEV_POWER_USAGE`` (W), ``DCGM_FI_DEV_SM_CLOCK`` /
``DCGM_FI_DEV_MEM_CLOCK`` (MHz); plus ``ugro_gpu_exporter_gpu_error`` (1 per
GPU that reports an error such as "GPU requires reset").

Collection health: ``ugro_gpu_exporter_collect_success`` (0/1, the latest
collection), ``..._last_success_timestamp_seconds``, ``..._collect_duration_seconds``
(latest), ``..._collections_total``, ``..._collect_failures_total{reason}``,
``..._gpus`` (GPUs in the latest successful collection), ``..._up`` (1 while
the latest collection succeeded and is fresh, i.e. finished less than
``max(3 x interval, interval + timeout)`` ago: a hung NVML call turns it to 0),
``..._info{backend, driver_version}``. After a failed collection, and while a
collection hangs past that freshness limit, the GPU series disappear (never
stale values; alert on ``..._up``).

Health fields (where the driver or GPU supports them, DCGM's names):
``DCGM_FI_DEV_ECC_DBE_VOL_TOTAL``, ``DCGM_FI_DEV_ROW_REMAP_FAILURE`` (0/1),
``DCGM_FI_DEV_CLOCK_THROTTLE_REASONS`` (bitmask) from either backend;
``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ) and ``DCGM_FI_DEV_XID_ERRORS``
(the last XID, from NVML's critical-XID events) with NVML only. "No devices were found" is a success
with zero GPUs (a CPU-only node).

``promtool check metrics`` parses the output and lints only the ``UUID`` and
``modelName`` label names (not snake_case): they are DCGM-exporter's, kept so
dashboards work with either exporter.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("ugro.gpu_exporter")

MIB = 1024 * 1024
LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName")
FAILURE_REASONS = ("timeout", "exit_code", "parse", "not_found", "nvml")

# nvidia-smi query: (field, attribute). Every field here is valid on drivers
# from the last several years and answered by tests/fake_nvidia_smi.
SMI_FIELDS = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "driver_version",
    "utilization.gpu",
    "utilization.memory",
    "memory.used",
    "memory.free",
    "memory.reserved",
    "temperature.gpu",
    "power.draw",
    "clocks.sm",
    "clocks.mem",
)
# Asked for as well where the driver knows them (an older one answers "is not a
# valid field": the exporter then drops them for good and keeps the rest).
SMI_HEALTH_FIELDS = (
    "ecc.errors.uncorrected.volatile.total",
    "remapped_rows.failure",
    "clocks_throttle_reasons.active",
)
_NUMERIC = {
    "utilization.gpu": "util_percent",
    "utilization.memory": "mem_copy_util_percent",
    "memory.used": "fb_used_mib",
    "memory.free": "fb_free_mib",
    "memory.reserved": "fb_reserved_mib",
    "temperature.gpu": "temperature_c",
    "power.draw": "power_w",
    "clocks.sm": "sm_clock_mhz",
    "clocks.mem": "mem_clock_mhz",
    "ecc.errors.uncorrected.volatile.total": "ecc_dbe_volatile",
    "remapped_rows.failure": "row_remap_failure",
    "clocks_throttle_reasons.active": "throttle_reasons",
}
ABSENT = frozenset(
    {
        "",
        "N/A",
        "[N/A]",
        "[Not Supported]",
        "[Insufficient Permissions]",
        "[Requested functionality has been deprecated]",
    }
)
GPU_ERRORS = frozenset({"[Unknown Error]", "[GPU requires reset]", "[GPU is lost]"})
NO_DEVICES = "No devices were found"

# (metric, attribute, help) in DCGM-exporter's words and units
GPU_GAUGES = (
    ("DCGM_FI_DEV_GPU_UTIL", "util_percent", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "mem_copy_util_percent", "Memory utilization (in %)."),
    ("DCGM_FI_DEV_FB_USED", "fb_used_mib", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_FB_FREE", "fb_free_mib", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_RESERVED", "fb_reserved_mib", "Framebuffer memory reserved (in MiB)."),
    ("DCGM_FI_DEV_GPU_TEMP", "temperature_c", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "power_w", "Power draw (in W)."),
    ("DCGM_FI_DEV_SM_CLOCK", "sm_clock_mhz", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "mem_clock_mhz", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "ecc_dbe_volatile",
     "Total number of double-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "row_remap_failure",
     "Whether remapping of rows has failed (1) or not (0)."),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "throttle_reasons",
     "Current clock throttle reasons (bitmask of NVML's clocks_throttle_reasons)."),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "energy_mj",
     "Total energy consumption since boot (in mJ)."),
    ("DCGM_FI_DEV_XID_ERRORS", "xid",
     "Value of the last XID error encountered (NVML events; 0: none since start)."),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuStats:
    """One GPU at one moment; None where the GPU gave no value."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str = ""
    minor: int | None = None
    util_percent: float | None = None
    mem_copy_util_percent: float | None = None
    fb_used_mib: float | None = None
    fb_free_mib: float | None = None
    fb_reserved_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    ecc_dbe_volatile: float | None = None
    row_remap_failure: float | None = None
    throttle_reasons: float | None = None
    energy_mj: float | None = None
    xid: float | None = None
    error: str | None = None

    def labels(self) -> list[str]:
        minor = self.index if self.minor is None else self.minor
        return [str(self.index), self.uuid, self.pci_bus_id, f"nvidia{minor}", self.name]


@dataclass(frozen=True, slots=True)
class Reading:
    gpus: tuple[GpuStats, ...]
    driver_version: str = ""


class CollectError(Exception):
    """A collection failed; ``reason`` is one of FAILURE_REASONS (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Source(Protocol):
    """Reads all GPUs of this node; raises CollectError."""

    name: str

    def read(self) -> Reading: ...


# ---- nvidia-smi ------------------------------------------------------------


def _quote(line: str, limit: int = 200) -> str:
    line = line.strip()
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _cell_number(cell: str) -> float:
    """A numeric cell: decimal, hex (``0x...``: throttle reasons) or Yes/No."""
    if cell in ("Yes", "No"):
        return 1.0 if cell == "Yes" else 0.0
    if cell[:2].lower() == "0x":
        return float(int(cell, 16))
    return float(cell)


def parse_nvidia_smi(stdout: str, fields: Sequence[str] = SMI_FIELDS) -> Reading:
    """Rows of ``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits``."""
    gpus: list[GpuStats] = []
    driver = ""
    seen: set[str] = set()
    for line in stdout.replace("\r", "").split("\n"):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(", ")]
        if len(cells) != len(fields):
            raise CollectError(
                "parse",
                f"nvidia-smi: expected {len(fields)} columns, got {len(cells)} "
                f"in line {_quote(line)}",
            )
        row = dict(zip(fields, cells, strict=True))
        try:
            index = int(row["index"])
        except ValueError:
            raise CollectError(
                "parse", f"nvidia-smi: index {row['index']!r} in line {_quote(line)}"
            ) from None
        uuid = row["uuid"]
        if uuid in ABSENT or uuid in GPU_ERRORS or " " in uuid:
            raise CollectError("parse", f"nvidia-smi: no usable uuid in line {_quote(line)}")
        if uuid in seen:
            raise CollectError("parse", f"nvidia-smi: uuid {uuid} listed twice")
        seen.add(uuid)
        values: dict[str, Any] = {}
        error: str | None = None
        for name, attr in _NUMERIC.items():
            cell = row.get(name)
            if cell is None:
                continue
            if cell in GPU_ERRORS:
                error = error or cell.strip("[]")
            elif cell in ABSENT or (cell.startswith("[") and cell.endswith("]")):
                pass  # an unknown bracketed word is nvidia-smi saying "no value"
            else:
                try:
                    number = _cell_number(cell)
                except ValueError:
                    raise CollectError(
                        "parse",
                        f"nvidia-smi: {name} {cell!r} is not a number in line {_quote(line)}",
                    ) from None
                if not math.isfinite(number):
                    raise CollectError(
                        "parse", f"nvidia-smi: {name} {cell!r} in line {_quote(line)}"
                    )
                values[attr] = number
        name_cell = row["name"]
        if name_cell in GPU_ERRORS:
            error = error or name_cell.strip("[]")
        bus = row["pci.bus_id"]
        if not driver and row["driver_version"] not in ABSENT:
            driver = row["driver_version"]
        gpus.append(
            GpuStats(
                index=index,
                uuid=uuid,
                name="" if name_cell in ABSENT or name_cell in GPU_ERRORS else name_cell,
                pci_bus_id="" if bus in ABSENT or bus.startswith("[") else bus,
                error=error,
                **values,
            )
        )
    return Reading(tuple(sorted(gpus, key=lambda g: g.index)), driver)


class NvidiaSmiSource:
    """Runs nvidia-smi with a timeout; never through a shell."""

    name = "nvidia-smi"

    def __init__(self, binary: str = "nvidia-smi", timeout_s: float = 10.0) -> None:
        self.binary = binary
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._aborted = False
        self.fields: tuple[str, ...] = SMI_FIELDS + SMI_HEALTH_FIELDS

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--query-gpu=" + ",".join(self.fields),
            "--format=csv,noheader,nounits",
        ]

    def abort(self) -> None:
        """Kill the nvidia-smi in flight, if any, and refuse to start another."""
        with self._lock:
            self._aborted = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()

    def read(self) -> Reading:
        try:
            with self._lock:
                if self._aborted:
                    raise CollectError("timeout", f"{self.binary}: stopping")
                proc = self._proc = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    errors="replace",
                )
        except FileNotFoundError:
            raise CollectError("not_found", f"{self.binary}: not found") from None
        except PermissionError as exc:
            raise CollectError("not_found", f"{self.binary}: {exc}") from None
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise CollectError(
                "timeout", f"{self.binary}: no answer within {self.timeout_s:g} s (killed)"
            ) from None
        finally:
            with self._lock:
                self._proc = None
        if self._aborted:
            raise CollectError("timeout", f"{self.binary}: stopped while it ran")
        said = (stderr.strip() or stdout.strip())[:300]
        if proc.returncode != 0:
            if proc.returncode == 6 and NO_DEVICES in said:
                return Reading(())
            if "is not a valid field" in said and self.fields != SMI_FIELDS:
                log.info("%s: %s; asking without the health fields", self.binary, said)
                self.fields = SMI_FIELDS
                return self.read()
            raise CollectError(
                "exit_code",
                f"{self.binary} exited with code {proc.returncode}: {said or '(no output)'}",
            )
        return parse_nvidia_smi(stdout, self.fields)


# ---- NVML ------------------------------------------------------------------


class NvmlSource:
    """Reads GPUs through NVML (nvidia-ml-py). Construct with ``open()``."""

    name = "nvml"

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._events: Any = None  # NVML event set for XID errors, where supported
        self._xid: dict[str, int] = {}  # uuid -> last XID seen
        self._watching: set[str] = set()

    @classmethod
    def open(cls) -> NvmlSource | None:
        """An initialised NVML source, or None when pynvml is missing or nvmlInit fails."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError, or OSError from ctypes
            log.info("NVML unavailable (%s); using nvidia-smi", exc)
            return None
        return cls(pynvml)

    def _watch_xids(self, handle: Any, uuid: str) -> None:
        """Register the GPU for XID events once (not supported on every GPU: then none)."""
        nv = self._nvml
        if uuid in self._watching:
            return
        self._watching.add(uuid)
        try:
            if self._events is None:
                self._events = nv.nvmlEventSetCreate()
            nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, self._events)
            self._xid.setdefault(uuid, 0)
        except (nv.NVMLError, AttributeError) as exc:
            log.info("NVML: no XID events for %s (%s)", uuid, exc)

    def _drain_xids(self) -> None:
        nv = self._nvml
        if self._events is None:
            return
        for _ in range(1000):  # bounded: a storm of events cannot stall a collection
            try:
                data = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:  # NVML_ERROR_TIMEOUT: nothing pending
                return
            try:
                uuid = _text(nv.nvmlDeviceGetUUID(data.device))
            except nv.NVMLError:
                continue
            self._xid[uuid] = int(data.eventData)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # shutting down: nothing more to do about it
            log.debug("nvmlShutdown: %s", exc)

    def read(self) -> Reading:
        nv = self._nvml
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            raise CollectError("nvml", f"NVML: {exc}") from None
        gpus: list[GpuStats] = []
        for i in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(nv.nvmlDeviceGetUUID(handle))
            except nv.NVMLError as exc:
                raise CollectError("nvml", f"NVML: GPU {i}: {exc}") from None
            self._watch_xids(handle, uuid)
            gpus.append(self._gpu(i, handle, uuid))
        self._drain_xids()
        gpus = [dataclasses.replace(g, xid=float(self._xid[g.uuid])) if g.uuid in self._xid
                else g for g in gpus]
        return Reading(tuple(gpus), driver)

    def _gpu(self, index: int, handle: Any, uuid: str) -> GpuStats:
        nv = self._nvml
        errors: list[str] = []
        sick = {
            getattr(nv, "NVML_ERROR_GPU_IS_LOST", 15),
            getattr(nv, "NVML_ERROR_RESET_REQUIRED", 16),
            getattr(nv, "NVML_ERROR_UNKNOWN", 999),
        }

        def get(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) in sick and not errors:
                    errors.append(str(exc))
                return None
            except AttributeError:  # an older nvidia-ml-py without this call
                return None

        name = get(lambda: _text(nv.nvmlDeviceGetName(handle))) or ""
        pci = get(lambda: nv.nvmlDeviceGetPciInfo(handle))
        minor = get(lambda: nv.nvmlDeviceGetMinorNumber(handle))
        util = get(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
        mem = get(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        temp = get(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        power_mw = get(lambda: nv.nvmlDeviceGetPowerUsage(handle))
        sm = get(lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM))
        memclk = get(lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_MEM))
        # Health fields: absent (None) where the GPU or driver does not support them.
        energy = get(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle))
        dbe = get(lambda: nv.nvmlDeviceGetTotalEccErrors(
            handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC))
        remap = get(lambda: nv.nvmlDeviceGetRemappedRows(handle))
        throttle = get(lambda: nv.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        return GpuStats(
            index=index,
            uuid=uuid,
            name=name,
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            minor=minor if isinstance(minor, int) else None,
            util_percent=_num(util.gpu) if util is not None else None,
            mem_copy_util_percent=_num(util.memory) if util is not None else None,
            fb_used_mib=_num(mem.used // MIB) if mem is not None else None,
            fb_free_mib=_num(mem.free // MIB) if mem is not None else None,
            temperature_c=_num(temp),
            power_w=_num(power_mw / 1000.0) if power_mw is not None else None,
            sm_clock_mhz=_num(sm),
            mem_clock_mhz=_num(memclk),
            energy_mj=_num(energy),
            ecc_dbe_volatile=_num(dbe),
            row_remap_failure=_num(remap[3]) if isinstance(remap, tuple | list)
            and len(remap) >= 4 else None,
            throttle_reasons=_num(throttle),
            error=errors[0] if errors else None,
        )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ---- the cache and its collector -----------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the latest collections found; replaced whole, never mutated."""

    backend: str
    reading: Reading | None = None  # None: the latest collection failed (or none yet)
    driver_version: str = ""
    last_success_ts: float | None = None
    finished_mono: float | None = None
    duration_s: float | None = None
    collections: int = 0
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    last_error: str | None = None


class GpuCollector:
    """Formats the latest Snapshot at scrape time. Never touches a GPU itself."""

    def __init__(self, get: Callable[[], Snapshot], fresh_s: float) -> None:
        self._get = get
        self._fresh_s = fresh_s

    def describe(self) -> list[Metric]:
        return []  # metric names vary with the GPUs: no registration-time check

    def collect(self) -> Iterator[Metric]:
        snap = self._get()
        ok = snap.reading is not None
        fresh = (
            ok
            and snap.finished_mono is not None
            and time.monotonic() - snap.finished_mono <= self._fresh_s
        )
        # A hung collection (NVML or nvidia-smi stuck) must not keep old values alive:
        # the GPU series go with freshness, and Prometheus falls back to ugrod's samples.
        gpus = snap.reading.gpus if fresh and snap.reading is not None else ()
        for metric, attr, help_text in GPU_GAUGES:
            family = GaugeMetricFamily(metric, help_text, labels=LABELS)
            for gpu in gpus:
                value = getattr(gpu, attr)
                if value is not None:
                    family.add_metric(gpu.labels(), value)
            if family.samples:
                yield family
        errors = GaugeMetricFamily(
            "ugro_gpu_exporter_gpu_error",
            "1 for a GPU that reports an error (e.g. GPU requires reset).",
            labels=(*LABELS, "error"),
        )
        for gpu in gpus:
            if gpu.error:
                errors.add_metric([*gpu.labels(), gpu.error], 1)
        if errors.samples:
            yield errors

        yield _gauge(
            "ugro_gpu_exporter_collect_success",
            "1 if the latest GPU collection succeeded, else 0.",
            1 if ok else 0,
        )
        if snap.last_success_ts is not None:
            yield _gauge(
                "ugro_gpu_exporter_last_success_timestamp_seconds",
                "Unix time the latest successful GPU collection finished.",
                snap.last_success_ts,
            )
        if snap.duration_s is not None:
            yield _gauge(
                "ugro_gpu_exporter_collect_duration_seconds",
                "Duration of the latest GPU collection.",
                snap.duration_s,
            )
        collections = CounterMetricFamily(
            "ugro_gpu_exporter_collections", "GPU collections attempted."
        )
        collections.add_metric([], snap.collections)
        yield collections
        failures = CounterMetricFamily(
            "ugro_gpu_exporter_collect_failures",
            "GPU collections that failed, by reason.",
            labels=["reason"],
        )
        for reason in FAILURE_REASONS:
            failures.add_metric([reason], snap.failures.get(reason, 0))
        yield failures
        if fresh:
            yield _gauge(
                "ugro_gpu_exporter_gpus",
                "GPUs seen by the latest successful collection.",
                len(gpus),
            )
        yield _gauge(
            "ugro_gpu_exporter_up",
            "1 while the latest GPU collection succeeded and is recent, else 0.",
            1 if fresh else 0,
        )
        info = GaugeMetricFamily(
            "ugro_gpu_exporter_info",
            "The exporter's GPU backend and the driver version.",
            labels=["backend", "driver_version"],
        )
        info.add_metric([snap.backend, snap.driver_version], 1)
        yield info


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


class Exporter:
    """Collects in a background thread on an interval; serves the snapshot."""

    def __init__(self, source: Source, interval_s: float, timeout_s: float) -> None:
        self.source = source
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._snapshot = Snapshot(backend=source.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        fresh_s = max(3 * interval_s, interval_s + timeout_s)
        self.registry.register(GpuCollector(self.snapshot, fresh_s))

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def collect_once(self) -> Snapshot:
        """Read the GPUs once and swap in the new snapshot."""
        start = time.perf_counter()
        reading: Reading | None = None
        error: CollectError | None = None
        try:
            reading = self.source.read()
        except CollectError as exc:
            error = exc
        except Exception as exc:  # a bug or a library surprise must not kill the thread
            error = CollectError("parse", f"{type(exc).__name__}: {exc}")
            log.exception("GPU collection crashed")
        duration = time.perf_counter() - start
        with self._lock:
            old = self._snapshot
            failures = dict(old.failures)
            if error is not None:
                failures[error.reason] = failures.get(error.reason, 0) + 1
            new = dataclasses.replace(
                old,
                reading=reading,
                driver_version=reading.driver_version
                if reading is not None and reading.driver_version
                else old.driver_version,
                last_success_ts=time.time() if reading is not None else old.last_success_ts,
                finished_mono=time.monotonic(),
                duration_s=duration,
                collections=old.collections + 1,
                failures=failures,
                last_error=str(error) if error is not None else None,
            )
            self._snapshot = new
        if new.last_error != old.last_error or (old.collections == 0 and error is None):
            if error is not None:
                log.warning("GPU collection failed: %s", error)
            else:
                log.info(
                    "GPU collection ok: %d GPU(s) via %s",
                    len(reading.gpus) if reading else 0,
                    self.source.name,
                )
        return new

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpu-collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop collecting; an nvidia-smi in flight is killed, not waited for."""
        self._stop.set()
        abort = getattr(self.source, "abort", None)
        if callable(abort):
            abort()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.collect_once()
            next_at = max(next_at + self.interval_s, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---- command line ------------------------------------------------------------


def choose_source(backend: str, binary: str, timeout_s: float) -> Source:
    if backend in ("auto", "nvml"):
        nvml = NvmlSource.open()
        if nvml is not None:
            return nvml
        if backend == "nvml":
            raise SystemExit("gpu_exporter: --backend nvml, but NVML cannot be initialised")
    return NvidiaSmiSource(binary=binary, timeout_s=timeout_s)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m exporters.gpu_exporter",
        description="Per-node GPU exporter for Prometheus (DCGM-exporter metric names).",
    )
    p.add_argument("--port", type=int, default=9400, help="default 9400, as dcgm-exporter")
    p.add_argument("--address", default="0.0.0.0", help="listen address (default all)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address and port in one (overrides both)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between collections")
    p.add_argument("--timeout", type=float, default=10.0, help="nvidia-smi deadline, seconds")
    p.add_argument("--backend", choices=("auto", "nvml", "nvidia-smi"), default="auto")
    p.add_argument("--nvidia-smi", dest="binary", default="nvidia-smi", help="binary to run")
    p.add_argument("--once", action="store_true", help="print one exposition and exit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            p.error(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9400")
        args.address, args.port = host.strip("[]") or "0.0.0.0", int(port)
    if args.interval <= 0 or args.timeout <= 0 or not 0 <= args.port <= 65535:
        p.error("--interval and --timeout must be > 0, --port in 0..65535")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s gpu_exporter %(levelname)s %(message)s"
    )
    source = choose_source(args.backend, args.binary, args.timeout)
    exporter = Exporter(source, args.interval, args.timeout)
    if args.once:
        snap = exporter.collect_once()
        sys.stdout.buffer.write(exporter.exposition())
        return 0 if snap.reading is not None else 1

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server, _ = start_http_server(args.port, addr=args.address, registry=exporter.registry)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.address, args.port, exc)
        return 1
    exporter.start()
    host, port = server.server_address[:2]
    log.info(
        "serving on http://%s:%d/metrics, backend %s, every %g s",
        host,
        port,
        source.name,
        args.interval,
    )
    stopping.wait()
    log.info("stopping")
    server.shutdown()
    exporter.stop()
    if isinstance(source, NvmlSource):
        source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
