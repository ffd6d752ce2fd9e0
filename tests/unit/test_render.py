"""render.py: aligned tables, relative times, sizes, clean terminal text, one JSON document.

Job and node documents are built with the daemon's own view functions
(``ugrod.core.render_json``) from real state objects, so a change of the API's shape
shows up here.
"""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from ugroctl import render
from ugrod.core import codec
from ugrod.core import events as ev
from ugrod.core import render_json as rj
from ugrod.core.gpus import GpuSample, NodeSample
from ugrod.core.state import Alert, Job, JobState, Node, NodeHealth, RankRun

NOW = 1_769_000_000.0  # 2026-01-21T12:53:20Z
GIB = 1024**3


def _job(job_id: str, state: JobState, **kw: object) -> dict[str, object]:
    spec = ev.JobSpec(argv=("train.py", "--batch-size", "32"), nodes=2, gpus_per_node=1)
    placement = (ev.RankPlacement(rank=0, node="gpu-master", gpus=(0,)),
                 ev.RankPlacement(rank=1, node="gpu1", gpus=(0,)))
    fields: dict[str, object] = dict(
        id=job_id, spec=spec, owner="alice", uid=1000, state=state, submitted_at=NOW - 600)
    if state is not JobState.QUEUED:
        fields.update(placement=placement, started_at=NOW - 300, attempt=1,
                      ranks=(RankRun(rank=0, node="gpu-master", pid=4242),
                             RankRun(rank=1, node="gpu1", pid=977)))
    fields.update(kw)
    metrics = {"step": 4000, "loss": 1.23456789, "throughput": 812.5} \
        if state is JobState.RUNNING else None
    return rj.job(Job(**fields), metrics)  # type: ignore[arg-type]


def _node(name: str, **kw: object) -> dict[str, object]:
    spec = ev.NodeSpec(name=name, host=f"192.168.1.{len(name)}", user="ollie",
                       transport="ssh", labels=("big",),
                       gpus=(ev.Gpu(index=0, model="RTX 4070", vram_bytes=12 * GIB),))
    view = kw.pop("view", None)
    return rj.node(Node(spec=spec, **kw), [], view)  # type: ignore[arg-type]


# ---- small formats -----------------------------------------------------------------


@pytest.mark.parametrize(("delta", "text"), [
    (0, "just now"), (3, "just now"), (45, "45s ago"), (180, "3m ago"), (3600, "1h ago"),
    (3 * 3600 + 120, "3h02m ago"), (2 * 86400 + 3600, "2d1h ago"), (-300, "in 5m")])
def test_ago(delta: float, text: str) -> None:
    assert render.ago(codec.format_ts(NOW - delta), NOW) == text


def test_ago_accepts_offsets_and_epoch_and_rejects_junk() -> None:
    assert render.ago("2026-01-21T13:50:20+01:00", NOW) == "3m ago"
    assert render.ago(NOW - 120, NOW) == "2m ago"
    assert render.ago("yesterday", NOW) == "-"
    assert render.ago(None, NOW) == "-"


@pytest.mark.parametrize(("n", "text"), [
    (12 * GIB, "12.0 GB"), (8 * GIB + GIB // 2, "8.5 GB"), (300 * 1024**2, "300 MB"),
    (2048, "2 KB"), (12, "12 B"), (None, "-"), ("x", "-"), (True, "-")])
def test_size(n: object, text: str) -> None:
    assert render.size(n) == text


@pytest.mark.parametrize(("s", "text"), [
    (0.42, "0.4s"), (45, "45s"), (185, "3m05s"), (3720, "1h02m"), (3 * 86400, "3d0h"),
    (None, "-")])
def test_duration(s: object, text: str) -> None:
    assert render.duration(s) == text


def test_clean_defuses_terminal_control() -> None:
    assert render.clean("evil\x1b[2J\x07name\nnext") == "evil?[2J?name?next"
    assert render.clean(None) == "-" and render.clean("") == "-"
    assert render.clean("ünïcødé 名前") == "ünïcødé 名前"


# ---- tables --------------------------------------------------------------------------


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    out = render.table(["NAME", "N", "NOTE"], [["a", 1, "x"], ["longer-name", 12345, None],
                                               ["名前", 7, "wide"]], right=[1])
    assert out.splitlines() == [
        "NAME             N  NOTE",
        "a                1  x",
        "longer-name  12345  -",
        "名前             7  wide",  # a wide character takes two columns
    ]


def test_table_cells_are_cleaned() -> None:
    out = render.table(["A"], [["\x1b[31mred"]])
    assert "\x1b" not in out


def test_fields_aligns_and_skips_missing() -> None:
    out = render.fields([("job", "exp1"), ("exit code", 3), ("skip", None)])
    assert out.splitlines() == ["job:       exp1", "exit code: 3"]


# ---- jobs ------------------------------------------------------------------------------


def test_jobs_table_active_first_then_recent_ended() -> None:
    jobs = [
        _job("old", JobState.SUCCEEDED, ended_at=NOW - 7200, exit_code=0),
        _job("run", JobState.RUNNING),
        _job("bad", JobState.FAILED, ended_at=NOW - 60, exit_code=137,
             reason="rank 1 on gpu1 killed"),
        _job("wait", JobState.QUEUED, waiting_reason="waiting for 2 GPUs ≥ 8 GB"),
    ]
    out = render.jobs_table(jobs, NOW)
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["JOB", "run", "wait", "bad", "old"]
    header = lines[0]
    for col in ("STATE", "OWNER", "NODES", "WHEN", "NOTE"):
        starts = {line[header.index(col) - 2: header.index(col)] for line in lines}
        assert starts == {"  "}, (col, out)  # every column starts at the header's place
    assert "step 4000, loss 1.235" in lines[1]
    assert "waiting for 2 GPUs ≥ 8 GB" in lines[2]
    assert "exit 137: rank 1 on gpu1 killed" in lines[3]
    assert "gpu-master,gpu1 (2 GPU)" in lines[1]
    assert "ended 2h ago" in lines[4]


def test_jobs_table_empty_says_what_to_do() -> None:
    assert "ugroctl submit" in render.jobs_table([], NOW)


def test_job_detail() -> None:
    job = _job("exp1", JobState.RUNNING, priority=5, checkpoints=("/ck/step_4000.pt",))
    out = render.job_detail(job, NOW)
    assert re.search(r"^state:\s+running$", out, re.M)
    assert re.search(r"^owner:\s+alice$", out, re.M)
    assert "2 node(s) x 1 GPU" in out
    assert "rank 0 on gpu-master GPU 0; rank 1 on gpu1 GPU 0" in out
    assert re.search(r"^loss:\s+1\.235$", out, re.M)
    assert re.search(r"^throughput:\s+812\.5$", out, re.M)
    assert "command:    train.py --batch-size 32" in out
    assert "/ck/step_4000.pt (1 in all)" in out
    assert "RANK  NODE         PID  EXIT" in out
    failed = _job("exp2", JobState.FAILED, exit_code=1, ended_at=NOW - 5,
                  reason="CUDA out of memory on rank 1 (gpu1)")
    out = render.job_detail(failed, NOW)
    assert re.search(r"^exit code:\s+1$", out, re.M)
    assert "CUDA out of memory" in out


def test_queue_table_from_the_daemons_shape() -> None:
    entries = [
        {"position": 1, "job": _job("a", JobState.QUEUED, priority=10,
                                    waiting_reason="waiting for gpu1 (busy with exp3)"),
         "reason": "waiting for gpu1 (busy with exp3)", "estimated_start": codec.format_ts(NOW
                                                                                     + 1200)},
        {"position": 2, "job": _job("b", JobState.QUEUED, held=True), "reason": "behind a",
         "estimated_start": None},
    ]
    out = render.queue_table(entries, {}, NOW)
    lines = out.splitlines()
    assert lines[0].split() == ["POS", "JOB", "PRIO", "OWNER", "WAITING", "FOR", "EST.",
                                "START"]
    assert lines[1].split()[:4] == ["1", "a", "10", "alice"]
    assert "(in 20m)" in lines[1]
    assert "held: behind a" in lines[2]
    assert render.queue_table([], {}, NOW) == "the queue is empty"


def test_results_view() -> None:
    doc = {"job": _job("exp1", JobState.SUCCEEDED, exit_code=0, ended_at=NOW),
           "summary": {"final_loss": 0.4321, "steps": 5000, "duration_s": 3725.0,
                       "steps_per_s": 1.3423, "reports": 50},
           "checkpoints": [{"name": "step_5000.pt", "path": "/w/ck/step_5000.pt",
                            "node": "gpu1", "step": 5000, "size_bytes": 3 * GIB,
                            "mtime": codec.format_ts(NOW - 120),
                            "central": "/s/jobs/exp1/checkpoints/step_5000.pt"},
                           {"name": "step_9.pt", "path": "/w/ck/step_9.pt", "node": "gpu1",
                            "step": None, "size_bytes": 10, "mtime": codec.format_ts(NOW - 60),
                            "central": None}],
           "resources": {"ranks": [{"rank": 0, "node": "gpu-master", "gpu": 0,
                                    "util_avg": 91.2, "util_peak": 100,
                                    "mem_avg_bytes": 10 * GIB, "mem_peak_bytes": 11 * GIB}]}}
    out = render.results_view(doc, NOW)
    assert re.search(r"^final loss:\s+0\.4321$", out, re.M)
    assert re.search(r"^duration:\s+1h02m$", out, re.M)
    assert re.search(r"^steps/s:\s+1\.34$", out, re.M)
    assert re.search(r"^step_5000\.pt\s+5000\s+3\.0 GB\s+2m ago\s+gpu1:/w/ck/step_5000\.pt\s+"
                     r"/s/jobs/exp1/checkpoints/step_5000\.pt$", out, re.M), out
    assert re.search(r"^step_9\.pt\s+-\s+10 B\s+1m ago\s+gpu1:/w/ck/step_9\.pt\s+-$", out,
                     re.M), out
    assert re.search(r"^\s*0\s+gpu-master\s+0\s+91%\s+100%\s+10\.0 GB\s+11\.0 GB$", out, re.M)
    doc["checkpoints"] = [{"error": "node gpu-master: unreachable"}]
    assert "could not list them: node gpu-master: unreachable" in render.results_view(doc, NOW)


# ---- nodes ---------------------------------------------------------------------------


def test_health_table_with_a_live_sample() -> None:
    sample = NodeSample(ts=NOW - 8, gpus=(
        GpuSample(uuid="GPU-1", index=0, name="RTX 4070", util_percent=97.0,
                  memory_used_bytes=9 * GIB, memory_total_bytes=12 * GIB,
                  temperature_c=86.0),
        GpuSample(uuid="GPU-2", index=1, name="RTX 3070", error="GPU requires reset")))
    hot = _node("gpu-master", health=NodeHealth.UNHEALTHY, score=42.5,
                alerts=(Alert(alert="gpu_temperature", severity="critical",
                              message="GPU 0 at 86 °C", since=NOW - 30),),
                view={"last_check": codec.format_ts(NOW - 8),
                      "sample": msgspec.to_builtins(sample)})
    idle = _node("gpu1", drained=True, drain_reason="fan", score=100.0)
    out = render.health_table([hot, idle], NOW)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATUS", "SCORE"]
    assert "unhealthy" in lines[1] and "42.5" in lines[1]
    assert "0:97%/75%/86C 1:GPU requires reset" in lines[1]
    assert "8s ago" in lines[1] and "GPU 0 at 86 °C" in lines[1]
    assert "draining" in lines[2] and "0:12 GB" in lines[2] and "drained: fan" in lines[2]
    status_col = lines[0].index("STATUS")
    assert lines[1][status_col:].startswith("unhealthy")
    assert lines[2][status_col:].startswith("draining")


def test_nodes_table() -> None:
    out = render.nodes_table([_node("gpu1"), _node("gpu-master")])
    assert "ollie@192.168.1.4" in out and "RTX 4070 12 GB" in out and "big" in out
    assert render.nodes_table([]) == "no nodes configured"


def test_checks_table() -> None:
    out = render.checks_table({"node": "gpu1", "checks": [
        {"name": "python", "ok": True, "detail": "3.11.7"},
        {"name": "torch", "ok": False, "detail": "No module named 'torch'"}]})
    assert out.splitlines()[0] == "node gpu1"
    assert re.search(r"^FAIL\s+torch\s+No module named 'torch'$", out, re.M)


# ---- history, events, sweeps -----------------------------------------------------------


def test_why_view() -> None:
    doc = {"job": _job("exp2", JobState.QUEUED, waiting_reason="waiting for gpu1"),
           "history": [{"seq": 7, "ts": codec.format_ts(NOW - 60), "type": "job_submitted",
                        "actor": "alice", "text": "submitted by alice"},
                       {"seq": 12, "ts": codec.format_ts(NOW), "type": "job_waiting",
                        "actor": "ugrod", "text": "queued behind exp1"}]}
    out = render.why_view(doc, NOW)
    assert out.splitlines()[0] == "exp2: queued (waiting for gpu1)"
    assert re.search(r"^\s+7\s+\S+ \S+\s+submitted by alice$", out, re.M)
    assert out.index("submitted by alice") < out.index("queued behind exp1")


def test_event_line_from_a_real_log_line() -> None:
    rec = ev.Record(seq=42, ts=NOW, actor=ev.Actor(user="alice", uid=1000),
                    event=ev.JobEnded(job="exp1", attempt=1, outcome="failed", exit_code=1,
                                      reason="rank 1\x1b[2J died"))
    event = json.loads(codec.encode(rec))
    line = render.event_line(event)
    assert line.split()[0] == "42"
    assert "alice  job_ended" in line
    assert "job=exp1" in line and "outcome=failed" in line
    assert "\x1b" not in line


def test_sweep_view_best_first_as_given() -> None:
    doc = {"sweep": {"name": "lrs", "owner": "alice", "max_parallel": 2, "done": 1,
                     "total": 2},
           "trials": [{"job": "lrs-1", "params": {"lr": "2e-5"}, "state": "succeeded",
                       "latest_loss": 0.5, "final_loss": 0.41, "duration_s": 610.0},
                      {"job": "lrs-0", "params": {"lr": "1e-5"}, "state": "running",
                       "latest_loss": 0.9, "final_loss": None, "duration_s": 300.0}]}
    out = render.sweep_view(doc, NOW)
    rows = [ln for ln in out.splitlines() if re.match(r"\s*\d+\s+lrs-", ln)]
    assert "0.41" in rows[0] and "lr=2e-5" in rows[0] and "10m10s" in rows[0]
    assert "0.9" in rows[1] and "running" in rows[1]


# ---- JSON ------------------------------------------------------------------------------


def test_dump_json_is_one_ascii_document() -> None:
    doc = {"jobs": [_job("exp1", JobState.RUNNING)], "name": "名前\udcff"}
    for pretty in (True, False):
        text = render.dump_json(doc, pretty=pretty)
        assert text.isascii()
        assert json.loads(text) == json.loads(json.dumps(doc))
        assert json.JSONDecoder().raw_decode(text)[1] == len(text)  # nothing after it


def test_job_json_has_the_contract_fields() -> None:
    job = _job("exp1", JobState.RUNNING)
    for key in ("id", "name", "state", "owner", "nodes", "exit_code", "submitted_at"):
        assert key in job


# ---- day one: bounded notes, requeued jobs, sinfo counts, sweeps, replay ----------------


def test_status_note_is_cut_to_the_terminal_with_an_ellipsis() -> None:
    long = "Traceback (most recent call last):\n  " + "x" * 500 + "\nValueError: boom"
    jobs = [_job("bad", JobState.FAILED, ended_at=NOW - 60, exit_code=1, reason=long),
            _job("ok", JobState.SUCCEEDED, ended_at=NOW - 30, exit_code=0, reason="fine")]
    for width in (80, 120):
        lines = render.jobs_table(jobs, NOW, width).splitlines()
        assert all(render._width(ln) <= width for ln in lines), lines
        assert lines[2].endswith("…") and "exit 1: Tr" in lines[2]
        assert lines[1].endswith("fine")
    wide = render.jobs_table(jobs, NOW, 200).splitlines()[2]
    assert "exit 1: Traceback (most recent call last): xxx" in wide  # one line, no newlines
    assert wide.endswith("…") and render._width(wide) <= 200
    unbounded = render.jobs_table(jobs, NOW)  # a pipe: capped, not unlimited
    assert max(len(ln) for ln in unbounded.splitlines()) < render.NOTE_MAX + 80
    tiny = render.jobs_table(jobs, NOW, 10).splitlines()[2]  # never less than NOTE_MIN
    assert len(tiny.split("  ")[-1]) >= render.NOTE_MIN - 1


def test_a_requeued_job_shows_no_previous_placement_pids_or_step() -> None:
    retry = _job("r", JobState.RETRYING, ended_at=NOW - 20, exit_code=1,
                 reason="rank 1 exited 1; retry 1", retry_at=NOW + 40)
    assert retry["nodes"] == [] and retry["ranks"] == [] and retry["gpus"] == []
    assert retry["metrics"] == {} and retry["started_at"] is None
    assert retry["last_attempt"] == {"attempt": 1, "nodes": ["gpu-master", "gpu1"],
                                     "exit_code": 1, "ended_at": codec.format_ts(NOW - 20),
                                     "reason": "rank 1 exited 1; retry 1"}
    text = render.job_detail(retry, NOW)
    assert "4242" not in text and "RANK" not in text and "placed" not in text
    assert re.search(r"^last try: +attempt 1 on gpu-master,gpu1, ended 20s ago \(exit 1\)$",
                     text, re.M)
    running = _job("r", JobState.RUNNING)
    assert running["nodes"] == ["gpu-master", "gpu1"] and running["last_attempt"] is None
    assert "4242" in render.job_detail(running, NOW)


def test_nodes_show_free_of_total_gpus_and_the_cluster_line() -> None:
    gpus = tuple(ev.Gpu(index=i, model="RTX 3070", vram_bytes=8 * GIB) for i in range(2))
    busy = Node(spec=ev.NodeSpec(name="gpu1", host="10.0.0.2", gpus=gpus))
    off = Node(spec=ev.NodeSpec(name="gpu2", host="10.0.0.3", gpus=gpus), drained=True)
    docs = [rj.node(busy, ["j"], None, {1}), rj.node(off, [], None, ())]
    assert {k: docs[0][k] for k in ("gpus_total", "gpus_used", "gpus_free")} == {
        "gpus_total": 2, "gpus_used": 1, "gpus_free": 1}
    assert docs[1]["gpus_free"] == 0 and docs[1]["gpus_unavailable"] == 2
    cluster = rj.cluster_summary(docs)
    assert cluster == {"nodes": 2, "nodes_schedulable": 1, "gpus_total": 4, "gpus_used": 1,
                       "gpus_free": 1, "gpus_unavailable": 2}
    out = render.nodes_table(docs, cluster)
    assert re.search(r"^gpu1 .* 1/2 ", out, re.M) and re.search(r"^gpu2 .* 0/2 ", out, re.M)
    assert out.endswith("cluster: 1 of 2 nodes taking work; GPUs 1 free of 4, 1 in use, "
                        "2 on nodes not taking work")


def test_sweeps_table() -> None:
    out = render.sweeps_table([{"name": "lrs", "owner": "alice", "trials": 4,
                                "states": {"succeeded": 2, "running": 1, "queued": 1},
                                "max_parallel": 2, "created_at": codec.format_ts(NOW - 600)}],
                              NOW)
    assert re.search(r"^lrs\s+alice\s+4\s+1 running, 1 queued, 2 succeeded\s+2\s+10m ago$",
                     out, re.M)
    assert "ugroctl sweep --name" in render.sweeps_table([], NOW)


def test_replay_times_count_from_the_replayed_moment() -> None:
    from ugroctl import replaying

    moment = NOW - 30 * 86400  # a month ago
    doc = {"seq": 9, "state_dir": "/var/lib/ugro", "last_event_at": codec.format_ts(moment - 5),
           "until": {"seq": None, "time": codec.format_ts(moment)},
           "jobs": [_job("old", JobState.SUCCEEDED, submitted_at=moment - 900,
                         ended_at=moment - 120, exit_code=0)], "nodes": []}
    out = replaying.describe(doc)
    assert "ended 2m ago" in out and "30d" not in out
