"""Commands that create work: ``submit`` (argv or a job file), ``launch`` and ``sweep``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
from click.core import ParameterSource

from ugroctl import render
from ugroctl.base import (
    TERMINAL,
    F,
    UgroGroup,
    cli,
    ctl,
    emit,
    examples,
    fail,
    job_line,
    json_option,
    want_json,
)
from ugroctl.client import (
    EXIT_FAILED,
    EXIT_USAGE,
    Client,
    CtlError,
    seg,
)

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


def parse_env(ctx: click.Context, param: click.Parameter, values: Sequence[str]
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


def parse_set(ctx: click.Context, param: click.Parameter, values: Sequence[str]
               ) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not PARAM_NAME.match(key):
            raise click.BadParameter(f"{item!r}: expected key=value (e.g. --set "
                                     f"batch_size=16)", ctx, param)
        out[key] = value
    return out


def parse_params(ctx: click.Context, param: click.Parameter, values: Sequence[str]
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


FORMATS = ("hf", "json", "tqdm", "kv")


def parse_formats(ctx: click.Context, param: click.Parameter, value: str | None
                  ) -> list[str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in (*FORMATS, "none")]
    if bad or not parts:
        raise click.BadParameter(f"{value!r}: expected some of {', '.join(FORMATS)} "
                                 f"(comma-separated), or none", ctx, param)
    return parts


def job_options(only: frozenset[str] | None = None) -> Callable[[F], F]:
    """Placement, environment and policy: one set for submit, launch and sweep."""
    opts = [
        click.option("--nodes", type=click.IntRange(min=1), metavar="N",
                     help="Number of nodes [default 1; launch: every schedulable node with "
                          "the GPUs, or training.nodes]."),
        click.option("--gpus-per-node", type=click.IntRange(min=0), metavar="G",
                     help="GPUs per node (0: CPU job) [default 0; launch: 1, or "
                          "training.gpus_per_node]."),
        click.option("--min-vram", type=click.FloatRange(min=0, min_open=True), metavar="GB",
                     help="Each GPU must have at least GB of memory."),
        click.option("--node", "node_names", multiple=True, metavar="NAME",
                     help="Run on this node (repeat for each node)."),
        click.option("--label", "labels", multiple=True, metavar="L",
                     help="Only nodes with label L (repeatable)."),
        click.option("--avoid-label", "avoid_labels", multiple=True, metavar="L",
                     help="Never nodes with label L (repeatable)."),
        click.option("--priority", type=click.IntRange(-1000, 1000), metavar="P",
                     help="Higher runs first, -1000..1000 [default 0]."),
        click.option("--max-retries", type=click.IntRange(min=0), metavar="N",
                     help="Retry a failed job up to N times, resuming from its newest "
                          "checkpoint (a command that cannot start is never retried)."),
        click.option("--after", multiple=True, metavar="JOB",
                     help="Start only after JOB has succeeded (repeatable; Slurm's afterok)."),
        click.option("--after-any", multiple=True, metavar="JOB",
                     help="Start once JOB has ended, however it ended (repeatable)."),
        click.option("--after-failed", multiple=True, metavar="JOB",
                     help="Start only if JOB failed or was cancelled (repeatable; Slurm's "
                          "afternotok)."),
        click.option("--time", "time_limit", metavar="LIMIT",
                     help="Wall-clock limit of each attempt; past it the job is cancelled "
                          "with the reason 'time limit'. Slurm's forms: minutes, M:S, H:M:S, "
                          "D-H, D-H:M, D-H:M:S; or 90m, 2h, 1h30m."),
        click.option("--hold", is_flag=True, help="Queue the job held; `ugroctl release` "
                                                  "lets it run."),
        click.option("--env", "env", multiple=True, metavar="K=V", callback=parse_env,
                     help="Set an environment variable for every rank (repeatable)."),
        click.option("--nproc-per-node", type=click.IntRange(min=1), metavar="P",
                     help="Processes per node under torchrun when the job takes no GPU "
                          "(a GPU job runs one per GPU) [default 1]."),
        click.option("--torchrun/--no-torchrun", default=None,
                     help="Run the command under torchrun (one process per GPU, rendezvous "
                          "across the nodes), or as it is [default: as it is; launch: "
                          "torchrun]. A .py script runs under the node's python either way."),
        click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True),
                     metavar="S", help="Report the job stalled when its step stops "
                                       "advancing for S seconds."),
        click.option("--unreachable-tolerance", type=click.FloatRange(min=1, max=7 * 86400),
                     metavar="S", help="How long one of the job's nodes may be out of "
                                       "reach while the others still show progress before "
                                       "ugrod gives the attempt up [default: the config's "
                                       "health.unreachable_tolerance_s, 30 min]."),
        click.option("--cwd", metavar="DIR",
                     help="Directory the ranks start in, on every node [default: the one "
                          "you run ugroctl in; launch: paths.scripts when the config has "
                          "it]. Relative to yours; ~/... is each node's home."),
        click.option("--sync/--no-sync", "sync", default=None,
                     help="Send your directory (or --cwd) to every node of the job first, "
                          "into a copy of its own (unchanged files are not sent again; "
                          ".git, __pycache__ and what .ugroignore names stay behind) "
                          "[default: the config's sync.default]."),
        click.option("--expected-runtime", type=click.FloatRange(min=0, min_open=True),
                     metavar="S", help="How long the job should run, in seconds: lets "
                                       "`ugroctl queue` estimate when waiting jobs start."),
        click.option("--progress", "progress", metavar="FORMATS", callback=parse_formats,
                     help="Progress formats ugrod reads in the output: some of hf, json, "
                          "tqdm, kv (comma-separated), or none [default hf,json,tqdm]."),
        click.option("--progress-rank", type=click.IntRange(min=0), metavar="R",
                     help="Read progress from node rank R's output [default 0]."),
        click.option("--loss-key", metavar="NAME",
                     help="The metric that is the job's loss [default loss, train_loss, "
                          "train/loss]."),
        click.option("--stop-grace", type=click.FloatRange(min=0.1, max=3600), metavar="S",
                     help="On cancel: SIGINT, SIGTERM after S/2 seconds, SIGKILL after S "
                          "[default: ugrod's --grace]."),
        click.option("--checkpoints", "checkpoints", metavar="GLOB",
                     help="Where the job writes checkpoints besides $UGRO_CHECKPOINT_DIR, "
                          "e.g. 'out/checkpoint-*' (relative to --cwd): results and "
                          "resume find them."),
        click.option("--checkpoint-copy", type=click.Choice(["latest", "every", "none"]),
                     help="Which checkpoints are copied to the head's job directory "
                          "[default: the config's checkpoints.copy, latest]."),
        click.option("--checkpoint-keep", type=click.IntRange(0, 10000), metavar="N",
                     help="Copies kept on the head, newest first; 0: all [default: the "
                          "config's checkpoints.keep, 2]."),
        click.option("--resume-on", type=click.Choice(["rank0", "all"]),
                     help="Where a retry's checkpoint is put before it starts: rank 0's "
                          "node, or every node [default: the config's checkpoints.stage]."),
        click.option("--expand-env", is_flag=True,
                     help="Let ugrod replace ${UGRO_CHECKPOINT_DIR} (and the other UGRO_* "
                          "variables it sets) in the command's arguments, per rank; "
                          "never through a shell."),
        click.option("--wait", is_flag=True,
                     help="Wait until the job ends; exit 0 only if it succeeded."),
        click.option("--dry-run", is_flag=True,
                     help="Check the job and show how it would run (nodes, directory, the "
                          "full command per node), with the reason if it could never run "
                          "here; record nothing."),
    ]
    names = ["nodes", "gpus_per_node", "min_vram", "node_names", "labels", "avoid_labels",
             "priority", "max_retries", "after", "after_any", "after_failed", "time_limit",
             "hold", "env", "nproc_per_node", "torchrun", "stall_timeout",
             "unreachable_tolerance", "cwd", "sync",
             "expected_runtime", "progress", "progress_rank", "loss_key", "stop_grace",
             "checkpoints", "checkpoint_copy", "checkpoint_keep", "resume_on", "expand_env",
             "wait", "dry_run"]

    def decorate(f: F) -> F:
        for name, opt in reversed(list(zip(names, opts, strict=True))):
            if only is None or name in only:
                f = opt(f)
        return f

    return decorate


# A sweep takes every placement, environment and policy option (not --wait/--dry-run).
SWEEP_OPTIONS = frozenset({"nodes", "gpus_per_node", "min_vram", "node_names", "labels",
                           "avoid_labels", "priority", "max_retries", "after", "after_any",
                           "after_failed", "time_limit", "hold", "env", "nproc_per_node",
                           "torchrun", "stall_timeout", "unreachable_tolerance", "cwd",
                           "sync", "expected_runtime",
                           "progress", "progress_rank", "loss_key", "stop_grace",
                           "checkpoints", "checkpoint_copy", "checkpoint_keep", "resume_on",
                           "expand_env"})


_SPEC_KEYS = {  # option name -> request body key
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "node_names": "node_names",
    "labels": "labels_required", "avoid_labels": "labels_avoided", "priority": "priority",
    "max_retries": "max_retries", "after": "after", "after_any": "after_any",
    "after_failed": "after_failed", "time_limit": "time_limit", "hold": "held", "env": "env",
    "torchrun": "torchrun", "stall_timeout": "stall_timeout_s",
    "unreachable_tolerance": "unreachable_tolerance_s",
    "nproc_per_node": "nproc_per_node", "expected_runtime": "expected_runtime_s",
    "progress": "progress", "progress_rank": "progress_rank", "loss_key": "loss_key",
    "stop_grace": "stop_grace_s", "checkpoints": "checkpoints",
    "checkpoint_copy": "checkpoint_copy", "checkpoint_keep": "checkpoint_keep",
    "resume_on": "resume_on", "expand_env": "expand_env",
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


def where_body(ctx: click.Context, params: Mapping[str, Any],
               file_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the ranks start: ``submit_dir`` (here, absolute), ``cwd``, and the ``sync`` tree.

    --cwd (or a job file's ``cwd``) is made absolute against this directory, as Slurm
    does with the submit directory; ``~/...`` is left for each node's home. With --sync
    the directory (--cwd, else this one) is uploaded and the ranks start in its copy.
    """
    import os

    here = os.getcwd()
    file_body = file_body or {}
    body: dict[str, Any] = {"submit_dir": here}
    cwd = params.get("cwd") if _given(ctx, "cwd") else file_body.get("cwd")
    if cwd is not None:
        cwd = str(cwd)
        body["cwd"] = cwd if cwd == "~" or cwd.startswith("~/") else os.path.abspath(cwd)
    sync = params.get("sync") if _given(ctx, "sync") else file_body.get("sync")
    if sync:
        body["sync"] = upload_code(str(body.get("cwd", here)))
        body.pop("cwd", None)
    elif sync is False:
        body["sync"] = False  # not the config's sync.default either
    return body


def upload_code(top: str) -> str:
    """Send ``top`` to ugrod's code store for --sync; the tree's digest."""
    import os

    from ugroctl import syncing

    if top.startswith("~"):
        raise click.UsageError("--sync sends a directory of yours: give --cwd a path here, "
                               "not one under a node's ~")
    if not os.path.isdir(top):
        fail(f"--sync: {top} is not a directory", EXIT_USAGE)
    try:
        tree, files, size, sent = syncing.upload(ctl().client, top)
    except syncing.SyncError as exc:
        fail(f"--sync: {exc}", EXIT_USAGE)
    if not want_json(False):
        click.echo(f"synced {top}: {files} files, {size / 1e6:.1f} MB ({sent / 1e6:.1f} MB "
                   f"sent), tree {tree[:19]}…", err=True)
    return tree


def post_job(body: dict[str, Any], query: Mapping[str, Any] | None = None,
             path: str = "/v1/jobs") -> Any:
    """POST a job (or sweep); when the config makes --sync the default, upload and resend."""
    from ugroctl.client import ApiError

    client = ctl().client
    try:
        return client.post(path, body, query, idempotent=query is None)
    except ApiError as exc:
        if exc.code != "sync_required" or "sync" in body:
            raise
    body = {**body, "sync": upload_code(str(body.get("cwd") or body["submit_dir"]))}
    body.pop("cwd", None)
    return client.post(path, body, query, idempotent=query is None)


def _submit(ctx: click.Context, body: dict[str, Any], as_json: bool, wait: bool,
            dry_run: bool = False) -> None:
    client = ctl().client
    if dry_run:
        if wait:
            raise click.UsageError("--dry-run queues nothing to --wait for")
        import shlex

        doc = post_job(body, {"dry_run": 1})
        job = {**doc["job"], "plan": doc.get("plan")}  # --json: the job, and the plan
        emit(job, as_json, lambda: f"dry run: would queue {job_line(job)}\n"
                                    f"command: {shlex.join(job.get('argv') or [])}\n"
                                    f"{render.launch_plan(doc.get('plan') or {})}\n"
                                    "nothing was recorded; drop --dry-run to queue it")
        return
    job = post_job(body)["job"]
    if not wait:
        emit(job, as_json, lambda: f"submitted {job_line(job)}\n"
                                    f"follow it: ugroctl logs {job['id']} -f")
        return
    if not as_json:
        click.echo(f"submitted {job_line(job)}; waiting for it to end (Ctrl-C stops "
                   f"waiting, not the job)", err=True)
    try:
        job = _wait_for(client, str(job["id"]))
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; {job['id']} goes on", err=True)
        raise click.exceptions.Exit(130) from None
    emit(job, as_json, lambda: job_line(job))
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
             epilog=examples(
                 "ugroctl submit --name exp1 --nodes 3 --gpus-per-node 1 --torchrun -- "
                 "train.py --lr 2e-4",
                 "cd ~/proj && ugroctl submit --sync --nodes 3 --torchrun -- train.py",
                 "ugroctl submit --env SEED=1 -- python3 prep.py",
                 "ugroctl submit --min-vram 10 --max-retries 2 --after exp1 -- train.py",
                 "ugroctl submit --priority 5 job.yaml     (a job file: see docs/cli.md)"))
@click.option("--name", metavar="NAME", help="Job name [default: made up by ugrod].")
@job_options()
@json_option
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]... | FILE.yaml")
@click.pass_context
def submit(ctx: click.Context, /, command: tuple[str, ...], as_json: bool, wait: bool,
           **params: Any) -> None:
    """Queue a job: CMD on --nodes nodes, started in this directory (or a job file)."""
    path, argv = _split_file_or_command(command)
    if path is not None:
        from ugroctl import jobfile

        try:
            body = jobfile.load(path)
        except jobfile.JobFileError as exc:
            fail("\nugroctl: ".join(exc.lines()), EXIT_USAGE)  # every problem, one a line
        where = where_body(ctx, params, body)
        body.pop("sync", None)
        body.pop("cwd", None)
        body.update(spec_body(ctx, params))
    else:
        where = where_body(ctx, params)
        body = {"argv": argv, **spec_body(ctx, params)}
    body.update(where)
    if params.get("name") is not None:
        body["name"] = params["name"]
    _submit(ctx, body, want_json(as_json), wait, params.get("dry_run", False))


@cli.command(epilog=examples(
    "ugroctl launch --name exp1 --model llama-7b --dataset wikitext --epochs 3",
    "ugroctl launch --name quick --epochs 1 --nodes 2 --detach"))
@click.option("--name", metavar="NAME", help="Job name, passed to the script as {name} "
                                             "[default: made up by ugrod].")
@click.option("--model", metavar="MODEL", help="Model to train [config training default].")
@click.option("--dataset", metavar="DATASET", help="Dataset [config training default].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [config default].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), metavar="LR",
              help="Learning rate [config default].")
@click.option("--detach", is_flag=True, help="Return once queued, without showing progress.")
@job_options()
@json_option
@click.pass_context
def launch(ctx: click.Context, /, as_json: bool, wait: bool, detach: bool,
           **params: Any) -> None:
    """Launch training from the config's training template (the seeds' one command).

    By default on every schedulable node with one GPU each; shows where each rank
    goes, then the progress until training has started (or ended).
    """
    settings = {k: params[k] for k in ("model", "dataset", "epochs", "lr")
                if params[k] is not None}
    body: dict[str, Any] = {"launch": settings, **spec_body(ctx, params)}
    if params["name"] is not None:
        body["name"] = params["name"]
    body.update(where_body(ctx, params))  # no --cwd: paths.scripts, else here (ugrod)
    as_json = want_json(as_json)
    if wait or detach or as_json or params.get("dry_run"):
        _submit(ctx, body, as_json, wait, params.get("dry_run", False))
        return
    client = ctl().client
    job = post_job(body)["job"]
    from ugroctl import progress

    try:
        code = progress.follow(client, str(job["id"]))
    except KeyboardInterrupt:
        click.echo(f"\nstopped watching; {job['id']} goes on "
                   f"(ugroctl status {job['id']})", err=True)
        raise click.exceptions.Exit(130) from None
    if code:
        raise click.exceptions.Exit(code)


# ---- sweeps ----------------------------------------------------------------------------


class SweepGroup(UgroGroup):
    """``sweep --name S --param ... -- CMD`` creates; ``sweep status|cancel S`` look/stop."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["create", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=SweepGroup, epilog=examples(
    "ugroctl sweep --name lrs --param lr=1e-5,2e-5,5e-5 --param lora_r=8,16 "
    "--max-parallel 2 -- train.py --epochs 1",
    "ugroctl sweep list", "ugroctl sweep status lrs", "ugroctl sweep cancel lrs"))
def sweep() -> None:
    """Run a grid of trials as one sweep; rank them by loss.

    \b
    ugroctl sweep --name S --param k=v1,v2 [...] [--max-parallel K] -- CMD [ARGS]...
    ugroctl sweep list
    ugroctl sweep status S
    ugroctl sweep cancel S

    Each trial gets its values as ``--k v`` arguments (replacing CMD's own --k,
    else appended); UPPER-case keys become environment variables instead.
    """


@sweep.command("create", hidden=True, context_settings={"allow_interspersed_args": False},
               epilog=examples("ugroctl sweep --name lrs --param lr=1e-5,2e-5 -- train.py"))
@click.option("--name", required=True, metavar="S", help="The sweep's name.")
@click.option("--param", "grid", multiple=True, required=True, metavar="K=V1,V2",
              callback=parse_params, help="A parameter and its values (repeatable; the "
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
                            **spec_body(ctx, params), **where_body(ctx, params)}
    if max_parallel is not None:
        body["max_parallel"] = max_parallel
    doc = post_job(body, path="/v1/sweeps")
    view = doc.get("sweep", doc)
    if isinstance(view, Mapping) and "trials" in view:  # {"sweep": {"sweep", "trials"}}
        doc = view
    emit(doc, want_json(as_json), lambda: render.sweep_view(doc, time.time())
         + f"\n\nwatch it: ugroctl sweep status {render.clean(name)}")


@sweep.command("list", epilog=examples("ugroctl sweep list", "ugroctl sweep list --json"))
@json_option
def sweep_list(as_json: bool) -> None:
    """List every sweep, newest first: owner, trials by state, when it was created."""
    doc = ctl().client.get("/v1/sweeps")
    emit(doc, want_json(as_json), lambda: render.sweeps_table(doc.get("sweeps") or [],
                                                              time.time()))


@sweep.command("status", epilog=examples("ugroctl sweep status lrs"))
@click.argument("name")
@json_option
def sweep_status(name: str, as_json: bool) -> None:
    """Show each trial's parameters, state, loss and duration, best first."""
    doc = ctl().client.get(f"/v1/sweeps/{seg(name)}")
    emit(doc, want_json(as_json), lambda: render.sweep_view(doc, time.time()))


@sweep.command("cancel", epilog=examples("ugroctl sweep cancel lrs"))
@click.argument("name")
@json_option
def sweep_cancel(name: str, as_json: bool) -> None:
    """Cancel every trial of a sweep that has not ended."""
    doc = ctl().client.post(f"/v1/sweeps/{seg(name)}/cancel")
    emit(doc, want_json(as_json), lambda: f"sweep {render.clean(name)}: cancelled")
