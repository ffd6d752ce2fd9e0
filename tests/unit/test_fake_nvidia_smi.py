"""The fake nvidia-smi prints what the real one prints, and the parser reads it.

Expected bytes below follow real captures (utkuozdemir/nvidia_gpu_exporter,
internal/captures/linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt: the
``-L`` line, the ``--version`` block, the csv header with bracketed units and
"629.42 W"-style values; ..._nvidia-h100-mig__590.48.01.txt: ``[N/A]``
utilization under MIG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ugrod.core.gpus import (
    QUERY_FIELDS,
    GpuQueryFailed,
    nvidia_smi_argv,
    parse_nvidia_smi,
    parse_probe,
    parse_readiness,
)
from ugrod.core.health import score
from ugrod.core.state import NodeHealth
from ugrod.nodes.probe import probe_argv, readiness_argv

FAKE_DIR = Path(__file__).resolve().parents[1] / "fake_nvidia_smi"
FAKE = FAKE_DIR / "nvidia-smi"
SCENARIOS = FAKE_DIR / "scenarios"


def run_fake(scenario: str | Path | None, *args: str,
             timeout: float = 10) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FAKE_NVIDIA_SMI_STATE"}
    if scenario is not None:
        path = scenario if isinstance(scenario, Path) else SCENARIOS / f"{scenario}.json"
        env["FAKE_NVIDIA_SMI_STATE"] = str(path)
    return subprocess.run([str(FAKE), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def query(scenario: str | Path | None) -> subprocess.CompletedProcess[str]:
    return run_fake(scenario, *nvidia_smi_argv()[1:])


def test_two_gpus_exact_bytes() -> None:
    r = query("two_gpus")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == (
        "0, GPU-0a1b2c3d-0000-4000-8000-000000000001, NVIDIA GeForce RTX 3060, 98, 10240, "
        "12288, 71, 168.30\n"
        "1, GPU-0a1b2c3d-0000-4000-8000-000000000002, NVIDIA GeForce RTX 4060, 0, 1, 8188, "
        "34, 7.12\n")


def test_units_and_header_without_nounits() -> None:
    r = run_fake("two_gpus", "--query-gpu=index,name,utilization.gpu,memory.used,"
                 "temperature.gpu,power.draw", "--format=csv")
    assert r.stdout.splitlines()[:2] == [
        "index, name, utilization.gpu [%], memory.used [MiB], temperature.gpu, power.draw [W]",
        "0, NVIDIA GeForce RTX 3060, 98 %, 10240 MiB, 71, 168.30 W",
    ]
    # ... which the parser refuses, quoting the line, rather than misreading it
    units = run_fake("two_gpus", "--query-gpu=" + ",".join(QUERY_FIELDS),
                     "--format=csv,noheader")
    reading = parse_nvidia_smi(units.stdout, units.returncode, units.stderr)
    assert isinstance(reading, GpuQueryFailed) and "units" in reading.message


def test_list_and_version() -> None:
    assert run_fake("one_gpu", "-L").stdout == (
        "GPU 0: NVIDIA GeForce RTX 4070 (UUID: GPU-5d2f3a1e-8c4b-4e7a-9f10-2b6c8d0e4a11)\n")
    assert run_fake("eight_gpus", "--version").stdout == (
        "NVIDIA-SMI version  : 590.48.01\nNVML version        : 590.48\n"
        "DRIVER version      : 590.48.01\nCUDA Version        : 13.1\n")
    table = run_fake("eight_gpus").stdout.splitlines()
    assert "| NVIDIA-SMI 590.48.01" in table[2] and len(table) == 8 + 4 * 8
    assert {len(line) for line in table[1:]} == {91}


def test_unknown_field_and_id_selection() -> None:
    r = run_fake("one_gpu", "--query-gpu=index,bogus", "--format=csv")
    assert r.returncode == 2 and 'Field "bogus" is not a valid field to query.' in r.stdout
    r = run_fake("eight_gpus", "-i", "3", "--query-gpu=index,uuid", "--format=csv,noheader")
    assert r.stdout == "3, GPU-8e000003-1111-4222-8333-444455550003\n"


@pytest.mark.parametrize(("scenario", "count", "expect"), [
    ("one_gpu", 1, 1), ("two_gpus", 2, 2), ("eight_gpus", 8, 8), ("na_fields", 2, 2),
    ("sick_gpu", 1, 1), ("hot_gpu", 1, 1), ("no_devices", 0, 0),
])
def test_scenarios_parse(scenario: str, count: int, expect: int) -> None:
    r = query(scenario)
    reading = parse_nvidia_smi(r.stdout, r.returncode, r.stderr, expect_gpus=expect)
    assert isinstance(reading, tuple), reading
    assert len(reading) == count


def test_na_fields_read_as_absent() -> None:
    r = query("na_fields")
    reading = parse_nvidia_smi(r.stdout, r.returncode, r.stderr)
    assert isinstance(reading, tuple)
    mig, old = reading
    assert mig.util_percent is None and mig.power_w is None and mig.temperature_c == 42
    assert old.temperature_c is None and old.power_w is None and old.util_percent == 3


@pytest.mark.parametrize(("scenario", "needle"), [
    ("garbage", "in line 'Segmentation fault'"),
    ("driver_failed", "exited with code 9: \"NVIDIA-SMI has failed because it couldn't "
     "communicate with the NVIDIA driver."),
    ("no_devices", "exited with code 6: 'No devices were found'"),
])
def test_failing_scenarios(scenario: str, needle: str) -> None:
    r = query(scenario)
    reading = parse_nvidia_smi(r.stdout, r.returncode, r.stderr, expect_gpus=1)
    assert isinstance(reading, GpuQueryFailed)
    assert needle in reading.message


def test_state_file_next_to_the_script(tmp_path: Path) -> None:
    """Through sshd the environment is minimal: a per-node copy reads state.json beside it."""
    node_bin = tmp_path / "bin"
    node_bin.mkdir()
    shutil.copy(FAKE, node_bin / "nvidia-smi")
    env = {"PATH": f"{node_bin}:/usr/bin:/bin"}
    argv = nvidia_smi_argv()
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert (r.returncode, r.stdout) == (6, "No devices were found\n")  # no state yet
    (node_bin / "state.json").write_text((SCENARIOS / "hot_gpu.json").read_text())
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    reading = parse_nvidia_smi(r.stdout, r.returncode, r.stderr)
    assert isinstance(reading, tuple) and reading[0].temperature_c == 86


def run_probe(scenario: str, *, expect_gpus: int, pid_files: tuple[str, ...] = (),
              smi_timeout_s: float = 5.0, work_dir: str = "/tmp") -> tuple[float, str]:
    env = dict(os.environ, FAKE_NVIDIA_SMI_STATE=str(SCENARIOS / f"{scenario}.json"))
    t0 = time.monotonic()
    r = subprocess.run(probe_argv(sys.executable, work_dir, pid_files, smi=str(FAKE),
                                  smi_timeout_s=smi_timeout_s),
                       capture_output=True, text=True, env=env, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0, r.stdout


def test_probe_end_to_end_with_fake(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    me = os.getpid()
    start = Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[19]
    pid_file.write_text(f"{me} {start}\n")
    stale = tmp_path / "stale"
    stale.write_text(f"{me} 1\n")  # same pid, other start time: a recycled pid is not our rank
    _, out = run_probe("two_gpus", expect_gpus=2, pid_files=(str(pid_file), str(stale)),
                       work_dir=str(tmp_path / "not" / "yet"))
    s = parse_probe(out, expect_gpus=2, latency_ms=1.0)
    assert [g.name for g in s.gpus] == ["NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 4060"]
    assert s.gpu_error is None and s.smi_s is not None
    assert s.disk_path == str(tmp_path) and s.disk_percent is not None
    assert s.mem_percent is not None and s.cpu_ticks is not None and len(s.load) == 3
    assert [r.alive for r in s.ranks] == [True, False]
    assert score(s, expect_gpus=2, expect_ranks=True).health is not NodeHealth.UNREACHABLE


def test_probe_hot_gpu_is_unhealthy() -> None:
    _, out = run_probe("hot_gpu", expect_gpus=1)
    a = score(parse_probe(out, expect_gpus=1), expect_gpus=1)
    assert a.health is NodeHealth.UNHEALTHY
    assert a.alerts[0].key == "gpu_temperature"


def test_probe_survives_a_hung_nvidia_smi() -> None:
    took, out = run_probe("hang", expect_gpus=1, smi_timeout_s=0.5)
    assert took < 5.0
    s = parse_probe(out, expect_gpus=1)
    assert s.gpu_error is not None and "did not answer in time" in s.gpu_error
    assert s.mem_percent is not None  # the rest of the probe still reported
    assert score(s, expect_gpus=1).health is NodeHealth.UNHEALTHY


def test_probe_driver_failed() -> None:
    _, out = run_probe("driver_failed", expect_gpus=1)
    s = parse_probe(out, expect_gpus=1)
    assert s.gpu_error is not None and "code 9" in s.gpu_error


def test_readiness_with_fake() -> None:
    env = dict(os.environ, FAKE_NVIDIA_SMI_STATE=str(SCENARIOS / "two_gpus.json"))
    r = subprocess.run(readiness_argv(sys.executable, "/tmp", smi=str(FAKE), timeout_s=60),
                       capture_output=True, text=True, env=env, timeout=90, check=False)
    assert r.returncode == 0, r.stderr
    got = {c.name: c for c in parse_readiness(r.stdout, expect_gpus=2, min_free_bytes=1)}
    assert got["python"].ok
    assert got["gpus"].ok and got["gpus"].detail.startswith("2 GPU(s): NVIDIA GeForce RTX 3060")
    assert got["disk"].ok
    assert set(got) == {"python", "torch", "cuda", "gpus", "disk"}


def test_scenarios_are_valid_json() -> None:
    for path in SCENARIOS.glob("*.json"):
        json.loads(path.read_text())
