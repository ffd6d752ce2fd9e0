"""store/reports.py: what `sweep status` shows, from state, metrics files and live metrics."""

from __future__ import annotations

from pathlib import Path

from ugrod.core import events as ev
from ugrod.core.state import State, apply
from ugrod.store import reports

ALICE = ev.Actor(user="alice", uid=1000)


def test_each_trial_shows_its_own_live_loss(tmp_path: Path) -> None:
    # Once, the first trial's metrics replaced the map of every trial's: the others fell
    # back to their files (here none) and showed no loss at all.
    s = State()
    trials = ("s-0", "s-1", "s-2")
    for e in (*(ev.JobSubmitted(job=j, spec=ev.JobSpec(argv=("t",), sweep="s"))
                for j in trials),
              ev.SweepCreated(sweep="s", jobs=trials, params={"lr": ("1", "2", "3")})):
        s = apply(s, ev.Record(seq=s.seq + 1, ts=1000.0, actor=ALICE, event=e))
    (tmp_path / "s-2").mkdir()
    (tmp_path / "s-2" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    live = {"s-0": {"loss": 3.0}, "s-1": {"loss": 2.0}}
    view = reports.sweep_view(s, s.sweeps["s"], lambda j: tmp_path / j, live)
    assert [(t["job"], t["latest_loss"]) for t in view["trials"]] == [
        ("s-2", 0.5), ("s-1", 2.0), ("s-0", 3.0)]  # best first; s-2 from its file
    assert view["sweep"]["done"] == 0 and view["sweep"]["total"] == 3
