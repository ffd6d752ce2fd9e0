"""Which rank failed a gang, and how, in words. Pure: no I/O, no clock.

When one rank of a gang fails, the others follow (NCCL/gloo errors, the rendezvous store
gone, or ugrod stopping them), each with its own non-zero exit and often a traceback of
its own. The culprit is the rank that failed *first*:

1. a rank lost with its node (the node stopped answering while the gang failed: its
   processes' end cannot be seen, and a vanished peer is what makes the others fail);
2. else the non-zero exit that happened first, by the time the rank's exit was observed
   on its own node (the wrapper's ``exit_code`` file; nodes' clocks are assumed to agree
   within the time a failure takes to spread, as NTP keeps them on a LAN);
3. else the first non-zero exit ugrod saw; ties go to the lower rank.

The exit code and signal come from torchrun's own report ("Root Cause (first observed
failure)": ``exitcode: -9`` is SIGKILL) when the rank's log has one, since torchrun itself
exits 1 whatever happened to its worker.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_FIELD = re.compile(r"^\s*(time|host|rank|exitcode|error_file|traceback)\s*:\s*(.*)$")
_RANK = re.compile(r"^(\d+)(?:\s*\(local_rank:\s*(\d+)\))?")
_EXITCODE = re.compile(r"^(-?\d+)")


@dataclass(frozen=True, slots=True)
class RankEnd:
    """What is known of one rank (a node's torchrun agent, or its plain process)."""

    rank: int
    node: str
    exit_code: int | None = None  # None: no exit seen (lost, or still running)
    exited_at: float | None = None  # when the exit was observed on its node
    seen: int | None = None  # order in which ugrod learnt of the exit (0 first)
    lost: str | None = None  # why the rank's node cannot be asked: it is lost with it


@dataclass(frozen=True, slots=True)
class TorchrunFailure:
    """torchrun's report of its first failed worker."""

    rank: int | None  # global rank
    local_rank: int | None
    exitcode: int  # as torchrun prints it: negative for a signal
    host: str = ""

    @property
    def exit_code(self) -> int:
        """As a shell reports it: 128+N for signal N."""
        return 128 - self.exitcode if self.exitcode < 0 else self.exitcode

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"


def first_failure(ends: Iterable[RankEnd]) -> RankEnd | None:
    """The culprit by the module's rule; None when no rank failed or was lost."""
    ends = list(ends)
    lost = [e for e in ends if e.lost is not None and e.exit_code is None]
    if lost:
        return min(lost, key=lambda e: e.rank)
    failed = [e for e in ends if e.exit_code not in (None, 0)]
    if not failed:
        return None
    inf = float("inf")
    return min(failed, key=lambda e: (e.exited_at if e.exited_at is not None else inf,
                                      e.seen if e.seen is not None else inf, e.rank))


def torchrun_failure(lines: Sequence[str]) -> TorchrunFailure | None:
    """torchrun's "Root Cause (first observed failure)" in a rank log's lines, if any."""
    start = next((i for i in range(len(lines) - 1, -1, -1)
                  if "Root Cause (first observed failure)" in lines[i]), None)
    if start is None:
        return None
    fields: dict[str, str] = {}
    for line in lines[start + 1:start + 12]:
        m = _FIELD.match(line)
        if m is not None and m[1] not in fields:
            fields[m[1]] = m[2].strip()
        elif line.startswith("====="):
            break
    code = _EXITCODE.match(fields.get("exitcode", ""))
    if code is None:
        return None
    rank = _RANK.match(fields.get("rank", ""))
    return TorchrunFailure(
        rank=int(rank[1]) if rank else None,
        local_rank=int(rank[2]) if rank and rank[2] is not None else None,
        exitcode=int(code[1]), host=fields.get("host", ""))


def describe(rank: int, node: str, exit_code: int, report: TorchrunFailure | None,
             nproc: int = 1) -> tuple[int, str]:
    """(exit code, "rank 2 on gpu2 was killed by SIGKILL (torchrun: exitcode -9)").

    ``rank`` is the node rank; with several processes per node the global rank torchrun
    names is said too. The exit code is torchrun's worker's when it reported one.
    """
    who = f"rank {rank} on {node}"
    if report is not None:
        if report.rank is not None and (nproc > 1 or report.rank != rank):
            who = f"rank {report.rank} (node rank {rank}) on {node}"
        sig = report.signal_name
        what = (f"was killed by {sig}" if sig is not None
                else f"exited with code {report.exitcode}")
        return report.exit_code, f"{who} {what} (torchrun: exitcode {report.exitcode})"
    text = f"{who} exited with code {exit_code}"
    if exit_code >= 128:
        with contextlib.suppress(ValueError):
            text += f" ({signal.Signals(exit_code - 128).name})"
    return exit_code, text


def lost_words(rank: int, node: str, why: str) -> str:
    """"rank 2 on gpu2 lost: node unreachable (connection refused)"."""
    return f"rank {rank} on {node} lost: node unreachable ({why})" if why else \
        f"rank {rank} on {node} lost: node unreachable"
