"""ugroctl from a laptop through SSH (--host), and `nodes trust` recording a host key."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import Ugrod, ugroctl_argv
from tests.integration.test_multinode import write_config
from tests.sshd_nodes import SshdCluster

pytestmark = pytest.mark.timeout(180)


def ssh_wrapper(tmp: Path, nodes: SshdCluster) -> Path:
    """An `ssh` that knows the test head as "head" (the laptop's ~/.ssh/config, in effect)."""
    head = nodes[1]
    cfg = tmp / "ssh_config"
    cfg.write_text(f"Host head\n  HostName {head.host}\n  Port {head.port}\n  User {head.user}\n"
                   f"  IdentityFile {nodes.identity}\n  UserKnownHostsFile {nodes.known_hosts}\n"
                   f"  StrictHostKeyChecking yes\n  BatchMode yes\n")
    wrapper = tmp / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec ssh -F {cfg} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_remote_control_through_ssh_uses_the_remote_identity(
        ugrod: Ugrod, short_tmp: Path, ssh_nodes: SshdCluster) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("UGRO_SOCKET", "UGRO_HOST")}
    env["UGRO_SSH"] = str(ssh_wrapper(short_tmp, ssh_nodes))

    def remote(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ugroctl_argv(), "--host", "head", "--remote-socket",
                               str(ugrod.socket), *args], env=env, capture_output=True,
                              text=True, timeout=60)

    res = remote("--json", "submit", "--name", "viassh", "--", "python3", "-c", "print(42)")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["owner"] == ssh_nodes[1].user  # the SSH login's identity, from SO_PEERCRED
    assert ugrod.wait_job("viassh")["state"] == "succeeded"
    res = remote("logs", "viassh")
    assert res.returncode == 0 and res.stdout == "42\n", (res.stdout, res.stderr)
    # a head that does not answer: exit 3, saying so
    env["UGRO_SSH"] = "/bin/false"
    res = remote("status")
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert "ugroctl:" in res.stderr


def test_nodes_trust_records_the_key_after_showing_it(short_tmp: Path,
                                                       node_guard: SshdCluster) -> None:
    known = short_tmp / "known_hosts"
    known.write_text(f"{node_guard[0].host_key_line()}\n")  # node1 is unknown
    d = Ugrod(short_tmp, config=write_config(short_tmp / "c.yaml", node_guard,
                                             known_hosts=known, only=[0, 1]))
    d.start()
    try:
        res = d.ctl("nodes", "trust", "node1", input=b"n\n")
        assert res.returncode != 0
        assert "SHA256:" in res.stdout + res.stderr
        assert node_guard[1].host_key_line().split()[2] not in known.read_text()
        res = d.ctl("nodes", "trust", "node1", "--yes")
        assert res.returncode == 0, res.stderr
        assert node_guard[1].host_key_line().split()[2] in known.read_text()
        status, body = d.api("POST", "/v1/jobs", {"name": "after-trust", "nodes": 2,
                                                  "torchrun": False, "argv": ["true"]})
        assert status == 201, body
        done = d.wait_job("after-trust", timeout_s=60)
        assert done["state"] == "succeeded", done["reason"]
    finally:
        d.stop()


def test_rendezvous_port_a_node_cannot_reach_fails_fast(short_tmp: Path,
                                                         node_guard: SshdCluster) -> None:
    """cluster.master_ip names an address where rank 0 does not listen: fail before torchrun."""
    path = write_config(short_tmp / "c.yaml", node_guard)
    cfg = yaml.safe_load(path.read_text())
    cfg["cluster"]["master_ip"] = "127.0.0.9"
    path.write_text(yaml.safe_dump(cfg))
    d = Ugrod(short_tmp, config=path)
    d.start()
    try:
        t0 = time.monotonic()
        status, body = d.api("POST", "/v1/jobs", {"name": "rdzv", "nodes": 3, "torchrun": True,
                                                  "argv": ["/bin/true"]})
        assert status == 201, body
        done = d.wait_job("rdzv", timeout_s=60)
        assert done["state"] == "failed"
        assert "node1, node2 cannot reach the rendezvous port 127.0.0.9:" in done["reason"]
        assert time.monotonic() - t0 < 40  # fails fast instead of hanging in rendezvous
        assert done["ranks"] and all(r["pid"] is None for r in done["ranks"])  # nothing started
    finally:
        d.stop()


