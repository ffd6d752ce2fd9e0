"""Gang launch and supervision: turns placed jobs into rank processes on nodes and back into events.

One asyncio task per active attempt. It starts every rank at once (``launch.py``;
after a ugrod restart it re-attaches to them by recorded pid), follows them
(``ranks.py``: logs and metrics into the central job directory, each rank's end
through ``Exits``), and records what happens: ranks started, ranks exited, the
gang stopped, the job ended (``ending.py``). GPUs are released only by
``job_ended``, which is recorded once every rank's process group is confirmed gone
(or its node fenced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ugrod.config import paths as cfgpaths
from ugrod.core import events as ev
from ugrod.core.state import ACTIVE, Job, State
from ugrod.loops import node_progress
from ugrod.loops.checkpoints import Checkpoints, CopySettings
from ugrod.loops.ending import Ending, short
from ugrod.loops.exits import Exits
from ugrod.loops.launch import Launch
from ugrod.loops.progress import Progress
from ugrod.loops.ranks import Fence, Ranks
from ugrod.nodes import codesync
from ugrod.nodes.agent import NodeAgent, RunAs, no_switch
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import TransportError
from ugrod.store import job_files
from ugrod.store import log as evlog
from ugrod.store.ledger import Ledger

if TYPE_CHECKING:
    from ugrod.metrics.runtime_stats import RuntimeStats

logger = logging.getLogger("ugrod.loops.executor")


class Executor:
    """Drives every active attempt; reacts to committed events."""

    def __init__(self, ledger: Ledger, fleet: Fleet, jobs_root: Path, *,
                 grace_s: float = 10.0, start_timeout_s: float = 120.0,
                 rdzv_join_timeout_s: float = 300.0, network_interface: str | None = None,
                 on_job_end: Callable[[Job], None] | None = None,
                 code_store: codesync.HeadStore | None = None,
                 progress: Progress | None = None, exits: Exits | None = None,
                 run_as: RunAs = no_switch, timestamped_dirs: bool = False,
                 on_metric_dropped: Callable[[], None] | None = None,
                 copy_settings: CopySettings | None = None,
                 stats: RuntimeStats | None = None) -> None:
        self.ledger = ledger
        self.fleet = fleet  # the agent a job's ranks use on each node
        self.progress = progress or Progress(ledger)  # written from what ranks report
        self.exits = exits or Exits(ledger)  # rank ends, to each attempt's supervision
        self.jobs_root = jobs_root
        self.grace_s = grace_s
        # paths.results: job dirs are named NAME_TIMESTAMP there (config/paths.job_dir)
        self.timestamped_dirs = timestamped_dirs
        self.run_as = run_as  # the account a rank of a job runs as on a node
        # attempts this executor stopped because a rank failed: their reason is the culprit's
        self._rank_stops: set[tuple[str, int]] = set()
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stop_now: dict[tuple[str, int], asyncio.Event] = {}
        self._closing = False
        ledger.on_commit(self._on_commit)
        # copies to the head; staging for retries
        self.checkpoints = Checkpoints(ledger, fleet, self.job_dir, run_as,
                                       settings=copy_settings, stats=stats)
        self.ranks = Ranks(ledger, self.progress, self.exits, grace_s=grace_s,
                           on_metric_dropped=on_metric_dropped)
        self.ending = Ending(ledger, fleet, self.progress, self.ranks, self.checkpoints,
                             self.job_dir, on_job_end=on_job_end)
        self.launch = Launch(ledger, fleet, self.ranks, self.ending, self.checkpoints,
                             start_timeout_s=start_timeout_s,
                             rdzv_join_timeout_s=rdzv_join_timeout_s,
                             network_interface=network_interface, code_store=code_store,
                             run_as=run_as)

    # ---- what the daemon wires in, and what others ask ------------------------------

    @property
    def fence(self) -> Fence:
        """Drains the nodes of ranks not confirmed gone (ugrod/loops/fencing.py)."""
        return self.ranks.fence

    @fence.setter
    def fence(self, fence: Fence) -> None:
        self.ranks.fence = fence

    def rank_argv(self, job: Job, p: ev.RankPlacement, python: str,
                  env: Mapping[str, str] | None = None) -> tuple[list[str], int]:
        """The rank's argv on its node and the index of the user's own program in it."""
        return self.launch.rank_argv(job, p, python, env)

    async def newest_checkpoint(self, job: Job) -> str | None:
        """The newest checkpoint anywhere (nodes that answer, the head's copies, reports):
        what a retry or a resume starts from."""
        return await self.ending.newest_checkpoint(job)

    async def backfilled_metric(self, job: Job, node: str, raw: bytes) -> None:
        """A metrics line of an ended attempt, back-filled from ``node`` after a partition
        (ugrod/loops/backfill.py): a checkpoint it reports saving there is recorded."""
        await self.ranks.backfilled_metric(job, node, raw)

    # ---- reacting to the log ----------------------------------------------

    def _on_commit(self, records: list[ev.Record], state: State) -> None:
        for r in records:
            e = r.event
            if isinstance(e, ev.JobPlaced):
                self._start(e.job, e.attempt, fresh=True)
            elif isinstance(e, ev.JobStopping):
                flag = self._stop_now.get((e.job, e.attempt))
                if flag is not None:
                    flag.set()
            elif isinstance(e, ev.CheckpointRequested):
                job = state.jobs[e.job]
                self._spawn_bg(self._request_checkpoint(job))

    def reattach(self) -> None:
        """After a restart: supervise every attempt the log says is starting or running,
        knowing its progress so far (from the central files: the watch goes on from there)."""
        for job in self.ledger.state.active_jobs():
            if job.state in ACTIVE:
                self._recall_progress(job)
                self._start(job.id, job.attempt, fresh=False)

    def _recall_progress(self, job: Job) -> None:
        """The attempt's newest step and when it was reached, as its central files say, so
        a silence is counted from then and an end says whether it made progress."""
        jobdir = self.job_dir(job.id)
        base = job_files.bases(job, jobdir).get(0, {"metrics": 0})["metrics"]
        seen = node_progress.newest_step(jobdir, metrics_from=base,
                                         since_ts=job.started_at or 0.0)
        if seen is None:
            return
        step, ts = seen
        self.progress.recall(job, step, ts, age_s=self.ledger.stamp() - ts)

    def _start(self, job_id: str, attempt: int, *, fresh: bool) -> None:
        key = (job_id, attempt)
        if key in self._tasks or self._closing:
            return
        self._stop_now[key] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._attempt(job_id, attempt, fresh=fresh), name=f"job {job_id}#{attempt}")
        self._tasks[key] = task
        task.add_done_callback(lambda t, k=key: self._done(k, t))  # type: ignore[misc]

    def _done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        self._stop_now.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("supervision of %s attempt %d crashed", key[0], key[1],
                         exc_info=task.exception())

    def _spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(_log_failure)

    async def close(self) -> None:
        """Stop supervising (ranks keep running: they outlive the daemon)."""
        self._closing = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one attempt ---------------------------------------------------------

    async def _attempt(self, job_id: str, attempt: int, *, fresh: bool) -> None:
        try:
            await self._run_attempt(job_id, attempt, fresh=fresh)
        except (asyncio.CancelledError, evlog.LogWriteFailed):
            raise
        except Exception as exc:
            # Any failure on a supervision path ends the job with a reason instead of
            # leaving it "starting" or "running (stopping)" forever, across restarts too:
            # kill what may run (each step guarded: the failure may repeat in it), end.
            logger.exception("supervision of %s attempt %d failed", job_id, attempt)
            await self._end_after_crash(job_id, attempt, exc)

    async def _end_after_crash(self, job_id: str, attempt: int, exc: BaseException) -> None:
        job = self.ledger.state.jobs.get(job_id)
        if job is None or job.state not in ACTIVE or job.attempt != attempt:
            return
        note = ""
        agents = [a for p in job.placement if (a := self.fleet.job_agent(job, p.node))]
        if len(agents) == len(job.placement):
            try:
                async with asyncio.timeout(self.grace_s + 30):
                    missed = await self.ranks.kill_started(job, agents,
                                                      {p.rank: 0 for p in job.placement})
            except (asyncio.CancelledError, evlog.LogWriteFailed):
                raise
            except Exception as kill_exc:
                logger.warning("job %s: could not kill its ranks after %r: %r", job_id, exc,
                               kill_exc)
                note = f"; its processes could not be confirmed gone ({short(kill_exc)})"
                missed = [p.rank for p in job.placement]
            await self.ranks.fence_ranks(job, missed, "its supervision failed and its kill did "
                                                      "not get through")
        what = exc.args[0] if isinstance(exc, ValueError | OSError) and exc.args else repr(exc)
        reason = (job.reason + "; " if job.stopping is not None and job.reason else "") + \
            f"ugrod could not supervise the job: {short(what)}{note}"
        outcome = job.stopping if job.stopping in ("cancelled", "failed") else "failed"
        await self.ending.end(self.ledger.state.jobs[job_id], outcome, reason)

    async def _run_attempt(self, job_id: str, attempt: int, *, fresh: bool) -> None:
        job = self.ledger.state.jobs[job_id]
        jobdir = self.job_dir(job_id)
        try:
            agents = [self.fleet.agent_for(job, p.node) for p in job.placement]
        except KeyError as exc:
            await self.ending.end(job, "failed",
                                  f"node {exc.args[0]} is not in the cluster any more")
            return
        if fresh:
            ok = await self.launch.start(job, agents, jobdir)
            if not ok:
                return
        else:
            ok = await self.launch.resume(job, agents)
            if not ok:
                return
        await self._supervise(job_id, attempt, agents, jobdir)

    # ---- supervision ---------------------------------------------------------

    async def _supervise(self, job_id: str, attempt: int, agents: list[NodeAgent],
                         jobdir: Path) -> None:
        job = self.ledger.state.jobs[job_id]
        stop_flag = self._stop_now[(job_id, attempt)]
        exits = self.exits.open(job_id, attempt)
        times: dict[int, float | None] = {}  # rank -> when its exit was recorded on its node
        seen: list[int] = []  # ranks in the order their exits reached ugrod
        lost: dict[int, str] = {}  # rank -> node: abandoned, its end cannot be confirmed
        watchers = [
            asyncio.get_running_loop().create_task(
                self.ranks.watch(job, p, a, jobdir), name=f"watch {job_id} r{p.rank}")
            for p, a in zip(job.placement, agents, strict=True)
        ]
        killer: asyncio.Task[None] | None = None
        codes: dict[int, int] = {r.rank: r.exit_code for r in job.ranks
                                 if r.exit_code is not None}
        try:
            if job.stopping is not None:
                stop_flag.set()
            while len(codes) + len(lost) < len(job.placement):
                if stop_flag.is_set() and killer is None:
                    killer = asyncio.get_running_loop().create_task(
                        self.ranks.kill_all(job, agents, codes))
                get = asyncio.ensure_future(exits.get())
                if not stop_flag.is_set():  # once set, only exits are waited for
                    flag = asyncio.ensure_future(stop_flag.wait())
                    await asyncio.wait({get, flag}, return_when=asyncio.FIRST_COMPLETED)
                    flag.cancel()
                    if not get.done():
                        get.cancel()
                        continue
                end = await get
                p, code, at = end.rank, end.exit_code, end.at
                if p.rank in codes or p.rank in lost:
                    continue
                if code is None:
                    if end.failure is not None:
                        raise end.failure  # ends the attempt with the reason (see _attempt)
                    lost[p.rank] = p.node
                    continue
                codes[p.rank] = code
                times[p.rank] = at
                seen.append(p.rank)
                await self.ledger.record(ev.DAEMON, ev.RankExited(
                    job=job_id, attempt=attempt, rank=p.rank, node=p.node, exit_code=code))
                current = self.ledger.state.jobs[job_id]
                if code != 0 and current.stopping is None:
                    # The first exit ugrod sees need not be the first that happened: ask
                    # the other nodes before blaming anyone (ugrod/core/culprit.py).
                    reason = await self.ending.blame(current, agents, codes, times, seen, jobdir)
                    self._rank_stops.add((job_id, attempt))
                    await self.ledger.record(ev.DAEMON, ev.JobStopping(
                        job=job_id, attempt=attempt, outcome="failed", reason=reason))
                    stop_flag.set()
            if killer is not None:
                if lost:  # every other rank is confirmed gone: stop retrying the dead node
                    killer.cancel()
                await asyncio.gather(killer, return_exceptions=True)
        finally:
            self.exits.close(job_id, attempt)
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        rank_stop = (job_id, attempt) in self._rank_stops
        self._rank_stops.discard((job_id, attempt))
        await self.ending.finish(job_id, attempt, codes, lost, times, seen, rank_stop=rank_stop,
                                 note=self.ranks.leftover_note(job_id, attempt))

    async def _request_checkpoint(self, job: Job) -> None:
        for p in job.placement:
            agent = self.fleet.job_agent(job, p.node)
            if agent is not None:
                with contextlib.suppress(TransportError):
                    await agent.request_checkpoint(job.id, job.attempt, p.rank)

    def job_dir(self, job_id: str) -> Path:
        """The job's directory on the head: everything that reads job dirs asks here."""
        job = self.ledger.state.jobs.get(job_id)
        return cfgpaths.job_dir(self.jobs_root, job_id,
                                job.submitted_at if job is not None else None,
                                timestamped=self.timestamped_dirs)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task failed", exc_info=task.exception())
