"""What /proc says about processes: a process's state and start time, and the ranks' processes.

A library for the programs in this directory (the rank wrapper, the probe, the stack dump,
the leftover scan), shipped inside each of them (ugrod/nodes/programs.py), so it stays
standard library only and runs on Python 3.6 (annotations are quoted).

A rank's processes are found by the ``UGRO_RUN_DIR=RUN_DIR`` entry that the rank wrapper
puts in the rank's environment: torchrun's workers inherit it, even in sessions of their
own, and nothing is ever matched by name. A pid is trusted only with its start time (field
22 of /proc/PID/stat), so a reused pid is never taken for the process it replaced.
"""

import os

MARKER = "UGRO_RUN_DIR"
_MARKED = (MARKER + "=").encode()


def proc_stat(pid: int) -> "tuple[str, int] | None":
    """(state, starttime) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])  # fields[0] is field 3 (state); 22 is starttime


def marked_run_dirs() -> "dict[int, str]":
    """The run dir in the environment of each live process that has one, by pid.

    This process is left out, and so are processes this user may not read (root reads
    all) and processes that end while they are read.
    """
    found: dict[int, str] = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for entry in env:
            if entry.startswith(_MARKED):  # the first one is what the process sees
                stat = proc_stat(int(name))
                if stat is not None and stat[0] not in ("Z", "X"):
                    found[int(name)] = os.fsdecode(entry[len(_MARKED):])
                break
    return found


def pids_by_run_dir(run_dirs: "list[str]") -> "dict[str, list[int]]":
    """For each run dir, the live processes whose environment carries it."""
    found: dict[str, list[int]] = {d: [] for d in run_dirs}
    for pid, run_dir in marked_run_dirs().items():
        if run_dir in found:
            found[run_dir].append(pid)
    return found
