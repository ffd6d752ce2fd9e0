"""The entry points: cluster.yaml text or file -> Config, and the checks of what it names.

The file is parsed with a hardened ``yaml.SafeLoader`` (no tags, no duplicate keys,
bounded size, nesting and alias expansion) into plain data, which ``sections.py``
then walks section by section. Nothing stops at the first problem: all of them are
raised together as one ``ConfigError``, printed one line each as
``FILE: KEY.PATH: what was expected, got what``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from ugrod.config.paths import home_dir
from ugrod.config.reader import (
    MAX_BYTES,
    ConfigError,
    Problem,
    Reader,
    Refused,
    join_key,
    parse_yaml,
)
from ugrod.config.schema import Config, current_user
from ugrod.config.sections import read_config


def loads(text: str | bytes, name: str = "cluster.yaml", env: Mapping[str, str] | None = None,
          *, base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Parse and validate cluster.yaml text; raises ConfigError listing every problem.

    ``base_dir`` anchors relative head-side paths (default: the working directory).
    """
    env = _with_identity(os.environ if env is None else env)
    try:
        data, problems = parse_yaml(text)
    except Refused as exc:
        raise ConfigError(name, [Problem(exc.where, exc.problem)]) from None
    reader = Reader(env, base_dir)
    reader.problems.extend(problems)
    config = read_config(reader, data)
    if reader.problems or config is None:
        raise ConfigError(name, reader.problems or [Problem("", "no configuration")])
    return msgspec.structs.replace(config, source=source)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a cluster.yaml file; raises ConfigError (also when unreadable)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, [Problem("", f"cannot read: {exc.strerror or exc}")]) from None
    absolute = path.absolute()
    return loads(data, str(path), env, base_dir=absolute.parent, source=absolute)


def check_files(cfg: Config) -> list[Problem]:
    """What the config names on the head node that is not there (``--check-config``).

    Kept out of ``loads`` (which reads no file but the config): a missing key file
    is found here, with its key path, instead of as a node that cannot be reached.
    """
    problems = []
    for n in cfg.nodes:
        path = n.identity_file
        if path is None:
            continue
        where = f"{join_key('nodes', n.name)}.identity_file"
        try:
            if not path.exists():
                problems.append(Problem(where, f"no such file: {path} (the SSH private key "
                                               f"for this node, e.g. ~/.ssh/id_ed25519)"))
            elif not path.is_file():
                problems.append(Problem(where, f"{path} is not a file (expected an SSH "
                                               f"private key)"))
        except PermissionError:
            continue  # this user may not look there; ugrod's user may
        except OSError as exc:
            problems.append(Problem(where, f"cannot check {path}: {exc.strerror or exc}"))
    return problems


def _with_identity(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` with USER, LOGNAME and HOME filled from the password database when unset.

    The seeds write ``user: "${USER}"``; cron, CI and some service managers start
    processes without USER, and that must not make the file invalid.
    """
    if env.get("USER") and env.get("LOGNAME") and env.get("HOME"):
        return env
    user = current_user(env)
    return {"USER": user, "LOGNAME": user, "HOME": str(home_dir(env)),
            **{k: v for k, v in env.items() if v}}
