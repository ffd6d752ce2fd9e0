"""A user's caps on what runs at once: the one definition, that config builds and the planner reads.

``scheduler.user_limits`` in cluster.yaml maps a user, or ``"*"`` for everyone without an
entry of their own, to a UserLimits; a cap of None is no cap. The planner holds jobs back
at the caps (counting starting and running jobs); the API refuses at submission a job that
alone needs more GPUs than its user may ever hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class UserLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_gpus: int | None = None  # None: unlimited
    max_jobs: int | None = None


NO_LIMITS = UserLimits()


def limits_for(user_limits: Mapping[str, UserLimits], user: str) -> UserLimits:
    """The user's own limits, else those of ``"*"``, else none."""
    return user_limits.get(user) or user_limits.get("*") or NO_LIMITS
