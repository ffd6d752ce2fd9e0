"""A job's training metrics as columns for charts: read from metrics.jsonl, bounded, downsampled.

The dashboard draws loss and throughput curves from this. A job may have
reported 100,000 points or more, so a read is bounded (bytes per call, keys,
key length) and a long series is cut to ``max_points`` by keeping, in each of
``max_points / 2`` equal buckets, the point where each series is lowest and the
one where it is highest (the shape a person sees, peaks and dips included,
never an average that was not reported). Reads are incremental: an answer
carries the byte offset of the end of its last complete line, and the next
call passes it as ``after``; a line still being written is left for then.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import msgspec

MAX_READ_BYTES = 64 << 20  # per call; the caller continues from "offset"
MAX_KEYS = 64
MAX_KEY_CHARS = 200
X_KEY = "step"

_lines_decoder = msgspec.json.Decoder(list[Any])
_line_decoder = msgspec.json.Decoder()


def read_series(path: Path, after: int = 0, max_points: int = 2000,
                shape_keys: list[str] | None = None) -> dict[str, Any]:
    """Columns of the metric lines after byte ``after``: x (step), then one list per key.

    Lines that are not JSON objects, checkpoint notices (``"event"`` set) and
    values that are not finite numbers are skipped. ``points`` is how many lines
    were read; ``x`` and each series have the same length (``None`` where a line
    lacks that key), at most about ``max_points`` when ``downsampled``; the
    points kept follow the series named in ``shape_keys`` (default: ``loss``, else
    the first key), so a chart of those shows every peak and dip.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            after = min(max(after, 0), size)
            f.seek(after)
            data = f.read(MAX_READ_BYTES)
    except FileNotFoundError:
        return _answer(0, 0, [], {}, False, 0)
    end = data.rfind(b"\n")
    if end < 0:  # nothing complete yet
        return _answer(after, size, [], {}, False, 0)
    data = data[:end + 1]
    # Column by column (list comprehensions run at C speed; row by row in Python
    # takes ~4x longer on 100,000 lines), and of a long series only the columns
    # that choose the points are read in full.
    rows = [r for r in _decode(data) if type(r) is dict and "event" not in r]
    n = len(rows)
    keys = [k for k in dict.fromkeys(itertools.chain.from_iterable(rows))
            if isinstance(k, str)][:MAX_KEYS + 1]
    cols = {k: _numbers(rows, k) for k in
            ((shape_keys or ["loss"]) if max_points > 0 and n > max_points else keys)
            if k in keys}
    downsampled = False
    if max_points > 0 and n > max_points:
        shape = [c for c in cols.values() if any(v is not None for v in c)][:8]
        for k in keys if not shape else ():
            col = _numbers(rows, k)
            if k != X_KEY and any(v is not None for v in col):
                shape = [col]
                break
        keep = _envelope(n, shape, max_points)
        rows = [rows[i] for i in keep]
        cols = {k: _numbers(rows, k) for k in keys}
        downsampled = True
    cols = {k[:MAX_KEY_CHARS]: c for k, c in cols.items() if any(v is not None for v in c)}
    if len(cols) > MAX_KEYS + 1:
        cols = dict(itertools.islice(cols.items(), MAX_KEYS + 1))
    xs = cols.pop(X_KEY, None) or [None] * len(rows)
    return _answer(after + len(data), size, xs, cols, downsampled, n)


def _numbers(rows: list[dict[str, Any]], key: str) -> list[float | None]:
    """One key's values; None where missing or not a finite number (bools, NaN, inf out)."""
    return [v if type(v) is int or (type(v) is float and v - v == 0.0) else None
            for v in [r.get(key) for r in rows]]


def _answer(offset: int, size: int, xs: list[float | None],
            cols: dict[str, list[float | None]], downsampled: bool, n: int) -> dict[str, Any]:
    return {"offset": offset, "size": size, "points": n, "downsampled": downsampled,
            "x_key": X_KEY, "x": xs, "series": cols}


def _decode(data: bytes) -> list[Any]:
    """All lines in one decode (fast); a file with a bad line falls back to line by line."""
    try:
        return _lines_decoder.decode(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]")
    except msgspec.DecodeError:
        out = []
        for line in data.split(b"\n"):
            if line.strip():
                try:
                    out.append(_line_decoder.decode(line))
                except msgspec.DecodeError:
                    continue
        return out


def _envelope(n: int, cols: list[list[float | None]], max_points: int) -> list[int]:
    """Indexes to keep: first, last, and each series' min and max in every bucket."""
    buckets = max(1, max_points // (2 * max(1, len(cols))))
    keep = {0, n - 1}
    for col in cols:
        low = [math.inf if v is None else v for v in col]
        high = [-math.inf if v is None else v for v in col]
        for b in range(buckets):
            lo, hi = b * n // buckets, (b + 1) * n // buckets
            if lo < hi:
                span = range(lo, hi)
                keep.add(min(span, key=low.__getitem__))
                keep.add(max(span, key=high.__getitem__))
    return sorted(keep)
