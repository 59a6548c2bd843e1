"""Model compute off the event loop: thread budget, executor, priority slots, and the
emulated slower processor of the benchmarks (``slow_down``).

DESIGN.md part 7: I/O runs on asyncio, model compute in an executor pool.  On
a machine with ``C`` cores a pool of ``W`` workers each using ``T`` torch
intra-op threads stays within the cores when ``W·T ≤ C``; more would make
the workers fight over cores (oversubscription), which raises every request's
latency without adding throughput.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from torch import nn

from spinn.model.progressive import ProgressiveModel

__all__ = ["ComputeSlots", "configure_torch", "make_executor", "plan_workers", "slow_down"]


def plan_workers(
    workers: int | None, torch_threads: int, cores: int | None = None
) -> tuple[int, int]:
    """(workers, torch threads per worker) that do not oversubscribe ``cores``."""
    cores = cores or os.cpu_count() or 1
    if torch_threads < 1:
        raise ValueError(f"torch threads must be >= 1, got {torch_threads}")
    if workers is None:
        workers = max(1, cores // torch_threads)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers, torch_threads


def configure_torch(threads: int) -> None:
    """Set torch's intra-op threads for this process (shared by all pool workers)."""
    torch.set_num_threads(threads)
    try:
        # Inter-op parallelism is not used (batch 1, one op at a time per worker).
        torch.set_num_interop_threads(1)
    except RuntimeError:
        # Already fixed by earlier torch work in this process; harmless.
        pass


def make_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """The pool model compute runs in."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)


class ComputeSlots:
    """At most ``workers`` computations at once; lower ``priority`` goes first, FIFO within.

    The device uses priority 0 for the stages before the split of new frames and
    priority 1 for the local continuation of frames already uploaded, so that a
    continuation (which the server may make unnecessary) never delays the
    upload of the next frame (DESIGN.md part 7: transfer and compute overlap).
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._free = workers
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        """Computations queued for a slot."""
        return sum(1 for _, _, f in self._waiters if not f.done())

    async def acquire(self, priority: int) -> bool:
        """Wait for a slot; True when this computation had to queue for it.

        A queued computation is handed the slot the moment the previous one releases it,
        so the device's pipeline was saturated across that hand-off: the worker's idle gap
        before it is per-call overhead, not idle time (docs/SCHEDULER.md, "device busy
        time")."""
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self.release()
            raise
        return True

    def release(self) -> None:
        """Give a slot back, to the most urgent waiter if any."""
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[bool]:
        """``async with slots.slot(p) as queued:`` around one computation; ``queued`` is
        what ``acquire`` returned."""
        queued = await self.acquire(priority)
        try:
            yield queued
        finally:
            self.release()


def slow_down(model: ProgressiveModel, factor: float) -> None:
    """Make ``model`` compute as a processor ``factor``× slower would: after each stage and
    each exit head the calling thread waits (factor − 1)× the time that module took.

    Emulation for benchmarks and tests (``--slowdown`` of the device and the server;
    bench/paper.py's weaker device and loaded server): the worker stays busy for the whole
    span, so compute times, queues and the online profiler see a slower processor, while
    the production loops carry no trace of it.  Forward hooks, so the model's structure
    and weights stay as loaded; 1 leaves the model alone.

    The time a module took is the calling thread's CPU time (on a GPU: the wall time to
    its synchronised end), not the wall time: a slower processor does more slowly the
    work it runs, not the waits around it. A wall-clock span also holds the time the
    thread did not run at all: waiting for the GIL while another thread of the process
    collects garbage, or preempted on a loaded machine. Multiplied by factor − 1, a
    0.4 s garbage collection of the event loop's thread became a 2 s wait of the
    worker, and every frame queued behind it (a 0.9 frames/s run at ×5). Torch's
    intra-op threads share a module's work with the calling thread, which computes its
    part and waits at the same barriers, so its CPU time is the module's span when it runs.
    """
    if not 1.0 <= factor <= 1000.0:
        raise ValueError(f"slowdown must be in [1, 1000], got {factor}")
    if factor == 1.0:
        return
    started = threading.local()  # per worker thread: the pool shares the modules

    def before(module: nn.Module, args: Any) -> None:
        started.cpu = time.thread_time()
        started.wall = time.perf_counter()

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_cuda:
            torch.cuda.synchronize(output.device)  # the time the GPU took, not the launch
            took = time.perf_counter() - started.wall
        else:
            took = time.thread_time() - started.cpu
        time.sleep((factor - 1.0) * max(0.0, took))

    for module in (*model.stages, *model.exit_heads):
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
