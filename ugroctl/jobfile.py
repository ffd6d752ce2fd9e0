"""Job files for ``ugroctl submit FILE.yaml``: the submit options as YAML, checked key by key.

Example::

    name: exp1
    command: [python, train.py, --epochs, "3"]
    nodes: 3
    gpus_per_node: 1
    min_vram_gb: 8
    env: {HF_HOME: /data/hf}
    max_retries: 2

``command`` is an argv list; a string is split with ``shlex.split`` (no shell
ever runs it). Unknown keys are rejected, with the nearest known key suggested.
The result is the body of ``POST /v1/jobs``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class JobFileError(Exception):
    """``FILE: KEY: problem``: what is wrong and where."""

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> JobFileError:
        return JobFileError(self.path, key, problem)

    def string(self, key: str, v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise self.fail(key, f"expected a non-empty string, got {_show(v)}")
        return v

    def integer(self, key: str, v: Any, minimum: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"expected a whole number, got {_type_name(v)} {_show(v)}")
        if v < minimum:
            raise self.fail(key, f"expected a number ≥ {minimum}, got {v}")
        return v

    def positive(self, key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise self.fail(key, f"expected a positive number, got {_show(v)}")
        if v != v or v == float("inf"):
            raise self.fail(key, f"expected a finite number, got {v}")
        return float(v)

    def boolean(self, key: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true or false, got {_show(v)}")
        return v

    def strings(self, key: str, v: Any) -> list[str]:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise self.fail(key, f"expected a list of strings, got {_type_name(v)}")
        return [self.string(f"{key}[{i}]", x) for i, x in enumerate(v)]

    def argv(self, key: str, v: Any) -> list[str]:
        if isinstance(v, str):
            try:
                parts = shlex.split(v)
            except ValueError as exc:
                raise self.fail(key, f"cannot split the command: {exc}") from None
        elif isinstance(v, list):
            parts = []
            for i, x in enumerate(v):
                if isinstance(x, bool) or not isinstance(x, str | int | float):
                    raise self.fail(f"{key}[{i}]", f"expected a string, got {_type_name(x)}")
                parts.append(x if isinstance(x, str) else str(x))
        else:
            raise self.fail(key, f"expected a list of arguments, got {_type_name(v)}")
        if not parts or not parts[0]:
            raise self.fail(key, "the command is empty")
        return parts

    def env(self, key: str, v: Any) -> dict[str, str]:
        if not isinstance(v, dict):
            raise self.fail(key, f"expected a mapping of NAME: value, got {_type_name(v)}")
        out = {}
        for name, value in v.items():
            if not isinstance(name, str) or not ENV_NAME.match(name):
                raise self.fail(f"{key}.{name}", "not a valid environment variable name")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise self.fail(f"{key}.{name}", f"expected a string, got {_type_name(value)}")
            out[name] = value if isinstance(value, str) else str(value)
        return out

    def choice(self, key: str, v: Any, allowed: tuple[str, ...]) -> str:
        if v not in allowed:
            raise self.fail(key, f"expected one of {', '.join(allowed)}, got {_show(v)}")
        return str(v)


# key in the file -> (key in the request body, how to check and convert it)
_Rule = tuple[str, Callable[[_Checker, str, Any], Any]]
RULES: dict[str, _Rule] = {
    "name": ("name", _Checker.string),
    "command": ("argv", _Checker.argv),
    "nodes": ("nodes", lambda c, k, v: c.integer(k, v, 1)),
    "node_names": ("node_names", _Checker.strings),
    "gpus_per_node": ("gpus_per_node", _Checker.integer),
    "min_vram_gb": ("min_vram_gb", _Checker.positive),
    "labels": ("labels_required", _Checker.strings),
    "avoid_labels": ("labels_avoided", _Checker.strings),
    "priority": ("priority", lambda c, k, v: c.integer(k, v, -(2**31))),
    "max_retries": ("max_retries", _Checker.integer),
    "retry_backoff_s": ("retry_backoff_s", _Checker.positive),
    "after": ("after", _Checker.strings),
    "hold": ("held", _Checker.boolean),
    "env": ("env", _Checker.env),
    "torchrun": ("torchrun", _Checker.boolean),
    "nproc_per_node": ("nproc_per_node", lambda c, k, v: c.integer(k, v, 1)),
    "cwd": ("cwd", _Checker.string),
    "stall_timeout_s": ("stall_timeout_s", _Checker.positive),
    "stall_action": ("stall_action", lambda c, k, v: c.choice(k, v, ("alert", "requeue"))),
    "expected_runtime_s": ("expected_runtime_s", _Checker.positive),
    "progress": ("progress", _Checker.strings),
    "progress_rank": ("progress_rank", _Checker.integer),
    "loss_key": ("loss_key", _Checker.string),
    "stop_grace_s": ("stop_grace_s", _Checker.positive),
}
ALIASES = {"argv": "command", "node": "node_names", "label": "labels",
           "avoid_label": "avoid_labels", "held": "hold"}


def parse(text: str, path: str) -> dict[str, Any]:
    """YAML text -> a ``POST /v1/jobs`` body; raises JobFileError naming the file and key."""
    import yaml  # only here: yaml costs ~20 ms to import

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobFileError(path, None, f"not valid YAML: {where}{problem}") from None
    if not isinstance(doc, dict):
        raise JobFileError(path, None, f"expected a mapping of job settings at the top, got "
                           f"{_type_name(doc)}")
    check = _Checker(path)
    body: dict[str, Any] = {}
    for key, value in doc.items():
        canonical = ALIASES.get(key, key) if isinstance(key, str) else key
        rule = RULES.get(canonical) if isinstance(canonical, str) else None
        if rule is None:
            raise check.fail(str(key), f"unknown key{_suggest(str(key))}; known keys: "
                             f"{', '.join(RULES)}")
        target, convert = rule
        if target in body:
            raise check.fail(str(key), f"given twice (also as {canonical!r})")
        body[target] = convert(check, str(key), value)
    if "argv" not in body:
        raise JobFileError(path, "command", "missing: say what to run, e.g. "
                           "command: [python, train.py]")
    if "node_names" in body and "nodes" not in body:
        body["nodes"] = len(body["node_names"])
    return body


def load(path: str) -> dict[str, Any]:
    """Read and parse a job file; an unreadable file is a JobFileError too."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1_000_001)
    except OSError as exc:
        raise JobFileError(path, None, f"cannot read: {exc.strerror}") from None
    if len(raw) > 1_000_000:
        raise JobFileError(path, None, "larger than 1 MB: not a job file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobFileError(path, None, f"not UTF-8 text (byte {exc.start})") from None
    return parse(text, path)


def _suggest(key: str) -> str:
    import difflib

    candidates = [*RULES, *ALIASES]
    close = difflib.get_close_matches(key.replace("-", "_"), candidates, n=1, cutoff=0.6)
    return f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""
