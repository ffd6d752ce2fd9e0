"""The event log's upkeep, on the daemon's schedule: snapshots, and a daily audit of its files.

A snapshot is taken every 50k events or 10 minutes of changes (start-up then replays
only the tail), and the state dir's filesystem is measured with it; once a day every
batch of every segment is re-read and its checksum checked, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

from ugrod.loops.schedule import Schedule
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.store.ledger import Ledger, verify_history
from ugrod.store.log import LogError

logger = logging.getLogger("ugrod.loops.upkeep")

SNAPSHOT_CHECK_S = 60.0  # how often a snapshot may be due
SNAPSHOT_EVENTS = 50_000  # a snapshot after this many events...
SNAPSHOT_AGE_S = 600.0  # ...or after this long with any change
VERIFY_EVERY_S = 24 * 3600.0


class Upkeep:
    """Snapshots the ledger's state and audits the log's files."""

    def __init__(self, ledger: Ledger, state_dir: Path, stats: RuntimeStats) -> None:
        self._ledger = ledger
        self._state_dir = state_dir
        self._stats = stats
        self._last_snapshot = time.monotonic()

    def schedule(self, sched: Schedule) -> None:
        """Add both jobs: the first snapshot check at once, the first audit after a minute."""
        sched.every("snapshot", SNAPSHOT_CHECK_S, self.snapshot, first_in_s=0)
        sched.every("verify-log", VERIFY_EVERY_S, self.verify, first_in_s=60)

    async def snapshot(self) -> None:
        """Snapshot every 50k events or 10 minutes of changes."""
        state = self._ledger.state
        since = state.seq - self._ledger.snapshot_seq
        due = since >= SNAPSHOT_EVENTS or (
            since > 0 and time.monotonic() - self._last_snapshot > SNAPSHOT_AGE_S)
        if due:
            t0 = time.perf_counter()
            try:
                path = await asyncio.to_thread(self._ledger.snapshot)
            except OSError as exc:  # counted and alerted on (UgroSnapshotsFailing)
                self._stats.snapshot_failed()
                logger.error("snapshot failed: %s", exc)
                return
            self._last_snapshot = time.monotonic()
            if path is not None:
                self._stats.snapshot_written(time.perf_counter() - t0, path.stat().st_size)
        with contextlib.suppress(OSError):  # the state dir's filesystem (UgroStateDiskFilling)
            self._stats.state_dir_usage(*await asyncio.to_thread(shutil.disk_usage,
                                                                 self._state_dir))

    async def verify(self) -> None:
        """The whole log, every batch re-checked, off the event loop (an audit, daily)."""
        try:
            n = await asyncio.to_thread(verify_history, self._state_dir)
            logger.info("event log verified: %d events, every batch's checksum good", n)
        except LogError as exc:
            logger.critical("event log damaged (state in memory is intact; restore the "
                            "damaged segment from a backup): %s", exc)
