"""The supervisor restarts a crashed task and stops every task when asked."""

from __future__ import annotations

import asyncio

from workers.supervisor import Supervisor


async def test_crashed_task_is_restarted_and_stop_ends_everything() -> None:
    supervisor = Supervisor()
    runs: list[int] = []
    steady_started = asyncio.Event()

    async def flaky(stop: asyncio.Event) -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError("boom")
        await stop.wait()

    async def steady(stop: asyncio.Event) -> None:
        steady_started.set()
        await stop.wait()

    running = asyncio.create_task(supervisor.run({"flaky": flaky, "steady": steady}))
    for _ in range(100):
        if len(runs) >= 3:
            break
        await asyncio.sleep(0.1)
    assert len(runs) == 3  # crashed twice, third run is healthy
    assert steady_started.is_set()
    assert supervisor.running == {"flaky": True, "steady": True}
    supervisor.stop.set()
    await asyncio.wait_for(running, timeout=15)
    assert supervisor.running == {"flaky": False, "steady": False}
