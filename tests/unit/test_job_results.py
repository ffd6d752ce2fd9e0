"""Results that last: summaries of a job's files, result.json and gpu_use.json."""

from __future__ import annotations

import json
from pathlib import Path

from ugrod.loops.gpu_use import Usage
from ugrod.store import job_results as jr


def write(path: Path, *lines: object) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_summary_of_what_the_job_reported(tmp_path: Path) -> None:
    write(tmp_path / "metrics.jsonl",
          {"ts": 10.0, "event": "params", "learning_rate": 0.001, "model": "gpt2"},
          {"ts": 10.0, "step": 1, "train/loss": 2.0, "throughput": 100},
          {"ts": 12.0, "step": 5, "train/loss": 0.5, "grad_norm": 3.0},
          {"ts": 14.0, "step": 9, "train/loss": 0.75, "throughput": 120},
          {"ts": 14.0, "event": "checkpoint", "path": "/x", "step": 9}, "not json {")
    s = jr.summarise(tmp_path)
    assert s["source"] == "metrics.jsonl" and s["reports"] == 3
    assert s["final_loss"] == 0.75 and s["best_loss"] == 0.5 and s["best_step"] == 5
    assert s["steps"] == 9 and s["steps_per_s"] == 2.0 and s["throughput"] == 120
    assert s["run"] == {"learning_rate": 0.001, "model": "gpt2"}
    assert s["values"]["grad_norm"] == 3.0 and s["values"]["loss"] == 0.75


def test_summary_falls_back_to_what_ugrod_read_and_honours_the_loss_key(
        tmp_path: Path) -> None:
    write(tmp_path / "progress.jsonl", {"ts": 1.0, "step": 4}, {"ts": 2.0, "val_loss": 0.3,
                                                                "loss": 9.0})
    s = jr.summarise(tmp_path, ("val/loss",))
    assert s["source"] == "progress.jsonl" and s["final_loss"] == 0.3 and s["steps"] == 4


def test_result_json_is_read_back_only_for_the_same_end(tmp_path: Path) -> None:
    doc = {"results_version": jr.VERSION, "attempt": 2, "ended_at_ts": 5.5, "summary": {}}
    jr.store(tmp_path, doc)
    assert jr.load(tmp_path, 2, 5.5) == doc
    assert jr.load(tmp_path, 3, 5.5) is None  # a later attempt
    assert jr.load(tmp_path, 2, 6.0) is None
    (tmp_path / jr.RESULT).write_text("{torn")
    assert jr.load(tmp_path, 2, 5.5) is None
    assert not list(tmp_path.glob(".*tmp"))


def test_gpu_use_round_trips_for_its_attempt(tmp_path: Path) -> None:
    u = Usage(rank=1, node="b", gpu=0, samples=2, util_sum=150.0, util_n=2, util_peak=90.0,
               mem_sum=3e9, mem_n=2, mem_peak=2 << 30)
    jr.store_usage(tmp_path, 4, [u.saved()])
    (row,) = jr.load_usage(tmp_path, 4)
    back = Usage.from_saved(row)
    assert back is not None and back.view() == u.view()
    assert jr.load_usage(tmp_path, 5) == []
    assert Usage.from_saved({"rank": "x"}) is None
