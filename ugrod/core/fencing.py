"""Fencing as pure decisions: which ranks may still run, and what to record when they're found.

A GPU is booked again only once every process that may use it is confirmed gone. An
attempt that may have started anything on a node (its start request may have reached the
node's rank wrapper: any launch step past writing the rank spec) and could not be
confirmed gone there, because the node did not answer, counts as *possibly running* on
that node. The node is then drained for new work ("fenced", with a reason naming the
attempt) until ugrod has been on it and killed whatever of an ended attempt runs there;
the shell is ``ugrod/loops/fencing.py``. A rank found running that belongs to no live
attempt is killed and recorded (``rank_fenced``): the log says a GPU was in use by
something ugrod had already let go of, and ``status``/``why`` show it.

Everything here takes the facts as arguments (what was started, what answered, what the
node's scan found) and returns decisions or events; the shell does the talking.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ugrod.core import events as ev
from ugrod.core.names import NAME_PATTERN
from ugrod.core.state import ACTIVE, State

FENCE_PREFIX = "ugrod fence: "
# Drains that ugrod lifts by itself once the node is clean: the fence's and, in logs
# written before fencing had its own word, the watchdog's for a dead node.
OWN_PREFIXES = (FENCE_PREFIX, "ugrod watchdog: ")

_RUN_DIR = re.compile(rf"(?P<job>{NAME_PATTERN})/attempt-(?P<attempt>\d+)/rank-(?P<rank>\d+)")


class RunDir(NamedTuple):
    """One rank of one attempt, as its run directory on a node names it."""

    job: str
    attempt: int
    rank: int


def own_drain(reason: str) -> bool:
    """Whether a drain is ugrod's own fence (lifted by ugrod once the node is clean)."""
    return reason.startswith(OWN_PREFIXES)


def parse_run_dir(path: str, jobs_dir: str) -> RunDir | None:
    """``JOBS_DIR/JOB/attempt-N/rank-R`` -> RunDir; None for anything else."""
    m = _RUN_DIR.fullmatch(posixpath.relpath(path, jobs_dir))
    if m is None:
        return None
    return RunDir(m["job"], int(m["attempt"]), int(m["rank"]))


def live(state: State, job: str, attempt: int) -> bool:
    """Whether ``attempt`` of ``job`` is the job's current one and starting or running."""
    j = state.jobs.get(job)
    return j is not None and j.state in ACTIVE and j.attempt == attempt


def may_run(placement: Sequence[ev.RankPlacement], requested: Iterable[int],
            confirmed: Iterable[int]) -> dict[str, tuple[int, ...]]:
    """Node -> ranks of a failed launch that may be running there.

    ``requested``: ranks whose start request was sent (the wrapper may have started them
    even if its answer never came); ``confirmed``: ranks known not to run (the wrapper said
    it could not start them, or their kill was acknowledged by the node).
    """
    sure = set(confirmed)
    maybe = set(requested) - sure
    out: dict[str, list[int]] = {}
    for p in placement:
        if p.rank in maybe:
            out.setdefault(p.node, []).append(p.rank)
    return {node: tuple(sorted(ranks)) for node, ranks in out.items()}


def drain_reason(job: str, attempt: int, ranks: Sequence[int], node: str, why: str) -> str:
    """The fence's drain reason: what may run there and when ugrod lifts it."""
    which = ", ".join(map(str, ranks))
    return (f"{FENCE_PREFIX}rank {which} of {job} (attempt {attempt}) may still run here: "
            f"{why}; undrained once ugrod has confirmed on {node} that no ended attempt "
            f"runs there")[:4000]


def fence_events(state: State, node: str,
                 killed: Iterable[tuple[RunDir, int]]) -> list[ev.Event]:
    """``rank_fenced`` for each rank found running there for no live attempt and killed
    (``killed``: run dir and how many of its processes were alive). Ranks of jobs the log
    does not know (another ugrod's, or removed) are left out: nothing to record them on."""
    out: list[ev.Event] = []
    for rd, pids in killed:
        if pids <= 0 or rd.job not in state.jobs or live(state, rd.job, rd.attempt):
            continue
        out.append(ev.RankFenced(job=rd.job, attempt=rd.attempt, rank=rd.rank, node=node,
                                 pids=pids))
    return out


def lift(state: State, node: str, still_alive: int) -> list[ev.Event]:
    """Undrain a fenced node once nothing of an ended attempt is left alive there."""
    n = state.nodes.get(node)
    if still_alive or n is None or not n.drained or not own_drain(n.drain_reason):
        return []
    return [ev.NodeUndrained(node=node)]
