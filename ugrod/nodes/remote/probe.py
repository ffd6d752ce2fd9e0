"""The node probe, one round trip: ``python3 -c TEXT WORK_DIR SMI TIMEOUT_S [PID_FILE...]``.

Prints one JSON object (node_sample.sample, plus "age_s": how long this process existed)
that ugrod.core.gpus.parse_probe reads. Standard library only, Python 3.6 or later; used
where the long-lived probe_server cannot be kept (see ugrod/loops/monitor.py).
"""

import json
import sys

from ugrod.nodes.remote.node_sample import age, sample


def main(args: "list[str]") -> None:
    out = sample(args[0], args[1], float(args[2]), args[3:])
    out["age_s"] = age()
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
