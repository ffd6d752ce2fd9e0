"""Who may do what on ugrod's socket, and as whom a job runs (DESIGN rule 10).

Three ways to run ugrod, found at start:

- ``root``: jobs on the head node run as the user who submitted them (uid, gid,
  supplementary groups from the group database), never as root for someone else.
- ``service``: a dedicated account holding CAP_SETUID and CAP_SETGID (and nothing else,
  see systemd/ugrod.service) does the same as root does.
- ``development``: an ordinary user. Jobs can only run as that user, so the socket
  admits that user alone; anyone else is told why.

Like Slurm and HTCondor: the peer's kernel-reported credentials (SO_PEERCRED) are the
identity, ugrod's own account has no rights on its socket in the first two modes, node
operations are for root and an optional admin group, and other users see a job's state
but not its environment values, logs, metrics or checkpoints.
"""

from __future__ import annotations

import enum
import functools
import grp
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REDACTED = "<redacted>"
# PATH of a job on the head node when ugrod switches to its owner (login(1)'s default).
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CAP_SETGID, _CAP_SETUID = 6, 7


class Mode(enum.StrEnum):
    ROOT = "root"
    SERVICE = "service"
    DEVELOPMENT = "development"


def detect_mode() -> Mode:
    """root, a service account with CAP_SETUID+CAP_SETGID in effect, or development."""
    if os.geteuid() == 0:
        return Mode.ROOT
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return Mode.DEVELOPMENT
    need = (1 << _CAP_SETUID) | (1 << _CAP_SETGID)
    return Mode.SERVICE if eff & need == need else Mode.DEVELOPMENT


@dataclass(frozen=True, slots=True)
class Account:
    """A local user as a job runs: ids, groups (initgroups), home and shell."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def run_as(self) -> dict[str, Any]:
        """The rank wrapper's ``run_as``."""
        return {"user": self.user, "uid": self.uid, "gid": self.gid,
                "groups": list(self.groups)}

    def env(self) -> dict[str, str]:
        """A login's basic environment for this user (the job's env goes on top)."""
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user,
                "SHELL": self.shell, "PATH": ROOT_PATH if self.uid == 0 else USER_PATH}


class NoSuchUser(LookupError):
    """A uid with no entry in the password database: nobody to run a job as."""


def account(uid: int) -> Account:
    """The account of ``uid`` from the password and group databases (raises NoSuchUser)."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise NoSuchUser(f"uid {uid} has no entry in the password database") from None
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return Account(pw.pw_name, uid, pw.pw_gid, groups, pw.pw_dir or "/",
                   pw.pw_shell or "/bin/sh")


class Refused(Exception):
    """The peer may not do this; ``str(e)`` is one line for people."""


class Policy:
    """Decisions about a peer (uid): admitted at all, admin, may see or change a job."""

    def __init__(self, mode: Mode, *, admin_group: str | None = None,
                 own_uid: int | None = None) -> None:
        self.mode = mode
        self.admin_group = admin_group
        self.own_uid = os.geteuid() if own_uid is None else own_uid
        try:
            self._own_name = pwd.getpwuid(self.own_uid).pw_name
        except KeyError:
            self._own_name = f"uid {self.own_uid}"
        self._admins: dict[int, bool] = {}

    @property
    def switches_users(self) -> bool:
        """Whether jobs run as their owners (root or service), not as ugrod's account."""
        return self.mode is not Mode.DEVELOPMENT

    def admit(self, uid: int, user: str) -> None:
        """Raise Refused unless ``uid`` may use the socket at all."""
        if self.mode is Mode.DEVELOPMENT:
            if uid != self.own_uid:
                raise Refused(
                    f"this ugrod runs as {self._own_name} in development mode (not as root "
                    f"or a service account), so every job it starts runs as "
                    f"{self._own_name}; it accepts only {self._own_name}, not {user}. Start "
                    f"your own ugrod, or ask for one run as root or as the ugrod service "
                    f"(README, Security)")
        elif uid == self.own_uid and uid != 0:
            raise Refused(
                f"{user} is ugrod's own service account, which has no rights on its "
                f"socket; run ugroctl as yourself")

    def is_admin(self, uid: int) -> bool:
        """root, a member of the configured admin group, or (development) ugrod's user."""
        if uid == 0 or (self.mode is Mode.DEVELOPMENT and uid == self.own_uid):
            return True
        if self.admin_group is None:
            return False
        hit = self._admins.get(uid)
        if hit is None:
            hit = self._admins[uid] = _in_group(uid, self.admin_group)
        return hit

    def may_see(self, uid: int | None, owner_uid: int | None) -> bool:
        """Whether ``uid`` may see a job's secrets (env values, logs, metrics, checkpoints)."""
        return uid is not None and (uid == owner_uid or self.is_admin(uid))

    def admin_phrase(self) -> str:
        return "root" + (f" or members of group {self.admin_group}" if self.admin_group else "")


def _in_group(uid: int, group: str) -> bool:
    try:
        gr = grp.getgrnam(group)
        pw = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gr.gr_gid in os.getgrouplist(pw.pw_name, pw.pw_gid)


@functools.lru_cache(maxsize=1024)
def _redacted(keys: tuple[str, ...]) -> dict[str, str]:
    return dict.fromkeys(keys, REDACTED)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """The keys of an environment, every value replaced by REDACTED."""
    return dict(_redacted(tuple(env)))
