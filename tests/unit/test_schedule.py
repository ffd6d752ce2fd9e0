"""loops/schedule.py: every job runs on the daemon's event loop, never in a worker thread."""

from __future__ import annotations

import asyncio
import threading

from ugrod.loops.schedule import Schedule


async def test_a_plain_function_runs_on_the_loop_thread() -> None:
    seen: list[tuple[int, asyncio.AbstractEventLoop]] = []
    ran = asyncio.Event()

    def work() -> None:  # e.g. the fencer's tick: reads state, starts tasks on the loop
        seen.append((threading.get_ident(), asyncio.get_running_loop()))
        ran.set()

    sched = Schedule()
    sched.every("plain", 60, work, first_in_s=0)
    sched.start()
    try:
        async with asyncio.timeout(10):
            await ran.wait()
    finally:
        sched.stop()
    assert seen == [(threading.get_ident(), asyncio.get_running_loop())]


async def test_a_coroutine_function_is_awaited_on_the_loop() -> None:
    done = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0)
        done.set()

    sched = Schedule()
    sched.every("coro", 60, work, first_in_s=0)
    sched.start()
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        sched.stop()
