"""Actions that both cores (``DeviceCore``, ``ServerCore``) return alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import Error, ErrorCode
from protocol.messages import MAX_STRING

__all__ = ["Log", "error_text", "fitted_error"]


@dataclass(frozen=True, slots=True)
class Log:
    """Log a line on the adapter's logger (``logging`` levels; ``msg % args``)."""

    level: int
    msg: str
    args: tuple[Any, ...] = ()
    exc_info: BaseException | None = None
    """The exception whose traceback goes with the line (a bug, a failed compute)."""


def fitted_error(code: ErrorCode, message: str, request_id: int | None = None) -> Error:
    """An ERROR whose message fits the protocol's string limit (PROTOCOL.md §3): messages
    may quote what the peer sent, and a long quote must not cost the peer its answer."""
    if len(message) > MAX_STRING:
        message = message[: MAX_STRING - 1] + "…"
    return Error(code, message, request_id)


def error_text(exc: BaseException) -> str:
    """An exception for a log line or an ERROR's message: never empty (a timeout has no
    message of its own)."""
    return str(exc) or type(exc).__name__
