"""Python stacks of a job's ranks, by ``py-spy dump`` run on each node, into the job directory.

The watchdog calls ``capture`` when a job stalls. On each node one stdlib program
(nodes/remote/stack_dump.py) finds the ranks' processes by the ``UGRO_RUN_DIR`` the rank
wrapper puts in their environment (torchrun's workers inherit it; nothing is matched by
name) and dumps them all at once, where ``py-spy`` is on the node's PATH or beside its
Python. py-spy needs ptrace rights over the ranks: root, or the ranks' own user with
``kernel.yama.ptrace_scope`` 0 (at 1, only ancestors may trace: grant py-spy
CAP_SYS_PTRACE). A node without py-spy, or where it fails, gets a line saying so in the
file; ``capture`` writes no file when no node gave a single stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from ugrod.core.state import Job
from ugrod.nodes import programs
from ugrod.nodes.agent import NodeAgent
from ugrod.nodes.transport.base import TransportError

logger = logging.getLogger("ugrod.loops.stacks")

STACKS_TIMEOUT_S = 20.0

# argv: TIMEOUT_S RUN_DIR...; prints one JSON object (see the program's doc).
STACKS_SCRIPT = programs.text("stack_dump")


async def capture(job: Job, agents: Mapping[str, NodeAgent], jobdir: Path,
                  header: str) -> Path | None:
    """py-spy dumps of every rank's processes into ``jobdir/stacks-<time>.txt``; its path.

    None when no stack could be had anywhere (no py-spy on any node, all unreachable).
    """
    by_node: dict[str, list[tuple[int, str]]] = {}
    for p in job.placement:
        agent = agents.get(p.node)
        if agent is not None:
            by_node.setdefault(p.node, []).append(
                (p.rank, await agent.run_dir(job.id, job.attempt, p.rank)))
    results = await asyncio.gather(*(_on_node(agents[node], ranks)
                                     for node, ranks in by_node.items()))
    captured = False
    parts = [f"ugro: stacks of job {job.id}, attempt {job.attempt}: {header}",
             f"captured {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} with py-spy dump",
             ""]
    for text, ok in results:
        parts.append(text)
        captured = captured or ok
    if not captured:
        logger.info("job %s: no stacks captured (py-spy on no node?)", job.id)
        return None
    path = jobdir / f"stacks-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.txt"
    try:
        await asyncio.to_thread(_write, path, "\n".join(parts).encode())
    except OSError as exc:
        logger.error("cannot write %s: %s", path, exc)
        return None
    return path


async def _on_node(agent: NodeAgent, ranks: list[tuple[int, str]]) -> tuple[str, bool]:
    """One node's share of the stacks file, and whether any stack was captured there."""
    node = agent.node
    try:
        async with asyncio.timeout(STACKS_TIMEOUT_S + 10):
            res = await agent.transport.run(
                [agent.python, "-c", STACKS_SCRIPT, repr(STACKS_TIMEOUT_S),
                 *(d for _, d in ranks)])
        if res.exit_code != 0:
            raise ValueError(f"exit code {res.exit_code}: {res.stderr_line()}")
        reply = json.loads(res.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        per_dir = reply["ranks"]
        tool = reply.get("py_spy")
    except (TransportError, TimeoutError, ValueError, KeyError, IndexError) as exc:
        why = str(exc) or "no answer"
        return "\n".join(f"=== rank {r} on {node}: stacks not captured: {why}"
                         for r, _ in ranks) + "\n", False
    out: list[str] = []
    ok = False
    for rank, d in ranks:
        rows = per_dir.get(d) or []
        out.append(f"=== rank {rank} on {node} ({d}) ===")
        if tool is None:
            out.append("py-spy is not on this node's PATH nor beside its python "
                       "(pip install py-spy to get stacks of stalled jobs)")
        if not rows:
            out.append("no process of this rank is left")
        for row in rows if isinstance(rows, list) else []:
            out.append(f"--- pid {row.get('pid')}: {row.get('cmd', '')}")
            stacks = str(row.get("stacks") or "").rstrip()
            if stacks:
                out.append(stacks)
                ok = ok or row.get("exit_code") == 0
            if row.get("error"):
                out.append(f"(py-spy: {row['error']})")
        out.append("")
    return "\n".join(out), ok


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
