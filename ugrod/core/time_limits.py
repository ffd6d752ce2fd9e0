"""Wall-clock limits (``--time``): Slurm's duration formats, and which jobs ran past theirs.

Pure: ``parse`` reads what people type, ``expired`` decides from state and ``now``
(given by the caller) which running jobs are over their limit. The daemon's loop
records the ``JobStopping`` events it returns; the executor does the killing.

The limit counts from the moment the attempt was placed (its ``started_at``), as
Slurm counts from the start of the allocation; a retry gets the full limit again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from ugrod.core import events as ev
from ugrod.core.state import ACTIVE, State

MAX_S = 365 * 86400

# Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\Z")
# And what people say: 90m, 2h, 1h30m, 45s, 1d12h.
_UNITS = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                    r"(?:(\d+(?:\.\d+)?)s)?\Z")

FORMS = "minutes (90), M:S, H:M:S (1:30:00), D-H, D-H:M, D-H:M:S (2-12:00:00), or 90m, 2h, 1h30m"


class BadTimeLimit(ValueError):
    """What was typed is not a duration we read; the message says which forms are."""


def parse(text: str | float | int) -> float:
    """Seconds of a time limit: Slurm's formats or 90m/2h/1h30m, or a number of seconds."""
    if isinstance(text, bool):
        raise BadTimeLimit(f"time limit: expected a duration such as 1:30:00, got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        t = text.strip().lower()
        if not t:
            raise BadTimeLimit(f"time limit: empty; use {FORMS}")
        seconds = _slurm(t) if "-" in t or ":" in t or t.isdigit() else _units(t, text)
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadTimeLimit(f"time limit must be more than 0 seconds, got {text!r}")
    if seconds > MAX_S:
        raise BadTimeLimit(f"time limit {text!r} is over the maximum of 365 days")
    return seconds


def _slurm(t: str) -> float:
    m = _SLURM.match(t)
    if m is None:
        raise BadTimeLimit(f"time limit {t!r}: use {FORMS}")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    assert a is not None
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = a, b or 0, c or 0
        return days * 86400 + h * 3600 + mi * 60 + s
    if c is not None:  # H:M:S
        return a * 3600 + (b or 0) * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M (Slurm: a bare number is minutes)


def _units(t: str, shown: str) -> float:
    m = _UNITS.match(t)
    if m is None or not any(m.groups()):
        raise BadTimeLimit(f"time limit {shown!r}: use {FORMS}")
    d, h, mi, s = (float(x) if x is not None else 0.0 for x in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


def show(seconds: float) -> str:
    """Seconds the way Slurm prints a limit: H:MM:SS, or D-HH:MM:SS past a day."""
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h}:{m:02d}:{s:02d}"


def deadline(started_at: float | None, limit_s: float | None) -> float | None:
    """When an attempt placed at ``started_at`` must end; None without a limit."""
    if started_at is None or limit_s is None:
        return None
    return started_at + limit_s


def expired(state: State, candidates: Iterable[str], now: float) -> list[ev.JobStopping]:
    """The running jobs among ``candidates`` past their time limit, as the events ending them.

    A job already being stopped keeps the outcome it is being driven to.
    """
    out: list[ev.JobStopping] = []
    for job_id in candidates:
        job = state.jobs.get(job_id)
        if job is None or job.state not in ACTIVE or job.stopping is not None:
            continue
        end = deadline(job.started_at, job.spec.time_limit_s)
        if end is not None and end <= now:
            out.append(ev.JobStopping(
                job=job.id, attempt=job.attempt, outcome="cancelled",
                reason=f"time limit: ran past its --time of {show(job.spec.time_limit_s or 0)}"))
    return out
