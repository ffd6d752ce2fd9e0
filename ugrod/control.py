"""The one door for client commands: check, decide (core/commands.py), record (the ledger).

Every command a client sends comes through here, whatever carries it (the HTTP API
today): who may (owner, admin), the request's values (job specs, sweeps, limits, code
trees), the decision on the newest state inside the writer (``Ledger.record_decided``),
and the waits some commands offer. Refusals are ``Refused(code, message)`` in the
words of the person who asked; ``api/`` alone turns them into HTTP statuses.

The reads clients make of jobs (queue order and reasons, ``why``, results, sweeps) live
beside it in ``views.py``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from ugrod.config import schema as cfgmod
from ugrod.core import commands, health, jobspec, planner
from ugrod.core import events as ev
from ugrod.core.commands import Refused
from ugrod.core.jobspec import SubmitBody, SweepBody, check_name
from ugrod.core.state import TERMINAL, Job, JobState, State
from ugrod.loops.executor import Executor
from ugrod.loops.planning import Planning
from ugrod.nodes import codesync
from ugrod.nodes.fleet import Fleet
from ugrod.store.ledger import Ledger

WAIT_CANCEL_S = 120.0  # how long `cancel --wait` waits for the processes to be gone
WAIT_CHECKPOINT_S = 600.0  # the longest `checkpoint --wait`
WAIT_TWIN_S = 30.0  # a retried submit's wait for the job its first try is recording
GONE_CHECK_S = 0.5  # how often a waiting command looks whether its asker went away


class Policy(Protocol):
    """Who may see and change what (api/trust.py's Policy)."""

    def is_admin(self, uid: int) -> bool: ...

    def may_see(self, uid: int | None, owner_uid: int | None) -> bool: ...

    def admin_phrase(self) -> str: ...


class Host(Protocol):
    """What the door reads of the running daemon, at each use (a reload replaces the
    config and the policy)."""

    @property
    def ledger(self) -> Ledger: ...

    @property
    def executor(self) -> Executor: ...

    @property
    def config(self) -> cfgmod.Config: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def monitor(self) -> Any: ...

    @property
    def code_store(self) -> codesync.HeadStore: ...

    @property
    def closing(self) -> asyncio.Event: ...

    @property
    def fleet(self) -> Fleet: ...

    @property
    def planning(self) -> Planning: ...


class Submitted(msgspec.Struct, frozen=True, kw_only=True):
    """What a submit did: the job, whether this request made it, and for a dry run the
    state it would make (nothing recorded; ``views.launch_plan`` says where it starts)."""

    job: str
    created: bool
    preview: State | None = None


class BulkBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/jobs/actions``: an action over named jobs and/or a filter."""

    action: str
    jobs: list[str] = []
    user: str | None = None
    all_users: bool = False
    states: list[str] = []
    sweep: str | None = None
    priority: int | None = None
    wait: bool = False


Judged = tuple[list[str], list[commands.Refusal]]  # (jobs changed, jobs refused and why)


class Control:
    """Client commands: the rules for who may, the checks, the decision, the record."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._fits: dict[planner.Shape, tuple[Any, str | None]] = {}

    @property
    def ledger(self) -> Ledger:
        return self._host.ledger

    @property
    def state(self) -> State:
        """Committed state: every fact in it is on disk."""
        return self._host.ledger.state

    # ---- who may ------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        return commands.job(self.state, job_id)

    def node(self, name: str) -> str:
        commands.node(self.state, name)
        return name

    def own(self, actor: ev.Actor, job: Job, verb: str) -> None:
        """Only the job's owner and admins may change it (ugrod's own uid is nobody)."""
        policy = self._host.policy
        if actor.uid is None or not policy.may_see(actor.uid, job.uid):
            raise Refused("forbidden", f"only {job.owner} (the owner) or "
                          f"{policy.admin_phrase()} may {verb} job {job.id}")

    def may_change(self, actor: ev.Actor, job: Job) -> bool:
        try:
            self.own(actor, job, "change")
        except Refused:
            return False
        return True

    def admin(self, actor: ev.Actor, verb: str) -> None:
        policy = self._host.policy
        if actor.uid is None or not policy.is_admin(actor.uid):
            raise Refused("forbidden", f"only {policy.admin_phrase()} may {verb}; "
                          f"{actor.user} may not")

    def may_read(self, actor: ev.Actor, job: Job, what: str) -> None:
        """Other users see a job's state, never its logs, metrics or checkpoints."""
        policy = self._host.policy
        if not policy.may_see(actor.uid, job.uid):
            raise Refused("forbidden", f"only {job.owner} (the owner) or "
                          f"{policy.admin_phrase()} may read the {what} of job {job.id}")

    def may_see(self, actor: ev.Actor | None, job: Job) -> bool:
        return actor is None or self._host.policy.may_see(actor.uid, job.uid)

    # ---- submit ---------------------------------------------------------------------------

    async def submit(self, actor: ev.Actor, body: SubmitBody, *,
                     dry_run: bool = False) -> Submitted:
        """Check a submit and record it (or, ``dry_run``, say what it would record)."""
        if body.request_id is not None:
            prior = self.state.requests.get(body.request_id)
            if prior is not None:  # a client retrying after a lost answer: same job, once
                return Submitted(job=prior, created=False)
        name = check_name("job", body.name) if body.name else ""
        await self._host.fleet.inventory_known()
        # launch puts the job's name in argv ({name}); one not given yet is decided in
        # the writer below, so the spec carries a placeholder replaced there.
        spec = self.job_spec(body, name or jobspec.NAME_PLACEHOLDER)
        if spec.sync is not None:
            self.check_code(actor, spec.sync)
        why = self.check_fits(spec)
        if why:
            raise Refused("bad_request", f"job can never run here: {why}")
        self.check_user_limits(actor, spec)
        submitted = ev.JobSubmitted(job=name, spec=spec, priority=body.priority,
                                    held=body.held, request_id=body.request_id)

        # The name (when none was given) and the dependencies are decided on the newest
        # state, inside the writer: concurrent unnamed submits get distinct names.
        def decide(tip: State) -> tuple[list[ev.Event], tuple[str, bool]]:
            events, job_id, created = commands.submit_once(
                tip, submitted, name_in_argv=body.launch is not None)
            return events, (job_id, created)

        if dry_run:
            # Every check a submit makes, and the job as it would be queued; nothing
            # is recorded (the same rule builds it, on a state that is then dropped).
            preview, (job_id, _) = self.ledger.preview_decided(actor, decide)
            return Submitted(job=job_id, created=False, preview=preview)
        _, (job_id, created) = await self.ledger.record_decided(actor, decide)
        # A twin request's job (still in flight when this one came): answered once durable.
        if not await self._until(lambda state: job_id in state.jobs, WAIT_TWIN_S):
            raise TimeoutError(f"job {job_id} was not recorded within {WAIT_TWIN_S:g} s")
        return Submitted(job=job_id, created=created)

    def job_spec(self, body: SubmitBody, name: str = "") -> ev.JobSpec:
        """Check a submit body and build its JobSpec (SpecError: a bad request)."""
        state = self.state

        def launch_nodes(gpus_per_node: int) -> int:
            # A node not contacted yet (ugrod just started) counts: the job waits for it
            # rather than shrinking to the nodes that happened to answer first.
            return sum(1 for n in state.nodes.values()
                       if (n.schedulable or (not n.drained
                                             and n.health_reason == health.NOT_CONTACTED))
                       and len(n.gpus) >= gpus_per_node)
        return jobspec.build(body, self._host.config, len(state.nodes), launch_nodes, name)

    def check_fits(self, spec: ev.JobSpec) -> str | None:
        """Why ``spec`` can never run here (None: it can); remembered per shape and node set."""
        # The answer depends only on the nodes (a new Map whenever one changes) and
        # the spec's shape: a burst of submits of one kind asks once.
        state = self.state
        nodes, shape = state.nodes, planner.spec_shape(spec)
        hit = self._fits.get(shape)
        if hit is not None and hit[0] is nodes:
            return hit[1]
        why = planner.check_fits(state, spec)
        if why is not None and planner.gpus_unknown(state, shape):
            # A node not yet reached may have what the job needs: it waits instead (the
            # planner's reason names the nodes whose GPUs are not known).
            why = None
        if len(self._fits) >= 256:
            self._fits.clear()
        self._fits[shape] = (nodes, why)
        return why

    def check_user_limits(self, actor: ev.Actor, spec: ev.JobSpec) -> None:
        limits = self._host.config.scheduler.limits_for(actor.user)
        if limits.max_gpus is None:
            return
        need = spec.nodes * spec.gpus_per_node
        if need > limits.max_gpus:
            raise Refused("bad_request", f"job needs {need} GPUs; {actor.user} may use "
                          f"at most {limits.max_gpus} at once")

    def check_code(self, actor: ev.Actor, tree: str) -> None:
        """A --sync job's code tree must be on the head, uploaded by its owner."""
        try:
            self._host.code_store.complete(actor.uid, tree)
        except codesync.SyncError as exc:
            raise Refused("bad_request", f"--sync: {exc}") from None

    # ---- one job --------------------------------------------------------------------------

    async def act(self, actor: ev.Actor, job_id: str, action: str, verb: str,
                  priority: int | None = None) -> Job:
        """One action (commands.ACTIONS) on one job, decided on the newest state."""
        job = self.job(job_id)
        self.own(actor, job, verb)

        def decide(tip: State) -> tuple[list[ev.Event], None]:
            return [commands.job_action(tip.jobs[job.id], action, actor, priority)], None

        await self.ledger.record_decided(actor, decide)
        return self.state.jobs[job.id]

    async def cancel(self, actor: ev.Actor, job_id: str, *, wait: bool = False) -> bool:
        """Cancel a job; True once it has ended (or ``wait`` waited for it to)."""
        job = await self.act(actor, job_id, "cancel", "cancel")
        if job.state in TERMINAL:
            return True
        if wait:
            await self.wait_terminal(job.id, timeout_s=WAIT_CANCEL_S)
            return True
        return False

    async def checkpoint(self, actor: ev.Actor, job_id: str, wait_s: float = 0.0,
                         gone: Callable[[], bool] = lambda: False) -> None:
        """Ask a running job for a checkpoint; wait up to ``wait_s`` for it to report one
        (or end, or ``gone()`` to say the asker left)."""
        job = self.job(job_id)
        self.own(actor, job, "checkpoint")
        before = len(job.checkpoints)
        await self.ledger.record(actor, commands.checkpoint(job))
        if wait_s > 0:
            def saved_or_ended(state: State) -> bool:
                cur = state.jobs[job.id]
                return len(cur.checkpoints) > before or cur.state is not JobState.RUNNING
            await self._until(saved_or_ended, min(wait_s, WAIT_CHECKPOINT_S), gone)

    async def resume(self, actor: ev.Actor, job_id: str, changes: Mapping[str, str]) -> None:
        """Queue a failed or cancelled job again, from its newest checkpoint."""
        job = self.job(job_id)
        self.own(actor, job, "resume")
        resumed = commands.resume(job, changes)
        executor = self._host.executor
        resume_from = await executor.newest_checkpoint(job) if job.placement else None
        await self.ledger.record(actor, msgspec.structs.replace(resumed,
                                                                resume_from=resume_from))

    # ---- many jobs --------------------------------------------------------------------------

    async def bulk(self, actor: ev.Actor, body: BulkBody) -> Judged:
        """cancel/hold/release/priority over named jobs and/or a filter, as one batch.

        Each job is judged on its own (owner, state): the ones that can take the action
        are changed together in one atomic append; the others are listed with why not.
        Returns (the jobs changed, the refusals).
        """
        if body.action not in commands.ACTIONS:
            raise Refused("bad_request", f"unknown action {body.action!r}; use one of "
                          f"{', '.join(commands.ACTIONS)}")
        if body.action == "priority":
            jobspec.check_priority(body.priority)
        where = commands.Filter(user=body.user, all_users=body.all_users,
                                states=commands.check_states(body.states), sweep=body.sweep)
        if not body.jobs and where.empty:
            raise Refused("bad_request", "name the jobs, or select them with --user, "
                          "--state or --sweep")
        if len(body.jobs) > commands.MAX_BATCH:
            raise Refused("bad_request", f"at most {commands.MAX_BATCH} jobs at once")
        for name in body.jobs:
            check_name("job", name)
        if body.sweep is not None:
            check_name("sweep", body.sweep)
        if body.user is not None and not 1 <= len(body.user) <= 64:
            raise Refused("bad_request", "--user: expected a user name (1-64 characters)")
        may = functools.partial(self.may_change, actor)

        def decide(tip: State) -> tuple[list[ev.Event], Judged]:
            chosen, missing = commands.select(tip, actor, body.jobs, where)
            events, done, refused = commands.bulk(tip, actor, body.action, chosen, may,
                                                  body.priority)
            return events, (done, missing + refused)

        _, (done, refused) = await self.ledger.record_decided(actor, decide)
        if body.action == "cancel" and body.wait:
            await self.wait_terminal_all(done, timeout_s=WAIT_CANCEL_S)
        return done, refused

    async def wait_terminal(self, job_id: str, timeout_s: float) -> None:
        await self.wait_terminal_all([job_id], timeout_s)

    async def wait_terminal_all(self, job_ids: list[str], timeout_s: float) -> None:
        """Until every job has ended (or waits to retry), the deadline, or ugrod stopping."""
        def ended(state: State) -> bool:
            jobs = state.jobs
            return all(jobs[j].state in TERMINAL or jobs[j].state is JobState.RETRYING
                       for j in job_ids)
        await self._until(ended, timeout_s)

    async def _until(self, done: Callable[[State], bool], timeout_s: float,
                     gone: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``done(state)`` (True), the deadline, ugrod stopping or ``gone()``
        (the asker left; looked at every GONE_CHECK_S).

        Woken by the ledger's commits (``Ledger.subscribe``), not by polling: ``done`` is
        asked again after each batch of events, on the committed state.
        """
        ledger, closing = self.ledger, self._host.closing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        sub = None
        try:
            while True:
                if done(self.state):
                    return True
                left = deadline - loop.time()
                if left <= 0 or closing.is_set() or gone():
                    return False
                if sub is None:  # no await since done() was asked: no commit is missed
                    sub = ledger.subscribe()
                try:
                    async with asyncio.timeout(min(left, GONE_CHECK_S)):
                        rec = await sub.get()
                except TimeoutError:
                    continue
                while rec is not None and not sub.empty():  # a batch: one look at the end
                    rec = sub.get_nowait()
                if rec is None:  # ugrod stopping, or cut off (it fell behind): anew
                    ledger.unsubscribe(sub)
                    sub = None
        finally:
            if sub is not None:
                ledger.unsubscribe(sub)

    # ---- sweeps ---------------------------------------------------------------------------

    async def create_sweep(self, actor: ev.Actor, body: SweepBody) -> str:
        """Submit a sweep's trials and the sweep, as one batch; the sweep's name."""
        name = check_name("sweep", body.name)
        await self._host.fleet.inventory_known()
        state = self.state
        if name in state.sweeps:
            raise Refused("conflict", f"a sweep named {name!r} already exists")
        jobspec.check_sweep(body)  # sized before anything is built (SpecError: 400)
        if isinstance(body.sync, str):
            self.check_code(actor, body.sync)
        keys = sorted(body.params)
        grid = list(itertools.product(*(body.params[k] for k in keys)))
        events: list[ev.Event] = []
        names = []
        for i, values in enumerate(grid):
            job_name = f"{name}-{i}"
            if job_name in state.jobs:
                raise Refused("conflict", f"a job named {job_name!r} already exists")
            shared = {f: getattr(body, f) for f in jobspec.SHARED_FIELDS
                      if f not in ("priority", "request_id", "held")}
            sub = SubmitBody(argv=body.argv, **shared)
            base = self.job_spec(sub, job_name)
            spec = jobspec.with_overrides(base, dict(zip(keys, values, strict=True)))
            spec = msgspec.structs.replace(spec, sweep=name)
            if i == 0:  # --after and its kin, as for one job (Refused: 4xx)
                commands.check_dependencies(state, spec)
            why = self.check_fits(spec)
            if why:
                raise Refused("bad_request", f"sweep can never run here: {why}")
            events.append(ev.JobSubmitted(job=job_name, spec=spec, priority=body.priority,
                                          held=body.held))
            names.append(job_name)
        events.append(ev.SweepCreated(sweep=name, jobs=tuple(names),
                                      params={k: tuple(v) for k, v in body.params.items()},
                                      max_parallel=body.max_parallel))
        await self.ledger.record(actor, *events)
        self._host.planning.kick()
        return name

    async def cancel_sweep(self, actor: ev.Actor, name: str) -> None:
        """Cancel every trial still running or waiting; all or nothing: every trial must
        be the caller's to stop."""
        for job_id in commands.sweep(self.state, name).jobs:
            self.own(actor, self.state.jobs[job_id], "cancel")

        def decide(tip: State) -> tuple[list[ev.Event], None]:
            return commands.cancel_sweep(tip, actor, name), None

        await self.ledger.record_decided(actor, decide)

    # ---- nodes ----------------------------------------------------------------------------

    async def drain(self, actor: ev.Actor, name: str, reason: str) -> State:
        self.admin(actor, "drain nodes")
        return await self.ledger.record(actor, commands.drain(self.state, name, reason))

    async def undrain(self, actor: ev.Actor, name: str) -> State:
        self.admin(actor, "undrain nodes")
        return await self.ledger.record(actor, commands.undrain(self.state, name))
