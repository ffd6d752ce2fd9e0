"""No input can wedge a job, against a real ugrod subprocess (issue 11, item 2).

Each case was reproduced on the old code: a value accepted by the API and refused
later (or never), leaving a job ``starting``/``running (stopping)`` forever, or a
request that answered 500 after changing state. Here each is refused with a clear
400 that changes nothing, or the job ends (or cancels) within seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import Ugrod, _kill_leftovers
from tests.sshd_nodes import SshdCluster

PY = sys.executable


def seq(d: Ugrod) -> int:
    return int(d.api("GET", "/v1/ping")[1]["seq"])


def refused(d: Ugrod, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
            needle: str) -> dict[str, Any]:
    """The request answers 400 with ``needle`` in its error, and records nothing."""
    before = seq(d)
    status, answer = d.api(method, path, body, raw=raw)
    assert status == 400, (status, answer)
    assert needle in answer["error"], answer
    assert answer["code"] == "bad_request"
    assert d.recorded_since(before) == []  # nothing about jobs or sweeps
    return dict(answer)


def wait_running(d: Ugrod, job: str, marker: bytes = b"") -> None:
    d.wait_job(job, ("running",), timeout_s=60)
    if marker:
        deadline = time.monotonic() + 30
        while marker not in d.api("GET", f"/v1/jobs/{job}/logs")[1]:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)


# ---- one rule for names, bounded numbers ----------------------------------------------


WEDGES: list[tuple[dict[str, Any], str]] = [
    ({"argv": ["x"], "name": "a..b"}, "without '..'"),
    ({"argv": ["x"], "name": "a" * 65}, "invalid job name"),
    ({"argv": ["x"], "after": ["x..y"]}, "invalid job name"),
    ({"argv": ["x"], "priority": 2 ** 63}, "priority must be an integer from -1000 to 1000"),
    ({"argv": ["x"], "priority": 1001}, "priority must be an integer from -1000 to 1000"),
    ({"argv": ["x"], "priority": -1001}, "priority must be"),
    ({"argv": ["x"], "retry_backoff_s": -1e308}, "retry_backoff_s must be"),
    ({"argv": ["x"], "retry_backoff_s": 1e308}, "retry_backoff_s must be"),
    ({"argv": ["x"], "expected_runtime_s": -1}, "expected_runtime_s must be"),
    ({"argv": ["x"], "cwd": "/tmp/a\x00b"}, "cwd may not contain NUL"),
    ({"argv": ["x"], "labels_required": ["a\x00"]}, "NUL"),
]


def test_wedge_values_are_refused_at_submit(ugrod: Ugrod) -> None:
    for body, needle in WEDGES:
        refused(ugrod, "POST", "/v1/jobs", body, needle=needle)
        refused(ugrod, "POST", "/v1/jobs?dry_run=1", body, needle=needle)


def test_a_64_character_name_is_accepted_by_every_part(ugrod: Ugrod) -> None:
    name = "n" * 63 + "1"
    status, answer = ugrod.api("POST", "/v1/jobs", {"argv": [PY, "-c", "print(1)"],
                                                    "name": name})
    assert status == 201, answer
    assert ugrod.wait_job(name, timeout_s=60)["state"] == "succeeded"


def test_priority_verb_and_sweeps_share_the_bounds(ugrod: Ugrod) -> None:
    status, _ = ugrod.api("POST", "/v1/jobs", {"argv": [PY, "-c", "print(1)"], "name": "p",
                                               "held": True})
    assert status == 201
    refused(ugrod, "POST", "/v1/jobs/p/priority", {"priority": 2 ** 63}, needle="priority must")
    refused(ugrod, "POST", "/v1/jobs/p/priority", {"priority": 5000}, needle="priority must")
    sweep = {"name": "s", "argv": [PY, "-c", "print(1)"], "params": {"lr": ["1", "2"]}}
    refused(ugrod, "POST", "/v1/sweeps", {**sweep, "priority": 2 ** 63}, needle="priority")
    refused(ugrod, "POST", "/v1/sweeps", {**sweep, "name": "s..t"}, needle="without '..'")
    refused(ugrod, "POST", "/v1/sweeps", {**sweep, "params": {"lr": ["1\x002"]}}, needle="NUL")
    refused(ugrod, "POST", "/v1/sweeps", {**sweep, "max_parallel": -1}, needle="max_parallel")


def test_duplicate_json_keys_are_refused(ugrod: Ugrod) -> None:
    raw = b'{"argv": ["true"], "priority": 1, "priority": 900}'
    refused(ugrod, "POST", "/v1/jobs", raw=raw, needle="'priority' is given twice")
    raw = b'{"name": "s", "argv": ["true"], "params": {"a": ["1"], "a": ["2"]}}'
    refused(ugrod, "POST", "/v1/sweeps", raw=raw, needle="'a' is given twice")


def test_a_sweep_grid_is_sized_before_it_is_built(ugrod: Ugrod) -> None:
    # 40 parameters of 2 values: 2^40 trials. The old code built the grid (5.4 GB, stuck).
    params = {f"p{i}": ["a", "b"] for i in range(40)}
    t0 = time.monotonic()
    refused(ugrod, "POST", "/v1/sweeps", {"name": "big", "argv": ["true"], "params": params},
            needle="more than 1000 trials")
    assert time.monotonic() - t0 < 5
    assert ugrod.proc is not None
    rss_kb = int(next(line.split()[1] for line in
                      Path(f"/proc/{ugrod.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:")))
    assert rss_kb < 400_000, rss_kb


def test_queries_out_of_range_are_refused_and_checkpoint_wait_records_nothing(
        ugrod: Ugrod) -> None:
    # events?limit=-1 once dropped the first event; checkpoint?wait=abc answered 500
    # after recording checkpoint_requested.
    for query in ("limit=-1", "limit=0", "after=-5", "limit=abc"):
        refused(ugrod, "GET", f"/v1/events?{query}", needle="limit")
    status, _ = ugrod.api("POST", "/v1/jobs", {
        "argv": [PY, "-c", "import time; print('up', flush=True); time.sleep(600)"],
        "name": "ck"})
    assert status == 201
    wait_running(ugrod, "ck", b"up")
    for bad in ("abc", "nan", "-1", "1e999"):
        refused(ugrod, "POST", f"/v1/jobs/ck/checkpoint?wait={bad}", needle="wait must be")
    kinds = [json.loads(line)["type"] for line in
             ugrod.api("GET", "/v1/events?job=ck")[1].splitlines()]
    assert "checkpoint_requested" not in kinds
    assert ugrod.api("POST", "/v1/jobs/ck/cancel?wait=1")[1]["job"]["state"] == "cancelled"


# ---- jobs that once never ended ---------------------------------------------------------

METRICS_JOB = """
import json, os, sys
with open(os.environ["UGRO_METRICS_FILE"], "a") as f:
    f.write(eval(sys.argv[1]) + "\\n")  # the test's own expression: the hostile line
    f.write(json.dumps({"step": 7, "loss": 0.5}) + "\\n")
print("wrote", flush=True)
"""


HOSTILE_LINES = [  # Python expressions the job evaluates (argv is bounded, these are big)
    """'{"step": 1e300}'""",
    """'{"step": 18446744073709551616}'""",
    """'{"step": -3}'""",
    """'{"loss": 1, "x": ' + '[' * 30000 + ']' * 30000 + '}'""",
    """'[' * 100000 + ']' * 100000""",
    """'x' * 200000""",
]


def test_hostile_metrics_lines_are_dropped_and_the_jobs_end(ugrod: Ugrod) -> None:
    # Each once left its job "running (stopping: failed)" or killed the rank watcher.
    for i, line in enumerate(HOSTILE_LINES):
        status, _ = ugrod.api("POST", "/v1/jobs", {"argv": [PY, "-c", METRICS_JOB, line],
                                                   "name": f"m{i}"})
        assert status == 201
    for i in range(len(HOSTILE_LINES)):
        done = ugrod.wait_job(f"m{i}", timeout_s=30)
        assert done["state"] == "succeeded" and done["exit_code"] == 0, done
        assert done["metrics"].get("step") == 7, done  # the good line after the bad counts
    port = ugrod.api("GET", "/v1/ping")[1]["metrics_port"]
    if port:  # None when another ugrod holds the default port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert f"ugro_metric_lines_dropped_total {len(HOSTILE_LINES)}.0".encode() in text


def test_job_directory_removed_while_running_still_ends_and_cancels(ugrod: Ugrod) -> None:
    script = ("import time\nfor i in range(100000):\n    print('tick', i, flush=True)\n"
              "    time.sleep(0.05)\n")
    for name in ("gone", "gone2"):
        status, _ = ugrod.api("POST", "/v1/jobs", {"argv": [PY, "-c", script], "name": name})
        assert status == 201
        wait_running(ugrod, name, b"tick 2")
        trash = ugrod.base / f"trash-{name}"  # moved away, then deleted: gone for ugrod
        (ugrod.state_dir / "jobs" / name).rename(trash)
        shutil.rmtree(trash)
    time.sleep(0.3)  # output keeps coming while the directory is gone
    t0 = time.monotonic()
    status, body = ugrod.api("POST", "/v1/jobs/gone/cancel")
    assert status == 202, body
    assert ugrod.wait_job("gone", timeout_s=20)["state"] == "cancelled"
    assert time.monotonic() - t0 < 15
    # and the other one is still supervised: its log is written again, it cancels too
    assert b"tick" in ugrod.api("GET", "/v1/jobs/gone2/logs")[1]
    assert ugrod.api("POST", "/v1/jobs/gone2/cancel?wait=1")[1]["job"]["state"] == "cancelled"


def test_a_job_whose_directory_cannot_be_made_fails_with_the_reason(ugrod: Ugrod) -> None:
    # A file where the job's directory goes: the launch raises on the head node.
    (ugrod.state_dir / "jobs").mkdir(exist_ok=True)
    (ugrod.state_dir / "jobs" / "blocked").write_text("in the way")
    status, _ = ugrod.api("POST", "/v1/jobs", {"argv": [PY, "-c", "print(1)"],
                                               "name": "blocked"})
    assert status == 201
    done = ugrod.wait_job("blocked", timeout_s=30)
    assert done["state"] == "failed", done
    assert "ugrod could not supervise the job" in str(done["reason"]), done


# ---- logs ---------------------------------------------------------------------------------


def test_logs_without_follow_return_the_whole_log(ugrod: Ugrod) -> None:
    # 3 MiB of numbered lines: the old code returned the first 1 MiB, exit 0.
    script = ("import sys\nw = sys.stdout.write\n"
              "for i in range(60000):\n    w('line %06d ' % i + 'x' * 40 + '\\n')\n"
              "w('THE END\\n')\n")
    status, _ = ugrod.api("POST", "/v1/jobs", {"argv": [PY, "-c", script], "name": "big"})
    assert status == 201
    assert ugrod.wait_job("big", timeout_s=60)["state"] == "succeeded"
    size = (ugrod.state_dir / "jobs" / "big" / "rank_0.log").stat().st_size
    assert size > 3 << 20
    res = ugrod.ctl("logs", "big", check=True)
    lines = res.stdout.splitlines()
    assert len(lines) == 60001 and lines[-1] == "THE END", (len(lines), lines[-1:])
    assert lines[12345].startswith("line 012345 ")
    res = ugrod.ctl("logs", "big", "--tail", "2", check=True)
    assert res.stdout.splitlines()[-1] == "THE END" and len(res.stdout.splitlines()) == 2
    refused(ugrod, "GET", "/v1/jobs/big/logs?tail=%C2%B2", needle="tail must be")


# ---- a damaged sealed segment ------------------------------------------------------------


def test_a_damaged_sealed_segment_is_named_by_events_and_why(short_tmp: Path) -> None:
    d = Ugrod(short_tmp)
    d.start()
    for i in range(3):
        assert d.api("POST", "/v1/jobs", {"argv": ["true"], "name": f"k{i}", "held": True})[0] \
            == 201
    d.stop()
    # a torn tail makes the next start seal segment 1 and write on in segment 2
    seg1 = d.state_dir / "events" / "events-000001.jsonl"
    seg1.write_bytes(seg1.read_bytes() + b'{"seq":99,"torn')
    d.start()
    assert d.api("POST", "/v1/jobs", {"argv": ["true"], "name": "k3", "held": True})[0] == 201
    d.stop()  # snapshots: the next start replays nothing from segment 1
    assert (d.state_dir / "events" / "events-000002.jsonl").exists()
    data = seg1.read_bytes()
    seg1.write_bytes(data.replace(b'"job":"k1"', b'"job":"k7"', 1))  # a flipped byte
    d.start()
    for path in ("/v1/events", "/v1/events?job=k1", "/v1/jobs/k1/why"):
        status, body = d.api("GET", path)
        assert status == 503, (path, status, body)
        assert body["code"] == "log_damaged"
        assert "events-000001.jsonl" in body["error"] and "backup" in body["error"], body
    res = d.ctl("events")
    assert res.returncode != 0 and "events-000001.jsonl" in res.stderr, res
    # the daemon still works: new events are recorded and jobs run
    assert d.api("POST", "/v1/jobs", {"argv": ["true"], "name": "k4"})[0] == 201
    assert d.wait_job("k4", timeout_s=60)["state"] == "succeeded"
    d.stop()


# ---- cancel reaches an end even when the node does not answer -----------------------------


def test_cancel_ends_a_job_whose_node_is_unreachable(short_tmp: Path,
                                                     node_guard: SshdCluster) -> None:
    node = node_guard[1]
    cfg = {
        "cluster": {"name": "t", "known_hosts": str(node_guard.known_hosts)},
        "nodes": {node.name: {"host": node.host, "port": node.port, "user": node.user,
                              "identity_file": str(node.identity),
                              "work_dir": str(node.work_dir), "transport": "ssh",
                              "python": PY, "rank": 0}},
        "metrics": {"enabled": False},
        "health": {"check_timeout_s": 2, "intervals": {"active_s": 1, "recent_s": 1,
                                                        "idle_s": 1, "long_idle_s": 1}},
    }
    (short_tmp / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    d = Ugrod(short_tmp, config=short_tmp / "cluster.yaml", grace_s=1.0)
    d.start()
    try:
        status, _ = d.api("POST", "/v1/jobs", {
            "argv": [PY, "-c", "import time; print('up', flush=True); time.sleep(600)"],
            "name": "far"})
        assert status == 201
        wait_running(d, "far", b"up")
        node.stop()  # its sshd is gone: the rank keeps running, nobody can reach it
        t0 = time.monotonic()
        assert d.api("POST", "/v1/jobs/far/cancel")[0] == 202
        done = d.wait_job("far", timeout_s=60)
        assert done["state"] == "cancelled", done
        assert time.monotonic() - t0 < 45
        assert "could not be confirmed gone" in str(done["reason"]), done
        assert "unreachable" in str(done["reason"]), done
    finally:
        node.start()
        d.stop()
        _kill_leftovers(node.work_dir)


# ---- remote output --------------------------------------------------------------------------

FAKE_DIR = Path(__file__).resolve().parents[1] / "fake_nvidia_smi"


class GpuUgrod(Ugrod):
    """ugrod on the built-in cluster whose nvidia-smi is the stand-in (state in gpus.json)."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["PATH"] = f"{FAKE_DIR}:{env.get('PATH', '')}"
        env["FAKE_NVIDIA_SMI_STATE"] = str(self.base / "gpus.json")
        return env


def test_nvidia_smi_printing_1e308_makes_the_node_unhealthy_not_unmonitored(
        short_tmp: Path) -> None:
    scenario = json.loads((FAKE_DIR / "scenarios" / "two_gpus.json").read_text())
    (short_tmp / "gpus.json").write_text(json.dumps(scenario))
    d = GpuUgrod(short_tmp)
    d.start()
    try:
        def local() -> dict[str, Any]:
            return dict(d.api("GET", "/v1/nodes")[1]["nodes"][0])

        deadline = time.monotonic() + 30
        while local()["health"] != "healthy":
            assert time.monotonic() < deadline, local()
            time.sleep(0.1)
        scenario["gpus"][0]["memory.used"] = "1e308"  # finite, yet its bytes are not
        (short_tmp / "gpus.json").write_text(json.dumps(scenario))
        deadline = time.monotonic() + 30
        while local()["health"] == "healthy":  # the old monitor raised on every sweep
            assert time.monotonic() < deadline, local()
            time.sleep(0.1)
        node = local()
        assert "memory.used '1e308' is out of range" in str(node["health_reason"]), node
    finally:
        d.stop()


def test_a_flood_from_nvidia_smi_is_read_with_a_cap_on_the_node(tmp_path: Path) -> None:
    import subprocess

    from ugrod.core import gpus
    from ugrod.nodes import probe

    flood = tmp_path / "nvidia-smi"
    flood.write_text("#!/bin/sh\nexec head -c 200000000 /dev/zero\n")
    flood.chmod(0o755)
    # The probe's own peak, measured by a fresh parent whose only child it is (this
    # process's RUSAGE_CHILDREN keeps the peak of every child the suite has reaped).
    measure = ("import json, resource, subprocess, sys\n"
               "r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, timeout=60)\n"
               "sys.stderr.write(r.stderr.decode(errors='replace') + '\\nPEAK '\n"
               "                 + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
               "sys.stdout.buffer.write(r.stdout)\n"
               "sys.exit(r.returncode)\n")
    argv = probe.probe_argv(PY, str(tmp_path), smi=str(flood), smi_timeout_s=20)
    res = subprocess.run([PY, "-c", measure, json.dumps(argv)], capture_output=True,
                         timeout=90)
    peak_kib = int(res.stderr.decode().rsplit("PEAK ", 1)[1])
    assert res.returncode == 0, res.stderr
    assert len(res.stdout) < 600_000  # 64 KiB kept (NULs JSON-escaped 6x)
    sample = gpus.parse_probe(res.stdout, expect_gpus=1)
    assert "more than 64 KiB" in str(sample.gpu_error), sample
    assert peak_kib < 120_000, peak_kib  # the old probe held all 200 MB
