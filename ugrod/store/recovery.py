"""Opening the event log after any stop: the lock, the sealed segments, a torn tail.

ugrod may have died anywhere, the machine too. On start the sealed segments are
checked (each in full, or its header and last commit line), then the active one
batch by batch. A defect there is a torn write only if it can be one: the last
batch, no valid commit of another batch after it, no more than one batch of bytes.
Then its bytes are kept beside the segment (``.broken-<time>Z``) and cut; anything
worse is ``CorruptLog`` and ugrod refuses to start (DESIGN.md, rule 5).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ugrod.store.segments import (
    COMMIT_CRC,
    COMMIT_RE,
    MAX_TAIL_BYTES,
    SEGMENT_RE,
    CorruptLog,
    Defect,
    LogLocked,
    Scanner,
    Segment,
    check_sealed,
    fsync_dir,
    write_all,
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What open() found: bytes cut from a torn tail (kept in ``broken_file``), segment count."""

    truncated_bytes: int
    broken_file: str | None
    segments: int
    last_seq: int


def take_lock(state_dir: Path) -> int:
    """flock STATE/lock for this process (it holds our pid); LogLocked names the holder."""
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


def scan_segments(events_dir: Path, *, verify_sealed: bool
                  ) -> tuple[list[Segment], set[int], Scanner | None]:
    """Check the sealed segments in order; return them, those checked in full, and a
    scanner for the active (last) one (None: no segment yet).

    ``verify_sealed``: every batch of a sealed segment, else its header and last commit.
    """
    found = sorted((int(m[1]), p) for p in (events_dir.iterdir() if events_dir.is_dir() else ())
                   if (m := SEGMENT_RE.fullmatch(p.name)))
    if not found:
        return [], set(), None
    segments: list[Segment] = []
    trusted: set[int] = set()
    first: int | None = 1 if found[0][0] == 1 else None
    for i, (number, path) in enumerate(found):
        if i and number != found[i - 1][0] + 1:
            raise CorruptLog(path, 1, 0, None, f"segment {found[i - 1][0] + 1} is missing")
        scan = Scanner(path, number, first, None)
        if i == len(found) - 1:
            break
        check_sealed(scan, full=verify_sealed)
        if verify_sealed:
            trusted.add(number)
        assert scan.first_seq is not None
        segments.append(Segment(number, path, scan.first_seq))
        first = scan.last_seq + 1
    return segments, trusted, scan


def recover_tail(scan: Scanner, *, readonly: bool) -> tuple[int, str | None, bool]:
    """Verify the active segment; cut a torn tail, refuse anything worse.

    Returns (bytes cut, the file that keeps them, whether the segment was repaired:
    appends then go to a fresh segment). ``readonly``: find the tail, change nothing.
    """
    path = scan.path
    try:
        for _ in scan.batches():
            pass
        return 0, None, False
    except Defect as d:
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
        m = COMMIT_RE.fullmatch(tail, c, e)
        if m and COMMIT_CRC % zlib.crc32(m[1]) == tail[m.end(1):e]:
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
    if len(tail) > MAX_TAIL_BYTES:
        raise defect.corrupt(path, f"; the {len(tail)} bytes after the last valid commit are "
                             "more than one batch can be")
    # Rule 3: a torn tail: keep its bytes, cut it, and (in _open) start afresh.
    scan.end = defect.batch_offset
    scan.last_seq = (scan.first_seq or 1) - 1 if header else (defect.expect or 1) - 1
    if readonly:
        return len(tail), None, True
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 1_000_000_000))
    broken = path.with_name(f"{path.name}.broken-{stamp}.{ns // 1000 % 1_000_000:06d}Z")
    if tail:
        fd = os.open(broken, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(os.write, fd, tail)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
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
