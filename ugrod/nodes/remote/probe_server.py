"""The node probe as a long-lived process: ``python3 -c TEXT WORK_DIR SMI TIMEOUT_S``.

Prints {"v":1,"ready":true}, then answers each request line ``{"id": N, "pid_files":
[...]}`` with one probe line (node_sample.sample) carrying the same "id"; "age_s" is then
the time the node spent on that request, so the caller still tells the link's share of the
round trip. It exits at EOF on stdin (the head closed the stream or went away). One per
node saves the interpreter start-up and the SSH session set-up that a probe per sweep
costs. Standard library only, Python 3.6 or later.
"""

import contextlib
import json
import sys
import time

from ugrod.nodes.remote.node_sample import sample


def serve(args: "list[str]") -> None:
    work_dir, smi, timeout = args[0], args[1], float(args[2])
    out = sys.stdout
    out.write(json.dumps({"v": 1, "ready": True}) + "\n")
    out.flush()
    while True:
        line = sys.stdin.buffer.readline()
        if not line:
            return
        t0 = time.monotonic()
        try:
            req = json.loads(line.decode("utf-8", "replace"))
            rid, pid_files = req["id"], [str(p) for p in req.get("pid_files", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            out.write(json.dumps({"v": 1, "id": None, "bad_request": line[:200].decode(
                "utf-8", "replace")}) + "\n")
            out.flush()
            continue
        answer = sample(work_dir, smi, timeout, pid_files)
        answer["id"] = rid
        answer["age_s"] = time.monotonic() - t0
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.argv[1:])
