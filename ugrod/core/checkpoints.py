"""A job's checkpoints wherever they are, and what to copy, keep and resume from (pure).

Three sources know of a job's checkpoints: what it reported saving (``checkpoint_saved``,
with the node it ran rank 0 on), what the nodes list (its ``UGRO_CHECKPOINT_DIR`` and
its ``checkpoints`` glob), and the verified copies in the head's job directory
(``checkpoint_copied``). ``discover`` merges them into one list, oldest first, which
``status``, ``results``, ``why`` and the choice of what a retry resumes from all use.

A copy keeps its source's modification time, so a checkpoint and its copies (on the
head, or staged on another node for a retry) are one entry: same name, size and time.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Mapping, Sequence

import msgspec

POLICIES = ("latest", "every", "none")
STAGING = ("rank0", "all")
# A listed (not reported) checkpoint changed this recently may still be being written.
SETTLE_S = 5.0
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 600.0
# After the job ended, a copy that keeps failing is given up (and said so) after this many.
MAX_FAILURES_AFTER_END = 8


class Where(msgspec.Struct, frozen=True, gc=False):
    node: str
    path: str


class Listed(msgspec.Struct, frozen=True, gc=False):
    """One entry of a node's listing (a directory counts as one checkpoint)."""

    node: str
    path: str
    size_bytes: int
    mtime: float


class Reported(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A ``checkpoint_saved``: where the job said it saved, and when (the head's clock)."""

    path: str
    node: str | None
    step: int | None
    ts: float


class Central(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A verified copy in the head's job directory (``checkpoints/NAME``) and its source."""

    name: str
    node: str
    path: str
    size_bytes: int
    mtime: float
    step: int | None = None


class Found(msgspec.Struct, frozen=True, gc=False):
    """One checkpoint and every place it is known to be."""

    name: str
    size_bytes: int | None
    mtime: float  # the source's modification time, or when it was reported
    step: int | None = None
    at: tuple[Where, ...] = ()  # on nodes (listed there, or reported and not yet listed)
    central: str | None = None  # the name of its copy on the head
    reported: bool = False
    listed: bool = False


class _Group:
    __slots__ = ("at", "central", "listed", "reported", "step")

    def __init__(self) -> None:
        self.at: list[Where] = []
        self.step: int | None = None
        self.central: str | None = None
        self.reported = False
        self.listed = False


def discover(reported: Iterable[Reported], listed: Iterable[Listed],
             central: Iterable[Central], answered: Iterable[str] = ()) -> list[Found]:
    """Every checkpoint known anywhere, oldest first.

    ``answered``: nodes whose listing succeeded: a reported checkpoint such a node no
    longer lists is gone (rotated away); one on a node that did not answer is kept.
    """
    groups: dict[tuple[str, int | None, float], _Group] = {}
    by_where: dict[Where, tuple[str, int | None, float]] = {}
    key: tuple[str, int | None, float] | None
    for item in listed:
        key = (_base(item.path), item.size_bytes, item.mtime)
        g = groups.setdefault(key, _Group())
        where = Where(item.node, item.path)
        if where not in g.at:
            g.at.append(where)
        g.listed = True
        by_where[where] = key
    for c in central:
        # Matched by content (name, size, time): a path rewritten since (Lightning's
        # last.ckpt) is another checkpoint than its older copy on the head.
        key = (_base(c.path), c.size_bytes, c.mtime)
        g = groups.setdefault(key, _Group())
        g.central = c.name
        g.step = c.step if c.step is not None else g.step
        by_where.setdefault(Where(c.node, c.path), key)
    up = set(answered)
    for r in reported:
        where = Where(r.node or "", r.path)
        key = by_where.get(where)
        if key is None:
            if not r.node or r.node in up:
                continue  # its node answered without it: deleted since
            key = by_where[where] = (_base(r.path), None, r.ts)
            groups.setdefault(key, _Group()).at.append(where)
        g = groups[key]
        g.reported = True
        g.step = r.step if r.step is not None else g.step
    out = [Found(name=k[0], size_bytes=k[1], mtime=k[2], step=g.step, at=tuple(g.at),
                 central=g.central, reported=g.reported, listed=g.listed)
           for k, g in groups.items()]
    return sorted(out, key=order)


def _base(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def order(f: Found) -> tuple[float, int, str]:
    """Newest last: by modification time, then step, then name."""
    return (f.mtime, f.step if f.step is not None else -1, f.name)


def resume_candidates(found: Sequence[Found], reachable: Iterable[str]) -> list[Found]:
    """What a retry may resume from, newest first: on the head, or on a node that answers."""
    up = set(reachable)
    return [f for f in reversed(found)
            if f.central is not None or any(w.node in up for w in f.at)]


def to_copy(found: Sequence[Found], policy: str) -> list[Found]:
    """The checkpoints to copy to the head now, most wanted first.

    ``latest``: the newest, once (an older one not copied yet is passed over for good);
    ``every``: each not on the head yet, newest first; ``none``: nothing.
    """
    if policy == "none" or not found:
        return []
    if policy == "latest":
        newest = found[-1]
        return [newest] if newest.central is None and newest.at else []
    return [f for f in reversed(found) if f.central is None and f.at]


def to_prune(central: Sequence[Central], keep: int) -> list[str]:
    """Names of central copies past the newest ``keep`` (0: keep all)."""
    if keep <= 0 or len(central) <= keep:
        return []
    ordered = sorted(central, key=lambda c: (c.mtime, c.step if c.step is not None else -1))
    return [c.name for c in ordered[:len(ordered) - keep]]


def central_name(path: str, taken: Mapping[str, str]) -> str:
    """The name of a copy in ``checkpoints/``: the source's own name, made unique.

    ``taken``: name -> source path of the copies there already. The same path copied
    again (Lightning's ``last.ckpt`` rewritten) keeps its name; another path with the
    same base name gets a short digest of its path appended.
    """
    base = posixpath.basename(path.rstrip("/")) or "checkpoint"
    if base.startswith("."):
        base = "_" + base[1:]
    if taken.get(base, path) == path:
        return base
    return f"{base}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def backoff_s(failures: int) -> float:
    """Seconds before the next try after ``failures`` failures in a row."""
    return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(max(failures - 1, 0), 20)))


def room(free_bytes: int, need_bytes: int, floor_bytes: int) -> bool:
    """Whether ``need_bytes`` more leave the head's disk at or above its floor."""
    return free_bytes - need_bytes >= floor_bytes


def settled(newest_mtime: float, node_now: float, reported: bool) -> bool:
    """A reported checkpoint is complete; a listed one once nothing in it changed lately."""
    return reported or node_now - newest_mtime >= SETTLE_S
