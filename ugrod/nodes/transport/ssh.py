"""SshTransport: one persistent, strictly verified asyncssh connection per node.

This is the only module that imports asyncssh; its exceptions are translated into
TransportError/HostKeyError here, once. The connection is opened lazily, kept alive
with SSH keepalives, and reopened after it drops; failed attempts back off
exponentially (with jitter, capped at 30 s), and calls made while backing off fail at
once with the last error instead of hanging. Concurrent callers share one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import random
import secrets
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.utils import CryptographyDeprecationWarning

from ugrod.nodes.transport.base import (
    CommandResult,
    HostKeyError,
    NodeUnreachable,
    TransportError,
    exit_code_of,
)

with warnings.catch_warnings():
    # cryptography >= 47 deprecates DSA and asyncssh touches its DSA types at import
    # (asyncssh.crypto.misc); we never offer DSA keys. Only that warning, only there.
    warnings.filterwarnings(
        "ignore", category=CryptographyDeprecationWarning, module=r"asyncssh\.", message="DSA"
    )
    import asyncssh

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Channels that streams may hold; the rest stay free for run()/put_file().
_RESERVED_FOR_RUN = 2
# Bulk transfers (checkpoint copies) prefer AES-GCM, which OpenSSL runs in hardware on
# both ends; control connections keep asyncssh's defaults.
_BULK_WINDOW = 8 << 20
_BULK_PACKET = 64 << 10
_BULK_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                 "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr")


def host_pattern(host: str, port: int) -> str:
    """The known_hosts name of host:port (``[host]:port`` unless port 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def _short_alg(alg: str) -> str:
    return alg.removeprefix("ssh-").removeprefix("ecdsa-sha2-")


async def fetch_host_key(
    host: str, port: int, timeout_s: float, *, node: str | None = None
) -> tuple[str, str, str]:
    """Ask a server for its host key: (key type, SHA256 fingerprint, known_hosts line).

    Verifies nothing; for showing the fingerprint to a person before ``trust``. Errors
    are TransportError naming ``node`` (default: host:port).
    """
    name = node or f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout_s):
            key = await asyncssh.get_server_host_key(host, port, config=None)
    except TimeoutError as exc:
        raise TransportError(
            name, f"no SSH answer from {host}:{port} within {timeout_s:g} s"
        ) from exc
    except asyncssh.Error as exc:
        raise TransportError(
            name, f"SSH handshake with {host}:{port} failed: {exc.reason}"
        ) from exc
    except OSError as exc:
        raise TransportError(
            name, f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from exc
    if key is None:
        raise TransportError(name, f"{host}:{port} offered no host key")
    alg, blob = key.export_public_key("openssh").decode().split()[:2]
    return alg, key.get_fingerprint("sha256"), f"{host_pattern(host, port)} {alg} {blob}"


def recorded_keys(known_hosts: Path, host: str, port: int) -> list[tuple[str, str]]:
    """The keys known_hosts has for host:port: (key type, SHA256 fingerprint) each."""
    try:
        known = asyncssh.read_known_hosts(str(known_hosts))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise TransportError(f"{host}:{port}", f"cannot read known_hosts {known_hosts}: {exc}") \
            from exc
    found = [(_short_alg(k.get_algorithm()), k.get_fingerprint("sha256"))
             for k in known.match(host, host, port)[0]]
    return list(dict.fromkeys(found))  # matched by name and by address: once each


def trust(known_hosts: Path, line: str) -> int:
    """Record a known_hosts line, replacing lines for the same host name; returns how many.

    Written atomically (temp file + rename) with mode 0600 in a 0700 directory.
    """
    fields = line.split()
    if len(fields) < 3:
        raise ValueError(f"not a known_hosts line: {line!r}")
    name = fields[0]
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        old = known_hosts.read_text().splitlines()
    except FileNotFoundError:
        old = []
    kept = [ln for ln in old if not ln.split() or ln.split()[0] != name]
    text = "".join(f"{ln}\n" for ln in [*kept, " ".join(fields)])
    tmp = known_hosts.with_name(f".{known_hosts.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, known_hosts)
    return len(old) - len(kept)


@dataclass(eq=False)
class _Lane:
    """An extra connection that carries only streams (see SshTransport.open_stream)."""

    conn: asyncssh.SSHClientConnection
    streams: int = 0


class SshStream:
    """stdout of a command on a node; close() closes the channel and frees its slot."""

    def __init__(
        self,
        transport: SshTransport,
        process: asyncssh.SSHClientProcess[bytes],
        lane: _Lane | None = None,
    ) -> None:
        self._transport = transport
        self._process = process
        self._lane = lane
        self._closed = False

    async def readline(self) -> bytes:
        try:
            return await self._process.stdout.readline()
        except (asyncssh.Error, OSError) as exc:
            raise self._transport._lost(exc, "stream") from exc

    async def read(self, n: int) -> bytes:
        try:
            return await self._process.stdout.read(n)
        except (asyncssh.Error, OSError) as exc:
            raise self._transport._lost(exc, "stream") from exc

    async def write_eof(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.stdin.write_eof()

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise TransportError(self._transport.node, "stream closed")
        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
        except (asyncssh.Error, OSError) as exc:
            raise self._transport._lost(exc, "stream") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _kill_remote(self._process)
            with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
                async with asyncio.timeout(2.0):
                    await self._process.wait_closed()
        finally:
            self._transport._release_stream(self._lane)

    async def __aenter__(self) -> SshStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _kill_remote(process: asyncssh.SSHClientProcess[bytes]) -> None:
    """End a command: EOF on its stdin, SIGKILL, close the channel.

    sshd delivers the signal only for non-root logins (for root it refuses: "session
    signalling requires privilege separation"); the closed stdin and stdout are what
    a command like the rank wrapper's ``watch`` notices in any case.
    """
    with contextlib.suppress(asyncssh.Error, OSError):
        process.stdin.write_eof()
    with contextlib.suppress(asyncssh.Error, OSError):
        process.send_signal("KILL")
    process.close()


class _Login:
    """How to log in to one node: its address, account, key and the host keys trusted;
    turns every way a login fails into a TransportError that says what to fix."""

    def __init__(self, node: str, host: str, port: int, user: str, known_hosts: Path,
                 identity_file: Path | None, connect_timeout_s: float,
                 keepalive_s: float) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.user = user
        self.known_hosts = known_hosts
        self.identity_file = identity_file
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self, *, bulk: bool = False) -> asyncssh.SSHClientConnection:
        known = self._known_hosts()
        keys: object = [self._identity()] if self.identity_file else ()
        ciphers: dict[str, object] = {"encryption_algs": list(_BULK_CIPHERS)} if bulk else {}
        try:
            return await asyncssh.connect(
                self.host,
                self.port,
                username=self.user,
                known_hosts=known,
                client_keys=keys,
                agent_path=None if self.identity_file else (),
                config=None,
                connect_timeout=self.connect_timeout_s,
                keepalive_interval=self.keepalive_s,
                keepalive_count_max=3,
                **ciphers,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise await self._host_key_error(known) from exc
        except (asyncssh.KeyExchangeFailed, asyncssh.ConnectionLost,
                ConnectionResetError) as exc:
            # A server without any of the recorded key types hangs up during key exchange
            # (seen as a lost connection or a reset, depending on timing).
            if await self._key_changed(known):
                raise await self._host_key_error(known) from exc
            why = exc.reason if isinstance(exc, asyncssh.Error) else (exc.strerror or str(exc))
            raise NodeUnreachable(self.node, f"SSH to {self.where} failed: {why}") from exc
        except asyncssh.PermissionDenied as exc:
            who = (
                f"key {self.identity_file}" if self.identity_file else "the SSH agent/default keys"
            )
            raise NodeUnreachable(
                self.node,
                f"SSH login as user {self.user!r} on {self.where} was refused ({who}); "
                "check the node's user and identity_file",
            ) from exc
        except asyncssh.Error as exc:
            raise NodeUnreachable(self.node, f"SSH to {self.where} failed: {exc.reason}") from exc
        except TimeoutError as exc:
            raise NodeUnreachable(
                self.node,
                f"no SSH answer from {self.where} within {self.connect_timeout_s:g} s "
                "(host down, firewalled, or sshd hung)",
            ) from exc
        except ConnectionRefusedError as exc:
            raise NodeUnreachable(
                self.node, f"connection to {self.where} refused (is sshd running?)"
            ) from exc
        except OSError as exc:
            raise NodeUnreachable(
                self.node, f"cannot connect to {self.where}: {exc.strerror or exc}"
            ) from exc
        except ValueError as exc:  # asyncssh's word for bad options or keys
            raise NodeUnreachable(self.node, f"SSH to {self.where} failed: {exc}") from exc

    def _identity(self) -> asyncssh.SSHKey:
        try:
            return asyncssh.read_private_key(str(self.identity_file))
        except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError) as exc:
            if "passphrase" not in str(exc).lower():
                raise NodeUnreachable(
                    self.node, f"cannot load identity_file {self.identity_file}: {exc}"
                ) from exc
            raise NodeUnreachable(
                self.node,
                f"identity_file {self.identity_file} is passphrase-protected; "
                "load it into ssh-agent and leave identity_file unset",
            ) from exc
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise NodeUnreachable(
                self.node, f"cannot load identity_file {self.identity_file}: {why}"
            ) from exc

    def _known_hosts(self) -> asyncssh.SSHKnownHosts:
        try:
            return asyncssh.read_known_hosts(str(self.known_hosts))
        except FileNotFoundError:
            return asyncssh.import_known_hosts("")
        except (OSError, ValueError) as exc:
            raise NodeUnreachable(
                self.node, f"cannot read known_hosts {self.known_hosts}: {exc}"
            ) from exc

    async def _key_changed(self, known: asyncssh.SSHKnownHosts) -> bool:
        """Whether known_hosts has keys for this host but not the one the server presents."""
        recorded = known.match(self.host, self.host, self.port)[0]
        if not recorded:
            return False
        try:
            _, fingerprint, _ = await fetch_host_key(self.host, self.port, self.connect_timeout_s)
        except TransportError:
            return False
        return fingerprint not in {k.get_fingerprint("sha256") for k in recorded}

    async def _host_key_error(self, known: asyncssh.SSHKnownHosts) -> HostKeyError:
        recorded = list(known.match(self.host, self.host, self.port)[0])
        try:
            alg, fingerprint, _ = await fetch_host_key(self.host, self.port, self.connect_timeout_s)
            presented = f"{_short_alg(alg)} {fingerprint}"
        except TransportError:
            fingerprint, presented = None, "fingerprint unavailable"
        trust_hint = f"run `ugroctl nodes trust {self.node}`"
        if not recorded:
            return HostKeyError(
                self.node,
                f"host key for {self.where} is not in {self.known_hosts} ({presented}); "
                + trust_hint,
                changed=False,
                fingerprint=fingerprint,
            )
        olds = ", ".join(dict.fromkeys(
            f"{_short_alg(k.get_algorithm())} {k.get_fingerprint('sha256')}" for k in recorded
        ))
        return HostKeyError(
            self.node,
            f"host key for {self.where} CHANGED (possible man-in-the-middle attack): "
            f"{self.known_hosts} has {olds}, the server presents {presented}; if the node "
            f"was reinstalled, {trust_hint} to replace the old key",
            changed=True,
            fingerprint=fingerprint,
        )


class SshTransport:
    """Transport over SSH to one node, with a per-node limit on concurrent channels."""

    def __init__(
        self,
        node: str,
        host: str,
        port: int,
        user: str,
        known_hosts: Path,
        identity_file: Path | None = None,
        *,
        connect_timeout_s: float = 10.0,
        keepalive_s: float = 15.0,
        max_concurrency: int = 8,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.user = user
        self.known_hosts = Path(known_hosts)
        self.identity_file = identity_file
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._login = _Login(node, host, port, user, self.known_hosts, identity_file,
                             connect_timeout_s, keepalive_s)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connecting: asyncio.Task[asyncssh.SSHClientConnection] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: TransportError | None = None
        self._home: str | None = None
        self._max_concurrency = max_concurrency
        self._channels = asyncio.Semaphore(max_concurrency)
        self._lanes: list[_Lane] = []
        self._bulk: _Lane | None = None  # the connection of bulk streams, while any is open
        self._lanes_lock = asyncio.Lock()
        self._stream_slots = asyncio.Semaphore(max(1, max_concurrency - _RESERVED_FOR_RUN))

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """SSH connections open now: the main one plus extras carrying overflow streams."""
        main = self._conn is not None and not self._conn.is_closed()
        return int(main) + sum(1 for lane in self._lanes if not lane.conn.is_closed())

    def __repr__(self) -> str:
        return f"SshTransport({self.node!r}, {self.user}@{self.where})"

    # ---- connection ----------------------------------------------------------------

    async def connect(self) -> None:
        await self._connection()

    async def _connection(self) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._conn = None
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            wait_s = self._retry_at - loop.time()
            if self._last_error is not None and wait_s > 0:
                raise self._again(self._last_error, wait_s)
            self._connecting = loop.create_task(self._open())
            self._connecting.add_done_callback(self._opened)
        # shield: one caller's deadline must not cancel the attempt the others share.
        return await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task[asyncssh.SSHClientConnection]) -> None:
        self._connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._conn = task.result()
            self._failures = 0
            self._last_error = None
            return
        self._failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
        self._retry_at = asyncio.get_running_loop().time() + delay * random.uniform(0.5, 1.0)
        self._last_error = exc if isinstance(exc, TransportError) else None

    def _again(self, err: TransportError, wait_s: float) -> TransportError:
        message = f"{err.message} (next reconnect attempt in {wait_s:.1f} s)"
        if isinstance(err, HostKeyError):
            return HostKeyError(
                self.node, message, changed=err.changed, fingerprint=err.fingerprint,
                reason=err.reason,
            )
        if isinstance(err, NodeUnreachable):
            return NodeUnreachable(self.node, message, reason=err.reason)
        return TransportError(self.node, message)

    async def _open(self) -> asyncssh.SSHClientConnection:
        """A new main connection, with SFTP checked: a node without it cannot run ranks."""
        conn = await self._login.connect()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                async with conn.start_sftp_client():
                    pass
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            conn.close()
            why = "no answer" if isinstance(exc, TimeoutError) else (
                exc.reason if isinstance(exc, asyncssh.Error) else (exc.strerror or str(exc)))
            raise NodeUnreachable(
                self.node,
                f"{self.where} refused SFTP ({why}); ugrod copies its rank wrapper over "
                "SFTP: enable it in the node's sshd_config (`Subsystem sftp "
                "internal-sftp`)",
            ) from exc
        return conn

    def _lost(self, exc: BaseException, what: str) -> TransportError:
        """Translate an error on an open connection; drops the connection if it is dead."""
        if self._conn is not None and self._conn.is_closed():
            self._conn = None
        if isinstance(exc, asyncssh.ChannelOpenError):
            return TransportError(self.node, f"{what}: SSH channel refused: {exc.reason}")
        if isinstance(exc, asyncssh.Error):
            return TransportError(
                self.node, f"{what}: SSH connection to {self.where} lost: {exc.reason}"
            )
        return TransportError(self.node, f"{what}: SSH connection to {self.where} lost: {exc}")

    async def poke(self, timeout_s: float) -> bool:
        """Whether the node's sshd sends its banner on a new TCP connection within
        ``timeout_s`` (no key exchange, no login: cheap enough for every health sweep)."""
        writer = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                line = await reader.readline()
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            if writer is not None:
                writer.close()
        return line.startswith(b"SSH-")

    def forget_failures(self) -> None:
        """Let the next call connect at once (e.g. after its host key was trusted)."""
        self._last_error = None
        self._failures = 0
        self._retry_at = 0.0

    async def close(self) -> None:
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        conns = [lane.conn for lane in self._lanes]
        if self._bulk is not None:
            conns.append(self._bulk.conn)
            self._bulk = None
        if self._conn is not None:
            conns.append(self._conn)
        self._conn = None
        self._lanes.clear()
        for conn in conns:
            conn.close()
            with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
                async with asyncio.timeout(2.0):
                    await conn.wait_closed()

    # ---- commands ------------------------------------------------------------------

    async def run(self, argv: Sequence[str], *, input: bytes | None = None) -> CommandResult:
        command = shlex.join(argv)
        conn = await self._connection()
        async with self._channels:
            try:
                if input:
                    process = await conn.create_process(command, input=input, encoding=None)
                else:  # stdin at EOF, as for a local command with nothing to read
                    process = await conn.create_process(
                        command, stdin=asyncssh.DEVNULL, encoding=None
                    )
            except (asyncssh.Error, OSError) as exc:
                raise self._lost(exc, f"running {argv[0]}") from exc
            try:
                done = await process.wait()
            except (asyncssh.Error, OSError) as exc:
                process.close()
                raise self._lost(exc, f"running {argv[0]}") from exc
            except BaseException:
                _kill_remote(process)
                raise
        if done.returncode is None:
            raise self._lost(ConnectionError("channel closed without an exit status"), argv[0])
        code = exit_code_of(done.returncode)
        stdout = done.stdout if isinstance(done.stdout, bytes) else b""
        stderr = done.stderr if isinstance(done.stderr, bytes) else b""
        return CommandResult(code, stdout, stderr)

    async def open_stream(self, argv: Sequence[str], *, bulk: bool = False) -> SshStream:
        command = shlex.join(argv)
        conn = await self._connection()
        lane: _Lane | None = None
        if bulk:
            lane = await self._bulk_lane()
            conn = lane.conn
        elif self._stream_slots.locked():
            # sshd allows ~10 sessions per connection: long-lived streams past our share of
            # the main connection go over extra connections instead of waiting for a slot.
            lane = await self._overflow_lane()
            conn = lane.conn
        else:
            await self._stream_slots.acquire()  # free: returns at once
            try:
                await self._channels.acquire()
            except BaseException:
                self._stream_slots.release()
                raise
        try:
            # stdin stays open until close(): a command can watch it to notice the head leave.
            # A bulk stream gets a larger window and packets (measured: ~1.5x the
            # throughput of asyncssh's 2 MiB / 32 KiB defaults on one link).
            sizes: dict[str, int] = {"window": _BULK_WINDOW, "max_pktsize": _BULK_PACKET} \
                if bulk else {}
            process = await conn.create_process(command, encoding=None, stderr=asyncssh.DEVNULL,
                                                **sizes)
        except BaseException as exc:
            self._release_stream(lane)
            if isinstance(exc, asyncssh.Error | OSError):
                raise self._lost(exc, f"starting {argv[0]}") from exc
            raise
        return SshStream(self, process, lane)

    async def _overflow_lane(self) -> _Lane:
        """An extra connection with a free channel (opened if needed); its count is taken."""
        async with self._lanes_lock:
            for lane in self._lanes:
                if lane.streams < self._max_concurrency and not lane.conn.is_closed():
                    lane.streams += 1
                    return lane
            lane = _Lane(await self._login.connect(), streams=1)
            self._lanes.append(lane)
            return lane

    async def _bulk_lane(self) -> _Lane:
        """The connection of bulk streams (opened if none is), its count taken."""
        async with self._lanes_lock:
            lane = self._bulk
            if lane is None or lane.conn.is_closed():
                lane = self._bulk = _Lane(await self._login.connect(bulk=True))
            lane.streams += 1
            return lane

    def _release_stream(self, lane: _Lane | None) -> None:
        if lane is None:
            self._channels.release()
            self._stream_slots.release()
            return
        lane.streams -= 1
        if lane.streams == 0 and lane is self._bulk:
            self._bulk = None
            lane.conn.close()
        if lane.streams == 0 and lane in self._lanes:  # idle extra connections are not kept
            self._lanes.remove(lane)
            lane.conn.close()

    async def put_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        if path.startswith("~/"):
            path = posixpath.join(await self.home(), path[2:])
        conn = await self._connection()
        parent = posixpath.dirname(path)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{secrets.token_hex(4)}")
        async with self._channels:
            try:
                async with conn.start_sftp_client() as sftp:
                    try:
                        if parent:
                            await sftp.makedirs(parent, exist_ok=True)
                        attrs = asyncssh.SFTPAttrs(permissions=mode)
                        async with sftp.open(tmp, "wb", attrs) as f:
                            await f.write(data)
                        await sftp.chmod(tmp, mode)
                        await sftp.posix_rename(tmp, path)
                    except BaseException:
                        with contextlib.suppress(asyncssh.Error, OSError):
                            await sftp.remove(tmp)
                        raise
            except asyncssh.SFTPError as exc:
                raise TransportError(self.node, f"cannot write {path}: {exc.reason}") from exc
            except (asyncssh.Error, OSError) as exc:
                raise self._lost(exc, f"writing {path}") from exc

    async def home(self) -> str:
        if self._home is None:
            result = await self.run(["printenv", "HOME"])
            home = result.stdout.decode(errors="replace").strip()
            if not result.ok or not home.startswith("/"):
                raise TransportError(
                    self.node, f"cannot find the home directory: {result.stderr_line()}"
                )
            self._home = home
        return self._home
