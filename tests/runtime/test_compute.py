"""Executor sizing, the priority slots that let uploads overlap compute, and the
emulated slower processor."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
import torch

from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.model.progressive import ProgressiveModel
from spinn.runtime import compute
from spinn.runtime.compute import ComputeSlots, plan_workers, slow_down


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


class _Sleeps:
    """The real clocks; sleep records what it was asked instead of sleeping."""

    perf_counter = staticmethod(time.perf_counter)
    thread_time = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


class _Clock(_Sleeps):
    """perf_counter advancing 1 s per reading, the thread's CPU time 0.5 s (half of each
    module's span went to waits, not compute)."""

    def __init__(self) -> None:
        super().__init__()
        self._ticks = itertools.count()
        self._cpu = itertools.count()

    def perf_counter(self) -> float:  # type: ignore[override]
        return float(next(self._ticks))

    def thread_time(self) -> float:  # type: ignore[override]
        return 0.5 * next(self._cpu)


def _loaded(checkpoint: Path) -> tuple[ProgressiveModel, torch.Tensor]:
    """The model, for inference, and an input for it."""
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    return model, torch.zeros(1, *model.input_spec.shape)


def test_slow_down_waits_in_proportion_after_every_stage_and_exit_head(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = _loaded(checkpoint)
    want = run_stages(model, x, 0, model.num_stages, ExitRule(0.0)).answer
    clock = _Clock()
    monkeypatch.setattr(compute, "time", clock)
    slow_down(model, 1.0)
    run_stages(model, x, 0, model.num_stages, ExitRule(None))
    assert clock.slept == [], "factor 1 leaves the model alone"
    slow_down(model, 4.0)
    run_stages(model, x, 0, model.num_stages, ExitRule(None))
    # Each module computed 0.5 s of its 1 s span: 1.5 s more after each of the S stages,
    # no head run; the waits in its span are not the processor's, and are not multiplied.
    assert clock.slept == [1.5] * model.num_stages
    clock.slept.clear()
    got = run_stages(model, x, 0, model.num_stages, ExitRule(0.0)).answer
    assert got is not None and want is not None and got.exit == want.exit == 0
    assert clock.slept == [1.5] * (model.exit_stages[0] + 2), "the stages and the first head"
    torch.testing.assert_close(got.probs, want.probs)  # slower, never different
    with pytest.raises(ValueError, match=r"slowdown must be in \[1, 1000\]"):
        slow_down(model, 0.5)


def test_slow_down_does_not_multiply_a_thread_that_was_not_running(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's thread stops for 0.2 s inside the first stage: as it does when the event
    # loop's thread holds the GIL for a garbage collection, or the machine preempts it.
    # A ×10 processor is not 10× slower at waiting: multiplied, that 0.2 s was 1.8 s more.
    model, x = _loaded(checkpoint)
    clock = _Sleeps()
    monkeypatch.setattr(compute, "time", clock)
    slow_down(model, 10.0)
    # Registered after slow_down's own hook, so the stop falls within the measured span.
    model.stages[0].register_forward_pre_hook(lambda module, args: time.sleep(0.2))
    run_stages(model, x, 0, 1, ExitRule(None))
    assert len(clock.slept) == 1
    assert clock.slept[0] < 0.5, f"waited {clock.slept[0]:.2f} s after a stage that computed for ms"
