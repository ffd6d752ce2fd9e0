"""Events: the frozen, past-tense facts that make up the log (``codec.py`` encodes them).

A line of ``events.jsonl`` is an envelope::

    {"seq":7,"v":1,"type":"job_submitted","ts":"2026-11-22T13:45:00.123456Z",
     "actor":{"user":"alice","uid":1000},"data":{...}}

``type`` is a stable string (renaming a class never changes it); ``v`` is the
version of ``data``'s shape. Old versions are upgraded when read (``UPCASTERS``);
an unknown type or a newer version than this code knows is refused, never guessed.

This module does no I/O and reads no clock: the shell stamps ``ts``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import msgspec

SCHEMA_VERSION = 1


class EventError(ValueError):
    """A line that is valid JSON but not an event this code can read."""


class Actor(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """Who caused an event: the client's user and uid (from SO_PEERCRED), or ugrod."""

    user: str
    uid: int | None = None


DAEMON = Actor(user="ugrod")


class Event(msgspec.Struct, frozen=True, gc=False, kw_only=True, forbid_unknown_fields=True):
    """Base of every event payload (the envelope's ``data``)."""

    kind: ClassVar[str]
    schema_version: ClassVar[int] = 1


# ---- shared value types ---------------------------------------------------


class Gpu(msgspec.Struct, frozen=True, gc=False, kw_only=True, forbid_unknown_fields=True):
    index: int
    model: str = ""
    vram_bytes: int = 0
    uuid: str = ""


class NodeSpec(msgspec.Struct, frozen=True, gc=False, kw_only=True, forbid_unknown_fields=True):
    """What the planner and executor need of a node; the config's node, minus secrets."""

    name: str
    host: str
    port: int = 22
    user: str = ""
    transport: str = "local"  # "local" | "ssh"
    work_dir: str = "~/ugro"
    python: str = "python3"
    labels: tuple[str, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    rank: int | None = None  # preferred node_rank (the seeds' "rank"); 0 = rendezvous host


class ProgressSpec(msgspec.Struct, frozen=True, gc=False, kw_only=True,
                   forbid_unknown_fields=True):
    """What ugrod reads as training progress from a rank's output (core/progress_formats.py)."""

    formats: tuple[str, ...] = ("hf", "json", "tqdm")
    rank: int = 0
    loss_key: str | None = None


class JobSpec(msgspec.Struct, frozen=True, gc=False, kw_only=True, forbid_unknown_fields=True):
    """What a user asked for. ``argv`` runs under torchrun when ``torchrun`` is true."""

    argv: tuple[str, ...]
    nodes: int = 1
    node_names: tuple[str, ...] = ()
    gpus_per_node: int = 0
    min_vram_bytes: int = 0
    labels_required: tuple[str, ...] = ()
    labels_avoided: tuple[str, ...] = ()
    env: dict[str, str] = {}
    cwd: str | None = None
    torchrun: bool = False
    nproc_per_node: int = 1
    max_retries: int = 0
    retry_backoff_s: float = 10.0
    after: tuple[str, ...] = ()
    sweep: str | None = None
    params: dict[str, str] = {}
    stall_timeout_s: float | None = None
    stall_action: str = "alert"  # "alert" | "requeue"
    expected_runtime_s: float | None = None
    progress: ProgressSpec | None = None  # None: the default formats, rank 0
    stop_grace_s: float | None = None  # None: the daemon's --grace
    checkpoints: str | None = None  # a glob of checkpoints the job writes (relative: to cwd)
    after_any: tuple[str, ...] = ()  # start once these ended, however they ended
    after_failed: tuple[str, ...] = ()  # start only if these failed or were cancelled
    time_limit_s: float | None = None  # --time: cancelled when an attempt runs longer
    sync: str | None = None  # the code tree (sha256:...) copied to each node; cwd is its copy
    checkpoint_copy: str | None = None  # latest | every | none (None: the cluster's)
    checkpoint_keep: int | None = None  # copies kept on the head (None: the cluster's)
    resume_on: str | None = None  # rank0 | all: where a retry's checkpoint is put
    expand_env: bool = False  # ${UGRO_*} in argv expanded by ugrod at launch
    # How long one of its nodes may be out of reach while the others still show progress
    # before the attempt is given up on (None: the config's health.unreachable_tolerance_s).
    unreachable_tolerance_s: float | None = None


class RankPlacement(msgspec.Struct, frozen=True, gc=False, kw_only=True,
                    forbid_unknown_fields=True):
    rank: int
    node: str
    gpus: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()


# ---- node events ----------------------------------------------------------


class NodeAdded(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "node_added"
    node: NodeSpec


class NodeUpdated(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "node_updated"
    node: NodeSpec


class NodeRemoved(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "node_removed"
    node: str


class NodeInventoried(Event, frozen=True, kw_only=True):
    """GPUs read from the node itself; ``mismatch`` says how they differ from the config."""

    kind: ClassVar[str] = "node_inventoried"
    node: str
    gpus: tuple[Gpu, ...]
    mismatch: str | None = None


class NodeHealthChanged(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "node_health_changed"
    node: str
    health: str  # NodeHealth value
    score: float | None = None
    reason: str = ""
    sample: dict[str, Any] = {}


class NodeDrained(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "node_drained"
    node: str
    reason: str = ""


class NodeUndrained(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "node_undrained"
    node: str


class AlertRaised(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "alert_raised"
    node: str
    alert: str  # stable key, e.g. "gpu_temperature"
    severity: str  # "warning" | "critical"
    message: str
    sample: dict[str, Any] = {}


class AlertCleared(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "alert_cleared"
    node: str
    alert: str


# ---- job events -----------------------------------------------------------


class JobSubmitted(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_submitted"
    job: str
    spec: JobSpec
    priority: int = 0
    held: bool = False
    request_id: str | None = None


class JobWaiting(Event, frozen=True, kw_only=True):
    """The planner's reason a job cannot start yet (recorded when the reason changes)."""

    kind: ClassVar[str] = "job_waiting"
    job: str
    reason: str


class JobPlaced(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_placed"
    job: str
    attempt: int
    ranks: tuple[RankPlacement, ...]
    rdzv_host: str = ""
    rdzv_port: int = 0
    resume_from: str | None = None
    reason: str = ""


class RankStarted(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "rank_started"
    job: str
    attempt: int
    rank: int
    node: str
    pid: int


class JobRunning(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_running"
    job: str
    attempt: int


class RankExited(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "rank_exited"
    job: str
    attempt: int
    rank: int
    node: str
    exit_code: int


class JobStopping(Event, frozen=True, kw_only=True):
    """The job's processes are being killed; GPUs stay reserved until ``JobEnded``."""

    kind: ClassVar[str] = "job_stopping"
    job: str
    attempt: int
    outcome: str  # JobState the job will end in: failed | cancelled | retrying
    reason: str


class JobEnded(Event, frozen=True, kw_only=True):
    """Every process of the attempt is confirmed gone. ``retry_at`` set: waits to retry."""

    kind: ClassVar[str] = "job_ended"
    job: str
    attempt: int
    outcome: str  # succeeded | failed | cancelled | retrying
    reason: str = ""
    exit_code: int | None = None
    failed_rank: int | None = None
    failed_node: str | None = None
    last_step: int | None = None
    made_progress: bool = False
    retry_at: float | None = None
    resume_from: str | None = None
    # Lost to the cluster, not to the job (a partition, a node lost, a launch that could
    # not reach a node, ugrod stopped while it started): no-progress budget kept.
    cluster_fault: bool = False


class JobPrioritySet(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_priority_set"
    job: str
    priority: int


class JobHeld(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_held"
    job: str


class JobReleased(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_released"
    job: str


class JobCancelRequested(Event, frozen=True, kw_only=True):
    """Cancel of a job that never started: it ends at once (nothing to kill)."""

    kind: ClassVar[str] = "job_cancel_requested"
    job: str
    reason: str = "cancelled by user"


class JobResumed(Event, frozen=True, kw_only=True):
    """A failed or cancelled job queued again as a new attempt, maybe with changed params."""

    kind: ClassVar[str] = "job_resumed"
    job: str
    spec: JobSpec
    resume_from: str | None = None


class CheckpointRequested(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "checkpoint_requested"
    job: str


class CheckpointSaved(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "checkpoint_saved"
    job: str
    path: str
    step: int | None = None
    node: str | None = None  # where it was saved (rank 0's node); None in older logs


class CheckpointCopied(Event, frozen=True, kw_only=True):
    """A checkpoint is in the head's job directory (``checkpoints/NAME``), every file
    verified: its sha256 read on the node equals the one of what the head wrote."""

    kind: ClassVar[str] = "checkpoint_copied"
    job: str
    name: str
    node: str
    path: str  # where it was copied from, on ``node``
    size_bytes: int
    mtime: float  # the source's modification time (the copy keeps it)
    step: int | None = None
    files: int = 1


class CheckpointCopyFailed(Event, frozen=True, kw_only=True):
    """Copying a checkpoint to the head failed; ``retry_in_s`` None: it is not retried
    (the head's disk is at its floor, or the job ended and the tries were used up)."""

    kind: ClassVar[str] = "checkpoint_copy_failed"
    job: str
    path: str
    node: str | None
    reason: str
    failures: int = 1  # in a row
    retry_in_s: float | None = None


class CheckpointPruned(Event, frozen=True, kw_only=True):
    """Copies removed from the head's job directory (past the job's ``keep``)."""

    kind: ClassVar[str] = "checkpoint_pruned"
    job: str
    names: tuple[str, ...]
    reason: str = ""


class CheckpointStaged(Event, frozen=True, kw_only=True):
    """Before an attempt started, the checkpoint it resumes from was put on its node(s):
    ``paths`` node -> the copy there (UGRO_RESUME_FROM on that node)."""

    kind: ClassVar[str] = "checkpoint_staged"
    job: str
    attempt: int
    source: str  # "NODE:PATH", or "head:checkpoints/NAME"
    paths: dict[str, str]
    step: int | None = None


class RankFenced(Event, frozen=True, kw_only=True):
    """A rank of an attempt that is no longer live was found running on its node and
    killed there (ugrod/loops/fencing.py): ``pids`` processes of it were alive."""

    kind: ClassVar[str] = "rank_fenced"
    job: str
    attempt: int
    rank: int
    node: str
    pids: int = 0


class JobStalled(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "job_stalled"
    job: str
    attempt: int
    step: int | None
    idle_s: float
    stacks: str | None = None


class JobProgressed(Event, frozen=True, kw_only=True):
    """A stalled job's step counter advances again."""

    kind: ClassVar[str] = "job_progressed"
    job: str
    attempt: int
    step: int | None = None


class SweepCreated(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "sweep_created"
    sweep: str
    jobs: tuple[str, ...]
    params: dict[str, tuple[str, ...]]
    max_parallel: int = 0


class DaemonStarted(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "daemon_started"
    version: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        NodeAdded, NodeUpdated, NodeRemoved, NodeInventoried, NodeHealthChanged,
        NodeDrained, NodeUndrained, AlertRaised, AlertCleared,
        JobSubmitted, JobWaiting, JobPlaced, RankStarted, JobRunning, RankExited,
        JobStopping, JobEnded, JobPrioritySet, JobHeld, JobReleased,
        JobCancelRequested, JobResumed, CheckpointRequested, CheckpointSaved,
        CheckpointCopied, CheckpointCopyFailed, CheckpointPruned, CheckpointStaged,
        JobStalled, JobProgressed, SweepCreated, DaemonStarted, RankFenced,
    )
}

# (type, version) -> function upgrading that version's ``data`` dict by one version.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


# ---- records ---------------------------------------------------------------


class Record(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """An event as it stands in the log: its seq, time, actor and payload."""

    seq: int
    ts: float  # seconds since the epoch, UTC; written as ISO-8601 with a Z
    actor: Actor
    event: Event


def to_builtins(obj: Any) -> Any:
    """Plain dicts/lists of an event or spec, for the API and the CLI."""
    return msgspec.to_builtins(obj)


def kinds(events: Iterable[Event]) -> list[str]:
    return [e.kind for e in events]
