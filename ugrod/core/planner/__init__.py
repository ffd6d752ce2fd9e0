"""Pure placement: which waiting jobs start now, where, and why every other one waits.

``plan(state, now)`` reads the state and returns decisions; it does no I/O,
reads no clock, keeps nothing between calls and never mutates its input, so
the same state and ``now`` always give the same plan. ``check_fits`` answers
at submit time whether a job could ever run on the cluster as configured.

The rules, and why each exists:

- **Order** is priority (high first), then submission: users asked for true
  FIFO with priority. Held jobs, jobs in retry backoff, jobs whose ``after``
  dependencies have not succeeded and jobs over a user or sweep limit are
  passed over without blocking anyone behind them.
- **Gang**: a job takes ``spec.nodes`` distinct nodes at once or none, one
  rank per node; half a gang only holds GPUs while it waits for the rest.
- **Smallest GPUs that fit**: on each node the job takes the smallest free
  GPUs with enough VRAM, and nodes are ranked by the VRAM they would give up,
  so the 12 GB card stays free for the job that needs it. Ties go to nodes
  the job has not failed on, then healthy before degraded, then by name.
- **Never over-commit**: GPUs held by starting/running/stopping jobs and GPUs
  placed earlier in the same round are taken.
- **Conservative backfill**: a job that cannot start now gets a reservation
  (up to ``MAX_RESERVATIONS`` a round): the earliest time enough GPUs free
  up, from running jobs' expected ends, and which GPUs it will take then.
  When that time is unknown the GPUs it waits for are held back
  indefinitely. A later job may start now only on GPUs no reservation holds,
  or on reserved GPUs if it is known to end before the reservation starts, so
  backfill can never delay a job ahead of it.
- **Speed**: the free GPUs of every node are computed once a round; each
  distinct job shape keeps its candidate nodes sorted by the VRAM they would
  give up and drops nodes as they fill; a shape that did not fit is not tried
  again for jobs that would run as long or longer; waiting reasons are
  cached per shape.

The modules, each using only those after it: ``round`` (the decisions: fit now,
place, reserve), ``reasons`` (why a job waits, in words), ``view`` (the cluster as
one round sees it: free, held and reserved GPUs, counts against limits), ``shapes``
(what a job needs, which nodes could ever give it, run-time estimates), ``words``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from ugrod.core.limits import UserLimits
from ugrod.core.planner.round import MAX_RESERVATIONS, Plan, Round
from ugrod.core.planner.shapes import (
    RunTimes,
    Shape,
    check_fits,
    gpus_unknown,
    spec_shape,
    typical_runtimes,
)
from ugrod.core.planner.view import Reservation
from ugrod.core.state import State

__all__ = ["MAX_RESERVATIONS", "Plan", "Reservation", "RunTimes", "Shape", "check_fits",
           "gpus_unknown", "plan", "spec_shape", "typical_runtimes"]

_NO_LIMITS: Mapping[str, UserLimits] = MappingProxyType({})


def plan(
    state: State,
    now: float,
    *,
    backfill: bool = True,
    user_limits: Mapping[str, UserLimits] = _NO_LIMITS,
    port_for: Callable[[str, int], int] | None = None,
    runtimes: RunTimes | None = None,
) -> Plan:
    """Decide which waiting jobs start now and where; say why each other one waits.

    ``user_limits`` maps a user (or ``"*"``, everyone else) to their caps.
    ``port_for(rank0_node, attempt)``, when given, picks the rendezvous port;
    otherwise it is left 0 for the daemon to reserve. ``runtimes`` is
    ``typical_runtimes(state)``, computed here when needed and not given.
    """
    return Round(state, now, backfill, user_limits, port_for, runtimes).run()
