"""Python stacks of ranks by ``py-spy dump``: ``python3 -c TEXT TIMEOUT_S RUN_DIR...``.

Finds each rank's processes by the run dir in their environment (procscan) and runs
``py-spy dump --pid`` on each (at most 32 a rank), all at once, within the timeout.
Prints one JSON object: {"v": 1, "py_spy": its path or null, "ranks": {RUN_DIR: [{"pid",
"cmd", "exit_code", "stacks", "error"}, ...]}}. py-spy is looked up on PATH, then beside
this Python. Standard library only, Python 3.6 or later.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from ugrod.nodes.remote.procscan import pids_by_run_dir

TYPE_CHECKING = False
if TYPE_CHECKING:  # for annotations only: typing would cost every run an import
    from typing import Any


def spy() -> "str | None":
    found = shutil.which("py-spy")
    if found:
        return found
    beside = os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "py-spy")
    return beside if os.access(beside, os.X_OK) else None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:300]
    except OSError:
        return ""


def main(args: "list[str]") -> None:
    timeout, run_dirs = float(args[0]), args[1:]
    tool = spy()
    ranks: dict[str, list[dict[str, Any]]] = {}
    out = {"v": 1, "py_spy": tool, "ranks": ranks}
    running = []
    for d, pids in pids_by_run_dir(run_dirs).items():
        rows = ranks[d] = []
        for pid in sorted(pids)[:32]:
            row: dict[str, Any] = {"pid": pid, "cmd": cmdline(pid)}
            rows.append(row)
            if tool:
                try:
                    p = subprocess.Popen([tool, "dump", "--pid", str(pid)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
                except OSError as e:
                    row["error"] = f"{tool}: {e}"
                    continue
                running.append((row, p))
    deadline = time.monotonic() + timeout
    for row, p in running:
        try:
            said, complained = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            row["exit_code"] = p.returncode
            row["stacks"] = said[-200000:].decode("utf-8", "replace")
            if p.returncode:
                row["error"] = complained[-2000:].decode("utf-8", "replace").strip()
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            row["error"] = f"py-spy dump did not finish within {timeout:g} s"
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
