"""The control API: JSON over HTTP on a Unix socket, one handler per verb.

Handlers parse and check input, turn it into events, and answer only after
the ledger says they are durable. The connecting process's credentials
(SO_PEERCRED) are the actor: nobody can claim to be someone else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import pwd
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ugrod.api import trust
from ugrod.control import BulkBody, Control
from ugrod.core import codec, commands, jobspec
from ugrod.core import events as ev
from ugrod.core import render_json as rj
from ugrod.core.commands import Refused
from ugrod.core.jobspec import SubmitBody, SweepBody, procs_per_node
from ugrod.core.state import TERMINAL, InvalidEvent, Job, JobState
from ugrod.nodes import codesync
from ugrod.store.log import LogError, LogWriteFailed
from ugrod.views import Views

if TYPE_CHECKING:
    from ugrod.daemon import Daemon

class ApiError(Exception):
    """An error for the client: HTTP status, a code word and one line for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_ACTOR = web.RequestKey("actor", ev.Actor)


def peer(request: web.Request) -> ev.Actor:
    """The connecting process's user, from SO_PEERCRED (Unix sockets only).

    The middleware reads it once per request (and refuses peers the policy does not
    admit); handlers get the same object.
    """
    known = request.get(_ACTOR)
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


def build_app(daemon: Daemon, *, max_body_bytes: int = 1 << 20) -> web.Application:
    """The aiohttp application; ``daemon`` gives the ledger, executor, config and monitor."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors(daemon)])
    h = Handlers(daemon)
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
    r.add_get("/v1/jobs/{job}/logs", h.logs)
    r.add_get("/v1/jobs/{job}/results", h.results)
    r.add_get("/v1/jobs/{job}/why", h.why)
    r.add_get("/v1/queue", h.queue)
    r.add_get("/v1/events", h.events)
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


MAX_PENDING_LINE = 1 << 20  # a log line longer than this is passed on in pieces

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors(daemon: Daemon) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        gate = daemon.admission
        if gate is not None:
            gate.begin(request.transport)  # a connection with a request in progress stays
        try:
            actor = peer(request)
            try:
                daemon.policy.admit(actor.uid or 0, actor.user)
            except trust.Refused as exc:
                raise ApiError(403, "forbidden", str(exc)) from None
            request[_ACTOR] = actor
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as exc:
            status = exc.status
            return _error(exc.status, exc.code, exc.message)
        except jobspec.SpecError as exc:
            status = 400
            code = "sync_required" if isinstance(exc, jobspec.SyncRequired) else "bad_request"
            return _error(400, code, str(exc))
        except Refused as exc:
            status = _STATUS.get(exc.code, 409)
            return _error(status, exc.code, exc.message)
        except InvalidEvent as exc:
            status = 409
            return _error(409, "conflict", str(exc))
        except LogWriteFailed as exc:
            # Never acknowledged; ugrod exits and a restart recovers from disk.
            status = 503
            daemon.fatal(exc)
            return _error(503, "unavailable", f"ugrod could not write its event log and is "
                          f"stopping; nothing was recorded ({exc})")
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return _error(413, "too_large", f"request body larger than "
                          f"{request.app._client_max_size} bytes")
        except web.HTTPException as exc:
            status = exc.status
            code = "not_found" if exc.status == 404 else "bad_request"
            return _error(exc.status, code, exc.reason or "bad request")
        finally:
            if gate is not None:
                gate.end(request.transport)
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            daemon.stats.api_request(name, request.method, status, time.perf_counter() - t0)
    return middleware


_STATUS = {"bad_request": 400, "forbidden": 403, "not_found": 404, "conflict": 409}


def _json(data: Any, status: int = 200) -> web.Response:
    """A JSON answer, encoded by msgspec (several times faster than the stdlib here)."""
    return web.Response(body=msgspec.json.encode(data), status=status,
                        content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": message, "code": code}, status=status)


async def _read_capped(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, refused past ``limit`` bytes (bodies bigger than the app's cap)."""
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "too_large", f"{what} is larger than {limit} bytes")
    return bytes(buf)


async def _body(request: web.Request, cls: type[Any]) -> Any:
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


class Handlers:
    """Route handlers; thin: parse, check, record, answer."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.c: Control = daemon.control  # client commands
        self.v: Views = daemon.views  # client reads
        self.streams = 0  # followers being served now (logs -f, events -f, submit --wait)

    # ---- helpers -----------------------------------------------------------

    def _job(self, request: web.Request) -> Job:
        return self.c.job(request.match_info["job"])

    def _admin(self, request: web.Request, verb: str) -> ev.Actor:
        actor = peer(request)
        self.c.admin(actor, verb)
        return actor

    def _job_json(self, job: Job, viewer: ev.Actor | None = None) -> dict[str, Any]:
        """A job as ``viewer`` may see it: someone else's env values and metrics hidden."""
        if not self.c.may_see(viewer, job):
            out = rj.job(job, None)
            out["spec"]["env"] = trust.redact_env(job.spec.env)
        else:
            out = rj.job(job, self.d.executor.latest.get(job.id))
            # every checkpoint found (reported, on nodes, on the head), as last looked at
            copier = self.d.executor.checkpoints
            out["checkpoints_found"] = copier.describe(job, copier.discovered(job))
        if job.spec.gpus_per_node == 0 and job.placement:
            # CUDA_VISIBLE_DEVICES is empty for a job that asked for no GPU (another job
            # may hold them): said here, so "why is it slow?" has an answer.
            nodes = self.d.ledger.state.nodes
            out["cpu_only_on_gpu_nodes"] = [p.node for p in job.placement
                                            if p.node in nodes and nodes[p.node].gpus]
        return out

    def _may_see(self, request: web.Request, job: Job, what: str) -> None:
        self.c.may_read(peer(request), job, what)

    async def _job_answer(self, job_id: str, status: int = 200,
                          viewer: ev.Actor | None = None) -> web.Response:
        return _json({"job": self._job_json(self.d.ledger.state.jobs[job_id], viewer)},
                     status=status)

    # ---- daemon and nodes --------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        from ugrod import __version__
        return _json({"ok": True, "version": __version__,
                                  "seq": self.d.ledger.state.seq, "pid": os.getpid(),
                                  "streams": self.streams,
                                  "metrics_port": self.d.metrics_port})

    async def nodes(self, request: web.Request) -> web.Response:
        state = self.d.ledger.state
        held = rj.held_gpus(state)
        nodes = [rj.node(n, state.jobs_on(n.name), self.d.fleet.node_view(n.name),
                         held.get(n.name, ()))
                 for n in sorted(state.nodes.values(), key=lambda n: n.name)]
        return _json({"nodes": nodes, "cluster": rj.cluster_summary(nodes)})

    def _node_name(self, request: web.Request) -> str:
        return self.c.node(request.match_info["node"])

    async def drain(self, request: web.Request) -> web.Response:
        actor, name = self._admin(request, "drain nodes"), self._node_name(request)
        body = await _body(request, dict[str, str])
        state = await self.c.drain(actor, name, body.get("reason", ""))
        return _json({"node": rj.node(state.nodes[name], state.jobs_on(name), None,
                                      rj.held_gpus(state).get(name, ()))})

    async def undrain(self, request: web.Request) -> web.Response:
        actor, name = self._admin(request, "undrain nodes"), self._node_name(request)
        state = await self.c.undrain(actor, name)
        return _json({"node": rj.node(state.nodes[name], state.jobs_on(name), None,
                                      rj.held_gpus(state).get(name, ()))})

    async def check(self, request: web.Request) -> web.Response:
        name = self._node_name(request)
        body = await _body(request, dict[str, bool])
        checks = await self.d.fleet.check_node(name, deep=bool(body.get("deep")))
        return _json({"node": name, "checks": checks})

    async def hostkey(self, request: web.Request) -> web.Response:
        name = self._node_name(request)
        return _json(await self.d.fleet.host_key(name))

    async def trust(self, request: web.Request) -> web.Response:
        self._admin(request, "trust host keys")
        name = self._node_name(request)
        body = await _body(request, dict[str, str])
        line = body.get("line")
        if not isinstance(line, str) or not line:
            raise ApiError(400, "bad_request", "missing 'line': the known_hosts line to trust")
        return _json(await self.d.fleet.trust_host_key(name, line))

    async def reload(self, request: web.Request) -> web.Response:
        self._admin(request, "reload the configuration")
        return _json(await self.d.reload())

    # ---- jobs ----------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        state = self.d.ledger.state
        if request.query.get("all") in ("1", "true", "yes"):
            chosen = sorted(state.jobs.values(), key=lambda j: j.submit_seq)
        else:
            active = list(state.active_jobs())
            ended = [state.jobs[j] for j in self.v.recent_ended(50)]
            chosen = ended + active
        viewer = peer(request)
        return _json({"jobs": [self._job_json(j, viewer) for j in chosen]})

    async def job(self, request: web.Request) -> web.Response:
        return _json({"job": self._job_json(self._job(request), peer(request))})

    async def submit(self, request: web.Request) -> web.Response:
        actor = peer(request)
        body: SubmitBody = await _body(request, SubmitBody)
        dry_run = request.query.get("dry_run") in ("1", "true")
        done = await self.c.submit(actor, body, dry_run=dry_run)
        if done.preview is not None:
            return _json({"job": self._job_json(done.preview), "dry_run": True,
                          "plan": done.plan})
        return await self._job_answer(done.job, status=201 if done.created else 200,
                                      viewer=actor)

    async def _act(self, request: web.Request, action: str, verb: str,
                   priority: int | None = None) -> Job:
        """One action on the job in the path, decided on the newest state (user words)."""
        return await self.c.act(peer(request), request.match_info["job"], action, verb,
                                priority)

    async def bulk(self, request: web.Request) -> web.Response:
        """cancel/hold/release/priority over named jobs and/or a filter, as one batch."""
        body: BulkBody = await _body(request, BulkBody)
        done, refused = await self.c.bulk(peer(request), body)
        state = self.d.ledger.state
        return _json({"action": body.action, "jobs": [self._job_json(state.jobs[j])
                                                      for j in done],
                      "refused": [ev.to_builtins(r) for r in refused]})

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        wait = request.query.get("wait") in ("1", "true")
        settled = await self.c.cancel(peer(request), job_id, wait=wait)
        return await self._job_answer(job_id, status=200 if settled else 202)

    async def priority(self, request: web.Request) -> web.Response:
        self._job(request)
        body = await _body(request, dict[str, int])
        p = jobspec.check_priority(body.get("priority"))
        job = await self._act(request, "priority", "change the priority of", p)
        return await self._job_answer(job.id)

    async def hold(self, request: web.Request) -> web.Response:
        job = await self._act(request, "hold", "hold")
        return await self._job_answer(job.id)

    async def release(self, request: web.Request) -> web.Response:
        job = await self._act(request, "release", "release")
        return await self._job_answer(job.id)

    async def checkpoint(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        wait_s = _query_number(request, "wait", 0.0, 0.0, 600.0)
        await self.c.checkpoint(peer(request), job_id, wait_s, gone=lambda: _gone(request))
        return await self._job_answer(job_id)

    async def resume(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        body = await _body(request, dict[str, dict[str, str]])
        await self.c.resume(peer(request), job_id, body.get("set", {}))
        return await self._job_answer(job_id)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        self._may_see(request, job, "logs")
        ranks = [p.rank for p in job.placement] or [0]
        # node_rank: one node's log file (its torchrun agent and every process it runs);
        # rank: a global rank, i.e. node rank x processes per node + local rank. With one
        # process per node they are the same; with several, the node's log is filtered to
        # the lines torchrun prefixed with "[rankN]:" (the executor asks it to).
        nproc = procs_per_node(job.spec)
        only: bytes | None = None
        for key in ("node_rank", "rank"):
            text = request.query.get(key)
            if text is None:
                continue
            try:
                n = int(text)
            except ValueError:
                raise ApiError(400, "bad_request", f"{key} must be an integer, got {text!r}") \
                    from None
            node_rank = n if key == "node_rank" else n // nproc
            if node_rank not in ranks or n < 0:
                world = f"node ranks {', '.join(map(str, ranks))}" if key == "node_rank" \
                    else f"ranks 0-{len(ranks) * nproc - 1}"
                raise ApiError(404, "not_found", f"job {job.id} has no {key.replace('_', ' ')} "
                               f"{n} ({world})")
            if key == "rank" and nproc > 1:
                only = f"[rank{n}]:".encode()
            ranks = [node_rank]
            break
        follow = request.query.get("follow") in ("1", "true")
        tail_q = request.query.get("tail")
        tail = None if tail_q is None or tail_q == "" \
            else int(_query_number(request, "tail", 0, 0, 100_000))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        jobdir = self.d.executor.job_dir(job.id)
        files = {r: jobdir / f"rank_{r}.log" for r in ranks}
        offsets = {r: _start_offset(f, tail) for r, f in files.items()}
        # Without follow, the whole log as it is now, streamed 1 MiB at a time (the
        # client sees the end of the stream, not a silent cut at the first chunk).
        ends = {r: _size(f) for r, f in files.items()}
        prefix = len(ranks) > 1
        pending = {r: b"" for r in ranks}
        self.streams += follow
        try:
            await self._send_logs(request, resp, job, files, offsets, ends, pending, prefix,
                                  follow, only)
        except ConnectionError:
            pass  # the client went away mid-write: nothing more to say to it
        finally:
            self.streams -= follow
        if not _gone(request):
            await resp.write_eof()
        return resp

    async def _send_logs(self, request: web.Request, resp: web.StreamResponse, job: Job,
                         files: dict[int, Path], offsets: dict[int, int],
                         ends: dict[int, int], pending: dict[int, bytes], prefix: bool,
                         follow: bool, only: bytes | None = None) -> None:
        while True:
            for r, f in files.items():
                chunk = _read_from(f, offsets[r])
                if not follow:
                    chunk = chunk[:max(0, ends[r] - offsets[r])]
                    if not chunk:
                        ends[r] = offsets[r]  # done, or the file shrank under us
                if chunk:
                    offsets[r] += len(chunk)
                    data = pending[r] + chunk
                    lines = data.split(b"\n")
                    pending[r] = lines.pop()
                    if len(pending[r]) > MAX_PENDING_LINE:  # a line without end: pass it on
                        lines.append(pending[r])
                        pending[r] = b""
                    if only is not None:
                        lines = [ln for ln in lines if ln.startswith(only)]
                    if lines:
                        out = b"".join((f"[rank {r}] ".encode() if prefix else b"") + ln + b"\n"
                                       for ln in lines)
                        await resp.write(out)
            if not follow:
                if all(offsets[r] >= ends[r] for r in files):
                    break
                continue  # more of the log as it was: no pause between chunks
            current = self.d.ledger.state.jobs[job.id]
            if current.state in TERMINAL | {JobState.RETRYING} \
                    and all(_size(f) <= offsets[r] for r, f in files.items()):
                break
            if _gone(request) or self.d.closing.is_set():
                break  # the client went away (a closed page, Ctrl-C), or ugrod is stopping
            await asyncio.sleep(0.25)
        for r, rest in pending.items():
            if rest and not _gone(request) and (only is None or rest.startswith(only)):
                await resp.write((f"[rank {r}] ".encode() if prefix else b"") + rest + b"\n")

    async def _next(self, sub: asyncio.Queue[ev.Record | None],
                    request: web.Request) -> ev.Record | None:
        """The next event for a follower; None once the client is gone or ugrod stops."""
        while True:
            try:
                async with asyncio.timeout(STREAM_CHECK_S):
                    return await sub.get()
            except TimeoutError:
                if _gone(request) or self.d.closing.is_set():
                    return None

    async def results(self, request: web.Request) -> web.Response:
        job = self._job(request)
        self._may_see(request, job, "results (metrics and checkpoints)")
        return _json(await self.v.results(job))

    async def why(self, request: web.Request) -> web.Response:
        job = self._job(request)
        try:
            history = await asyncio.to_thread(self.v.why, job.id)
        except LogError as exc:
            raise _log_damaged(exc) from None
        return _json({"job": self._job_json(job, peer(request)), "history": history})

    async def queue(self, request: web.Request) -> web.Response:
        viewer = peer(request)
        queue = self.v.queue_view()
        for item in queue:
            j = self.d.ledger.state.jobs.get(item["job"]["id"])
            if j is not None:
                item["job"] = self._job_json(j, viewer)
        return _json({"queue": queue})

    async def events(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        job_filter = q.get("job")
        try:
            after = int(q.get("after", "0"))
            limit = int(q["limit"]) if "limit" in q else None
            since = codec.parse_ts(_iso_z(q["since"])) if "since" in q else None
            if after < 0 or after >= 1 << 63 or (limit is not None
                                                 and not 0 < limit <= 10_000_000):
                raise ValueError("out of range")
        except (ValueError, OverflowError, ev.EventError):
            raise ApiError(400, "bad_request", "after must be a non-negative integer, limit "
                           "an integer from 1 to 10000000, and since an ISO-8601 UTC time "
                           "like 2026-11-22T10:00:00Z") from None
        follow = q.get("follow") in ("1", "true")
        viewer = peer(request)
        policy, jobs = self.d.policy, self.d.ledger.state.jobs
        hide = None if policy.is_admin(viewer.uid or 0) and viewer.uid is not None else (
            lambda job_id: not policy.may_see(viewer.uid, getattr(jobs.get(job_id), "uid", -1)))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        sub = self.d.ledger.subscribe() if follow else None
        self.streams += follow
        try:
            last = after
            try:  # read before answering: a damaged segment is a clear error, not a cut stream
                lines = await asyncio.to_thread(
                    _filtered_history, self.d.ledger, after, job_filter, since, limit, hide)
            except LogError as exc:
                raise _log_damaged(exc) from None
            await resp.prepare(request)
            for seq, line in lines:
                await resp.write(line + b"\n")
                last = seq
            while sub is not None:
                rec = await self._next(sub, request)
                if rec is None:
                    break
                if rec.seq <= last or not _matches(rec, job_filter, since):
                    continue
                await resp.write(codec.encode(_redacted(rec, hide)) + b"\n")
                last = rec.seq
        except ConnectionError:
            pass  # the client went away mid-write: nothing more to say to it
        finally:
            self.streams -= follow
            if sub is not None:
                self.d.ledger.unsubscribe(sub)
        if not _gone(request):
            await resp.write_eof()
        return resp

    # ---- code sync (--sync) -------------------------------------------------------
    # Each user has their own store (by uid): what one uploads, no one else can name
    # in a job or probe for. Every object is checked against its sha256 as it arrives.

    def _sync_limits(self) -> tuple[int, int]:
        cfg = self.d.config.sync
        return cfg.max_mb * 1_000_000, cfg.max_files

    async def sync_settings(self, request: web.Request) -> web.Response:
        peer(request)
        max_bytes, max_files = self._sync_limits()
        return _json({"default": self.d.config.sync.default, "max_bytes": max_bytes,
                      "max_files": max_files})

    async def sync_tree(self, request: web.Request) -> web.Response:
        """A manifest in: the tree's digest and the contents ugrod still lacks out."""
        actor = peer(request)
        max_bytes, max_files = self._sync_limits()
        raw = await _read_capped(request, max_files * 256 + 4096, "the manifest")
        try:
            doc = msgspec.json.decode(raw)
            entries = doc.get("entries") if isinstance(doc, dict) else None
            tree, checked = codesync.check_manifest(entries, max_bytes=max_bytes,
                                                    max_files=max_files)
        except msgspec.DecodeError as exc:
            raise ApiError(400, "bad_request", f"manifest is not valid JSON: {exc}") from None
        except codesync.SyncError as exc:
            raise ApiError(400, "bad_request", f"--sync: {exc}") from None
        store = self.d.code_store
        missing = await asyncio.to_thread(store.missing, actor.uid, checked)
        await asyncio.to_thread(store.save_tree, actor.uid, tree, checked)
        return _json({"tree": tree, "missing": missing, "files": len(checked),
                      "bytes": sum(e[2] for e in checked)})

    async def sync_objects(self, request: web.Request) -> web.Response:
        """Framed objects (``SHA256 SIZE\\n`` + bytes ... ``end\\n``), each checked."""
        actor = peer(request)
        max_bytes, _ = self._sync_limits()
        try:
            stored, size = await self.d.code_store.receive(
                actor.uid, request.content.iter_any(), max_bytes=max_bytes)
        except codesync.SyncError as exc:
            raise ApiError(400, "bad_request", f"--sync upload: {exc}") from None
        return _json({"stored": stored, "bytes": size})

    # ---- sweeps ----------------------------------------------------------------

    async def sweep_create(self, request: web.Request) -> web.Response:
        body: SweepBody = await _body(request, SweepBody)
        name = await self.c.create_sweep(peer(request), body)
        return _json({"sweep": self.v.sweep_view(self.d.ledger.state.sweeps[name])},
                     status=201)

    async def sweep_status(self, request: web.Request) -> web.Response:
        sweep = commands.sweep(self.d.ledger.state, request.match_info["sweep"])
        first = self.d.ledger.state.jobs.get(sweep.jobs[0]) if sweep.jobs else None
        if first is not None:
            self._may_see(request, first, "results")
        return _json(self.v.sweep_view(sweep))

    async def sweep_cancel(self, request: web.Request) -> web.Response:
        name = request.match_info["sweep"]
        await self.c.cancel_sweep(peer(request), name)
        return _json(self.v.sweep_view(self.d.ledger.state.sweeps[name]))

    # ---- reads for `ugroctl dashboard` (issue 12) --------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """The page's lists in one answer: jobs as ``/v1/jobs`` chooses them, in a short
        form (what a row shows), and the queue's order, reasons and estimates."""
        state = self.d.ledger.state
        ended = [state.jobs[j] for j in self.v.recent_ended(50)]
        latest = self.d.executor.latest

        def row(j: Job) -> dict[str, Any]:
            m = latest.get(j.id) or {}
            return {"id": j.id, "state": j.state.value, "owner": j.owner, "held": j.held,
                    "priority": j.priority, "attempt": j.attempt, "nodes": list(j.nodes),
                    "gpus": [{"node": p.node, "rank": p.rank, "gpus": list(p.gpus)}
                             for p in j.placement],
                    "metrics": {k: m[k] for k in ("step", "loss") if k in m},
                    "reason": j.reason, "waiting_reason": j.waiting_reason,
                    "submitted_at": rj.iso(j.submitted_at), "started_at": rj.iso(j.started_at),
                    "running_at": rj.iso(j.running_at), "ended_at": rj.iso(j.ended_at),
                    "sweep": j.spec.sweep, "stalled": j.stalled, "stopping": j.stopping}
        return _json({"seq": state.seq,
                      "jobs": [row(j) for j in [*ended, *state.active_jobs()]],
                      "queue": self.v.queue_view(render=lambda j: {"id": j.id})})

    async def metrics_series(self, request: web.Request) -> web.Response:
        """A job's metrics.jsonl as chart columns, from byte ``after``, at most ``max_points``.

        The owner (or an admin) only: metrics are the job's own data.
        Bounded: 64 MiB read per call, 64 keys, ``max_points`` 0 (every point) to 20,000.
        """
        from ugrod.core.series import read_series
        actor, job = peer(request), self._job(request)
        self.c.own(actor, job, "read the metrics of")
        q = request.query
        try:
            after = int(q.get("after", "0"))
            max_points = int(q.get("max_points", "2000"))
            rank = int(q.get("rank", "0"))
        except ValueError:
            raise ApiError(400, "bad_request", "after, max_points and rank must be integers"
                           ) from None
        if after < 0 or not 0 <= max_points <= 20000 or not 0 <= rank < 4096:
            raise ApiError(400, "bad_request", "after must be >= 0, max_points 0-20000 "
                           "(0: every point) and rank 0-4095")
        keys = [k for k in q.get("keys", "").split(",") if k][:8] or None
        name = "metrics.jsonl" if rank == 0 else f"metrics_rank_{rank}.jsonl"
        path = self.d.executor.job_dir(job.id) / name
        out = await asyncio.to_thread(read_series, path, after, max_points, keys)
        return _json({"job": job.id, "rank": rank, **out})

    async def sweeps(self, request: web.Request) -> web.Response:
        """Every sweep, newest first, with its trials counted by state."""
        state = self.d.ledger.state
        return _json({"sweeps": [rj.sweep_summary(w, state) for w in sorted(
            state.sweeps.values(), key=lambda w: (w.created_at, w.name), reverse=True)]})


STREAM_CHECK_S = 0.5  # how often a quiet stream looks whether its client is still there


def _gone(request: web.Request) -> bool:
    """The client closed its connection (aiohttp drops the transport when it sees that)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _log_damaged(exc: Exception) -> ApiError:
    """A segment of the event log that does not verify: say which, and what to do."""
    return ApiError(503, "log_damaged", f"the event log is damaged, so its history cannot be "
                    f"read: {exc}. ugrod's state in memory is intact and new events are "
                    f"still recorded; restore that segment from a backup (docs/operations.md)")


def _query_number(request: web.Request, key: str, default: float, lo: float,
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


def _iso_z(text: str) -> str:
    """Accept 2026-11-22T10:00:00Z / +00:00 / fractional seconds; return format_ts's form."""
    from datetime import UTC, datetime
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return codec.format_ts(dt.timestamp())


def _matches(rec: ev.Record, job: str | None, since: float | None) -> bool:
    if since is not None and rec.ts < since:
        return False
    if job is None:
        return True
    e = rec.event
    return getattr(e, "job", None) == job or job in getattr(e, "jobs", ())


def _redacted(rec: ev.Record, hide: Callable[[str], bool] | None) -> ev.Record:
    """The record with a job spec's env values replaced, when ``hide(job)`` says so."""
    e = rec.event
    spec = getattr(e, "spec", None)
    if hide is None or spec is None or not spec.env or not hide(getattr(e, "job", "")):
        return rec
    spec = msgspec.structs.replace(spec, env=trust.redact_env(spec.env))
    return msgspec.structs.replace(rec, event=msgspec.structs.replace(e, spec=spec))


def _filtered_history(ledger: Any, after: int, job: str | None, since: float | None,
                      limit: int | None, hide: Callable[[str], bool] | None = None,
                      ) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    needle = f'"job":{json.dumps(job)}'.encode() if job else None
    for line in ledger.history(after_seq=after):
        if needle is not None and needle not in line:
            continue
        rec = codec.decode(line)
        if not _matches(rec, job, since):
            continue
        if hide is not None and b'"env":{"' in line:
            redacted = _redacted(rec, hide)
            if redacted is not rec:
                line = codec.encode(redacted)
        out.append((rec.seq, line))
    if limit is not None:
        out = out[-limit:]
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _start_offset(path: Path, tail: int | None) -> int:
    if tail is None:
        return 0
    size = _size(path)
    if size == 0:
        return 0
    with open(path, "rb") as f:
        start = max(0, size - 65536 * max(1, tail // 500 + 1))
        f.seek(start)
        data = f.read()
    lines = data.split(b"\n")
    keep = b"\n".join(lines[-(tail + 1):])
    return size - len(keep)


def _read_from(path: Path, offset: int, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def new_request_id() -> str:
    return uuid.uuid4().hex
