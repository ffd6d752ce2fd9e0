"""Segment files of the event log: their format, and reading them back verified.

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
commit line count as written. ``Scanner`` checks every batch and names the first
defect; ``read_trusted`` reads what was checked already; ``log.py`` writes.
"""

from __future__ import annotations

import errno
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

# One batch (one write + one commit line) never holds more event bytes than this;
# a single append larger than it is refused. Recovery uses it to tell a torn
# tail (at most one batch) from lost acknowledged data.
MAX_BATCH_BYTES = 8 << 20
MAX_TAIL_BYTES = MAX_BATCH_BYTES + 4096
CHUNK_BYTES = 2 << 20

SEGMENT_RE = re.compile(r"events-(\d{6,})\.jsonl")
HEADER = b'{"log":"ugro-events","format":1,"segment":%d,"first_seq":%d}\n'
HEADER_RE = re.compile(rb'\{"log":"ugro-events","format":1,"segment":(\d+),"first_seq":(\d+)\}')
COMMIT_HEAD = b'{"commit":%d,"first":%d,"n":%d,"bcrc":"%08x",'
COMMIT_CRC = b'"crc":"%08x"}'
COMMIT_RE = re.compile(
    rb'(\{"commit":(\d+),"first":(\d+),"n":(\d+),"bcrc":"([0-9a-f]{8})",)"crc":"([0-9a-f]{8})"\}'
)
SEQ_PREFIX = b'{"seq":%d,'


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


class Segment(NamedTuple):
    number: int
    path: Path
    first_seq: int


class Defect(Exception):
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
    head = COMMIT_HEAD % (first + n - 1, first, n, bcrc)
    return head + COMMIT_CRC % zlib.crc32(head) + b"\n"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(write: Callable[[int, memoryview], int], fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        n = write(fd, view[done:])
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write: no progress")
        done += n


class Scanner:
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
            buf = f.read(min(size, max(CHUNK_BYTES, 4096)))  # the header fits in the first read
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
                    head = COMMIT_HEAD % (last + n, first, n, crc32(mv[pos:c]))
                    if (n == 0 or e - c != len(head) + 17 or not startswith(head, c)
                            or not startswith(COMMIT_CRC % crc32(head), c + len(head))):
                        raise self._diagnose(buf, base, pos, lines, last, e + 1)
                    # The CRC proves the bytes are those the writer wrote, and the writer
                    # checked every line's seq; the end lines' seqs catch a foreign batch.
                    if not startswith(SEQ_PREFIX % first, pos) or (
                            n > 1 and not startswith(SEQ_PREFIX % (last + n),
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
                if len(buf) - pos > MAX_TAIL_BYTES:
                    raise self._diagnose(buf, base, pos, lines, last, len(buf), eof=False)
                more = f.read(min(remaining, CHUNK_BYTES))
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
        m = HEADER_RE.fullmatch(buf, 0, e) if e >= 0 else None
        if m is None:
            why = "incomplete header line" if e < 0 and eof else "not a segment header"
            raise Defect(0, 1, None, why, 0, 1, None)
        number, first = int(m[1]), int(m[2])
        why = ""
        if buf[:e + 1] != HEADER % (number, first):
            why = "non-canonical header"
        elif number != self.number:
            why = f"header of segment {number} in the file of segment {self.number}"
        elif self.first_seq is not None and first != self.first_seq:
            why = f"segment starts at seq {first}, expected {self.first_seq}"
        elif first < 1:
            why = "segment starts at seq 0"
        if why:
            raise Defect(0, 1, None, why, 0, 1, None, fatal=True)
        self.first_seq, self.last_seq, self.end, self.header_len = first, first - 1, e + 1, e + 1
        return e + 1

    def _diagnose(self, buf: bytes, base: int, pos: int, lines: int, last: int, stop: int,
                  eof: bool = True) -> Defect:
        """Walk the batch at ``pos`` line by line and name its first defect."""
        start, bline, expect, k = pos, lines + 1, last + 1, 0

        def defect(at: int, line: int, seq: int | None, reason: str) -> Defect:
            return Defect(base + at, line, seq, reason, base + start, bline, expect)

        while pos < stop:
            line = lines + 1
            e = buf.find(b"\n", pos, stop)
            if e < 0:
                why = "incomplete line at end of file" if eof else "line longer than a batch"
                return defect(pos, line, None, why)
            if buf.startswith(b'{"commit":', pos):
                m = COMMIT_RE.fullmatch(buf, pos, e)
                if m is None:
                    return defect(pos, line, None, "malformed commit line")
                cseq, cfirst, cn = int(m[2]), int(m[3]), int(m[4])
                if COMMIT_CRC % zlib.crc32(m[1]) != buf[m.end(1):e]:
                    return defect(pos, line, cseq, "commit line checksum mismatch")
                if COMMIT_HEAD % (cseq, cfirst, cn, int(m[5], 16)) != m[1]:
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
        return defect(start, bline, expect, f"no commit line within {MAX_TAIL_BYTES} bytes")


def read_trusted(path: Path, limit: int | None, after_seq: int | None) -> Iterator[list[bytes]]:
    """Event lines of an already verified segment: split chunks, drop header and commit lines."""
    with open(path, "rb", buffering=0) as f:
        remaining = os.fstat(f.fileno()).st_size if limit is None else limit
        rest = b""
        while remaining > 0:
            more = f.read(min(remaining, CHUNK_BYTES))
            if not more:
                raise LogError(f"events: {path} shrank while being read")
            remaining -= len(more)
            buf = rest + more
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            start = 0
            if after_seq is not None:
                want = SEQ_PREFIX % (after_seq + 1)
                start = 0 if buf.startswith(want) else buf.find(b"\n" + want, 0, cut) + 1
                if start == 0 and not buf.startswith(want):
                    continue  # every line of this chunk is at or before after_seq
                after_seq = None
            # Header lines start {"l, commit lines {"c, event lines {"s (115).
            out = [x for x in buf[start:cut - 1].split(b"\n") if x[2] == 115] if cut > start else []
            if out:
                yield out


def check_sealed(scan: Scanner, *, full: bool) -> None:
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
    except Defect as d:
        raise d.corrupt(scan.path) from None
    start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
    m = COMMIT_RE.fullmatch(tail, start, len(tail) - 1)
    if (not tail.endswith(b"\n") or m is None
            or COMMIT_CRC % zlib.crc32(m[1]) != tail[m.end(1):len(tail) - 1]):
        raise CorruptLog(scan.path, 0, size - len(tail) + start, None,
                         "sealed segment does not end with a valid commit line")
    scan.last_seq = int(m[2])
