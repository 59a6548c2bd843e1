"""The SPINN server: serves the part of the network after the split to many devices.

A thin asyncio adapter (STYLE.md habit 4): per connection, bytes from the
socket feed a sans-I/O :class:`protocol.Connection`; its events are dispatched
here; model compute runs in a thread pool.  Rules implemented here, from
docs/PROTOCOL.md and DESIGN.md part 7:

* HELLO is answered with WELCOME only if model id and weights hash match;
  otherwise ERROR(MODEL_MISMATCH) naming both, and the connection closes.
* INFER runs stages ``[split, S)`` with the server-side exits checked against
  the request's ``thr_conf``; RESULT carries exit, top-k and (unless disabled)
  the compute time. At split 0 a ``uint8_image`` tensor is the frame's pixels, made
  the model input by the checkpoint's input spec (§6.8).
* CANCEL: a queued request never runs; a running one stops at the next stage
  boundary; no RESULT is sent for it.
* Bad bytes from one peer: ERROR naming the fault, then only that peer is closed.
* HELLO with no tensor codec in common: fatal ERROR(BAD_TENSOR) naming both lists (§5.2).
* BYE from a device is a half-close (§7.3): its outstanding INFERs are still answered,
  then the server sends its own BYE and closes; a frame after it is refused (fatal ERROR).
* A fatal ERROR from a device ends its connection at once; a frame cut off by the end of
  the stream is answered with a fatal ERROR before the close (PROTOCOL.md §8.1).
* Limits with safe defaults (``ServerConfig``): connections, requests queued per
  device and in total, frame and tensor sizes, handshake and idle timeouts. An overloaded
  server answers ERROR(BUSY) at once, so the device finishes locally instead of waiting.
* Fair under hostile load (``spinn.runtime.admission``, docs/RUNTIME.md "Hostile peers"):
  connections still in the handshake have their own bounded pool and never hold a device
  slot; each connection handles a bounded number of frames per event-loop turn; PINGs
  and CANCELs of unknown ids are rate-limited; compute slots go round-robin by device.
* Optional TLS (``tls_cert``/``tls_key``, client certificates with ``tls_client_ca``) and
  shared-token authentication (``token_file``, PROTOCOL.md §10).
* SIGINT/SIGTERM: stop accepting, finish in-flight requests (bounded by a
  grace period), say BYE, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import signal
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from protocol import (
    Auth,
    Bye,
    Cancel,
    Challenge,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    ProtocolError,
    Result,
    Role,
    Welcome,
)
from protocol.auth import NONCE_SIZE, server_proof
from protocol.dictionaries import DictionaryError
from protocol.messages import MAX_STRING
from protocol.packing import CODECS, DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, unpack
from spinn.description import describe
from spinn.exits import ExitRule
from spinn.runtime.accel import resolve_device
from spinn.runtime.admission import FairSlots, HandshakePool, LogLimiter, TokenBucket
from spinn.runtime.batching import Batcher, run_batch, to_device
from spinn.runtime.compute import configure_torch, make_executor, plan_workers, slow_down
from spinn.runtime.config import ServerConfig
from spinn.runtime.metrics import ServerMetrics
from spinn.runtime.security import load_token, server_ssl_context
from spinn.runtime.stats import ServerStats

if TYPE_CHECKING:
    from protocol.dictionaries import ZstdDictionaries
    from spinn.progressive import ProgressiveModel

__all__ = [
    "ListenError",
    "SpinnServer",
    "frame_limit_for",
    "run_server",
]

log = logging.getLogger("spinn.server")

_READ_CHUNK = 1 << 16
_LINGER_S = 1.0
_LINGER_BYTES = 4 << 20
"""After a fatal ERROR, what a peer may still send before the close (``_linger``)."""
_REFUSAL_LINGER_S = 0.2
"""The same for a connection refused BUSY: it sent a HELLO at most."""
_FRAME_HEADROOM = 64 * 1024
"""Bytes above the largest activation a frame may carry (msgpack envelope, PING padding)."""
_FRAMES_PER_TURN = 64
"""Frames one connection may have handled before it yields the event loop to the others:
a peer that sends thousands of small frames in one read cannot hold the loop for all."""
_HANDSHAKE_GRACE_S = 1.0
"""A stranger this old may be closed to make room in a full handshake pool even if it has
spoken (a device's handshake takes a round trip or two): at most half the handshake
timeout. One that has sent nothing may be closed at any age (``HandshakePool``)."""
_MISCONFIG_LOG_S = 60.0
"""One log line per peer address and misconfiguration in this interval."""
_BURST_S = 2.0
"""A control frame's token bucket holds this many seconds of its rate: PINGs and CANCELs
of unknown ids may come in bursts of twice their rate (PROTOCOL.md §8.2)."""

_TLS_RECORD = b"\x16\x03"
"""First bytes of a TLS handshake record (a ClientHello): content type 22, version 3.x."""


class ListenError(OSError):
    """The server cannot listen on one of its addresses; the message names which one."""

    @classmethod
    def at(cls, flags: str, host: str, port: int, exc: OSError) -> ListenError:
        """The error of binding ``host:port``, which ``flags`` set, that failed with ``exc``."""
        # asyncio's bind errors repeat the address inside strerror; the errno's text is
        # the reason alone. Resolver errors have negative codes and only their strerror.
        code = exc.errno or 0
        reason = os.strerror(code) if code > 0 else exc.strerror or str(exc)
        where = f"{host}:{port}" if port else f"{host}, any free port"
        return cls(exc.errno, f"cannot listen on {where} ({flags}): {reason}")

    def __str__(self) -> str:
        return str(self.strerror)


def frame_limit_for(model: ProgressiveModel) -> int:
    """Default frame limit of a server of ``model`` (``LimitsConfig.max_frame_bytes``).

    float32 is the largest codec (``sparse_int8`` is at most ~1.13 bytes per element and
    zstd is used only when it shrinks the payload, PROTOCOL.md §6), so no honest INFER for
    any split ``0 ≤ s < S`` exceeds 4 bytes per element of the largest activation plus
    its envelope; the quarter and 64 KiB of headroom also fit the device's PING probes.
    """
    elements = max(math.prod(model.split_shape(s)) for s in range(model.num_stages))
    limit = 4 * elements + elements + _FRAME_HEADROOM
    return min(2**32 - 1, max(1024, limit))


@dataclass(slots=True)
class _Job:
    request_id: int
    split: int
    rule: ExitRule
    activation: np.ndarray
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    accepted_at: float = dataclasses.field(default_factory=time.monotonic)
    """time.monotonic() when the INFER was accepted (the queue wait is measured from it)."""
    received_at: float = dataclasses.field(default_factory=time.monotonic)
    """time.monotonic() when its frame was decoded, before unpacking: RESULT's held_ms."""
    expires_at: float | None = None
    """time.monotonic() after which the device no longer wants the answer (deadline_ms)."""
    expired: bool = False
    dequeued: bool = False
    """The job left the server's queue count; set on the event loop only, so that each job
    is counted out exactly once whether it started or was cancelled unrun."""
    peer: _Peer | None = None
    """The connection that sent it (its measured queue wait, ``_dequeue``)."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    exit_index: int
    classes: tuple[int, ...]
    probs: tuple[float, ...]
    compute_ms: float
    stages_run: int


class _Peer:
    """One device connection: its protocol state machine and its requests."""

    def __init__(self, server: SpinnServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        now = time.monotonic()
        self.accepted_at = now
        config = server.config
        self.pings = TokenBucket(
            config.limits.max_ping_rate, _BURST_S * config.limits.max_ping_rate, now
        )
        self.unknown_cancels = TokenBucket(
            config.limits.max_unknown_cancel_rate,
            _BURST_S * config.limits.max_unknown_cancel_rate,
            now,
        )
        self.wait_ewma_ms = 0.0
        """Recent time this device's requests spent queued (BUSY admission, per device:
        a neighbour's flood must not make its requests look late)."""
        self.closed_by_server: str | None = None
        """Why the server closed this connection from outside its read loop (eviction)."""
        self.conn = Connection(Role.SERVER, server.connection_config)
        self.jobs: dict[int, _Job] = {}
        self.last_active_at = time.monotonic()
        """When the last complete frame arrived or the last outstanding request was
        answered (idle timeout, ServerConfig)."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        """Nothing more is sent or read (fatal error, disconnect, or both BYEs exchanged)."""
        self.bye_received = False
        """The device sent BYE: nothing more is read; outstanding INFERs are still answered,
        then the server's own BYE is sent (PROTOCOL.md §7.3)."""
        self.bye_sent = False
        self.received_bytes = 0
        """Bytes read from the connection so far: PONG's ``received_bytes``."""
        peer = writer.get_extra_info("peername")
        self.name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        """The source address alone (per-address limits, rate-limited logs)."""

    def finished(self, request_id: int) -> None:
        """A request is answered (or about to be): with none left, the idle clock restarts."""
        self.jobs.pop(request_id, None)
        if not self.jobs:
            self.last_active_at = time.monotonic()

    def send(self, event: object) -> None:
        if self.closing or self.writer.is_closing():
            return
        if isinstance(event, Error):
            self.server.metrics.errors.labels(event.code.name).inc()
        if isinstance(event, Bye):
            self.bye_sent = True
        # The frame as buffers, the bulk bytes last as given: no join copy (PROTOCOL.md §4.1).
        self.writer.writelines(self.conn.send_parts(event))  # type: ignore[arg-type]


def _error(code: ErrorCode, message: str, request_id: int | None = None) -> Error:
    """An ERROR whose message fits the protocol's string limit (PROTOCOL.md §3): messages
    may quote what the peer sent, and a long quote must not cost the peer its answer."""
    if len(message) > MAX_STRING:
        message = message[: MAX_STRING - 1] + "…"
    return Error(code, message, request_id)


async def _linger(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit_s: float = _LINGER_S
) -> None:
    """Before closing on a fatal ERROR: half-close, then discard what the peer still sends
    until it closes too (at most ``limit_s`` and ``_LINGER_BYTES``). Closing a socket
    with unread bytes resets the connection, and a reset can destroy the ERROR still in
    flight; the peer would see "connection reset" instead of what it did wrong."""
    if writer.is_closing() or not writer.can_write_eof():  # gone, or TLS (close_notify)
        return
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    # RuntimeError: uvloop's write_eof() on a transport the peer has just reset.
    with contextlib.suppress(TimeoutError, ConnectionError, OSError, RuntimeError):
        writer.write_eof()
        discarded = 0
        while discarded < _LINGER_BYTES:
            data = await asyncio.wait_for(reader.read(_READ_CHUNK), max(0.0, end - loop.time()))
            if not data:
                return
            discarded += len(data)


def _replay(transport: asyncio.BaseTransport, plain: object, data: bytes) -> None:
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


def _quoted(value: object, limit: int = 80) -> str:
    """repr of a peer-supplied value for a message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SpinnServer:
    """Asyncio server over a loaded progressive model."""

    def __init__(self, config: ServerConfig) -> None:
        from spinn.checkpoint import load_checkpoint

        self.config = config
        self.workers, threads = plan_workers(config.compute.workers, config.compute.torch_threads)
        configure_torch(threads)
        self.model, self.meta = load_checkpoint(
            config.compute.checkpoint, allow_user_code=config.compute.allow_user_code
        )
        self.torch_device = resolve_device(config.compute.device)
        self.model.to(self.torch_device).eval()
        slow_down(self.model, config.compute.slowdown)  # emulation only
        self.dictionaries: ZstdDictionaries | None = None
        if config.compute.dictionaries:
            from spinn.dictionaries import load_dictionaries

            try:
                self.dictionaries = load_dictionaries(
                    config.compute.checkpoint, self.meta.model_id, self.model.num_stages
                )
            except DictionaryError as exc:
                raise DictionaryError(
                    f"{exc} (or serve without them: compute.dictionaries off)"
                ) from None
        self._token = (
            None if config.security.token_file is None else load_token(config.security.token_file)
        )
        self.max_frame_bytes = (
            frame_limit_for(self.model)
            if config.limits.max_frame_bytes is None
            else config.limits.max_frame_bytes
        )
        """The frame limit in force: the configured one, or the model's (``frame_limit_for``)."""
        self.connection_config = ConnectionConfig(
            max_frame_size=self.max_frame_bytes,
            max_tensor_elements=config.limits.max_tensor_elements,
            auth_token=self._token,
        )
        self.description = describe(
            self.model,
            self.meta,
            max_batch=1,  # INFER carries one input (PROTOCOL.md §5.3)
            max_frame_bytes=self.max_frame_bytes,
            max_tensor_elements=config.limits.max_tensor_elements,
            max_in_flight=config.limits.max_queue_per_connection,
            max_outstanding=self.connection_config.max_outstanding,
            handshake_timeout_s=config.limits.handshake_timeout_s,
            idle_timeout_s=config.limits.idle_timeout_s,
            max_ping_rate=config.limits.max_ping_rate,
            max_ping_burst=_BURST_S * config.limits.max_ping_rate,
            max_unknown_cancel_rate=config.limits.max_unknown_cancel_rate,
            max_unknown_cancel_burst=_BURST_S * config.limits.max_unknown_cancel_rate,
        )
        """What WELCOME of version 2 says about this server (PROTOCOL.md §5.12)."""
        self._ssl: ssl.SSLContext | None = None
        if config.security.tls_cert is not None and config.security.tls_key is not None:
            self._ssl = server_ssl_context(
                config.security.tls_cert, config.security.tls_key, config.security.tls_client_ca
            )
        self.stats = ServerStats()
        self.metrics = ServerMetrics(self.stats, lambda: self._queued)
        self.metrics_port: int | None = None
        """Bound port of the metrics endpoint, when ``config.operations.metrics_port`` is set."""
        self._executor: ThreadPoolExecutor = make_executor(self.workers, "spinn-server")
        self._batcher: Batcher[_Job, _Outcome | None] | None = None
        if config.compute.batch_max > 1:
            self._batcher = Batcher(
                self._compute_batch,
                self._executor,
                self.workers,
                config.compute.batch_max,
                config.compute.batch_wait_ms / 1e3,
            )
        self._server: asyncio.Server | None = None
        self._peers: set[_Peer] = set()
        """Every open connection: in the handshake, or devices."""
        self._devices: set[_Peer] = set()
        """Connections through the handshake (``max_connections`` slots)."""
        self._strangers: HandshakePool[_Peer] = HandshakePool(
            config.limits.max_handshakes,
            config.limits.max_handshakes_per_address,
            min(_HANDSHAKE_GRACE_S, config.limits.handshake_timeout_s / 2),
        )
        """Connections not yet through the handshake, in a pool of their own."""
        self._slots: FairSlots[_Peer] = FairSlots(self.workers)
        """Compute slots, round-robin by device (without batching)."""
        self._misconfig_log = LogLimiter(_MISCONFIG_LOG_S)
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued = 0
        """Requests accepted and not yet started or dropped; read and written only on the
        event loop (BUSY admission, ``_busy_reason``), so no update is ever lost."""
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start accepting devices."""
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self.config.operations.host,
                self.config.operations.port,
                limit=_READ_CHUNK,
                # Plain TCP even with TLS: ``_start_tls`` looks at the first bytes, so that
                # plain bytes on a TLS port are named, and a TLS handshake in progress is a
                # stranger in the handshake pool under its deadline.
            )
        except OSError as exc:
            raise ListenError.at(
                "operations.host/operations.port",
                self.config.operations.host,
                self.config.operations.port,
                exc,
            ) from exc
        log.info(
            "serving %s (model %s, sha256 %s…) on %s:%d with %d worker(s) × %d torch thread(s)"
            " on %s, batching %s%s",
            self.meta.arch,
            self.meta.model_id,
            self.meta.weights_sha256[:12],
            self.config.operations.host,
            self.port,
            self.workers,
            torch.get_num_threads(),
            self.torch_device,
            f"up to {self.config.compute.batch_max} waiting {self.config.compute.batch_wait_ms:g} ms"
            if self._batcher
            else "off",
            "" if self.config.compute.report_compute else ", compute time NOT reported",
        )
        if self.dictionaries is not None:
            log.info("zstd dictionaries %r: sparse_int8_zdict accepted", self.dictionaries)
        log.info(
            "limits: %d device(s), frames up to %d bytes%s",
            self.config.limits.max_connections,
            self.max_frame_bytes,
            " (from the model)" if self.config.limits.max_frame_bytes is None else "",
        )
        if self.config.operations.metrics_port is not None:
            host, port = self.config.operations.metrics_host, self.config.operations.metrics_port
            try:
                self.metrics_port = self.metrics.serve(host, port)
            except OSError as exc:
                self._server.close()
                raise ListenError.at(
                    "operations.metrics_host/operations.metrics_port", host, port, exc
                ) from exc
            log.info(
                "metrics on http://%s:%d/metrics",
                self.config.operations.metrics_host,
                self.metrics_port,
            )
        if self._ssl is not None or self._token is not None:
            log.info(
                "security: TLS %s%s, token authentication %s",
                "on" if self._ssl else "off",
                " with client certificates" if self.config.security.tls_client_ca else "",
                "on" if self._token else "off",
            )

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to shut down gracefully (signal-safe from the loop)."""
        self._stopping.set()

    async def serve_forever(self) -> None:
        """Run until ``request_stop``; then shut down gracefully."""
        if self._server is None:
            await self.start()
        stats_task = asyncio.create_task(self._stats_loop())
        try:
            await self._stopping.wait()
        finally:
            stats_task.cancel()
            await self.close()

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), say BYE, close."""
        self._stopping.set()  # from here on INFERs are answered BUSY (``_busy_reason``)
        if self._server is not None:
            self._server.close()
        tasks = [t for p in self._peers for t in p.tasks]
        if tasks:
            log.info("shutting down: %d request(s) in flight", len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.config.operations.shutdown_grace_s)
            for peer in self._peers:
                for job in peer.jobs.values():
                    job.cancelled.set()
                    peer.send(_error(ErrorCode.BUSY, "server shutting down", job.request_id))
            for t in pending:
                t.cancel()
        writers = [peer.writer for peer in self._peers]
        for peer in list(self._peers):
            if not peer.bye_sent:
                with contextlib.suppress(ProtocolError):
                    peer.send(Bye("server shutting down"))
            peer.closing = True
            with contextlib.suppress(ConnectionError, OSError):
                peer.writer.close()
        if writers:
            # Python 3.11's wait_closed() below does not wait for connections: the BYEs
            # (and a TLS close_notify) are flushed here, bounded, before the loop ends.
            flushed = asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flushed, 1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        log.info("final stats %s", json.dumps(self.stats.as_dict(), sort_keys=True))

    async def _stats_loop(self) -> None:
        if self.config.operations.stats_interval_s <= 0:
            return
        loop = asyncio.get_running_loop()
        self.stats.line(loop.time(), self._queued)
        while True:
            await asyncio.sleep(self.config.operations.stats_interval_s)
            log.info("%s", self.stats.line(loop.time(), self._queued))

    # -- one connection ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer(self, writer)
        refusal = self._admit(peer)
        if refusal is not None:
            with contextlib.suppress(ProtocolError, ConnectionError, OSError):
                if self._ssl is None:  # on a TLS port no ERROR can be read before TLS
                    peer.send(_error(ErrorCode.BUSY, refusal))
                    # Briefly: a flood beyond the limit must not hold descriptors for long.
                    await _linger(reader, writer, _REFUSAL_LINGER_S)
                writer.close()
            return
        self._peers.add(peer)
        self.stats.connections += 1
        self.stats.connections_total += 1
        # DEBUG: load balancers' TCP health checks connect every second or so; a real
        # device shows up at INFO when it is welcomed.
        log.debug("device connected from %s", peer.name)
        reason = "closed by device"
        fatal_error = False
        accepted_at = peer.accepted_at
        first = self._ssl is None  # the first bytes on a plain port may be a ClientHello
        try:
            if self._ssl is not None:
                refused = await self._start_tls(peer, reader)
                if refused is not None:
                    reason, peer.closing = refused, True
            while not peer.closing and not peer.bye_received:
                timeout = self._read_timeout(peer, accepted_at)
                try:
                    data = await asyncio.wait_for(reader.read(_READ_CHUNK), timeout)
                except TimeoutError:
                    if self._read_timeout(peer, accepted_at) > 0:
                        continue  # the peer's last request was answered meanwhile
                    reason = self._timed_out(peer)
                    fatal_error = True  # a stalled frame's bytes may still be unread
                    break
                if not data:
                    # A frame cut off by the end of the stream is a violation the peer is
                    # told about (§7.4), over its half-closed connection.
                    peer.conn.receive_data(b"")
                    self._drain_events(peer)
                    reason = peer.closed_by_server or reason
                    break
                if first and data.startswith(_TLS_RECORD):
                    # The length prefix of these bytes would read as a frame of ~370 MB;
                    # say what they are instead (PROTOCOL.md §2).
                    reason = self._wrong_port(peer, tls_device=True)
                    fatal_error = True
                    break
                if first:
                    self._strangers.heard(peer)
                    first = False
                t0 = time.perf_counter()
                peer.received_bytes += len(data)
                peer.conn.receive_data(data)
                # A bounded number of frames per turn, then the other connections' turn.
                while self._drain_events(peer):
                    self.stats.overhead_ms_total += (time.perf_counter() - t0) * 1e3
                    await asyncio.sleep(0)
                    t0 = time.perf_counter()
                self.stats.overhead_ms_total += (time.perf_counter() - t0) * 1e3
                if not await self._drained(peer):
                    reason = self._not_reading(peer)
                    break
            if peer.bye_received and not peer.closing:
                reason = await self._answer_then_bye(peer, reader)
            elif peer.closing and peer.closed_by_server:
                reason = peer.closed_by_server
        except ProtocolError as exc:
            # One bad peer: tell it what was wrong, close it, keep serving the others.
            code = getattr(exc, "code", ErrorCode.PROTOCOL)
            if code is ErrorCode.UNAUTHENTICATED:
                self.stats.connections_refused += 1
            reason = f"closed by the server: protocol error ({code.name}): {exc}"
            log.warning("device %s: %s", peer.name, reason)
            self.stats.errors_sent += 1
            with contextlib.suppress(ProtocolError, ConnectionError):
                peer.send(_error(code, str(exc)))
                fatal_error = True
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:  # a bug here costs this connection, not the server
            log.exception("device %s: internal error", peer.name)
            reason = f"closed by the server: internal error: {exc}"
            self.stats.errors_sent += 1
            with contextlib.suppress(ProtocolError, ConnectionError, OSError):
                peer.send(_error(ErrorCode.INTERNAL, f"internal server error: {exc}"))
                fatal_error = True
        finally:
            peer.closing = True
            for job in peer.jobs.values():
                job.cancelled.set()
            self._peers.discard(peer)
            self._devices.discard(peer)
            self._strangers.leave(peer)
            self.stats.handshakes = len(self._strangers)
            self.stats.connections -= 1
            with contextlib.suppress(ConnectionError, OSError):
                if fatal_error:
                    await _linger(reader, writer)
                writer.close()
            level = logging.INFO if peer.conn.hello is not None else logging.DEBUG
            log.log(level, "device %s disconnected: %s", peer.name, reason)

    def _admit(self, peer: _Peer) -> str | None:
        """Admission of a new connection, before any state or model work: why it is
        refused, or None. Device slots are taken at WELCOME (``_on_hello``); here only a
        full server and the handshake pool refuse (``HandshakePool``)."""
        refusal: str | None = None
        if len(self._devices) >= self.config.limits.max_connections:
            # The device finishes locally and retries with backoff (PROTOCOL.md §8, BUSY).
            self.stats.connections_refused += 1
            refusal = f"server full ({len(self._devices)} devices)"
            log.warning("device %s refused: %d devices connected", peer.name, len(self._devices))
        else:
            admit = self._strangers.admit(peer, peer.address, time.monotonic())
            if not admit.admitted:
                self.stats.handshakes_shed += 1
                refusal = f"server busy: {admit.reason}; retry later"
                # DEBUG: under a flood there is one per connection, by design.
                log.debug("connection from %s shed: %s", peer.name, admit.reason)
            elif admit.evict is not None:
                self._evict(admit.evict)
            self.stats.handshakes = len(self._strangers)
        return refusal

    def _evict(self, stranger: _Peer) -> None:
        """Close a connection that has not finished its handshake, to admit a newer one."""
        self.stats.handshakes_evicted += 1
        wait_s = time.monotonic() - stranger.accepted_at
        reason = (
            f"closed by the server: no handshake after {wait_s:.2f} s while the handshake "
            f"pool ({self.config.limits.max_handshakes}) was full"
        )
        stranger.closed_by_server = reason
        if self._ssl is None or stranger.writer.get_extra_info("ssl_object") is not None:
            # (Not in the middle of a TLS handshake, where plain bytes would be garbage.)
            with contextlib.suppress(ProtocolError, ConnectionError, OSError):
                stranger.send(_error(ErrorCode.PROTOCOL, f"timeout: {reason}"))
        stranger.closing = True
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            stranger.writer.close()

    async def _start_tls(self, peer: _Peer, reader: asyncio.StreamReader) -> str | None:
        """TLS on an accepted connection: its first bytes are looked at, a TLS ClientHello
        is handed to the TLS layer, anything else is named and closed (PROTOCOL.md §2).
        Meanwhile the connection is a stranger in the handshake pool, under the handshake
        deadline (docs/RUNTIME.md, "Hostile peers"). None once TLS is up, else why it was
        closed."""
        assert self._ssl is not None
        writer = peer.writer
        limit_s = self.config.limits.handshake_timeout_s
        deadline = peer.accepted_at + limit_s
        first = b""
        try:
            while len(first) < len(_TLS_RECORD):
                left_s = deadline - time.monotonic()
                data = await asyncio.wait_for(reader.read(_READ_CHUNK), max(0.0, left_s))
                if not data:
                    return peer.closed_by_server or "closed by device"
                first += data
                self._strangers.heard(peer)
            # From here on the TLS layer reads; nothing more goes to the plain reader.
            raw = cast(asyncio.Transport, writer.transport)  # a stream socket: it reads too
            plain_protocol = raw.get_protocol()
            raw.pause_reading()
            if not first.startswith(_TLS_RECORD) or len(first) >= _READ_CHUNK:
                return self._wrong_port(peer, tls_device=False)
            left_s = deadline - time.monotonic()
            upgrade = asyncio.ensure_future(
                writer.start_tls(self._ssl, ssl_handshake_timeout=max(left_s, 0.0) + 1.0)
            )
            # Its first step puts the TLS protocol on the paused transport; the bytes read
            # already go into it there, before the transport reads on (FIFO callbacks).
            asyncio.get_running_loop().call_soon(_replay, raw, plain_protocol, first)
            await asyncio.wait_for(upgrade, max(0.0, left_s))
        except TimeoutError:
            self.stats.handshakes_timed_out += 1
            self.stats.connections_refused += 1
            return f"closed by the server: timeout: no handshake within {limit_s:g} s"
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            return peer.closed_by_server or f"TLS handshake failed: {exc}"
        return None

    def _wrong_port(self, peer: _Peer, tls_device: bool) -> str:
        """TLS on one end only (PROTOCOL.md §8.1, ``tls-on-plain-port`` and
        ``plain-on-tls-port``): logged once per address and minute, then closed. A TLS
        client on a plain port gets a fatal ERROR first, which it reads as no TLS record at
        all; on a TLS port nothing is sent (nothing can be read there before TLS), and a
        plain device reads the close as a TLS server's. Either device names the cause."""
        self.stats.connections_refused += 1
        if tls_device:
            what, uses, does = "TLS handshake on a plain port", "uses", "does not"
        else:
            what, uses, does = "plain (non-TLS) bytes on a TLS port", "does not use", "does"
        why = (
            f"the device {uses} TLS (--tls/--tls-ca) and this server {does} (--tls-cert/--tls-key)"
        )
        if self._misconfig_log.allow((peer.address, what), time.monotonic()):
            log.warning("%s from %s: %s", what, peer.address, why)
        if tls_device:
            with contextlib.suppress(ProtocolError, ConnectionError, OSError):
                peer.send(_error(ErrorCode.PROTOCOL, f"{what}: {why}"))
        peer.closing = True
        return f"closed by the server: {what}: {why}"

    async def _answer_then_bye(self, peer: _Peer, reader: asyncio.StreamReader) -> str:
        """After the device's BYE: answer its outstanding INFERs, then send BYE (§7.3).

        Requests still unanswered after the idle timeout are cancelled and answered
        ERROR(CANCELLED), so a stalled compute cannot hold the connection open forever.
        Meanwhile the stream is still read: a frame after the device's BYE is refused
        with a fatal ERROR (raised from here), not left unanswered.
        """
        if peer.tasks:
            await self._answer_while_reading(peer, reader)
            for job in list(peer.jobs.values()):
                job.cancelled.set()
                peer.jobs.pop(job.request_id, None)
                peer.send(_error(ErrorCode.CANCELLED, "device said BYE", job.request_id))
            for task in peer.tasks:
                task.cancel()
        peer.send(Bye("answered all requests"))
        with contextlib.suppress(ConnectionError, OSError):
            if not await self._drained(peer):
                return self._not_reading(peer)
        return "closed after BYE from the device and the server's BYE"

    async def _answer_while_reading(self, peer: _Peer, reader: asyncio.StreamReader) -> None:
        """Wait (at most the idle timeout) for the outstanding requests, reading on."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.limits.idle_timeout_s
        reading: asyncio.Future[bytes] = asyncio.ensure_future(reader.read(_READ_CHUNK))
        try:
            while peer.tasks and not peer.closing and (left := end - loop.time()) > 0:
                watched: set[asyncio.Future[Any]] = {*peer.tasks, reading}
                await asyncio.wait(watched, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    continue
                data = reading.result()
                if not data:
                    # The device's TCP half-close after its BYE: legal, nothing more to read.
                    reading = loop.create_future()
                    continue
                peer.conn.receive_data(data)
                self._drain_events(peer)  # anything after BYE raises RemoteProtocolError
                reading = asyncio.ensure_future(reader.read(_READ_CHUNK))
        finally:
            reading.cancel()

    async def _drained(self, peer: _Peer) -> bool:
        """Wait until the peer's answers are in the kernel; False if it has not read them
        within the idle timeout (a device that stopped reading would otherwise hold its
        connection slot forever)."""
        try:
            await asyncio.wait_for(peer.writer.drain(), self.config.limits.idle_timeout_s)
        except TimeoutError:
            return False
        return True

    def _not_reading(self, peer: _Peer) -> str:
        """Drop a peer that stopped reading; returns the reason for the log."""
        peer.closing = True
        peer.writer.transport.abort()  # its unsent answers cannot be delivered anyway
        return f"closed by the server: not reading its answers for {self.config.limits.idle_timeout_s:g} s"

    def _read_timeout(self, peer: _Peer, accepted_at: float) -> float:
        """Seconds the next read may take: what is left of the handshake, or idle time."""
        now = time.monotonic()
        if peer.conn.welcome is None:
            return max(0.0, accepted_at + self.config.limits.handshake_timeout_s - now)
        if peer.jobs:  # waiting on the server, not idle: look again a period later
            return self.config.limits.idle_timeout_s
        return max(0.0, peer.last_active_at + self.config.limits.idle_timeout_s - now)

    def _timed_out(self, peer: _Peer) -> str:
        """Close a peer that stalled (slow loris); returns the reason for the log."""
        if peer.conn.welcome is None:
            reason = f"no handshake within {self.config.limits.handshake_timeout_s:g} s"
            self.stats.handshakes_timed_out += 1
        else:
            reason = f"no complete frame for {self.config.limits.idle_timeout_s:g} s"
        self.stats.connections_refused += 1
        with contextlib.suppress(ProtocolError, ConnectionError, OSError):
            peer.send(_error(ErrorCode.PROTOCOL, f"timeout: {reason}"))
        return f"closed by the server: timeout: {reason}"

    def _drain_events(self, peer: _Peer) -> bool:
        """Handle the peer's complete frames, at most ``_FRAMES_PER_TURN``; True if the
        budget ran out with frames perhaps still buffered (the caller yields, then calls
        again), False once every complete frame is handled."""
        from protocol import NEED_DATA

        for _ in range(_FRAMES_PER_TURN):
            if peer.closing:
                return False
            event = peer.conn.next_event()
            if event is NEED_DATA:
                return False
            peer.last_active_at = time.monotonic()
            if isinstance(event, Hello):
                if self._token is not None:
                    # Authenticate before any model check (PROTOCOL.md §10); the state
                    # machine already refused a HELLO without auth_nonce.
                    nonce = secrets.token_bytes(NONCE_SIZE)
                    proof = server_proof(self._token, event.auth_nonce, nonce)
                    peer.send(Challenge(nonce, proof))
                else:
                    self._on_hello(peer, event)
            elif isinstance(event, Auth):
                # The state machine checked the proof: the device holds the token.
                assert peer.conn.hello is not None
                log.info("device %s authenticated", peer.name)
                self._on_hello(peer, peer.conn.hello)
            elif isinstance(event, Infer):
                self._on_infer(peer, event)
            elif isinstance(event, Cancel):
                self._on_cancel(peer, event)
            elif isinstance(event, Ping):
                if not peer.pings.take(peer.last_active_at):
                    self._over_rate(peer, "PINGs", self.config.limits.max_ping_rate)
                # With the bytes read so far, the device times its probe trains at the
                # granularity of the reads (PROTOCOL.md §5.7, spinn.estimators).
                peer.send(Pong.reply_to(event, time.time(), peer.received_bytes))
            elif isinstance(event, Bye):
                # A half-close (PROTOCOL.md §7.3): the device sends nothing more, but its
                # outstanding INFERs are still answered before the server's BYE. Frames
                # already buffered behind it are read on: the state machine refuses them.
                peer.bye_received = True
            elif isinstance(event, Error):
                # Only a fatal ERROR reaches here (a device never answers a request): the
                # connection is over (PROTOCOL.md §5.8), nothing is left to wait for.
                log.warning(
                    "device %s sent fatal ERROR %s: %s", peer.name, event.code.name, event.message
                )
                peer.closing = True
                return False
            elif isinstance(event, ConnectionClosed):
                return False
            # Pong (answers to our pings) needs no action here.
        return not peer.closing

    def _over_rate(self, peer: _Peer, what: str, rate: float) -> None:
        """A control frame above its rate: a fatal ERROR(TOO_LARGE) naming the limit."""
        self.stats.rate_limited += 1
        raise ProtocolError(
            f"more than {rate:g} {what} a second (bursts of {_BURST_S * rate:g}): the server's "
            "limit for this connection",
            ErrorCode.TOO_LARGE,
        )

    def _on_hello(self, peer: _Peer, hello: Hello) -> None:
        meta = self.meta
        problems = []
        # From version 2 an empty model id asks for the served model (PROTOCOL.md §5.1).
        if hello.model_id != meta.model_id and (hello.model_id or hello.version < 2):
            problems.append(f"model id {_quoted(hello.model_id)} != served {meta.model_id!r}")
        # "" is a device that does not know its weights' hash (PROTOCOL.md §5.1).
        if hello.weights_sha256 and hello.weights_sha256 != meta.weights_sha256:
            problems.append(
                f"weights sha256 {hello.weights_sha256[:16]}… != served {meta.weights_sha256[:16]}…"
            )
        if problems:
            message = "model mismatch: " + "; ".join(problems)
            log.warning("device %s refused: %s", peer.name, message)
            self.stats.errors_sent += 1
            peer.send(_error(ErrorCode.MODEL_MISMATCH, message))
            peer.closing = True
            peer.closed_by_server = f"closed by the server: {message}"
            return
        zdict = self.dictionaries
        codecs = tuple(
            c
            for c in hello.codecs
            if c in CODECS
            or (c == IMAGE_CODEC and self.config.compute.image_codec)
            or c == LOSSY_CODEC
            or (c == DICT_CODEC and zdict is not None and hello.dictionaries_sha256 == zdict.sha256)
        )
        if not codecs:
            # WELCOME's codecs must be a non-empty subset of HELLO's: without one in common
            # the answer is a fatal ERROR(BAD_TENSOR) (PROTOCOL.md §5.2).
            message = (
                f"no tensor codec in common: device offers {_quoted(list(hello.codecs), 400)}, "
                f"server accepts {[*CODECS, LOSSY_CODEC, *([IMAGE_CODEC] if self.config.compute.image_codec else [])]}"
            )
            log.warning("device %s refused: %s", peer.name, message)
            self.stats.errors_sent += 1
            peer.send(_error(ErrorCode.BAD_TENSOR, message))
            peer.closing = True
            peer.closed_by_server = f"closed by the server: {message}"
            return
        if len(self._devices) >= self.config.limits.max_connections:
            # Many strangers finished their handshakes at once: the slots are full now.
            self.stats.connections_refused += 1
            message = f"server full ({len(self._devices)} devices)"
            log.warning("device %s refused: %s", peer.name, message)
            peer.send(_error(ErrorCode.BUSY, message))
            peer.closing = True
            peer.closed_by_server = f"closed by the server: {message}"
            return
        self._strangers.leave(peer)
        self.stats.handshakes = len(self._strangers)
        self._devices.add(peer)
        peer.send(
            Welcome(
                hello.version,
                meta.model_id,
                meta.weights_sha256,
                codecs,
                self.config.compute.report_compute,
                self.config.operations.server_name,
                dictionaries_sha256="" if zdict is None else zdict.sha256,
                description=self.description if hello.version >= 2 else None,
            )
        )
        log.info("device %s (%s) welcomed", peer.name, hello.device_name or "unnamed")

    def _on_infer(self, peer: _Peer, infer: Infer) -> None:
        received_at = time.monotonic()
        num_stages = self.model.num_stages
        rid = infer.request_id
        if rid in peer.jobs:
            self._request_error(peer, ErrorCode.PROTOCOL, f"request id {rid} already in use", rid)
            return
        if not 0 <= infer.split < num_stages:
            self._request_error(
                peer,
                ErrorCode.BAD_SPLIT,
                f"split {infer.split} outside 0..{num_stages - 1} (split {num_stages} is "
                "device-only and never offloaded)",
                rid,
            )
            return
        busy = self._busy_reason(peer, infer)
        if busy is not None:
            # Not a warning per request: under overload there are many, by design.
            self.stats.busy_sent += 1
            self.stats.errors_sent += 1
            log.debug("device %s request %d: busy: %s", peer.name, rid, busy)
            peer.send(_error(ErrorCode.BUSY, busy, rid))
            return
        if infer.tensor.codec == IMAGE_CODEC and infer.split != 0:
            self._request_error(
                peer,
                ErrorCode.BAD_SPLIT,
                f"{IMAGE_CODEC} is the input frame's pixels, valid at split 0 only, "
                f"not at split {infer.split} (PROTOCOL.md §6.8)",
                rid,
            )
            return
        # The packed tensor carries the batch dimension (PROTOCOL.md, INFER): batch 1.
        expected = (1, *self.model.split_shape(infer.split))
        if tuple(infer.tensor.shape) != expected:
            self._request_error(
                peer,
                ErrorCode.BAD_SPLIT,
                f"tensor shape {tuple(infer.tensor.shape)} does not match split "
                f"{infer.split}, which expects {expected}",
                rid,
            )
            return
        try:
            activation = unpack(
                infer.tensor, self.config.limits.max_tensor_elements, self.dictionaries
            )
        except ProtocolError as exc:
            # TOO_LARGE stays TOO_LARGE (a zstd frame declaring more than the shape, §6.6).
            code = getattr(exc, "code", ErrorCode.BAD_TENSOR)
            self._request_error(peer, code, f"tensor does not decode: {exc}", rid)
            return
        if infer.tensor.codec == IMAGE_CODEC:
            # The pixels become the model input exactly as on the device (§6.8).
            activation = self.model.input_spec.preprocess(torch.from_numpy(activation)).numpy()
        rule = ExitRule.from_wire(infer.thr_conf, infer.early_exits)
        job = _Job(rid, infer.split, rule, activation, received_at=received_at, peer=peer)
        if infer.deadline_ms is not None:
            job.expires_at = time.monotonic() + infer.deadline_ms / 1e3
        peer.jobs[rid] = job
        self.stats.requests += 1
        self._queued += 1
        task = asyncio.create_task(self._run_job(peer, job))
        peer.tasks.add(task)
        task.add_done_callback(peer.tasks.discard)
        # A done callback, not a `finally` in `_run_job`: a task cancelled before its first
        # step never enters its body, and the count must still come back down.
        task.add_done_callback(functools.partial(self._task_done, job))

    def _busy_reason(self, peer: _Peer, infer: Infer) -> str | None:
        """Why this INFER is refused with BUSY, or None to accept it.

        Besides the queue limits, a request whose deadline would pass while it waits is
        refused now: answering BUSY at once lets the device finish it locally without
        waiting out its deadline (paper §4.4; PROTOCOL.md §8, BUSY).
        """
        if self._stopping.is_set():
            # Past the shutdown's snapshot of tasks: it would be neither awaited nor cancelled.
            return "server shutting down"
        if len(peer.jobs) >= self.config.limits.max_queue_per_connection:
            return f"{len(peer.jobs)} requests already queued for this device"
        if self._queued >= self.config.limits.max_queued:
            return f"{self._queued} requests queued on the server"
        if self._queued >= self.config.limits.max_queued * 3 // 4 and peer.jobs:
            # A busy server: each device may hold its share of the queue, so that one
            # flooding device cannot fill it for its neighbours.
            holders = sum(1 for p in self._devices if p.jobs)
            share = max(1, self.config.limits.max_queued // max(1, holders))
            if len(peer.jobs) >= share:
                return (
                    f"{len(peer.jobs)} requests queued for this device, its share of a busy "
                    f"server ({self._queued} queued for {holders} devices)"
                )
        if infer.deadline_ms is not None and self.stats.computed >= 10:
            mean_ms = self.stats.compute_ms_total / self.stats.computed
            # The requests served before it, shared by the workers, then its own compute:
            # without batching, compute slots go round-robin by device (``FairSlots``), so
            # only a share of what others queued is ahead of it. The measured recent wait of
            # this device's requests covers what the count misses (running requests, workers
            # slowed by a busy machine); the larger of the two is used. Nothing queued for
            # it means no wait, which also lets the measurement recover after a burst.
            measured_ms = peer.wait_ewma_ms if peer.jobs else 0.0
            if self._batcher is None:
                ahead = self._slots.ahead(peer)
                per_pass = 1
            else:
                # With batching, a forward pass answers up to batch_max queued requests.
                ahead = self._queued
                per_pass = max(1, min(self._queued, self.config.compute.batch_max))
            ahead_ms = ahead * mean_ms / (self.workers * per_pass)
            done_ms = max(ahead_ms, measured_ms) + mean_ms
            if done_ms > infer.deadline_ms:
                return (
                    f"answer expected in about {done_ms:.0f} ms ({ahead} queued ahead), past "
                    f"the request's deadline of {infer.deadline_ms:.0f} ms"
                )
        return None

    def _on_cancel(self, peer: _Peer, cancel: Cancel) -> None:
        job = peer.jobs.get(cancel.request_id)
        if job is not None:
            self.stats.cancels_received += 1
            job.cancelled.set()
            return
        # Already answered (the RESULT crossed the CANCEL), or never sent: nothing to do,
        # at O(1), counted apart and rate-limited (a flood of them is not a device).
        self.stats.cancels_unknown += 1
        if not peer.unknown_cancels.take(peer.last_active_at):
            self._over_rate(
                peer, "CANCELs of unknown requests", self.config.limits.max_unknown_cancel_rate
            )

    def _request_error(self, peer: _Peer, code: ErrorCode, message: str, rid: int) -> None:
        # An ERROR with a request id answers that request; the connection stays usable.
        self.stats.errors_sent += 1
        log.warning("device %s request %d: %s", peer.name, rid, message)
        peer.send(_error(code, message, rid))

    async def _run_job(self, peer: _Peer, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._batcher is not None:
                outcome = await self._batcher.submit(job.split, job)
            else:
                await self._slots.acquire(peer)
                try:
                    outcome = await loop.run_in_executor(self._executor, self._compute, job)
                finally:
                    self._slots.release()
        except Exception as exc:  # a model failure answers this request only
            log.exception("request %d failed", job.request_id)
            peer.finished(job.request_id)
            self._request_error(peer, ErrorCode.INTERNAL, f"compute failed: {exc}", job.request_id)
            return
        peer.finished(job.request_id)
        if outcome is None:
            # Cancelled: no RESULT.  ERROR(CANCELLED) closes the request in both state
            # machines (each INFER is answered exactly once, by RESULT or ERROR).
            why = "past its deadline" if job.expired else "cancelled by the device"
            peer.send(_error(ErrorCode.CANCELLED, why, job.request_id))
            return
        t0 = time.perf_counter()
        report = self.config.compute.report_compute
        held_ms = (time.monotonic() - job.received_at) * 1e3
        try:
            result = Result(
                job.request_id,
                outcome.exit_index,
                outcome.classes,
                outcome.probs,
                outcome.compute_ms if report else None,
                held_ms if report else None,
            )
        except ValueError as exc:  # e.g. NaN probabilities from an activation that overflows
            self._request_error(peer, ErrorCode.INTERNAL, f"no valid result: {exc}", job.request_id)
            return
        peer.send(result)
        self.stats.held_ms.append(held_ms)
        self.stats.overhead_ms_total += (time.perf_counter() - t0) * 1e3

    def _dequeue(self, job: _Job, wait_ms: float | None) -> None:
        """Event loop: take ``job`` out of the queue count, once.

        Called from ``_start`` (through the loop, with the measured wait) when a worker
        picks the job up, and when its task ends; whichever comes first counts it out, so
        jobs cancelled before a worker saw them (BYE, shutdown, the batcher dropping a
        cancelled waiter) cannot leak into a permanent BUSY.
        """
        if job.dequeued:
            return
        job.dequeued = True
        self._queued -= 1
        if wait_ms is not None and job.peer is not None:
            job.peer.wait_ewma_ms += 0.2 * (wait_ms - job.peer.wait_ewma_ms)

    def _task_done(self, job: _Job, _task: asyncio.Task[None]) -> None:
        self._dequeue(job, None)

    def _dequeue_from_worker(self, job: _Job, wait_ms: float) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # A loop closing between the check and the call has no counts left to keep.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._dequeue, job, wait_ms)

    def _start(self, job: _Job) -> bool:
        """Worker thread, as a job leaves the queue: False if it is dropped unrun."""
        wait_ms = (time.monotonic() - job.accepted_at) * 1e3
        self._dequeue_from_worker(job, wait_ms)
        self.metrics.queue_wait_seconds.observe(wait_ms / 1e3)
        if job.expires_at is not None and time.monotonic() > job.expires_at:
            # Past the device's deadline it has answered locally (PROTOCOL.md, deadline_ms).
            job.expired = True
        if job.cancelled.is_set() or job.expired:
            with self._lock:
                if job.cancelled.is_set():
                    self.stats.cancelled_queued += 1
                else:
                    self.stats.expired_unrun += 1
            return False
        return True

    def _compute(self, job: _Job) -> _Outcome | None:
        """Worker thread: stages [split, S) with exit checks; stops when cancelled."""
        if not self._start(job):
            return None
        from spinn.inference import iter_stages

        t0 = time.perf_counter()
        stages = 0
        x = to_device([job.activation], self.torch_device)
        for step in iter_stages(self.model, x, job.split, self.model.num_stages, job.rule):
            stages += 1
            if step.answer is not None:
                compute_ms = (time.perf_counter() - t0) * 1e3
                top = step.answer.topk(self.config.compute.top_k)
                with self._lock:
                    self.stats.computed += 1
                    self.stats.stages_run += stages
                    self.stats.compute_ms_total += compute_ms
                    self.stats.compute_ms.append(compute_ms)
                self.metrics.compute_seconds.observe(compute_ms / 1e3)
                self.metrics.batch_size.observe(1)
                return _Outcome(
                    step.answer.exit,
                    tuple(c for c, _ in top),
                    tuple(p for _, p in top),
                    compute_ms,
                    stages,
                )
            if job.cancelled.is_set():
                # Stop at the stage boundary (DESIGN.md part 7, cancellation).
                with self._lock:
                    self.stats.cancelled_running += 1
                    self.stats.stages_run += stages
                return None
        raise RuntimeError(f"request {job.request_id}: no exit answered after the last stage")

    def _compute_batch(self, jobs: list[_Job]) -> list[_Outcome | None]:
        """Worker thread: one batch of requests for the same split (``Batcher``).

        Cancelled and expired requests are removed before the forward pass; a CANCEL
        arriving during it stops that request at the next stage boundary.
        """
        live = [job for job in jobs if self._start(job)]
        outcomes: dict[int, _Outcome | None] = {}
        if live:
            x = to_device([job.activation for job in live], self.torch_device)
            answers = run_batch(
                self.model,
                x,
                live[0].split,
                [job.rule for job in live],
                lambda i: live[i].cancelled.is_set(),
            )
            self.metrics.batch_size.observe(len(live))
            for job, answer in zip(live, answers, strict=True):
                if answer is None:
                    with self._lock:
                        self.stats.cancelled_running += 1
                    continue
                compute_ms = answer.compute_s * 1e3
                top = torch.topk(answer.probs, min(self.config.compute.top_k, answer.probs.numel()))
                with self._lock:
                    self.stats.computed += 1
                    self.stats.stages_run += answer.stages_run
                    self.stats.compute_ms_total += compute_ms
                    self.stats.compute_ms.append(compute_ms)
                self.metrics.compute_seconds.observe(answer.compute_s)
                outcomes[id(job)] = _Outcome(
                    answer.exit_index,
                    tuple(int(c) for c in top.indices),
                    tuple(float(p) for p in top.values),
                    compute_ms,
                    answer.stages_run,
                )
        return [outcomes.get(id(job)) for job in jobs]


async def run_server(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code (0 on graceful stop)."""
    server = SpinnServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.serve_forever()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
