"""Training-metrics helper for jobs run by UGRO: report numbers, answer checkpoint requests.

Standard library only and a single file: import it from the installed package
(``from exporters import ugro_metrics``) or copy it next to a training script.

Outside UGRO (``UGRO_METRICS_FILE`` and ``UGRO_JOB_DIR`` unset) every call is a
cheap no-op: nothing is written, validated or installed (no signal handler).

Lines appended to ``$UGRO_METRICS_FILE``, one JSON object each::

    {"ts":1712345678.123,"step":400,"loss":0.25,"throughput":812.5}
    {"ts":1712345679.004,"event":"checkpoint","path":"/abs/step-000400.pt","step":400}

* ``ts`` is Unix time in seconds; ``step`` is an int and is omitted when not given.
* Values are finite numbers only. Ints (and bools, as 0/1) stay ints; anything
  else float-like (numpy scalars, one-element tensors, Decimal) becomes a float.
  **Non-finite values (NaN, +-inf) are dropped from the line**, the rest of the
  line is still written: ``NaN``/``Infinity`` are not JSON and the reader
  (ugrod) must never see them; null was rejected because every consumer would
  then have to special-case it. A diverged loss therefore shows as "no new
  loss" while ``step`` keeps advancing.
* Names are normalised to ``[A-Za-z_][A-Za-z0-9_]*`` (at most 64 characters):
  every run of other characters becomes ``_``, so ``train/loss`` is written as
  ``train_loss``. A value that is not a number, or a name that normalises to
  nothing or to a reserved name (ts, step, event, rank, path), is dropped with
  one warning on stderr per name. This module never raises into the training loop; write
  errors (disk full, ...) are reported on stderr once per error and retried
  on the next call.
* Each line is written with a single ``write(2)`` on a file opened with
  ``O_APPEND``: nothing is buffered, and concurrent writers (``all_ranks=True``)
  never interleave within a line.
* Only global rank 0 (``RANK`` unset or ``0``, as torchrun sets it) writes,
  unless ``all_ranks=True``; such lines carry ``"rank": N``.
* Heartbeats: on every other node, the first process (``LOCAL_RANK`` 0) that calls
  ``report`` with a step writes at most one line a second to its own node's file,
  ``{"ts":...,"step":N,"rank":R,"event":"heartbeat"}``: the job's progress then reaches
  ugrod by each node's own path, so a cut link to rank 0's node is not mistaken for a
  job that stopped training (ugrod/core/node_loss.py). Call ``report`` on every rank.

Checkpoint requests: ``ugroctl checkpoint JOB`` makes ugrod write
``$UGRO_JOB_DIR/checkpoint.request`` on every node of the job (a new file each
time), or send SIGUSR1 to the rank processes. ``checkpoint_requested()`` returns
True once per request in each process that asks (the file is not consumed, so
every rank on a node sees it). Note that torchrun itself dies on SIGUSR1 (it does
not handle it), so the file is the way to reach a job started under torchrun.
``exporters/ugro_torch.should_checkpoint()`` makes all ranks agree (a collective),
which the Trainer and Lightning integrations use: every rank saves together.

``report_run(**params)`` records what was run (model, dataset, epochs, learning
rate, ...: strings or numbers) with the digest of the script, for ``ugroctl results``.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, SupportsFloat, SupportsIndex

__all__ = [
    "attempt",
    "checkpoint_dir",
    "checkpoint_requested",
    "enabled",
    "normalise_name",
    "report",
    "report_run",
    "resume_from",
    "saved_checkpoint",
]

REQUEST_FILE = "checkpoint.request"
_RESERVED = frozenset({"ts", "step", "event", "rank", "path"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NON_NAME = re.compile(r"[^A-Za-z0-9_]+")
MAX_NAME = 64

_lock = threading.Lock()
_fd = -1
_fd_path: str | None = None
_warned: set[str] = set()
_signal_seen = False
_handler_installed = False
_previous_handler: Any = None
_seen_request: tuple[int, int, int] | None = None
HEARTBEAT_S = 1.0
_last_beat = -HEARTBEAT_S


def enabled() -> bool:
    """True when running under UGRO (the metrics file or the job dir is set)."""
    return bool(os.environ.get("UGRO_METRICS_FILE") or os.environ.get("UGRO_JOB_DIR"))


def report(step: int | None = None, *, all_ranks: bool = False, **values: object) -> None:
    """Append one metrics line (``ts``, ``step``, the values) to ``$UGRO_METRICS_FILE``."""
    path = os.environ.get("UGRO_METRICS_FILE")
    if not path:
        return
    rank = _rank()
    if rank != 0 and not all_ranks:
        if step is not None:
            _heartbeat(path, rank, step)
        return
    line: dict[str, object] = {"ts": round(time.time(), 6)}
    if step is not None:
        step_n = _step(step)
        if step_n is not None:
            line["step"] = step_n
    if all_ranks:
        line["rank"] = rank
    for raw, value in values.items():
        name = normalise_name(raw)
        if name is None:
            _warn(f"name:{raw}", f"metric name {raw!r} is not allowed; dropped")
            continue
        number = _number(value)
        if number is _NOT_A_NUMBER:
            kind = type(value).__name__
            _warn(f"type:{name}", f"metric {name!r} is not a number ({kind}); dropped")
        elif number is not None:
            line[name] = number
    if len(line) > (2 if all_ranks else 1):
        _append(path, line)


def normalise_name(name: str) -> str | None:
    """``train/loss`` -> ``train_loss``; None when nothing usable (or a reserved name) is left."""
    if not isinstance(name, str) or not name or len(name) > 4 * MAX_NAME:
        return None
    out = _NON_NAME.sub("_", name).strip("_")
    if not out or len(out) > MAX_NAME or not _NAME.match(out) or out in _RESERVED:
        return None
    return out


def report_run(**params: object) -> None:
    """Record what this run is (``{"event": "params", ...}``): strings and finite numbers.

    Adds ``code_sha256``, the digest of the script being run (``__main__``), when found.
    Rank 0 only; strings are cut at 256 characters, at most 64 parameters.
    """
    path = os.environ.get("UGRO_METRICS_FILE")
    if not path or _rank() != 0:
        return
    line: dict[str, object] = {"ts": round(time.time(), 6), "event": "params"}
    for raw, value in list(params.items())[:64]:
        name = normalise_name(raw)
        if name is None:
            continue
        if isinstance(value, str):
            line[name] = value[:256]
        elif value is not None:
            number = _number(value)
            if isinstance(number, int | float):
                line[name] = number
            elif number is _NOT_A_NUMBER:
                line[name] = str(value)[:256]
    digest = _script_digest()
    if digest:
        line.setdefault("code_sha256", digest)
    _append(path, line)


def _script_digest() -> str | None:
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if not script:
        return None
    import hashlib

    try:
        with open(script, "rb") as f:
            return hashlib.sha256(f.read(64 << 20)).hexdigest()
    except OSError:
        return None


def saved_checkpoint(path: str | os.PathLike[str], step: int, *, all_ranks: bool = False) -> None:
    """Tell ugrod a checkpoint was written: ``{"event": "checkpoint", "path", "step"}``."""
    metrics = os.environ.get("UGRO_METRICS_FILE")
    if not metrics:
        return
    rank = _rank()
    if rank != 0 and not all_ranks:
        return
    line: dict[str, object] = {
        "ts": round(time.time(), 6),
        "event": "checkpoint",
        "path": os.path.abspath(os.fspath(path)),
    }
    step_n = _step(step)
    if step_n is not None:
        line["step"] = step_n
    if all_ranks:
        line["rank"] = rank
    _append(metrics, line)


def checkpoint_requested(*, all_ranks: bool = False) -> bool:
    """True once per checkpoint request (request file or SIGUSR1) in this process.

    Only global rank 0 (the rank that saves in DDP) sees requests; other ranks
    get False unless ``all_ranks=True``, and then every rank sees each request
    once; the caller must make the ranks agree on the step (``ugro_torch.
    should_checkpoint`` does). The SIGUSR1 handler is installed on the first
    call, on every rank, when under UGRO and in the main thread.
    """
    global _signal_seen, _seen_request
    if not enabled():
        return False
    _install_handler()
    if _rank() != 0 and not all_ranks:
        return False
    requested = _signal_seen
    _signal_seen = False
    job_dir = os.environ.get("UGRO_JOB_DIR")
    if job_dir:
        # ugrod replaces the file at each request (a new inode): each process remembers
        # the last one it saw instead of deleting it, so every rank on the node sees it.
        try:
            st = os.stat(os.path.join(job_dir, REQUEST_FILE))
            token = (st.st_ino, st.st_mtime_ns, st.st_size)
            if token != _seen_request:
                _seen_request = token
                requested = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            _warn(f"request:{exc.errno}", f"cannot read {REQUEST_FILE} in {job_dir}: {exc}")
    return requested


def checkpoint_dir() -> Path | None:
    """Where to save checkpoints (``$UGRO_CHECKPOINT_DIR``), or None outside UGRO."""
    value = os.environ.get("UGRO_CHECKPOINT_DIR")
    return Path(value) if value else None


def resume_from() -> Path | None:
    """The checkpoint to resume from (``$UGRO_RESUME_FROM``), or None on a fresh start."""
    value = os.environ.get("UGRO_RESUME_FROM")
    return Path(value) if value else None


def attempt() -> int:
    """This run's attempt number (``$UGRO_ATTEMPT``, 1 on the first run and outside UGRO)."""
    try:
        return int(os.environ.get("UGRO_ATTEMPT") or 1)
    except ValueError:
        return 1


class _NotANumber:
    pass


_NOT_A_NUMBER = _NotANumber()


def _number(value: object) -> int | float | _NotANumber | None:
    """The JSON number for value; None when non-finite; _NOT_A_NUMBER when not numeric."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | bytes | bytearray):
        return _NOT_A_NUMBER
    if isinstance(value, SupportsIndex):
        try:
            return operator.index(value)
        except (TypeError, ValueError, RuntimeError):
            pass  # e.g. a float tensor: has __index__ but refuses it
    if isinstance(value, SupportsFloat):
        try:
            f = float(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return _NOT_A_NUMBER
        return f if math.isfinite(f) else None
    return _NOT_A_NUMBER


def _step(step: object) -> int | None:
    try:
        if isinstance(step, SupportsIndex):
            return operator.index(step)
    except (TypeError, ValueError, RuntimeError):
        pass
    _warn("step", f"step must be an int, got {type(step).__name__}; omitted")
    return None


def _heartbeat(path: str, rank: int, step: object) -> None:
    """The newest step of a rank other than 0, at most once a second, from LOCAL_RANK 0."""
    global _last_beat
    if (os.environ.get("LOCAL_RANK") or "0") != "0":
        return
    now = time.monotonic()
    if now - _last_beat < HEARTBEAT_S:
        return
    step_n = _step(step)
    if step_n is None:
        return
    _last_beat = now
    _append(path, {"ts": round(time.time(), 6), "step": step_n, "rank": rank,
                   "event": "heartbeat"})


def _rank() -> int:
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def _append(path: str, line: dict[str, object]) -> None:
    global _fd, _fd_path
    data = (json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n").encode()
    with _lock:
        try:
            if _fd_path != path:
                _close()
                parent = os.path.dirname(path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                _fd = os.open(path, flags, 0o644)
                _fd_path = path
            view = memoryview(data)
            while view:
                view = view[os.write(_fd, view) :]
        except OSError as exc:
            _close()
            _warn(f"write:{path}:{exc.errno}", f"cannot write metrics to {path}: {exc}")


def _close() -> None:
    global _fd, _fd_path
    if _fd >= 0:
        with contextlib.suppress(OSError):
            os.close(_fd)
    _fd, _fd_path = -1, None


def _warn(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"ugro_metrics: {message}", file=sys.stderr, flush=True)


def _on_sigusr1(signum: int, frame: FrameType | None) -> None:
    global _signal_seen
    _signal_seen = True
    previous = _previous_handler
    if callable(previous):
        previous(signum, frame)


def _install_handler() -> None:
    global _handler_installed, _previous_handler
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    _handler_installed = True
    _previous_handler = signal.signal(signal.SIGUSR1, _on_sigusr1)


def _reset() -> None:
    """Forget open files, warnings and the signal handler (for tests)."""
    global _signal_seen, _handler_installed, _previous_handler, _seen_request, _last_beat
    _seen_request = None
    _last_beat = -HEARTBEAT_S
    with _lock:
        _close()
    _warned.clear()
    if _handler_installed:
        previous = _previous_handler if _previous_handler is not None else signal.SIG_DFL
        signal.signal(signal.SIGUSR1, previous)
    _signal_seen = False
    _handler_installed = False
    _previous_handler = None
