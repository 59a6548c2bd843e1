"""The device's connection to the server: connect, TLS, handshake, read and write.

Part of the device's asyncio adapter (``spinn.runtime.device``): it moves messages
between the socket and the ``DeviceCore`` and reports the link's events (up, down, a
failed connect and what it saw of it, bytes that break the protocol); what follows from
them (the handshake's answers, the ERROR for bad data, PINGs, probe trains, the dead-link
verdict, when to reconnect, whom to) is the core's. It may run over TLS (``tls_ca``,
optional client certificate) and prove a shared token in the handshake (``token_file``,
PROTOCOL.md §10: the token is read here, the proof is the core's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from contextlib import AbstractContextManager
from typing import Any, Protocol

from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Bye,
    Connection,
    ConnectionConfig,
    Hello,
    ProtocolError,
    Role,
    Welcome,
)
from protocol.auth import NONCE_SIZE
from spinn.runtime.actions import error_text
from spinn.runtime.config import DeviceConfig
from spinn.runtime.credentials import SecurityError, device_ssl_context, load_token
from spinn.runtime.device_compute import DeviceModel
from spinn.runtime.device_core import FLUSH_S, Action, CloseLink, DeviceCore, DeviceError, Send

__all__ = ["LinkOwner", "ServerLink", "clock"]

log = logging.getLogger("spinn.device")

clock = time.perf_counter
"""The device's clock: every ``now`` fed to the core. uvloop's ``loop.time()`` ticks in
milliseconds, too coarse for loopback round trips and per-stage times."""
_now = clock
_READ_CHUNK = 1 << 16


class LinkOwner(Protocol):
    """What the link needs of the device it serves (``SpinnDevice``)."""

    config: DeviceConfig
    core: DeviceCore
    compute: DeviceModel

    def act(self, actions: list[Action]) -> None:
        """Carry out the core's actions."""

    def request_stop(self) -> None:
        """Stop reading frames."""

    def link_work(self) -> AbstractContextManager[None]:
        """Time event-loop work on the link."""


# OpenSSL's reasons for a reply that is no TLS record at all: a server without TLS.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)


class ServerLink:
    """The device's connection to the server: connect, handshake, read, write. What to do
    on each event (PINGs, reconnect delays, dead links) is the core's."""

    def __init__(self, device: LinkOwner) -> None:
        self.device = device
        self.config = device.config
        self.conn: Connection | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.welcome: Welcome | None = None
        self.reconnect_delay = 0.0
        """The core's latest ``Reconnect`` delay."""
        self.ssl: ssl.SSLContext | None = None
        self._close_reason: str | None = None
        """Why the device itself closed the current link (read when the reader ends)."""
        self._reading = False
        """Inside the reader's dispatch: a close request ends the read loop there."""
        self.token: bytes | None = None
        try:
            if self.config.link.use_tls:
                cfg = self.config
                self.ssl = device_ssl_context(cfg.link.tls_ca, cfg.link.tls_cert, cfg.link.tls_key)
            if self.config.link.token_file is not None:
                self.token = load_token(self.config.link.token_file)
        except SecurityError as exc:
            raise DeviceError(str(exc)) from None
        self._closing = False
        self._stopping = False

    @property
    def up(self) -> bool:
        # uvloop closes the transport on a peer reset before the read side sees the error:
        # a closing transport is down already, or a write to it raises RuntimeError.
        return (
            self.welcome is not None
            and self.writer is not None
            and not self._closing
            and not self.writer.transport.is_closing()
        )

    def send(self, event: Any) -> int:
        """Write one message; returns its framed size (0 if the link is down).

        Never raises for a dead link: a write that fails aborts the connection (the reader
        then drops it and reconnects) and returns 0, so the caller finishes locally."""
        if not self.up:
            return 0
        assert self.conn is not None and self.writer is not None
        try:
            data = self.conn.send(event)
            self.writer.write(data)
        except (RuntimeError, OSError, ProtocolError) as exc:
            self._close_reason = f"closed by the device: write failed ({error_text(exc)})"
            self._abort()
            return 0
        return len(data)

    def queued_bytes(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        if self.writer is None or self.writer.transport is None:
            return 0
        return int(self.writer.transport.get_write_buffer_size())

    def close_link(self, reason: str) -> None:
        """The core's ``CloseLink``: end this connection (the reader reports ``reason``)."""
        self._close_reason = reason
        if not self._reading:
            self._abort()

    async def run(self) -> None:
        """Keep a connection up until closed; reconnect when the core says."""
        core = self.device.core
        while not self._stopping:
            host, port = core.server_address
            log.debug("connecting to %s:%d", host, port)
            try:
                reader = await self._connect(host, port)
            except Exception as exc:
                # Reported as it is; the core says whether to retry or give up. An
                # unexpected kind is logged in full, but never ends the reconnect loop.
                if not isinstance(exc, OSError | ProtocolError):
                    log.exception("unexpected error while connecting")
                self.device.act(
                    core.connect_failed(
                        _now(),
                        error_text(exc),
                        untrusted=isinstance(exc, ssl.SSLCertVerificationError),
                        not_tls=isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS_REASONS,
                        closed_in_handshake=isinstance(exc, _ClosedInHandshake),
                        # asyncio.wait_for's, which says nothing of itself.
                        timed_out=isinstance(exc, TimeoutError) and not str(exc),
                    )
                )
                reader = None
            if reader is None:  # failed: the core said whether to retry, and when
                if core.fatal is not None:
                    return
                await asyncio.sleep(self.reconnect_delay)
                continue
            welcome = self.welcome
            assert welcome is not None
            description = welcome.description
            self.device.act(
                core.link_up(
                    _now(),
                    server_name=welcome.server_name,
                    reports_compute_time=welcome.reports_compute_time,
                    accepted=welcome.codecs,
                    max_frame_bytes=None if description is None else description.max_frame_bytes,
                    description=description,
                )
            )
            if core.fatal is not None:  # the core refused this server
                assert self.writer is not None
                self.writer.close()
                self.conn, self.writer, self.welcome = None, None, None
                return
            reason = "link closed"
            try:
                reason = await self._serve(reader)
            finally:
                # Always: a link left "up" after its reader ended would never reconnect.
                if self.writer is not None:
                    with contextlib.suppress(Exception):
                        self.writer.close()
                self.conn, self.writer, self.welcome = None, None, None
                self.device.act(core.link_down(_now(), reason, stopping=self._stopping))
            if core.fatal is not None or self._stopping:
                return
            if self.reconnect_delay > 0:
                await asyncio.sleep(self.reconnect_delay)

    async def _connect(self, host: str, port: int) -> asyncio.StreamReader | None:
        """Connect and shake hands; None: the core ended the handshake (and was told why)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                limit=_READ_CHUNK,
                ssl=self.ssl,
                server_hostname=host if self.ssl is not None else None,
            ),
            self.config.link.connect_timeout_s,
        )
        conn = Connection(Role.DEVICE, ConnectionConfig(auth_token=self.token))
        meta = self.device.compute.meta
        writer.write(
            conn.send(
                Hello(
                    PROTOCOL_VERSION,
                    meta.model_id,
                    meta.weights_sha256,
                    self.device.compute.offered_codecs,
                    self.config.link.device_name,
                    # A fresh nonce per connection (PROTOCOL.md §10).
                    auth_nonce=secrets.token_bytes(NONCE_SIZE) if self.token else b"",
                    dictionaries_sha256=self.device.compute.dictionaries_sha256,
                )
            )
        )
        try:
            welcome = await asyncio.wait_for(
                self._handshake(reader, writer, conn), self.config.link.connect_timeout_s
            )
        except BaseException:
            writer.close()
            raise
        if welcome is None:
            writer.close()  # after what the core sent (its ERROR) is flushed
            return None
        self.conn, self.writer, self.welcome = conn, writer, welcome
        self._close_reason = None
        return reader

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> Welcome | None:
        """Read until WELCOME (returned); every other message, or the error the server's
        bytes raised, goes to the core, whose messages are written here, and whose
        ``CloseLink`` ends the handshake (None)."""
        core = self.device.core
        while True:
            event: object
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                event = exc
            if event is NEED_DATA:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    raise _ClosedInHandshake("server closed the connection during the handshake")
                conn.receive_data(data)
                continue
            if isinstance(event, Welcome):
                return event
            assert conn.hello is not None
            nonce = conn.hello.auth_nonce
            ended = False
            for action in core.handshake(_now(), event, token=self.token, nonce=nonce):
                if isinstance(action, Send):
                    # A write that fails ends the connection: the next read says so.
                    with contextlib.suppress(ProtocolError, OSError):
                        writer.write(conn.send(action.message))
                elif isinstance(action, CloseLink):
                    ended = True
                else:
                    self.device.act([action])
            if ended:
                return None

    async def _serve(self, reader: asyncio.StreamReader) -> str:
        """Read until the connection ends; returns why."""
        dev = self.device
        data = b""  # the handshake's reads may hold messages already
        try:
            while True:
                with dev.link_work():
                    self._dispatch(data)
                if self._close_reason is not None:
                    return self._close_reason
                data = await reader.read(_READ_CHUNK)
                if not data:
                    return self._close_reason or "server closed the connection"
                dev.core.heard(_now())
        except (ConnectionError, OSError) as exc:
            return self._close_reason or f"connection lost: {error_text(exc)}"
        except asyncio.CancelledError:
            return self._close_reason or "link closed by the device"
        except Exception as exc:
            # A bug in handling one message must not leave the link up and unread: drop it
            # and reconnect (the frames it owed finish locally).
            log.exception("unexpected error on the server link")
            return f"internal error: {exc!r}"

    def _dispatch(self, data: bytes) -> None:
        """Feed ``data`` to the connection and hand the core each message complete, until
        a close (the core's ``CloseLink``); bytes that break the protocol are the core's
        too (``bad_data``)."""
        assert self.conn is not None
        core = self.device.core
        self._reading = True
        try:
            if data:
                self.conn.receive_data(data)
            while self._close_reason is None:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return
                self.device.act(core.receive(_now(), event, wall_time=time.time()))
        except ProtocolError as exc:
            self.device.act(core.bad_data(_now(), exc))
        finally:
            self._reading = False

    def _abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.transport.abort()

    async def close(self) -> None:
        """Say BYE and stop reconnecting."""
        self._stopping = True
        if self.up:
            # uvloop raises RuntimeError on a transport closed under us: the summary must
            # still be printed and the run end normally.
            with contextlib.suppress(ProtocolError, OSError, RuntimeError):
                self.send(Bye("device done"))
                assert self.writer is not None
                await asyncio.wait_for(self.writer.drain(), FLUSH_S)
        self._closing = True
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


class _ClosedInHandshake(ConnectionError):
    """The server closed the connection before WELCOME."""
