"""Default locations of ugrod's state directory, control socket and config file.

Stdlib only, and nothing heavy: ``ugroctl`` imports this on every run.
Defaults follow DESIGN.md: as root ``/var/lib/ugro`` and ``/run/ugro/ugrod.sock``
(what systemd's ``StateDirectory=``/``RuntimeDirectory=`` give); otherwise the
XDG base directories, with ``/tmp/ugro-<uid>`` when there is no runtime dir.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROOT_STATE_DIR = Path("/var/lib/ugro")
ROOT_SOCKET = Path("/run/ugro/ugrod.sock")
ROOT_CONFIG = Path("/etc/ugro/cluster.yaml")
SOCKET_NAME = "ugrod.sock"


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """$HOME, else the password database's home of the current user."""
    env = os.environ if env is None else env
    home = env.get("HOME", "")
    if home:
        return Path(home)
    import pwd  # only needed when $HOME is unset

    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _xdg(env: Mapping[str, str], var: str) -> Path | None:
    # The XDG spec says relative values are invalid and must be ignored.
    value = env.get(var, "")
    return Path(value) if value and os.path.isabs(value) else None


def _uid(uid: int | None) -> int:
    return os.geteuid() if uid is None else uid


def default_state_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """/var/lib/ugro as root, else $XDG_STATE_HOME/ugro (default ~/.local/state/ugro)."""
    env = os.environ if env is None else env
    if _uid(uid) == 0:
        return ROOT_STATE_DIR
    base = _xdg(env, "XDG_STATE_HOME") or home_dir(env) / ".local" / "state"
    return base / "ugro"


def default_socket_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """/run/ugro/ugrod.sock as root, else $XDG_RUNTIME_DIR/ugro/ugrod.sock or /tmp/ugro-UID/.

    This is the default only: ``UGRO_SOCKET`` and ``--socket`` are applied by
    the callers (``resolve_paths`` in ugrod, click's envvar in ugroctl).
    """
    env = os.environ if env is None else env
    u = _uid(uid)
    if u == 0:
        return ROOT_SOCKET
    runtime = _xdg(env, "XDG_RUNTIME_DIR")
    if runtime is not None:
        return runtime / "ugro" / SOCKET_NAME
    return Path(f"/tmp/ugro-{u}") / SOCKET_NAME


def config_candidates(env: Mapping[str, str] | None = None,
                      uid: int | None = None) -> tuple[Path, ...]:
    """Where ugrod looks for cluster.yaml when neither --config nor UGRO_CONFIG names one.

    The first that exists wins; none existing means the built-in one-node cluster.
    """
    env = os.environ if env is None else env
    if _uid(uid) == 0:
        return (ROOT_CONFIG,)
    home = home_dir(env)
    xdg = _xdg(env, "XDG_CONFIG_HOME") or home / ".config"
    return (xdg / "ugro" / "cluster.yaml", home / "ugro" / "config" / "cluster.yaml",
            ROOT_CONFIG)


def expand_user_path(value: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                     base: Path | None = None) -> Path:
    """``~`` / ``~/x`` against $HOME (``~user`` via the password database), then absolute.

    A relative path is taken relative to ``base`` (default: the working directory).
    Raises ValueError for ``~user`` naming no user.
    """
    text = os.fspath(value)
    if text == "~" or text.startswith("~/"):
        path = home_dir(env) / text[2:]
    elif text.startswith("~"):
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            user = text[1:].split("/", 1)[0]
            raise ValueError(f"no user {user!r} for {text[:1 + len(user)]!r}")
        path = Path(expanded)
    else:
        path = Path(text)
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    return path


def job_dir(root: Path, name: str, submitted_at: float | None, *,
            timestamped: bool = False) -> Path:
    """A job's directory on the head: the one rule, for everything that reads job dirs.

    ``STATE_DIR/jobs/NAME`` by default; under ``paths.results`` (``timestamped``) the
    seeds' ``experiments/NAME_YYYYmmdd_HHMMSS``, the time being the job's submission in
    UTC (from the log, so the name never changes, whatever the machine's time zone).
    """
    if not timestamped or submitted_at is None:
        return root / name
    import time  # only needed here

    return root / f"{name}_{time.strftime('%Y%m%d_%H%M%S', time.gmtime(submitted_at))}"
