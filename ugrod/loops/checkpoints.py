"""Checkpoints that follow the job: copied to the head, put where a retry needs them.

In the background, each job with a copy policy (``latest``, ``every``) has its nodes
listed every ``interval_s`` and after each ``checkpoint_saved``; what
``core.checkpoints.to_copy`` picks is copied into the head's job directory
(``checkpoints/NAME``), one copy at a time cluster-wide, at the cluster's rate, by a
niced program on the node. Files are copied one by one (what is already there and
verified is skipped), into ``checkpoints/.ugro/parts/`` first: a partial file continues
where it stopped, and only a file whose sha256 on the head equals the node's is moved
into place. A failure is recorded (``checkpoint_copy_failed``) and retried with
backoff; copying stops, with that event and an alert, before the head's disk would
fall below ``checkpoints.min_free_gb``.

Before a retry or a resumed job starts, ``stage`` puts the newest checkpoint that
exists anywhere (recorded, listed on a node that answers, or copied to the head) on the
new rank 0's node (or every node), so ``UGRO_RESUME_FROM`` names a file there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ugrod.core import checkpoints as ck
from ugrod.core import events as ev
from ugrod.core.render_json import iso
from ugrod.core.state import ACTIVE, TERMINAL, InvalidEvent, Job, State
from ugrod.nodes import checkpoint_transfer as wire
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import TransportError
from ugrod.store import log as evlog

if TYPE_CHECKING:
    from ugrod.loops.executor import Executor
    from ugrod.metrics.runtime_stats import RuntimeStats

logger = logging.getLogger("ugrod.loops.checkpoints")

LIST_TIMEOUT_S = 15.0
META = ".ugro"  # under checkpoints/: one manifest per copy, and the partial files


@dataclass
class CopySettings:
    """The cluster's ``checkpoints:`` section (a job's own policy and keep win)."""

    copy: str = "latest"
    keep: int = 2
    rate_bytes_s: float = 50e6
    floor_bytes: int = 10 << 30
    interval_s: float = 30.0
    stage: str = "rank0"


class DiskFloor(Exception):
    """Copying would take the head's free space below its floor."""


class CentralCorrupt(Exception):
    """A copy on the head no longer has the sha256 it was verified with."""


class Checkpoints:
    """Copies of every job's checkpoints on the head, and staging for retries."""

    def __init__(self, executor: Executor) -> None:
        self.x = executor
        self.ledger = executor.ledger
        self.settings = CopySettings()
        self.stats: RuntimeStats | None = None
        self.stopped: str | None = None  # why copying stopped (the disk floor), or None
        self._listed: dict[str, dict[str, list[ck.Listed]]] = {}  # job -> node -> listing
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._one_at_a_time = asyncio.Lock()
        self._closing = False
        self.ledger.on_commit(self._on_commit)

    # ---- when to copy ----------------------------------------------------------------

    def _on_commit(self, records: list[ev.Record], state: State) -> None:
        for r in records:
            e = r.event
            if isinstance(e, ev.JobRunning | ev.CheckpointSaved | ev.JobEnded):
                self._ensure(e.job)
                wake = self._wake.get(e.job)
                if wake is not None:
                    wake.set()

    def reattach(self) -> None:
        """After a restart: watch every job that may still have checkpoints to copy."""
        for job in self.ledger.state.active_jobs():
            if job.state in ACTIVE or job.attempt > 0:
                self._ensure(job.id)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def policy(self, job: Job) -> tuple[str, int]:
        keep = job.spec.checkpoint_keep
        return (job.spec.checkpoint_copy or self.settings.copy,
                self.settings.keep if keep is None else keep)

    def _ensure(self, job_id: str) -> None:
        job = self.ledger.state.jobs.get(job_id)
        if self._closing or job_id in self._tasks or job is None \
                or self.policy(job)[0] == "none":
            return
        self._wake[job_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._job_loop(job_id),
                                                      name=f"checkpoints {job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda t, j=job_id: self._done(j, t))  # type: ignore[misc]

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._wake.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("copying the checkpoints of %s crashed", job_id,
                         exc_info=task.exception())

    async def _job_loop(self, job_id: str) -> None:
        failures = 0
        while True:
            job = self.ledger.state.jobs.get(job_id)
            if job is None or self.policy(job)[0] == "none":
                return
            ended = job.state in TERMINAL
            delay = self.settings.interval_s
            try:
                await self.sync(job)
                failures = 0
            except DiskFloor:
                delay = self.settings.interval_s
            except (asyncio.CancelledError, evlog.LogWriteFailed):
                raise
            except (TransportError, OSError, ValueError) as exc:
                failures += 1
                give_up = ended and failures >= ck.MAX_FAILURES_AFTER_END
                delay = ck.backoff_s(failures)
                if self.stats is not None:
                    self.stats.checkpoint_copy_failures.inc()
                what = getattr(exc, "path", "") or ""
                logger.warning("job %s: checkpoint copy failed (%d in a row): %s", job_id,
                               failures, exc)
                await self._record(ev.CheckpointCopyFailed(
                    job=job_id, path=what, node=getattr(exc, "node", None),
                    reason=_short(exc), failures=failures,
                    retry_in_s=None if give_up else delay))
                if give_up:
                    return
            if ended and failures == 0:
                return  # the pass after the job's end: everything there is copied
            wake = self._wake[job_id]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            wake.clear()

    async def sync(self, job: Job) -> None:
        """One pass over a job: list its nodes, copy what the policy wants, prune."""
        policy, keep = self.policy(job)
        found = await self.refresh(job)
        for f in ck.to_copy(found, policy):
            async with self._one_at_a_time:
                current = self.ledger.state.jobs.get(job.id, job)
                await self._copy(current, f)
        current = self.ledger.state.jobs.get(job.id, job)
        names = ck.to_prune(current.central, keep)
        if names:
            await self._remove(current, names, f"keeping the newest {keep}")

    # ---- what there is ---------------------------------------------------------------

    def _nodes_of(self, job: Job, extra: Iterable[str] = ()) -> list[str]:
        names = {p.node for p in job.placement} | set(job.failed_nodes) | set(extra)
        names |= {r.node for r in job.reported if r.node} | {c.node for c in job.central}
        names |= set(self._listed.get(job.id, {}))
        return sorted(n for n in names if n in self.x.fleet.agents)

    async def refresh(self, job: Job, extra: Iterable[str] = ()) -> list[ck.Found]:
        """List the job's checkpoints on every node it used (at once, bounded): the one
        list ``status``, ``results``, ``why`` and resume use (``discovered`` reads it)."""
        nodes = self._nodes_of(job, extra)
        answers = await asyncio.gather(*(self._list(job, n) for n in nodes))
        listed = self._listed.setdefault(job.id, {})
        for node, answer in zip(nodes, answers, strict=True):
            if answer is None:
                listed.pop(node, None)
            else:
                listed[node] = answer
        return self.discovered(job)

    def discovered(self, job: Job) -> list[ck.Found]:
        """The job's checkpoints as last listed (no I/O), oldest first."""
        listed = self._listed.get(job.id, {})
        return ck.discover(job.reported, [x for xs in listed.values() for x in xs],
                           job.central, listed)

    async def _list(self, job: Job, node: str) -> list[ck.Listed] | None:
        try:
            agent = self.x.fleet.agent_for(job, node)
            patterns = [r.path for r in job.reported[-100:] if r.node in (node, None)]
            if job.spec.checkpoints:
                patterns.append(job.spec.checkpoints)
            async with asyncio.timeout(LIST_TIMEOUT_S):
                files = await agent.list_checkpoints(job.id, patterns,
                                                     await self.x.job_cwd(job, agent))
        except (TransportError, TimeoutError, KeyError, ValueError) as exc:
            logger.debug("job %s: cannot list checkpoints on %s: %r", job.id, node, exc)
            return None
        return [ck.Listed(node, f.path, f.size_bytes, f.mtime) for f in files]

    def describe(self, job: Job, found: Iterable[ck.Found]) -> list[dict[str, Any]]:
        """The list as the API shows it (results, status)."""
        central = self.central_dir(job)
        sources = {c.name: ck.Where(c.node, c.path) for c in job.central}
        out = []
        for f in found:
            saved = f.at[0] if f.at else sources.get(f.central or "")
            out.append({"name": f.name, "path": saved.path if saved else None,
                        "node": saved.node if saved else None, "size_bytes": f.size_bytes,
                        "mtime": iso(f.mtime), "step": f.step,
                        "on": [f"{w.node}:{w.path}" for w in f.at],
                        "central": str(central / f.central) if f.central else None})
        return out

    async def newest(self, job: Job) -> str | None:
        """The path the newest checkpoint was saved at (a retry's ``resume_from``)."""
        found = await self.refresh(job)
        best = ck.resume_candidates(found, self._listed.get(job.id, {}))
        if not best:
            return job.resume_from
        f = best[0]
        if f.at:
            return f.at[0].path
        source = next((c for c in job.central if c.name == f.central), None)
        return source.path if source is not None else job.resume_from

    # ---- copying to the head ---------------------------------------------------------

    def central_dir(self, job: Job) -> Path:
        return self.x.job_dir(job.id) / "checkpoints"

    async def _copy(self, job: Job, f: ck.Found) -> None:
        listed = self._listed.get(job.id, {})
        where = next((w for w in f.at if w.node in listed), None)
        if where is None:
            return
        agent = self.x.fleet.agent_for(job, where.node)
        run_as = self.x.run_as(job, where.node)
        now, listing = await wire.list_files(agent, where.path, run_as)
        newest = max((e.mtime_ns for e in listing.files), default=0) / 1e9
        if not ck.settled(newest, now, f.reported):
            return  # still being written: the next pass takes it
        root = self.central_dir(job)
        taken = {c.name: c.path for c in job.central}
        name = ck.central_name(where.path, taken)
        meta = _Manifest.load(root, name, where, listing.kind)
        target = root / name
        try:
            await asyncio.to_thread(_make_room, target, listing.kind)
            async with wire.Sender(agent, self.settings.rate_bytes_s, run_as) as sender:
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
        if self.stats is not None:
            self.stats.checkpoint_copies.inc()
        # The listing's size and time, so the copy and its source are one entry.
        await self._record(ev.CheckpointCopied(
            job=job.id, name=name, node=where.node, path=where.path,
            size_bytes=f.size_bytes if f.size_bytes is not None else size, mtime=f.mtime,
            step=f.step, files=len(listing.files)))
        logger.info("job %s: checkpoint %s:%s copied to %s (%d bytes, verified)", job.id,
                    where.node, where.path, target, size)

    async def _check_room(self, job: Job, where: ck.Where, root: Path, need: int) -> None:
        free = shutil.disk_usage(root).free
        floor = self.settings.floor_bytes
        if self.stats is not None:
            self.stats.checkpoint_head_free_bytes = float(free)
            self.stats.checkpoint_floor_bytes = float(floor)
        if ck.room(free, need, floor):
            if self.stopped is not None:
                logger.warning("checkpoint copies go on: the head has %.1f GB free", free / 1e9)
                self.stopped = None
                if self.stats is not None:
                    self.stats.checkpoint_copy_stopped = False
            return
        reason = (f"copying stopped: {need / 1e9:.1f} GB more would leave {free / 1e9:.1f} GB "
                  f"free on the head, below its floor of {floor / 1e9:.1f} GB "
                  f"(checkpoints.min_free_gb); free space to go on")
        if self.stopped is None:
            logger.warning("checkpoint copies stopped: %s", reason)
        self.stopped = reason
        if self.stats is not None:
            self.stats.checkpoint_copy_stopped = True
        if not job.copy_error.startswith("copying stopped"):
            await self._record(ev.CheckpointCopyFailed(
                job=job.id, path=where.path, node=where.node, reason=reason,
                retry_in_s=self.settings.interval_s))
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
                if self.stats is not None:
                    self.stats.checkpoint_copy_bytes.inc(len(data))
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

    async def _remove(self, job: Job, names: list[str], reason: str) -> None:
        root = self.central_dir(job)
        await asyncio.to_thread(_delete, root, names)
        await self._record(ev.CheckpointPruned(job=job.id, names=tuple(names), reason=reason))

    async def _record(self, event: ev.Event) -> None:
        with contextlib.suppress(InvalidEvent):
            await self.ledger.record(ev.DAEMON, event)

    # ---- staging for a retry -----------------------------------------------------------

    async def stage(self, job: Job, agents: list[NodeAgent]) -> dict[int, str]:
        """rank -> UGRO_RESUME_FROM on its node, with the checkpoint put there first.

        The newest checkpoint anywhere is tried first, then older ones; a checkpoint is
        taken from the node that has it already, else the head's copy, else another
        node. When none can be put there, the recorded path is passed on as is.
        """
        if job.attempt <= 1 and not job.resume_from:
            return {}
        found = await self.refresh(job, [p.node for p in job.placement])
        listed = self._listed.get(job.id, {})
        mode = job.spec.resume_on or self.settings.stage
        targets = list(zip(job.placement, agents, strict=True))
        if mode != "all":
            targets = targets[:1]
        for f in ck.resume_candidates(found, listed)[:3]:
            try:
                got = await asyncio.gather(*(self._put(job, f, p.node, a) for p, a in targets))
            except (TransportError, CentralCorrupt, OSError) as exc:
                logger.warning("job %s: cannot put checkpoint %s on its nodes: %s", job.id,
                               f.name, exc)
                continue
            paths = {p.node: path for (p, _), (path, _) in zip(targets, got, strict=True)}
            source = next((s for _, s in got if s), "in place")
            await self._record(ev.CheckpointStaged(job=job.id, attempt=job.attempt,
                                                   source=source, paths=paths, step=f.step))
            first = paths[job.placement[0].node]
            return {p.rank: paths.get(p.node, first) for p in job.placement}
        if job.resume_from:
            logger.warning("job %s: checkpoint %s is on no node that answers nor on the head; "
                           "passing the path as is", job.id, job.resume_from)
            return {p.rank: job.resume_from for p in job.placement}
        return {}

    async def _put(self, job: Job, f: ck.Found, node: str,
                   agent: NodeAgent) -> tuple[str, str]:
        """(the path of ``f`` on ``node``, where it came from ("" if it was there))."""
        here = next((w.path for w in f.at if w.node == node), None)
        if here is not None:
            return here, ""
        dest = posixpath.join(await agent.checkpoint_dir(job.id), f.name)
        run_as = self.x.run_as(job, node)
        rate = self.settings.rate_bytes_s
        if f.central is not None:
            try:
                await self._push(job, f.central, wire.Receiver(agent, dest, rate, run_as))
                return dest, f"head:checkpoints/{f.central}"
            except CentralCorrupt as exc:
                logger.warning("job %s: %s", job.id, exc)
                await self._remove(job, [f.central], str(exc))
        listed = self._listed.get(job.id, {})
        for w in f.at:
            if w.node not in listed:
                continue
            src = self.x.fleet.agent_for(job, w.node)
            src_as = self.x.run_as(job, w.node)
            _, listing = await wire.list_files(src, w.path, src_as)
            async with wire.Sender(src, rate, src_as) as sender, \
                    wire.Receiver(agent, dest, rate, run_as) as receiver:
                for e in listing.files:
                    await receiver.begin(e.rel, e.size, e.mtime_ns)
                    path = posixpath.join(w.path, e.rel) if e.rel else w.path
                    _, _, sha = await sender.fetch(path, 0, receiver.write, (e.size, e.mtime_ns))
                    await receiver.end(sha)
                await receiver.commit()
            return dest, f"{w.node}:{w.path}"
        raise TransportError(node, f"checkpoint {f.name} is on no node that answers")

    async def _push(self, job: Job, name: str, receiver: wire.Receiver) -> None:
        """The head's copy ``name`` to a node, each file checked against its manifest."""
        root = self.central_dir(job)
        meta = await asyncio.to_thread(_Manifest.read, root, name)
        if meta is None:
            raise CentralCorrupt(f"the head's copy {name} has no manifest: removed")
        async with receiver:
            for rel, (size, mtime_ns, want) in sorted(meta.files.items()):
                path = root / name / rel if rel else root / name
                await receiver.begin(rel, size, mtime_ns)
                sha = hashlib.sha256()
                with open(path, "rb") as src:
                    while True:
                        data = await asyncio.to_thread(_read_hashed, src, sha)
                        if not data:
                            break
                        await receiver.write(data)
                if sha.hexdigest() != want:
                    raise CentralCorrupt(f"the head's copy {name} is corrupted ({rel or name}: "
                                         f"sha256 {sha.hexdigest()[:12]}, {want[:12]} when "
                                         f"copied): removed, copied again from its node")
                await receiver.end(want)
            await receiver.commit()


# ---- files on the head -------------------------------------------------------------


class _Manifest:
    """``checkpoints/.ugro/NAME.json``: the source and each verified file of a copy."""

    def __init__(self, root: Path, name: str, source: dict[str, Any],
                 files: dict[str, list[Any]]) -> None:
        self.root, self.name, self.source, self.files = root, name, source, files

    @classmethod
    def read(cls, root: Path, name: str) -> _Manifest | None:
        try:
            doc = json.loads((root / META / f"{name}.json").read_bytes())
            return cls(root, name, dict(doc["source"]), dict(doc["files"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def load(cls, root: Path, name: str, where: ck.Where, kind: str) -> _Manifest:
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


def _finish(target: Path, meta: _Manifest, listing: wire.Listing) -> None:
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


def _read_hashed(src: Any, sha: Any) -> bytes:
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


def _short(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, TransportError) else str(exc) or repr(exc)
    return text if len(text) <= 500 else text[:500] + "…"

