"""Parsing of the human-friendly values netshape accepts on its CLI, control port and traces.

Rates follow the conventions of Linux ``tc`` (``man tc``, "PARAMETERS"): ``bit``/``kbit``/
``mbit``/``gbit`` are bits per second, ``bps``/``kbps``/``mbps``/``gbps`` are *bytes* per
second, prefixes are decimal (k = 1000). A bare number is bits per second. ``unlimited``,
``none``, ``inf`` or ``0`` mean no rate limit.

Durations accept ``us``, ``ms``, ``s``, ``m`` and ``h``; a bare number is seconds.
Sizes accept ``b``, ``kb``/``mb``/``gb`` (decimal) and ``kib``/``mib``/``gib`` (binary);
a bare number is bytes.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "format_duration",
    "format_rate",
    "parse_address",
    "parse_duration",
    "parse_probability",
    "parse_rate",
    "parse_size",
]

_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z/]*)\s*$")

# Multipliers to bits per second, as tc(8) defines them.
_RATE_UNITS: dict[str, float] = {
    "": 1.0,
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}
_UNLIMITED = {"unlimited", "none", "inf", "off"}

_DURATION_UNITS: dict[str, float] = {
    "": 1.0,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER_UNIT.match(text)
    if match is None:
        raise ValueError(f"bad {what} {text!r}: expected a number with an optional unit")
    return float(match.group(1)), match.group(2).lower()


def parse_rate(text: str | float | int | None) -> float | None:
    """Return a rate in bits per second, or None for unlimited.

    >>> parse_rate("5mbit"), parse_rate("100kbps"), parse_rate("unlimited")
    (5000000.0, 800000.0, None)
    """
    if text is None:
        return None
    if isinstance(text, int | float):
        value = float(text)
        if not math.isfinite(value) and value > 0:
            return None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bad rate {text!r}: must be a finite number >= 0")
        return None if value == 0 else value
    if text.strip().lower() in _UNLIMITED:
        return None
    number, unit = _split(text, "rate")
    if unit not in _RATE_UNITS:
        known = ", ".join(u for u in _RATE_UNITS if u)
        raise ValueError(f"bad rate {text!r}: unknown unit {unit!r} (known: {known})")
    value = number * _RATE_UNITS[unit]
    return None if value == 0 else value


def parse_duration(text: str | float | int) -> float:
    """Return a duration in seconds (>= 0).

    >>> parse_duration("40ms"), parse_duration("5s"), parse_duration(0.25)
    (0.04, 5.0, 0.25)
    """
    if isinstance(text, int | float):
        value = float(text)
    else:
        number, unit = _split(text, "duration")
        if unit not in _DURATION_UNITS:
            known = ", ".join(u for u in _DURATION_UNITS if u)
            raise ValueError(f"bad duration {text!r}: unknown unit {unit!r} (known: {known})")
        value = number * _DURATION_UNITS[unit]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad duration {text!r}: must be a finite number >= 0")
    return value


def parse_size(text: str | int) -> int:
    """Return a size in bytes (>= 0).

    >>> parse_size("64kib"), parse_size("1mb"), parse_size(1500)
    (65536, 1000000, 1500)
    """
    if isinstance(text, bool):
        raise ValueError(f"bad size {text!r}: expected a number of bytes")
    if isinstance(text, int):
        value = float(text)
    else:
        number, unit = _split(str(text), "size")
        if unit not in _SIZE_UNITS:
            known = ", ".join(u for u in _SIZE_UNITS if u)
            raise ValueError(f"bad size {text!r}: unknown unit {unit!r} (known: {known})")
        value = number * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"bad size {text!r}: must be a whole number of bytes >= 0")
    return int(value)


def parse_probability(text: str | float | int) -> float:
    """Return a probability in [0, 1]; accepts ``0.05`` or ``5%``."""
    try:
        if isinstance(text, str) and text.strip().endswith("%"):
            value = float(text.strip()[:-1]) / 100.0
        else:
            value = float(text)
    except ValueError:
        raise ValueError(
            f"bad probability {text!r}: expected a number such as 0.05 or 5%"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"bad probability {text!r}: must lie in [0, 1]")
    return value


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6) into ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host or "[" in host or "]" in host or (":" in host and not bracketed):
        raise ValueError(f"bad address {text!r}: an IPv6 address goes in brackets, [::1]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad address {text!r}: port must lie in 0..65535")
    return host, port


def format_rate(bps: float | None) -> str:
    """Format bits per second the way :func:`parse_rate` reads it back."""
    if bps is None:
        return "unlimited"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


def format_duration(seconds: float) -> str:
    """Format seconds the way :func:`parse_duration` reads it back."""
    if seconds == 0 or seconds >= 1:
        return f"{seconds:g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"
