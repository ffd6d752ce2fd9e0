"""GPU exporter pieces: the nvidia-smi parser, the NVML reader, the cache and its collector."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.gpu_exporter import (
    SMI_FIELDS,
    SMI_HEALTH_FIELDS,
    CollectError,
    Exporter,
    GpuStats,
    NvidiaSmiSource,
    NvmlSource,
    Reading,
    choose_source,
    parse_args,
    parse_nvidia_smi,
)

MIB = 1024 * 1024


def row(**cells: str) -> str:
    base = {
        "index": "0",
        "uuid": "GPU-aaaa",
        "name": "NVIDIA GeForce RTX 4070",
        "pci.bus_id": "00000000:01:00.0",
        "driver_version": "550.54.15",
        "utilization.gpu": "35",
        "utilization.memory": "12",
        "memory.used": "1234",
        "memory.free": "11048",
        "memory.reserved": "0",
        "temperature.gpu": "45",
        "power.draw": "110.52",
        "clocks.sm": "1980",
        "clocks.mem": "10501",
    }
    keys = {f.replace(".", "_"): f for f in SMI_FIELDS}
    base.update({keys[k]: v for k, v in cells.items()})
    assert list(base) == list(SMI_FIELDS)
    return ", ".join(base.values())


# ---- parse_nvidia_smi ---------------------------------------------------------


def test_parses_rows_sorted_by_index() -> None:
    text = row(index="1", uuid="GPU-b") + "\n" + row(index="0", uuid="GPU-a") + "\n"
    reading = parse_nvidia_smi(text)
    assert reading.driver_version == "550.54.15"
    assert [g.uuid for g in reading.gpus] == ["GPU-a", "GPU-b"]
    g = reading.gpus[0]
    assert (g.util_percent, g.mem_copy_util_percent, g.fb_used_mib, g.fb_free_mib) == (
        35,
        12,
        1234,
        11048,
    )
    assert (g.temperature_c, g.power_w, g.sm_clock_mhz, g.mem_clock_mhz) == (
        45,
        110.52,
        1980,
        10501,
    )
    assert g.labels() == ["0", "GPU-a", "00000000:01:00.0", "nvidia0", "NVIDIA GeForce RTX 4070"]
    assert g.error is None


def test_empty_output_is_no_gpus() -> None:
    assert parse_nvidia_smi("").gpus == ()
    assert parse_nvidia_smi("\n\r\n").gpus == ()


@pytest.mark.parametrize(
    "cell", ["[N/A]", "N/A", "[Not Supported]", "[Insufficient Permissions]", "[Something New]"]
)
def test_absent_values_are_none(cell: str) -> None:
    (g,) = parse_nvidia_smi(row(utilization_gpu=cell, power_draw=cell)).gpus
    assert g.util_percent is None and g.power_w is None
    assert g.temperature_c == 45
    assert g.error is None


@pytest.mark.parametrize("cell", ["[GPU requires reset]", "[Unknown Error]", "[GPU is lost]"])
def test_sick_gpu_values_are_none_with_the_error(cell: str) -> None:
    (g,) = parse_nvidia_smi(row(temperature_gpu=cell, memory_used=cell)).gpus
    assert g.temperature_c is None and g.fb_used_mib is None
    assert g.error == cell.strip("[]")


def test_absent_bus_id_and_name() -> None:
    (g,) = parse_nvidia_smi(row(pci_bus_id="[N/A]", name="[Unknown Error]")).gpus
    assert g.pci_bus_id == "" and g.name == ""
    assert g.error == "Unknown Error"


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("0, GPU-a, RTX", "expected 14 columns, got 3"),
        ("Segmentation fault", "'Segmentation fault'"),
        (row(memory_used="1234 MiB"), "memory.used '1234 MiB' is not a number"),
        (row(power_draw="nan"), "power.draw 'nan'"),
        (row(index="x"), "index 'x'"),
        (row(uuid="[N/A]"), "no usable uuid"),
        (row() + "\n" + row(index="1"), "GPU-aaaa listed twice"),
    ],
)
def test_bad_output_fails_the_whole_collection(text: str, quoted: str) -> None:
    with pytest.raises(CollectError) as info:
        parse_nvidia_smi(text)
    assert info.value.reason == "parse"
    assert quoted in str(info.value)


def test_nvidia_smi_argv_is_a_list_with_the_fixed_query() -> None:
    argv = NvidiaSmiSource(binary="/opt/nv/nvidia-smi").argv()
    assert argv == [
        "/opt/nv/nvidia-smi",
        "--query-gpu=" + ",".join((*SMI_FIELDS, *SMI_HEALTH_FIELDS)),
        "--format=csv,noheader,nounits",
    ]


# ---- NVML, against a stand-in for the pynvml module ----------------------------


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {3: "Not Supported", 15: "GPU is lost", 16: "GPU requires restart"}.get(
            self.value, f"error {self.value}"
        )


def fake_pynvml(gpus: list[dict[str, Any]], *, init_error: int | None = None) -> Any:
    """A stand-in with pynvml's names; a value that is an int error code raises it."""

    def field(name: str) -> Any:
        def get(handle: int, *args: Any) -> Any:
            v = gpus[handle][name]
            if isinstance(v, NVMLError):
                raise v
            return v(*args) if callable(v) else v

        return get

    def init() -> None:
        if init_error is not None:
            raise NVMLError(init_error)

    m = types.SimpleNamespace(
        NVMLError=NVMLError,
        NVML_ERROR_NOT_SUPPORTED=3,
        NVML_ERROR_GPU_IS_LOST=15,
        NVML_ERROR_RESET_REQUIRED=16,
        NVML_ERROR_UNKNOWN=999,
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        NVML_CLOCK_MEM=2,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=field("uuid"),
        nvmlDeviceGetName=field("name"),
        nvmlDeviceGetPciInfo=field("pci"),
        nvmlDeviceGetMinorNumber=field("minor"),
        nvmlDeviceGetUtilizationRates=field("util"),
        nvmlDeviceGetMemoryInfo=field("mem"),
        nvmlDeviceGetTemperature=field("temp"),
        nvmlDeviceGetPowerUsage=field("power_mw"),
        nvmlDeviceGetClockInfo=field("clock"),
    )
    return m


def nvml_gpu(**over: Any) -> dict[str, Any]:
    gpu: dict[str, Any] = {
        "uuid": "GPU-nv0",
        "name": b"NVIDIA H100 80GB HBM3",
        "pci": types.SimpleNamespace(busId=b"00000000:1B:00.0"),
        "minor": 3,
        "util": types.SimpleNamespace(gpu=97, memory=40),
        "mem": types.SimpleNamespace(used=2048 * MIB + 5, free=79511 * MIB, total=81559 * MIB),
        "temp": 61,
        "power_mw": 312_456,
        "clock": lambda kind: {1: 1980, 2: 2619}[kind],
    }
    gpu.update(over)
    return gpu


def test_nvml_reads_values_in_dcgm_units() -> None:
    source = NvmlSource(fake_pynvml([nvml_gpu()]))
    reading = source.read()
    assert reading.driver_version == "550.54.15"
    (g,) = reading.gpus
    assert g == GpuStats(
        index=0,
        uuid="GPU-nv0",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:1B:00.0",
        minor=3,
        util_percent=97,
        mem_copy_util_percent=40,
        fb_used_mib=2048,
        fb_free_mib=79511,
        temperature_c=61,
        power_w=312.456,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
    )
    assert g.labels()[3] == "nvidia3", "device uses the minor number, as DCGM"


def test_nvml_not_supported_leaves_values_out_and_sick_gpu_is_flagged() -> None:
    nv = fake_pynvml(
        [
            nvml_gpu(util=NVMLError(3), power_mw=NVMLError(3)),
            nvml_gpu(uuid="GPU-nv1", temp=NVMLError(16), mem=NVMLError(16)),
        ]
    )
    a, b = NvmlSource(nv).read().gpus
    assert a.util_percent is None and a.power_w is None and a.error is None
    assert a.temperature_c == 61
    assert b.temperature_c is None and b.fb_used_mib is None
    assert b.error == "GPU requires restart"


def test_nvml_unreadable_gpu_fails_the_collection() -> None:
    nv = fake_pynvml([nvml_gpu(uuid=NVMLError(15))])
    with pytest.raises(CollectError) as info:
        NvmlSource(nv).read()
    assert info.value.reason == "nvml" and "GPU is lost" in str(info.value)


def test_nvml_is_chosen_when_it_initialises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([nvml_gpu()]))
    assert isinstance(choose_source("auto", "nvidia-smi", 5), NvmlSource)


def test_nvidia_smi_is_the_fallback_when_nvml_init_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error=12))
    source = choose_source("auto", "/x/nvidia-smi", 5)
    assert isinstance(source, NvidiaSmiSource) and source.binary == "/x/nvidia-smi"
    with pytest.raises(SystemExit, match="NVML cannot be initialised"):
        choose_source("nvml", "nvidia-smi", 5)


def test_nvidia_smi_backend_never_tries_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([nvml_gpu()]))
    assert isinstance(choose_source("nvidia-smi", "nvidia-smi", 5), NvidiaSmiSource)


# ---- the cache and collector -------------------------------------------------


class ScriptedSource:
    """A Source that answers from a list: a Reading, or a CollectError to raise."""

    name = "scripted"

    def __init__(self, *answers: Reading | CollectError | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def read(self) -> Reading:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def scrape(exporter: Exporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(exporter.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def only(series: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    (value,) = [v for (n, _), v in series.items() if n == name]
    return value


GPU = GpuStats(index=0, uuid="GPU-a", name="RTX", util_percent=50.0, temperature_c=60.0)


def test_scrape_before_any_collection_has_no_gpu_series() -> None:
    source = ScriptedSource()
    exporter = Exporter(source, interval_s=5, timeout_s=5)
    s = scrape(exporter)
    assert source.calls == 0, "collect() never reads GPUs"
    assert only(s, "ugro_gpu_exporter_collect_success") == 0
    assert only(s, "ugro_gpu_exporter_up") == 0
    assert only(s, "ugro_gpu_exporter_collections_total") == 0
    assert not any(n.startswith("DCGM_") for n, _ in s)


def test_success_then_failure_then_success() -> None:
    source = ScriptedSource(
        Reading((GPU,), "550"),
        CollectError("timeout", "nvidia-smi: no answer"),
        RuntimeError("library surprise"),
        Reading((GPU,), "550"),
    )
    exporter = Exporter(source, interval_s=5, timeout_s=5)

    exporter.collect_once()
    s = scrape(exporter)
    assert only(s, "DCGM_FI_DEV_GPU_UTIL") == 50
    assert only(s, "ugro_gpu_exporter_up") == 1
    first_ok = only(s, "ugro_gpu_exporter_last_success_timestamp_seconds")

    exporter.collect_once()
    exporter.collect_once()
    s = scrape(exporter)
    assert not any(n.startswith("DCGM_") for n, _ in s)
    assert only(s, "ugro_gpu_exporter_collect_success") == 0
    assert s[("ugro_gpu_exporter_collect_failures_total", (("reason", "timeout"),))] == 1
    assert s[("ugro_gpu_exporter_collect_failures_total", (("reason", "parse"),))] == 1
    assert only(s, "ugro_gpu_exporter_last_success_timestamp_seconds") == first_ok
    assert exporter.snapshot().last_error == "RuntimeError: library surprise"
    assert only(s, "ugro_gpu_exporter_collections_total") == 3

    exporter.collect_once()
    s = scrape(exporter)
    assert only(s, "DCGM_FI_DEV_GPU_TEMP") == 60
    assert only(s, "ugro_gpu_exporter_info") == 1
    assert exporter.snapshot().last_error is None


def test_up_turns_zero_when_the_latest_collection_is_old() -> None:
    exporter = Exporter(ScriptedSource(Reading((GPU,))), interval_s=0.01, timeout_s=0.01)
    exporter.collect_once()
    assert only(scrape(exporter), "ugro_gpu_exporter_up") == 1
    time.sleep(0.1)  # fresh for max(3 x interval, interval + timeout) = 0.03 s
    s = scrape(exporter)
    assert only(s, "ugro_gpu_exporter_up") == 0
    assert only(s, "ugro_gpu_exporter_collect_success") == 1
    # A hung collection serves no stale GPU values (they used to stay, at success 1).
    assert not [n for n in s if n[0].startswith("DCGM_")], s


def test_background_thread_collects_on_its_interval_and_stops() -> None:
    source = ScriptedSource(*[Reading((GPU,)) for _ in range(1000)])
    exporter = Exporter(source, interval_s=0.02, timeout_s=1)
    exporter.start()
    time.sleep(0.3)
    exporter.stop()
    calls = source.calls
    assert 2 <= calls <= 20, calls  # about 15; never a busy loop
    time.sleep(0.1)
    assert source.calls == calls, "stopped"


def test_the_stand_in_uses_real_pynvml_names() -> None:
    import pynvml
    stand_in = fake_pynvml([])
    missing = [name for name in vars(stand_in) if not hasattr(pynvml, name)]
    assert missing == []


@pytest.mark.parametrize(
    ("listen", "address", "port"),
    [("127.0.0.1:9500", "127.0.0.1", 9500), (":9401", "0.0.0.0", 9401), ("[::]:9400", "::", 9400)],
)
def test_listen_host_port(listen: str, address: str, port: int) -> None:
    args = parse_args(["--listen", listen])
    assert (args.address, args.port) == (address, port)


@pytest.mark.parametrize("listen", ["9400", "host:", "host:http"])
def test_listen_rejects_what_is_not_host_port(listen: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--listen", listen])


# ---- GPU health fields (ECC, row remapping, throttle reasons, XID, energy) -----------


def test_health_fields_from_nvidia_smi() -> None:
    fields = (*SMI_FIELDS, *SMI_HEALTH_FIELDS)
    text = row() + ", 2, Yes, 0x0000000000000048\n"
    (g,) = parse_nvidia_smi(text, fields).gpus
    assert (g.ecc_dbe_volatile, g.row_remap_failure, g.throttle_reasons) == (2, 1, 0x48)
    (g,) = parse_nvidia_smi(row() + ", [N/A], [N/A], 0x0000000000000000\n", fields).gpus
    assert (g.ecc_dbe_volatile, g.row_remap_failure, g.throttle_reasons) == (None, None, 0)
    exporter = Exporter(ScriptedSource(Reading((g,))), interval_s=5, timeout_s=5)
    exporter.collect_once()
    s = scrape(exporter)
    assert only(s, "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS") == 0
    assert not [n for n, _ in s if n == "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"]


def test_nvml_health_fields_and_xid_events() -> None:
    nv = fake_pynvml([nvml_gpu()])
    pending = [types.SimpleNamespace(device=0, eventData=79)]

    def wait(event_set: Any, timeout_ms: int) -> Any:
        if not pending:
            raise NVMLError(10)  # NVML_ERROR_TIMEOUT
        return pending.pop(0)

    nv.nvmlEventSetCreate = lambda: "set"
    nv.nvmlDeviceRegisterEvents = lambda handle, kinds, event_set: None
    nv.nvmlEventSetWait_v2 = wait
    nv.nvmlEventTypeXidCriticalError = 8
    nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nv.NVML_VOLATILE_ECC = 0
    nv.nvmlDeviceGetTotalEnergyConsumption = lambda handle: 123_456_789
    nv.nvmlDeviceGetTotalEccErrors = lambda handle, kind, counter: 0
    nv.nvmlDeviceGetRemappedRows = lambda handle: (0, 0, 0, 0)
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: 4
    source = NvmlSource(nv)
    (g,) = source.read().gpus
    assert (g.energy_mj, g.ecc_dbe_volatile, g.row_remap_failure, g.throttle_reasons,
            g.xid) == (123_456_789, 0, 0, 4, 79)
    (g,) = source.read().gpus  # no new event: the last XID stays, as DCGM's field does
    assert g.xid == 79
    import pynvml
    for name in ("nvmlEventSetCreate", "nvmlDeviceRegisterEvents", "nvmlEventSetWait_v2",
                 "nvmlEventTypeXidCriticalError", "nvmlDeviceGetTotalEnergyConsumption",
                 "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRemappedRows",
                 "nvmlDeviceGetCurrentClocksThrottleReasons",
                 "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC"):
        assert hasattr(pynvml, name), name


def test_old_driver_without_the_health_fields_keeps_the_rest(tmp_path: Any) -> None:
    """nvidia-smi that refuses a field name: asked again without the health fields."""
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in *remapped_rows*) echo \'Field "remapped_rows.failure" is not a valid '
        "field to query.'; exit 2;; esac\n"
        f"echo '{row()}'\n")
    script.chmod(0o755)
    source = NvidiaSmiSource(binary=str(script), timeout_s=10)
    (g,) = source.read().gpus
    assert g.temperature_c == 45 and g.ecc_dbe_volatile is None
    assert source.fields == SMI_FIELDS
