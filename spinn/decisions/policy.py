"""The policy interface: who decides ⟨split, thr_conf, precision⟩ for the next input.

docs/ARCHITECTURE.md ("Policy").  The device runtime calls ``policy.decide(now, estimates)``
before each input (or on a timer) and uses the returned ``Decision``.  The SPINN scheduler
(``spinn.decisions.scheduler.Scheduler``), the baselines of the paper's evaluation and the fixed
``--split/--thr`` setting all implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spinn.decisions.online_estimates import Estimates
from spinn.model.exits import ExitRule

__all__ = ["Decision", "FixedPolicy", "Policy"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to split, how confident an exit must be and how precisely the activation
    crosses: σ = ⟨split, thr_conf, precision⟩."""

    split: int
    """Split point s: the device runs stages [0, s), the server [s, S); 0 = server-only,
    S = device-only."""
    thr_conf: float | None
    """An early exit answers when its top-1 softmax ≥ thr_conf, a probability in [0, 1];
    None: early exits are off, only the final exit answers (``exit_rule``)."""
    reason: str = ""
    """Why this decision was taken (logged and shown in the device status line)."""
    final_exit: int | None = None
    """When set, the network is truncated after this exit and it always answers (Edgent's
    right-sized model); ``None``: the threshold rule with the backbone's own final exit."""
    bits: int | None = None
    """The precision of the upload: the activation crosses as ``sparse_uintb`` at this
    many bits a non-zero (PROTOCOL.md §6.9), where the server takes that codec; ``None``:
    lossless coding (sparse_int8 and the like, or the frame's pixels at split 0)."""

    def __post_init__(self) -> None:
        if isinstance(self.split, bool) or not isinstance(self.split, int) or self.split < 0:
            raise ValueError(f"Decision.split must be an integer >= 0, got {self.split!r}")
        try:
            rule = ExitRule(self.thr_conf)
        except ValueError as exc:
            raise ValueError(f"Decision.{exc}") from None
        object.__setattr__(self, "thr_conf", rule.thr_conf)
        fe = self.final_exit
        if fe is not None and (isinstance(fe, bool) or not isinstance(fe, int) or fe < 0):
            raise ValueError(f"Decision.final_exit must be None or an integer >= 0, got {fe!r}")
        b = self.bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8):
            raise ValueError(f"Decision.bits must be None or an integer in 1..8, got {b!r}")

    @property
    def exit_rule(self) -> ExitRule:
        """The exit rule ``thr_conf`` means."""
        return ExitRule(self.thr_conf)


@runtime_checkable
class Policy(Protocol):
    """Anything that picks a decision from the live estimates."""

    def decide(self, now: float, estimates: Estimates) -> Decision:
        """The decision for inputs starting at ``now`` (seconds, monotonic clock)."""
        ...


class FixedPolicy:
    """Always the same ⟨split, thr_conf, precision⟩, whatever the estimates
    (``--split``/``--thr``; the precision: the split's profiled width where the device
    sends sparse_uintb)."""

    def __init__(self, split: int, thr_conf: float | None, bits: int | None = None) -> None:
        self.decision = Decision(split, thr_conf, reason="fixed", bits=bits)

    def decide(self, now: float, estimates: Estimates) -> Decision:
        return self.decision

    def __repr__(self) -> str:
        d = self.decision
        return f"FixedPolicy(split={d.split}, thr_conf={d.thr_conf}, bits={d.bits})"
