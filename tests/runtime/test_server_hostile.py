"""Hostile peers over real loopback sockets: handshake hoarders, floods, TLS on a plain port.

Each test shows one rule of docs/RUNTIME.md, "Hostile peers": strangers have their own
pool and never take a device slot; a flooding connection is closed at its rate limit and
cannot push a neighbour's request behind its own; a TLS ClientHello on a plain port is
named as such, once per address, and plain bytes on a TLS port too; a TLS handshake in
progress is a stranger like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Cancel,
    Connection,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    Result,
    Role,
    Welcome,
    pack,
)
from spinn.runtime.server import SpinnServer
from tests.support.runtime import RawClient, hello, needs_openssl, serve
from tests.support.runtime import until_closed as _until_closed

pytestmark = pytest.mark.timeout(60)


def _infer(server: SpinnServer, rid: int, deadline_ms: float | None = None) -> Infer:
    shape = (1, *server.model.split_shape(1))
    x = np.random.default_rng(rid).random(shape, dtype=np.float32)
    return Infer(rid, 1, 1.0, pack(x, "float32"), deadline_ms)


async def _silent(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` raw TCP connections that never say anything (handshake hoarders)."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]


def test_strangers_never_take_a_device_slot(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        hoarders = await _silent(port, 10)  # five times the device slots
        for _ in range(100):
            if server.stats.handshakes == 10:
                break
            await asyncio.sleep(0.01)
        assert server.stats.handshakes == 10
        device = await RawClient.open(port)
        await hello(device, server)  # welcomed: the hoarders hold no device slot
        assert server.stats.handshakes == 10
        device.close()
        for _, writer in hoarders:
            writer.close()

    serve(checkpoint, body, max_connections=2, max_handshakes=16)


def test_a_full_handshake_pool_sheds_at_once_then_makes_room(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        # Slow-loris strangers: each sends the first byte of a frame, then nothing.
        lorises = await _silent(port, 4)
        for _, writer in lorises:
            writer.write(b"\0")
        for _ in range(100):
            if not server.core.handshakes.silent:
                break
            await asyncio.sleep(0.01)
        # They fill the pool and none is past its grace: a newcomer is shed at once with
        # BUSY, not after the handshake timeout.
        shed = await RawClient.open(port)
        events = await _until_closed(shed, timeout=1.0)
        assert isinstance(events[-1], Error) and events[-1].code is ErrorCode.BUSY
        assert "already in the handshake" in events[-1].message
        assert server.stats.handshakes_shed == 1
        # Past their grace (half the handshake timeout), the oldest makes room for a device.
        await asyncio.sleep(0.3)
        device = await RawClient.open(port)
        await hello(device, server)
        assert server.stats.handshakes_evicted == 1
        evicted = RawClient(*lorises[0], device.conn.__class__(device.conn.role))
        events = await _until_closed(evicted)
        assert "handshake pool (4) was full" in events[-1].message  # type: ignore[attr-defined]
        device.close()
        for _, writer in lorises:
            writer.close()

    serve(checkpoint, body, max_handshakes=4, handshake_timeout_s=0.5)


def test_a_reopening_hoarder_cannot_keep_a_device_out(checkpoint: Path) -> None:
    """The hoarder reopens each connection the moment it is closed; the device still gets
    in within its first tries, and the hoarder never holds a device slot."""

    async def body(server: SpinnServer, port: int) -> None:
        stop = asyncio.Event()

        async def hoard() -> None:
            while not stop.is_set():
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    await reader.read()  # until the server closes it
                    writer.close()
                except OSError:
                    await asyncio.sleep(0.01)

        hoarders = [asyncio.create_task(hoard()) for _ in range(12)]
        await asyncio.sleep(0.5)  # the pool is full and churning
        welcomed = 0
        for _ in range(3):  # three devices, each retrying like the real one (backoff)
            for attempt in range(10):
                device = await RawClient.open(port)
                try:
                    await hello(device, server)
                except AssertionError:
                    device.close()
                    await asyncio.sleep(0.1 * 2**attempt)
                    continue
                welcomed += 1
                break
        stop.set()
        assert welcomed == 3
        assert server.stats.handshakes_evicted > 0
        for task in hoarders:
            task.cancel()

    serve(checkpoint, body, max_handshakes=8, handshake_timeout_s=0.4)


def test_a_ping_flood_is_closed_at_its_rate_and_a_neighbour_keeps_its_pongs(
    checkpoint: Path,
) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        neighbour = await RawClient.open(port)
        await hello(neighbour, server)
        flooder = await RawClient.open(port)
        await hello(flooder, server)
        flooder.send(*(Ping(seq, 0.0) for seq in range(1000)))
        neighbour.send(Ping(1, 0.0))
        assert isinstance(await neighbour.next(2.0), Pong)
        events = await _until_closed(flooder)
        pongs = sum(isinstance(e, Pong) for e in events)
        assert 100 <= pongs < 200, pongs  # the burst of twice the rate, then the limit
        last = events[-1]
        assert isinstance(last, Error) and last.code is ErrorCode.TOO_LARGE and last.fatal
        assert "more than 50 PINGs a second" in last.message
        assert server.stats.rate_limited == 1
        neighbour.send(Ping(2, 0.0))
        assert isinstance(await neighbour.next(2.0), Pong)

    serve(checkpoint, body)


def test_cancels_of_unknown_ids_are_counted_apart_and_limited(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        client.send(_infer(server, 1), Cancel(1))  # a CANCEL of a request it holds
        await client.next()
        client.send(*(Cancel(10_000 + i) for i in range(50)))  # within the burst
        client.send(Ping(1, 0.0))
        assert isinstance(await client.next(), Pong)
        assert server.stats.cancels_received == 1 and server.stats.cancels_unknown == 50
        client.send(*(Cancel(20_000 + i) for i in range(5000)))
        events = await _until_closed(client)
        assert isinstance(events[-1], Error) and events[-1].code is ErrorCode.TOO_LARGE
        assert "CANCELs of unknown requests" in events[-1].message
        assert server.stats.cancels_received == 1
        assert 400 <= server.stats.cancels_unknown < 600

    serve(checkpoint, body, max_unknown_cancel_rate=200.0)


def test_an_infer_flood_cannot_push_a_neighbour_past_its_deadline(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        flooder = await RawClient.open(port)
        await hello(flooder, server)
        neighbour = await RawClient.open(port)
        await hello(neighbour, server)
        for rid in range(10):  # the server learns its compute time
            neighbour.send(_infer(server, rid))
            assert isinstance(await neighbour.next(), Result)
        flooder.send(*(_infer(server, 1000 + rid) for rid in range(150)))
        for _ in range(200):  # until the server has queued them
            if server.stats.requests >= 160:
                break
            await asyncio.sleep(0.01)
        mean_ms = server.stats.compute_ms_total / server.stats.computed
        # Behind all 150 it would be late; served round-robin it is next but one.
        deadline_ms = max(40 * mean_ms, 20.0)
        assert 150 * mean_ms > 2 * deadline_ms, "the test needs a slower worker"
        neighbour.send(_infer(server, 99, deadline_ms=deadline_ms))
        answer = await neighbour.next()
        assert isinstance(answer, Result) and answer.request_id == 99, answer
        assert server.core.queued > 50, "the flood was answered before the neighbour"
        flooder.close()

    serve(checkpoint, body, workers=1, slowdown=4.0, max_queue_per_connection=256)


def test_a_tls_client_on_a_plain_port_is_named_once(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spinn.server")

    async def body(server: SpinnServer, port: int) -> None:
        context = ssl.create_default_context()
        for _ in range(3):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context), 5.0)
        # Three tries, one line: a retrying device must not flood the log.
        for _ in range(100):
            if server.stats.connections == 0:
                break
            await asyncio.sleep(0.01)

    server = serve(checkpoint, body)
    lines = [
        r.getMessage() for r in caplog.records if "TLS handshake on a plain port" in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert "the device uses TLS (--tls/--tls-ca) and this server does not" in lines[0]
    assert server.stats.connections_refused == 3
    assert not [r for r in caplog.records if "TOO_LARGE" in r.getMessage()]


class _TlsByHand:
    """A TLS client driven by hand over a plain connection (``ssl.MemoryBIO``), so that a
    test chooses how its ClientHello travels, or stops right after it."""

    def __init__(self, ca: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        context = ssl.create_default_context(cafile=str(ca))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, ca: Path, port: int) -> _TlsByHand:
        return cls(ca, *await asyncio.open_connection("127.0.0.1", port))

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def _pull(self) -> None:
        data = await asyncio.wait_for(self.reader.read(1 << 16), 5.0)
        if not data:
            raise ConnectionError("closed by the server")
        self.incoming.write(data)

    async def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.writer.write(self.outgoing.read())
                await self._pull()
        self.writer.write(self.outgoing.read())

    async def exchange(self, message: object) -> object:
        """Send ``message`` inside TLS; the server's next message."""
        conn = Connection(Role.DEVICE)
        self.tls.write(conn.send(message))  # type: ignore[arg-type]
        self.writer.write(self.outgoing.read())
        while (event := conn.next_event()) is NEED_DATA:
            try:
                conn.receive_data(self.tls.read(1 << 16))
            except ssl.SSLWantReadError:
                await self._pull()
        return event


def _tls(certs: dict[str, Path]) -> dict[str, Any]:
    return {"tls_cert": certs["server_pem"], "tls_key": certs["server_key"]}


def _hello(server: SpinnServer) -> Hello:
    return Hello(PROTOCOL_VERSION, server.meta.model_id, server.meta.weights_sha256, ("float32",))


@needs_openssl
def test_plain_bytes_on_a_tls_port_are_named_once_and_closed(
    certs: dict[str, Path], checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spinn.server")

    async def body(server: SpinnServer, port: int) -> None:
        for _ in range(3):  # a plain device retrying
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(Connection(Role.DEVICE).send(_hello(server)))
            # Closed with nothing sent: a plain device reads it as a TLS server's close.
            assert await asyncio.wait_for(reader.read(1 << 16), 5.0) == b""
            writer.close()
        # The port still speaks TLS to a TLS client.
        device = await _TlsByHand.open(certs["ca_pem"], port)
        device.writer.write(device.client_hello())
        await device.finish_handshake()
        assert isinstance(await device.exchange(_hello(server)), Welcome)
        device.writer.close()

    server = serve(checkpoint, body, **_tls(certs))
    lines = [r.getMessage() for r in caplog.records if "on a TLS port" in r.getMessage()]
    assert lines == [
        "plain (non-TLS) bytes on a TLS port from 127.0.0.1: the device does not use TLS "
        "(--tls/--tls-ca) and this server does (--tls-cert/--tls-key)"
    ], lines
    assert server.stats.connections_refused == 3


@needs_openssl
def test_a_client_hello_a_byte_at_a_time_still_gets_tls(
    certs: dict[str, Path], checkpoint: Path
) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        device = await _TlsByHand.open(certs["ca_pem"], port)
        hello_record = device.client_hello()
        # The server looks at the first two bytes, then hands what it read to TLS.
        for piece in (hello_record[:1], hello_record[1:2], hello_record[2:40], hello_record[40:]):
            device.writer.write(piece)
            await device.writer.drain()
            await asyncio.sleep(0.05)
        await device.finish_handshake()
        assert isinstance(await device.exchange(_hello(server)), Welcome)
        device.writer.close()

    serve(checkpoint, body, **_tls(certs))


@needs_openssl
def test_tls_handshakes_are_strangers_in_the_pool_under_its_deadline(
    certs: dict[str, Path], checkpoint: Path
) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        # Two clients send their ClientHello and never finish the TLS handshake.
        stalled = [await _TlsByHand.open(certs["ca_pem"], port) for _ in range(2)]
        for client in stalled:
            client.writer.write(client.client_hello())
        for _ in range(200):
            if server.stats.handshakes == 2 and not server.core.handshakes.silent:
                break
            await asyncio.sleep(0.01)
        assert server.stats.handshakes == 2  # in the pool, which is now full
        # A newcomer is shed at once; no ERROR can be read before TLS, so it is closed.
        context = ssl.create_default_context(cafile=str(certs["ca_pem"]))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context), 5.0)
        assert server.stats.handshakes_shed == 1
        # At the handshake deadline the stalled ones are closed as any stranger is.
        for client in stalled:
            while await asyncio.wait_for(client.reader.read(1 << 16), 3.0):
                pass  # the server's half of the TLS handshake, then the close
        assert server.stats.handshakes_timed_out == 2
        for _ in range(100):
            if server.stats.handshakes == 0:
                break
            await asyncio.sleep(0.01)
        assert server.stats.handshakes == 0
        # And a TLS device is served.
        device = await _TlsByHand.open(certs["ca_pem"], port)
        device.writer.write(device.client_hello())
        await device.finish_handshake()
        assert isinstance(await device.exchange(_hello(server)), Welcome)
        device.writer.close()

    serve(checkpoint, body, max_handshakes=2, handshake_timeout_s=1.0, **_tls(certs))
