"""The planner's small words: sizes, times of day, ordinals, lists ("a, b and c")."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ugrod.core import codec

GIB = 1 << 30


def gb(vram_bytes: int) -> str:
    x = vram_bytes / GIB
    return f"{round(x)} GB" if abs(x - round(x)) < 0.01 else f"{x:.1f} GB"


def clock_words(t: float, now: float) -> str:
    """'14:20 UTC' today, '2026-11-23 14:20 UTC' another day."""
    if not math.isfinite(t):
        return "an unknown time"
    at, today = codec.format_ts(t), codec.format_ts(now)
    return f"{at[11:16]} UTC" if at[:10] == today[:10] else f"{at[:10]} {at[11:16]} UTC"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def and_(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def few(items: list[str]) -> str:
    return and_(items) if len(items) <= 3 else f"{', '.join(items[:2])} and {len(items) - 2} more"
