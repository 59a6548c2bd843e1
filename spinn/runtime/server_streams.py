"""The server adapter's stream mechanics: one connection's streams and how its close
goes, the linger after a fatal ERROR, the bytes read before a TLS upgrade handed to TLS.

I/O only: when to close, linger, upgrade or give up is ``ServerCore``'s (its ``Close``
and ``StartTls`` actions); ``spinn.runtime.server`` carries them out with these.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from spinn.runtime.server_core import Close, StartTls

__all__ = ["LINGER_BYTES", "READ_CHUNK", "Link", "linger", "replay_into_tls"]

READ_CHUNK = 1 << 16
"""Bytes asked of a stream per read."""
LINGER_BYTES = 4 << 20
"""After a fatal ERROR, what a peer may still send before the close (``linger``)."""


async def linger(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit_s: float
) -> None:
    """Before closing on a fatal ERROR: half-close, then discard what the peer still sends
    until it closes too (at most ``limit_s`` and ``LINGER_BYTES``). Closing a socket
    with unread bytes resets the connection, and a reset can destroy the ERROR still in
    flight; the peer would see "connection reset" instead of what it did wrong."""
    if writer.is_closing() or not writer.can_write_eof():  # gone, or TLS (close_notify)
        return
    end = time.monotonic() + limit_s  # the server's one clock (``SpinnServer._clock``)
    # RuntimeError: uvloop's write_eof() on a transport the peer has just reset.
    with contextlib.suppress(TimeoutError, ConnectionError, OSError, RuntimeError):
        writer.write_eof()
        discarded = 0
        while discarded < LINGER_BYTES:
            left_s = max(0.0, end - time.monotonic())
            data = await asyncio.wait_for(reader.read(READ_CHUNK), left_s)
            if not data:
                return
            discarded += len(data)


def replay_into_tls(transport: asyncio.BaseTransport, plain: object, data: bytes) -> None:
    """Give ``data``, read before a TLS upgrade, to the TLS protocol that now holds
    ``transport`` (unless the upgrade failed before it got there: ``plain`` still does)."""
    protocol = transport.get_protocol()
    if protocol is plain or not hasattr(protocol, "buffer_updated"):
        return  # both asyncio's and uvloop's TLS protocols are buffered protocols
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))  # type: ignore[attr-defined]
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)  # type: ignore[attr-defined]
        view = view[n:]


class Link:
    """One connection's streams, and how its close goes."""

    __slots__ = ("cid", "reader", "writer", "close", "closer", "eof", "done", "upgrade")

    def __init__(
        self, cid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.cid = cid
        self.reader = reader
        self.writer = writer
        self.close: Close | None = None
        """The core's close, once it decided one."""
        self.closer: asyncio.Task[None] | None = None
        """The task carrying out a close decided outside this connection's own task."""
        self.eof = False
        """The peer's stream ended (after its BYE, its answers may still be pending)."""
        self.done = asyncio.Event()
        """Closed and reported to the core."""
        self.upgrade: StartTls | None = None
        """The core's TLS upgrade, to be carried out by this connection's task."""
