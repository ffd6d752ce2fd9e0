"""GPU memory as people say it: a card's nominal size, the one its box and its user name.

nvidia-smi reports what the driver can hand out, a little less than the card's size
(the driver and, with ECC on, the check bits keep some): a "12 GB" RTX 4070 reports
12282 MiB, an "80 GB" H100 81559 MiB, a "141 GB" H200 143771 MiB, a "16 GB" T4 15360
MiB. ``--min-vram 12`` means "a 12 GB card", so jobs are matched against the nominal
size by this rule:

    the nominal size of a card is the smallest marketed size (``MARKETED_GB``) that is
    at least its reported size and at most ``TOLERANCE`` (7 %) above it; a card that
    matches none is taken at its reported size. Sizes are in GiB, as the market's "GB"
    of GPU memory are (an "8 GB" card has 8192 MiB).

A job's ``--min-vram N`` is met by a card whose nominal size is at least N GiB. The exact
figure stays what the node reports (``nodes --json`` keeps it in bytes); only the
comparison uses the nominal size. Pure: no I/O.
"""

from __future__ import annotations

import bisect

GIB = 1 << 30
MIB = 1 << 20
TOLERANCE = 0.07
# Sizes GPUs are sold with, in GB (= GiB of memory). ECC cards report up to ~6.3 % less
# (T4: 15360 MiB of 16 GiB; L40S: 46068 MiB of 48 GiB), hence the 7 %.
MARKETED_GB: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 144,
    180, 192, 256, 288,
)


def nominal_bytes(vram_bytes: int) -> int:
    """The card's nominal size in bytes (see the module's rule); 0 stays 0."""
    if vram_bytes <= 0:
        return 0
    sizes = [gb * GIB for gb in MARKETED_GB]
    i = bisect.bisect_left(sizes, vram_bytes)
    if i < len(sizes) and vram_bytes >= sizes[i] * (1.0 - TOLERANCE):
        return sizes[i]
    return vram_bytes


def nominal_gb(vram_bytes: int) -> float:
    """The nominal size in GB (GiB), for words: 12282 MiB -> 12.0."""
    return nominal_bytes(vram_bytes) / GIB


def meets(vram_bytes: int, min_vram_bytes: int) -> bool:
    """Whether a card reporting ``vram_bytes`` satisfies a job's ``min_vram_bytes``."""
    return nominal_bytes(vram_bytes) >= min_vram_bytes
