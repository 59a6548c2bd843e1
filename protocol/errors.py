"""Error codes and exceptions of the SPINN wire protocol (docs/PROTOCOL.md §8)."""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "TensorError",
]


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR frames and by every `ProtocolError` (PROTOCOL.md §8)."""

    PROTOCOL = 1
    """Malformed frame, wrong field type, unknown message type or illegal state transition."""
    VERSION = 2
    """The peers do not speak the same protocol version."""
    MODEL_MISMATCH = 3
    """The server does not serve the model (id or weights sha256) the device asked for."""
    BAD_TENSOR = 4
    """A packed tensor does not decode: shape and payload disagree, bad codec, bad values."""
    BAD_SPLIT = 5
    """The split point is out of range or the tensor shape does not match it."""
    BUSY = 6
    """The server refuses the request because it is overloaded; the device finishes locally."""
    CANCELLED = 7
    """The request was cancelled by the device before the server answered it."""
    INTERNAL = 8
    """The server failed while computing the request."""
    UNAUTHENTICATED = 9
    """Token authentication required and missing, or a proof that does not match (§10)."""
    TOO_LARGE = 10
    """A frame, tensor or string exceeds a configured limit."""


class ProtocolError(Exception):
    """Base of every error the protocol package raises about bytes or protocol use.

    `code` is the `ErrorCode` a peer should be told about (e.g. in a fatal ERROR frame).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        """What kind of failure this is, as sent in an ERROR frame."""

    @property
    def message(self) -> str:
        """The human-readable description."""
        return str(self.args[0]) if self.args else ""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (e.g. INFER before WELCOME).

    Nothing was written; the connection state is unchanged.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol.

    The connection is dead afterwards: the decoder is not reused (PROTOCOL.md §7.4).
    The application may still send one fatal ERROR frame carrying `code`, then close.
    """


class TensorError(ProtocolError, ValueError):
    """A packed tensor does not decode (shape, payload, codec or values are wrong).

    Raised by `protocol.packing.unpack`; the request is answered with an ERROR frame
    carrying `code` and the connection stays usable (PROTOCOL.md §6).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_TENSOR) -> None:
        super().__init__(message, code)
