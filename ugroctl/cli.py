"""ugroctl: thin commands that parse, call ugrod (client.py), render (render.py), exit.

Start-up time matters (people run ``ugroctl status`` fifty times a day): this
module imports click and our client only; YAML, uuid, shlex and the daemon's
own modules are imported inside the commands that need them.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from ugroctl import __version__, render
from ugroctl.client import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Client,
    CtlError,
    seg,
)

F = TypeVar("F", bound=Callable[..., Any])
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
TERMINAL = render.TERMINAL_STATES


# ---- context, errors, output -----------------------------------------------------


class Ctl:
    """What the group options decided: where ugrod is and how to print."""

    def __init__(self, socket: str | None, host: str | None, remote_socket: str | None,
                 as_json: bool) -> None:
        self.socket, self.host, self.remote_socket = socket, host, remote_socket
        self.as_json = as_json
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(socket_path=self.socket, host=self.host,
                                  remote_socket=self.remote_socket)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _hint(exc: CtlError) -> str:
    if exc.exit_code == EXIT_NOT_FOUND and "ugroctl " not in str(exc):
        return " (list jobs with `ugroctl status --all`, nodes with `ugroctl nodes`)"
    return ""


class UgroGroup(click.Group):
    """Turns our errors into ``ugroctl: ...`` on stderr and the exit-code table."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CtlError as exc:
            click.echo(f"ugroctl: {exc}{_hint(exc)}", err=True)
            ctx.exit(exc.exit_code)
        finally:
            if isinstance(ctx.obj, Ctl) and ctx.parent is None:
                ctx.obj.close()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"ugroctl: {message}", err=True)
    raise click.exceptions.Exit(code)


def ctl() -> Ctl:
    obj = click.get_current_context().find_object(Ctl)
    if obj is None:  # a subcommand invoked on its own (tests): defaults
        obj = Ctl(None, None, None, False)
        click.get_current_context().obj = obj
    return obj


def want_json(local: bool) -> bool:
    return local or ctl().as_json


def emit(doc: Any, as_json: bool, text: Callable[[], str]) -> None:
    """One JSON document, or the text for people."""
    click.echo(render.dump_json(doc) if as_json else text())


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document instead of text.")(f)


def _job_line(job: Mapping[str, Any]) -> str:
    line = f"{render.clean(job.get('id'))}: {render.clean(job.get('state'))}"
    if job.get("held"):
        line += " (held)"
    why = job.get("waiting_reason") if job.get("state") in ("queued", "retrying") else None
    why = why or (job.get("reason") if job.get("state") in TERMINAL or job.get("stopping")
                  else None)
    if why:
        line += f": {render.clean(why)}"
    return line


def _examples(*lines: str) -> str:
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# ---- the group ---------------------------------------------------------------------


@click.group(cls=UgroGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=_examples("ugroctl health", "ugroctl submit --name exp1 --nodes 3 "
                              "--gpus-per-node 1 -- train.py --epochs 3",
                              "ugroctl status exp1", "ugroctl logs exp1 -f --rank 0",
                              "ugroctl --host gpu-master status"))
@click.option("--socket", "socket_path", metavar="PATH", envvar="UGRO_SOCKET",
              help="ugrod's Unix socket [env UGRO_SOCKET; default /run/ugro/ugrod.sock as "
                   "root, else $XDG_RUNTIME_DIR/ugro/ugrod.sock].")
@click.option("--host", metavar="HEAD", envvar="UGRO_HOST",
              help="Reach ugrod on the head node HEAD through an ssh forward (your identity "
                   "there, no TCP port) [env UGRO_HOST].")
@click.option("--remote-socket", metavar="PATH", envvar="UGRO_REMOTE_SOCKET",
              help="ugrod's socket on HEAD with --host [default /run/ugro/ugrod.sock].")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document instead of text (every command).")
@click.version_option(__version__, "--version", prog_name="ugroctl",
                      message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, host: str | None,
        remote_socket: str | None, as_json: bool) -> None:
    """Control ugrod, the UGRO GPU cluster daemon: jobs, queue, nodes, health.

    \b
    Exit codes: 0 ok, 1 failed or refused, 2 usage, 3 ugrod unreachable,
    4 not found, 5 permission denied.
    """
    if host and ctx.get_parameter_source("socket_path") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--socket names a local socket; with --host use "
                               "--remote-socket PATH")
    ctx.obj = Ctl(None if host else socket_path, host, remote_socket, as_json)


# ---- jobs: submit, launch ------------------------------------------------------------


def _parse_env(ctx: click.Context, param: click.Parameter, values: Sequence[str]
               ) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(name):
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE with NAME made of "
                                     f"letters, digits and _ (e.g. --env HF_HOME=/data)",
                                     ctx, param)
        env[name] = value
    return env


def _parse_set(ctx: click.Context, param: click.Parameter, values: Sequence[str]
               ) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not PARAM_NAME.match(key):
            raise click.BadParameter(f"{item!r}: expected key=value (e.g. --set "
                                     f"batch_size=16)", ctx, param)
        out[key] = value
    return out


def _parse_params(ctx: click.Context, param: click.Parameter, values: Sequence[str]
                  ) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in values:
        key, sep, rest = item.partition("=")
        choices = rest.split(",")
        if not sep or not PARAM_NAME.match(key) or not rest or any(not c for c in choices):
            raise click.BadParameter(f"{item!r}: expected key=v1,v2,... (e.g. --param "
                                     f"lr=1e-5,2e-5)", ctx, param)
        if key in out:
            raise click.BadParameter(f"{key!r} is given twice", ctx, param)
        if len(set(choices)) != len(choices):
            raise click.BadParameter(f"{item!r}: a value is repeated", ctx, param)
        out[key] = choices
    return out


def job_options(only: frozenset[str] | None = None) -> Callable[[F], F]:
    """Resources and policy shared by submit, launch and sweep (only given ones are sent)."""
    opts = [
        click.option("--nodes", type=click.IntRange(min=1), metavar="N",
                     help="Number of nodes (one torchrun per node) [default 1]."),
        click.option("--gpus-per-node", type=click.IntRange(min=0), metavar="G",
                     help="GPUs per node (0: CPU job) [default 0]."),
        click.option("--min-vram", type=click.FloatRange(min=0, min_open=True), metavar="GB",
                     help="Each GPU must have at least GB of memory."),
        click.option("--node", "node_names", multiple=True, metavar="NAME",
                     help="Run on this node (repeat for each node)."),
        click.option("--label", "labels", multiple=True, metavar="L",
                     help="Only nodes with label L (repeatable)."),
        click.option("--avoid-label", "avoid_labels", multiple=True, metavar="L",
                     help="Never nodes with label L (repeatable)."),
        click.option("--priority", type=int, metavar="P",
                     help="Higher runs first [default 0]."),
        click.option("--max-retries", type=click.IntRange(min=0), metavar="N",
                     help="Retry a failed job up to N times, resuming from its newest "
                          "checkpoint."),
        click.option("--after", multiple=True, metavar="JOB",
                     help="Start only after JOB has succeeded (repeatable)."),
        click.option("--hold", is_flag=True, help="Queue the job held; `ugroctl release` "
                                                  "lets it run."),
        click.option("--env", "env", multiple=True, metavar="K=V", callback=_parse_env,
                     help="Set an environment variable for every rank (repeatable)."),
        click.option("--torchrun/--no-torchrun", default=None,
                     help="Run the command under torchrun, or as is [default: torchrun when "
                          "--nodes > 1 or --gpus-per-node > 0]."),
        click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True),
                     metavar="S", help="Report the job stalled when its step stops "
                                       "advancing for S seconds."),
        click.option("--cwd", metavar="DIR", help="Working directory of every rank."),
        click.option("--wait", is_flag=True,
                     help="Wait until the job ends; exit 0 only if it succeeded."),
    ]
    names = ["nodes", "gpus_per_node", "min_vram", "node_names", "labels", "avoid_labels",
             "priority", "max_retries", "after", "hold", "env", "torchrun", "stall_timeout",
             "cwd", "wait"]

    def decorate(f: F) -> F:
        for name, opt in reversed(list(zip(names, opts, strict=True))):
            if only is None or name in only:
                f = opt(f)
        return f

    return decorate


SWEEP_OPTIONS = frozenset({"nodes", "gpus_per_node", "min_vram", "priority", "max_retries",
                           "env", "torchrun"})


_SPEC_KEYS = {  # option name -> request body key
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "node_names": "node_names",
    "labels": "labels_required", "avoid_labels": "labels_avoided", "priority": "priority",
    "max_retries": "max_retries", "after": "after", "hold": "held", "env": "env",
    "torchrun": "torchrun", "stall_timeout": "stall_timeout_s", "cwd": "cwd",
}


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def spec_body(ctx: click.Context, params: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields of the options the user gave (defaults are the daemon's)."""
    body: dict[str, Any] = {}
    for opt, key in _SPEC_KEYS.items():
        if opt in params and _given(ctx, opt):
            value = params[opt]
            body[key] = list(value) if isinstance(value, tuple) else value
    if "min_vram" in params and _given(ctx, "min_vram"):
        body["min_vram_gb"] = params["min_vram"]
    if "node_names" in body and "nodes" not in body:
        body["nodes"] = len(body["node_names"])
    return body


def _submit(ctx: click.Context, body: dict[str, Any], as_json: bool, wait: bool) -> None:
    client = ctl().client
    job = client.post("/v1/jobs", body, idempotent=True)["job"]
    if not wait:
        emit(job, as_json, lambda: f"submitted {_job_line(job)}\n"
                                    f"follow it: ugroctl logs {job['id']} -f")
        return
    if not as_json:
        click.echo(f"submitted {_job_line(job)}; waiting for it to end (Ctrl-C stops "
                   f"waiting, not the job)", err=True)
    try:
        job = _wait_for(client, str(job["id"]))
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; {job['id']} goes on", err=True)
        raise click.exceptions.Exit(130) from None
    emit(job, as_json, lambda: _job_line(job))
    if job.get("state") != "succeeded":
        raise click.exceptions.Exit(EXIT_FAILED)


def _wait_for(client: Client, job_id: str) -> dict[str, Any]:
    """Follow the job's events until it ends (no polling while the stream lasts)."""
    import json

    path = f"/v1/jobs/{seg(job_id)}"
    job: dict[str, Any] = client.get(path)["job"]
    if job.get("state") in TERMINAL:
        return job
    try:
        for line in client.stream("/v1/events", {"job": job_id, "follow": True}):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            data = event.get("data") or {} if isinstance(event, dict) else {}
            if event.get("type") == "job_cancel_requested" or (
                    event.get("type") == "job_ended" and data.get("outcome") in TERMINAL):
                break
    except CtlError:
        pass  # the stream broke (ugrod restarting?): fall back to asking now and then
    while True:
        job = client.get(path)["job"]
        if job.get("state") in TERMINAL:
            return job
        time.sleep(2.0)


def _split_file_or_command(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``FILE.yaml`` alone is a job file; anything else is the command to run."""
    if args and args[0].endswith((".yaml", ".yml")):
        if len(args) > 1:
            raise click.UsageError(f"options go before the job file: ugroctl submit "
                                   f"{' '.join(args[1:3])} ... {args[0]}")
        return args[0], []
    return None, list(args)


@cli.command(context_settings={"allow_interspersed_args": False},
             epilog=_examples(
                 "ugroctl submit --name exp1 --nodes 3 --gpus-per-node 1 -- train.py --lr 2e-4",
                 "ugroctl submit --no-torchrun --env SEED=1 -- python prep.py",
                 "ugroctl submit --min-vram 10 --max-retries 2 --after exp1 -- train.py",
                 "ugroctl submit --priority 5 job.yaml     (a job file: see docs/cli.md)"))
@click.option("--name", metavar="NAME", help="Job name [default: made up by ugrod].")
@job_options()
@json_option
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]... | FILE.yaml")
@click.pass_context
def submit(ctx: click.Context, /, command: tuple[str, ...], as_json: bool, wait: bool,
           **params: Any) -> None:
    """Queue a job: CMD on --nodes nodes (under torchrun), or a job file."""
    path, argv = _split_file_or_command(command)
    if path is not None:
        from ugroctl import jobfile

        try:
            body = jobfile.load(path)
        except jobfile.JobFileError as exc:
            fail(str(exc), EXIT_USAGE)
        body.update(spec_body(ctx, params))
    else:
        body = {"argv": argv, **spec_body(ctx, params)}
    if params.get("name") is not None:
        body["name"] = params["name"]
    _submit(ctx, body, want_json(as_json), wait)


@cli.command(epilog=_examples(
    "ugroctl launch --name exp1 --model llama-7b --dataset wikitext --epochs 3",
    "ugroctl launch --name quick --epochs 1 --nodes 3 --gpus-per-node 1"))
@click.option("--name", metavar="NAME", help="Job name [default: made up by ugrod].")
@click.option("--model", metavar="MODEL", help="Model to train [config training default].")
@click.option("--dataset", metavar="DATASET", help="Dataset [config training default].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [config default].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), metavar="LR",
              help="Learning rate [config default].")
@job_options()
@json_option
@click.pass_context
def launch(ctx: click.Context, /, as_json: bool, wait: bool, **params: Any) -> None:
    """Launch training from the config's training template (the seeds' one command)."""
    settings = {k: params[k] for k in ("model", "dataset", "epochs", "lr")
                if params[k] is not None}
    body: dict[str, Any] = {"launch": settings, **spec_body(ctx, params)}
    if params["name"] is not None:
        body["name"] = params["name"]
    _submit(ctx, body, want_json(as_json), wait)


# ---- jobs: looking -------------------------------------------------------------------


@cli.command(epilog=_examples("ugroctl status", "ugroctl status --all", "ugroctl status exp1",
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
        emit(doc, want_json(as_json), lambda: render.jobs_table(doc.get("jobs") or [], now))
    else:
        one = client.get(f"/v1/jobs/{seg(job)}")["job"]
        emit(one, want_json(as_json), lambda: render.job_detail(one, now))


@cli.command(epilog=_examples("ugroctl queue", "ugroctl queue --json"))
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


@cli.command(epilog=_examples("ugroctl logs exp1", "ugroctl logs exp1 --rank 0 -f",
                              "ugroctl logs exp1 --tail 50"))
@click.argument("job")
@click.option("--rank", type=click.IntRange(min=0), metavar="N", help="Only rank N.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@json_option
def logs(job: str, rank: int | None, follow: bool, tail: int | None, as_json: bool) -> None:
    """Print a job's logs (all ranks, or one), optionally following them live.

    With --json (not with -f): {"job", "rank", "lines": [...]}.
    """
    if want_json(as_json) and follow:
        raise click.UsageError("-f streams raw text; use --json without -f")
    lines = ctl().client.stream(f"/v1/jobs/{seg(job)}/logs",
                                {"rank": rank, "follow": follow, "tail": tail})
    if want_json(as_json):
        text = [line.decode("utf-8", "replace").rstrip("\n") for line in lines]
        click.echo(render.dump_json({"job": job, "rank": rank, "lines": text}))
        return
    _stream_out(lines, flush=follow)


@cli.command(epilog=_examples("ugroctl results exp1"))
@click.argument("job")
@json_option
def results(job: str, as_json: bool) -> None:
    """Summarise a job: final loss, duration, steps/s, checkpoints, GPU use per rank."""
    doc = ctl().client.get(f"/v1/jobs/{seg(job)}/results")
    emit(doc, want_json(as_json), lambda: render.results_view(doc, time.time()))


@cli.command(epilog=_examples("ugroctl why exp2"))
@click.argument("job")
@json_option
def why(job: str, as_json: bool) -> None:
    """Explain a job: every decision about it, from the event log."""
    doc = ctl().client.get(f"/v1/jobs/{seg(job)}/why")
    emit(doc, want_json(as_json), lambda: render.why_view(doc, time.time()))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])\Z")


def user_time(text: str, now: float) -> float:
    """``10m``/``2h``/``3d`` ago, ISO-8601 (no zone: local time), or epoch seconds."""
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
        return float(text)
    from datetime import datetime

    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a time like 2026-01-20T12:00, "
                                 f"2026-01-20T12:00:00Z, or an age like 10m, 2h, 3d") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # a time without zone is the user's local time
    return dt.timestamp()


def iso_utc(ts: float) -> str:
    """The log's own timestamp form: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    whole = int(ts // 1)
    micros = round((ts - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


@cli.command(epilog=_examples("ugroctl events --job exp1", "ugroctl events --since 2h",
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


@cli.command(epilog=_examples("ugroctl cancel exp1", "ugroctl cancel exp1 exp2 exp3"))
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
@click.option("--wait", is_flag=True, help="Return only once the processes are gone "
                                           "(up to 2 minutes a job).")
@json_option
def cancel(jobs: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """Cancel jobs: every rank's processes on every node are killed, then GPUs freed.

    With --json: {"jobs": [...]} of the jobs cancelled; errors go to stderr.
    """
    client = ctl().client
    done: list[Any] = []
    worst = 0
    for name in jobs:
        try:
            job = client.post(f"/v1/jobs/{seg(name)}/cancel", None,
                              {"wait": True} if wait else None).get("job", {})
        except CtlError as exc:
            if exc.exit_code == EXIT_UNREACHABLE:
                raise
            click.echo(f"ugroctl: {exc}{_hint(exc)}", err=True)
            worst = max(worst, exc.exit_code)
            continue
        done.append(job)
        if not want_json(as_json):
            line = _job_line(job)
            if job.get("stopping"):
                line = f"{render.clean(job.get('id'))}: stopping (killing its processes)"
            click.echo(line)
    if want_json(as_json):
        click.echo(render.dump_json({"jobs": done}))
    if worst:
        raise click.exceptions.Exit(worst)


@cli.command(context_settings={"ignore_unknown_options": True},
             epilog=_examples("ugroctl priority exp2 10", "ugroctl priority exp3 -5"))
@click.argument("job")
@click.argument("priority", type=int)
@json_option
def priority(job: str, priority: int, as_json: bool) -> None:
    """Set a job's priority (higher runs first; ties run in submission order)."""
    _job_action(job, "priority", {"priority": priority}, as_json,
                lambda j: f"{render.clean(j.get('id'))}: priority {j.get('priority')}")


@cli.command(epilog=_examples("ugroctl hold exp2"))
@click.argument("job")
@json_option
def hold(job: str, as_json: bool) -> None:
    """Hold a waiting job: it keeps its place in the queue but does not start."""
    _job_action(job, "hold", None, as_json, _job_line)


@cli.command(epilog=_examples("ugroctl release exp2"))
@click.argument("job")
@json_option
def release(job: str, as_json: bool) -> None:
    """Release a held job: it may start when its turn comes."""
    _job_action(job, "release", None, as_json, _job_line)


@cli.command(epilog=_examples("ugroctl checkpoint exp1", "ugroctl checkpoint exp1 --wait 120"))
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


@cli.command("resume", epilog=_examples("ugroctl resume exp1",
                                        "ugroctl resume exp1 --set batch_size=16"))
@click.argument("job")
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE", callback=_parse_set,
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
                lambda j: f"resumed {_job_line(j)}"
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


# ---- sweeps ----------------------------------------------------------------------------


class SweepGroup(UgroGroup):
    """``sweep --name S --param ... -- CMD`` creates; ``sweep status|cancel S`` look/stop."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["create", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=SweepGroup, epilog=_examples(
    "ugroctl sweep --name lrs --param lr=1e-5,2e-5,5e-5 --param lora_r=8,16 "
    "--max-parallel 2 -- train.py --epochs 1",
    "ugroctl sweep status lrs", "ugroctl sweep cancel lrs"))
def sweep() -> None:
    """Run a grid of trials as one sweep; rank them by loss.

    \b
    ugroctl sweep --name S --param k=v1,v2 [...] [--max-parallel K] -- CMD [ARGS]...
    ugroctl sweep status S
    ugroctl sweep cancel S

    Each trial gets its values as ``--k v`` arguments (replacing CMD's own --k,
    else appended); UPPER-case keys become environment variables instead.
    """


@sweep.command("create", hidden=True, context_settings={"allow_interspersed_args": False},
               epilog=_examples("ugroctl sweep --name lrs --param lr=1e-5,2e-5 -- train.py"))
@click.option("--name", required=True, metavar="S", help="The sweep's name.")
@click.option("--param", "grid", multiple=True, required=True, metavar="K=V1,V2",
              callback=_parse_params, help="A parameter and its values (repeatable; the "
                                           "grid is every combination).")
@click.option("--max-parallel", type=click.IntRange(min=1), metavar="K",
              help="Run at most K trials at once.")
@job_options(SWEEP_OPTIONS)
@json_option
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.pass_context
def sweep_create(ctx: click.Context, /, name: str, grid: dict[str, list[str]],
                 max_parallel: int | None, command: tuple[str, ...], as_json: bool,
                 **params: Any) -> None:
    """Create a sweep: one trial per combination of --param values."""
    body: dict[str, Any] = {"name": name, "params": grid, "argv": list(command),
                            **spec_body(ctx, params)}
    if max_parallel is not None:
        body["max_parallel"] = max_parallel
    doc = ctl().client.post("/v1/sweeps", body, idempotent=True)
    view = doc.get("sweep", doc)
    if isinstance(view, Mapping) and "trials" in view:  # {"sweep": {"sweep", "trials"}}
        doc = view
    emit(doc, want_json(as_json), lambda: render.sweep_view(doc, time.time())
         + f"\n\nwatch it: ugroctl sweep status {render.clean(name)}")


@sweep.command("status", epilog=_examples("ugroctl sweep status lrs"))
@click.argument("name")
@json_option
def sweep_status(name: str, as_json: bool) -> None:
    """Show each trial's parameters, state, loss and duration, best first."""
    doc = ctl().client.get(f"/v1/sweeps/{seg(name)}")
    emit(doc, want_json(as_json), lambda: render.sweep_view(doc, time.time()))


@sweep.command("cancel", epilog=_examples("ugroctl sweep cancel lrs"))
@click.argument("name")
@json_option
def sweep_cancel(name: str, as_json: bool) -> None:
    """Cancel every trial of a sweep that has not ended."""
    doc = ctl().client.post(f"/v1/sweeps/{seg(name)}/cancel")
    emit(doc, want_json(as_json), lambda: f"sweep {render.clean(name)}: cancelled")


# ---- nodes ---------------------------------------------------------------------------


@cli.command(epilog=_examples("ugroctl health", "ugroctl health --watch",
                              "ugroctl health gpu1 --deep"))
@click.argument("node", required=False)
@click.option("--deep", is_flag=True, help="Also the readiness checks: python, import torch, "
                                           "CUDA, free disk.")
@click.option("--watch", is_flag=True, help="Refresh the table in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              metavar="S", help="Seconds between refreshes with --watch.")
@json_option
def health(node: str | None, deep: bool, watch: bool, interval: float, as_json: bool) -> None:
    """Show node health (status, score, GPUs, alerts), or check one node now."""
    client = ctl().client
    as_json = want_json(as_json)
    if watch:
        if node or deep or as_json:
            raise click.UsageError("--watch shows the table only (no NODE, --deep or --json)")
        _watch(client, interval)
        return
    if node is None and not deep:
        doc = client.get("/v1/nodes")
        emit(doc, as_json, lambda: render.health_table(doc.get("nodes") or [], time.time()))
        return
    names = [node] if node else [n["name"] for n in client.get("/v1/nodes").get("nodes") or []]
    docs = [client.post(f"/v1/nodes/{seg(n)}/check", {"deep": deep}) for n in names]
    if as_json:
        click.echo(render.dump_json(docs[0] if node else {"checks": docs}))
    else:
        click.echo("\n\n".join(render.checks_table(d) for d in docs))
    if any(not c.get("ok") for d in docs for c in d.get("checks") or []):
        raise click.exceptions.Exit(EXIT_FAILED)


def _watch(client: Client, interval: float) -> None:
    tty = sys.stdout.isatty()
    try:
        while True:
            doc = client.get("/v1/nodes")
            text = render.health_table(doc.get("nodes") or [], time.time())
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            click.echo(f"{time.strftime('%H:%M:%S')}  every {interval:g}s, Ctrl-C to stop"
                       f"\n\n{text}\n")
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


@cli.group(cls=UgroGroup, invoke_without_command=True,
           epilog=_examples("ugroctl nodes", "ugroctl nodes trust gpu1"))
@json_option
@click.pass_context
def nodes(ctx: click.Context, as_json: bool) -> None:
    """List the cluster's nodes: address, state, GPUs, labels, jobs."""
    if ctx.invoked_subcommand is not None:
        return
    doc = ctl().client.get("/v1/nodes")
    emit(doc, want_json(as_json), lambda: render.nodes_table(doc.get("nodes") or []))


@nodes.command("trust", epilog=_examples("ugroctl nodes trust gpu1"))
@click.argument("node")
@click.option("-y", "--yes", is_flag=True,
              help="Trust without asking (only if you checked the fingerprint another way).")
@json_option
def nodes_trust(node: str, yes: bool, as_json: bool) -> None:
    """Show the SSH host key NODE offers and, if you say so, record it in known_hosts."""
    client = ctl().client
    key = client.get(f"/v1/nodes/{seg(node)}/hostkey")
    status = key.get("status")
    where = f"{render.clean(key.get('host'))}:{render.clean(key.get('port'))}"
    click.echo(f"node {render.clean(node)} ({where}) offers this host key:\n"
               f"  {render.clean(key.get('fingerprint'))}  ({render.clean(key.get('key_type'))})",
               err=True)
    if status == "trusted":
        click.echo(f"it is already in {render.clean(key.get('known_hosts'))}: nothing to do",
                   err=True)
        if as_json:
            click.echo(render.dump_json(key))
        return
    if status == "changed":
        click.echo(f"WARNING: this is NOT the key recorded for {render.clean(node)} "
                   f"({render.clean(key.get('known_fingerprint'))}). Someone may be "
                   f"impersonating the node, or it was reinstalled.", err=True)
    if not yes:
        if not sys.stdin.isatty():
            fail("not trusting a host key without confirmation: check the fingerprint on the "
                 "node (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and rerun with --yes")
        if not click.confirm("Trust this key?", default=False, err=True):
            fail("not trusted; nothing changed")
    # Send back the very line that was shown: ugrod refuses it if the node's key
    # changed in between, so what is trusted is what the user saw.
    doc = client.post(f"/v1/nodes/{seg(node)}/trust", {"line": key.get("line")})
    emit(doc, want_json(as_json), lambda: f"trusted {render.clean(node)}'s key "
                                           f"{render.clean(doc.get('trusted'))} (recorded in "
                                           f"{render.clean(key.get('known_hosts'))})")


@cli.command(epilog=_examples("ugroctl drain gpu1 --reason 'replacing fan'"))
@click.argument("node")
@click.option("--reason", default="", metavar="TEXT", help="Why (shown in health and nodes).")
@json_option
def drain(node: str, reason: str, as_json: bool) -> None:
    """Stop placing new work on a node; jobs already running there finish."""
    doc = ctl().client.post(f"/v1/nodes/{seg(node)}/drain", {"reason": reason})
    emit(doc, want_json(as_json), lambda: f"{render.clean(node)}: draining (running jobs "
                                           f"finish; `ugroctl undrain {render.clean(node)}` "
                                           f"to end)")


@cli.command(epilog=_examples("ugroctl undrain gpu1"))
@click.argument("node")
@json_option
def undrain(node: str, as_json: bool) -> None:
    """Let a drained node take new work again."""
    doc = ctl().client.post(f"/v1/nodes/{seg(node)}/undrain")
    emit(doc, want_json(as_json), lambda: f"{render.clean(node)}: accepting work")


@cli.command(epilog=_examples("ugroctl reload"))
@json_option
def reload(as_json: bool) -> None:
    """Re-read cluster.yaml: add and remove nodes without touching running jobs."""
    doc = ctl().client.post("/v1/reload")
    emit(doc, want_json(as_json), lambda: render.reload_view(doc))


# ---- without the daemon ------------------------------------------------------------------


@cli.command(epilog=_examples("ugroctl replay --until 1200", "ugroctl replay --until "
                              "2026-01-20T14:00 --state-dir /var/lib/ugro",
                              "ugroctl replay --until 2h --json"))
@click.option("--until", required=True, metavar="SEQ|TIME",
              help="Last event to apply: a sequence number, a time, or an age (2h).")
@click.option("--state-dir", type=click.Path(file_okay=False), envvar="UGRO_STATE_DIR",
              metavar="DIR", help="ugrod's state directory [env UGRO_STATE_DIR; default: "
                                  "the config's, else ugrod's default].")
@json_option
def replay(until: str, state_dir: str | None, as_json: bool) -> None:
    """Show the cluster as it was at a past moment, read straight from the event log.

    Works with ugrod stopped: nothing is written.
    """
    from ugroctl import replaying

    try:
        doc = replaying.state_at(until, state_dir, user_time)
    except replaying.OfflineError as exc:
        fail(str(exc))
    emit(doc, want_json(as_json), lambda: replaying.describe(doc, time.time()))


@cli.command("prometheus-config", epilog=_examples(
    "ugroctl prometheus-config > /etc/prometheus/prometheus.yml",
    "ugroctl prometheus-config --config /etc/ugro/cluster.yaml --exporter-port 9400"))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="UGRO_CONFIG",
              metavar="FILE", help="cluster.yaml [env UGRO_CONFIG; default "
                                   "/etc/ugro/cluster.yaml when present, else this machine].")
@click.option("--rules-dir", metavar="DIR", help="Where the UGRO rule files are installed "
                                                  "[default /etc/prometheus/ugro].")
@click.option("--exporter-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="The nodes' GPU exporter port [default 9400].")
@click.option("--scrape-interval", metavar="DURATION", help="e.g. 15s [default 15s].")
def prometheus_config(config_path: str | None, rules_dir: str | None,
                      exporter_port: int | None, scrape_interval: str | None) -> None:
    """Print a Prometheus scrape config for ugrod and every node's GPU exporter.

    Generated from cluster.yaml (works without ugrod running).
    """
    from ugroctl import replaying

    try:
        text = replaying.prometheus_config(config_path, rules_dir, exporter_port,
                                           scrape_interval)
    except replaying.OfflineError as exc:
        fail(str(exc))
    click.echo(text, nl=not text.endswith("\n"))


# ---- entry point -----------------------------------------------------------------------


def _non_utf8(args: Sequence[str]) -> tuple[int, str] | None:
    for i, arg in enumerate(args):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            return i + 1, shown
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    bad = _non_utf8(args)
    if bad is not None:
        click.echo(f"ugroctl: argument {bad[0]} is not valid UTF-8 ({bad[1][:80]!r}); "
                   f"names, commands and options must be UTF-8 text", err=True)
        return EXIT_USAGE
    try:
        cli.main(args=args, prog_name="ugroctl", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
