"""The API's handlers: each parses the request, calls the door (``control.py``) or a read
(``views.py``), and answers; a few lines each. Refusals are raised, and answered by
``wire.http_error``; streams are ``streams.py``'s.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
from aiohttp import web

from ugrod.api import trust
from ugrod.api.streams import Streams
from ugrod.api.wire import (
    ApiError,
    Host,
    answer,
    gone,
    log_damaged,
    peer,
    query_number,
    read_body,
    read_capped,
)
from ugrod.control import BulkBody
from ugrod.core import commands, jobspec
from ugrod.core import events as ev
from ugrod.core import render_json as rj
from ugrod.core.jobspec import SubmitBody, SweepBody
from ugrod.core.state import Job
from ugrod.nodes import codesync
from ugrod.store.log import LogError


class Handlers:
    """Route handlers; thin: parse, call the door or a read, answer."""

    def __init__(self, host: Host, streams: Streams) -> None:
        self.d = host  # the daemon's parts (wire.Host)
        self.c = host.control  # client commands
        self.v = host.views  # client reads
        self.streams = streams

    # ---- helpers -----------------------------------------------------------------------

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
            out = rj.job(job, self.d.progress.latest(job.id))
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
        return answer({"job": self._job_json(self.d.ledger.state.jobs[job_id], viewer)},
                      status=status)

    # ---- daemon and nodes ----------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        from ugrod import __version__
        return answer({"ok": True, "version": __version__,
                       "seq": self.d.ledger.state.seq, "pid": os.getpid(),
                       "streams": self.streams.following,
                       "metrics_port": self.d.metrics_port})

    async def nodes(self, request: web.Request) -> web.Response:
        state = self.d.ledger.state
        held = rj.held_gpus(state)
        nodes = [rj.node(n, state.jobs_on(n.name), self.d.fleet.node_view(n.name),
                         held.get(n.name, ()))
                 for n in sorted(state.nodes.values(), key=lambda n: n.name)]
        return answer({"nodes": nodes, "cluster": rj.cluster_summary(nodes)})

    def _node_name(self, request: web.Request) -> str:
        return self.c.node(request.match_info["node"])

    async def drain(self, request: web.Request) -> web.Response:
        actor, name = self._admin(request, "drain nodes"), self._node_name(request)
        body = await read_body(request, dict[str, str])
        state = await self.c.drain(actor, name, body.get("reason", ""))
        return answer({"node": rj.node(state.nodes[name], state.jobs_on(name), None,
                                       rj.held_gpus(state).get(name, ()))})

    async def undrain(self, request: web.Request) -> web.Response:
        actor, name = self._admin(request, "undrain nodes"), self._node_name(request)
        state = await self.c.undrain(actor, name)
        return answer({"node": rj.node(state.nodes[name], state.jobs_on(name), None,
                                       rj.held_gpus(state).get(name, ()))})

    async def check(self, request: web.Request) -> web.Response:
        name = self._node_name(request)
        body = await read_body(request, dict[str, bool])
        checks = await self.d.fleet.check_node(name, deep=bool(body.get("deep")))
        return answer({"node": name, "checks": checks})

    async def hostkey(self, request: web.Request) -> web.Response:
        name = self._node_name(request)
        return answer(await self.d.fleet.host_key(name))

    async def trust(self, request: web.Request) -> web.Response:
        self._admin(request, "trust host keys")
        name = self._node_name(request)
        body = await read_body(request, dict[str, str])
        line = body.get("line")
        if not isinstance(line, str) or not line:
            raise ApiError(400, "bad_request", "missing 'line': the known_hosts line to trust")
        return answer(await self.d.fleet.trust_host_key(name, line))

    async def reload(self, request: web.Request) -> web.Response:
        self._admin(request, "reload the configuration")
        return answer(await self.d.reload())

    # ---- jobs ----------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        state = self.d.ledger.state
        if request.query.get("all") in ("1", "true", "yes"):
            chosen = sorted(state.jobs.values(), key=lambda j: j.submit_seq)
        else:
            active = list(state.active_jobs())
            ended = [state.jobs[j] for j in self.v.recent_ended(50)]
            chosen = ended + active
        viewer = peer(request)
        return answer({"jobs": [self._job_json(j, viewer) for j in chosen]})

    async def job(self, request: web.Request) -> web.Response:
        return answer({"job": self._job_json(self._job(request), peer(request))})

    async def submit(self, request: web.Request) -> web.Response:
        actor = peer(request)
        body: SubmitBody = await read_body(request, SubmitBody)
        dry_run = request.query.get("dry_run") in ("1", "true")
        done = await self.c.submit(actor, body, dry_run=dry_run)
        if done.preview is not None:
            return answer({"job": self._job_json(done.preview.jobs[done.job]), "dry_run": True,
                           "plan": self.v.launch_plan(done.preview, done.job)})
        return await self._job_answer(done.job, status=201 if done.created else 200,
                                      viewer=actor)

    async def _act(self, request: web.Request, action: str, verb: str,
                   priority: int | None = None) -> Job:
        """One action on the job in the path, decided on the newest state (user words)."""
        return await self.c.act(peer(request), request.match_info["job"], action, verb,
                                priority)

    async def bulk(self, request: web.Request) -> web.Response:
        """cancel/hold/release/priority over named jobs and/or a filter, as one batch."""
        body: BulkBody = await read_body(request, BulkBody)
        done, refused = await self.c.bulk(peer(request), body)
        state = self.d.ledger.state
        return answer({"action": body.action, "jobs": [self._job_json(state.jobs[j])
                                                       for j in done],
                       "refused": [ev.to_builtins(r) for r in refused]})

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        wait = request.query.get("wait") in ("1", "true")
        settled = await self.c.cancel(peer(request), job_id, wait=wait)
        return await self._job_answer(job_id, status=200 if settled else 202)

    async def priority(self, request: web.Request) -> web.Response:
        self._job(request)
        body = await read_body(request, dict[str, int])
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
        wait_s = query_number(request, "wait", 0.0, 0.0, 600.0)
        await self.c.checkpoint(peer(request), job_id, wait_s, gone=lambda: gone(request))
        return await self._job_answer(job_id)

    async def resume(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        body = await read_body(request, dict[str, dict[str, str]])
        await self.c.resume(peer(request), job_id, body.get("set", {}))
        return await self._job_answer(job_id)

    async def results(self, request: web.Request) -> web.Response:
        job = self._job(request)
        self._may_see(request, job, "results (metrics and checkpoints)")
        return answer(await self.v.results(job))

    async def why(self, request: web.Request) -> web.Response:
        job = self._job(request)
        try:
            history = await asyncio.to_thread(self.v.why, job.id)
        except LogError as exc:
            raise log_damaged(exc) from None
        return answer({"job": self._job_json(job, peer(request)), "history": history})

    async def queue(self, request: web.Request) -> web.Response:
        viewer = peer(request)
        queue = self.v.queue_view()
        for item in queue:
            j = self.d.ledger.state.jobs.get(item["job"]["id"])
            if j is not None:
                item["job"] = self._job_json(j, viewer)
        return answer({"queue": queue})

    # ---- sweeps --------------------------------------------------------------------------

    async def sweeps(self, request: web.Request) -> web.Response:
        """Every sweep, newest first, with its trials counted by state."""
        state = self.d.ledger.state
        return answer({"sweeps": [rj.sweep_summary(w, state) for w in sorted(
            state.sweeps.values(), key=lambda w: (w.created_at, w.name), reverse=True)]})

    async def sweep_create(self, request: web.Request) -> web.Response:
        body: SweepBody = await read_body(request, SweepBody)
        name = await self.c.create_sweep(peer(request), body)
        return answer({"sweep": self.v.sweep_view(self.d.ledger.state.sweeps[name])},
                      status=201)

    async def sweep_status(self, request: web.Request) -> web.Response:
        sweep = commands.sweep(self.d.ledger.state, request.match_info["sweep"])
        first = self.d.ledger.state.jobs.get(sweep.jobs[0]) if sweep.jobs else None
        if first is not None:
            self._may_see(request, first, "results")
        return answer(self.v.sweep_view(sweep))

    async def sweep_cancel(self, request: web.Request) -> web.Response:
        name = request.match_info["sweep"]
        await self.c.cancel_sweep(peer(request), name)
        return answer(self.v.sweep_view(self.d.ledger.state.sweeps[name]))

    # ---- reads for `ugroctl dashboard` (issue 12) ------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """The page's lists in one answer: jobs as ``/v1/jobs`` chooses them, in a short
        form (what a row shows), and the queue's order, reasons and estimates."""
        state = self.d.ledger.state
        ended = [state.jobs[j] for j in self.v.recent_ended(50)]
        latest = self.d.progress.all_latest()

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
        return answer({"seq": state.seq,
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
        return answer({"job": job.id, "rank": rank, **out})

    # ---- code sync (--sync) ----------------------------------------------------------------
    # Each user has their own store (by uid): what one uploads, no one else can name
    # in a job or probe for. Every object is checked against its sha256 as it arrives.

    def _sync_limits(self) -> tuple[int, int]:
        cfg = self.d.config.sync
        return cfg.max_mb * 1_000_000, cfg.max_files

    async def sync_settings(self, request: web.Request) -> web.Response:
        peer(request)
        max_bytes, max_files = self._sync_limits()
        return answer({"default": self.d.config.sync.default, "max_bytes": max_bytes,
                       "max_files": max_files})

    async def sync_tree(self, request: web.Request) -> web.Response:
        """A manifest in: the tree's digest and the contents ugrod still lacks out."""
        actor = peer(request)
        max_bytes, max_files = self._sync_limits()
        raw = await read_capped(request, max_files * 256 + 4096, "the manifest")
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
        return answer({"tree": tree, "missing": missing, "files": len(checked),
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
        return answer({"stored": stored, "bytes": size})
