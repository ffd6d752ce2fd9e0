"""NodeAgent + rank wrapper on real nodes (local and real sshd): spawn, watch, kill, restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from pathlib import Path

import pytest
from sshd_nodes import SshdCluster, job_processes

from ugrod.nodes.agent import (
    WRAPPER_SHA256,
    LogChunk,
    MetricLine,
    NodeAgent,
    RankEvent,
    RankExit,
    RankPid,
    RankStartError,
    WrapperProtocolError,
)
from ugrod.nodes.transport.base import CommandResult, TransportError
from ugrod.nodes.transport.local import LocalStream, LocalTransport

PY = sys.executable  # the node's python; skips the pyenv shim's startup cost

# A rank that logs, reports metrics, records when it exits, and exits with 3.
TRAINER = """
import json, os, sys, time
metrics = open(os.environ["UGRO_METRICS_FILE"], "a")
for step in range(int(sys.argv[1])):
    print("step", step, "loss", 1.0 / (step + 1), flush=True)
    metrics.write(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\\n")
    metrics.flush()
    time.sleep(float(sys.argv[2]))
print("done", flush=True)
open(os.environ["UGRO_JOB_DIR"] + "/ended_at", "w").write(repr(time.time()))
sys.exit(3)
"""


def new_job() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["local", "ssh"])
async def agent(
    request: pytest.FixtureRequest, ssh_nodes: SshdCluster, tmp_path: Path
) -> AsyncIterator[NodeAgent]:
    if request.param == "local":
        a = NodeAgent(LocalTransport("head"), str(tmp_path / "work"), python=PY)
    else:
        a = NodeAgent(ssh_nodes[1].transport(), str(ssh_nodes[1].work_dir), python=PY)
    try:
        yield a
    finally:
        await a.close()
        await a.transport.close()


async def collect(
    events: AsyncGenerator[RankEvent, None], timeout_s: float = 20.0
) -> list[RankEvent]:
    out: list[RankEvent] = []
    async with asyncio.timeout(timeout_s), aclosing(events) as it:
        async for event in it:
            out.append(event)
    return out


def log_of(events: Sequence[RankEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, LogChunk))


def metrics_of(events: Sequence[RankEvent]) -> list[dict[str, float]]:
    return [json.loads(e.data) for e in events if isinstance(e, MetricLine)]


async def test_spawn_and_watch_pid_log_metrics_exit(agent: NodeAgent) -> None:
    job = new_job()
    pid = await agent.spawn(job, 0, 0, [PY, "-c", TRAINER, "5", "0.05"], {"UGRO_JOB_ID": job})
    events = await collect(agent.watch(job, 0, 0))
    exit_seen_at = time.time()
    assert events[0] == RankPid(pid)
    assert events[-1] == RankExit(3)
    assert log_of(events).decode().splitlines()[-1] == "done"
    assert [m["step"] for m in metrics_of(events)] == [0, 1, 2, 3, 4]
    rd = await agent.run_dir(job, 0, 0)
    ended_at = float((await agent.transport.run(["cat", f"{rd}/ended_at"])).stdout)
    assert exit_seen_at - ended_at < 1.0, "exit noticed later than 1 s after it happened"
    status = await agent.status(job, 0, 0)
    assert (status.pid, status.alive, status.exit_code) == (pid, False, 3)


async def test_rank_gets_its_environment_and_pgid(agent: NodeAgent) -> None:
    job = new_job()
    code = "import os; print(os.getpgid(0), os.getsid(0), os.environ['UGRO_JOB_ID'], os.getcwd())"
    cwd = await agent.transport.home()
    pid = await agent.spawn(job, 2, 1, [PY, "-c", code], {"UGRO_JOB_ID": job}, cwd=cwd)
    events = await collect(agent.watch(job, 2, 1))
    assert log_of(events).decode().split() == [str(pid), str(pid), job, cwd]
    rd = await agent.run_dir(job, 2, 1)
    assert rd == f"{await agent.work_dir()}/jobs/{job}/attempt-2/rank-1"
    checkpoints = await agent.checkpoint_dir(job)
    assert (await agent.transport.run(["test", "-d", checkpoints])).ok


async def test_prepare_uploads_the_wrapper_only_when_it_differs(agent: NodeAgent) -> None:
    await agent.prepare()
    wrapper = await agent.wrapper_path()
    stat = await agent.transport.run(["stat", "-c", "%Y.%i", wrapper])
    await agent.prepare()
    assert (await agent.transport.run(["stat", "-c", "%Y.%i", wrapper])).stdout == stat.stdout
    await agent.transport.put_file(wrapper, b"# tampered\n")
    await agent.prepare()
    sha = await agent.transport.run(["sha256sum", wrapper])
    assert sha.stdout.split()[0].decode() == WRAPPER_SHA256


async def test_wrapper_is_uploaded_again_if_the_node_lost_it(agent: NodeAgent) -> None:
    await agent.prepare()
    assert (await agent.transport.run(["rm", await agent.wrapper_path()])).ok
    status = await agent.status(new_job(), 0, 0)
    assert (status.pid, status.alive, status.exit_code) == (None, False, None)


async def test_rewatch_from_offsets_loses_and_repeats_nothing(agent: NodeAgent) -> None:
    job = new_job()
    await agent.spawn(job, 0, 0, [PY, "-c", TRAINER, "30", "0.03"], {"UGRO_JOB_ID": job})
    seen: list[RankEvent] = []
    log_off = met_off = 0
    watches = 0
    while not (seen and isinstance(seen[-1], RankExit)):
        watches += 1
        async with aclosing(agent.watch(job, 0, 0, log_off, met_off)) as events:
            async for event in events:
                if isinstance(event, RankPid) and seen:
                    continue  # every watch starts with the pid
                seen.append(event)
                if isinstance(event, LogChunk):
                    log_off = event.end
                elif isinstance(event, MetricLine):
                    met_off = event.end
                if len(seen) % 4 == 0:
                    break  # the head goes away mid-stream
    assert watches > 2
    rd = await agent.run_dir(job, 0, 0)
    on_node = (await agent.transport.run(["cat", f"{rd}/rank.log"])).stdout
    assert log_of(seen) == on_node
    assert [m["step"] for m in metrics_of(seen)] == list(range(30))


async def test_exit_while_nobody_watches_is_recorded(agent: NodeAgent) -> None:
    job = new_job()
    pid = await agent.spawn(job, 0, 0, [PY, "-c", TRAINER, "2", "0"], {"UGRO_JOB_ID": job})
    await agent.transport.close()  # "ugrod" goes away
    await asyncio.sleep(1.0)
    status = await agent.status(job, 0, 0)
    assert (status.pid, status.alive, status.exit_code) == (pid, False, 3)
    events = await collect(agent.watch(job, 0, 0))
    assert events[0] == RankPid(pid) and events[-1] == RankExit(3)
    assert len(metrics_of(events)) == 2


async def test_spawn_twice_is_the_same_rank(agent: NodeAgent) -> None:
    job = new_job()
    argv = [PY, "-c", "import time; time.sleep(30)"]
    first = await agent.spawn(job, 0, 0, argv, {"UGRO_JOB_ID": job})
    second = await agent.spawn(job, 0, 0, argv, {"UGRO_JOB_ID": job})
    assert first == second and job_processes(job) == [first]
    await agent.kill(job, 0, 0, signal.SIGKILL)


# Leaves a grandchild in its own session (as torchrun does with its workers) and a child in
# the rank's process group; both must die with the rank.
FAMILY = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("family up", flush=True)
time.sleep(60)
"""


async def test_kill_leaves_no_process_of_the_job(
    agent: NodeAgent, no_job_processes: Callable[..., None]
) -> None:
    job = new_job()
    pid = await agent.spawn(job, 0, 0, [PY, "-c", FAMILY], {"UGRO_JOB_ID": job})
    async with asyncio.timeout(10):
        while len(job_processes(job)) < 3:
            await asyncio.sleep(0.05)
    status = await agent.status(job, 0, 0)
    assert status.alive and status.pid == pid and len(status.pids) == 3
    await agent.kill(job, 0, 0, signal.SIGTERM)
    no_job_processes(job, 5.0)
    events = await collect(agent.watch(job, 0, 0))
    assert events[-1] == RankExit(128 + signal.SIGTERM)
    status = await agent.status(job, 0, 0)
    assert not status.alive and status.pids == ()


async def test_kill_after_sigterm_is_ignored_needs_sigkill(
    agent: NodeAgent, no_job_processes: Callable[..., None]
) -> None:
    job = new_job()
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    stubborn += "print('ready', flush=True); time.sleep(60)"
    await agent.spawn(job, 0, 0, [PY, "-c", stubborn], {"UGRO_JOB_ID": job})
    rd = await agent.run_dir(job, 0, 0)
    async with asyncio.timeout(10):
        while b"ready" not in (await agent.transport.run(["cat", f"{rd}/rank.log"])).stdout:
            await asyncio.sleep(0.05)
    await agent.kill(job, 0, 0, signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert (await agent.status(job, 0, 0)).alive
    await agent.kill(job, 0, 0, signal.SIGKILL)
    no_job_processes(job, 5.0)
    assert (await agent.status(job, 0, 0)).exit_code == 128 + signal.SIGKILL


async def test_a_reused_pid_is_never_signalled(agent: NodeAgent) -> None:
    job = new_job()
    await agent.spawn(job, 0, 0, [PY, "-c", "pass"], {"UGRO_JOB_ID": job})
    await collect(agent.watch(job, 0, 0))
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        rd = await agent.run_dir(job, 0, 0)
        # the rank's pid now belongs to someone else: same pid, different start time
        start = int(Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        await agent.transport.put_file(f"{rd}/pid", f"{bystander.pid} {start - 1}\n".encode())
        status = await agent.status(job, 0, 0)
        assert status.pid == bystander.pid and not status.alive
        await agent.kill(job, 0, 0, signal.SIGKILL)
        await asyncio.sleep(0.2)
        assert bystander.poll() is None, "killed a process that merely reused the rank's pid"
    finally:
        bystander.kill()
        bystander.wait()


async def test_command_not_found_is_127_with_a_clear_error(agent: NodeAgent) -> None:
    job = new_job()
    with pytest.raises(RankStartError) as info:
        await agent.spawn(job, 0, 0, ["ugro-no-such-trainer", "--x"], {})
    err = info.value
    assert err.exit_code == 127
    assert str(err).startswith(f"node {agent.node}: rank 0 of {job}: cannot start")
    assert "ugro-no-such-trainer" in str(err) and "No such file or directory" in str(err)
    assert (await agent.status(job, 0, 0)).exit_code == 127
    events = await collect(agent.watch(job, 0, 0))
    assert events[-1] == RankExit(127)
    assert b"cannot start 'ugro-no-such-trainer'" in log_of(events)


async def test_missing_cwd_is_a_start_error(agent: NodeAgent) -> None:
    with pytest.raises(RankStartError, match="ugro-missing-dir"):
        await agent.spawn(new_job(), 0, 0, ["true"], {}, cwd="/nonexistent/ugro-missing-dir")


async def test_checkpoints_free_port_and_reach(agent: NodeAgent) -> None:
    job = new_job()
    code = (
        "import os; d = os.environ['UGRO_CHECKPOINT_DIR']\n"
        "open(d + '/step-10.pt', 'wb').write(b'x' * 10)\n"
        "os.makedirs(d + '/step-20'); open(d + '/step-20/model.bin', 'wb').write(b'y' * 20)\n"
        "open(d + '/.step-30.pt.tmp', 'wb').write(b'partial')\n"
    )
    await agent.spawn(job, 0, 0, [PY, "-c", code], {"UGRO_JOB_ID": job})
    await collect(agent.watch(job, 0, 0))
    found = await agent.list_checkpoints(job)
    ckpt = await agent.checkpoint_dir(job)
    assert {(c.path, c.size_bytes) for c in found} == {
        (f"{ckpt}/step-10.pt", 10),
        (f"{ckpt}/step-20", 20),
    }
    assert await agent.list_checkpoints(new_job()) == []
    await agent.request_checkpoint(job, 0, 0)
    rd = await agent.run_dir(job, 0, 0)
    assert (await agent.transport.run(["test", "-f", f"{rd}/checkpoint.request"])).ok
    port = await agent.free_port()
    assert 0 < port < 65536
    ranged = await agent.free_port(29500, 29600)
    assert 29500 <= ranged <= 29600
    with socket_listening() as (host, listening):
        assert await agent.can_reach(host, listening, 2.0)
    assert not await agent.can_reach("127.0.0.1", 1, 1.0)


async def test_work_dir_tilde_is_the_login_home(ssh_nodes: SshdCluster) -> None:
    agent = NodeAgent(ssh_nodes[0].transport(), "~/ugro-test-work", python=PY)
    try:
        assert await agent.work_dir() == f"{Path.home()}/ugro-test-work"
    finally:
        await agent.close()
        await agent.transport.close()
    with pytest.raises(ValueError):
        await agent.run_dir("../etc", 0, 0)


async def test_closing_a_watch_stops_the_node_side_watcher(agent: NodeAgent) -> None:
    job = new_job()
    await agent.spawn(job, 0, 0, [PY, "-c", "import time; time.sleep(30)"], {"UGRO_JOB_ID": job})
    rd = await agent.run_dir(job, 0, 0)
    async with aclosing(agent.watch(job, 0, 0)) as events:
        async for _event in events:
            break
    async with asyncio.timeout(3):
        while watchers_of(rd):
            await asyncio.sleep(0.05)
    await agent.kill(job, 0, 0, signal.SIGKILL)


async def test_ranks_on_three_nodes_started_at_once_survive_the_head(
    ssh_nodes: SshdCluster, no_job_processes: Callable[..., None]
) -> None:
    job = new_job()
    agents = [NodeAgent(n.transport(), str(n.work_dir), python=PY) for n in ssh_nodes]
    code = "import os, time; print(os.environ['NODE_RANK'], flush=True); time.sleep(1.5)"
    pids = await asyncio.gather(
        *(
            a.spawn(job, 0, r, [PY, "-c", code], {"UGRO_JOB_ID": job, "NODE_RANK": str(r)})
            for r, a in enumerate(agents)
        )
    )
    assert len(set(pids)) == 3 and sorted(job_processes(job)) == sorted(pids)
    for a in agents:  # the head (ugrod) goes away; the ranks keep running
        await a.close()
        await a.transport.close()
    await asyncio.sleep(0.3)
    assert sorted(job_processes(job)) == sorted(pids)
    agents = [NodeAgent(n.transport(), str(n.work_dir), python=PY) for n in ssh_nodes]
    try:
        results = await asyncio.gather(*(collect(a.watch(job, 0, r)) for r, a in enumerate(agents)))
        for rank, events in enumerate(results):
            assert log_of(events) == f"{rank}\n".encode() and events[-1] == RankExit(0)
        no_job_processes(job, 2.0)
    finally:
        for a in agents:
            await a.close()
            await a.transport.close()


# ---- a hostile node: the wrapper's output is untrusted input ---------------------------------


class HostileNode(LocalTransport):
    """A real local transport whose watch command prints the bytes of ``payload`` instead."""

    def __init__(self, payload: Path) -> None:
        super().__init__("evil1")
        self.payload = payload

    async def open_stream(self, argv: Sequence[str]) -> LocalStream:
        return await super().open_stream(["cat", str(self.payload)])


GOOD_PID = b'{"t":"pid","pid":42}\n'


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([b"not json\n"], "malformed line"),
        ([b'{"t":"pid","pid":"42"}\n'], "Expected `int`"),
        ([b'{"t":"rm -rf","x":1}\n'], "Invalid value 'rm -rf'"),
        ([b'{"t":"pid","pid":-4}\n'], "pid must be positive"),
        ([GOOD_PID, b'{"t":"log","o":5,"d":"aGk="}\n'], "log offset 5, expected 0"),
        (
            [GOOD_PID, b'{"t":"log","o":0,"d":"aGk="}\n', b'{"t":"log","o":0,"d":"aGk="}\n'],
            "log offset 0, expected 2",
        ),
        ([b'{"t":"log","o":0,"d":"***"}\n'], "not base64"),
        ([b'{"t":"metric","o":0,"e":0,"d":"{}"}\n'], "metrics offsets 0-0"),
        ([b'{"t":"exit","code":1.5}\n'], "Expected `int`"),
        ([b'{"t":"pid","pid":1' + b"0" * 5000 + b"}\n"], "malformed line"),
        ([b"\xff\xfe\x00garbage\n"], "malformed line"),
        ([GOOD_PID], "ended before the rank's exit was reported"),
        ([b'{"t":"error","message":"no run directory /x"}\n'], "no run directory /x"),
    ],
    ids=[
        "text",
        "type",
        "tag",
        "negpid",
        "gap",
        "repeat",
        "b64",
        "metric",
        "code",
        "huge",
        "binary",
        "eof",
        "error",
    ],
)
async def test_malformed_wrapper_output_is_a_clear_error(
    lines: list[bytes], needle: str, tmp_path: Path
) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"".join(lines))
    agent = NodeAgent(HostileNode(payload), str(tmp_path / "work"), python=PY)
    with pytest.raises(TransportError) as info:
        await collect(agent.watch("job", 0, 0))
    assert str(info.value).startswith("node evil1: ")
    assert needle in str(info.value)
    if needle != "no run directory /x" and "ended before" not in needle:
        assert isinstance(info.value, WrapperProtocolError)


async def test_malformed_replies_to_commands_are_clear_errors(tmp_path: Path) -> None:
    class Liar(LocalTransport):
        """Answers every command with the same lie (the prepare step too, if asked)."""

        lie_to_prepare = True

        async def run(self, argv: Sequence[str], *, input: bytes | None = None) -> CommandResult:
            if "-c" in argv and not self.lie_to_prepare:
                return await super().run(argv, input=input)
            return await super().run(["printf", "%s", '{"pid": "many", "alive": 3}'])

        async def open_stream(self, argv: Sequence[str]) -> LocalStream:
            return await super().open_stream(["echo", '{"id": "one", "rc": []}'])

    liar = Liar("evil2")
    agent = NodeAgent(liar, str(tmp_path), python=PY)
    with pytest.raises(WrapperProtocolError, match=r"^node evil2: unexpected answer from"):
        await agent.prepare()
    liar.lie_to_prepare = False
    with pytest.raises(WrapperProtocolError, match=r"^node evil2: status of"):
        await agent.status("job", 0, 0)
    with pytest.raises(WrapperProtocolError, match=r"^node evil2: starting rank 0 of job"):
        await agent.spawn("job", 0, 0, ["x"], {})


async def test_commands_share_one_session_and_survive_its_loss(tmp_path: Path) -> None:
    class Counting(LocalTransport):
        runs = 0

        async def run(self, argv: Sequence[str], *, input: bytes | None = None) -> CommandResult:
            self.runs += 1
            return await super().run(argv, input=input)

    transport = Counting("head")
    agent = NodeAgent(transport, str(tmp_path / "work"), python=PY)
    job = new_job()
    try:
        await agent.prepare()
        before = transport.runs
        pid = await agent.spawn(job, 0, 0, ["sleep", "30"], {"UGRO_JOB_ID": job})
        for _ in range(5):
            assert (await agent.status(job, 0, 0)).pid == pid
        await agent.free_port()
        assert transport.runs == before  # all through the one serve process
        # (rank supervisors are forked from it, so they show the same command line)
        servers = [
            p
            for p in watchers_of(str(tmp_path / "work"), b"serve")
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())
        ]
        assert len(servers) == 1
        os.kill(servers[0], signal.SIGKILL)  # the session dies: calls still work
        assert (await agent.status(job, 0, 0)).alive
        assert (await agent.status(job, 0, 0)).alive
        assert transport.runs == before + 1  # one direct call, then a new session
        await agent.kill(job, 0, 0, signal.SIGKILL)
    finally:
        await agent.close()


# ---- helpers -------------------------------------------------------------------------------


def watchers_of(path: str, command: bytes = b"watch") -> list[int]:
    """Wrapper processes running ``command`` whose argv mentions ``path`` (or a file in it)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command in argv and any(a.startswith(path.encode()) for a in argv):
                found.append(int(name))
    return found


@contextmanager
def socket_listening() -> Iterator[tuple[str, int]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield "127.0.0.1", int(sock.getsockname()[1])
