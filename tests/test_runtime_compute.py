"""Executor sizing and the priority slots that let uploads overlap compute."""

from __future__ import annotations

import asyncio

import pytest

from spinn.runtime.compute import ComputeSlots, plan_workers


def test_plan_workers_never_oversubscribes() -> None:
    assert plan_workers(None, 1, cores=2) == (2, 1)
    assert plan_workers(None, 2, cores=2) == (1, 2)
    assert plan_workers(None, 4, cores=2) == (1, 4)  # at least one worker
    assert plan_workers(3, 1, cores=2) == (3, 1)  # explicit choice is kept
    with pytest.raises(ValueError, match="torch threads"):
        plan_workers(None, 0, cores=2)
    with pytest.raises(ValueError, match="workers"):
        plan_workers(0, 1, cores=2)


def test_lower_priority_waits_for_every_queued_higher_one() -> None:
    order: list[str] = []

    async def job(slots: ComputeSlots, name: str, priority: int) -> None:
        async with slots.slot(priority):
            order.append(name)
            await asyncio.sleep(0)

    async def main() -> None:
        slots = ComputeSlots(1)
        await slots.acquire(0)  # busy: everything below queues
        tasks = [
            asyncio.create_task(job(slots, "continuation-a", 1)),
            asyncio.create_task(job(slots, "head-1", 0)),
            asyncio.create_task(job(slots, "continuation-b", 1)),
            asyncio.create_task(job(slots, "head-2", 0)),
        ]
        await asyncio.sleep(0)
        assert slots.waiting == 4
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.waiting == 0

    asyncio.run(main())
    assert order == ["head-1", "head-2", "continuation-a", "continuation-b"]


def test_cancelled_waiter_does_not_leak_the_slot() -> None:
    async def main() -> None:
        slots = ComputeSlots(1)
        await slots.acquire(0)
        waiter = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        slots.release()
        # The slot is free again: acquiring does not block.
        await asyncio.wait_for(slots.acquire(0), 1.0)
        # Handed over at the moment of cancellation: passed on, not lost.
        late = asyncio.create_task(slots.acquire(1))
        after = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        slots.release()  # hands the slot to `late`...
        late.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await late
        await asyncio.wait_for(after, 1.0)

    asyncio.run(main())
    with pytest.raises(ValueError, match="workers"):
        ComputeSlots(0)


def test_acquire_says_whether_it_queued() -> None:
    """A computation handed the slot by its predecessor reports it queued: the device then
    counts the worker's gap before it as hand-off overhead (docs/SCHEDULER.md)."""

    async def main() -> None:
        slots = ComputeSlots(1)
        assert await slots.acquire(0) is False  # free slot: no wait
        waiter = asyncio.create_task(slots.acquire(0))
        await asyncio.sleep(0)
        slots.release()
        assert await waiter is True
        slots.release()
        async with slots.slot(1) as queued:
            assert queued is False

    asyncio.run(main())
