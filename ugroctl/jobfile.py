"""Job files for ``ugroctl submit FILE.yaml``: the submit options as YAML, checked key by key.

Example::

    name: exp1
    command: [python, train.py, --epochs, "3"]
    nodes: 3
    gpus_per_node: 1
    min_vram_gb: 8
    env: {HF_HOME: /data/hf}
    max_retries: 2
    sync: true        # send this directory to the nodes (--sync)

``command`` is an argv list; a string is split with ``shlex.split`` (no shell
ever runs it). The file is read by the same hardened YAML reader as ugrod's
cluster.yaml (``ugrod.config.reader``: no tags, alias and size limits, duplicate
keys refused, bounded nesting), and every problem is reported at once, each as
``FILE: KEY: problem``, with the nearest known key suggested for unknown ones.
Numbers carry the same bounds ugrod enforces (``ugrod.core.jobspec``), so a bad value
is named here, in the file's own terms. The result is the body of ``POST /v1/jobs``.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from typing import Any

from ugrod.core.names import name_problem  # stdlib only: the one rule for names

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
MAX_FILE_BYTES = 1 << 20
# The same bounds as ugrod/core/jobspec.py (not imported: that module pulls in the daemon's
# config); a test checks they agree.
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
MAX_BACKOFF_S = 7 * 86400.0
MAX_STALL_S = 7 * 86400.0
MAX_RUNTIME_S = 366 * 86400.0
MAX_TEXT = 4096


class JobFileError(Exception):
    """Everything wrong with one job file: one ``FILE: KEY: problem`` line per problem."""

    def __init__(self, path: str, key: str | None, problem: str,
                 more: list[tuple[str | None, str]] | None = None) -> None:
        self.path, self.key, self.problem = path, key, problem
        self.problems: list[tuple[str | None, str]] = [(key, problem), *(more or [])]
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.path}: {k}: {p}" if k else f"{self.path}: {p}"
                for k, p in self.problems]


class _Bad(Exception):
    """One value's problem (recorded under its key)."""


class _Many(_Bad):
    """Problems inside a list or mapping: (key path suffix like ``[2]`` or ``.NAME``, problem)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems[0][1])
        self.problems = problems


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(v: Any, what: str = "a non-empty string") -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(f"expected {what}, got {_show(v)}")
    if "\x00" in v or len(v) > MAX_TEXT:
        raise _Bad(f"expected a string without NUL of at most {MAX_TEXT} characters")
    return v


def _time_limit(v: Any) -> str | float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return v
    return _string(v, "a duration such as 1:30:00 or 90m")


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"expected a whole number, got {_type_name(v)} {_show(v)}")
        if not lo <= v <= hi:
            raise _Bad(f"expected a whole number from {lo} to {hi}, got {_show(v)}")
        return v
    return check


def _seconds(lo: float, hi: float, *, positive: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"expected a number of seconds, got {_type_name(v)} {_show(v)}")
        if not math.isfinite(v) or not lo <= v <= hi or (positive and v <= 0):
            low = "more than 0" if positive else f"{lo:g}"
            raise _Bad(f"expected a number from {low} to {hi:g}, got {_show(v)}")
        return float(v)
    return check


def _vram(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(f"expected a positive number, got {_show(v)}")
    if not math.isfinite(v) or not 0 < v <= 4096:
        raise _Bad(f"expected a positive number of GB up to 4096, got {_show(v)}")
    return float(v)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_show(v)}")
    return v


def _name(kind: str) -> Callable[[Any], str]:
    """A job's or node's name: ugrod's one rule (ugrod/core/names.py)."""
    def check(v: Any) -> str:
        problem = name_problem(kind, _string(v))
        if problem is not None:
            raise _Bad(problem)
        return str(v)
    return check


def _strings(v: Any, item: Callable[[Any], str] = _string) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise _Bad(f"expected a list of strings, got {_type_name(v)}")
    out, bad = [], []
    for i, x in enumerate(v):
        try:
            out.append(item(x))
        except _Bad as exc:
            bad.append((f"[{i}]", str(exc)))
    if bad:
        raise _Many(bad[:20])
    return out


def _names(kind: str) -> Callable[[Any], list[str]]:
    return lambda v: _strings(v, _name(kind))


def _argv(v: Any) -> list[str]:
    if isinstance(v, str):
        try:
            parts = shlex.split(v)
        except ValueError as exc:
            raise _Bad(f"cannot split the command: {exc}") from None
    elif isinstance(v, list):
        parts = []
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, str | int | float):
                raise _Many([(f"[{i}]", f"expected a string, got {_type_name(x)}")])
            parts.append(x if isinstance(x, str) else str(x))
    else:
        raise _Bad(f"expected a list of arguments, got {_type_name(v)}")
    if not parts or not parts[0]:
        raise _Bad("the command is empty")
    if any("\x00" in p for p in parts):
        raise _Bad("command arguments may not contain NUL bytes")
    return parts


def _env(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise _Bad(f"expected a mapping of NAME: value, got {_type_name(v)}")
    out, bad = {}, []
    for name, value in v.items():
        where = f".{str(name)[:40]}"
        if not isinstance(name, str) or not ENV_NAME.match(name):
            bad.append((where, "not a valid environment variable name"))
        elif isinstance(value, bool) or not isinstance(value, str | int | float):
            bad.append((where, f"expected a string, got {_type_name(value)}"))
        elif isinstance(value, str) and "\x00" in value:
            bad.append((where, "may not contain NUL bytes"))
        else:
            out[name] = value if isinstance(value, str) else str(value)
    if bad:
        raise _Many(bad[:20])
    return out


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in allowed:
            raise _Bad(f"expected one of {', '.join(allowed)}, got {_show(v)}")
        return str(v)
    return check


# key in the file -> (key in the request body, how to check and convert it)
RULES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", _name("job")),
    "command": ("argv", _argv),
    "nodes": ("nodes", _integer(1, 1024)),
    "node_names": ("node_names", _names("node")),
    "gpus_per_node": ("gpus_per_node", _integer(0, 64)),
    "min_vram_gb": ("min_vram_gb", _vram),
    "labels": ("labels_required", _strings),
    "avoid_labels": ("labels_avoided", _strings),
    "priority": ("priority", _integer(PRIORITY_MIN, PRIORITY_MAX)),
    "max_retries": ("max_retries", _integer(0, 100)),
    "retry_backoff_s": ("retry_backoff_s", _seconds(0, MAX_BACKOFF_S)),
    "after": ("after", _names("job")),
    "after_any": ("after_any", _names("job")),
    "after_failed": ("after_failed", _names("job")),
    "time": ("time_limit", _time_limit),  # 1:30:00, 90m, or minutes: ugrod checks the form
    "hold": ("held", _boolean),
    "env": ("env", _env),
    "torchrun": ("torchrun", _boolean),
    "nproc_per_node": ("nproc_per_node", _integer(1, 256)),
    "cwd": ("cwd", _string),
    "sync": ("sync", _boolean),
    "stall_timeout_s": ("stall_timeout_s", _seconds(1, MAX_STALL_S)),
    "unreachable_tolerance_s": ("unreachable_tolerance_s", _seconds(1, MAX_STALL_S)),
    "stall_action": ("stall_action", _choice("alert", "requeue")),
    "expected_runtime_s": ("expected_runtime_s", _seconds(0, MAX_RUNTIME_S, positive=True)),
    "progress": ("progress", _strings),
    "progress_rank": ("progress_rank", _integer(0, 1023)),
    "loss_key": ("loss_key", _string),
    "stop_grace_s": ("stop_grace_s", _seconds(0.1, 3600)),
    "checkpoints": ("checkpoints", _string),
    "checkpoint_copy": ("checkpoint_copy", _choice("latest", "every", "none")),
    "checkpoint_keep": ("checkpoint_keep", _integer(0, 10000)),
    "resume_on": ("resume_on", _choice("rank0", "all")),
    "expand_env": ("expand_env", _boolean),
}
ALIASES = {"argv": "command", "node": "node_names", "label": "labels",
           "avoid_label": "avoid_labels", "held": "hold"}


def parse(text: str | bytes, path: str) -> dict[str, Any]:
    """YAML text -> a ``POST /v1/jobs`` body; raises JobFileError listing every problem."""
    from ugrod.config.reader import Refused, parse_yaml  # yaml: ~15 ms, only for job files

    try:
        doc, duplicates = parse_yaml(text, "a job file", frozenset({"command", "argv"}))
    except Refused as exc:
        raise JobFileError(path, exc.where or None, exc.problem) from None
    problems: list[tuple[str | None, str]] = [(d.where, d.problem) for d in duplicates]
    if not isinstance(doc, dict):
        problems.append((None, f"expected a mapping of job settings at the top, got "
                               f"{_type_name(doc)}"))
        _raise(path, problems)
    body: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in doc.items():
        shown = str(key)[:60]
        canonical = ALIASES.get(key, key) if isinstance(key, str) else None
        rule = RULES.get(canonical) if canonical is not None else None
        if rule is None:
            problems.append((shown, f"unknown key{_suggest(shown)}; known keys: "
                                    f"{', '.join(RULES)}"))
            continue
        target, convert = rule
        if target in given_as:
            problems.append((shown, f"given twice (also as {given_as[target]!r})"))
            continue
        given_as[target] = shown
        try:
            body[target] = convert(value)
        except _Many as exc:
            problems.extend((shown + suffix, problem) for suffix, problem in exc.problems)
        except _Bad as exc:
            problems.append((shown, str(exc)))
    if "argv" not in body and "argv" not in given_as:
        problems.append(("command", "missing: say what to run, e.g. "
                                    "command: [python, train.py]"))
    if problems:
        _raise(path, problems)
    if "node_names" in body and "nodes" not in body:
        body["nodes"] = len(body["node_names"])
    return body


def _raise(path: str, problems: list[tuple[str | None, str]]) -> None:
    (key, problem), *more = problems
    raise JobFileError(path, key, problem, more)


def load(path: str) -> dict[str, Any]:
    """Read and parse a job file; an unreadable file is a JobFileError too."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise JobFileError(path, None, f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise JobFileError(path, None, "larger than 1 MiB: not a job file")
    return parse(raw, path)


def _suggest(key: str) -> str:
    import difflib

    candidates = [*RULES, *ALIASES]
    close = difflib.get_close_matches(key.replace("-", "_"), candidates, n=1, cutoff=0.6)
    return f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""
