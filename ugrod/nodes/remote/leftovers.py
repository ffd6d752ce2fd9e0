"""Rank processes left on a node: ``python3 -c TEXT JOBS_DIR KEEP_RUN_DIR...``.

Prints one JSON object, {"v": 1, "run_dirs": [...]}: the run dirs under JOBS_DIR that a
live process carries in its environment (UGRO_RUN_DIR, see procscan), other than the
ones to keep (the attempts the head still runs there). The watchdog kills what it lists
on a node that answers again. Standard library only, Python 3.6 or later.
"""

import json
import sys

from ugrod.nodes.remote.procscan import marked_run_dirs


def main(args: "list[str]") -> None:
    jobs, keep = args[0].rstrip("/") + "/", set(args[1:])
    found = {d for d in marked_run_dirs().values() if d.startswith(jobs) and d not in keep}
    sys.stdout.write(json.dumps({"v": 1, "run_dirs": sorted(found)}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
