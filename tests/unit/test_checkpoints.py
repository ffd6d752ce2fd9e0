"""A job's checkpoints: discovery, copy and prune choices (pure), and the node-side copier
program run for real through a local NodeAgent (send, receive, checks, resumes)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ugrod.core import checkpoints as ck
from ugrod.core import jobspec
from ugrod.nodes import checkpoint_transfer as wire
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.local import LocalTransport

L = ck.Listed
R = ck.Reported
C = ck.Central


# ---- discovery ---------------------------------------------------------------------


def test_one_entry_per_checkpoint_wherever_its_copies_are() -> None:
    found = ck.discover(
        [R("/w0/ck/step-10.pt", "n0", 10, 1000.0), R("/w0/ck/step-20.pt", "n0", 20, 1100.0)],
        [L("n0", "/w0/ck/step-10.pt", 5, 100.0), L("n0", "/w0/ck/step-20.pt", 5, 200.0),
         L("n1", "/w1/ck/step-10.pt", 5, 100.0)],  # a staged copy keeps the source's time
        [C("step-10.pt", "n0", "/w0/ck/step-10.pt", 5, 100.0, 10)],
        answered=["n0", "n1"])
    assert [(f.name, f.step, f.central, [w.node for w in f.at]) for f in found] == [
        ("step-10.pt", 10, "step-10.pt", ["n0", "n1"]),
        ("step-20.pt", 20, None, ["n0"])]
    assert ck.to_copy(found, "latest") == [found[1]]
    assert ck.to_copy(found, "every") == [found[1]]
    assert ck.to_copy(found, "none") == []


def test_a_report_counts_while_its_node_is_silent_and_is_dropped_once_it_says_gone() -> None:
    reported = [R("/w0/ck/step-70.pt", "n0", 70, 5000.0)]
    central = [C("step-60.pt", "n0", "/w0/ck/step-60.pt", 5, 4000.0, 60)]
    silent = ck.discover(reported, [], central, answered=[])
    assert [(f.name, f.mtime) for f in silent] == [("step-60.pt", 4000.0), ("step-70.pt", 5000.0)]
    # the node is unreachable: only the head's copy can be resumed from
    assert [f.name for f in ck.resume_candidates(silent, reachable=[])] == ["step-60.pt"]
    assert [f.name for f in ck.resume_candidates(silent, reachable=["n0"])] == [
        "step-70.pt", "step-60.pt"]
    gone = ck.discover(reported, [], central, answered=["n0"])
    assert [f.name for f in gone] == ["step-60.pt"]


def test_a_rewritten_path_is_a_new_checkpoint_not_its_old_copy() -> None:
    found = ck.discover([], [L("n0", "/o/last.ckpt", 9, 300.0)],
                        [C("last.ckpt", "n0", "/o/last.ckpt", 7, 200.0)], ["n0"])
    assert [(f.size_bytes, f.central) for f in found] == [(7, "last.ckpt"), (9, None)]
    assert ck.to_copy(found, "latest") == [found[1]]


def test_latest_passes_over_an_older_uncopied_one() -> None:
    found = ck.discover([], [L("n0", "/c/a", 1, 1.0), L("n0", "/c/b", 1, 2.0)],
                        [C("b", "n0", "/c/b", 1, 2.0)], ["n0"])
    assert ck.to_copy(found, "latest") == []
    assert [f.name for f in ck.to_copy(found, "every")] == ["a"]


def test_prune_names_and_limits() -> None:
    central = [C("s3", "n", "/s3", 1, 3.0), C("s1", "n", "/s1", 1, 1.0),
               C("s2", "n", "/s2", 1, 2.0)]
    assert ck.to_prune(central, 2) == ["s1"]
    assert ck.to_prune(central, 0) == []
    assert ck.central_name("/a/last.ckpt", {}) == "last.ckpt"
    assert ck.central_name("/a/last.ckpt", {"last.ckpt": "/a/last.ckpt"}) == "last.ckpt"
    other = ck.central_name("/b/last.ckpt", {"last.ckpt": "/a/last.ckpt"})
    assert other.startswith("last.ckpt-") and len(other) == len("last.ckpt-") + 8
    assert ck.central_name("/a/.hidden", {}) == "_hidden"
    assert [ck.backoff_s(n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert ck.backoff_s(50) == ck.BACKOFF_MAX_S
    assert ck.room(100, 30, 70) and not ck.room(100, 31, 70)
    assert ck.settled(100.0, 106.0, False) and not ck.settled(100.0, 102.0, False)
    assert ck.settled(100.0, 100.0, True)


def test_expand_env_references() -> None:
    argv = ["--out", "${UGRO_CHECKPOINT_DIR}/x", "--resume=${UGRO_RESUME_FROM}", "$HOME",
            "${not_ours"]
    jobspec.check_references(argv)
    assert jobspec.expand_references(argv, {"UGRO_CHECKPOINT_DIR": "/c"}) == [
        "--out", "/c/x", "--resume=", "$HOME", "${not_ours"]
    with pytest.raises(jobspec.SpecError, match=r"\$\{HOME\}.*is not a variable ugrod sets"):
        jobspec.check_references(["${HOME}/x"])


# ---- the node-side program, for real -------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> NodeAgent:
    a = NodeAgent(LocalTransport("local"), str(tmp_path / "work"))
    await a.prepare()
    return a


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


async def test_send_and_receive_a_directory_checkpoint(agent: NodeAgent, tmp_path: Path) -> None:
    src = tmp_path / "checkpoint-7"
    (src / "sub").mkdir(parents=True)
    (src / "model.bin").write_bytes(os.urandom(3 << 20) + b"end")
    (src / "sub" / "state.json").write_text('{"step": 7}')
    os.utime(src / "model.bin", ns=(1_000_000_000_000, 1_000_000_000_000))
    now, listing = await wire.list_files(agent, str(src))
    assert listing.kind == "dir" and abs(now - __import__("time").time()) < 60
    assert [(e.rel, e.size) for e in listing.files] == [("model.bin", (3 << 20) + 3),
                                                        ("sub/state.json", 11)]
    dest = tmp_path / "node1" / "checkpoint-7"
    async with wire.Sender(agent, 0) as sender, \
            wire.Receiver(agent, str(dest), 0) as receiver:
        for e in listing.files:
            await receiver.begin(e.rel, e.size, e.mtime_ns)
            _, _, sha = await sender.fetch(f"{src}/{e.rel}", 0, receiver.write,
                                           (e.size, e.mtime_ns))
            assert sha == hashlib.sha256((src / e.rel).read_bytes()).hexdigest()
            await receiver.end(sha)
        assert await receiver.commit() == str(dest)
    assert _tree(dest) == _tree(src)
    assert (dest / "model.bin").stat().st_mtime_ns == 1_000_000_000_000  # time kept
    assert not list(dest.parent.glob(".*"))  # no partial left


async def test_a_send_from_an_offset_hashes_the_whole_file(agent: NodeAgent,
                                                           tmp_path: Path) -> None:
    src = tmp_path / "s.pt"
    data = os.urandom(100_000)
    src.write_bytes(data)
    got = bytearray()

    async def sink(b: bytes) -> None:
        got.extend(b)
    async with wire.Sender(agent, 0) as sender:
        size, _, sha = await sender.fetch(str(src), 60_000, sink)
        assert size == 100_000 and bytes(got) == data[60_000:]
        assert sha == hashlib.sha256(data).hexdigest()
        with pytest.raises(wire.TransferError, match="No such file"):
            await sender.fetch(str(tmp_path / "missing"), 0, sink)
    async with wire.Sender(agent, 0) as sender:
        with pytest.raises(wire.SourceChanged):
            await sender.fetch(str(src), 0, sink, (5, 5))


async def test_a_receive_with_the_wrong_sha256_keeps_nothing(agent: NodeAgent,
                                                            tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x.pt"
    async with wire.Receiver(agent, str(dest), 0) as receiver:
        await receiver.begin("", 4, 1)
        await receiver.write(b"abcd")
        with pytest.raises(wire.ChecksumMismatch, match="sha256"):
            await receiver.end("0" * 64)
    assert not dest.exists() and not list(dest.parent.iterdir())


async def test_the_rate_cap_holds(agent: NodeAgent, tmp_path: Path) -> None:
    src = tmp_path / "r.bin"
    src.write_bytes(bytes(600_000))
    loop = __import__("asyncio").get_running_loop()

    async def sink(b: bytes) -> None:
        return None
    async with wire.Sender(agent, 1_000_000) as sender:
        t0 = loop.time()
        await sender.fetch(str(src), 0, sink)
        assert loop.time() - t0 >= 0.45  # 600 kB at 1 MB/s
