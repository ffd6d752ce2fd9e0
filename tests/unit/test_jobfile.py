"""Job files read by the one hardened YAML reader: every problem at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ugroctl import jobfile
from ugrod.core import jobspec
from ugrod.core.names import name_problem

ROOT = Path(__file__).resolve().parents[2]

BOMB = (  # 1.2 KB: 9^8 = 43 million values once expanded (the old safe_load spun at 100 %)
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n"
              for p, c in zip("abcdefg", "bcdefgh", strict=True))
    + "command: [true]\n")


def problems(text: str) -> list[str]:
    with pytest.raises(jobfile.JobFileError) as info:
        jobfile.parse(text, "job.yaml")
    return info.value.lines()


def test_an_alias_bomb_fails_fast() -> None:
    assert len(BOMB.encode()) < 1300
    t0 = time.perf_counter()
    got = problems(BOMB)
    assert time.perf_counter() - t0 < 1.0
    assert got == ["job.yaml: line 6, column 4: aliases expand to more than 100000 values"]


def test_deep_nesting_is_a_clear_error_not_a_traceback() -> None:
    got = problems("command: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert got == ["job.yaml: line 1, column 41: nested more than 32 levels deep"]


def test_tags_are_refused() -> None:
    assert problems("command: !!python/object/apply:os.system [true]\n") == [
        "job.yaml: line 1, column 10: tag '!!python/object/apply:os.system' is not allowed: "
        "a job file is plain YAML (mappings, lists, strings, numbers)"]


def test_every_problem_at_once_with_key_paths() -> None:
    got = problems("name: exp1\nnodes: 2\ngpus-per-node: 1\npriority: 9223372036854775808\n"
                   "retry_backoff_s: -1e308\nenv: {1BAD: x, OK: [1]}\nnodes: 3\n"
                   "node_names: [a, '']\nstall_action: maybe\n")
    assert got == [
        "job.yaml: line 7, column 1: duplicate key 'nodes' (first on line 2)",
        "job.yaml: gpus-per-node: unknown key (did you mean 'gpus_per_node'?); known keys: "
        + ", ".join(jobfile.RULES),
        "job.yaml: priority: expected a whole number from -1000 to 1000, got "
        "9223372036854775808",
        "job.yaml: retry_backoff_s: expected a number from 0 to 604800, got -1e+308",
        "job.yaml: env.1BAD: not a valid environment variable name",
        "job.yaml: env.OK: expected a string, got a list",
        "job.yaml: node_names[1]: expected a non-empty string, got ''",
        "job.yaml: stall_action: expected one of alert, requeue, got 'maybe'",
        "job.yaml: command: missing: say what to run, e.g. command: [python, train.py]",
    ]


def test_a_command_keeps_its_words_as_written() -> None:
    body = jobfile.parse("command: [train.py, --lr, 2e-4, --steps, 100, --x, 0x1F]\n", "j")
    assert body["argv"] == ["train.py", "--lr", "2e-4", "--steps", "100", "--x", "0x1F"]


def test_names_follow_ugrods_one_rule() -> None:
    """A name ugrod would refuse is named in the file's terms, in ugrod's words."""
    long = "n" * 65
    got = problems(f"name: ../x\ncommand: [t]\nafter: [ok, 'a b']\nnode_names: [{long}]\n")
    assert got == [
        f"job.yaml: name: {name_problem('job', '../x')}",
        f"job.yaml: after[1]: {name_problem('job', 'a b')}",
        f"job.yaml: node_names[0]: {name_problem('node', long)}",
    ]
    body = jobfile.parse(f"name: {'a' * 64}\ncommand: [t]\nafter_any: x.1\n", "j")
    assert (body["name"], body["after_any"]) == ("a" * 64, ["x.1"])


def test_job_file_bounds_are_ugrods() -> None:
    assert (jobfile.PRIORITY_MIN, jobfile.PRIORITY_MAX) == (jobspec.PRIORITY_MIN,
                                                            jobspec.PRIORITY_MAX)
    assert jobfile.MAX_BACKOFF_S == jobspec.MAX_BACKOFF_S
    assert jobfile.MAX_STALL_S == jobspec.MAX_STALL_S
    assert jobfile.MAX_RUNTIME_S == jobspec.MAX_RUNTIME_S


def test_the_cli_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(BOMB.replace("command: [true]\n", "") + "nodes: x\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ugroctl.cli", "--socket",
                          str(tmp_path / "none.sock"), "submit", str(f)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert time.perf_counter() - t0 < 10
    assert res.returncode == 2, res
    assert f"ugroctl: {f}: line 6, column 4: aliases expand" in res.stderr
    f.write_text("nodes: x\npriority: 5000\n")
    res = subprocess.run([sys.executable, "-m", "ugroctl.cli", "--socket",
                          str(tmp_path / "none.sock"), "submit", str(f)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert lines == [f"ugroctl: {f}: nodes: expected a whole number, got a string 'x'",
                     f"ugroctl: {f}: priority: expected a whole number from -1000 to 1000, "
                     f"got 5000",
                     f"ugroctl: {f}: command: missing: say what to run, e.g. "
                     f"command: [python, train.py]"], res.stderr
