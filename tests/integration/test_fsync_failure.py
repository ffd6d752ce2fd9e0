"""An fsync error (EIO) inside a running ugrod: never acknowledged, ugrod exits non-zero."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import aiohttp

from ugrod.config import schema as cfgmod
from ugrod.daemon import Daemon
from ugrod.store.ledger import Ledger


async def test_eio_from_fdatasync_is_never_acknowledged(short_tmp: Path) -> None:
    fail = {"on": False}

    def fdatasync(fd: int) -> None:
        if fail["on"]:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)

    cfg = cfgmod.builtin()
    cfg = cfgmod.Config(nodes=cfg.nodes, metrics=cfgmod.MetricsConfig(enabled=False))
    sock = short_tmp / "s.sock"
    d = Daemon(cfg, None, short_tmp / "state", sock, log_options={"fdatasync": fdatasync})
    runner = asyncio.create_task(d.run())
    for _ in range(200):
        if sock.exists():
            break
        await asyncio.sleep(0.05)
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn) as s:
        r = await s.post("http://u/v1/jobs", json={"name": "ok1", "argv": ["true"],
                                                    "held": True})
        assert r.status == 201
        fail["on"] = True
        r = await s.post("http://u/v1/jobs", json={"name": "lost", "argv": ["true"],
                                                    "held": True})
        body = await r.json()
        assert r.status == 503 and body["code"] == "unavailable", body
    assert await asyncio.wait_for(runner, 30) == 1  # exits non-zero
    ledger = Ledger.open(short_tmp / "state")  # recovery from disk
    try:
        assert "ok1" in ledger.state.jobs
        assert "lost" not in ledger.state.jobs
    finally:
        ledger.log.close_sync()
