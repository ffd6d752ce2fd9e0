"""What a job needs and which nodes could ever give it: shapes, fits, run-time estimates.

A shape is what placement depends on (GPUs per node, nodes, VRAM, labels, names):
jobs of one shape fit the same nodes, so a round works per shape. ``check_fits``
answers at submit time whether a job could ever run on the cluster as configured.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Mapping

from ugrod.core import events as ev
from ugrod.core.planner.words import and_, gb
from ugrod.core.state import JobState, Node, State
from ugrod.core.vram import nominal_bytes

Gpu = tuple[int, int, str]  # (nominal vram_bytes, index, uuid): sorts smallest card first
Shape = tuple[int, int, int, tuple[str, ...], tuple[str, ...], tuple[str, ...]]
RunTimes = Mapping[tuple[str, tuple[str, ...]], float]
"""(owner, argv) -> typical run time in seconds of that owner's succeeded runs of argv."""


def spec_shape(spec: ev.JobSpec) -> Shape:
    """What placement depends on: jobs of one shape fit the same nodes."""
    return (spec.gpus_per_node, spec.nodes, spec.min_vram_bytes, spec.labels_required,
            spec.labels_avoided, spec.node_names)


def check_fits(state: State, spec: ev.JobSpec) -> str | None:
    """None if ``spec`` could run on the configured cluster when idle, else why not in words."""
    if spec.nodes < 1:
        return "a job needs at least 1 node"
    if spec.gpus_per_node < 0:
        return "gpus per node cannot be negative"
    missing = sorted({n for n in spec.node_names if n not in state.nodes})
    if missing:
        if len(missing) == 1:
            return f"needs node {missing[0]}, which is not in the cluster"
        return f"needs nodes {and_(missing)}, which are not in the cluster"
    named = set(spec.node_names)
    if named and len(named) < spec.nodes:
        return f"needs {spec.nodes} nodes but names only {len(named)}: {and_(sorted(named))}"
    if not state.nodes:
        return "the cluster has no nodes"
    shape = spec_shape(spec)
    fits = [n.name for n in sorted_nodes(state) if lower_bound(
        shape, n.name, frozenset(n.spec.labels),
        sorted(nominal_bytes(g.vram_bytes) for g in n.gpus)) is not None]
    if len(fits) >= spec.nodes:
        return None
    wanted = need(shape)
    them = "one" if spec.gpus_per_node == 1 else "them"
    if not fits:
        return f"needs {wanted}; no node " + (f"has {them}" if spec.gpus_per_node else "qualifies")
    if spec.gpus_per_node:
        have = f"has {them}" if len(fits) == 1 else f"have {them}"
    else:
        have = "qualifies" if len(fits) == 1 else "qualify"
    return f"needs {wanted}; only {and_(fits)} {have}"


def typical_runtimes(state: State) -> dict[tuple[str, tuple[str, ...]], float]:
    """Median run time of each (owner, argv)'s succeeded jobs: the estimate for unknown ones."""
    runs: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for job in state.jobs.values():
        if job.state is JobState.SUCCEEDED and job.ended_at is not None:
            start = job.running_at if job.running_at is not None else job.started_at
            if start is not None:
                runs.setdefault((job.owner, job.spec.argv), []).append(job.ended_at - start)
    return {k: statistics.median(v) for k, v in runs.items()}


def gpus_unknown(state: State, shape: Shape) -> list[Node]:
    """Nodes not reached yet whose GPUs are unknown (never inventoried, none named in the
    config) and that would qualify for a GPU job of ``shape`` by name and labels: such a
    job may fit once they are reached."""
    if not shape[0]:
        return []
    return [n for n in sorted_nodes(state) if n.inventory is None and not n.spec.gpus
            and not n.schedulable
            and lower_bound((0, *shape[1:]), n.name, frozenset(n.spec.labels), [])
            is not None]


def sorted_nodes(state: State) -> list[Node]:
    return [state.nodes[k] for k in sorted(state.nodes.keys())]


def lower_bound(shape: Shape, name: str, labels: frozenset[str],
                 vrams: list[int]) -> int | None:
    """VRAM the shape would give up on an idle node (GPU count for CPU jobs); None: never.

    ``vrams`` is the node's GPUs' VRAM, sorted.
    """
    gpn, _, min_vram, required, avoided, names = shape
    if names and name not in names:
        return None
    if required and not labels.issuperset(required):
        return None
    if avoided and not labels.isdisjoint(avoided):
        return None
    if not gpn:
        return len(vrams)
    pos = bisect.bisect_left(vrams, min_vram)
    return sum(vrams[pos:pos + gpn]) if len(vrams) - pos >= gpn else None


def need(shape: Shape) -> str:
    """'2 nodes with a GPU ≥ 8 GB', 'a GPU ≥ 10 GB', '3 nodes labelled ib'..."""
    gpn, count, min_vram, required, avoided, names = shape
    gpus = "" if not gpn else ("a GPU" if gpn == 1 else f"{gpn} GPUs")
    if gpus and min_vram:
        gpus += f" ≥ {gb(min_vram)}"
    plain = not (required or avoided or names)
    if count == 1 and gpus and plain:
        text = gpus if gpn == 1 else f"{gpus} on one node"
    else:
        text = "a node" if count == 1 else f"{count} nodes"
        if gpus:
            text += f" with {gpus}"
    if required:
        text += f" labelled {', '.join(required)}"
    if avoided:
        text += f" not labelled {', '.join(avoided)}"
    if names:
        text += f" among {', '.join(names)}"
    return text
