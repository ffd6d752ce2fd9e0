"""How the head runs the node probe and the readiness checks: argv, and the probe server's lines.

The programs themselves are ``remote/probe.py`` (one round trip), ``remote/probe_server.py``
(one long-lived process per node, a request line answered by a probe line) and
``remote/readiness.py``, shipped as text (ugrod/nodes/programs.py) and run with the node's
Python, no shell: every part of the argv is its own argument. What they print is parsed
by ugrod.core.gpus (``parse_probe``, ``parse_readiness``).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ugrod.nodes import programs

PROBE_SCRIPT = programs.text("probe")
PROBE_SERVER = programs.text("probe_server")
READINESS_SCRIPT = programs.text("readiness")


def probe_argv(python: str = "python3", work_dir: str = "~/ugro",
               pid_files: Sequence[str] = (), *, smi: str = "nvidia-smi",
               smi_timeout_s: float = 5.0) -> list[str]:
    """argv for one probe round trip (no shell: every part is its own argument)."""
    return [python, "-c", PROBE_SCRIPT, work_dir, smi, repr(float(smi_timeout_s)),
            *pid_files]


def probe_server_argv(python: str = "python3", work_dir: str = "~/ugro", *,
                      smi: str = "nvidia-smi", smi_timeout_s: float = 5.0) -> list[str]:
    """argv of the long-lived probe process (``PROBE_SERVER``): one per node, a line a request."""
    return [python, "-c", PROBE_SERVER, work_dir, smi, repr(float(smi_timeout_s))]


def probe_request(request_id: int, pid_files: Sequence[str] = ()) -> bytes:
    """One request line for ``PROBE_SERVER``."""
    return msgspec.json.encode({"id": request_id, "pid_files": list(pid_files)}) + b"\n"


class _Tagged(msgspec.Struct):
    v: int = 0
    id: int | None = None
    ready: bool = False


def probe_line_kind(line: bytes) -> tuple[str, int | None]:
    """What a ``PROBE_SERVER`` line is: ("ready", None), ("answer", id) or ("other", None)."""
    try:
        tag = msgspec.json.decode(line, type=_Tagged)
    except (msgspec.DecodeError, UnicodeError):
        return "other", None
    if tag.v != 1:
        return "other", None
    if tag.ready:
        return "ready", None
    return ("answer", tag.id) if tag.id is not None else ("other", None)


def readiness_argv(python: str = "python3", work_dir: str = "~/ugro", *,
                   smi: str = "nvidia-smi", timeout_s: float = 60.0) -> list[str]:
    """argv for the on-demand readiness checks (``import torch`` can take a while)."""
    return [python, "-c", READINESS_SCRIPT, work_dir, smi, repr(float(timeout_s))]


__all__ = [
    "PROBE_SCRIPT", "PROBE_SERVER", "READINESS_SCRIPT", "probe_argv", "probe_line_kind",
    "probe_request", "probe_server_argv", "readiness_argv",
]
