"""Commands about jobs that exist: look (status, queue, logs, results, why, events)
and change (cancel, priority, hold, release, checkpoint, resume)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import click

from ugroctl import render
from ugroctl.base import (
    F,
    cli,
    ctl,
    emit,
    examples,
    iso_utc,
    job_line,
    json_option,
    terminal_width,
    user_time,
    want_json,
)
from ugroctl.client import (
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_NOT_FOUND,
    seg,
)
from ugroctl.submitting import parse_set


@cli.command(epilog=examples("ugroctl status", "ugroctl status --all", "ugroctl status exp1",
                              "ugroctl status exp1 --json | jq .state"))
@click.argument("job", required=False)
@click.option("--all", "show_all", is_flag=True, help="Every job, not only active + recent.")
@json_option
def status(job: str | None, show_all: bool, as_json: bool) -> None:
    """Show active and recent jobs, or one job in detail."""
    client = ctl().client
    now = time.time()
    if job is None:
        doc = client.get("/v1/jobs", {"all": show_all})
        emit(doc, want_json(as_json), lambda: render.jobs_table(doc.get("jobs") or [], now,
                                                                terminal_width()))
    else:
        one = client.get(f"/v1/jobs/{seg(job)}")["job"]
        emit(one, want_json(as_json), lambda: render.job_detail(one, now))


@cli.command(epilog=examples("ugroctl queue", "ugroctl queue --json"))
@json_option
def queue(as_json: bool) -> None:
    """Show waiting jobs in order: priority, owner, why each waits, estimated start."""
    client = ctl().client
    doc = client.get("/v1/queue")
    entries = doc.get("queue") or []
    jobs: dict[str, Any] = {}
    if not want_json(as_json) and any(not isinstance(e.get("job"), dict) for e in entries):
        jobs = {j["id"]: j for j in client.get("/v1/jobs").get("jobs") or []}
    emit(doc, want_json(as_json), lambda: render.queue_table(entries, jobs, time.time()))


def _stream_out(lines: Iterator[bytes], flush: bool) -> None:
    out = sys.stdout.buffer
    try:
        for line in lines:
            out.write(line)
            if flush:
                out.flush()
        out.flush()
    except KeyboardInterrupt:
        out.flush()  # Ctrl-C ends a follow: not an error


@cli.command(epilog=examples("ugroctl logs exp1", "ugroctl logs exp1 --rank 0 -f",
                              "ugroctl logs exp1 --node-rank 1 --tail 50"))
@click.argument("job")
@click.option("--rank", type=click.IntRange(min=0), metavar="N",
              help="Only global rank N (torchrun's RANK: node rank x processes per node + "
                   "local rank; the node rank itself when a node runs one process).")
@click.option("--node-rank", type=click.IntRange(min=0), metavar="N",
              help="Only node rank N: the whole log of that node's ranks (NODE_RANK).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@json_option
def logs(job: str, rank: int | None, node_rank: int | None, follow: bool, tail: int | None,
         as_json: bool) -> None:
    """Print a job's logs (all ranks, or one), optionally following them live.

    With --json (not with -f): {"job", "rank", "node_rank", "lines": [...]}.
    """
    if want_json(as_json) and follow:
        raise click.UsageError("-f streams raw text; use --json without -f")
    if rank is not None and node_rank is not None:
        raise click.UsageError("--rank and --node-rank choose the same thing two ways: "
                               "give one")
    lines = ctl().client.stream(f"/v1/jobs/{seg(job)}/logs",
                                {"rank": rank, "node_rank": node_rank, "follow": follow,
                                 "tail": tail})
    if want_json(as_json):
        text = [line.decode("utf-8", "replace").rstrip("\n") for line in lines]
        click.echo(render.dump_json({"job": job, "rank": rank, "node_rank": node_rank,
                                     "lines": text}))
        return
    _stream_out(lines, flush=follow)


@cli.command(epilog=examples("ugroctl results exp1"))
@click.argument("job")
@json_option
def results(job: str, as_json: bool) -> None:
    """Summarise a job: final loss, duration, steps/s, checkpoints, GPU use per rank."""
    doc = ctl().client.get(f"/v1/jobs/{seg(job)}/results")
    emit(doc, want_json(as_json), lambda: render.results_view(doc, time.time()))


@cli.command(epilog=examples("ugroctl why exp2"))
@click.argument("job")
@json_option
def why(job: str, as_json: bool) -> None:
    """Explain a job: every decision about it, from the event log."""
    doc = ctl().client.get(f"/v1/jobs/{seg(job)}/why")
    emit(doc, want_json(as_json), lambda: render.why_view(doc, time.time()))



@cli.command(epilog=examples("ugroctl events --job exp1", "ugroctl events --since 2h",
                              "ugroctl events -f", "ugroctl events --since 2026-01-20T12:00 "
                                                   "--json | jq '.events[].type'"))
@click.option("--job", metavar="JOB", help="Only events about JOB.")
@click.option("--since", metavar="T", help="From time T (ISO-8601, or an age: 10m, 2h, 3d).")
@click.option("--after", "after_seq", type=click.IntRange(min=0), metavar="SEQ",
              help="Only events after sequence number SEQ.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N events.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they happen.")
@json_option
def events(job: str | None, since: str | None, after_seq: int | None, limit: int | None,
           follow: bool, as_json: bool) -> None:
    """Show the audit trail: who did what, when (the event log).

    With --json: one document {"events": [...]}; with -f --json: one event a line.
    """
    import json

    query = {"job": job, "after": after_seq, "limit": limit, "follow": follow,
             "since": iso_utc(user_time(since, time.time())) if since else None}
    lines = ctl().client.stream("/v1/events", query)
    as_json = want_json(as_json)
    if as_json and not follow:
        docs = [json.loads(line) for line in lines if line.strip()]
        click.echo(render.dump_json({"events": docs}))
        return
    if as_json:
        _stream_out(lines, flush=True)
        return
    try:
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                click.echo(render.clean(line.decode("utf-8", "replace").rstrip("\n")))
                continue
            click.echo(render.event_line(event))
    except KeyboardInterrupt:
        pass


# ---- jobs: changing --------------------------------------------------------------------


def _job_action(job: str, action: str, body: Mapping[str, Any] | None, as_json: bool,
                done: Callable[[Mapping[str, Any]], str]) -> None:
    doc = ctl().client.post(f"/v1/jobs/{seg(job)}/{action}", body)
    one = doc.get("job", doc)
    emit(one, want_json(as_json), lambda: done(one))


def selection_options(f: F) -> F:
    """--user/--all-users/--state/--sweep: select jobs for a bulk action (as scancel does)."""
    for opt in reversed([
        click.option("--user", metavar="USER",
                     help="Jobs of USER (with no JOB, --user or --all-users: your own)."),
        click.option("--all-users", is_flag=True, help="Jobs of every user (root and "
                                                       "ugrod's user may change them)."),
        click.option("--state", "states", multiple=True, metavar="STATE",
                     help="Only jobs in STATE: queued (or pending), retrying, starting, "
                          "running (repeatable, or comma-separated)."),
        click.option("--sweep", metavar="S", help="The trials of sweep S."),
    ]):
        f = opt(f)
    return f


def _selection(user: str | None, all_users: bool, states: tuple[str, ...],
               sweep: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if user is not None:
        out["user"] = user
    if all_users:
        if user is not None:
            raise click.UsageError("--user and --all-users exclude each other")
        out["all_users"] = True
    flat = [s.strip().lower() for item in states for s in item.split(",") if s.strip()]
    if flat:
        out["states"] = flat
    if sweep is not None:
        out["sweep"] = sweep
    return out


_DONE = {"cancel": "cancelled", "hold": "held", "release": "released",
         "priority": "changed the priority of"}
_EXIT_FOR = {"not_found": EXIT_NOT_FOUND, "forbidden": EXIT_FORBIDDEN}


def _bulk(action: str, jobs: tuple[str, ...], where: Mapping[str, Any], as_json: bool,
          line: Callable[[Mapping[str, Any]], str], **extra: Any) -> None:
    """One request changing many jobs; each refusal on stderr, the worst exit code."""
    body = {"action": action, "jobs": list(jobs), **where, **extra}
    doc = ctl().client.post("/v1/jobs/actions", body)
    done = [j for j in doc.get("jobs") or [] if isinstance(j, Mapping)]
    refused = [r for r in doc.get("refused") or [] if isinstance(r, Mapping)]
    if want_json(as_json):
        click.echo(render.dump_json(doc))
    else:
        for job in done:
            click.echo(line(job))
    for r in refused:
        click.echo(f"ugroctl: {render.clean(r.get('job'))}: {render.clean(r.get('reason'))}",
                   err=True)
    if not done and not refused:
        click.echo("ugroctl: no job matches; nothing changed (`ugroctl status --all` lists "
                   "jobs)", err=True)
    elif not want_json(as_json) and (len(done) + len(refused) > 1):
        click.echo(f"{_DONE[action]} {len(done)} job{'s' if len(done) != 1 else ''}"
                   + (f"; {len(refused)} refused" if refused else ""), err=True)
    worst = max((_EXIT_FOR.get(str(r.get("code")), EXIT_FAILED) for r in refused), default=0)
    if worst:
        raise click.exceptions.Exit(worst)


def _cancel_line(job: Mapping[str, Any]) -> str:
    if job.get("stopping"):
        return f"{render.clean(job.get('id'))}: stopping (killing its processes)"
    return job_line(job)


@cli.command(epilog=examples("ugroctl cancel exp1", "ugroctl cancel exp1 exp2 exp3",
                              "ugroctl cancel --state queued", "ugroctl cancel --sweep lrs",
                              "ugroctl cancel --user bob --state running   (as root)"))
@click.argument("jobs", nargs=-1, metavar="[JOB]...")
@selection_options
@click.option("--wait", is_flag=True, help="Return only once the processes are gone "
                                           "(up to 2 minutes).")
@json_option
def cancel(jobs: tuple[str, ...], user: str | None, all_users: bool, states: tuple[str, ...],
           sweep: str | None, wait: bool, as_json: bool) -> None:
    """Cancel jobs: every rank's processes on every node are killed, then GPUs freed.

    Several jobs, or a filter, go in one request: the jobs that can be cancelled are,
    together; each refusal is printed with its reason. With --json: {"action",
    "jobs": [...], "refused": [{"job", "code", "reason"}]}.
    """
    where = _selection(user, all_users, states, sweep)
    if not jobs and not where:
        raise click.UsageError("name the jobs to cancel, or select them with --user, "
                               "--all-users, --state or --sweep")
    if len(jobs) != 1 or where:
        _bulk("cancel", jobs, where, as_json, _cancel_line, wait=wait)
        return
    job = ctl().client.post(f"/v1/jobs/{seg(jobs[0])}/cancel", None,
                            {"wait": True} if wait else None).get("job", {})
    if want_json(as_json):
        click.echo(render.dump_json({"jobs": [job]}))
    else:
        click.echo(_cancel_line(job))


@cli.command(context_settings={"ignore_unknown_options": True},
             epilog=examples("ugroctl priority exp2 10", "ugroctl priority exp3 -5",
                             "ugroctl priority exp2 exp3 10", "ugroctl priority --sweep lrs 5"))
@click.argument("args", nargs=-1, required=True, metavar="[JOB]... PRIORITY")
@selection_options
@json_option
def priority(args: tuple[str, ...], user: str | None, all_users: bool,
             states: tuple[str, ...], sweep: str | None, as_json: bool) -> None:
    """Set jobs' priority, -1000..1000 (higher runs first; ties run in submission order).

    The last argument is the priority; the jobs are those named and/or selected.
    """
    *jobs, value = args
    try:
        p = int(value)
    except ValueError:
        p = None
    if p is None or not -1000 <= p <= 1000:
        raise click.UsageError(f"the last argument is the priority, an integer from -1000 to "
                               f"1000; got {value!r}")
    where = _selection(user, all_users, states, sweep)
    if not jobs and not where:
        raise click.UsageError("name the jobs, or select them with --user, --all-users, "
                               "--state or --sweep")
    line = lambda j: f"{render.clean(j.get('id'))}: priority {j.get('priority')}"  # noqa: E731
    if len(jobs) != 1 or where:
        _bulk("priority", tuple(jobs), where, as_json, line, priority=p)
        return
    _job_action(jobs[0], "priority", {"priority": p}, as_json, line)


def _hold_or_release(action: str, jobs: tuple[str, ...], where: dict[str, Any],
                     as_json: bool) -> None:
    if not jobs and not where:
        raise click.UsageError(f"name the jobs to {action}, or select them with --user, "
                               "--all-users, --state or --sweep")
    if len(jobs) != 1 or where:
        _bulk(action, jobs, where, as_json, job_line)
        return
    _job_action(jobs[0], action, None, as_json, job_line)


@cli.command(epilog=examples("ugroctl hold exp2", "ugroctl hold --state queued",
                              "ugroctl hold --sweep lrs"))
@click.argument("jobs", nargs=-1, metavar="[JOB]...")
@selection_options
@json_option
def hold(jobs: tuple[str, ...], user: str | None, all_users: bool, states: tuple[str, ...],
         sweep: str | None, as_json: bool) -> None:
    """Hold waiting jobs: they keep their place in the queue but do not start."""
    _hold_or_release("hold", jobs, _selection(user, all_users, states, sweep), as_json)


@cli.command(epilog=examples("ugroctl release exp2", "ugroctl release --sweep lrs"))
@click.argument("jobs", nargs=-1, metavar="[JOB]...")
@selection_options
@json_option
def release(jobs: tuple[str, ...], user: str | None, all_users: bool, states: tuple[str, ...],
            sweep: str | None, as_json: bool) -> None:
    """Release held jobs: they may start when their turn comes."""
    _hold_or_release("release", jobs, _selection(user, all_users, states, sweep), as_json)


@cli.command(epilog=examples("ugroctl checkpoint exp1", "ugroctl checkpoint exp1 --wait 120"))
@click.argument("job")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0, max=600), default=0,
              metavar="S", help="Wait up to S seconds for the job to report the new checkpoint.")
@json_option
def checkpoint(job: str, wait_s: float, as_json: bool) -> None:
    """Ask a running job to save a checkpoint now (the training helper sees the request)."""
    client = ctl().client
    before = None
    if wait_s:
        before = len(client.get(f"/v1/jobs/{seg(job)}")["job"].get("checkpoints") or [])
    doc = client.post(f"/v1/jobs/{seg(job)}/checkpoint", None,
                      {"wait": f"{wait_s:g}"} if wait_s else None)
    one = doc.get("job", doc)
    ckpts = one.get("checkpoints") or []
    name = render.clean(one.get("id"))
    if before is not None and len(ckpts) > before:
        text = f"{name}: saved checkpoint {render.clean(ckpts[-1])}"
    elif before is not None:
        emit(one, want_json(as_json), lambda: f"{name}: no new checkpoint within {wait_s:g} s "
                                               f"(the request stays; `ugroctl results {name}` "
                                               f"lists checkpoints)")
        raise click.exceptions.Exit(EXIT_FAILED)
    else:
        text = (f"asked {name} to save a checkpoint; `ugroctl results {name}` lists it once "
                f"written")
    emit(one, want_json(as_json), lambda: text)


_OOM = re.compile(r"out of memory|\bOOM\b", re.IGNORECASE)
_BATCH_KEYS = ("batch_size", "batch_size_per_gpu", "per_device_train_batch_size", "bs")


def find_batch_size(job: Mapping[str, Any]) -> tuple[str, int] | None:
    """The job's batch size and the key to ``--set`` it by: from its params, else its argv."""
    spec = job.get("spec") or {}
    params = spec.get("params") or {}
    for key in _BATCH_KEYS:
        value = params.get(key)
        if isinstance(value, str | int) and str(value).isdigit():
            return key, int(value)
    argv = [str(a) for a in (job.get("argv") or spec.get("argv") or [])]
    for i, arg in enumerate(argv):
        flag, eq, inline = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_")
        if name not in _BATCH_KEYS or not flag.startswith("-"):
            continue
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if value.isdigit():
            return name, int(value)
    return None


@cli.command("resume", epilog=examples("ugroctl resume exp1",
                                        "ugroctl resume exp1 --set batch_size=16"))
@click.argument("job")
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE", callback=parse_set,
              help="Change a parameter for the new attempt (repeatable).")
@click.option("-y", "--yes", is_flag=True, help="Accept the suggested change without asking.")
@json_option
def resume(job: str, changes: dict[str, str], yes: bool, as_json: bool) -> None:
    """Queue a failed or cancelled job again from its newest checkpoint, as a new attempt.

    After a CUDA out-of-memory failure, it offers to halve the batch size.
    """
    client = ctl().client
    if not changes:
        current = client.get(f"/v1/jobs/{seg(job)}")["job"]
        changes = _oom_suggestion(current, yes)
    _job_action(job, "resume", {"set": changes}, as_json,
                lambda j: f"resumed {job_line(j)}"
                          + (f" with {' '.join(f'{k}={v}' for k, v in changes.items())}"
                             if changes else ""))


def _oom_suggestion(job: Mapping[str, Any], yes: bool) -> dict[str, str]:
    reason = str(job.get("reason") or "")
    if job.get("state") != "failed" or not _OOM.search(reason):
        return {}
    found = find_batch_size(job)
    if found is None:
        click.echo(f"{render.clean(job.get('id'))} ran out of GPU memory ({render.clean(reason)})"
                   f"; to resume with a smaller batch, pass --set batch_size=N", err=True)
        return {}
    key, size = found
    smaller = max(1, size // 2)
    if smaller == size:
        return {}
    click.echo(f"{render.clean(job.get('id'))} ran out of GPU memory: "
               f"{render.clean(reason)}", err=True)
    ask = f"Resume with {key}={smaller} (half of {size})?"
    if yes or (sys.stdin.isatty() and click.confirm(ask, default=True, err=True)):
        return {key: str(smaller)}
    if not sys.stdin.isatty():
        click.echo(f"hint: resuming unchanged; to halve the batch use --set {key}={smaller}",
                   err=True)
    return {}
