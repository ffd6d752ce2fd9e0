"""Snapshots of state: STATE/snapshots/snapshot-<seq>.bin, written atomically, read verified.

A snapshot is one header line (seq, payload length, CRC-32 of the payload) and the
payload. The newest two are kept; a reader falls back to an older one when the
newest does not verify (replay then starts further back in the log).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path

from ugrod.store.segments import fsync_dir, write_all

_log = logging.getLogger(__name__)

SNAPSHOT_RE = re.compile(r"snapshot-(\d{12,})\.bin")
SNAP_HEADER = b'{"snapshot":1,"seq":%d,"length":%d,"crc":"%08x"}\n'
SNAP_HEADER_RE = re.compile(rb'\{"snapshot":1,"seq":(\d+),"length":(\d+),"crc":"([0-9a-f]{8})"\}')


def write_snapshot(state_dir: Path, seq: int, payload: bytes, *,
                   fsync: Callable[[int], None] = os.fsync) -> Path:
    """Write STATE/snapshots/snapshot-<seq>.bin atomically; keep the newest two."""
    d = Path(state_dir) / "snapshots"
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"snapshot-{seq:012d}.bin"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(os.write, fd, SNAP_HEADER % (seq, len(payload), zlib.crc32(payload)) + payload)
        fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    fsync_dir(d)
    snaps = sorted((int(m[1]), p) for p in d.iterdir() if (m := SNAPSHOT_RE.fullmatch(p.name)))
    stale = [p for _, p in snaps[:-2]]
    stale += [p for p in d.iterdir() if p.name.startswith(".snapshot-") and p != tmp]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        fsync_dir(d)
    return final


def read_latest_snapshot(state_dir: Path) -> tuple[int, bytes] | None:
    """The newest snapshot that verifies, as (seq, payload); a bad one is logged and skipped."""
    d = Path(state_dir) / "snapshots"
    if not d.is_dir():
        return None
    snaps = sorted(((int(sm[1]), p) for p in d.iterdir()
                    if (sm := SNAPSHOT_RE.fullmatch(p.name))), reverse=True)
    for seq, path in snaps:
        try:
            data = path.read_bytes()
        except OSError as exc:
            _log.warning("snapshot %s is unreadable (%s); trying an older one", path, exc)
            continue
        e = data.find(b"\n")
        m = SNAP_HEADER_RE.fullmatch(data, 0, e) if e >= 0 else None
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
