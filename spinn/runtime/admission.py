"""Fairness under hostile load: who may connect, and how much one connection may ask.

Pure pieces of the server's admission and fairness rules (docs/RUNTIME.md, "Hostile
peers"); time comes in as ``now``, so each rule is tested without sleeping:

* ``HandshakePool``: connections that have not finished the handshake ("strangers") live
  in their own bounded pool and never hold a device slot. When the pool is full, room is
  made by closing the oldest stranger that has sent nothing at all (a device sends its
  HELLO, or its TLS ClientHello, right behind the TCP handshake's last ACK, so silence is
  the mark of a hoarder), else the oldest stranger that has had ``grace_s`` to finish;
  with neither, the new connection is shed at once, as OpenSSH's MaxStartups and nginx's
  limit_conn shed. A hoarder reopening connections as fast as it can thus only evicts its
  own, while a device's connection, once it has spoken, is kept. An optional limit per
  source address keeps one address from filling the pool.
* ``TokenBucket``: the rate limit of control frames (PING, CANCEL of an unknown id).
* ``LogLimiter``: one log line per key per interval (misconfigured peers retry often).

Who computes next, round-robin by connection, is the request queue's rule
(``spinn.runtime.server_queue.FairQueue``).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Admit", "HandshakePool", "LogLimiter", "TokenBucket"]

K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token at ``now``; False when none is left (the caller is over the rate)."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class Admit(Generic[K]):
    """What to do with a new connection (``HandshakePool.admit``)."""

    admitted: bool
    evict: K | None = None
    """A stranger to close first, to make room for this one."""
    reason: str = ""
    """Why a connection is shed (for its ERROR and the log)."""


class HandshakePool(Generic[K]):
    """Connections accepted and not yet through the handshake, oldest first."""

    def __init__(self, size: int, per_address: int | None, grace_s: float) -> None:
        if size < 1:
            raise ValueError(f"handshake pool size must be >= 1, got {size}")
        self.size = size
        self.per_address = per_address
        self.grace_s = grace_s
        self._members: dict[K, tuple[str, float]] = {}
        """Insertion-ordered: the first is the oldest."""
        self._silent: dict[K, None] = {}
        """Members that have sent nothing yet, oldest first (``heard``)."""
        self._by_address: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def admit(self, key: K, address: str, now: float) -> Admit[K]:
        """Admit ``key`` from ``address`` at ``now``, or say why not; admitted keys are in
        the pool until ``leave`` (after an eviction, ``leave`` the evicted key too)."""
        if self.per_address is not None and self._by_address[address] >= self.per_address:
            return Admit(
                False,
                reason=f"{self._by_address[address]} connections from {address} "
                "already in the handshake",
            )
        evict: K | None = None
        if len(self._members) >= self.size:
            if self._silent:
                evict = next(iter(self._silent))
            else:
                oldest, (_, since) = next(iter(self._members.items()))
                if now - since < self.grace_s:
                    return Admit(
                        False,
                        reason=f"{len(self._members)} connections already in the handshake",
                    )
                evict = oldest
            self.leave(evict)
        self._members[key] = (address, now)
        self._silent[key] = None
        self._by_address[address] += 1
        return Admit(True, evict)

    @property
    def silent(self) -> int:
        """Members that have sent nothing yet."""
        return len(self._silent)

    def heard(self, key: K) -> None:
        """``key`` sent its first bytes: it is no longer the first to be closed for room."""
        self._silent.pop(key, None)

    def leave(self, key: K) -> bool:
        """``key`` finished its handshake or closed; False if it was not in the pool."""
        entry = self._members.pop(key, None)
        if entry is None:
            return False
        self._silent.pop(key, None)
        address = entry[0]
        self._by_address[address] -= 1
        if not self._by_address[address]:
            del self._by_address[address]
        return True


class LogLimiter:
    """Whether to log about ``key`` now: at most once per ``interval_s``, per key.

    Keys are forgotten once their interval has passed, so memory is bounded by the keys
    seen within one interval, however many peers misbehave over a long run."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable, now: float) -> bool:
        """True (and the key's clock restarts) if ``key`` was not logged in the interval."""
        if len(self._last) > 1024:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval_s}
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[key] = now
        return True
