"""NodeAgent: a rank's lifecycle on one node (start, watch, status, kill) via the rank wrapper.

Works on top of any Transport. Everything the node says back is untrusted input: the
wrapper's output is decoded against typed structs, offsets are checked for gaps and
repeats, and anything else is a WrapperProtocolError naming the node, never a crash.
Nothing is ever passed through a shell built from user input: argv lists only (the SSH
transport quotes them with ``shlex.join``).

Reaching the wrapper (its upload, the long-lived session, one JSON reply per call) is
``wrapper_link.WrapperLink``; this module is what the calls mean for a rank.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ugrod.core.names import valid_name
from ugrod.core.state import Job
from ugrod.nodes.transport.base import Transport, TransportError
from ugrod.nodes.wrapper_link import WRAPPER_SHA256 as WRAPPER_SHA256
from ugrod.nodes.wrapper_link import WRAPPER_SOURCE as WRAPPER_SOURCE
from ugrod.nodes.wrapper_link import WrapperLink
from ugrod.nodes.wrapper_link import WrapperProtocolError as WrapperProtocolError

logger = logging.getLogger("ugrod.nodes.agent")

# The account a rank of a job runs as on a node (the rank wrapper's run_as), or None for
# the wrapper's own; raises LaunchError when there is none allowed.
RunAs = Callable[[Job, str], Mapping[str, Any] | None]


def no_switch(job: Job, node: str) -> None:
    """RunAs of a ugrod that never switches users: the wrapper's own account."""
    return None


def job_claim(job: Job) -> dict[str, Any]:
    """What makes a node's job dir this job's (``NodeAgent.spawn``): a dir an earlier job of
    the same name left there (a wiped state dir, another head) is moved aside, never read
    as this job's exits, fence marks or checkpoints."""
    return {"token": f"{job.id}@{job.submitted_at:.6f}", "first": job.attempt <= 1}


async def job_cwd(job: Job, agent: NodeAgent) -> str | None:
    """Where the job's ranks start on the agent's node: its --sync copy, or its cwd."""
    return await agent.code_dir(job.id) if job.spec.sync else job.spec.cwd


class RankStartError(TransportError):
    """The rank's command could not be started (e.g. not found: exit_code 127)."""

    def __init__(self, node: str, message: str, exit_code: int) -> None:
        super().__init__(node, message)
        self.exit_code = exit_code


# ---- events and answers -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RankPid:
    pid: int


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Bytes of rank.log starting at ``offset``; resume a watch at ``end``."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class MetricLine:
    """One line of metrics.jsonl (without its newline); resume a watch at ``end``."""

    offset: int
    data: bytes
    end: int


@dataclass(frozen=True, slots=True)
class RankExit:
    """The rank ended: its exit status, 128+N if killed by signal N, or LOST.

    ``leftovers``: how many processes its main process left running (they were killed
    before the exit was recorded) and their names.
    """

    exit_code: int
    leftovers: int = 0
    leftover_names: tuple[str, ...] = ()
    at: float | None = field(default=None, compare=False)  # by the node's clock


RankEvent = RankPid | LogChunk | MetricLine | RankExit


@dataclass(frozen=True, slots=True)
class RankStatus:
    """``alive``: the rank's process (same pid and start time) or one of its descendants."""

    pid: int | None
    alive: bool
    exit_code: int | None
    pids: tuple[int, ...] = ()
    exited_at: float | None = None


@dataclass(frozen=True, slots=True)
class CheckpointFile:
    path: str
    size_bytes: int
    mtime: float


# ---- the wrapper's wire format --------------------------------------------------------


class _Pid(msgspec.Struct, tag_field="t", tag="pid"):
    pid: int


class _Log(msgspec.Struct, tag_field="t", tag="log"):
    o: int
    d: str


class _Metric(msgspec.Struct, tag_field="t", tag="metric"):
    o: int
    e: int
    d: str


class _Exit(msgspec.Struct, tag_field="t", tag="exit"):
    code: int
    left: int = 0
    names: list[str] = []
    at: float | None = None


class _Error(msgspec.Struct, tag_field="t", tag="error"):
    message: str


_WatchLine = _Pid | _Log | _Metric | _Exit | _Error
_watch_decoder = msgspec.json.Decoder(_WatchLine)


class _Status(msgspec.Struct):
    pid: int | None
    alive: bool
    exit_code: int | None
    pids: list[int] = []
    exited_at: float | None = None


class _Fenced(msgspec.Struct):
    killed: list[int]
    alive: list[int]


class _Checkpoint(msgspec.Struct):
    path: str
    size_bytes: int
    mtime: float


class NodeAgent:
    """Ranks on one node, through its Transport and the uploaded rank wrapper."""

    def __init__(self, transport: Transport, work_dir: str, python: str = "python3", *,
                 clean_env: bool = False, cgroups: bool = True) -> None:
        self.transport = transport
        # clean_env: ranks get the login basics of their account (HOME, USER, LOGNAME,
        # PATH, SHELL, locale) plus the job's env, not the wrapper's environment (the
        # local node, whose wrapper inherits ugrod's). cgroups: a cgroup per rank where
        # the wrapper can make one (root and cgroup v2).
        self.clean_env = clean_env
        self.cgroups = cgroups
        self.node = transport.node
        self.python = python
        self.link = WrapperLink(transport, work_dir, python)

    # ---- the wrapper (``WrapperLink``) and paths ------------------------------------------

    async def work_dir(self) -> str:
        """The node-side work directory, absolute ('~' expanded with the login's home)."""
        return await self.link.work_dir()

    async def wrapper_path(self) -> str:
        return await self.link.wrapper_path()

    async def prepare(self) -> None:
        """Make the work dirs and upload the wrapper if the node's copy differs (sha256)."""
        await self.link.prepare()

    async def program_argv(self, source: str, *args: str) -> list[str]:
        """argv running a stdlib-only program (its source text) with the node's Python."""
        return await self.link.program_argv(source, *args)

    async def close(self) -> None:
        """End the node's wrapper session (the transport stays open)."""
        await self.link.close()

    async def job_dir(self, job: str) -> str:
        if not valid_name(job):
            raise ValueError(f"invalid job id {job!r}")
        return f"{await self.work_dir()}/jobs/{job}"

    async def run_dir(self, job: str, attempt: int, rank: int) -> str:
        if attempt < 0 or rank < 0:
            raise ValueError(f"invalid attempt/rank {attempt}/{rank}")
        return f"{await self.job_dir(job)}/attempt-{int(attempt)}/rank-{int(rank)}"

    async def checkpoint_dir(self, job: str) -> str:
        return f"{await self.job_dir(job)}/checkpoints"

    async def code_dir(self, job: str) -> str:
        """Where a --sync job's copy of its code lives on this node."""
        return f"{await self.job_dir(job)}/code"

    async def sync_store(self) -> str:
        return f"{await self.work_dir()}/sync/objects"

    async def claim(self, job: str, claim: Mapping[str, Any]) -> None:
        """Make the node's job dir this job's now (see ``spawn``): before a retry's
        checkpoint is looked for or staged on a node the job has not run on."""
        jd = await self.job_dir(job)
        reply = self.link.reply(
            await self.link.call("claim", jd, input=json.dumps(dict(claim)).encode()),
            f"claiming {jd}")
        self._moved(job, reply)

    def _moved(self, job: str, reply: Any) -> None:
        if isinstance(reply, dict) and isinstance(reply.get("moved_to"), str):
            logger.warning("job %s: node %s had a job dir of an earlier job named %s; moved "
                           "it to %s", job, self.node, job, reply["moved_to"])

    # ---- ranks ------------------------------------------------------------------------

    async def spawn(
        self,
        job: str,
        attempt: int,
        rank: int,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None = None,
        run_as: Mapping[str, Any] | None = None,
        program: int | None = None,
        claim: Mapping[str, Any] | None = None,
    ) -> int:
        """Start a rank detached on the node; its pid (= its process group id).

        ``run_as`` ({uid, gid, groups, user}): the account the rank runs as, for a
        wrapper running as root (the head node when ugrod runs as root).
        ``program``: the index in argv of the user's own command, which the wrapper
        checks before starting anything (found, executable): RankStartError if not.
        ``claim`` ({token, first}): the job dir is made this job's first; one an earlier
        job of the same name left there is moved aside on the node (and logged here).
        """
        rd = await self.run_dir(job, attempt, rank)
        ckpt = await self.checkpoint_dir(job)
        full_env = {
            "UGRO_JOB_DIR": rd,
            "UGRO_METRICS_FILE": f"{rd}/metrics.jsonl",
            "UGRO_CHECKPOINT_DIR": ckpt,
            **env,
        }
        spec: dict[str, Any] = {"argv": list(argv), "env": full_env, "cwd": cwd,
                                "mkdirs": [ckpt], "clean_env": self.clean_env,
                                "cgroup": self.cgroups,
                                "program": program}
        if run_as is not None:
            spec["run_as"] = dict(run_as)
        if claim is not None:
            spec["claim"] = dict(claim)
        result = await self.link.call("start", rd, "--spec-stdin", input=json.dumps(spec).encode())
        reply = self.link.reply(result, f"starting rank {rank} of {job}")
        self._moved(job, reply)
        match reply:
            case {"pid": int(pid)} if pid > 0:
                return pid
            case {"error": str(error), "exit_code": int(code)}:
                raise RankStartError(self.node, f"rank {rank} of {job}: {error}", code)
        raise WrapperProtocolError(self.node, f"starting rank {rank} of {job}: reply {reply!r}")

    async def watch(
        self, job: str, attempt: int, rank: int, log_offset: int = 0, metrics_offset: int = 0
    ) -> AsyncGenerator[RankEvent, None]:
        """Stream a rank's pid, log, metrics and finally its exit (then stop).

        Use ``contextlib.aclosing`` when stopping early. Resume with the last event's
        ``end`` offsets to lose and repeat nothing.
        """
        rd = await self.run_dir(job, attempt, rank)
        argv = await self.link.argv("watch", rd, str(log_offset), str(metrics_offset))
        stream = await self.transport.open_stream(argv)
        offsets = [log_offset, metrics_offset]
        try:
            while True:
                line = await stream.readline()
                if not line:
                    raise TransportError(
                        self.node, f"watch of {rd} ended before the rank's exit was reported"
                    )
                event = _decode(self.node, line, offsets, rd)
                if isinstance(event, RankExit):
                    await stream.close()  # free the channel even if the caller never closes us
                    yield event
                    return
                yield event
        finally:
            await stream.close()

    async def status(self, job: str, attempt: int, rank: int) -> RankStatus:
        rd = await self.run_dir(job, attempt, rank)
        reply = self.link.reply(await self.link.call("status", rd), f"status of {rd}")
        try:
            st = msgspec.convert(reply, _Status)
        except msgspec.ValidationError as exc:
            raise WrapperProtocolError(self.node, f"status of {rd}: {exc}: {reply!r}") from exc
        return RankStatus(st.pid, st.alive, st.exit_code, tuple(st.pids), st.exited_at)

    async def alive_pids(self, run_dirs: Sequence[str]) -> dict[str, list[int]]:
        """For each run dir, the pids of its rank's processes still alive (one call)."""
        if not run_dirs:
            return {}
        reply = self.link.reply(await self.link.call("alive-pids", *run_dirs), "alive-pids")
        try:
            return msgspec.convert(reply, dict[str, list[int]])
        except msgspec.ValidationError as exc:
            raise WrapperProtocolError(self.node, f"alive-pids: {exc}") from exc

    async def kill(self, job: str, attempt: int, rank: int, sig: int) -> None:
        """Signal the rank's process group and its descendants, if still that rank's."""
        rd = await self.run_dir(job, attempt, rank)
        result = await self.link.call("kill", rd, str(int(sig)))
        if not result.ok:
            raise TransportError(self.node, f"kill {rd}: {result.stderr_line()}")

    async def fence(self, run_dirs: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Fence run dirs of ended attempts: no late start of them may run, and whatever of
        their ranks is alive is killed. Run dir -> (processes killed, processes still alive)."""
        if not run_dirs:
            return {}
        reply = self.link.reply(await self.link.call("fence", *run_dirs), "fence")
        try:
            found = msgspec.convert(reply, dict[str, _Fenced])
        except msgspec.ValidationError as exc:
            raise WrapperProtocolError(self.node, f"fence: {exc}") from exc
        return {d: (len(f.killed), len(f.alive)) for d, f in found.items()}

    async def request_checkpoint(self, job: str, attempt: int, rank: int) -> None:
        rd = await self.run_dir(job, attempt, rank)
        result = await self.link.call("checkpoint", rd)
        if not result.ok:
            raise TransportError(self.node, f"checkpoint request {rd}: {result.stderr_line()}")

    async def list_checkpoints(
        self, job: str, patterns: Sequence[str] = (), cwd: str | None = None
    ) -> list[CheckpointFile]:
        """The job's checkpoint dir, plus what the glob ``patterns`` match on the node
        (relative ones under ``cwd``, else the wrapper's directory, where ranks start)."""
        args = ["ls-checkpoints", await self.checkpoint_dir(job)]
        if patterns:
            args += [cwd or "", *patterns]
        reply = self.link.reply(await self.link.call(*args), "ls-checkpoints")
        try:
            found = msgspec.convert(reply, list[_Checkpoint])
        except msgspec.ValidationError as exc:
            raise WrapperProtocolError(self.node, f"ls-checkpoints: {exc}") from exc
        return [CheckpointFile(c.path, c.size_bytes, c.mtime) for c in found]

    async def free_port(self, low: int = 0, high: int = 0) -> int:
        """A TCP port free on the node right now (in low..high when given)."""
        args = ["free-port"] + ([str(low), str(high)] if low else [])
        reply = self.link.reply(await self.link.call(*args), "free-port")
        match reply:
            case {"port": int(port)} if 0 < port < 65536:
                return port
            case {"error": str(error)}:
                raise TransportError(self.node, error)
        raise WrapperProtocolError(self.node, f"free-port: reply {reply!r}")

    async def can_reach(self, host: str, port: int, timeout_s: float) -> bool:
        """Whether a TCP connect from the node to host:port succeeds within timeout_s."""
        result = await self.link.call("reach", host, str(int(port)), str(float(timeout_s)))
        if result.exit_code not in (0, 1):
            raise TransportError(self.node, f"reach {host}:{port}: {result.stderr_line()}")
        return result.exit_code == 0

    # ---- code sync (--sync) -------------------------------------------------------

    async def sync_missing(self, objects: Sequence[tuple[str, int]]) -> list[str]:
        """The sha256s of ``objects`` ((sha256, size) pairs) this node's store lacks."""
        payload = json.dumps([list(o) for o in objects]).encode()
        reply = self.link.reply(await self.link.call("sync-missing", await self.sync_store(),
                                             input=payload), "sync-missing")
        match reply:
            case {"missing": list(missing)} if all(isinstance(m, str) for m in missing):
                return list(missing)
        raise WrapperProtocolError(self.node, f"sync-missing: reply {str(reply)[:200]!r}")

    async def sync_put(self, frames: AsyncGenerator[bytes, None]) -> int:
        """Send framed objects (``SHA SIZE\\n`` + bytes, ..., ``end\\n``); bytes stored."""
        stream = await self.transport.open_stream(
            await self.link.argv("sync-put", await self.sync_store()))
        try:
            async for chunk in frames:
                await stream.write(chunk)
            line = await stream.readline()
        finally:
            await stream.close()
        try:
            reply = json.loads(line) if line.strip() else {"error": "no answer"}
        except ValueError:
            reply = {"error": f"not JSON: {line[:200]!r}"}
        match reply:
            case {"stored": int(_), "bytes": int(size)}:
                return size
            case {"error": str(error)}:
                raise TransportError(self.node, f"storing code objects: {error}")
        raise WrapperProtocolError(self.node, f"sync-put: reply {str(reply)[:200]!r}")

    async def sync_tree(self, job: str, tree: str, entries: Sequence[Sequence[Any]],
                        claim: Mapping[str, Any] | None = None) -> str:
        """Copy the tree out of the node's store into the job's code dir; that dir.
        ``claim``: as for ``spawn`` (the code dir is the first thing a --sync job writes)."""
        dest = await self.code_dir(job)
        doc: dict[str, Any] = {"tree": tree, "entries": [list(e) for e in entries]}
        if claim is not None:
            doc["claim"] = dict(claim)
        result = await self.link.call("sync-tree", await self.sync_store(), dest,
                                      input=json.dumps(doc).encode())
        reply = self.link.reply(result, "sync-tree")
        self._moved(job, reply)
        if not isinstance(reply, dict) or "files" not in reply:
            raise WrapperProtocolError(self.node, f"sync-tree: reply {str(reply)[:200]!r}")
        return dest


def _decode(node: str, line: bytes, offsets: list[int], rd: str) -> RankEvent:
    """One watch line as an event; checks offsets continue exactly where expected."""

    def bad(why: str) -> WrapperProtocolError:
        return WrapperProtocolError(
            node,
            f"malformed line from the rank wrapper watching {rd}: {why}: {line[:160]!r}",
        )

    try:
        msg = _watch_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise bad(str(exc)) from exc
    match msg:
        case _Pid(pid=pid):
            if pid <= 0:
                raise bad("pid must be positive")
            return RankPid(pid)
        case _Log(o=o, d=d):
            if o != offsets[0]:
                raise bad(f"log offset {o}, expected {offsets[0]}")
            try:
                data = base64.b64decode(d, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise bad("log data is not base64") from exc
            offsets[0] = o + len(data)
            return LogChunk(o, data)
        case _Metric(o=o, e=e, d=d):
            if o != offsets[1] or e <= o:
                raise bad(f"metrics offsets {o}-{e}, expected start {offsets[1]}")
            offsets[1] = e
            return MetricLine(o, d.encode(), e)
        case _Exit(code=code, left=left, names=names, at=at):
            clean = tuple("".join(c for c in n[:32] if c.isprintable()) for n in names[:8])
            return RankExit(code, max(0, left), clean, at)
        case _Error(message=message):
            raise TransportError(node, f"watching {rd}: {message[:300]}")
    raise bad("unknown message")
