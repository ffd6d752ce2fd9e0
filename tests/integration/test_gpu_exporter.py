"""The GPU exporter as a real process, scraped over HTTP, with the fake nvidia-smi on PATH."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
FAKE_DIR = REPO / "tests" / "fake_nvidia_smi"
SCENARIOS = FAKE_DIR / "scenarios"
PROMTOOL = shutil.which("promtool")
# the fake runs with `#!/usr/bin/env python3`: keep this interpreter findable
BASE_PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])

pytestmark = pytest.mark.timeout(60)

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class RunningExporter:
    """``python -m exporters.gpu_exporter`` on an ephemeral port; its state file drives the fake."""

    def __init__(self, tmp: Path, *args: str, path_dirs: tuple[Path, ...] = (FAKE_DIR,)) -> None:
        self.state = tmp / "state.json"
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(REPO),
            FAKE_NVIDIA_SMI_STATE=str(self.state),
            PATH=os.pathsep.join([*map(str, path_dirs), BASE_PATH]),
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporters.gpu_exporter",
                "--port",
                "0",
                "--address",
                "127.0.0.1",
                *args,
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(20) or self._port is None:
            self.stop()
            raise AssertionError("exporter did not start:\n" + "".join(self.log))
        self.url: str = f"http://127.0.0.1:{self._port}/metrics"

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"serving on http://[^:]+:(\d+)/metrics", line):
                self._port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    def set_scenario(self, scenario: dict[str, Any] | str) -> None:
        data = scenario if isinstance(scenario, dict) else load(scenario)
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.state)

    def scrape(self, accept: str | None = None) -> str:
        req = urllib.request.Request(self.url, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    def series(self) -> Series:
        return parse(self.scrape())

    def wait_for(
        self, predicate: Callable[[Series], bool], what: str, timeout_s: float = 15
    ) -> Series:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.series()
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last scrape:\n{got}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCENARIOS / f"{name}.json").read_text())
    return data


def parse(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(series: Series, name: str, **labels: str) -> float | None:
    key = (name, tuple(sorted(labels.items())))
    return series.get(key)


def names(series: Series) -> set[str]:
    return {name for name, _ in series}


def gpu_labels(gpu: dict[str, Any]) -> dict[str, str]:
    i = gpu["index"]
    return {
        "gpu": str(i),
        "UUID": gpu["uuid"],
        "pci_bus_id": f"00000000:{i + 1:02X}:00.0",  # the fake's default bus id
        "device": f"nvidia{i}",
        "modelName": gpu["name"],
    }


def ok(s: Series) -> bool:
    return value(s, "ugro_gpu_exporter_collect_success") == 1


def failed(s: Series) -> bool:
    """The latest collection failed (not just: none has finished yet)."""
    collections = value(s, "ugro_gpu_exporter_collections_total") or 0
    return collections >= 1 and value(s, "ugro_gpu_exporter_collect_success") == 0


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Callable[..., RunningExporter]]:
    started: list[RunningExporter] = []

    def start(
        scenario: str | dict[str, Any] = "two_gpus", *args: str, **kw: Any
    ) -> RunningExporter:
        state = tmp_path / "state.json"
        data = scenario if isinstance(scenario, dict) else load(scenario)
        state.write_text(json.dumps(data))
        e = RunningExporter(tmp_path, "--interval", "0.2", "--timeout", "2", *args, **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def test_two_gpus_values_and_labels_match_nvidia_smi(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("two_gpus")
    before = time.time()
    s = e.wait_for(ok, "a successful collection")
    for gpu in load("two_gpus")["gpus"]:
        labels = gpu_labels(gpu)
        assert value(s, "DCGM_FI_DEV_GPU_UTIL", **labels) == gpu["utilization.gpu"]
        assert value(s, "DCGM_FI_DEV_FB_USED", **labels) == gpu["memory.used"]
        assert value(s, "DCGM_FI_DEV_FB_FREE", **labels) == gpu["memory.total"] - gpu["memory.used"]
        assert value(s, "DCGM_FI_DEV_GPU_TEMP", **labels) == gpu["temperature.gpu"]
        assert value(s, "DCGM_FI_DEV_POWER_USAGE", **labels) == pytest.approx(gpu["power.draw"])
        assert value(s, "DCGM_FI_DEV_MEM_COPY_UTIL", **labels) == 0
        assert value(s, "DCGM_FI_DEV_SM_CLOCK", **labels) == 1980
        assert value(s, "DCGM_FI_DEV_MEM_CLOCK", **labels) == 10501
        assert value(s, "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", **labels) == 0
    dcgm = [k for k in s if k[0].startswith("DCGM_")]
    # ECC and row remapping are [N/A] on these consumer GPUs: no series for them
    assert len(dcgm) == 10 * 2, "one series per metric and GPU, no more"
    assert value(s, "ugro_gpu_exporter_gpus") == 2
    assert value(s, "ugro_gpu_exporter_up") == 1
    assert value(s, "ugro_gpu_exporter_collections_total") >= 1  # type: ignore[operator]
    assert value(s, "ugro_gpu_exporter_collect_failures_total", reason="exit_code") == 0
    assert value(s, "ugro_gpu_exporter_info", backend="nvidia-smi", driver_version="550.54.15") == 1
    last = value(s, "ugro_gpu_exporter_last_success_timestamp_seconds")
    assert last is not None and before - 5 <= last <= time.time()
    duration = value(s, "ugro_gpu_exporter_collect_duration_seconds")
    assert duration is not None and 0 < duration < 2
    assert "ugro_gpu_exporter_gpu_error" not in names(s)


def test_values_follow_the_gpus(exporter: Callable[..., RunningExporter]) -> None:
    e = exporter("two_gpus")
    e.wait_for(ok, "a successful collection")
    hot = load("two_gpus")
    hot["gpus"][1]["temperature.gpu"] = 91
    e.set_scenario(hot)
    labels = gpu_labels(hot["gpus"][1])
    e.wait_for(lambda s: value(s, "DCGM_FI_DEV_GPU_TEMP", **labels) == 91, "the new temperature")


def test_promtool_accepts_the_exposition(exporter: Callable[..., RunningExporter]) -> None:
    e = exporter("sick_gpu")
    e.wait_for(ok, "a successful collection")
    e.set_scenario("two_gpus")
    e.wait_for(lambda s: value(s, "ugro_gpu_exporter_gpus") == 2, "two GPUs")
    text = e.scrape()
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    # exit 1 would be a parse error; 3 is lint only. The only lint allowed is
    # DCGM-exporter's own label names (UUID, modelName), kept for compatibility.
    assert done.returncode in (0, 3), done.stdout + done.stderr
    problems = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    unexpected = [
        ln
        for ln in problems
        if not (ln.startswith("DCGM_FI_") and "label names should be written in 'snake_case'" in ln)
    ]
    assert unexpected == []


def test_openmetrics_scrape_has_no_created_series(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("two_gpus")
    e.wait_for(ok, "a successful collection")
    text = e.scrape(accept="application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert text.rstrip().endswith("# EOF"), "OpenMetrics was negotiated"
    assert "_created" not in text
    assert 'ugro_gpu_exporter_collect_failures_total{reason="timeout"} 0.0' in text


def test_failure_drops_gpu_series_and_recovers(exporter: Callable[..., RunningExporter]) -> None:
    e = exporter("two_gpus")
    good = e.wait_for(ok, "a successful collection")
    last_good = value(good, "ugro_gpu_exporter_last_success_timestamp_seconds")

    e.set_scenario("driver_failed")
    s = e.wait_for(failed, "the failure to show")
    assert not any(name.startswith("DCGM_") for name in names(s)), "no stale GPU series"
    assert "ugro_gpu_exporter_gpus" not in names(s)
    assert value(s, "ugro_gpu_exporter_up") == 0
    failures = value(s, "ugro_gpu_exporter_collect_failures_total", reason="exit_code")
    assert failures is not None and failures >= 1
    last = value(s, "ugro_gpu_exporter_last_success_timestamp_seconds")
    assert last is not None and last_good is not None and last >= last_good, "kept, not reset"
    time.sleep(0.5)
    s = e.series()
    assert value(s, "ugro_gpu_exporter_last_success_timestamp_seconds") == last, "no success since"
    assert any("couldn't communicate with the NVIDIA driver" in ln for ln in e.log), e.log

    e.set_scenario("two_gpus")
    s = e.wait_for(ok, "recovery")
    assert value(s, "ugro_gpu_exporter_gpus") == 2
    assert value(s, "ugro_gpu_exporter_up") == 1
    assert value(s, "DCGM_FI_DEV_GPU_UTIL", **gpu_labels(load("two_gpus")["gpus"][0])) == 98


def test_hung_nvidia_smi_times_out_while_scrapes_stay_fast(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("two_gpus", "--timeout", "3")
    e.wait_for(ok, "a successful collection")
    hang = load("two_gpus")
    hang["hang_s"] = 3600
    e.set_scenario(hang)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # the collection is stuck; scrapes are not
        start = time.monotonic()
        e.scrape()
        assert time.monotonic() - start < 1
        time.sleep(0.1)
    s = e.wait_for(
        lambda s: (
            (value(s, "ugro_gpu_exporter_collect_failures_total", reason="timeout") or 0) >= 1
        ),
        "a timeout failure",
    )
    assert failed(s)
    assert not any(name.startswith("DCGM_") for name in names(s))
    assert any("no answer within 3 s" in ln for ln in e.log), e.log

    # stopping while nvidia-smi hangs: the exporter kills it and exits at once
    e.wait_for(lambda s: bool(fakes_of(e)), "the next hung nvidia-smi", timeout_s=10)
    start = time.monotonic()
    assert e.stop() == 0
    assert time.monotonic() - start < 2.5
    assert fakes_of(e) == [], "no nvidia-smi left behind"


def fakes_of(e: RunningExporter) -> list[int]:
    """Live fake nvidia-smi processes reading this exporter's state file."""
    mine = f"FAKE_NVIDIA_SMI_STATE={e.state}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if mine in environ and b"nvidia-smi" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_garbage_output_is_a_parse_failure_quoting_the_line(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("garbage")
    s = e.wait_for(
        lambda s: (value(s, "ugro_gpu_exporter_collect_failures_total", reason="parse") or 0) >= 1,
        "a parse failure",
    )
    assert failed(s)
    assert "last_success" not in " ".join(names(s)), "never succeeded"
    assert any("Segmentation fault" in ln and "columns" in ln for ln in e.log), e.log


def test_sick_gpu_is_reported_and_its_missing_values_are_absent(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("sick_gpu")
    s = e.wait_for(ok, "a successful collection")
    gpu = load("sick_gpu")["gpus"][0]
    labels = gpu_labels(gpu)
    assert value(s, "ugro_gpu_exporter_gpu_error", **labels, error="GPU requires reset") == 1
    for metric in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
    ):
        assert metric not in names(s)
    assert value(s, "ugro_gpu_exporter_gpus") == 1


def test_not_available_fields_leave_only_their_series_out(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("na_fields")
    s = e.wait_for(ok, "a successful collection")
    mig, laptop = (gpu_labels(g) for g in load("na_fields")["gpus"])
    assert value(s, "DCGM_FI_DEV_GPU_UTIL", **mig) is None, "MIG: utilization is [N/A]"
    assert value(s, "DCGM_FI_DEV_FB_USED", **mig) == 59
    assert value(s, "DCGM_FI_DEV_GPU_TEMP", **mig) == 42
    assert value(s, "DCGM_FI_DEV_POWER_USAGE", **mig) is None
    assert value(s, "DCGM_FI_DEV_GPU_UTIL", **laptop) == 3
    assert value(s, "DCGM_FI_DEV_GPU_TEMP", **laptop) is None
    assert value(s, "DCGM_FI_DEV_POWER_USAGE", **laptop) is None
    assert "ugro_gpu_exporter_gpu_error" not in names(s)


def test_no_devices_is_a_node_without_gpus(exporter: Callable[..., RunningExporter]) -> None:
    e = exporter("no_devices")
    s = e.wait_for(ok, "a successful collection")
    assert value(s, "ugro_gpu_exporter_gpus") == 0
    assert not any(name.startswith("DCGM_") for name in names(s))


def test_missing_nvidia_smi(exporter: Callable[..., RunningExporter], tmp_path: Path) -> None:
    e = exporter("two_gpus", path_dirs=(tmp_path / "empty",))
    s = e.wait_for(failed, "a failure")
    assert (value(s, "ugro_gpu_exporter_collect_failures_total", reason="not_found") or 0) >= 1
    assert any("nvidia-smi: not found" in ln for ln in e.log), e.log


def test_listen_option_as_the_systemd_unit_uses_it(
    exporter: Callable[..., RunningExporter],
) -> None:
    e = exporter("one_gpu", "--listen", "127.0.0.1:0")
    assert e.url.startswith("http://127.0.0.1:")
    e.wait_for(ok, "a successful collection")


def test_sigterm_stops_it_cleanly(exporter: Callable[..., RunningExporter]) -> None:
    e = exporter("two_gpus")
    e.wait_for(ok, "a successful collection")
    start = time.monotonic()
    assert e.stop() == 0
    assert time.monotonic() - start < 5


def test_once_prints_one_exposition(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps(load("one_gpu")))
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        FAKE_NVIDIA_SMI_STATE=str(state),
        PATH=os.pathsep.join([str(FAKE_DIR), BASE_PATH]),
    )
    done = subprocess.run(
        [sys.executable, "-m", "exporters.gpu_exporter", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    s = parse(done.stdout)
    assert value(s, "ugro_gpu_exporter_gpus") == 1
    assert "DCGM_FI_DEV_GPU_UTIL" in names(s)
