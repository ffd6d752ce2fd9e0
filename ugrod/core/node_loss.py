"""When a node that stops answering costs a job its attempt (pure; the watchdog is the shell).

A node that does not answer may be dead, or only its management link may be cut (the
ranks still reach each other and train on). Which of the two it is shows in the job's
progress, which reaches ugrod from more than one path: rank 0's metrics and progress lines
through rank 0's node, and a heartbeat of the newest step from every other node's ranks
(``exporters/ugro_metrics.report`` on a rank other than 0) through that node. So:

* while another node of the job that still answers shows the step advancing (within the
  job's silence limit), the job trains on: a cut link alone is not "no progress", even
  when it is rank 0's node that is cut;
* the job is stopped when progress has stopped on the nodes that still answer (or there
  are none, or they report no steps) for longer than the silence limit, counted from the
  last advance seen on any path (or, with no step known, from when the node went silent);
* or when the node has been out of reach for longer than the job's tolerance
  (``unreachable_tolerance_s``, else the config's ``health.unreachable_tolerance_s``):
  ugrod neither sees nor controls what runs there, and will not go on blind for ever.
"""

from __future__ import annotations

import msgspec


class Silence(msgspec.Struct, frozen=True, kw_only=True):
    """What is known of one node out of reach and of the job's progress, at one moment."""

    node: str
    ranks: str  # the job's ranks there, as words ("1" or "0, 1")
    failing: str  # why the node counts as out of reach (its breaker, in words)
    gone_s: float  # since the node last answered
    tolerance_s: float
    silence_limit_s: float
    # Since the job's step last advanced on any path; None: no step is known.
    silent_s: float | None
    last_step: int | None = None
    # Since the node stopped answering (the silence of a job that reports no steps).
    down_s: float = 0.0
    # Since the newest step advance reported through another node that still answers;
    # None: no such node reports steps.
    elsewhere_s: float | None = None


def judge(s: Silence) -> str | None:
    """The reason to stop the job for the lost node, or None to let it run on."""
    lost = (f"rank {s.ranks} on {s.node} lost: node unreachable (node {s.node} declared "
            f"dead: {s.failing}")
    if s.gone_s > s.tolerance_s:
        return (f"{lost}; it has not answered for {s.gone_s:.0f} s, longer than the job's "
                f"tolerance of {s.tolerance_s:.0f} s for an unreachable node)")
    if s.elsewhere_s is not None and s.elsewhere_s <= s.silence_limit_s:
        return None  # the nodes that answer show progress: only the link is cut
    if s.silent_s is not None:
        silent = s.silent_s
        quiet = (f"the job's step counter has not advanced for {silent:.0f} s on any path "
                 f"(last step {s.last_step}; limit {s.silence_limit_s:.0f} s)")
    else:
        silent = s.down_s
        quiet = (f"the job has reported no step since the node went silent {silent:.0f} s "
                 f"ago (limit {s.silence_limit_s:.0f} s)")
    if silent <= s.silence_limit_s:
        return None
    return f"{lost}, and {quiet})"
