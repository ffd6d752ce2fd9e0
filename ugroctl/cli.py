"""ugroctl: thin commands that parse, call ugrod (client.py), render (render.py), exit.

The group and shared helpers are in ``base.py``; the commands, by concept, in
``submitting.py`` (submit, launch, sweep), ``jobs.py`` (everything about a job that
exists) and ``cluster.py`` (health, nodes, drain, reload, replay, prometheus-config) and
``dashboard/`` (the web page).
Importing this module registers them all on ``cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from ugroctl import (  # noqa: F401  (they register the commands)
    cluster,
    dashboard,
    jobs,
    submitting,
)
from ugroctl.base import cli
from ugroctl.client import EXIT_FAILED, EXIT_USAGE
from ugroctl.jobs import find_batch_size

__all__ = ["cli", "find_batch_size", "main"]


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
