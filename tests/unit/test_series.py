"""ugrod.core.series: metrics.jsonl as chart columns (what the dashboard's curves are drawn from)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ugrod.core.series import MAX_KEYS, read_series


def write(path: Path, rows: list[object], tail: str = "") -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
                    + tail)


def test_columns_skip_what_is_not_a_finite_number(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    write(p, [{"step": 1, "loss": 2.5, "lr": 1e-3},
              {"event": "checkpoint", "path": "/x", "step": 1},   # a notice, not a point
              "not json",
              [1, 2],                                              # not an object
              {"step": 2, "loss": "high", "acc": True, "note": "x"},  # no number but step
              {"step": 3, "loss": 1.5, "<b>name</b>": 7}])
    r = read_series(p)
    assert r["x"] == [1, 2, 3]
    assert r["series"] == {"loss": [2.5, None, 1.5], "lr": [1e-3, None, None],
                           "<b>name</b>": [None, None, 7]}
    assert r["points"] == 3 and not r["downsampled"]


def test_incremental_reads_leave_a_torn_line_for_later(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    write(p, [{"step": 0, "loss": 1.0}], tail='{"step": 1, "lo')
    first = read_series(p)
    assert first["x"] == [0] and first["offset"] == len(json.dumps({"step": 0, "loss": 1.0})) + 1
    assert read_series(p, after=first["offset"])["points"] == 0
    with open(p, "a") as f:
        f.write('ss": 0.5}\n{"step": 2, "loss": 0.25}\n')
    more = read_series(p, after=first["offset"])
    assert more["x"] == [1, 2] and more["series"] == {"loss": [0.5, 0.25]}
    assert more["offset"] == p.stat().st_size
    assert read_series(tmp_path / "missing.jsonl")["points"] == 0
    assert read_series(p, after=10**9)["points"] == 0  # past the end: nothing, no error


def test_downsampling_keeps_every_peak_and_dip(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    n = 50_000
    rows = [{"step": i, "loss": math.sin(i / 300) + (5.0 if i == 12_345 else 0.0)
             - (5.0 if i == 33_333 else 0.0), "lr": i} for i in range(n)]
    write(p, rows)
    r = read_series(p, max_points=1000)
    assert r["downsampled"] and r["points"] == n
    assert len(r["x"]) <= 1002 and len(r["series"]["lr"]) == len(r["x"])
    assert r["x"][0] == 0 and r["x"][-1] == n - 1 and r["x"] == sorted(r["x"])
    assert 12_345 in r["x"] and 33_333 in r["x"]        # the spike and the dip survive
    assert max(r["series"]["loss"]) == max(row["loss"] for row in rows)
    assert min(r["series"]["loss"]) == min(row["loss"] for row in rows)
    # every kept point is a reported one, values aligned with their steps
    assert all(r["series"]["lr"][i] == x for i, x in enumerate(r["x"]))
    assert read_series(p, max_points=0)["x"] == list(range(n))  # 0: every point


def test_keys_are_bounded(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    write(p, [{"step": 0, **{f"k{i}" + "x" * 300: i for i in range(200)}}])
    r = read_series(p)
    assert len(r["series"]) <= MAX_KEYS
    assert all(len(k) <= 200 for k in r["series"])
