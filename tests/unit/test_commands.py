"""Pure command decisions (names, dependencies, bulk actions) and --time: tables, no mocks."""

from __future__ import annotations

import pytest

from ugrod.core import commands, time_limits
from ugrod.core import events as ev
from ugrod.core.commands import Filter, Refused
from ugrod.core.state import JobState, State, apply

ALICE = ev.Actor(user="alice", uid=1000)
BOB = ev.Actor(user="bob", uid=1001)


def fold(*events: ev.Event, state: State | None = None, actor: ev.Actor = ALICE,
         ts: float = 1000.0) -> State:
    s = state or State()
    for e in events:
        s = apply(s, ev.Record(seq=s.seq + 1, ts=ts, actor=actor, event=e))
    return s


def spec(**kw: object) -> ev.JobSpec:
    return ev.JobSpec(argv=("sleep", "9"), **kw)  # type: ignore[arg-type]


def sub(job: str, **kw: object) -> ev.JobSubmitted:
    return ev.JobSubmitted(job=job, spec=spec(**kw))


def node() -> ev.NodeAdded:
    return ev.NodeAdded(node=ev.NodeSpec(name="n", host="127.0.0.1"))


def run(job: str, state: State, ts: float = 1000.0) -> State:
    return fold(ev.JobPlaced(job=job, attempt=1, ranks=(ev.RankPlacement(rank=0, node="n"),)),
                ev.JobRunning(job=job, attempt=1), state=state, ts=ts)


def end(job: str, outcome: str, state: State) -> State:
    return fold(ev.JobEnded(job=job, attempt=1, outcome=outcome, reason=f"it {outcome}"),
                state=state)


# ---- names -------------------------------------------------------------------------


def test_unnamed_submits_each_get_the_next_free_name() -> None:
    s = fold(sub("job-2"))  # a user took job-2 by hand
    names = []
    for _ in range(3):
        events = commands.submit(s, ev.JobSubmitted(job="", spec=spec()))
        names.append(events[0].job)  # type: ignore[attr-defined]
        s = fold(*events, state=s)
    assert names == ["job-3", "job-4", "job-5"]
    with pytest.raises(Refused, match="a job named 'job-3' already exists"):
        commands.submit(s, ev.JobSubmitted(job="job-3", spec=spec()))


# ---- dependencies ------------------------------------------------------------------


def _ended_deps() -> State:
    s = fold(node(), sub("ok"), sub("bad"), sub("stop"), sub("live"))
    s = end("ok", "succeeded", run("ok", s))
    s = end("bad", "failed", run("bad", s))
    return fold(ev.JobCancelRequested(job="stop"), state=s)


@pytest.mark.parametrize(("kw", "refused"), [
    ({"after": ("bad",)}, "--after bad: bad already failed (it failed)"),
    ({"after": ("stop",)}, "--after stop: stop already cancelled"),
    ({"after_failed": ("ok",)}, "--after-failed ok: ok already succeeded"),
    ({"after_any": ("nope",)}, "--after-any nope: no such job"),
    ({"after": ("ok",)}, None), ({"after": ("live",)}, None),
    ({"after_any": ("bad", "ok", "stop")}, None), ({"after_failed": ("bad", "stop")}, None),
])
def test_dependencies_that_can_never_be_met_are_refused(kw: dict[str, tuple[str, ...]],
                                                         refused: str | None) -> None:
    s = _ended_deps()
    if refused is None:
        assert commands.submit(s, sub("x", **kw))[0].job == "x"  # type: ignore[attr-defined]
        return
    with pytest.raises(Refused) as exc:
        commands.submit(s, sub("x", **kw))
    assert exc.value.message.startswith(refused)
    if "--after " in refused:
        assert "--after-any" in exc.value.message  # says what to do instead


# ---- one action, many jobs ---------------------------------------------------------


def test_actions_are_refused_in_user_words() -> None:
    s = end("ok", "succeeded", run("ok", fold(node(), sub("ok"))))
    for action, words in (("priority", "already succeeded: only waiting or running jobs"),
                          ("cancel", "already succeeded: nothing to cancel"),
                          ("hold", "is succeeded: only waiting jobs can be held"),
                          ("release", "is not held")):
        with pytest.raises(Refused) as exc:
            commands.job_action(s.jobs["ok"], action, ALICE, priority=3)
        assert words in exc.value.message and "job_" not in exc.value.message


def test_bulk_judges_each_job_and_returns_one_batch() -> None:
    s = fold(node(), sub("a"), sub("b"), sub("c"), sub("d"))
    s = fold(sub("e"), state=s, actor=BOB)
    s = run("c", s)
    chosen, missing = commands.select(s, ALICE, ["a", "zz"], Filter(states=("queued",)))
    assert chosen == ["a", "b", "d"] and [m.job for m in missing] == ["zz"]  # alice's only
    assert missing[0].code == "not_found"
    everyone, _ = commands.select(s, ALICE, [], Filter(all_users=True))
    assert everyone == ["a", "b", "c", "d", "e"]
    events, done, refused = commands.bulk(s, ALICE, "cancel", everyone,
                                          lambda j: j.owner == "alice")
    assert done == ["a", "b", "c", "d"]
    assert [(r.job, r.code) for r in refused] == [("e", "forbidden")]
    assert [e.kind for e in events] == ["job_cancel_requested"] * 2 + ["job_stopping"] + [
        "job_cancel_requested"]
    after = fold(*events, state=s)  # the batch applies as a whole
    assert after.jobs["a"].state is JobState.CANCELLED and after.jobs["c"].stopping
    events, done, refused = commands.bulk(after, ALICE, "hold", ["a", "e"], lambda j: True)
    assert [e.kind for e in events] == ["job_held"] and done == ["e"]
    assert [(r.job, r.code) for r in refused] == [("a", "conflict")]


def test_select_by_sweep_and_state_names() -> None:
    s = fold(node(), sub("s-0", sweep="s"), sub("s-1", sweep="s"), sub("other"))
    s = fold(ev.SweepCreated(sweep="s", jobs=("s-0", "s-1"), params={"lr": ("1", "2")}),
             state=s)
    assert commands.select(s, BOB, [], Filter(sweep="s"))[0] == ["s-0", "s-1"]
    assert commands.check_states(["pending", "running"]) == ("queued", "running")
    with pytest.raises(Refused, match="--state 'paused'"):
        commands.check_states(["paused"])
    with pytest.raises(Refused, match="no such sweep"):
        commands.select(s, BOB, [], Filter(sweep="nope"))


# ---- --time --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 5400), ("1:30", 90), ("1:30:00", 5400), ("2-0", 172800), ("1-12:30", 131400),
    ("1-00:00:01", 86401), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45),
    ("1d", 86400), ("0:02", 2), (120, 120), (2.5, 2.5),
])
def test_time_limits_read_slurm_forms_and_units(text: str | float, seconds: float) -> None:
    assert time_limits.parse(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1:xx", "abc", "-5", "1.5.2h", "400d", "0:00"])
def test_bad_time_limits_say_which_forms_work(text: str) -> None:
    with pytest.raises(time_limits.BadTimeLimit, match="time limit"):
        time_limits.parse(text)


def test_only_running_jobs_past_their_limit_are_stopped() -> None:
    s = fold(node(), sub("t", time_limit_s=60.0), sub("u"), sub("q", time_limit_s=1.0))
    s = run("t", s, ts=1000.0)
    assert time_limits.expired(s, ["t", "u", "q"], 1059.9) == []
    over = time_limits.expired(s, ["t", "u", "q", "gone"], 1060.0)
    assert [(e.job, e.outcome) for e in over] == [("t", "cancelled")]
    assert over[0].reason == "time limit: ran past its --time of 0:01:00"
    stopping = fold(*over, state=s)
    assert time_limits.expired(stopping, ["t"], 2000.0) == []  # already being stopped
    assert time_limits.show(2 * 86400 + 5) == "2-00:00:05"
