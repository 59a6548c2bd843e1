"""The exit rule: which exit answers an input (docs/DESIGN.md part 1, paper section 3.1).

An early exit answers when its top-1 softmax probability reaches ``thr_conf``; the final
exit always answers.  "No early exit" (Neurosurgeon's and the single-exit baselines'
setting) is its own rule, ``ExitRule(None)``, not a threshold no probability reaches.

Every place that decides goes through ``answering``: progressive execution on the device
and the server (``spinn.model.inference.iter_stages``), the server's batches
(``spinn.runtime.batching.run_batch``), the offline threshold sweep
(``spinn.model.inference.apply_threshold``) and the forced exit of a truncated network (the
``final_exit`` of ``iter_stages``).  So they agree on every input, including a
probability that equals the threshold: it is compared exactly, in float64.

Inside the library a threshold is ``float | None`` throughout, None meaning no early exit:
the policy's ``Decision.thr_conf``, the scheduler's candidates and the offline profile's
look-ups.  Only INFER says it differently, as a probability and an ``early_exits`` flag
(PROTOCOL.md §5.3); ``ExitRule.to_wire`` and ``ExitRule.from_wire`` convert at that edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ExitRule", "answering"]


@dataclass(frozen=True, slots=True)
class ExitRule:
    """When an early exit answers; the final exit always does."""

    thr_conf: float | None
    """Least top-1 softmax probability with which an early exit answers, in [0, 1];
    None: early exits are off and only the final exit answers."""

    def __post_init__(self) -> None:
        thr = self.thr_conf
        if thr is None:
            return
        if (
            isinstance(thr, bool)
            or not isinstance(thr, int | float)
            or not 0.0 <= thr <= 1.0  # NaN fails too
        ):
            raise ValueError(
                f"thr_conf must be a probability in [0, 1] (None: no early exit), got {thr!r}"
            )
        object.__setattr__(self, "thr_conf", float(thr))

    @classmethod
    def none(cls) -> ExitRule:
        """No early exit: only the final exit answers (Neurosurgeon's and the single-exit
        baselines' setting)."""
        return cls(None)

    @classmethod
    def from_wire(cls, thr_conf: float, early_exits: bool) -> ExitRule:
        """The rule an INFER asks for: its ``thr_conf`` unless ``early_exits`` is false
        (PROTOCOL.md §5.3)."""
        return cls(thr_conf if early_exits else None)

    def to_wire(self) -> tuple[float, bool]:
        """INFER's ``(thr_conf, early_exits)`` for this rule (PROTOCOL.md §5.3).  "No early
        exit" is the flag, not a threshold: a softmax can saturate to exactly 1.0, so no
        probability would say it; the threshold sent with it is 1.0 and ignored."""
        return (1.0, False) if self.thr_conf is None else (self.thr_conf, True)

    def describe(self) -> str:
        """The rule in words for logs and tables: ``thr 0.80`` or ``no early exit``."""
        return "no early exit" if self.thr_conf is None else f"thr {self.thr_conf:.2f}"

    @property
    def early_exits(self) -> bool:
        """Whether any exit but the final one may answer."""
        return self.thr_conf is not None

    def runs_head(self, exit: int, final_exit: int) -> bool:
        """Whether exit ``exit``'s head is worth running: it could answer.  With early
        exits off only the final exit's is (the others' work would be thrown away)."""
        return exit == final_exit or self.early_exits

    def _bound(self) -> float:
        # The least probability that answers at an early exit; +inf: none does.
        return math.inf if self.thr_conf is None else self.thr_conf


def answering(
    exit: int, final_exit: int, probs: Tensor, rule: ExitRule | Sequence[ExitRule]
) -> Tensor:
    """Which inputs exit ``exit`` answers: bool, shape (N,).

    ``probs`` is that exit's softmax, shape (N, classes); ``rule`` holds for every input,
    or one rule per input (a server batch mixes requests, each with its own threshold).
    ``final_exit`` always answers: the backbone's own classifier, or the last exit of a
    truncated network (Edgent's right-sized model, ``spinn.decisions.policy.Decision.final_exit``).
    """
    import torch

    if probs.dim() != 2:
        raise ValueError(f"probs must be (inputs, classes), got {tuple(probs.shape)}")
    n = probs.shape[0]
    if exit == final_exit:
        return torch.ones(n, dtype=torch.bool, device=probs.device)
    if isinstance(rule, ExitRule):
        bound: Tensor | float = rule._bound()
    else:
        if len(rule) != n:
            raise ValueError(f"{n} inputs but {len(rule)} exit rules")
        bound = torch.tensor([r._bound() for r in rule], dtype=torch.float64, device=probs.device)
    # float64: a float32 probability compared with the threshold exactly as given.
    confident: Tensor = probs.max(dim=1).values.double() >= bound
    return confident
