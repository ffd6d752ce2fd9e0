"""The programs that run on nodes, run as nodes run them: the shipped text, a bare python3.

Each runs with ``-I -S`` from an empty directory, so neither ugrod nor site-packages can
be imported: a program that still needed ugrod (a library line left un-inlined) fails
here. The oldest Pythons the programs promise (3.6 for the probe family and the
helpers, 3.8 for the rank wrapper) run them too where such an interpreter is installed.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ugrod.core.gpus import parse_probe, parse_readiness
from ugrod.nodes import programs
from ugrod.nodes.probe import probe_request

# Each program, and the oldest Python it runs on.
PROGRAMS = {
    "probe": (3, 6), "probe_server": (3, 6), "readiness": (3, 6), "stack_dump": (3, 6),
    "leftovers": (3, 6), "port_listener": (3, 6), "prepare": (3, 6), "rank_wrapper": (3, 8),
    "checkpoint_io": (3, 8),
}
LIBRARIES = {"procscan", "host", "node_sample"}


def old_python(version: tuple[int, int]) -> str | None:
    """An interpreter of exactly that version, if this machine has one (pyenv or the OS's)."""
    name = f"python{version[0]}.{version[1]}"
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = [p for p in (f"/usr/bin/{name}", f"/usr/local/bin/{name}") if os.access(p, os.X_OK)]
    found += sorted(glob.glob(f"{root}/versions/{version[0]}.{version[1]}.*/bin/{name}"))
    return found[0] if found else None


def run(name: str, *args: str, python: str = sys.executable, cwd: Path,
        input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """The shipped text of ``name`` with no ugrod and no site-packages to import from."""
    return subprocess.run([python, "-I", "-S", "-c", programs.text(name), *args], cwd=cwd,
                          input=input, capture_output=True, timeout=timeout)


@pytest.fixture
def marked(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A live process whose environment says it belongs to a rank's run dir (as ranks do)."""
    run_dir = str(tmp_path / "wd" / "jobs" / "j1" / "attempt-1" / "rank-0")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "UGRO_RUN_DIR": run_dir})
    try:
        yield proc.pid, run_dir
    finally:
        proc.kill()
        proc.wait()


def test_every_file_in_remote_is_a_program_or_a_library() -> None:
    files = {p.stem for p in programs.REMOTE.glob("*.py")} - {"__init__"}
    assert files == set(PROGRAMS) | LIBRARIES


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_shipped_text_is_self_contained_and_parses_on_its_oldest_python(name: str) -> None:
    text = programs.text(name)
    tree = ast.parse(text, feature_version=PROGRAMS[name])
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "ugrod"}
    if PROGRAMS[name] < (3, 7):  # no annotations that 3.6 would evaluate or refuse
        assert "from __future__ import annotations" not in text
    for lib in LIBRARIES:  # each library at most once
        assert text.count(f"# ---- ugrod/nodes/remote/{lib}.py, inlined") <= 1


def test_a_library_that_could_not_be_inlined_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lib.py").write_text('"""doc"""\nfrom __future__ import annotations\nX = 1\n')
    (tmp_path / "prog.py").write_text("from ugrod.nodes.remote.lib import X\nprint(X)\n")
    monkeypatch.setattr(programs, "REMOTE", tmp_path)
    with pytest.raises(ValueError, match="no __future__ import and no main"):
        programs._inline((tmp_path / "prog.py").read_text(), "prog", set())
    (tmp_path / "lib.py").write_text('"""doc\n"quoted" """\nX = 1\n')
    text = programs._inline((tmp_path / "prog.py").read_text(), "prog", set())
    assert "doc" not in text and "X = 1" in text
    assert subprocess.run([sys.executable, "-I", "-c", text], capture_output=True,
                          check=True).stdout == b"1\n"


@pytest.mark.parametrize("name", ["probe", "probe_server", "leftovers", "stack_dump"])
def test_frequent_programs_import_no_typing(name: str, tmp_path: Path) -> None:
    """typing is for mypy only (annotations are quoted): importing it costs every run."""
    text = programs.text(name).replace('if __name__ == "__main__":', "if False:")
    code = text + "\nimport sys\nprint(sorted(m for m in sys.modules if m == 'typing'))\n"
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert res.stdout == "[]\n", res.stderr


def test_probe_reports_the_node_and_its_ranks(tmp_path: Path, marked: tuple[int, str]) -> None:
    pid, _ = marked
    start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "pid").write_text(f"{pid} {start}\n")
    (tmp_path / "reused").mkdir()
    (tmp_path / "reused" / "pid").write_text(f"{pid} {int(start) + 1}\n")  # same pid, not it
    res = run("probe", str(tmp_path / "no" / "such" / "dir"), "/nonexistent/nvidia-smi", "5",
              str(tmp_path / "live" / "pid"), str(tmp_path / "reused" / "pid"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = parse_probe(res.stdout)
    assert [(r.pid, r.alive) for r in s.ranks] == [(pid, True), (pid, False)]
    assert s.cpu_count == os.cpu_count() and s.mem_total_bytes and s.load and s.boot_id
    assert s.disk_path == str(tmp_path) and s.errors == () and not s.nvidia_smi
    assert s.node_s is not None and 0 <= s.node_s < 30


def test_probe_server_answers_each_request_by_id_and_ends_at_eof(tmp_path: Path) -> None:
    lines = probe_request(7) + b"not json\n" + probe_request(8, [str(tmp_path / "pid")])
    res = run("probe_server", str(tmp_path), "/nonexistent/nvidia-smi", "5", cwd=tmp_path,
              input=lines)
    assert res.returncode == 0, res.stderr
    out = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert out[0] == {"v": 1, "ready": True}
    assert [o["id"] for o in out[1:]] == [7, None, 8]
    assert out[2]["bad_request"] == "not json\n"
    assert parse_probe(res.stdout.splitlines()[3]).ranks[0].error is not None  # no pid file


def test_readiness_reports_this_python(tmp_path: Path) -> None:
    res = run("readiness", str(tmp_path), "/nonexistent/nvidia-smi", "30", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    checks = {c.name: c for c in parse_readiness(res.stdout, min_free_bytes=0)}
    assert checks["python"].ok
    assert checks["python"].detail == f"{'.'.join(map(str, sys.version_info[:3]))} at " \
                                      f"{sys.executable}"
    assert checks["disk"].ok and str(tmp_path) in checks["disk"].detail
    assert checks["gpus"].ok and checks["gpus"].detail == "no nvidia-smi on the node (CPU node)"
    # torch is imported by a child of the node's python, with its site-packages
    assert checks["torch"].ok is (importlib.util.find_spec("torch") is not None)


def test_leftovers_lists_live_run_dirs_under_jobs_but_those_to_keep(
        tmp_path: Path, marked: tuple[int, str]) -> None:
    _, run_dir = marked
    jobs = str(tmp_path / "wd" / "jobs")

    def found(*args: str) -> list[str]:
        res = run("leftovers", *args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        reply = json.loads(res.stdout)
        assert reply["v"] == 1
        return list(reply["run_dirs"])

    assert found(jobs + "/") == [run_dir]
    assert found(jobs, run_dir) == []
    assert found(str(tmp_path / "elsewhere")) == []


def test_stack_dump_finds_the_ranks_processes(tmp_path: Path, marked: tuple[int, str]) -> None:
    pid, run_dir = marked
    res = run("stack_dump", "20", run_dir, str(tmp_path / "gone"), cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert reply["ranks"][str(tmp_path / "gone")] == []
    (row,) = reply["ranks"][run_dir]
    assert row["pid"] == pid and "time.sleep(60)" in row["cmd"]
    if reply["py_spy"]:  # py-spy ran: its stacks, or why not
        assert row.get("stacks") or row.get("error")


def test_port_listener_says_ready_and_accepts_each_node(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", programs.text("port_listener"),
                             "127.0.0.1", str(port), "2"], cwd=tmp_path, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for _ in range(2):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert proc.wait(timeout=10) == 0  # done after the second connection
    finally:
        proc.kill()
        proc.wait()


def test_prepare_makes_the_dirs_and_reports_the_wrapper(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wrapper = wd / ".ugro" / "rank_wrapper.py"

    def prepare() -> list[str]:
        res = run("prepare", str(wrapper), str(wd / ".ugro"), str(wd / "jobs"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        return res.stdout.decode().split()

    assert prepare() == [sys.executable, "missing"]
    # root may run ranks as their owners, who must reach their own run dirs under jobs/
    shared = 0o711 if os.geteuid() == 0 else 0o700
    assert [(wd / d).stat().st_mode & 0o777 for d in ("", ".ugro", "jobs")] == \
        [shared, 0o700, shared]
    wrapper.write_bytes(b"print(1)\n")
    assert prepare()[1] == hashlib.sha256(b"print(1)\n").hexdigest()


def test_the_shipped_rank_wrapper_runs_without_ugrod(tmp_path: Path) -> None:
    res = run("rank_wrapper", "status", str(tmp_path / "never-started"), cwd=tmp_path)
    assert json.loads(res.stdout)["alive"] is False, res.stderr


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_runs_on_its_oldest_python(name: str, tmp_path: Path) -> None:
    python = old_python(PROGRAMS[name])
    if python is None:
        pytest.skip(f"no Python {PROGRAMS[name]} on this machine")
    args = {
        "probe": [str(tmp_path), "/nonexistent/nvidia-smi", "5"],
        "probe_server": [str(tmp_path), "/nonexistent/nvidia-smi", "5"],
        "readiness": [str(tmp_path), "/nonexistent/nvidia-smi", "30"],
        "stack_dump": ["5", str(tmp_path / "r")],
        "leftovers": [str(tmp_path / "jobs")],
        "prepare": [str(tmp_path / "w"), str(tmp_path / ".ugro"), str(tmp_path / "jobs")],
        "rank_wrapper": ["status", str(tmp_path / "r")],
        "checkpoint_io": ["list", str(tmp_path)],
    }
    if name == "port_listener":
        res = run(name, "127.0.0.1", "0", "0", python=python, cwd=tmp_path)
        assert res.returncode == 0 and res.stdout == b"ready\n", res.stderr
        return
    res = run(name, *args[name], python=python, cwd=tmp_path, input=b"")
    assert res.returncode == 0, res.stderr
    if name == "probe":
        assert parse_probe(res.stdout).cpu_count == os.cpu_count()
    elif name == "readiness":
        major, minor = PROGRAMS[name]
        assert f"{major}.{minor}." in {c.name: c.detail
                                      for c in parse_readiness(res.stdout)}["python"]
    elif name == "prepare":
        assert res.stdout.decode().split()[1] == "missing"
    else:
        assert json.loads(res.stdout.splitlines()[0])



@pytest.mark.parametrize("parent", ["sshd", "python3"])
def test_the_copier_lowers_the_priority_of_the_sshd_that_carries_it_only(
        tmp_path: Path, parent: str) -> None:
    # The sshd session process of ugrod's bulk connection encrypts every byte of a copy:
    # niced with the copier, so both yield to training. A parent that is not sshd (here
    # a python named python3) keeps its priority.
    exe = tmp_path / parent
    exe.symlink_to(sys.executable)
    copier = [sys.executable, "-I", "-S", "-c", programs.text("checkpoint_io"), "send", "0"]
    script = ("import os, subprocess, sys\n"
              f"subprocess.run(['sh', '-c', 'exec \"$0\" \"$@\"', *{copier!r}], input=b'',\n"
              "               check=True)\n"
              "print(os.getpriority(os.PRIO_PROCESS, 0))\n")
    done = subprocess.run([str(exe), "-I", "-S", "-c", script], capture_output=True,
                          timeout=30, check=True)
    assert int(done.stdout) == (19 if parent == "sshd" else os.getpriority(os.PRIO_PROCESS, 0))
