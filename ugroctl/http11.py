"""The small part of HTTP/1.1 that ugroctl speaks to ugrod, over any stream socket.

Why not ``http.client``: importing it costs ~14 ms here (it pulls in
``email.parser`` and ``ssl``), a third of the whole start-up budget of
``ugroctl status`` (≤ 1.5x ``python -c 'import click'``). This module imports
nothing beyond what click already loaded. It sends one request at a time on a
kept-alive connection and reads answers framed by Content-Length, chunked
transfer coding, or the end of the connection; anything else is a
``BadResponse`` quoting what came.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator, Mapping

MAX_LINE = 65536
MAX_HEADERS = 100


class BadResponse(Exception):
    """The peer's answer is not HTTP/1.x as ugrod writes it."""


class Closed(Exception):
    """The peer closed the connection before sending a status line."""


def _shown(raw: bytes) -> str:
    text = raw[:120].decode("utf-8", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))


class Response:
    """Status, headers (lower-case names) and a body read on demand."""

    def __init__(self, reader: io.BufferedReader, status: int, reason: str,
                 headers: dict[str, str], head_only: bool = False) -> None:
        self._r = reader
        self.status = status
        self.reason = reason
        self.headers = headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._left: int | None = None  # bytes left in a Content-Length body
        self._chunk_left = 0
        self._done = head_only or status in (204, 304) or 100 <= status < 200
        self.will_close = headers.get("connection", "").lower() == "close"
        if not self.chunked and not self._done:
            length = headers.get("content-length")
            if length is not None:
                if not length.strip().isdigit():
                    raise BadResponse(f"bad Content-Length {length!r}")
                self._left = int(length)
                self._done = self._left == 0
            else:
                self.will_close = True  # the body ends when the peer closes

    @property
    def complete(self) -> bool:
        """The whole body has been read (the connection may carry the next request)."""
        return self._done

    def _readline(self) -> bytes:
        line: bytes = self._r.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise BadResponse("a line longer than 64 KiB")
        return line

    def _read(self, n: int) -> bytes:
        data: bytes = self._r.read(n)
        if len(data) < n:
            raise BadResponse(f"the answer was cut off ({len(data)} of {n} bytes)")
        return data

    def read_some(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        if self._done:
            return b""
        if self.chunked:
            if self._chunk_left == 0:
                size_line = self._readline()
                if not size_line:
                    raise BadResponse("the connection closed inside a chunked body")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadResponse(f"bad chunk size line {_shown(size_line)}") from None
                if size == 0:
                    while self._readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._done = True
                    return b""
                self._chunk_left = size
            data = self._r.read1(min(self._chunk_left, MAX_LINE))
            if not data:
                raise BadResponse("the connection closed inside a chunk")
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and self._readline() not in (b"\r\n", b"\n"):
                raise BadResponse("a chunk did not end with CRLF")
            return bytes(data)
        if self._left is not None:
            data = self._r.read1(min(self._left, MAX_LINE))
            if not data:
                raise BadResponse(f"the answer was cut off ({self._left} bytes missing)")
            self._left -= len(data)
            self._done = self._left == 0
            return bytes(data)
        data = self._r.read1(MAX_LINE)
        if not data:
            self._done = True
        return bytes(data)

    def read(self) -> bytes:
        """The whole (rest of the) body."""
        if self._left is not None and not self.chunked and not self._done:
            data = self._read(self._left)
            self._left, self._done = 0, True
            return data
        parts = []
        while piece := self.read_some():
            parts.append(piece)
        return b"".join(parts)

    def lines(self) -> Iterator[bytes]:
        """The body line by line (each with its newline; the last maybe without)."""
        pending = b""
        while piece := self.read_some():
            pending += piece
            if b"\n" in pending:
                *whole, pending = pending.split(b"\n")
                for line in whole:
                    yield line + b"\n"
        if pending:
            yield pending


class Connection:
    """One stream socket carrying requests one after another; ``connect()`` makes it."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._reader: io.BufferedReader | None = None
        self._response: Response | None = None

    def connect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._reader = None
        self._response = None
        if sock is not None:
            sock.close()

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Response:
        """Send one request and read the answer's status line and headers."""
        if self._response is not None and not self._response.complete:
            raise RuntimeError("the previous response was not read to its end")
        if self.sock is None:
            self.connect()
            assert self.sock is not None
            self._reader = self.sock.makefile("rb")
        lines = [f"{method} {url} HTTP/1.1", "Host: localhost"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if body and len(body) > 65536:  # no copy of a big body (a --sync upload)
            self.sock.sendall(head)
            self.sock.sendall(body)
        else:
            self.sock.sendall(head + body if body else head)
        resp = self._read_head(method == "HEAD")
        self._response = resp
        return resp

    def _read_head(self, head_only: bool) -> Response:
        reader = self._reader
        assert reader is not None
        status_line = reader.readline(MAX_LINE + 1)
        if not status_line:
            raise Closed("closed the connection without an answer")
        if len(status_line) > MAX_LINE:
            raise BadResponse("a status line longer than 64 KiB")
        parts = status_line.split(None, 2)
        if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.")
                or not parts[1].isdigit() or len(parts[1]) != 3):
            raise BadResponse(f"not an HTTP status line: {_shown(status_line)}")
        status = int(parts[1])
        reason = parts[2].strip().decode("latin-1") if len(parts) > 2 else ""
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = reader.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                break
            if not line or len(line) > MAX_LINE:
                raise BadResponse("the headers were cut off or too long")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name.strip():
                raise BadResponse(f"not a header line: {_shown(line)}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise BadResponse(f"more than {MAX_HEADERS} headers")
        resp = Response(reader, status, reason, headers, head_only)
        if status == 100:  # never sent by ugrod (no Expect:), but harmless to skip
            return self._read_head(head_only)
        return resp
