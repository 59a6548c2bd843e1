"""The server's request queue (spinn.runtime.server_queue): pure, time injected."""

from __future__ import annotations

import pytest

from spinn.runtime.server_queue import FairQueue, SplitGroups


def test_fair_queue_serves_connections_round_robin() -> None:
    queue: FairQueue[str, str] = FairQueue()
    # A flooder queues six requests, then a neighbour queues two.
    for n in range(6):
        queue.push("flood", f"flood{n}")
    for n in range(2):
        queue.push("good", f"good{n}")
    assert len(queue) == 8 and queue.waiting("good") == 2
    # A third device's next request would wait for one of each other's, plus none of its own.
    assert queue.ahead("new") == 2
    assert queue.ahead("good") == 2 + 3  # its own two, and three of the flooder's
    order = [queue.pop() for _ in range(8)]
    # The neighbour's requests are served second and fourth, not after all six.
    assert order[:4] == ["flood0", "good0", "flood1", "good1"], order
    assert order[4:] == ["flood2", "flood3", "flood4", "flood5"]
    assert queue.pop() is None and len(queue) == 0


def test_fair_queue_forgets_a_removed_waiter() -> None:
    queue: FairQueue[str, str] = FairQueue()
    queue.push("b", "b0")
    queue.push("c", "c0")
    assert queue.remove("b", "b0") and not queue.remove("b", "b0")
    assert len(queue) == 1 and queue.waiting("b") == 0
    assert queue.pop() == "c0"  # c is served; b's cancellation lost nothing


def test_split_groups_fill_per_split_and_go_oldest_first() -> None:
    groups: SplitGroups[int, str] = SplitGroups(max_size=3, max_wait_s=0.0)
    for n, job in enumerate("bcde"):
        groups.push(5, job, now=0.001 * n)
    groups.push(7, "f", now=0.01)
    assert len(groups) == 5
    # The split-5 group holds the oldest request: its first max_size go first; then e,
    # submitted before f, so the rest of split 5 before split 7 (FIFO across splits).
    assert [groups.take(0.02) for _ in range(3)] == [["b", "c", "d"], ["e"], ["f"]]
    assert groups.take(0.02) is None and groups.next_due() is None


def test_split_groups_wait_their_time_unless_full() -> None:
    groups: SplitGroups[int, str] = SplitGroups(max_size=2, max_wait_s=0.005)
    groups.push(1, "a", now=1.0)
    assert groups.take(1.004) is None and groups.next_due() == pytest.approx(1.005)
    assert groups.take(1.005) == ["a"]
    groups.push(1, "b", now=2.0)
    groups.push(1, "c", now=2.001)
    assert groups.take(2.001) == ["b", "c"]  # full: at once
    with pytest.raises(ValueError, match="max_size"):
        SplitGroups(max_size=0, max_wait_s=0)


def test_split_groups_forget_a_removed_waiter() -> None:
    groups: SplitGroups[int, str] = SplitGroups(max_size=4, max_wait_s=0.0)
    a, b, c = "a", "b", "c"
    for job in (a, b, c):
        groups.push(1, job, now=0.0)
    assert groups.remove(1, b) and not groups.remove(1, b) and not groups.remove(2, a)
    assert groups.take(0.0) == ["a", "c"] and len(groups) == 0
