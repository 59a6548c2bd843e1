"""The connection state machine as a table (PROTOCOL.md §7).

The protocol has three phases — waiting for HELLO, waiting for WELCOME, open — plus,
with token authentication, waiting for AUTH after CHALLENGE (§10), the half-close of BYE
and the end states. `ALLOWED[(phase, sender)]` lists the message types
`sender` may send in `phase`; everything else is a protocol violation.
"""

from __future__ import annotations

import enum
from typing import Final

from protocol.messages import MessageType as T

__all__ = ["Role", "ConnectionState", "ALLOWED", "AFTER_PEER_BYE"]


class Role(enum.Enum):
    """Which end of the connection this is."""

    # Members are singletons, so identity hashing is exact, and it is a C slot: Enum's own
    # __hash__ is Python code, run twice per message for the `ALLOWED` lookup.
    __hash__ = object.__hash__

    DEVICE = "device"
    """The client: sends HELLO, INFER, CANCEL, PING, BYE."""
    SERVER = "server"
    """Answers: WELCOME, RESULT, PONG, ERROR, BYE (and may PING)."""

    @property
    def peer(self) -> Role:
        """The other end."""
        return Role.SERVER if self is Role.DEVICE else Role.DEVICE


class ConnectionState(enum.Enum):
    """State of a connection, the same on both ends once frames have been exchanged."""

    __hash__ = object.__hash__  # see Role

    AWAIT_HELLO = "await_hello"
    """Nothing exchanged yet: the device must send HELLO."""
    AWAIT_WELCOME = "await_welcome"
    """HELLO (or AUTH) sent: the server must answer WELCOME, CHALLENGE or a fatal ERROR."""
    AWAIT_AUTH = "await_auth"
    """CHALLENGE sent: the device must prove the token with AUTH (PROTOCOL.md §10)."""
    OPEN = "open"
    """Handshake done: requests, answers and pings flow."""
    CLOSING = "closing"
    """One side has sent BYE; the other may still answer what is outstanding."""
    CLOSED = "closed"
    """Both sides sent BYE, a fatal ERROR was exchanged, or the stream ended."""
    FAILED = "failed"
    """The peer violated the protocol; only a fatal ERROR may still be sent."""


ALLOWED: Final[dict[tuple[ConnectionState, Role], frozenset[T]]] = {
    (ConnectionState.AWAIT_HELLO, Role.DEVICE): frozenset({T.HELLO, T.ERROR, T.BYE}),
    (ConnectionState.AWAIT_HELLO, Role.SERVER): frozenset({T.ERROR, T.BYE}),
    (ConnectionState.AWAIT_WELCOME, Role.DEVICE): frozenset({T.ERROR, T.BYE}),
    (ConnectionState.AWAIT_WELCOME, Role.SERVER): frozenset(
        {T.WELCOME, T.CHALLENGE, T.ERROR, T.BYE}
    ),
    (ConnectionState.AWAIT_AUTH, Role.DEVICE): frozenset({T.AUTH, T.ERROR, T.BYE}),
    (ConnectionState.AWAIT_AUTH, Role.SERVER): frozenset({T.ERROR, T.BYE}),
    (ConnectionState.OPEN, Role.DEVICE): frozenset(
        {T.INFER, T.CANCEL, T.PING, T.PONG, T.ERROR, T.BYE}
    ),
    (ConnectionState.OPEN, Role.SERVER): frozenset({T.RESULT, T.PING, T.PONG, T.ERROR, T.BYE}),
}
"""Message types each role may send in each phase (PROTOCOL.md §7.1)."""

AFTER_PEER_BYE: Final[frozenset[T]] = frozenset({T.RESULT, T.PONG, T.ERROR, T.BYE})
"""Once the peer has sent BYE, only answers to what it already sent, and BYE, may follow."""
