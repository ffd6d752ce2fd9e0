"""UGRO rank wrapper: runs on each node (Python 3.8+ stdlib only), uploaded by ugrod.

One rank's files live in its run dir: spec.json, pid ("PID STARTTIME"), rank.log,
metrics.jsonl, exit_code, checkpoint.request, supervisor ("PID STARTTIME"), start.lock.
A rank is started detached (own session and process group) under a small supervisor that
records its exit code, so ranks outlive the SSH channel and ugrod, and an exit that
happens while nobody watches is still recorded. If rank and supervisor are both gone with
no exit code (node rebooted, supervisor killed), the exit code reads as -1 (LOST).

Containment: the supervisor is a child subreaper (PR_SET_CHILD_SUBREAPER), so every
descendant that loses its parent (``setsid``, double forks, ``env -i``) is reparented to
it and stays findable by ancestry. Where the wrapper runs as root and cgroup v2 is
mounted, each rank also gets its own cgroup (CGROUP_BASE/r-HASH/rank; the supervisor
sits in .../sup), and kill/status use that cgroup: nothing escapes it. When the rank's
main process exits, whatever it left behind is killed and counted in ``leftovers``
before ``exit_code`` is written, so a rank ends only when all its processes are gone.

Ownership: a root wrapper given ``run_as`` in the spec starts the rank as that user
(uid, gid, supplementary groups); the rank's run directory belongs to that user. Before
touching a run directory that belongs to someone else, a root wrapper becomes its owner
(never through a symbolic link), so nothing a job writes can make root read, write or
signal anything the job's user could not. Files are created 0600 in 0700 directories.

Job dirs: the first request that writes into a job dir (``start``, ``sync-tree``; a retry's
staging sends ``claim`` first) carries the job's token (its name and submit time); a dir
left there by an earlier job with the same name is moved whole to jobs/.replaced/NAME.N
first (``claim``), so its exit codes, fence marks and checkpoints are never read as the
new job's.

A pid is trusted only together with its start time (field 22 of /proc/PID/stat), so a
reused pid is never signalled. The rank's environment carries UGRO_RUN_DIR=RUN_DIR, which
finds descendants that left the process group (torchrun starts its workers in new
sessions) without ever matching processes by name.

Subcommands print one JSON document (``watch``: JSON lines) on stdout:
  start RUN_DIR [--spec-stdin]          {"pid": N} | {"error": "...", "exit_code": 127}
  watch RUN_DIR LOG_OFFSET METRICS_OFFSET
  serve                                 the commands below as JSON requests on stdin
  status RUN_DIR                        {"pid", "alive", "exit_code", "pids"}
  kill RUN_DIR SIGNAL                   {"pid", "group", "signalled"}
  alive-pids RUN_DIR...                 {"RUN_DIR": [pid, ...], ...}
  fence RUN_DIR...                      {"RUN_DIR": {"killed": [pid...], "alive": [pid...]}}
  claim JOB_DIR                         {"moved_to"?} (the claim as JSON on stdin)
  checkpoint RUN_DIR | ls-checkpoints DIR [CWD PATTERN...] | free-port [LOW HIGH]
  reach HOST PORT TIMEOUT
  sync-missing STORE | sync-put STORE | sync-tree STORE DEST   the code of --sync jobs
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import glob
import hashlib
import json
import os
import pwd
import random
import select
import shutil
import signal
import socket
import stat as stat_mod
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from ugrod.nodes.remote.procscan import MARKER, pids_by_run_dir, proc_stat

POLL_S = 0.05
LOG_CHUNK = 48 * 1024
METRICS_READ = 1024 * 1024
# In a run dir: ugrod ended that attempt and fenced it; a start that arrives later (sent
# before a partition, delivered after it) must not run it.
FENCED = "fenced"
# Exit code of a rank that vanished with nobody to record its end (node rebooted,
# supervisor killed): without it a watch would wait forever.
LOST = -1
# Per-rank cgroups live under CGROUP_MOUNT/ugro (root only; see make_cgroup).
CGROUP_DIR = "ugro"
# How long leftovers of an exited rank get between SIGTERM and SIGKILL.
LEFTOVER_GRACE_S = 2.0
# Environment a rank inherits from the wrapper when the spec asks for a clean one: the
# login basics of the account it runs as; the job's own env is added on top.
CLEAN_ENV_KEYS = ("HOME", "USER", "LOGNAME", "PATH", "SHELL", "LANG", "LANGUAGE", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
if TYPE_CHECKING:  # (annotations only: nodes may run Python 3.8)
    Answer = tuple[int, Any]  # (exit code, JSON answer) of a command


def emit(obj: object) -> None:
    """One JSON line to stdout, unbuffered (raises BrokenPipeError when the reader left)."""
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the whole new one, never a part (temp file + rename).

    No fsync: these files describe processes, which do not survive a node crash either,
    and an fsync on a busy disk would delay the exit code that the head is waiting for.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def recorded_pid(run_dir: str) -> tuple[int, int] | None:
    text = read_text(os.path.join(run_dir, "pid"))
    if not text:
        return None
    pid, start = text.split()
    return int(pid), int(start)


def matches(pid: int, start: int) -> bool:
    """Whether that very process (pid and start time) is still running."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == start


def leader_alive(run_dir: str) -> int | None:
    """The rank's pid if that very process is still running."""
    rec = recorded_pid(run_dir)
    return rec[0] if rec is not None and matches(*rec) else None


def ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(pid: int) -> list[int]:
    """Live descendants of pid (by parent links; with the supervisor a subreaper, orphans
    of the rank are reparented to it and so are still found)."""
    children = ppid_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def supervisor_alive(run_dir: str) -> int | None:
    sup = read_text(os.path.join(run_dir, "supervisor"))
    if not sup:
        return None
    try:
        pid, start = (int(x) for x in sup.split())
    except ValueError:
        return None
    return pid if matches(pid, start) else None


def rank_cgroup(run_dir: str) -> str | None:
    """The rank's cgroup directory (written by the supervisor), if it still exists."""
    path = (read_text(os.path.join(run_dir, "cgroup")) or "").strip()
    if path and os.path.isfile(os.path.join(path, "cgroup.procs")):
        return path
    return None


def cgroup_pids(cg: str) -> list[int]:
    try:
        with open(os.path.join(cg, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def rank_pids(run_dir: str) -> list[int]:
    """Every live process of the rank: its cgroup's, its supervisor's descendants, the
    processes marked with its run dir, and the leader."""
    found = set(pids_by_run_dir([run_dir])[run_dir])
    cg = rank_cgroup(run_dir)
    if cg is not None:
        found.update(cgroup_pids(cg))
    sup = supervisor_alive(run_dir)
    if sup is not None:
        found.update(descendants(sup))
    leader = leader_alive(run_dir)
    if leader is not None:
        found.add(leader)
    return sorted(p for p in found if p != os.getpid())


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()[:32]
    except OSError:
        return "?"


# ---- users and cgroups (root only) ----------------------------------------------------


def can_switch() -> bool:
    """Root, or an account holding CAP_SETUID and CAP_SETGID (ugrod's service)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return eff & 0xC0 == 0xC0  # CAP_SETGID (6) and CAP_SETUID (7)


def drop_caps() -> None:
    """Clear every capability (ambient, effective, permitted, inheritable).

    A switch between two non-root uids keeps capabilities: without this, a rank
    started by ugrod's service account would inherit its CAP_SETUID.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (ctypes.c_uint32 * 6)()
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    except AttributeError:
        pass


def drop_to(uid: int, gid: int, groups: list[int]) -> None:
    """Become uid/gid with these supplementary groups, for good (real and saved ids too),
    with no capabilities left."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    drop_caps()


def in_child(uid: int, gid: int, groups: list[int], fn: Any, *args: Any,
             before: Any = None) -> Answer:
    """fn(*args) -> Answer in a forked child that runs before() and then becomes uid/gid."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            if before is not None:
                before()
            drop_to(uid, gid, groups)
            rc, out = fn(*args)
            data = json.dumps({"rc": rc, "out": out}).encode()
        except BaseException as exc:  # reported to the parent, which raises it there
            data = json.dumps({"exc": f"{type(exc).__name__}: {exc}"}).encode()
        try:
            while data:
                data = data[os.write(wfd, data) :]
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(pid, 0)
    reply = json.loads(raw) if raw else {"exc": "the helper process died"}
    if "exc" in reply:
        raise OSError(f"as uid {uid}: {reply['exc']}")
    return int(reply["rc"]), reply["out"]


def as_owner(path: str, fn: Any, *args: Any) -> Answer:  # fn: (*args) -> Answer
    """fn(*args), as the owner of path when we can switch users and it is someone else's."""
    if not can_switch():
        return fn(*args)  # type: ignore[no-any-return]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return fn(*args)  # type: ignore[no-any-return]
    if stat_mod.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} is a symbolic link; refusing to follow it as root")
    if st.st_uid == os.geteuid():
        return fn(*args)  # type: ignore[no-any-return]
    return in_child(st.st_uid, st.st_gid, [st.st_gid], fn, *args)


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


def make_cgroup(run_dir: str, uid: int, gid: int) -> str | None:
    """A fresh cgroup for one rank (CG with CG/sup and CG/rank), delegated to uid; or None.

    Only root can make one (the hierarchy's top is root's); the caller falls back to the
    subreaper when this returns None. Moving a process between CG/sup and CG/rank needs
    write access to CG/cgroup.procs (their common ancestor), hence the delegation.
    """
    mount = cgroup2_mount()
    if os.geteuid() != 0 or mount is None:
        return None
    base = os.path.join(mount, CGROUP_DIR)
    name = "r-" + hashlib.sha256(run_dir.encode()).hexdigest()[:24]
    cg = os.path.join(base, name)
    try:
        os.makedirs(base, exist_ok=True)
        os.chmod(base, 0o711)  # owners reach their own rank's cgroup, and list nothing
        prune_cgroups(base, keep=name)
        for d in (cg, os.path.join(cg, "sup"), os.path.join(cg, "rank")):
            if not os.path.isdir(d):
                os.mkdir(d)
            if uid != 0:
                os.chown(d, uid, gid)
                for f in ("cgroup.procs", "cgroup.threads", "cgroup.kill",
                          "cgroup.subtree_control"):
                    if os.path.exists(os.path.join(d, f)):
                        os.chown(os.path.join(d, f), uid, gid)
    except OSError:
        return None
    return cg


def prune_cgroups(base: str, keep: str) -> None:
    """Remove empty rank cgroups older than a minute (their ranks ended)."""
    now = time.time()
    for entry in os.listdir(base):
        cg = os.path.join(base, entry)
        if entry == keep or not entry.startswith("r-"):
            continue
        try:
            if now - os.stat(cg).st_mtime < 60:
                continue
            for sub in ("rank", "sup", ""):
                d = os.path.join(cg, sub) if sub else cg
                if os.path.isdir(d):
                    os.rmdir(d)
        except OSError:
            continue


def join_cgroup(cg: str | None) -> None:
    """Move the calling process into cg (a no-op for None)."""
    if cg is not None:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write("0")


def set_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def clean_env(base: dict[str, str]) -> dict[str, str]:
    """The login basics of the current user: HOME, USER, LOGNAME, SHELL, PATH (and locale)."""
    env = {k: v for k, v in base.items() if k in CLEAN_ENV_KEYS or k.startswith("LC_")}
    try:
        pw = pwd.getpwuid(os.geteuid())
        env.update({"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name})
        env.setdefault("SHELL", pw.pw_shell or "/bin/sh")
    except KeyError:
        pass
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def exit_code(run_dir: str) -> int | None:
    """The recorded exit status; LOST if the rank and its supervisor are gone unrecorded."""
    text = read_text(os.path.join(run_dir, "exit_code"))
    if text and text.strip():
        return int(text)
    if recorded_pid(run_dir) is None or leader_alive(run_dir) is not None:
        return None
    sup = read_text(os.path.join(run_dir, "supervisor"))
    if not sup or matches(*(int(x) for x in sup.split())):
        return None
    text = read_text(os.path.join(run_dir, "exit_code"))  # it may have just been written
    return int(text) if text and text.strip() else LOST


def exited_at(run_dir: str) -> float | None:
    """When the exit was recorded on this node (the exit_code file's mtime), if it was."""
    try:
        return os.stat(os.path.join(run_dir, "exit_code")).st_mtime
    except OSError:
        return None


# ---- start ---------------------------------------------------------------------------


def load_spec(run_dir: str, spec_text: str | None) -> tuple[dict[str, Any], str]:
    """The spec from stdin (the head's word) or, for a start without one, spec.json."""
    spec_path = os.path.join(run_dir, "spec.json")
    if spec_text is None:
        with open(spec_path) as f:
            spec_text = f.read()
        spec = json.loads(spec_text)
        if isinstance(spec, dict) and spec.get("run_as") is not None and os.geteuid() == 0:
            raise ValueError(f"{spec_path}: a start as another user needs the spec on stdin")
    else:
        spec = json.loads(spec_text)
    argv = spec.get("argv") if isinstance(spec, dict) else None
    if not argv or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"{spec_path}: argv must be a non-empty list of strings")
    return spec, spec_text


def make_dir(path: str, mode: int, owner: tuple[int, int] | None) -> None:
    """mkdir -p with exactly ``mode`` (parents 0711 as root so owners reach their own
    dirs below, else 0700), then hand it to ``owner`` (as root)."""
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            make_dir(parent, 0o711 if os.geteuid() == 0 else 0o700, None)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
    st = os.lstat(path)
    if stat_mod.S_ISLNK(st.st_mode) or not stat_mod.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is not a directory")
    if owner is None and st.st_uid not in (os.geteuid(), 0):
        raise ValueError(f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()}")
    if owner is not None and os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
        if st.st_uid not in (0, owner[0]):
            raise ValueError(f"{path} belongs to uid {st.st_uid}, not to uid {owner[0]}")
        os.chown(path, *owner)
    if st.st_uid == os.geteuid() and stat_mod.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)  # the umask (0077) narrowed mkdir's mode


REPLACED = ".replaced"  # under jobs/: the dirs of earlier jobs that had the same name


def claim(job_dir: str, how: Any) -> str | None:
    """Make JOB_DIR this job's before anything of an attempt is put there; where an earlier
    job's dir was moved to, if it was.

    ``how`` ({"token": the job's name and submit time, "first": its first attempt}) comes
    with the first request that writes into the job dir (``start``, ``sync-tree``). A job
    dir left by an earlier job with the same name (a wiped state dir, another head using
    this work dir) holds its exit codes, fence marks and checkpoints: read as this job's, a
    rank would "end" at once with the old exit code, or resume from another run's
    checkpoint. Such a dir is moved whole to jobs/.replaced/NAME.N, never deleted (its
    checkpoints may be someone's work). On the first attempt any dir already there is an
    earlier job's; on a retry a dir without a token (made before tokens) is adopted.
    """
    if how is None:
        return None
    token, first = (how.get("token"), how.get("first")) if isinstance(how, dict) else (None, None)
    job_dir = os.path.abspath(job_dir)
    jobs, name = os.path.split(job_dir)
    if (not isinstance(token, str) or not token or "\n" in token
            or not isinstance(first, bool) or name.startswith(".")):
        raise ValueError(f"claim of {job_dir}: bad request {how!r}")
    if not os.path.isdir(jobs):  # made by prepare, with its mode: kept as it is
        make_dir(jobs, 0o711 if os.geteuid() == 0 else 0o700, None)
    lock = os.open(os.path.join(jobs, f".{name}.claim"),
                   os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of one node claim at once: one moves
        mark = os.path.join(job_dir, "job.token")
        try:
            st = os.lstat(job_dir)
        except FileNotFoundError:
            st = None
        if st is not None and (stat_mod.S_ISLNK(st.st_mode) or not stat_mod.S_ISDIR(st.st_mode)):
            raise ValueError(f"{job_dir} is not a directory")
        held = read_text(mark) if st is not None else None
        if held == token:
            return None
        moved = None
        if st is not None and os.listdir(job_dir) and (first or held is not None):
            store = os.path.join(jobs, REPLACED)
            make_dir(store, 0o700, None)
            n = 1
            while os.path.lexists(os.path.join(store, f"{name}.{n}")):
                n += 1
            moved = os.path.join(store, f"{name}.{n}")
            os.rename(job_dir, moved)
        make_dir(job_dir, 0o700, None)
        write_atomic(mark, token)
        return moved
    finally:
        os.close(lock)


def cmd_start(run_dir: str, spec_text: str | None) -> Answer:
    run_dir = os.path.abspath(run_dir)
    spec, spec_text = load_spec(run_dir, spec_text)
    run_as = spec.get("run_as")
    root = os.geteuid() == 0
    uid, gid, groups = os.geteuid(), os.getegid(), os.getgroups()
    if run_as is not None:
        uid, gid = int(run_as["uid"]), int(run_as["gid"])
        groups = [int(g) for g in run_as.get("groups") or [gid]]
        if uid != os.geteuid() and not can_switch():
            raise ValueError(f"cannot start a rank as uid {uid}: the rank wrapper runs as "
                             f"uid {os.geteuid()}, without root or CAP_SETUID/CAP_SETGID")
    other = uid != os.geteuid()
    moved = claim(os.path.dirname(os.path.dirname(run_dir)), spec.get("claim"))
    mkdirs = [os.path.abspath(str(d)) for d in spec.get("mkdirs") or []]
    # The job dir (parent of the attempt dirs and of checkpoints/) stays ugrod's when ranks
    # run as someone else: they cannot swap a run dir for a link to another's. As root,
    # the owner's dirs are made and handed over; the service account (no CAP_CHOWN) lets
    # the owner make them in sticky dirs instead (1733: create, not list, not delete).
    shared = 0o711 if root else 0o1733
    make_dir(os.path.dirname(os.path.dirname(run_dir)), shared if other else 0o700, None)
    make_dir(os.path.dirname(run_dir), shared if other else 0o700, None)
    if not other or root:
        owner = (uid, gid) if other else None
        make_dir(run_dir, 0o700, owner)
        for directory in mkdirs:
            make_dir(directory, 0o700, owner)
    cg = make_cgroup(run_dir, uid, gid) if root and spec.get("cgroup", True) else None
    if not other and cg is None:
        return with_moved(start_as_owner(run_dir, spec, spec_text, None), moved)

    def child() -> Answer:
        if not root:  # the service account: the owner makes its own dirs
            make_dir(run_dir, 0o700, None)
            for directory in mkdirs:
                make_dir(directory, 0o700, None)
        return start_as_owner(run_dir, spec, spec_text, cg)

    # In a child: it joins the rank's cgroup (as root) and then becomes the owner, so the
    # supervisor and the rank are inside it and own their files from the start.
    return with_moved(in_child(uid, gid, groups, child, before=lambda: join_cgroup(
        os.path.join(cg, "sup") if cg else None)), moved)


def with_moved(answer: Answer, moved: str | None) -> Answer:
    """The answer, saying where ``claim`` moved an earlier job's dir to (if it did)."""
    if moved is not None and isinstance(answer[1], dict):
        answer[1]["moved_to"] = moved
    return answer


def start_as_owner(run_dir: str, spec: dict[str, Any], spec_text: str,
                   cg: str | None) -> Answer:
    spec_path = os.path.join(run_dir, "spec.json")
    if not os.path.exists(spec_path):
        write_atomic(spec_path, spec_text)
    lock = os.open(os.path.join(run_dir, "start.lock"),
                   os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent starts of one rank: one runs, one answers
        return start_locked(run_dir, spec, lock, cg)
    finally:
        os.close(lock)


def start_locked(run_dir: str, spec: dict[str, Any], lock: int, cg: str | None = None) -> Answer:
    if os.path.exists(os.path.join(run_dir, FENCED)):  # its attempt ended: a late request
        return 1, {"error": "not started: ugrod fenced this attempt (it had ended)",
                   "exit_code": LOST}
    rec = recorded_pid(run_dir)
    if rec is not None:  # started before (a retried spawn): same answer, no second rank
        return 0, {"pid": rec[0], "existing": True}
    code = exit_code(run_dir)
    if code is not None:
        error = read_text(os.path.join(run_dir, "start_error")) or "rank already ended"
        return code or 1, {"error": error, "exit_code": code}
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # intermediate: new session, fork the supervisor, vanish
        try:
            os.close(rfd)
            os.close(lock)  # the lock stays with the foreground
            os.setsid()
            if os.fork() == 0:
                try:
                    supervise(run_dir, spec, wfd, cg)
                except BaseException as exc:  # told to the starter, which waits on wfd
                    os.write(wfd, json.dumps({"error": f"the rank supervisor failed: "
                                              f"{type(exc).__name__}: {exc}",
                                              "exit_code": 1}).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    os.waitpid(child, 0)
    with os.fdopen(rfd, "rb") as pipe:
        answer = pipe.read()
    if not answer:
        return 1, {"error": "the rank supervisor died before starting the rank", "exit_code": 1}
    reply = json.loads(answer)
    return (0 if "pid" in reply else int(reply.get("exit_code") or 1)), reply


def supervise(run_dir: str, spec: dict[str, Any], wfd: int, cg: str | None = None) -> None:
    """Detached: start the rank, record pid, report on wfd, wait, end leftovers, record exit."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # let go of the SSH channel
        os.dup2(devnull, fd)
    # ...and of every other descriptor (a pipe a starter waits on to reach EOF)
    os.closerange(3, wfd)
    os.closerange(wfd + 1, 65536)
    os.umask(0o077)
    reaper = set_subreaper()  # orphans of the rank come to us, whatever session they made
    me = proc_stat(os.getpid())
    write_atomic(os.path.join(run_dir, "supervisor"), f"{os.getpid()} {me[1] if me else 0}\n")
    rank_cg = os.path.join(cg, "rank") if cg else None
    write_atomic(os.path.join(run_dir, "cgroup"), f"{rank_cg or ''}\n")
    env = clean_env(dict(os.environ)) if spec.get("clean_env") else dict(os.environ)
    env.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
    env[MARKER] = run_dir
    argv = [str(a) for a in spec["argv"]]
    cwd = os.path.expanduser(str(spec["cwd"])) if spec.get("cwd") else None
    log_fd = os.open(os.path.join(run_dir, "rank.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(log_fd, "ab") as log:
        if not reaper and rank_cg is None:
            log.write(b"ugro: no cgroup and no subreaper here: processes that leave the "
                      b"rank's session and environment cannot be tracked\n")
            log.flush()
        program = spec.get("program")
        if isinstance(program, int) and 0 <= program < len(argv) and argv[program][:1] == "~":
            argv[program] = os.path.expanduser(argv[program])  # a node-side ~ (paths.scripts)
        problem = precheck(argv, program, cwd, env.get("PATH", os.defpath))
        try:
            if problem is not None:
                raise problem
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=(lambda: join_cgroup(rank_cg)) if rank_cg else None,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            if isinstance(exc, CannotStart):
                error = str(exc)
            else:
                what = getattr(exc, "strerror", None) or str(exc)
                if getattr(exc, "filename", None) is not None:
                    what = f"{what}: {exc.filename!r}"  # type: ignore[union-attr]
                error = f"cannot start {argv[0]!r}: {what}"
            log.write(f"ugro: {error}\n".encode())
            write_atomic(os.path.join(run_dir, "start_error"), error)
            write_atomic(os.path.join(run_dir, "exit_code"), f"{code}\n")
            os.write(wfd, json.dumps({"error": error, "exit_code": code}).encode())
            return
    stat = proc_stat(proc.pid)  # still ours (unreaped) even if it already exited
    write_atomic(os.path.join(run_dir, "pid"), f"{proc.pid} {stat[1] if stat else 0}\n")
    os.write(wfd, json.dumps({"pid": proc.pid}).encode())
    os.close(wfd)
    rc = proc.wait()
    # A main process killed by a signal took the rank down with it: no grace for the rest.
    count, names = end_leftovers(rank_cg, grace_s=0.0 if rc < 0 else LEFTOVER_GRACE_S)
    # Leftovers of a rank being killed are just slower to die: only an exit of the rank's
    # own accord that leaves processes behind is reported.
    if count and not os.path.exists(os.path.join(run_dir, "stopping")):
        write_atomic(os.path.join(run_dir, "leftovers"),
                     json.dumps({"count": count, "names": names}) + "\n")
    write_atomic(os.path.join(run_dir, "exit_code"), f"{rc if rc >= 0 else 128 - rc}\n")
    if cg is not None:
        for d in (rank_cg or "",):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftover_pids(rank_cg: str | None) -> list[int]:
    pids = cgroup_pids(rank_cg) if rank_cg else descendants(os.getpid())
    return [p for p in pids if p != os.getpid()]


def end_leftovers(rank_cg: str | None, grace_s: float = LEFTOVER_GRACE_S
                  ) -> tuple[int, list[str]]:
    """Kill what the rank's main process left running (SIGTERM, then SIGKILL); wait until
    none is left. Returns how many there were and their names."""
    reap()
    pids = leftover_pids(rank_cg)
    if not pids:
        return 0, []
    names = sorted({comm(p) for p in pids})[:8]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if wait_s <= 0:
            continue
        if sig == signal.SIGKILL and rank_cg:
            try:
                with open(os.path.join(rank_cg, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:
                pass
        for pid in leftover_pids(rank_cg):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap()
            if not leftover_pids(rank_cg):
                return len(pids), names
            time.sleep(0.05)
    return len(pids), names


class CannotStart(OSError):
    """The rank's own program cannot start here: the message says what and what to do."""


class NotFound(CannotStart, FileNotFoundError):
    pass


def _is_python(program: str) -> bool:
    name = os.path.basename(program)
    return name.startswith("python") and all(c.isdigit() or c == "." for c in name[6:])


def precheck(argv: list[str], program: Any, cwd: str | None, path: str) -> CannotStart | None:
    """Why the user's program cannot start here (checked before anything runs), or None.

    ``program`` is the index in argv of the user's own command (after torchrun's part);
    a ``.py`` file there is run by an interpreter, so it must only exist. The same
    command fails the same way on every attempt: ugrod does not retry it.
    """
    where = cwd or os.getcwd()
    if cwd is not None and not os.path.isdir(cwd):
        return NotFound(f"cannot start: the working directory {cwd} does not exist on this "
                        f"node (send your code with --sync, or give --cwd)")
    if not isinstance(program, int) or not 0 <= program < len(argv):
        return None
    prog = argv[program]
    script = None
    if prog.endswith(".py"):
        script = prog
    elif _is_python(prog) and program + 1 < len(argv) and not argv[program + 1].startswith("-"):
        script = argv[program + 1]
    if script is not None:
        full = os.path.join(where, os.path.expanduser(script))
        if not os.path.isfile(full):
            return NotFound(f"cannot start: {script} not found in {where} (the code is not "
                            f"on this node? send it with --sync)")
        if not os.access(full, os.R_OK):
            return CannotStart(f"cannot start: {script} in {where} is not readable")
        if script is prog:
            return None
    if "/" in prog:
        full = os.path.join(where, os.path.expanduser(prog))
        if not os.path.exists(full):
            return NotFound(f"cannot start: {prog} not found in {where} (the code is not on "
                            f"this node? send it with --sync)")
        if os.path.isdir(full) or not os.access(full, os.X_OK):
            return CannotStart(f"cannot start: {prog} is not executable (chmod +x {prog}, or "
                               f"run it with its interpreter, e.g. python3 {prog})")
        return None
    if shutil.which(prog, path=path) is None:
        here = os.path.join(where, prog)
        hint = f"; to run the one in {where} write ./{prog}" if os.path.exists(here) else ""
        return NotFound(f"cannot start: {prog}: command not found on this node's PATH{hint}")
    return None


# ---- watch ---------------------------------------------------------------------------


def become_owner(path: str) -> None:
    """As root (or the service): become the owner of path (a run dir) for good, never
    through a link."""
    if not can_switch():
        return
    st = os.lstat(path)
    if stat_mod.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} is a symbolic link; refusing to follow it as root")
    if st.st_uid != os.geteuid():
        drop_to(st.st_uid, st.st_gid, [st.st_gid])


def leftovers(run_dir: str) -> dict[str, Any] | None:
    text = read_text(os.path.join(run_dir, "leftovers"))
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def cmd_watch(run_dir: str, log_off: int, met_off: int) -> int:
    if not os.path.isdir(run_dir):
        emit({"t": "error", "message": f"no run directory {run_dir}"})
        return 1
    become_owner(run_dir)
    out = select.poll()
    out.register(1, select.POLLOUT)
    pid_sent = False
    log_path = os.path.join(run_dir, "rank.log")
    met_path = os.path.join(run_dir, "metrics.jsonl")
    try:
        while True:
            if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in out.poll(0)):
                return 0  # the head closed the channel
            ended = exit_code(run_dir)  # checked before draining: the drain is then final
            if not pid_sent:
                rec = recorded_pid(run_dir)
                if rec is not None:
                    emit({"t": "pid", "pid": rec[0]})
                    pid_sent = True
            log_off = drain_log(log_path, log_off)
            met_off = drain_metrics(met_path, met_off, final=ended is not None)
            if ended is not None:
                left = leftovers(run_dir)
                msg: dict[str, Any] = {"t": "exit", "code": ended}
                # when it ended (ranks that ended while nobody watched come together)
                with contextlib.suppress(OSError):
                    msg["at"] = os.stat(os.path.join(run_dir, "exit_code")).st_mtime
                if left:
                    msg["left"] = int(left.get("count") or 0)
                    msg["names"] = [str(n)[:32] for n in left.get("names") or []][:8]
                emit(msg)
                return 0
            time.sleep(POLL_S)
    except BrokenPipeError:
        return 0


def drain_log(path: str, off: int) -> int:
    try:
        if os.path.getsize(path) <= off:
            return off
        with open(path, "rb") as f:
            f.seek(off)
            while True:
                data = f.read(LOG_CHUNK)
                if not data:
                    return off
                emit({"t": "log", "o": off, "d": base64.b64encode(data).decode()})
                off += len(data)
    except FileNotFoundError:
        return off


def drain_metrics(path: str, off: int, final: bool) -> int:
    while True:
        try:
            if os.path.getsize(path) <= off:
                return off
            with open(path, "rb") as f:
                f.seek(off)
                data = f.read(METRICS_READ)
        except FileNotFoundError:
            return off
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            end = off + len(line) + 1
            emit({"t": "metric", "o": off, "e": end, "d": line.decode("utf-8", "replace")})
            off = end
        if rest and (final or len(rest) >= METRICS_READ):  # no newline is coming
            emit(
                {
                    "t": "metric",
                    "o": off,
                    "e": off + len(rest),
                    "d": rest.decode("utf-8", "replace"),
                }
            )
            off += len(rest)
        if len(data) < METRICS_READ:
            return off


# ---- control -------------------------------------------------------------------------


def status(run_dir: str) -> dict[str, Any]:
    rec = recorded_pid(run_dir)
    alive = rank_pids(run_dir)
    return {
        "pid": rec[0] if rec else None,
        "alive": bool(alive),
        "exit_code": exit_code(run_dir),
        "exited_at": exited_at(run_dir),
        "pids": alive,
    }


def cmd_status(run_dir: str) -> Answer:
    return as_owner(run_dir, lambda: (0, status(run_dir)))


def cmd_alive_pids(run_dirs: list[str]) -> Answer:
    out = {}
    for d in run_dirs:
        _, found = as_owner(d, lambda d=d: (0, status(d)["pids"]))
        out[d] = found
    return 0, out


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


def cmd_kill(run_dir: str, sig_text: str) -> Answer:
    return as_owner(run_dir, kill_rank, run_dir, parse_signal(sig_text))


def kill_rank(run_dir: str, sig: int) -> Answer:
    """Signal the rank's process group, then every other process of the rank (its cgroup,
    its supervisor's descendants, its marked processes); SIGKILL also kills the cgroup."""
    rec = recorded_pid(run_dir)
    leader = leader_alive(run_dir)
    signalled: list[int] = []
    if os.path.isdir(run_dir) and exit_code(run_dir) is None:
        write_atomic(os.path.join(run_dir, "stopping"), f"{sig}\n")
    others = rank_pids(run_dir)  # before the leader goes (its supervisor then ends them too)
    if leader is not None:
        try:
            os.killpg(leader, sig)
            signalled.append(leader)
        except ProcessLookupError:
            leader = None
    cg = rank_cgroup(run_dir)
    if cg is not None and sig == signal.SIGKILL:
        try:
            with open(os.path.join(cg, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
    for pid in others:
        try:
            if leader is not None and os.getpgid(pid) == leader:
                continue
            os.kill(pid, sig)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    return 0, {"pid": rec[0] if rec else None, "group": leader is not None, "signalled": signalled}


def cmd_fence(run_dirs: list[str]) -> Answer:
    """Fence each run dir: no start of it may run from now on, and whatever of its rank is
    alive is killed (SIGKILL, waited for up to 5 s)."""
    out = {}
    for d in run_dirs:
        _, out[d] = as_owner(d, fence_one, d)
    return 0, out


def fence_one(run_dir: str) -> Answer:
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    lock = os.open(os.path.join(run_dir, "start.lock"),
                   os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a start in progress finishes first (then killed)
        write_atomic(os.path.join(run_dir, FENCED), f"{time.time():f}\n")
    finally:
        os.close(lock)
    found = rank_pids(run_dir)
    if found:
        kill_rank(run_dir, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    alive = rank_pids(run_dir)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = rank_pids(run_dir)
    if recorded_pid(run_dir) is None and exit_code(run_dir) is None and not alive:
        # Never started: its end is this (a watch of it ends instead of waiting forever).
        write_atomic(os.path.join(run_dir, "start_error"), "fenced by ugrod before it started")
        write_atomic(os.path.join(run_dir, "exit_code"), f"{LOST}\n")
    return 0, {"killed": found, "alive": alive}


def cmd_checkpoint(run_dir: str) -> Answer:
    def write() -> Answer:
        write_atomic(os.path.join(run_dir, "checkpoint.request"), f"{time.time():f}\n")
        return 0, {"requested": True}

    return as_owner(run_dir, write)


MAX_CHECKPOINTS = 1000


def cmd_ls_checkpoints(directory: str, cwd: str = "", patterns: list[str] | None = None
                       ) -> Answer:
    return as_owner(directory, ls_checkpoints, directory, cwd, patterns)


def ls_checkpoints(directory: str, cwd: str = "", patterns: list[str] | None = None
                   ) -> Answer:
    """DIR's entries, plus what each glob PATTERN matches (relative ones: under CWD, else
    here), at most MAX_CHECKPOINTS, oldest first; a directory counts as one checkpoint."""
    try:
        paths = [e.path for e in os.scandir(directory)]
    except FileNotFoundError:
        paths = []
    base = cwd or os.getcwd()
    for pattern in patterns or []:
        full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        if os.path.lexists(full):  # a reported path: itself, whatever characters it holds
            paths.append(full)
        paths.extend(glob.glob(full)[:MAX_CHECKPOINTS])
    found, seen = [], set()
    for path in paths:
        path = os.path.normpath(path)
        name = os.path.basename(path)
        if path in seen or name.startswith(".") or ".tmp" in name:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except OSError:
            continue
        size, mtime = st.st_size, st.st_mtime
        if os.path.isdir(path):
            size = 0
            for root, _dirs, files in os.walk(path):
                for f in files:
                    try:
                        fst = os.stat(os.path.join(root, f))
                    except OSError:
                        continue
                    size += fst.st_size
                    mtime = max(mtime, fst.st_mtime)
        found.append({"path": path, "size_bytes": size, "mtime": mtime})
        if len(found) >= MAX_CHECKPOINTS:
            break
    return 0, sorted(found, key=lambda c: (c["mtime"], c["path"]))


def cmd_free_port(low: int, high: int) -> Answer:
    candidates = [0] if low == 0 else random.sample(range(low, high + 1), min(64, high - low + 1))
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return 0, {"port": s.getsockname()[1]}
    return 1, {"error": f"no free TCP port in {low}-{high}"}


def cmd_reach(host: str, port: int, timeout_s: float) -> Answer:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return 1, {"ok": False, "error": f"{host}:{port}: {exc.strerror or exc}"}
    return 0, {"ok": True}


# ---- code sync (--sync): a content-addressed store per node, a copy per job ----------

HEX = frozenset("0123456789abcdef")


def object_path(store: str, digest: str) -> str:
    if len(digest) != 64 or not HEX.issuperset(digest):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return os.path.join(store, digest[:2], digest)


def cmd_sync_missing(store: str, stdin: str | None) -> Answer:
    """Which of the [sha256, size] objects on stdin this node's store lacks."""
    missing = []
    for digest, size in json.loads(stdin or "[]"):
        if not object_ok(object_path(store, str(digest)), int(size)):
            missing.append(digest)
    return 0, {"missing": missing}


def object_ok(path: str, size: int) -> bool:
    """Stored, of the right size, and still read-only (a job that made its linked copy
    writable may have changed it: such an object is sent again, into a new inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_size == size and not st.st_mode & 0o222


def cmd_sync_put(store: str) -> int:
    """Store objects framed on stdin ("SHA256 SIZE\\n" + bytes ... "end\\n"), each checked."""
    inp = sys.stdin.buffer
    stored = total = 0
    while True:
        header = inp.readline(200)
        if header == b"end\n":
            break
        try:
            digest, size_text = header.decode().split()
            size = int(size_text)
            path = object_path(store, digest)
        except ValueError:
            emit({"error": f"bad object header {header[:100]!r}"})
            return 1
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        sha = hashlib.sha256()
        left = size
        try:
            while left:
                chunk = inp.read(min(left, 1 << 20))
                if not chunk:
                    break
                sha.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
        finally:
            os.close(fd)
        if left or sha.hexdigest() != digest:
            os.unlink(tmp)
            emit({"error": f"object {digest[:12]}: {'truncated' if left else 'wrong content'}"})
            return 1
        os.chmod(tmp, 0o400)  # read-only: jobs see it through hard links
        os.replace(tmp, path)
        stored += 1
        total += size
    emit({"stored": stored, "bytes": total})
    return 0


def cmd_sync_tree(store: str, dest: str, stdin: str | None) -> Answer:
    """Materialise a tree (JSON {"tree", "entries": [[path, mode, size, sha256]]}) at dest.

    Files are read-only hard links into the store (0400, or 0500 when executable: such
    objects get a read-only executable twin), so a tree costs no disk per job and no
    copying; directories are 0700, so a job can add files. A job writes new files,
    never into the synced ones. A dest that already holds this tree (a retry) is kept.
    """
    doc = json.loads(stdin or "{}")
    tree, entries = str(doc["tree"]), doc["entries"]
    moved = claim(os.path.dirname(os.path.abspath(dest)), doc.get("claim"))
    marker = os.path.join(dest, ".ugro-tree")
    if read_text(marker) == tree:
        return 0, {"reused": True, "files": len(entries)}  # (a claim moved nothing)
    os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    made = {tmp}
    for rel, mode, size, digest in entries:
        parts = str(rel).split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"unsafe path in tree: {rel!r}")
        target = os.path.join(tmp, *parts)
        parent = os.path.dirname(target)
        if parent not in made:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            made.add(parent)
        src = object_path(store, str(digest))
        if not object_ok(src, int(size)):
            raise ValueError(f"object {str(digest)[:12]} for {rel} is missing or changed")
        if int(mode) & 0o100:
            src = executable_twin(src, int(size))
        try:
            os.link(src, target)
        except OSError:  # a file system without hard links: a read-only copy
            shutil.copyfile(src, target)
            os.chmod(target, 0o500 if int(mode) & 0o100 else 0o400)
    write_atomic(os.path.join(tmp, ".ugro-tree"), tree)
    if os.path.lexists(dest):
        old = f"{dest}.old-{os.getpid()}"
        os.rename(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, dest)
    return with_moved((0, {"reused": False, "files": len(entries)}), moved)


def executable_twin(path: str, size: int) -> str:
    """``path.x``: the same bytes, mode 0500 (made once per object)."""
    twin = f"{path}.x"
    try:
        st = os.stat(twin)
        if st.st_size == size and not st.st_mode & 0o222:
            return twin
    except FileNotFoundError:
        pass
    tmp = f"{twin}.tmp-{os.getpid()}"
    shutil.copyfile(path, tmp)
    os.chmod(tmp, 0o500)
    os.replace(tmp, twin)
    return twin


def dispatch(cmd: str, args: list[str], stdin: str | None) -> Answer:
    """Run one (non-streaming) command: (exit code, JSON answer)."""
    if cmd == "start":
        return cmd_start(args[0], stdin)
    if cmd == "status":
        return cmd_status(args[0])
    if cmd == "claim":
        return with_moved((0, {}), claim(args[0], json.loads(stdin or "null") or {}))
    if cmd == "kill":
        return cmd_kill(args[0], args[1])
    if cmd == "alive-pids":
        return cmd_alive_pids(args)
    if cmd == "checkpoint":
        return cmd_checkpoint(args[0])
    if cmd == "fence":
        return cmd_fence(args)
    if cmd == "ls-checkpoints":
        return cmd_ls_checkpoints(args[0], args[1] if len(args) > 1 else "", args[2:])
    if cmd == "free-port":
        return cmd_free_port(*(int(a) for a in args[:2])) if args else cmd_free_port(0, 0)
    if cmd == "reach":
        return cmd_reach(args[0], int(args[1]), float(args[2]))
    if cmd == "sync-missing":
        return cmd_sync_missing(args[0], stdin)
    if cmd == "sync-tree":
        return cmd_sync_tree(args[0], args[1], stdin)
    raise ValueError(f"unknown command {cmd!r}")


def cmd_serve() -> int:
    """Answer requests, one JSON line each, until stdin ends (the head went away).

    Request {"id", "argv": [cmd, args...], "stdin"?}; answer {"id", "rc", "out", "err"}.
    One long-lived process per node saves a login shell and an interpreter start per call.
    """
    while True:
        line = sys.stdin.buffer.readline()
        if not line:
            return 0
        rid = None
        try:
            req = json.loads(line)
            rid = req["id"]
            argv = [str(a) for a in req["argv"]]
            rc, out = dispatch(argv[0], argv[1:], req.get("stdin"))
            reply = {"id": rid, "rc": rc, "out": out, "err": ""}
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            reply = {"id": rid, "rc": 1, "out": None, "err": f"{type(exc).__name__}: {exc}"}
        try:
            emit(reply)
        except BrokenPipeError:
            return 0


STDIN_COMMANDS = frozenset({"claim", "sync-missing", "sync-tree"})  # their input: stdin


def main(argv: list[str]) -> int:
    os.umask(0o077)  # every file 0600, every directory 0700 (job dirs hold secrets)
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "watch":
        return cmd_watch(args[0], int(args[1]), int(args[2]))
    if cmd == "serve":
        return cmd_serve()
    if cmd == "sync-put":
        return cmd_sync_put(args[0])
    if cmd == "start":
        args = args[:1]
        stdin = sys.stdin.read() if "--spec-stdin" in argv else None
    elif cmd in STDIN_COMMANDS:  # run as one command when the serve session failed
        stdin = sys.stdin.read()
    else:
        stdin = None
    try:
        rc, out = dispatch(cmd, args, stdin)
    except ValueError as exc:
        if not str(exc).startswith("unknown command"):
            raise
        sys.stderr.write(f"rank_wrapper: {exc}\n")
        return 2
    emit(out)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        sys.stderr.write(f"rank_wrapper: {type(exc).__name__}: {exc}\n")
        sys.exit(1)
