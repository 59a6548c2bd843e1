"""The server's decisions, sans I/O: events and ``now`` in, actions out.

``ServerCore`` is to the server what ``protocol.Connection`` is to one connection, and
aioquic's ``QuicConnection`` to QUIC: it never touches a socket, a thread or a clock.
The asyncio adapter (``spinn.runtime.server``) feeds it what happens, each with the time
``now`` read from one monotonic clock:

* ``connection_made`` / ``connection_lost`` / ``connection_closed``: a peer came, its
  stream failed, the adapter finished closing it;
* ``data_received`` (``b""``: the stream ended) and ``resume`` (the next turn of a peer
  that had more frames buffered than one turn handles);
* on a TLS port, ``tls_started`` / ``tls_failed``: the upgrade the core asked for with
  ``StartTls``, once the connection's first bytes showed a TLS ClientHello;
* ``timer_fired`` for a peer (its ``deadline`` passed) and ``wakeup`` (``next_wakeup``
  passed: a batch has waited its time);
* ``not_reading`` (the peer's answers did not drain within the idle timeout);
* ``compute_done``: a ``RunBatch`` finished;
* ``stop_accepting`` and ``shutdown``.

Each returns a list of actions, to be carried out in order: ``Send`` bytes to a peer,
``Close`` a peer (with a reason, after draining or lingering), ``StartTls`` (upgrade a
connection, handing TLS the bytes already read), ``RunBatch`` (stages
``[split, S)`` of a batch of requests in a worker), ``Log`` a line, ``Record`` a metric.
A running batch is cancelled through its jobs' ``cancelled`` flag, which the compute
reads at every stage boundary (DESIGN.md part 7).

The core owns admission (the handshake pool, device slots, per-address limits), the
rate limits of PING and CANCEL, the handshake and idle timeouts, the handshake itself
(model check, token challenge, codec negotiation), BUSY, the request queue and which
requests form a batch, cancellation, and the counters (``ServerStats``). Rules from
docs/PROTOCOL.md and docs/RUNTIME.md ("Server", "Hostile peers"):

* HELLO is answered with WELCOME only if model id and weights hash match; otherwise
  ERROR(MODEL_MISMATCH) naming both, and the connection closes.
* CANCEL: a queued request never runs (answered ERROR(CANCELLED) at once); a running one
  stops at the next stage boundary; no RESULT is sent for it.
* Bad bytes from one peer: ERROR naming the fault, then only that peer is closed.
* HELLO with no tensor codec in common: fatal ERROR(BAD_TENSOR) naming both lists (§5.2).
* BYE from a device is a half-close (§7.3): its outstanding INFERs are still answered
  (for at most the idle timeout), then the server sends its own BYE and closes.
* An overloaded server answers ERROR(BUSY) at once, so the device finishes locally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeAlias

from protocol import (
    NEED_DATA,
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
from protocol.messages import Message
from protocol.tensor import CODECS, DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, PackedTensor
from spinn.model.exits import ExitRule
from spinn.runtime.actions import Log, fitted_error
from spinn.runtime.admission import HandshakePool, LogLimiter, TokenBucket
from spinn.runtime.config import ServerConfig
from spinn.runtime.run_summary import ServerStats
from spinn.runtime.server_queue import FairQueue, SplitGroups

if TYPE_CHECKING:
    import numpy as np

    from protocol.description import Description

__all__ = [
    "BURST_S",
    "FLUSH_S",
    "FRAMES_PER_TURN",
    "LINGER_S",
    "REFUSAL_LINGER_S",
    "Action",
    "Close",
    "ComputeResult",
    "Job",
    "Log",
    "Outcome",
    "Record",
    "RunBatch",
    "Send",
    "ServedModel",
    "ServerCore",
    "StartTls",
    "Stopped",
]

LINGER_S: Final = 1.0
"""After a fatal ERROR, how long a peer may still send before the close."""
REFUSAL_LINGER_S: Final = 0.2
"""The same for a connection refused BUSY at once: it sent a HELLO at most."""
FRAMES_PER_TURN: Final = 64
"""Frames one connection may have handled before it yields the event loop to the others:
a peer that sends thousands of small frames in one read cannot hold the loop for all."""
_HANDSHAKE_GRACE_S: Final = 1.0
"""A stranger this old may be closed to make room in a full handshake pool even if it has
spoken (a device's handshake takes a round trip or two): at most half the handshake
timeout. One that has sent nothing may be closed at any age (``HandshakePool``)."""
_MISCONFIG_LOG_S: Final = 60.0
"""One log line per peer address and misconfiguration in this interval."""
BURST_S: Final = 2.0
"""A control frame's token bucket holds this many seconds of its rate: PINGs and CANCELs
of unknown ids may come in bursts of twice their rate (PROTOCOL.md §8.2)."""
_TLS_RECORD: Final = b"\x16\x03"
"""First bytes of a TLS handshake record (a ClientHello): content type 22, version 3.x."""
_MAX_SNIFF: Final = 1 << 16
"""Bytes read on a TLS port before they must have shown a TLS record: one read."""
_WAIT_EWMA: Final = 0.2
"""Weight of the newest queue wait in a connection's measured wait (BUSY admission)."""
FLUSH_S: Final = 1.0
"""At shutdown, how long the last frames (BYEs, a TLS close_notify) may take to leave,
and the listening socket to close: a peer that does not read cannot hold the exit."""
_TLS_SLACK_S: Final = 1.0
"""The TLS layer's own handshake timeout runs this much past the core's deadline, so that
the core's ``timer_fired`` (which names the reason) always comes first."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the core knows of the served model: names and shapes, no weights."""

    model_id: str
    weights_sha256: str
    split_shapes: tuple[tuple[int, ...], ...]
    """Activation shape at each split 0..S−1, batch excluded (``split_shape``)."""
    description: Description | None = None
    """WELCOME's description for version 2 (PROTOCOL.md §5.12)."""
    dictionaries_sha256: str | None = None
    """The loaded zstd dictionaries' hash; None: sparse_int8_zdict is not accepted."""

    @property
    def num_stages(self) -> int:
        """S: splits 0..S−1 may be offloaded."""
        return len(self.split_shapes)


# -- requests and their compute ------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Job:
    """One accepted INFER, from its acceptance until it is answered."""

    cid: int
    """The connection that sent it."""
    request_id: int
    split: int
    rule: ExitRule
    activation: np.ndarray
    """The decoded tensor (the model input at split 0)."""
    received_at: float
    """When its frame was handled (RESULT's held_ms, the queue wait)."""
    expires_at: float | None = None
    """After this the device no longer wants the answer (deadline_ms)."""
    cancelled: bool = False
    """Set by the core (CANCEL, disconnect, BYE timeout, shutdown); the compute reads it at
    every stage boundary and stops there."""
    expired: bool = False
    running: bool = False
    """Handed to a worker (in a ``RunBatch``)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job computed to an answer."""

    exit_index: int
    classes: tuple[int, ...]
    probs: tuple[float, ...]
    compute_ms: float
    stages_run: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """A job that did not run to an answer: cancelled before it started (``stages_run``
    None) or at a stage boundary."""

    stages_run: int | None


ComputeResult: TypeAlias = Outcome | Stopped


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write these buffers, in order, to connection ``cid``."""

    cid: int
    data: list[bytes]


@dataclass(frozen=True, slots=True)
class Close:
    """Close connection ``cid``; then tell the core (``connection_closed``)."""

    cid: int
    reason: str
    linger_s: float = 0.0
    """After a fatal ERROR: half-close, then discard what the peer still sends for at most
    this long, so that a reset does not destroy the ERROR in flight."""
    drain: bool = False
    """Wait (up to the idle timeout) for the written bytes to leave first; if they do
    not, report ``not_reading``."""
    abort: bool = False
    """Drop unsent bytes: the peer does not read them anyway.

    The core closes a connection once; the one later ``Close`` it may send for it is an
    abort (``not_reading``: a drain that did not finish), which replaces the first."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade connection ``cid`` to TLS, giving the TLS layer ``replay`` (the bytes read
    before, its ClientHello's start) first; report ``tls_started`` or ``tls_failed``, or
    ``timer_fired`` at the ``deadline``."""

    cid: int
    replay: bytes


@dataclass(frozen=True, slots=True)
class RunBatch:
    """Run stages ``[split, S)`` of ``jobs`` (one forward pass if several) in a worker;
    report with ``compute_done(batch, ...)``."""

    jobs: tuple[Job, ...]
    split: int
    batched: bool
    """Batching is on: the compute runs them as one batch (``run_batch``)."""


@dataclass(frozen=True, slots=True)
class Record:
    """An observation for a metric: ``errors`` (label: the code), ``compute_seconds``,
    ``queue_wait_seconds``, ``batch_size`` (``spinn.runtime.prometheus_metrics``)."""

    metric: str
    value: float = 1.0
    label: str = ""


Action: TypeAlias = Send | Close | StartTls | RunBatch | Log | Record


def _quoted(value: object, limit: int = 80) -> str:
    """repr of a peer-supplied value for a message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _peer_name(peername: object) -> tuple[str, str]:
    """``host:port`` for the log, and the source address alone (per-address limits)."""
    if isinstance(peername, tuple):
        return f"{peername[0]}:{peername[1]}", str(peername[0])
    return str(peername), str(peername)


class _RateExceeded(ProtocolError):
    """A control frame above its rate (fatal ERROR(TOO_LARGE) naming the limit)."""


@dataclass(eq=False, slots=True)
class _Peer:
    cid: int
    name: str
    address: str
    conn: Connection
    accepted_at: float
    pings: TokenBucket
    unknown_cancels: TokenBucket
    last_active_at: float
    """When the last complete frame arrived or the last outstanding request was
    answered (idle timeout)."""
    jobs: dict[int, Job] = field(default_factory=dict)
    wait_ewma_ms: float = 0.0
    """Recent time this device's requests spent queued (BUSY admission, per device: a
    neighbour's flood must not make its requests look late)."""
    first: bool = True
    """Nothing read yet."""
    received_bytes: int = 0
    """Bytes read so far: PONG's ``received_bytes``."""
    more: bool = False
    """Frames may still be buffered: the turn's budget ran out (``resume``)."""
    closing: bool = False
    """Nothing more is sent or read."""
    reason: str = "closed by device"
    """Why it closed, for the disconnect line."""
    bye_received_at: float | None = None
    """The device sent BYE: outstanding INFERs are still answered, then the server's."""
    bye_sent: bool = False
    tls_pending: bool = False
    """On a TLS port, until TLS is up: nothing but a ClientHello may be read, and no plain
    ERROR be sent."""
    sniffed: bytes = b""
    """On a TLS port, the first bytes read before the upgrade."""


class ServerCore:
    """Admission, limits, timeouts, handshake, queue and batching of one server."""

    def __init__(
        self,
        config: ServerConfig,
        model: ServedModel,
        *,
        workers: int,
        decode: Callable[[PackedTensor], np.ndarray],
        connection_config: ConnectionConfig | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        tls: bool = False,
    ) -> None:
        """``decode`` turns an INFER's tensor into the activation (raising
        ``ProtocolError`` for one that does not decode); ``random_bytes(n)`` makes the
        token challenge's nonces (needed when ``connection_config`` has a token); ``tls``:
        this is a TLS port (connections start plain and are upgraded, ``StartTls``)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config: Final = config
        self.model: Final = model
        self.workers: Final = workers
        self.connection_config: Final = connection_config or ConnectionConfig()
        if self.connection_config.auth_token is not None and random_bytes is None:
            raise ValueError("token authentication needs random_bytes for its nonces")
        self._decode = decode
        self.tls: Final = tls
        self._random_bytes = random_bytes
        self.stats: Final = ServerStats()
        self._peers: dict[int, _Peer] = {}
        """Every open connection: in the handshake, or devices."""
        self._devices: set[int] = set()
        """Connections through the handshake (``max_connections`` slots)."""
        self.handshakes: Final[HandshakePool[int]] = HandshakePool(
            config.limits.max_handshakes,
            config.limits.max_handshakes_per_address,
            min(_HANDSHAKE_GRACE_S, config.limits.handshake_timeout_s / 2),
        )
        """Connections not yet through the handshake, in a pool of their own."""
        self._misconfig_log = LogLimiter(_MISCONFIG_LOG_S)
        self._fair: FairQueue[int, Job] = FairQueue()
        self._groups: SplitGroups[int, Job] | None = None
        if config.compute.batch_max > 1:
            self._groups = SplitGroups(config.compute.batch_max, config.compute.batch_wait_ms / 1e3)
        self._free = workers
        self._in_flight = 0
        """Jobs accepted and not yet answered, over all connections."""
        self.stopping = False
        """Shutting down: INFERs are answered BUSY."""
        self._stopped_at = 0.0
        """When ``stop_accepting`` came (the grace period's start)."""

    # -- introspection ---------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests accepted and not yet started or dropped (the queue depth)."""
        return len(self._fair) + (len(self._groups) if self._groups is not None else 0)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered."""
        return self._in_flight

    @property
    def connections(self) -> int:
        """Connections open: in the handshake, or devices."""
        return len(self._peers)

    @property
    def devices(self) -> int:
        """Connections through the handshake."""
        return len(self._devices)

    def wants_turn(self, cid: int) -> bool:
        """The peer's last turn ran out of budget with frames perhaps still buffered: the
        adapter yields to the others, then calls ``resume``."""
        peer = self._peers.get(cid)
        return peer is not None and peer.more and not peer.closing

    def deadline(self, cid: int, now: float) -> float | None:
        """When ``timer_fired(cid)`` is due: the end of the handshake, of the idle time,
        or of the wait for a BYE's outstanding answers. None: no timer."""
        peer = self._peers.get(cid)
        if peer is None or peer.closing:
            return None
        if peer.bye_received_at is not None:
            return peer.bye_received_at + self.config.limits.idle_timeout_s
        if peer.conn.welcome is None:
            return peer.accepted_at + self.config.limits.handshake_timeout_s
        if peer.jobs:  # waiting on the server, not idle: look again a period later
            return now + self.config.limits.idle_timeout_s
        return peer.last_active_at + self.config.limits.idle_timeout_s

    def wait_s(self, cid: int, now: float) -> float | None:
        """Seconds until ``timer_fired(cid)`` is due (``deadline``), 0 if past; None: no
        timer."""
        due = self.deadline(cid, now)
        return None if due is None else max(0.0, due - now)

    def tls_timeout_s(self, cid: int, now: float) -> float:
        """The timeout to give the TLS layer's own handshake: past ``deadline``, so that
        ``timer_fired`` decides (and names) the close of a handshake that stalls."""
        return (self.wait_s(cid, now) or 0.0) + _TLS_SLACK_S

    @property
    def drain_timeout_s(self) -> float:
        """How long a peer's answers may take to drain into the kernel before the peer
        counts as not reading (``not_reading``): the idle timeout, or a device that
        stopped reading would hold its connection slot forever."""
        return self.config.limits.idle_timeout_s

    def shutdown_at(self) -> float | None:
        """When ``shutdown`` is due once ``stop_accepting`` came: at once when no request
        is in flight, else at the end of the grace period (``operations.shutdown_grace_s``)
        at the latest; ask again after each event. None: not shutting down."""
        if not self.stopping:
            return None
        if not self._in_flight:
            return self._stopped_at
        return self._stopped_at + self.config.operations.shutdown_grace_s

    def next_wakeup(self) -> float | None:
        """When ``wakeup`` is due: a batch will have waited its time while a worker is free."""
        if self._groups is None or self._free <= 0:
            return None
        return self._groups.next_due()

    def stats_line(self, now: float) -> str:
        """The periodic stats line."""
        return self.stats.line(now, self.queued)

    def note_overhead(self, seconds: float) -> None:
        """Event-loop time spent on framing, unpacking and dispatch (the final stats)."""
        self.stats.overhead_ms_total += seconds * 1e3

    # -- connections -----------------------------------------------------------------------

    def connection_made(self, cid: int, peername: object, now: float) -> list[Action]:
        """A connection was accepted (after TLS, if any): admit it or refuse it BUSY.

        Device slots are taken at WELCOME; here only a full server and the handshake
        pool refuse (``HandshakePool``)."""
        name, address = _peer_name(peername)
        config = self.config
        peer = _Peer(
            cid,
            name,
            address,
            Connection(Role.SERVER, self.connection_config),
            now,
            TokenBucket(config.limits.max_ping_rate, BURST_S * config.limits.max_ping_rate, now),
            TokenBucket(
                config.limits.max_unknown_cancel_rate,
                BURST_S * config.limits.max_unknown_cancel_rate,
                now,
            ),
            now,
            tls_pending=self.tls,
        )
        out: list[Action] = []
        refusal: str | None = None
        if len(self._devices) >= config.limits.max_connections:
            # The device finishes locally and retries with backoff (PROTOCOL.md §8, BUSY).
            self.stats.connections_refused += 1
            refusal = f"server full ({len(self._devices)} devices)"
            out.append(
                Log(
                    logging.WARNING,
                    f"device {name} refused: {len(self._devices)} devices connected",
                )
            )
        else:
            admit = self.handshakes.admit(cid, address, now)
            if not admit.admitted:
                self.stats.handshakes_shed += 1
                refusal = f"server busy: {admit.reason}; retry later"
                # DEBUG: under a flood there is one per connection, by design.
                out.append(Log(logging.DEBUG, f"connection from {name} shed: {admit.reason}"))
            elif admit.evict is not None:
                self._evict(admit.evict, now, out)
            self.stats.handshakes = len(self.handshakes)
        if refusal is not None:
            # Not registered: its close is not a disconnect of a connection that was served.
            peer.closing = True
            if self.tls:  # on a TLS port no ERROR can be read before TLS
                out.append(Close(cid, f"refused: {refusal}"))
                return out
            self._count_error(ErrorCode.BUSY, out)
            out.append(Send(cid, peer.conn.send_parts(fitted_error(ErrorCode.BUSY, refusal))))
            # Briefly: a flood beyond the limit must not hold descriptors for long.
            out.append(Close(cid, f"refused: {refusal}", linger_s=REFUSAL_LINGER_S))
            return out
        self._peers[cid] = peer
        self.stats.connections += 1
        self.stats.connections_total += 1
        # DEBUG: load balancers' TCP health checks connect every second or so; a real
        # device shows up at INFO when it is welcomed.
        out.append(Log(logging.DEBUG, f"device connected from {name}"))
        return out

    def _evict(self, cid: int, now: float, out: list[Action]) -> None:
        """Close a connection that has not finished its handshake, to admit a newer one."""
        stranger = self._peers.get(cid)
        if stranger is None or stranger.closing:
            return  # leaving already: its own close frees the place
        self.stats.handshakes_evicted += 1
        reason = (
            f"closed by the server: no handshake after {now - stranger.accepted_at:.2f} s "
            f"while the handshake pool ({self.config.limits.max_handshakes}) was full"
        )
        if not stranger.tls_pending:  # plain bytes in a TLS handshake would be garbage
            self._send_quietly(
                stranger, fitted_error(ErrorCode.PROTOCOL, f"timeout: {reason}"), out
            )
        self._close(stranger, reason, out)

    def connection_lost(self, cid: int, cause: str, now: float) -> list[Action]:
        """Reading or writing the peer's stream failed (reset, broken pipe)."""
        return self._guarded(
            cid, lambda peer, out: self._close(peer, f"connection lost: {cause}", out)
        )

    def connection_closed(self, cid: int, now: float) -> list[Action]:
        """The adapter has closed the connection: forget it, log why it ended."""
        peer = self._peers.pop(cid, None)
        out: list[Action] = []
        if peer is None:
            return out
        peer.closing = True
        for job in peer.jobs.values():
            self._drop(job, now, out)
        self._in_flight -= len(peer.jobs)
        peer.jobs.clear()
        self._devices.discard(cid)
        self.handshakes.leave(cid)
        self.stats.handshakes = len(self.handshakes)
        self.stats.connections -= 1
        level = logging.INFO if peer.conn.hello is not None else logging.DEBUG
        out.append(Log(level, f"device {peer.name} disconnected: {peer.reason}"))
        self._dispatch(now, out)
        return out

    def not_reading(self, cid: int, now: float) -> list[Action]:
        """The peer's answers did not drain within the idle timeout: drop it (a device
        that stopped reading would otherwise hold its connection slot forever)."""
        peer = self._peers.get(cid)
        out: list[Action] = []
        if peer is not None:
            idle_s = self.config.limits.idle_timeout_s
            reason = f"closed by the server: not reading its answers for {idle_s:g} s"
            self._close(peer, reason, out, abort=True)
        return out

    # -- bytes from a peer -----------------------------------------------------------------

    def data_received(self, cid: int, data: bytes, now: float) -> list[Action]:
        """Bytes read from the peer; ``b""``: its stream ended."""
        return self._guarded(cid, lambda peer, out: self._on_data(peer, data, now, out))

    def resume(self, cid: int, now: float) -> list[Action]:
        """The next turn of a peer whose frames did not fit in the last (``wants_turn``)."""
        return self._guarded(cid, lambda peer, out: self._handle_frames(peer, now, out))

    def _guarded(self, cid: int, step: Callable[[_Peer, list[Action]], None]) -> list[Action]:
        """``step`` on an open peer; what it raises closes that peer only."""
        peer = self._peers.get(cid)
        out: list[Action] = []
        if peer is None or peer.closing:
            return out
        try:
            step(peer, out)
        except ProtocolError as exc:
            self._protocol_error(peer, exc, out)
        except Exception as exc:  # a bug here costs this connection, not the server
            self._internal_error(peer, exc, out)
        return out

    def _on_data(self, peer: _Peer, data: bytes, now: float, out: list[Action]) -> None:
        if not data:
            if peer.tls_pending:
                self._close(peer, peer.reason, out)
            elif peer.bye_received_at is None:
                # A frame cut off by the end of the stream is a violation the peer is told
                # about (§7.4), over its half-closed connection.
                peer.conn.receive_data(b"")
                self._handle_frames(peer, now, out)
                if not peer.closing:
                    self._close(peer, peer.reason, out)
            # After its BYE the device's half-close is legal, and its answers still go
            # out (the state machine, told of the end, would refuse them).
            return
        if peer.tls_pending:
            self._sniff(peer, data, now, out)
            return
        if peer.first:
            peer.first = False
            if data.startswith(_TLS_RECORD):
                # The length prefix of these bytes would read as a frame of ~370 MB; say
                # what they are instead (PROTOCOL.md §2).
                self._wrong_port(peer, True, now, out)
                return
            self.handshakes.heard(peer.cid)
        peer.received_bytes += len(data)
        peer.conn.receive_data(data)
        self._handle_frames(peer, now, out)

    def _sniff(self, peer: _Peer, data: bytes, now: float, out: list[Action]) -> None:
        """On a TLS port, the first bytes: a TLS ClientHello is handed to the TLS layer,
        anything else is named and closed (PROTOCOL.md §2). Meanwhile the connection is a
        stranger in the handshake pool, under the handshake deadline."""
        peer.sniffed += data
        self.handshakes.heard(peer.cid)
        if len(peer.sniffed) < len(_TLS_RECORD):
            return
        if not peer.sniffed.startswith(_TLS_RECORD) or len(peer.sniffed) >= _MAX_SNIFF:
            self._wrong_port(peer, False, now, out)
            return
        out.append(StartTls(peer.cid, peer.sniffed))
        peer.sniffed = b""

    def tls_started(self, cid: int, now: float) -> list[Action]:
        """The TLS handshake is done: the protocol's bytes follow, decrypted."""
        peer = self._peers.get(cid)
        if peer is not None:
            peer.tls_pending = False
            peer.first = False  # its first bytes were the ClientHello
        return []

    def tls_failed(self, cid: int, cause: str, now: float) -> list[Action]:
        """The TLS handshake failed (a bad certificate, a reset)."""
        return self._guarded(
            cid, lambda peer, out: self._close(peer, f"TLS handshake failed: {cause}", out)
        )

    def _protocol_error(self, peer: _Peer, exc: ProtocolError, out: list[Action]) -> None:
        """One bad peer: tell it what was wrong, close it, keep serving the others."""
        code = getattr(exc, "code", ErrorCode.PROTOCOL)
        if code is ErrorCode.UNAUTHENTICATED:
            self.stats.connections_refused += 1
        if isinstance(exc, _RateExceeded):
            self.stats.rate_limited += 1
        reason = f"closed by the server: protocol error ({code.name}): {exc}"
        out.append(Log(logging.WARNING, f"device {peer.name}: {reason}"))
        self.stats.errors_sent += 1
        self._fatal(peer, fitted_error(code, str(exc)), reason, out)

    def _internal_error(self, peer: _Peer, exc: Exception, out: list[Action]) -> None:
        out.append(Log(logging.ERROR, f"device {peer.name}: internal error", exc_info=exc))
        self.stats.errors_sent += 1
        reason = f"closed by the server: internal error: {exc}"
        self._fatal(
            peer, fitted_error(ErrorCode.INTERNAL, f"internal server error: {exc}"), reason, out
        )

    def _fatal(self, peer: _Peer, message: Error, reason: str, out: list[Action]) -> None:
        """Send a fatal ERROR and close, lingering so that the ERROR is read."""
        sent = self._send_quietly(peer, message, out)
        self._close(peer, reason, out, linger_s=LINGER_S if sent else 0.0)

    def _wrong_port(self, peer: _Peer, tls_device: bool, now: float, out: list[Action]) -> None:
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
        if self._misconfig_log.allow((peer.address, what), now):
            out.append(Log(logging.WARNING, "%s from %s: %s", (what, peer.address, why)))
        reason = f"closed by the server: {what}: {why}"
        if tls_device:
            self._fatal(peer, fitted_error(ErrorCode.PROTOCOL, f"{what}: {why}"), reason, out)
        else:
            self._close(peer, reason, out)

    def _handle_frames(self, peer: _Peer, now: float, out: list[Action]) -> None:
        """Handle the peer's complete frames, at most ``FRAMES_PER_TURN``; ``peer.more``
        says whether the budget ran out with frames perhaps still buffered."""
        peer.more = False
        for _ in range(FRAMES_PER_TURN):
            if peer.closing:
                return
            event = peer.conn.next_event()
            if event is NEED_DATA:
                self._after_bye(peer, out)
                return
            peer.last_active_at = now
            if isinstance(event, Infer):
                self._on_infer(peer, event, now, out)
            elif isinstance(event, Cancel):
                self._on_cancel(peer, event, now, out)
            elif isinstance(event, Ping):
                if not peer.pings.take(now):
                    self._over_rate("PINGs", self.config.limits.max_ping_rate)
                # With the bytes read so far, the device times its probe trains at the
                # granularity of the reads (PROTOCOL.md §5.7, spinn.decisions.online_estimates).
                self._send(peer, Pong.reply_to(event, now, peer.received_bytes), out)
            elif isinstance(event, Hello):
                token = self.connection_config.auth_token
                if token is not None:
                    assert self._random_bytes is not None  # checked in __init__
                    # Authenticate before any model check (PROTOCOL.md §10); the state
                    # machine already refused a HELLO without auth_nonce.
                    nonce = self._random_bytes(NONCE_SIZE)
                    proof = server_proof(token, event.auth_nonce, nonce)
                    self._send(peer, Challenge(nonce, proof), out)
                else:
                    self._on_hello(peer, event, out)
            elif isinstance(event, Auth):
                # The state machine checked the proof: the device holds the token.
                assert peer.conn.hello is not None
                out.append(Log(logging.INFO, f"device {peer.name} authenticated"))
                self._on_hello(peer, peer.conn.hello, out)
            elif isinstance(event, Bye):
                # A half-close (PROTOCOL.md §7.3): the device sends nothing more, but its
                # outstanding INFERs are still answered before the server's BYE. Frames
                # already buffered behind it are read on: the state machine refuses them.
                peer.bye_received_at = now
            elif isinstance(event, Error):
                # Only a fatal ERROR reaches here (a device never answers a request): the
                # connection is over (PROTOCOL.md §5.8), nothing is left to wait for.
                out.append(
                    Log(
                        logging.WARNING,
                        f"device {peer.name} sent fatal ERROR {event.code.name}: {event.message}",
                    )
                )
                self._close(peer, peer.reason, out)
                return
            elif isinstance(event, ConnectionClosed):
                return
            # Pong (answers to our pings) needs no action here.
        peer.more = not peer.closing

    def _after_bye(self, peer: _Peer, out: list[Action]) -> None:
        """After the device's BYE and the frames behind it: with nothing outstanding, the
        server's own BYE (PROTOCOL.md §7.3)."""
        if peer.bye_received_at is not None and not peer.jobs and not peer.closing:
            self._send(peer, Bye("answered all requests"), out)
            self._close(
                peer, "closed after BYE from the device and the server's BYE", out, drain=True
            )

    @staticmethod
    def _over_rate(what: str, rate: float) -> None:
        """A control frame above its rate: a fatal ERROR(TOO_LARGE) naming the limit."""
        raise _RateExceeded(
            f"more than {rate:g} {what} a second (bursts of {BURST_S * rate:g}): the server's "
            "limit for this connection",
            ErrorCode.TOO_LARGE,
        )

    # -- timers ----------------------------------------------------------------------------

    def timer_fired(self, cid: int, now: float) -> list[Action]:
        """The peer's ``deadline`` came: close it if it is still due (a request answered
        meanwhile moves the idle deadline)."""
        peer = self._peers.get(cid)
        out: list[Action] = []
        if peer is None or peer.closing:
            return out
        due = self.deadline(cid, now)
        if due is None or due > now:
            return out
        if peer.bye_received_at is not None:
            # A stalled compute cannot hold the connection open forever after BYE.
            for job in list(peer.jobs.values()):
                self._drop(job, now, out)
                self._answer(
                    peer,
                    job,
                    fitted_error(ErrorCode.CANCELLED, "device said BYE", job.request_id),
                    now,
                    out,
                )
            self._after_bye(peer, out)
            return out
        if peer.jobs:
            return out
        if peer.conn.welcome is None:  # in the handshake (a TLS one included)
            reason = f"no handshake within {self.config.limits.handshake_timeout_s:g} s"
            self.stats.handshakes_timed_out += 1
        else:
            reason = f"no complete frame for {self.config.limits.idle_timeout_s:g} s"
        self.stats.connections_refused += 1
        if peer.tls_pending:  # in the TLS handshake: no plain ERROR can be read
            self._close(peer, f"closed by the server: timeout: {reason}", out)
            return out
        # A stalled frame's bytes may still be unread: linger so the ERROR is read.
        sent = self._send_quietly(peer, fitted_error(ErrorCode.PROTOCOL, f"timeout: {reason}"), out)
        self._close(
            peer,
            f"closed by the server: timeout: {reason}",
            out,
            linger_s=LINGER_S if sent else 0.0,
        )
        return out

    def wakeup(self, now: float) -> list[Action]:
        """``next_wakeup`` came: hand out the batches that have waited their time."""
        out: list[Action] = []
        self._dispatch(now, out)
        return out

    # -- the handshake ---------------------------------------------------------------------

    def _on_hello(self, peer: _Peer, hello: Hello, out: list[Action]) -> None:
        model = self.model
        problems = []
        # From version 2 an empty model id asks for the served model (PROTOCOL.md §5.1).
        if hello.model_id != model.model_id and (hello.model_id or hello.version < 2):
            problems.append(f"model id {_quoted(hello.model_id)} != served {model.model_id!r}")
        # "" is a device that does not know its weights' hash (PROTOCOL.md §5.1).
        if hello.weights_sha256 and hello.weights_sha256 != model.weights_sha256:
            problems.append(
                f"weights sha256 {hello.weights_sha256[:16]}… != served "
                f"{model.weights_sha256[:16]}…"
            )
        if problems:
            self._refuse(
                peer, ErrorCode.MODEL_MISMATCH, "model mismatch: " + "; ".join(problems), out
            )
            return
        zdict = model.dictionaries_sha256
        image = self.config.compute.image_codec
        codecs = tuple(
            c
            for c in hello.codecs
            if c in CODECS
            or (c == IMAGE_CODEC and image)
            or c == LOSSY_CODEC
            or (c == DICT_CODEC and zdict is not None and hello.dictionaries_sha256 == zdict)
        )
        if not codecs:
            # WELCOME's codecs must be a non-empty subset of HELLO's: without one in common
            # the answer is a fatal ERROR(BAD_TENSOR) (PROTOCOL.md §5.2).
            accepted = [*CODECS, LOSSY_CODEC, *([IMAGE_CODEC] if image else [])]
            message = (
                f"no tensor codec in common: device offers {_quoted(list(hello.codecs), 400)}, "
                f"server accepts {accepted}"
            )
            self._refuse(peer, ErrorCode.BAD_TENSOR, message, out)
            return
        if len(self._devices) >= self.config.limits.max_connections:
            # Many strangers finished their handshakes at once: the slots are full now.
            self.stats.connections_refused += 1
            self._refuse(peer, ErrorCode.BUSY, f"server full ({len(self._devices)} devices)", out)
            return
        self.handshakes.leave(peer.cid)
        self.stats.handshakes = len(self.handshakes)
        self._devices.add(peer.cid)
        welcome = Welcome(
            hello.version,
            model.model_id,
            model.weights_sha256,
            codecs,
            self.config.compute.report_compute,
            self.config.operations.server_name,
            dictionaries_sha256="" if zdict is None else zdict,
            description=model.description if hello.version >= 2 else None,
        )
        self._send(peer, welcome, out)
        out.append(
            Log(logging.INFO, f"device {peer.name} ({hello.device_name or 'unnamed'}) welcomed")
        )

    def _refuse(self, peer: _Peer, code: ErrorCode, message: str, out: list[Action]) -> None:
        """A HELLO refused: a fatal ERROR naming why, then the close."""
        out.append(Log(logging.WARNING, f"device {peer.name} refused: {message}"))
        if code is not ErrorCode.BUSY:
            self.stats.errors_sent += 1
        self._send(peer, fitted_error(code, message), out)
        self._close(peer, f"closed by the server: {message}", out)

    # -- requests --------------------------------------------------------------------------

    def _on_infer(self, peer: _Peer, infer: Infer, now: float, out: list[Action]) -> None:
        num_stages = self.model.num_stages
        rid = infer.request_id
        if rid in peer.jobs:
            self._request_error(
                peer, ErrorCode.PROTOCOL, f"request id {rid} already in use", rid, out
            )
            return
        if not 0 <= infer.split < num_stages:
            self._request_error(
                peer,
                ErrorCode.BAD_SPLIT,
                f"split {infer.split} outside 0..{num_stages - 1} (split {num_stages} is "
                "device-only and never offloaded)",
                rid,
                out,
            )
            return
        busy = self._busy_reason(peer, infer)
        if busy is not None:
            # Not a warning per request: under overload there are many, by design.
            self.stats.busy_sent += 1
            self.stats.errors_sent += 1
            out.append(Log(logging.DEBUG, f"device {peer.name} request {rid}: busy: {busy}"))
            self._send(peer, fitted_error(ErrorCode.BUSY, busy, rid), out)
            return
        if infer.tensor.codec == IMAGE_CODEC and infer.split != 0:
            self._request_error(
                peer,
                ErrorCode.BAD_SPLIT,
                f"{IMAGE_CODEC} is the input frame's pixels, valid at split 0 only, "
                f"not at split {infer.split} (PROTOCOL.md §6.8)",
                rid,
                out,
            )
            return
        # The packed tensor carries the batch dimension (PROTOCOL.md, INFER): batch 1.
        expected = (1, *self.model.split_shapes[infer.split])
        if tuple(infer.tensor.shape) != expected:
            self._request_error(
                peer,
                ErrorCode.BAD_SPLIT,
                f"tensor shape {tuple(infer.tensor.shape)} does not match split "
                f"{infer.split}, which expects {expected}",
                rid,
                out,
            )
            return
        try:
            activation = self._decode(infer.tensor)
        except ProtocolError as exc:
            # TOO_LARGE stays TOO_LARGE (a zstd frame declaring more than the shape, §6.6).
            code = getattr(exc, "code", ErrorCode.BAD_TENSOR)
            self._request_error(peer, code, f"tensor does not decode: {exc}", rid, out)
            return
        rule = ExitRule.from_wire(infer.thr_conf, infer.early_exits)
        job = Job(peer.cid, rid, infer.split, rule, activation, now)
        if infer.deadline_ms is not None:
            job.expires_at = now + infer.deadline_ms / 1e3
        peer.jobs[rid] = job
        self._in_flight += 1
        self.stats.requests += 1
        if self._groups is not None:
            self._groups.push(job.split, job, now)
        else:
            self._fair.push(peer.cid, job)
        self._dispatch(now, out)

    def _busy_reason(self, peer: _Peer, infer: Infer) -> str | None:
        """Why this INFER is refused with BUSY, or None to accept it.

        Besides the queue limits, a request whose deadline would pass while it waits is
        refused now: answering BUSY at once lets the device finish it locally without
        waiting out its deadline (paper §4.4; PROTOCOL.md §8, BUSY).
        """
        config = self.config
        queued = self.queued
        if self.stopping:
            return "server shutting down"
        if len(peer.jobs) >= config.limits.max_queue_per_connection:
            return f"{len(peer.jobs)} requests already queued for this device"
        if queued >= config.limits.max_queued:
            return f"{queued} requests queued on the server"
        if queued >= config.limits.max_queued * 3 // 4 and peer.jobs:
            # A busy server: each device may hold its share of the queue, so that one
            # flooding device cannot fill it for its neighbours.
            holders = sum(1 for cid in self._devices if self._peers[cid].jobs)
            share = max(1, config.limits.max_queued // max(1, holders))
            if len(peer.jobs) >= share:
                return (
                    f"{len(peer.jobs)} requests queued for this device, its share of a busy "
                    f"server ({queued} queued for {holders} devices)"
                )
        stats = self.stats
        if infer.deadline_ms is not None and stats.computed >= 10:
            mean_ms = stats.compute_ms_total / stats.computed
            # The requests served before it, shared by the workers, then its own compute:
            # without batching, workers go round-robin by device (``FairQueue``), so only
            # a share of what others queued is ahead of it. The measured recent wait of
            # this device's requests covers what the count misses (running requests,
            # workers slowed by a busy machine); the larger of the two is used. Nothing
            # queued for it means no wait, which also lets the measurement recover after
            # a burst.
            measured_ms = peer.wait_ewma_ms if peer.jobs else 0.0
            if self._groups is None:
                ahead = self._fair.ahead(peer.cid)
                per_pass = 1
            else:
                # With batching, a forward pass answers up to batch_max queued requests.
                ahead = queued
                per_pass = max(1, min(queued, config.compute.batch_max))
            ahead_ms = ahead * mean_ms / (self.workers * per_pass)
            done_ms = max(ahead_ms, measured_ms) + mean_ms
            if done_ms > infer.deadline_ms:
                return (
                    f"answer expected in about {done_ms:.0f} ms ({ahead} queued ahead), past "
                    f"the request's deadline of {infer.deadline_ms:.0f} ms"
                )
        return None

    def _on_cancel(self, peer: _Peer, cancel: Cancel, now: float, out: list[Action]) -> None:
        job = peer.jobs.get(cancel.request_id)
        if job is not None:
            self.stats.cancels_received += 1
            if self._drop(job, now, out):
                # Queued: it never runs (DESIGN.md part 7); answered at once.
                self._answer(
                    peer,
                    job,
                    fitted_error(ErrorCode.CANCELLED, "cancelled by the device", job.request_id),
                    now,
                    out,
                )
            return
        # Already answered (the RESULT crossed the CANCEL), or never sent: nothing to do,
        # at O(1), counted apart and rate-limited (a flood of them is not a device).
        self.stats.cancels_unknown += 1
        if not peer.unknown_cancels.take(now):
            self._over_rate(
                "CANCELs of unknown requests", self.config.limits.max_unknown_cancel_rate
            )

    def _drop(self, job: Job, now: float, out: list[Action]) -> bool:
        """Cancel ``job``: out of the queue if it waits there (True: counted as cancelled
        unrun, its wait observed as it leaves the queue), else flagged for the running
        compute to stop at a stage boundary."""
        job.cancelled = True
        if job.running:
            return False
        queue = self._fair.remove(job.cid, job) or (
            self._groups is not None and self._groups.remove(job.split, job)
        )
        if queue:
            self.stats.cancelled_queued += 1
            out.append(Record("queue_wait_seconds", now - job.received_at))
        return True

    def _request_error(
        self, peer: _Peer, code: ErrorCode, message: str, rid: int, out: list[Action]
    ) -> None:
        # An ERROR with a request id answers that request; the connection stays usable.
        self.stats.errors_sent += 1
        out.append(Log(logging.WARNING, f"device {peer.name} request {rid}: {message}"))
        self._send(peer, fitted_error(code, message, rid), out)

    # -- compute ---------------------------------------------------------------------------

    def _dispatch(self, now: float, out: list[Action]) -> None:
        """Hand queued requests to free workers: round-robin by connection, or the ready
        batches (``SplitGroups``)."""
        while self._free > 0:
            if self._groups is not None:
                batch = self._groups.take(now)
                if batch is None:
                    return
            else:
                job = self._fair.pop()
                if job is None:
                    return
                batch = [job]
            live = [job for job in batch if self._start(job, now, out)]
            if live:
                self._free -= 1
                out.append(RunBatch(tuple(live), live[0].split, self._groups is not None))

    def _start(self, job: Job, now: float, out: list[Action]) -> bool:
        """A job leaves the queue: False if it is dropped unrun (past its deadline)."""
        wait_ms = (now - job.received_at) * 1e3
        peer = self._peers.get(job.cid)
        if peer is not None:
            peer.wait_ewma_ms += _WAIT_EWMA * (wait_ms - peer.wait_ewma_ms)
        out.append(Record("queue_wait_seconds", wait_ms / 1e3))
        if job.expires_at is not None and now > job.expires_at:
            # Past the device's deadline it has answered locally (PROTOCOL.md, deadline_ms).
            job.expired = True
            self.stats.expired_unrun += 1
            if peer is not None:
                message = fitted_error(ErrorCode.CANCELLED, "past its deadline", job.request_id)
                self._answer(peer, job, message, now, out)
            return False
        job.running = True
        return True

    def compute_done(
        self,
        batch: RunBatch,
        results: list[ComputeResult] | None,
        failure: BaseException | None,
        now: float,
    ) -> list[Action]:
        """A ``RunBatch`` finished: one result per job, or the ``failure`` of all."""
        out: list[Action] = []
        self._free += 1
        stats = self.stats
        if results is not None:
            if len(results) != len(batch.jobs):
                raise ValueError(f"{len(results)} results for a batch of {len(batch.jobs)}")
            started = 0
            for result in results:
                if isinstance(result, Outcome):
                    started += 1
                    stats.computed += 1
                    stats.stages_run += result.stages_run
                    stats.compute_ms_total += result.compute_ms
                    stats.compute_ms.append(result.compute_ms)
                    out.append(Record("compute_seconds", result.compute_ms / 1e3))
                    if not batch.batched:
                        out.append(Record("batch_size", 1))
                elif result.stages_run is None:
                    stats.cancelled_queued += 1
                else:
                    started += 1
                    stats.cancelled_running += 1
                    stats.stages_run += result.stages_run
            if batch.batched and started:
                out.append(Record("batch_size", started))
        for i, job in enumerate(batch.jobs):
            job.running = False
            peer = self._peers.get(job.cid)
            if peer is None or peer.jobs.get(job.request_id) is not job:
                continue  # the connection is gone, or the request answered already
            if results is None:
                # A model failure answers these requests only.
                out.append(Log(logging.ERROR, f"request {job.request_id} failed", exc_info=failure))
                self._fail(peer, job, f"compute failed: {failure}", now, out)
                continue
            result = results[i]
            if isinstance(result, Stopped):
                # ERROR(CANCELLED) closes the request in both state machines (each INFER is
                # answered exactly once, by RESULT or ERROR).
                why = "past its deadline" if job.expired else "cancelled by the device"
                self._answer(
                    peer, job, fitted_error(ErrorCode.CANCELLED, why, job.request_id), now, out
                )
                continue
            report = self.config.compute.report_compute
            held_ms = (now - job.received_at) * 1e3
            try:
                answer = Result(
                    job.request_id,
                    result.exit_index,
                    result.classes,
                    result.probs,
                    result.compute_ms if report else None,
                    held_ms if report else None,
                )
            except ValueError as exc:  # e.g. NaN probabilities from an overflowing activation
                self._fail(peer, job, f"no valid result: {exc}", now, out)
                continue
            self._answer(peer, job, answer, now, out)
            stats.held_ms.append(held_ms)
        self._dispatch(now, out)
        return out

    def _answer(
        self, peer: _Peer, job: Job, message: Message, now: float, out: list[Action]
    ) -> None:
        """Answer ``job`` (RESULT or ERROR) and forget it."""
        self._finished(peer, job, now, out)
        self._send(peer, message, out)
        self._after_bye(peer, out)

    def _fail(self, peer: _Peer, job: Job, message: str, now: float, out: list[Action]) -> None:
        """Answer ``job`` with ERROR(INTERNAL): the server failed this request only."""
        self._finished(peer, job, now, out)
        self._request_error(peer, ErrorCode.INTERNAL, message, job.request_id, out)
        self._after_bye(peer, out)

    def _finished(self, peer: _Peer, job: Job, now: float, out: list[Action]) -> None:
        """A request is answered (or about to be): with none left, the idle clock restarts."""
        if peer.jobs.pop(job.request_id, None) is not None:
            self._in_flight -= 1
        if not peer.jobs:
            peer.last_active_at = now

    # -- shutdown --------------------------------------------------------------------------

    def stop_accepting(self, now: float) -> list[Action]:
        """Shutdown begins: INFERs are answered BUSY from now on; in-flight requests may
        still finish until ``shutdown_at``."""
        self.stopping = True
        self._stopped_at = now
        out: list[Action] = []
        if self._in_flight:
            out.append(Log(logging.INFO, f"shutting down: {self._in_flight} request(s) in flight"))
        return out

    def shutdown(self, now: float) -> list[Action]:
        """The grace period is over: answer what is left BUSY, say BYE, close everyone."""
        self.stopping = True
        out: list[Action] = []
        for peer in list(self._peers.values()):
            for job in list(peer.jobs.values()):
                self._drop(job, now, out)
                self._finished(peer, job, now, out)
                message = fitted_error(ErrorCode.BUSY, "server shutting down", job.request_id)
                self._send_quietly(peer, message, out)
        for peer in list(self._peers.values()):
            if not peer.closing:
                if not peer.bye_sent:
                    self._send_quietly(peer, Bye("server shutting down"), out)
                self._close(peer, "closed by the server: server shutting down", out)
        return out

    # -- sending ---------------------------------------------------------------------------

    def _send(self, peer: _Peer, message: Message, out: list[Action]) -> None:
        """The frame of ``message`` to ``peer``, unless it is closing."""
        if peer.closing:
            return
        parts = peer.conn.send_parts(message)
        if isinstance(message, Error):
            self._count_error(message.code, out)
        elif isinstance(message, Bye):
            peer.bye_sent = True
        out.append(Send(peer.cid, parts))

    def _send_quietly(self, peer: _Peer, message: Message, out: list[Action]) -> bool:
        """``_send`` where the state machine may refuse (a failed connection); True if sent."""
        try:
            self._send(peer, message, out)
        except ProtocolError:
            return False
        return True

    @staticmethod
    def _count_error(code: ErrorCode, out: list[Action]) -> None:
        out.append(Record("errors", 1, code.name))

    def _close(
        self,
        peer: _Peer,
        reason: str,
        out: list[Action],
        linger_s: float = 0.0,
        drain: bool = False,
        abort: bool = False,
    ) -> None:
        peer.closing = True
        peer.reason = reason
        peer.more = False
        out.append(Close(peer.cid, reason, linger_s=linger_s, drain=drain, abort=abort))
