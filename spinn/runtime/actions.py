"""Actions that both cores (``DeviceCore``, ``ServerCore``) return alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Log"]


@dataclass(frozen=True, slots=True)
class Log:
    """Log a line on the adapter's logger (``logging`` levels; ``msg % args``)."""

    level: int
    msg: str
    args: tuple[Any, ...] = ()
    exc_info: BaseException | None = None
    """The exception whose traceback goes with the line (a bug, a failed compute)."""
