"""The web server of ``ugroctl dashboard``: the page, and its API calls forwarded to ugrod.

It runs in the user's own process on 127.0.0.1 and relays the page's requests
to ugrod's Unix socket (or the ssh-forwarded one of ``--host``), so ugrod sees
the user's uid (SO_PEERCRED) and applies its owner checks unchanged: this
server adds no rights and checks none of ugrod's rules itself.

What keeps other people and other web pages out (docs/cli.md, "dashboard"):

- a random token, given once in the printed address; the first request that
  carries it gets it back as an HttpOnly, SameSite=Strict cookie and is
  redirected to the bare address, so the token leaves the address bar and the
  browser history;
- every request must carry that cookie (or the token), name this server in
  ``Host`` (a DNS-rebound name is refused), and, when it says where it comes
  from (``Origin``), come from this server; a request that changes something
  must say so;
- only the routes the page uses are relayed (reads, and a job's cancel, hold,
  release, priority, checkpoint and resume), with bounded bodies.

aiohttp is imported here only, when the command runs: other commands start
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_FILES = ("vendor/uPlot.iife.min.js", "vendor/uPlot.min.css")
MAX_BODY_BYTES = 64 << 10
HEARTBEAT_S = 15.0

# The page's reads and a job's actions; nothing else of the API is reachable here.
_GET_ROUTES = re.compile(
    r"/v1/(?:ping|nodes|jobs|queue|events|overview"
    r"|jobs/[^/]+(?:/(?:why|results|metrics|logs))?"
    r"|sweeps/[^/]+)")
_POST_ROUTES = re.compile(r"/v1/jobs/[^/]+/(?:cancel|hold|release|priority|checkpoint|resume)")

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}

# Scripts and styles from this server only: an injected <script> or inline handler
# does not run even if some text were ever put into the page as HTML.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MissingAssets(Exception):
    """The chart library was not copied into the package (a checkout without its build step)."""


def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Every file the page may load, by its URL path under /static/ (nothing else is served)."""
    missing = [name for name in VENDOR_FILES if not (root / name).is_file()]
    if missing:
        raise MissingAssets(f"the dashboard's chart library is missing ({', '.join(missing)} "
                            f"under {root}); in a source checkout run "
                            f"`bash scripts/dashboard_assets.sh` (needs npm), then retry")
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in _TYPES}


class Dashboard:
    """The aiohttp application of one dashboard: one port, one token, one ugrod socket."""

    def __init__(self, upstream_socket: str, *, token: str | None = None,
                 static: dict[str, Path] | None = None) -> None:
        self.upstream_socket = upstream_socket
        self.token = token or secrets.token_urlsafe(32)
        self.static = static if static is not None else static_files()
        self.port = 0
        self._session: ClientSession | None = None

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: one name per port, so two dashboards do not clash.
        return f"ugro_dashboard_{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    def allowed_hosts(self) -> set[str]:
        return {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}"}

    # ---- app ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name:.+}", self.asset)
        app.router.add_get("/api/stream", self.stream)
        app.router.add_route("*", "/api/{path:v1/.*}", self.forward)
        app.on_cleanup.append(self._close_session)
        return app

    async def _close_session(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> ClientSession:
        if self._session is None:
            self._session = ClientSession(
                connector=UnixConnector(path=self.upstream_socket),
                timeout=ClientTimeout(total=None, connect=30, sock_read=None))
        return self._session

    # ---- the guard ---------------------------------------------------------------------

    def refusal(self, request: web.Request) -> str | None:
        """Why ``request`` is refused (None: let it through)."""
        hosts = self.allowed_hosts()
        if request.headers.get("Host") not in hosts:
            return "this dashboard answers only at 127.0.0.1/localhost on its own port"
        origin = request.headers.get("Origin")
        if origin is not None and origin not in {f"http://{h}" for h in hosts}:
            return "requests from other web sites are refused"
        # A change must come from this page's own script (fetch sends Origin and the
        # custom header; a form or an image on another site cannot).
        if request.method not in ("GET", "HEAD") and (
                origin is None or request.headers.get("X-Ugro-Dashboard") != "1"):
            return "a change must come from the dashboard page itself"
        given = request.cookies.get(self.cookie_name) or request.headers.get("X-Ugro-Token")
        if request.path == "/" and request.query.get("token"):
            given = request.query["token"]
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return ("this address needs the token printed by `ugroctl dashboard`: open the "
                    "full address it printed")
        return None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        why = self.refusal(request)
        if why is not None:
            if request.path.startswith("/api/"):
                return _json({"error": why, "code": "forbidden"}, 403)
            return web.Response(status=403, text=f"403 forbidden: {why}\n",
                                headers=_HEADERS)
        return await handler(request)

    # ---- the page ----------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("token"):
            # The token becomes a cookie and leaves the address bar (and history).
            resp = web.HTTPSeeOther("/", headers=_HEADERS)
            resp.set_cookie(self.cookie_name, self.token, httponly=True, samesite="Strict",
                            path="/")
            return resp
        return web.FileResponse(self.static["index.html"], headers={
            **_HEADERS, "Content-Type": "text/html; charset=utf-8"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        path = self.static.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(text="no such file\n")
        ctype = _TYPES[path.suffix] + ("; charset=utf-8" if path.suffix in (".js", ".css")
                                       else "")
        return web.FileResponse(path, headers={**_HEADERS, "Content-Type": ctype})

    # ---- the API, relayed --------------------------------------------------------------

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Relay one allowed API request to ugrod and stream its answer back as it comes."""
        raw_path = request.rel_url.raw_path[len("/api"):]
        routes = _GET_ROUTES if request.method == "GET" else _POST_ROUTES
        if request.method not in ("GET", "POST") or not routes.fullmatch(raw_path) \
                or any(unquote(seg) in (".", "..") for seg in raw_path.split("/")):
            return _json({"error": f"{request.method} {raw_path} is not available from the "
                                   f"dashboard (use ugroctl)", "code": "not_found"}, 404)
        query = request.rel_url.raw_query_string
        target = f"http://ugrod{raw_path}" + (f"?{query}" if query else "")
        body = await request.read() if request.method == "POST" else None
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        resp: web.StreamResponse | None = None
        try:
            async with self.session().request(request.method, target, data=body,
                                              headers=headers) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    **_HEADERS, "Cache-Control": "no-store",
                    "Content-Type": up.headers.get("Content-Type", "application/json")})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (ClientError, OSError) as exc:
            if resp is not None and resp.prepared:  # cut off midway (the page went away)
                return resp
            return _json({"error": f"cannot reach ugrod: {exc}", "code": "unavailable"}, 502)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """ugrod's event stream as server-sent events (``id:`` is the event's seq)."""
        after = request.headers.get("Last-Event-ID") or request.query.get("after", "0")
        if not after.isdigit():
            return _json({"error": "after must be an event sequence number",
                          "code": "bad_request"}, 400)
        target = f"http://ugrod/v1/events?follow=1&after={int(after)}"
        try:
            up = await self.session().get(target)
        except (ClientError, OSError) as exc:
            return _json({"error": f"cannot reach ugrod: {exc}", "code": "unavailable"}, 502)
        try:
            if up.status != 200:
                return _json({"error": f"ugrod answered {up.status}", "code": "unavailable"},
                             502)
            resp = web.StreamResponse(headers={
                **_HEADERS, "Content-Type": "text/event-stream", "Cache-Control": "no-store"})
            await resp.prepare(request)
            await resp.write(b"retry: 1000\n\n")
            lines: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def pump() -> None:
                # Lines split here: aiohttp's readline() refuses lines over 64 KiB, and
                # an event may carry a long command line.
                rest = b""
                try:
                    async for chunk in up.content.iter_any():
                        rest += chunk
                        *done, rest = rest.split(b"\n")
                        for line in done:
                            await lines.put(line)
                except (ClientError, OSError):
                    pass
                finally:
                    await lines.put(None)

            reader = asyncio.get_running_loop().create_task(pump())
            try:
                while True:
                    try:
                        line = await asyncio.wait_for(lines.get(), HEARTBEAT_S)
                    except TimeoutError:
                        await resp.write(b": keep-alive\n\n")
                        continue
                    if line is None:
                        break
                    line = line.strip()
                    if not line:
                        continue
                    await resp.write(b"id: %d\ndata: %s\n\n" % (_seq(line), line))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            return resp
        finally:
            up.release()
            up.close()

    # ---- start-up ----------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        """ugrod's /v1/ping through the same socket; raises OSError/ClientError if unreachable."""
        async with self.session().get("http://ugrod/v1/ping") as resp:
            doc: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise ClientError(f"ugrod answered {resp.status}: {doc}")
            return doc


_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Cross-Origin-Opener-Policy": "same-origin",
            "Cross-Origin-Resource-Policy": "same-origin"}


def _json(doc: dict[str, Any], status: int) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc), content_type="application/json",
                        headers={**_HEADERS, "Cache-Control": "no-store"})


def _seq(line: bytes) -> int:
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


async def serve(dash: Dashboard, port: int, ready: Callable[[str], None]) -> None:
    """Bind 127.0.0.1:``port`` (0: a free one), call ``ready(url)``, serve until cancelled."""
    runner = web.AppRunner(dash.app(), access_log=None, handle_signals=False,
                           handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=False)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        dash.port = sockets[0].getsockname()[1] if sockets else port
        ready(dash.url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
