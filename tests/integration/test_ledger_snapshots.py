"""Start-up from snapshots on real files: snapshot + tail == the log, and a snapshot
this ugrod cannot read (another state version, bad payload) is passed over, not trusted."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from ugrod.core import events as ev
from ugrod.core.state import STATE_VERSION, State
from ugrod.store.ledger import Ledger, ReplayError, replay_until
from ugrod.store.snapshots import write_snapshot

ALICE = ev.Actor(user="alice", uid=1000)
SPEC = ev.JobSpec(argv=("python3", "train.py", "--lr", "1e-4"))


async def _fill(state_dir: Path, jobs: int, *, snapshot_after: int | None = None) -> State:
    """A log with one node and ``jobs`` submitted jobs (some ended); maybe a snapshot midway."""
    ledger = Ledger.open(state_dir)
    await ledger.record(ev.DAEMON, ev.NodeAdded(node=ev.NodeSpec(name="n1", host="127.0.0.1")))
    for i in range(jobs):
        await ledger.record(ALICE, ev.JobSubmitted(job=f"j{i}", spec=SPEC, request_id=f"r{i}"))
        if i % 3 == 0:
            await ledger.record(ALICE, ev.JobCancelRequested(job=f"j{i}"))
        if snapshot_after is not None and i == snapshot_after:
            assert ledger.snapshot() is not None
    state = ledger.state
    await ledger.close()
    return state


async def test_start_from_snapshot_plus_tail_equals_the_whole_log(tmp_path: Path) -> None:
    live = await _fill(tmp_path, 30, snapshot_after=19)
    ledger = Ledger.open(tmp_path)
    try:
        assert ledger.snapshot_seq > 0
        assert ledger.replayed == live.seq - ledger.snapshot_seq  # only the tail was read
        assert ledger.state == live == replay_until(tmp_path)
    finally:
        ledger.log.close_sync()


def _old_layout(state: State) -> bytes:
    # What state version 1 wrote: every struct as a MessagePack map.
    return msgspec.msgpack.encode({
        "version": 1, "seq": state.seq,
        "nodes": {k: msgspec.to_builtins(v) for k, v in state.nodes.items()},
        "jobs": {k: msgspec.to_builtins(v) for k, v in state.jobs.items()},
        "requests": dict(state.requests), "sweeps": {}, "started_at": None})


@pytest.mark.parametrize(("payload", "said"), [
    (_old_layout, "snapshot state version 1, this ugrod reads"),
    (lambda s: b"\x93not a snapshot", "unreadable snapshot"),
    (lambda s: msgspec.msgpack.encode({"version": STATE_VERSION + 1, "seq": s.seq}),
     f"snapshot state version {STATE_VERSION + 1}"),
])
async def test_a_snapshot_this_ugrod_cannot_read_is_replaced_by_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, payload: object, said: str) -> None:
    live = await _fill(tmp_path, 12)
    write_snapshot(tmp_path, live.seq, payload(live))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="ugrod.store.ledger"):
        ledger = Ledger.open(tmp_path)
    try:
        assert said in caplog.text and "replaying the whole log instead" in caplog.text
        assert ledger.replayed == live.seq
        assert ledger.state == live
        assert ledger.snapshot() is not None  # the next snapshot is of this version again
    finally:
        ledger.log.close_sync()
    ledger = Ledger.open(tmp_path)
    try:
        assert ledger.replayed == 0 and ledger.state == live
    finally:
        ledger.log.close_sync()


async def test_a_snapshot_ahead_of_the_log_still_stops_start_up(tmp_path: Path) -> None:
    live = await _fill(tmp_path, 3)
    from ugrod.core.state import to_snapshot
    ahead = msgspec.structs.replace(live, seq=live.seq + 50)
    write_snapshot(tmp_path, ahead.seq, to_snapshot(ahead))
    with pytest.raises(ReplayError, match="ahead of the log"):
        Ledger.open(tmp_path)


async def test_the_daemons_fits_answer_follows_the_nodes(tmp_path: Path) -> None:
    # check_fits is remembered per spec shape; a change of nodes must change the answer.
    from ugrod.config import schema as cfgmod
    from ugrod.daemon import Daemon
    d = Daemon(cfgmod.builtin(), None, tmp_path / "state", tmp_path / "s.sock")
    d.ledger = Ledger.open(tmp_path / "state")
    try:
        await d.ledger.record(ev.DAEMON, ev.NodeAdded(node=ev.NodeSpec(name="cpu", host="h1")))
        spec = ev.JobSpec(argv=("train.py",), gpus_per_node=1)
        assert d.control.check_fits(spec) == "needs a GPU; no node has one"
        assert d.control.check_fits(ev.JobSpec(argv=("other.py",), gpus_per_node=1)) == \
            "needs a GPU; no node has one"  # same shape, other command: same answer
        gpu = ev.NodeSpec(name="gpu", host="h2", gpus=(ev.Gpu(index=0, vram_bytes=8 << 30),))
        await d.ledger.record(ev.DAEMON, ev.NodeAdded(node=gpu))
        assert d.control.check_fits(spec) is None
        await d.ledger.record(ev.DAEMON, ev.NodeRemoved(node="gpu"))
        assert d.control.check_fits(spec) == "needs a GPU; no node has one"
    finally:
        await d.ledger.close()
