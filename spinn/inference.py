"""Progressive execution with exit checks, shared by device, server, evaluation and profiler.

The exit rule (docs/DESIGN.md part 1, paper section 3.1): the first exit whose top-1
softmax probability is >= ``thr_conf`` answers; if none does, the final exit answers.
``iter_stages`` runs a stage range on one input and yields after every stage so the
caller can stop at a stage boundary (the server cancels there, paper section 4.4; the
device interleaves with I/O). ``run_stages`` drives it to the end. ``exit_probs`` and
``apply_threshold`` are the batched form used offline: every exit is evaluated once and
any number of thresholds are then applied to the stored probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from spinn.progressive import ProgressiveModel

__all__ = [
    "ExitAnswer",
    "StageStep",
    "StagesOutcome",
    "apply_threshold",
    "check_thr_conf",
    "exit_probs",
    "iter_stages",
    "run_stages",
]


def check_thr_conf(thr_conf: float) -> float:
    """Validate a confidence threshold: a number >= 0.

    A threshold above 1 is never reached by a softmax probability, so only the final
    exit answers: the "no early exit" setting (``spinn.profile.NO_EARLY_EXIT``).
    """
    thr = float(thr_conf)
    if not thr >= 0.0 or math.isinf(thr):
        raise ValueError(
            f"thr_conf must be a finite number >= 0 (a probability; > 1 disables early "
            f"exits), got {thr_conf!r}"
        )
    return thr


@dataclass(frozen=True)
class ExitAnswer:
    """An answer given by one exit for one input."""

    exit: int
    """Index of the exit that answered (0 .. E-1; E-1 is the final exit)."""
    stage: int
    """Stage after which that exit is read."""
    probs: Tensor
    """Softmax probabilities over the classes, shape (num_classes,)."""

    @property
    def label(self) -> int:
        return int(self.probs.argmax())

    @property
    def confidence(self) -> float:
        return float(self.probs.max())

    def topk(self, k: int = 5) -> list[tuple[int, float]]:
        """The k most probable classes as (class index, probability), best first."""
        k = max(1, min(int(k), self.probs.numel()))
        values, indices = torch.topk(self.probs, k)
        return [(int(i), float(v)) for v, i in zip(values, indices, strict=True)]


@dataclass(frozen=True)
class StageStep:
    """What one stage produced: its output activation and, if an exit answered, the answer."""

    stage: int
    """The stage just run."""
    activation: Tensor
    """Activation after the stage (batch of 1), i.e. the activation at split ``stage + 1``."""
    answer: ExitAnswer | None
    """Set when the exit read after this stage answered; execution stops there."""


@dataclass(frozen=True)
class StagesOutcome:
    """Result of running stages [start, stop) on one input."""

    answer: ExitAnswer | None
    """The answering exit, or None if no exit answered before ``stop``."""
    activation: Tensor | None
    """Activation at split ``stop`` (batch of 1) when no exit answered, else None."""
    stop: int
    """Split reached: ``stop`` if no exit answered, else the answering stage + 1."""

    @property
    def answered(self) -> bool:
        return self.answer is not None


def _as_batch(model: ProgressiveModel, x: Tensor, start: int) -> Tensor:
    expected = model.split_shape(start)
    if tuple(x.shape) == expected:
        return x.unsqueeze(0)
    if x.dim() == len(expected) + 1 and tuple(x.shape[1:]) == expected and x.shape[0] == 1:
        return x
    raise ValueError(
        f"activation at split {start} must have shape {expected} (or 1 x that), "
        f"got {tuple(x.shape)}"
    )


def iter_stages(
    model: ProgressiveModel,
    x: Tensor,
    start: int,
    stop: int,
    thr_conf: float,
    *,
    check_exits: bool = True,
) -> Iterator[StageStep]:
    """Run stages [start, stop) on one input, yielding after each stage.

    Stops after the first stage whose exit answers. The final exit (after stage S-1)
    always answers. With ``check_exits=False`` early-exit heads are skipped entirely.
    Runs under ``torch.inference_mode``; put the model in eval mode first.
    """
    thr = check_thr_conf(thr_conf)
    if not 0 <= start <= stop <= model.num_stages:
        raise ValueError(f"stage range [{start}, {stop}) invalid for {model.num_stages} stages")
    with torch.inference_mode():
        act = _as_batch(model, x, start)
    final_exit = model.num_exits - 1
    for k in range(start, stop):
        with torch.inference_mode():
            act = model.run_trunk(k, act)
            e = model.exit_at_stage(k)
            answer = None
            if e is not None and (check_exits or e == final_exit):
                probs = torch.softmax(model.run_exit(e, act)[0].float(), dim=0)
                if e == final_exit or float(probs.max()) >= thr:
                    answer = ExitAnswer(exit=e, stage=k, probs=probs)
        yield StageStep(stage=k, activation=act, answer=answer)
        if answer is not None:
            return


def run_stages(
    model: ProgressiveModel,
    x: Tensor,
    start: int,
    stop: int,
    thr_conf: float,
    *,
    check_exits: bool = True,
) -> StagesOutcome:
    """Run stages [start, stop) on one input: an exit's answer, or the activation at stop."""
    act: Tensor | None = None
    if start == stop:
        with torch.inference_mode():
            act = _as_batch(model, x, start)
    for step in iter_stages(model, x, start, stop, thr_conf, check_exits=check_exits):
        if step.answer is not None:
            return StagesOutcome(answer=step.answer, activation=None, stop=step.stage + 1)
        act = step.activation
    return StagesOutcome(answer=None, activation=act, stop=stop)


def exit_probs(model: ProgressiveModel, x: Tensor) -> Tensor:
    """Softmax probabilities of every exit for a batch: shape (E, N, num_classes)."""
    with torch.inference_mode():
        return torch.stack([torch.softmax(z.float(), dim=1) for z in model(x)])


def apply_threshold(probs: Tensor, thr_conf: float) -> tuple[Tensor, Tensor]:
    """Apply the exit rule to stored probabilities (E, N, C).

    Returns ``(exit_index, label)``, each of shape (N,): the first exit whose top-1
    probability is >= thr_conf (the final exit if none), and that exit's top-1 class.
    """
    thr = check_thr_conf(thr_conf)
    if probs.dim() != 3:
        raise ValueError(f"probs must be (exits, batch, classes), got {tuple(probs.shape)}")
    conf, labels = probs.max(dim=2)  # (E, N)
    confident = conf >= thr
    confident[-1] = True  # the final exit always answers
    exit_index = confident.to(torch.int8).argmax(dim=0)  # first True along exits
    label = labels.gather(0, exit_index.long().unsqueeze(0))[0]
    return exit_index.long(), label
