"""Bounded connections on the control socket: per-user caps, idle eviction, descriptor room.

Idle and slow connections once stayed open for ever: at a 1024-descriptor limit,
~1,100 of them made every ``accept()`` fail (EMFILE) and ugrod answered nobody. Now:

- at start ugrod raises its descriptor soft limit to the hard limit (``raise_fd_limit``);
- the socket holds at most ``max_total`` connections, computed from that limit with
  room kept for the event log, snapshots, SSH links and job files, and each peer uid
  at most ``per_user`` of them;
- a connection that would pass a cap first makes room by closing the oldest *idle*
  connection (no request in progress) of that user, or of anyone for the total;
  when none is idle, the newcomer gets ``503`` naming the limit and is closed;
- aiohttp's keep-alive timeout closes connections idle for ``api.idle_timeout_s``,
  including one that connects and never sends a request.

``Admission`` wraps aiohttp's protocol per connection (a thin ``asyncio.Protocol``
proxy): the decision is made when the connection is accepted, before aiohttp sees it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ugrod.api.admission")

FD_RESERVE_MIN = 64        # descriptors never given to clients: log, snapshot, ssh, job files
FD_RESERVE_FRACTION = 0.25


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the descriptor limit from %d to %d: %s", soft,
                           target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_budget(fd_limit: int, configured: int) -> int:
    """How many client connections fit under ``fd_limit`` with room kept for ugrod's own work."""
    reserve = max(FD_RESERVE_MIN, int(fd_limit * FD_RESERVE_FRACTION))
    return max(16, min(configured, fd_limit - reserve))


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])


def _busy_answer(message: str) -> bytes:
    import json  # only on this path

    body = json.dumps({"error": message, "code": "unavailable"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Admission:
    """Counts connections per uid and in total; decides, evicts and refuses."""

    def __init__(self, *, max_total: int, per_user: int) -> None:
        self.max_total = max_total
        self.per_user = per_user
        # Every admitted connection, oldest first: transport -> uid. In-flight requests
        # per transport come from the API middleware (``begin``/``end``).
        self._open: OrderedDict[asyncio.BaseTransport, int | None] = OrderedDict()
        self._per_uid: dict[int | None, int] = {}
        self._busy: dict[asyncio.BaseTransport, int] = {}
        self._reading: set[asyncio.BaseTransport] = set()  # bytes came, no answer yet
        self.refused = 0
        self.evicted = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``create_unix_server`` wrapping aiohttp's ``make``."""
        return lambda: _Gate(self, make())

    # -- the API middleware marks requests in progress (never evicted) --

    def begin(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._busy[transport] = self._busy.get(transport, 0) + 1

    def data(self, transport: asyncio.BaseTransport) -> None:
        """Bytes arrived: a request is under way (not idle) until an answer ends."""
        self._reading.add(transport)

    def end(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._reading.discard(transport)
        if transport is not None and transport in self._busy:
            left = self._busy[transport] - 1
            if left > 0:
                self._busy[transport] = left
            else:
                del self._busy[transport]

    # -- decisions --

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Admit ``transport`` (None) or say why not; may close idle connections to make room."""
        uid = peer_uid(transport)
        if self._per_uid.get(uid, 0) >= self.per_user and not self._evict(uid):
            return (f"too many connections from uid {uid} ({self.per_user} open, all busy); "
                    f"close some and retry")
        if len(self._open) >= self.max_total and not self._evict(None):
            return (f"ugrod has {len(self._open)} connections open, all busy (its limit); "
                    f"retry in a moment")
        self._open[transport] = uid
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        return None

    def _evict(self, uid: int | None) -> bool:
        """Close the oldest idle connection (of ``uid``, or of anyone when None)."""
        for t, owner in self._open.items():
            if (uid is None or owner == uid) and t not in self._busy \
                    and t not in self._reading:
                self._forget(t)
                t.close()
                self.evicted += 1
                return True
        return False

    def _forget(self, transport: asyncio.BaseTransport) -> None:
        uid = self._open.pop(transport, _ABSENT)
        if uid is not _ABSENT:
            left = self._per_uid.get(uid, 1) - 1
            if left > 0:
                self._per_uid[uid] = left
            else:
                self._per_uid.pop(uid, None)
        self._busy.pop(transport, None)
        self._reading.discard(transport)

    def lost(self, transport: asyncio.BaseTransport) -> None:
        self._forget(transport)


_ABSENT: Any = object()


class _Gate(asyncio.Protocol):
    """Admits the connection (or answers 503 and closes it), then forwards to aiohttp."""

    def __init__(self, admission: Admission, inner: asyncio.Protocol) -> None:
        self._admission = admission
        self._inner = inner
        self._admitted = False
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        why = self._admission.admit(transport)
        if why is not None:
            self._admission.refused += 1
            if self._admission.refused == 1 or self._admission.refused % 1000 == 0:
                logger.warning("control socket: refused a connection (%d so far): %s",
                               self._admission.refused, why)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_busy_answer(why))
            transport.close()
            return
        self._admitted = True
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            if self._transport is not None:
                self._admission.data(self._transport)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._admission.lost(self._transport)
        if self._admitted:
            self._inner.connection_lost(exc)


def gated_unix_site(admission: Admission) -> type:
    """``web.UnixSite`` whose connections pass ``admission`` first (aiohttp imported here)."""
    from aiohttp import web

    class GatedUnixSite(web.UnixSite):
        async def start(self) -> None:
            await web.BaseSite.start(self)
            server = self._runner.server
            assert server is not None
            self._server = await asyncio.get_running_loop().create_unix_server(
                admission.factory(server), self._path, backlog=self._backlog)

    return GatedUnixSite
