"""The control API: JSON over HTTP on a Unix socket, one handler per verb.

``build_app`` routes each verb to its handler (``handlers.py``; streams in
``streams.py``) behind one middleware: the peer's credentials (SO_PEERCRED) are the
actor, so nobody can claim to be someone else; the admission gate counts the
connection; a refusal becomes its HTTP answer (``wire.py``); every request is counted.
``listen`` serves the app on the control socket. Commands are answered only after the
ledger says their events are durable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ugrod.api import admission, trust
from ugrod.api.handlers import Handlers
from ugrod.api.streams import Streams
from ugrod.api.wire import ACTOR, ApiError, Host, error, http_error, peer
from ugrod.store.log import LogWriteFailed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(host: Host, *, max_body_bytes: int = 1 << 20) -> web.Application:
    """The aiohttp application; ``host`` gives the door, the reads and the daemon's parts."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors(host)])
    s = Streams(host)
    h = Handlers(host, s)
    r = app.router
    r.add_get("/v1/ping", h.ping)
    r.add_get("/v1/nodes", h.nodes)
    r.add_post("/v1/nodes/{node}/drain", h.drain)
    r.add_post("/v1/nodes/{node}/undrain", h.undrain)
    r.add_post("/v1/nodes/{node}/check", h.check)
    r.add_get("/v1/nodes/{node}/hostkey", h.hostkey)
    r.add_post("/v1/nodes/{node}/trust", h.trust)
    r.add_get("/v1/jobs", h.jobs)
    r.add_post("/v1/jobs", h.submit)
    r.add_post("/v1/jobs/actions", h.bulk)
    r.add_get("/v1/jobs/{job}", h.job)
    r.add_post("/v1/jobs/{job}/cancel", h.cancel)
    r.add_post("/v1/jobs/{job}/priority", h.priority)
    r.add_post("/v1/jobs/{job}/hold", h.hold)
    r.add_post("/v1/jobs/{job}/release", h.release)
    r.add_post("/v1/jobs/{job}/checkpoint", h.checkpoint)
    r.add_post("/v1/jobs/{job}/resume", h.resume)
    r.add_get("/v1/jobs/{job}/logs", s.logs)
    r.add_get("/v1/jobs/{job}/results", h.results)
    r.add_get("/v1/jobs/{job}/why", h.why)
    r.add_get("/v1/queue", h.queue)
    r.add_get("/v1/events", s.events)
    r.add_post("/v1/reload", h.reload)
    r.add_get("/v1/sweeps", h.sweeps)
    r.add_post("/v1/sweeps", h.sweep_create)
    r.add_get("/v1/sweeps/{sweep}", h.sweep_status)
    r.add_post("/v1/sweeps/{sweep}/cancel", h.sweep_cancel)
    # ---- reads for `ugroctl dashboard` (issue 12) ----
    r.add_get("/v1/jobs/{job}/metrics", h.metrics_series)
    r.add_get("/v1/overview", h.overview)
    r.add_get("/v1/sync", h.sync_settings)
    r.add_post("/v1/sync/trees", h.sync_tree)
    r.add_post("/v1/sync/objects", h.sync_objects)
    return app


class Listener:
    """The control socket being served."""

    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (at most 10 s), close."""
        await self._runner.shutdown()
        await self._runner.cleanup()


async def listen(host: Host, path: Path, gate: admission.Admission, *, max_body_bytes: int,
                 idle_timeout_s: float) -> Listener:
    """Serve the API on the Unix socket ``path`` (made 0660 here: the caller gives it its
    group), with ``gate``'s connection limits; idle connections close after
    ``idle_timeout_s``."""
    app = build_app(host, max_body_bytes=max_body_bytes)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=10, keepalive_timeout=idle_timeout_s)
    await runner.setup()
    old = os.umask(0o117)
    try:
        site = admission.gated_unix_site(gate)(runner, str(path), backlog=1024)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    finally:
        os.umask(old)
    return Listener(runner)


def _errors(host: Host) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        gate = host.admission
        if gate is not None:
            gate.begin(request.transport)  # a connection with a request in progress stays
        try:
            actor = peer(request)
            try:
                host.policy.admit(actor.uid or 0, actor.user)
            except trust.Refused as exc:
                raise ApiError(403, "forbidden", str(exc)) from None
            request[ACTOR] = actor
            resp = await handler(request)
            status = resp.status
            return resp
        except LogWriteFailed as exc:
            # Never acknowledged; ugrod exits and a restart recovers from disk.
            status = 503
            host.fatal(exc)
            return error(503, "unavailable", f"ugrod could not write its event log and is "
                         f"stopping; nothing was recorded ({exc})")
        except Exception as exc:
            answer = http_error(exc, request)
            if answer is None:
                raise
            status = answer.status
            return answer
        finally:
            if gate is not None:
                gate.end(request.transport)
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            host.stats.api_request(name, request.method, status, time.perf_counter() - t0)
    return middleware
