"""The pure link model of netshape: no clock, no sockets, no global randomness.

Every function takes ``now`` (seconds on any monotonic clock) and, where it draws, a seeded
``random.Random``, so that the same seed gives the same loss and jitter pattern and the tests
never sleep (STYLE.md, habit 3). docs/NETSHAPE.md explains the model.
"""

from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass

from tools.netshape.config import DirectionConfig, OutageSpec

__all__ = [
    "ChunkFate",
    "LinkSchedule",
    "OutagePlan",
    "OutageSchedule",
    "RateMeter",
    "TokenBucket",
    "slice_sizes",
]


class TokenBucket:
    """A token bucket in bytes that may go into debt.

    ``take(n)`` always succeeds and may leave the bucket negative; the caller then waits until
    :meth:`ready_at`, the moment its bytes are paid for. Holding a chunk until its last byte
    has been "serialised" is what a bottleneck link does, and paying debt from elapsed time
    (not from sleeps) keeps the long-run rate exact.

    ``take`` returns a ticket, the running total of bytes taken. Credit issued so far is
    ``taken + tokens``; a ticket is paid once the credit reaches it, so a chunk never waits
    for debt that other connections sharing the bucket ran up after it (FIFO service).

    After an idle spell the credit is capped at the burst. A take marked ``backlogged`` (its
    bytes were already queued while the previous chunk was being held) is capped at
    ``catchup_s`` of rate instead: a real link kept serialising while the proxy's timer
    woke late, so a late wake-up on a busy machine costs no throughput, while the burst an
    idle link offers stays small.
    """

    __slots__ = ("_rate", "_burst", "_catchup_s", "_tokens", "_last", "_taken")

    def __init__(
        self, rate_bytes_per_s: float, burst_bytes: int, now: float, catchup_s: float = 0.05
    ) -> None:
        if rate_bytes_per_s <= 0 or burst_bytes < 1 or catchup_s < 0:
            raise ValueError("token bucket needs rate > 0, burst >= 1 and catchup_s >= 0")
        self._rate = rate_bytes_per_s
        self._burst = float(burst_bytes)
        self._catchup_s = catchup_s
        self._tokens = float(burst_bytes)
        self._last = now
        self._taken = 0

    @property
    def rate(self) -> float:
        """Refill rate in bytes per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Depth in bytes."""
        return int(self._burst)

    def _catchup_cap(self) -> float:
        return max(self._burst, self._rate * self._catchup_s)

    def tokens(self, now: float) -> float:
        """Tokens an idle take would find at ``now`` (negative while in debt)."""
        self._advance(now)
        return min(self._tokens, self._burst)

    def _advance(self, now: float) -> None:
        # Uncapped here: the cap depends on whether the next take is backlogged.
        if now > self._last:
            self._tokens += (now - self._last) * self._rate
            self._last = now

    def take(self, nbytes: int, now: float, backlogged: bool = False) -> int:
        """Spend ``nbytes`` tokens at ``now``; returns the ticket to pass to :meth:`ready_at`."""
        self._advance(now)
        # Capping only ever removes credit above zero, so no outstanding ticket loses any.
        self._tokens = min(self._tokens, self._catchup_cap() if backlogged else self._burst)
        self._tokens -= nbytes
        self._taken += nbytes
        return self._taken

    def ready_at(self, now: float, ticket: int | None = None) -> float:
        """The earliest time >= now at which ``ticket`` (default: all debt) is paid for."""
        self._advance(now)
        owed = -self._tokens if ticket is None else ticket - (self._taken + self._tokens)
        if owed <= 0:
            return now
        return now + owed / self._rate

    def configure(self, rate_bytes_per_s: float, burst_bytes: int, now: float) -> None:
        """Change rate and depth live; the debt (bytes still to serialise) is kept."""
        if rate_bytes_per_s <= 0 or burst_bytes < 1:
            raise ValueError("token bucket needs rate > 0 and burst >= 1")
        self._advance(now)
        self._rate = rate_bytes_per_s
        self._burst = float(burst_bytes)
        self._tokens = min(self._tokens, self._catchup_cap())


@dataclass(frozen=True, slots=True)
class ChunkFate:
    """What the link does to one chunk."""

    due: float
    """When the chunk may be written onward."""
    lost: bool
    """Whether a segment of it was lost, i.e. it was held for a stall."""
    resume_at: float
    """When the direction may carry the next chunk (after the stall when lost)."""


class LinkSchedule:
    """Delay, jitter and loss of one direction of one connection.

    A chunk arriving at ``now`` is due at ``now + delay + jitter (+ stall if lost)``: delays
    are measured from each chunk's own arrival so they never pile up (toxiproxy's latency
    toxic does the same). TCP delivers in order, so a chunk is never due before the one
    ahead of it: a stall holds everything behind it (head-of-line blocking), and jitter never
    reorders bytes. During a stall the sender waits for its retransmission timer, so the
    bottleneck carries nothing else until ``resume_at``: loss lowers throughput as in TCP.
    """

    __slots__ = ("_rng", "_last_due", "_bad")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._last_due = -math.inf
        self._bad = False

    @property
    def in_bad_state(self) -> bool:
        """Whether the Gilbert-Elliott chain is in its bad (bursty) state."""
        return self._bad

    def _lost(self, nbytes: int, cfg: DirectionConfig) -> bool:
        segments = max(1, math.ceil(nbytes / cfg.mss_bytes))
        if cfg.ge_p == 0.0:
            if cfg.loss == 0.0:
                return False
            # P(at least one of k independent segments lost), one draw per chunk.
            return self._rng.random() < 1.0 - (1.0 - cfg.loss) ** segments
        # Gilbert-Elliott: a two-state Markov chain stepped once per segment.
        lost = False
        for _ in range(segments):
            if self._bad:
                if self._rng.random() < cfg.ge_r:
                    self._bad = False
            elif self._rng.random() < cfg.ge_p:
                self._bad = True
            p = cfg.ge_loss_bad if self._bad else cfg.loss
            if p > 0.0 and self._rng.random() < p:
                lost = True
        return lost

    def fate(self, nbytes: int, now: float, cfg: DirectionConfig) -> ChunkFate:
        """Decide when a chunk of ``nbytes`` arriving at ``now`` may leave."""
        delay = cfg.delay_s
        if cfg.jitter_s > 0.0:
            delay = max(0.0, delay + self._rng.uniform(-cfg.jitter_s, cfg.jitter_s))
        lost = self._lost(nbytes, cfg)
        stall = cfg.effective_stall if lost else 0.0
        due = max(now + stall + delay, self._last_due)
        self._last_due = due
        return ChunkFate(due=due, lost=lost, resume_at=now + stall)


def slice_sizes(nbytes: int, cfg: DirectionConfig, rng: random.Random) -> list[int]:
    """Sizes of the writes a chunk of ``nbytes`` is cut into (toxiproxy's slicer)."""
    if cfg.slice_bytes is None or nbytes <= 0:
        return [nbytes] if nbytes > 0 else []
    sizes: list[int] = []
    left = nbytes
    while left > 0:
        size = cfg.slice_bytes
        if cfg.slice_variation:
            size += rng.randint(-cfg.slice_variation, cfg.slice_variation)
        size = max(1, min(size, left))
        sizes.append(size)
        left -= size
    return sizes


class OutageSchedule:
    """Scheduled outages as a pure function of time since the proxy started."""

    __slots__ = ("_specs", "_seed")

    def __init__(self, specs: tuple[OutageSpec, ...], seed: int) -> None:
        self._specs = specs
        self._seed = seed

    def _happens(self, index: int, repetition: int, spec: OutageSpec) -> bool:
        if spec.probability >= 1.0:
            return True
        # One independent draw per repetition, keyed so that the answer does not depend on
        # when or how often it is asked.
        draw = random.Random(f"netshape-outage:{self._seed}:{index}:{repetition}").random()
        return draw < spec.probability

    def active(self, elapsed: float) -> tuple[tuple[object, ...], str, float] | None:
        """``(key, mode, end)`` of the outage active at ``elapsed`` seconds, or None.

        ``key`` identifies the window (so that a manual restore can skip the rest of it) and
        ``end`` is when it ends, in the same time base as ``elapsed``.
        """
        for index, spec in enumerate(self._specs):
            if elapsed < spec.start_s:
                continue
            if spec.period_s is None:
                repetition = 0
                start = spec.start_s
            else:
                repetition = int((elapsed - spec.start_s) // spec.period_s)
                start = spec.start_s + repetition * spec.period_s
            end = start + spec.duration_s
            if elapsed < end and self._happens(index, repetition, spec):
                return ("schedule", index, repetition), spec.mode, end
        return None


class OutagePlan:
    """Combines manual outages, scheduled ones and trace outages into one desired mode.

    A manual outage wins over automatic ones. ``restore`` ends the manual outage and skips
    the rest of whichever automatic window is active at that moment.
    """

    __slots__ = ("_manual_mode", "_manual_until", "_skipped")

    def __init__(self) -> None:
        self._manual_mode: str | None = None
        self._manual_until: float | None = None
        self._skipped: set[tuple[object, ...]] = set()

    def trigger(self, mode: str, now: float, duration_s: float | None) -> None:
        """Start a manual outage now, until ``restore`` or for ``duration_s`` seconds."""
        self._manual_mode = mode
        self._manual_until = None if duration_s is None else now + duration_s

    def restore(self, auto: tuple[tuple[object, ...], str] | None) -> None:
        """End the manual outage and skip the automatic window ``auto`` (if any)."""
        self._manual_mode = None
        self._manual_until = None
        if auto is not None:
            self._skipped.add(auto[0])

    def desired(self, now: float, auto: tuple[tuple[object, ...], str] | None) -> str | None:
        """The outage mode that should be in force at ``now`` (None = link up)."""
        if self._manual_mode is not None:
            if self._manual_until is None or now < self._manual_until:
                return self._manual_mode
            self._manual_mode = None
            self._manual_until = None
        if auto is not None and auto[0] not in self._skipped:
            return auto[1]
        return None


class RateMeter:
    """Bytes per second over a sliding window, for the stats."""

    __slots__ = ("_window", "_events", "_total")

    def __init__(self, window_s: float = 1.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self._window = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def add(self, nbytes: int, now: float) -> None:
        """Record ``nbytes`` passing at ``now``."""
        self._events.append((now, nbytes))
        self._total += nbytes
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self._window
        while self._events and self._events[0][0] <= horizon:
            self._total -= self._events.popleft()[1]

    def bits_per_s(self, now: float) -> float:
        """Average rate over the last window, in bits per second."""
        self._expire(now)
        return self._total * 8.0 / self._window
