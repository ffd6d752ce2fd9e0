"""HTTP to ugrod over its Unix socket (or through ssh to a head node's socket).

Standard library only (``http11.py`` speaks the HTTP): importing aiohttp would
cost ~0.3 s on every command, http.client ~14 ms. One connection is kept for
the life of the client (keep-alive), so a command that makes two requests pays
one connect (and, with ``--host``, one ssh session).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ugroctl.http11 import BadResponse, Closed, Connection, Response

if TYPE_CHECKING:
    import subprocess

# The one exit-code table (docs/CONTRACTS.md); cli.py and tests use these names.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_FORBIDDEN = 5

_EXIT_FOR_CODE = {"not_found": EXIT_NOT_FOUND, "forbidden": EXIT_FORBIDDEN}

REMOTE_SOCKET = "/run/ugro/ugrod.sock"
TIMEOUT_S = 120.0  # a command waits for durable events and node checks; never forever


class CtlError(Exception):
    """An error for people: ``str(e)`` is the line to print, ``exit_code`` the status."""

    exit_code = EXIT_FAILED


class DaemonUnreachable(CtlError):
    """No ugrod answers at the socket (missing, refused, or the ssh hop failed)."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, where: str, detail: str = "", origin: str = "") -> None:
        self.where = where
        self.detail = detail
        extra = f" ({detail})" if detail else ""
        if where.endswith("(via ssh)"):
            elsewhere = "if it listens elsewhere there, pass --remote-socket PATH"
        else:
            elsewhere = "if it listens elsewhere, pass --socket PATH or set UGRO_SOCKET"
        super().__init__(
            f"cannot reach ugrod at {where}{extra}{origin}: is it running? start it with "
            f"`ugrod` or `systemctl start ugrod`; {elsewhere}"
        )


class ApiError(CtlError):
    """ugrod answered 4xx/5xx with ``{"error", "code"}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.exit_code = _EXIT_FOR_CODE.get(code, EXIT_FAILED)
        super().__init__(message)


class ProtocolError(CtlError):
    """The peer spoke, but not ugrod's HTTP/JSON."""


def default_socket_path() -> str:
    """ugrod's own rule when ``ugrod.config.paths`` is importable, else the same rule inlined."""
    try:
        from ugrod.config.paths import default_socket_path as daemon_rule
    except ImportError:
        pass
    else:
        return str(daemon_rule())
    if os.geteuid() == 0:
        return "/run/ugro/ugrod.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "ugro", "ugrod.sock")
    return f"/tmp/ugro-{os.getuid()}/ugrod.sock"


def new_request_id() -> str:
    """A uuid4 string: the daemon applies a command with a given id at most once."""
    import uuid

    return str(uuid.uuid4())


class UnixConnection(Connection):
    """HTTP on ugrod's Unix stream socket."""

    def __init__(self, path: str, timeout: float | None = TIMEOUT_S,
                 refused_retry_s: float = 0.0) -> None:
        super().__init__(timeout)
        self.socket_path = path
        self.refused_retry_s = refused_retry_s

    def connect(self) -> None:
        deadline = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
            except ConnectionRefusedError:
                sock.close()
                # A socket file that exists but refuses: an ssh forward between its
                # bind() and listen(). Only the tunnel asks for this grace.
                import time

                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.refused_retry_s
                if now >= deadline:
                    raise
                time.sleep(0.01)
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return


class SshTunnel:
    """``ssh -N -L LOCAL:REMOTE_SOCKET HEAD``: OpenSSH stream-local forwarding.

    Each connection to LOCAL is carried to the head node, where the user's own
    sshd session connects to ugrod's socket: ugrod sees the remote user's uid
    (SO_PEERCRED) and no TCP port is opened anywhere. LOCAL lives in a fresh
    0700 directory, so no other local user can ride on the tunnel. ssh's stderr
    and terminal stay the user's (host-key questions, passwords, errors).

    (``ssh -W /path`` would avoid the local socket, but OpenSSH 9.2 accepts a
    path there and silently forwards nothing.)
    """

    START_TIMEOUT_S = 120.0  # long enough to type a passphrase

    def __init__(self, head: str, remote_socket: str, ssh: str | None = None) -> None:
        self.head = head
        self.remote_socket = remote_socket
        self.ssh = ssh or os.environ.get("UGRO_SSH") or "ssh"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None
        self.local_path = ""

    @property
    def where(self) -> str:
        return f"{self.head}:{self.remote_socket} (via ssh)"

    def argv(self) -> list[str]:
        # "--" ends ssh's options: a HEAD starting with "-" cannot become an option.
        return [self.ssh, "-N", "-T", "-o", "ExitOnForwardFailure=yes",
                "-o", "StreamLocalBindUnlink=yes", "-o", "ControlPath=none",
                "-L", f"{self.local_path}:{self.remote_socket}", "--", self.head]

    def start(self) -> str:
        """Start ssh (once) and wait until its local socket exists; returns its path."""
        if self.proc is not None:
            if self.proc.poll() is None:
                return self.local_path
            raise DaemonUnreachable(self.where, f"ssh exited with code {self.proc.returncode}")
        import subprocess
        import tempfile
        import time

        self.dir = tempfile.mkdtemp(prefix="ugroctl-", dir="/tmp")  # short: sun_path limit
        self.local_path = os.path.join(self.dir, "s")
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            self.close()
            raise DaemonUnreachable(self.where, f"cannot run {self.ssh}: {exc.strerror}"
                                    ) from exc
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while not os.path.exists(self.local_path):
            code = self.proc.poll()
            if code is not None:
                self.close()
                raise DaemonUnreachable(self.where, f"ssh exited with code {code}")
            if time.monotonic() > deadline:
                self.close()
                raise DaemonUnreachable(self.where, "ssh did not set up the forwarding in "
                                        f"{self.START_TIMEOUT_S:.0f} s")
            time.sleep(0.01)
        return self.local_path

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            import subprocess

            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class Client:
    """One ugrod, one kept-alive connection; JSON in, JSON out, errors as CtlError."""

    def __init__(self, socket_path: str | None = None, host: str | None = None,
                 remote_socket: str | None = None, timeout: float | None = TIMEOUT_S,
                 origin: str = "") -> None:
        self.host = host or None
        self.origin = origin  # where the socket path came from, for error messages
        self.socket_path = socket_path or (REMOTE_SOCKET if self.host else None)
        self.remote_socket = remote_socket or REMOTE_SOCKET
        self.timeout = timeout
        self._conn: Connection | None = None
        self._tunnel: SshTunnel | None = None

    @property
    def where(self) -> str:
        if self.host:
            return f"{self.host}:{self.remote_socket} (via ssh)"
        return self._local_path()

    def _local_path(self) -> str:
        if self.socket_path is None:
            self.socket_path = default_socket_path()
        return self.socket_path

    def _new_connection(self, timeout: float | None) -> Connection:
        if self.host:
            if self._tunnel is None:
                self._tunnel = SshTunnel(self.host, self.remote_socket)
            return UnixConnection(self._tunnel.start(), timeout=timeout, refused_retry_s=2.0)
        return UnixConnection(self._local_path(), timeout=timeout)

    def _drop_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection and, with --host, end the ssh tunnel."""
        self._drop_conn()
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        return self._json(self._send("GET", _url(path, query), None))

    def post(self, path: str, body: Mapping[str, Any] | None = None,
             query: Mapping[str, Any] | None = None, *, idempotent: bool = False) -> Any:
        """POST with a fresh request id, so a retry cannot apply the command twice.

        The id always travels as ``X-Request-Id``; ``idempotent=True`` also puts it
        in the body as ``request_id`` (the routes whose body has that field:
        ``/v1/jobs``, ``/v1/sweeps``), and only such requests are retried on a
        fresh connection when a kept-alive one turns out closed.
        """
        request_id = new_request_id()
        payload = dict(body or {})
        if idempotent:
            payload.setdefault("request_id", request_id)
        return self._json(self._send("POST", _url(path, query), payload,
                                     request_id=request_id, retry=idempotent))

    def post_bytes(self, path: str, data: bytes) -> Any:
        """POST a raw body (a --sync upload); never retried (it is not idempotent-keyed)."""
        return self._json(self._send("POST", _url(path, None), None, raw=data, retry=False))

    def stream(self, path: str, query: Mapping[str, Any] | None = None) -> Iterator[bytes]:
        """GET a streamed (chunked) body and yield it line by line, until its end."""
        conn = self._new_connection(None)  # a follow may idle for hours
        try:
            resp = self._exchange(conn, "GET", _url(path, query), None)
            if resp.status >= 400:
                self._json(resp)  # raises ApiError
            try:
                yield from resp.lines()
            except (BadResponse, OSError) as exc:
                raise ProtocolError(f"the stream from ugrod at {self.where} broke: "
                                    f"{_describe(exc)}") from exc
        finally:
            conn.close()

    # ---- plumbing ---------------------------------------------------------

    def _send(self, method: str, url: str, body: Mapping[str, Any] | None, *,
              request_id: str | None = None, retry: bool = True,
              raw: bytes | None = None) -> Response:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        reused = self._conn is not None
        if self._conn is None:
            self._conn = self._new_connection(self.timeout)
        try:
            return self._exchange(self._conn, method, url, data, request_id)
        except DaemonUnreachable:
            self._drop_conn()
            if not (reused and retry):
                raise
        # A kept-alive connection the daemon had closed meanwhile: one fresh try
        # (GETs, and POSTs whose request_id makes a repeat harmless).
        self._conn = self._new_connection(self.timeout)
        try:
            return self._exchange(self._conn, method, url, data, request_id)
        except CtlError:
            self._drop_conn()
            raise

    def _exchange(self, conn: Connection, method: str, url: str, data: bytes | None,
                  request_id: str | None = None) -> Response:
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        try:
            return conn.request(method, url, data, headers)
        except CtlError:
            conn.close()
            raise
        except (Closed, FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                BrokenPipeError) as exc:
            conn.close()
            raise DaemonUnreachable(self.where, _describe(exc), self.origin) from exc
        except PermissionError as exc:
            conn.close()
            raise CtlError(f"permission denied on ugrod's socket {self.where}: ask an admin "
                           f"to add you to the socket's group") from exc
        except TimeoutError as exc:
            conn.close()
            raise ProtocolError(f"ugrod at {self.where} did not answer within "
                                f"{self.timeout:.0f} s") from exc
        except BadResponse as exc:
            conn.close()
            raise ProtocolError(f"the peer at {self.where} does not speak ugrod's HTTP: "
                                f"{exc}") from exc
        except OSError as exc:
            conn.close()
            raise DaemonUnreachable(self.where, _describe(exc), self.origin) from exc

    def _json(self, resp: Response) -> Any:
        try:
            raw = resp.read()
        except (BadResponse, OSError) as exc:
            self._drop_conn()
            raise ProtocolError(f"the answer from ugrod at {self.where} was cut off: "
                                f"{_describe(exc)}") from exc
        if resp.will_close:
            self._drop_conn()
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if resp.status >= 400:
            if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                raise ApiError(resp.status, str(doc.get("code", "")), doc["error"])
            raise ApiError(resp.status, _code_for_status(resp.status),
                           f"ugrod answered HTTP {resp.status} {resp.reason}: "
                           f"{_snippet(raw)}")
        if doc is None and raw.strip() != b"null":
            raise ProtocolError(f"ugrod at {self.where} sent an answer that is not JSON: "
                                f"{_snippet(raw)}")
        return doc


def _url(path: str, query: Mapping[str, Any] | None) -> str:
    if not query:
        return path
    q = [f"{quote(k)}={quote('1' if v is True else str(v))}" for k, v in query.items()
         if v is not None and v is not False]
    return f"{path}?{'&'.join(q)}" if q else path


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(text: str) -> str:
    """Percent-encode everything but RFC 3986's unreserved characters (UTF-8; lone
    surrogates as the bytes they stand for), as ``urllib.parse.quote(text, safe="")``
    does, without importing urllib (~2 ms)."""
    data = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in data)


def seg(name: str) -> str:
    """One path segment (a job or node name), percent-encoded: never a path traversal."""
    return quote(name)


def _code_for_status(status: int) -> str:
    return {403: "forbidden", 404: "not_found", 409: "conflict"}.get(status, "")


def _snippet(raw: bytes) -> str:
    text = raw[:200].decode("utf-8", "replace").strip()
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text) if text else "(empty body)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
