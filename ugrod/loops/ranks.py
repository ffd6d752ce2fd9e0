"""An attempt's ranks on their nodes: followed while they run, stopped when told.

Each rank's watch streams its log and metrics from its node into the central job
directory (reconnecting when the link drops), hands what the rank reports to
``Progress`` (and the checkpoints it saved to the log), and reports the rank's end
to the attempt's supervision through ``Exits``. Stopping a rank is SIGINT, SIGTERM,
then SIGKILL, retried on link errors; a rank that cannot be stopped is given up on,
and its node fenced (``fence``: drained until ugrod has cleared it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ugrod.core import events as ev
from ugrod.core import progress_formats as pf
from ugrod.core import retry
from ugrod.core.state import InvalidEvent, Job
from ugrod.loops.exits import VANISHED_EXIT_CODE, Exit, Exits
from ugrod.loops.progress import Progress
from ugrod.nodes.agent import LogChunk, MetricLine, NodeAgent, RankExit
from ugrod.nodes.transport.base import TransportError
from ugrod.store import job_files
from ugrod.store import log as evlog
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.ranks")

_DEFAULT_PROGRESS = ev.ProgressSpec()
_encode = msgspec.json.encode
MAX_METRIC_LINE = 64 * 1024   # a metrics line is a few hundred bytes; past this it is garbage
MAX_STEP = retry.MAX_STEP      # steps are recorded in events: a signed 64-bit integer
MAX_METRIC_ABS = 1e300        # finite with room: sums and rates of it stay finite

Fence = Callable[[Job, Mapping[str, Sequence[int]], str], Awaitable[None]]


class Ranks:
    """Watches and stops the ranks of every supervised attempt."""

    def __init__(self, ledger: Ledger, progress: Progress, exits: Exits, *,
                 grace_s: float = 10.0,
                 on_metric_dropped: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.progress = progress  # what the ranks report goes here
        self.exits = exits  # how they ended goes here
        self.grace_s = grace_s
        self.on_metric_dropped = on_metric_dropped  # counts a metrics line not used
        self.dropped_metrics: dict[str, int] = {}  # job -> metrics lines dropped
        # attempt -> rank -> (count, names) of processes a rank's main process left behind
        self._leftovers: dict[tuple[str, int], dict[int, tuple[int, tuple[str, ...]]]] = {}
        # Ranks not confirmed gone (node -> ranks): the fencer drains those nodes before
        # the attempt's end is recorded (ugrod/loops/fencing.py).
        self.fence: Fence = _no_fence

    # ---- watching ------------------------------------------------------------------

    async def watch(self, job: Job, p: ev.RankPlacement, agent: NodeAgent,
                    jobdir: Path) -> None:
        """Stream one rank's log and metrics into the job dir until it exits; survive link drops."""
        try:
            await self._stream(job, p, agent, jobdir)
        except (asyncio.CancelledError, evlog.LogWriteFailed):
            raise
        except Exception as exc:
            # The stream broke in a way a reconnect will not mend: keep supervising the
            # rank by its status alone (its output is no longer copied), so that its exit
            # still ends the job; if even that fails, supervision ends the job.
            logger.exception("watching %s rank %d on %s failed; polling its status instead",
                             job.id, p.rank, p.node)
            try:
                code = await self._poll_exit(job, p, agent)
            except (asyncio.CancelledError, evlog.LogWriteFailed):
                raise
            except Exception as exc2:
                self.exits.report(job.id, job.attempt, Exit(p, None, failure=exc2))
                return
            logger.warning("job %s rank %d: %r; its exit was found by polling", job.id, p.rank,
                           exc)
            self.exits.report(job.id, job.attempt, Exit(p, code))

    async def _stream(self, job: Job, p: ev.RankPlacement, agent: NodeAgent,
                      jobdir: Path) -> None:
        log_path = job_files.rank_log(jobdir, p.rank)
        metrics_path = job_files.rank_metrics(jobdir, p.rank)
        base = job_files.bases(job, jobdir)[p.rank]
        delay = 0.5
        progress = job.spec.progress or _DEFAULT_PROGRESS
        resumed = job_files.size(log_path) > base["log"]
        reader = pf.ProgressReader(progress.formats, resumed=resumed) \
            if p.rank == progress.rank and progress.formats else None
        while True:
            log_off = job_files.size(log_path) - base["log"]
            met_off = job_files.size(metrics_path) - base["metrics"]
            try:
                async for item in agent.watch(job.id, job.attempt, p.rank, max(log_off, 0),
                                              max(met_off, 0)):
                    delay = 0.5
                    if isinstance(item, LogChunk):
                        job_files.append_kept(log_path, item.data)
                        if reader is not None:
                            records = reader.feed(item.data)
                            self._progress_read(job, jobdir, records)
                            self.progress.steps_from(job, p.node, records)
                    elif isinstance(item, MetricLine):
                        job_files.append_kept(metrics_path, item.data.rstrip(b"\n") + b"\n")
                        if p.rank == 0:
                            await self._metric(job, item.data)
                        self.progress.line_from(job, p.node, item.data)
                    elif isinstance(item, RankExit):
                        if item.leftovers:
                            self._leftovers.setdefault((job.id, job.attempt), {})[p.rank] = (
                                item.leftovers, item.leftover_names)
                        self.exits.report(job.id, job.attempt,
                                          Exit(p, item.exit_code, item.at))
                        return
            except TransportError as exc:
                logger.warning("watching %s rank %d on %s: %s; reconnecting in %.1f s",
                               job.id, p.rank, p.node, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)

    async def _poll_exit(self, job: Job, p: ev.RankPlacement, agent: NodeAgent) -> int:
        """A rank's exit code by polling its status (the fallback when its stream fails)."""
        delay, gone_without_code = 0.5, 0
        while True:
            try:
                st = await agent.status(job.id, job.attempt, p.rank)
            except TransportError:
                st = None
            if st is not None and not st.alive:
                if st.exit_code is not None:
                    return st.exit_code
                gone_without_code += 1
                if gone_without_code >= 3:
                    return VANISHED_EXIT_CODE
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _drop_metric(self, job: Job, why: str) -> None:
        """A metrics line that cannot be used: counted, and said once per job (then every 1000)."""
        n = self.dropped_metrics[job.id] = self.dropped_metrics.get(job.id, 0) + 1
        if self.on_metric_dropped is not None:
            self.on_metric_dropped()
        if n == 1 or n % 1000 == 0:
            logger.warning("job %s: dropped a training metrics line (%d so far): %s",
                           job.id, n, why)

    async def _metric(self, job: Job, raw: bytes) -> None:
        values = parse_metric_line(raw)
        if isinstance(values, str):
            self._drop_metric(job, values)
            return
        if values.get("event") == "checkpoint" and isinstance(values.get("path"), str):
            step = values.get("step")
            with contextlib.suppress(InvalidEvent):
                await self.ledger.record(ev.DAEMON, ev.CheckpointSaved(
                    job=job.id, path=values["path"][:4096],
                    step=int(step) if isinstance(step, int | float) else None,
                    node=job.placement[0].node if job.placement else None))
            return
        if "event" not in values:
            self.progress.record(job, values)

    async def backfilled_metric(self, job: Job, node: str, raw: bytes) -> None:
        """A metrics line of an ended attempt, back-filled from ``node`` after a partition
        (ugrod/loops/backfill.py): a checkpoint it reports saving there is recorded."""
        values = parse_metric_line(raw)
        if isinstance(values, str) or values.get("event") != "checkpoint" \
                or not isinstance(values.get("path"), str):
            return
        current = self.ledger.state.jobs.get(job.id)
        path = values["path"][:4096]
        if current is None or path in current.checkpoints:
            return
        step = values.get("step")
        with contextlib.suppress(InvalidEvent):
            await self.ledger.record(ev.DAEMON, ev.CheckpointSaved(
                job=job.id, path=path, step=int(step) if isinstance(step, int | float) else None,
                node=node))

    def _progress_read(self, job: Job, jobdir: Path, records: list[dict[str, int | float]]) -> None:
        """Progress read from the rank's output: to progress.jsonl and the job's latest."""
        if not records:
            return
        ts = round(self.ledger.stamp(), 3)
        lines = b"".join(_encode({"ts": ts, **r}) + b"\n" for r in records)
        job_files.append_kept(jobdir / "progress.jsonl", lines)
        for r in records:
            self.progress.record(job, {"ts": ts, **r})

    def leftover_note(self, job_id: str, attempt: int) -> str:
        """'; rank 0 left 2 processes running after it exited (sleep), killed' or ''."""
        found = self._leftovers.pop((job_id, attempt), {})
        parts = []
        for rank, (count, names) in sorted(found.items()):
            what = f" ({', '.join(names)})" if names else ""
            parts.append(f"rank {rank} left {count} process{'es' if count != 1 else ''}"
                         f"{what} running after its main process exited: killed")
        return "; " + "; ".join(parts) if parts else ""

    # ---- stopping ------------------------------------------------------------------

    async def kill_started(self, job: Job, agents: list[NodeAgent],
                           pids: dict[int, int]) -> list[int]:
        """Kill ranks that did start; wait until each is confirmed gone. Returns the ranks
        whose node did not take the kill (they may still run: the caller fences them)."""
        missed = []
        for p, a in zip(job.placement, agents, strict=True):
            if p.rank not in pids:
                continue
            try:
                await self.kill_rank(job, p, a)
            except TransportError:
                missed.append(p.rank)
        return missed

    async def fence_ranks(self, job: Job, ranks: Sequence[int], why: str) -> None:
        """Fence the nodes of ``ranks`` (of the job's current attempt) that may still run."""
        by_node: dict[str, list[int]] = {}
        for p in job.placement:
            if p.rank in ranks:
                by_node.setdefault(p.node, []).append(p.rank)
        if by_node:
            await self.fence(job, by_node, why)

    async def kill_rank(self, job: Job, p: ev.RankPlacement, agent: NodeAgent) -> None:
        """SIGINT, SIGTERM after half the job's grace, SIGKILL after all of it.

        SIGINT first because frameworks stop cleanly on it (Lightning and the HF Trainer
        turn it into KeyboardInterrupt and shut down), while Lightning catches SIGTERM
        and would keep going until SIGKILL.
        """
        grace = job.spec.stop_grace_s or self.grace_s
        loop = asyncio.get_running_loop()
        start = loop.time()
        for sig, until in ((signal.SIGINT, grace / 2), (signal.SIGTERM, grace)):
            await agent.kill(job.id, job.attempt, p.rank, sig)
            while loop.time() < start + until:
                st = await agent.status(job.id, job.attempt, p.rank)
                if not st.alive and st.exit_code is not None:
                    return
                await asyncio.sleep(0.1)
        await agent.kill(job.id, job.attempt, p.rank, signal.SIGKILL)

    async def kill_all(self, job: Job, agents: list[NodeAgent], codes: dict[int, int]) -> None:
        """SIGTERM every live rank's group, SIGKILL after the grace period; retry on link errors.

        A rank that cannot be killed (its node stays unreachable through every retry, or
        the kill fails outright) is given up on, so that a cancel always ends the job: it
        ends with the reason that those processes could not be confirmed gone.
        """
        async def one(p: ev.RankPlacement, a: NodeAgent) -> None:
            for delay in (0.5, 1, 2, 4, 8, 15, 30):
                if p.rank in codes:
                    return
                try:
                    await self.kill_rank(job, p, a)
                    return
                except TransportError as exc:
                    logger.warning("kill %s rank %d: %s; retrying", job.id, p.rank, exc)
                    await asyncio.sleep(delay)
                except (asyncio.CancelledError, evlog.LogWriteFailed):
                    raise
                except Exception as exc:
                    logger.exception("kill %s rank %d failed", job.id, p.rank)
                    self.exits.report(job.id, job.attempt, Exit(p, None, failure=exc))
                    return
            if p.rank not in codes:
                logger.warning("kill %s rank %d: %s unreachable; giving up on it", job.id,
                               p.rank, p.node)
                self.exits.report(job.id, job.attempt, Exit(p, None))
        await asyncio.gather(*(one(p, a) for p, a in zip(job.placement, agents, strict=True)))


def parse_metric_line(raw: bytes) -> dict[str, Any] | str:
    """A training metrics line as a JSON object, or why it is dropped (pure; never raises).

    Bounded in length and nesting (msgspec stops deep nesting with RecursionError, where
    the stdlib parser once killed the rank watcher); ``step`` must be an integer from 0 to
    2^63-1 (1e300 would not fit the event that records it) and numbers finite.
    """
    if len(raw) > MAX_METRIC_LINE:
        return f"longer than {MAX_METRIC_LINE} bytes"
    try:
        values = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return "not JSON (or nested too deeply)"
    if not isinstance(values, dict):
        return "not a JSON object"
    step = values.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) \
                or not math.isfinite(step) or step != int(step) or not 0 <= step <= MAX_STEP:
            return f"step must be an integer from 0 to {MAX_STEP}, got {str(step)[:40]}"
        values["step"] = int(step)
    for k, v in values.items():
        if isinstance(v, float) and (not math.isfinite(v) or abs(v) > MAX_METRIC_ABS):
            return f"{str(k)[:40]}: number out of range"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_STEP:
            return f"{str(k)[:40]}: integer out of range"
    return dict(values)


async def _no_fence(job: Job, ranks: Mapping[str, Sequence[int]], why: str) -> None:
    """The executor's fence when no fencer is wired (no monitor): a warning, no drain."""
    logger.warning("job %s attempt %d: ranks %s may still run (%s); no fencer to drain "
                   "their nodes", job.id, job.attempt, dict(ranks), why)
