"""Readiness checks (``ugroctl health NODE --deep``): ``python3 -c TEXT WORK_DIR SMI TIMEOUT_S``.

Prints one JSON object that ugrod.core.gpus.parse_readiness turns into checks: this
Python's version, whether torch imports and sees CUDA (in a child, within the timeout:
``import torch`` can take a while), ``nvidia-smi -L``, and the room on the work dir's disk.
Standard library only and Python 3.6 or later, so that an old Python is reported as one.
"""

import json
import sys

from ugrod.nodes.remote.host import disk, run_tool, which

TYPE_CHECKING = False
if TYPE_CHECKING:  # for annotations only: typing would cost every run an import
    from typing import Any

# Run with the same interpreter; prints one JSON object.
TORCH = ("import json, torch\n"
         "ok = torch.cuda.is_available()\n"
         "n = torch.cuda.device_count() if ok else 0\n"
         "print(json.dumps({'version': torch.__version__, 'cuda': ok,\n"
         "  'cuda_version': torch.version.cuda,\n"
         "  'devices': [torch.cuda.get_device_name(i) for i in range(n)]}))\n")


def main(args: "list[str]") -> None:
    work_dir, smi, timeout = args[0], args[1], float(args[2])
    out: dict[str, Any] = {"v": 1, "python": list(sys.version_info[:3]),
                           "executable": sys.executable, "errors": []}
    out["torch"] = run_tool([sys.executable, "-c", TORCH], timeout)
    path = which(smi)
    out["smi"] = {"present": False} if path is None else run_tool([path, "-L"], timeout)
    try:
        out["disk"] = disk(work_dir)
    except OSError as e:
        out["errors"].append(f"disk: {e}")
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
