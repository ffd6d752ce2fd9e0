"""Fixtures for tests against real OpenSSH sshd nodes (see tests/sshd_nodes.py).

``ssh_nodes`` (session scope) is an SshdCluster: ``ssh_nodes[0..2]`` are SshdNode objects
named node0/node1/node2 on 127.0.0.1/2/3 with attributes ``name host port user work_dir
bin_dir pid known_hosts identity log_path`` and helpers ``stop() start() restart()
pause() resume() host_key_line() transport(**overrides)``; ``ssh_nodes.known_hosts`` and
``ssh_nodes.identity`` are the shared known_hosts file and client key. A test that stops
or pauses a node uses ``node_guard``, which brings every node back afterwards.
``ssh_transports`` gives one SshTransport per node, closed after the test.
``job_processes``/``wait_no_job_processes`` (fixture ``no_job_processes``) find a job's
processes by UGRO_JOB_ID in /proc/*/environ, never by name.
``partition`` cuts a node's SSH path for real (iptables DROP on its address and port, see
tests/partition.py) and heals every cut after the test, whatever happened.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partition import Partitions
from sshd_nodes import (
    SshdCluster,
    SshdNode,
    job_processes,
    start_sshd_nodes,
    wait_no_job_processes,
)

from ugrod.nodes.transport.ssh import SshTransport

__all__ = ["SshdCluster", "SshdNode", "job_processes", "wait_no_job_processes"]


@pytest.fixture(scope="session")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdCluster]:
    """Three real sshd nodes for the whole test session."""
    cluster = start_sshd_nodes(tmp_path_factory.mktemp("sshd"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def node_guard(ssh_nodes: SshdCluster) -> Iterator[SshdCluster]:
    """Restart any node a test stopped or paused, so later tests find all three up."""
    yield ssh_nodes
    for node in ssh_nodes:
        node.resume()
        if not node.running:
            node.start()


@pytest.fixture(scope="session")
def _partitions() -> Iterator[Partitions]:
    parts = Partitions()
    try:
        yield parts
    finally:
        parts.close()


@pytest.fixture
def partition(_partitions: Partitions) -> Iterator[Partitions]:
    """Real partitions of the sshd nodes' SSH paths; every cut is healed after the test."""
    try:
        yield _partitions
    finally:
        _partitions.heal_all()


@pytest.fixture
async def ssh_transports(ssh_nodes: SshdCluster) -> AsyncIterator[list[SshTransport]]:
    transports = [node.transport() for node in ssh_nodes]
    try:
        yield transports
    finally:
        for t in transports:
            await t.close()


@pytest.fixture
def no_job_processes() -> Callable[..., None]:
    """``no_job_processes(job_id, timeout_s=5)`` fails if a process of the job remains."""
    return wait_no_job_processes
