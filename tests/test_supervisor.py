"""The supervisor restarts a crashed task and stops every task when asked."""

from __future__ import annotations

import asyncio

import pytest

from workers.runtime import supervisor as supervision
from workers.runtime.supervisor import Supervisor


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


async def test_a_task_that_returns_is_restarted_without_the_crash_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stage replacing its consumer after a broker reset returns; after two resets the crash
    # back-off had grown to seconds, and a stage sat idle that long with records waiting.
    monkeypatch.setattr(supervision, "RESTART_PAUSE", 0.05)
    supervisor = Supervisor()
    runs: list[float] = []

    async def returns(stop: asyncio.Event) -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) >= 6:
            await stop.wait()

    running = asyncio.create_task(supervisor.run({"returns": returns}))
    for _ in range(50):  # 5 s; with a doubling pause from 0.05 s the sixth run comes after 1.55 s
        if len(runs) >= 6:
            break
        await asyncio.sleep(0.1)
    supervisor.stop.set()
    await asyncio.wait_for(running, timeout=15)
    pauses = [later - earlier for earlier, later in zip(runs, runs[1:], strict=False)]
    assert len(runs) == 6, pauses
    assert max(pauses) < 0.5, pauses  # each one the first pause again, never doubled
