"""Which server the device tries next: failover over several addresses, with backoff.

DESIGN.md part 7: when the server fails the device keeps answering locally and
reconnects in the background.  With several servers an
outage of one should cost one reconnect, not a backoff: the device moves straight on
to the next address, and only waits (exponential backoff with jitter, ``Backoff``)
once every address has failed in a row, so a fleet that is down entirely is not
hammered.  Pure logic: no clock, no sockets; the jitter's randomness is in ``Backoff``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spinn.runtime.backoff import Backoff

__all__ = ["Address", "ServerRotation", "parse_address", "parse_addresses"]

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
    return host.strip("[]"), number


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
    """Consecutive failed connection attempts since the last success or full round."""

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

    def connected(self) -> None:
        """A connection to ``current`` succeeded: the next outage starts afresh."""
        self.failures_in_round = 0
        self.backoff.reset()

    def connection_lost(self) -> None:
        """An established connection to ``current`` ended: try the next address first.

        With one address this reconnects to the same server at once, as before; with
        several, a server that just died is not the first one tried again.
        """
        self.index = (self.index + 1) % len(self.addresses)
