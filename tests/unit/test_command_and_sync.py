"""The pure parts of day one: the command rule, launch's defaults, manifests and ignore rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ugroctl import syncing
from ugrod.config import loading
from ugrod.config import schema as cf
from ugrod.core import jobspec
from ugrod.nodes import codesync
from ugrod.nodes.remote.rank_wrapper import precheck

PY = "/opt/venv/bin/python"
TR = ["--nnodes=3"]
SHA = "a" * 64


@pytest.mark.parametrize(("argv", "torchrun", "expected", "program"), [
    (["train.py", "--lr", "1"], None, [PY, "train.py", "--lr", "1"], 1),
    (["./train.py"], None, [PY, "./train.py"], 1),
    (["python3", "train.py"], None, ["python3", "train.py"], 0),
    (["./run.sh", "x"], None, ["./run.sh", "x"], 0),
    (["train.py"], TR, [PY, "-m", "torch.distributed.run", *TR, "train.py"], 4),
    (["python3", "train.py"], TR,
     [PY, "-m", "torch.distributed.run", *TR, "--no-python", "python3", "train.py"], 5),
    (["./run.sh"], TR, [PY, "-m", "torch.distributed.run", *TR, "--no-python", "./run.sh"], 5),
])
def test_one_rule_for_the_command(argv: list[str], torchrun: list[str] | None,
                                  expected: list[str], program: int) -> None:
    got, index = jobspec.rank_command(argv, PY, torchrun)
    assert got == expected and index == program
    assert got[index] == argv[0]


def _cfg(text: str = "") -> cf.Config:
    return loading.loads("nodes:\n  a: {ip: 10.0.0.1}\n" + text, env={"USER": "u", "HOME": "/h"})


def test_launch_defaults_to_every_gpu_node_one_gpu_each_and_passes_the_name() -> None:
    cfg = _cfg("paths:\n  scripts: ~/ai-cluster/scripts\n")
    asked: list[int] = []

    def nodes_with(gpus: int) -> int:
        asked.append(gpus)
        return 3
    spec = jobspec.build(jobspec.SubmitBody(launch={"epochs": 1}, submit_dir="/home/u/p"),
                         cfg, 3, nodes_with, "quick_test")
    assert (spec.nodes, spec.gpus_per_node, spec.torchrun) == (3, 1, True) and asked == [1]
    assert spec.argv[0] == "train_production.py" and spec.cwd == "~/ai-cluster/scripts"
    assert spec.argv[spec.argv.index("--job-id") + 1] == "quick_test"
    assert spec.argv[spec.argv.index("--num-epochs") + 1] == "1"
    over = jobspec.build(jobspec.SubmitBody(launch={}, nodes=2, gpus_per_node=0,
                                            cwd="/w"), cfg, 3, nodes_with, "x")
    assert (over.nodes, over.gpus_per_node, over.cwd) == (2, 0, "/w")
    by_config = _cfg("training:\n  nodes: 2\n  gpus_per_node: 2\n")
    spec = jobspec.build(jobspec.SubmitBody(launch={}), by_config, 3, nodes_with, "x")
    assert (spec.nodes, spec.gpus_per_node) == (2, 2)
    with pytest.raises(jobspec.SpecError, match="no schedulable node has 1 GPU"):
        jobspec.build(jobspec.SubmitBody(launch={}), cfg, 3, lambda g: 0, "x")


def test_submit_runs_where_ugroctl_ran_and_sync_replaces_the_directory() -> None:
    cfg = _cfg()
    spec = jobspec.build(jobspec.SubmitBody(argv=["train.py"], nodes=3, gpus_per_node=1,
                                            submit_dir="/home/u/proj"), cfg, 3)
    assert spec.cwd == "/home/u/proj" and spec.torchrun is False  # only --torchrun says so
    tree = "sha256:" + SHA
    spec = jobspec.build(jobspec.SubmitBody(argv=["x"], submit_dir="/p", sync=tree), cfg, 1)
    assert spec.sync == tree and spec.cwd is None
    for bad in ({"cwd": "relative/dir"}, {"sync": "sha256:xyz"}, {"sync": True}):
        with pytest.raises(jobspec.SpecError):
            jobspec.build(jobspec.SubmitBody(argv=["x"], **bad), cfg, 1)  # type: ignore[arg-type]
    syncing_cfg = _cfg("sync:\n  default: true\n")
    with pytest.raises(jobspec.SyncRequired):
        jobspec.build(jobspec.SubmitBody(argv=["x"]), syncing_cfg, 1)
    assert jobspec.build(jobspec.SubmitBody(argv=["x"], sync=False), syncing_cfg, 1).sync is None


def test_manifest_check_names_the_tree_by_its_content() -> None:
    entries = [["b/x.py", 0o755, 3, SHA], ["a.txt", 0o644, 5, "b" * 64]]
    tree, checked = codesync.check_manifest(entries, max_bytes=100, max_files=10)
    assert checked == [("a.txt", 0o600, 5, "b" * 64), ("b/x.py", 0o700, 3, SHA)]
    assert tree == codesync.check_manifest(entries[::-1], max_bytes=100, max_files=10)[0]
    changed = [["b/x.py", 0o755, 3, "c" * 64], entries[1]]
    assert codesync.check_manifest(changed, max_bytes=100, max_files=10)[0] != tree


@pytest.mark.parametrize(("entries", "problem"), [
    ([["../etc/passwd", 0o644, 1, SHA]], "bad path"),
    ([["/abs", 0o644, 1, SHA]], "bad path"),
    ([["a/./b", 0o644, 1, SHA]], "bad path"),
    ([["a", 0o644, 1, "zz"]], "bad sha256"),
    ([["a", 0o644, -1, SHA]], "bad size"),
    ([["a", 0o644, 1, SHA], ["a/b", 0o644, 1, SHA]], "under the file a"),
    ([["a", 0o644, 60, SHA], ["b", 0o644, 60, SHA]], "at most 0 MB"),
    ([[f"f{i}", 0o644, 0, SHA] for i in range(11)], "at most 10 are sent"),
    ("nope", "must be a list"),
])
def test_bad_manifests_are_refused(entries: object, problem: str) -> None:
    with pytest.raises(codesync.SyncError, match=problem):
        codesync.check_manifest(entries, max_bytes=100, max_files=10)


def test_ignore_rules(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    for rel in ("train.py", "pkg/__pycache__/m.pyc", "pkg/m.py", "data/raw/a.bin",
                "out/model.ckpt", "keep.ckpt", "logs/a/b/x.txt", "run.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / ".ugroignore").write_text("# comment\ndata/raw/\n*.ckpt\n!keep.ckpt\n"
                                          "logs/**/x.txt\n")
    entries, sources = syncing.manifest(str(tmp_path), max_bytes=10**6, max_files=100)
    assert sorted(e[0] for e in entries) == ["keep.ckpt", "pkg/m.py", "run.sh", "train.py"]
    assert {e[0]: e[1] for e in entries}["run.sh"] == 0o700
    assert all(os.path.isfile(p) for p, _size, _mtime in sources.values())
    with pytest.raises(syncing.SyncError, match=r"more than 3 files.*ugroignore"):
        syncing.manifest(str(tmp_path), max_bytes=10**6, max_files=3)
    with pytest.raises(syncing.SyncError, match="more than 0 MB"):
        syncing.manifest(str(tmp_path), max_bytes=10, max_files=100)


def test_precheck_says_why_a_command_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print(1)\n")  # not executable: fine for python
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    path = os.environ.get("PATH", os.defpath)
    d = str(tmp_path)
    assert precheck(["py", "train.py"], 1, d, path) is None
    assert precheck(["python3", "train.py"], 0, d, path) is None
    assert "missing.py not found" in str(precheck(["python3", "missing.py"], 0, d, path))
    assert "./run.sh is not executable" in str(precheck(["./run.sh"], 0, d, path))
    (tmp_path / "run.sh").chmod(stat.S_IRWXU)
    assert precheck(["./run.sh"], 0, d, path) is None
    err = precheck(["run.sh"], 0, d, path)
    assert err is not None and "write ./run.sh" in str(err)
    err = precheck(["x"], 0, d + "/gone", path)
    assert err is not None and "does not exist on this node" in str(err) and "--sync" in str(err)
