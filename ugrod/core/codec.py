"""The one canonical encoding of a log line, and its timestamps.

``encode`` writes a ``Record`` as the envelope ``events.py`` describes and checks
that it reads back as it was; ``decode`` reads one line in a single msgspec pass
(a tagged union of every event type), falling back to a slower path that upgrades
old versions (``events.UPCASTERS``) or names what is wrong. ``ts`` is ISO-8601 UTC
with microseconds and a Z, formatted and parsed here without the datetime module
(the replay target needs it fast). No I/O, no clock: the shell stamps ``ts``.
"""

from __future__ import annotations

import math
from typing import Any, Union

import msgspec

from ugrod.core.events import EVENT_TYPES, UPCASTERS, Actor, Event, EventError, Record


class _Envelope(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    seq: int
    v: int
    type: str
    ts: str
    actor: Actor
    data: msgspec.Raw


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_payload_decoders = {k: msgspec.json.Decoder(t) for k, t in EVENT_TYPES.items()}


def _typed_envelope(kind: str, cls: type[Event]) -> type[msgspec.Struct]:
    # The same fields as _Envelope, with ``type`` as the union's tag and ``data``
    # typed: one pass decodes envelope and payload (~3x the Raw + second decode).
    return msgspec.defstruct(
        f"_Envelope_{kind}", [("seq", int), ("v", int), ("ts", str), ("actor", Actor),
                              ("data", cls)],
        tag_field="type", tag=kind, frozen=True, gc=False, forbid_unknown_fields=True)


# Every current-version event line decodes here in one pass; anything else (an
# unknown type, an old version to upgrade, a defect to describe) takes the
# slower two-step path, which names the problem.
_typed_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[tuple(_typed_envelope(k, t) for k, t in EVENT_TYPES.items())])  # noqa: UP007


def format_ts(ts: float) -> str:
    """UTC ISO-8601 with microseconds and a Z, computed without the datetime module's tz."""
    whole = math.floor(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    minute, ss = divmod(whole, 60)
    prefix = _minute_prefixes.get(minute)
    if prefix is None:
        days, rem = divmod(minute * 60, 86400)
        y, m, d = _civil_from_days(days)
        hh, mm = divmod(rem // 60, 60)
        prefix = f"{y:04d}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:"
        if len(_minute_prefixes) > 4096:
            _minute_prefixes.clear()
        _minute_prefixes[minute] = prefix
    return f"{prefix}{ss:02d}.{micros:06d}Z"


_minute_prefixes: dict[int, str] = {}


def stamp_ts(ts: float) -> float:
    """``parse_ts(format_ts(ts))`` (the time as the log will read it back), computed directly.

    The arithmetic is the very same as the round trip's (an int plus the
    microseconds over 1e6), so a live state equals its replay to the bit.
    """
    whole = math.floor(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return whole + micros / 1_000_000


_minutes: dict[str, int] = {}


def parse_ts(text: str) -> float:
    """Inverse of ``format_ts``; raises EventError on anything else.

    Replay parses a million of these: each whole second is computed (and checked)
    once and cached, leaving one small int() per event for the microseconds.
    """
    second = _seconds.get(text[:19])
    if second is None:
        second = _second_base(text)
        if len(_seconds) > 8192:
            _seconds.clear()
        _seconds[text[:19]] = second
    micros = text[20:26]
    if len(text) != 27 or text[19] != "." or text[26] != "Z" or not (
            micros.isascii() and micros.isdigit()):
        raise EventError(f"bad timestamp {text!r}")
    return second + int(micros) / 1_000_000


_seconds: dict[str, int] = {}


def _second_base(text: str) -> int:
    ss = text[17:19]
    if len(text) < 19 or text[16] != ":" or not text[:19].isascii() or not ss.isdigit() \
            or int(ss) > 59:
        raise EventError(f"bad timestamp {text!r}")
    base = _minutes.get(text[:16])
    if base is None:
        base = _minute_base(text)
        if len(_minutes) > 4096:
            _minutes.clear()
        _minutes[text[:16]] = base
    return base + int(ss)


def _minute_base(text: str) -> int:
    try:
        if text[4] + text[7] + text[10] + text[13] != "--T:":
            raise ValueError
        parts = text[0:4], text[5:7], text[8:10], text[11:13], text[14:16]
        if not all(p.isdigit() for p in parts):
            raise ValueError
        y, m, d, hh, mm = (int(p) for p in parts)
        if not (1 <= m <= 12 and 1 <= d <= 31 and hh <= 23 and mm <= 59):
            raise ValueError
    except ValueError:
        raise EventError(f"bad timestamp {text!r}") from None
    return _days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60


def _days_from_civil(y: int, m: int, d: int) -> int:
    # Howard Hinnant's algorithm: exact for every proleptic Gregorian date.
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


def encode(record: Record) -> bytes:
    """The one canonical line (no newline). Raises EventError for what could not be read back.

    msgspec writes NaN/Infinity as null, and integers past 64 bits that other
    JSON readers would turn into floats; every line is decoded again so that
    nothing is written that replay could not read back as it was.
    """
    ev = record.event
    try:
        data = _encoder.encode(ev)
        line = _encoder.encode(
            _Envelope(record.seq, ev.schema_version, ev.kind, format_ts(record.ts), record.actor,
                      msgspec.Raw(data))
        )
    except (TypeError, ValueError, OverflowError, UnicodeError, msgspec.EncodeError) as exc:
        raise EventError(f"cannot encode {ev.kind}: {exc}") from exc
    # A run of 19+ digits is the only way a >64-bit integer can appear (a cheap
    # scan: digits become b"0", all else b" "); only then is the line searched.
    if _RUN_OF_19 in line.translate(_DIGITS) and _has_big_int(msgspec.json.decode(line)):
        raise EventError(f"cannot encode {ev.kind}: an integer outside 64 bits (other JSON "
                         f"readers would turn it into a float)")
    # decode() stamps ts as parse_ts(format_ts(ts)): seq and ts read back by
    # construction; the payload and actor are what NaN or bad text could change.
    back = decode(line)
    if back.event != ev or back.actor != record.actor:
        raise EventError(f"{ev.kind} does not survive a round trip (NaN, infinity or a lone "
                         f"surrogate in its data?)")
    return line


_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_RUN_OF_19 = b"0" * 19
_INT64 = (-(2**63), 2**64 - 1)


def _has_big_int(obj: Any) -> bool:
    if isinstance(obj, bool):
        return False
    if isinstance(obj, int):
        return not _INT64[0] <= obj <= _INT64[1]
    if isinstance(obj, dict):
        return any(_has_big_int(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_big_int(v) for v in obj)
    return False


def decode(line: bytes | memoryview) -> Record:
    """Decode one line (without newline) into a Record, upgrading old versions."""
    global _last_ts
    try:
        env = _typed_decoder.decode(line)
    except msgspec.DecodeError:
        return _decode_checked(line)
    event = env.data
    if env.v != event.schema_version:
        return _decode_checked(line)
    if env.ts != _last_ts[0]:  # the events of one command share their time
        _last_ts = (env.ts, parse_ts(env.ts))
    return Record(seq=env.seq, ts=_last_ts[1], actor=env.actor, event=event)


def _decode_checked(line: bytes | memoryview) -> Record:
    """Envelope first, then the payload by its type: says which part is wrong."""
    try:
        env = _envelope_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise EventError(f"not an event line: {exc}") from None
    cls = EVENT_TYPES.get(env.type)
    if cls is None:
        raise EventError(f"unknown event type {env.type!r} (written by a newer ugrod?)")
    try:
        if env.v == cls.schema_version:
            event = _payload_decoders[env.type].decode(env.data)
        elif env.v > cls.schema_version or env.v < 1:
            raise EventError(f"{env.type} version {env.v} is newer than this ugrod knows "
                             f"({cls.schema_version})")
        else:
            event = _upcast(cls, env.type, env.v, msgspec.json.decode(env.data))
    except msgspec.DecodeError as exc:
        raise EventError(f"bad {env.type} data: {exc}") from None
    global _last_ts
    if env.ts != _last_ts[0]:  # the events of one command share their time
        _last_ts = (env.ts, parse_ts(env.ts))
    return Record(seq=env.seq, ts=_last_ts[1], actor=env.actor, event=event)


_last_ts: tuple[str, float] = ("", 0.0)


def _upcast(cls: type[Event], kind: str, v: int, data: dict[str, Any]) -> Event:
    while v < cls.schema_version:
        step = UPCASTERS.get((kind, v))
        if step is None:
            raise EventError(f"no upgrade for {kind} version {v}")
        data, v = step(data), v + 1
    return msgspec.convert(data, cls)
