"""Server limits over real loopback sockets: connections, timeouts, sizes, BUSY.

Timeouts here are a few tenths of a second so that a stalled peer is seen being dropped;
each test is bounded by pytest-timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    Result,
    pack,
)
from protocol.framing import encode_frame
from protocol.messages import encode_message
from spinn.runtime.config import ConfigError, LimitsConfig, SecurityConfig, ServerConfig
from spinn.runtime.server import SpinnServer, frame_limit_for
from tests.support.runtime import RawClient, by_frame, hello, noise_frames, run_in_process, serve
from tests.support.runtime import until_closed as _until_closed

pytestmark = pytest.mark.timeout(60)


def _infer(
    server: SpinnServer, rid: int, split: int = 1, deadline_ms: float | None = None
) -> Infer:
    shape = (1, *server.model.split_shape(split))
    x = np.random.default_rng(rid).random(shape, dtype=np.float32)
    return Infer(rid, split, 1.0, pack(x, "float32"), deadline_ms)


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^limits\.max_connections must be >= 1, got 0"):
        LimitsConfig(max_connections=0)
    with pytest.raises(ConfigError, match=r"^limits\.max_frame_bytes must be in \[1024"):
        LimitsConfig(max_frame_bytes=10)
    with pytest.raises(ConfigError, match=r"^limits\.idle_timeout_s must be > 0, got 0"):
        LimitsConfig(idle_timeout_s=0)
    with pytest.raises(ConfigError, match=r"^security\.tls_cert and security\.tls_key go together"):
        SecurityConfig(tls_cert=Path("a.pem"))


def test_connection_beyond_the_limit_gets_busy_then_a_slot_frees(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        first, second = await RawClient.open(port), await RawClient.open(port)
        await hello(first, server)
        await hello(second, server)
        third = await RawClient.open(port)
        events = await _until_closed(third)
        assert len(events) == 1 and isinstance(events[0], Error)
        assert events[0].code is ErrorCode.BUSY and events[0].fatal
        first.close()
        for _ in range(100):  # the server notices the close on its next read
            if server.stats.connections < 2:
                break
            await asyncio.sleep(0.01)
        fourth = await RawClient.open(port)
        await hello(fourth, server)
        assert server.stats.connections_refused == 1
        second.close()
        fourth.close()

    serve(checkpoint, body, max_connections=2)


def test_silent_peer_is_dropped_after_the_handshake_timeout(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        start = time.monotonic()
        events = await _until_closed(client)
        took = time.monotonic() - start
        assert 0.25 <= took < 3.0, took
        assert isinstance(events[-1], Error) and "handshake" in events[-1].message

    serve(checkpoint, body, handshake_timeout_s=0.3)


def test_slow_loris_trickling_a_frame_is_dropped(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        # A PING frame dribbled a byte every 50 ms never completes within the idle timeout.
        frame = encode_frame(encode_message(Ping(1, 0.0, b"\0" * 200)))
        start = time.monotonic()
        closed = False
        for i in range(len(frame)):
            try:
                client.writer.write(frame[i : i + 1])
                await client.writer.drain()
            except ConnectionError:
                closed = True
                break
            if client.reader.at_eof():
                closed = True
                break
            await asyncio.sleep(0.05)
        assert closed, "the trickle was never cut"
        assert time.monotonic() - start < 3.0
        assert server.stats.connections_refused == 1

    serve(checkpoint, body, idle_timeout_s=0.4)


def test_pings_keep_an_idle_device_connected(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        for seq in range(8):  # 0.8 s in all, twice the idle timeout
            client.send(Ping(seq, 0.0))
            assert isinstance(await client.next(), Pong)
            await asyncio.sleep(0.1)
        assert server.stats.connections_refused == 0

    serve(checkpoint, body, idle_timeout_s=0.4)


def test_oversized_frame_is_refused_before_buffering(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        client.writer.write((8 * 2**20).to_bytes(4, "big") + b"\0" * 1000)
        events = await _until_closed(client)
        assert isinstance(events[-1], Error) and events[-1].code is ErrorCode.TOO_LARGE

    serve(checkpoint, body, max_frame_bytes=2**20)


def test_tensor_above_the_element_limit_is_fatal(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        client.send(_infer(server, 1, split=0))  # 784 elements > 100
        events = await _until_closed(client)
        assert isinstance(events[-1], Error) and events[-1].code is ErrorCode.TOO_LARGE

    serve(checkpoint, body, max_tensor_elements=100)


def test_overload_answers_busy_at_once_and_every_request_once(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        client.send(*(_infer(server, rid) for rid in range(6)))
        answers: dict[int, object] = {}
        while len(answers) < 6:
            event = await client.next()
            assert isinstance(event, Result | Error), event
            assert event.request_id not in answers, "answered twice"
            answers[event.request_id] = event
        busy = [r for r, e in answers.items() if isinstance(e, Error) and e.code is ErrorCode.BUSY]
        assert busy and len(busy) <= 4, answers
        assert server.stats.busy_sent == len(busy)

    # Two may wait: the rest of a burst of six is refused at once.
    serve(checkpoint, body, max_queued=2, workers=1, slowdown=3.0)


def test_request_that_would_outwait_its_deadline_is_busy(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        for rid in range(10):  # the server learns its compute time
            client.send(_infer(server, rid))
            assert isinstance(await client.next(), Result)
        client.send(*(_infer(server, rid) for rid in range(10, 14)))
        # With four queued at several ms each, 0.01 ms cannot be met: BUSY, not a wait.
        client.send(_infer(server, 99, deadline_ms=0.01))
        seen: dict[int, object] = {}
        while len(seen) < 5:
            event = await client.next()
            seen[event.request_id] = event  # type: ignore[union-attr]
        late = seen[99]
        assert isinstance(late, Error) and late.code is ErrorCode.BUSY, late
        assert "deadline" in late.message

    serve(checkpoint, body, workers=1, slowdown=2.0)


def test_model_mismatch_still_named_before_any_limit(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, "other", "", ("float32",)))
        events = await _until_closed(client)
        assert isinstance(events[-1], Error) and events[-1].code is ErrorCode.MODEL_MISMATCH

    serve(checkpoint, body, max_connections=1)


def test_overloaded_server_makes_the_device_finish_locally(checkpoint: Path) -> None:
    # One worker ten times slower, one request queued at most: most INFERs get BUSY.
    run = run_in_process(
        checkpoint,
        noise_frames(60),
        server_options={"workers": 1, "max_queued": 1, "slowdown": 10.0},
        split=1,
        thr_conf=1.0,
        continue_locally=False,
        max_in_flight=6,
        # BUSY is the subject here, not deadlines: the stub profile knows nothing of the
        # tenfold slowdown, and a deadline from it would expire every request.
        deadline_factor=1000.0,
    )
    records, summary, server = run.records, run.summary, run.server
    by_frame(records, 60)
    assert server is not None and server.stats.busy_sent > 0
    # Every BUSY frame was finished on the device; the server still answered some.
    assert summary["answered_by"]["fallback"] >= server.stats.busy_sent
    assert summary["answered_by"]["server"] > 0
    assert server.stats.requests + server.stats.busy_sent == summary["offloaded"]


async def _until_queue_empty(server: SpinnServer, timeout: float = 5.0) -> None:
    """Wait (bounded) for the server's queue count to drain, as jobs finish in the workers."""
    end = time.monotonic() + timeout
    while server.core.queued and time.monotonic() < end:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("batch_max", [1, 4])
def test_cancelled_and_abandoned_requests_leave_no_queue_count(
    checkpoint: Path, batch_max: int
) -> None:
    """Requests cancelled queued or dropped at BYE are counted out: no permanent BUSY (M4)."""

    async def body(server: SpinnServer, port: int) -> None:
        # Many queued requests cancelled by the device: each is answered once, none runs.
        canceller = await RawClient.open(port)
        await hello(canceller, server)
        canceller.send(*(_infer(server, rid) for rid in range(12)))
        canceller.send(*(Cancel(rid) for rid in range(12)))
        answered = {(await canceller.next()).request_id for _ in range(12)}  # type: ignore[union-attr]
        assert answered == set(range(12))
        canceller.close()
        await _until_queue_empty(server)
        assert server.core.queued == 0
        # Twice as many requests as the queue holds, over two devices that say BYE with
        # them queued: the slow worker cannot finish them within the idle timeout, so the
        # server cancels the rest unrun (PROTOCOL.md §7.3). Each time the full queue is
        # accepted, so a count leaked by the first round would refuse the second.
        for round_ in range(2):
            quitter = await RawClient.open(port)
            await hello(quitter, server)
            quitter.send(*(_infer(server, rid) for rid in range(12)), Bye("done"))
            events = await _until_closed(quitter)
            busy = [e for e in events if isinstance(e, Error) and e.code is ErrorCode.BUSY]
            assert not busy, (round_, busy)
            cancelled = [e for e in events if isinstance(e, Error)]
            assert cancelled, f"round {round_}: every request ran; the test needs a slower worker"
            assert isinstance(events[-1], Bye)
            await _until_queue_empty(server)
            assert server.core.queued == 0, f"round {round_}: {server.core.queued} left counted"
        fresh = await RawClient.open(port)
        await hello(fresh, server)
        fresh.send(_infer(server, 1))
        # A batch that was running when its device left is not interrupted: the fresh
        # request waits for it, at ×100 tens of seconds on a machine where each module's
        # CPU time reads 10-30 ms. What is checked is that it is answered, not refused.
        assert isinstance(await fresh.next(timeout=120.0), Result)
        fresh.close()

    serve(
        checkpoint,
        body,
        max_queued=12,
        workers=1,
        # 100x: a batch of 4 computes about as long as one request, and at 10x the three
        # batches of a round finished inside the 0.3 s on a fast machine; the idle timeout,
        # not the slowdown, bounds how long a round takes.
        slowdown=100.0,
        idle_timeout_s=0.3,
        batch_max=batch_max,
        batch_wait_ms=0.0,
    )


def test_shutdown_with_requests_queued_leaves_no_queue_count(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        client.send(*(_infer(server, rid) for rid in range(8)))
        for _ in range(100):  # until the server has read them all
            if server.stats.requests == 8:
                break
            await asyncio.sleep(0.01)
        assert server.core.queued > 0

    server = serve(checkpoint, body, workers=1, slowdown=10.0, shutdown_grace_s=0.1)
    assert server.core.queued == 0


def test_default_frame_limit_follows_the_model(checkpoint: Path) -> None:
    """Without --max-frame-bytes the limit is the model's largest float32 INFER plus
    headroom, so an unauthenticated peer cannot make the server hold 16 MiB."""

    async def body(server: SpinnServer, port: int) -> None:
        model = server.model
        largest = max(range(model.num_stages), key=lambda s: math.prod(model.split_shape(s)))
        elements = math.prod(model.split_shape(largest))
        assert server.max_frame_bytes == frame_limit_for(model)
        assert 4 * elements < server.max_frame_bytes <= 5 * elements + 64 * 1024
        client = await RawClient.open(port)
        await hello(client, server)
        # Every split's float32 activation fits: the largest one is served.
        client.send(_infer(server, 1, split=largest))
        assert isinstance(await client.next(), Result)
        client.writer.write((server.max_frame_bytes + 1).to_bytes(4, "big") + b"\0" * 100)
        events = await _until_closed(client)
        assert isinstance(events[-1], Error) and events[-1].code is ErrorCode.TOO_LARGE

    server = serve(checkpoint, body)
    assert server.config.limits.max_frame_bytes is None


def test_explicit_frame_limit_overrides_the_model(checkpoint: Path) -> None:
    server = SpinnServer(
        ServerConfig.from_fields(checkpoint=checkpoint, port=0, max_frame_bytes=3 * 2**20)
    )
    assert server.max_frame_bytes == 3 * 2**20
    assert server.connection_config.max_frame_size == 3 * 2**20
