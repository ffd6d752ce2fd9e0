"""The pure rules behind two day-one answers: which rank failed a gang, and VRAM as people
say it (ugrod/core/culprit.py, ugrod/core/vram.py)."""

from __future__ import annotations

import pytest

from ugrod.core import culprit, vram
from ugrod.core.culprit import RankEnd
from ugrod.core.vram import GIB, MIB

# ---- culprit -------------------------------------------------------------------------


def test_first_exit_on_its_node_wins_over_the_lowest_rank_and_the_first_seen() -> None:
    # rank 2 died first (its node recorded it at t=100.0); rank 0, a survivor, failed 0.4 s
    # later and its exit reached ugrod first. The old rule blamed rank 0 (lowest number).
    ends = [RankEnd(rank=0, node="gpu0", exit_code=1, exited_at=100.4, seen=0),
            RankEnd(rank=1, node="gpu1", exit_code=143, exited_at=101.0, seen=2),
            RankEnd(rank=2, node="gpu2", exit_code=1, exited_at=100.0, seen=1)]
    first = culprit.first_failure(ends)
    assert first is not None and (first.rank, first.node) == (2, "gpu2")


def test_a_rank_lost_with_its_node_is_the_culprit() -> None:
    ends = [RankEnd(rank=0, node="gpu0", exit_code=1, exited_at=100.0, seen=0),
            RankEnd(rank=1, node="gpu1", exit_code=1, exited_at=100.1, seen=1),
            RankEnd(rank=2, node="gpu2", lost="connection refused")]
    first = culprit.first_failure(ends)
    assert first is not None and first.rank == 2
    assert culprit.lost_words(2, "gpu2", "connection refused") == \
        "rank 2 on gpu2 lost: node unreachable (connection refused)"


@pytest.mark.parametrize(("ends", "rank"), [
    ([RankEnd(rank=0, node="a", exit_code=0), RankEnd(rank=1, node="b", exit_code=0)], None),
    ([RankEnd(rank=0, node="a", exit_code=0), RankEnd(rank=1, node="b")], None),
    # no node times (an old wrapper): the order ugrod saw them in
    ([RankEnd(rank=0, node="a", exit_code=1, seen=1), RankEnd(rank=1, node="b", exit_code=1,
                                                              seen=0)], 1),
    # a timed exit comes before one whose time is unknown
    ([RankEnd(rank=0, node="a", exit_code=1, seen=0),
      RankEnd(rank=1, node="b", exit_code=1, exited_at=5.0, seen=1)], 1),
    # equal times: the lower rank
    ([RankEnd(rank=3, node="d", exit_code=1, exited_at=5.0),
      RankEnd(rank=1, node="b", exit_code=2, exited_at=5.0)], 1),
    # a clean exit is never the culprit, however early
    ([RankEnd(rank=0, node="a", exit_code=0, exited_at=1.0),
      RankEnd(rank=1, node="b", exit_code=1, exited_at=9.0)], 1),
])
def test_first_failure_table(ends: list[RankEnd], rank: int | None) -> None:
    first = culprit.first_failure(ends)
    assert (first.rank if first is not None else None) == rank


# torchrun 2.x's report after its worker was SIGKILLed (node rank 2, one GPU per node).
REPORT_SIGKILL = """\
step 40 loss 0.61
E1206 08:00:01.000000 4242 torch/distributed/elastic/multiprocessing/api.py:874] failed \
(exitcode: -9) local_rank: 0 (pid: 4243) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "/usr/bin/torchrun", line 8, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_08:00:01
  host      : gpu2
  rank      : 2 (local_rank: 0)
  exitcode  : -9 (pid: 4243)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4243
============================================================
""".splitlines()


def test_torchrun_report_gives_the_workers_signal_not_torchruns_exit_1() -> None:
    report = culprit.torchrun_failure(REPORT_SIGKILL)
    assert report == culprit.TorchrunFailure(rank=2, local_rank=0, exitcode=-9, host="gpu2")
    assert report.exit_code == 137 and report.signal_name == "SIGKILL"
    code, words = culprit.describe(2, "gpu2", 1, report)
    assert code == 137
    assert words == "rank 2 on gpu2 was killed by SIGKILL (torchrun: exitcode -9)"


def test_torchrun_report_with_several_processes_per_node_names_the_global_rank() -> None:
    lines = [ln.replace("rank      : 2 (local_rank: 0)", "rank      : 5 (local_rank: 1)")
             .replace("exitcode  : -9", "exitcode  : 3") for ln in REPORT_SIGKILL]
    report = culprit.torchrun_failure(lines)
    assert report is not None and (report.rank, report.local_rank) == (5, 1)
    assert culprit.describe(2, "gpu2", 1, report, nproc=2) == (
        3, "rank 5 (node rank 2) on gpu2 exited with code 3 (torchrun: exitcode 3)")


@pytest.mark.parametrize(("lines", "code", "words"), [
    ([], 7, "rank 0 on n exited with code 7"),
    (["Root Cause (first observed failure):", "  exitcode  : garbage"], 1,
     "rank 0 on n exited with code 1"),
    (["plain output"], 137, "rank 0 on n exited with code 137 (SIGKILL)"),
])
def test_without_a_usable_report_the_wrappers_exit_code_is_said(
        lines: list[str], code: int, words: str) -> None:
    assert culprit.describe(0, "n", code, culprit.torchrun_failure(lines)) == (code, words)


# ---- VRAM as people say it -------------------------------------------------------------

# memory.total as nvidia-smi reports it, and the size on the box
REAL_CARDS = [
    (8192, 8),     # RTX 3070 / 4060 Ti 8 GB
    (8188, 8),     # RTX 2080 8 GB
    (11264, 11),   # GTX 1080 Ti
    (11019, 11),   # RTX 2080 Ti
    (12282, 12),   # RTX 4070 / 3060 12 GB
    (15360, 16),   # T4 (ECC on)
    (16376, 16),   # RTX 4060 Ti 16 GB / A4000
    (24564, 24),   # RTX 3090 / 4090
    (40960, 40),   # A100 40 GB SXM
    (46068, 48),   # L40S (ECC on)
    (81559, 80),   # H100 80 GB
    (95830, 94),   # H100 NVL
    (143771, 141),  # H200
]


@pytest.mark.parametrize(("mib", "gb"), REAL_CARDS)
def test_real_cards_have_their_marketed_size(mib: int, gb: int) -> None:
    assert vram.nominal_gb(mib * MIB) == gb
    assert vram.meets(mib * MIB, gb * GIB)  # --min-vram <size on the box> takes the card
    assert not vram.meets(mib * MIB, (gb + 1) * GIB)


def test_twelve_gb_card_is_not_taken_for_sixteen() -> None:
    assert not vram.meets(12282 * MIB, 16 * GIB)
    assert vram.meets(12282 * MIB, int(11.5 * GIB))


@pytest.mark.parametrize("mib", [1, 700, 12300, 13000, 30000, 300 * 1024 + 5])
def test_cards_matching_no_marketed_size_keep_their_reported_size(mib: int) -> None:
    assert vram.nominal_bytes(mib * MIB) == mib * MIB


def test_nominal_size_never_shrinks_and_grows_with_the_card() -> None:
    sizes = [vram.nominal_bytes(m * MIB) for m in range(1, 300 * 1024, 97)]
    assert all(b >= m * MIB for b, m in zip(sizes, range(1, 300 * 1024, 97), strict=True))
    assert sizes == sorted(sizes)
    assert vram.nominal_bytes(0) == 0

