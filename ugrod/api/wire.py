"""The API's wire: who asks (peer credentials), what they sent (bodies, query values), and
how a refusal is answered (errors to HTTP statuses: the one place statuses are chosen).

``Host`` names what the API is given of the daemon that serves it: the API sits below
the daemon and never imports it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import pwd
import socket
import struct
from typing import Any, Protocol

import msgspec
from aiohttp import web

from ugrod.api import admission, trust
from ugrod.config import schema as cfgmod
from ugrod.control import Control
from ugrod.core import codec, jobspec
from ugrod.core import events as ev
from ugrod.core.commands import Refused
from ugrod.core.state import InvalidEvent
from ugrod.loops.executor import Executor
from ugrod.loops.progress import Progress
from ugrod.metrics.runtime_stats import RuntimeStats
from ugrod.nodes import codesync
from ugrod.nodes.fleet import Fleet
from ugrod.store.ledger import Ledger
from ugrod.views import Views


class Host(Protocol):
    """What the API reads of the daemon that serves it, at each request (a reload
    replaces the config and the policy)."""

    @property
    def control(self) -> Control: ...

    @property
    def views(self) -> Views: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def executor(self) -> Executor: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def fleet(self) -> Fleet: ...

    @property
    def config(self) -> cfgmod.Config: ...

    @property
    def policy(self) -> trust.Policy: ...

    @property
    def admission(self) -> admission.Admission | None: ...

    @property
    def stats(self) -> RuntimeStats: ...

    @property
    def code_store(self) -> codesync.HeadStore: ...

    @property
    def closing(self) -> asyncio.Event: ...

    @property
    def metrics_port(self) -> int | None: ...

    def fatal(self, exc: BaseException) -> None:
        """The event log failed: stop acknowledging and exit non-zero."""

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the config; what changed."""


class ApiError(Exception):
    """An error for the client: HTTP status, a code word and one line for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


STATUS = {"bad_request": 400, "forbidden": 403, "not_found": 404, "conflict": 409}


def http_error(exc: Exception, request: web.Request) -> web.Response | None:
    """The answer to a refusal a handler raised; None for any other exception (a bug:
    aiohttp answers 500). A failed event-log write is the app's to answer (ugrod stops)."""
    if isinstance(exc, ApiError):
        return error(exc.status, exc.code, exc.message)
    if isinstance(exc, jobspec.SpecError):
        code = "sync_required" if isinstance(exc, jobspec.SyncRequired) else "bad_request"
        return error(400, code, str(exc))
    if isinstance(exc, Refused):
        return error(STATUS.get(exc.code, 409), exc.code, exc.message)
    if isinstance(exc, InvalidEvent):
        return error(409, "conflict", str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error(413, "too_large", f"request body larger than "
                     f"{request.app._client_max_size} bytes")
    if isinstance(exc, web.HTTPException):
        code = "not_found" if exc.status == 404 else "bad_request"
        return error(exc.status, code, exc.reason or "bad request")
    return None


ACTOR = web.RequestKey("actor", ev.Actor)


def peer(request: web.Request) -> ev.Actor:
    """The connecting process's user, from SO_PEERCRED (Unix sockets only).

    The middleware reads it once per request (and refuses peers the policy does not
    admit); handlers get the same object.
    """
    known = request.get(ACTOR)
    if known is not None:
        return known  # type: ignore[no-any-return]
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise ApiError(403, "forbidden", "only local Unix-socket clients are accepted")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return _actor(uid)


@functools.lru_cache(maxsize=256)
def _actor(uid: int) -> ev.Actor:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    return ev.Actor(user=user, uid=uid)


def answer(data: Any, status: int = 200) -> web.Response:
    """A JSON answer, encoded by msgspec (several times faster than the stdlib here)."""
    return web.Response(body=msgspec.json.encode(data), status=status,
                        content_type="application/json")


def error(status: int, code: str, message: str) -> web.Response:
    """An error answer: the status, a code word and one line for people."""
    return answer({"error": message, "code": code}, status=status)


async def read_capped(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, refused past ``limit`` bytes (bodies bigger than the app's cap)."""
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "too_large", f"{what} is larger than {limit} bytes")
    return bytes(buf)


async def read_body(request: web.Request, cls: type[Any]) -> Any:
    """The request's JSON body as ``cls`` (an empty body is ``{}``); a body that is
    not valid JSON, not ``cls``, or names a key twice is a bad request."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    if not raw:
        raw = b"{}"
    try:
        value = msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_request", f"invalid request: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ApiError(400, "bad_request", f"request body is not valid JSON: {exc}") from None
    duplicate = _duplicate_key(raw)
    if duplicate is not None:
        # JSON parsers disagree on which of two equal keys wins; a body that says
        # "priority" twice is refused rather than read one way here and another in a log.
        raise ApiError(400, "bad_request", f"invalid request: key {duplicate[:60]!r} is "
                       f"given twice")
    return value


class _Twice(Exception):
    pass


def _no_twice(items: list[tuple[str, Any]]) -> None:
    if len({k for k, _ in items}) != len(items):
        seen: set[str] = set()
        for k, _ in items:
            if k in seen:
                raise _Twice(k)
            seen.add(k)


# One decoder, made once (json.loads with a hook builds a new one per call: 3x slower).
_PAIRS = json.JSONDecoder(object_pairs_hook=_no_twice)


def _duplicate_key(raw: bytes) -> str | None:
    """The first key that appears twice in one JSON object of ``raw`` (already valid JSON)."""
    if raw.count(b":") < 2:
        return None  # fewer than two keys anywhere: nothing to compare
    try:
        _PAIRS.decode(raw.decode("utf-8"))
    except _Twice as twice:
        return str(twice.args[0])
    except (ValueError, RecursionError):
        return None  # msgspec already accepted it; nothing more to say
    return None


def query_number(request: web.Request, key: str, default: float, lo: float,
                 hi: float) -> float:
    """A finite number from the query string, ``lo <= x <= hi``, else 400 (before any change)."""
    text = request.query.get(key)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, "bad_request", f"{key} must be a number from {lo:g} to {hi:g}, "
                       f"got {text[:40]!r}")
    return value


def iso_z(text: str) -> str:
    """Accept 2026-11-22T10:00:00Z / +00:00 / fractional seconds; return format_ts's form."""
    from datetime import UTC, datetime
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return codec.format_ts(dt.timestamp())


def gone(request: web.Request) -> bool:
    """The client closed its connection (aiohttp drops the transport when it sees that)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def log_damaged(exc: Exception) -> ApiError:
    """A segment of the event log that does not verify: say which, and what to do."""
    return ApiError(503, "log_damaged", f"the event log is damaged, so its history cannot be "
                    f"read: {exc}. ugrod's state in memory is intact and new events are "
                    f"still recorded; restore that segment from a backup (docs/operations.md)")
