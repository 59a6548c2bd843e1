"""Which server the device tries next: failover over several addresses, with backoff.

DESIGN.md part 7: when the server fails the device keeps answering locally and
reconnects in the background.  With several servers an
outage of one should cost one reconnect, not a backoff: the device moves straight on
to the next address, and only waits (exponential backoff with jitter, ``Backoff``)
once every address has failed in a row, so a fleet that is down entirely is not
hammered. A link that drops within ``STABLE_LINK_S`` of connecting, having answered
nothing, counts as a failure too: a crash-looping server is backed off, not
reconnected in a tight loop.  Pure logic: no clock, no sockets; the jitter's
randomness is in ``Backoff``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from spinn.runtime.backoff import Backoff

__all__ = ["STABLE_LINK_S", "Address", "ServerRotation", "parse_address", "parse_addresses"]

STABLE_LINK_S = 2.0
"""A connection that lasts this long counts as a success (it resets the backoff), as
does one on which the server answered a request."""

Address = tuple[str, int]
"""A server address: host and TCP port."""


def parse_address(value: str) -> Address:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as an address; ValueError names the fault."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port must be a number in {value!r}") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"port must be in 1..65535, got {number} in {value!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    inner = host[1:-1] if bracketed else host
    if not inner or "[" in inner or "]" in inner or (":" in inner and not bracketed):
        raise ValueError(f"an IPv6 address goes in brackets, [ADDRESS]:PORT, got {value!r}")
    return inner, number


def parse_addresses(values: str | list[str] | tuple[str, ...]) -> tuple[Address, ...]:
    """Addresses from ``HOST:PORT`` items, each possibly a comma-separated list."""
    items = [values] if isinstance(values, str) else list(values)
    out = [parse_address(part) for item in items for part in item.split(",") if part.strip()]
    if not out:
        raise ValueError("no server address given")
    return tuple(out)


@dataclass(slots=True)
class ServerRotation:
    """The address to connect to next, moving on after each failure."""

    addresses: tuple[Address, ...]
    """Servers in order of preference; the first is tried first."""
    backoff: Backoff = field(default_factory=Backoff)
    """Delays once a whole round of addresses has failed."""
    index: int = 0
    """Position of ``current`` in ``addresses``."""
    failures_in_round: int = 0
    """Consecutive failed connection attempts (refused, or links that ended unanswered
    within ``STABLE_LINK_S``) since the last good link or full round."""

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("ServerRotation needs at least one address")

    @property
    def current(self) -> Address:
        """The address to connect to now."""
        return self.addresses[self.index]

    def connect_failed(self) -> float:
        """Connecting to ``current`` failed: move to the next address.

        Returns the seconds to wait first: 0 while untried addresses remain in this
        round, a backoff delay once all of them have failed.
        """
        self.index = (self.index + 1) % len(self.addresses)
        self.failures_in_round += 1
        if self.failures_in_round >= len(self.addresses):
            self.failures_in_round = 0
            return self.backoff.next_delay()
        return 0.0

    def connection_lost(self, up_s: float = math.inf, answers: int = 0) -> float:
        """An established connection to ``current`` ended after ``up_s`` seconds, in which
        the server answered ``answers`` requests: try the next address first.

        Returns the seconds to wait first. A link that answered a request or lasted
        ``STABLE_LINK_S`` was a success: the next outage starts afresh and the reconnect
        is immediate (with one address, to the same server). Any other counts as a failed
        attempt, so a server that accepts and then crashes, again and again, is retried
        with backoff like one that refuses, not in a tight loop.
        """
        if answers > 0 or up_s >= STABLE_LINK_S:
            self.index = (self.index + 1) % len(self.addresses)
            self.failures_in_round = 0
            self.backoff.reset()
            return 0.0
        return self.connect_failed()
