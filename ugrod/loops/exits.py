"""Rank ends, from whoever learns of them, to the attempt's supervision: one channel.

A rank's watch reports its exit status; a kill that cannot get through gives
its rank up; the watchdog reports a rank that vanished with no exit status
(``rank_gone``) and the ranks on a node it declared dead (``abandon``). The
executor's supervision opens an attempt's channel before it watches anything,
takes every end from it, and closes it when the attempt is over; an end
reported to an attempt no one supervises any more is dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ugrod.core import events as ev
from ugrod.store.ledger import Ledger

# The exit code of a rank whose processes vanished without an exit status (its supervisor
# died with it: node reboot, OOM killer, kill -9 of the tree); the rank wrapper's LOST.
VANISHED_EXIT_CODE = -1


@dataclass(frozen=True, slots=True)
class Exit:
    """One rank's end as reported: its exit code, or None when it is lost (its end cannot
    be confirmed); ``at``: when, by its node's clock; ``failure``: why its watch and its
    status both failed (supervision then ends the attempt with that reason)."""

    rank: ev.RankPlacement
    exit_code: int | None
    at: float | None = None
    failure: BaseException | None = None


class Exits:
    """Each supervised attempt's queue of rank ends."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queues: dict[tuple[str, int], asyncio.Queue[Exit]] = {}

    def open(self, job_id: str, attempt: int) -> asyncio.Queue[Exit]:
        """The attempt's queue, for its supervision to read (one reader)."""
        q: asyncio.Queue[Exit] = asyncio.Queue()
        self._queues[(job_id, attempt)] = q
        return q

    def close(self, job_id: str, attempt: int) -> None:
        self._queues.pop((job_id, attempt), None)

    def report(self, job_id: str, attempt: int, end: Exit) -> bool:
        """Hand a rank's end to its supervision; False when none supervises the attempt."""
        q = self._queues.get((job_id, attempt))
        if q is None:
            return False
        q.put_nowait(end)
        return True

    def rank_gone(self, job_id: str, attempt: int, rank: int,
                  exit_code: int = VANISHED_EXIT_CODE) -> bool:
        """End a rank's watch: its processes are confirmed gone, yet no exit status will
        ever come (its supervisor vanished with it). Recorded as its exit."""
        job = self._ledger.state.jobs.get(job_id)
        if (job_id, attempt) not in self._queues or job is None or job.attempt != attempt:
            return False
        p = next((p for p in job.placement if p.rank == rank), None)
        if p is None:
            return False
        return self.report(job_id, attempt, Exit(p, exit_code))

    def abandon(self, job_id: str, attempt: int, node: str) -> list[int]:
        """Stop waiting for the ranks on ``node``: it was declared dead.

        Their processes cannot be confirmed gone, so the attempt ends as soon as every
        other rank is, and its reason says so (``ugrod/loops/watchdog.py`` drains the node
        and kills the leftovers when it answers again). Returns the ranks given up on.
        """
        job = self._ledger.state.jobs.get(job_id)
        if (job_id, attempt) not in self._queues or job is None or job.attempt != attempt:
            return []
        gone = {r.rank for r in job.ranks if r.exit_code is not None}
        ranks = [p for p in job.placement if p.node == node and p.rank not in gone]
        for p in ranks:
            self.report(job_id, attempt, Exit(p, None))
        return [p.rank for p in ranks]
