"""Progress read from rank output: exact formats only, bounded, finite (ugrod/progress_formats)."""

from __future__ import annotations

import pytest

from ugrod.core import progress_formats as pf

TRAINER = (
    b"\r  0%|          | 0/20 [00:00<?, ?it/s]"
    b"\r  5%|5         | 1/20 [00:00<00:05,  3.40it/s]"
    b"\r                                                  \r"
    b"{'loss': '0.6931', 'grad_norm': '1.234', 'learning_rate': '5e-05', 'epoch': '0.5'}\n"
    b"\r 10%|#         | 2/20 [00:01<00:05,  3.40it/s]"
    b"\r 10%|#         | 2/20 [00:01<00:05,  3.40it/s]"  # a redraw: no new record
    b"\r{'train_runtime': '3.1', 'train_samples_per_second': 51, 'train_loss': '0.7', "
    b"'epoch': '1'}\n"
)


def read(data: bytes, formats: tuple[str, ...] = pf.DEFAULT_FORMATS, chunk: int = 0,
         **kw: bool) -> list[dict[str, pf.Number]]:
    r = pf.ProgressReader(formats, **kw)
    step = chunk or len(data)
    return [rec for i in range(0, len(data), step) for rec in r.feed(data[i:i + step])]


@pytest.mark.parametrize("chunk", [0, 1, 7, 64])
def test_trainer_output_in_any_chunking(chunk: int) -> None:
    got = read(TRAINER, chunk=chunk)
    assert [r for r in got if "step" not in r] == [
        {"loss": 0.6931, "grad_norm": 1.234, "learning_rate": 5e-05, "epoch": 0.5},
        {"train_runtime": 3.1, "train_samples_per_second": 51, "train_loss": 0.7, "epoch": 1},
    ]
    # Bars: the newest of each piece of output counts; steps only go forward, to the last.
    steps = [r["step"] for r in got if "step" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 2 and set(steps) <= {0, 1, 2}
    if chunk == 1:
        assert steps == [0, 1, 2]


def test_json_lines_with_slash_names_and_skipped_strings() -> None:
    got = read(b'{"step": 3, "train/loss": 0.5, "tag": "x", "ok": true, "none": null}\n')
    assert got == [{"step": 3, "train_loss": 0.5}]


def test_kv_only_when_asked() -> None:
    line = b"step=10 loss=0.25 lr=1e-4\n"
    assert read(line) == []
    assert read(line, ("kv",)) == [{"step": 10, "loss": 0.25, "lr": 1e-4}]


@pytest.mark.parametrize("line", [
    b"{'loss': nan}",                                   # not a number
    b"{'loss': 'nan', 'x': '1e999'}",                   # not finite: nothing left
    b"{'loss': 0.5, 'model': 'gpt2'}",                  # a value that is not a number
    b"{'loss': 0.5}} trailing",                         # not the whole line
    b"prefix {'loss': 0.5}",
    b'{"loss": 1e999}',
    b'{"a": {"b": 1}}',                                 # nested
    b'{"a": [1, 2]}',
    b"[" * 3000 + b"]" * 3000,                          # deep nesting
    b'{"loss": 0.5',                                    # torn
    b'{"' + b"x" * 5000 + b'": 1}',                     # too long
    b"{'lo\xff': 0.5}",                                 # not UTF-8 in the name
    b"Map: 100%|##########| 64/64 [00:00<00:00, 100.00 examples/s]",  # a described bar
    b"  5%|5         | 30/20 [00:00<00:05,  3.40it/s]",  # n > total
    b"{'': 1}",
    b"{'///': 1}",
])
def test_hostile_or_malformed_lines_give_nothing(line: bytes) -> None:
    assert read(line + b"\n", pf.FORMATS) == []


def test_only_the_first_bars_total_is_followed() -> None:
    data = (b"\r 50%|#####     | 5/10 [00:01<00:01,  3.40it/s]\n"
            b"\r 40%|####      | 2/5 [00:00<00:00, 12.0it/s]\n"      # evaluation bar
            b"\r 60%|######    | 6/10 [00:01<00:01,  3.40it/s]\n")
    assert read(data, chunk=1) == [{"step": 5}, {"step": 6}]


def test_a_resumed_stream_skips_the_partial_first_line() -> None:
    assert read(b"s': 0.5}\n{'loss': 0.25}\n", resumed=True) == [{"loss": 0.25}]


def test_an_endless_line_is_bounded_and_dropped() -> None:
    r = pf.ProgressReader(pf.DEFAULT_FORMATS)
    for _ in range(100):
        assert r.feed(b"{'loss': 0.5" + b"0" * 1000) == []
    assert len(r._tail) <= pf.MAX_LINE
    assert r.feed(b"}\n{'loss': 0.25}\n") == [{"loss": 0.25}]


def test_parsing_off() -> None:
    assert read(TRAINER, ()) == []
    assert pf.check_formats(["none"]) == ()
    with pytest.raises(ValueError, match="unknown progress format 'xml'"):
        pf.check_formats(["xml"])


def test_names_and_loss_keys() -> None:
    assert pf.normalise_name("train/loss") == "train_loss"
    assert pf.normalise_name("eval/f1@0.5") == "eval_f1_0_5"
    assert pf.normalise_name("1st") is None and pf.normalise_name("ts") is None
    assert pf.normalise_name("x" * 65) is None
    latest: dict[str, pf.Number] = {}
    pf.merge(latest, {"step": 1, "train/loss": 0.5, "bad": float("nan"), "s": "x"})
    assert latest == {"step": 1, "train_loss": 0.5, "loss": 0.5}
    latest = {}
    pf.merge(latest, {"loss": 9.0, "val/loss": 0.25}, pf.loss_keys("val/loss"))
    assert latest["loss"] == 0.25 and latest["val_loss"] == 0.25


def test_names_per_job_are_capped() -> None:
    latest: dict[str, pf.Number] = {}
    dropped = pf.merge(latest, {f"m{i}": i for i in range(100)}, max_names=10)
    assert len(latest) == 10 and dropped == 90
    pf.merge(latest, {"m0": 5})  # a known name still updates
    assert latest["m0"] == 5


def test_a_flood_of_candidate_lines_costs_a_bounded_amount_and_keeps_the_newest() -> None:
    r = pf.ProgressReader(pf.DEFAULT_FORMATS)
    got = r.feed(b"".join(b"{'loss': %d}\n" % i for i in range(100)))
    assert len(got) == pf.MAX_LINES_PER_FEED and r.skipped == 1
    assert [g["loss"] for g in got] == list(range(100 - pf.MAX_LINES_PER_FEED, 100))
