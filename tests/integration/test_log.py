"""The event-log files on a real filesystem: group commit, recovery, corruption, the lock."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.store.log import (
    MAX_BATCH_BYTES,
    CorruptLog,
    EventLog,
    LogError,
    LogLocked,
    LogWriteFailed,
)


def ln(seq: int, pad: int = 8) -> bytes:
    """An event line as the log sees it: the seq prefix, then anything."""
    return b'{"seq":%d,"v":1,"x":"%s"}' % (seq, b"a" * pad)


def seg(d: Path, n: int = 1) -> Path:
    return d / "events" / f"events-{n:06d}.jsonl"


def build(d: Path, batches: list[int], pad: int = 8, **kw: object) -> list[int]:
    """Write a log of the given batch sizes with append_sync; return the end offset of each."""
    log = EventLog.open(d, **kw)  # type: ignore[arg-type]
    seq, ends = 1, []
    for n in batches:
        log.append_sync([ln(s, pad) for s in range(seq, seq + n)])
        seq += n
        ends.append(log._size)
    log.close_sync()
    return ends


def read_all(log: EventLog, after: int = 0) -> list[bytes]:
    """Every line read() yields, checked against a read that verifies every batch again."""
    lines = [line for batch in log.read(after) for line in batch]
    assert lines == [line for batch in log.read(after, verify=True) for line in batch]
    return lines


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def offset_of(lines: list[bytes], line_no: int) -> int:
    return sum(len(x) + 1 for x in lines[:line_no - 1])


def broken_files(d: Path) -> list[Path]:
    return sorted((d / "events").glob("*.broken-*"))


# The sweeps below run hundreds of recoveries, each with several fsyncs; on tmpfs
# (real files, fsync a no-op) they take a second instead of tens on a busy disk.
SWEEP_ROOT = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def sweep_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ugro-log-", dir=SWEEP_ROOT) as tmp:
        yield Path(tmp)


def fresh(tmp: Path, name: str, content: bytes) -> Path:
    """A state dir whose only segment holds ``content``."""
    d = tmp / name
    (d / "events").mkdir(parents=True)
    seg(d).write_bytes(content)
    return d


# ---- round trips ------------------------------------------------------------


async def test_round_trip(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    assert (log.recovery.truncated_bytes, log.recovery.segments, log.last_seq) == (0, 1, 0)
    log.append_sync([ln(1), ln(2)])
    await log.append([ln(3)])
    await log.append([ln(4), ln(5), ln(6)])
    assert log.last_seq == 6
    assert read_all(log) == [ln(s) for s in range(1, 7)]
    await log.close()
    log = EventLog.open(tmp_path)
    assert log.last_seq == 6 and log.recovery.broken_file is None
    assert read_all(log) == [ln(s) for s in range(1, 7)]
    assert read_all(log, after=2) == [ln(s) for s in range(3, 7)]
    assert read_all(log, after=4) == [ln(5), ln(6)]
    assert read_all(log, after=6) == []
    await log.close()


async def test_canonical_records_round_trip(tmp_path: Path) -> None:
    records = [ev.Record(seq=s, ts=1_700_000_000.25 + s, actor=ev.DAEMON,
                         event=ev.DaemonStarted(version=f"0.{s}")) for s in (1, 2, 3)]
    log = EventLog.open(tmp_path)
    await log.append([codec.encode(r) for r in records])
    await log.close()
    log = EventLog.open(tmp_path)
    assert [codec.decode(line) for line in read_all(log)] == records
    await log.close()


def test_file_is_plain_jsonl(tmp_path: Path) -> None:
    build(tmp_path, [2, 1, 3], max_segment_bytes=200)
    files = sorted((tmp_path / "events").glob("*.jsonl"))
    assert len(files) > 1
    rows = [json.loads(x) for f in files for x in f.read_bytes().splitlines()]
    assert [r["seq"] for r in rows if "seq" in r] == list(range(1, 7))
    headers = [r for r in rows if "log" in r]
    assert [h["segment"] for h in headers] == list(range(1, len(files) + 1))
    commits = [r for r in rows if "commit" in r]
    assert [(c["first"], c["n"]) for c in commits] == [(1, 2), (3, 1), (4, 3)]
    # The checksums as docs/CONTRACTS.md defines them, computed independently.
    raw = b"".join(f.read_bytes() for f in files).splitlines(keepends=True)
    batch = b""
    for line in raw:
        if line.startswith(b'{"seq"'):
            batch += line
        elif line.startswith(b'{"commit"'):
            c = json.loads(line)
            assert c["bcrc"] == f"{zlib.crc32(batch):08x}"
            head = line[:line.index(b'"crc":')]
            assert c["crc"] == f"{zlib.crc32(head):08x}"
            batch = b""


def test_unusable_state_dir_is_a_log_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LogError, match="cannot open the log"):
        EventLog.open(tmp_path / "file")


def test_append_rejects_bad_lines(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    with pytest.raises(LogError, match="not seq 1"):
        log.append_sync([ln(2)])
    with pytest.raises(LogError, match="not seq 2"):
        log.append_sync([ln(1), ln(3)])
    with pytest.raises(LogError, match="newline"):
        log.append_sync([ln(1) + b"\n"])
    with pytest.raises(LogError, match="empty"):
        log.append_sync([])
    with pytest.raises(LogError, match="batch limit"):
        log.append_sync([ln(1, MAX_BATCH_BYTES)])
    log.append_sync([ln(1)])
    assert log.last_seq == 1
    log.close_sync()
    log = EventLog.open(tmp_path)
    assert read_all(log) == [ln(1)]
    log.close_sync()


# ---- group commit -------------------------------------------------------------


async def test_concurrent_appends_group_commit(tmp_path: Path) -> None:
    fsyncs = 0
    batches: list[int] = []

    def counting(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        os.fdatasync(fd)

    log = EventLog.open(tmp_path, fdatasync=counting,
                        on_batch=lambda n, nbytes, s: batches.append(n))
    fsyncs = 0
    next_seq = 1
    groups: list[tuple[int, int]] = []

    async def one(k: int) -> None:
        nonlocal next_seq
        for _ in range(3):
            n = 1 + (k + len(groups)) % 3
            first = next_seq
            next_seq += n
            groups.append((first, n))
            # No await between taking seqs and appending: the log sees them in order.
            await log.append([ln(s) for s in range(first, first + n)])

    await asyncio.gather(*(one(k) for k in range(200)))
    assert log.last_seq == next_seq - 1
    assert fsyncs == len(batches) < len(groups) // 4
    assert sum(batches) == next_seq - 1
    await log.close()
    log = EventLog.open(tmp_path)
    assert read_all(log) == [ln(s) for s in range(1, next_seq)]
    log.close_sync()
    # Every append's lines sit inside one batch (one commit line closes all of them).
    commits = [json.loads(x) for x in seg(tmp_path).read_bytes().splitlines()
               if x.startswith(b'{"commit"')]
    batch_of = {s: c["first"] for c in commits for s in range(c["first"], c["commit"] + 1)}
    assert all(batch_of[first] == batch_of[first + n - 1] for first, n in groups)


async def test_close_flushes_pending_appends(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    tasks = [asyncio.create_task(log.append([ln(s)])) for s in range(1, 51)]
    await asyncio.sleep(0)  # every task has queued its line
    await log.close()
    await asyncio.gather(*tasks)
    with pytest.raises(LogError, match="closed"):
        await log.append([ln(51)])
    log = EventLog.open(tmp_path)
    assert log.last_seq == 50
    log.close_sync()


async def test_append_sync_refused_while_async_pending(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    task = asyncio.create_task(log.append([ln(1)]))
    await asyncio.sleep(0)
    with pytest.raises(LogError, match="pending"):
        log.append_sync([ln(2)])
    await task
    await log.close()


async def test_segments_rotate(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path, max_segment_bytes=400)
    seq = 1
    for n in [1, 3, 2, 5, 1, 1, 4, 2]:
        await log.append([ln(s) for s in range(seq, seq + n)])
        seq += n
    await log.close()
    files = sorted((tmp_path / "events").glob("*.jsonl"))
    assert len(files) >= 3
    log = EventLog.open(tmp_path, max_segment_bytes=400)
    assert log.recovery.segments == len(files) and log.last_seq == seq - 1
    for after in range(seq):
        assert read_all(log, after) == [ln(s) for s in range(after + 1, seq)]
    await log.append([ln(seq)])
    await log.close()
    for f in files[:-1]:  # sealed segments are never rewritten
        assert f.read_bytes().endswith(b'"}\n')


@pytest.mark.parametrize("chunk", [1, 17, 100, 333])
def test_reads_across_chunk_boundaries(tmp_path: Path, chunk: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    build(tmp_path, [1, 4, 2, 7, 1, 3], pad=30, max_segment_bytes=500)
    monkeypatch.setattr("ugrod.store.segments.CHUNK_BYTES", chunk)
    log = EventLog.open(tmp_path)
    assert log.recovery.segments >= 2
    for after in range(0, 19):
        assert read_all(log, after) == [ln(s, 30) for s in range(after + 1, 19)]
    log.close_sync()


# ---- torn tails -----------------------------------------------------------------


def test_torn_tail_cut_at_every_offset(sweep_dir: Path) -> None:
    base = sweep_dir / "base"
    ends = build(base, [2, 3], fdatasync=lambda fd: None)
    orig = seg(base).read_bytes()
    start = ends[0]
    for cut in range(start, len(orig)):
        d = fresh(sweep_dir, f"c{cut}", orig[:cut])
        log = EventLog.open(d)
        if cut == start:  # the file ends exactly at a commit line: nothing to repair
            assert log.recovery.truncated_bytes == 0 and log.recovery.segments == 1
        else:
            assert log.recovery.truncated_bytes == cut - start
            (broken,) = broken_files(d)
            assert log.recovery.broken_file == str(broken)
            assert broken.read_bytes() == orig[start:cut]
            assert seg(d).read_bytes() == orig[:start]
            assert log.recovery.segments == 2  # never append after a repair in the same file
        assert log.last_seq == 2 and read_all(log) == [ln(1), ln(2)]
        log.append_sync([ln(3)])
        log.close_sync()
        log = EventLog.open(d)
        assert log.recovery.truncated_bytes == 0 and read_all(log) == [ln(1), ln(2), ln(3)]
        log.close_sync()
        shutil.rmtree(d)


def test_torn_header_and_first_batch(sweep_dir: Path) -> None:
    base = sweep_dir / "base"
    build(base, [3], fdatasync=lambda fd: None)
    orig = seg(base).read_bytes()
    header_end = orig.index(b"\n") + 1
    for cut in range(0, len(orig)):
        d = fresh(sweep_dir, f"c{cut}", orig[:cut])
        log = EventLog.open(d)
        if cut < header_end:  # the header itself is torn: the segment is written afresh
            assert log.recovery.truncated_bytes == cut
            assert [b.read_bytes() for b in broken_files(d)] == ([orig[:cut]] if cut else [])
            assert log.recovery.segments == 1 and seg(d).read_bytes() == orig[:header_end]
        elif cut > header_end:
            assert log.recovery.truncated_bytes == cut - header_end
            assert log.recovery.segments == 2
        assert log.last_seq == 0 and read_all(log) == []
        log.append_sync([ln(1)])
        log.close_sync()
        log = EventLog.open(d)
        assert log.recovery.truncated_bytes == 0 and read_all(log) == [ln(1)]
        log.close_sync()
        shutil.rmtree(d)


@pytest.mark.parametrize("how", ["zero", "garble"])
def test_garbled_page_in_last_batch_is_torn(tmp_path: Path, how: str) -> None:
    base = tmp_path / "base"
    ends = build(base, [5, 40], pad=280, fdatasync=lambda fd: None)
    orig = seg(base).read_bytes()
    start = ends[0]
    pages = range((start + 4095) // 4096 * 4096, len(orig), 4096)
    assert len(pages) >= 2
    for page in pages:
        data = bytearray(orig)
        end = min(page + 4096, len(orig))
        data[page:end] = bytes(end - page) if how == "zero" else os.urandom(end - page)
        d = fresh(tmp_path, f"p{page}", bytes(data))
        log = EventLog.open(d)
        assert log.recovery.truncated_bytes == len(orig) - start
        assert broken_files(d)[0].read_bytes() == bytes(data[start:])
        assert read_all(log) == [ln(s, 280) for s in range(1, 6)]
        log.close_sync()
        shutil.rmtree(d)


def test_new_segment_with_torn_header_is_rewritten(tmp_path: Path) -> None:
    build(tmp_path, [2, 2], max_segment_bytes=100, fdatasync=lambda fd: None)
    last = max((tmp_path / "events").glob("*.jsonl"))
    number = int(last.name[7:13])
    nxt = seg(tmp_path, number + 1)
    nxt.write_bytes(b'{"log":"ugro-ev')  # crash while rotating
    log = EventLog.open(tmp_path)
    assert log.recovery.truncated_bytes == 15 and log.last_seq == 4
    assert nxt.read_bytes() == b'{"log":"ugro-events","format":1,"segment":%d,"first_seq":5}\n' % (
        number + 1)
    log.append_sync([ln(5)])
    log.close_sync()
    nxt.with_name(f"events-{number + 2:06d}.jsonl").write_bytes(b"")  # crash right after creat
    log = EventLog.open(tmp_path)
    assert log.recovery.truncated_bytes == 0 and log.recovery.broken_file is None
    assert read_all(log) == [ln(s) for s in range(1, 6)]
    log.close_sync()


def test_wrong_but_whole_header_is_not_a_torn_write(tmp_path: Path) -> None:
    build(tmp_path, [2], max_segment_bytes=50)  # segment 2 holds only its header now
    header = b'{"log":"ugro-events","format":1,"segment":2,"first_seq":7}\n'
    seg(tmp_path, 2).write_bytes(header)
    with pytest.raises(CorruptLog, match="segment starts at seq 7, expected 3"):
        EventLog.open(tmp_path)
    assert seg(tmp_path, 2).read_bytes() == header


def test_one_event_loop_per_log(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    asyncio.run(log.append([ln(1)]))
    with pytest.raises(LogError, match="second event loop"):
        asyncio.run(log.append([ln(2)]))
    log.close_sync()


# ---- corruption of acknowledged data -----------------------------------------------


def _flip(line: bytes) -> bytes:
    i = line.index(b"aaa") + 1
    return line[:i] + bytes([line[i] ^ 0x01]) + line[i + 1:]


# Log of batches [3, 3, 3]: line 1 header; seq 1-3 on lines 2-4, commit 5;
# seq 4-6 on lines 6-8, commit 9; seq 7-9 on lines 10-12, commit 13.
CORRUPTIONS: dict[str, tuple[Callable[[list[bytes]], list[bytes]], int, int, int | None, str]] = {
    # name: (edit of the line list, reported line, line whose offset is reported, seq, reason)
    "bit flip": (lambda ls: [*ls[:6], _flip(ls[6]), *ls[7:]], 6, 6, 4,
                 "batch seq 4-6 (lines 6-8) does not match its checksum"),
    "seq gap": (lambda ls: [*ls[:6], *ls[7:]], 7, 7, 6,
                "seq 6 where 5 was expected (missing or out of order)"),
    "duplicate": (lambda ls: [*ls[:7], ls[6], *ls[7:]], 8, 8, 5,
                  "seq 5 where 6 was expected (duplicate or out of order)"),
    "swap": (lambda ls: [*ls[:6], ls[7], ls[6], *ls[8:]], 7, 7, 6,
             "seq 6 where 5 was expected (missing or out of order)"),
    "foreign": (lambda ls: [*ls[:6], b'{"hello":"world"}', *ls[6:]], 7, 7, None,
                "not an event line (expected seq 5)"),
    "commit": (lambda ls: [*ls[:8], ls[8].replace(b'"n":3', b'"n":2'), *ls[9:]], 9, 9, 6,
               "commit line checksum mismatch"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("sealed", [False, True])
def test_corruption_in_earlier_batch_refuses(tmp_path: Path, name: str, sealed: bool) -> None:
    edit, line, at, seq, reason = CORRUPTIONS[name]
    build(tmp_path, [3, 3, 3])
    if sealed:  # the same damage in a sealed segment, with a later segment after it
        log = EventLog.open(tmp_path, max_segment_bytes=1)
        log.append_sync([ln(10)])
        log.close_sync()
    lines = lines_of(seg(tmp_path))
    seg(tmp_path).write_bytes(b"\n".join(edit(lines)))
    before = {p.name: p.read_bytes() for p in (tmp_path / "events").iterdir()}
    with pytest.raises(CorruptLog) as info:
        EventLog.open(tmp_path)
    err = info.value
    assert (err.path, err.line, err.offset, err.seq) == (seg(tmp_path), line,
                                                         offset_of(lines, at), seq)
    assert err.reason.startswith(reason)
    assert str(err).startswith(f"events: {seg(tmp_path)} line {line} (byte {err.offset}")
    after = {p.name: p.read_bytes() for p in (tmp_path / "events").iterdir()}
    assert after == before  # the log is left untouched
    with pytest.raises(CorruptLog):
        EventLog.open(tmp_path, readonly=True)


def test_damaged_last_batch_followed_by_data_refuses(tmp_path: Path) -> None:
    build(tmp_path, [3, 3])
    lines = lines_of(seg(tmp_path))
    lines[6] = _flip(lines[6])
    # A partial batch after the last commit proves that batch was complete before.
    seg(tmp_path).write_bytes(b"\n".join(lines) + ln(7)[:10])
    with pytest.raises(CorruptLog, match="more data follows the batch's valid commit line 9"):
        EventLog.open(tmp_path)
    # Without it, damage inside the very last batch reads as a torn write (as in etcd).
    seg(tmp_path).write_bytes(b"\n".join(lines))
    log = EventLog.open(tmp_path)
    assert log.last_seq == 3 and log.recovery.truncated_bytes > 0
    log.close_sync()


def test_tail_larger_than_a_batch_refuses(tmp_path: Path) -> None:
    build(tmp_path, [3])
    with open(seg(tmp_path), "ab") as f:
        f.write(b"x" * (MAX_BATCH_BYTES + 5000))
    size = seg(tmp_path).stat().st_size
    with pytest.raises(CorruptLog, match="more than one batch can be"):
        EventLog.open(tmp_path)
    assert seg(tmp_path).stat().st_size == size and broken_files(tmp_path) == []


def _three_segments(d: Path) -> list[Path]:
    build(d, [2, 2, 2, 1], max_segment_bytes=150)
    files = sorted((d / "events").glob("*.jsonl"))
    assert len(files) >= 3
    return files


def test_sealed_segment_damage_refuses(tmp_path: Path) -> None:
    files = _three_segments(tmp_path)
    data = files[0].read_bytes()
    files[0].write_bytes(data[:-5])  # a sealed segment cut short
    with pytest.raises(CorruptLog, match="incomplete line") as info:
        EventLog.open(tmp_path)
    assert info.value.path == files[0]
    files[0].write_bytes(data)
    files[1].rename(files[1].with_suffix(".moved"))
    with pytest.raises(CorruptLog, match="segment 2 is missing"):
        EventLog.open(tmp_path)
    files[1].with_suffix(".moved").rename(files[1])
    header = files[1].read_bytes().split(b"\n", 1)
    files[1].write_bytes(header[0].replace(b'"first_seq":3', b'"first_seq":4') + b"\n" + header[1])
    with pytest.raises(CorruptLog, match="segment starts at seq 4, expected 3"):
        EventLog.open(tmp_path)


def test_unverified_sealed_damage_is_caught_by_read(tmp_path: Path) -> None:
    files = _three_segments(tmp_path)
    lines = lines_of(files[0])
    files[0].write_bytes(b"\n".join([lines[0], _flip(lines[1]), *lines[2:]]))
    log = EventLog.open(tmp_path, verify_sealed=False)  # header and last commit only
    with pytest.raises(CorruptLog, match="does not match its checksum"):
        read_all(log)
    log.close_sync()
    with pytest.raises(CorruptLog):
        EventLog.open(tmp_path)


def test_archived_segments(tmp_path: Path) -> None:
    files = _three_segments(tmp_path)
    files[0].unlink()
    log = EventLog.open(tmp_path)
    assert log.first_seq == 3 and log.last_seq == 7
    with pytest.raises(LogError, match="archived"):
        read_all(log)
    assert read_all(log, after=2) == [ln(s) for s in range(3, 8)]
    log.close_sync()


# ---- the lock ---------------------------------------------------------------------------


def test_second_open_is_locked(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path)
    with pytest.raises(LogLocked, match=f"in use by another ugrod \\(pid {os.getpid()}\\)"):
        EventLog.open(tmp_path)
    ro = EventLog.open(tmp_path, readonly=True)  # readers need no lock
    assert ro.last_seq == 0
    with pytest.raises(LogError, match="read-only"):
        ro.append_sync([ln(1)])
    ro.close_sync()
    log.close_sync()
    EventLog.open(tmp_path).close_sync()


def test_readonly_open_repairs_nothing(tmp_path: Path) -> None:
    build(tmp_path, [2, 2])
    torn = seg(tmp_path).read_bytes() + ln(5)[:9]
    seg(tmp_path).write_bytes(torn)
    ro = EventLog.open(tmp_path, readonly=True)
    assert ro.recovery.truncated_bytes == 9 and ro.recovery.broken_file is None
    assert read_all(ro) == [ln(s) for s in range(1, 5)]
    ro.close_sync()
    assert seg(tmp_path).read_bytes() == torn and broken_files(tmp_path) == []


# ---- write and fsync errors --------------------------------------------------------------


class FlakyDisk:
    """Real os.write/os.fdatasync that start failing on demand, the way a sick disk does."""

    def __init__(self) -> None:
        self.fsync_error: int | None = None
        self.room: int | None = None  # bytes left before ENOSPC

    def fdatasync(self, fd: int) -> None:
        if self.fsync_error is not None:
            raise OSError(self.fsync_error, os.strerror(self.fsync_error))
        os.fdatasync(fd)

    def write(self, fd: int, data: memoryview) -> int:
        if self.room is None:
            return os.write(fd, data)
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[:self.room])  # a short write, then ENOSPC
        self.room -= n
        return n


async def test_fsync_eio_is_never_acknowledged(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    disk = FlakyDisk()
    log = EventLog.open(tmp_path, fdatasync=disk.fdatasync)
    await log.append([ln(1), ln(2)])
    disk.fsync_error = errno.EIO
    results = await asyncio.gather(*(log.append([ln(s)]) for s in range(3, 13)),
                                   return_exceptions=True)
    assert all(isinstance(r, LogWriteFailed) for r in results)
    assert "Input/output error" in str(results[0]) and "after seq 2" in str(results[0])
    assert log.last_seq == 2
    disk.fsync_error = None  # even a disk that recovers gets no more appends: sticky
    with pytest.raises(LogWriteFailed):
        await log.append([ln(13)])
    with pytest.raises(LogWriteFailed):
        log.append_sync([ln(13)])
    await log.close()
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    log = EventLog.open(tmp_path)
    assert log.recovery.truncated_bytes == 0 and log.last_seq == 2
    assert read_all(log) == [ln(1), ln(2)]
    await log.append([ln(3)])
    await log.close()


@pytest.mark.parametrize("room", [0, 1, 25])
async def test_disk_full_cuts_back_the_batch(tmp_path: Path, room: int) -> None:
    disk = FlakyDisk()
    log = EventLog.open(tmp_path, write=disk.write)
    log.append_sync([ln(1)])
    size = seg(tmp_path).stat().st_size
    disk.room = room
    with pytest.raises(LogWriteFailed, match="No space left"):
        await log.append([ln(2), ln(3)])
    assert seg(tmp_path).stat().st_size == size and log.last_seq == 1
    with pytest.raises(LogWriteFailed):
        await log.append([ln(2)])
    await log.close()
    log = EventLog.open(tmp_path)
    assert log.recovery.truncated_bytes == 0 and read_all(log) == [ln(1)]
    log.append_sync([ln(2)])
    log.close_sync()


def test_fsync_error_at_rotation_is_sticky(tmp_path: Path) -> None:
    disk = FlakyDisk()
    log = EventLog.open(tmp_path, max_segment_bytes=100, fdatasync=disk.fdatasync)
    log.append_sync([ln(1), ln(2)])
    disk.fsync_error = errno.EIO
    with pytest.raises(LogWriteFailed):
        log.append_sync([ln(3)])  # the new segment's header cannot be made durable
    log.close_sync()
    log = EventLog.open(tmp_path)
    assert log.last_seq == 2 and read_all(log) == [ln(1), ln(2)]
    log.close_sync()


_PRODUCER = """
import asyncio, sys
from pathlib import Path
from ugrod.store.log import EventLog

async def main():
    log = EventLog.open(Path(sys.argv[1]))
    nxt = log.last_seq + 1
    async def one():
        nonlocal nxt
        while True:
            first, n = nxt, 1 + nxt % 3
            nxt += n
            await log.append([b'{"seq":%d,"v":1}' % s for s in range(first, first + n)])
            sys.stdout.write("%d\\n" % (first + n - 1))
            sys.stdout.flush()
    await asyncio.gather(*(one() for _ in range(8)))

asyncio.run(main())
"""


def test_kill9_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    acked = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, str(tmp_path)],
                                stdout=subprocess.PIPE, cwd=root)
        assert proc.stdout is not None
        for _ in range(200):  # let it acknowledge a few hundred events, then kill it mid-flight
            acked = max(acked, int(proc.stdout.readline()))
        proc.kill()
        rest = proc.communicate()[0].split()
        acked = max([acked, *map(int, rest)])
        log = EventLog.open(tmp_path)
        assert log.last_seq >= acked
        assert [int(x[7:x.index(b",")]) for x in read_all(log)] == list(
            range(1, log.last_seq + 1))
        log.close_sync()


# ---- property: any cut recovers to a prefix of whole batches -----------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
       pads=st.integers(0, 40), cut_frac=st.floats(0, 1))
def test_any_truncation_recovers_a_prefix_of_whole_batches(sizes: list[int], pads: int,
                                                           cut_frac: float) -> None:
    with tempfile.TemporaryDirectory(dir=SWEEP_ROOT) as tmp:
        d = Path(tmp)
        ends = build(d, sizes, pad=pads, fdatasync=lambda fd: None)
        orig = seg(d).read_bytes()
        cut = round(cut_frac * len(orig))
        seg(d).write_bytes(orig[:cut])
        log = EventLog.open(d, fdatasync=lambda fd: None)
        whole = [i for i, e in enumerate(ends) if e <= cut]
        n = sum(sizes[:whole[-1] + 1]) if whole else 0
        header_end = orig.index(b"\n") + 1
        kept = ends[whole[-1]] if whole else header_end if cut >= header_end else 0
        assert log.last_seq == n
        assert read_all(log) == [ln(s, pads) for s in range(1, n + 1)]
        assert log.recovery.truncated_bytes == cut - kept
        log.append_sync([ln(n + 1)])
        log.close_sync()
        log = EventLog.open(d, fdatasync=lambda fd: None)
        assert log.recovery.truncated_bytes == 0 and log.last_seq == n + 1
        log.close_sync()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=6), where=st.floats(0, 1),
       bit=st.integers(0, 7))
def test_any_bit_flip_is_caught(sizes: list[int], where: float, bit: int) -> None:
    with tempfile.TemporaryDirectory(dir=SWEEP_ROOT) as tmp:
        d = Path(tmp)
        ends = build(d, sizes, fdatasync=lambda fd: None)
        data = bytearray(seg(d).read_bytes())
        i = min(int(where * len(data)), len(data) - 1)
        data[i] ^= 1 << bit
        seg(d).write_bytes(bytes(data))
        if i < ends[-2]:  # acknowledged data before the last batch: refuse
            with pytest.raises(CorruptLog):
                EventLog.open(d, fdatasync=lambda fd: None)
            assert seg(d).read_bytes() == bytes(data)
        else:  # inside the last batch: indistinguishable from a torn write
            log = EventLog.open(d, fdatasync=lambda fd: None)
            assert log.last_seq == sum(sizes[:-1])
            assert log.recovery.truncated_bytes == len(data) - ends[-2]
            log.close_sync()


@settings(max_examples=40, deadline=None)
@given(junk=st.binary(min_size=1, max_size=600))
def test_junk_after_the_last_commit_is_cut(junk: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=SWEEP_ROOT) as tmp:
        d = Path(tmp)
        build(d, [2, 1], fdatasync=lambda fd: None)
        orig = seg(d).read_bytes()
        seg(d).write_bytes(orig + junk)
        log = EventLog.open(d, fdatasync=lambda fd: None)
        assert log.recovery.truncated_bytes == len(junk) and log.last_seq == 3
        assert Path(log.recovery.broken_file or "").read_bytes() == junk
        assert seg(d).read_bytes() == orig
        log.close_sync()
