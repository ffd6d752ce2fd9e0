"""Events: the frozen, past-tense facts that make up the log, and their one canonical encoding.

A line of ``events.jsonl`` is an envelope::

    {"seq":7,"v":1,"type":"job_submitted","ts":"2026-11-22T13:45:00.123456Z",
     "actor":{"user":"alice","uid":1000},"data":{...}}

``type`` is a stable string (renaming a class never changes it); ``v`` is the
version of ``data``'s shape. Old versions are upgraded when read (``UPCASTERS``);
an unknown type or a newer version than this code knows is refused, never guessed.

This module does no I/O and reads no clock: the shell stamps ``ts``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Union

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
        JobStalled, JobProgressed, SweepCreated, DaemonStarted,
    )
}

# (type, version) -> function upgrading that version's ``data`` dict by one version.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


# ---- records and the canonical codec --------------------------------------


class Record(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """An event as it stands in the log: its seq, time, actor and payload."""

    seq: int
    ts: float  # seconds since the epoch, UTC; written as ISO-8601 with a Z
    actor: Actor
    event: Event


class _Envelope(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    seq: int
    v: int
    type: str
    ts: str
    actor: Actor
    data: msgspec.Raw


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_payload_decoders = {k: msgspec.json.Decoder(t) for k, t in EVENT_TYPES.items()}


def _typed_envelope(kind: str, cls: type[Event]) -> type[msgspec.Struct]:
    # The same fields as _Envelope, with ``type`` as the union's tag and ``data``
    # typed: one pass decodes envelope and payload (~3x the Raw + second decode).
    return msgspec.defstruct(
        f"_Envelope_{kind}", [("seq", int), ("v", int), ("ts", str), ("actor", Actor),
                              ("data", cls)],
        tag_field="type", tag=kind, frozen=True, gc=False, forbid_unknown_fields=True)


# Every current-version event line decodes here in one pass; anything else (an
# unknown type, an old version to upgrade, a defect to describe) takes the
# slower two-step path, which names the problem.
_typed_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[tuple(_typed_envelope(k, t) for k, t in EVENT_TYPES.items())])  # noqa: UP007


def format_ts(ts: float) -> str:
    """UTC ISO-8601 with microseconds and a Z, computed without the datetime module's tz."""
    whole = math.floor(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    minute, ss = divmod(whole, 60)
    prefix = _minute_prefixes.get(minute)
    if prefix is None:
        days, rem = divmod(minute * 60, 86400)
        y, m, d = _civil_from_days(days)
        hh, mm = divmod(rem // 60, 60)
        prefix = f"{y:04d}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:"
        if len(_minute_prefixes) > 4096:
            _minute_prefixes.clear()
        _minute_prefixes[minute] = prefix
    return f"{prefix}{ss:02d}.{micros:06d}Z"


_minute_prefixes: dict[int, str] = {}


def stamp_ts(ts: float) -> float:
    """``parse_ts(format_ts(ts))`` (the time as the log will read it back), computed directly.

    The arithmetic is the very same as the round trip's (an int plus the
    microseconds over 1e6), so a live state equals its replay to the bit.
    """
    whole = math.floor(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return whole + micros / 1_000_000


_minutes: dict[str, int] = {}


def parse_ts(text: str) -> float:
    """Inverse of ``format_ts``; raises EventError on anything else.

    Replay parses a million of these: each whole second is computed (and checked)
    once and cached, leaving one small int() per event for the microseconds.
    """
    second = _seconds.get(text[:19])
    if second is None:
        second = _second_base(text)
        if len(_seconds) > 8192:
            _seconds.clear()
        _seconds[text[:19]] = second
    micros = text[20:26]
    if len(text) != 27 or text[19] != "." or text[26] != "Z" or not (
            micros.isascii() and micros.isdigit()):
        raise EventError(f"bad timestamp {text!r}")
    return second + int(micros) / 1_000_000


_seconds: dict[str, int] = {}


def _second_base(text: str) -> int:
    ss = text[17:19]
    if len(text) < 19 or text[16] != ":" or not text[:19].isascii() or not ss.isdigit() \
            or int(ss) > 59:
        raise EventError(f"bad timestamp {text!r}")
    base = _minutes.get(text[:16])
    if base is None:
        base = _minute_base(text)
        if len(_minutes) > 4096:
            _minutes.clear()
        _minutes[text[:16]] = base
    return base + int(ss)


def _minute_base(text: str) -> int:
    try:
        if text[4] + text[7] + text[10] + text[13] != "--T:":
            raise ValueError
        parts = text[0:4], text[5:7], text[8:10], text[11:13], text[14:16]
        if not all(p.isdigit() for p in parts):
            raise ValueError
        y, m, d, hh, mm = (int(p) for p in parts)
        if not (1 <= m <= 12 and 1 <= d <= 31 and hh <= 23 and mm <= 59):
            raise ValueError
    except ValueError:
        raise EventError(f"bad timestamp {text!r}") from None
    return _days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60


def _days_from_civil(y: int, m: int, d: int) -> int:
    # Howard Hinnant's algorithm: exact for every proleptic Gregorian date.
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


def encode(record: Record) -> bytes:
    """The one canonical line (no newline). Raises EventError for what could not be read back.

    msgspec writes NaN/Infinity as null, and integers past 64 bits that other
    JSON readers would turn into floats; every line is decoded again so that
    nothing is written that replay could not read back as it was.
    """
    ev = record.event
    try:
        data = _encoder.encode(ev)
        line = _encoder.encode(
            _Envelope(record.seq, ev.schema_version, ev.kind, format_ts(record.ts), record.actor,
                      msgspec.Raw(data))
        )
    except (TypeError, ValueError, OverflowError, UnicodeError, msgspec.EncodeError) as exc:
        raise EventError(f"cannot encode {ev.kind}: {exc}") from exc
    # A run of 19+ digits is the only way a >64-bit integer can appear (a cheap
    # scan: digits become b"0", all else b" "); only then is the line searched.
    if _RUN_OF_19 in line.translate(_DIGITS) and _has_big_int(msgspec.json.decode(line)):
        raise EventError(f"cannot encode {ev.kind}: an integer outside 64 bits (other JSON "
                         f"readers would turn it into a float)")
    # decode() stamps ts as parse_ts(format_ts(ts)): seq and ts read back by
    # construction; the payload and actor are what NaN or bad text could change.
    back = decode(line)
    if back.event != ev or back.actor != record.actor:
        raise EventError(f"{ev.kind} does not survive a round trip (NaN, infinity or a lone "
                         f"surrogate in its data?)")
    return line


_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_RUN_OF_19 = b"0" * 19
_INT64 = (-(2**63), 2**64 - 1)


def _has_big_int(obj: Any) -> bool:
    if isinstance(obj, bool):
        return False
    if isinstance(obj, int):
        return not _INT64[0] <= obj <= _INT64[1]
    if isinstance(obj, dict):
        return any(_has_big_int(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_big_int(v) for v in obj)
    return False


def decode(line: bytes | memoryview) -> Record:
    """Decode one line (without newline) into a Record, upgrading old versions."""
    global _last_ts
    try:
        env = _typed_decoder.decode(line)
    except msgspec.DecodeError:
        return _decode_checked(line)
    event = env.data
    if env.v != event.schema_version:
        return _decode_checked(line)
    if env.ts != _last_ts[0]:  # the events of one command share their time
        _last_ts = (env.ts, parse_ts(env.ts))
    return Record(seq=env.seq, ts=_last_ts[1], actor=env.actor, event=event)


def _decode_checked(line: bytes | memoryview) -> Record:
    """Envelope first, then the payload by its type: says which part is wrong."""
    try:
        env = _envelope_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise EventError(f"not an event line: {exc}") from None
    cls = EVENT_TYPES.get(env.type)
    if cls is None:
        raise EventError(f"unknown event type {env.type!r} (written by a newer ugrod?)")
    try:
        if env.v == cls.schema_version:
            event = _payload_decoders[env.type].decode(env.data)
        elif env.v > cls.schema_version or env.v < 1:
            raise EventError(f"{env.type} version {env.v} is newer than this ugrod knows "
                             f"({cls.schema_version})")
        else:
            event = _upcast(cls, env.type, env.v, msgspec.json.decode(env.data))
    except msgspec.DecodeError as exc:
        raise EventError(f"bad {env.type} data: {exc}") from None
    global _last_ts
    if env.ts != _last_ts[0]:  # the events of one command share their time
        _last_ts = (env.ts, parse_ts(env.ts))
    return Record(seq=env.seq, ts=_last_ts[1], actor=env.actor, event=event)


_last_ts: tuple[str, float] = ("", 0.0)


def _upcast(cls: type[Event], kind: str, v: int, data: dict[str, Any]) -> Event:
    while v < cls.schema_version:
        step = UPCASTERS.get((kind, v))
        if step is None:
            raise EventError(f"no upgrade for {kind} version {v}")
        data, v = step(data), v + 1
    return msgspec.convert(data, cls)


def to_builtins(obj: Any) -> Any:
    """Plain dicts/lists of an event or spec, for the API and the CLI."""
    return msgspec.to_builtins(obj)


def kinds(events: Iterable[Event]) -> list[str]:
    return [e.kind for e in events]
