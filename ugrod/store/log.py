"""The event-log files: segments, group commit, start-up recovery, snapshots and the lock.

Layout of a state directory::

    STATE/lock                               flock'ed by the one ugrod; holds its pid
    STATE/events/events-000001.jsonl ...     segments; the highest number is the active one
    STATE/events/events-000003.jsonl.broken-20261122T134500.123456Z   a cut torn tail
    STATE/snapshots/snapshot-000000120000.bin

A segment is plain JSONL (``cat STATE/events/*.jsonl | jq`` reads the whole log
in order: the header and commit lines are JSON objects too)::

    {"log":"ugro-events","format":1,"segment":3,"first_seq":20001}
    {"seq":20001,...}
    {"seq":20002,...}
    {"commit":20002,"first":20001,"n":2,"bcrc":"1a2b3c4d","crc":"9f00e1c2"}

Event lines are opaque bytes here apart from their ``{"seq":N,`` prefix. Each
fsynced batch is closed by one commit line: ``bcrc`` is the CRC-32 of the
batch's event lines (each with its newline), ``crc`` the CRC-32 of the commit
line up to and including ``"bcrc":"xxxxxxxx",``. Only lines closed by a valid
commit line count as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

_log = logging.getLogger(__name__)

# One batch (one write + one commit line) never holds more event bytes than this;
# a single append larger than it is refused. Recovery uses it to tell a torn
# tail (at most one batch) from lost acknowledged data.
MAX_BATCH_BYTES = 8 << 20
_MAX_TAIL_BYTES = MAX_BATCH_BYTES + 4096
_CHUNK_BYTES = 2 << 20

_SEGMENT_RE = re.compile(r"events-(\d{6,})\.jsonl")
_SNAPSHOT_RE = re.compile(r"snapshot-(\d{12,})\.bin")
_HEADER = b'{"log":"ugro-events","format":1,"segment":%d,"first_seq":%d}\n'
_HEADER_RE = re.compile(rb'\{"log":"ugro-events","format":1,"segment":(\d+),"first_seq":(\d+)\}')
_COMMIT_HEAD = b'{"commit":%d,"first":%d,"n":%d,"bcrc":"%08x",'
_COMMIT_CRC = b'"crc":"%08x"}'
_COMMIT_RE = re.compile(
    rb'(\{"commit":(\d+),"first":(\d+),"n":(\d+),"bcrc":"([0-9a-f]{8})",)"crc":"([0-9a-f]{8})"\}'
)
_SEQ_PREFIX = b'{"seq":%d,'
_SNAP_HEADER = b'{"snapshot":1,"seq":%d,"length":%d,"crc":"%08x"}\n'
_SNAP_HEADER_RE = re.compile(rb'\{"snapshot":1,"seq":(\d+),"length":(\d+),"crc":"([0-9a-f]{8})"\}')


class LogError(Exception):
    """Base of every event-log error."""


class CorruptLog(LogError):
    """Durable log data that does not verify: ugrod must not start on it."""

    def __init__(self, path: Path, line: int, offset: int, seq: int | None, reason: str) -> None:
        self.path, self.line, self.offset, self.seq, self.reason = path, line, offset, seq, reason
        where = f"byte {offset}" if seq is None else f"byte {offset}, seq {seq}"
        super().__init__(f"events: {path} line {line} ({where}): {reason}")


class LogLocked(LogError):
    """Another ugrod holds the state directory."""


class LogWriteFailed(LogError):
    """A write or fsync failed: nothing more is acknowledged; the daemon must exit."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What open() found: bytes cut from a torn tail (kept in ``broken_file``), segment count."""

    truncated_bytes: int
    broken_file: str | None
    segments: int
    last_seq: int


class _Segment(NamedTuple):
    number: int
    path: Path
    first_seq: int


class _Defect(Exception):
    """Where a segment stops verifying, and where the batch holding the defect starts."""

    def __init__(self, offset: int, line: int, seq: int | None, reason: str,
                 batch_offset: int, batch_line: int, expect: int | None,
                 fatal: bool = False) -> None:
        super().__init__(reason)
        self.offset, self.line, self.seq, self.reason = offset, line, seq, reason
        self.batch_offset, self.batch_line, self.expect = batch_offset, batch_line, expect
        self.fatal = fatal  # cannot be a torn write (a whole, well-formed but wrong line)

    def corrupt(self, path: Path, more: str = "") -> CorruptLog:
        return CorruptLog(path, self.line, self.offset, self.seq, self.reason + more)


def commit_line(first: int, n: int, bcrc: int) -> bytes:
    """The commit line (with newline) closing a batch of ``n`` events from seq ``first``."""
    head = _COMMIT_HEAD % (first + n - 1, first, n, bcrc)
    return head + _COMMIT_CRC % zlib.crc32(head) + b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(write: Callable[[int, memoryview], int], fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        n = write(fd, view[done:])
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write: no progress")
        done += n


# ---- verification ---------------------------------------------------------


class _Scanner:
    """Verifies one segment batch by batch and yields its event lines."""

    def __init__(self, path: Path, number: int, first_seq: int | None, limit: int | None) -> None:
        self.path, self.number, self.first_seq, self.limit = path, number, first_seq, limit
        self.last_seq = -1 if first_seq is None else first_seq - 1
        self.end = 0  # file offset just past the last verified commit line (or the header)
        self.header_len = 0

    def batches(self, after_seq: int | None = None) -> Iterator[list[bytes]]:
        """Verify every batch; yield event lines (with seq > after_seq) per chunk read."""
        with open(self.path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size if self.limit is None else self.limit
            buf = f.read(min(size, max(_CHUNK_BYTES, 4096)))  # the header fits in the first read
            remaining = size - len(buf)
            pos = self._header(buf, remaining == 0)
            base, lines, last = 0, 1, self.last_seq  # base: file offset of buf[0]; lines before pos
            find, rfind, count, startswith = buf.find, buf.rfind, buf.count, buf.startswith
            crc32 = zlib.crc32
            mv = memoryview(buf)
            out: list[bytes] = []
            want = after_seq is not None
            after = after_seq or 0
            while True:
                while True:
                    # Fast path: regenerate the commit line this batch must end with
                    # and compare bytes; any difference goes to _diagnose for the why.
                    nl = find(b"\n", pos)
                    if nl < 0:
                        break
                    if startswith(b'{"commit":', nl + 1):  # a one-event batch: the usual
                        c, n = nl + 1, 1
                    else:
                        c = find(b'\n{"commit":', nl) + 1
                        if c == 0:
                            break
                        n = count(b"\n", pos, c)
                    e = find(b"\n", c)
                    if e < 0:
                        break
                    first = last + 1
                    head = _COMMIT_HEAD % (last + n, first, n, crc32(mv[pos:c]))
                    if (n == 0 or e - c != len(head) + 17 or not startswith(head, c)
                            or not startswith(_COMMIT_CRC % crc32(head), c + len(head))):
                        raise self._diagnose(buf, base, pos, lines, last, e + 1)
                    # The CRC proves the bytes are those the writer wrote, and the writer
                    # checked every line's seq; the end lines' seqs catch a foreign batch.
                    if not startswith(_SEQ_PREFIX % first, pos) or (
                            n > 1 and not startswith(_SEQ_PREFIX % (last + n),
                                                     rfind(b"\n", pos, c - 1) + 1)):
                        raise self._diagnose(buf, base, pos, lines, last, e + 1)
                    if not want or last + n <= after:
                        pass
                    elif n == 1:
                        out.append(buf[pos:c - 1])
                    elif first > after:
                        out.extend(buf[pos:c - 1].split(b"\n"))
                    else:
                        out.extend(buf[pos:c - 1].split(b"\n")[after - first + 1:])
                    last += n
                    lines += n + 1
                    pos = e + 1
                self.last_seq, self.end = last, base + pos
                if out:
                    yield out
                    out = []
                if remaining == 0:
                    if pos != len(buf):
                        raise self._diagnose(buf, base, pos, lines, last, len(buf))
                    return
                if len(buf) - pos > _MAX_TAIL_BYTES:
                    raise self._diagnose(buf, base, pos, lines, last, len(buf), eof=False)
                more = f.read(min(remaining, _CHUNK_BYTES))
                if not more:
                    raise self._diagnose(buf, base, pos, lines, last, len(buf))
                remaining -= len(more)
                buf = buf[pos - 1:] + more
                base += pos - 1
                pos = 1
                find, rfind, count, startswith = buf.find, buf.rfind, buf.count, buf.startswith
                mv = memoryview(buf)

    def _header(self, buf: bytes, eof: bool) -> int:
        e = buf.find(b"\n")
        m = _HEADER_RE.fullmatch(buf, 0, e) if e >= 0 else None
        if m is None:
            why = "incomplete header line" if e < 0 and eof else "not a segment header"
            raise _Defect(0, 1, None, why, 0, 1, None)
        number, first = int(m[1]), int(m[2])
        why = ""
        if buf[:e + 1] != _HEADER % (number, first):
            why = "non-canonical header"
        elif number != self.number:
            why = f"header of segment {number} in the file of segment {self.number}"
        elif self.first_seq is not None and first != self.first_seq:
            why = f"segment starts at seq {first}, expected {self.first_seq}"
        elif first < 1:
            why = "segment starts at seq 0"
        if why:
            raise _Defect(0, 1, None, why, 0, 1, None, fatal=True)
        self.first_seq, self.last_seq, self.end, self.header_len = first, first - 1, e + 1, e + 1
        return e + 1

    def _diagnose(self, buf: bytes, base: int, pos: int, lines: int, last: int, stop: int,
                  eof: bool = True) -> _Defect:
        """Walk the batch at ``pos`` line by line and name its first defect."""
        start, bline, expect, k = pos, lines + 1, last + 1, 0

        def defect(at: int, line: int, seq: int | None, reason: str) -> _Defect:
            return _Defect(base + at, line, seq, reason, base + start, bline, expect)

        while pos < stop:
            line = lines + 1
            e = buf.find(b"\n", pos, stop)
            if e < 0:
                why = "incomplete line at end of file" if eof else "line longer than a batch"
                return defect(pos, line, None, why)
            if buf.startswith(b'{"commit":', pos):
                m = _COMMIT_RE.fullmatch(buf, pos, e)
                if m is None:
                    return defect(pos, line, None, "malformed commit line")
                cseq, cfirst, cn = int(m[2]), int(m[3]), int(m[4])
                if _COMMIT_CRC % zlib.crc32(m[1]) != buf[m.end(1):e]:
                    return defect(pos, line, cseq, "commit line checksum mismatch")
                if _COMMIT_HEAD % (cseq, cfirst, cn, int(m[5], 16)) != m[1]:
                    return defect(pos, line, cseq, "non-canonical commit line")
                if k == 0:
                    return defect(pos, line, cseq, "commit line closes an empty batch")
                if (cfirst, cn, cseq) != (expect, k, expect + k - 1):
                    return defect(pos, line, cseq, f"commit line says seq {cfirst}-{cseq} "
                                  f"(n={cn}) but the batch holds seq {expect}-{expect + k - 1}")
                if int(m[5], 16) != zlib.crc32(memoryview(buf)[start:pos]):
                    return defect(start, bline, expect, f"batch seq {expect}-{cseq} (lines "
                                  f"{bline}-{line - 1}) does not match its checksum")
                return defect(start, bline, expect, "batch does not verify")
            want = expect + k
            if not buf.startswith(b'{"seq":', pos):
                return defect(pos, line, None, f"not an event line (expected seq {want})")
            comma = buf.find(b",", pos + 7, e)
            digits = buf[pos + 7:comma] if comma >= 0 else b""
            if not digits.isdigit() or b"%d" % int(digits) != digits:
                return defect(pos, line, None, f"bad seq prefix (expected seq {want})")
            seq = int(digits)
            if seq != want:
                what = "duplicate or out of order" if seq < want else "missing or out of order"
                return defect(pos, line, seq, f"seq {seq} where {want} was expected ({what})")
            k += 1
            lines += 1
            pos = e + 1
        if eof:
            return defect(pos, lines + 1, None, f"end of file inside the batch from seq {expect}"
                          " (no commit line)")
        return defect(start, bline, expect, f"no commit line within {_MAX_TAIL_BYTES} bytes")


# ---- the log --------------------------------------------------------------


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
        self._segments: tuple[_Segment, ...] = ()
        # What read() may see: (segments, active segment's durable size, last seq),
        # replaced as one tuple so a reader never pairs one segment with another's size.
        self._view: tuple[tuple[_Segment, ...], int, int] = ((), 0, 0)
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
                lock_fd = _take_lock(state_dir)
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
        found = sorted((int(m[1]), p) for p in (self.events_dir.iterdir()
                                                if self.events_dir.is_dir() else ())
                       if (m := _SEGMENT_RE.fullmatch(p.name)))
        if not found:
            if not self._readonly:
                self._start_segment(1, 1, replace=False)
                self.recovery = Recovery(0, None, 1, 0)
            return
        segments: list[_Segment] = []
        first: int | None = 1 if found[0][0] == 1 else None
        for i, (number, path) in enumerate(found):
            if i and number != found[i - 1][0] + 1:
                raise CorruptLog(path, 1, 0, None, f"segment {found[i - 1][0] + 1} is missing")
            scan = _Scanner(path, number, first, None)
            if i == len(found) - 1:
                break
            _verify_sealed(scan, full=verify_sealed)
            if verify_sealed:
                self._trusted.add(number)
            assert scan.first_seq is not None
            segments.append(_Segment(number, path, scan.first_seq))
            first = scan.last_seq + 1
        truncated, broken, repaired = self._recover(scan)
        self._trusted.add(scan.number)
        assert scan.first_seq is not None
        segments.append(_Segment(scan.number, scan.path, scan.first_seq))
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

    def _recover(self, scan: _Scanner) -> tuple[int, str | None, bool]:
        """Verify the active segment; cut a torn tail, refuse anything worse."""
        path = scan.path
        try:
            for _ in scan.batches():
                pass
            return 0, None, False
        except _Defect as d:
            defect = d
        if defect.fatal:
            raise defect.corrupt(path)
        if defect.batch_offset == 0 and scan.first_seq is None:
            raise defect.corrupt(path, "; cannot tell which seq this segment starts at")
        with open(path, "rb") as f:
            f.seek(defect.batch_offset)
            tail = f.read()
        # Rule 1: a torn write only ever holds the one batch being written. A valid
        # commit line of any other batch after the defect, or bytes after the
        # defective batch's own commit line, prove the defect lies in data that
        # was acknowledged before: refuse to start.
        header = defect.batch_offset == 0
        c = 0 if tail.startswith(b'{"commit":') else tail.find(b'\n{"commit":') + 1
        while c >= 0 and (e := tail.find(b"\n", c)) >= 0:
            m = _COMMIT_RE.fullmatch(tail, c, e)
            if m and _COMMIT_CRC % zlib.crc32(m[1]) == tail[m.end(1):e]:
                line = defect.batch_line + tail.count(b"\n", 0, c)
                if header or int(m[3]) != defect.expect:
                    raise defect.corrupt(path, f"; line {line} is a valid commit of seq "
                                         f"{int(m[3])}-{int(m[2])} after it, so this is not a "
                                         "torn write")
                if e + 1 < len(tail):
                    raise defect.corrupt(path, f"; more data follows the batch's valid commit "
                                         f"line {line}, so the batch was complete before")
            c = tail.find(b'\n{"commit":', e)
            c = c + 1 if c >= 0 else -1
        # Rule 2: a tail larger than one batch cannot be a single torn write.
        if len(tail) > _MAX_TAIL_BYTES:
            raise defect.corrupt(path, f"; the {len(tail)} bytes after the last valid commit are "
                                 "more than one batch can be")
        # Rule 3: a torn tail: keep its bytes, cut it, and (in _open) start afresh.
        scan.end = defect.batch_offset
        scan.last_seq = (scan.first_seq or 1) - 1 if header else (defect.expect or 1) - 1
        if self._readonly:
            return len(tail), None, True
        ns = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 1_000_000_000))
        broken = path.with_name(f"{path.name}.broken-{stamp}.{ns // 1000 % 1_000_000:06d}Z")
        if tail:
            fd = os.open(broken, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _write_all(os.write, fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, scan.end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if tail:
            _log.warning("events: cut a torn tail of %d bytes from %s at byte %d (%s); kept in %s",
                         len(tail), path, scan.end, defect.reason, broken.name)
        return len(tail), str(broken) if tail else None, True

    def _start_segment(self, number: int, first_seq: int, *, replace: bool) -> None:
        """Create segment ``number`` with its header, fsync it and the dir, make it active."""
        path = self.events_dir / f"events-{number:06d}.jsonl"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags | (os.O_TRUNC if replace else os.O_EXCL), 0o644)
        try:
            header = _HEADER % (number, first_seq)
            _write_all(self._write, fd, header)
            self._fdatasync(fd)
            _fsync_dir(self.events_dir)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        self._size = self._header_len = len(header)
        self._segments = (*self._segments, _Segment(number, path, first_seq))
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
                yield from _read_trusted(seg.path, limit, after_seq if after_seq >= seg.first_seq
                                         else None)
                continue
            scan = _Scanner(seg.path, seg.number, seg.first_seq, limit)
            try:
                yield from scan.batches(after_seq)
            except _Defect as d:
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
            if not line.startswith(_SEQ_PREFIX % s) or b"\n" in line:
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
                _write_all(self._write, self._fd, data)
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


def _take_lock(state_dir: Path) -> int:
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LogLocked(f"{state_dir} is in use by another ugrod (pid {pid}); stop it first or "
                        "use another --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


def _read_trusted(path: Path, limit: int | None, after_seq: int | None) -> Iterator[list[bytes]]:
    """Event lines of an already verified segment: split chunks, drop header and commit lines."""
    with open(path, "rb", buffering=0) as f:
        remaining = os.fstat(f.fileno()).st_size if limit is None else limit
        rest = b""
        while remaining > 0:
            more = f.read(min(remaining, _CHUNK_BYTES))
            if not more:
                raise LogError(f"events: {path} shrank while being read")
            remaining -= len(more)
            buf = rest + more
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            start = 0
            if after_seq is not None:
                want = _SEQ_PREFIX % (after_seq + 1)
                start = 0 if buf.startswith(want) else buf.find(b"\n" + want, 0, cut) + 1
                if start == 0 and not buf.startswith(want):
                    continue  # every line of this chunk is at or before after_seq
                after_seq = None
            # Header lines start {"l, commit lines {"c, event lines {"s (115).
            out = [x for x in buf[start:cut - 1].split(b"\n") if x[2] == 115] if cut > start else []
            if out:
                yield out


def _verify_sealed(scan: _Scanner, *, full: bool) -> None:
    """Check a sealed segment: every batch, or (``full=False``) its header and last commit."""
    try:
        if full:
            for _ in scan.batches():
                pass
            return
        with open(scan.path, "rb") as f:
            scan._header(f.read(4096), True)
            size = os.fstat(f.fileno()).st_size
            if size == scan.end:
                return
            f.seek(max(scan.end, size - 4096))
            tail = f.read()
    except _Defect as d:
        raise d.corrupt(scan.path) from None
    start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
    m = _COMMIT_RE.fullmatch(tail, start, len(tail) - 1)
    if (not tail.endswith(b"\n") or m is None
            or _COMMIT_CRC % zlib.crc32(m[1]) != tail[m.end(1):len(tail) - 1]):
        raise CorruptLog(scan.path, 0, size - len(tail) + start, None,
                         "sealed segment does not end with a valid commit line")
    scan.last_seq = int(m[2])


# ---- snapshots ------------------------------------------------------------


def write_snapshot(state_dir: Path, seq: int, payload: bytes, *,
                   fsync: Callable[[int], None] = os.fsync) -> Path:
    """Write STATE/snapshots/snapshot-<seq>.bin atomically; keep the newest two."""
    d = Path(state_dir) / "snapshots"
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"snapshot-{seq:012d}.bin"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(os.write, fd, _SNAP_HEADER % (seq, len(payload), zlib.crc32(payload)) + payload)
        fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(d)
    snaps = sorted((int(m[1]), p) for p in d.iterdir() if (m := _SNAPSHOT_RE.fullmatch(p.name)))
    stale = [p for _, p in snaps[:-2]]
    stale += [p for p in d.iterdir() if p.name.startswith(".snapshot-") and p != tmp]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        _fsync_dir(d)
    return final


def read_latest_snapshot(state_dir: Path) -> tuple[int, bytes] | None:
    """The newest snapshot that verifies, as (seq, payload); a bad one is logged and skipped."""
    d = Path(state_dir) / "snapshots"
    if not d.is_dir():
        return None
    snaps = sorted(((int(sm[1]), p) for p in d.iterdir()
                    if (sm := _SNAPSHOT_RE.fullmatch(p.name))), reverse=True)
    for seq, path in snaps:
        try:
            data = path.read_bytes()
        except OSError as exc:
            _log.warning("snapshot %s is unreadable (%s); trying an older one", path, exc)
            continue
        e = data.find(b"\n")
        m = _SNAP_HEADER_RE.fullmatch(data, 0, e) if e >= 0 else None
        payload = data[e + 1:]
        if m is None:
            why = "bad header"
        elif int(m[1]) != seq:
            why = f"header says seq {int(m[1])}"
        elif int(m[2]) != len(payload):
            why = f"{len(payload)} payload bytes where the header says {int(m[2])}"
        elif int(m[3], 16) != zlib.crc32(payload):
            why = "checksum mismatch"
        else:
            return seq, payload
        _log.warning("snapshot %s does not verify (%s); trying an older one", path, why)
    return None
