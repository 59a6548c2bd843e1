"""The server against peers that misbehave in ways a well-formed frame allows: every
INFER still gets exactly one answer, and a stuck peer cannot keep its slot."""

from __future__ import annotations

import asyncio
import math
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Result,
    Role,
    pack,
)
from protocol.messages import MAX_STRING
from protocol.packing import PackedTensor
from spinn.runtime.server import SpinnServer
from tests.support.runtime import RawClient, hello, sample_input, serve

pytestmark = pytest.mark.timeout(60)


def test_an_activation_that_overflows_the_model_is_answered_internal(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        # Legal float32, but the convolutions overflow to inf and the softmax to NaN.
        huge = np.full((1, 1, 28, 28), 3e38, np.float32)
        client.send(Infer(1, 0, 0.5, pack(huge, "float32")))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.INTERNAL, error
        assert error.request_id == 1 and "nan" in error.message
        client.send(Infer(2, 0, 0.5, pack(sample_input(1).numpy(), "float32")))
        assert isinstance(await client.next(), Result)  # the connection still serves
        client.close()

    serve(checkpoint, body)


def test_an_empty_weights_hash_means_unknown_and_is_welcomed(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, server.meta.model_id, "", ("float32",)))
        welcome = await client.next()
        assert not isinstance(welcome, Error), welcome
        assert welcome.weights_sha256 == server.meta.weights_sha256  # type: ignore[attr-defined]
        client.close()

    serve(checkpoint, body)


def test_a_long_peer_string_still_gets_its_error(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, "m" * MAX_STRING, "ab" * 32, ("float32",)))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.MODEL_MISMATCH, error
        assert len(error.message) <= MAX_STRING and server.meta.model_id in error.message
        client.close()
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, server.meta.model_id, "", ("c" * 1200,) * 40))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_TENSOR, error
        assert "no tensor codec in common" in error.message
        client.close()

    server = serve(checkpoint, body)
    assert server.stats.errors_sent == 2


def test_a_zstd_frame_declaring_too_much_is_too_large(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        body_bytes = zstandard.ZstdCompressor().compress(bytes(2 * 28 * 28 * 4))
        tensor = PackedTensor("float32", True, (1, 1, 28, 28), 1.0, 0, body_bytes)
        client.send(Infer(1, 0, 0.5, tensor))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.TOO_LARGE, error
        assert error.request_id == 1
        client.close()

    serve(checkpoint, body)


def test_a_peer_that_stops_reading_is_dropped_after_the_idle_timeout(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = RawClient(reader, writer, Connection(Role.DEVICE))
        await hello(client, server)
        # Pings, their pongs never read: megabytes of answers back up in the server.
        ping = client.conn.send(Ping(0, 0.0))
        for _ in range(100):
            writer.write(ping * 4000)  # the same seq: each is answered before the next
            await asyncio.sleep(0)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if not server.core.connections:
                break
        assert not server.core.connections, "a peer that never reads must not keep its connection"
        writer.transport.abort()

    serve(checkpoint, body, idle_timeout_s=1.0)


def test_an_infer_during_shutdown_is_answered_busy(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        x = pack(sample_input(2).numpy(), "float32")
        client.send(Infer(1, 0, 1.0, x))
        while not server.stats.requests:  # request 1 is running when the shutdown begins
            await asyncio.sleep(0.001)
        closing = asyncio.create_task(server.close())
        await asyncio.sleep(0.01)  # close() has begun
        client.send(Infer(2, 0, 1.0, x))
        # At once, not after the grace period: no new work is taken on once stopping.
        late = await client.next()
        assert isinstance(late, Error) and late.code is ErrorCode.BUSY, late
        assert late.request_id == 2 and "shutting down" in late.message
        first = await client.next()  # its RESULT, or BUSY if it outlasts the grace period
        assert isinstance(first, Result | Error) and first.request_id == 1, first
        await closing
        client.close()

    serve(checkpoint, body, shutdown_grace_s=2.0, slowdown=1000.0)


def test_a_peer_waiting_on_a_busy_server_is_not_idle(checkpoint: Path) -> None:
    """The idle timeout drops silent peers, not ones whose answers the server owes."""

    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        loop = asyncio.get_running_loop()

        def infer(rid: int) -> Infer:
            return Infer(rid, 0, 0.5, pack(sample_input(rid).numpy(), "float32"))

        # Time one answer on this machine, then queue enough slowed-down work for one
        # worker to outlast the idle timeout several times however fast the machine is.
        # The second answer is timed: the first may include warming up.
        for rid in (1000, 1001):
            started = loop.time()
            client.send(infer(rid))
            assert isinstance(await client.next(), Result)
        one = max(loop.time() - started, 1e-3)
        count = min(400, math.ceil(6 * server.config.limits.idle_timeout_s / one) + 1)
        sent_at = loop.time()
        client.send(*(infer(rid) for rid in range(1, count + 1)))
        answers = [await client.next() for _ in range(count)]
        waited = loop.time() - sent_at
        assert all(isinstance(a, Result) for a in answers), [
            a for a in answers if not isinstance(a, Result)
        ]
        assert waited > 3 * server.config.limits.idle_timeout_s, (
            f"only {waited:.2f} s: the test needs slower work"
        )
        # Answered and silent: now it is idle, and is closed after the timeout.
        closing = await asyncio.wait_for(client.next(), 10 * server.config.limits.idle_timeout_s)
        assert isinstance(closing, Error) and "no complete frame" in closing.message, closing
        assert loop.time() - sent_at - waited >= server.config.limits.idle_timeout_s * 0.5
        client.close()

    serve(checkpoint, body, workers=1, slowdown=20.0, idle_timeout_s=0.2, batch_max=1)


def test_a_fatal_error_reaches_a_peer_with_bytes_still_unread(checkpoint: Path) -> None:
    """The server closes after a fatal ERROR without resetting the connection, though the
    peer sent more than was read: a reset may destroy the ERROR on its way."""

    def peer(port: int, server: SpinnServer) -> tuple[list[object], str | None]:
        conn = Connection(Role.DEVICE)
        meta = server.meta
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(conn.send(Hello(PROTOCOL_VERSION, meta.model_id, "", ("float32",))))
            # A frame of bytes that are no msgpack, then 2 MiB the server never reads.
            sock.sendall(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1" + bytes(2 << 20))
            received, failure = b"", None
            try:
                while chunk := sock.recv(1 << 16):
                    received += chunk
            except OSError as exc:
                failure = repr(exc)
        conn.receive_data(received)
        return [type(e).__name__ for e in iter(conn.next_event, NEED_DATA)], failure

    async def body(server: SpinnServer, port: int) -> None:
        loop = asyncio.get_running_loop()
        events, failure = await loop.run_in_executor(None, peer, port, server)
        assert events[:2] == ["Welcome", "Error"], events
        assert failure is None, f"the connection was reset: {failure}"

    serve(checkpoint, body)


def test_peers_that_reset_after_a_bad_frame_leave_no_unhandled_error(checkpoint: Path) -> None:
    """The lingering close meets peers already gone (uvloop raises on their write_eof)."""
    unhandled: list[str] = []

    def reset_peer(port: int, server: SpinnServer) -> None:
        conn = Connection(Role.DEVICE)
        hello_bytes = conn.send(Hello(PROTOCOL_VERSION, server.meta.model_id, "", ("float32",)))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(hello_bytes + b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def body(server: SpinnServer, port: int) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unhandled.append(context["message"]))
        for _ in range(20):
            await loop.run_in_executor(None, reset_peer, port, server)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        client = await RawClient.open(port)  # and the server still serves
        await hello(client, server)
        client.close()

    serve(checkpoint, body)
    assert unhandled == []
