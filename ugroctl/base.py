"""The ``ugroctl`` group and what every command shares: where ugrod is, errors, output.

Start-up time matters (people run ``ugroctl status`` fifty times a day): the
command modules import click and our client only; YAML, uuid, shlex and the
daemon's own modules are imported inside the commands that need them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from ugroctl import __version__, render
from ugroctl.client import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    Client,
    CtlError,
)

F = TypeVar("F", bound=Callable[..., Any])
TERMINAL = render.TERMINAL_STATES


# ---- context, errors, output -----------------------------------------------------


class Ctl:
    """What the group options decided: where ugrod is and how to print."""

    def __init__(self, socket: str | None, host: str | None, remote_socket: str | None,
                 as_json: bool, config: str | None = None) -> None:
        self.socket, self.host, self.remote_socket = socket, host, remote_socket
        self.as_json = as_json
        self.config = config
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            socket, origin = self.socket, ""
            if socket is None and self.host is None:
                found = socket_from_config(self.config)
                if found is not None:
                    socket, origin = found[0], f" (cluster.socket in {found[1]})"
            self._client = Client(socket_path=socket, host=self.host,
                                  remote_socket=self.remote_socket, origin=origin)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def socket_from_config(flag: str | None) -> tuple[str, str] | None:
    """(socket, config file) when the config ugrod would read sets ``cluster.socket``.

    The config is --config, else $UGRO_CONFIG, else /etc/ugro/cluster.yaml when
    present: ugrod's own rule. Only a file that mentions ``socket`` is parsed (with
    ugrod's reader, so ``~``, ``${VAR}`` and relative paths mean what they mean to
    ugrod); every other command start stays free of YAML.
    """
    import os

    from ugrod.config.paths import ROOT_CONFIG

    chosen = flag or os.environ.get("UGRO_CONFIG") or None
    if chosen is None:
        if not ROOT_CONFIG.exists():
            return None
        chosen = str(ROOT_CONFIG)
    try:
        with open(chosen, "rb") as f:
            head = f.read(1 << 20)
    except OSError as exc:
        named = "--config" if flag else "UGRO_CONFIG" if chosen != str(ROOT_CONFIG) else \
            "the default path"
        raise CtlError(f"cannot read the config {chosen} (from {named}): "
                       f"{exc.strerror or exc}; fix the path, or pass --socket PATH") from None
    if b"socket" not in head:
        return None
    from ugrod.config import loading
    from ugrod.config import schema as cfgmod

    try:
        cfg = loading.load(chosen)
    except cfgmod.ConfigError as exc:
        raise CtlError(f"{exc.lines()[0]} (read for cluster.socket; fix it, or pass "
                       f"--socket PATH)") from None
    socket = cfg.cluster.socket
    return (str(socket), chosen) if socket is not None else None


def hint_for(exc: CtlError) -> str:
    if exc.exit_code == EXIT_NOT_FOUND and "ugroctl " not in str(exc):
        return " (list jobs with `ugroctl status --all`, nodes with `ugroctl nodes`)"
    return ""


class UgroGroup(click.Group):
    """Turns our errors into ``ugroctl: ...`` on stderr and the exit-code table."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CtlError as exc:
            click.echo(f"ugroctl: {exc}{hint_for(exc)}", err=True)
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


def job_line(job: Mapping[str, Any]) -> str:
    line = f"{render.clean(job.get('id'))}: {render.clean(job.get('state'))}"
    if job.get("held"):
        line += " (held)"
    why = job.get("waiting_reason") if job.get("state") in ("queued", "retrying") else None
    why = why or (job.get("reason") if job.get("state") in TERMINAL or job.get("stopping")
                  else None)
    if why:
        line += f": {render.clean(why)}"
    return line


def examples(*lines: str) -> str:
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# ---- the group ---------------------------------------------------------------------


@click.group(cls=UgroGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples("ugroctl health", "ugroctl submit --name exp1 --nodes 3 "
                              "--gpus-per-node 1 -- train.py --epochs 3",
                              "ugroctl status exp1", "ugroctl logs exp1 -f --rank 0",
                              "ugroctl --host gpu-master status"))
@click.option("--socket", "socket_path", metavar="PATH", envvar="UGRO_SOCKET",
              help="ugrod's Unix socket [env UGRO_SOCKET; else cluster.socket from the config; "
                   "default /run/ugro/ugrod.sock as root, else "
                   "$XDG_RUNTIME_DIR/ugro/ugrod.sock].")
@click.option("--host", metavar="HEAD", envvar="UGRO_HOST",
              help="Reach ugrod on the head node HEAD through an ssh forward (your identity "
                   "there, no TCP port) [env UGRO_HOST].")
@click.option("--remote-socket", metavar="PATH", envvar="UGRO_REMOTE_SOCKET",
              help="ugrod's socket on HEAD with --host [default /run/ugro/ugrod.sock].")
@click.option("--config", "config_path", metavar="FILE", envvar="UGRO_CONFIG",
              help="cluster.yaml, read for cluster.socket when --socket is not given [env "
                   "UGRO_CONFIG; default /etc/ugro/cluster.yaml when present].")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document instead of text (every command).")
@click.version_option(__version__, "--version", prog_name="ugroctl",
                      message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, host: str | None,
        remote_socket: str | None, config_path: str | None, as_json: bool) -> None:
    """Control ugrod, the UGRO GPU cluster daemon: jobs, queue, nodes, health.

    \b
    Exit codes: 0 ok, 1 failed or refused, 2 usage, 3 ugrod unreachable,
    4 not found, 5 permission denied.
    """
    if host and ctx.get_parameter_source("socket_path") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--socket names a local socket; with --host use "
                               "--remote-socket PATH")
    ctx.obj = Ctl(None if host else socket_path, host, remote_socket, as_json, config_path)



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


def terminal_width() -> int | None:
    """Columns to fit: the terminal's, else $COLUMNS, else None (output to a pipe)."""
    import os
    import sys

    if sys.stdout.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    cols = os.environ.get("COLUMNS", "")
    return int(cols) if cols.isdigit() and int(cols) > 0 else None
