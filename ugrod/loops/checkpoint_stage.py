"""Staging: the newest checkpoint put on a retry's (or resumed job's) nodes.

Before a retry or a resumed job starts, ``stage`` puts the newest checkpoint that
exists anywhere (recorded, listed on a node that answers, or copied to the head) on the
new rank 0's node (or every node), so ``UGRO_RESUME_FROM`` names a file there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import posixpath
from typing import TYPE_CHECKING

from ugrod.core import checkpoints as ck
from ugrod.core import events as ev
from ugrod.core.state import Job
from ugrod.loops.checkpoint_copy import CentralCorrupt, Manifest, read_hashed
from ugrod.nodes import checkpoint_transfer as wire
from ugrod.nodes.agent import NodeAgent, job_claim
from ugrod.nodes.transport.base import TransportError

if TYPE_CHECKING:
    from ugrod.loops.checkpoints import Checkpoints

logger = logging.getLogger("ugrod.loops.checkpoints")


class Staging:
    """Puts a checkpoint where a job's next attempt reads it."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.c = checkpoints

    async def stage(self, job: Job, agents: list[NodeAgent]) -> dict[int, str]:
        """rank -> UGRO_RESUME_FROM on its node, with the checkpoint put there first.

        The newest checkpoint anywhere is tried first, then older ones; a checkpoint is
        taken from the node that has it already, else the head's copy, else another
        node. When none can be put there, the recorded path is passed on as is.
        """
        if job.attempt <= 1 and not job.resume_from:
            return {}
        # A node new to the job may hold an earlier same-named job's dir: moved aside
        # first, so its checkpoints are neither found nor overwritten as this job's.
        claims = await asyncio.gather(*(a.claim(job.id, job_claim(job))
                                        for a in dict.fromkeys(agents)),
                                      return_exceptions=True)
        for a, res in zip(dict.fromkeys(agents), claims, strict=True):
            if isinstance(res, TransportError | TimeoutError):
                logger.warning("job %s: cannot claim its dir on %s: %s", job.id, a.node, res)
            elif isinstance(res, BaseException):
                raise res
        found = await self.c.refresh(job, [p.node for p in job.placement])
        listed = self.c.listed(job.id)
        mode = job.spec.resume_on or self.c.settings.stage
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
            await self.c.record(ev.CheckpointStaged(job=job.id, attempt=job.attempt,
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
        run_as = self.c.run_as(job, node)
        rate = self.c.settings.rate_bytes_s
        if f.central is not None:
            try:
                await self._push(job, f.central, wire.Receiver(agent, dest, rate, run_as))
                return dest, f"head:checkpoints/{f.central}"
            except CentralCorrupt as exc:
                logger.warning("job %s: %s", job.id, exc)
                await self.c.copies.remove(job, [f.central], str(exc))
        listed = self.c.listed(job.id)
        for w in f.at:
            if w.node not in listed:
                continue
            src = self.c.fleet.agent_for(job, w.node)
            src_as = self.c.run_as(job, w.node)
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
        root = self.c.central_dir(job)
        meta = await asyncio.to_thread(Manifest.read, root, name)
        if meta is None:
            raise CentralCorrupt(f"the head's copy {name} has no manifest: removed")
        async with receiver:
            for rel, (size, mtime_ns, want) in sorted(meta.files.items()):
                path = root / name / rel if rel else root / name
                await receiver.begin(rel, size, mtime_ns)
                sha = hashlib.sha256()
                with open(path, "rb") as src:
                    while True:
                        data = await asyncio.to_thread(read_hashed, src, sha)
                        if not data:
                            break
                        await receiver.write(data)
                if sha.hexdigest() != want:
                    raise CentralCorrupt(f"the head's copy {name} is corrupted ({rel or name}: "
                                         f"sha256 {sha.hexdigest()[:12]}, {want[:12]} when "
                                         f"copied): removed, copied again from its node")
                await receiver.end(want)
            await receiver.commit()

