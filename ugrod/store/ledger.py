"""The one writer: validates events against state, makes them durable, then publishes them.

A command goes ``apply()`` (may raise, nothing written) → group-committed append
→ the new state becomes visible and the caller is answered. Readers see only
committed state, so nobody is ever shown a fact that a crash could take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core.state import InvalidEvent, State, apply, from_snapshot, to_snapshot
from ugrod.store import log as evlog
from ugrod.store.snapshots import read_latest_snapshot, write_snapshot

logger = logging.getLogger("ugrod.store.ledger")

T = TypeVar("T")
Decide = Callable[[State], tuple[Sequence[ev.Event], T]]


class ReplayError(Exception):
    """The log holds an event this ugrod cannot apply: refuse to start."""


class Ledger:
    """Owns the event log and the state folded from it."""

    def __init__(self, log: evlog.EventLog, state: State, state_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self._log = log
        self._tip = state  # includes events being committed right now
        self._committed = state
        self._state_dir = state_dir
        self._clock = clock
        self._subscribers: set[asyncio.Queue[ev.Record | None]] = set()
        self._listeners: list[Callable[[list[ev.Record], State], None]] = []
        self.failed: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self.replay_s = 0.0
        self.replayed = 0
        self.snapshot_seq = state.seq

    @classmethod
    def open(cls, state_dir: Path, clock: Callable[[], float] = time.time,
             **log_options: Any) -> Ledger:
        """Lock the state dir, recover the log, load the newest snapshot and replay the tail."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Sealed segments are checked fully when replay reads them; the ones wholly
        # before the snapshot are checked by verify_history() in the background, so
        # start-up time does not grow with the length of the log.
        log_options.setdefault("verify_sealed", False)
        log = evlog.EventLog.open(state_dir, **log_options)
        # Replay allocates millions of long-lived, acyclic objects: the cyclic GC would
        # rescan them again and again. Off while loading; what survives is frozen.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            state = State()
            snap = read_latest_snapshot(state_dir)
            if snap is not None:
                seq, payload = snap
                try:
                    state = from_snapshot(payload)
                except ValueError as exc:
                    # A snapshot is a cache of the log: one this ugrod cannot read (an
                    # older state version after an upgrade) is passed over, not trusted.
                    if log.first_seq != 1:
                        raise ReplayError(f"snapshot at seq {seq}: {exc}; the log before seq "
                                          f"{log.first_seq} is archived, so it cannot be "
                                          "replayed instead") from exc
                    logger.warning("snapshot at seq %d: %s; replaying the whole log instead",
                                   seq, exc)
                    state = State()
                if state.seq and (state.seq != seq or seq > log.last_seq):
                    raise ReplayError(f"snapshot at seq {seq} is ahead of the log "
                                      f"(last seq {log.last_seq}): was the log replaced?")
            snap_seq = state.seq
            state, n = _replay(log.read(after_seq=state.seq), state)
            ledger = cls(log, state, state_dir, clock)
            ledger.replay_s = time.perf_counter() - t0
            ledger.replayed = n
            ledger.snapshot_seq = snap_seq
            return ledger
        except BaseException:
            log.close_sync()
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
            gc.freeze()

    @property
    def state(self) -> State:
        """Committed state: every fact in it is on disk."""
        return self._committed

    @property
    def log(self) -> evlog.EventLog:
        return self._log

    def stamp(self) -> float:
        """Now, at the log's microsecond precision, so live state equals replayed state."""
        return codec.stamp_ts(self._clock())

    def preview(self, actor: ev.Actor, *events: ev.Event) -> State:
        """The state ``record`` would commit, without recording anything (InvalidEvent if not)."""
        ts, tip = self.stamp(), self._tip
        for e in events:
            tip = apply(tip, ev.Record(seq=tip.seq + 1, ts=ts, actor=actor, event=e))
        return tip

    def preview_decided(self, actor: ev.Actor, decide: Decide[T]) -> tuple[State, T]:
        """What ``record_decided`` would commit, without recording anything."""
        events, answer = decide(self._tip)
        return self.preview(actor, *events), answer

    async def record_decided(self, actor: ev.Actor, decide: Decide[T]) -> tuple[State, T]:
        """Decide on the newest state inside the writer, then record: ``decide(tip)`` gives
        (events, answer) or raises (nothing recorded).

        For commands whose events depend on state that concurrent commands change
        (the next free job name, a batch over many jobs): deciding on the tip, with no
        await before the append is queued, means no other command slips in between.
        """
        if self.failed is not None:
            raise evlog.LogWriteFailed(f"event log failed earlier: {self.failed}")
        events, answer = decide(self._tip)
        return await self.record(actor, *events), answer

    async def record(self, actor: ev.Actor, *events: ev.Event) -> State:
        """Apply, append durably, publish; returns the committed state that includes them."""
        if self.failed is not None:
            raise evlog.LogWriteFailed(f"event log failed earlier: {self.failed}")
        if not events:
            return self._committed
        ts = self.stamp()
        tip = self._tip
        records = []
        for e in events:
            r = ev.Record(seq=tip.seq + 1, ts=ts, actor=actor, event=e)
            tip = apply(tip, r)  # InvalidEvent: nothing appended, tip unchanged
            records.append(r)
        try:
            lines = [codec.encode(r) for r in records]
        except ev.EventError as exc:
            raise InvalidEvent(str(exc)) from exc
        self._tip = tip
        # No await between taking the tip and queueing the lines: appends reach
        # the log in seq order, which is what lets the log batch them.
        try:
            await self._log.append(lines)
        except evlog.LogWriteFailed as exc:
            if self.failed is None:
                self.failed = exc
                if self.on_failure is not None:
                    self.on_failure(exc)
            raise
        if tip.seq > self._committed.seq:
            self._committed = tip
        self._publish(records, tip)
        return tip

    def _publish(self, records: list[ev.Record], state: State) -> None:
        for listener in self._listeners:
            try:
                listener(records, state)
            except Exception:
                logger.exception("event listener failed")
        for q in list(self._subscribers):
            for r in records:
                try:
                    q.put_nowait(r)
                except asyncio.QueueFull:
                    # A follower that cannot keep up is cut off, not allowed to grow memory.
                    self._subscribers.discard(q)
                    q.put_nowait(None) if not q.full() else None
                    break

    def on_commit(self, listener: Callable[[list[ev.Record], State], None]) -> None:
        """Call ``listener(records, state)`` after every commit (synchronously; keep it cheap)."""
        self._listeners.append(listener)

    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue[ev.Record | None]:
        q: asyncio.Queue[ev.Record | None] = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[ev.Record | None]) -> None:
        self._subscribers.discard(q)

    @property
    def n_subscribers(self) -> int:
        return len(self._subscribers)

    def end_streams(self) -> None:
        """Tell every follower the stream is over (ugrod is stopping): each gets None."""
        for q in list(self._subscribers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(None)
        self._subscribers.clear()

    def history(self, after_seq: int = 0) -> Iterator[bytes]:
        """Committed event lines from the log files (for `events`, `why`, `replay`)."""
        last = self._committed.seq
        for batch in self._log.read(after_seq=after_seq):
            for line in batch:
                if _seq_of(line) > last:
                    return
                yield line

    def snapshot(self) -> Path | None:
        """Write a snapshot of committed state (atomic); None when nothing changed since."""
        state = self._committed
        if state.seq == self.snapshot_seq:
            return None
        path = write_snapshot(self._state_dir, state.seq, to_snapshot(state))
        self.snapshot_seq = state.seq
        return path

    async def close(self) -> None:
        await self._log.close()
        self.end_streams()


def verify_history(state_dir: Path) -> int:
    """Re-check every batch of every segment (read-only); the number of events verified."""
    log = evlog.EventLog.open(state_dir, readonly=True, verify_sealed=True)
    try:
        return sum(len(batch) for batch in log.read(verify=True))
    finally:
        log.close_sync()


def _seq_of(line: bytes) -> int:
    # Every event line starts with {"seq":N, (the canonical encoder's field order).
    return int(line[7:line.index(b",", 7)])


def _kind_of(line: bytes) -> str:
    """The event type named in a line, for error messages (``?`` if none is readable)."""
    at = line.find(b'"type":"')
    end = line.find(b'"', at + 8) if at >= 0 else -1
    return line[at + 8:end].decode("ascii", "replace") if end > 0 else "?"


def _replay(batches: Iterator[list[bytes]], state: State) -> tuple[State, int]:
    decode, n = codec.decode, 0
    for batch in batches:
        for line in batch:
            try:
                record = decode(line)
                state = apply(state, record)
            except (ev.EventError, InvalidEvent) as exc:
                kind = _kind_of(line)
                raise ReplayError(f"event seq {_seq_of(line)} ({kind}): {exc}; this ugrod cannot "
                                  f"apply it, refusing to start rather than guess") from exc
            n += 1
    return state, n


def replay_until(state_dir: Path, until_seq: int | None = None,
                 until_ts: float | None = None) -> State:
    """State at a past moment, read straight from the log (daemon may be stopped)."""
    state = State()
    log = evlog.EventLog.open(state_dir, readonly=True)
    try:
        for batch in log.read():
            for line in batch:
                record = codec.decode(line)
                if until_seq is not None and record.seq > until_seq:
                    return state
                if until_ts is not None and record.ts > until_ts:
                    return state
                state = apply(state, record)
    finally:
        log.close_sync()
    return state
