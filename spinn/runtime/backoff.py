"""Reconnect backoff: exponential growth with jitter, randomness injected.

DESIGN.md part 7: when the server is unreachable the device keeps answering
locally and reconnects in the background.  Exponential backoff keeps a dead
server from being hammered; the jitter keeps many devices that lost the same
server from reconnecting in lock-step ("equal jitter", half fixed, half random).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    """Delays between reconnect attempts: ``base_s * 2**n`` capped, with equal jitter."""

    base_s: float = 0.1
    """Delay scale of the first retry, in seconds."""
    cap_s: float = 5.0
    """Upper bound of the un-jittered delay, in seconds."""
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    """Source of jitter; seed it for reproducible schedules."""
    attempts: int = 0
    """Failed attempts since the last success."""

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ValueError(f"backoff base_s must be > 0, got {self.base_s}")
        if not self.cap_s >= self.base_s:
            raise ValueError(f"backoff cap_s must be >= base_s, got {self.cap_s} < {self.base_s}")

    def next_delay(self) -> float:
        """Delay before the next attempt; each call counts one more failed attempt."""
        # min() before the power keeps 2**n from overflowing after a long outage.
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(self.attempts, 60))
        self.attempts += 1
        return ceiling / 2.0 + self.rng.uniform(0.0, ceiling / 2.0)

    def reset(self) -> None:
        """A connection succeeded: the next outage starts from ``base_s`` again."""
        self.attempts = 0
