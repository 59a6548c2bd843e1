"""The server's request queue: which accepted request a free worker runs next.

Pure (STYLE.md habit 4): ``ServerCore`` pushes requests in and takes them out when a
worker is free; time comes in as ``now``. Two orders, one per mode of the server:

* ``FairQueue`` (no batching): requests wait per connection and are taken round-robin
  by connection, so a device flooding INFERs waits behind its own requests, not in
  front of its neighbours' (docs/RUNTIME.md, "Hostile peers": fair compute).
* ``SplitGroups`` (dynamic batching): requests for the same split, from any device, wait
  in one group. A group is taken as one batch when it holds ``max_size`` requests or its
  oldest has waited ``max_wait_s``; while every worker is busy nothing is taken, so
  groups keep filling and batches grow with the load by themselves (the way Triton's
  and TorchServe's dynamic batchers behave). The group of the oldest request goes first.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["FairQueue", "SplitGroups"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FairQueue(Generic[K, T]):
    """Items waiting per key; ``pop`` serves the keys round-robin.

    With one FIFO queue, a connection that queued a hundred requests puts all of them in
    front of a neighbour's one; here each key with waiters is served in turn, so a
    request waits for at most one request of each other connection per free worker.
    """

    def __init__(self) -> None:
        self._waiting: dict[K, collections.deque[T]] = {}
        """Keys with waiters, in round-robin order (a served key moves to the back)."""
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def waiting(self, key: K) -> int:
        """Waiters of ``key``."""
        queue = self._waiting.get(key)
        return 0 if queue is None else len(queue)

    def ahead(self, key: K) -> int:
        """Waiters served before a new one of ``key``: its own, and at most that many plus
        one of every other key (round-robin)."""
        mine = self.waiting(key)
        return mine + sum(
            min(len(q), mine + 1) for other, q in self._waiting.items() if other != key
        )

    def push(self, key: K, item: T) -> None:
        """Queue ``item`` behind the other waiters of ``key``."""
        self._waiting.setdefault(key, collections.deque()).append(item)
        self._count += 1

    def pop(self) -> T | None:
        """The first waiter of the next key in the round, or None when none waits."""
        if not self._waiting:
            return None
        key = next(iter(self._waiting))
        queue = self._waiting.pop(key)
        item = queue.popleft()
        if queue:
            self._waiting[key] = queue  # to the back of the round
        self._count -= 1
        return item

    def remove(self, key: K, item: T) -> bool:
        """Take ``item`` out of ``key``'s waiters (cancelled); False if it is not there."""
        queue = self._waiting.get(key)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        if not queue:
            del self._waiting[key]
        self._count -= 1
        return True


class SplitGroups(Generic[K, T]):
    """Items grouped by key (the split); ``take`` hands out one ready group as a batch."""

    def __init__(self, max_size: int, max_wait_s: float) -> None:
        if max_size < 1 or max_wait_s < 0:
            raise ValueError(
                f"SplitGroups needs max_size >= 1 and max_wait_s >= 0; got {max_size}, {max_wait_s}"
            )
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._groups: dict[K, list[tuple[int, float, T]]] = {}
        """Per key, (arrival order, arrival time, item), oldest first."""
        self._seq = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, key: K, item: T, now: float) -> None:
        """Queue ``item`` in the group ``key``, arrived at ``now``."""
        self._seq += 1
        self._groups.setdefault(key, []).append((self._seq, now, item))
        self._count += 1

    def take(self, now: float) -> list[T] | None:
        """The next batch at ``now``, oldest request's group first, or None if no group
        is full or has waited its time (reckoned as ``next_due`` is, so a timer set for
        that instant finds the group ready)."""
        ready = [
            (group[0][0], key)
            for key, group in self._groups.items()
            if len(group) >= self.max_size or group[0][1] + self.max_wait_s <= now
        ]
        if not ready:
            return None
        _, key = min(ready)
        group = self._groups[key]
        batch, rest = group[: self.max_size], group[self.max_size :]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        self._count -= len(batch)
        return [item for _, _, item in batch]

    def next_due(self) -> float | None:
        """When the oldest waiting request will have waited ``max_wait_s``; None if empty."""
        if not self._groups:
            return None
        return min(group[0][1] for group in self._groups.values()) + self.max_wait_s

    def remove(self, key: K, item: T) -> bool:
        """Take ``item`` out of group ``key`` (cancelled); False if it is not there."""
        group = self._groups.get(key)
        if group is None:
            return False
        for i, (_, _, waiting) in enumerate(group):
            if waiting is item:
                del group[i]
                if not group:
                    del self._groups[key]
                self._count -= 1
                return True
        return False
