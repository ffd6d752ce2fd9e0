"""Copying one checkpoint to the head, file by file, and the head's copies on disk.

What to copy and when is ``loops.checkpoints``; this is how: each file is fetched into
``checkpoints/.ugro/parts/`` first (continuing a partial file), checked against the
node's sha256, then moved into place, with the copy's manifest
(``checkpoints/.ugro/NAME.json``) saying which files are verified. Copying stops before
the head's free space would fall below its floor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ugrod.core import checkpoints as ck
from ugrod.core import events as ev
from ugrod.core.state import Job
from ugrod.nodes import checkpoint_transfer as wire
from ugrod.nodes.transport.base import TransportError

if TYPE_CHECKING:
    from ugrod.loops.checkpoints import Checkpoints

logger = logging.getLogger("ugrod.loops.checkpoints")

META = ".ugro"  # under checkpoints/: one manifest per copy, and the partial files


class DiskFloor(Exception):
    """Copying would take the head's free space below its floor."""


class CentralCorrupt(Exception):
    """A copy on the head no longer has the sha256 it was verified with."""


class HeadCopies:
    """Copies checkpoints from the nodes into the head's job directories."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.c = checkpoints
        self.stopped: str | None = None  # why copying stopped (the disk floor), or None

    async def copy(self, job: Job, f: ck.Found) -> None:
        listed = self.c.listed(job.id)
        where = next((w for w in f.at if w.node in listed), None)
        if where is None:
            return
        agent = self.c.fleet.agent_for(job, where.node)
        run_as = self.c.run_as(job, where.node)
        now, listing = await wire.list_files(agent, where.path, run_as)
        newest = max((e.mtime_ns for e in listing.files), default=0) / 1e9
        if not ck.settled(newest, now, f.reported):
            return  # still being written: the next pass takes it
        root = self.c.central_dir(job)
        taken = {c.name: c.path for c in job.central}
        name = ck.central_name(where.path, taken)
        meta = Manifest.load(root, name, where, listing.kind)
        target = root / name
        try:
            await asyncio.to_thread(_make_room, target, listing.kind)
            async with wire.Sender(agent, self.c.settings.rate_bytes_s, run_as) as sender:
                for e in listing.files:
                    dest = target / e.rel if e.rel else target
                    if meta.has(e) and _size(dest) == e.size:
                        continue
                    await self._check_room(job, where, root,
                                           e.size - max(_size(meta.part(e)), 0))
                    sha = await self._fetch(sender, where, e, dest, meta.part(e))
                    meta.files[e.rel] = [e.size, e.mtime_ns, sha]
                    await asyncio.to_thread(meta.save)
        except wire.SourceChanged as exc:
            logger.info("job %s: %s; copied on a later pass", job.id, exc.message)
            return
        except TransportError as exc:
            raise _with_path(exc, where) from None
        await asyncio.to_thread(_finish, target, meta, listing)
        size = sum(e.size for e in listing.files)
        if self.c.stats is not None:
            self.c.stats.checkpoint_copies.inc()
        # The listing's size and time, so the copy and its source are one entry.
        await self.c.record(ev.CheckpointCopied(
            job=job.id, name=name, node=where.node, path=where.path,
            size_bytes=f.size_bytes if f.size_bytes is not None else size, mtime=f.mtime,
            step=f.step, files=len(listing.files)))
        logger.info("job %s: checkpoint %s:%s copied to %s (%d bytes, verified)", job.id,
                    where.node, where.path, target, size)

    async def _check_room(self, job: Job, where: ck.Where, root: Path, need: int) -> None:
        free = shutil.disk_usage(root).free
        floor = self.c.settings.floor_bytes
        if self.c.stats is not None:
            self.c.stats.checkpoint_head_free_bytes = float(free)
            self.c.stats.checkpoint_floor_bytes = float(floor)
        if ck.room(free, need, floor):
            if self.stopped is not None:
                logger.warning("checkpoint copies go on: the head has %.1f GB free", free / 1e9)
                self.stopped = None
                if self.c.stats is not None:
                    self.c.stats.checkpoint_copy_stopped = False
            return
        reason = (f"copying stopped: {need / 1e9:.1f} GB more would leave {free / 1e9:.1f} GB "
                  f"free on the head, below its floor of {floor / 1e9:.1f} GB "
                  f"(checkpoints.min_free_gb); free space to go on")
        if self.stopped is None:
            logger.warning("checkpoint copies stopped: %s", reason)
        self.stopped = reason
        if self.c.stats is not None:
            self.c.stats.checkpoint_copy_stopped = True
        if not job.copy_error.startswith("copying stopped"):
            await self.c.record(ev.CheckpointCopyFailed(
                job=job.id, path=where.path, node=where.node, reason=reason,
                retry_in_s=self.c.settings.interval_s))
        raise DiskFloor(reason)

    async def _fetch(self, sender: wire.Sender, where: ck.Where, e: wire.FileEntry,
                     dest: Path, part: Path) -> str:
        """One file into ``part`` (continuing it), checked, then moved to ``dest``."""
        sha, offset = await asyncio.to_thread(_prefix, part, e.size)
        path = posixpath.join(where.path, e.rel) if e.rel else where.path
        if offset:
            logger.info("continuing the copy of %s:%s at byte %d of %d", where.node, path,
                        offset, e.size)
        received = 0
        with open(part, "ab") as out:
            async def sink(data: bytes) -> None:
                nonlocal received
                await asyncio.to_thread(_write_hashed, out, sha, data)
                received += len(data)
                if self.c.stats is not None:
                    self.c.stats.checkpoint_copy_bytes.inc(len(data))
            _, _, node_sha = await sender.fetch(path, offset, sink, (e.size, e.mtime_ns))
            await asyncio.to_thread(_sync, out)
        if sha.hexdigest() != node_sha:
            part.unlink(missing_ok=True)
            raise wire.ChecksumMismatch(where.node, f"{path}: sha256 {sha.hexdigest()[:12]} "
                                                    f"on the head, {node_sha[:12]} on the node; "
                                                    f"copied again")
        os.utime(part, ns=(e.mtime_ns, e.mtime_ns))
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(part, dest)
        logger.debug("copied %s:%s (%d of %d bytes sent)", where.node, path, received, e.size)
        return node_sha

    async def remove(self, job: Job, names: list[str], reason: str) -> None:
        root = self.c.central_dir(job)
        await asyncio.to_thread(_delete, root, names)
        await self.c.record(ev.CheckpointPruned(job=job.id, names=tuple(names), reason=reason))


# ---- files on the head -------------------------------------------------------------


class Manifest:
    """``checkpoints/.ugro/NAME.json``: the source and each verified file of a copy."""

    def __init__(self, root: Path, name: str, source: dict[str, Any],
                 files: dict[str, list[Any]]) -> None:
        self.root, self.name, self.source, self.files = root, name, source, files

    @classmethod
    def read(cls, root: Path, name: str) -> Manifest | None:
        try:
            doc = json.loads((root / META / f"{name}.json").read_bytes())
            return cls(root, name, dict(doc["source"]), dict(doc["files"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def load(cls, root: Path, name: str, where: ck.Where, kind: str) -> Manifest:
        """The manifest of a copy of this source (a fresh one for another source)."""
        source = {"node": where.node, "path": where.path, "kind": kind}
        old = cls.read(root, name)
        if old is not None and old.source == source:
            return old
        return cls(root, name, source, {})

    def has(self, e: wire.FileEntry) -> bool:
        done = self.files.get(e.rel)
        return done is not None and done[:2] == [e.size, e.mtime_ns]

    def part(self, e: wire.FileEntry) -> Path:
        """Where a file's partial copy is: its name says which version it is of."""
        key = hashlib.sha256(f"{self.name}\0{e.rel}".encode()).hexdigest()[:16]
        return self.root / META / "parts" / f"{key}.{e.size}.{e.mtime_ns}"

    def save(self) -> None:
        path = self.root / META / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(json.dumps({"source": self.source, "files": self.files}).encode())
        os.replace(tmp, path)


def _make_room(target: Path, kind: str) -> None:
    """The copy's place, of the right kind (a file where a directory was, or back)."""
    (target.parent / META / "parts").mkdir(parents=True, exist_ok=True, mode=0o700)
    if kind == "dir" and target.is_file():
        target.unlink()
    elif kind == "file" and target.is_dir():
        shutil.rmtree(target)
    if kind == "dir":
        target.mkdir(exist_ok=True, mode=0o700)


def _finish(target: Path, meta: Manifest, listing: wire.Listing) -> None:
    """Drop files the checkpoint no longer has; keep its times."""
    keep = {e.rel for e in listing.files}
    meta.files = {k: v for k, v in meta.files.items() if k in keep}
    meta.save()
    if listing.kind == "dir":
        for path in sorted(target.rglob("*"), reverse=True):
            rel = path.relative_to(target).as_posix()
            if path.is_file() and rel not in keep:
                path.unlink()
        newest = max((e.mtime_ns for e in listing.files), default=0)
        if newest:
            os.utime(target, ns=(newest, newest))


def _delete(root: Path, names: Iterable[str]) -> None:
    for name in names:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        (root / META / f"{name}.json").unlink(missing_ok=True)


def _prefix(part: Path, size: int) -> tuple[Any, int]:
    """(sha256 of what a partial copy holds, its length); a part too long is dropped,
    and so are the parts of other versions of the same file."""
    key = part.name.split(".")[0]
    for other in part.parent.glob(f"{key}.*"):
        if other != part:
            other.unlink(missing_ok=True)
    sha = hashlib.sha256()
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return sha, 0
    if have > size:
        part.unlink()
        return sha, 0
    with open(part, "rb") as f:
        while data := f.read(wire.READ):
            sha.update(data)
    return sha, have


def _write_hashed(out: Any, sha: Any, data: bytes) -> None:
    sha.update(data)
    out.write(data)


def read_hashed(src: Any, sha: Any) -> bytes:
    data: bytes = src.read(wire.READ)
    sha.update(data)
    return data


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1



def _with_path(exc: TransportError, where: ck.Where) -> TransportError:
    exc.path = where.path  # type: ignore[attr-defined]
    return exc

