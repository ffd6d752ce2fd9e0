"""``ugroctl replay``: state at a past moment, read straight from the event log.

Works with ugrod stopped (nothing is written, no lock is taken). Imports the
daemon's log, events and state modules, so only this command pays for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ugroctl import render


class ReplayError(Exception):
    """Why the log could not be replayed (for people)."""


def state_at(until: str, state_dir: str | None,
             parse_time: Callable[[str, float], float]) -> dict[str, Any]:
    """Replay events up to a seq (all digits) or a time; the state as the API shows it."""
    import time
    from pathlib import Path

    from ugrod import paths

    text = until.strip()
    until_seq: int | None = None
    until_ts: float | None = None
    if text.isdigit():
        until_seq = int(text)
    else:
        try:
            until_ts = parse_time(text, time.time())
        except ValueError as exc:  # click.BadParameter is a ValueError too
            raise ReplayError(str(getattr(exc, "message", exc))) from None
    directory = Path(state_dir) if state_dir else paths.default_state_dir()
    if not directory.is_dir():
        raise ReplayError(f"no state directory at {directory} (pass --state-dir DIR, the "
                          f"directory ugrod was started with)")
    try:
        from ugrod import render_json as rj
        from ugrod.ledger import replay_until
    except ImportError as exc:
        raise ReplayError(f"this install cannot read event logs: {exc}") from None
    try:
        state = replay_until(directory, until_seq=until_seq, until_ts=until_ts)
    except OSError as exc:
        raise ReplayError(f"cannot read the event log in {directory}: {exc}") from None
    except Exception as exc:  # the log's own errors (corruption, unknown events) name the line
        raise ReplayError(f"cannot replay the event log in {directory}: {exc}") from None
    jobs = sorted(state.jobs.values(), key=lambda j: j.submit_seq)
    nodes = sorted(state.nodes.values(), key=lambda n: n.name)
    return {
        "state_dir": str(directory),
        "until": {"seq": until_seq, "time": rj.iso(until_ts)},
        "seq": state.seq,
        "jobs": [rj.job(j) for j in jobs],
        "nodes": [rj.node(n, state.jobs_on(n.name), None) for n in nodes],
    }


def describe(doc: dict[str, Any], now: float) -> str:
    """The replayed state for people: which event it stops at, then jobs and nodes."""
    head = f"state after event {doc['seq']} (replayed from {render.clean(doc['state_dir'])})"
    return "\n\n".join([head, render.jobs_table(doc["jobs"], now),
                        render.nodes_table(doc["nodes"])])
