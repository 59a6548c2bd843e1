"""What a version-2 server says about itself in WELCOME (PROTOCOL.md §5.12).

A device written from the specification alone needs to know, before it sends anything:
the input the model expects and how pixels become that input, the class names, the number
of split points and the activation shape entering each, and the server's limits and
timeouts. `Description` carries them, as the ``description`` map of WELCOME.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Final

__all__ = ["PREPROCESS", "Description"]

PREPROCESS: Final = "x[c,h,w] = (float32(p[c,h,w]) / 255 - mean[c]) / std[c], in float32"
"""How a uint8 pixel p becomes the model input x (split 0), the reference's
``InputSpec.preprocess``: divide by 255, subtract the channel's mean, divide by its std,
each step a float32 operation."""

_MAX_ENTRIES: Final = 65536
_MAX_STRING: Final = 4096


def _uints(name: str, value: object, lo: int = 0, most: int = 8) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > most:
        raise TypeError(f"{name} must be a list of at most {most} ints")
    for v in value:
        if type(v) is not int or not lo <= v <= 2**31 - 1:
            raise ValueError(f"{name} has an invalid entry {v!r}")
    return tuple(value)


def _floats(name: str, value: object, count: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise TypeError(f"{name} must be a list of {count} floats")
    out = []
    for v in value:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise ValueError(f"{name} has an invalid entry {v!r}")
        out.append(float(v))
    return tuple(out)


def _count(name: str, value: object, lo: int = 1) -> None:
    if type(value) is not int or not lo <= value <= 2**64 - 1:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _rate(rate_name: str, burst_name: str, rate: object, burst: object) -> None:
    if (rate is None) != (burst is None):
        raise ValueError(f"{rate_name} and {burst_name} go together, got {rate!r} and {burst!r}")
    if rate is None:
        return
    if type(rate) not in (int, float) or not 0 < rate < math.inf:  # type: ignore[operator]
        raise ValueError(f"{rate_name} must be a positive number a second, got {rate!r}")
    if type(burst) not in (int, float) or not 1 <= burst < math.inf:  # type: ignore[operator]
        raise ValueError(f"{burst_name} must be a number >= 1, got {burst!r}")


def _seconds(name: str, value: object) -> float:
    if type(value) not in (int, float) or not 0 < value < math.inf:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Description:
    """The model and the limits of a server (PROTOCOL.md §5.12); every field is required
    on the wire except those with a default here."""

    input_shape: tuple[int, ...]
    """C, H, W of one input image (split 0's activation is [1, C, H, W])."""
    input_mean: tuple[float, ...]
    """Per-channel mean subtracted from pixels scaled to [0, 1] (`PREPROCESS`)."""
    input_std: tuple[float, ...]
    """Per-channel standard deviation the centred pixels are divided by."""
    classes: tuple[str, ...]
    """Class names, by index: RESULT's `classes` index this list."""
    split_shapes: tuple[tuple[int, ...], ...]
    """Shape (batch excluded) of the activation entering stage s, for s = 0..S−1: the
    splits an INFER may name. Entry 0 is `input_shape`."""
    max_batch: int
    """Largest batch dimension of an INFER tensor (the reference: 1)."""
    max_frame_bytes: int
    """Largest frame the server accepts after WELCOME (fatal TOO_LARGE above)."""
    max_tensor_elements: int
    """Largest element count of an INFER tensor (fatal TOO_LARGE above)."""
    max_in_flight: int
    """Requests one connection may have queued or running; beyond, INFER gets BUSY."""
    max_outstanding: int
    """Unanswered INFERs (and unanswered PINGs) beyond which the connection fails."""
    handshake_timeout_s: float
    """Seconds from the TCP accept to WELCOME (TLS and authentication included)."""
    idle_timeout_s: float
    """Seconds without a complete frame, with no request outstanding, before the close."""
    ping_is_activity: bool = True
    """A PING (any complete frame) restarts the idle clock."""
    max_ping_rate: float | None = None
    """PINGs a connection may send a second, on average (a token bucket that starts full);
    above, a fatal TOO_LARGE. None: not stated."""
    max_ping_burst: float | None = None
    """PINGs the bucket holds: how many may come at once (with ``max_ping_rate``)."""
    max_unknown_cancel_rate: float | None = None
    """CANCELs of request ids the server does not hold that a connection may send a second,
    on average; above, a fatal TOO_LARGE. None: not stated."""
    max_unknown_cancel_burst: float | None = None
    """Such CANCELs the bucket holds (with ``max_unknown_cancel_rate``)."""
    input_dtype: str = "uint8"
    """Type of the raw pixels `PREPROCESS` starts from."""
    input_range: tuple[int, int] = (0, 255)
    """Range of the raw pixels."""
    preprocess: str = PREPROCESS
    """The formula from raw pixels to the split-0 input, as text."""

    def __post_init__(self) -> None:
        shape = _uints("input_shape", self.input_shape, lo=1, most=3)
        if len(shape) != 3:
            raise ValueError(f"input_shape must be [C, H, W], got {list(shape)}")
        set_ = object.__setattr__
        set_(self, "input_shape", shape)
        set_(self, "input_mean", _floats("input_mean", self.input_mean, shape[0]))
        std = _floats("input_std", self.input_std, shape[0])
        if min(std) <= 0:
            raise ValueError(f"input_std must be positive, got {list(std)}")
        set_(self, "input_std", std)
        classes = self.classes
        if not isinstance(classes, (list, tuple)) or not 1 <= len(classes) <= _MAX_ENTRIES:
            raise TypeError(f"classes must be a list of 1..{_MAX_ENTRIES} str")
        for c in classes:
            if type(c) is not str or len(c) > _MAX_STRING:
                raise ValueError(f"classes has an invalid entry {c!r:.80}")
        set_(self, "classes", tuple(classes))
        splits = self.split_shapes
        if not isinstance(splits, (list, tuple)) or not 1 <= len(splits) <= _MAX_ENTRIES:
            raise TypeError(f"split_shapes must be a list of 1..{_MAX_ENTRIES} shapes")
        set_(self, "split_shapes", tuple(_uints("split_shapes entry", s) for s in splits))
        for name in ("max_batch", "max_frame_bytes", "max_tensor_elements", "max_in_flight"):
            _count(name, getattr(self, name))
        _count("max_outstanding", self.max_outstanding)
        set_(self, "handshake_timeout_s", _seconds("handshake_timeout_s", self.handshake_timeout_s))
        set_(self, "idle_timeout_s", _seconds("idle_timeout_s", self.idle_timeout_s))
        if type(self.ping_is_activity) is not bool:
            raise TypeError("ping_is_activity must be a bool")
        for what in ("ping", "unknown_cancel"):
            rate, burst = f"max_{what}_rate", f"max_{what}_burst"
            _rate(rate, burst, getattr(self, rate), getattr(self, burst))
        for name in ("input_dtype", "preprocess"):
            value = getattr(self, name)
            if type(value) is not str or len(value) > _MAX_STRING:
                raise TypeError(f"{name} must be a str of at most {_MAX_STRING} characters")
        rng = self.input_range
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise TypeError("input_range must be [lo, hi]")
        for v in rng:
            if type(v) not in (int, float) or not math.isfinite(v):
                raise ValueError(f"input_range has an invalid entry {v!r}")
        set_(self, "input_range", tuple(rng))

    @property
    def num_splits(self) -> int:
        """S: INFER's `split` ranges over 0..S−1."""
        return len(self.split_shapes)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of WELCOME's ``description`` (lists for tuples; an optional
        field that is None is left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "split_shapes":
                value = [list(s) for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_wire(cls, value: object) -> Description:
        """Read WELCOME's ``description`` map; unknown keys are ignored (§9). Raises
        TypeError or ValueError naming what is wrong."""
        if not isinstance(value, dict):
            raise TypeError(f"description must be a map, got {type(value).__name__}")
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [n for n in required if n not in value]
        if missing:
            raise ValueError(f"description is missing {missing}")
        return cls(**{n: value[n] for n in names if n in value})
