"""One sample of a node: nvidia-smi's rows, load, memory, CPU ticks, disk, boot id, ranks.

A library for the probe and the probe server (ugrod/nodes/programs.py ships it inside
them): standard library only, Python 3.6 or later (annotations are quoted), and it never
raises: every part that fails is named in "errors" and the rest is still reported. The
head parses the object with ugrod.core.gpus.parse_probe.
"""

import os
import time

from ugrod.nodes.remote.host import disk, run_tool, which
from ugrod.nodes.remote.procscan import proc_stat

TYPE_CHECKING = False
if TYPE_CHECKING:  # for annotations only: typing would cost every run an import
    from typing import Any

# nvidia-smi's arguments: ugrod.core.gpus.nvidia_smi_argv(), which parses the answer
# (a unit test keeps the two the same).
QUERY = ["--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,"
         "temperature.gpu,power.draw", "--format=csv,noheader,nounits"]


def _pid(path: str) -> "dict[str, Any]":
    r: dict[str, Any] = {"file": path, "pid": None, "alive": False, "error": None}
    try:
        with open(path) as f:
            parts = f.read().split()
        r["pid"] = int(parts[0])
        want = parts[1] if len(parts) > 1 else None
    except (OSError, ValueError, IndexError) as e:
        r["error"] = f"pid file {path}: {e.__class__.__name__}"
        return r
    stat = proc_stat(r["pid"])
    if stat is None:
        return _ended(r, path)
    r["alive"] = stat[0] not in ("Z", "X") and (want is None or str(stat[1]) == want)
    return r if r["alive"] else _ended(r, path)


def _ended(r: "dict[str, Any]", path: str) -> "dict[str, Any]":
    # A rank that is gone but left its exit code ended on its own (a normal end the
    # daemon has not recorded yet), not a process that vanished.
    r["ended"] = os.path.exists(os.path.join(os.path.dirname(path), "exit_code"))
    return r


def age() -> "float | None":
    """How long this process has existed (interpreter start included), so that the
    caller can tell the network's share of the round trip from the probe's own."""
    try:
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        stat = proc_stat(os.getpid())
        if stat is None:
            return None
        return max(0.0, up - stat[1] / float(os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError):
        return None


def sample(work_dir: str, smi: str, timeout: float, pid_files: "list[str]") -> "dict[str, Any]":
    """The node now, as one JSON object (``v`` 1)."""
    out: dict[str, Any] = {"v": 1, "errors": [], "clock": time.time()}
    path = which(smi)
    if path is None:
        out["smi"] = {"present": False}
    else:
        out["smi"] = run_tool([path, *QUERY], timeout)
    try:
        with open("/proc/loadavg") as f:
            out["loadavg"] = [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError) as e:
        out["errors"].append(f"loadavg: {e}")
    try:
        mem: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(rest.split()[0]) * 1024
        out["meminfo"] = mem
    except (OSError, ValueError, IndexError) as e:
        out["errors"].append(f"meminfo: {e}")
    try:
        with open("/proc/stat") as f:
            out["cpu"] = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError) as e:
        out["errors"].append(f"stat: {e}")
    out["ncpu"] = os.cpu_count()
    try:
        out["disk"] = disk(work_dir)
    except OSError as e:
        out["errors"].append(f"disk: {e}")
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            out["boot_id"] = f.read().strip()
    except OSError:
        pass
    out["pids"] = [_pid(p) for p in pid_files]
    return out
