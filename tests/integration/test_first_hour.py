"""A new user's first hour, played end to end: seed 004's config, `launch`, code in ~/proj.

Three real sshd nodes whose fake nvidia-smi reports a 12 GB card (gpu-master) and two
8 GB cards (gpu1, gpu2); the real ugrod and the real ugroctl, run from the user's own
project directory. The nodes share this machine's disk and home, so the config used by
the daemon also gives each node its own work_dir, this interpreter (it has torch) and a
scripts directory under the test's temporary directory; the seed's file itself, with only
addresses, ports, users and identities changed, is checked as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Ugrod, served, ugroctl_argv
from tests.sshd_nodes import SshdCluster

ROOT = Path(__file__).resolve().parents[2]
SEED = next((ROOT.parent.parent / "shared" / "seeds").glob("004_*.txt"), None) \
    if (ROOT.parent.parent / "shared" / "seeds").is_dir() else None
FAKE = ROOT / "tests" / "fake_nvidia_smi" / "nvidia-smi"
NAMES = ("gpu-master", "gpu1", "gpu2")
CARDS = (("NVIDIA GeForce RTX 5070 Ti", 12282), ("NVIDIA GeForce RTX 4070", 8188),
         ("NVIDIA GeForce RTX 3070 Ti", 8192))
pytestmark = pytest.mark.timeout(240)

# Seed 004's cluster.yaml, as the seed writes it (the file is read from the seed when the
# shared seeds are present, and must equal this).
SEED_CONFIG = """\
cluster:
  name: "Home AI Lab Trondheim"
  master_ip: "192.168.1.100"
  master_port: 29500

nodes:
  gpu-master:
    ip: "192.168.1.100"
    user: "${USER}"
    hostname: "gpu-master"
    gpu: "RTX 5070 Ti"
    vram_gb: 12
    rank: 0
    role: "master"

  gpu1:
    ip: "192.168.1.101"
    user: "ob"
    hostname: "gpu1"
    gpu: "RTX 4070"
    vram_gb: 8
    rank: 1
    role: "worker"

  gpu2:
    ip: "192.168.1.102"
    user: "ollie"
    hostname: "gpu2"
    gpu: "RTX 3070 Ti"
    vram_gb: 8
    rank: 2
    role: "worker"

training:
  batch_size_per_gpu: 1
  gradient_accumulation: 8
  default_model: "unsloth/tinyllama-bnb-4bit"
  default_dataset: "wikitext"

paths:
  project_base: "~/ai-cluster"
  scripts: "~/ai-cluster/scripts"
  results: "~/ugro/data/experiments"
"""

# The seeds' train_production.py, as small as it gets: a real gloo rendezvous of all
# ranks, its argv in the log, one step reported (then a moment, so `launch` sees it).
TRAIN_PRODUCTION = """\
import json, os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
print("ARGV", json.dumps(sys.argv[1:]), "CUDA", os.environ.get("CUDA_VISIBLE_DEVICES"),
      "WORLD", dist.get_world_size(), flush=True)
dist.barrier()
if dist.get_rank() == 0:
    with open(os.environ["UGRO_METRICS_FILE"], "a") as f:
        f.write(json.dumps({"step": 1, "loss": 2.5}) + "\\n")
time.sleep(3)
dist.barrier()
dist.destroy_process_group()
"""

# A project's script: reads a data file by a relative path, as people write them.
PROJECT_TRAIN = """\
import os, sys
with open("data/input.txt") as f:
    print("DATA", f.read().strip(), "IN", os.getcwd(), "ARGS", sys.argv[1:], flush=True)
"""


def seed_yaml() -> str:
    """The seed's cluster.yaml block (checked against SEED_CONFIG when the seed is here)."""
    if SEED is not None:
        text = SEED.read_text()
        block = text.split("**File: `~/ugro/config/cluster.yaml`**", 1)[1]
        block = block.split("```yaml\n", 1)[1].split("```", 1)[0]
        assert block.split() == SEED_CONFIG.split()
    return SEED_CONFIG


def adapted(nodes: SshdCluster) -> dict[str, Any]:
    """The seed's config with only the test nodes' addresses, ports, users and keys."""
    cfg = yaml.safe_load(seed_yaml())
    cfg["cluster"]["master_ip"] = nodes[0].host
    cfg["cluster"]["known_hosts"] = str(nodes.known_hosts)
    for name, node in zip(NAMES, nodes, strict=True):
        cfg["nodes"][name].update(ip=node.host, port=node.port, user=node.user,
                                  identity_file=str(node.identity))
    return cfg


@pytest.fixture
def first_hour(short_tmp: Path, node_guard: SshdCluster) -> Iterator[tuple[Ugrod, Path]]:
    """ugrod on the seed's cluster (12/8/8 GB fake cards); yields it and a scripts dir."""
    for node, (model, mib) in zip(node_guard, CARDS, strict=True):
        shutil.copy(FAKE, node.bin_dir / "nvidia-smi")
        (node.bin_dir / "state.json").write_text(json.dumps({"gpus": [
            {"index": 0, "uuid": f"GPU-{node.name}", "name": model, "memory.total": mib,
             "memory.used": 300, "utilization.gpu": 0, "temperature.gpu": 40,
             "power.draw": 20.0}]}))
    scripts = short_tmp / "scripts"
    scripts.mkdir()
    cfg = adapted(node_guard)
    for name, node in zip(NAMES, node_guard, strict=True):
        cfg["nodes"][name].update(work_dir=str(node.work_dir / "ugro"), python=sys.executable)
    cfg["paths"]["scripts"] = str(scripts)
    # the seeds' experiments folder, here rather than in the real ~ (job dirs go there)
    cfg["paths"]["results"] = str(short_tmp / "experiments")
    cfg["metrics"] = {"enabled": False}
    path = short_tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        with served(Ugrod(short_tmp, config=path, grace_s=2.0),
                    *(node.work_dir for node in node_guard)) as d:
            yield d, scripts
    finally:
        for node in node_guard:
            (node.bin_dir / "nvidia-smi").unlink(missing_ok=True)
            (node.bin_dir / "state.json").unlink(missing_ok=True)


def ctl(d: Ugrod, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real ugroctl, run in the user's directory ``cwd``."""
    return subprocess.run([*ugroctl_argv(), *args], env=d.env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def rank_logs(d: Ugrod, job: str) -> list[str]:
    """The job's central rank logs, in the seeds' layout: paths.results/NAME_TIMESTAMP."""
    (jobdir,) = (d.base / "experiments").glob(f"{job}_*")
    assert re.fullmatch(rf"{job}_\d{{8}}_\d{{6}}", jobdir.name), jobdir
    return [p.read_text(errors="replace") for p in sorted(jobdir.glob("rank_*.log"))]


def project(base: Path, name: str = "proj") -> Path:
    proj = base / name
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "input.txt").write_text("forty-two\n")
    (proj / "train.py").write_text(PROJECT_TRAIN)  # not executable, as people leave them
    (proj / ".git").mkdir()
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / "big.ckpt").write_bytes(b"x" * 1000)
    (proj / ".ugroignore").write_text("# outputs\n*.ckpt\n")
    return proj


def test_seed_config_as_written_loads(short_tmp: Path, ssh_nodes: SshdCluster) -> None:
    path = short_tmp / "seed.yaml"
    path.write_text(yaml.safe_dump(adapted(ssh_nodes)))
    res = subprocess.run([sys.executable, "-m", "ugrod.cli", "--check-config", str(path)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert "ok (3 nodes)" in res.stdout


def test_launch_runs_on_every_gpu_node_with_the_name(first_hour: tuple[Ugrod, Path]) -> None:
    d, scripts = first_hour
    (scripts / "train_production.py").write_text(TRAIN_PRODUCTION)
    res = ctl(d, d.base, "launch", "--name", "quick_test", "--epochs", "1")
    assert res.returncode == 0, res.stdout + res.stderr + d.log()
    out = res.stdout
    assert "rank 0 → gpu-master (RTX 5070 Ti, 12 GB)" in out, out
    assert "rank 1 → gpu1 (RTX 4070, 8 GB)" in out and "rank 2 → gpu2 (RTX 3070 Ti, 8 GB)" in out
    assert "quick_test: training: step 1" in out, out
    assert "rendezvous at" in res.stderr, res.stderr
    done = d.wait_job("quick_test", timeout_s=90)
    assert done["state"] == "succeeded", done["reason"]
    assert [(g["node"], g["gpus"]) for g in done["gpus"]] == [(n, [0]) for n in NAMES]
    for log in rank_logs(d, "quick_test"):
        argv = json.loads(re.search(r"ARGV (\[.*?\]) CUDA", log).group(1))  # type: ignore[union-attr]
        assert argv[argv.index("--job-id") + 1] == "quick_test"
        assert argv[argv.index("--num-epochs") + 1] == "1"
        assert "CUDA 0 WORLD 3" in log
        assert "node_rank is only used" not in log  # no flag torchrun ignores


def test_code_where_the_user_is(first_hour: tuple[Ugrod, Path]) -> None:
    d, _ = first_hour
    proj = project(d.base)
    # The code is at the same path on every node: it runs in this directory.
    for i, cmd in enumerate((["train.py"], ["./train.py"], ["python3", "train.py"])):
        res = ctl(d, proj, "--json", "submit", "--name", f"here{i}", "--nodes", "3",
                  "--max-retries", "2", "--", *cmd, "--lr", "1")
        assert res.returncode == 0, res.stderr
    for i in range(3):
        done = d.wait_job(f"here{i}", timeout_s=60)
        assert done["state"] == "succeeded", done["reason"]
        assert all(f"DATA forty-two IN {proj} ARGS ['--lr', '1']" in log
                   for log in rank_logs(d, f"here{i}"))
    # dry run: no torchrun unless asked; the directory, the nodes and each node's argv
    res = ctl(d, proj, "submit", "--dry-run", "--nodes", "3", "--torchrun", "--",
              "python3", "train.py")
    assert res.returncode == 0, res.stderr
    assert f"directory: {proj}" in res.stdout and "torchrun: yes" in res.stdout, res.stdout
    assert "rank 2 on gpu2 (no GPU):" in res.stdout
    assert "--no-python python3 train.py" in res.stdout and "--node_rank" not in res.stdout
    res = ctl(d, proj, "submit", "--dry-run", "--", "train.py")
    assert "torchrun: no" in res.stdout and f"{sys.executable} train.py" in res.stdout

    # Nodes without the code: the project is moved away before the job starts (held).
    res = ctl(d, proj, "submit", "--name", "nocode", "--hold", "--max-retries", "3", "--",
              "train.py")
    assert res.returncode == 0, res.stderr
    res = ctl(d, proj, "submit", "--sync", "--name", "synced", "--hold", "--nodes", "3",
              "--", "train.py")
    assert res.returncode == 0, res.stderr
    assert "synced " in res.stderr and "2 files" in res.stderr, res.stderr  # .git, *.ckpt out
    moved = proj.rename(d.base / "elsewhere")
    d.ctl("release", "nocode", check=True)
    d.ctl("release", "synced", check=True)
    done = d.wait_job("nocode", timeout_s=60)
    assert done["state"] == "failed" and done["attempt"] == 1, done
    assert f"the working directory {proj} does not exist" in done["reason"]
    assert "--sync" in done["reason"] and "not retried" in done["reason"]
    done = d.wait_job("synced", timeout_s=60)
    assert done["state"] == "succeeded", done["reason"]
    for node, log in zip(d_nodes(d), rank_logs(d, "synced"), strict=True):
        code = node / "ugro" / "jobs" / "synced" / "code"
        assert f"DATA forty-two IN {code}" in log
        assert stat.S_IMODE(code.stat().st_mode) == 0o700
        assert stat.S_IMODE((code / "train.py").stat().st_mode) == 0o400  # a read-only link
        assert not (code / ".git").exists() and not (code / "big.ckpt").exists()
    res = d.ctl("results", "synced")
    tree = d.api("GET", "/v1/jobs/synced")[1]["job"]["spec"]["sync"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", tree) and tree in res.stdout, res.stdout
    # Unchanged: nothing is sent again, and the tree is the same.
    res = ctl(d, moved, "--json", "submit", "--sync", "--name", "again", "--", "train.py")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["spec"]["sync"] == tree
    assert d.wait_job("again", timeout_s=60)["state"] == "succeeded"


def d_nodes(d: Ugrod) -> list[Path]:
    assert d.config is not None
    cfg = yaml.safe_load(d.config.read_text())
    return [Path(cfg["nodes"][n]["work_dir"]).parent for n in NAMES]


def test_a_command_that_cannot_start_burns_no_retry(first_hour: tuple[Ugrod, Path]) -> None:
    d, _ = first_hour
    proj = project(d.base)
    (proj / "run.sh").write_text("#!/bin/sh\necho hi\n")  # not executable
    res = ctl(d, proj, "submit", "--name", "noexec", "--nodes", "3", "--max-retries", "3",
              "--", "./run.sh")
    assert res.returncode == 0, res.stderr
    res = ctl(d, proj, "submit", "--name", "nofile", "--max-retries", "3", "--torchrun",
              "--", "python3", "missing.py")
    assert res.returncode == 0, res.stderr
    began = time.monotonic()
    res = ctl(d, proj, "sweep", "--name", "sw", "--param", "lr=1,2,3", "--max-parallel", "1",
              "--", "./run.sh")
    assert res.returncode == 0, res.stderr
    noexec = d.wait_job("noexec", timeout_s=60)
    assert noexec["state"] == "failed" and noexec["attempt"] == 1, noexec
    assert "./run.sh is not executable (chmod +x ./run.sh" in noexec["reason"], noexec["reason"]
    nofile = d.wait_job("nofile", timeout_s=60)
    assert nofile["state"] == "failed" and nofile["attempt"] == 1, nofile
    assert f"missing.py not found in {proj}" in nofile["reason"], nofile["reason"]
    trials = [d.wait_job(f"sw-{i}", timeout_s=60) for i in range(3)]
    assert sorted(t["state"] for t in trials) == ["cancelled", "cancelled", "failed"], trials
    assert all("sweep sw stopped" in t["reason"] for t in trials if t["state"] == "cancelled")
    assert time.monotonic() - began < 60
    events = d.api("GET", "/v1/events?job=noexec")[1].decode().splitlines()
    assert [json.loads(e)["type"] for e in events].count("job_placed") == 1


def test_cpu_job_on_gpu_nodes_says_so(first_hour: tuple[Ugrod, Path]) -> None:
    d, _ = first_hour
    res = ctl(d, d.base, "submit", "--name", "cpu", "--", "sleep", "30")
    assert res.returncode == 0, res.stderr
    d.wait_job("cpu", ("running",), timeout_s=60)
    detail = d.ctl("status", "cpu", check=True).stdout
    assert re.search(r"none asked for: runs on CPU although gpu\S* has GPUs", detail), detail
    table = d.ctl("status", check=True).stdout
    assert re.search(r"cpu\s+running.*no GPU asked for", table), table
    d.ctl("cancel", "cpu", check=True)
