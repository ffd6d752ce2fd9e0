"""Pure command decisions (every command on every kind of job, names, dependencies, bulk
actions, the lifecycle table) and --time: tables, no mocks."""

from __future__ import annotations

import pytest

from ugrod.core import commands, jobspec, time_limits
from ugrod.core import events as ev
from ugrod.core import state as state_mod
from ugrod.core.commands import Filter, Refused
from ugrod.core.state import Job, JobState, State, apply

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


# ---- every command against every kind of job: one table ---------------------------


def _zoo() -> State:
    """One job in each state (and flag) a command may meet."""
    s = fold(node(), sub("queued"), ev.JobSubmitted(job="held", spec=spec(), held=True),
             sub("starting"), sub("running"), sub("stopping"), sub("retrying"),
             sub("succeeded"), sub("failed"), sub("cancelled"),
             ev.JobSubmitted(job="held-cancelled", spec=spec(), held=True))
    s = fold(ev.JobPlaced(job="starting", attempt=1,
                          ranks=(ev.RankPlacement(rank=0, node="n"),)), state=s)
    for j in ("running", "stopping", "retrying", "succeeded", "failed"):
        s = run(j, s)
    s = fold(ev.JobStopping(job="stopping", attempt=1, outcome="cancelled", reason="bye"),
             ev.JobEnded(job="retrying", attempt=1, outcome="retrying", retry_at=2000.0),
             ev.JobCancelRequested(job="cancelled", reason="no"),
             ev.JobCancelRequested(job="held-cancelled", reason="no"), state=s)
    s = end("succeeded", "succeeded", s)
    return end("failed", "failed", s)


def _do(command: str, job: Job) -> ev.Event:
    match command:
        case "cancel":
            return commands.cancel(job, ALICE)
        case "hold":
            return commands.hold(job)
        case "release":
            return commands.release(job)
        case "priority":
            return commands.set_priority(job, 5)
        case "checkpoint":
            return commands.checkpoint(job)
        case "resume":
            return commands.resume(job, {"lr": "0.1"})
    raise AssertionError(command)


NOT_WAITING = "only waiting jobs can be held"
ONLY_RUNNING = "only a running job can be asked to checkpoint"
ONLY_ENDED = "only failed or cancelled jobs can be resumed"
# job -> command -> (event kind, state after it) or the refusal's words (all 409 conflicts).
COMMAND_TABLE: dict[str, dict[str, tuple[str, JobState] | str]] = {
    "queued": {"cancel": ("job_cancel_requested", JobState.CANCELLED),
               "hold": ("job_held", JobState.QUEUED), "release": "is not held",
               "priority": ("job_priority_set", JobState.QUEUED),
               "checkpoint": ONLY_RUNNING, "resume": ONLY_ENDED},
    "held": {"cancel": ("job_cancel_requested", JobState.CANCELLED),
             "hold": "is already held", "release": ("job_released", JobState.QUEUED),
             "priority": ("job_priority_set", JobState.QUEUED),
             "checkpoint": ONLY_RUNNING, "resume": ONLY_ENDED},
    "starting": {"cancel": ("job_stopping", JobState.STARTING), "hold": NOT_WAITING,
                 "release": "is not held", "priority": ("job_priority_set", JobState.STARTING),
                 "checkpoint": ONLY_RUNNING, "resume": ONLY_ENDED},
    "running": {"cancel": ("job_stopping", JobState.RUNNING), "hold": NOT_WAITING,
                "release": "is not held", "priority": ("job_priority_set", JobState.RUNNING),
                "checkpoint": ("checkpoint_requested", JobState.RUNNING),
                "resume": ONLY_ENDED},
    "stopping": {"cancel": "is already being cancelled", "hold": NOT_WAITING,
                 "release": "is not held", "priority": ("job_priority_set", JobState.RUNNING),
                 "checkpoint": ("checkpoint_requested", JobState.RUNNING),
                 "resume": ONLY_ENDED},
    "retrying": {"cancel": ("job_cancel_requested", JobState.CANCELLED),
                 "hold": ("job_held", JobState.RETRYING), "release": "is not held",
                 "priority": ("job_priority_set", JobState.RETRYING),
                 "checkpoint": ONLY_RUNNING, "resume": ONLY_ENDED},
    "succeeded": {"cancel": "already succeeded: nothing to cancel",
                  "hold": "is succeeded: " + NOT_WAITING, "release": "is not held",
                  "priority": "already succeeded: only waiting or running jobs",
                  "checkpoint": ONLY_RUNNING, "resume": "is succeeded: " + ONLY_ENDED},
    "failed": {"cancel": "already failed: nothing to cancel", "hold": NOT_WAITING,
               "release": "is not held", "priority": "only waiting or running jobs",
               "checkpoint": ONLY_RUNNING, "resume": ("job_resumed", JobState.QUEUED)},
    "cancelled": {"cancel": "already cancelled: nothing to cancel", "hold": NOT_WAITING,
                  "release": "is not held", "priority": "only waiting or running jobs",
                  "checkpoint": ONLY_RUNNING, "resume": ("job_resumed", JobState.QUEUED)},
    "held-cancelled": {"cancel": "already cancelled", "hold": NOT_WAITING,
                       "release": "is cancelled: only waiting jobs can be released",
                       "priority": "only waiting or running jobs",
                       "checkpoint": ONLY_RUNNING, "resume": ("job_resumed", JobState.QUEUED)},
}


@pytest.mark.parametrize(("job_id", "command"), [
    (j, c) for j, row in COMMAND_TABLE.items() for c in row])
def test_every_command_on_every_kind_of_job(job_id: str, command: str) -> None:
    s = _zoo()
    expected = COMMAND_TABLE[job_id][command]
    if isinstance(expected, str):
        with pytest.raises(Refused) as exc:
            _do(command, s.jobs[job_id])
        assert exc.value.code == "conflict" and expected in exc.value.message
        assert job_id in exc.value.message  # names the job, in words, not event kinds
        return
    kind, after = expected
    event = _do(command, s.jobs[job_id])
    assert event.kind == kind
    assert state_mod.allows(s.jobs[job_id].state, type(event))  # the table agrees
    assert fold(event, state=s).jobs[job_id].state is after  # and apply moves as it says


def test_the_lifecycle_table_moves_jobs_only_as_drawn() -> None:
    moved = {(s.value, e.kind): to for (s, e), to in state_mod.JOB_LIFECYCLE.items()
             if to is not s}
    assert moved == {
        ("queued", "job_placed"): "starting", ("retrying", "job_placed"): "starting",
        ("starting", "job_running"): "running",
        ("queued", "job_cancel_requested"): "cancelled",
        ("retrying", "job_cancel_requested"): "cancelled",
        ("failed", "job_resumed"): "queued", ("cancelled", "job_resumed"): "queued",
        ("starting", "job_ended"): state_mod.ENDINGS, ("running", "job_ended"): state_mod.ENDINGS,
    }


def test_an_event_the_table_does_not_allow_is_refused_by_apply_unchanged() -> None:
    s = _zoo()
    for job_id, event in (("succeeded", ev.JobHeld(job="succeeded")),
                          ("queued", ev.CheckpointRequested(job="queued")),
                          ("running", ev.JobResumed(job="running", spec=spec()))):
        assert not state_mod.allows(s.jobs[job_id].state, type(event))
        with pytest.raises(state_mod.InvalidEvent, match=f"job {job_id} is"):
            fold(event, state=s)
    with pytest.raises(state_mod.InvalidEvent, match="unknown outcome 'paused'"):
        fold(ev.JobEnded(job="running", attempt=1, outcome="paused"), state=s)


def test_resume_changes_the_spec_and_leaves_the_checkpoint_to_the_shell() -> None:
    s = _zoo()
    resumed = commands.resume(s.jobs["failed"], {"lr": "0.1", "SEED": "3"})
    assert resumed.spec.argv == ("sleep", "9", "--lr", "0.1")
    assert resumed.spec.env == {"SEED": "3"} and resumed.resume_from is None
    with pytest.raises(jobspec.SpecError):
        commands.resume(s.jobs["failed"], {"": "x"})


def test_lookups_name_where_to_look() -> None:
    s = _zoo()
    for lookup, words in ((commands.job, "no job named 'nope' (see `ugroctl status`)"),
                          (commands.node, "no node named 'nope' (see `ugroctl nodes`)"),
                          (commands.sweep, "no sweep named 'nope'")):
        with pytest.raises(Refused) as exc:
            lookup(s, "nope")
        assert (exc.value.code, exc.value.message) == ("not_found", words)


def test_drain_and_undrain() -> None:
    s = _zoo()
    with pytest.raises(Refused, match="node n is not drained") as exc:
        commands.undrain(s, "n")
    assert exc.value.code == "conflict"
    drained = commands.drain(s, "n", "x" * 900)
    assert isinstance(drained, ev.NodeDrained) and len(drained.reason) == 500
    s = fold(drained, state=s)
    assert s.nodes["n"].drained
    assert not fold(commands.undrain(s, "n"), state=s).nodes["n"].drained
    with pytest.raises(Refused) as exc:
        commands.drain(s, "gone", "")
    assert exc.value.code == "not_found"


def test_a_request_id_submits_once_and_a_launch_gets_its_name_in_argv() -> None:
    s = fold(sub("job-1"))
    launch = ev.JobSubmitted(job="", request_id="r1", spec=ev.JobSpec(
        argv=("python", "t.py", "--name", jobspec.NAME_PLACEHOLDER)))
    events, job_id, new = commands.submit_once(s, launch, name_in_argv=True)
    assert (job_id, new) == ("job-2", True)
    assert events[0].spec.argv[-1] == "job-2"  # type: ignore[attr-defined]
    s = fold(*events, state=s)
    assert commands.submit_once(s, launch, name_in_argv=True) == ([], "job-2", False)
    named = ev.JobSubmitted(job="mine", spec=launch.spec)
    events, job_id, _ = commands.submit_once(s, named, name_in_argv=True)
    assert job_id == "mine" and events[0] == named  # a given name is the user's own argv


def test_cancelling_a_sweep_skips_trials_already_ended_or_being_cancelled() -> None:
    s = fold(node(), *(sub(f"s-{i}", sweep="s") for i in range(4)))
    s = fold(ev.SweepCreated(sweep="s", jobs=tuple(f"s-{i}" for i in range(4)),
                             params={"lr": ("1", "2", "3", "4")}), state=s)
    s = end("s-0", "succeeded", run("s-0", s))
    s = run("s-1", s)
    s = fold(ev.JobStopping(job="s-1", attempt=1, outcome="cancelled", reason="x"),
             state=s)
    s = run("s-2", s)
    events = commands.cancel_sweep(s, BOB, "s")
    assert [(e.kind, e.job) for e in events] == [  # type: ignore[attr-defined]
        ("job_stopping", "s-2"), ("job_cancel_requested", "s-3")]
    assert all(e.reason == "sweep s cancelled by bob" for e in events)  # type: ignore[attr-defined]
    with pytest.raises(Refused, match="no sweep named 'x'"):
        commands.cancel_sweep(s, BOB, "x")


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
