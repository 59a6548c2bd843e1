"""Dynamic batching on the server: requests for the same split, from any
device, run as one forward pass and are answered one by one.

Two parts, after STYLE.md habit 4:

* ``run_batch`` (worker thread, torch only): stages ``[split, S)`` on a batch of
  activations with **per-sample** exit decisions.  After each exit head, the samples
  its exit answers under their own request's exit rule (``spinn.exits``) are answered and
  leave the batch (DESIGN.md part 1, exit policy); the rest go on.  After every stage the samples
  whose request was cancelled leave too (DESIGN.md part 7: a running request stops at
  the next stage boundary).  Eval-mode layers treat samples independently, so a batched
  answer equals the unbatched one up to float rounding (tests/test_runtime_batching.py).
* ``Batcher`` (event loop): requests wait in one group per split.  A group is handed to
  a free worker when it holds ``max_size`` requests or its oldest has waited
  ``max_wait_s``; while every worker is busy groups keep filling, so batches grow with
  the load by themselves (the way Triton's and TorchServe's dynamic batchers behave).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from spinn.exits import ExitRule, answering
from spinn.progressive import ProgressiveModel

__all__ = ["Batcher", "SampleAnswer", "run_batch", "to_device"]

J = TypeVar("J")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class SampleAnswer:
    """The answer for one sample of a batch."""

    exit_index: int
    """Exit that answered."""
    probs: torch.Tensor
    """Softmax probabilities of that exit, on the CPU, shape (num_classes,)."""
    stages_run: int
    """Stages this sample went through."""
    compute_s: float
    """Seconds from the batch's start until this sample was answered."""


def to_device(activations: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Stack batch-1 activations into one tensor on ``device``.

    On CUDA the batch is assembled in a pinned (page-locked) host buffer and copied with
    ``non_blocking=True``: the copy is a DMA that does not stall the host thread.
    """
    pinned = device.type == "cuda"
    if not pinned and len(activations) == 1:
        return torch.from_numpy(activations[0])  # batch 1 on the CPU: no copy at all
    shape = activations[0].shape[1:]
    host = torch.empty((len(activations), *shape), dtype=torch.float32, pin_memory=pinned)
    for i, a in enumerate(activations):
        host[i].copy_(torch.from_numpy(a[0]))
    return host.to(device, non_blocking=True) if pinned else host


def run_batch(
    model: ProgressiveModel,
    x: torch.Tensor,
    split: int,
    rules: Sequence[ExitRule],
    cancelled: Callable[[int], bool] = lambda i: False,
) -> list[SampleAnswer | None]:
    """Stages ``[split, S)`` on the batch ``x``; one answer per sample, None if cancelled.

    ``rules[i]`` is sample i's exit rule. ``cancelled(i)`` is asked after every stage for
    each sample still running.  An early exit's head runs only while some sample left
    could answer there (``ExitRule.runs_head``), as on the unbatched path.
    """
    n = x.shape[0]
    if n != len(rules):
        raise ValueError(f"batch of {n} activations but {len(rules)} exit rules")
    if not 0 <= split < model.num_stages:
        raise ValueError(f"split {split} outside 0..{model.num_stages - 1}")
    answers: list[SampleAnswer | None] = [None] * n
    live = list(range(n))
    final_exit = model.num_exits - 1
    t0 = time.perf_counter()
    act = x
    with torch.inference_mode():
        for k in range(split, model.num_stages):
            act = model.run_trunk(k, act)
            stages = k - split + 1
            e = model.exit_at_stage(k)
            keep = torch.ones(len(live), dtype=torch.bool)
            if e is not None and any(rules[i].runs_head(e, final_exit) for i in live):
                probs = torch.softmax(model.run_exit(e, act).float(), dim=1)
                # Each sample under its own request's rule (DESIGN.md part 1).
                done = answering(e, final_exit, probs, [rules[i] for i in live]).cpu()
                if bool(done.any()):
                    probs_cpu = probs[done.to(probs.device)].cpu()
                    now = time.perf_counter()
                    rows = iter(probs_cpu)
                    for j in torch.nonzero(done).flatten().tolist():
                        answers[live[j]] = SampleAnswer(e, next(rows), stages, now - t0)
                    keep &= ~done
            for j, i in enumerate(live):
                if keep[j] and cancelled(i):
                    keep[j] = False  # stops at this stage boundary (DESIGN.md part 7)
            if not bool(keep.all()):
                live = [i for j, i in enumerate(live) if keep[j]]
                if not live:
                    break
                act = act[keep.to(act.device)]
    return answers


@dataclass(slots=True)
class _Waiting(Generic[J]):
    job: J
    future: asyncio.Future[Any]
    arrived_at: float
    """Loop time of submission (the wait bound)."""
    seq: int
    """Submission order: the oldest request's group goes first (FIFO across splits)."""


class Batcher(Generic[J, R]):
    """Groups jobs by key and hands each group to a free worker as one batch.

    ``run(jobs)`` is called in ``executor`` and returns one result per job, in order.
    """

    def __init__(
        self,
        run: Callable[[list[J]], list[R]],
        executor: Executor,
        workers: int,
        max_size: int,
        max_wait_s: float,
    ) -> None:
        if max_size < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError(
                f"Batcher needs max_size >= 1, workers >= 1, max_wait_s >= 0; got "
                f"{max_size}, {workers}, {max_wait_s}"
            )
        self._run = run
        self._executor = executor
        self._free = workers
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._groups: dict[Any, list[_Waiting[J]]] = {}
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        """Jobs waiting for a batch."""
        return sum(len(g) for g in self._groups.values())

    def submit(self, key: Any, job: J) -> asyncio.Future[R]:
        """Queue ``job`` in the group ``key``; the future resolves to its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._seq += 1
        self._groups.setdefault(key, []).append(_Waiting(job, future, loop.time(), self._seq))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A waiter whose future was cancelled (its task ended, e.g. at shutdown) is gone.
        for key in [k for k, g in self._groups.items() if any(w.future.done() for w in g)]:
            self._groups[key] = [w for w in self._groups[key] if not w.future.done()]
            if not self._groups[key]:
                del self._groups[key]
        while self._free > 0 and self._groups:
            ready = [
                (g[0].seq, key)
                for key, g in self._groups.items()
                if len(g) >= self.max_size or now - g[0].arrived_at >= self.max_wait_s
            ]
            if not ready:
                break
            _, key = min(ready)  # the group of the oldest request goes first
            group = self._groups[key]
            batch, rest = group[: self.max_size], group[self.max_size :]
            if rest:
                self._groups[key] = rest
            else:
                del self._groups[key]
            self._free -= 1
            done = loop.run_in_executor(self._executor, self._run, [w.job for w in batch])
            done.add_done_callback(lambda f, b=batch: self._finished(f, b))  # type: ignore[misc]
        self._arm_timer(loop, now)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._free > 0 and self._groups:
            first = min(g[0].arrived_at for g in self._groups.values())
            self._timer = loop.call_later(max(0.0, first + self.max_wait_s - now), self._dispatch)

    def _finished(self, done: asyncio.Future[list[R]], batch: list[_Waiting[J]]) -> None:
        self._free += 1
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if exc is None:
            for waiting, result in zip(batch, done.result(), strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)
        else:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
        self._dispatch()
