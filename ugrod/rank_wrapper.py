"""UGRO rank wrapper: runs on each node (Python 3.8+ stdlib only), uploaded by ugrod.

One rank's files live in its run dir: spec.json, pid ("PID STARTTIME"), rank.log,
metrics.jsonl, exit_code, checkpoint.request, supervisor ("PID STARTTIME"), start.lock.
A rank is started detached (own session and process group) under a small supervisor that
records its exit code, so ranks outlive the SSH channel and ugrod, and an exit that
happens while nobody watches is still recorded. If rank and supervisor are both gone with
no exit code (node rebooted, supervisor killed), the exit code reads as -1 (LOST).

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
  checkpoint RUN_DIR | ls-checkpoints DIR [CWD PATTERN...] | free-port [LOW HIGH]
  reach HOST PORT TIMEOUT
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

POLL_S = 0.05
LOG_CHUNK = 48 * 1024
METRICS_READ = 1024 * 1024
MARKER = "UGRO_RUN_DIR"
# Exit code of a rank that vanished with nobody to record its end (node rebooted,
# supervisor killed): without it a watch would wait forever.
LOST = -1
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


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])  # fields[0] is field 3 (state); 22 is starttime


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


def marked_pids(run_dirs: list[str]) -> dict[str, list[int]]:
    """Live processes of this user whose environment has UGRO_RUN_DIR=one of run_dirs."""
    wanted = {(f"{MARKER}={d}").encode(): d for d in run_dirs}
    found: dict[str, list[int]] = {d: [] for d in run_dirs}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for entry in env:
            if entry in wanted:
                stat = proc_stat(int(name))
                if stat is not None and stat[0] not in ("Z", "X"):
                    found[wanted[entry]].append(int(name))
                break
    return found


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


# ---- start ---------------------------------------------------------------------------


def cmd_start(run_dir: str, spec_text: str | None) -> Answer:
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    spec_path = os.path.join(run_dir, "spec.json")
    if spec_text is None or os.path.exists(spec_path):  # a retried start: the first spec wins
        with open(spec_path) as f:
            spec_text = f.read()
    spec = json.loads(spec_text)
    argv = spec.get("argv") if isinstance(spec, dict) else None
    if not argv or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"{spec_path}: argv must be a non-empty list of strings")
    if not os.path.exists(spec_path):
        write_atomic(spec_path, spec_text)
    for directory in spec.get("mkdirs") or []:
        os.makedirs(str(directory), exist_ok=True)
    lock = os.open(os.path.join(run_dir, "start.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent starts of one rank: one runs, one answers
        return start_locked(run_dir, spec, lock)
    finally:
        os.close(lock)


def start_locked(run_dir: str, spec: dict[str, Any], lock: int) -> Answer:
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
                supervise(run_dir, spec, wfd)
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


def supervise(run_dir: str, spec: dict[str, Any], wfd: int) -> None:
    """Detached: start the rank, record pid, report on wfd, wait, record the exit code."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # let go of the SSH channel
        os.dup2(devnull, fd)
    me = proc_stat(os.getpid())
    write_atomic(os.path.join(run_dir, "supervisor"), f"{os.getpid()} {me[1] if me else 0}\n")
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
    env[MARKER] = run_dir
    argv = [str(a) for a in spec["argv"]]
    with open(os.path.join(run_dir, "rank.log"), "ab") as log:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.get("cwd") or None,
                start_new_session=True,
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            what = exc.strerror or str(exc)
            if exc.filename is not None:
                what = f"{what}: {exc.filename!r}"
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
    write_atomic(os.path.join(run_dir, "exit_code"), f"{rc if rc >= 0 else 128 - rc}\n")


# ---- watch ---------------------------------------------------------------------------


def cmd_watch(run_dir: str, log_off: int, met_off: int) -> int:
    if not os.path.isdir(run_dir):
        emit({"t": "error", "message": f"no run directory {run_dir}"})
        return 1
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
                emit({"t": "exit", "code": ended})
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


def status(run_dir: str, pids: list[int]) -> dict[str, Any]:
    rec = recorded_pid(run_dir)
    leader = leader_alive(run_dir)
    alive = sorted(set(pids) | ({leader} if leader else set()))
    return {
        "pid": rec[0] if rec else None,
        "alive": bool(alive),
        "exit_code": exit_code(run_dir),
        "pids": alive,
    }


def cmd_status(run_dir: str) -> Answer:
    return 0, status(run_dir, marked_pids([run_dir])[run_dir])


def cmd_alive_pids(run_dirs: list[str]) -> Answer:
    found = marked_pids(run_dirs)
    return 0, {d: status(d, found[d])["pids"] for d in run_dirs}


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


def cmd_kill(run_dir: str, sig_text: str) -> Answer:
    sig = parse_signal(sig_text)
    rec = recorded_pid(run_dir)
    leader = leader_alive(run_dir)
    outside = []  # descendants that left the rank's process group
    for pid in marked_pids([run_dir])[run_dir]:
        try:
            if leader is None or os.getpgid(pid) != leader:
                outside.append(pid)
        except ProcessLookupError:
            pass
    signalled: list[int] = []
    if leader is not None:
        try:
            os.killpg(leader, sig)
            signalled.append(leader)
        except ProcessLookupError:
            leader = None
    for pid in outside:
        try:
            os.kill(pid, sig)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    return 0, {"pid": rec[0] if rec else None, "group": leader is not None, "signalled": signalled}


def cmd_checkpoint(run_dir: str) -> Answer:
    write_atomic(os.path.join(run_dir, "checkpoint.request"), f"{time.time():f}\n")
    return 0, {"requested": True}


MAX_CHECKPOINTS = 1000


def cmd_ls_checkpoints(directory: str, cwd: str = "", patterns: list[str] | None = None
                       ) -> Answer:
    """DIR's entries, plus what each glob PATTERN matches (relative ones: under CWD, else
    here), at most MAX_CHECKPOINTS, oldest first; a directory counts as one checkpoint."""
    import glob

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


def dispatch(cmd: str, args: list[str], stdin: str | None) -> Answer:
    """Run one (non-streaming) command: (exit code, JSON answer)."""
    if cmd == "start":
        return cmd_start(args[0], stdin)
    if cmd == "status":
        return cmd_status(args[0])
    if cmd == "kill":
        return cmd_kill(args[0], args[1])
    if cmd == "alive-pids":
        return cmd_alive_pids(args)
    if cmd == "checkpoint":
        return cmd_checkpoint(args[0])
    if cmd == "ls-checkpoints":
        return cmd_ls_checkpoints(args[0], args[1] if len(args) > 1 else "", args[2:])
    if cmd == "free-port":
        return cmd_free_port(*(int(a) for a in args[:2])) if args else cmd_free_port(0, 0)
    if cmd == "reach":
        return cmd_reach(args[0], int(args[1]), float(args[2]))
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


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "watch":
        return cmd_watch(args[0], int(args[1]), int(args[2]))
    if cmd == "serve":
        return cmd_serve()
    if cmd == "start":
        args = args[:1]
        stdin = sys.stdin.read() if "--spec-stdin" in argv else None
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
