"""The API's streams: a job's logs and the event log, whole or followed (``-f``).

A follower ends when its job ends, when its client goes away (checked every
``STREAM_CHECK_S`` while quiet), or when ugrod stops; ``following`` counts those being
served (``/v1/ping`` shows it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from ugrod.api import trust
from ugrod.api.wire import ApiError, Host, gone, iso_z, log_damaged, peer, query_number
from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core.jobspec import procs_per_node
from ugrod.core.state import TERMINAL, Job, JobState
from ugrod.store.log import LogError

MAX_PENDING_LINE = 1 << 20  # a log line longer than this is passed on in pieces
STREAM_CHECK_S = 0.5  # how often a quiet stream looks whether its client is still there


class Streams:
    """``GET /v1/jobs/{job}/logs`` and ``GET /v1/events``."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.following = 0  # followers being served now (logs -f, events -f)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """A job's rank logs (one node rank, one global rank, or all, prefixed), from
        ``tail`` lines back; ``follow`` goes on until the attempt ends."""
        control = self._host.control
        job = control.job(request.match_info["job"])
        control.may_read(peer(request), job, "logs")
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
            else int(query_number(request, "tail", 0, 0, 100_000))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        jobdir = self._host.executor.job_dir(job.id)
        files = {r: jobdir / f"rank_{r}.log" for r in ranks}
        offsets = {r: _start_offset(f, tail) for r, f in files.items()}
        # Without follow, the whole log as it is now, streamed 1 MiB at a time (the
        # client sees the end of the stream, not a silent cut at the first chunk).
        ends = {r: _size(f) for r, f in files.items()}
        prefix = len(ranks) > 1
        pending = {r: b"" for r in ranks}
        self.following += follow
        try:
            await self._send_logs(request, resp, job, files, offsets, ends, pending, prefix,
                                  follow, only)
        except ConnectionError:
            pass  # the client went away mid-write: nothing more to say to it
        finally:
            self.following -= follow
        if not gone(request):
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
            current = self._host.ledger.state.jobs[job.id]
            if current.state in TERMINAL | {JobState.RETRYING} \
                    and all(_size(f) <= offsets[r] for r, f in files.items()):
                break
            if gone(request) or self._host.closing.is_set():
                break  # the client went away (a closed page, Ctrl-C), or ugrod is stopping
            await asyncio.sleep(0.25)
        for r, rest in pending.items():
            if rest and not gone(request) and (only is None or rest.startswith(only)):
                await resp.write((f"[rank {r}] ".encode() if prefix else b"") + rest + b"\n")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The event log as NDJSON, after a seq, since a time, for one job, the last
        ``limit``; ``follow`` goes on with new events. Others' env values are redacted."""
        q = request.query
        job_filter = q.get("job")
        try:
            after = int(q.get("after", "0"))
            limit = int(q["limit"]) if "limit" in q else None
            since = codec.parse_ts(iso_z(q["since"])) if "since" in q else None
            if after < 0 or after >= 1 << 63 or (limit is not None
                                                 and not 0 < limit <= 10_000_000):
                raise ValueError("out of range")
        except (ValueError, OverflowError, ev.EventError):
            raise ApiError(400, "bad_request", "after must be a non-negative integer, limit "
                           "an integer from 1 to 10000000, and since an ISO-8601 UTC time "
                           "like 2026-11-22T10:00:00Z") from None
        follow = q.get("follow") in ("1", "true")
        viewer = peer(request)
        policy, jobs = self._host.policy, self._host.ledger.state.jobs
        hide = None if policy.is_admin(viewer.uid or 0) and viewer.uid is not None else (
            lambda job_id: not policy.may_see(viewer.uid, getattr(jobs.get(job_id), "uid", -1)))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        sub = self._host.ledger.subscribe() if follow else None
        self.following += follow
        try:
            last = after
            try:  # read before answering: a damaged segment is a clear error, not a cut stream
                lines = await asyncio.to_thread(
                    _filtered_history, self._host.ledger, after, job_filter, since, limit, hide)
            except LogError as exc:
                raise log_damaged(exc) from None
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
            self.following -= follow
            if sub is not None:
                self._host.ledger.unsubscribe(sub)
        if not gone(request):
            await resp.write_eof()
        return resp

    async def _next(self, sub: asyncio.Queue[ev.Record | None],
                    request: web.Request) -> ev.Record | None:
        """The next event for a follower; None once the client is gone or ugrod stops."""
        while True:
            try:
                async with asyncio.timeout(STREAM_CHECK_S):
                    return await sub.get()
            except TimeoutError:
                if gone(request) or self._host.closing.is_set():
                    return None


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
