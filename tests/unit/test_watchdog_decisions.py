"""The watchdog's pure decisions: step interval, stall timeout, silence limit."""

from __future__ import annotations

import pytest

from ugrod.loops.watchdog import median_interval, silence_limit, stall_timeout


def test_median_interval_needs_two_advances_and_ignores_one_slow_step() -> None:
    assert median_interval([]) is None and median_interval([5.0]) is None
    assert median_interval([0.0, 1.0, 2.0, 30.0, 31.0]) == 1.0


@pytest.mark.parametrize(("spec", "times", "want"), [
    (7.0, [], 7.0),  # the user's timeout applies from the first step
    (None, [0.0, 1.0, 2.0, 3.0], None),  # 4 steps: not known yet
    (None, [0.0, 1.0, 2.0, 3.0, 4.0], 120.0),  # 10 x 1 s, floor 120 s
    (None, [0.0, 30.0, 60.0, 90.0, 120.0], 300.0),  # 10 x 30 s
])
def test_stall_timeout(spec: float | None, times: list[float], want: float | None) -> None:
    assert stall_timeout(spec, times) == want


@pytest.mark.parametrize(("spec", "times", "want"), [
    (None, [], 60.0),  # nothing known: one minute
    (None, [0.0, 1.0], 60.0),
    (None, [0.0, 40.0, 80.0], 120.0),  # 3 x 40 s
    (5.0, [0.0, 40.0, 80.0], 5.0),  # the user's own stall timeout
])
def test_silence_limit(spec: float | None, times: list[float], want: float) -> None:
    assert silence_limit(spec, times) == want
