"""The planner: placement tables on the seeds' 12/8/8 GB cluster, and properties over random ones.

States are built the way the daemon builds them: real events through ``state.apply``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core.limits import UserLimits
from ugrod.core.planner import Plan, check_fits, plan, typical_runtimes
from ugrod.core.state import ACTIVE, Job, JobState, State, apply

GB = 1 << 30
T0 = codec.parse_ts("2026-11-22T14:00:00.000000Z")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("UGRO_PLANNER_EXAMPLES", "300"))  # raise it for a long search


class Cluster:
    """A state built from real events, with a clock the test moves."""

    def __init__(self, *nodes: ev.NodeSpec) -> None:
        self.state = State()
        self.now = T0
        for n in nodes:
            self.put(ev.NodeAdded(node=n), user="ugrod")

    def put(self, event: ev.Event, user: str = "alice") -> None:
        self.state = apply(self.state, ev.Record(seq=self.state.seq + 1, ts=self.now,
                                                 actor=ev.Actor(user=user), event=event))

    def submit(self, job: str, *, user: str = "alice", priority: int = 0, held: bool = False,
               **spec: Any) -> None:
        spec.setdefault("argv", ("python", "train.py"))
        self.put(ev.JobSubmitted(job=job, spec=ev.JobSpec(**spec), priority=priority,
                                 held=held), user=user)

    def plan(self, **kw: Any) -> Plan:
        return plan(self.state, self.now, **kw)

    def start(self, placements: Iterable[ev.JobPlaced]) -> None:
        for p in placements:
            self.put(p, user="ugrod")
            self.put(ev.JobRunning(job=p.job, attempt=p.attempt), user="ugrod")

    def round(self, **kw: Any) -> Plan:
        """Plan, then start everything placed (as the daemon would)."""
        p = self.plan(**kw)
        self.start(p.placements)
        return p

    def end(self, job: str, outcome: str = "succeeded", **kw: Any) -> None:
        j = self.state.jobs[job]
        self.put(ev.JobEnded(job=job, attempt=j.attempt, outcome=outcome, **kw), user="ugrod")

    def where(self, job: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(p.node, p.gpus) for p in self.state.jobs[job].placement]


def gpu_node(name: str, *vram_gb: float, rank: int | None = None,
             labels: tuple[str, ...] = ()) -> ev.NodeSpec:
    return ev.NodeSpec(name=name, host=f"{name}.lan", rank=rank, labels=labels, gpus=tuple(
        ev.Gpu(index=i, vram_bytes=int(v * GB), uuid=f"GPU-{name}-{i}")
        for i, v in enumerate(vram_gb)))


def seeds() -> Cluster:
    """The seeds' lab: gpu-master 12 GB (rank 0), gpu1 8 GB, gpu2 8 GB."""
    return Cluster(gpu_node("gpu-master", 12, rank=0), gpu_node("gpu1", 8), gpu_node("gpu2", 8))


def placed(p: Plan) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    return {x.job: [(r.node, r.gpus) for r in x.ranks] for x in p.placements}


# ---- placement by VRAM --------------------------------------------------------


def test_8gb_job_takes_an_8gb_card_and_10gb_job_takes_the_12gb_card() -> None:
    c = seeds()
    c.submit("small", gpus_per_node=1, min_vram_bytes=8 * GB)
    c.submit("big", gpus_per_node=1, min_vram_bytes=10 * GB)
    p = c.plan()
    assert placed(p) == {"small": [("gpu1", (0,))], "big": [("gpu-master", (0,))]}
    assert p.waiting == {}
    small = p.placements[0]
    assert small.attempt == 1 and small.rdzv_host == "gpu1.lan" and small.rdzv_port == 0
    assert small.ranks[0].gpu_uuids == ("GPU-gpu1-0",)
    assert small.reason == ("placed on gpu1 (GPU 0, 8 GB): smallest GPUs that fit; "
                            "priority 0, 1st in the queue")


def test_small_jobs_fill_small_cards_before_the_big_one() -> None:
    c = seeds()
    for j in ("a", "b", "c", "d"):
        c.submit(j, gpus_per_node=1)
    p = c.plan()
    assert placed(p) == {"a": [("gpu1", (0,))], "b": [("gpu2", (0,))],
                         "c": [("gpu-master", (0,))]}
    # blockers are named in the order the job would take them: smallest cards first
    assert p.waiting["d"] == ("waiting for a GPU: gpu1 busy with a, gpu2 busy with b, "
                              "gpu-master busy with c")


def test_smallest_cards_within_a_node_and_mixed_words() -> None:
    c = Cluster(gpu_node("box", 24, 8, 12, 8))
    c.submit("two", gpus_per_node=2, min_vram_bytes=10 * GB)
    c.submit("one", gpus_per_node=1)
    p = c.plan()
    assert placed(p) == {"two": [("box", (0, 2))], "one": [("box", (1,))]}
    assert p.placements[0].reason.startswith("placed on box (GPU 0 24 GB, GPU 2 12 GB): ")


def test_gpu_count_per_node_and_vram_words() -> None:
    c = Cluster(gpu_node("a", 8, 8), gpu_node("b", 8, 8))
    c.submit("j", nodes=2, gpus_per_node=2)
    p = c.plan()
    assert placed(p) == {"j": [("a", (0, 1)), ("b", (0, 1))]}
    assert p.placements[0].reason.startswith(
        "placed on a (GPUs 0,1, 8 GB each), b (GPUs 0,1, 8 GB each): smallest GPUs that fit")


# ---- gangs and rank 0 -------------------------------------------------------------


def test_gang_takes_all_three_nodes_with_rank_0_on_the_configured_master() -> None:
    c = seeds()
    c.submit("gang", nodes=3, gpus_per_node=1, min_vram_bytes=8 * GB)
    (p,) = c.plan().placements
    assert [(r.rank, r.node) for r in p.ranks] == [(0, "gpu-master"), (1, "gpu1"), (2, "gpu2")]
    assert p.rdzv_host == "gpu-master.lan"


def test_rank_0_goes_to_the_first_chosen_node_without_a_configured_rank() -> None:
    c = seeds()
    c.submit("pair", nodes=2, gpus_per_node=1)
    (p,) = c.plan().placements
    assert [(r.rank, r.node) for r in p.ranks] == [(0, "gpu1"), (1, "gpu2")]
    assert p.rdzv_host == "gpu1.lan"


def test_gang_is_all_or_nothing() -> None:
    c = seeds()
    c.submit("one", gpus_per_node=1)
    c.round()
    c.submit("gang", nodes=3, gpus_per_node=1)
    p = c.plan()
    assert p.placements == ()
    assert p.waiting["gang"] == ("waiting for 3 nodes with a GPU: only gpu-master and gpu2 "
                                 "free; gpu1 busy with one; the GPUs it waits for are kept "
                                 "for it")
    # it never fits the cluster: rejected at submit, and said so if it is queued anyway
    c.submit("huge", nodes=3, gpus_per_node=1, min_vram_bytes=10 * GB)
    assert c.plan().waiting["huge"] == ("cannot run on this cluster as configured: needs 3 "
                                        "nodes with a GPU ≥ 10 GB; only gpu-master has one")


def test_port_for_picks_the_rendezvous_port_when_given() -> None:
    c = seeds()
    c.submit("gang", nodes=2, gpus_per_node=1, min_vram_bytes=8 * GB)
    seen: list[tuple[str, int]] = []

    def port_for(node: str, attempt: int) -> int:
        seen.append((node, attempt))
        return 29500 + attempt

    (p,) = c.plan(port_for=port_for).placements
    assert p.rdzv_port == 29501 and seen == [("gpu1", 1)]


# ---- queue order, hold, dependencies ---------------------------------------------------


def test_priority_then_fifo() -> None:
    c = Cluster(gpu_node("solo", 8))
    c.submit("a", gpus_per_node=1)
    c.submit("b", gpus_per_node=1, priority=5)
    c.submit("c", gpus_per_node=1, priority=5)
    p = c.plan()
    assert p.order == ("b", "c", "a")
    assert placed(p) == {"b": [("solo", (0,))]}
    assert p.placements[0].reason.endswith("priority 5, 1st in the queue")
    assert set(p.waiting) == {"c", "a"}
    c.start(p.placements)
    c.end("b")
    assert list(placed(c.plan())) == ["c"]


def test_held_job_is_passed_over_and_keeps_its_place() -> None:
    c = Cluster(gpu_node("solo", 8))
    c.submit("first", gpus_per_node=1, held=True)
    c.submit("second", gpus_per_node=1)
    p = c.plan()
    assert list(placed(p)) == ["second"]
    assert p.waiting["first"] == "held: `ugroctl release first` lets it run"
    c.put(ev.JobReleased(job="first"))
    c.submit("third", gpus_per_node=1)
    assert c.plan().order == ("first", "second", "third")


def test_after_dependency() -> None:
    c = seeds()
    c.submit("exp1", gpus_per_node=1)
    c.submit("exp2", gpus_per_node=1, after=("exp1",))
    p = c.round()
    assert list(placed(p)) == ["exp1"]
    assert p.waiting["exp2"] == "waiting for exp1 to succeed (exp1 is queued)"
    assert c.plan().waiting["exp2"] == "waiting for exp1 to succeed (exp1 is running)"
    c.end("exp1")
    assert list(placed(c.plan())) == ["exp2"]


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_failed_dependency_is_unrunnable(outcome: str) -> None:
    c = seeds()
    c.submit("exp1", gpus_per_node=1)
    c.submit("exp2", gpus_per_node=1, after=("exp1",))
    c.round()
    c.end("exp1", outcome)
    p = c.plan()
    assert p.placements == ()
    assert p.waiting["exp2"] == f"exp1 {outcome}: this job runs only after it succeeds"
    assert p.unrunnable == {"exp2": f"exp1 {outcome}"}


def test_missing_dependency_is_unrunnable() -> None:
    c = seeds()
    c.submit("exp2", after=("ghost",))
    p = c.plan()
    assert p.unrunnable == {"exp2": "ghost does not exist"}
    assert "does not exist" in p.waiting["exp2"]


# ---- node health, drains, failed nodes --------------------------------------------------


def test_draining_and_unhealthy_nodes_are_skipped() -> None:
    c = seeds()
    c.put(ev.NodeDrained(node="gpu1", reason="new fan"))
    c.submit("j", gpus_per_node=1)
    assert placed(c.plan()) == {"j": [("gpu2", (0,))]}
    c.put(ev.NodeHealthChanged(node="gpu2", health="unhealthy", reason="Xid 79"))
    c.put(ev.NodeHealthChanged(node="gpu-master", health="unreachable"))
    p = c.plan()
    assert p.placements == ()
    assert p.waiting["j"] == ("waiting for a GPU: gpu1 is draining (new fan), "
                              "gpu2 is unhealthy (Xid 79), gpu-master is unreachable")
    c.put(ev.NodeHealthChanged(node="gpu2", health="degraded"))
    assert placed(c.plan()) == {"j": [("gpu2", (0,))]}


def test_degraded_node_is_used_after_healthy_equals() -> None:
    c = seeds()
    c.put(ev.NodeHealthChanged(node="gpu1", health="degraded"))
    c.submit("j", gpus_per_node=1)
    assert placed(c.plan()) == {"j": [("gpu2", (0,))]}


def test_failed_node_is_avoided_when_others_fit() -> None:
    c = seeds()
    c.submit("j", gpus_per_node=1, max_retries=3)
    c.round()
    assert c.where("j") == [("gpu1", (0,))]
    c.end("j", "retrying", failed_node="gpu1", exit_code=1, retry_at=T0 + 10,
          resume_from="/ckpt/step-400.pt")
    c.now = T0 + 10
    (p,) = c.plan().placements
    assert [(r.node, r.gpus) for r in p.ranks] == [("gpu2", (0,))]
    assert p.attempt == 2 and p.resume_from == "/ckpt/step-400.pt"
    assert "avoiding gpu1, where it failed before" in p.reason
    assert "attempt 2, resuming from /ckpt/step-400.pt" in p.reason


def test_failed_node_is_used_again_when_nothing_else_fits() -> None:
    c = seeds()
    c.submit("j", gpus_per_node=1, min_vram_bytes=10 * GB, max_retries=3)
    c.round()
    c.end("j", "retrying", failed_node="gpu-master", exit_code=1, retry_at=T0 + 10)
    c.now = T0 + 10
    (p,) = c.plan().placements
    assert p.ranks[0].node == "gpu-master"
    assert "on gpu-master again, where it failed before: no other node fits" in p.reason


def test_retrying_job_waits_out_its_backoff() -> None:
    c = seeds()
    c.submit("j", gpus_per_node=1, max_retries=3)
    c.round()
    c.end("j", "retrying", exit_code=1, retry_at=T0 + 300)
    p = c.plan()
    assert p.placements == ()
    assert p.waiting["j"] == "retry 1 of 3 at 14:05 UTC (backoff)"
    c.now = T0 + 299.9
    assert c.plan().placements == ()
    c.now = T0 + 300
    assert list(placed(c.plan())) == ["j"]


def test_stopping_job_still_holds_its_gpus() -> None:
    c = Cluster(gpu_node("solo", 8))
    c.submit("a", gpus_per_node=1)
    c.round()
    c.put(ev.JobStopping(job="a", attempt=1, outcome="cancelled", reason="cancelled by user"))
    c.submit("b", gpus_per_node=1)
    p = c.plan()
    assert p.placements == ()
    assert p.waiting["b"].startswith("waiting for a GPU: solo busy with a (stopping)")


def test_labels_and_node_names() -> None:
    c = Cluster(gpu_node("a", 8, labels=("ib",)), gpu_node("b", 8, labels=("ib", "flaky")),
                gpu_node("c", 8))
    c.submit("ib", gpus_per_node=1, labels_required=("ib",), labels_avoided=("flaky",))
    c.submit("named", gpus_per_node=1, node_names=("b", "c"))
    assert placed(c.plan()) == {"ib": [("a", (0,))], "named": [("b", (0,))]}


def test_cpu_jobs_take_no_gpu_share_nodes_and_prefer_gpu_less_nodes() -> None:
    c = Cluster(gpu_node("head"), gpu_node("gpu1", 8), gpu_node("gpu2", 8))
    c.submit("g", gpus_per_node=1)
    c.submit("cpu1")
    c.submit("cpu2")
    c.submit("cpu3", nodes=3)
    p = c.plan()
    assert placed(p) == {"g": [("gpu1", (0,))], "cpu1": [("head", ())],
                         "cpu2": [("head", ())],
                         "cpu3": [("head", ()), ("gpu1", ()), ("gpu2", ())]}
    assert p.placements[1].reason.startswith("placed on head (no GPU): CPU only")
    c.start(p.placements)
    c.submit("g2", gpus_per_node=1)
    assert placed(c.plan()) == {"g2": [("gpu2", (0,))]}


# ---- limits and sweeps -----------------------------------------------------------------


def test_user_gpu_limit() -> None:
    c = seeds()
    limits = {"bob": UserLimits(max_gpus=2)}
    c.submit("b1", user="bob", gpus_per_node=1)
    c.submit("b2", user="bob", gpus_per_node=1)
    c.submit("b3", user="bob", gpus_per_node=1)
    c.submit("a1", user="alice", gpus_per_node=1)
    p = c.plan(user_limits=limits)
    assert set(placed(p)) == {"b1", "b2", "a1"}
    assert p.waiting["b3"] == "user bob at limit: 2 of 2 GPUs running, needs 1"
    c.start(p.placements)
    c.submit("b4", user="bob", nodes=3, gpus_per_node=1)
    assert c.plan(user_limits=limits).waiting["b4"] == "needs 3 GPUs; user bob may run at most 2"


def test_user_job_limit_and_default_limits() -> None:
    c = Cluster(gpu_node("head"))
    for j in ("a", "b", "c"):
        c.submit(j, user="carol")
    p = c.plan(user_limits={"*": UserLimits(max_jobs=2)})
    assert set(placed(p)) == {"a", "b"}
    assert p.waiting["c"] == "user carol at limit: 2 of 2 jobs running"
    assert len(c.plan(user_limits={"carol": UserLimits(max_jobs=5)}).placements) == 3


def test_sweep_max_parallel() -> None:
    c = Cluster(gpu_node("big", 8, 8, 8, 8))
    trials = [f"s-{i}" for i in range(4)]
    for j in trials:
        c.submit(j, gpus_per_node=1, sweep="s")
    c.put(ev.SweepCreated(sweep="s", jobs=tuple(trials), params={"lr": ("1", "2", "3", "4")},
                          max_parallel=2))
    p = c.round()
    assert list(placed(p)) == ["s-0", "s-1"]
    assert p.waiting["s-2"] == "sweep s at its limit: 2 of 2 trials running"
    c.end("s-0")
    assert list(placed(c.plan())) == ["s-2"]


# ---- backfill, reservations, estimates ---------------------------------------------------


def busy_seeds() -> Cluster:
    """gpu1 runs 'long' until 14:20; the head 'gang' wants all three nodes."""
    c = seeds()
    c.submit("long", gpus_per_node=1, node_names=("gpu1",), expected_runtime_s=1200)
    c.round()
    c.submit("gang", nodes=3, gpus_per_node=1)
    return c


def test_head_gets_a_reservation_and_an_estimate() -> None:
    c = busy_seeds()
    p = c.plan()
    assert p.waiting["gang"] == ("waiting for 3 nodes with a GPU: only gpu-master and gpu2 "
                                 "free; gpu1 busy with long until about 14:20 UTC")
    assert p.estimates == {"gang": T0 + 1200}
    res = p.reservations["gang"]
    assert res.at == T0 + 1200
    assert res.gpus == (("gpu-master", 0), ("gpu1", 0), ("gpu2", 0))


def test_short_job_backfills_before_the_reservation_long_or_unknown_ones_wait() -> None:
    c = busy_seeds()
    c.submit("unknown", gpus_per_node=1)
    c.submit("too-long", gpus_per_node=1, expected_runtime_s=1201)
    c.submit("short", gpus_per_node=1, expected_runtime_s=1200)
    p = c.plan()
    assert list(placed(p)) == ["short"]
    assert p.placements[0].reason == (
        "placed on gpu2 (GPU 0, 8 GB): smallest GPUs that fit; backfilled: expected to end "
        "by 14:20 UTC, before gang needs its GPUs; priority 0, 4th in the queue")
    assert "gpu2 kept for gang" in p.waiting["unknown"]
    assert "too-long" in p.waiting


def test_no_backfill_keeps_strict_order() -> None:
    c = busy_seeds()
    c.submit("short", gpus_per_node=1, expected_runtime_s=60)
    p = c.plan(backfill=False)
    assert p.placements == ()
    assert p.waiting["short"] == "queued behind gang (backfill is off)"
    assert p.estimates == {"gang": T0 + 1200}


def test_unknown_end_reserves_the_gpus_indefinitely() -> None:
    c = seeds()
    c.submit("forever", gpus_per_node=1, node_names=("gpu1",))
    c.round()
    c.submit("gang", nodes=3, gpus_per_node=1)
    c.submit("short", gpus_per_node=1, expected_runtime_s=1)
    p = c.plan()
    assert p.placements == ()
    assert p.reservations["gang"].at is None
    assert "gang" not in p.estimates
    assert p.waiting["gang"].endswith("; the GPUs it waits for are kept for it")
    # GPUs outside the reservation stay usable
    c2 = Cluster(*[gpu_node(n, 8) for n in ("a", "b", "c")])
    c2.submit("forever", gpus_per_node=1, node_names=("a",))
    c2.round()
    c2.submit("pair", nodes=2, gpus_per_node=1, node_names=("a", "b"))
    c2.submit("short", gpus_per_node=1)
    p2 = c2.plan()
    assert p2.reservations["pair"].gpus == (("a", 0), ("b", 0))
    assert placed(p2) == {"short": [("c", (0,))]}
    assert "backfilled on GPUs not kept for pair" in p2.placements[0].reason


def test_user_limit_is_kept_for_a_reserved_job() -> None:
    c = seeds()
    limits = {"bob": UserLimits(max_gpus=3)}
    c.submit("long", gpus_per_node=1, node_names=("gpu1",), expected_runtime_s=1200)
    c.round()
    c.submit("gang", user="bob", nodes=3, gpus_per_node=1)
    c.submit("bob-long", user="bob", gpus_per_node=1, expected_runtime_s=5000)
    c.submit("bob-short", user="bob", gpus_per_node=1, expected_runtime_s=600)
    p = c.plan(user_limits=limits)
    assert list(placed(p)) == ["bob-short"]
    assert p.waiting["bob-long"] == ("user bob at limit: 0 of 3 GPUs running, needs 1 "
                                     "(counting gang, which will start first)")


def test_estimates_use_the_median_of_past_runs() -> None:
    c = Cluster(gpu_node("solo", 8))
    for i, secs in enumerate((100, 300, 200)):
        c.submit(f"past{i}", gpus_per_node=1)
        c.round()
        c.now += secs
        c.end(f"past{i}")
    assert typical_runtimes(c.state) == {("alice", ("python", "train.py")): 200}
    start = c.now
    c.submit("now", gpus_per_node=1)
    c.round()
    c.submit("next", gpus_per_node=1)
    c.submit("other-user", user="bob", gpus_per_node=1)
    p = c.plan()
    # 'next' should run 200 s like alice's past runs; bob's run time is unknown
    assert p.estimates == {"next": start + 200, "other-user": start + 400}
    assert p.waiting["next"] == "waiting for a GPU: solo busy with now until about 14:13 UTC"
    c.now = start + 500  # overran: the reason keeps its words, the estimate moves to now
    p = c.plan()
    assert p.waiting["next"] == ("waiting for a GPU: solo busy with now (expected to end by "
                                 "14:13 UTC)")
    assert p.estimates == {"next": c.now, "other-user": c.now + 200}


def test_reasons_name_tomorrow_by_date() -> None:
    c = Cluster(gpu_node("solo", 8))
    c.submit("a", gpus_per_node=1, expected_runtime_s=86400)
    c.round()
    c.submit("b", gpus_per_node=1)
    assert c.plan().waiting["b"] == ("waiting for a GPU: solo busy with a until about "
                                     "2026-11-23 14:00 UTC")


# ---- check_fits --------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "why"), [
    (dict(gpus_per_node=1, min_vram_bytes=10 * GB), None),
    (dict(nodes=3, gpus_per_node=1, min_vram_bytes=8 * GB), None),
    (dict(nodes=3, gpus_per_node=1, min_vram_bytes=10 * GB),
     "needs 3 nodes with a GPU ≥ 10 GB; only gpu-master has one"),
    (dict(gpus_per_node=1, min_vram_bytes=16 * GB), "needs a GPU ≥ 16 GB; no node has one"),
    (dict(gpus_per_node=2), "needs 2 GPUs on one node; no node has them"),
    (dict(node_names=("gpu9",)), "needs node gpu9, which is not in the cluster"),
    (dict(node_names=("gpu8", "gpu9")), "needs nodes gpu8 and gpu9, which are not in the cluster"),
    (dict(nodes=2, node_names=("gpu1",)), "needs 2 nodes but names only 1: gpu1"),
    (dict(nodes=4), "needs 4 nodes; only gpu-master, gpu1 and gpu2 qualify"),
    (dict(labels_required=("ib",)), "needs a node labelled ib; no node qualifies"),
    (dict(nodes=0), "a job needs at least 1 node"),
])
def test_check_fits(spec: dict[str, Any], why: str | None) -> None:
    c = seeds()
    c.put(ev.NodeDrained(node="gpu1"))  # load, health and drains are ignored
    assert check_fits(c.state, ev.JobSpec(argv=("x",), **spec)) == why


def test_check_fits_on_an_empty_cluster() -> None:
    assert check_fits(State(), ev.JobSpec(argv=("x",))) == "the cluster has no nodes"


# ---- purity ------------------------------------------------------------------------------


def test_same_input_same_output_and_state_untouched() -> None:
    c = busy_seeds()
    c.submit("short", gpus_per_node=1, expected_runtime_s=60)
    before = c.state
    snapshot = {k: msgspec.json.encode(v) for k, v in before.jobs.items()}
    a, b = c.plan(), c.plan()
    assert a == b
    assert c.state is before and before.seq == c.state.seq
    assert {k: msgspec.json.encode(v) for k, v in before.jobs.items()} == snapshot


SCRIPT = """
import sys, msgspec
sys.path[:0] = [{root!r}, {here!r}]
from test_planner import busy_seeds
c = busy_seeds()
for i in range(30):
    c.submit(f"j{{i}}", gpus_per_node=1, expected_runtime_s=float(i * 60), priority=i % 3)
sys.stdout.write(msgspec.json.encode(c.plan()).decode())
"""


def test_plan_does_not_depend_on_hash_seed() -> None:
    out = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        script = SCRIPT.format(root=str(ROOT), here=str(Path(__file__).parent))
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, check=True, timeout=60)
        out.add(r.stdout)
    assert len(out) == 1
    assert json.loads(out.pop())["placements"]


# ---- properties over random clusters and queues ---------------------------------------------

VRAMS = st.sampled_from([0, 8 * GB, 12 * GB, 16 * GB, 24 * GB])
LABELS = st.lists(st.sampled_from(["ib", "nvme"]), unique=True, max_size=2).map(tuple)


@st.composite
def node_specs(draw: st.DrawFn) -> list[ev.NodeSpec]:
    n = draw(st.integers(1, 6))
    ranks = draw(st.permutations(range(n)))
    specs = []
    for i in range(n):
        gpus = draw(st.lists(VRAMS, min_size=draw(st.sampled_from([0, 1, 1, 2])), max_size=4))
        specs.append(ev.NodeSpec(
            name=f"n{i}", host=f"10.0.0.{i}", labels=draw(LABELS),
            rank=ranks[i] if draw(st.booleans()) else None,
            gpus=tuple(ev.Gpu(index=k, vram_bytes=v, uuid=f"u{i}-{k}")
                       for k, v in enumerate(gpus))))
    return specs


@st.composite
def job_specs(draw: st.DrawFn, names: list[str]) -> ev.JobSpec:
    return ev.JobSpec(
        argv=("train.py",),
        nodes=draw(st.sampled_from([1, 1, 1, 2, 2, 3])),
        gpus_per_node=draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3])),
        min_vram_bytes=draw(st.sampled_from([0, 0, 8 * GB, 10 * GB, 16 * GB])),
        labels_required=draw(st.sampled_from([(), ("ib",)])),
        labels_avoided=draw(st.sampled_from([(), ("nvme",)])),
        node_names=draw(st.sampled_from([(), tuple(names[:2]), tuple(names[-2:])])),
        expected_runtime_s=draw(st.sampled_from([None, 60.0, 600.0, 600.0, 3600.0])),
        max_retries=2,
    )


@st.composite
def busy_clusters(draw: st.DrawFn) -> tuple[Cluster, dict[str, UserLimits]]:
    """A random cluster after a few rounds of real placements, ends, drains and new jobs."""
    nodes = draw(node_specs())
    c = Cluster(*nodes)
    names = [n.name for n in nodes]
    users = ["alice", "bob"]
    limits = draw(st.sampled_from([{}, {"bob": UserLimits(max_gpus=3, max_jobs=2)}]))
    count = 0
    for _ in range(draw(st.integers(1, 4))):
        for _ in range(draw(st.integers(0, 8))):
            count += 1
            c.submit(f"j{count}", user=draw(st.sampled_from(users)),
                     priority=draw(st.integers(0, 2)), held=draw(st.integers(0, 9)) == 0,
                     **msgspec.structs.asdict(draw(job_specs(names))))
        for name in names:
            event = draw(st.sampled_from([None] * 8 + ["drain", "sick", "fine"]))
            if event == "drain":
                c.put(ev.NodeDrained(node=name))
            elif event == "sick":
                c.put(ev.NodeHealthChanged(node=name, health="unhealthy"))
            elif event == "fine":
                c.put(ev.NodeHealthChanged(node=name, health="healthy"))
                if c.state.nodes[name].drained:
                    c.put(ev.NodeUndrained(node=name))
        p = c.plan(user_limits=limits)
        check_round(c.state, p, limits)
        c.start(p.placements)
        c.now += draw(st.sampled_from([0.0, 30.0, 700.0]))
        for job in list(c.state.active_jobs()):
            if job.state in ACTIVE:
                outcome = draw(st.sampled_from([None, None, "succeeded", "failed", "retrying"]))
                if outcome is not None:
                    node = job.placement[0].node
                    c.end(job.id, outcome, failed_node=node if outcome != "succeeded" else None,
                          retry_at=c.now + 10 if outcome == "retrying" else None)
    for _ in range(draw(st.integers(0, 10))):  # a fresh burst, planned on a busy cluster
        count += 1
        c.submit(f"j{count}", user=draw(st.sampled_from(users)),
                 priority=draw(st.integers(0, 2)), **msgspec.structs.asdict(draw(job_specs(names))))
    return c, limits


@st.composite
def contended_clusters(draw: st.DrawFn) -> tuple[Cluster, dict[str, UserLimits]]:
    """A cluster mostly full of running jobs, then a queue of bigger and smaller jobs."""
    n = draw(st.integers(2, 5))
    c = Cluster(*[gpu_node(f"n{i}", *draw(st.lists(st.sampled_from([8, 12, 24]), min_size=1,
                                                              max_size=4)))
                  for i in range(n)])
    limits = draw(st.sampled_from([{}, {}, {"bob": UserLimits(max_gpus=4, max_jobs=3)}]))
    users = st.sampled_from(["alice", "bob"])
    runtimes = st.sampled_from([None, 60.0, 300.0, 600.0, 1200.0, 3600.0])
    for i in range(draw(st.integers(1, 8))):
        c.submit(f"run{i}", user=draw(users), gpus_per_node=draw(st.integers(1, 2)),
                 expected_runtime_s=draw(runtimes))
    c.start(c.plan(user_limits=limits).placements)
    c.now += draw(st.sampled_from([0.0, 100.0]))
    for i in range(draw(st.integers(1, 10))):
        c.submit(f"q{i}", user=draw(users), priority=draw(st.integers(0, 1)),
                 nodes=draw(st.integers(1, 3)), gpus_per_node=draw(st.integers(1, 3)),
                 min_vram_bytes=draw(st.sampled_from([0, 10 * GB])),
                 expected_runtime_s=draw(runtimes))
    return c, limits


def check_round(state: State, p: Plan, limits: dict[str, UserLimits]) -> State:
    """Every placement is legal and whole, and applying them all is accepted by the reducer."""
    taken = set(state.allocations())
    for x in p.placements:
        job = state.jobs[x.job]
        assert job.state in (JobState.QUEUED, JobState.RETRYING) and not job.held
        assert x.attempt == job.attempt + 1
        spec = job.spec
        assert len(x.ranks) == spec.nodes  # the whole gang
        assert sorted(r.rank for r in x.ranks) == list(range(spec.nodes))
        assert len({r.node for r in x.ranks}) == spec.nodes
        for r in x.ranks:
            node = state.nodes[r.node]
            assert node.schedulable
            assert set(spec.labels_required) <= set(node.spec.labels)
            assert not set(spec.labels_avoided) & set(node.spec.labels)
            assert not spec.node_names or r.node in spec.node_names
            assert len(r.gpus) == spec.gpus_per_node
            vram = {g.index: g.vram_bytes for g in node.gpus}
            for g in r.gpus:
                assert vram[g] >= spec.min_vram_bytes
                assert (r.node, g) not in taken, f"GPU {g} on {r.node} double-booked"
                taken.add((r.node, g))
        assert x.rdzv_host == state.nodes[x.ranks[0].node].spec.host
    for user, lim in limits.items():
        mine = [j for j in state.active_jobs() if j.owner == user and j.state in ACTIVE]
        new = [state.jobs[x.job] for x in p.placements if state.jobs[x.job].owner == user]
        if lim.max_jobs is not None:
            assert len(mine) + len(new) <= max(lim.max_jobs, len(mine))
        if lim.max_gpus is not None:
            used = sum(j.gpu_count for j in mine)
            assert used + sum(j.spec.nodes * j.spec.gpus_per_node for j in new) <= max(
                lim.max_gpus, used)
    for x in p.placements:  # the reducer refuses any over-commit
        state = apply(state, ev.Record(seq=state.seq + 1, ts=0.0, actor=ev.DAEMON, event=x))
    return state


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(busy_clusters(), contended_clusters()))
def test_no_gpu_double_booked_and_gangs_whole(case: tuple[Cluster, dict[str, UserLimits]]) -> None:
    c, limits = case
    for backfill in (True, False):
        check_round(c.state, c.plan(user_limits=limits, backfill=backfill), limits)


def run_time(state: State, job: Job) -> float | None:
    """What the planner believes: the spec's run time, else the median of past runs."""
    if job.spec.expected_runtime_s is not None:
        return job.spec.expected_runtime_s
    return typical_runtimes(state).get((job.owner, job.spec.argv))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(busy_clusters(), contended_clusters()))
def test_backfill_never_delays_the_head(case: tuple[Cluster, dict[str, UserLimits]]) -> None:
    c, limits = case
    strict = c.plan(user_limits=limits, backfill=False)
    if not strict.reservations:
        event("no reservation")
        return
    (head,) = strict.reservations
    t0 = strict.reservations[head].at
    full = c.plan(user_limits=limits)
    assert full.placements[:len(strict.placements)] == strict.placements
    assert full.reservations[head] == strict.reservations[head]
    backfilled = [x for x in full.placements if x not in strict.placements]
    event(f"head at {'known' if t0 is not None else 'unknown'} time, "
          f"{'some' if backfilled else 'no'} backfill")
    kept = set(strict.reservations[head].gpus)
    for x in backfilled:
        job = c.state.jobs[x.job]
        used = {(r.node, g) for r in x.ranks for g in r.gpus}
        if used & kept:  # on the head's GPUs only if it is known to end before the head starts
            rt = run_time(c.state, job)
            assert t0 is not None and rt is not None
            assert c.now + rt <= t0
    # start the backfilled jobs for real: the head must not start any later
    after = Cluster()
    after.state, after.now = c.state, c.now
    after.start(full.placements)
    again = after.plan(user_limits=limits)
    if head in placed(again):
        return
    if head in again.reservations:
        t1 = again.reservations[head].at
        assert t0 is None or (t1 is not None and t1 <= t0)
        return
    # Only the owner's limit can stop it now, and only with jobs that end before it starts:
    # what is still running at t0, plus the head, fits the limit.
    assert "at limit" in again.waiting[head]
    owner, lim = c.state.jobs[head].owner, limits[c.state.jobs[head].owner]
    spec = c.state.jobs[head].spec
    jobs, gpus = 1, spec.nodes * spec.gpus_per_node
    for job in after.state.active_jobs():
        if job.owner == owner and job.state in ACTIVE:
            rt = run_time(c.state, job)
            if t0 is None or rt is None or c.now + rt > t0:
                jobs, gpus = jobs + 1, gpus + job.gpu_count
    assert lim.max_jobs is None or jobs <= lim.max_jobs
    assert lim.max_gpus is None or gpus <= lim.max_gpus


@settings(max_examples=EXAMPLES, deadline=None)
@given(node_specs(), st.data())
def test_a_job_on_an_idle_cluster_is_placed_iff_it_fits(nodes: list[ev.NodeSpec],
                                                        data: st.DataObject) -> None:
    c = Cluster(*nodes)
    spec = data.draw(job_specs([n.name for n in nodes]))
    c.submit("j", **msgspec.structs.asdict(spec))
    p = c.plan()
    fits = check_fits(c.state, spec)
    assert (len(p.placements) == 1) == (fits is None), (fits, p.waiting)
    if fits is not None:
        assert fits in p.waiting["j"]


@settings(max_examples=EXAMPLES * 2 // 3, deadline=None)
@given(node_specs(), st.data())
def test_first_fitting_job_in_the_queue_starts_on_an_idle_cluster(
        nodes: list[ev.NodeSpec], data: st.DataObject) -> None:
    c = Cluster(*nodes)
    names = [n.name for n in nodes]
    specs = data.draw(st.lists(job_specs(names), min_size=1, max_size=6))
    for i, spec in enumerate(specs):
        c.submit(f"j{i}", priority=data.draw(st.integers(0, 2)),
                 **msgspec.structs.asdict(spec))
    p = c.plan()
    first = next((j for j in p.order if check_fits(c.state, c.state.jobs[j].spec) is None), None)
    assert (first is None) == (not p.placements)
    if first is not None:
        assert p.placements[0].job == first
    check_round(c.state, p, {})


@settings(max_examples=EXAMPLES // 3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(busy_clusters())
def test_planning_is_pure(case: tuple[Cluster, dict[str, UserLimits]]) -> None:
    c, limits = case
    before = c.state
    jobs = {k: msgspec.json.encode(v) for k, v in before.jobs.items()}
    nodes = {k: msgspec.json.encode(v) for k, v in before.nodes.items()}
    a = c.plan(user_limits=limits)
    assert a == c.plan(user_limits=limits)
    assert {k: msgspec.json.encode(v) for k, v in before.jobs.items()} == jobs
    assert {k: msgspec.json.encode(v) for k, v in before.nodes.items()} == nodes
    # every waiting job is either placed or has a reason
    assert set(a.order) == set(a.waiting) | {x.job for x in a.placements}
    assert not set(a.waiting) & {x.job for x in a.placements}


# ---- VRAM as people say it, and retries that avoid the failed node ------------------------


def test_min_vram_12_takes_a_12_gb_card_that_reports_12282_mib() -> None:
    mib = 1 << 20
    c = Cluster(gpu_node("gpu-master", 12282 * mib / GB), gpu_node("gpu1", 8188 * mib / GB),
                gpu_node("gpu2", 8192 * mib / GB))
    assert check_fits(c.state, ev.JobSpec(argv=("t",), gpus_per_node=1,
                                          min_vram_bytes=12 * GB)) is None
    c.submit("j", gpus_per_node=1, min_vram_bytes=12 * GB)
    (p,) = c.plan().placements
    assert [(r.node, r.gpus) for r in p.ranks] == [("gpu-master", (0,))]
    assert "GPU 0, 12 GB" in p.reason
    c.submit("big", gpus_per_node=1, min_vram_bytes=16 * GB)
    assert check_fits(c.state, c.state.jobs["big"].spec) == \
        "needs a GPU ≥ 16 GB; no node has one"


def test_retry_avoids_the_failed_node_even_when_it_has_the_smallest_card() -> None:
    c = Cluster(gpu_node("big", 24), gpu_node("small", 8))
    c.submit("j", gpus_per_node=1, max_retries=2)
    c.round()
    assert c.where("j") == [("small", (0,))]  # smallest GPU that fits
    c.end("j", "retrying", failed_node="small", exit_code=1, retry_at=T0 + 10)
    c.now = T0 + 10
    (p,) = c.plan().placements
    assert [r.node for r in p.ranks] == ["big"]
    assert "avoiding small, where it failed before" in p.reason


def test_unreachable_node_is_named_with_its_reason_in_the_waiting_reason() -> None:
    c = seeds()
    c.put(ev.NodeHealthChanged(node="gpu2", health="unreachable",
                               reason="host key for 10.0.0.3:22 is not in ~/.ssh/known_hosts; "
                                      "run `ugroctl nodes trust gpu2`"))
    c.submit("j", gpus_per_node=1, nodes=3)
    p = c.plan()
    assert p.placements == ()
    assert p.waiting["j"] == (
        "waiting for 3 nodes with a GPU: only gpu-master and gpu1 free; gpu2 is unreachable "
        "(host key for 10.0.0.3:22 is not in ~/.ssh/known_hosts; run `ugroctl nodes trust "
        "gpu2`)")


def test_nodes_not_reached_yet_make_a_job_wait_not_never_run() -> None:
    c = Cluster(gpu_node("gpu-master", 12), ev.NodeSpec(name="gpu1", host="gpu1.lan"))
    c.put(ev.NodeHealthChanged(node="gpu1", health="unreachable", reason="connection refused"))
    c.submit("j", gpus_per_node=1, nodes=2)
    assert c.plan().waiting["j"] == (
        "waiting for 2 nodes with a GPU: gpu1 is unreachable (connection refused) (a node's "
        "GPUs are known once ugrod reaches it)")
    c.put(ev.NodeInventoried(node="gpu1", gpus=()))  # reached: it has none
    assert c.plan().waiting["j"] == ("cannot run on this cluster as configured: needs 2 nodes "
                                     "with a GPU; only gpu-master has one")
