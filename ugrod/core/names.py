"""The one rule for names of jobs, sweeps and nodes: checked by the API, the state rules,
the config reader and the code that turns a name into a directory.

A name becomes a path component on every node (``jobs/NAME/attempt-1``), a Prometheus
label, a torchrun rendezvous id and a word in log lines, so it is kept to what is safe
in all of them: 1-64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or
digit, and never ``..`` (nothing that reads as a path step, even inside a name).
Before this module the API allowed 64 characters and ``..``, the config 63, and the
node-side directory code refused ``..``: a job could be accepted and then never start.

Stdlib only (``re``): ``ugroctl`` may import it without cost.
"""

from __future__ import annotations

import re
from typing import Final

MAX_NAME: Final = 64
# Without anchors so that other patterns (the watchdog's run directories) can embed it.
NAME_PATTERN: Final = r"(?![A-Za-z0-9._-]*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RE: Final = re.compile(NAME_PATTERN)
NAME_RULE: Final = ("1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                    "without '..'")


# The rule before the one above (64 characters, ``..`` allowed). Only replay uses it: the
# event log is never rewritten, and a log that recorded such a name (the API accepted it
# then; the job could never start) must still replay, or an upgrade would refuse to start.
# Every way in (API, commands, config, directories) checks NAME_RE.
RECORDED_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_name(name: object) -> bool:
    """True when ``name`` is a string following the one naming rule."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def name_problem(kind: str, name: str) -> str | None:
    """None for a good name, else one line for people saying what is wrong and what to use."""
    if valid_name(name):
        return None
    shown = name if len(name) <= 60 else name[:60] + "…"
    return f"invalid {kind} name {shown!r}: use {NAME_RULE}"
