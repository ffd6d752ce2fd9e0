"""The configuration's shape: frozen, typed sections of cluster.yaml, and their defaults.

``loading.py`` turns a file into a ``Config`` (``sections.py`` reads each section,
``reader.py`` parses the YAML and collects every problem); ``builtin`` is the cluster
without a file (this machine alone). ``docs/config.md`` is the reference for every key.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from ugrod.config.paths import default_socket_path, default_state_dir, expand_user_path
from ugrod.config.reader import (
    ConfigError,
    Problem,
)
from ugrod.core.events import Gpu, NodeSpec
from ugrod.core.limits import UserLimits, limits_for
from ugrod.core.names import NAME_RE

__all__ = [
    "ApiConfig", "ClusterConfig", "Config", "ConfigError", "HealthConfig", "Intervals", "Level",
    "MetricsConfig", "NodeConfig", "PathsConfig", "Problem", "SchedulerConfig", "SyncConfig",
    "Thresholds", "TrainingConfig", "UserLimits", "Weights", "builtin", "default_socket_path",
    "resolve_paths",
]

GIB: Final = 1 << 30
LABEL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=/-]{0,62}")
USER_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}\$?")
IFNAME_RE: Final = re.compile(r"[A-Za-z0-9_.:,^=-]{1,64}")
PLACEHOLDERS: Final = ("model", "dataset", "epochs", "lr", "name", "batch_size_per_gpu",
                       "gradient_accumulation", "nproc_per_node")
DEFAULT_ARGS: Final = ("--model-name", "{model}", "--dataset-name", "{dataset}",
                       "--num-epochs", "{epochs}", "--learning-rate", "{lr}", "--job-id", "{name}")


# ---- the typed configuration ----------------------------------------------


class Level(msgspec.Struct, frozen=True):
    """A warning and a critical value (thresholds), or the points each costs (weights)."""

    warn: float
    crit: float


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str = "ugro"
    master_ip: str | None = None  # rendezvous host; None: the rank-0 node's address
    master_port: int = 29500
    rdzv_port_range: tuple[int, int] = (29500, 29599)
    known_hosts: Path = Path("~/.ssh/known_hosts")  # expanded by the loader
    network_interface: str | None = None  # NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME
    # SSH keepalive interval; a node silent for 3 of them is dropped and reconnected.
    ssh_keepalive_s: float = 15.0
    state_dir: Path | None = None
    socket: Path | None = None
    # Members of this group may drain/undrain/reload/trust nodes and change others' jobs
    # (root always may). None: root alone.
    admin_group: str | None = None
    # The socket is 0660 root:socket_group (who may submit at all); None: ugrod's group.
    socket_group: str | None = None
    # A cgroup per rank where the wrapper can make one (root, cgroup v2); false: never.
    cgroups: bool = True


class RemoteAccount(msgspec.Struct, frozen=True, kw_only=True):
    """The SSH account one owner's ranks run as (on one node, or on every node)."""

    user: str
    identity_file: Path | None = None


class UserMapping(msgspec.Struct, frozen=True, kw_only=True):
    """``users.OWNER``: the remote account for OWNER's jobs, cluster-wide and per node."""

    default: RemoteAccount | None = None
    nodes: Mapping[str, RemoteAccount] = msgspec.field(
        default_factory=lambda: types.MappingProxyType({}))

    def account(self, node: str) -> RemoteAccount | None:
        return self.nodes.get(node) or self.default


class NodeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One node. ``gpus`` None: not stated, read from nvidia-smi; () : a node without GPUs."""

    name: str
    host: str
    port: int = 22
    user: str = ""
    identity_file: Path | None = None
    work_dir: str = "~/ugro"  # node-side: ~ is that node's home
    transport: str = "ssh"  # "ssh" | "local"
    python: str = "python3"
    gpus: tuple[Gpu, ...] | None = None
    rank: int | None = None
    role: str | None = None  # "master" | "worker"
    labels: tuple[str, ...] = ()
    hostname: str | None = None  # informational, as in the seeds
    gpu_exporter: bool = False  # runs exporters/gpu_exporter.py (a Prometheus target)

    def spec(self) -> NodeSpec:
        return NodeSpec(name=self.name, host=self.host, port=self.port, user=self.user,
                        transport=self.transport, work_dir=self.work_dir, python=self.python,
                        labels=self.labels, gpus=self.gpus or (), rank=self.rank)


class TrainingConfig(msgspec.Struct, frozen=True, kw_only=True):
    batch_size_per_gpu: int = 1
    gradient_accumulation: int = 8
    default_model: str = "unsloth/tinyllama-bnb-4bit"
    default_dataset: str = "wikitext"
    script: str | None = None  # node-side; relative: in paths.scripts (None: jobspec.SEED_SCRIPT)
    args_template: tuple[str, ...] = DEFAULT_ARGS
    nodes: int | None = None  # launch's size; None: every schedulable node with the GPUs
    gpus_per_node: int | None = None  # None: 1, the seeds' shape
    nproc_per_node: int = 1
    epochs: int = 1
    lr: float = 2e-4

    def render_args(self, *, name: str, model: str | None = None, dataset: str | None = None,
                    epochs: int | None = None, lr: float | None = None) -> tuple[str, ...]:
        """args_template with its placeholders filled (validated at load: no other fields)."""
        values = {
            "name": name, "model": model or self.default_model,
            "dataset": dataset or self.default_dataset,
            "epochs": self.epochs if epochs is None else epochs,
            "lr": self.lr if lr is None else lr,
            "batch_size_per_gpu": self.batch_size_per_gpu,
            "gradient_accumulation": self.gradient_accumulation,
            "nproc_per_node": self.nproc_per_node,
        }
        return tuple(a.format_map(values) for a in self.args_template)


class PathsConfig(msgspec.Struct, frozen=True, kw_only=True):
    project_base: str | None = None  # node-side
    scripts: str | None = None  # node-side
    results: Path | None = None  # head-side: job dirs RESULTS/NAME_TIME (else STATE_DIR/jobs)


class CheckpointsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Copies of every job's checkpoints in the head's job directory (docs/frameworks.md)."""

    copy: str = "latest"  # latest | every | none; a job may say otherwise
    keep: int = 2  # copies kept per job on the head (0: all)
    max_mb_s: float = 50.0  # the copy's rate, cluster-wide (0: unlimited)
    min_free_gb: float = 10.0  # copying stops before the head's free space falls below
    interval_s: float = 30.0  # how often a running job's nodes are looked at
    stage: str = "rank0"  # where a retry's checkpoint is put: rank 0's node, or all nodes


class SyncConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``--sync``: whether it is the default, and how much one directory may hold."""

    default: bool = False
    max_mb: int = 1024
    max_files: int = 20000


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    interval_s: float = 30.0
    backfill: bool = True
    user_limits: Mapping[str, UserLimits] = msgspec.field(
        default_factory=lambda: types.MappingProxyType({}))
    default_max_retries: int = 0
    retry_backoff_s: float = 10.0

    def limits_for(self, user: str) -> UserLimits:
        """The user's own limits, else those of ``"*"``, else none."""
        return limits_for(self.user_limits, user)


class Thresholds(msgspec.Struct, frozen=True, kw_only=True):
    gpu_temp_c: Level = Level(80.0, 85.0)
    gpu_memory_percent: Level = Level(90.0, 95.0)
    memory_percent: Level = Level(90.0, 95.0)
    disk_percent: Level = Level(90.0, 95.0)
    latency_ms: Level = Level(50.0, 100.0)


class Weights(msgspec.Struct, frozen=True, kw_only=True):
    """Points taken off a score of 100 when a value passes its warn / crit threshold."""

    gpu_temp_c: Level = Level(15.0, 30.0)
    gpu_memory_percent: Level = Level(10.0, 20.0)
    memory_percent: Level = Level(10.0, 25.0)
    disk_percent: Level = Level(10.0, 20.0)
    latency_ms: Level = Level(5.0, 15.0)
    no_rank_process: float = 10.0  # an active job's rank process is missing
    gpu_error: float = 100.0  # a GPU faulted ([Unknown Error], [GPU requires reset], missing)


class Intervals(msgspec.Struct, frozen=True, kw_only=True):
    active_s: float = 5.0  # jobs running
    recent_s: float = 10.0  # activity within recent_window_s
    idle_s: float = 20.0  # activity within idle_window_s
    long_idle_s: float = 40.0
    max_s: float = 60.0
    recent_window_s: float = 1800.0
    idle_window_s: float = 7200.0


class HealthConfig(msgspec.Struct, frozen=True, kw_only=True):
    thresholds: Thresholds = Thresholds()
    weights: Weights = Weights()
    healthy_min: float = 80.0
    degraded_min: float = 60.0
    failures_to_open: int = 3
    max_backoff_s: float = 300.0
    intervals: Intervals = Intervals()
    check_timeout_s: float = 10.0
    # A job keeps running while one of its nodes is out of reach as long as its other
    # nodes show progress, for at most this long (a job's own unreachable_tolerance_s wins).
    unreachable_tolerance_s: float = 1800.0

    def score_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``ugrod.core.health.Thresholds`` (its flat field names)."""
        t, w = self.thresholds, self.weights
        out: dict[str, Any] = {
            "healthy_min": self.healthy_min, "degraded_min": self.degraded_min,
            "no_ranks_cost": w.no_rank_process, "gpu_fault_cost": w.gpu_error}
        for key, prefix, unit in (("gpu_temp_c", "gpu_temp", "_c"),
                                  ("gpu_memory_percent", "gpu_memory", "_percent"),
                                  ("memory_percent", "memory", "_percent"),
                                  ("disk_percent", "disk", "_percent"),
                                  ("latency_ms", "latency", "_ms")):
            level, cost = getattr(t, key), getattr(w, key)
            out |= {f"{prefix}_warn{unit}": level.warn, f"{prefix}_crit{unit}": level.crit,
                    f"{prefix}_warn_cost": cost.warn, f"{prefix}_crit_cost": cost.crit}
        return out


class MetricsConfig(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9327  # 0: any free port


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_body_bytes: int = 1 << 20
    idle_timeout_s: float = 30.0           # a connection with no request is closed after this
    max_connections: int = 4096            # in all (also bounded by the descriptor limit)
    max_connections_per_user: int = 256    # per peer uid; past it: the oldest idle one closes


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The whole cluster.yaml. ``source`` is the file it came from (None: built in)."""

    cluster: ClusterConfig = ClusterConfig()
    nodes: tuple[NodeConfig, ...]
    training: TrainingConfig = TrainingConfig()
    paths: PathsConfig = PathsConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    health: HealthConfig = HealthConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    # owner (local user name) -> the remote account their jobs run as on SSH nodes;
    # owners not listed run as nodes.X.user (a shared account: see README, Security).
    users: Mapping[str, UserMapping] = msgspec.field(
        default_factory=lambda: types.MappingProxyType({}))
    sync: SyncConfig = SyncConfig()
    checkpoints: CheckpointsConfig = CheckpointsConfig()
    source: Path | None = None

    def remote_account(self, owner: str, node: str) -> RemoteAccount | None:
        """The account ``owner``'s ranks use on SSH node ``node`` (None: the node's user)."""
        mapping = self.users.get(owner)
        return mapping.account(node) if mapping is not None else None

    def node_specs(self) -> tuple[NodeSpec, ...]:
        """The nodes as the events ``node_added``/``node_updated`` carry them."""
        return tuple(n.spec() for n in self.nodes)

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def training_script(self) -> str | None:
        """training.script, joined to paths.scripts when relative (both node-side)."""
        script = self.training.script
        if script is None or script.startswith(("/", "~")) or not self.paths.scripts:
            return script
        return f"{self.paths.scripts.rstrip('/')}/{script}"


# ---- defaults: the cluster without a file, who we are, where state lives ---------


def builtin(hostname: str | None = None, gpus: tuple[Gpu, ...] = (),
            env: Mapping[str, str] | None = None) -> Config:
    """The cluster used without a config file: this machine alone, local transport."""
    cluster = ClusterConfig(known_hosts=expand_user_path("~/.ssh/known_hosts", env))
    return Config(cluster=cluster, nodes=(local_node(hostname, gpus, env),))


def local_node(hostname: str | None = None, gpus: tuple[Gpu, ...] = (),
               env: Mapping[str, str] | None = None) -> NodeConfig:
    """This machine as a node: named after ``hostname`` when that is a valid node name."""
    name = "local"
    if hostname:
        short = hostname if NAME_RE.fullmatch(hostname) else hostname.split(".", 1)[0]
        name = short if NAME_RE.fullmatch(short) else "local"
    return NodeConfig(name=name, host="127.0.0.1", user=current_user(env), transport="local",
                      gpus=gpus or None, rank=0, role="master")


def current_user(env: Mapping[str, str] | None = None) -> str:
    """$USER, else $LOGNAME, else the password database's name for our uid."""
    env = os.environ if env is None else env
    for var in ("USER", "LOGNAME"):
        if env.get(var):
            return env[var]
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def resolve_paths(cfg: Config | None, *, flag_state_dir: str | os.PathLike[str] | None = None,
                  flag_socket: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None,
                  uid: int | None = None) -> tuple[Path, Path]:
    """(state_dir, socket): flag, else $UGRO_STATE_DIR/$UGRO_SOCKET, else config, else default."""
    env = os.environ if env is None else env

    def pick(flag: str | os.PathLike[str] | None, var: str, configured: Path | None,
             default: Path) -> Path:
        for value in (flag, env.get(var) or None):
            if value is not None and os.fspath(value):
                return expand_user_path(value, env)
        return configured if configured is not None else default

    cluster = cfg.cluster if cfg is not None else ClusterConfig()
    return (pick(flag_state_dir, "UGRO_STATE_DIR", cluster.state_dir,
                 default_state_dir(env, uid)),
            pick(flag_socket, "UGRO_SOCKET", cluster.socket, default_socket_path(env, uid)))
