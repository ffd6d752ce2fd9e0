"""The reducer: transitions as tables, and replay properties over random command sequences."""

from __future__ import annotations

import copy

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core.state import (
    InvalidEvent,
    JobState,
    NodeState,
    State,
    apply,
    from_snapshot,
    replay,
    to_snapshot,
)

ALICE = ev.Actor(user="alice", uid=1000)
GB = 1 << 30


def node(name: str, *vram_gb: int) -> ev.NodeAdded:
    return ev.NodeAdded(node=ev.NodeSpec(name=name, host="10.0.0.1", gpus=tuple(
        ev.Gpu(index=i, vram_bytes=v * GB) for i, v in enumerate(vram_gb))))


def fold(*events: ev.Event, state: State | None = None, actor: ev.Actor = ALICE) -> State:
    s = state or State()
    for e in events:
        s = apply(s, ev.Record(seq=s.seq + 1, ts=1000.0 + s.seq, actor=actor, event=e))
    return s


def submit(job: str, nodes: int = 1, gpus: int = 1, **kw: object) -> ev.JobSubmitted:
    return ev.JobSubmitted(job=job, spec=ev.JobSpec(argv=("python3", "t.py"), nodes=nodes,
                                                    gpus_per_node=gpus), **kw)  # type: ignore[arg-type]


def place(job: str, attempt: int = 1, *ranks: tuple[str, tuple[int, ...]]) -> ev.JobPlaced:
    return ev.JobPlaced(job=job, attempt=attempt, ranks=tuple(
        ev.RankPlacement(rank=i, node=n, gpus=g) for i, (n, g) in enumerate(ranks)))


BASE = fold(node("a", 12), node("b", 8))


def test_lifecycle_to_success() -> None:
    s = fold(submit("j"), place("j", 1, ("a", (0,))),
             ev.RankStarted(job="j", attempt=1, rank=0, node="a", pid=42),
             ev.JobRunning(job="j", attempt=1), state=BASE)
    assert s.jobs["j"].state is JobState.RUNNING
    assert s.allocations() == {("a", 0): "j"}
    s = fold(ev.RankExited(job="j", attempt=1, rank=0, node="a", exit_code=0),
             ev.JobEnded(job="j", attempt=1, outcome="succeeded", exit_code=0), state=s)
    job = s.jobs["j"]
    assert (job.state, job.exit_code, job.owner, job.uid) == (JobState.SUCCEEDED, 0, "alice", 1000)
    assert s.allocations() == {} and "j" not in s.active


def test_gpus_held_while_stopping_released_at_end() -> None:
    s = fold(submit("j"), place("j", 1, ("a", (0,))), ev.JobRunning(job="j", attempt=1),
             ev.JobStopping(job="j", attempt=1, outcome="cancelled", reason="by alice"),
             state=BASE)
    assert s.jobs["j"].stopping == "cancelled"
    assert s.allocations() == {("a", 0): "j"}
    s = fold(ev.JobEnded(job="j", attempt=1, outcome="cancelled"), state=s)
    assert s.jobs["j"].state is JobState.CANCELLED and s.allocations() == {}


@pytest.mark.parametrize(("events", "message"), [
    ((submit("j"), submit("j")), "already exists"),
    ((ev.JobRunning(job="nope", attempt=1),), "no job named 'nope'"),
    ((submit("j"), ev.JobRunning(job="j", attempt=1)), "is queued: cannot be marked running"),
    ((submit("j"), place("j", 2, ("a", (0,)))), "attempt 2"),
    ((submit("j"), place("j", 1, ("a", (5,)))), "has no GPU 5"),
    ((submit("j"), place("j", 1, ("zz", (0,)))), "no node named 'zz'"),
    ((submit("j", nodes=2), place("j", 1, ("a", (0,)))), "needs 2 nodes"),
    ((submit("j", nodes=2), place("j", 1, ("a", (0,)), ("a", (0,)))), "two ranks on one node"),
    ((submit("j"), submit("k"), place("j", 1, ("a", (0,))), place("k", 1, ("a", (0,)))),
     "held by j"),
    ((submit("j", held=True), place("j", 1, ("a", (0,)))), "is held"),
    ((submit("j"), ev.JobCancelRequested(job="j"), ev.JobResumed(
        job="j", spec=ev.JobSpec(argv=("x",))), ev.JobHeld(job="j"),
      ev.JobCancelRequested(job="j"), ev.JobCancelRequested(job="j")), "is cancelled"),
    ((submit("j"), ev.JobEnded(job="j", attempt=0, outcome="failed")), "is queued"),
    ((ev.NodeRemoved(node="zz"),), "no node named"),
    ((node("a", 1),), "already exists"),
])
def test_illegal_transitions_are_rejected(events: tuple[ev.Event, ...], message: str) -> None:
    s = BASE
    with pytest.raises(InvalidEvent, match=message):
        for e in events:
            s = fold(e, state=s)


def test_rejected_event_leaves_state_unchanged_and_input_is_never_mutated() -> None:
    s = fold(submit("j"), state=BASE)
    before = copy.deepcopy(to_snapshot(s))
    with pytest.raises(InvalidEvent):
        fold(ev.JobRunning(job="j", attempt=1), state=s)
    fold(place("j", 1, ("a", (0,))), state=s)  # succeeds, but on a new state
    assert to_snapshot(s) == before
    assert s.jobs["j"].state is JobState.QUEUED


def test_seq_must_follow() -> None:
    with pytest.raises(InvalidEvent, match="does not follow"):
        apply(BASE, ev.Record(seq=BASE.seq + 2, ts=0.0, actor=ALICE, event=submit("j")))


def test_node_removal_refused_while_it_runs_a_job() -> None:
    s = fold(submit("j"), place("j", 1, ("b", (0,))), state=BASE)
    with pytest.raises(InvalidEvent, match="node b runs j"):
        fold(ev.NodeRemoved(node="b"), state=s)
    s = fold(ev.NodeRemoved(node="a"), state=s)
    assert "a" not in s.nodes


def test_drain_shows_as_state_and_undrain_restores_health() -> None:
    s = fold(ev.NodeHealthChanged(node="a", health="degraded", score=70.0),
             ev.NodeDrained(node="a", reason="maintenance"), state=BASE)
    assert s.nodes["a"].state is NodeState.DRAINING and not s.nodes["a"].schedulable
    s = fold(ev.NodeUndrained(node="a"), state=s)
    assert s.nodes["a"].state is NodeState.DEGRADED and s.nodes["a"].schedulable


def test_retry_budget_counts_progress_not_attempts() -> None:
    s = fold(submit("j"), state=BASE)
    for attempt, (step, progress) in enumerate([(100, True), (100, False), (250, True)], 1):
        s = fold(place("j", attempt, ("a", (0,))), ev.JobRunning(job="j", attempt=attempt),
                 ev.JobEnded(job="j", attempt=attempt, outcome="retrying", last_step=step,
                             made_progress=progress, retry_at=5000.0), state=s)
    job = s.jobs["j"]
    assert (job.failures, job.no_progress_failures, job.best_step) == (3, 0, 250)
    assert job.state is JobState.RETRYING and job.retry_at == 5000.0


# ---- properties over random command sequences --------------------------------

def _events_for(draw_ops: list[tuple[str, int]]) -> list[ev.Event]:
    """Turn abstract ops into events that are valid in order (invalid ones are dropped)."""
    return [_op(op, i) for op, i in draw_ops]


def _op(op: str, i: int) -> ev.Event:
    job = f"j{i % 6}"
    match op:
        case "submit":
            return submit(job, gpus=i % 2)
        case "place":
            return place(job, 0, ("a" if i % 2 else "b", (0,) if i % 3 else ()))
        case "run":
            return ev.JobRunning(job=job, attempt=0)
        case "end":
            return ev.JobEnded(job=job, attempt=0, outcome=("succeeded", "failed", "retrying",
                                                            "cancelled")[i % 4],
                               last_step=i, made_progress=bool(i % 2), retry_at=float(i))
        case "cancel":
            return ev.JobCancelRequested(job=job)
        case "hold":
            return ev.JobHeld(job=job)
        case "release":
            return ev.JobReleased(job=job)
        case "drain":
            return ev.NodeDrained(node="ab"[i % 2])
        case "health":
            return ev.NodeHealthChanged(node="ab"[i % 2], health=("healthy", "unhealthy")[i % 2])
        case _:
            return ev.JobResumed(job=job, spec=ev.JobSpec(argv=("x", str(i))))


OPS = st.lists(st.tuples(st.sampled_from(
    ["submit", "place", "run", "end", "cancel", "hold", "release", "drain", "health", "resume"]),
    st.integers(0, 50)), max_size=60)


def _live(ops: list[tuple[str, int]]) -> tuple[State, list[ev.Record]]:
    """Run ops as a daemon would: apply, keep what is accepted (with its attempt fixed up)."""
    s = BASE
    records: list[ev.Record] = []
    for e in _events_for(ops):
        if hasattr(e, "attempt"):
            job = s.jobs.get(e.job)  # type: ignore[attr-defined]
            if job is None:
                continue
            want = job.attempt + 1 if isinstance(e, ev.JobPlaced) else job.attempt
            e = msgspec.structs.replace(e, attempt=want)  # type: ignore[type-var]
        r = ev.Record(seq=s.seq + 1, ts=codec.parse_ts(codec.format_ts(2e9 + s.seq * 1.5)),
                      actor=ALICE, event=e)
        try:
            s = apply(s, r)
        except InvalidEvent:
            continue
        records.append(r)
    return s, records


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(0, 60))
def test_live_equals_replay_equals_snapshot_plus_tail(ops: list[tuple[str, int]],
                                                      cut: int) -> None:
    live, records = _live(ops)
    lines = [codec.encode(r) for r in records]
    replayed = replay(BASE, (codec.decode(line) for line in lines))
    assert replayed == live
    assert to_snapshot(replayed) == to_snapshot(live)  # byte for byte
    cut = min(cut, len(lines))
    head = replay(BASE, (codec.decode(line) for line in lines[:cut]))
    resumed = replay(from_snapshot(to_snapshot(head)), (codec.decode(ln) for ln in lines[cut:]))
    assert resumed == live


@settings(max_examples=100, deadline=None)
@given(OPS)
def test_gpus_never_double_booked(ops: list[tuple[str, int]]) -> None:
    s, _ = _live(ops)
    seen: dict[tuple[str, int], str] = {}
    for job_id in s.active:
        job = s.jobs[job_id]
        if job.state in (JobState.STARTING, JobState.RUNNING):
            for p in job.placement:
                for g in p.gpus:
                    assert (p.node, g) not in seen
                    seen[(p.node, g)] = job_id


def test_snapshot_rebuilds_indexes_and_a_reused_request_id_goes_to_the_later_job() -> None:
    s = fold(node("n1", 8, 8), submit("a", request_id="r1"), submit("b", request_id="r1"),
             submit("c", request_id="r2"), place("c", 1, ("n1", (1,))),
             ev.JobCancelRequested(job="a"))
    assert s.requests["r1"] == "b"  # apply: the later submit's
    back = from_snapshot(to_snapshot(s))
    assert back == s
    assert dict(back.requests) == {"r1": "b", "r2": "c"}
    assert dict(back.gpus_held) == {("n1", 1): "c"} and back.n_running == 1
    assert set(back.active) == {"b", "c"}


def test_a_log_written_under_the_old_name_rule_still_replays() -> None:
    """Before the one naming rule the API accepted ``a..b``; such a log must replay (the
    job could never start), while every way in refuses the name now."""
    from ugrod.core.names import valid_name

    s = fold(node("n1", 8), submit("a..b"), ev.JobCancelRequested(job="a..b"))
    assert s.jobs["a..b"].state is JobState.CANCELLED
    assert not valid_name("a..b")
    with pytest.raises(InvalidEvent):
        fold(submit("../x"))
    with pytest.raises(InvalidEvent):
        fold(submit("a" * 65))
