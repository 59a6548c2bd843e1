"""Configuration of the shaping proxy: one frozen dataclass per direction plus a top-level one.

"up" is client -> upstream (device -> server), "down" is upstream -> client. Every field is
documented where it is declared; docs/NETSHAPE.md describes the link model they drive.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tools.netshape.units import (
    parse_duration,
    parse_probability,
    parse_rate,
    parse_size,
)

__all__ = [
    "DIRECTIONS",
    "OUTAGE_MODES",
    "DirectionConfig",
    "OutageSpec",
    "ShapeConfig",
    "coerce_direction_fields",
    "parse_outage_spec",
]

Direction = Literal["up", "down"]
DIRECTIONS: tuple[str, ...] = ("up", "down")
OutageMode = Literal["blackhole", "reset", "refuse"]
OUTAGE_MODES: tuple[str, ...] = ("blackhole", "reset", "refuse")


def _check(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r}: {rule}")


@dataclass(frozen=True, slots=True)
class DirectionConfig:
    """How one direction of every proxied connection is shaped."""

    rate_bps: float | None = None
    """Bottleneck rate in bits per second (token bucket); None = unlimited."""
    burst_bytes: int | None = None
    """Token bucket depth; None = max(1500, 5 ms worth of rate). Also the largest read."""
    delay_s: float = 0.0
    """One-way delay added to every chunk, counted from when it leaves the bottleneck."""
    jitter_s: float = 0.0
    """Each chunk's delay is delay_s + U(-jitter_s, +jitter_s), clamped at 0; order is kept."""
    loss: float = 0.0
    """Probability that a segment of mss_bytes is lost (in the good state when bursty)."""
    ge_p: float = 0.0
    """Gilbert-Elliott: probability per segment of entering the bad (bursty) state; 0 = off."""
    ge_r: float = 1.0
    """Gilbert-Elliott: probability per segment of leaving the bad state (mean burst 1/ge_r)."""
    ge_loss_bad: float = 1.0
    """Gilbert-Elliott: segment loss probability while in the bad state."""
    mss_bytes: int = 1448
    """Segment size the loss probability refers to (Ethernet MSS with timestamps)."""
    rto_min_s: float = 0.2
    """Floor of the retransmission-timeout-like stall (Linux TCP_RTO_MIN is 200 ms)."""
    stall_s: float | None = None
    """Stall of a chunk with a lost segment; None = max(rto_min_s, 2*delay_s + 4*jitter_s)."""
    slice_bytes: int | None = None
    """Cut each chunk into writes of about this many bytes (toxiproxy "slicer"); None = off."""
    slice_variation: int = 0
    """Slice sizes vary uniformly by +/- this many bytes (seeded)."""
    slice_delay_s: float = 0.0
    """Pause between two slices of a chunk."""
    limit_bytes: int | None = None
    """Close the connection once this many bytes have passed in this direction; None = off."""
    slow_close_s: float = 0.0
    """Hold the close (FIN) of this direction for this long after its last byte."""

    def __post_init__(self) -> None:
        _check(
            self.rate_bps is None or (math.isfinite(self.rate_bps) and self.rate_bps > 0),
            "rate_bps",
            self.rate_bps,
            "must be None (unlimited) or a finite rate > 0",
        )
        _check(
            self.burst_bytes is None or self.burst_bytes >= 1,
            "burst_bytes",
            self.burst_bytes,
            "must be None or >= 1",
        )
        for name in ("delay_s", "jitter_s", "rto_min_s", "slice_delay_s", "slow_close_s"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, value, "must be a finite value >= 0")
        _check(
            self.stall_s is None or (math.isfinite(self.stall_s) and self.stall_s >= 0),
            "stall_s",
            self.stall_s,
            "must be None or >= 0",
        )
        for name in ("loss", "ge_p", "ge_r", "ge_loss_bad"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, name, value, "must lie in [0, 1]")
        _check(self.ge_p == 0 or self.ge_r > 0, "ge_r", self.ge_r, "must be > 0 when ge_p > 0")
        _check(self.mss_bytes >= 1, "mss_bytes", self.mss_bytes, "must be >= 1")
        _check(
            self.slice_bytes is None or self.slice_bytes >= 1,
            "slice_bytes",
            self.slice_bytes,
            "must be None or >= 1",
        )
        _check(
            self.slice_variation >= 0
            and (self.slice_bytes is None or self.slice_variation < self.slice_bytes),
            "slice_variation",
            self.slice_variation,
            "must be >= 0 and smaller than slice_bytes",
        )
        _check(
            self.limit_bytes is None or self.limit_bytes >= 0,
            "limit_bytes",
            self.limit_bytes,
            "must be None or >= 0",
        )

    @property
    def rate_bytes_per_s(self) -> float | None:
        """The rate in bytes per second, or None when unlimited."""
        return None if self.rate_bps is None else self.rate_bps / 8.0

    @property
    def effective_burst(self) -> int:
        """Token bucket depth in bytes (see burst_bytes)."""
        if self.burst_bytes is not None:
            return self.burst_bytes
        if self.rate_bps is None:
            return 1 << 30
        # 5 ms of rate keeps pacing smooth at low rates and leaves room for the event
        # loop's ~1 ms timer granularity at high ones; one MTU is the floor.
        return max(1500, int(self.rate_bps / 8.0 * 0.005))

    @property
    def effective_stall(self) -> float:
        """The stall applied to a chunk that lost a segment (see stall_s)."""
        if self.stall_s is not None:
            return self.stall_s
        # RFC 6298: RTO = SRTT + 4*RTTVAR, floored; SRTT ~ 2*delay on a symmetric path.
        return max(self.rto_min_s, 2.0 * self.delay_s + 4.0 * self.jitter_s)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the configuration."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class OutageSpec:
    """One scheduled outage (or a repeating series of them)."""

    mode: str = "blackhole"
    """"blackhole" (nothing passes), "reset" (RST both ends) or "refuse" (listener closed)."""
    duration_s: float = 1.0
    """How long each outage lasts."""
    start_s: float = 0.0
    """When the first outage starts, in seconds after the proxy started."""
    period_s: float | None = None
    """Repeat every period_s seconds; None = once."""
    probability: float = 1.0
    """Chance that each repetition really happens (seeded draw per repetition)."""

    def __post_init__(self) -> None:
        _check(self.mode in OUTAGE_MODES, "mode", self.mode, f"must be one of {OUTAGE_MODES}")
        _check(self.duration_s > 0, "duration_s", self.duration_s, "must be > 0")
        _check(self.start_s >= 0, "start_s", self.start_s, "must be >= 0")
        _check(
            self.period_s is None or self.period_s > self.duration_s,
            "period_s",
            self.period_s,
            "must be None or longer than duration_s",
        )
        _check(0 <= self.probability <= 1, "probability", self.probability, "must lie in [0, 1]")


_OUTAGE_RE = re.compile(
    r"^(?:(?P<mode>[a-z]+):)?(?P<dur>[^@]+)@(?P<start>[^/,]+)"
    r"(?:/(?P<period>[^,]+))?(?:,p=(?P<prob>.+))?$"
)


def parse_outage_spec(text: str) -> OutageSpec:
    """Parse ``[MODE:]DURATION@START[/PERIOD][,p=PROB]``.

    ``5s@20s`` is a 5 s black hole 20 s after start; ``reset:2s@10s/30s`` resets every
    30 s from 10 s on; ``refuse:3s@0s/10s,p=0.2`` refuses for 3 s in each 10 s interval
    with probability 0.2.
    """
    match = _OUTAGE_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"bad outage {text!r}: expected [MODE:]DURATION@START[/PERIOD][,p=PROB], "
            "e.g. 5s@20s or reset:2s@10s/30s,p=0.5"
        )
    mode = match.group("mode") or "blackhole"
    if mode not in OUTAGE_MODES:
        raise ValueError(f"bad outage {text!r}: unknown mode {mode!r} (known: {OUTAGE_MODES})")
    period = match.group("period")
    prob = match.group("prob")
    try:
        return OutageSpec(
            mode=mode,
            duration_s=parse_duration(match.group("dur")),
            start_s=parse_duration(match.group("start")),
            period_s=None if period is None else parse_duration(period),
            probability=1.0 if prob is None else parse_probability(prob),
        )
    except ValueError as exc:
        raise ValueError(f"bad outage {text!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class ShapeConfig:
    """Top-level configuration of a NetShape proxy."""

    up: DirectionConfig = field(default_factory=DirectionConfig)
    """Shaping of client -> upstream (device -> server)."""
    down: DirectionConfig = field(default_factory=DirectionConfig)
    """Shaping of upstream -> client (server -> device)."""
    connect_delay_s: float = 0.0
    """Wait this long after accepting a client before connecting upstream."""
    seed: int = 0
    """Seed of every random draw (jitter, loss, slicing, outage probability)."""
    read_size: int = 65536
    """Largest read from a socket; rate-limited reads are further capped by the burst."""
    max_buffer_bytes: int = 16 * 1024 * 1024
    """Bytes one direction of one connection may hold in its delay line before reads pause."""
    outages: tuple[OutageSpec, ...] = ()
    """Scheduled outages, relative to the proxy's start."""
    tick_s: float = 0.01
    """Period of the loop that applies schedules and traces."""

    def __post_init__(self) -> None:
        _check(isinstance(self.up, DirectionConfig), "up", self.up, "must be a DirectionConfig")
        _check(
            isinstance(self.down, DirectionConfig), "down", self.down, "must be a DirectionConfig"
        )
        _check(self.connect_delay_s >= 0, "connect_delay_s", self.connect_delay_s, "must be >= 0")
        _check(self.read_size >= 1, "read_size", self.read_size, "must be >= 1")
        _check(
            self.max_buffer_bytes >= self.read_size,
            "max_buffer_bytes",
            self.max_buffer_bytes,
            "must be >= read_size",
        )
        _check(self.tick_s > 0, "tick_s", self.tick_s, "must be > 0")

    def direction(self, name: str) -> DirectionConfig:
        """The DirectionConfig of "up" or "down"."""
        if name == "up":
            return self.up
        if name == "down":
            return self.down
        raise ValueError(f"direction={name!r}: must be 'up' or 'down'")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the configuration."""
        return dataclasses.asdict(self)


_FIELD_PARSERS: dict[str, Any] = {
    "rate_bps": parse_rate,
    "burst_bytes": lambda v: None if v is None else parse_size(v),
    "delay_s": parse_duration,
    "jitter_s": parse_duration,
    "loss": parse_probability,
    "ge_p": parse_probability,
    "ge_r": parse_probability,
    "ge_loss_bad": parse_probability,
    "mss_bytes": parse_size,
    "rto_min_s": parse_duration,
    "stall_s": lambda v: None if v is None else parse_duration(v),
    "slice_bytes": lambda v: None if v is None else parse_size(v),
    "slice_variation": parse_size,
    "slice_delay_s": parse_duration,
    "limit_bytes": lambda v: None if v is None else parse_size(v),
    "slow_close_s": parse_duration,
}


def coerce_direction_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Turn user values (numbers in base units, or strings with units) into field values.

    Raises ValueError naming the field for an unknown name or a bad value.
    """
    out: dict[str, Any] = {}
    for name, value in fields.items():
        parser = _FIELD_PARSERS.get(name)
        if parser is None:
            known = ", ".join(_FIELD_PARSERS)
            raise ValueError(f"unknown direction setting {name!r} (known: {known})")
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a number or a string with a unit")
        try:
            out[name] = parser(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: {exc}") from None
    return out
