"""The server's compute: a ``RunBatch`` of the server core, run in a worker thread.

Dynamic batching: requests for the same split, from any device, run as one forward pass
and are answered one by one. Two parts, after STYLE.md habit 4:

* ``run_batch`` (worker thread, torch only): stages ``[split, S)`` on a batch of
  activations with **per-sample** exit decisions.  After each exit head, the samples
  its exit answers under their own request's exit rule (``spinn.model.exits``) are answered and
  leave the batch (DESIGN.md part 1, exit policy); the rest go on.  After every stage the samples
  whose request was cancelled leave too (DESIGN.md part 7: a running request stops at
  the next stage boundary).  Eval-mode layers treat samples independently, so a batched
  answer equals the unbatched one up to float rounding (tests/runtime/test_batching.py).
* which requests wait and form a batch is the server core's (pure) decision
  (``spinn.runtime.server_queue.SplitGroups``); ``run_jobs`` runs what it hands out,
  one request alone or a batch, and stops a request whose ``cancelled`` flag the core
  set at the next stage boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spinn.model.exits import ExitRule, answering
from spinn.model.inference import iter_stages
from spinn.model.progressive import ProgressiveModel
from spinn.runtime.server_core import ComputeResult, Job, Outcome, RunBatch, Stopped

__all__ = ["SampleAnswer", "run_batch", "run_jobs", "to_device"]


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


def run_jobs(
    model: ProgressiveModel, device: torch.device, top_k: int, batch: RunBatch
) -> list[ComputeResult]:
    """Worker thread: stages ``[split, S)`` of the batch's jobs, one result per job.

    A job whose ``cancelled`` flag is set before it starts is ``Stopped(None)``; one
    cancelled while it runs stops at the next stage boundary (DESIGN.md part 7). An
    exception fails the whole batch (the core answers each request ERROR(INTERNAL)).
    """
    if not batch.batched:
        return [_run_one(model, device, top_k, job) for job in batch.jobs]
    jobs = batch.jobs
    results: list[ComputeResult] = [Stopped(None)] * len(jobs)
    # Cancelled requests are removed before the forward pass.
    live = [i for i, job in enumerate(jobs) if not job.cancelled]
    if not live:
        return results
    x = to_device([jobs[i].activation for i in live], device)
    answers = run_batch(
        model, x, batch.split, [jobs[i].rule for i in live], lambda j: jobs[live[j]].cancelled
    )
    for i, answer in zip(live, answers, strict=True):
        if answer is None:
            results[i] = Stopped(0)
            continue
        top = torch.topk(answer.probs, min(top_k, answer.probs.numel()))
        results[i] = Outcome(
            answer.exit_index,
            tuple(int(c) for c in top.indices),
            tuple(float(p) for p in top.values),
            answer.compute_s * 1e3,
            answer.stages_run,
        )
    return results


def _run_one(model: ProgressiveModel, device: torch.device, top_k: int, job: Job) -> ComputeResult:
    """One request alone, checking its ``cancelled`` flag after every stage."""
    if job.cancelled:
        return Stopped(None)
    t0 = time.perf_counter()
    stages = 0
    x = to_device([job.activation], device)
    for step in iter_stages(model, x, job.split, model.num_stages, job.rule):
        stages += 1
        if step.answer is not None:
            top = step.answer.topk(top_k)
            return Outcome(
                step.answer.exit,
                tuple(c for c, _ in top),
                tuple(p for _, p in top),
                (time.perf_counter() - t0) * 1e3,
                stages,
            )
        if job.cancelled:
            return Stopped(stages)  # at the stage boundary (DESIGN.md part 7)
    raise RuntimeError(f"request {job.request_id}: no exit answered after the last stage")
