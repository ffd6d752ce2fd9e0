"""Snapshot files on a real filesystem: the newest two kept, a bad one passed over, atomic."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from ugrod.store.snapshots import read_latest_snapshot, write_snapshot


def test_snapshot_round_trip_keeps_newest_two(tmp_path: Path) -> None:
    assert read_latest_snapshot(tmp_path) is None
    for seq in (10, 20, 30):
        path = write_snapshot(tmp_path, seq, b"state at %d" % seq)
        assert path.name == f"snapshot-{seq:012d}.bin"
    assert read_latest_snapshot(tmp_path) == (30, b"state at 30")
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        "snapshot-000000000020.bin", "snapshot-000000000030.bin"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_bad_newest_snapshot_falls_back(tmp_path: Path, damage: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    write_snapshot(tmp_path, 10, b"older" * 100)
    newest = write_snapshot(tmp_path, 20, b"newer" * 100)
    data = newest.read_bytes()
    newest.write_bytes({"flip": data[:-3] + b"X" + data[-2:], "truncate": data[:-10],
                        "header": data.replace(b'"seq":20', b'"seq":21'), "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        assert read_latest_snapshot(tmp_path) == (10, b"older" * 100)
    assert "snapshot-000000000020.bin" in caplog.text
    (tmp_path / "snapshots" / "snapshot-000000000010.bin").write_bytes(b"junk")
    assert read_latest_snapshot(tmp_path) is None


def test_snapshot_write_is_atomic(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 10, b"good")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        write_snapshot(tmp_path, 20, b"never durable", fsync=eio)
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == ["snapshot-000000000010.bin"]
    # A crash between write and rename leaves a temp file: never read, removed next time.
    stale = tmp_path / "snapshots" / ".snapshot-000000000030.bin.tmp-999999"
    stale.write_bytes(b"half")
    assert read_latest_snapshot(tmp_path) == (10, b"good")
    write_snapshot(tmp_path, 40, b"next")
    assert not stale.exists()
    assert read_latest_snapshot(tmp_path) == (40, b"next")
