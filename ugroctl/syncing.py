"""``--sync``: the user's directory, as ugroctl (running as the user) reads and uploads it.

``manifest`` walks the directory into ``[path, mode, size, sha256]`` entries, leaving
out ``.git``, ``__pycache__`` and what ``.ugroignore`` names; ``upload`` sends the
manifest, then only the contents ugrod says it lacks, and returns the tree's digest
for the job (``sync`` in the request). ugrod copies the tree to each node at launch.

``.ugroignore`` (at the top of the directory) takes one pattern a line, as
``.gitignore`` does for the common cases: ``#`` comments, ``name`` matches at any
depth, ``dir/`` only directories, a pattern with a ``/`` inside is anchored at the
top (``data/raw``), shell wildcards ``* ? [..]`` and ``**`` across directories.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ALWAYS_IGNORED = (".git/", "__pycache__/", ".ugroignore")
IGNORE_FILE = ".ugroignore"
BATCH_BYTES = 32 << 20


class SyncError(Exception):
    """The directory cannot be sent as it is; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Rule:
    regex: re.Pattern[str]
    dir_only: bool
    negate: bool


def parse_ignore(text: str) -> list[Rule]:
    """``.ugroignore`` lines -> rules (later ones win, ``!pattern`` re-includes)."""
    rules = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line  # "data/raw" and "/out" start at the top; "out" anywhere
        line = line.lstrip("/")
        if not line:
            continue
        rules.append(Rule(_compile(line, anchored), dir_only, negate))
    return rules


def _compile(pattern: str, anchored: bool) -> re.Pattern[str]:
    parts = []
    for i, piece in enumerate(pattern.split("**")):
        if i:
            parts.append(".*")
        parts.append(fnmatch.translate(piece)[4:-3].replace(".*", "[^/]*"))
    body = "".join(parts)
    return re.compile(body + r"\Z" if anchored else r"(?:.*/)?" + body + r"\Z")


def ignored(rel: str, is_dir: bool, rules: Sequence[Rule]) -> bool:
    """Whether ``rel`` (a path relative to the top, with ``/``) is left out."""
    out = False
    for rule in rules:
        if rule.dir_only and not is_dir:
            continue
        if rule.regex.match(rel):
            out = not rule.negate
    return out


def default_rules() -> list[Rule]:
    return parse_ignore("\n".join(ALWAYS_IGNORED))


def walk(top: str, rules: Sequence[Rule]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, full path, stat) of every file to send, in a stable order.

    Symbolic links to files inside or outside are sent as the file they point at;
    links to directories are not followed (no loops, nothing unexpected pulled in).
    """
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(top, rel_dir) if rel_dir else top
        try:
            entries = sorted(os.scandir(full_dir), key=lambda e: e.name)
        except PermissionError as exc:
            raise SyncError(f"cannot read {full_dir}: permission denied (name it in "
                            f"{IGNORE_FILE} to leave it out)") from exc
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_dir(follow_symlinks=False):
                if not ignored(rel, True, rules):
                    subdirs.append(rel)
                continue
            if ignored(rel, False, rules):
                continue
            try:
                st = os.stat(entry.path)
            except FileNotFoundError:
                continue  # a dangling link, or removed while we looked
            if stat.S_ISREG(st.st_mode):
                yield rel, entry.path, st
        stack.extend(reversed(subdirs))


Sources = dict[str, tuple[str, int, int]]  # sha256 -> (a file with it, size, mtime_ns)


def manifest(top: str, *, max_bytes: int, max_files: int) -> tuple[list[list[Any]], Sources]:
    """(entries [path, mode, size, sha256], where each content can be read from)."""
    rules = default_rules()
    try:
        with open(os.path.join(top, IGNORE_FILE), encoding="utf-8") as f:
            rules += parse_ignore(f.read(1 << 20))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise SyncError(f"cannot read {os.path.join(top, IGNORE_FILE)}: {exc}") from exc
    entries: list[list[Any]] = []
    sources: Sources = {}
    total = 0
    for rel, full, st in walk(top, rules):
        total += st.st_size
        if len(entries) >= max_files:
            raise SyncError(f"{top} has more than {max_files} files to send; name what the "
                            f"job does not need (data, outputs, environments) in "
                            f"{os.path.join(top, IGNORE_FILE)}")
        if total > max_bytes:
            raise SyncError(f"{top} holds more than {max_bytes / 1e6:.0f} MB to send; name "
                            f"big data and outputs in {os.path.join(top, IGNORE_FILE)} "
                            f"and keep them on the nodes")
        sha = _sha256(full)
        entries.append([rel, 0o700 if st.st_mode & 0o100 else 0o600, st.st_size, sha])
        sources.setdefault(sha, (full, st.st_size, st.st_mtime_ns))
    if not entries:
        raise SyncError(f"{top}: nothing to send (empty, or all of it ignored)")
    return entries, sources


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def batches(missing: Sequence[str], sources: Sources) -> Iterator[bytes]:
    """Framed request bodies (``SHA SIZE\\n`` + bytes, ..., ``end\\n``) of about 32 MB."""
    buf = bytearray()
    for sha in missing:
        path, size, mtime_ns = sources[sha]
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(size + 1)
        if (st.st_size, st.st_mtime_ns, len(data)) != (size, mtime_ns, size):
            # (ugrod checks every object's sha256 too: a change is never stored)
            raise SyncError(f"{path} changed while it was being sent; run the command again")
        buf += f"{sha} {len(data)}\n".encode() + data
        if len(buf) >= BATCH_BYTES:
            yield bytes(buf + b"end\n")
            buf.clear()
    if buf:
        yield bytes(buf + b"end\n")


def upload(client: Any, top: str) -> tuple[str, int, int, int]:
    """Send ``top`` to ugrod: (tree digest, files, bytes in the tree, bytes uploaded)."""
    limits = client.get("/v1/sync")
    entries, sources = manifest(top, max_bytes=int(limits["max_bytes"]),
                                max_files=int(limits["max_files"]))
    answer = client.post("/v1/sync/trees", {"entries": entries})
    sent = 0
    for body in batches(list(answer.get("missing") or []), sources):
        client.post_bytes("/v1/sync/objects", body)
        sent += len(body)
    return str(answer["tree"]), int(answer["files"]), int(answer["bytes"]), sent
