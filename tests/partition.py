"""Real network partitions for tests: TCP to one sshd node's address and port is dropped.

``cut(node)`` inserts iptables rules on the OUTPUT chain (loopback traffic passes it once
each way) that DROP, not reject, every TCP packet to ``host:port`` and from it: the SSH
path to that node goes silent exactly as when a management link fails, while every other
port of that address (the ranks' rendezvous and collectives) still works. The rules live
in a chain of their own per test session (``UGRO-CUT-<pid>``), so removing them never
touches anyone else's, and ``heal_all`` at the end removes whatever a failed test left.

Use the ``partition`` fixture (tests/integration/conftest.py): ``partition.cut(node)``,
``partition.heal(node)``, or ``with partition.cutting(node): ...``; it heals every cut
after the test whatever happened. Needs root and iptables (scripts/test.sh installs it);
a missing iptables is a loud failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Protocol


class Endpoint(Protocol):
    """What a cut needs of a node: its address and sshd port (an SshdNode has both)."""

    name: str
    host: str
    port: int


def _iptables() -> str:
    path = shutil.which("iptables") or ("/usr/sbin/iptables"
                                        if os.path.exists("/usr/sbin/iptables") else None)
    if path is None:
        raise RuntimeError("iptables not found: the partition tests need it "
                           "(`apt-get install iptables`, as scripts/test.sh does)")
    return path


class Partitions:
    """The cuts of one test session: a chain of DROP rules jumped to from OUTPUT."""

    def __init__(self) -> None:
        self.iptables = _iptables()
        self.chain = f"UGRO-CUT-{os.getpid()}"
        self._cut: dict[str, list[str]] = {}  # node name -> the rule's match arguments
        self._drop_stale_chains()
        self._ipt("-N", self.chain, check=False)  # exists already: fine (same pid reused)
        if self._ipt("-C", "OUTPUT", "-j", self.chain, check=False).returncode != 0:
            self._ipt("-I", "OUTPUT", "1", "-j", self.chain)

    def _drop_stale_chains(self) -> None:
        """Remove the chains of sessions that died without closing theirs (killed, or an
        INTERNALERROR): their DROP rules would cut whatever reuses those ports later."""
        listed = self._ipt("-S", check=False).stdout.split()
        for name in {w for w in listed if w.startswith("UGRO-CUT-")} - {self.chain}:
            pid = name.removeprefix("UGRO-CUT-")
            if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                continue  # a session running now
            while self._ipt("-D", "OUTPUT", "-j", name, check=False).returncode == 0:
                pass
            self._ipt("-F", name, check=False)
            self._ipt("-X", name, check=False)

    def _ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([self.iptables, "-w", "5", *args], capture_output=True,
                             text=True, timeout=30)
        if check and res.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)}: {res.stderr.strip()}")
        return res

    @staticmethod
    def _rules(node: Endpoint) -> list[list[str]]:
        return [["-p", "tcp", "-d", node.host, "--dport", str(node.port), "-j", "DROP"],
                ["-p", "tcp", "-s", node.host, "--sport", str(node.port), "-j", "DROP"]]

    def cut(self, node: Endpoint) -> None:
        """Drop TCP to and from the node's sshd (both directions; other ports untouched)."""
        if node.name in self._cut:
            return
        for rule in self._rules(node):
            self._ipt("-A", self.chain, *rule)
        self._cut[node.name] = [node.host, str(node.port)]

    def heal(self, node: Endpoint) -> None:
        """Remove the node's cut (a no-op if it has none)."""
        if self._cut.pop(node.name, None) is None:
            return
        for rule in self._rules(node):
            while self._ipt("-D", self.chain, *rule, check=False).returncode == 0:
                pass

    def is_cut(self, node: Endpoint) -> bool:
        return node.name in self._cut

    @contextlib.contextmanager
    def cutting(self, node: Endpoint) -> Iterator[None]:
        self.cut(node)
        try:
            yield
        finally:
            self.heal(node)

    def heal_all(self) -> None:
        """Remove every rule of this session's chain (the fixture's clean-up)."""
        self._cut.clear()
        self._ipt("-F", self.chain, check=False)

    def close(self) -> None:
        """Remove the chain and its jump (end of the session)."""
        self.heal_all()
        while self._ipt("-D", "OUTPUT", "-j", self.chain, check=False).returncode == 0:
            pass
        self._ipt("-X", self.chain, check=False)
