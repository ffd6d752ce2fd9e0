"""Launching an attempt: every rank of the gang starts, or none is left running.

Each node is prepared, the job's code synced (``--sync``), the rendezvous port
checked from every node (multi-node torchrun) and the checkpoint to resume from
staged, then every rank is spawned at once under the rank wrapper. Any failure
kills what did start (fencing what may still run) and ends the attempt naming the
node to blame, so a retry goes elsewhere; a command that cannot start is not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ugrod.core import events as ev
from ugrod.core import fencing, jobspec
from ugrod.core.jobspec import procs_per_node
from ugrod.core.state import WAITING, InvalidEvent, Job, JobState
from ugrod.loops.checkpoints import Checkpoints
from ugrod.loops.ending import Ending
from ugrod.loops.ranks import Ranks
from ugrod.nodes import codesync, programs
from ugrod.nodes.agent import (
    NodeAgent,
    RankStartError,
    RunAs,
    WrapperProtocolError,
    job_claim,
    job_cwd,
    no_switch,
)
from ugrod.nodes.fleet import Fleet
from ugrod.nodes.transport.base import NodeUnreachable, TransportError
from ugrod.store import job_files
from ugrod.store.ledger import Ledger

logger = logging.getLogger("ugrod.loops.launch")

class Launch:
    """Starts attempts' ranks on their nodes: all of them, or none."""

    def __init__(self, ledger: Ledger, fleet: Fleet, ranks: Ranks, ending: Ending,
                 checkpoints: Checkpoints, *, start_timeout_s: float = 120.0,
                 rdzv_join_timeout_s: float = 300.0, network_interface: str | None = None,
                 code_store: codesync.HeadStore | None = None,
                 run_as: RunAs = no_switch) -> None:
        self.ledger = ledger
        self.fleet = fleet
        self.ranks = ranks  # kills (and fences) what started when a launch fails
        self.ending = ending  # records a failed launch
        self.checkpoints = checkpoints  # stages the checkpoint to resume from
        self.start_timeout_s = start_timeout_s
        self.rdzv_join_timeout_s = rdzv_join_timeout_s
        self.network_interface = network_interface
        self.code_store = code_store
        self.run_as = run_as  # the account a rank runs as on its node

    async def start(self, job: Job, agents: list[NodeAgent], jobdir: Path) -> bool:
        """Start every rank at once; on any failure kill what started and end the attempt."""
        job_files.start_attempt(job, jobdir)
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
            missed = await self.ranks.kill_started(job, agents, pids)
            not_running |= set(pids) - set(missed)
            maybe = fencing.may_run(job.placement, requested | set(pids), not_running)
            if not blamed and maybe:  # a launch that timed out: the node it waited on
                node = next(iter(maybe))
                blamed.append((False, ranks_of[node], node))
            _, failed_rank, failed_node = min(blamed) if blamed else (True, None, None)
            if maybe:
                await self.ranks.fence(job, maybe, "its launch failed after its start request "
                                             "was sent")
            if cannot_start:
                # The same command fails the same way on every attempt: no retry, and
                # a sweep stops instead of failing each of its trials the same way.
                first = cannot_start[0]
                reason = f"node {first.node}: {first.message}; not retried"
                await self.ending.end(job, "failed", reason, exit_code=first.exit_code,
                                failed_rank=failed_rank, failed_node=failed_node)
                await self._stop_sweep(job, reason)
                return False
            reason = "launch failed: " + "; ".join(errors or ["not every rank started"])
            # A launch that never reached the job's own command is the cluster's failure,
            # not the job's: it does not use the no-progress budget.
            await self.ending.end(job, "failed", reason, retryable=True, failed_rank=failed_rank,
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

    async def resume(self, job: Job, agents: list[NodeAgent]) -> bool:
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
            missed = await self.ranks.kill_started(job, agents, pids)
            await self.ranks.fence_ranks(job, [*missed, *unknown],
                                         "ugrod stopped while the attempt was starting")
            await self.ending.end(job, "failed", "ugrod stopped while the job was starting; not "
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
        cwd, run_as = await job_cwd(job, agent), self.run_as(job, p.node)
        if requested is not None:
            requested.add(p.rank)  # from here on the node may start it, answer or not
        return await agent.spawn(job.id, job.attempt, p.rank, argv, env, cwd,
                                 run_as=run_as, program=program, claim=job_claim(job))

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
            await asyncio.gather(*(codesync.push(a, self.code_store, job.uid, job.id, tree,
                                                 job_claim(job)) for a in agents))
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


class LaunchError(Exception):
    """A launch pre-check failed (message names the node; ``node``: the one to blame)."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


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
