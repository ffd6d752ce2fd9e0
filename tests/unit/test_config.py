"""cluster.yaml: the example and the seeds' file load; every problem is reported exactly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ugrod.config import loading, paths, sections
from ugrod.config import schema as cf
from ugrod.core.events import Gpu, NodeSpec

ROOT = Path(__file__).resolve().parents[2]
ENV = {"USER": "alice", "HOME": "/home/alice"}
GIB = 1 << 30

# The seeds' cluster.yaml, byte for byte (../shared/seeds/004_*.txt), trailing blanks included.
SEED_YAML = """\
cluster:
  name: "Home AI Lab Trondheim"
  master_ip: "192.168.1.100"
  master_port: 29500
\x20\x20
nodes:
  gpu-master:
    ip: "192.168.1.100"
    user: "${USER}"
    hostname: "gpu-master"
    gpu: "RTX 5070 Ti"
    vram_gb: 12
    rank: 0
    role: "master"
\x20\x20
  gpu1:
    ip: "192.168.1.101"
    user: "ob"
    hostname: "gpu1"
    gpu: "RTX 4070"
    vram_gb: 8
    rank: 1
    role: "worker"
\x20\x20
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

ONE_NODE = "nodes:\n  gpu1:\n    ip: 10.0.0.1\n"


def errors(text: str | bytes, env: dict[str, str] | None = None) -> list[str]:
    """The lines of the ConfigError that loading ``text`` must raise."""
    with pytest.raises(cf.ConfigError) as info:
        loading.loads(text, env=ENV if env is None else env)
    return info.value.lines()


def node(body: str, name: str = "gpu1") -> str:
    """A one-node file whose node has ``body`` (lines at 4 spaces)."""
    lines = "".join(f"    {line}\n" for line in body.splitlines())
    return f"nodes:\n  {name}:\n{lines}"


# ---- files that load --------------------------------------------------------


def test_the_seeds_cluster_yaml_loads_with_user_expanded() -> None:
    seeds = sorted((ROOT.parent / "shared" / "seeds").glob("004_*.txt"))
    if seeds:  # the test's copy must stay the seeds' text
        block = re.search(r"```yaml\n(cluster:.*?)```", seeds[0].read_text(), re.S)
        assert block is not None and block.group(1) == SEED_YAML
    cfg = loading.loads(SEED_YAML, env=ENV)
    assert cfg.cluster.name == "Home AI Lab Trondheim"
    assert (cfg.cluster.master_ip, cfg.cluster.master_port) == ("192.168.1.100", 29500)
    assert cfg.cluster.rdzv_port_range == (29500, 29599)
    assert [n.name for n in cfg.nodes] == ["gpu-master", "gpu1", "gpu2"]
    assert [n.user for n in cfg.nodes] == ["alice", "ob", "ollie"]
    assert [n.rank for n in cfg.nodes] == [0, 1, 2]
    assert [n.role for n in cfg.nodes] == ["master", "worker", "worker"]
    assert cfg.nodes[0].gpus == (Gpu(index=0, model="RTX 5070 Ti", vram_bytes=12 * GIB),)
    assert cfg.nodes[2].gpus == (Gpu(index=0, model="RTX 3070 Ti", vram_bytes=8 * GIB),)
    assert all(n.transport == "ssh" and n.port == 22 and n.work_dir == "~/ugro"
               for n in cfg.nodes)
    assert cfg.training.gradient_accumulation == 8
    assert cfg.training.default_model == "unsloth/tinyllama-bnb-4bit"
    assert cfg.paths.project_base == "~/ai-cluster"  # node-side: kept as written
    assert cfg.paths.results == Path("/home/alice/ugro/data/experiments")  # head-side
    assert cfg.cluster.known_hosts == Path("/home/alice/.ssh/known_hosts")


def test_the_example_loads_and_shows_every_key() -> None:
    path = ROOT / "examples" / "cluster.yaml"
    cfg = loading.load(path, env=ENV)
    assert cfg.source == path
    assert [(n.name, n.user, n.transport) for n in cfg.nodes] == [
        ("gpu-master", "alice", "local"), ("gpu1", "ob", "ssh"), ("gpu2", "ollie", "ssh")]
    assert [n.gpus[0].vram_bytes // GIB for n in cfg.nodes if n.gpus] == [12, 8, 8]
    assert cfg.nodes[1].identity_file == Path("/home/alice/.ssh/id_ed25519")
    assert cfg.scheduler.limits_for("ob") == cf.UserLimits(max_gpus=2, max_jobs=4)
    assert cfg.scheduler.limits_for("zoe") == cf.UserLimits(max_jobs=10)
    assert cfg.training_script() == "~/ai-cluster/scripts/train_production.py"
    assert cfg.training.lr == 2e-4
    # Every key of the schema appears in the example (commented out where unset by default).
    text = path.read_text()
    structs: list[type[Any]] = [cf.ClusterConfig, cf.TrainingConfig, cf.PathsConfig,
                                cf.SchedulerConfig, cf.HealthConfig, cf.Thresholds, cf.Weights,
                                cf.Intervals, cf.MetricsConfig, cf.ApiConfig, cf.UserLimits,
                                cf.SyncConfig]
    keys = {k for s in structs for k in s.__struct_fields__} | set(sections.NODE_KEYS) | set(
        sections.SECTIONS) | {"warn", "crit", "model", "vram_gb"}
    missing = sorted(k for k in keys if not re.search(rf"(^|[\s{{#]){k}:", text, re.M))
    assert missing == []


def test_defaults_are_the_seeds_values() -> None:
    cfg = loading.loads(ONE_NODE, env=ENV)
    h = cfg.health
    assert (h.thresholds.gpu_temp_c, h.thresholds.memory_percent) == (cf.Level(80, 85),
                                                                      cf.Level(90, 95))
    assert (h.thresholds.disk_percent, h.thresholds.latency_ms) == (cf.Level(90, 95),
                                                                    cf.Level(50, 100))
    assert (h.healthy_min, h.degraded_min, h.failures_to_open, h.max_backoff_s) == (
        80, 60, 3, 300)
    i = h.intervals
    assert (i.active_s, i.recent_s, i.idle_s, i.long_idle_s, i.max_s) == (5, 10, 20, 40, 60)
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.enabled) == ("127.0.0.1", 9327, True)
    assert cfg.api.max_body_bytes == 1 << 20
    assert (cfg.scheduler.interval_s, cfg.scheduler.backfill) == (30, True)
    n = cfg.nodes[0]
    assert (n.port, n.user, n.transport, n.python, n.work_dir) == (22, "alice", "ssh",
                                                                   "python3", "~/ugro")
    assert n.gpus is None  # not stated: read from nvidia-smi later


def test_health_settings_fit_the_health_module() -> None:
    from ugrod.core import health

    assert health.Thresholds(**cf.builtin(env=ENV).health.score_settings()) == (
        health.DEFAULT_THRESHOLDS)
    cfg = loading.loads(ONE_NODE + "health:\n  thresholds: {gpu_temp_c: {warn: 70, crit: 75}}\n"
                   "  weights: {latency_ms: {warn: 1, crit: 2}}\n  intervals: {active_s: 2}\n",
                   env=ENV)
    t = health.Thresholds(**cfg.health.score_settings())
    assert (t.gpu_temp_warn_c, t.gpu_temp_crit_c, t.latency_warn_cost) == (70, 75, 1)
    assert health.Intervals(**msgspec.structs.asdict(cfg.health.intervals)) == (
        health.Intervals(active_s=2))


def test_builtin_is_this_machine_alone() -> None:
    cfg = cf.builtin(env=ENV)
    (n,) = cfg.nodes
    assert (n.name, n.host, n.transport, n.user, n.rank) == ("local", "127.0.0.1", "local",
                                                             "alice", 0)
    assert n.work_dir == "~/ugro" and n.gpus is None and cfg.source is None
    assert cfg.node_specs() == (NodeSpec(name="local", host="127.0.0.1", user="alice",
                                         transport="local", rank=0),)
    gpu = Gpu(index=0, model="RTX 4070", vram_bytes=8 * GIB)
    named = cf.builtin("gpu-master.lan", gpus=(gpu,), env=ENV)
    assert named.nodes[0].name == "gpu-master.lan" and named.nodes[0].gpus == (gpu,)
    assert cf.builtin("bad host!", env=ENV).nodes[0].name == "local"
    assert cf.builtin("x" * 70 + ".lan", env=ENV).nodes[0].name == "local"


def test_a_file_without_nodes_is_the_builtin_node_with_its_settings() -> None:
    cfg = loading.loads("scheduler: {backfill: false}\n", env=ENV)
    assert cfg.nodes == cf.builtin(env=ENV).nodes and cfg.scheduler.backfill is False


def test_node_specs() -> None:
    cfg = loading.loads(SEED_YAML, env=ENV)
    specs = cfg.node_specs()
    assert specs[1] == NodeSpec(name="gpu1", host="192.168.1.101", user="ob", transport="ssh",
                                gpus=(Gpu(index=0, model="RTX 4070", vram_bytes=8 * GIB),),
                                rank=1)
    assert cfg.node("gpu2").host == "192.168.1.102"
    with pytest.raises(KeyError):
        cfg.node("gpu9")


def test_gpu_forms() -> None:
    listed = loading.loads(node("ip: 10.0.0.1\ngpus:\n  - {model: A100, vram_gb: 40}\n"
                           "  - {model: A100, vram_gb: 40, uuid: GPU-1}"), env=ENV)
    assert listed.nodes[0].gpus == (Gpu(index=0, model="A100", vram_bytes=40 * GIB),
                                    Gpu(index=1, model="A100", vram_bytes=40 * GIB,
                                        uuid="GPU-1"))
    none = loading.loads(node("ip: 10.0.0.1\ngpus: []"), env=ENV)
    assert none.nodes[0].gpus == () and none.node_specs()[0].gpus == ()
    half = loading.loads(node("ip: 10.0.0.1\nvram_gb: 7.5"), env=ENV)
    assert half.nodes[0].gpus == (Gpu(index=0, model="", vram_bytes=int(7.5 * GIB)),)


def test_anchors_and_merge_keys_work() -> None:
    text = ("x-w: &w {user: ob, port: 2222, labels: [small]}\n"
            "nodes:\n  a: {<<: *w, ip: 10.0.0.1}\n  b: {<<: *w, ip: 10.0.0.2, port: 22}\n")
    a, b = loading.loads(text, env=ENV).nodes
    assert (a.user, a.port, a.labels, b.port) == ("ob", 2222, ("small",), 22)


def test_training_template_renders_argv() -> None:
    cfg = loading.loads(ONE_NODE + "training:\n  script: /opt/train.py\n  lr: 1e-4\n"
                   "  args_template: ['--lr={lr}', '{{literal}}', '{name}', '{model}']\n",
                   env=ENV)
    assert cfg.training_script() == "/opt/train.py"
    assert cfg.training.render_args(name="exp1") == ("--lr=0.0001", "{literal}", "exp1",
                                                     "unsloth/tinyllama-bnb-4bit")
    assert cfg.training.render_args(name="e", model="m", lr=0.5)[::2] == ("--lr=0.5", "e")


# ---- environment and ~ expansion --------------------------------------------


def test_environment_expansion() -> None:
    env = {**ENV, "NODE_IP": "10.1.2.3", "PORT": "2222", "EMPTY": ""}
    cfg = loading.loads(node("ip: $NODE_IP\nport: ${PORT}\nuser: ${WHO:-ob}\npython: "
                        "/opt/$$HOME/${EMPTY:-py}/bin/python"), env=env)
    n = cfg.nodes[0]
    assert (n.host, n.port, n.user, n.python) == ("10.1.2.3", 2222, "ob",
                                                  "/opt/$HOME/py/bin/python")


def test_user_and_home_come_from_the_password_database_when_unset() -> None:
    import pwd

    me = pwd.getpwuid(os.getuid())
    cfg = loading.loads(SEED_YAML, env={})
    assert cfg.nodes[0].user == me.pw_name
    assert cfg.cluster.known_hosts == Path(me.pw_dir) / ".ssh" / "known_hosts"
    assert loading.loads(node("ip: 10.0.0.1\nuser: ${LOGNAME}"),
                         env={"USER": ""}).nodes[0].user == me.pw_name


@pytest.mark.parametrize(("value", "problem"), [
    ("${NOPE}", "environment variable NOPE is not set"),
    ("$NOPE/x", "environment variable NOPE is not set"),
    ("${1BAD}", "bad variable reference '${1BAD}': expected ${NAME} or ${NAME:-default} "
                "('$$' is a literal '$')"),
    ("${OPEN", "unterminated '${' in '${OPEN'"),
    ("a $ b", "'$' must be followed by a variable name or '{NAME}' (write '$$' for a literal "
              "'$')"),
])
def test_bad_environment_references(value: str, problem: str) -> None:
    assert errors(node(f"ip: 10.0.0.1\nuser: '{value}'")) == [
        f"cluster.yaml: nodes.gpu1.user: {problem}"]


def test_tilde_only_where_paths_are_meant(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text(node("ip: 10.0.0.1\nidentity_file: keys/id\nwork_dir: ~/w\ngpu: '~x'")
                 + "cluster: {known_hosts: ~/kh, state_dir: '~'}\n")
    cfg = loading.load(f, env={**ENV, "USER": "ignored"})
    n = cfg.nodes[0]
    assert n.identity_file == tmp_path / "keys" / "id"  # relative to the file
    assert n.work_dir == "~/w"  # node-side: that node's home
    assert n.gpus is not None and n.gpus[0].model == "~x"
    assert cfg.cluster.known_hosts == Path("/home/alice/kh")
    assert cfg.cluster.state_dir == Path("/home/alice")
    assert errors(node("ip: 10.0.0.1\nwork_dir: ugro")) == [
        "cluster.yaml: nodes.gpu1.work_dir: expected an absolute path or one starting with ~/, "
        "got 'ugro'"]
    assert errors(node("ip: 10.0.0.1\nidentity_file: ~nosuchuser9/k")) == [
        "cluster.yaml: nodes.gpu1.identity_file: no user 'nosuchuser9' for '~nosuchuser9'"]


# ---- every problem, exactly -------------------------------------------------

CASES: list[tuple[str, list[str]]] = [
    (node("ip: 10.0.0.1\nvram_gb: eight"),
     ["nodes.gpu1.vram_gb: expected a positive number, got 'eight'"]),
    (node("ip: 10.0.0.1\nvram_gb: 0"), ["nodes.gpu1.vram_gb: expected a positive number, got 0"]),
    (node("ip: 10.0.0.1\nvram_gb: .nan"),
     ["nodes.gpu1.vram_gb: expected a positive number, got .nan"]),
    (node("ip: 10.0.0.1\nvram_gb: 1e300"),
     ["nodes.gpu1.vram_gb: expected a positive number no larger than 1048576, got 1e+300"]),
    (node("ip: 10.0.0.1\nport: true"),
     ["nodes.gpu1.port: expected an integer from 1 to 65535, got true"]),
    (node("ip: 10.0.0.1\nport: 22.0"),
     ["nodes.gpu1.port: expected an integer from 1 to 65535, got 22.0"]),
    (node("ip: 10.0.0.1\nport: '22'"),
     ["nodes.gpu1.port: expected an integer from 1 to 65535, got '22'"]),
    (node("ip: 10.0.0.1\nrank: -1"), ["nodes.gpu1.rank: expected a non-negative integer, got -1"]),
    (node("ip: 10.0.0.1\nrank: yes"),
     ["nodes.gpu1.rank: expected a non-negative integer, got true"]),
    (node("ip: 10.0.0.1\nvram: 8"), ["nodes.gpu1.vram: unknown key; did you mean 'vram_gb'?"]),
    (node("ip: 10.0.0.1\ncolour: red"),
     ["nodes.gpu1.colour: unknown key; expected one of: gpu, gpu_exporter, gpus, host, hostname, "
      "identity_file, ip, labels, port, python, rank, role, transport, user, vram_gb, "
      "work_dir"]),
    ("cluster: {nmae: lab}\n" + ONE_NODE, ["cluster.nmae: unknown key; did you mean 'name'?"]),
    ("node:\n  gpu1: {ip: 10.0.0.1}\n", ["node: unknown key; did you mean 'nodes'?"]),
    (node("ip: 192.168.1.300"),
     ["nodes.gpu1.ip: expected an IP address or a hostname, got '192.168.1.300'"]),
    (node("host: -oProxyCommand=x"),
     ["nodes.gpu1.host: expected an IP address or a hostname, got '-oProxyCommand=x'"]),
    (node("ip: 10.0.0.1\nhost: a.lan"), ["nodes.gpu1: give 'ip' or 'host', not both"]),
    (node("user: ob"),
     ["nodes.gpu1: missing 'ip' (or 'host'): the address ugrod reaches the node at over SSH"]),
    (node("ip: 10.0.0.1\nuser: -oops"),
     ["nodes.gpu1.user: expected a user name, got '-oops'"]),
    (node("ip: 10.0.0.1\ntransport: rsh"),
     ["nodes.gpu1.transport: expected 'ssh' or 'local', got 'rsh'"]),
    (node("ip: 10.0.0.1\nrole: boss"),
     ["nodes.gpu1.role: expected 'master' or 'worker', got 'boss'"]),
    (node("ip: 10.0.0.1\npython: --version"),
     ["nodes.gpu1.python: expected a program name or path such as python3 or "
      "/opt/venv/bin/python, got '--version'"]),
    (node("ip: 10.0.0.1\nlabels: [ok, 'b c', 3]"),
     ["nodes.gpu1.labels[1]: expected a label (letters, digits and . _ : = / -), got 'b c'",
      "nodes.gpu1.labels[2]: expected a string, got 3"]),
    (node("ip: 10.0.0.1\nlabels: fast"),
     ["nodes.gpu1.labels: expected a list of labels, got 'fast'"]),
    (node("ip: 10.0.0.1\ngpu: A\ngpus: []"),
     ["nodes.gpu1: give either 'gpu' and 'vram_gb' (one GPU) or 'gpus' (a list), not both"]),
    (node("ip: 10.0.0.1\ngpus: [{model: A, vram_gb: x}, 7, {modle: B}]"),
     ["nodes.gpu1.gpus[0].vram_gb: expected a positive number, got 'x'",
      "nodes.gpu1.gpus[1]: expected a mapping {model, vram_gb}, got 7",
      "nodes.gpu1.gpus[2].modle: unknown key; did you mean 'model'?"]),
    (node("ip: 10.0.0.1", name="bad name!"),
     ["nodes.bad name!: invalid node name: expected 1-64 letters, digits, '.', '_' or '-', "
      "starting with a letter or digit, without '..'"]),
    ("nodes:\n  1: {ip: 10.0.0.1}\n", ["nodes: node names must be strings, got 1"]),
    ("nodes:\n  gpu1:\n", ["nodes.gpu1: expected a mapping of node settings (ip, user, gpu, "
                           "...), got null"]),
    ("nodes: {}\n", ["nodes: expected at least one node"]),
    ("nodes: [gpu1, gpu2]\n",
     ["nodes: expected a mapping of node name to node settings, got a list"]),
    ("nodes:\n  a: {ip: 10.0.0.1, rank: 1}\n  b: {ip: 10.0.0.2, rank: 1}\n",
     ["nodes.b.rank: rank 1 is also given to a"]),
    ("nodes:\n  a: {ip: 10.0.0.1, role: master}\n  b: {ip: 10.0.0.2, role: master}\n",
     ["nodes.b.role: only one node can be the master; a already is"]),
    ("nodes:\n  a: {ip: 10.0.0.1, role: master, rank: 1}\n",
     ["nodes.a.rank: the master node must have rank 0 (rank 0 is the rendezvous host)"]),
    ("nodes:\n  a: {ip: 10.0.0.1, role: master}\n  b: {ip: 10.0.0.2, rank: 0}\n",
     ["nodes.b.rank: rank 0 belongs to the master node (a): it is the rendezvous host"]),
    ("nodes:\n  a: {transport: local}\n  b: {transport: local}\n",
     ["nodes.b.transport: only one node can use transport 'local' (the head node itself); "
      "a does"]),
    ("cluster: {master_port: 0}\n" + ONE_NODE,
     ["cluster.master_port: expected an integer from 1 to 65535, got 0"]),
    ("cluster: {master_port: 29400, rdzv_port_range: [29500, 29599]}\n" + ONE_NODE,
     ["cluster.master_port: 29400 is outside rdzv_port_range [29500, 29599]"]),
    ("cluster: {rdzv_port_range: [30000, 29000]}\n" + ONE_NODE,
     ["cluster.rdzv_port_range: expected [low, high] with low <= high, got [30000, 29000]"]),
    ("cluster: {rdzv_port_range: 29500}\n" + ONE_NODE,
     ["cluster.rdzv_port_range: expected a list of two ports [low, high], got 29500"]),
    ("cluster: {network_interface: 'eth0; rm -rf'}\n" + ONE_NODE,
     ["cluster.network_interface: expected a network interface name such as 'eth0' "
      "(NCCL_SOCKET_IFNAME syntax), got 'eth0; rm -rf'"]),
    ("cluster: {ssh_keepalive_s: 0}\n" + ONE_NODE,
     ["cluster.ssh_keepalive_s: expected a number of at least 1, got 0"]),
    ("cluster: {ssh_keepalive_s: 'often'}\n" + ONE_NODE,
     ["cluster.ssh_keepalive_s: expected a number of at least 1, got 'often'"]),
    ("cluster: {name: ''}\n" + ONE_NODE, ["cluster.name: expected a non-empty string"]),
    ("cluster: lab\n" + ONE_NODE, ["cluster: expected a mapping, got 'lab'"]),
    (ONE_NODE + "training: {batch_size_per_gpu: 0, epochs: 1.5, lr: -1}\n",
     ["training.batch_size_per_gpu: expected a positive integer, got 0",
      "training.epochs: expected a positive integer, got 1.5",
      "training.lr: expected a positive number, got -1"]),
    (ONE_NODE + "training:\n  args_template: ['{model}', '{foo}', '{', 3, '{lr!r}']\n",
     ["training.args_template[1]: unknown placeholder {foo}; use {model}, {dataset}, {epochs}, "
      "{lr}, {name}, {batch_size_per_gpu}, {gradient_accumulation}, {nproc_per_node}",
      "training.args_template[2]: Single '{' encountered in format string (write {{ and }} "
      "for literal braces)",
      "training.args_template[3]: expected a string, got 3",
      "training.args_template[4]: unknown placeholder {lr}; use {model}, {dataset}, {epochs}, "
      "{lr}, {name}, {batch_size_per_gpu}, {gradient_accumulation}, {nproc_per_node}"]),
    (ONE_NODE + "training: {args_template: '--lr {lr}'}\n",
     ["training.args_template: expected a list of strings, got '--lr {lr}'"]),
    (ONE_NODE + "paths: {scripts: scripts}\n",
     ["paths.scripts: expected an absolute path or one starting with ~/, got 'scripts'"]),
    (ONE_NODE + "scheduler: {interval_s: 0, backfill: 'yes please', default_max_retries: -2}\n",
     ["scheduler.interval_s: expected a positive number, got 0",
      "scheduler.backfill: expected true or false, got 'yes please'",
      "scheduler.default_max_retries: expected a non-negative integer, got -2"]),
    (ONE_NODE + "scheduler:\n  user_limits:\n    ob: {max_gpus: -1, max_job: 2}\n"
                "    '-x': {}\n    7: {}\n",
     ["scheduler.user_limits.ob.max_job: unknown key; did you mean 'max_jobs'?",
      "scheduler.user_limits.ob.max_gpus: expected a non-negative integer, got -1",
      "scheduler.user_limits.-x: expected a user name or '*' (everyone not listed)",
      "scheduler.user_limits: user names must be strings, got 7"]),
    (ONE_NODE + "health:\n  thresholds:\n    gpu_temp_c: {warn: 90, crit: 85}\n"
                "    disk_percent: {warn: 101}\n    gpu_temp: {warn: 1}\n",
     ["health.thresholds.gpu_temp: unknown key; did you mean 'gpu_temp_c'?",
      "health.thresholds.gpu_temp_c: warn (90) must not be above crit (85)",
      "health.thresholds.disk_percent.warn: expected a number from 0 to 100, got 101"]),
    (ONE_NODE + "health:\n  thresholds: {latency_ms: 50}\n  weights: {gpu_error: 120}\n",
     ["health.thresholds.latency_ms: expected a mapping {warn: N, crit: N}, got 50",
      "health.weights.gpu_error: expected a number from 0 to 100, got 120"]),
    (ONE_NODE + "health:\n  degraded_min: 90\n  failures_to_open: 0\n"
                "  intervals: {active_s: 100, recent_window_s: 9000}\n",
     ["health.failures_to_open: expected a positive integer, got 0",
      "health.intervals.active_s: 100 is above max_s (60)",
      "health.intervals.recent_window_s: 9000 is above idle_window_s (7200)",
      "health.degraded_min: 90 is above healthy_min (80)"]),
    (ONE_NODE + "metrics: {port: 70000, host: 'not a host', enabled: 1}\n",
     ["metrics.enabled: expected true or false, got 1",
      "metrics.host: expected an IP address or a hostname, got 'not a host'",
      "metrics.port: expected an integer from 0 to 65535 (0: any free port), got 70000"]),
    (ONE_NODE + "api: {max_body_bytes: 0}\n",
     ["api.max_body_bytes: expected a positive integer, got 0"]),
    (ONE_NODE + "training: {default_model: 2024-01-01}\n",
     ["training.default_model: expected a string, got a date"]),
    (ONE_NODE + "cluster: {admin_group: 'a b', socket_group: 7, cgroups: maybe}\n",
     ["cluster.admin_group: expected a group name, got 'a b'",
      "cluster.socket_group: expected a string, got 7",
      "cluster.cgroups: expected true or false, got 'maybe'"]),
    (ONE_NODE + "users:\n  alice: {user: 'bad user', identity_fle: x}\n"
                "  bob: {nodes: {gpu2: {user: bob2}, gpu1: {usr: b}}}\n  carol: {}\n"
                "  dave: [x]\n",
     ["users.alice.identity_fle: unknown key; did you mean 'identity_file'?",
      "users.alice.user: expected a remote user name, got 'bad user'",
      "users.bob.nodes.gpu2: no node named 'gpu2'; did you mean 'gpu1'?",
      "users.bob.nodes.gpu1.usr: unknown key; did you mean 'user'?",
      "users.bob.nodes.gpu1: missing 'user': the remote account on this node",
      "users.bob: expected 'user' (the remote account on every SSH node) or 'nodes' "
      "(per node)",
      "users.carol: expected 'user' (the remote account on every SSH node) or 'nodes' "
      "(per node)",
      "users.dave: expected a mapping {user, identity_file, nodes}, got a list"]),
    ("nodes:\n  head: {transport: local}\nusers: {alice: {nodes: {head: {user: a}}}}\n",
     ["users.alice.nodes.head: is the local node: its jobs run as their owner's own "
      "account, with no SSH login to map",
      "users.alice: expected 'user' (the remote account on every SSH node) or 'nodes' "
      "(per node)"]),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_each_problem_names_the_key_and_what_was_expected(text: str,
                                                          expected: list[str]) -> None:
    assert errors(text) == [f"cluster.yaml: {e}" for e in expected]


def test_users_map_owners_to_remote_accounts_per_node_or_cluster_wide() -> None:
    cfg = loading.loads("nodes:\n  gpu1: {ip: 10.0.0.1, user: shared}\n"
                   "  gpu2: {ip: 10.0.0.2, user: shared}\n"
                   "users:\n  alice: {user: alice, identity_file: /keys/alice}\n"
                   "  bob: {nodes: {gpu2: {user: bob2}}}\n", env=ENV)
    alice = cfg.remote_account("alice", "gpu1")
    assert alice is not None and (alice.user, alice.identity_file) == ("alice",
                                                                       Path("/keys/alice"))
    assert cfg.remote_account("bob", "gpu1") is None  # the shared nodes.gpu1.user
    bob = cfg.remote_account("bob", "gpu2")
    assert bob is not None and bob.user == "bob2"
    assert cfg.remote_account("carol", "gpu2") is None


def test_all_problems_are_reported_together() -> None:
    text = ("cluster: {master_port: x}\n"
            + node("ip: 10.0.0.1\nvram_gb: eight\nport: 0\nrank: -1\nprot: 1")
            + "metrics: {port: -1}\n")
    assert errors(text) == [
        "cluster.yaml: cluster.master_port: expected an integer from 1 to 65535, got 'x'",
        "cluster.yaml: nodes.gpu1.prot: unknown key; did you mean 'port'?",
        "cluster.yaml: nodes.gpu1.vram_gb: expected a positive number, got 'eight'",
        "cluster.yaml: nodes.gpu1.port: expected an integer from 1 to 65535, got 0",
        "cluster.yaml: nodes.gpu1.rank: expected a non-negative integer, got -1",
        "cluster.yaml: metrics.port: expected an integer from 0 to 65535 (0: any free port), "
        "got -1",
    ]


def test_the_error_carries_path_and_problems(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(node("ip: 10.0.0.1\nvram_gb: eight"))
    with pytest.raises(cf.ConfigError) as info:
        loading.load(f, env=ENV)
    e = info.value
    assert e.path == str(f)
    assert e.problems == [cf.Problem("nodes.gpu1.vram_gb",
                                     "expected a positive number, got 'eight'")]
    assert (e.where, e.problem) == ("nodes.gpu1.vram_gb", "expected a positive number, got "
                                                          "'eight'")
    assert str(e) == f"{f}: nodes.gpu1.vram_gb: expected a positive number, got 'eight'"


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(cf.ConfigError) as info:
        loading.load(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"
    with pytest.raises(cf.ConfigError, match="cannot read: Is a directory"):
        loading.load(tmp_path)


# ---- malformed and hostile input ----------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("nodes:\n  a: [1, 2\n  b: c\n",
     "line 3, column 4: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow "
     "sequence)"),
    ("nodes:\n\tgpu1: {}\n",
     "line 2, column 1: invalid YAML: found character '\\t' that cannot start any token (while "
     "scanning for the next token)"),
    ("- gpu1\n- gpu2\n",
     "expected a mapping of sections (cluster, nodes, training, paths, scheduler, health, "
     "metrics, api, users, sync, checkpoints), got a list"),
    ("just words",
     "expected a mapping of sections (cluster, nodes, training, paths, scheduler, health, "
     "metrics, api, users, sync, checkpoints), got 'just words'"),
    ("42", "expected a mapping of sections (cluster, nodes, training, paths, scheduler, "
           "health, metrics, api, users, sync, checkpoints), got 42"),
    ("", "the file is empty: expected a mapping of sections (cluster, nodes, training, paths, "
         "scheduler, health, metrics, api, users, sync, checkpoints)"),
    ("# only a comment\n", "the file is empty: expected a mapping of sections (cluster, nodes, "
                           "training, paths, scheduler, health, metrics, api, users, sync, checkpoints)"),
    ("a: 1\n---\nb: 2\n", "line 2, column 1: invalid YAML: expected a single document in the "
                          "stream, but found another document"),
    ("nodes: !!python/object/apply:os.system ['true']\n",
     "line 1, column 8: tag '!!python/object/apply:os.system' is not allowed: cluster.yaml is "
     "plain YAML (mappings, lists, strings, numbers)"),
    ("nodes: !!python/object:__main__.X {}\n",
     "line 1, column 8: tag '!!python/object:__main__.X' is not allowed: cluster.yaml is plain "
     "YAML (mappings, lists, strings, numbers)"),
    ("nodes: !custom {}\n", "line 1, column 8: tag '!custom' is not allowed: cluster.yaml is "
                            "plain YAML (mappings, lists, strings, numbers)"),
    ("a: &x [*x]\n", "line 1, column 4: an alias refers to a value that contains it"),
    ("a: *nowhere\n", "line 1, column 4: invalid YAML: found undefined alias 'nowhere'"),
    ("a: \x00\n", "line 1, column 4: character U+0000 is not allowed in YAML"),
    ("a: " + "9" * 5000 + "\n", "invalid YAML value: Exceeds the limit (4300 digits) for "
                               "integer string conversion: value has 5000 digits; use "
                               "sys.set_int_max_str_digits() to increase the limit"),
    ("a: 2024-13-45\n", "invalid YAML value: month must be in 1..12"),
])
def test_malformed_yaml(text: str, expected: str) -> None:
    assert errors(text) == [f"cluster.yaml: {expected}"]


def test_duplicate_keys_are_refused_not_silently_overwritten() -> None:
    text = ("nodes:\n  gpu1:\n    ip: 10.0.0.1\n    user: ob\n    ip: 10.0.0.9\n"
            "  gpu1:\n    ip: 10.0.0.2\n")
    assert errors(text) == [
        "cluster.yaml: line 5, column 5: duplicate key 'ip' (first on line 3)",
        "cluster.yaml: line 6, column 3: duplicate key 'gpu1' (first on line 2)",
    ]
    # A merge key (<<) may be overridden: that is what it is for.
    assert loading.loads("x-a: &a {ip: 10.0.0.1}\nnodes: {g: {<<: *a, ip: 10.0.0.2}}\n",
                    env=ENV).nodes[0].host == "10.0.0.2"


def test_non_utf8_bytes() -> None:
    assert errors(b"nodes:\n  gpu1:\n    ip: \xff\xfe\n") == [
        "cluster.yaml: line 3: not UTF-8 text (byte 0xff at offset 23)"]
    assert loading.loads(b"\xef\xbb\xbf" + ONE_NODE.encode(), env=ENV).nodes[0].host == "10.0.0.1"
    assert loading.loads(node("ip: 10.0.0.1\ngpu: 'Tésla ✓'").encode(), env=ENV).nodes[0].gpus


def test_a_billion_laughs_is_refused_quickly() -> None:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    assert errors("\n".join(lines) + "\n") == [
        "cluster.yaml: line 6, column 5: aliases expand to more than 100000 values"]


def test_an_alias_chain_too_deep_is_refused() -> None:
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 40)]
    assert errors("\n".join(lines) + "\n") == [
        "cluster.yaml: line 32, column 6: aliases nest more than 32 levels deep"]


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    assert errors("a: " + "[" * 100_000 + "]" * 100_000) == [
        "cluster.yaml: line 1, column 35: nested more than 32 levels deep"]
    assert errors("a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 60))) == [
        "cluster.yaml: line 32, column 32: nested more than 32 levels deep"]


def test_huge_input_is_refused(tmp_path: Path) -> None:
    big = "# " + "x" * (1 << 20) + "\n" + ONE_NODE
    assert errors(big) == ["cluster.yaml: the file is larger than 1048576 bytes (1 MiB)"]
    f = tmp_path / "big.yaml"
    f.write_text(big)
    with pytest.raises(cf.ConfigError, match="larger than 1048576 bytes"):
        loading.load(f)


def test_ten_kilobyte_keys_and_values_are_shortened_in_messages() -> None:
    key = "k" * 10_000
    # YAML itself caps implicit keys at 1024 characters; an explicit key (?) has no cap.
    assert errors(node(f"ip: 10.0.0.1\n{key}: 1")) == [
        "cluster.yaml: line 4, column 10005: invalid YAML: could not find expected ':' "
        "(while scanning a simple key)"]
    got = errors(node(f"ip: 10.0.0.1\n? {key}\n: 1\nuser: {'u' * 10_000}"))
    assert got == [
        f"cluster.yaml: nodes.gpu1.{'k' * 40}...: unknown key; expected one of: gpu, "
        "gpu_exporter, gpus, "
        "host, hostname, identity_file, ip, labels, port, python, rank, role, transport, user, "
        "vram_gb, work_dir",
        "cluster.yaml: nodes.gpu1.user: expected a string without NUL of at most 4096 "
        f"characters, got '{'u' * 40}'... (10000 characters)",
    ]
    assert all(len(line) < 300 for line in got)
    name = "n" * 10_000
    assert errors(f"nodes:\n  ? {name}\n  : {{ip: 10.0.0.1}}\n") == [
        f"cluster.yaml: nodes.{'n' * 40}...: invalid node name: expected 1-64 letters, digits, "
        "'.', '_' or '-', starting with a letter or digit, without '..'"]


# ---- state dir and socket ----------------------------------------------------


def test_default_paths_for_root_and_users() -> None:
    env = {"HOME": "/home/a", "XDG_RUNTIME_DIR": "/run/user/1000", "XDG_STATE_HOME": "/xs"}
    assert paths.default_state_dir(env, uid=0) == Path("/var/lib/ugro")
    assert paths.default_socket_path(env, uid=0) == Path("/run/ugro/ugrod.sock")
    assert paths.default_state_dir(env, uid=1000) == Path("/xs/ugro")
    assert paths.default_socket_path(env, uid=1000) == Path("/run/user/1000/ugro/ugrod.sock")
    bare = {"HOME": "/home/a", "XDG_RUNTIME_DIR": "relative/ignored"}
    assert paths.default_state_dir(bare, uid=1000) == Path("/home/a/.local/state/ugro")
    assert paths.default_socket_path(bare, uid=1000) == Path("/tmp/ugro-1000/ugrod.sock")
    assert paths.config_candidates(bare, uid=1000)[:2] == (
        Path("/home/a/.config/ugro/cluster.yaml"), Path("/home/a/ugro/config/cluster.yaml"))
    assert cf.default_socket_path is paths.default_socket_path


def test_resolve_paths_precedence_flag_env_config_default() -> None:
    cfg = loading.loads(ONE_NODE + "cluster: {state_dir: /cfg/state, socket: /cfg/s.sock}\n",
                   env=ENV)
    env = {"HOME": "/home/a", "XDG_RUNTIME_DIR": "/run/user/7"}
    envd = {**env, "UGRO_STATE_DIR": "~/envstate", "UGRO_SOCKET": "/env/s.sock"}
    assert cf.resolve_paths(cfg, flag_state_dir="/f/st", flag_socket="/f/s.sock", env=envd,
                            uid=7) == (Path("/f/st"), Path("/f/s.sock"))
    assert cf.resolve_paths(cfg, env=envd, uid=7) == (Path("/home/a/envstate"),
                                                      Path("/env/s.sock"))
    assert cf.resolve_paths(cfg, env=env, uid=7) == (Path("/cfg/state"), Path("/cfg/s.sock"))
    assert cf.resolve_paths(cf.builtin(env=ENV), env=env, uid=7) == (
        Path("/home/a/.local/state/ugro"), Path("/run/user/7/ugro/ugrod.sock"))
    assert cf.resolve_paths(None, env={**env, "UGRO_SOCKET": ""}, uid=0) == (
        Path("/var/lib/ugro"), Path("/run/ugro/ugrod.sock"))


def test_ugroctl_can_import_the_socket_rule_without_heavy_modules() -> None:
    code = ("import sys, ugrod.config.paths; ugrod.config.paths.default_socket_path(); "
            "print(sorted(m for m in ('yaml', 'msgspec', 'aiohttp', 'ugrod.config.schema') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


# ---- fuzzing: a Config or a ConfigError, nothing else -----------------------

KEYS = sorted(set(sections.SECTIONS) | set(sections.NODE_KEYS) | {
    k for s in (cf.ClusterConfig, cf.TrainingConfig, cf.SchedulerConfig, cf.HealthConfig,
                cf.MetricsConfig, cf.Intervals, cf.Thresholds) for k in s.__struct_fields__}
    | {"warn", "crit", "model", "gpu1", "x-a", "<<", "*"})
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["10.0.0.1", "${USER}", "$", "$$", "~", "~/x", "{lr}", "{", "ssh",
                              "local", "master", "eight", "2e-4", "", "a b", "-x"])
           | st.text(max_size=12))
yamlish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5), max_leaves=25)
documents = st.dictionaries(st.sampled_from(KEYS), yamlish, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_fuzzed_mappings_give_a_config_or_a_config_error(doc: dict[str, Any]) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        cfg = loading.loads(text, env=ENV)
    except cf.ConfigError as exc:
        assert exc.problems and all(isinstance(p, cf.Problem) for p in exc.problems)
        assert all(line.startswith("cluster.yaml: ") for line in exc.lines())
    else:
        assert cfg.nodes and isinstance(cfg.node_specs()[0], NodeSpec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(bytes))
def test_fuzzed_text_and_bytes_give_a_config_or_a_config_error(data: str | bytes) -> None:
    try:
        loading.loads(data, env=ENV)
    except cf.ConfigError as exc:
        assert exc.problems
