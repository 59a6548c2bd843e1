"""Progressive execution with exit checks, shared by device, server, evaluation and profiler.

The exit rule (docs/DESIGN.md part 1, paper section 3.1; ``spinn.model.exits``): the first exit
whose top-1 softmax probability is >= ``thr_conf`` answers; if none does, the final exit
answers. ``iter_stages`` runs a stage range on one input and yields after every stage so
the caller can stop at a stage boundary (the server cancels there, paper section 4.4; the
device interleaves with I/O). ``run_stages`` drives it to the end. ``exit_probs`` and
``apply_threshold`` are the batched form used offline: every exit is evaluated once and
any number of exit rules are then applied to the stored probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from spinn.model.exits import ExitRule, answering
from spinn.model.progressive import ProgressiveModel

__all__ = [
    "ExitAnswer",
    "StageStep",
    "StagesOutcome",
    "apply_threshold",
    "exit_probs",
    "iter_stages",
    "run_stages",
]


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
    rule: ExitRule,
    *,
    final_exit: int | None = None,
) -> Iterator[StageStep]:
    """Run stages [start, stop) on one input, yielding after each stage.

    Stops after the first stage whose exit answers under ``rule``. ``final_exit`` (default
    the backbone's own, E-1) always answers: a smaller one truncates the network there.
    Heads of exits that cannot answer (early exits off) are not run.
    Runs under ``torch.inference_mode``; put the model in eval mode first.
    """
    if not 0 <= start <= stop <= model.num_stages:
        raise ValueError(f"stage range [{start}, {stop}) invalid for {model.num_stages} stages")
    final = model.num_exits - 1 if final_exit is None else final_exit
    if not 0 <= final < model.num_exits:
        raise ValueError(f"final exit {final} outside 0..{model.num_exits - 1}")
    with torch.inference_mode():
        act = _as_batch(model, x, start)
    for k in range(start, stop):
        with torch.inference_mode():
            act = model.run_trunk(k, act)
            e = model.exit_at_stage(k)
            answer = None
            if e is not None and rule.runs_head(e, final):
                probs = torch.softmax(model.run_exit(e, act).float(), dim=1)
                if bool(answering(e, final, probs, rule)[0]):
                    answer = ExitAnswer(exit=e, stage=k, probs=probs[0])
        yield StageStep(stage=k, activation=act, answer=answer)
        if answer is not None:
            return


def run_stages(
    model: ProgressiveModel,
    x: Tensor,
    start: int,
    stop: int,
    rule: ExitRule,
    *,
    final_exit: int | None = None,
) -> StagesOutcome:
    """Run stages [start, stop) on one input: an exit's answer, or the activation at stop."""
    act: Tensor | None = None
    if start == stop:
        with torch.inference_mode():
            act = _as_batch(model, x, start)
    for step in iter_stages(model, x, start, stop, rule, final_exit=final_exit):
        if step.answer is not None:
            return StagesOutcome(answer=step.answer, activation=None, stop=step.stage + 1)
        act = step.activation
    return StagesOutcome(answer=None, activation=act, stop=stop)


def exit_probs(model: ProgressiveModel, x: Tensor) -> Tensor:
    """Softmax probabilities of every exit for a batch: shape (E, N, num_classes)."""
    with torch.inference_mode():
        return torch.stack([torch.softmax(z.float(), dim=1) for z in model(x)])


def apply_threshold(probs: Tensor, rule: ExitRule) -> tuple[Tensor, Tensor]:
    """Apply the exit rule to stored probabilities (E, N, C).

    Returns ``(exit_index, label)``, each of shape (N,): the first exit that answers under
    ``rule`` (the final exit if no early one does), and that exit's top-1 class.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be (exits, batch, classes), got {tuple(probs.shape)}")
    final = probs.shape[0] - 1
    confident = torch.stack([answering(e, final, probs[e], rule) for e in range(final + 1)])
    exit_index = confident.to(torch.int8).argmax(dim=0)  # first True along exits
    labels = probs.max(dim=2).indices  # (E, N)
    label = labels.gather(0, exit_index.long().unsqueeze(0))[0]
    return exit_index.long(), label
