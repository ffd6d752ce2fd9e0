"""One planning round's decisions: which waiting jobs start now, on which GPUs, and which
GPUs are held back for blocked jobs (conservative backfill); see the package's rules.
"""

from __future__ import annotations

import bisect
from operator import attrgetter

import msgspec

from ugrod.core import events as ev
from ugrod.core.planner.reasons import Reasons
from ugrod.core.planner.shapes import Gpu
from ugrod.core.planner.view import INF, NodeGpus, Reservation, ShapeInfo
from ugrod.core.planner.words import and_, few, gb, ordinal
from ugrod.core.state import Job, JobState

MAX_RESERVATIONS = 16  # blocked jobs that get a reservation each round (each costs O(GPUs))


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """One round's decisions. ``order``: every waiting job, queue order (placed ones included)."""

    placements: tuple[ev.JobPlaced, ...] = ()
    waiting: dict[str, str] = {}
    estimates: dict[str, float] = {}
    reservations: dict[str, Reservation] = {}
    unrunnable: dict[str, str] = {}  # waiting jobs that can never run (a dependency failed)
    order: tuple[str, ...] = ()


class Round(Reasons):
    """Walks the queue once: place what fits now, reserve for what does not, say why."""

    def run(self) -> Plan:
        queue = self.load()
        blocked_head: str | None = None  # first job that could not start (backfill off)
        retrying, shapes, waiting = JobState.RETRYING, self.shapes, self.waiting
        limited = self.user_limits.keys()
        everyone_limited = "*" in limited
        for pos, job in enumerate(queue, 1):
            spec = job.spec
            if job.held or spec.after or job.state is retrying or spec.after_any \
                    or spec.after_failed:
                reason = self.precheck(job)
                if reason is not None:
                    waiting[job.id] = reason
                    continue
            if blocked_head is not None:
                waiting[job.id] = f"queued behind {blocked_head} (backfill is off)"
                continue
            shape = (spec.gpus_per_node, spec.nodes, spec.min_vram_bytes, spec.labels_required,
                     spec.labels_avoided, spec.node_names)
            info = shapes.get(shape) or self.shape_info(shape)
            if info.never is not None:
                waiting[job.id] = self.never_reason(info)
                continue
            # The common case on a busy cluster: nothing of this shape can start now, whoever
            # asks, no limit to report and no reservation left to give. Say so and move on.
            if (info.full or (shape[0] and not self.free_total)) and not (
                    len(self.reservations) < MAX_RESERVATIONS and self.finite) and not (
                    everyone_limited or spec.sweep is not None or job.owner in limited):
                if info.reason is None:
                    info.reason = self.blocked_reason(info, INF)
                waiting[job.id] = info.reason
                if not self.backfill:
                    blocked_head = job.id
                continue
            rt = self.runtime(job)
            end = INF if rt is None else self.now + rt
            reason = self.quota_reason(job, end)
            if reason is not None:
                waiting[job.id] = reason
                continue
            chosen = self.fit_now(info, end, job.failed_nodes)
            if chosen is not None:
                self.place(job, pos, chosen, end)
                continue
            if info.reason is None:
                info.reason = self.blocked_reason(info, end)
            reason = info.reason
            res = self.reserve(job, info, rt) if len(self.reservations) < MAX_RESERVATIONS \
                and self.finite else None
            if res is not None:
                # The estimate is not in the reason: reasons are recorded when they change,
                # and an estimate moves with every overrun.
                if res.at is not None:
                    self.estimates[job.id] = res.at
                else:
                    reason += "; the GPUs it waits for are kept for it"
            waiting[job.id] = reason
            if not self.backfill:
                blocked_head = job.id
        return Plan(placements=tuple(self.placements), waiting=waiting,
                    estimates=self.estimates, reservations=self.reservations,
                    unrunnable=self.unrunnable, order=tuple(map(attrgetter("id"), queue)))

    def fit_now(self, info: ShapeInfo, end: float,
                failed: tuple[str, ...]) -> list[tuple[NodeGpus, list[Gpu]]] | None:
        """The best nodes and GPUs for a job ending at ``end``, starting now; None if none fit."""
        gpn, count, min_vram = info.shape[0], info.shape[1], info.shape[2]
        if (info.fail_end is not None and end >= info.fail_end) or (gpn and not self.free_total):
            return None
        best: list[tuple[tuple[bool, int, bool, str], NodeGpus, list[Gpu]]] = []
        cand, keep, i = info.cand, None, 0
        while i < len(cand):
            item = cand[i]
            lb, name, nd = item
            if len(best) == count and (False, lb, False, name) > best[-1][0]:
                break  # every later node gives up at least as much VRAM
            i += 1
            chosen: list[Gpu] = []
            if gpn:
                usable = 0
                for g in nd.free:
                    if g[0] >= min_vram:
                        usable += 1
                        if len(chosen) < gpn and nd.res_at.get(g[1], INF) >= end:
                            chosen.append(g)
                if usable < gpn:  # full for this shape for the rest of the round
                    if keep is None:
                        keep = cand[:i - 1]
                    continue
                if keep is not None:
                    keep.append(item)
                if len(chosen) < gpn:
                    continue
                given_up = sum(g[0] for g in chosen)
            else:
                if keep is not None:
                    keep.append(item)
                given_up = lb
            # A node the job failed on comes last: a retry goes elsewhere while others fit.
            key = (name in failed, given_up, nd.degraded, name)
            bisect.insort(best, (key, nd, chosen), key=lambda b: b[0])
            del best[count:]
        if keep is not None:
            info.cand = keep + cand[i:]
        if len(best) < count:
            info.fail_end = end if info.fail_end is None else min(info.fail_end, end)
            # every node was looked at: those left in cand are the ones with enough free GPUs
            info.full = len(info.cand) < count
            return None
        return [(nd, chosen) for _, nd, chosen in best]

    def place(self, job: Job, pos: int, chosen: list[tuple[NodeGpus, list[Gpu]]],
              end: float) -> None:
        order = sorted(range(len(chosen)), key=lambda k: (
            chosen[k][0].pref is None, chosen[k][0].pref or 0, k))
        ranks: list[ev.RankPlacement] = []
        where: list[str] = []
        backfilled: set[str] = set()
        for rank, k in enumerate(order):
            nd, gpus = chosen[k]
            for g in gpus:
                nd.free.remove(g)
                nd.held_by[g[1]], nd.until[g[1]] = job.id, end
                self.set_avail(nd, g[1], max(nd.avail[g[1]], end))
                if g[1] in nd.res_by:
                    backfilled.add(nd.res_by[g[1]])
            self.free_total -= len(gpus)
            gpus = sorted(gpus, key=lambda g: g[1])
            uuids = tuple(g[2] for g in gpus)
            ranks.append(ev.RankPlacement(rank=rank, node=nd.name,
                                          gpus=tuple(g[1] for g in gpus),
                                          gpu_uuids=uuids if all(uuids) else ()))
            where.append(f"{nd.name} ({gpu_words(gpus)})")
        uq = self.user_quota(job.owner)
        uq.jobs += 1
        uq.gpus += job.spec.gpus_per_node * job.spec.nodes
        if job.spec.sweep is not None and (sq := self.sweep_quota(job.spec.sweep)):
            sq.jobs += 1
        words = ["smallest GPUs that fit" if job.spec.gpus_per_node else "CPU only"]
        names = [r.node for r in ranks]
        avoided = [n for n in job.failed_nodes if n not in names]
        again = [n for n in job.failed_nodes if n in names]
        if avoided:
            words.append(f"avoiding {and_(avoided)}, where it failed before")
        if again:
            words.append(f"on {and_(again)} again, where it failed before: no other node fits")
        if backfilled:
            words.append(f"backfilled: expected to end by {self.clock(end)}, before "
                         f"{and_(sorted(backfilled))} needs its GPUs")
        elif self.reservations:
            words.append(f"backfilled on GPUs not kept for {few(sorted(self.reservations))}")
        if job.attempt:
            words.append(f"attempt {job.attempt + 1}"
                         + (f", resuming from {job.resume_from}" if job.resume_from else ""))
        words.append(f"priority {job.priority}, {ordinal(pos)} in the queue")
        rank0 = self.by_name[ranks[0].node]
        self.placements.append(ev.JobPlaced(
            job=job.id, attempt=job.attempt + 1, ranks=tuple(ranks),
            rdzv_host=rank0.node.spec.host,
            rdzv_port=self.port_for(rank0.name, job.attempt + 1) if self.port_for else 0,
            resume_from=job.resume_from,
            reason=f"placed on {', '.join(where)}: {'; '.join(words)}",
        ))

    def reserve(self, job: Job, info: ShapeInfo, rt: float | None) -> Reservation | None:
        """Hold back the GPUs a blocked job will start on, from the earliest time they free up."""
        gpn, count, min_vram = info.shape[0], info.shape[1], info.shape[2]
        if not gpn:
            return None  # a CPU job waits only for nodes to come back: nothing to hold
        ready: list[tuple[float, NodeGpus, list[Gpu]]] = []  # when each node could take it
        for _, _, nd in info.static:
            if nd.sched:
                timed = sorted((nd.avail[g[1]], g) for g in nd.gpus if g[0] >= min_vram)
                ready.append((timed[gpn - 1][0], nd, [g for _, g in timed]))
        if len(ready) < count:
            return None
        at = sorted(r[0] for r in ready)[count - 1]
        picks: list[tuple[tuple[bool, float, int, bool, str], NodeGpus, list[Gpu]]] = []
        gpus: list[Gpu]
        for t, nd, qual in ready:
            if at < INF:
                if t > at:
                    continue
                gpus = sorted(g for g in qual if nd.avail[g[1]] <= at)[:gpn]
                key = (nd.name in job.failed_nodes, 0.0, sum(g[0] for g in gpus), nd.degraded,
                       nd.name)
            else:  # unknown: hold the GPUs that free up first (free ones before busy ones)
                gpus = qual[:gpn]
                key = (nd.name in job.failed_nodes, t, sum(g[0] for g in gpus), nd.degraded,
                       nd.name)
            picks.append((key, nd, gpus))
        picks.sort(key=lambda p: p[0])
        picks = picks[:count]
        if at == INF and all(nd.avail[g[1]] == INF for _, nd, gpus in picks for g in gpus):
            return None  # everything it could wait for is already held back for others
        start = at if at < INF else -INF
        free_for_good = at + rt if at < INF and rt is not None else INF
        held = []
        for _, nd, gpus in picks:
            for g in gpus:
                idx = g[1]
                if start == -INF and idx not in nd.held_by and nd.res_at.get(idx, INF) > -INF:
                    self.free_total -= 1  # free now, but no one may use it any more
                if start < nd.res_at.get(idx, INF):
                    nd.res_at[idx], nd.res_by[idx] = start, job.id
                self.set_avail(nd, idx, free_for_good)
                held.append((nd.name, idx))
        res = Reservation(at=at if at < INF else None, gpus=tuple(sorted(held)))
        self.reservations[job.id] = res
        need = gpn * count
        uq = self.user_quota(job.owner)
        if uq.max_gpus is not None or uq.max_jobs is not None:
            uq.reserved.append((start, need, job.id))
        if job.spec.sweep is not None and (sq := self.sweep_quota(job.spec.sweep)):
            sq.reserved.append((start, 0, job.id))
        return res


def gpu_words(gpus: list[Gpu]) -> str:
    """'GPU 0, 8 GB', 'GPUs 0,1, 8 GB each', 'GPU 0 8 GB, GPU 1 12 GB', 'no GPU'."""
    if not gpus:
        return "no GPU"
    sizes = {g[0] for g in gpus}
    if len(sizes) == 1:
        size = f", {gb(gpus[0][0])}" if gpus[0][0] else ""
        if len(gpus) == 1:
            return f"GPU {gpus[0][1]}{size}"
        return f"GPUs {','.join(str(g[1]) for g in gpus)}{size}{' each' if size else ''}"
    return ", ".join(f"GPU {g[1]} {gb(g[0])}" if g[0] else f"GPU {g[1]}" for g in gpus)
