"""Job specs from requests: checked, complete, and nothing run through a shell.

A submit body becomes a frozen ``JobSpec``; ``launch`` fills the config's training
template; ``resume --set`` and sweeps rewrite ``--key value`` flags in argv.
Everything here is pure: errors are ``SpecError`` (the API answers 400).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

import msgspec

from ugrod.core import checkpoints as ck
from ugrod.core import events as ev
from ugrod.core import progress_formats as pf
from ugrod.core import time_limits
from ugrod.core.names import name_problem


class SpecError(ValueError):
    """A request that cannot become a job; the message says why, for people."""


class SyncRequired(SpecError):
    """The config sends code by default and the request neither sent nor declined it."""


ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ARGV = 4096
MAX_ARG_BYTES = 128 * 1024
# The bounds of every number a request may carry: finite, and small enough that any sum,
# backoff doubling or timestamp built from them stays a finite float or a 64-bit integer.
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
MAX_BACKOFF_S = 7 * 86400.0        # as scheduler.retry_backoff_s (applied capped at 600 s)
MAX_STALL_S = 7 * 86400.0
MAX_RUNTIME_S = 366 * 86400.0
MAX_SWEEP_TRIALS = 1000
MAX_PATH_CHARS = 4096
MAX_TEXT_CHARS = 4096              # a sweep value, an environment value
MAX_LABEL_CHARS = 128
SEED_SCRIPT: Final = "train_production.py"  # what the seeds' launch runs in paths.scripts


# What a submit reads from the cluster's configuration, named here so that the core
# imports nothing above it (config.schema.Config has these fields and is what is passed).
class TrainingDefaults(Protocol):
    @property
    def script(self) -> str | None: ...
    @property
    def nodes(self) -> int | None: ...
    @property
    def gpus_per_node(self) -> int | None: ...
    def render_args(self, *, name: str, model: str | None = None, dataset: str | None = None,
                    epochs: int | None = None, lr: float | None = None) -> Sequence[str]: ...


class PathsDefaults(Protocol):
    @property
    def scripts(self) -> str | None: ...


class SyncDefaults(Protocol):
    @property
    def default(self) -> bool: ...


class RetryDefaults(Protocol):
    @property
    def default_max_retries(self) -> int: ...
    @property
    def retry_backoff_s(self) -> float: ...


class SubmitDefaults(Protocol):
    """The config sections ``build`` reads: the training template, paths, sync, retries."""

    @property
    def training(self) -> TrainingDefaults: ...
    @property
    def paths(self) -> PathsDefaults: ...
    @property
    def sync(self) -> SyncDefaults: ...
    @property
    def scheduler(self) -> RetryDefaults: ...


class SpecFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Placement, environment and policy: the same for submit, launch and sweep."""

    nodes: int | None = None  # None: 1 (launch: every schedulable node)
    node_names: list[str] = []
    gpus_per_node: int | None = None  # None: 0 (launch: 1, the seeds' shape)
    min_vram_gb: float = 0
    labels_required: list[str] = []
    labels_avoided: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None  # where the ranks start; None: submit_dir
    submit_dir: str | None = None  # where ugroctl ran (absolute, as Slurm's SLURM_SUBMIT_DIR)
    # The uploaded code tree (sha256:...) copied to each node; False: none, whatever
    # the config's sync.default; None: the default (refused as "sync_required" if on).
    sync: str | bool | None = None
    torchrun: bool | None = None
    nproc_per_node: int = 1
    max_retries: int | None = None
    retry_backoff_s: float | None = None
    after: list[str] = []
    after_any: list[str] = []
    after_failed: list[str] = []
    time_limit: str | float | None = None  # Slurm's forms (1:30:00, 2-00:00:00), 90m, or seconds
    priority: int = 0
    held: bool = False
    stall_timeout_s: float | None = None
    stall_action: str = "alert"
    unreachable_tolerance_s: float | None = None
    expected_runtime_s: float | None = None
    progress: list[str] | None = None
    progress_rank: int | None = None
    loss_key: str | None = None
    stop_grace_s: float | None = None
    checkpoints: str | None = None
    checkpoint_copy: str | None = None
    checkpoint_keep: int | None = None
    resume_on: str | None = None
    expand_env: bool = False
    request_id: str | None = None


class SubmitBody(SpecFields, forbid_unknown_fields=True, kw_only=True):
    argv: list[str] | None = None
    launch: dict[str, str | int | float] | None = None
    name: str | None = None


class SweepBody(SpecFields, forbid_unknown_fields=True, kw_only=True):
    name: str
    params: dict[str, list[str]]
    argv: list[str]
    max_parallel: int = 0


SHARED_FIELDS = tuple(SpecFields.__struct_fields__)
TREE_RE = re.compile(r"sha256:[0-9a-f]{64}")
# {name} of a launch whose name ugrod picks in its writer (see ``with_name``).
NAME_PLACEHOLDER = "ugro-job-name-to-be-decided"


def check_name(kind: str, name: str) -> str:
    problem = name_problem(kind, name)
    if problem is not None:
        raise SpecError(problem)
    return name


def check_priority(value: object) -> int:
    """A priority is an integer from -1000 to 1000, wherever it is given."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise SpecError(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, "
                        f"got {str(value)[:40]}")
    return value


def check_seconds(what: str, value: float | None, lo: float, hi: float) -> None:
    """A duration: finite, ``lo <= value <= hi`` (None: not given)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not lo <= value <= hi:
        raise SpecError(f"{what} must be a number of seconds from {lo:g} to {hi:g}, "
                        f"got {str(value)[:40]}")


def check_text(what: str, value: str, limit: int = MAX_TEXT_CHARS) -> str:
    """A string that reaches a file, an argv or an environment: no NUL, bounded."""
    if "\x00" in value:
        raise SpecError(f"{what} may not contain NUL bytes")
    if len(value) > limit:
        raise SpecError(f"{what} is longer than {limit} characters")
    return value


def check_request_id(value: str | None) -> None:
    if value is not None:
        check_text("request_id", value, 128)


def build(body: SubmitBody, config: SubmitDefaults, n_nodes: int,
          launch_nodes: Callable[[int], int] | None = None, name: str = "") -> ev.JobSpec:
    """Check a submit body and build the JobSpec (launch: from the training template).

    ``launch_nodes(gpus_per_node)``: how many schedulable nodes have that many GPUs
    (the default size of a ``launch``, as in the seeds: every node, one GPU each).
    """
    sched = config.scheduler
    gpus_per_node = body.gpus_per_node
    nodes = body.nodes
    cwd = body.cwd
    check_priority(body.priority)
    check_request_id(body.request_id)
    check_seconds("retry_backoff_s", body.retry_backoff_s, 0, MAX_BACKOFF_S)
    check_seconds("expected_runtime_s", body.expected_runtime_s, 0, MAX_RUNTIME_S)
    if body.cwd is not None:
        check_text("cwd", body.cwd, MAX_PATH_CHARS)
    for label in (*body.labels_required, *body.labels_avoided):
        check_text("a label", label, MAX_LABEL_CHARS)
    if body.launch is not None:
        if body.argv:
            raise SpecError("give either argv or launch, not both")
        training = config.training
        if gpus_per_node is None:
            gpus_per_node = 1 if training.gpus_per_node is None else training.gpus_per_node
        if nodes is None and not body.node_names:
            nodes = training.nodes
            if nodes is None:
                nodes = launch_nodes(gpus_per_node) if launch_nodes is not None else n_nodes
                if nodes < 1:
                    raise SpecError(f"launch: no schedulable node has {gpus_per_node} GPU(s) "
                                    f"(see `ugroctl nodes`; --gpus-per-node 0 runs on CPUs)")
        argv = launch_argv({"name": name, **body.launch}, config)
        if cwd is None and not isinstance(body.sync, str) and config.paths.scripts:
            cwd = config.paths.scripts  # the seeds: cd paths.scripts && torchrun ...
        torchrun = True if body.torchrun is None else body.torchrun
    else:
        if not body.argv:
            raise SpecError("missing the command: argv must be a "
                           "non-empty list of strings")
        argv = list(body.argv)
        torchrun = bool(body.torchrun)  # only --torchrun says so, never the job's size
    gpus_per_node = 0 if gpus_per_node is None else gpus_per_node
    nodes = 1 if nodes is None else nodes
    if len(argv) > MAX_ARGV or sum(len(a) for a in argv) > MAX_ARG_BYTES:
        raise SpecError("command too long")
    if any("\x00" in a for a in argv):
        raise SpecError("command arguments may not contain NUL bytes")
    if not 1 <= nodes <= 1024:
        raise SpecError(f"nodes must be 1..1024 (the cluster has {n_nodes}), got {nodes}")
    if not 0 <= gpus_per_node <= 64:
        raise SpecError("gpus_per_node must be 0..64")
    if not 1 <= body.nproc_per_node <= 256:
        raise SpecError("nproc_per_node must be 1..256")
    if not math.isfinite(body.min_vram_gb) or not 0 <= body.min_vram_gb <= 4096:
        raise SpecError("min_vram_gb must be 0..4096")
    for k, v in body.env.items():
        if not ENV_KEY_RE.fullmatch(k) or "\x00" in v:
            raise SpecError(f"invalid environment variable {k[:60]!r}")
    for n in body.node_names:
        check_name("node", n)
    for d in (*body.after, *body.after_any, *body.after_failed):
        check_name("job", d)
    if len(body.after) + len(body.after_any) + len(body.after_failed) > 100:
        raise SpecError("at most 100 dependencies (--after, --after-any, --after-failed)")
    try:
        time_limit_s = None if body.time_limit is None else time_limits.parse(body.time_limit)
    except time_limits.BadTimeLimit as exc:
        raise SpecError(str(exc)) from None
    if body.sync is None and config.sync.default:
        raise SyncRequired("this cluster sends your code to the nodes by default "
                           "(sync.default): upload it (ugroctl does) or say --no-sync")
    sync = body.sync if isinstance(body.sync, str) else None
    if body.sync is True or (sync is not None and not TREE_RE.fullmatch(sync)):
        raise SpecError("sync must be a code tree digest sha256:<64 hex digits> (from "
                        "POST /v1/sync/trees)")
    if body.submit_dir is not None:
        check_text("submit_dir", body.submit_dir, MAX_PATH_CHARS)
    if cwd is None:
        cwd = body.submit_dir
    if sync is not None:
        cwd = None  # the ranks start in the job's copy of the code on each node
    elif cwd is not None:
        check_dir("cwd", cwd)
    max_retries = sched.default_max_retries if body.max_retries is None else body.max_retries
    if not 0 <= max_retries <= 100:
        raise SpecError("max_retries must be 0..100")
    if body.stall_action not in ("alert", "requeue"):
        raise SpecError("stall_action must be 'alert' or 'requeue'")
    if body.stall_timeout_s is not None and not 1 <= body.stall_timeout_s <= MAX_STALL_S:
        raise SpecError("stall_timeout_s must be 1 s .. 7 days")
    if body.unreachable_tolerance_s is not None \
            and not 1 <= body.unreachable_tolerance_s <= MAX_STALL_S:
        raise SpecError("unreachable_tolerance_s must be 1 s .. 7 days")
    nodes = nodes if not body.node_names else max(nodes, len(body.node_names))
    if body.stop_grace_s is not None and not 0.1 <= body.stop_grace_s <= 3600:
        raise SpecError("stop_grace_s must be 0.1 s .. 1 hour")
    if body.checkpoints is not None and (
            not body.checkpoints.strip() or len(body.checkpoints) > 1024
            or any(c in body.checkpoints for c in "\x00\n\r")):
        raise SpecError("checkpoints must be one glob pattern of at most 1024 characters, "
                        "e.g. 'out/checkpoint-*'")
    if body.checkpoint_copy is not None and body.checkpoint_copy not in ck.POLICIES:
        raise SpecError(f"checkpoint_copy must be {' or '.join(ck.POLICIES)}, got "
                        f"{body.checkpoint_copy[:40]!r}")
    if body.checkpoint_keep is not None and not 0 <= body.checkpoint_keep <= 10000:
        raise SpecError("checkpoint_keep must be 0..10000 (0: keep every copy)")
    if body.resume_on is not None and body.resume_on not in ck.STAGING:
        raise SpecError(f"resume_on must be {' or '.join(ck.STAGING)}, got "
                        f"{body.resume_on[:40]!r}")
    if body.expand_env:
        check_references(argv)
    return ev.JobSpec(
        argv=tuple(argv), nodes=nodes, node_names=tuple(body.node_names),
        gpus_per_node=gpus_per_node, min_vram_bytes=int(body.min_vram_gb * (1 << 30)),
        labels_required=tuple(body.labels_required),
        labels_avoided=tuple(body.labels_avoided), env=dict(body.env), cwd=cwd,
        torchrun=torchrun, nproc_per_node=body.nproc_per_node,
        max_retries=max_retries,
        retry_backoff_s=body.retry_backoff_s if body.retry_backoff_s is not None
        else sched.retry_backoff_s,
        after=tuple(body.after), after_any=tuple(body.after_any),
        after_failed=tuple(body.after_failed), time_limit_s=time_limit_s,
        stall_timeout_s=body.stall_timeout_s,
        stall_action=body.stall_action, expected_runtime_s=body.expected_runtime_s,
        progress=progress_spec(body, nodes), stop_grace_s=body.stop_grace_s,
        checkpoints=body.checkpoints, sync=sync, checkpoint_copy=body.checkpoint_copy,
        checkpoint_keep=body.checkpoint_keep, resume_on=body.resume_on,
        expand_env=body.expand_env, unreachable_tolerance_s=body.unreachable_tolerance_s)


# ---- ${UGRO_*} in a job's arguments (--expand-env) -----------------------------------

# What ugrod sets for every rank and may put into its arguments; UGRO_RESUME_FROM is
# empty on a fresh start.
EXPANDABLE = ("UGRO_JOB_ID", "UGRO_ATTEMPT", "UGRO_JOB_DIR", "UGRO_METRICS_FILE",
              "UGRO_CHECKPOINT_DIR", "UGRO_RESUME_FROM")
_REFERENCE_RE = re.compile(r"\$\{([^}]*)\}")


def check_references(argv: Sequence[str]) -> None:
    """Every ``${NAME}`` in argv names a variable ugrod sets (SpecError otherwise)."""
    for arg in argv:
        for m in _REFERENCE_RE.finditer(arg):
            if m.group(1) not in EXPANDABLE:
                raise SpecError(f"--expand-env: ${{{m.group(1)[:60]}}} in {arg[:80]!r} is not "
                                f"a variable ugrod sets; it expands {', '.join(EXPANDABLE)}")


def expand_references(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """argv with each ``${UGRO_...}`` replaced by its value for this rank (never a shell)."""
    return [_REFERENCE_RE.sub(lambda m: env.get(m.group(1), "") if m.group(1) in EXPANDABLE
                              else m.group(0), arg) for arg in argv]


def progress_spec(body: SubmitBody, nodes: int) -> ev.ProgressSpec | None:
    """The job's progress settings (None: all defaults); SpecError names a bad one."""
    if body.progress is None and body.progress_rank is None and body.loss_key is None:
        return None
    default = ev.ProgressSpec()
    try:
        formats = default.formats if body.progress is None else pf.check_formats(
            part.strip() for item in body.progress[:16] for part in item.split(","))
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    rank = 0 if body.progress_rank is None else body.progress_rank
    if not 0 <= rank < nodes:
        raise SpecError(f"progress_rank must be a node rank of the job: 0..{nodes - 1}")
    if body.loss_key is not None and pf.normalise_name(body.loss_key) is None:
        raise SpecError(f"loss_key {body.loss_key[:80]!r} is not a metric name: use letters, "
                        f"digits, '_' and '/', at most {pf.MAX_NAME} characters")
    return ev.ProgressSpec(formats=formats, rank=rank, loss_key=body.loss_key)


def check_sweep(body: SweepBody) -> int:
    """Check a sweep body before anything is built; the number of trials it makes.

    The grid is sized by the product of the value counts, stopping as soon as it
    passes the limit: 40 parameters of 2 values are refused here, instead of making
    2^40 combinations first (ugrod once built them: 5.4 GB, unresponsive).
    """
    check_priority(body.priority)
    check_request_id(body.request_id)
    if not 0 <= body.max_parallel <= MAX_SWEEP_TRIALS:
        raise SpecError(f"max_parallel must be 0..{MAX_SWEEP_TRIALS} (0: no limit)")
    if not body.params or any(not v for v in body.params.values()):
        raise SpecError("a sweep needs at least one --param with values")
    trials = 1
    for key, values in body.params.items():
        trials *= len(values)
        if trials > MAX_SWEEP_TRIALS:
            raise SpecError(f"the sweep would make more than {MAX_SWEEP_TRIALS} trials (the "
                            f"product of the number of values of each parameter); split it")
        if not key or len(key) > 64:
            raise SpecError(f"sweep parameter {key[:60]!r}: 1-64 characters")
        check_text(f"sweep parameter {key[:60]!r}", key)
        for v in values:
            check_text(f"a value of sweep parameter {key!r}", v)
    return trials


def check_dir(what: str, path: str) -> None:
    """A node-side directory: absolute or ``~``-relative, no NUL, bounded."""
    check_text(what, path, MAX_PATH_CHARS)
    if not (path.startswith("/") or path == "~" or path.startswith("~/")):
        raise SpecError(f"{what} must be an absolute directory (or start with ~/), got "
                        f"{path[:80]!r}; ugroctl makes relative ones absolute")


def procs_per_node(spec: ev.JobSpec) -> int:
    """Processes each node runs: torchrun's --nproc_per_node (one per GPU), else one.

    A global rank is node rank x this + local rank (what ``logs --rank`` means).
    """
    if not spec.torchrun:
        return 1
    return max(spec.gpus_per_node, 1) if spec.gpus_per_node else max(spec.nproc_per_node, 1)


def launch_argv(launch: Mapping[str, str | int | float], config: SubmitDefaults) -> list[str]:
    """The training script and the template's arguments, with {name} the job's name.

    The script is ``training.script`` (the seeds' ``train_production.py`` when unset);
    a relative one runs in the job's directory: ``paths.scripts`` as in the seeds, or
    the synced copy of the user's directory with ``--sync``.
    """
    script = config.training.script or SEED_SCRIPT
    known = {"model", "dataset", "epochs", "lr", "name"}
    for k in launch:
        if k not in known:
            raise SpecError(f"launch: unknown parameter {k!r}")
    try:
        epochs = int(launch["epochs"]) if "epochs" in launch else None
        lr = float(launch["lr"]) if "lr" in launch else None
    except (TypeError, ValueError, OverflowError):
        raise SpecError("launch: epochs must be an integer and lr a "
                       "number") from None
    if epochs is not None and not 1 <= epochs <= 1_000_000:
        raise SpecError("launch: epochs must be 1..1000000")
    if lr is not None and not (math.isfinite(lr) and 0 < lr <= 1e6):
        raise SpecError("launch: lr must be a positive finite number")
    for k, v in launch.items():
        if isinstance(v, str):
            check_text(f"launch: {k}", v)
    args = config.training.render_args(
        name=str(launch.get("name", "")), model=str(launch["model"]) if "model" in launch
        else None, dataset=str(launch["dataset"]) if "dataset" in launch else None,
        epochs=epochs, lr=lr)
    return [script, *args]


def with_name(submitted: ev.JobSubmitted, name: str) -> ev.JobSubmitted:
    """A launch's JobSubmitted with the name ugrod picked in place of NAME_PLACEHOLDER."""
    argv = tuple(a.replace(NAME_PLACEHOLDER, name) for a in submitted.spec.argv)
    return msgspec.structs.replace(submitted, spec=msgspec.structs.replace(submitted.spec,
                                                                           argv=argv))


def rank_command(argv: Sequence[str], python: str,
                 torchrun_args: Sequence[str] | None) -> tuple[list[str], int]:
    """One rule for every command: (the argv a node runs, the index of the user's program).

    A ``.py`` script runs under the node's ``python`` (so ``train.py`` and ``./train.py``
    need no executable bit); anything else (``python3 train.py``, ``./run.sh``, a program
    on PATH) runs as given. Under torchrun a script is torchrun's own ``script``
    argument and anything else follows ``--no-python``.
    """
    script = argv[0].endswith(".py")
    if torchrun_args is None:
        head = [python] if script else []
    else:
        head = [python, "-m", "torch.distributed.run", *torchrun_args]
        if not script:
            head.append("--no-python")
    return [*head, *argv], len(head)


def with_overrides(spec: ev.JobSpec, changes: Mapping[str, str]) -> ev.JobSpec:
    """`resume --set k=v`: replace `--k v`/`--k=v` in argv, or append it; env for UPPER."""
    argv = list(spec.argv)
    env = dict(spec.env)
    params = dict(spec.params)
    for key, value in changes.items():
        if not key or len(key) > 64 or not key.replace("-", "_").replace(".", "_") \
                .isidentifier():
            raise SpecError(f"--set: invalid key {key[:60]!r}")
        check_text(f"--set {key}", value)
        params[key] = value
        if key.isupper():
            env[key] = value
            continue
        flag = "--" + key.replace("_", "-")
        flag_u = "--" + key
        for i, a in enumerate(argv):
            if a in (flag, flag_u) and i + 1 < len(argv):
                argv[i + 1] = value
                break
            if a.startswith(flag + "=") or a.startswith(flag_u + "="):
                argv[i] = a.split("=", 1)[0] + "=" + value
                break
        else:
            argv += [flag, value]
    return msgspec.structs.replace(spec, argv=tuple(argv), env=env, params=params)

