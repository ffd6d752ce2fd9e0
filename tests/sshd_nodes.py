"""Real OpenSSH sshd "nodes" on 127.0.0.1-3 for integration tests and benchmarks.

Each node is its own ``sshd -D -e -f CONFIG`` run as the current user, with a generated
host key, one shared client key in authorized_keys, its own work directory, and its own
``bin`` directory first on the PATH of its sessions (sshd_config ``SetEnv``), so a test
can put a fake ``nvidia-smi`` on one node only. Nothing here is skipped: a missing sshd is
a loud failure.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ugrod.nodes.transport.ssh import SshTransport

SSHD = "/usr/sbin/sshd"
RUN_DIR_MARKER = b"UGRO_RUN_DIR="


def _require(tool: str) -> str:
    path = shutil.which(tool) or (tool if os.path.exists(tool) else None)
    if path is None:
        raise RuntimeError(
            f"{tool} not found: the SSH integration tests need OpenSSH; "
            "run `apt-get install openssh-server openssh-client`"
        )
    return path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """All descendants of pid (by walking /proc ppid links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class SshdNode:
    """One sshd; ``stop``/``start``/``pause``/``resume`` simulate a node going away."""

    name: str
    host: str
    port: int
    user: str
    dir: Path
    work_dir: Path
    bin_dir: Path
    known_hosts: Path
    identity: Path
    config_path: Path
    log_path: Path
    host_key: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _paused: list[int] = field(default_factory=list, repr=False)

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name}: sshd is not running"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        self.config_path.write_text(
            f"""Port {self.port}
ListenAddress {self.host}
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.identity.parent}/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 64
LogLevel VERBOSE
Subsystem sftp internal-sftp
SetEnv PATH={self.bin_dir}:/usr/local/bin:/usr/bin:/bin
"""
        )

    def start(self, timeout_s: float = 10.0) -> None:
        """Start sshd (again) on the same port and wait until it sends its banner."""
        assert not self.running, f"{self.name}: sshd already running"
        self.write_config()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: sshd exited with {self._proc.returncode}:\n"
                    + self.log_path.read_text()[-2000:]
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    s.settimeout(1.0)
                    if s.recv(8).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: sshd did not answer on {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill sshd and every session it serves (ranks, being detached, keep running)."""
        if self._proc is None:
            return
        self.resume()
        victims = _children(self._proc.pid)
        self._proc.terminate()
        _signal_all(victims, signal.SIGKILL)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP sshd and its sessions: the node hangs (TCP still accepts)."""
        self._paused = [self.pid, *_children(self.pid)]
        _signal_all(self._paused, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_all(self._paused, signal.SIGCONT)
        self._paused = []

    def transport(
        self,
        *,
        user: str | None = None,
        known_hosts: Path | None = None,
        identity: Path | None = None,
        connect_timeout_s: float = 5.0,
        keepalive_s: float = 15.0,
        max_concurrency: int = 8,
    ) -> SshTransport:
        """An SshTransport to this node (the fixture's known_hosts and key unless given)."""
        return SshTransport(
            self.name,
            self.host,
            self.port,
            user or self.user,
            known_hosts or self.known_hosts,
            identity or self.identity,
            connect_timeout_s=connect_timeout_s,
            keepalive_s=keepalive_s,
            max_concurrency=max_concurrency,
        )

    def host_key_line(self) -> str:
        """This node's known_hosts line (``[host]:port ssh-ed25519 AAAA...``)."""
        alg, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {alg} {blob}"

    def regenerate_host_key(self) -> None:
        """A new host key (as after a reinstall); takes effect at the next start()."""
        for path in (self.host_key, Path(f"{self.host_key}.pub")):
            path.unlink(missing_ok=True)
        _keygen(self.host_key, f"{self.name}-host")


@dataclass
class SshdCluster:
    root: Path
    nodes: list[SshdNode]
    known_hosts: Path
    identity: Path
    user: str

    def __getitem__(self, index: int) -> SshdNode:
        return self.nodes[index]

    def __iter__(self) -> Iterator[SshdNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def write_known_hosts(self) -> None:
        self.known_hosts.write_text("".join(f"{n.host_key_line()}\n" for n in self.nodes))
        self.known_hosts.chmod(0o600)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        kill_processes_under(self.root)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [_require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    path.chmod(0o600)


def start_sshd_nodes(root: Path, count: int = 3) -> SshdCluster:
    """Start ``count`` sshd nodes (node0 on 127.0.0.1, node1 on 127.0.0.2, ...) under root."""
    _require(SSHD)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    identity = root / "id_ed25519"
    _keygen(identity, "ugro-tests")
    auth = root / "authorized_keys"
    auth.write_text(Path(f"{identity}.pub").read_text())
    auth.chmod(0o600)
    user = getpass.getuser()
    cluster = SshdCluster(root, [], root / "known_hosts", identity, user)
    try:
        for i in range(count):
            name, host = f"node{i}", f"127.0.0.{i + 1}"
            ndir = root / name
            for sub in ("", "work", "bin"):
                (ndir / sub).mkdir(mode=0o700, exist_ok=True)
            node = SshdNode(
                name=name,
                host=host,
                port=0,
                user=user,
                dir=ndir,
                work_dir=ndir / "work",
                bin_dir=ndir / "bin",
                known_hosts=cluster.known_hosts,
                identity=identity,
                config_path=ndir / "sshd_config",
                log_path=ndir / "sshd.log",
                host_key=ndir / "ssh_host_ed25519_key",
            )
            _keygen(node.host_key, f"{name}-host")
            for _attempt in range(5):
                node.port = _free_port(host)
                try:
                    node.start()
                    break
                except RuntimeError:
                    if "Address already in use" not in node.log_path.read_text():
                        raise
            else:
                raise RuntimeError(f"{name}: could not find a free port for sshd")
            cluster.nodes.append(node)
        cluster.write_known_hosts()
    except BaseException:
        cluster.close()
        raise
    return cluster


# ---- processes of a job, found by environment (never by name) ---------------------------


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def processes_with_env(entry: bytes, *, prefix: bool = False) -> list[int]:
    """Live processes of this user whose environment has ``entry`` (or an entry starting so)."""
    uid = os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        env = _environ(pid)
        hit = any(e.startswith(entry) for e in env) if prefix else entry in env
        if hit and not _is_zombie(pid):
            found.append(pid)
    return found


def job_processes(job_id: str) -> list[int]:
    """Pids of live processes of this user whose environment has UGRO_JOB_ID=job_id."""
    return processes_with_env(f"UGRO_JOB_ID={job_id}".encode())


def wait_no_job_processes(job_id: str, timeout_s: float = 5.0) -> None:
    """Fail unless every process of the job is gone within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := job_processes(job_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        cmds = {
            pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            for pid in left
            if Path(f"/proc/{pid}/cmdline").exists()
        }
        raise AssertionError(f"processes of job {job_id} still running: {cmds}")


def kill_processes_under(root: Path) -> None:
    """SIGKILL ranks whose UGRO_RUN_DIR lies under root (test cleanup)."""
    _signal_all(
        processes_with_env(RUN_DIR_MARKER + str(root).encode(), prefix=True), signal.SIGKILL
    )
