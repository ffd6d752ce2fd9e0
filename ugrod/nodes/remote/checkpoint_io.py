"""UGRO checkpoint copier, node side (Python 3.8+ stdlib only; ugrod runs it with ``-c``).

Moves checkpoint files between a node and ugrod over one SSH channel, at low priority
(nice 19, idle I/O class) and at a capped rate, so that it yields to training. Every
file is hashed (sha256) on the node as it is read or written; ugrod hashes its side
and the two must agree before a copy counts.

  list PATH...          {"now": T, "items": [{"path", "kind": "file"|"dir", "files":
                        [[rel, size, mtime_ns], ...]} | {"path", "error"}]}
  send RATE             requests on stdin, one JSON line each: {"path": P, "offset": N};
                        answer: {"size": S, "mtime_ns": M} (or {"error": ...}), then bytes
                        N..S of the file, then {"sha256": of all S bytes, "changed": bool}
  receive DEST RATE     files on stdin: {"rel": R, "size": S, "mtime_ns": M}, S bytes,
                        {"sha256": X}; answer per file {"ok": true} | {"error": ...};
                        {"commit": true} moves them to DEST at once: {"committed": DEST}

Options before the command: ``--as UID:GID`` (run as that account: a root ugrod copies
a job's checkpoints with its owner's rights, never its own).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import sys
import time

CHUNK = 1 << 20
MAX_FILES = 10000
# ioprio_set(2) numbers; the idle class (3) only gets the disk when nobody else wants it.
IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282, "riscv64": 30}
PARTIAL = ".ugro-partial"


def emit(obj: object) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


def low_priority() -> None:
    """Lowest CPU priority and the idle I/O class (where the kernel allows it), for this
    program and for the sshd process that encrypts what it sends (``carrier``)."""
    with contextlib.suppress(OSError):
        os.nice(19)
    carrier = sshd_carrier()
    if carrier is not None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, carrier, 19)
    number = IOPRIO_SET.get(platform.machine())
    if number is not None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(number, 1, 0, 3 << 13)  # IOPRIO_WHO_PROCESS, self, IDLE class
        except (OSError, AttributeError):
            pass


def sshd_carrier() -> int | None:
    """The sshd session process this program runs under, if it is ours (same user).

    It serves only ugrod's bulk connection (checkpoint transfers; ``SshTransport``'s bulk
    lane), whose every byte it encrypts: at normal priority it would take CPU from the
    training on this node that the copy is meant to yield to. Only a process of our own
    user is touched, and only its priority is lowered; the walk stops at the first sshd.
    """
    pid = os.getppid()
    for _ in range(4):  # this program, perhaps a shell, then sshd
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return None
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if owner != os.geteuid() or pid <= 1:
            return None
        if name == "sshd" or name.startswith("sshd-"):
            return pid
        pid = int(rest.split()[1])
    return None


class Pacer:
    """Keeps a stream at or under ``rate`` bytes/s (0: unlimited) by sleeping."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def chunk(self) -> int:
        return CHUNK if not self.rate else max(16384, min(CHUNK, int(self.rate / 8)))

    def add(self, n: int) -> None:
        self.sent += n
        if self.rate:
            ahead = self.sent / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def listing(path: str) -> dict[str, object]:
    """The files of one checkpoint: itself, or every regular file under it (no links)."""
    st = os.lstat(path)
    if os.path.isfile(path) and not os.path.islink(path):
        return {"path": path, "kind": "file", "files": [["", st.st_size, st.st_mtime_ns]]}
    if not os.path.isdir(path) or os.path.islink(path):
        raise ValueError("not a regular file or directory")
    files: list[list[object]] = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            fst = os.lstat(full)
            if not os.path.isfile(full) or os.path.islink(full) or name.endswith(PARTIAL):
                continue
            files.append([os.path.relpath(full, path), fst.st_size, fst.st_mtime_ns])
            if len(files) > MAX_FILES:
                raise ValueError(f"more than {MAX_FILES} files")
    return {"path": path, "kind": "dir", "files": files}


def cmd_list(paths: list[str]) -> int:
    items = []
    for path in paths:
        try:
            items.append(listing(path))
        except (OSError, ValueError) as exc:
            items.append({"path": path, "error": str(exc)})
    emit({"now": time.time(), "items": items})
    return 0


def cmd_send(rate: float) -> int:
    """Serve file ranges until stdin ends; each is hashed whole (its prefix read again)."""
    low_priority()
    pacer = Pacer(rate)
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        req = json.loads(line)
        path, offset = str(req["path"]), int(req["offset"])
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            emit({"error": f"{path}: {exc.strerror or exc}"})
            continue
        with f:
            before = os.fstat(f.fileno())
            size = before.st_size
            if not 0 <= offset <= size:
                emit({"error": f"{path}: offset {offset} is past its size {size}"})
                continue
            emit({"size": size, "mtime_ns": before.st_mtime_ns})
            sha = hashlib.sha256()
            left = offset
            while left:
                data = f.read(min(left, CHUNK))
                if not data:
                    break
                sha.update(data)
                left -= len(data)
            left = size - offset
            while left:
                data = f.read(min(left, pacer.chunk()))
                if not data:  # the file shrank under us: pad, and say it changed
                    data = bytes(min(left, CHUNK))
                sha.update(data)
                out.write(data)
                left -= len(data)
                pacer.add(len(data))
            out.flush()
            after = os.fstat(f.fileno())
            changed = (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns)
            emit({"sha256": sha.hexdigest(), "changed": changed})
    return 0


def safe_rel(rel: str) -> list[str]:
    parts = rel.split("/") if rel else []
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe path {rel!r}")
    return parts


def cmd_receive(dest: str, rate: float) -> int:
    """Write files into DEST's partial copy, each checked; move it to DEST on commit."""
    low_priority()
    pacer = Pacer(rate)
    dest = os.path.normpath(dest)
    parent, name = os.path.split(dest)
    partial = os.path.join(parent, f".{name}{PARTIAL}")
    os.makedirs(parent, mode=0o700, exist_ok=True)
    remove(partial)
    inp = sys.stdin.buffer
    single = False
    newest = 0
    while True:
        line = inp.readline()
        if not line:
            remove(partial)
            return 1
        head = json.loads(line)
        if head.get("commit"):
            break
        rel, size, mtime_ns = str(head["rel"]), int(head["size"]), int(head["mtime_ns"])
        parts = safe_rel(rel)
        single = not parts
        target = os.path.join(partial, *parts) if parts else partial
        if parts:
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        sha = hashlib.sha256()
        left = size
        with open(target, "wb") as f:
            while left:
                data = inp.read(min(left, pacer.chunk()))
                if not data:
                    remove(partial)
                    return 1
                sha.update(data)
                f.write(data)
                left -= len(data)
                pacer.add(len(data))
            f.flush()
            os.fsync(f.fileno())
        os.utime(target, ns=(mtime_ns, mtime_ns))
        newest = max(newest, mtime_ns)
        expected = json.loads(inp.readline() or b"{}").get("sha256")
        if sha.hexdigest() != expected:
            remove(partial)  # before answering: ugrod may end this program once answered
            emit({"error": f"{rel or name}: sha256 {sha.hexdigest()[:12]} on the node, "
                           f"{str(expected)[:12]} sent"})
            return 1
        emit({"ok": True})
    if not single:
        os.makedirs(partial, mode=0o700, exist_ok=True)  # an empty directory checkpoint
        # The copy keeps the source's times, so it never looks newer than what it copies.
        for root, _dirs, _names in os.walk(partial, topdown=False):
            os.utime(root, ns=(newest, newest))
    old = os.path.join(parent, f".{name}.ugro-old")
    remove(old)
    if os.path.lexists(dest):
        os.rename(dest, old)
    os.rename(partial, dest)
    remove(old)
    emit({"committed": dest})
    return 0


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def become(spec: str) -> None:
    uid, gid = (int(x) for x in spec.split(":"))
    if os.geteuid() == uid:
        return
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    os.umask(0o077)
    if argv[:1] == ["--as"]:
        become(argv[1])
        argv = argv[2:]
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "list":
        return cmd_list(args)
    if cmd == "send":
        return cmd_send(float(args[0]))
    if cmd == "receive":
        return cmd_receive(args[0], float(args[1]))
    sys.stderr.write(f"checkpoint_io: unknown command {cmd!r}\n")
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # ugrod went away
        sys.exit(1)
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"checkpoint_io: {type(exc).__name__}: {exc}\n")
        sys.exit(1)
