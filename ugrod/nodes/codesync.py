"""``--sync``: the user's directory sent to every node of a job, content-addressed.

``ugroctl`` (running as the user, the only one who reads the user's files) walks the
directory and sends its manifest: one ``[path, mode, size, sha256]`` entry per file.
ugrod checks it (``check_manifest``, pure), names the tree by the sha256 of its
canonical form, keeps it in the head store of that user (``HeadStore``, one per uid,
so nobody learns what another user's files contain) and answers which file contents it
lacks; ugroctl uploads those. At launch the executor asks each node's store which
objects it lacks, streams only those over the node's SSH link, and has the node build
the tree in the job's own directory from read-only hard links into its store (``push``;
the node side is ``rank_wrapper``'s sync commands). Unchanged files are never sent twice.

Framing of an object stream (upload to ugrod and ugrod to a node alike)::

    SHA256 SIZE\\n <SIZE bytes> ... end\\n
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ugrod.nodes.agent import NodeAgent

SHA_RE = re.compile(r"[0-9a-f]{64}")
TREE_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_PATH = 4096
CHUNK = 1 << 20

Entry = tuple[str, int, int, str]  # path, mode (0o600 or 0o700), size, sha256


class SyncError(ValueError):
    """A manifest or object stream that cannot be accepted; the message says why."""


def check_manifest(raw: Any, *, max_bytes: int, max_files: int) -> tuple[str, list[Entry]]:
    """A client's manifest -> (tree digest, sorted entries); SyncError names the first fault."""
    if not isinstance(raw, list):
        raise SyncError("entries must be a list of [path, mode, size, sha256]")
    if len(raw) > max_files:
        raise SyncError(f"the directory has {len(raw)} files; at most {max_files} are sent "
                        f"(name what to leave out in .ugroignore)")
    entries: list[Entry] = []
    total = 0
    for item in raw:
        if not (isinstance(item, list) and len(item) == 4):
            raise SyncError(f"bad entry {str(item)[:100]}: expected [path, mode, size, sha256]")
        path, mode, size, sha = item
        if not isinstance(path, str) or not safe_path(path):
            raise SyncError(f"bad path {str(path)[:100]!r}: relative, no '.', '..' or empty "
                            f"parts, at most {MAX_PATH} characters")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise SyncError(f"{path}: bad mode {mode!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SyncError(f"{path}: bad size {size!r}")
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
            raise SyncError(f"{path}: bad sha256 {str(sha)[:80]!r}")
        total += size
        entries.append((path, 0o700 if mode & 0o100 else 0o600, size, sha))
    if total > max_bytes:
        raise SyncError(f"the directory holds {total / 1e6:.1f} MB; at most "
                        f"{max_bytes / 1e6:.0f} MB are sent (name big data in .ugroignore and "
                        f"keep it on the nodes, or raise sync.max_mb in the config)")
    entries.sort()
    for a, b in itertools.pairwise(entries):
        if a[0] == b[0] or b[0].startswith(a[0] + "/"):
            raise SyncError(f"{b[0]}: given twice, or under the file {a[0]}")
    return tree_digest(entries), entries


def safe_path(path: str) -> bool:
    parts = path.split("/")
    return (0 < len(path) <= MAX_PATH and "\x00" not in path
            and all(p not in ("", ".", "..") for p in parts))


def tree_digest(entries: Sequence[Entry]) -> str:
    """sha256 of the canonical manifest: sorted entries, compact JSON."""
    text = json.dumps([list(e) for e in sorted(entries)], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class HeadStore:
    """Objects and trees on the head, one store per uid: ``ROOT/UID/{objects,trees}``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, uid: int | None) -> Path:
        return self.root / str(uid if uid is not None else "any")

    def object_path(self, uid: int | None, sha: str) -> Path:
        if not SHA_RE.fullmatch(sha):
            raise SyncError(f"not a sha256: {sha[:80]!r}")
        return self._dir(uid) / "objects" / sha[:2] / sha

    def tree_path(self, uid: int | None, tree: str) -> Path:
        if not TREE_RE.fullmatch(tree):
            raise SyncError(f"not a tree digest: {tree[:80]!r}")
        return self._dir(uid) / "trees" / f"{tree[7:]}.json"

    def missing(self, uid: int | None, entries: Sequence[Entry]) -> list[str]:
        out: dict[str, None] = {}
        for _, _, size, sha in entries:
            if sha in out:
                continue
            try:
                ok = self.object_path(uid, sha).stat().st_size == size
            except FileNotFoundError:
                ok = False
            if not ok:
                out[sha] = None
        return list(out)

    def save_tree(self, uid: int | None, tree: str, entries: Sequence[Entry]) -> None:
        path = self.tree_path(uid, tree)
        if path.exists():
            return
        _write_private(path, json.dumps([list(e) for e in entries]).encode())

    def entries(self, uid: int | None, tree: str) -> list[Entry]:
        """The tree's entries; SyncError if it was never uploaded by this user."""
        try:
            raw = json.loads(self.tree_path(uid, tree).read_bytes())
        except FileNotFoundError:
            raise SyncError(f"code tree {tree} is not on the head (upload it again with "
                            f"ugroctl ... --sync)") from None
        return [(str(p), int(m), int(s), str(h)) for p, m, s, h in raw]

    def complete(self, uid: int | None, tree: str) -> None:
        """Raise SyncError unless the tree and every object it names are stored."""
        lacking = self.missing(uid, self.entries(uid, tree))
        if lacking:
            raise SyncError(f"code tree {tree}: {len(lacking)} files were never uploaded "
                            f"(run the command again)")

    async def receive(self, uid: int | None, chunks: AsyncIterator[bytes], *,
                      max_bytes: int) -> tuple[int, int]:
        """Store framed objects from an upload, each checked against its sha256."""
        reader = _Framed(chunks)
        stored = total = 0
        while True:
            header = await reader.line()
            if header == b"end":
                return stored, total
            try:
                sha, size_text = header.decode().split()
                size = int(size_text)
            except ValueError:
                raise SyncError(f"bad object header {header[:100]!r}") from None
            path = self.object_path(uid, sha)
            total += size
            if size < 0 or total > max_bytes:
                raise SyncError(f"upload larger than {max_bytes / 1e6:.0f} MB")
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f"{sha}.tmp-{os.getpid()}-{stored}")
            digest = hashlib.sha256()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                async for piece in reader.exactly(size):
                    digest.update(piece)
                    os.write(fd, piece)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            if digest.hexdigest() != sha:
                tmp.unlink(missing_ok=True)
                raise SyncError(f"object {sha[:12]}: content does not match its sha256")
            os.replace(tmp, path)
            stored += 1

    async def frames(self, uid: int | None, objects: Sequence[tuple[str, int]]
                     ) -> AsyncGenerator[bytes, None]:
        """The framed stream of ``objects`` ((sha256, size)), in chunks of about 1 MB."""
        buf = bytearray()
        for sha, size in objects:
            buf += f"{sha} {size}\n".encode()
            with open(self.object_path(uid, sha), "rb") as f:
                left = size
                while left:
                    data = f.read(min(left, CHUNK))
                    if not data:
                        raise SyncError(f"object {sha[:12]} shrank on the head")
                    buf += data
                    left -= len(data)
                    if len(buf) >= CHUNK:
                        yield bytes(buf)
                        buf.clear()
        buf += b"end\n"
        yield bytes(buf)


class _Framed:
    """Lines and exact byte counts out of a stream of chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    async def _more(self) -> None:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            raise SyncError("upload ended before its end marker") from None
        self._buf += chunk

    async def line(self) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > 200:
                raise SyncError("bad object header (too long)")
            await self._more()
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def exactly(self, n: int) -> AsyncGenerator[bytes, None]:
        while n:
            if not self._buf:
                await self._more()
            piece, self._buf = self._buf[:n], self._buf[n:]
            n -= len(piece)
            yield piece


async def push(agent: NodeAgent, store: HeadStore, uid: int | None, job: str,
               tree: str, claim: Mapping[str, Any] | None = None) -> str:
    """Make ``tree`` the job's code dir on the agent's node (sending only what it lacks);
    ``claim``: see ``NodeAgent.spawn``."""
    entries = store.entries(uid, tree)
    objects = sorted({(sha, size) for _, _, size, sha in entries})
    missing = set(await agent.sync_missing(objects))
    if missing:
        await agent.sync_put(store.frames(uid, [o for o in objects if o[0] in missing]))
    return await agent.sync_tree(job, tree, entries, claim)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
