"""Fencing and node loss as pure decisions (ugrod/core/fencing.py, ugrod/core/node_loss.py),
the events they record, and how progress is read back after a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ugrod.core import events as ev
from ugrod.core import fencing as fc
from ugrod.core import node_loss
from ugrod.core.fencing import RunDir
from ugrod.core.state import MAX_FENCED, JobState, NodeState, State, apply
from ugrod.core.why import explain
from ugrod.loops import node_progress

ALICE = ev.Actor(user="alice", uid=1000)


def fold(*events: ev.Event, state: State | None = None) -> State:
    s = state or State()
    for e in events:
        s = apply(s, ev.Record(seq=s.seq + 1, ts=1000.0 + s.seq, actor=ALICE, event=e))
    return s


def placed(*nodes: str) -> tuple[ev.RankPlacement, ...]:
    return tuple(ev.RankPlacement(rank=i, node=n, gpus=(0,)) for i, n in enumerate(nodes))


BASE = fold(*(ev.NodeAdded(node=ev.NodeSpec(name=n, host="10.0.0.1", gpus=(ev.Gpu(index=0),)))
              for n in ("a", "b")),
            ev.JobSubmitted(job="j", spec=ev.JobSpec(argv=("t",), nodes=2, gpus_per_node=1)),
            ev.JobPlaced(job="j", attempt=1, ranks=placed("a", "b")))


# ---- what may run ------------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "confirmed", "want"), [
    ((), (), {}),  # nothing was asked to start: nothing can run
    ((0, 1), (), {"a": (0,), "b": (1,)}),  # no answer from either: both may run
    ((0, 1), (0,), {"b": (1,)}),  # rank 0 confirmed (its kill was taken, or it never started)
    ((0, 1), (0, 1), {}),
    ((1,), (), {"b": (1,)}),  # rank 0's request was never sent
])
def test_may_run_is_what_was_requested_and_not_confirmed(
        requested: tuple[int, ...], confirmed: tuple[int, ...],
        want: dict[str, tuple[int, ...]]) -> None:
    assert fc.may_run(placed("a", "b"), requested, confirmed) == want


def test_a_fence_drain_is_ugrods_own_and_names_the_attempt() -> None:
    reason = fc.drain_reason("j", 3, (0, 2), "a", "its launch failed")
    assert fc.own_drain(reason) and "rank 0, 2 of j (attempt 3)" in reason
    assert fc.own_drain("ugrod watchdog: rank 1 of x ...")  # older logs' word for it
    assert not fc.own_drain("maintenance until Friday")


def test_run_dirs_are_parsed_only_under_the_jobs_dir() -> None:
    assert fc.parse_run_dir("/w/jobs/j.1/attempt-2/rank-3", "/w/jobs") == RunDir("j.1", 2, 3)
    assert fc.parse_run_dir("/w/jobs/j/attempt-2", "/w/jobs") is None
    assert fc.parse_run_dir("/w/jobs/../x/attempt-1/rank-0", "/w/jobs") is None
    assert fc.parse_run_dir("/w/other/j/attempt-1/rank-0", "/w/jobs") is None


def test_fenced_ranks_are_recorded_only_for_ended_attempts_of_known_jobs() -> None:
    ended = fold(ev.JobEnded(job="j", attempt=1, outcome="retrying", retry_at=2000.0),
                 state=BASE)
    killed = [(RunDir("j", 1, 0), 3), (RunDir("j", 1, 1), 0), (RunDir("gone", 1, 0), 2)]
    events = fc.fence_events(ended, "a", killed)
    assert events == [ev.RankFenced(job="j", attempt=1, rank=0, node="a", pids=3)]
    assert fc.fence_events(BASE, "a", killed) == []  # attempt 1 is live: never fenced


def test_a_fence_is_lifted_only_when_nothing_is_left_and_only_if_it_is_ours() -> None:
    fenced = fold(ev.NodeDrained(node="a", reason=fc.drain_reason("j", 1, (0,), "a", "x")),
                  state=BASE)
    assert fenced.nodes["a"].state is NodeState.DRAINING
    assert fc.lift(fenced, "a", still_alive=1) == []
    assert fc.lift(fenced, "a", still_alive=0) == [ev.NodeUndrained(node="a")]
    manual = fold(ev.NodeDrained(node="a", reason="maintenance"), state=BASE)
    assert fc.lift(manual, "a", still_alive=0) == []


# ---- the events ----------------------------------------------------------------------


def test_rank_fenced_is_kept_on_the_job_in_any_state_and_explained() -> None:
    s = fold(ev.JobEnded(job="j", attempt=1, outcome="failed"), state=BASE)
    fenced = ev.RankFenced(job="j", attempt=1, rank=1, node="b", pids=2)
    s = fold(*[fenced] * (MAX_FENCED + 3), state=s)
    job = s.jobs["j"]
    assert job.state is JobState.FAILED and len(job.fenced) == MAX_FENCED
    assert (job.fenced[-1].attempt, job.fenced[-1].rank, job.fenced[-1].node) == (1, 1, "b")
    text = explain(ev.Record(seq=1, ts=1000.0, actor=ev.DAEMON, event=fenced))
    assert "rank 1 of attempt 1 was found running on b" in text and "fenced" in text


def test_an_attempt_lost_to_the_cluster_keeps_the_no_progress_budget() -> None:
    s = BASE
    for attempt, fault in ((1, False), (2, True), (3, True)):
        if attempt > 1:
            s = fold(ev.JobPlaced(job="j", attempt=attempt, ranks=placed("a", "b")), state=s)
        s = fold(ev.JobEnded(job="j", attempt=attempt, outcome="retrying", retry_at=5000.0,
                             cluster_fault=fault), state=s)
    assert (s.jobs["j"].failures, s.jobs["j"].no_progress_failures) == (3, 1)


# ---- node loss ---------------------------------------------------------------------------


def silence(**kw: object) -> node_loss.Silence:
    base: dict[str, object] = dict(node="b", ranks="1", failing="breaker open", gone_s=20.0,
                                   tolerance_s=600.0, silence_limit_s=60.0, silent_s=70.0,
                                   last_step=42, down_s=20.0, elsewhere_s=None)
    return node_loss.Silence(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "stops", "words"), [
    # the nodes that answer show progress: a cut link, however long rank 0's path is silent
    ({"elsewhere_s": 5.0, "silent_s": 500.0}, False, ""),
    # ...unless the node has been gone longer than the job's tolerance
    ({"elsewhere_s": 5.0, "gone_s": 700.0}, True, "longer than the job's tolerance of 600 s"),
    # progress stopped on the nodes that answer too: stopped on the silence
    ({"elsewhere_s": 61.0, "silent_s": 61.0}, True, "has not advanced for 61 s"),
    ({"silent_s": 59.0}, False, ""),
    # no step known: counted from when the node went silent
    ({"silent_s": None, "down_s": 61.0}, True, "no step since the node went silent 61 s"),
    ({"silent_s": None, "down_s": 30.0}, False, ""),
])
def test_a_node_out_of_reach_stops_a_job_only_on_a_second_signal(
        kw: dict[str, object], stops: bool, words: str) -> None:
    why = node_loss.judge(silence(**kw))
    assert (why is not None) is stops, why
    if why is not None:
        assert "rank 1 on b lost: node unreachable" in why and words in why, why


# ---- progress read back after a restart ----------------------------------------------


def test_the_newest_step_of_the_current_attempt_is_read_back(tmp_path: Path) -> None:
    old = b"".join(json.dumps({"ts": 100.0 + i, "step": 900 + i}).encode() + b"\n"
                   for i in range(3))  # attempt 1's lines: before the attempt's base
    new = b"".join(json.dumps({"ts": 200.0 + i, "step": i, "loss": 1.0}).encode() + b"\n"
                   for i in range(1, 6)) + b'{"ts": 300, "event": "checkpoint"}\n{"ts'
    (tmp_path / "metrics.jsonl").write_bytes(old + new)
    assert node_progress.newest_step(tmp_path, metrics_from=len(old)) == (5, 205.0)
    assert node_progress.newest_step(tmp_path) == (902, 102.0)
    (tmp_path / "progress.jsonl").write_text('{"ts": 150.0, "step": 950}\n'
                                             '{"ts": 250.0, "step": 7}\n')
    # progress.jsonl has no per-attempt offset: lines from before the attempt began go
    assert node_progress.newest_step(tmp_path, metrics_from=len(old),
                                     since_ts=190.0) == (7, 250.0)
    assert node_progress.newest_step(tmp_path / "none") is None


def test_progress_per_path_advances_only_and_follows_the_attempt() -> None:
    p = node_progress.NodeProgress()
    p.line("j", 1, "a", b'{"ts":1,"step":5,"loss":0.1}', now=10.0)
    p.line("j", 1, "b", b'{"ts":1,"step":5,"rank":1,"event":"heartbeat"}', now=11.0)
    p.line("j", 1, "a", b'{"ts":2,"step":5}', now=20.0)  # no advance: time kept
    p.line("j", 1, "b", b'not json', now=30.0)
    assert p.advanced("j", 1) == {"a": 10.0, "b": 11.0}
    p.saw("j", 2, "a", 1, now=40.0)  # a new attempt starts afresh
    assert p.advanced("j", 2) == {"a": 40.0} and p.advanced("j", 1) == {}
    p.forget(["k"])
    assert p.advanced("j", 2) == {}
    assert node_progress.step_of(b'{"step": -1}') is None
    assert node_progress.step_of(b'{"step": 3.5}') is None
