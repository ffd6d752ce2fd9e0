"""The canonical codec: round trips, refusals, versions, timestamps."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ugrod.core import codec
from ugrod.core import events as ev

ALICE = ev.Actor(user="alice", uid=1000)


def rec(event: ev.Event, seq: int = 1, ts: float = 1_763_800_000.25) -> ev.Record:
    return ev.Record(seq=seq, ts=ts, actor=ALICE, event=event)


def test_line_is_plain_json_with_the_envelope_fields_in_order() -> None:
    line = codec.encode(rec(ev.JobHeld(job="exp1"), seq=7))
    assert line.startswith(b'{"seq":7,"v":1,"type":"job_held","ts":"')
    obj = json.loads(line)
    assert obj["actor"] == {"user": "alice", "uid": 1000}
    assert obj["data"] == {"job": "exp1"}
    assert obj["ts"].endswith("Z")
    assert codec.decode(line) == rec(ev.JobHeld(job="exp1"), seq=7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(bad: float) -> None:
    with pytest.raises(ev.EventError, match="round trip"):
        codec.encode(rec(ev.NodeHealthChanged(node="a", health="healthy", score=bad)))


def test_lone_surrogates_and_huge_ints_are_refused() -> None:
    with pytest.raises(ev.EventError):
        codec.encode(rec(ev.JobWaiting(job="a", reason="\ud800")))
    with pytest.raises(ev.EventError):
        codec.encode(rec(ev.RankStarted(job="a", attempt=1, rank=0, node="n", pid=2**70)))


@pytest.mark.parametrize(("line", "message"), [
    (b'{"seq":1,"v":1,"type":"job_teleported","ts":"2026-01-01T00:00:00.000000Z",'
     b'"actor":{"user":"x"},"data":{}}', "unknown event type 'job_teleported'"),
    (b'{"seq":1,"v":9,"type":"job_held","ts":"2026-01-01T00:00:00.000000Z",'
     b'"actor":{"user":"x"},"data":{"job":"a"}}', "newer than this ugrod knows"),
    (b'{"seq":1,"v":1,"type":"job_held","ts":"2026-01-01T00:00:00.000000Z",'
     b'"actor":{"user":"x"},"data":{"job":"a","extra":1}}', "bad job_held data"),
    (b'{"seq":1,"v":1,"type":"job_held","ts":"yesterday",'
     b'"actor":{"user":"x"},"data":{"job":"a"}}', "bad timestamp"),
    (b'{"seq":"1"}', "not an event line"),
    (b'\xff\xfe', "not an event line"),
])
def test_unreadable_lines_are_refused_not_guessed(line: bytes, message: str) -> None:
    with pytest.raises(ev.EventError, match=message):
        codec.decode(line)


def test_old_versions_are_upcast_on_read() -> None:
    # A pretend v0 of job_held called the field "name"; the upcaster renames it.
    ev.UPCASTERS[("job_held", 0)] = lambda d: {"job": d.pop("name"), **d}
    try:
        cls = ev.EVENT_TYPES["job_held"]
        line = (b'{"seq":1,"v":0,"type":"job_held","ts":"2026-01-01T00:00:00.000000Z",'
                b'"actor":{"user":"x"},"data":{"name":"a"}}')
        with pytest.raises(ev.EventError):  # v0 < 1 is out of range for v1 types
            codec.decode(line)
        cls.schema_version = 2  # type: ignore[misc]
        ev.UPCASTERS[("job_held", 1)] = lambda d: d
        line1 = line.replace(b'"v":0', b'"v":1').replace(b'"name"', b'"job"')
        assert codec.decode(line1).event == ev.JobHeld(job="a")
    finally:
        ev.EVENT_TYPES["job_held"].schema_version = 1  # type: ignore[misc]
        ev.UPCASTERS.clear()


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamps_round_trip_at_microseconds(ts: float) -> None:
    text = codec.format_ts(ts)
    assert len(text) == 27
    back = codec.parse_ts(text)
    assert abs(back - ts) <= 1e-6 + 1e-9 * ts
    assert codec.format_ts(back) == text


def test_format_ts_matches_datetime() -> None:
    from datetime import UTC, datetime
    for ts in (0.0, 951782400.5, 1_763_800_000.123456, 4102444800.0):
        want = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert codec.format_ts(ts) == want


def test_every_event_type_round_trips() -> None:
    spec = ev.JobSpec(argv=("a", "b c", "ünï"), env={"K": "v"}, params={"lr": "1e-5"})
    samples: list[ev.Event] = [
        ev.NodeAdded(node=ev.NodeSpec(name="n", host="h", gpus=(ev.Gpu(index=0),))),
        ev.JobSubmitted(job="j", spec=spec, request_id="r1"),
        ev.JobPlaced(job="j", attempt=1, ranks=(ev.RankPlacement(rank=0, node="n", gpus=(0,)),)),
        ev.JobEnded(job="j", attempt=1, outcome="retrying", retry_at=5.5, last_step=3),
        ev.SweepCreated(sweep="s", jobs=("j",), params={"lr": ("1", "2")}),
        ev.AlertRaised(node="n", alert="gpu_temperature", severity="critical", message="hot",
                       sample={"t": 86, "gpus": [1, 2]}),
    ]
    for i, e in enumerate(samples, 1):
        r = rec(e, seq=i)
        assert codec.decode(codec.encode(r)) == r


@pytest.mark.parametrize("text", [
    "2026-11-22T10:00:00.00000xZ", "2026-11-22T10:00:61.000000Z", "2026-11-22T10:00:00.000000",
    "x" * 27, "2026-11-22T10:00:00,000000Z", "2026-11-22T10:0\u0663:00.000000Z",
    "2026-13-22T10:00:00.000000Z", "2026-11-22T24:00:00.000000Z", "", "2026-11-22 10:00:00Z",
])
def test_malformed_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ev.EventError, match="bad timestamp"):
        codec.parse_ts(text)


def test_integers_at_the_64_bit_edges_are_written_and_past_them_refused() -> None:
    for pid in (2**63 - 1, 2**64 - 1, -(2**63), 10**18):  # 19-20 digits that fit
        r = rec(ev.RankStarted(job="a", attempt=1, rank=0, node="n", pid=pid))
        assert codec.decode(codec.encode(r)) == r
    for pid in (2**64, -(2**63) - 1, 10**30):
        with pytest.raises(ev.EventError, match="64 bits"):
            codec.encode(rec(ev.RankStarted(job="a", attempt=1, rank=0, node="n", pid=pid)))


@given(st.sampled_from([
    b'{"seq":3,"v":1,"type":"job_held","ts":"2026-01-01T00:00:00.000000Z",'
    b'"actor":{"user":"x","uid":5},"data":{"job":"a"}}',
    b'{"seq":4,"v":1,"type":"rank_exited","ts":"2026-01-01T00:00:00.500000Z",'
    b'"actor":{"user":"ugrod","uid":null},"data":{"job":"a","attempt":1,"rank":0,'
    b'"node":"n","exit_code":-9}}',
]), st.integers(min_value=0, max_value=200), st.binary(min_size=0, max_size=3))
def test_the_one_pass_decoder_agrees_with_the_checked_one(line: bytes, at: int,
                                                            junk: bytes) -> None:
    # The fast path must accept exactly what the two-step path accepts, and read
    # it the same: splice junk anywhere into valid lines and compare.
    mutated = line[:at] + junk + line[at + len(junk):]
    try:
        want: ev.Record | str = codec._decode_checked(mutated)
    except ev.EventError as exc:
        want = str(exc)
    try:
        got: ev.Record | str = codec.decode(mutated)
    except ev.EventError as exc:
        got = str(exc)
    assert got == want


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_stamp_is_the_time_as_the_log_reads_it_back(ts: float) -> None:
    assert codec.stamp_ts(ts) == codec.parse_ts(codec.format_ts(ts))
