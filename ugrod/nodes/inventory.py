"""A node's GPU inventory at first contact: nvidia-smi over the node's transport.

What a node has is read once when ugrod first reaches it (the health sweeps keep
reading it afterwards), so that a GPU job submitted right after start is checked
against the GPUs the nodes really have, and a node whose GPUs differ from its
``gpus:`` in cluster.yaml says how.
"""

from __future__ import annotations

import asyncio
import logging

from ugrod.core import events as ev
from ugrod.core import gpus as gpumod
from ugrod.core.state import Node
from ugrod.nodes.transport.base import Transport, TransportError

logger = logging.getLogger("ugrod.nodes.inventory")

TIMEOUT_S = 8.0  # one node's nvidia-smi at first contact

# A fixed script; nvidia-smi's arguments travel as positional parameters. Exit code 127:
# no nvidia-smi there (a node without GPUs).
_SCRIPT = 'command -v nvidia-smi >/dev/null 2>&1 || exit 127; exec nvidia-smi "$@"'


async def read(node: Node, transport: Transport) -> ev.Event | None:
    """The node's GPUs as ``NodeInventoried``, or None: nothing new, or no answer (said in
    the log; the health monitor reads them later)."""
    name = node.name
    argv = ["sh", "-c", _SCRIPT, "sh", *gpumod.nvidia_smi_argv()[1:]]
    try:
        async with asyncio.timeout(TIMEOUT_S):
            res = await transport.run(argv)
    except TransportError as exc:
        logger.warning("node %s: GPU inventory failed: %s", name, exc)
        return None
    except TimeoutError:
        logger.warning("node %s: GPU inventory did not answer within %g s; the health "
                       "monitor will read it later", name, TIMEOUT_S)
        return None
    if res.exit_code == 127:
        found: tuple[ev.Gpu, ...] = ()
    else:
        reading = gpumod.parse_nvidia_smi(res.stdout.decode("utf-8", "replace"),
                                          res.exit_code,
                                          res.stderr.decode("utf-8", "replace"))
        if isinstance(reading, gpumod.GpuQueryFailed):
            logger.warning("node %s: GPU inventory failed: %s", name, reading)
            return None
        found = gpumod.inventory(reading)
    mismatch = gpumod.compare_inventory(node.spec.gpus, found) if node.spec.gpus else None
    if node.inventory == found and node.inventory_mismatch == mismatch:
        return None
    if mismatch:
        logger.warning("node %s: %s", name, mismatch)
    return ev.NodeInventoried(node=name, gpus=found, mismatch=mismatch)
