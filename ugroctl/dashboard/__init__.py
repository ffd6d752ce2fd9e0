"""``ugroctl dashboard``: a live web page for the cluster, its jobs and their training.

The command only; the server (and aiohttp with it) is imported when it runs,
so other commands start as fast as before. The page itself is ``static/``.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from ugroctl.base import cli, ctl, examples, fail
from ugroctl.client import EXIT_UNREACHABLE, EXIT_USAGE, DaemonUnreachable, SshTunnel


@cli.command(epilog=examples("ugroctl dashboard", "ugroctl dashboard --port 8765 --no-open",
                             "ugroctl --host gpu-master dashboard"))
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: a free one).")
@click.option("--no-open", is_flag=True, help="Print the address only; open no browser.")
def dashboard(port: int, no_open: bool) -> None:
    """Serve a live page of the cluster, jobs and training on 127.0.0.1 until Ctrl-C.

    \b
    The page's requests go to ugrod as you (your uid, as every ugroctl command),
    so it shows and allows what ugroctl does. The address printed carries a
    random token; without it, or from another site, requests are refused.
    With --host HEAD it reaches ugrod through ssh; nothing listens on HEAD.
    """
    import asyncio

    from ugroctl.dashboard import server

    try:
        static = server.static_files()
    except server.MissingAssets as exc:
        fail(str(exc))
    c = ctl()
    tunnel = None
    if c.host:
        tunnel = SshTunnel(c.host, c.remote_socket or "/run/ugro/ugrod.sock")
        where = tunnel.where
        socket_path = tunnel.start()  # raises DaemonUnreachable with ssh's reason
    else:
        socket_path = c.client.where
        where = socket_path
    opened: list[str] = []

    def ready(url: str) -> None:
        click.echo(f"ugroctl dashboard: {url}")
        click.echo("(the address carries a token: keep it to yourself; Ctrl-C stops)", err=True)
        sys.stdout.flush()
        if not no_open:
            opened.append(_open_browser(url))

    async def main() -> None:
        dash = server.Dashboard(socket_path, static=static)
        try:
            await dash.ping()
        except Exception as exc:  # aiohttp's errors, OSError: one line for people
            await dash._close_session(None)  # type: ignore[arg-type]
            os_error = getattr(exc, "os_error", None)  # aiohttp's connect error wraps it
            detail = getattr(os_error, "strerror", None) or str(exc) or type(exc).__name__
            raise DaemonUnreachable(where, detail) from exc
        await server.serve(dash, port, ready)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} (choose another "
             f"--port, or 0 for a free one)", EXIT_USAGE)
    except DaemonUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    finally:
        if tunnel is not None:
            tunnel.close()
        for path in opened:
            _remove_quietly(path)


def _open_browser(url: str) -> str:
    """Open ``url`` through a 0600 file, so the token is not in a browser's argv for all
    to read in /proc (the way Jupyter does it). Returns the file to delete at the end."""
    import tempfile
    import webbrowser
    from html import escape

    fd, path = tempfile.mkstemp(prefix="ugro-dashboard-", suffix=".html")
    with os.fdopen(fd, "w") as f:
        f.write(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" '
                f'content="0;url={escape(url)}"><a href="{escape(url)}">UGRO dashboard</a>\n')
    try:
        webbrowser.open(f"file://{path}")
    except Exception as exc:  # no browser at all: the printed address still works
        click.echo(f"ugroctl: could not open a browser ({exc}); open the address above",
                   err=True)
    return path


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
