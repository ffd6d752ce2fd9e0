"""The event log's one writer: group-committed durable appends and verified reads.

Layout of a state directory::

    STATE/lock                               flock'ed by the one ugrod; holds its pid
    STATE/events/events-000001.jsonl ...     segments; the highest number is the active one
    STATE/events/events-000003.jsonl.broken-20261122T134500.123456Z   a cut torn tail
    STATE/snapshots/snapshot-000000120000.bin

The segment format and its verification are in ``segments.py``, what happens on
open after a crash in ``recovery.py``, snapshots in ``snapshots.py``. Appends from
the event loop join one open group that a writer thread takes whole: one write and
one fdatasync per batch (group commit), each batch closed by a commit line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ugrod.store.recovery import Recovery, recover_tail, scan_segments, take_lock
from ugrod.store.segments import (
    HEADER,
    MAX_BATCH_BYTES,
    SEQ_PREFIX,
    CorruptLog,
    Defect,
    LogError,
    LogLocked,
    LogWriteFailed,
    Scanner,
    Segment,
    commit_line,
    fsync_dir,
    read_trusted,
    write_all,
)

# the errors EventLog raises, and the batch limit its appends obey
__all__ = ["MAX_BATCH_BYTES", "CorruptLog", "EventLog", "LogError", "LogLocked", "LogWriteFailed",
           "Recovery"]

_log = logging.getLogger(__name__)


class EventLog:
    """The one writer of STATE/events: group-committed durable appends and verified reads."""

    def __init__(self, state_dir: Path, lock_fd: int, *, max_segment_bytes: int,
                 fdatasync: Callable[[int], None], write: Callable[[int, memoryview], int],
                 on_batch: Callable[[int, int, float], None] | None, readonly: bool) -> None:
        self.state_dir = state_dir
        self.events_dir = state_dir / "events"
        self.recovery = Recovery(0, None, 0, 0)
        self._lock_fd = lock_fd
        self._max_segment_bytes = max_segment_bytes
        self._fdatasync, self._write, self._on_batch = fdatasync, write, on_batch
        self._readonly = readonly
        self._segments: tuple[Segment, ...] = ()
        # What read() may see: (segments, active segment's durable size, last seq),
        # replaced as one tuple so a reader never pairs one segment with another's size.
        self._view: tuple[tuple[Segment, ...], int, int] = ((), 0, 0)
        # Segments whose every byte open() verified or this process wrote: read()
        # need not check them again (the lock keeps other writers out).
        self._trusted: set[int] = set()
        self._fd = -1
        self._size = 0  # durable size of the active segment
        self._header_len = 0
        self._last_seq = 0  # durable
        self._next_seq = 1  # next seq an append must start with
        self._io_lock = threading.Lock()
        self._failed: LogWriteFailed | None = None
        self._closing = False
        # Group commit: appends join the open group; the writer thread takes it whole.
        # Guarded by _cv (shared with the writer thread).
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._chunks: list[bytes] = []
        self._futs: list[asyncio.Future[None]] = []
        self._n = 0
        self._nbytes = 0
        self._full: deque[tuple[list[bytes], list[asyncio.Future[None]], int]] = deque()
        self._idle = True  # the writer thread is waiting for work (or not started)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, state_dir: Path, *, max_segment_bytes: int = 64 << 20,
             fdatasync: Callable[[int], None] = os.fdatasync,
             write: Callable[[int, memoryview], int] = os.write,
             on_batch: Callable[[int, int, float], None] | None = None,
             verify_sealed: bool = True, readonly: bool = False) -> EventLog:
        """Lock the state dir, verify the log, cut a torn tail (readonly: no lock, no repair)."""
        state_dir = Path(state_dir)
        lock_fd = -1
        try:
            if not readonly:
                state_dir.mkdir(parents=True, exist_ok=True)
                lock_fd = take_lock(state_dir)
            log = cls(state_dir, lock_fd, max_segment_bytes=max_segment_bytes,
                      fdatasync=fdatasync, write=write, on_batch=on_batch, readonly=readonly)
            try:
                log._open(verify_sealed)
            except BaseException:
                log._release()
                raise
        except OSError as exc:
            raise LogError(f"events: cannot open the log in {state_dir}: {exc}") from exc
        return log

    @property
    def last_seq(self) -> int:
        """The seq of the last durable event (0 for an empty log)."""
        return self._last_seq

    @property
    def first_seq(self) -> int:
        """The first seq the segment files hold (1 unless old segments were archived)."""
        return self._segments[0].first_seq if self._segments else 1

    def _open(self, verify_sealed: bool) -> None:
        if not self._readonly:
            self.events_dir.mkdir(exist_ok=True)
        segments, trusted, scan = scan_segments(self.events_dir, verify_sealed=verify_sealed)
        if scan is None:
            if not self._readonly:
                self._start_segment(1, 1, replace=False)
                self.recovery = Recovery(0, None, 1, 0)
            return
        self._trusted |= trusted
        truncated, broken, repaired = recover_tail(scan, readonly=self._readonly)
        self._trusted.add(scan.number)
        assert scan.first_seq is not None
        segments.append(Segment(scan.number, scan.path, scan.first_seq))
        self._segments = tuple(segments)
        self._last_seq = self._next_seq = scan.last_seq
        self._next_seq += 1
        self._size, self._header_len = scan.end, scan.header_len
        if self._readonly:
            pass
        elif not repaired:
            self._fd = os.open(scan.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        elif scan.end > 0:
            # Never append after a repair in the same file: later appends go to a
            # fresh segment, so the repaired file stays sealed exactly as verified.
            self._start_segment(scan.number + 1, self._next_seq, replace=False)
        else:
            # The header itself was torn: the file holds nothing, write it afresh.
            self._segments = self._segments[:-1]
            self._start_segment(scan.number, self._next_seq, replace=True)
        self._view = (self._segments, self._size, self._last_seq)
        self.recovery = Recovery(truncated, broken, len(self._segments), self._last_seq)

    def _start_segment(self, number: int, first_seq: int, *, replace: bool) -> None:
        """Create segment ``number`` with its header, fsync it and the dir, make it active."""
        path = self.events_dir / f"events-{number:06d}.jsonl"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags | (os.O_TRUNC if replace else os.O_EXCL), 0o644)
        try:
            header = HEADER % (number, first_seq)
            write_all(self._write, fd, header)
            self._fdatasync(fd)
            fsync_dir(self.events_dir)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        self._size = self._header_len = len(header)
        self._segments = (*self._segments, Segment(number, path, first_seq))
        self._trusted.add(number)
        self._view = (self._segments, self._size, self._last_seq)

    # ---- reading ----

    def read(self, after_seq: int = 0, *, verify: bool = False) -> Iterator[list[bytes]]:
        """Yield verified event lines (no newline) with seq > after_seq, in order, by chunks.

        Each list holds one or more whole batches (the first may start inside a
        batch when ``after_seq`` does). The log is read as it stood at the call.
        Bytes that open() verified or this process wrote are not checked again
        unless ``verify`` (an audit); all others are checked batch by batch.
        """
        segments, size, last = self._view
        if not segments or after_seq >= last:
            return
        if after_seq < segments[0].first_seq - 1:
            raise LogError(f"events up to seq {segments[0].first_seq - 1} are not in "
                           f"{self.events_dir} (archived?); cannot read from seq {after_seq + 1}")
        for i, seg in enumerate(segments):
            end = segments[i + 1].first_seq - 1 if i + 1 < len(segments) else last
            if end <= after_seq:
                continue
            limit = None if i + 1 < len(segments) else size
            if not verify and seg.number in self._trusted:
                yield from read_trusted(seg.path, limit, after_seq if after_seq >= seg.first_seq
                                         else None)
                continue
            scan = Scanner(seg.path, seg.number, seg.first_seq, limit)
            try:
                yield from scan.batches(after_seq)
            except Defect as d:
                raise d.corrupt(seg.path) from None

    # ---- appending ----

    def _check(self, lines: Sequence[bytes]) -> bytes:
        """Validate seqs and newlines; return the lines joined, each with its newline."""
        if self._failed is not None:
            raise LogWriteFailed(str(self._failed))
        if self._closing or self._readonly:
            raise LogError(f"events: {self.events_dir} is "
                           f"{'read-only' if self._readonly else 'closed'}")
        if not lines:
            raise LogError("events: empty append")
        s = self._next_seq
        for line in lines:
            if not line.startswith(SEQ_PREFIX % s) or b"\n" in line:
                raise LogError(f"events: append of a line that is not seq {s} "
                               f"(or holds a newline): {bytes(line[:40])!r}")
            s += 1
        chunk = lines[0] + b"\n" if len(lines) == 1 else b"\n".join(lines) + b"\n"
        if len(chunk) > MAX_BATCH_BYTES:
            raise LogError(f"events: one append of {len(chunk)} bytes exceeds the "
                           f"{MAX_BATCH_BYTES}-byte batch limit")
        self._next_seq = s
        return chunk

    async def append(self, lines: Sequence[bytes]) -> None:
        """Append one command's events atomically; return once they are on disk.

        A cancelled append may still become durable (its bytes were handed to the writer).
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._start_writer(loop)
        chunk = self._check(lines)
        fut = loop.create_future()
        with self._lock:
            if self._failed is not None:
                raise LogWriteFailed(str(self._failed))
            if self._nbytes + len(chunk) > MAX_BATCH_BYTES:
                self._full.append((self._chunks, self._futs, self._n))
                self._chunks, self._futs, self._n, self._nbytes = [], [], 0, 0
            self._chunks.append(chunk)
            self._futs.append(fut)
            self._n += len(lines)
            self._nbytes += len(chunk)
            if self._idle:
                self._cv.notify()
        await fut

    def append_sync(self, lines: Sequence[bytes]) -> None:
        """Append one batch and fdatasync it, without an event loop."""
        with self._cv:
            if self._futs or self._full or not self._idle:
                raise LogError("events: append_sync while async appends are pending")
            chunk = self._check(lines)
            try:
                nbytes, fsync_s = self._write_batch([chunk], self._next_seq - len(lines),
                                                    len(lines))
            except OSError as exc:
                raise self._fail(exc) from exc
        if self._on_batch is not None:
            self._on_batch(len(lines), nbytes, fsync_s)

    def _start_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise LogError("events: EventLog used from a second event loop")
        self._loop = loop
        self._thread = threading.Thread(target=self._write_loop, args=(loop,),
                                        name="ugro-log-writer", daemon=True)
        self._thread.start()

    def _write_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The writer thread: take everything pending as one batch, write, fdatasync, repeat."""
        # The thread takes the next batch itself as soon as an fdatasync returns, so
        # batches follow each other without a round trip through the event loop, and
        # producers woken by one batch run while the next one is being flushed.
        cv = self._cv
        while True:
            with cv:
                while not self._futs and not self._full:
                    if self._closing:
                        return
                    self._idle = True
                    cv.wait()
                    self._idle = False
                if self._full:
                    chunks, futs, n = self._full.popleft()
                else:
                    chunks, futs, n = self._chunks, self._futs, self._n
                    self._chunks, self._futs, self._n, self._nbytes = [], [], 0, 0
            try:
                nbytes, fsync_s = self._write_batch(chunks, self._last_seq + 1, n)
            except BaseException as exc:
                with cv:
                    err = self._fail(exc)
                    futs += self._futs
                    futs += [f for g in self._full for f in g[1]]
                    self._chunks, self._futs, self._n, self._nbytes = [], [], 0, 0
                    self._full.clear()
                    self._idle = True
                _call_soon(loop, _fail_all, futs, err)
                return
            _call_soon(loop, self._batch_done, futs, n, nbytes, fsync_s)

    def _batch_done(self, futs: list[asyncio.Future[None]], n: int, nbytes: int,
                    fsync_s: float) -> None:
        for f in futs:
            if not f.done():
                f.set_result(None)
        if self._on_batch is not None:
            self._on_batch(n, nbytes, fsync_s)

    def _write_batch(self, chunks: list[bytes], first: int, n: int) -> tuple[int, float]:
        """Write one batch and its commit line, fdatasync; on error cut the file back.

        Returns the bytes written and the seconds fdatasync took.
        """
        events = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        data = events + commit_line(first, n, zlib.crc32(events))
        with self._io_lock:
            if (self._size > self._header_len
                    and self._size + len(data) > self._max_segment_bytes):
                self._start_segment(self._segments[-1].number + 1, first, replace=False)
            start = self._size
            try:
                write_all(self._write, self._fd, data)
                t0 = time.perf_counter()
                self._fdatasync(self._fd)
                fsync_s = time.perf_counter() - t0
            except OSError:
                # Cut back to the batch start so the file ends at a commit line; if even
                # that fails, start-up recovery cuts the torn tail.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                    self._fdatasync(self._fd)
                raise
            self._size = start + len(data)
            self._last_seq = first + n - 1
            self._view = (self._segments, self._size, self._last_seq)
        return len(data), fsync_s

    def _fail(self, exc: BaseException) -> LogWriteFailed:
        if self._failed is None:
            self._failed = LogWriteFailed(
                f"events: writing {self._segments[-1].path if self._segments else self.events_dir}"
                f" failed ({exc}); nothing after seq {self._last_seq} is acknowledged and the log "
                "refuses further appends: ugrod must exit (restart recovers from disk)")
            self._failed.__cause__ = exc
            _log.critical("%s", self._failed)
        return self._failed

    # ---- closing ----

    async def close(self) -> None:
        """Flush pending appends, then release the files and the lock."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            await asyncio.sleep(0)  # the last batches' results, queued before the join's
        self._release()

    def close_sync(self) -> None:
        """Release the files and the lock (after append_sync only; no event loop)."""
        with self._cv:
            if self._futs or self._full:
                raise LogError("events: close_sync with async appends pending; use close()")
            while not self._idle:  # the writer is finishing a batch already answered
                self._cv.wait(0.01)
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        self._release()

    def _release(self) -> None:
        self._closing = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _fail_all(futs: list[asyncio.Future[None]], err: LogWriteFailed) -> None:
    for f in futs:
        if not f.done():
            f.set_exception(LogWriteFailed(str(err)))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(fn, *args)
