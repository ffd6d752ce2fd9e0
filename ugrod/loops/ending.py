"""Ending attempts: who failed first, whether to retry, and the record of the end.

When every rank of an attempt has ended (or was given up on), its end is decided
here: succeeded, or failed with the rank that failed first as its reason
(``core/culprit.py``: exits as their nodes recorded them, not as they reached
ugrod); then the retry decision (``core/retry.py``) with the checkpoint a retry
resumes from, recorded as ``job_ended``, and the job's first result.json.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ugrod.core import culprit, retry
from ugrod.core import events as ev
from ugrod.core.jobspec import procs_per_node
from ugrod.core.state import ACTIVE, InvalidEvent, Job
from ugrod.loops.checkpoints import Checkpoints
from ugrod.loops.exits import VANISHED_EXIT_CODE
from ugrod.loops.progress import Progress
from ugrod.loops.ranks import Ranks
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import NodeUnreachable, TransportError
from ugrod.store import job_files
from ugrod.store import log as evlog
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.ending")

OOM_MARKERS = ("CUDA out of memory", "torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError",
               "CUBLAS_STATUS_ALLOC_FAILED", "HIP out of memory")


class Ending:
    """Decides and records how attempts end."""

    def __init__(self, ledger: Ledger, fleet: Fleet, progress: Progress, ranks: Ranks,
                 checkpoints: Checkpoints, job_dir: Callable[[str], Path], *,
                 on_job_end: Callable[[Job], None] | None = None) -> None:
        self.ledger = ledger
        self.fleet = fleet
        self.progress = progress  # the last step: did the attempt make progress?
        self.ranks = ranks  # fences the nodes of ranks lost with them
        self.checkpoints = checkpoints  # where a retry resumes from
        self.job_dir = job_dir
        self.on_job_end = on_job_end

    async def blame(self, job: Job, agents: list[NodeAgent], codes: dict[int, int],
                    times: dict[int, float | None], seen: list[int], jobdir: Path) -> str:
        """The reason a gang is stopped: its first failure (ugrod/core/culprit.py).

        Nodes whose ranks have not reported an exit are asked (3 s each, at once): an exit
        already recorded there may be older than the one that arrived first, and a node
        that does not answer is lost with its ranks.
        """
        async def ask(p: ev.RankPlacement, agent: NodeAgent) -> tuple[int, Any]:
            try:
                async with asyncio.timeout(3.0):
                    return p.rank, await agent.status(job.id, job.attempt, p.rank)
            except (TransportError, TimeoutError) as exc:
                return p.rank, exc
        pending = [(p, a) for p, a in zip(job.placement, agents, strict=True)
                   if p.rank not in codes]
        answers = dict(await asyncio.gather(*(ask(p, a) for p, a in pending)))
        extra_codes, extra_times, lost = dict(codes), dict(times), {}
        for p, _ in pending:
            st = answers[p.rank]
            if isinstance(st, BaseException):
                lost[p.rank] = self._unreachable_words(p.node, st)
                if isinstance(st, NodeUnreachable | TimeoutError):
                    self.fleet.check_soon(p.node)
            elif st.exit_code is not None:
                extra_codes[p.rank] = st.exit_code
                extra_times[p.rank] = st.exited_at
        first = culprit.first_failure(self._ends(job, extra_codes, extra_times, seen, lost))
        if first is None:
            return "a rank failed"
        return self._culprit_words(job, first, jobdir)[1]

    async def finish(self, job_id: str, attempt: int, codes: dict[int, int],
                     lost: dict[int, str], times: dict[int, float | None], seen: list[int],
                     *, rank_stop: bool, note: str) -> None:
        """End an attempt whose every rank has ended or was given up on: succeeded, or
        with the rank that failed first as its reason (``rank_stop``: the attempt was
        stopped because a rank failed); ``note`` is added to the reason."""
        job = self.ledger.state.jobs[job_id]
        if job.state not in ACTIVE or job.attempt != attempt:
            return
        if job.stopping is None and not lost and all(c == 0 for c in codes.values()):
            await self.end(job, "succeeded", f"all ranks exited 0{note}", exit_code=0)
            return
        outcome = job.stopping or "failed"
        # Every exit is in now: the culprit is decided on all of them (the stopping reason
        # was the best guess at the time). A rank lost with its node comes first.
        lost_why = {r: self._unreachable_words(n, None) for r, n in lost.items()}
        first = culprit.first_failure(self._ends(job, codes, times, seen, lost_why))
        reason = job.reason
        exit_code: int | None = next((c for c in codes.values() if c), 0 if codes else None)
        failed_rank = failed_node = None
        if first is not None and outcome != "cancelled":
            failed_rank, failed_node = first.rank, first.node
            code, words = self._culprit_words(job, first, self.job_dir(job_id))
            if code is not None:
                exit_code = code
            if rank_stop:
                reason = words
        reason += note
        if lost:
            ranks = ", ".join(f"rank {r} on {n}" for r, n in sorted(lost.items()))
            nodes = ", ".join(sorted(set(lost.values())))
            reason = (f"{reason}; the processes of {ranks} could not be confirmed gone "
                      f"({nodes} unreachable): ugrod kills any left when {nodes} answers again")
            await self.ranks.fence_ranks(job, list(lost),
                                         f"{nodes} did not answer as the attempt ended")
        # Ranks lost with their node: the attempt was lost to the cluster, not to the job.
        await self.end(job, outcome, reason, exit_code=exit_code, failed_rank=failed_rank,
                        failed_node=failed_node, retryable=outcome == "failed",
                        cluster_fault=bool(lost))

    async def end(self, job: Job, outcome: str, reason: str, *, exit_code: int | None = None,
                  failed_rank: int | None = None, failed_node: str | None = None,
                  retryable: bool = False, cluster_fault: bool = False) -> None:
        """Record job_ended: the retry decision is core/retry.py's; here its I/O (the
        checkpoint a retry resumes from). ``cluster_fault``: lost to the cluster (a
        partition, a node lost, a launch that could not reach its node, ugrod stopped
        during a launch), not to the job: it keeps the no-progress budget."""
        ended = retry.ended(job, outcome, reason, now=self.ledger.stamp(),
                            latest_step=self.progress.step(job.id),
                            exit_code=exit_code, failed_rank=failed_rank,
                            failed_node=failed_node, retryable=retryable,
                            cluster_fault=cluster_fault)
        outcome, reason = ended.outcome, ended.reason
        if outcome == "retrying":
            try:
                resume_from = await self.newest_checkpoint(job)
            except (asyncio.CancelledError, evlog.LogWriteFailed):
                raise
            except Exception as exc:
                logger.warning("job %s: cannot list its checkpoints: %r", job.id, exc)
            else:
                ended = msgspec.structs.replace(ended, resume_from=resume_from)
        try:
            state = await self.ledger.record(ev.DAEMON, ended)
        except InvalidEvent as exc:
            current = self.ledger.state.jobs.get(job.id)
            if current is None or current.state not in ACTIVE or current.attempt != job.attempt:
                logger.info("job %s already ended: %s", job.id, exc)
                return
            # The full record was refused (a value it carries): end the job plainly rather
            # than leave it holding its GPUs, and say why.
            logger.warning("could not end %s with %s: %s; ending it plainly", job.id, outcome,
                           exc)
            plain = ev.JobEnded(job=job.id, attempt=job.attempt,
                                outcome="cancelled" if outcome == "cancelled" else "failed",
                                reason=f"{reason[:3000]} (recorded plainly: {short(exc)})",
                                exit_code=exit_code if exit_code is None
                                or -(1 << 31) <= exit_code < 1 << 31 else None)
            try:
                state = await self.ledger.record(ev.DAEMON, plain)
            except InvalidEvent as exc2:
                logger.error("could not end %s at all: %s", job.id, exc2)
                return
        done = state.jobs[job.id]
        job_files.write_result(self.job_dir(done.id), done, self.progress.latest(done.id) or {})
        if self.on_job_end is not None:
            self.on_job_end(done)

    async def newest_checkpoint(self, job: Job) -> str | None:
        """The newest checkpoint anywhere (nodes that answer, the head's copies, reports)."""
        try:
            async with asyncio.timeout(30):
                return await self.checkpoints.newest(job)
        except TimeoutError:
            return job.resume_from

    # ---- why a rank failed --------------------------------------------------------

    def _failure(self, job: Job, p: ev.RankPlacement, code: int,
                 jobdir: Path) -> tuple[int, str]:
        """(exit code, reason) of a failed rank: torchrun's report of its worker when the
        log has one, the worker's own last lines (not torchrun's traceback)."""
        lines = job_files.tail_lines(job_files.rank_log(jobdir, p.rank), 120)
        report = culprit.torchrun_failure(lines)
        tail = own_lines(lines)[-20:]
        oom = any(m in line for line in tail for m in OOM_MARKERS)
        exit_code, reason = culprit.describe(p.rank, p.node, code, report,
                                             procs_per_node(job.spec))
        if oom:
            reason = f"rank {p.rank} on {p.node} ran out of GPU memory (CUDA out of memory)"
        elif code == VANISHED_EXIT_CODE:
            reason = (f"rank {p.rank} on {p.node} vanished: its processes and their supervisor "
                      f"are gone with no exit status (node reboot, OOM killer or kill -9?)")
        last = " | ".join(line.strip() for line in tail[-5:] if line.strip())
        if last:
            reason += f"; last lines: {last[-600:]}"
        return exit_code, reason

    def _ends(self, job: Job, codes: dict[int, int], times: dict[int, float | None],
              seen: list[int], lost: Mapping[int, str]) -> list[culprit.RankEnd]:
        order = {r: i for i, r in enumerate(seen)}
        ends = []
        for p in job.placement:
            code = codes.get(p.rank)
            why = lost.get(p.rank)
            if code == VANISHED_EXIT_CODE:
                why = "vanished"
            ends.append(culprit.RankEnd(rank=p.rank, node=p.node, exit_code=code,
                                        exited_at=times.get(p.rank), seen=order.get(p.rank),
                                        lost=why))
        return ends

    def _culprit_words(self, job: Job, end: culprit.RankEnd,
                       jobdir: Path) -> tuple[int | None, str]:
        p = next(p for p in job.placement if p.rank == end.rank)
        if end.lost is not None and end.exit_code is None:
            return None, culprit.lost_words(p.rank, p.node, end.lost)
        return self._failure(job, p, end.exit_code if end.exit_code is not None else 1, jobdir)

    def _unreachable_words(self, node: str, exc: BaseException | None) -> str:
        """Why a node is lost, for a reason: what the log says of it, else the error."""
        n = self.ledger.state.nodes.get(node)
        if n is not None and n.health.value == "unreachable" and n.health_reason:
            return n.health_reason
        if exc is None:
            return "it stopped answering"
        if isinstance(exc, TimeoutError):
            return "no answer within 3 s"
        return exc.message if isinstance(exc, TransportError) else str(exc)


def own_lines(lines: list[str]) -> list[str]:
    """A rank log's lines without torchrun's report of a failed worker.

    torchrun ends a failed run with its own traceback, an elastic log line and a
    ChildFailedError box (~35 lines): left in, they push the worker's real error
    (a CUDA out-of-memory, the script's last words) out of the tail and the reason.
    """
    end = next((i for i, line in enumerate(lines) if "ChildFailedError" in line), None)
    if end is not None:
        start = max((i for i in range(end)
                     if lines[i].startswith("Traceback (most recent call last)")), default=end)
        lines = lines[:start]
    return [line for line in lines if "torch/distributed/elastic/" not in line]


def short(what: object) -> str:
    """``what`` in words, cut at 300 characters."""
    text = str(what)
    return text if len(text) <= 300 else text[:300] + "…"
