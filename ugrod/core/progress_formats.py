"""Training progress read from a rank's own output, and the names of training metrics (pure).

A job that prints its progress needs no UGRO code: ugrod reads the log of one rank
(``progress.rank``, default 0) as it streams in and recognises these formats
(``progress.formats``; docs/frameworks.md shows each):

``hf``    the Hugging Face Trainer's log dictionaries, as its ProgressCallback and
          PrinterCallback print them (also inside tqdm's carriage-return output):
          ``{'loss': '0.6931', 'grad_norm': '1.2', 'learning_rate': '5e-05', 'epoch': '0.5'}``;
          every value must be a number or a quoted number.
``json``  a JSON object alone on a line: ``{"step": 10, "loss": 0.5}``; numbers are taken,
          strings, booleans and nulls are passed over, nesting makes the line not count.
``tqdm``  the step of a progress bar without a description, ``  5%|▌   | 1/20 [00:00<...]``
          (the Trainer's training bar): ``step`` = 1. Only the first such bar's total is
          followed; bars with another total (evaluation) or a description are ignored.
``kv``    (off by default) a line made only of ``name=number`` pairs:
          ``step=10 loss=0.25 lr=1e-4``.

Never a guessed value: a line that does not match a format exactly is ignored as a
whole; lines longer than ``MAX_LINE`` bytes, numbers that are not finite, and names
that do not normalise are dropped. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, MutableMapping

import msgspec

FORMATS = ("hf", "json", "tqdm", "kv")
DEFAULT_FORMATS = ("hf", "json", "tqdm")
# The loss a job reports, in order of preference (compared after normalisation, so
# train/loss is train_loss); a job's own ``progress.loss_key`` replaces them.
DEFAULT_LOSS_KEYS = ("loss", "train_loss", "train/loss")
MAX_LINE = 4096  # bytes; a longer line is not progress
MAX_NAME = 64  # characters of a normalised metric name
MAX_NAMES = 64  # distinct metric names kept per job (the rest are counted, not kept)
MAX_VALUES_PER_LINE = 64
MAX_LINES_PER_FEED = 32  # candidate lines read per chunk of output (the newest)
RESERVED = frozenset({"ts", "event", "rank", "path"})

Number = int | float

_NON_NAME = re.compile(r"[^A-Za-z0-9_]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


_names: dict[str, str | None] = {}  # a cache: jobs repeat the same few names


def normalise_name(name: str) -> str | None:
    """``train/loss`` -> ``train_loss``; None for a name that cannot be a metric name."""
    try:
        return _names[name]
    except KeyError:
        pass
    out = _normalise(name)
    if len(_names) >= 4096:
        _names.clear()
    _names[name] = out
    return out


def _normalise(name: str) -> str | None:
    if not name or len(name) > 4 * MAX_NAME:
        return None
    out = _NON_NAME.sub("_", name).strip("_")
    if not out or len(out) > MAX_NAME or not _NAME.match(out) or out in RESERVED:
        return None
    return out


def finite(value: object) -> Number | None:
    """The value as a JSON number when it is a finite int or float (bools are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def check_formats(names: Iterable[str]) -> tuple[str, ...]:
    """The formats named (``none`` alone: parsing off); ValueError names a wrong one."""
    out: list[str] = []
    for n in names:
        if n == "none":
            continue
        if n not in FORMATS:
            raise ValueError(f"unknown progress format {n!r}: expected some of "
                             f"{', '.join(FORMATS)}, or none")
        if n not in out:
            out.append(n)
    return tuple(out)


# ---- one line -------------------------------------------------------------------------

_NUM = rb"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TQDM = re.compile(rb" *(\d{1,3})%\|[^|]{0,400}\| *(\d{1,15})/(\d{1,15}) \[[^\]\r\n]{0,400}\]")
_KV_ITEM = rb"([A-Za-z_][A-Za-z0-9_./\-]{0,127})=(" + _NUM + rb")"
_KV_LINE = re.compile(_KV_ITEM + rb"(?:,? +" + _KV_ITEM + rb")*")
_KV_ITEMS = re.compile(_KV_ITEM)
_json_line = msgspec.json.Decoder(dict[str, int | float | str | bool | None])
# strict=False: "0.5" is read as 0.5 (the Trainer prints its floats as strings), "nan" as nan
_hf_line = msgspec.json.Decoder(dict[str, int | float], strict=False)


def _number(text: bytes) -> Number | None:
    if text[:1] == b"'":
        text = text[1:-1]
    try:
        if text.isdigit() or (text[:1] == b"-" and text[1:].isdigit()):
            return finite(int(text))
        return finite(float(text))
    except ValueError:
        return None


def _named(pairs: Iterable[tuple[str, Number | None]]) -> dict[str, Number]:
    out: dict[str, Number] = {}
    for raw, value in pairs:
        name = normalise_name(raw)
        if name is not None and value is not None and len(out) < MAX_VALUES_PER_LINE:
            out[name] = value
    return out


def parse_hf(line: bytes) -> dict[str, Number] | None:
    """A Trainer log dictionary, or None.

    Python's repr of a flat dict of str keys and number (or number-string) values, with
    no double quote or backslash in it, is JSON once its single quotes are double
    quotes: msgspec checks the shape and reads each value as a number in one pass
    (a string that is not a JSON number, a bool or a None rejects the whole line).
    """
    if line[:2] != b"{'" or b'"' in line or b"\\" in line:
        return None
    try:
        doc = _hf_line.decode(line.replace(b"'", b'"'))
    except (msgspec.DecodeError, RecursionError):
        return None
    return _finite_named(doc)


def _finite_named(doc: Mapping[str, object]) -> dict[str, Number] | None:
    out: dict[str, Number] = {}
    for raw, value in doc.items():
        number = finite(value)
        if number is None:
            continue
        name = normalise_name(raw)
        if name is not None and len(out) < MAX_VALUES_PER_LINE:
            out[name] = number
    return out or None


def parse_json(line: bytes) -> dict[str, Number] | None:
    """A flat JSON object's numbers, or None."""
    try:
        doc = _json_line.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    return _finite_named(doc)


def parse_kv(line: bytes) -> dict[str, Number] | None:
    """``name=number`` pairs, or None."""
    if not _KV_LINE.fullmatch(line):
        return None
    return _named((k.decode(), _number(v)) for k, v in _KV_ITEMS.findall(line)) or None


def parse_tqdm(line: bytes) -> tuple[int, int] | None:
    """(n, total) of a description-less tqdm bar, or None."""
    m = _TQDM.fullmatch(line)
    if m is None:
        return None
    n, total = int(m.group(2)), int(m.group(3))
    return (n, total) if 0 <= n <= total else None


# ---- a stream -------------------------------------------------------------------------

# One byte each: bytes.find of one byte is memchr (~100x faster than of two on this path).
_MARKERS = {"hf": b"{", "json": b"{", "kv": b"="}
_BAR = b"%|"
_EOL = re.compile(rb"[\r\n]")


class ProgressReader:
    """Feeds on a rank log's bytes; gives the progress records its complete lines hold.

    ``resumed``: the stream starts somewhere in the log (after a reconnect or a restart),
    so everything before the first line break is a part of a line and is skipped.
    Memory is bounded: at most ``MAX_LINE`` bytes of an unfinished line are kept.
    """

    def __init__(self, formats: Iterable[str] = DEFAULT_FORMATS, *, resumed: bool = False
                 ) -> None:
        self.formats = check_formats(formats)
        self._markers = sorted({_MARKERS[f] for f in self.formats if f in _MARKERS})
        self._bars = "tqdm" in self.formats
        self._tail = b""
        self._skip = resumed  # inside a line whose start was not seen
        self._bar_total: int | None = None
        self._bar_step: int | None = None
        self.ignored = 0  # candidate lines that matched no format
        self.skipped = 0  # chunks with more candidate lines than MAX_LINES_PER_FEED

    def feed(self, data: bytes) -> list[dict[str, Number]]:
        """The records of the lines that ``data`` completes, in log order."""
        if not self.formats or not data:
            return []
        end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if end < 0:  # no line ends here
            if not self._skip:
                self._tail += data
                if len(self._tail) > MAX_LINE:
                    self._tail, self._skip = b"", True
            return []
        head = 0
        buf = data
        if self._skip:
            first = _EOL.search(data)
            head = first.end() if first is not None else len(data)
            self._skip = False
        elif self._tail:
            buf = self._tail + data
            end += len(self._tail)
        rest = buf[end + 1:]
        if len(rest) > MAX_LINE:
            self._tail, self._skip = b"", True
        else:
            self._tail = rest
        return self._lines(buf, head, end)

    def _lines(self, buf: bytes, head: int, end: int) -> list[dict[str, Number]]:
        starts: set[int] = set()
        spans: list[tuple[int, int]] = []
        for marker in self._markers:
            # Newest first, at most MAX_LINES_PER_FEED lines: a flood of candidate lines
            # costs ugrod a bounded amount per chunk (older ones are skipped and counted).
            i = buf.rfind(marker, head, end)
            for _ in range(MAX_LINES_PER_FEED):
                if i < 0:
                    break
                start, stop = self._line(buf, head, end, i)
                if start >= 0 and start not in starts:
                    starts.add(start)
                    spans.append((start, stop))
                i = buf.rfind(marker, head, start if start >= 0 else i)
            else:
                if i >= 0:
                    self.skipped += 1
        if self._bars:
            # Bars are redrawn many times a second and each says all a bar can: only the
            # newest one of these bytes counts (the last few are tried, newest first).
            i = buf.rfind(_BAR, head, end)
            for _ in range(4):
                if i < 0:
                    break
                start, stop = self._line(buf, head, end, i)
                if start >= 0 and parse_tqdm(buf[start:stop].rstrip(b" \t")) is not None:
                    if start not in starts:
                        spans.append((start, stop))
                    break
                i = buf.rfind(_BAR, head, max(start, head))
        spans.sort()
        out: list[dict[str, Number]] = []
        for start, stop in spans:
            record = self.parse(buf[start:stop].rstrip(b" \t"))
            if record is None:
                self.ignored += 1
            elif record:
                out.append(record)
        return out

    @staticmethod
    def _line(buf: bytes, head: int, end: int, i: int) -> tuple[int, int]:
        """(start, stop) of the line holding position i; start -1 when too long."""
        lo = max(head, i - MAX_LINE)
        sep = max(buf.rfind(b"\n", lo, i), buf.rfind(b"\r", lo, i))
        # no line start within MAX_LINE bytes: the line is too long
        start = sep + 1 if sep >= 0 else (head if lo == head else -1)
        m = _EOL.search(buf, i, end + 1)
        stop = m.start() if m is not None else end
        return (start if stop - start <= MAX_LINE else -1), stop

    def parse(self, line: bytes) -> dict[str, Number] | None:
        """One line's record; ``{}`` for a bar that adds nothing; None: not progress."""
        for fmt in self.formats:
            if fmt == "tqdm":
                bar = parse_tqdm(line.lstrip(b"\x1b[A"))
                if bar is None:
                    continue
                n, total = bar
                if self._bar_total is None:
                    self._bar_total = total
                if total != self._bar_total or n == self._bar_step:
                    return {}
                self._bar_step = n
                return {"step": n}
            record = (parse_hf if fmt == "hf" else parse_json if fmt == "json"
                      else parse_kv)(line)
            if record is not None:
                return record
        return None


# ---- the latest values of a job --------------------------------------------------------


def merge(latest: MutableMapping[str, Number], values: Mapping[str, object],
          loss_keys: tuple[str, ...] = DEFAULT_LOSS_KEYS, max_names: int = MAX_NAMES) -> int:
    """Fold one report's numbers into ``latest``; ``loss`` follows the job's loss key.

    Names are normalised; a name that would take ``latest`` past ``max_names`` is
    dropped. Returns how many values were dropped.
    """
    dropped = 0
    seen: dict[str, Number] = {}
    for raw, value in values.items():
        number = finite(value)
        name = normalise_name(raw) if isinstance(raw, str) else None
        if number is None or name is None:
            dropped += isinstance(raw, str) and raw not in RESERVED
            continue
        seen[name] = number
        if name not in latest and len(latest) >= max_names:
            dropped += 1
            continue
        latest[name] = number
    for key in loss_keys:
        name = normalise_name(key)
        if name is not None and name in seen:
            latest["loss"] = seen[name]
            break
    return dropped


def loss_keys(loss_key: str | None) -> tuple[str, ...]:
    """The names a job's loss is read from: its own key, else the defaults."""
    return (loss_key,) if loss_key else DEFAULT_LOSS_KEYS
