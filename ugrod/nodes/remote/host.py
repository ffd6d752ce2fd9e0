"""Running a node's tools with a deadline, and the room left on its disk.

A library for the probe and the readiness check (ugrod/nodes/programs.py ships it inside
them): standard library only, Python 3.6 or later (annotations are quoted). A tool runs
in its own session with a timeout and is killed with its whole process group when it
hangs (a hung driver call is the usual way a GPU node fails); what it prints is read to
the end but only a bounded part is kept.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # for annotations only: typing would cost every run an import
    from typing import IO, Any

OUT_CAP = 65536  # what is kept of stdout; the rest is read and dropped (never held)
ERR_CAP = 4096  # the end of stderr is kept


def _drain(pipe: "IO[bytes]", keep: "list[Any]", cap: int, tail: bool) -> None:
    # Reads a pipe to its end holding at most ``cap`` bytes (the first, or with
    # ``tail`` the last): 200 MB from a broken nvidia-smi costs no memory here.
    try:
        while True:
            b = pipe.read(65536)
            if not b:
                return
            if tail:
                keep[0] = (keep[0] + b)[-cap:]
            elif len(keep[0]) < cap:
                keep[0] = keep[0] + b[: cap - len(keep[0])]
            else:
                keep[1] = True
    except (OSError, ValueError):
        pass


def run_tool(argv: "list[str]", timeout: float) -> "dict[str, Any]":
    """Run ``argv``; what became of it as a JSON object (``present``: False if not found)."""
    t0 = time.monotonic()
    res: dict[str, Any] = {"present": True, "exit_code": None, "stdout": "", "stderr": "",
                           "timed_out": False, "error": None}
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        res["present"] = False
        return res
    except OSError as e:
        res["error"] = f"{argv[0]}: {e}"
        return res
    out: list[Any] = [b"", False]
    err: list[Any] = [b"", False]
    readers = [threading.Thread(target=_drain, args=(p.stdout, out, OUT_CAP, False)),
               threading.Thread(target=_drain, args=(p.stderr, err, ERR_CAP, True))]
    for t in readers:
        t.daemon = True
        t.start()
    try:
        p.wait(timeout=timeout)
        res["exit_code"] = p.returncode
    except subprocess.TimeoutExpired:
        res["timed_out"] = True
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=2)
    for t in readers:
        t.join(2)
    if out[1]:
        res["stdout_truncated"] = True
    res["stdout"] = out[0].decode("utf-8", "replace")
    res["stderr"] = err[0].decode("utf-8", "replace")
    res["elapsed_s"] = time.monotonic() - t0
    return res


def which(name: str) -> "str | None":
    """A tool's path: ``name`` itself if it has a slash, else looked up on PATH."""
    return name if os.sep in name else shutil.which(name)


def _existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def disk(path: str) -> "dict[str, Any]":
    """Size and room of the file system holding ``path`` (or its nearest existing parent)."""
    path = _existing(path)
    st = os.statvfs(path)
    return {"path": path, "total": st.f_blocks * st.f_frsize,
            "free": st.f_bfree * st.f_frsize, "avail": st.f_bavail * st.f_frsize}
