"""The API's middleware counts requests by route template (never the raw path)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from ugrod.config import schema as cfgmod
from ugrod.daemon import Daemon


async def test_requests_are_counted_by_route_template(short_tmp: Path) -> None:
    cfg = cfgmod.Config(nodes=cfgmod.builtin().nodes, metrics=cfgmod.MetricsConfig(enabled=False))
    sock = short_tmp / "s.sock"
    d = Daemon(cfg, None, short_tmp / "state", sock)
    runner = asyncio.create_task(d.run())
    for _ in range(200):
        if sock.exists():
            break
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
        for name in ("a1", "../../x", "b2"):
            async with s.get(f"http://u/v1/jobs/{name}") as r:
                assert r.status == 404
        async with s.post("http://u/v1/jobs", data=b"not json") as r:
            assert r.status == 400
    d._stopped.set()
    assert await asyncio.wait_for(runner, 30) == 0
    counts = {k: c.value for k, c in d.stats.api_requests.items()}
    assert counts[("/v1/jobs/{job}", "GET", "404")] == 2
    assert counts[("/v1/jobs", "POST", "400")] == 1
    assert not any("a1" in k[0] or "b2" in k[0] for k in counts)
