"""The sans-I/O connection: bytes in, events out, events in, bytes out (PROTOCOL.md §7).

`Connection` never touches a socket or a clock. The runtime feeds it whatever it reads
(`receive_data`, or `get_buffer`/`buffer_updated` to receive without a copy), drains
`next_event()` until `NEED_DATA`, and writes whatever `send()` returns. The same state
machine checks both directions: bad local use raises `LocalProtocolError` and changes
nothing; bad peer input raises `RemoteProtocolError` and kills the connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from protocol.auth import MIN_TOKEN_SIZE, device_proof, proofs_equal, server_proof
from protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER, FrameDecoder, decode_msgpack
from protocol.messages import (
    MESSAGE_CLASSES,
    SUPPORTED_VERSIONS,
    Auth,
    Bye,
    Challenge,
    Error,
    Hello,
    Infer,
    Message,
    MessageType,
    Ping,
    Pong,
    Result,
    Welcome,
    decode_fields,
    encode_message_parts,
    message_type,
    split_message,
)
from protocol.state import AFTER_PEER_BYE, ALLOWED, ConnectionState, Role
from protocol.tensor import DEFAULT_MAX_ELEMENTS, DICT_CODEC, KNOWN_CODECS

__all__ = [
    "NEED_DATA",
    "ConnectionConfig",
    "ConnectionClosed",
    "Connection",
    "Event",
]


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by `next_event` when no complete frame is buffered."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The byte stream ended (the runtime passed b"" to `receive_data`)."""

    clean: bool
    """True if the peer had said BYE or sent a fatal ERROR before the stream ended."""


Event: TypeAlias = Message | ConnectionClosed

_MESSAGE_TYPES: Final = tuple(MESSAGE_CLASSES.values())


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """Limits of one connection (PROTOCOL.md §8); the defaults suit untrusted peers."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame body in bytes, either direction: 64 MiB."""
    max_tensor_elements: int = DEFAULT_MAX_ELEMENTS
    """Largest tensor an INFER may declare, in elements: 16 Mi (64 MiB as float32)."""
    max_outstanding: int = 1024
    """Most unanswered INFERs, and most unanswered PINGs per side, at any time."""
    max_handshake_frame_size: int = 65536
    """Largest frame before the handshake is done (WELCOME), if below `max_frame_size`: an
    unauthenticated peer can make this end buffer no more (PROTOCOL.md §8, §10)."""
    auth_token: bytes | None = field(default=None, repr=False)
    """Shared token (PROTOCOL.md §10): this end requires the peer to prove it and proves
    it in turn. None: no authentication. Never printed."""

    def __post_init__(self) -> None:
        if not 16 <= self.max_handshake_frame_size <= 0xFFFFFFFF:
            raise ValueError(
                f"max_handshake_frame_size must be in [16, 2**32 - 1], "
                f"got {self.max_handshake_frame_size}"
            )
        if self.auth_token is not None and (
            type(self.auth_token) is not bytes or len(self.auth_token) < MIN_TOKEN_SIZE
        ):
            raise ValueError(f"auth_token must be bytes, at least {MIN_TOKEN_SIZE} of them")
        if not 16 <= self.max_frame_size <= 0xFFFFFFFF:
            raise ValueError(
                f"max_frame_size must be in [16, 2**32 - 1], got {self.max_frame_size}"
            )
        if self.max_tensor_elements < 1:
            raise ValueError(f"max_tensor_elements must be >= 1, got {self.max_tensor_elements}")
        if self.max_outstanding < 1:
            raise ValueError(f"max_outstanding must be >= 1, got {self.max_outstanding}")


def _check_fallback(what: str, codecs: tuple[str, ...], err: type[ProtocolError]) -> None:
    """sparse_int8_zdict comes with sparse_int8, which it falls back to (PROTOCOL.md §5.2)."""
    if DICT_CODEC in codecs and "sparse_int8" not in codecs:
        raise err(
            f"{what} {DICT_CODEC} without sparse_int8, which a tensor not worth compressing "
            f"is sent as (§6.7): codecs {codecs}"
        )


class Connection:
    """One end of a SPINN protocol connection; see the module docstring."""

    def __init__(self, role: Role, config: ConnectionConfig | None = None) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, got {role!r}")
        self.role: Final = role
        """Which end this is."""
        self.config: Final = config if config is not None else ConnectionConfig()
        """The limits in force."""
        self._decoder = FrameDecoder(
            min(self.config.max_handshake_frame_size, self.config.max_frame_size)
        )
        self._phase = ConnectionState.AWAIT_HELLO
        self._challenge: Challenge | None = None
        self._authenticated = False
        self._bye: set[Role] = set()
        self._closed = False
        self._failure: RemoteProtocolError | None = None
        self._hello: Hello | None = None
        self._welcome: Welcome | None = None
        self._outstanding: set[int] = set()
        self._pings: dict[Role, dict[int, int]] = {Role.DEVICE: {}, Role.SERVER: {}}

    # -- introspection -------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """Where the connection stands (PROTOCOL.md §7.1)."""
        if self._failure is not None and not self._closed:
            return ConnectionState.FAILED
        if self._closed:
            return ConnectionState.CLOSED
        if self._bye:
            return ConnectionState.CLOSING
        return self._phase

    @property
    def hello(self) -> Hello | None:
        """The HELLO of the handshake, once sent or received."""
        return self._hello

    @property
    def welcome(self) -> Welcome | None:
        """The WELCOME of the handshake, once sent or received."""
        return self._welcome

    @property
    def challenge(self) -> Challenge | None:
        """The CHALLENGE of a token handshake, once sent or received (PROTOCOL.md §10)."""
        return self._challenge

    @property
    def authenticated(self) -> bool:
        """True once both ends proved the shared token (AUTH accepted)."""
        return self._authenticated

    @property
    def codecs(self) -> tuple[str, ...]:
        """Codecs INFER may use: the WELCOME's list (empty before the handshake)."""
        return self._welcome.codecs if self._welcome is not None else ()

    @property
    def outstanding(self) -> frozenset[int]:
        """Request ids sent in INFER and not yet answered by RESULT or ERROR."""
        return frozenset(self._outstanding)

    @property
    def failure(self) -> RemoteProtocolError | None:
        """The peer's protocol violation that killed the connection, if any."""
        return self._failure

    # -- sending ---------------------------------------------------------------------------

    def send(self, event: Message) -> bytes:
        """Check `event` against the state machine and return its frame's bytes.

        Raises `LocalProtocolError` (and changes nothing) if this side may not send it now.
        After the peer violated the protocol, only a fatal ERROR may be sent.
        """
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Message) -> list[bytes]:
        """Like `send`, but the frame as buffers to write in order, without copying.

        The last buffer is the message's bulk bytes (INFER's tensor payload, PING's
        padding) as given, so `transport.writelines(conn.send_parts(ev))` or
        `socket.sendmsg` puts a large activation on the wire with no copy in Python.
        """
        if not isinstance(event, _MESSAGE_TYPES):
            raise LocalProtocolError(f"cannot send {type(event).__name__}: not a protocol message")
        head, blob = encode_message_parts(event)
        size = len(head) + len(blob)
        if size > self.config.max_frame_size:
            raise LocalProtocolError(
                f"{message_type(event).name} frame of {size} bytes exceeds the limit of "
                f"{self.config.max_frame_size}",
                ErrorCode.TOO_LARGE,
            )
        if self._failure is not None and not self._closed:
            if not (isinstance(event, Error) and event.fatal):
                raise LocalProtocolError(
                    f"connection failed ({self._failure}); only a fatal ERROR may be sent"
                )
            self._closed = True
        else:
            self._apply(event, self.role, LocalProtocolError)
        head = FRAME_HEADER.pack(size) + head
        return [head, blob] if blob else [head]

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the stream; b"" means the stream ended."""
        if self._failure is not None:
            raise LocalProtocolError(f"connection failed ({self._failure}); do not feed it more")
        try:
            self._decoder.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to read into directly (asyncio BufferedProtocol protocol)."""
        if self._failure is not None:
            raise LocalProtocolError(f"connection failed ({self._failure}); do not feed it more")
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were read into the view returned by `get_buffer`."""
        try:
            self._decoder.buffer_updated(nbytes)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def next_event(self) -> Event | Literal[_Sentinel.NEED_DATA]:
        """The next event from the peer, `NEED_DATA`, or `ConnectionClosed` at the end.

        Raises `RemoteProtocolError` when the peer's bytes violate the protocol; the
        connection is dead afterwards and raises `LocalProtocolError` if used again.
        """
        if self._failure is not None:
            raise LocalProtocolError(f"connection failed ({self._failure}); it cannot be reused")
        try:
            body = self._decoder.next_frame()
            if body is None:
                if not self._decoder.eof:
                    return NEED_DATA
                clean = self._closed or self.role.peer in self._bye
                self._closed = True
                return ConnectionClosed(clean)
            try:
                obj = decode_msgpack(body)
            except Exception as exc:  # msgpack raises many types on garbage; all mean the same
                raise RemoteProtocolError(
                    f"frame of {len(body)} bytes is not valid msgpack: {type(exc).__name__}: {exc}"
                ) from None
            finally:
                body.release()
            # The state before the body (PROTOCOL.md §7.5): a message the peer may not send
            # now is refused as such, whatever its fields hold.
            mtype, fields = split_message(obj)
            self._check_allowed(mtype, self.role.peer, RemoteProtocolError)
            event = decode_fields(mtype, fields)
            self._apply(event, self.role.peer, RemoteProtocolError, checked=True)
            return event
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: RemoteProtocolError) -> None:
        if self._failure is None:
            self._failure = exc

    # -- the state machine ---------------------------------------------------------------------

    def _check_allowed(self, mtype: MessageType, sender: Role, err: type[ProtocolError]) -> None:
        """Refuse a message of type `mtype` that `sender` may not send in this state."""
        if self._closed:
            raise err(f"{sender.value} sent {mtype.name} after the connection closed")
        allowed = ALLOWED[(self._phase, sender)]
        if self._bye:
            if sender in self._bye:
                raise err(f"{sender.value} sent {mtype.name} after its own BYE")
            if sender.peer in self._bye:
                allowed = allowed & AFTER_PEER_BYE
        if mtype not in allowed:
            raise err(f"{sender.value} may not send {mtype.name} in state {self.state.value}")

    def _apply(
        self,
        msg: Message,
        sender: Role,
        err: type[LocalProtocolError] | type[RemoteProtocolError],
        checked: bool = False,
    ) -> None:
        """Check that `sender` may send `msg` now (unless `checked` already), then record
        its effect. All checks come before any mutation, so a refused send changes nothing.
        """
        if not checked:
            self._check_allowed(message_type(msg), sender, err)
        # Most frequent first; the message classes are final, so the order changes nothing else.
        if isinstance(msg, Infer):
            self._on_infer(msg, err)
        elif isinstance(msg, Result):
            self._answer(msg.request_id, "RESULT", err)
        elif isinstance(msg, Ping):
            self._on_ping(msg, sender, err)
        elif isinstance(msg, Pong):
            self._on_pong(msg, sender, err)
        elif isinstance(msg, Error):
            self._on_error(msg, sender, err)
        elif isinstance(msg, Hello):
            self._on_hello(msg, err)
        elif isinstance(msg, Welcome):
            self._on_welcome(msg, err)
        elif isinstance(msg, Challenge):
            self._on_challenge(msg, err)
        elif isinstance(msg, Auth):
            self._on_auth(msg, err)
        elif isinstance(msg, Bye):
            self._bye.add(sender)
            if len(self._bye) == 2:
                self._closed = True
        # CANCEL changes nothing: it may cross the RESULT on the wire (PROTOCOL.md §7.2),
        # so an id that is no longer outstanding is legal.

    def _on_hello(self, msg: Hello, err: type[ProtocolError]) -> None:
        if msg.version not in SUPPORTED_VERSIONS:
            raise err(
                f"HELLO has protocol version {msg.version}; this end speaks "
                f"{' and '.join(map(str, SUPPORTED_VERSIONS))}",
                ErrorCode.VERSION,
            )
        if self.config.auth_token is not None and not msg.auth_nonce:
            raise err(
                "HELLO carries no auth_nonce, but this end requires token authentication "
                "(PROTOCOL.md §10: give the device the shared token)",
                ErrorCode.UNAUTHENTICATED,
            )
        _check_fallback("HELLO offers", msg.codecs, err)
        self._hello = msg
        self._phase = ConnectionState.AWAIT_WELCOME

    def _on_challenge(self, msg: Challenge, err: type[ProtocolError]) -> None:
        assert self._hello is not None
        if not self._hello.auth_nonce or self._challenge is not None:
            raise err("CHALLENGE without a HELLO auth_nonce, or a second CHALLENGE")
        token = self.config.auth_token
        if token is None:
            raise err(
                "the server requires token authentication; this end has no token",
                ErrorCode.UNAUTHENTICATED,
            )
        # The server proves the token first, so a device never proves it to an impostor.
        if not proofs_equal(server_proof(token, self._hello.auth_nonce, msg.nonce), msg.proof):
            raise err("CHALLENGE proof does not match the shared token", ErrorCode.UNAUTHENTICATED)
        self._challenge = msg
        self._phase = ConnectionState.AWAIT_AUTH

    def _on_auth(self, msg: Auth, err: type[ProtocolError]) -> None:
        assert self._hello is not None and self._challenge is not None
        token = self.config.auth_token
        assert token is not None  # CHALLENGE required one
        expected = device_proof(token, self._hello.auth_nonce, self._challenge.nonce)
        if not proofs_equal(expected, msg.proof):
            raise err("AUTH proof does not match the shared token", ErrorCode.UNAUTHENTICATED)
        self._authenticated = True
        self._phase = ConnectionState.AWAIT_WELCOME

    def _on_welcome(self, msg: Welcome, err: type[ProtocolError]) -> None:
        assert self._hello is not None
        if self.config.auth_token is not None and not self._authenticated:
            raise err(
                "WELCOME before token authentication, which this end requires (§10)",
                ErrorCode.UNAUTHENTICATED,
            )
        if msg.version != self._hello.version:
            raise err(
                f"WELCOME has protocol version {msg.version}; HELLO had {self._hello.version}",
                ErrorCode.VERSION,
            )
        if msg.version >= 2 and msg.description is None:
            raise err("WELCOME of version 2 carries no description (PROTOCOL.md §5.12)")
        if not msg.codecs:
            raise err("WELCOME lists no codec; a server without a common codec sends ERROR")
        for codec in msg.codecs:
            if codec not in self._hello.codecs or codec not in KNOWN_CODECS:
                raise err(f"WELCOME codec {codec!r} was not offered by HELLO {self._hello.codecs}")
        _check_fallback("WELCOME accepts", msg.codecs, err)
        if DICT_CODEC in msg.codecs and (
            not self._hello.dictionaries_sha256
            or msg.dictionaries_sha256 != self._hello.dictionaries_sha256
        ):
            raise err(
                f"WELCOME accepts {DICT_CODEC} but its dictionaries_sha256 "
                f"{msg.dictionaries_sha256[:16]!r} is not the HELLO's "
                f"{self._hello.dictionaries_sha256[:16]!r}"
            )
        self._welcome = msg
        self._phase = ConnectionState.OPEN
        # Handshake done (and authenticated where required): full-size frames from now on.
        self._decoder.max_frame_size = self.config.max_frame_size

    def _on_infer(self, msg: Infer, err: type[ProtocolError]) -> None:
        if msg.request_id in self._outstanding:
            raise err(f"INFER reuses request id {msg.request_id}, which is still unanswered")
        if len(self._outstanding) >= self.config.max_outstanding:
            raise err(
                f"INFER would exceed {self.config.max_outstanding} unanswered requests",
                ErrorCode.TOO_LARGE,
            )
        if msg.tensor.codec not in self.codecs:
            # A tensor map fault, like an unknown codec (PROTOCOL.md §8: fatal BAD_TENSOR).
            raise err(
                f"INFER uses codec {msg.tensor.codec!r}, not negotiated {self.codecs}",
                ErrorCode.BAD_TENSOR,
            )
        numel = msg.tensor.numel
        if numel > self.config.max_tensor_elements:
            raise err(
                f"INFER tensor of shape {msg.tensor.shape} has {numel} elements; "
                f"the limit is {self.config.max_tensor_elements}",
                ErrorCode.TOO_LARGE,
            )
        self._outstanding.add(msg.request_id)

    def _answer(self, request_id: int, what: str, err: type[ProtocolError]) -> None:
        if request_id not in self._outstanding:
            raise err(f"{what} for request id {request_id}, which is not outstanding")
        self._outstanding.discard(request_id)

    def _on_ping(self, msg: Ping, sender: Role, err: type[ProtocolError]) -> None:
        pending = self._pings[sender]
        if msg.seq in pending:
            raise err(f"PING reuses sequence number {msg.seq}, which is still unanswered")
        if len(pending) >= self.config.max_outstanding:
            raise err(
                f"PING would exceed {self.config.max_outstanding} unanswered pings",
                ErrorCode.TOO_LARGE,
            )
        pending[msg.seq] = len(msg.padding)

    def _on_pong(self, msg: Pong, sender: Role, err: type[ProtocolError]) -> None:
        pending = self._pings[sender.peer]
        if msg.seq not in pending:
            raise err(f"PONG for sequence number {msg.seq}, which is not an unanswered PING")
        if pending[msg.seq] != msg.padding_len:
            raise err(
                f"PONG {msg.seq} reports padding_len {msg.padding_len}; "
                f"the PING carried {pending[msg.seq]} bytes"
            )
        del pending[msg.seq]

    def _on_error(self, msg: Error, sender: Role, err: type[ProtocolError]) -> None:
        if msg.request_id is None:
            self._closed = True
            return
        if sender is not Role.SERVER or self._phase is not ConnectionState.OPEN:
            raise err(f"the {sender.value} may not answer a request with ERROR in this state")
        self._answer(msg.request_id, "ERROR", err)
