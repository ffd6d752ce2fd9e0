"""The Transport protocol (run argv on one node) and the errors every transport raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class TransportError(Exception):
    """Something between ugrod and a node failed; ``str(e)`` starts with ``node NAME: ``."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"node {node}: {message}")
        self.node = node
        self.message = message


class NodeUnreachable(TransportError):
    """No working connection to the node could be made at all: refused, no answer, host
    key unknown or changed, login refused, SFTP refused.

    Unlike a failed command on a working link, this says the node is ``unreachable``:
    the monitor records it at once (with ``reason``) and the planner places nothing there.
    ``reason`` is the message without any "next attempt in" suffix, so it is stable.
    """

    def __init__(self, node: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(node, message)
        self.reason = reason or message


class HostKeyError(NodeUnreachable):
    """The node's SSH host key is not in known_hosts, or differs from the recorded one."""

    def __init__(
        self, node: str, message: str, *, changed: bool, fingerprint: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(node, message, reason=reason)
        self.changed = changed
        self.fingerprint = fingerprint


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command: exit status (128+signal when killed by one) and its output."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def stderr_line(self) -> str:
        """The last non-empty line of stderr (or stdout), for one-line error messages."""
        for blob in (self.stderr, self.stdout):
            lines = [ln for ln in blob.decode(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1].strip()[:500]
        return f"exit code {self.exit_code}"


class Stream(Protocol):
    """The stdout of a long-running command on a node, line by line."""

    async def readline(self) -> bytes:
        """The next line including its newline; ``b""`` at EOF."""
        ...

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of raw output (a file being copied); ``b""`` at EOF."""
        ...

    async def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin (a request to a long-lived helper)."""
        ...

    async def write_eof(self) -> None:
        """Close the command's stdin (it has everything); its output can still be read."""
        ...

    async def close(self) -> None:
        """Stop the command; leaves nothing running on the head side."""
        ...


@runtime_checkable
class Transport(Protocol):
    """Runs argv on one node. Callers own deadlines via ``asyncio.timeout()``."""

    node: str

    async def connect(self) -> None:
        """Make sure the node is reachable (idempotent); raises TransportError."""
        ...

    async def run(self, argv: Sequence[str], *, input: bytes | None = None) -> CommandResult:
        """Run argv to completion; a non-zero exit is a result, not an error."""
        ...

    async def open_stream(self, argv: Sequence[str], *, bulk: bool = False) -> Stream:
        """Start argv and return its stdout as a Stream.

        ``bulk``: the stream carries a large transfer (a checkpoint copy), kept off the
        connection that carries rank control and logs.
        """
        ...

    async def put_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write a file atomically (temp file + rename), making parent directories."""
        ...

    async def home(self) -> str:
        """The login user's home directory on that node."""
        ...

    async def poke(self, timeout_s: float) -> bool:
        """Whether the node answers at all right now, as cheaply as can be asked (no login,
        no command): the monitor asks it while a node's breaker is open, to try it at once
        when its path comes back instead of after the backoff. Never raises."""
        ...

    async def close(self) -> None:
        """Drop connections; the transport may be used again afterwards."""
        ...


def exit_code_of(returncode: int | None, signal: int | None = None) -> int:
    """A process's status as a shell would report it: 128+N when killed by signal N."""
    if signal is not None:
        return 128 + signal
    if returncode is None:
        return 255
    if returncode < 0:
        return 128 - returncode
    return returncode


@asynccontextmanager
async def node_deadline(node: str, what: str, timeout_s: float) -> AsyncIterator[None]:
    """``asyncio.timeout`` whose expiry raises TransportError naming the node and the step."""
    timeout = asyncio.timeout(timeout_s)
    try:
        async with timeout:
            yield
    except TimeoutError as exc:
        if not timeout.expired():
            raise
        raise TransportError(node, f"{what} did not finish within {timeout_s:g} s") from exc
