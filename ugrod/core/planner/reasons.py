"""Why a job waits, in words: held, backoff, dependencies, limits, or what holds the nodes.

A reason names the nodes a job would use and what keeps each (busy with which job
until about when, kept for which reservation, drained or unreachable and why), so
``ugroctl why`` answers without a second look. Reasons are recorded when they
change, so they quote stable numbers (an estimate moves with every overrun: it is
reported beside the reason, never in it).
"""

from __future__ import annotations

from ugrod.core.planner.shapes import gpus_unknown, need
from ugrod.core.planner.view import INF, NodeGpus, RoundView, ShapeInfo
from ugrod.core.planner.words import and_, few
from ugrod.core.state import Job, JobState

ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Reasons(RoundView):
    """The round's explanations of jobs that do not start."""

    def never_reason(self, info: ShapeInfo) -> str:
        """A shape no node known now can take: say so, unless nodes not yet reached may."""
        unknown = gpus_unknown(self.state, info.shape)
        if not unknown:
            return f"cannot run on this cluster as configured: {info.never}"
        words = [self.blocker(self.by_name[n.name], 0, 0, INF) for n in unknown[:3]]
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        return (f"waiting for {need(info.shape)}: {', '.join(words)}{more} (a node's GPUs "
                f"are known once ugrod reaches it)")

    def precheck(self, job: Job) -> str | None:
        """Why a job is passed over whatever the cluster looks like: hold, backoff, dependencies."""
        if job.held:
            return f"held: `ugroctl release {job.id}` lets it run"
        if job.state is JobState.RETRYING and job.retry_at is not None and job.retry_at > self.now:
            return (f"retry {job.failures} of {job.spec.max_retries} at "
                    f"{self.clock(job.retry_at)} (backoff)")
        for dep in job.spec.after:
            other = self.state.jobs.get(dep)
            if other is None:
                self.unrunnable[job.id] = f"{dep} does not exist"
                return f"waiting for {dep}, which does not exist: it will never run"
            if other.state is JobState.SUCCEEDED:
                continue
            if other.state in (JobState.FAILED, JobState.CANCELLED):
                self.unrunnable[job.id] = f"{dep} {other.state.value}"
                return f"{dep} {other.state.value}: this job runs only after it succeeds"
            return f"waiting for {dep} to succeed ({dep} is {other.state.value})"
        for dep in job.spec.after_any:
            other = self.state.jobs.get(dep)
            if other is None:
                self.unrunnable[job.id] = f"{dep} does not exist"
                return f"waiting for {dep}, which does not exist: it will never run"
            if other.state not in ENDED:
                return f"waiting for {dep} to end ({dep} is {other.state.value})"
        for dep in job.spec.after_failed:
            other = self.state.jobs.get(dep)
            if other is None:
                self.unrunnable[job.id] = f"{dep} does not exist"
                return f"waiting for {dep}, which does not exist: it will never run"
            if other.state is JobState.SUCCEEDED:
                self.unrunnable[job.id] = f"{dep} succeeded (--after-failed)"
                return f"{dep} succeeded: this job runs only if it fails or is cancelled"
            if other.state not in ENDED:
                return f"waiting for {dep} to fail ({dep} is {other.state.value})"
        return None

    def quota_reason(self, job: Job, end: float) -> str | None:
        need = job.spec.gpus_per_node * job.spec.nodes
        uq = self.users.get(job.owner) or self.user_quota(job.owner)
        if uq.max_jobs is None and uq.max_gpus is None and job.spec.sweep is None:
            return None
        if uq.max_gpus is not None and need > uq.max_gpus:
            return f"needs {need} GPUs; user {job.owner} may run at most {uq.max_gpus}"
        over = uq.over(need, end)
        if over is not None:
            jobs, _, held = over
            kept = f" (counting {and_(held)}, which will start first)" if held else ""
            if uq.max_jobs is not None and jobs > uq.max_jobs:
                return (f"user {job.owner} at limit: {uq.jobs} of {uq.max_jobs} jobs "
                        f"running{kept}")
            return (f"user {job.owner} at limit: {uq.gpus} of {uq.max_gpus} GPUs running, "
                    f"needs {need}{kept}")
        sweep = job.spec.sweep
        if sweep is not None and (sq := self.sweep_quota(sweep)) and sq.over(0, end) is not None:
            return (f"sweep {job.spec.sweep} at its limit: {sq.jobs} of {sq.max_jobs} "
                        f"trials running")
        return None

    def blocked_reason(self, info: ShapeInfo, end: float) -> str:
        """Why a shape cannot start now, naming the nodes it would use and what holds them."""
        gpn, count, min_vram = info.shape[0], info.shape[1], info.shape[2]
        shown: list[str] = []
        ready: list[str] = []
        blocked = 0
        # A one-node shape that failed has no node ready, and a full cluster none either:
        # then the first few blockers are all there is to say and the rest are counted.
        scan_all = count > 1 and (self.free_total > 0 or not gpn)
        for n, (_, name, nd) in enumerate(info.static):
            if not nd.sched:
                is_ready = False
            elif gpn:
                usable = 0
                for g in nd.free:
                    if g[0] >= min_vram and nd.res_at.get(g[1], INF) >= end:
                        usable += 1
                is_ready = usable >= gpn
            else:
                is_ready = True
            if is_ready:
                ready.append(name)
                continue
            blocked += 1
            if len(shown) < 3:
                shown.append(self.blocker(nd, gpn, min_vram, end))
            elif not scan_all:
                blocked += len(info.static) - n - 1
                break
        text = f"waiting for {need(info.shape)}: "
        if ready:
            text += f"only {and_(sorted(ready[:3]))}{' and more' if len(ready) > 3 else ''} free; "
        text += ", ".join(shown)
        others = blocked - len(shown)
        if others:
            text += f" and {others} more node{'s' if others > 1 else ''} busy"
        return text

    def blocker(self, nd: NodeGpus, gpn: int, min_vram: int, end: float) -> str:
        """What keeps one node from taking the shape now, in words."""
        name = nd.name
        if not nd.sched:
            node = nd.node
            why = f"{name} is {node.state.value}"
            if node.drained and node.drain_reason:
                why += f" ({node.drain_reason})"
            elif node.health_reason and not node.drained:  # what to do about it, in words
                why += f" ({node.health_reason})"
            return why
        qual = [g for g in nd.gpus if g[0] >= min_vram]
        free = [g for g in qual if g[1] not in nd.held_by]
        if len(free) >= gpn:
            keepers = sorted({nd.res_by[g[1]] for g in free if g[1] in nd.res_by})
            return f"{name} kept for {few(keepers)}"
        holders = sorted({nd.held_by[g[1]] for g in qual if g[1] in nd.held_by})
        until = sorted(nd.until.get(g[1], -INF) for g in qual)[gpn - 1]
        why = f"{name} busy with {few([self.holder(h) for h in holders])}"
        if self.now <= until < INF:
            why += f" until about {self.clock(until)}"
        elif -INF < until < self.now:
            why += f" (expected to end by {self.clock(until)})"
        return why
