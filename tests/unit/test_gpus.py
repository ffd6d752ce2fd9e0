"""nvidia-smi, probe and readiness parsing: tables of real-format output -> readings.

Row format as real nvidia-smi prints it for ``--format=csv,noheader,nounits``
(", " between cells, no quoting, ``[N/A]`` for missing values, two decimals on
power), checked against captures in utkuozdemir/nvidia_gpu_exporter
internal/captures/ (H100 590.48.01, H100 MIG: utilization ``[N/A]``).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ugrod.core.events import Gpu
from ugrod.core.gpus import (
    MIB,
    GpuQueryFailed,
    GpuSample,
    NodeSample,
    ProbeError,
    compare_inventory,
    cpu_percent,
    inventory,
    nvidia_smi_argv,
    parse_nvidia_smi,
    parse_probe,
    parse_readiness,
    sample_summary,
)
from ugrod.nodes.probe import probe_argv
from ugrod.nodes.remote import node_sample

U0 = "GPU-5d2f3a1e-8c4b-4e7a-9f10-2b6c8d0e4a11"
U1 = "GPU-0a1b2c3d-0000-4000-8000-000000000002"

ONE = f"0, {U0}, NVIDIA GeForce RTX 4070, 37, 2315, 12282, 52, 118.47\n"
TWO = (f"0, {U0}, NVIDIA GeForce RTX 3060, 98, 10240, 12288, 71, 168.30\n"
       f"1, {U1}, NVIDIA GeForce RTX 4060, 0, 1, 8188, 34, 7.12\n")
EIGHT = "".join(
    f"{i}, GPU-8e{i:06x}-1111-4222-8333-44445555{i:04x}, NVIDIA H100 80GB HBM3, 100, "
    f"{19818 + i}, 81559, {55 + i}, {629.42 - i:.2f}\n" for i in range(8))
MIG = f"0, {U0}, NVIDIA H100 80GB HBM3, [N/A], 59, 81559, 42, 71.15\n"
DRIVER_FAILED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                 "driver. Make sure that the latest NVIDIA driver is installed and running.\n")


def gpu(index: int, uuid: str, name: str, util: float | None, used: int | None,
        total: int | None, temp: float | None, power: float | None,
        error: str | None = None) -> GpuSample:
    return GpuSample(uuid=uuid, index=index, name=name, util_percent=util,
                     memory_used_bytes=None if used is None else used * MIB,
                     memory_total_bytes=None if total is None else total * MIB,
                     temperature_c=temp, power_w=power, error=error)


def test_argv_is_the_contract_query() -> None:
    assert nvidia_smi_argv() == [
        "nvidia-smi",
        "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,"
        "temperature.gpu,power.draw",
        "--format=csv,noheader,nounits",
    ]


GOOD: list[tuple[str, str, tuple[GpuSample, ...]]] = [
    ("one GPU", ONE, (gpu(0, U0, "NVIDIA GeForce RTX 4070", 37, 2315, 12282, 52, 118.47),)),
    ("two GPUs", TWO, (gpu(0, U0, "NVIDIA GeForce RTX 3060", 98, 10240, 12288, 71, 168.3),
                       gpu(1, U1, "NVIDIA GeForce RTX 4060", 0, 1, 8188, 34, 7.12))),
    ("MIG: utilization [N/A]", MIG,
     (gpu(0, U0, "NVIDIA H100 80GB HBM3", None, 59, 81559, 42, 71.15),)),
    ("[Not Supported] power, [N/A] temp",
     f"0, {U0}, NVIDIA GeForce GTX 960M, 3, 120, 4044, [N/A], [Not Supported]\n",
     (gpu(0, U0, "NVIDIA GeForce GTX 960M", 3, 120, 4044, None, None),)),
    ("bare N/A and empty cell",
     f"0, {U0}, Tesla K80, N/A, , 11441, 30, [Insufficient Permissions]\n",
     (gpu(0, U0, "Tesla K80", None, None, 11441, 30, None),)),
    ("deprecated field",
     f"0, {U0}, X, [Requested functionality has been deprecated], 1, 2, 3, 4\n",
     (gpu(0, U0, "X", None, 1, 2, 3, 4),)),
    ("[GPU requires reset]",
     f"0, {U0}, NVIDIA GeForce RTX 4070, [GPU requires reset], [GPU requires reset], 12282, "
     f"[GPU requires reset], [GPU requires reset]\n",
     (gpu(0, U0, "NVIDIA GeForce RTX 4070", None, None, 12282, None, None,
          error="GPU requires reset"),)),
    ("[Unknown Error] on one field",
     f"0, {U0}, NVIDIA A100-SXM4-40GB, 0, 0, 40960, [Unknown Error], 55.01\n",
     (gpu(0, U0, "NVIDIA A100-SXM4-40GB", 0, 0, 40960, None, 55.01, error="Unknown Error"),)),
    ("CRLF and trailing blank lines", ONE.replace("\n", "\r\n") + "\r\n\n",
     (gpu(0, U0, "NVIDIA GeForce RTX 4070", 37, 2315, 12282, 52, 118.47),)),
    ("no separator spaces", f"0,{U0},NVIDIA GeForce RTX 4070,37,2315,12282,52,118.47",
     (gpu(0, U0, "NVIDIA GeForce RTX 4070", 37, 2315, 12282, 52, 118.47),)),
    ("empty, no GPUs expected", "", ()),
]


@pytest.mark.parametrize(("stdout", "expected"), [(o, e) for _, o, e in GOOD],
                         ids=[n for n, _, _ in GOOD])
def test_good_outputs(stdout: str, expected: tuple[GpuSample, ...]) -> None:
    assert parse_nvidia_smi(stdout, 0, "") == expected


def test_eight_gpus_keyed_by_uuid() -> None:
    reading = parse_nvidia_smi(EIGHT, 0, "")
    assert isinstance(reading, tuple)
    assert len(reading) == 8
    assert len({g.uuid for g in reading}) == 8
    assert [g.index for g in reading] == list(range(8))
    assert reading[7].memory_total_bytes == 81559 * MIB
    assert reading[7].power_w == pytest.approx(622.42)
    assert reading[3].memory_percent == pytest.approx(100 * 19821 / 81559)


BAD: list[tuple[str, str, int, str, int, str]] = [
    # name, stdout, exit code, stderr, expected GPUs, what the message must contain
    ("wrong column count", f"0, {U0}, NVIDIA GeForce RTX 4070, 37, 2315, 12282, 52\n", 0, "", 0,
     "expected 8 columns, got 7 in line '0, GPU-5d2f"),
    ("too many columns", ONE.strip() + ", P2\n", 0, "", 0, "got 9"),
    ("units by mistake", f"0, {U0}, NVIDIA H100 80GB HBM3, 100 %, 19818 MiB, 81559 MiB, 59, "
     f"629.42 W\n", 0, "", 0, "utilization.gpu '100 %' is not a number (units"),
    ("header by mistake", "index, uuid, name, utilization.gpu, memory.used, memory.total, "
     "temperature.gpu, power.draw\n", 0, "", 0, "index 'index' is not an integer"),
    ("garbage", "Segmentation fault\n", 0, "", 0, "expected 8 columns, got 1 in line "
     "'Segmentation fault'"),
    ("nan", f"0, {U0}, X, nan, 1, 2, 3, 4\n", 0, "", 0, "not a finite number"),
    # 1e308 MiB is finite, its bytes are not: this raised OverflowError on every sweep
    ("1e308 MiB", f"0, {U0}, X, 1, 1e308, 1e308, 3, 4\n", 0, "", 0,
     "memory.used '1e308' is out of range"),
    ("1e308 watts", f"0, {U0}, X, 1, 1, 2, 3, 1e308\n", 0, "", 0, "power.draw '1e308' is out"),
    ("huge index", f"{10**30}, {U0}, X, 1, 1, 2, 3, 4\n", 0, "", 0, "out of range"),
    ("no uuid", "0, [N/A], X, 1, 1, 2, 3, 4\n", 0, "", 0, "no usable uuid"),
    ("duplicate uuid", ONE + ONE, 0, "", 0, "listed twice"),
    ("empty, GPUs expected", "", 0, "", 2, "printed nothing, expected 2 GPUs"),
    ("exit 9, driver gone (stdout)", DRIVER_FAILED, 9, "", 0,
     "exited with code 9: \"NVIDIA-SMI has failed because it couldn't communicate"),
    ("exit 9, message on stderr", "", 9, DRIVER_FAILED, 0, "exited with code 9: \"NVIDIA-SMI"),
    ("exit 15, fell off the bus", "", 15, "Unable to determine the device handle for GPU "
     "0000:01:00.0: GPU is lost.  Reboot the system to recover this GPU\n", 0, "GPU is lost"),
    ("exit 6 with GPUs expected", "No devices were found\n", 6, "", 1, "exited with code 6"),
]


@pytest.mark.parametrize(("stdout", "code", "stderr", "expect", "needle"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_outputs_fail_quoting_the_line(stdout: str, code: int, stderr: str, expect: int,
                                           needle: str) -> None:
    reading = parse_nvidia_smi(stdout, code, stderr, expect_gpus=expect)
    assert isinstance(reading, GpuQueryFailed), reading
    assert needle in reading.message


def test_no_devices_is_no_gpus_when_none_expected() -> None:
    assert parse_nvidia_smi("No devices were found\n", 6, "") == ()


def test_long_lines_are_quoted_shortened() -> None:
    reading = parse_nvidia_smi("x" * 5000, 0, "")
    assert isinstance(reading, GpuQueryFailed)
    assert len(reading.message) < 400


cells = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(
        lambda f: f"{f:.2f}"),
    st.sampled_from(["[N/A]", "N/A", "[Not Supported]", "[Unknown Error]",
                     "[GPU requires reset]", "", "[Insufficient Permissions]"]),
)


@given(st.lists(st.tuples(st.integers(0, 64), st.uuids(), st.text(
    alphabet=st.characters(blacklist_characters=",\r\n", blacklist_categories=["Cs"]),
    max_size=30), st.lists(cells, min_size=5, max_size=5)), max_size=8, unique_by=lambda r: r[1]))
def test_well_formed_rows_always_parse(rows: list[Any]) -> None:
    text = "".join(f"{i}, GPU-{u}, {name}, {', '.join(vals)}\n" for i, u, name, vals in rows)
    reading = parse_nvidia_smi(text, 0, "")
    assert isinstance(reading, tuple), reading
    assert [g.uuid for g in reading] == [f"GPU-{u}" for _, u, _, _ in rows]


@settings(max_examples=300)
@given(st.text(), st.integers(-300, 300), st.text(), st.integers(0, 8))
def test_parse_never_raises(stdout: str, code: int, stderr: str, expect: int) -> None:
    reading = parse_nvidia_smi(stdout, code, stderr, expect_gpus=expect)
    assert isinstance(reading, tuple | GpuQueryFailed)


@settings(max_examples=300)
@given(st.one_of(st.text(), st.binary(), st.builds(
    lambda d: json.dumps(d), st.dictionaries(st.sampled_from(
        ["v", "smi", "cpu", "disk", "pids", "loadavg", "meminfo", "errors"]),
        st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                     max_leaves=8)))))
def test_parse_probe_raises_only_probe_error(stdout: str | bytes) -> None:
    for parse in (parse_probe, parse_readiness):
        with contextlib.suppress(ProbeError):
            parse(stdout)


# ---- inventory ------------------------------------------------------------

G = 1024**3


def test_inventory_from_samples_sorted_by_index() -> None:
    reading = parse_nvidia_smi(TWO, 0, "")
    assert isinstance(reading, tuple)
    assert inventory(reversed(reading)) == (
        Gpu(index=0, model="NVIDIA GeForce RTX 3060", vram_bytes=12288 * MIB, uuid=U0),
        Gpu(index=1, model="NVIDIA GeForce RTX 4060", vram_bytes=8188 * MIB, uuid=U1),
    )


RTX4070_8 = Gpu(index=0, model="RTX 4070", vram_bytes=8 * G)
COMPARE: list[tuple[str, tuple[Gpu, ...], tuple[Gpu, ...], str | None]] = [
    ("config silent", (), (Gpu(index=0, model="X", vram_bytes=G),), None),
    ("agree (reported a bit under nominal)", (RTX4070_8,),
     (Gpu(index=0, model="NVIDIA GeForce RTX 4070", vram_bytes=8188 * MIB, uuid=U0),), None),
    ("GPU gone", (RTX4070_8,), (), "config says 1 GPU (RTX 4070, 8 GB), node has 0"),
    ("one of two gone", (Gpu(index=0, model="RTX 3060", vram_bytes=12 * G),
                         Gpu(index=1, model="RTX 3060", vram_bytes=12 * G)),
     (Gpu(index=0, model="NVIDIA GeForce RTX 3060", vram_bytes=12288 * MIB),),
     "config says 2 GPUs (RTX 3060, 12 GB), node has 1 (NVIDIA GeForce RTX 3060, 12 GB)"),
    ("less VRAM", (Gpu(index=0, vram_bytes=12 * G),),
     (Gpu(index=0, model="NVIDIA GeForce RTX 4070", vram_bytes=8188 * MIB),),
     "GPU 0: config says 12 GB, node has 8 GB"),
    ("other model", (RTX4070_8,), (Gpu(index=0, model="NVIDIA GeForce RTX 3070",
                                       vram_bytes=8 * G),),
     "GPU 0: config says RTX 4070, node has NVIDIA GeForce RTX 3070"),
    ("index moved", (Gpu(index=1, vram_bytes=8 * G),), (Gpu(index=0, vram_bytes=8 * G),),
     "GPU 1: in config, not on node (node has indices 0)"),
]


@pytest.mark.parametrize(("configured", "found", "expected"), [c[1:] for c in COMPARE],
                         ids=[c[0] for c in COMPARE])
def test_compare_inventory(configured: tuple[Gpu, ...], found: tuple[Gpu, ...],
                           expected: str | None) -> None:
    assert compare_inventory(configured, found) == expected


# ---- probe parsing ----------------------------------------------------------


def probe_json(**over: Any) -> str:
    out: dict[str, Any] = {
        "v": 1, "errors": [], "clock": 1.7e9,
        "smi": {"present": True, "exit_code": 0, "stdout": TWO, "stderr": "",
                "timed_out": False, "error": None, "elapsed_s": 0.08},
        "loadavg": [0.5, 0.4, 0.3], "meminfo": {"MemTotal": 100 * G, "MemAvailable": 8 * G},
        "cpu": [100, 0, 50, 800, 50, 0, 0, 0, 0, 0], "ncpu": 16,
        "disk": {"path": "/home/u/ugro", "total": 1000 * G, "free": 60 * G, "avail": 10 * G},
        "boot_id": "b1",
        "pids": [{"file": "/w/pid", "pid": 42, "alive": True, "error": None}],
    }
    out.update(over)
    return json.dumps(out)


def test_parse_probe_full() -> None:
    s = parse_probe("motd line from .bashrc\n" + probe_json() + "\n", expect_gpus=2, ts=5.0,
                    latency_ms=3.5)
    assert s.ts == 5.0 and s.latency_ms == 3.5
    assert [g.uuid for g in s.gpus] == [U0, U1]
    assert s.gpu_error is None and s.nvidia_smi
    assert s.mem_percent == pytest.approx(92.0)
    assert s.disk_percent == pytest.approx(100 * 940 / 950)  # df: used / (used + avail)
    assert s.cpu_ticks == (1000, 850)
    assert s.ranks[0].pid == 42 and s.ranks[0].alive
    summary = sample_summary(s)
    assert summary["ranks_alive"] == 1 and summary["gpus"][1]["uuid"] == U1
    msgspec.json.encode(summary)  # plain JSON for the event log


@pytest.mark.parametrize(("smi", "expect", "error"), [
    ({"present": False}, 0, None),
    ({"present": False}, 1, "nvidia-smi not found on the node, expected 1 GPU"),
    ({"present": True, "timed_out": True}, 1, "did not answer in time"),
    ({"present": True, "exit_code": 9, "stdout": DRIVER_FAILED}, 1, "exited with code 9"),
    ({"present": True, "error": "nvidia-smi: [Errno 13] Permission denied"}, 0,
     "Permission denied"),
])
def test_parse_probe_gpu_failures(smi: dict[str, Any], expect: int, error: str | None) -> None:
    s = parse_probe(probe_json(smi=smi), expect_gpus=expect)
    assert s.gpus == ()
    if error is None:
        assert s.gpu_error is None
    else:
        assert s.gpu_error is not None and error in s.gpu_error


@pytest.mark.parametrize(("text", "needle"), [
    ("", "probe printed nothing"),
    ("bash: python3: command not found\n", "not what it prints"),
    ('{"v": 2, "smi": {}}', "unknown version"),
    ('{"v": 1, "smi": {"present": "yes"}}', "not what it prints"),
    ('{"v": 1}', "not what it prints"),
])
def test_parse_probe_malformed(text: str, needle: str) -> None:
    with pytest.raises(ProbeError, match=needle) as info:
        parse_probe(text)
    assert info.value.raw.strip() == text.strip()


def test_partial_probe_still_parses() -> None:
    s = parse_probe(json.dumps({"v": 1, "smi": {"present": False},
                                "errors": ["meminfo: [Errno 2] No such file"]}))
    assert s.mem_percent is None and s.disk_percent is None and s.cpu_ticks is None
    assert s.errors == ("meminfo: [Errno 2] No such file",)


def test_cpu_percent() -> None:
    a = NodeSample(cpu_ticks=(1000, 800), boot_id="b")
    b = NodeSample(cpu_ticks=(1100, 850), boot_id="b")
    assert cpu_percent(a, b) == pytest.approx(50.0)
    assert cpu_percent(None, b) is None
    assert cpu_percent(a, NodeSample(cpu_ticks=(1100, 850), boot_id="rebooted")) is None
    assert cpu_percent(b, a) is None


def test_probe_argv_has_no_shell() -> None:
    argv = probe_argv("python3", "~/ugro", ["/w/a b/pid"], smi_timeout_s=2)
    assert argv[:2] == ["python3", "-c"]
    assert argv[3:] == ["~/ugro", "nvidia-smi", "2.0", "/w/a b/pid"]
    assert nvidia_smi_argv()[1:] == node_sample.QUERY  # the probe asks what the parser reads
    assert "from ugrod" not in argv[2]  # one self-contained program


# ---- readiness ----------------------------------------------------------------


def readiness_json(**over: Any) -> str:
    out: dict[str, Any] = {
        "v": 1, "python": [3, 11, 7], "executable": "/usr/bin/python3", "errors": [],
        "torch": {"present": True, "exit_code": 0, "stdout": json.dumps(
            {"version": "2.3.1+cu121", "cuda": True, "cuda_version": "12.1",
             "devices": ["NVIDIA GeForce RTX 4070"]}) + "\n", "stderr": ""},
        "smi": {"present": True, "exit_code": 0,
                "stdout": f"GPU 0: NVIDIA GeForce RTX 4070 (UUID: {U0})\n", "stderr": ""},
        "disk": {"path": "/home/u/ugro", "total": 500 * G, "free": 200 * G, "avail": 190 * G},
    }
    out.update(over)
    return json.dumps(out)


def checks(text: str, **kw: Any) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.detail) for c in parse_readiness(text, **kw)}


def test_readiness_all_good() -> None:
    got = checks(readiness_json(), expect_gpus=1)
    assert all(ok for ok, _ in got.values()), got
    assert got["cuda"][1] == "CUDA 12.1: 1 device(s): NVIDIA GeForce RTX 4070"
    assert got["gpus"][1] == "1 GPU(s): NVIDIA GeForce RTX 4070"
    assert got["disk"][1] == "190 GB free in /home/u/ugro (need 10 GB)"


def test_readiness_failures() -> None:
    text = readiness_json(
        python=[3, 8, 10],
        torch={"present": True, "exit_code": 1, "stdout": "", "stderr":
               "Traceback (most recent call last):\n  File \"<string>\", line 1\n"
               "ModuleNotFoundError: No module named 'torch'\n"},
        smi={"present": True, "exit_code": 9, "stdout": DRIVER_FAILED, "stderr": ""},
        disk={"path": "/w", "total": 100 * G, "free": 2 * G, "avail": G})
    got = checks(text, expect_gpus=1)
    assert not any(ok for ok, _ in got.values()), got
    assert got["torch"][1] == "ModuleNotFoundError: No module named 'torch'"
    assert "exited with code 9" in got["gpus"][1]


def test_readiness_cpu_node() -> None:
    text = readiness_json(
        torch={"present": True, "exit_code": 0, "stdout": json.dumps(
            {"version": "2.3.1+cpu", "cuda": False, "cuda_version": None, "devices": []})},
        smi={"present": False})
    got = checks(text)
    assert all(ok for ok, _ in got.values()), got


def test_probe_tells_an_ended_rank_from_a_vanished_one(tmp_path: Any) -> None:
    """The real probe script on real files: a rank gone with its exit code written ended
    (no "no rank process alive" alert at a normal job end); one gone without vanished."""
    import subprocess
    import sys

    from ugrod.core.health import RANK_PROCESSES, score

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    ended, vanished = tmp_path / "rank-0", tmp_path / "rank-1"
    for d in (ended, vanished):
        d.mkdir()
        (d / "pid").write_text(f"{pid}\n")
    (ended / "exit_code").write_text("0\n")
    for run_dir, is_ended in ((ended, True), (vanished, False)):
        res = subprocess.run(probe_argv(sys.executable, str(tmp_path), [str(run_dir / "pid")],
                                        smi="/nonexistent/nvidia-smi"),
                             capture_output=True, timeout=30, check=True)
        s = parse_probe(res.stdout, expect_gpus=0)
        assert [(r.alive, r.ended) for r in s.ranks] == [(False, is_ended)]
        alerts = {a.key for a in score(s, expect_ranks=True).alerts}
        assert (RANK_PROCESSES in alerts) is not is_ended
