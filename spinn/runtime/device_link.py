"""The device's connection to the server: connect, TLS, handshake, read and write.

Part of the device's asyncio adapter (``spinn.runtime.device``): it moves messages
between the socket and the ``DeviceCore`` and reports the link's events (up, down, a
failed connect and its likely misconfiguration); what follows from them (PINGs, probe
trains, the dead-link verdict, when to reconnect, whom to) is the core's. It may run over
TLS (``tls_ca``, optional client certificate) and prove a shared token in the handshake
(``token_file``, PROTOCOL.md §10).
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
    Auth,
    Bye,
    Challenge,
    Connection,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Role,
    Welcome,
)
from protocol.auth import NONCE_SIZE, device_proof
from spinn.runtime.config import DeviceConfig
from spinn.runtime.credentials import SecurityError, device_ssl_context, load_token
from spinn.runtime.device_compute import DeviceModel
from spinn.runtime.device_core import FLUSH_S, Action, DeviceCore, DeviceError

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
            self._close_reason = f"closed by the device: write failed ({_describe(exc)})"
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
                why = _describe(exc, self.config.link.connect_timeout_s)
                self.device.act(
                    core.connect_failed(
                        _now(),
                        why,
                        refused=exc.error if isinstance(exc, _Refused) else None,
                        token_mismatch=isinstance(exc, _TokenMismatch),
                        untrusted=isinstance(exc, ssl.SSLCertVerificationError),
                        not_tls=isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS_REASONS,
                        closed_in_handshake=isinstance(exc, _ClosedInHandshake),
                    )
                )
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

    async def _connect(self, host: str, port: int) -> asyncio.StreamReader:
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
        self.conn, self.writer, self.welcome = conn, writer, welcome
        self._close_reason = None
        return reader

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> Welcome:
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                if exc.code is ErrorCode.UNAUTHENTICATED:
                    # Wrong token, or a server that skips authentication (PROTOCOL.md §10).
                    with contextlib.suppress(ProtocolError, OSError):
                        writer.write(conn.send(Error(exc.code, str(exc))))
                    raise _TokenMismatch(str(exc)) from None
                raise
            if event is NEED_DATA:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    raise _ClosedInHandshake("server closed the connection during the handshake")
                conn.receive_data(data)
                continue
            if isinstance(event, Welcome):
                return event
            if isinstance(event, Challenge):
                # The connection already checked the server's proof (PROTOCOL.md §10).
                assert self.token is not None and conn.hello is not None
                proof = device_proof(self.token, conn.hello.auth_nonce, event.nonce)
                writer.write(conn.send(Auth(proof)))
                continue
            if isinstance(event, Error):
                raise _Refused(event)
            raise ConnectionError(f"unexpected {type(event).__name__} during the handshake")

    async def _serve(self, reader: asyncio.StreamReader) -> str:
        """Read until the connection ends; returns why."""
        assert self.conn is not None and self.writer is not None
        dev = self.device
        try:
            while True:
                with dev.link_work():
                    self._reading = True
                    try:
                        while self._close_reason is None:
                            event = self.conn.next_event()
                            if event is NEED_DATA:
                                break
                            dev.act(dev.core.receive(_now(), event, wall_time=time.time()))
                    finally:
                        self._reading = False
                if self._close_reason is not None:
                    return self._close_reason
                data = await reader.read(_READ_CHUNK)
                if not data:
                    return self._close_reason or "server closed the connection"
                dev.core.heard(_now())
                with dev.link_work():
                    self.conn.receive_data(data)
        except ProtocolError as exc:
            with contextlib.suppress(ProtocolError, OSError):
                assert self.writer is not None
                self.writer.write(Connection(Role.DEVICE).send(Error(exc.code, str(exc))))
            return f"bad data from server: {exc}"
        except (ConnectionError, OSError) as exc:
            return self._close_reason or f"connection lost: {_describe(exc)}"
        except asyncio.CancelledError:
            return self._close_reason or "link closed by the device"
        except Exception as exc:
            # A bug in handling one message must not leave the link up and unread: drop it
            # and reconnect (the frames it owed finish locally).
            log.exception("unexpected error on the server link")
            return f"internal error: {exc!r}"

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


def _describe(exc: BaseException, timeout_s: float | None = None) -> str:
    """An exception for a log line: never empty (a timeout has no message of its own)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        within = f" within {timeout_s:g} s" if timeout_s is not None else ""
        return f"no answer{within} (connect and handshake)"
    text = str(exc)
    return text if text else type(exc).__name__


class _ClosedInHandshake(ConnectionError):
    """The server closed the connection before WELCOME."""


class _Refused(ConnectionError):
    """The server answered the handshake with an ERROR."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"server error {error.code.name}: {error.message}")
        self.error = error


class _TokenMismatch(ConnectionError):
    """The server's proof of the shared token did not match (PROTOCOL.md §10)."""
