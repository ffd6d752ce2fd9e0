"""LocalTransport: the head node itself, argv run with asyncio subprocesses (never a shell)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import Sequence

from ugrod.nodes.transport.base import CommandResult, TransportError, exit_code_of

# A watch stream's line carries at most ~90 KiB of base64; leave room for hostile input to
# be reported as "line too long" instead of exhausting memory.
_STREAM_LINE_LIMIT = 4 * 1024 * 1024


async def _kill_group(proc: asyncio.subprocess.Process, grace_s: float = 1.0) -> None:
    """SIGTERM the child's process group, SIGKILL after ``grace_s``, and reap it."""
    if proc.returncode is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                async with asyncio.timeout(grace_s):
                    await proc.wait()
                break
            except TimeoutError:
                continue
    # The group may outlive its leader (children still writing to our pipes).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class LocalStream:
    """stdout of a local child process; close() ends its stdin and kills its process group."""

    def __init__(self, node: str, proc: asyncio.subprocess.Process) -> None:
        self._node = node
        self._proc = proc

    async def readline(self) -> bytes:
        assert self._proc.stdout is not None
        try:
            return await self._proc.stdout.readline()
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise TransportError(
                self._node, f"stream line longer than {_STREAM_LINE_LIMIT} bytes"
            ) from exc

    async def read(self, n: int) -> bytes:
        assert self._proc.stdout is not None
        return await self._proc.stdout.read(n)

    async def write_eof(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()

    async def write(self, data: bytes) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            raise TransportError(self._node, "stream closed")
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise TransportError(self._node, f"stream closed: {exc}") from exc

    async def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()
        await asyncio.shield(_kill_group(self._proc))

    async def __aenter__(self) -> LocalStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class LocalTransport:
    """Runs argv on this machine; cancellation kills the child's whole process group."""

    def __init__(self, node: str = "local") -> None:
        self.node = node

    async def connect(self) -> None:
        return None

    async def run(self, argv: Sequence[str], *, input: bytes | None = None) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            return CommandResult(127, b"", f"{argv[0]}: command not found ({exc})\n".encode())
        except PermissionError as exc:
            return CommandResult(126, b"", f"{argv[0]}: {exc}\n".encode())
        try:
            stdout, stderr = await proc.communicate(input)
        except BaseException:
            await asyncio.shield(_kill_group(proc, grace_s=0.2))
            raise
        return CommandResult(exit_code_of(proc.returncode), stdout, stderr)

    async def open_stream(self, argv: Sequence[str], *, bulk: bool = False) -> LocalStream:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,  # open until close(), as over SSH
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                limit=_STREAM_LINE_LIMIT,
            )
        except OSError as exc:
            raise TransportError(self.node, f"cannot start {argv[0]}: {exc}") from exc
        return LocalStream(self.node, proc)

    async def put_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        try:
            await asyncio.to_thread(_write_atomic, os.path.expanduser(path), data, mode)
        except OSError as exc:
            raise TransportError(self.node, f"cannot write {path}: {exc}") from exc

    async def home(self) -> str:
        return os.path.expanduser("~")

    async def poke(self, timeout_s: float) -> bool:
        return True  # this machine

    async def close(self) -> None:
        return None


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, rename."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
