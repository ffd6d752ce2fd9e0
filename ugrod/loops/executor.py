"""Gang launch and supervision: turns placed jobs into rank processes on nodes and back into events.

One asyncio task per active attempt. It starts every rank at once (or, after a
ugrod restart, re-attaches to them by recorded pid), streams logs and metrics
into the central job directory, and records what happens: ranks started, ranks
exited, the gang stopped, the job ended. GPUs are released only by
``job_ended``, which is recorded once every rank's process group is confirmed gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ugrod.config import paths as cfgpaths
from ugrod.core import culprit, fencing, jobspec, retry
from ugrod.core import events as ev
from ugrod.core import progress_formats as pf
from ugrod.core.jobspec import procs_per_node
from ugrod.core.state import ACTIVE, WAITING, InvalidEvent, Job, JobState, State
from ugrod.loops import node_progress
from ugrod.loops.checkpoints import Checkpoints
from ugrod.loops.exits import VANISHED_EXIT_CODE, Exit, Exits
from ugrod.loops.progress import Progress
from ugrod.nodes import codesync, programs
from ugrod.nodes.agent import (
    LogChunk,
    MetricLine,
    NodeAgent,
    RankExit,
    RankStartError,
    WrapperProtocolError,
)
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import NodeUnreachable, TransportError
from ugrod.store import log as evlog
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.executor")

_DEFAULT_PROGRESS = ev.ProgressSpec()
_encode = msgspec.json.encode
OOM_MARKERS = ("CUDA out of memory", "torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError",
               "CUBLAS_STATUS_ALLOC_FAILED", "HIP out of memory")


class Executor:
    """Drives every active attempt; reacts to committed events."""

    def __init__(self, ledger: Ledger, fleet: Fleet, jobs_root: Path, *,
                 grace_s: float = 10.0, start_timeout_s: float = 120.0,
                 rdzv_join_timeout_s: float = 300.0, network_interface: str | None = None,
                 on_job_end: Callable[[Job], None] | None = None,
                 code_store: codesync.HeadStore | None = None,
                 progress: Progress | None = None, exits: Exits | None = None) -> None:
        self.ledger = ledger
        self.progress = progress or Progress(ledger)  # written here from what ranks report
        self.exits = exits or Exits(ledger)  # rank ends, to each attempt's supervision
        self.code_store = code_store
        self.fleet = fleet  # the agent a job's ranks use on each node
        self.jobs_root = jobs_root
        self.grace_s = grace_s
        self.start_timeout_s = start_timeout_s
        self.rdzv_join_timeout_s = rdzv_join_timeout_s
        self.network_interface = network_interface
        self.on_job_end = on_job_end
        self.on_metric_dropped: Callable[[], None] | None = None
        self.dropped_metrics: dict[str, int] = {}  # job -> metrics lines dropped
        # The account a rank of this job runs as on that node (the rank wrapper's run_as),
        # or None for the wrapper's own; raises LaunchError when there is none allowed.
        self.run_as: Callable[[Job, str], Mapping[str, Any] | None] = lambda job, node: None
        # attempt -> rank -> (count, names) of processes a rank's main process left behind
        self._leftovers: dict[tuple[str, int], dict[int, tuple[int, tuple[str, ...]]]] = {}
        # An attempt ends with ranks not confirmed gone (node -> ranks): the fencer drains
        # those nodes before the end is recorded (ugrod/loops/fencing.py).
        self.fence: Callable[[Job, Mapping[str, Sequence[int]], str], Awaitable[None]] = \
            _no_fence
        # attempts this executor stopped because a rank failed: their reason is the culprit's
        self._rank_stops: set[tuple[str, int]] = set()
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stop_now: dict[tuple[str, int], asyncio.Event] = {}
        self._closing = False
        # paths.results: job dirs are named NAME_TIMESTAMP there (config/paths.job_dir)
        self.timestamped_dirs = False
        ledger.on_commit(self._on_commit)
        self.checkpoints = Checkpoints(self)  # copies to the head; staging for retries

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
        base = self._bases(job, jobdir).get(0, {"metrics": 0})["metrics"]
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
                    missed = await self._kill_started(job, agents,
                                                      {p.rank: 0 for p in job.placement})
            except (asyncio.CancelledError, evlog.LogWriteFailed):
                raise
            except Exception as kill_exc:
                logger.warning("job %s: could not kill its ranks after %r: %r", job_id, exc,
                               kill_exc)
                note = f"; its processes could not be confirmed gone ({_short(kill_exc)})"
                missed = [p.rank for p in job.placement]
            await self._fence(job, missed, "its supervision failed and its kill did not get "
                                           "through")
        what = exc.args[0] if isinstance(exc, ValueError | OSError) and exc.args else repr(exc)
        reason = (job.reason + "; " if job.stopping is not None and job.reason else "") + \
            f"ugrod could not supervise the job: {_short(what)}{note}"
        outcome = job.stopping if job.stopping in ("cancelled", "failed") else "failed"
        await self._end(self.ledger.state.jobs[job_id], outcome, reason)

    async def _run_attempt(self, job_id: str, attempt: int, *, fresh: bool) -> None:
        job = self.ledger.state.jobs[job_id]
        jobdir = self.job_dir(job_id)
        try:
            agents = [self.fleet.agent_for(job, p.node) for p in job.placement]
        except KeyError as exc:
            await self._end(job, "failed", f"node {exc.args[0]} is not in the cluster any more")
            return
        if fresh:
            ok = await self._launch(job, agents, jobdir)
            if not ok:
                return
        else:
            ok = await self._resume_start(job, agents)
            if not ok:
                return
        await self._supervise(job_id, attempt, agents, jobdir)

    async def _launch(self, job: Job, agents: list[NodeAgent], jobdir: Path) -> bool:
        """Start every rank at once; on any failure kill what started and end the attempt."""
        self._write_job_files(job, jobdir)
        pids: dict[int, int] = {}
        # Ranks whose start request was sent (their node may have started them although
        # the answer never came) and ranks known not to run: the fence's facts.
        requested: set[int] = set()
        not_running: set[int] = set()
        resume = await self.checkpoints.stage(job, agents)  # bounded by stalls, not size
        try:
            async with asyncio.timeout(self.start_timeout_s):
                await asyncio.gather(*(a.prepare() for a in agents))
                if job.spec.sync is not None:
                    await self._sync_code(job, agents)
                if job.spec.torchrun and len(agents) > 1:
                    await self._precheck_rendezvous(job, agents)
                results = await asyncio.gather(
                    *(self._spawn_rank(job, p, agents[i], resume.get(p.rank),
                                       requested=requested)
                      for i, p in enumerate(job.placement)),
                    return_exceptions=True)
        except TimeoutError:
            results = [TimeoutError(f"ranks did not start within {self.start_timeout_s:.0f} s")]
        except (TransportError, LaunchError) as exc:
            results = [exc]
        errors = []
        cannot_start = [res for res in results if isinstance(res, RankStartError)]
        not_running |= {p.rank for p, res in zip(job.placement, results, strict=False)
                        if isinstance(res, RankStartError)}
        # A launch failure is a node's failure: the node it happened on is recorded, so the
        # retry goes elsewhere while other nodes fit (a node that cannot be reached first).
        blamed: list[tuple[bool, int, str]] = []
        ranks_of = {p.node: p.rank for p in job.placement}
        for p, res in zip(job.placement, results, strict=False):
            if isinstance(res, BaseException):
                errors.append(f"rank {p.rank} on {p.node}: {res}" if not isinstance(
                    res, TransportError | LaunchError) else str(res))
                node = getattr(res, "node", None) or (p.node if len(results) > 1 else None)
                if node in ranks_of:
                    blamed.append((not isinstance(res, NodeUnreachable), ranks_of[node], node))
                if isinstance(res, TransportError) and not isinstance(
                        res, RankStartError | WrapperProtocolError):
                    # A node the launch could not reach takes no work until a check
                    # passes: the log learns it before the retry is placed.
                    self.fleet.suspect(res.node, f"a launch could not reach it: {res}")
            else:
                pids[p.rank] = res
        if errors or len(pids) != len(job.placement):
            missed = await self._kill_started(job, agents, pids)
            not_running |= set(pids) - set(missed)
            maybe = fencing.may_run(job.placement, requested | set(pids), not_running)
            if not blamed and maybe:  # a launch that timed out: the node it waited on
                node = next(iter(maybe))
                blamed.append((False, ranks_of[node], node))
            _, failed_rank, failed_node = min(blamed) if blamed else (True, None, None)
            if maybe:
                await self.fence(job, maybe, "its launch failed after its start request "
                                             "was sent")
            if cannot_start:
                # The same command fails the same way on every attempt: no retry, and
                # a sweep stops instead of failing each of its trials the same way.
                first = cannot_start[0]
                reason = f"node {first.node}: {first.message}; not retried"
                await self._end(job, "failed", reason, exit_code=first.exit_code,
                                failed_rank=failed_rank, failed_node=failed_node)
                await self._stop_sweep(job, reason)
                return False
            reason = "launch failed: " + "; ".join(errors or ["not every rank started"])
            # A launch that never reached the job's own command is the cluster's failure,
            # not the job's: it does not use the no-progress budget.
            await self._end(job, "failed", reason, retryable=True, failed_rank=failed_rank,
                            failed_node=failed_node, cluster_fault=failed_node is not None)
            return False
        events: list[ev.Event] = [
            ev.RankStarted(job=job.id, attempt=job.attempt, rank=p.rank, node=p.node,
                           pid=pids[p.rank]) for p in job.placement]
        events.append(ev.JobRunning(job=job.id, attempt=job.attempt))
        try:
            await self.ledger.record(ev.DAEMON, *events)
        except InvalidEvent:
            # Cancelled while starting: the stop flag is already set; supervision kills them.
            logger.info("job %s changed while starting", job.id)
        return True

    async def _resume_start(self, job: Job, agents: list[NodeAgent]) -> bool:
        """Re-attach after a restart: ranks whose start was never recorded are looked up."""
        if job.state is JobState.RUNNING:
            return True
        missing: list[ev.Event] = []
        pids: dict[int, int] = {}
        unknown: list[int] = []  # ranks whose node did not say whether they started
        for p, a in zip(job.placement, agents, strict=True):
            run = next(r for r in job.ranks if r.rank == p.rank)
            if run.pid is not None:
                pids[p.rank] = run.pid
                continue
            try:
                st = await a.status(job.id, job.attempt, p.rank)
            except TransportError:
                st = None
                unknown.append(p.rank)
            if st is not None and st.pid:
                pids[p.rank] = st.pid
                missing.append(ev.RankStarted(job=job.id, attempt=job.attempt, rank=p.rank,
                                              node=p.node, pid=st.pid))
        if len(pids) != len(job.placement):
            missed = await self._kill_started(job, agents, pids)
            await self._fence(job, [*missed, *unknown], "ugrod stopped while the attempt "
                                                        "was starting")
            await self._end(job, "failed", "ugrod stopped while the job was starting; not "
                            "every rank had started", retryable=True, cluster_fault=True)
            return False
        await self.ledger.record(ev.DAEMON, *missing, ev.JobRunning(job=job.id,
                                                                    attempt=job.attempt))
        return True

    async def _spawn_rank(self, job: Job, p: ev.RankPlacement, agent: NodeAgent,
                          resume_from: str | None = None, *,
                          requested: set[int] | None = None) -> int:
        run_dir = await agent.run_dir(job.id, job.attempt, p.rank)
        env = self.rank_env(job, p, run_dir, await agent.checkpoint_dir(job.id), resume_from)
        argv, program = self.rank_argv(job, p, agent.python, env)
        cwd, run_as = await self.job_cwd(job, agent), self.run_as(job, p.node)
        if requested is not None:
            requested.add(p.rank)  # from here on the node may start it, answer or not
        return await agent.spawn(job.id, job.attempt, p.rank, argv, env, cwd,
                                 run_as=run_as, program=program)

    @staticmethod
    async def job_cwd(job: Job, agent: NodeAgent) -> str | None:
        """Where the job's ranks start on the agent's node: its --sync copy, or its cwd."""
        return await agent.code_dir(job.id) if job.spec.sync else job.spec.cwd

    def rank_argv(self, job: Job, p: ev.RankPlacement, python: str,
                  env: Mapping[str, str] | None = None) -> tuple[list[str], int]:
        """The rank's argv on its node and the index of the user's own program in it;
        ``${UGRO_...}`` in the job's arguments filled from ``env`` (--expand-env)."""
        spec = job.spec
        if spec.expand_env and env is not None:
            spec = msgspec.structs.replace(
                spec, argv=tuple(jobspec.expand_references(spec.argv, env)))
        if not spec.torchrun:
            return jobspec.rank_command(spec.argv, python, None)
        nnodes = len(job.placement)
        nproc = max(spec.gpus_per_node, 1) if spec.gpus_per_node else spec.nproc_per_node
        return jobspec.rank_command(spec.argv, python, [
            f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={job.rdzv_host}:{job.rdzv_port}",
            f"--rdzv_id={job.id}-{job.attempt}",
            # No --node_rank: c10d ignores it (and says so in every log). It numbers
            # the nodes by sorted address; pinning each node's address (ranks were
            # assigned in that order) keeps its numbering equal to ours.
            f"--local_addr={self.fleet.node_host(p.node)}",
            # Rank 0's node hosts the store: explicit, so nodes sharing one machine
            # (or one NAT address) never race to host it.
            f"--rdzv_conf=is_host={1 if p.rank == 0 else 0},"
            f"join_timeout={int(self.rdzv_join_timeout_s)}",
            "--max_restarts=0",
        ])

    def rank_env(self, job: Job, p: ev.RankPlacement, run_dir: str,
                 checkpoint_dir: str, resume_from: str | None = None) -> dict[str, str]:
        """``resume_from``: rank 0's node's copy of ``job.resume_from`` (default: that path)."""
        spec = job.spec
        nnodes = len(job.placement)
        nproc = max(spec.gpus_per_node, 1) if spec.gpus_per_node else spec.nproc_per_node
        env = dict(spec.env)
        env.update({
            "MASTER_ADDR": job.rdzv_host, "MASTER_PORT": str(job.rdzv_port),
            "NODE_RANK": str(p.rank), "NNODES": str(nnodes),
            "WORLD_SIZE": str(nnodes * (nproc if spec.torchrun else 1)),
            "UGRO_JOB_ID": job.id, "UGRO_ATTEMPT": str(job.attempt),
            "UGRO_JOB_DIR": run_dir, "UGRO_METRICS_FILE": f"{run_dir}/metrics.jsonl",
            "UGRO_CHECKPOINT_DIR": checkpoint_dir,
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in p.gpus),
            "PYTHONUNBUFFERED": "1",
        })
        if resume_from or job.resume_from:
            env["UGRO_RESUME_FROM"] = resume_from or job.resume_from or ""
        if procs_per_node(spec) > 1:
            # Several processes share the node's log: torchrun tags each line with its
            # global rank ("[rank5]:"), so `ugroctl logs --rank 5` can pick them out. Its
            # copies of the streams stay in the rank's run dir on the node.
            for key, value in (("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[rank${rank}]:"),
                               ("PET_TEE", "3"), ("PET_LOG_DIR", f"{run_dir}/torchrun")):
                env.setdefault(key, value)
        if self.network_interface:
            env["NCCL_SOCKET_IFNAME"] = self.network_interface
            env["GLOO_SOCKET_IFNAME"] = self.network_interface
        return env

    async def _sync_code(self, job: Job, agents: list[NodeAgent]) -> None:
        """Copy the job's code tree to every node of the job (only what each lacks)."""
        assert job.spec.sync is not None
        if self.code_store is None:
            raise LaunchError("this ugrod keeps no code store: --sync is not available")
        tree = job.spec.sync
        try:
            await asyncio.gather(*(codesync.push(a, self.code_store, job.uid, job.id, tree)
                                   for a in agents))
        except codesync.SyncError as exc:
            raise LaunchError(str(exc)) from None

    async def _stop_sweep(self, job: Job, reason: str) -> None:
        """Cancel the sweep's trials that have not started: they would fail the same way."""
        sweep = self.ledger.state.sweeps.get(job.spec.sweep) if job.spec.sweep else None
        if sweep is None:
            return
        state = self.ledger.state
        waiting = [j for j in sweep.jobs if j in state.jobs and state.jobs[j].state in WAITING]
        if not waiting:
            return
        why = (f"sweep {sweep.name} stopped: trial {job.id} could not start its command "
               f"({reason[:300]}); fix it and `ugroctl resume` the trials")
        with contextlib.suppress(InvalidEvent):
            await self.ledger.record(ev.DAEMON, *(ev.JobCancelRequested(job=j, reason=why)
                                                  for j in waiting))

    async def _precheck_rendezvous(self, job: Job, agents: list[NodeAgent]) -> None:
        """Every node must reach rank 0's rendezvous port before anything starts."""
        host, port = job.rdzv_host, job.rdzv_port
        async with _listening(agents[0], self.fleet.node_host, port, len(agents) - 1):
            checks = await asyncio.gather(
                *(a.can_reach(host, port, 5.0) for a in agents[1:]), return_exceptions=True)
        bad = [f"{p.node}" for p, ok in zip(job.placement[1:], checks, strict=True)
               if ok is not True]
        if bad:
            raise LaunchError(f"{', '.join(bad)} cannot reach the rendezvous port "
                              f"{host}:{port} on {job.placement[0].node} (firewall? wrong "
                              f"address or network_interface?)", node=bad[0])

    async def _kill_started(self, job: Job, agents: list[NodeAgent],
                            pids: dict[int, int]) -> list[int]:
        """Kill ranks that did start; wait until each is confirmed gone. Returns the ranks
        whose node did not take the kill (they may still run: the caller fences them)."""
        missed = []
        for p, a in zip(job.placement, agents, strict=True):
            if p.rank not in pids:
                continue
            try:
                await self._kill_rank(job, p, a)
            except TransportError:
                missed.append(p.rank)
        return missed

    async def _fence(self, job: Job, ranks: Sequence[int], why: str) -> None:
        """Fence the nodes of ``ranks`` (of the job's current attempt) that may still run."""
        by_node: dict[str, list[int]] = {}
        for p in job.placement:
            if p.rank in ranks:
                by_node.setdefault(p.node, []).append(p.rank)
        if by_node:
            await self.fence(job, by_node, why)

    async def _kill_rank(self, job: Job, p: ev.RankPlacement, agent: NodeAgent) -> None:
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
                self._watch_rank(job, p, a, jobdir), name=f"watch {job_id} r{p.rank}")
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
                        self._kill_all(job, agents, codes))
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
                    reason = await self._blame(current, agents, codes, times, seen, jobdir)
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
        await self._finish(job_id, attempt, codes, agents, lost, times, seen)

    def _failure(self, job: Job, p: ev.RankPlacement, code: int,
                 jobdir: Path) -> tuple[int, str]:
        """(exit code, reason) of a failed rank: torchrun's report of its worker when the
        log has one, the worker's own last lines (not torchrun's traceback)."""
        lines = _tail_lines(jobdir / f"rank_{p.rank}.log", 120)
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

    async def _blame(self, job: Job, agents: list[NodeAgent], codes: dict[int, int],
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

    async def _kill_all(self, job: Job, agents: list[NodeAgent], codes: dict[int, int]) -> None:
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
                    await self._kill_rank(job, p, a)
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

    def _leftover_note(self, job_id: str, attempt: int) -> str:
        """'; rank 0 left 2 processes running after it exited (sleep), killed' or ''."""
        found = self._leftovers.pop((job_id, attempt), {})
        parts = []
        for rank, (count, names) in sorted(found.items()):
            what = f" ({', '.join(names)})" if names else ""
            parts.append(f"rank {rank} left {count} process{'es' if count != 1 else ''}"
                         f"{what} running after its main process exited: killed")
        return "; " + "; ".join(parts) if parts else ""

    async def _finish(self, job_id: str, attempt: int, codes: dict[int, int],
                      agents: list[NodeAgent], lost: dict[int, str] | None = None,
                      times: dict[int, float | None] | None = None,
                      seen: list[int] | None = None) -> None:
        job = self.ledger.state.jobs[job_id]
        rank_stop = (job_id, attempt) in self._rank_stops
        self._rank_stops.discard((job_id, attempt))
        if job.state not in ACTIVE or job.attempt != attempt:
            return
        note = self._leftover_note(job_id, attempt)
        lost = lost or {}
        if job.stopping is None and not lost and all(c == 0 for c in codes.values()):
            await self._end(job, "succeeded", f"all ranks exited 0{note}", exit_code=0)
            return
        outcome = job.stopping or "failed"
        # Every exit is in now: the culprit is decided on all of them (the stopping reason
        # was the best guess at the time). A rank lost with its node comes first.
        lost_why = {r: self._unreachable_words(n, None) for r, n in lost.items()}
        first = culprit.first_failure(self._ends(job, codes, times or {}, seen or [],
                                                 lost_why))
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
            await self._fence(job, list(lost), f"{nodes} did not answer as the attempt ended")
        # Ranks lost with their node: the attempt was lost to the cluster, not to the job.
        await self._end(job, outcome, reason, exit_code=exit_code, failed_rank=failed_rank,
                        failed_node=failed_node, retryable=outcome == "failed",
                        cluster_fault=bool(lost))

    async def _end(self, job: Job, outcome: str, reason: str, *, exit_code: int | None = None,
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
                                reason=f"{reason[:3000]} (recorded plainly: {_short(exc)})",
                                exit_code=exit_code if exit_code is None
                                or -(1 << 31) <= exit_code < 1 << 31 else None)
            try:
                state = await self.ledger.record(ev.DAEMON, plain)
            except InvalidEvent as exc2:
                logger.error("could not end %s at all: %s", job.id, exc2)
                return
        done = state.jobs[job.id]
        self._write_result(done)
        if self.on_job_end is not None:
            self.on_job_end(done)

    async def newest_checkpoint(self, job: Job) -> str | None:
        """The newest checkpoint anywhere (nodes that answer, the head's copies, reports)."""
        try:
            async with asyncio.timeout(30):
                return await self.checkpoints.newest(job)
        except TimeoutError:
            return job.resume_from

    async def _request_checkpoint(self, job: Job) -> None:
        for p in job.placement:
            agent = self.fleet.job_agent(job, p.node)
            if agent is not None:
                with contextlib.suppress(TransportError):
                    await agent.request_checkpoint(job.id, job.attempt, p.rank)

    async def _watch_rank(self, job: Job, p: ev.RankPlacement, agent: NodeAgent,
                          jobdir: Path) -> None:
        """Stream one rank's log and metrics into the job dir until it exits; survive link drops."""
        try:
            await self._stream_rank(job, p, agent, jobdir)
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

    async def _stream_rank(self, job: Job, p: ev.RankPlacement, agent: NodeAgent,
                           jobdir: Path) -> None:
        log_path = jobdir / f"rank_{p.rank}.log"
        metrics_path = jobdir / ("metrics.jsonl" if p.rank == 0 else f"metrics_rank_{p.rank}.jsonl")
        base = self._bases(job, jobdir)[p.rank]
        delay = 0.5
        progress = job.spec.progress or _DEFAULT_PROGRESS
        reader = pf.ProgressReader(progress.formats, resumed=_size(log_path) > base["log"]) \
            if p.rank == progress.rank and progress.formats else None
        while True:
            log_off = _size(log_path) - base["log"]
            met_off = _size(metrics_path) - base["metrics"]
            try:
                async for item in agent.watch(job.id, job.attempt, p.rank, max(log_off, 0),
                                              max(met_off, 0)):
                    delay = 0.5
                    if isinstance(item, LogChunk):
                        _append_kept(log_path, item.data)
                        if reader is not None:
                            records = reader.feed(item.data)
                            self._progress(job, jobdir, records)
                            self.progress.steps_from(job, p.node, records)
                    elif isinstance(item, MetricLine):
                        _append_kept(metrics_path, item.data.rstrip(b"\n") + b"\n")
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

    def _progress(self, job: Job, jobdir: Path, records: list[dict[str, int | float]]) -> None:
        """Progress read from the rank's output: to progress.jsonl and the job's latest."""
        if not records:
            return
        ts = round(self.ledger.stamp(), 3)
        lines = b"".join(_encode({"ts": ts, **r}) + b"\n" for r in records)
        _append_kept(jobdir / "progress.jsonl", lines)
        for r in records:
            self.progress.record(job, {"ts": ts, **r})

    # ---- job directory ---------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """The job's directory on the head: everything that reads job dirs asks here."""
        job = self.ledger.state.jobs.get(job_id)
        return cfgpaths.job_dir(self.jobs_root, job_id,
                                job.submitted_at if job is not None else None,
                                timestamped=self.timestamped_dirs)

    def _write_job_files(self, job: Job, jobdir: Path) -> None:
        # Only ugrod reads the central job dir (0700): owners read it through the API,
        # which shows each job's logs, metrics and checkpoints to its owner alone.
        jobdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (jobdir / "checkpoints").mkdir(exist_ok=True, mode=0o700)
        config = {"job": job.id, "attempt": job.attempt, "owner": job.owner,
                  "spec": ev.to_builtins(job.spec),
                  "placement": ev.to_builtins(job.placement),
                  "rendezvous": f"{job.rdzv_host}:{job.rdzv_port}"}
        _write_atomic(jobdir / "config.json", json.dumps(config, indent=2).encode())
        bases = {}
        for p in job.placement:
            log_path = jobdir / f"rank_{p.rank}.log"
            if job.attempt > 1:
                _append(log_path, f"----- ugro: attempt {job.attempt}, rank {p.rank} on "
                                  f"{p.node} -----\n".encode())
            else:
                _append(log_path, b"")  # every rank has a log, even one that prints nothing
            metrics = jobdir / ("metrics.jsonl" if p.rank == 0 else f"metrics_rank_{p.rank}.jsonl")
            bases[str(p.rank)] = {"log": _size(log_path), "metrics": _size(metrics)}
        attempts = jobdir / ".attempts"
        attempts.mkdir(exist_ok=True)
        _write_atomic(attempts / f"{job.attempt}.json", json.dumps(bases).encode())

    def _bases(self, job: Job, jobdir: Path) -> dict[int, dict[str, int]]:
        try:
            raw = json.loads((jobdir / ".attempts" / f"{job.attempt}.json").read_bytes())
            return {int(k): {"log": int(v["log"]), "metrics": int(v["metrics"])}
                    for k, v in raw.items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {p.rank: {"log": 0, "metrics": 0} for p in job.placement}

    def _write_result(self, job: Job) -> None:
        jobdir = self.job_dir(job.id)
        if not jobdir.exists():
            return
        result = {"job": job.id, "state": job.state.value, "attempt": job.attempt,
                  "exit_code": job.exit_code, "reason": job.reason,
                  "metrics": self.progress.latest(job.id) or {},
                  "started_at": job.first_started_at, "ended_at": job.ended_at}
        with contextlib.suppress(OSError):
            _write_atomic(jobdir / "result.json", json.dumps(result, indent=2).encode())


class LaunchError(Exception):
    """A launch pre-check failed (message names the node; ``node``: the one to blame)."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


MAX_METRIC_LINE = 64 * 1024   # a metrics line is a few hundred bytes; past this it is garbage
MAX_STEP = retry.MAX_STEP      # steps are recorded in events: a signed 64-bit integer
MAX_METRIC_ABS = 1e300        # finite with room: sums and rates of it stay finite


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


# Listens on the rank-0 node where torchrun's store will, until ugrod closes the stream.
# It accepts the expected number of connections, or gives up after 20 s, then exits.
# argv: HOST PORT COUNT; prints "ready", then accepts COUNT connections (20 s at most each).
_LISTENER = programs.text("port_listener")


@contextlib.asynccontextmanager
async def _listening(agent: NodeAgent, bind: Callable[[str], str], port: int,
                     expect: int) -> Any:
    """A temporary listener on the rendezvous port of rank 0's node (for the reach check)."""
    stream = await agent.transport.open_stream(
        [agent.python, "-c", _LISTENER, bind(agent.node), str(port), str(expect)])
    try:
        line = await stream.readline()
        if line.strip() != b"ready":
            raise LaunchError(f"node {agent.node}: cannot listen on the rendezvous port "
                              f"{port}: {line.decode(errors='replace').strip() or 'no answer'}",
                              node=agent.node)
        yield
    finally:
        await stream.close()


async def _no_fence(job: Job, ranks: Mapping[str, Sequence[int]], why: str) -> None:
    """The executor's fence when no fencer is wired (no monitor): a warning, no drain."""
    logger.warning("job %s attempt %d: ranks %s may still run (%s); no fencer to drain "
                   "their nodes", job.id, job.attempt, dict(ranks), why)


def _short(what: object) -> str:
    text = str(what)
    return text if len(text) <= 300 else text[:300] + "…"


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task failed", exc_info=task.exception())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _append_kept(path: Path, data: bytes) -> None:
    """Append to a file of the central job directory, making it again if it was removed.

    Someone deleting the job directory while the job runs must not stop its supervision
    (the watcher once died on FileNotFoundError and the job never ended); a write that
    still fails (disk full, permissions) drops that piece of output with a warning.
    """
    try:
        _append(path, data)
        return
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot write %s: %s; output dropped", path, exc)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _append(path, data)
    except OSError as exc:
        logger.warning("cannot write %s: %s; output dropped", path, exc)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]
