"""Transports against real processes and real OpenSSH sshd: commands, files, host keys, faults."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sshd_nodes import SshdCluster, SshdNode

from ugrod.nodes.transport.base import (
    CommandResult,
    HostKeyError,
    Transport,
    TransportError,
    node_deadline,
)
from ugrod.nodes.transport.local import LocalTransport
from ugrod.nodes.transport.ssh import SshTransport, fetch_host_key, host_pattern, trust


def fingerprint_of(node: SshdNode) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{node.host_key}.pub"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


def accepted_logins(node: SshdNode) -> int:
    return node.log_path.read_text().count("Accepted publickey")


@pytest.fixture(params=["local", "ssh"])
async def transport(
    request: pytest.FixtureRequest, ssh_nodes: SshdCluster
) -> AsyncIterator[Transport]:
    t: Transport = LocalTransport("head") if request.param == "local" else ssh_nodes[1].transport()
    try:
        yield t
    finally:
        await t.close()


# ---- the Transport protocol, on both transports -------------------------------------------


async def test_run_returns_exit_code_and_both_outputs(transport: Transport) -> None:
    result = await transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert isinstance(transport, Transport)


async def test_run_feeds_input(transport: Transport) -> None:
    result = await transport.run(["cat"], input=b"a\x00b\nc")
    assert result.ok and result.stdout == b"a\x00b\nc"


async def test_argv_reaches_the_node_verbatim(transport: Transport) -> None:
    nasty = ["a b", "$HOME", "; touch /tmp/ugro-pwned", "'q'", '"dq"', "`id`", "*", ""]
    result = await transport.run(["printf", "%s|", *nasty])
    assert result.stdout.decode() == "".join(f"{arg}|" for arg in nasty)
    assert not Path("/tmp/ugro-pwned").exists()


async def test_signal_death_is_128_plus_signal(transport: Transport) -> None:
    result = await transport.run(["sh", "-c", "kill -TERM $$"])
    assert result.exit_code == 128 + 15


async def test_missing_command_is_127(transport: Transport) -> None:
    result = await transport.run(["ugro-no-such-command-x"])
    assert result.exit_code == 127


async def test_put_file_is_atomic_makes_parents_and_sets_mode(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / transport.node / "a" / "b" / "file.py"
    await transport.put_file(str(path), b"print(1)\n", 0o755)
    await transport.put_file(str(path), b"print(2)\n", 0o755)
    assert path.read_bytes() == b"print(2)\n"
    assert path.stat().st_mode & 0o777 == 0o755
    assert sorted(os.listdir(path.parent)) == ["file.py"]  # no temp files left


async def test_home_is_the_login_home(transport: Transport) -> None:
    assert await transport.home() == os.path.expanduser("~")


async def test_stream_yields_lines_and_close_stops_it(transport: Transport, tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    script = f"echo one; echo two; sleep 0.5; touch {marker}; sleep 30"
    stream = await transport.open_stream(["sh", "-c", script])
    assert await stream.readline() == b"one\n"
    assert await stream.readline() == b"two\n"
    await stream.close()
    await stream.close()  # idempotent
    if isinstance(transport, LocalTransport):  # over SSH, root logins cannot be signalled
        await asyncio.sleep(0.8)
        assert not marker.exists()


async def test_run_without_input_reads_eof(transport: Transport) -> None:
    async with asyncio.timeout(10):
        result = await transport.run(["cat"])
    assert result.ok and result.stdout == b""


async def test_stream_stdin_stays_open_until_close(transport: Transport) -> None:
    """A command can tell that the head went away: its stdin ends when the stream closes."""
    code = "import os, sys; print(os.getpid(), flush=True); sys.stdin.read()"
    stream = await transport.open_stream([sys.executable, "-c", code])
    pid = int(await stream.readline())
    await asyncio.sleep(0.3)
    assert Path(f"/proc/{pid}").exists()
    await stream.close()
    async with asyncio.timeout(3):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.02)


async def test_stream_reports_eof(transport: Transport) -> None:
    stream = await transport.open_stream(["echo", "last"])
    try:
        assert await stream.readline() == b"last\n"
        assert await stream.readline() == b""
    finally:
        await stream.close()


async def test_cancelled_run_leaves_nothing_behind_locally(tmp_path: Path) -> None:
    t = LocalTransport("head")
    pidfile = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await t.run(["sh", "-c", f"echo $$ > {pidfile}; sleep 30"])
    pid = int(pidfile.read_text())
    await asyncio.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


async def test_local_put_file_error_names_the_node(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(TransportError, match=r"^node head: cannot write"):
        await LocalTransport("head").put_file(str(tmp_path / "f" / "x"), b"")


async def test_node_deadline_names_node_and_step() -> None:
    with pytest.raises(TransportError, match=r"^node gpu1: spawn rank 2 did not finish within"):
        async with node_deadline("gpu1", "spawn rank 2", 0.05):
            await asyncio.sleep(1)


# ---- SSH specifics -------------------------------------------------------------------------


async def test_each_node_has_its_own_bin_first_on_path(ssh_nodes: SshdCluster) -> None:
    tool = ssh_nodes[2].bin_dir / "ugro-fake-tool"
    tool.write_text("#!/bin/sh\necho fake on node2\n")
    tool.chmod(0o755)
    t2, t0 = ssh_nodes[2].transport(), ssh_nodes[0].transport()
    try:
        assert (await t2.run(["ugro-fake-tool"])).stdout == b"fake on node2\n"
        assert (await t0.run(["ugro-fake-tool"])).exit_code == 127
    finally:
        tool.unlink()
        await t2.close()
        await t0.close()


async def test_one_connection_shared_by_concurrent_callers(ssh_nodes: SshdCluster) -> None:
    node = ssh_nodes[0]
    t = node.transport()
    before = accepted_logins(node)
    try:
        results = await asyncio.gather(*(t.run(["echo", str(i)]) for i in range(12)))
        assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(12)]
        await asyncio.sleep(0.2)
        assert accepted_logins(node) - before == 1
    finally:
        await t.close()


async def test_concurrency_stays_below_max_sessions(ssh_nodes: SshdCluster) -> None:
    """sshd allows 10 sessions per connection; 12 calls plus 5 streams must all work."""
    t = ssh_nodes[0].transport(max_concurrency=8)
    try:
        streams = [await t.open_stream(["sh", "-c", "echo up; sleep 30"]) for _ in range(5)]
        runs = await asyncio.gather(*(t.run(["sh", "-c", "sleep 0.1; echo ok"]) for _ in range(12)))
        assert all(r.stdout == b"ok\n" for r in runs)
        for s in streams:
            assert await s.readline() == b"up\n"
            await s.close()
    finally:
        await t.close()


async def test_streams_beyond_one_connection_overflow_to_extra_ones(
    ssh_nodes: SshdCluster,
) -> None:
    """More long-lived streams than sshd's MaxSessions allows on one connection all open."""
    t = ssh_nodes[0].transport(max_concurrency=3)  # 1 stream on the main connection
    try:
        async with asyncio.timeout(30):
            streams = await asyncio.gather(
                *(t.open_stream(["sh", "-c", f"echo {i}; exec cat"]) for i in range(7))
            )
            assert sorted([int(await s.readline()) for s in streams]) == list(range(7))
            assert t.connections == 3  # main + two extras of 3 streams each
            assert (await t.run(["echo", "runs still go"])).ok
            for s in streams:
                await s.close()
        assert t.connections == 1
    finally:
        await t.close()


async def test_cancelled_ssh_calls_free_their_channels(ssh_nodes: SshdCluster) -> None:
    t = ssh_nodes[0].transport(max_concurrency=3)
    try:
        for _ in range(6):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await t.run(["sleep", "2"])
        async with asyncio.timeout(5):
            assert (await t.run(["echo", "free"])).stdout == b"free\n"
    finally:
        await t.close()


async def test_unknown_host_key_is_refused_with_fingerprint(
    ssh_nodes: SshdCluster, tmp_path: Path
) -> None:
    node = ssh_nodes[1]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = node.transport(known_hosts=empty)
    with pytest.raises(HostKeyError) as info:
        await t.run(["true"])
    err = info.value
    assert not err.changed and err.node == "node1"
    assert str(err).startswith(
        f"node node1: host key for {node.host}:{node.port} is not in {empty}"
    )
    assert f"ed25519 {fingerprint_of(node)}" in str(err)
    assert "run `ugroctl nodes trust node1`" in str(err)
    await t.close()


async def test_missing_known_hosts_file_is_an_unknown_key(
    ssh_nodes: SshdCluster, tmp_path: Path
) -> None:
    t = ssh_nodes[1].transport(known_hosts=tmp_path / "absent")
    with pytest.raises(HostKeyError, match="is not in"):
        await t.connect()
    await t.close()


async def test_changed_host_key_is_refused_loudly(ssh_nodes: SshdCluster, tmp_path: Path) -> None:
    node = ssh_nodes[2]
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    alg, blob = Path(f"{other}.pub").read_text().split()[:2]
    stale = tmp_path / "known_hosts"
    stale.write_text(f"[{node.host}]:{node.port} {alg} {blob}\n")
    old_fp = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{other}.pub"], capture_output=True, text=True
    ).stdout.split()[1]
    t = node.transport(known_hosts=stale)
    with pytest.raises(HostKeyError) as info:
        await t.run(["true"])
    msg = str(info.value)
    assert info.value.changed
    assert msg.startswith(f"node node2: host key for {node.host}:{node.port} CHANGED")
    assert "man-in-the-middle" in msg
    assert old_fp in msg and fingerprint_of(node) in msg
    await t.close()


async def test_fetch_host_key_then_trust_lets_the_connection_in(
    ssh_nodes: SshdCluster, tmp_path: Path
) -> None:
    node = ssh_nodes[0]
    alg, fingerprint, line = await fetch_host_key(node.host, node.port, 5.0)
    assert alg == "ssh-ed25519" and fingerprint == fingerprint_of(node)
    assert line == node.host_key_line()
    known = tmp_path / "ssh" / "known_hosts"
    assert trust(known, f"{host_pattern(node.host, node.port)} ssh-ed25519 AAAAstale") == 0
    assert trust(known, "other.example ssh-ed25519 AAAAother") == 0
    assert trust(known, line) == 1  # the stale line for the same host is replaced
    assert known.read_text().splitlines() == ["other.example ssh-ed25519 AAAAother", line]
    assert known.stat().st_mode & 0o777 == 0o600
    t = node.transport(known_hosts=known)
    try:
        assert (await t.run(["echo", "in"])).stdout == b"in\n"
    finally:
        await t.close()


async def test_host_key_of_another_type_counts_as_changed(
    ssh_nodes: SshdCluster, tmp_path: Path
) -> None:
    node = ssh_nodes[2]
    other = tmp_path / "ecdsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(other)], check=True)
    alg, blob = Path(f"{other}.pub").read_text().split()[:2]
    stale = tmp_path / "known_hosts"
    stale.write_text(f"[{node.host}]:{node.port} {alg} {blob}\n")
    t = node.transport(known_hosts=stale)
    with pytest.raises(HostKeyError, match="CHANGED") as info:
        await t.connect()
    assert info.value.changed and fingerprint_of(node) in str(info.value)
    await t.close()


async def test_unreadable_identity_file_is_named(ssh_nodes: SshdCluster, tmp_path: Path) -> None:
    t = ssh_nodes[0].transport(identity=tmp_path / "no-key")
    with pytest.raises(TransportError, match=r"^node node0: cannot load identity_file .*no-key"):
        await t.connect()
    locked = tmp_path / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True
    )
    t = ssh_nodes[0].transport(identity=locked)
    with pytest.raises(TransportError, match="passphrase-protected"):
        await t.connect()


async def test_wrong_user_names_node_and_user(ssh_nodes: SshdCluster) -> None:
    t = ssh_nodes[1].transport(user="ugro-nosuchuser")
    with pytest.raises(TransportError) as info:
        await t.connect()
    assert not isinstance(info.value, HostKeyError)
    assert str(info.value).startswith("node node1: SSH login as user 'ugro-nosuchuser'")
    assert "refused" in str(info.value)
    await t.close()


async def test_stopped_sshd_is_refused_then_reconnects(node_guard: SshdCluster) -> None:
    node = node_guard[2]
    t = node.transport()
    try:
        assert (await t.run(["echo", "1"])).ok
        node.stop()
        with pytest.raises(TransportError) as info:
            await t.run(["echo", "2"])
        assert str(info.value).startswith("node node2: ")
        with pytest.raises(
            TransportError,
            match=rf"refused.*{node.host}:{node.port}|"
            rf"{node.host}:{node.port}.*refused",
        ):
            await t.run(["echo", "3"])
        started = time.monotonic()
        with pytest.raises(TransportError, match="next reconnect attempt in"):
            await t.run(["echo", "4"])  # backing off: fails at once with the last error
        assert time.monotonic() - started < 0.1
        node.start()
        assert (await _eventually(t, ["echo", "5"])).stdout == b"5\n"
    finally:
        await t.close()


async def test_reconnects_after_sshd_restart(node_guard: SshdCluster) -> None:
    node = node_guard[1]
    t = node.transport()
    try:
        assert (await t.run(["echo", "before"])).ok
        node.restart()
        assert (await _eventually(t, ["echo", "after"])).stdout == b"after\n"
    finally:
        await t.close()


async def test_hung_sshd_hits_the_connect_deadline(node_guard: SshdCluster) -> None:
    node = node_guard[0]
    node.pause()
    t = node.transport(connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        await t.connect()
    assert time.monotonic() - started < 3
    assert str(info.value) == (
        f"node node0: no SSH answer from {node.host}:{node.port} within 1 s "
        "(host down, firewalled, or sshd hung)"
    )
    node.resume()
    await t.close()


async def test_hung_node_mid_session_hits_the_callers_deadline(node_guard: SshdCluster) -> None:
    node = node_guard[0]
    t = node.transport()
    try:
        assert (await t.run(["true"])).ok
        node.pause()
        with pytest.raises(TransportError, match=r"^node node0: health check did not finish"):
            async with node_deadline(t.node, "health check", 1.0):
                await t.run(["echo", "x"])
        node.resume()
        async with asyncio.timeout(10):
            assert (await t.run(["echo", "back"])).stdout == b"back\n"
    finally:
        await t.close()


async def test_put_file_over_sftp_expands_tilde(ssh_nodes: SshdCluster) -> None:
    t = ssh_nodes[1].transport()
    name = f"ugro-test-{os.getpid()}.txt"
    try:
        await t.put_file(f"~/.cache/{name}", b"x", 0o600)
        target = Path.home() / ".cache" / name
        assert target.read_bytes() == b"x" and target.stat().st_mode & 0o777 == 0o600
        target.unlink()
    finally:
        await t.close()


async def _eventually(t: SshTransport, argv: list[str], timeout_s: float = 15.0) -> CommandResult:
    """Retry through the reconnect backoff until the node answers."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await t.run(argv)
            except TransportError:
                await asyncio.sleep(0.2)
