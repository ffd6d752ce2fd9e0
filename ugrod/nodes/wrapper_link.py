"""The link to a node's rank wrapper: where it lives, its upload, and calls to it.

The wrapper (``nodes/remote/rank_wrapper.py``, its libraries inlined) is uploaded to
``WORK_DIR/.ugro/`` when the node's copy differs (sha256), and run with the node's
Python isolated (``-I -S``). Most calls go over one long-lived ``rank_wrapper serve``
session per node; any failure of it falls back to one fresh command.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import posixpath
from typing import Any

import msgspec

from ugrod.nodes import programs
from ugrod.nodes.transport.base import CommandResult, Stream, Transport, TransportError

logger = logging.getLogger("ugrod.nodes.agent")

# The wrapper as uploaded: one file, its libraries inlined (ugrod/nodes/programs.py).
WRAPPER_SOURCE = programs.text("rank_wrapper").encode()
WRAPPER_SHA256 = hashlib.sha256(WRAPPER_SOURCE).hexdigest()
_MAX_REPLY = 16 * 1024 * 1024

# The wrapper needs only the stdlib: no site-packages (.pth files make a big environment's
# interpreter start several times slower), no PYTHON* variables, no user site.
_ISOLATED = ("-I", "-S")
# Makes the work dirs, says the interpreter's real path and the installed wrapper's sha256.
_PREPARE = programs.text("prepare")


class WrapperProtocolError(TransportError):
    """The node's rank wrapper answered something that is not what the protocol says."""


class _SessionReply(msgspec.Struct):
    id: int
    rc: int
    out: Any = None
    err: str = ""


_session_decoder = msgspec.json.Decoder(_SessionReply)
# Answered by the long-lived session; `reach` waits on the network, so it runs on its own.
_SESSION_COMMANDS = frozenset(
    {"start", "status", "kill", "alive-pids", "checkpoint", "ls-checkpoints", "free-port",
     "sync-missing", "sync-tree", "fence", "claim"}
)


class WrapperLink:
    """One node's rank wrapper, reached through the node's Transport."""

    def __init__(self, transport: Transport, work_dir: str, python: str) -> None:
        self.transport = transport
        self.node = transport.node
        self.python = python
        self._work_dir_setting = work_dir
        self._work_dir: str | None = None
        self._prepared = False
        self._wrapper_python = python
        self._preparing = asyncio.Lock()
        self._session: Stream | None = None
        self._session_lock = asyncio.Lock()
        self._next_id = 0

    # ---- where ------------------------------------------------------------------------

    async def work_dir(self) -> str:
        """The node-side work directory, absolute ('~' expanded with the login's home)."""
        if self._work_dir is None:
            wd = self._work_dir_setting
            if wd == "~" or wd.startswith("~/"):
                wd = await self.transport.home() + wd[1:]
            if not wd.startswith("/"):
                raise TransportError(self.node, f"work_dir {wd!r} must be absolute or start with ~")
            self._work_dir = posixpath.normpath(wd)
        return self._work_dir

    async def wrapper_path(self) -> str:
        return f"{await self.work_dir()}/.ugro/rank_wrapper.py"

    # ---- the wrapper -----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Make the work dirs and upload the wrapper if the node's copy differs (sha256)."""
        wd = await self.work_dir()
        wrapper = await self.wrapper_path()
        result = await self.transport.run(
            [self.python, *_ISOLATED, "-c", _PREPARE, wrapper, f"{wd}/.ugro", f"{wd}/jobs"]
        )
        if not result.ok:
            raise TransportError(
                self.node, f"{self.python} failed on the node: {result.stderr_line()}"
            )
        lines = result.stdout.decode(errors="replace").split("\n")
        if len(lines) < 2 or not lines[0].startswith("/"):
            raise WrapperProtocolError(
                self.node, f"unexpected answer from {self.python}: {result.stdout[:200]!r}"
            )
        self._wrapper_python = lines[0]
        if lines[1].strip() != WRAPPER_SHA256:
            await self.transport.put_file(wrapper, WRAPPER_SOURCE, 0o600)
        self._prepared = True

    async def argv(self, *args: str) -> list[str]:
        if not self._prepared:
            async with self._preparing:
                if not self._prepared:
                    await self.prepare()
        return [self._wrapper_python, *_ISOLATED, await self.wrapper_path(), *args]

    async def program_argv(self, source: str, *args: str) -> list[str]:
        """argv running a stdlib-only program (its source text) with the node's Python."""
        await self.argv()  # prepared: the interpreter's real path is known
        return [self._wrapper_python, *_ISOLATED, "-c", source, *args]

    async def call(self, *args: str, input: bytes | None = None) -> CommandResult:
        if args[0] in _SESSION_COMMANDS:
            try:
                return await self._session_call(list(args), input)
            except TransportError as exc:  # e.g. the link dropped: one fresh command instead
                logger.debug(
                    "node %s: wrapper session failed (%s); running directly", self.node, exc
                )
        result = await self.transport.run(await self.argv(*args), input=input)
        if result.exit_code == 2 and b"can't open file" in result.stderr:
            self._prepared = False  # the work dir was wiped under us: upload again, once
            result = await self.transport.run(await self.argv(*args), input=input)
        return result

    async def _session_call(self, argv: list[str], input: bytes | None) -> CommandResult:
        """One request to the node's long-lived ``rank_wrapper serve`` (opened on first use).

        Saves a login shell and an interpreter start per call (~0.1-0.5 s with a busy
        .bashrc). Requests are serialised; any failure drops the session.
        """
        async with self._session_lock:
            if self._session is None:
                self._session = await self.transport.open_stream(await self.argv("serve"))
            session = self._session
            self._next_id += 1
            request: dict[str, object] = {"id": self._next_id, "argv": argv}
            if input is not None:
                request["stdin"] = input.decode()
            try:
                await session.write(json.dumps(request).encode() + b"\n")
                while True:
                    line = await session.readline()
                    if not line:
                        raise TransportError(self.node, "the rank wrapper session ended")
                    try:
                        reply = _session_decoder.decode(line)
                    except msgspec.DecodeError as exc:
                        raise WrapperProtocolError(
                            self.node, f"malformed rank wrapper reply: {exc}: {line[:160]!r}"
                        ) from exc
                    if reply.id == self._next_id:
                        break
            except BaseException:
                self._session = None
                await asyncio.shield(session.close())
                raise
        out = b"" if reply.out is None else json.dumps(reply.out).encode()
        return CommandResult(reply.rc, out, reply.err.encode())

    async def close(self) -> None:
        """End the node's wrapper session (the transport stays open)."""
        async with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            await session.close()

    def reply(self, result: CommandResult, what: str) -> Any:
        """The wrapper's one JSON document on stdout, or a clear error."""
        text = result.stdout.strip()
        if not text:
            raise TransportError(self.node, f"{what} failed: {result.stderr_line()}")
        if len(text) > _MAX_REPLY:
            raise WrapperProtocolError(self.node, f"{what}: reply of {len(text)} bytes")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise WrapperProtocolError(
                self.node, f"{what}: not JSON from the rank wrapper: {text[:200]!r}"
            ) from exc
