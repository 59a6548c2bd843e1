"""The pure rules of admission and fairness (spinn.runtime.admission), time injected."""

from __future__ import annotations

import pytest

from spinn.runtime.admission import HandshakePool, LogLimiter, TokenBucket


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(50)) == 20
    assert not bucket.take(0.05)  # half a token back
    assert bucket.take(0.1)
    # A long quiet spell refills to the burst, no further.
    assert sum(bucket.take(100.0) for _ in range(50)) == 20
    # At the rate exactly, every frame passes.
    assert all(bucket.take(200.0 + i / 10.0) for i in range(100))
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0.0, burst=1.0, now=0.0)


def test_handshake_pool_evicts_the_silent_first() -> None:
    pool: HandshakePool[str] = HandshakePool(size=3, per_address=None, grace_s=1.0)
    for i, key in enumerate("abc"):
        assert pool.admit(key, "10.0.0.1", now=0.01 * i).admitted
    pool.heard("a")  # a device: its HELLO arrived
    # Full: the oldest stranger that has sent nothing makes room, whatever its age.
    room = pool.admit("d", "10.0.0.2", now=0.03)
    assert room.admitted and room.evict == "b"
    assert "a" in pool and "b" not in pool and len(pool) == 3


def test_handshake_pool_sheds_when_all_have_spoken_until_one_is_past_its_grace() -> None:
    pool: HandshakePool[str] = HandshakePool(size=3, per_address=None, grace_s=1.0)
    for i, key in enumerate("abc"):
        assert pool.admit(key, "10.0.0.1", now=0.1 * i).admitted
        pool.heard(key)  # slow loris: a byte, then nothing
    # Full of strangers that spoke, none past its grace: the newcomer is shed.
    shed = pool.admit("d", "10.0.0.2", now=0.5)
    assert not shed.admitted and "3 connections already in the handshake" in shed.reason
    # Once the oldest has had its grace, it makes room for the newcomer.
    evicted = pool.admit("d", "10.0.0.2", now=1.05)
    assert evicted.admitted and evicted.evict == "a"
    assert "a" not in pool and "d" in pool and len(pool) == 3
    # A stranger that finished its handshake leaves; its place is free at once.
    assert pool.leave("b") and not pool.leave("b")
    room = pool.admit("e", "10.0.0.3", now=1.06)
    assert room.admitted and room.evict is None and len(pool) == 3


def test_handshake_pool_limits_each_address() -> None:
    pool: HandshakePool[int] = HandshakePool(size=100, per_address=2, grace_s=1.0)
    assert pool.admit(1, "10.0.0.9", 0.0).admitted and pool.admit(2, "10.0.0.9", 0.0).admitted
    third = pool.admit(3, "10.0.0.9", 5.0)
    assert not third.admitted and "2 connections from 10.0.0.9" in third.reason
    assert pool.admit(4, "10.0.0.7", 0.0).admitted  # another address is not affected
    pool.leave(1)
    assert pool.admit(3, "10.0.0.9", 5.0).admitted


def test_log_limiter_once_per_key_and_interval() -> None:
    limiter = LogLimiter(interval_s=60.0)
    assert limiter.allow(("10.0.0.1", "tls"), 0.0)
    assert not limiter.allow(("10.0.0.1", "tls"), 30.0)
    assert limiter.allow(("10.0.0.2", "tls"), 30.0)
    assert limiter.allow(("10.0.0.1", "tls"), 61.0)
    for i in range(3000):  # memory stays bounded by the keys of one interval
        limiter.allow(i, 100.0 + i)
    assert len(limiter._last) <= 1100
