"""The wire of checkpoint copies: list, send and receive files through a node's
``remote/checkpoint_io.py``, over a bulk SSH stream (see ``Transport.open_stream``).

Every file is hashed on the node (sha256, by the program) and by whoever reads or
writes it here; callers compare the two. A stream that stops moving for ``STALL_S``
is an error naming the node, so a copy never hangs on a node that went away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from ugrod.nodes import programs
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import Stream, TransportError, node_deadline

logger = logging.getLogger(__name__)

PROGRAM = programs.text("checkpoint_io")
STALL_S = 60.0
READ = 1 << 20
SINK_BYTES = 4 << 20  # what a sink is given at once (SSH reads are ~100-250 KB)
MAX_LINE = 64 * 1024


class TransferError(TransportError):
    """A copy failed in a way a later try may not repeat (the reason names the node)."""


class ChecksumMismatch(TransferError):
    """What arrived differs from what the node read: nothing of it is kept."""


class SourceChanged(TransferError):
    """The checkpoint changed while it was copied (being written): try again later."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    rel: str  # "" for a checkpoint that is one file
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Listing:
    path: str
    kind: str  # "file" | "dir"
    files: tuple[FileEntry, ...]


def as_args(run_as: Mapping[str, Any] | None) -> list[str]:
    """``--as UID:GID`` when ugrod (as root) must act with a job owner's rights."""
    if run_as is None:
        return []
    return ["--as", f"{int(run_as['uid'])}:{int(run_as['gid'])}"]


async def list_files(agent: NodeAgent, path: str,
                     run_as: Mapping[str, Any] | None = None) -> tuple[float, Listing]:
    """(the node's clock now, the files of the checkpoint at ``path``)."""
    argv = await agent.program_argv(PROGRAM, *as_args(run_as), "list", path)
    async with node_deadline(agent.node, f"listing {path}", 30):
        result = await agent.transport.run(argv)
    if not result.ok:
        raise TransferError(agent.node, f"cannot list {path}: {result.stderr_line()}")
    try:
        doc = json.loads(result.stdout)
        item = doc["items"][0]
        if "error" in item:
            raise TransferError(agent.node, f"cannot read {path}: {str(item['error'])[:300]}")
        files = tuple(FileEntry(str(r), int(s), int(m)) for r, s, m in item["files"])
        return float(doc["now"]), Listing(str(item["path"]), str(item["kind"]), files)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise TransferError(agent.node, f"listing {path}: unexpected answer "
                                        f"{result.stdout[:200]!r}") from exc


class _Session:
    """One run of the program on a node, its stdout read as lines and raw bytes."""

    def __init__(self, agent: NodeAgent, argv: Sequence[str]) -> None:
        self.agent = agent
        self.node = agent.node
        self._argv = list(argv)
        self._stream: Stream | None = None

    async def __aenter__(self) -> Self:
        argv = await self.agent.program_argv(PROGRAM, *self._argv)
        self._stream = await self.agent.transport.open_stream(argv, bulk=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    @property
    def stream(self) -> Stream:
        if self._stream is None:
            raise TransferError(self.node, "copy stream closed")
        return self._stream

    async def line(self, what: str) -> dict[str, Any]:
        async with node_deadline(self.node, what, STALL_S):
            raw = await self.stream.readline()
        if not raw:
            raise TransferError(self.node, f"{what}: the copy program ended (is "
                                           f"{self.agent.python} there, the disk full?)")
        try:
            doc = json.loads(raw[:MAX_LINE])
        except ValueError as exc:
            raise TransferError(self.node, f"{what}: unexpected answer {raw[:120]!r}") from exc
        if not isinstance(doc, dict):
            raise TransferError(self.node, f"{what}: unexpected answer {raw[:120]!r}")
        if "error" in doc:
            raise TransferError(self.node, f"{what}: {str(doc['error'])[:300]}")
        return doc

    async def send_line(self, doc: Mapping[str, Any]) -> None:
        await self.stream.write(json.dumps(doc).encode() + b"\n")


class Sender(_Session):
    """Reads files on a node: ``fetch`` streams a file's bytes from an offset to a sink."""

    def __init__(self, agent: NodeAgent, rate: float,
                 run_as: Mapping[str, Any] | None = None) -> None:
        super().__init__(agent, [*as_args(run_as), "send", f"{max(rate, 0):.0f}"])

    async def fetch(self, path: str, offset: int, sink: Callable[[bytes], Awaitable[None]],
                    expect: tuple[int, int] | None = None) -> tuple[int, int, str]:
        """Bytes ``offset..`` of ``path`` into ``sink``; (size, mtime_ns, the node's sha256
        of the whole file). ``expect`` (size, mtime_ns): SourceChanged if it is not that."""
        await self.send_line({"path": path, "offset": offset})
        head = await self.line(f"reading {path}")
        size, mtime_ns = int(head["size"]), int(head["mtime_ns"])
        if expect is not None and (size, mtime_ns) != expect:
            await self.close()  # its bytes are on the way: this stream is done
            raise SourceChanged(self.node, f"{path} changed since it was listed")
        left = size - offset
        batch: list[bytes] = []
        held = 0
        while left:
            async with node_deadline(self.node, f"reading {path}", STALL_S):
                data = await self.stream.read(min(left, READ))
            if not data:
                raise TransferError(self.node, f"reading {path}: the stream ended "
                                               f"{left} bytes early")
            left -= len(data)
            batch.append(data)
            held += len(data)
            if held >= SINK_BYTES or not left:  # a few large writes, not thousands
                await sink(b"".join(batch) if len(batch) > 1 else data)
                batch, held = [], 0
        tail = await self.line(f"reading {path}")
        if tail.get("changed"):
            raise SourceChanged(self.node, f"{path} changed while it was copied")
        return size, mtime_ns, str(tail["sha256"])


class Receiver(_Session):
    """Writes a checkpoint on a node: files one by one, each checked there, then moved
    into place at once by ``commit`` (closing without it leaves nothing behind)."""

    def __init__(self, agent: NodeAgent, dest: str, rate: float,
                 run_as: Mapping[str, Any] | None = None) -> None:
        super().__init__(agent, [*as_args(run_as), "receive", dest, f"{max(rate, 0):.0f}"])
        self.dest = dest

    async def begin(self, rel: str, size: int, mtime_ns: int) -> None:
        await self.send_line({"rel": rel, "size": size, "mtime_ns": mtime_ns})

    async def write(self, data: bytes) -> None:
        async with node_deadline(self.node, f"writing {self.dest}", STALL_S):
            await self.stream.write(data)

    async def end(self, sha256: str) -> None:
        """The file's expected sha256: the node compares its own (ChecksumMismatch)."""
        await self.send_line({"sha256": sha256})
        try:
            await self.line(f"writing {self.dest}")
        except TransferError as exc:
            if "sha256" in exc.message:
                raise ChecksumMismatch(self.node, exc.message) from None
            raise

    async def commit(self) -> str:
        await self.send_line({"commit": True})
        doc = await self.line(f"writing {self.dest}")
        return str(doc.get("committed") or self.dest)
