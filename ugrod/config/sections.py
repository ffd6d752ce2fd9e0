"""cluster.yaml's sections read into the typed configuration, every problem reported at once.

One function per section walks the parsed YAML (plain data from ``reader.parse_yaml``)
with a ``Reader``: a bad value becomes a ``Problem(where, problem)`` naming its key path
and the reader goes on, so ``loading.loads`` can raise them all together as one
``ConfigError``. Cross-field rules (unique node names, one master, users' accounts
on existing nodes) are checked here too.
"""

from __future__ import annotations

import difflib
import re
import string
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from ugrod.config.paths import expand_user_path
from ugrod.config.reader import (
    Bad,
    Reader,
    Reported,
    join_key,
    show,
)
from ugrod.config.schema import (
    GIB,
    IFNAME_RE,
    LABEL_RE,
    PLACEHOLDERS,
    USER_RE,
    ApiConfig,
    CheckpointsConfig,
    ClusterConfig,
    Config,
    HealthConfig,
    Intervals,
    Level,
    MetricsConfig,
    NodeConfig,
    PathsConfig,
    RemoteAccount,
    SchedulerConfig,
    SyncConfig,
    Thresholds,
    TrainingConfig,
    UserMapping,
    Weights,
    current_user,
    local_node,
)
from ugrod.core.events import Gpu
from ugrod.core.limits import UserLimits
from ugrod.core.names import NAME_RE, NAME_RULE

SECTIONS: Final = ("cluster", "nodes", "training", "paths", "scheduler", "health", "metrics",
                   "api", "users", "sync", "checkpoints")
NODE_KEYS: Final = ("ip", "host", "hostname", "port", "user", "identity_file", "work_dir",
                    "transport", "python", "gpu", "vram_gb", "gpus", "rank", "role", "labels",
                    "gpu_exporter")
PORT_PHRASE: Final = "an integer from 1 to 65535"
_PROGRAM_RE: Final = re.compile(r"[^-\s].*", re.DOTALL)


def _fields(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    return tuple(cls.__struct_fields__)


def read_config(r: Reader, data: Any) -> Config | None:
    sections = ", ".join(SECTIONS)
    if data is None:
        r.fail("", f"the file is empty: expected a mapping of sections ({sections})")
        return None
    if not isinstance(data, dict):
        r.fail("", f"expected a mapping of sections ({sections}), got {show(data)}")
        return None
    # Top-level keys starting with "x-" are free, for YAML anchors (as in docker compose).
    top = r.section({k: v for k, v in data.items()
                     if not (isinstance(k, str) and k.startswith("x-"))}, "", SECTIONS) or {}
    cluster = _read_cluster(r, top.get("cluster"))
    nodes = (_read_nodes(r, top["nodes"]) if "nodes" in top else (local_node(env=r.env),))
    return Config(
        cluster=cluster,
        nodes=nodes,
        users=_read_users(r, top.get("users"), nodes),
        training=_read_training(r, top.get("training")),
        paths=_read_paths(r, top.get("paths")),
        scheduler=_read_scheduler(r, top.get("scheduler")),
        health=_read_health(r, top.get("health")),
        metrics=_read_metrics(r, top.get("metrics")),
        api=_read_api(r, top.get("api")),
        sync=_read_sync(r, top.get("sync")),
        checkpoints=_read_checkpoints(r, top.get("checkpoints")),
    )


def _read_cluster(r: Reader, raw: Any) -> ClusterConfig:
    w = "cluster"
    m = r.section(raw, w, _fields(ClusterConfig), none_ok=True) or {}
    port = r.integer(1, 65535, phrase=PORT_PHRASE)

    def port_range(value: Any, where: str) -> tuple[int, int]:
        if not (isinstance(value, list) and len(value) == 2):
            raise Bad(f"expected a list of two ports [low, high], got {show(value)}")
        lo, hi = (port(v, where) for v in value)
        if lo > hi:
            raise Bad(f"expected [low, high] with low <= high, got [{lo}, {hi}]")
        return lo, hi

    rdzv = r.get(m, w, "rdzv_port_range", port_range, None)
    master_port = r.get(m, w, "master_port", port, rdzv[0] if rdzv else 29500)
    if rdzv is None:
        rdzv = (master_port, min(master_port + 99, 65535))
    elif not rdzv[0] <= master_port <= rdzv[1]:
        r.fail("cluster.master_port",
               f"{master_port} is outside rdzv_port_range [{rdzv[0]}, {rdzv[1]}]")
    known_hosts = r.get(m, w, "known_hosts", r.local_path, None)
    return ClusterConfig(
        name=r.get(m, w, "name", r.text, "ugro"),
        master_ip=r.get(m, w, "master_ip", r.host, None),
        master_port=master_port,
        rdzv_port_range=rdzv,
        known_hosts=known_hosts or expand_user_path("~/.ssh/known_hosts", r.env),
        network_interface=r.get(m, w, "network_interface", r.matching(
            IFNAME_RE, "a network interface name such as 'eth0' (NCCL_SOCKET_IFNAME syntax)"),
            None),
        ssh_keepalive_s=r.get(m, w, "ssh_keepalive_s", r.number(1, 300), 15.0),
        state_dir=r.get(m, w, "state_dir", r.local_path, None),
        socket=r.get(m, w, "socket", r.local_path, None),
        admin_group=r.get(m, w, "admin_group", r.matching(USER_RE, "a group name"), None),
        socket_group=r.get(m, w, "socket_group", r.matching(USER_RE, "a group name"), None),
        cgroups=r.get(m, w, "cgroups", r.boolean, True),
    )


def _read_users(r: Reader, raw: Any, nodes: Sequence[NodeConfig]) -> Mapping[str, UserMapping]:
    """users: {OWNER: {user, identity_file, nodes: {NODE: {user, identity_file}}}}."""
    if raw is None:
        return types.MappingProxyType({})
    if not isinstance(raw, dict):
        r.fail("users", f"expected a mapping of user name to remote account "
                        f"({{user, identity_file, nodes}}), got {show(raw)}")
        return types.MappingProxyType({})
    names = [n.name for n in nodes]
    ssh = {n.name for n in nodes if n.transport == "ssh"}
    remote = r.matching(USER_RE, "a remote user name")

    def account(m: Mapping[str, Any], at: str) -> RemoteAccount | None:
        if "user" not in m:
            if "identity_file" in m:
                r.fail(at, "missing 'user': the remote account that identity_file logs in as")
            return None
        return RemoteAccount(user=r.get(m, at, "user", remote, ""),
                             identity_file=r.get(m, at, "identity_file", r.local_path, None))

    out: dict[str, UserMapping] = {}
    for owner, body in raw.items():
        if not isinstance(owner, str):
            r.fail("users", f"user names must be strings, got {show(owner)}")
            continue
        at = join_key("users", owner)
        if not USER_RE.fullmatch(owner):
            r.fail(at, "expected a local user name (the owner of the jobs)")
        m = r.section(body, at, ("user", "identity_file", "nodes"),
                      what="a mapping {user, identity_file, nodes}")
        if m is None:
            continue
        per_node: dict[str, RemoteAccount] = {}
        raw_nodes = m.get("nodes")
        if raw_nodes is not None and not isinstance(raw_nodes, dict):
            r.fail(join_key(at, "nodes"), f"expected a mapping of node name to "
                                          f"{{user, identity_file}}, got {show(raw_nodes)}")
        for node, nbody in (raw_nodes or {}).items() if isinstance(raw_nodes, dict) else ():
            nat = join_key(join_key(at, "nodes"), str(node))
            if node not in names:
                close = difflib.get_close_matches(str(node), names, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else \
                    "expected one of the nodes: " + ", ".join(names)
                r.fail(nat, f"no node named {node!r}; {hint}")
                continue
            if node not in ssh:
                r.fail(nat, "is the local node: its jobs run as their owner's own account, "
                            "with no SSH login to map")
                continue
            nm = r.section(nbody, nat, ("user", "identity_file"),
                           what="a mapping {user, identity_file}")
            acc = account(nm, nat) if nm is not None else None
            if nm is not None and acc is None:
                r.fail(nat, "missing 'user': the remote account on this node")
            if acc is not None:
                per_node[node] = acc
        default = account(m, at)
        if default is None and not per_node:
            r.fail(at, "expected 'user' (the remote account on every SSH node) or 'nodes' "
                       "(per node)")
        out[owner] = UserMapping(default=default, nodes=types.MappingProxyType(per_node))
    return types.MappingProxyType(out)


def _read_nodes(r: Reader, raw: Any) -> tuple[NodeConfig, ...]:
    if not isinstance(raw, dict):
        r.fail("nodes", f"expected a mapping of node name to node settings, got {show(raw)}")
        return ()
    if not raw:
        r.fail("nodes", "expected at least one node")
        return ()
    nodes: list[NodeConfig] = []
    for name, body in raw.items():
        if not isinstance(name, str):
            r.fail("nodes", f"node names must be strings, got {show(name)}")
            continue
        where = join_key("nodes", name)
        if not NAME_RE.fullmatch(name):
            r.fail(where, f"invalid node name: expected {NAME_RULE}")
        node = _read_node(r, name, body, where)
        if node is not None:
            nodes.append(node)
    _check_nodes(r, nodes)
    return tuple(nodes)


def _read_node(r: Reader, name: str, raw: Any, w: str) -> NodeConfig | None:
    m = r.section(raw, w, NODE_KEYS, what="a mapping of node settings (ip, user, gpu, ...)")
    if m is None:
        return None
    transport = r.get(m, w, "transport", r.choice("ssh", "local"), "ssh")
    if "ip" in m and "host" in m:
        r.fail(w, "give 'ip' or 'host', not both")
    address_key = "ip" if "ip" in m else "host"
    host = r.get(m, w, address_key, r.host, "")
    if address_key not in m:
        if transport == "local":
            host = "127.0.0.1"
        else:
            r.fail(w, "missing 'ip' (or 'host'): the address ugrod reaches the node at over SSH")
    vram = r.number(0, 1 << 20, strict=True)
    gpus: tuple[Gpu, ...] | None = None
    if "gpus" in m and ("gpu" in m or "vram_gb" in m):
        r.fail(w, "give either 'gpu' and 'vram_gb' (one GPU) or 'gpus' (a list), not both")
    elif "gpus" in m:
        def gpu_list(value: Any, where: str) -> tuple[Gpu, ...]:
            def one(item: Any, at: str) -> Gpu:
                g = r.section(item, at, ("model", "vram_gb", "uuid"),
                              what="a mapping {model, vram_gb}")
                if g is None:
                    raise Reported
                return Gpu(index=0, model=r.get(g, at, "model", r.text, ""),
                           vram_bytes=round(r.get(g, at, "vram_gb", vram, 0.0) * GIB),
                           uuid=r.get(g, at, "uuid", r.text, ""))
            items = r.items(value, where, one, "a list of GPUs ({model, vram_gb})")
            return tuple(msgspec.structs.replace(g, index=i) for i, g in enumerate(items))
        gpus = r.get(m, w, "gpus", gpu_list, None)
    elif "gpu" in m or "vram_gb" in m:
        gpus = (Gpu(index=0, model=r.get(m, w, "gpu", r.text, ""),
                    vram_bytes=round(r.get(m, w, "vram_gb", vram, 0.0) * GIB)),)
    labels = r.get(m, w, "labels", lambda v, at: tuple(dict.fromkeys(r.items(
        v, at, r.matching(LABEL_RE, "a label (letters, digits and . _ : = / -)"),
        "a list of labels"))), ())
    return NodeConfig(
        name=name, host=host, transport=transport, gpus=gpus, labels=labels,
        hostname=r.get(m, w, "hostname", r.host, None),
        port=r.get(m, w, "port", r.integer(1, 65535, phrase=PORT_PHRASE), 22),
        user=r.get(m, w, "user", r.matching(USER_RE, "a user name"), None)
        or current_user(r.env),
        identity_file=r.get(m, w, "identity_file", r.local_path, None),
        work_dir=r.get(m, w, "work_dir", r.node_path, "~/ugro"),
        python=r.get(m, w, "python", r.matching(
            _PROGRAM_RE, "a program name or path such as python3 or /opt/venv/bin/python"),
            "python3"),
        rank=r.get(m, w, "rank", r.integer(0, 65535), None),
        role=r.get(m, w, "role", r.choice("master", "worker"), None),
        gpu_exporter=r.get(m, w, "gpu_exporter", r.boolean, False),
    )


def _check_nodes(r: Reader, nodes: Sequence[NodeConfig]) -> None:
    """Rules across nodes: distinct ranks, one master (rank 0), one local head."""

    def at(n: str, key: str) -> str:
        return f"{join_key('nodes', n)}.{key}"

    by_rank: dict[int, str] = {}
    for n in nodes:
        if n.rank is not None:
            if n.rank in by_rank:
                r.fail(at(n.name, "rank"), f"rank {n.rank} is also given to {by_rank[n.rank]}")
            else:
                by_rank[n.rank] = n.name
    masters = [n for n in nodes if n.role == "master"]
    for extra in masters[1:]:
        r.fail(at(extra.name, "role"),
               f"only one node can be the master; {masters[0].name} already is")
    if masters:
        master = masters[0]
        if master.rank not in (None, 0):
            r.fail(at(master.name, "rank"),
                   "the master node must have rank 0 (rank 0 is the rendezvous host)")
        elif master.rank is None and by_rank.get(0, master.name) != master.name:
            r.fail(at(by_rank[0], "rank"),
                   f"rank 0 belongs to the master node ({master.name}): it is the rendezvous host")
    local = [n for n in nodes if n.transport == "local"]
    for extra in local[1:]:
        r.fail(at(extra.name, "transport"), f"only one node can use transport 'local' "
                                            f"(the head node itself); {local[0].name} does")


def _read_training(r: Reader, raw: Any) -> TrainingConfig:
    w, d = "training", TrainingConfig()
    m = r.section(raw, w, _fields(TrainingConfig), none_ok=True) or {}
    positive = r.integer(0, 1 << 20, strict=True)

    def arg(value: Any, where: str) -> str:
        if not isinstance(value, str) or isinstance(value, bool):
            raise Bad(f"expected a string, got {show(value)}")
        out = r.expand(value)
        problem = placeholders_problem(out)
        if problem:
            raise Bad(problem)
        return out

    return TrainingConfig(
        batch_size_per_gpu=r.get(m, w, "batch_size_per_gpu", positive, d.batch_size_per_gpu),
        gradient_accumulation=r.get(m, w, "gradient_accumulation", positive,
                                    d.gradient_accumulation),
        default_model=r.get(m, w, "default_model", r.text, d.default_model),
        default_dataset=r.get(m, w, "default_dataset", r.text, d.default_dataset),
        script=r.get(m, w, "script", r.text, None),
        args_template=r.get(m, w, "args_template", lambda v, at: tuple(r.items(
            v, at, arg, "a list of strings")), d.args_template),
        nodes=r.get(m, w, "nodes", r.integer(1, 1024), None),
        gpus_per_node=r.get(m, w, "gpus_per_node", r.integer(0, 64), None),
        nproc_per_node=r.get(m, w, "nproc_per_node", positive, d.nproc_per_node),
        epochs=r.get(m, w, "epochs", positive, d.epochs),
        lr=r.get(m, w, "lr", r.number(0, 1e6, strict=True), d.lr),
    )


def _read_paths(r: Reader, raw: Any) -> PathsConfig:
    w = "paths"
    m = r.section(raw, w, _fields(PathsConfig), none_ok=True) or {}
    return PathsConfig(project_base=r.get(m, w, "project_base", r.node_path, None),
                       scripts=r.get(m, w, "scripts", r.node_path, None),
                       results=r.get(m, w, "results", r.local_path, None))


def _read_scheduler(r: Reader, raw: Any) -> SchedulerConfig:
    w, d = "scheduler", SchedulerConfig()
    m = r.section(raw, w, _fields(SchedulerConfig), none_ok=True) or {}
    count = r.integer(0, 1 << 20)

    def limits(value: Any, where: str) -> Mapping[str, UserLimits]:
        if not isinstance(value, dict):
            raise Bad(f"expected a mapping of user name to limits, got {show(value)}")
        out: dict[str, UserLimits] = {}
        for user, body in value.items():
            if not isinstance(user, str):
                r.fail(where, f"user names must be strings, got {show(user)}")
                continue
            at = join_key(where, user)
            if user != "*" and not USER_RE.fullmatch(user):
                r.fail(at, "expected a user name or '*' (everyone not listed)")
            lm = r.section(body, at, ("max_gpus", "max_jobs"))
            if lm is not None:
                out[user] = UserLimits(max_gpus=r.get(lm, at, "max_gpus", count, None),
                                       max_jobs=r.get(lm, at, "max_jobs", count, None))
        return types.MappingProxyType(out)

    return SchedulerConfig(
        interval_s=r.get(m, w, "interval_s", r.number(0, 86400, strict=True), d.interval_s),
        backfill=r.get(m, w, "backfill", r.boolean, d.backfill),
        user_limits=r.get(m, w, "user_limits", limits, d.user_limits),
        default_max_retries=r.get(m, w, "default_max_retries", r.integer(0, 100),
                                  d.default_max_retries),
        retry_backoff_s=r.get(m, w, "retry_backoff_s", r.number(0, 7 * 86400),
                              d.retry_backoff_s),
    )


def _read_health(r: Reader, raw: Any) -> HealthConfig:
    w, d = "health", HealthConfig()
    m = r.section(raw, w, _fields(HealthConfig), none_ok=True) or {}
    score = r.number(0, 100, phrase="a number from 0 to 100")
    seconds = r.number(0, 86400, strict=True)

    def levels(cls: type[Thresholds] | type[Weights], default: Thresholds | Weights,
               weights: bool) -> Callable[[Any, str], Any]:
        def check(value: Any, where: str) -> Any:
            sm = r.section(value, where, _fields(cls))
            if sm is None:
                raise Reported
            out: dict[str, Any] = {}
            for key, item in sm.items():
                at = join_key(where, key)
                was = getattr(default, key)
                if not isinstance(was, Level):
                    out[key] = r.get(sm, where, key, score, was)
                    continue
                bound = score if weights or key.endswith("_percent") else r.number(0, 1e6)
                lm = r.section(item, at, ("warn", "crit"), what="a mapping {warn: N, crit: N}")
                if lm is None:
                    continue
                level = Level(r.get(lm, at, "warn", bound, was.warn),
                              r.get(lm, at, "crit", bound, was.crit))
                if not weights and level.warn > level.crit:
                    r.fail(at, f"warn ({level.warn:g}) must not be above crit ({level.crit:g})")
                out[key] = level
            return msgspec.structs.replace(default, **out)
        return check

    def intervals(value: Any, where: str) -> Intervals:
        im = r.section(value, where, _fields(Intervals))
        if im is None:
            raise Reported
        got = {k: r.get(im, where, k, seconds, getattr(d.intervals, k)) for k in im}
        out = msgspec.structs.replace(d.intervals, **got)
        for key in ("active_s", "recent_s", "idle_s", "long_idle_s"):
            if (value := getattr(out, key)) > out.max_s:
                r.fail(join_key(where, key), f"{value:g} is above max_s ({out.max_s:g})")
        if out.recent_window_s > out.idle_window_s:
            r.fail(join_key(where, "recent_window_s"), f"{out.recent_window_s:g} is above "
                                                    f"idle_window_s ({out.idle_window_s:g})")
        return out

    health = HealthConfig(
        thresholds=r.get(m, w, "thresholds", levels(Thresholds, d.thresholds, False),
                         d.thresholds),
        weights=r.get(m, w, "weights", levels(Weights, d.weights, True), d.weights),
        healthy_min=r.get(m, w, "healthy_min", score, d.healthy_min),
        degraded_min=r.get(m, w, "degraded_min", score, d.degraded_min),
        failures_to_open=r.get(m, w, "failures_to_open", r.integer(0, 1000, strict=True),
                               d.failures_to_open),
        max_backoff_s=r.get(m, w, "max_backoff_s", seconds, d.max_backoff_s),
        intervals=r.get(m, w, "intervals", intervals, d.intervals),
        check_timeout_s=r.get(m, w, "check_timeout_s", r.number(0, 3600, strict=True),
                              d.check_timeout_s),
        unreachable_tolerance_s=r.get(m, w, "unreachable_tolerance_s",
                                      r.number(1, 7 * 86400), d.unreachable_tolerance_s),
    )
    if health.degraded_min > health.healthy_min:
        r.fail("health.degraded_min", f"{health.degraded_min:g} is above healthy_min "
                                      f"({health.healthy_min:g})")
    return health


def _read_metrics(r: Reader, raw: Any) -> MetricsConfig:
    w, d = "metrics", MetricsConfig()
    m = r.section(raw, w, _fields(MetricsConfig), none_ok=True) or {}
    return MetricsConfig(
        enabled=r.get(m, w, "enabled", r.boolean, d.enabled),
        host=r.get(m, w, "host", r.host, d.host),
        port=r.get(m, w, "port", r.integer(0, 65535, phrase="an integer from 0 to 65535 "
                                                          "(0: any free port)"), d.port),
    )


def _read_api(r: Reader, raw: Any) -> ApiConfig:
    w, d = "api", ApiConfig()
    m = r.section(raw, w, _fields(ApiConfig), none_ok=True) or {}
    return ApiConfig(
        max_body_bytes=r.get(m, w, "max_body_bytes", r.integer(0, 1 << 30, strict=True),
                             d.max_body_bytes),
        idle_timeout_s=r.get(m, w, "idle_timeout_s", r.number(1, 86400), d.idle_timeout_s),
        max_connections=r.get(m, w, "max_connections", r.integer(16, 1 << 20),
                              d.max_connections),
        max_connections_per_user=r.get(m, w, "max_connections_per_user",
                                       r.integer(1, 1 << 20), d.max_connections_per_user))


def _read_sync(r: Reader, raw: Any) -> SyncConfig:
    w, d = "sync", SyncConfig()
    m = r.section(raw, w, _fields(SyncConfig), none_ok=True) or {}
    return SyncConfig(default=r.get(m, w, "default", r.boolean, d.default),
                      max_mb=r.get(m, w, "max_mb", r.integer(1, 1 << 20), d.max_mb),
                      max_files=r.get(m, w, "max_files", r.integer(1, 1 << 22), d.max_files))


def placeholders_problem(arg: str) -> str | None:
    """Why an args_template entry is not a valid template, or None."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(arg)
                  if f is not None]
    except ValueError as exc:
        return f"{exc} (write {{{{ and }}}} for literal braces)"
    for field, spec, conv in fields:
        if field not in PLACEHOLDERS or spec or conv:
            allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            return f"unknown placeholder {{{field}}}; use {allowed}"
    return None


def _read_checkpoints(r: Reader, raw: Any) -> CheckpointsConfig:
    w, d = "checkpoints", CheckpointsConfig()
    m = r.section(raw, w, _fields(CheckpointsConfig), none_ok=True) or {}
    return CheckpointsConfig(
        copy=r.get(m, w, "copy", r.choice("latest", "every", "none"), d.copy),
        keep=r.get(m, w, "keep", r.integer(0, 10000), d.keep),
        max_mb_s=r.get(m, w, "max_mb_s", r.number(0, 1e6), d.max_mb_s),
        min_free_gb=r.get(m, w, "min_free_gb", r.number(0, 1e6), d.min_free_gb),
        interval_s=r.get(m, w, "interval_s", r.number(1, 86400), d.interval_s),
        stage=r.get(m, w, "stage", r.choice("rank0", "all"), d.stage))
