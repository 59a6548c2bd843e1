"""The packed tensor of INFER and the codec names (PROTOCOL.md §6).

What crosses the wire, checked as it is built: the messages carry a `PackedTensor`, the
packer (`protocol.packing`) makes and reads its payload. Kept apart from both so that
neither imports the other for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from protocol.errors import TensorError

__all__ = [
    "CODECS",
    "DEFAULT_MAX_ELEMENTS",
    "DICT_CODEC",
    "IMAGE_CODEC",
    "KNOWN_CODECS",
    "LOSSY_CODEC",
    "MAX_DIM",
    "MAX_NDIM",
    "MAX_SCALE",
    "MIN_SCALE",
    "PackedTensor",
]

CODECS: Final[tuple[str, ...]] = ("float32", "float16", "int8", "sparse_int8")
"""The self-contained codec names, in the order a device lists them in HELLO (§6.1)."""

DICT_CODEC: Final = "sparse_int8_zdict"
"""The codec that needs the model's zstd dictionaries at both ends (PROTOCOL.md §6.7):
sparse_int8's information, the bitmask XOR the row above, each part coded with zstd and
its split's trained dictionary. Negotiated only between peers holding the same set."""

IMAGE_CODEC: Final = "uint8_image"
"""The split-0 codec (PROTOCOL.md §6.8): the input frame's uint8 pixels, losslessly, as a
real client would send them, instead of the preprocessed float input. The receiver
normalises them as the model's input spec says. Valid only at split 0."""

LOSSY_CODEC: Final = "sparse_uintb"
"""The sparse codec of fewer than 8 bits a value (PROTOCOL.md §6.9): the bitmask of
sparse_int8 plus an unsigned b-bit code of each non-zero, b = 1..8 named in the payload.
ReLU outputs are non-negative, so no level goes to negative values. Lossier than int8
(2**b levels), chosen per split where the model's accuracy allows it (`spinn profile`)."""

KNOWN_CODECS: Final[tuple[str, ...]] = (*CODECS, DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC)
"""Every codec name this implementation decodes."""

MAX_NDIM: Final = 8
"""Most dimensions a packed tensor may declare (PROTOCOL.md §6)."""

MAX_DIM: Final = 2**31 - 1
"""Largest single dimension; bigger values are rejected before any product is taken."""

DEFAULT_MAX_ELEMENTS: Final = 2**24
"""Default element limit of `unpack`: 16 Mi elements, i.e. a 64 MiB float32 result."""

_UNSCALED: Final = ("float32", "float16", IMAGE_CODEC)
"""Codecs whose values are not quantised: scale 1.0 and zero point 0."""
MIN_SCALE: Final = 2.0**-126
"""Smallest `scale` of a tensor map: every decoded value stays a normal float32."""
MAX_SCALE: Final = 2.0**120
"""Largest `scale` of a tensor map: every decoded value stays a finite float32."""


@dataclass(frozen=True, slots=True)
class PackedTensor:
    """One activation as it crosses the network (PROTOCOL.md §6)."""

    codec: str
    """Codec name, one of `CODECS`."""
    compressed: bool
    """True when `payload` is one zstd frame holding the codec's raw bytes."""
    shape: tuple[int, ...]
    """Shape of the tensor (batch included), at most `MAX_NDIM` non-negative dimensions."""
    scale: float
    """Quantisation step: x̂ = (q − zero_point)·scale. Exactly 1.0 for float codecs."""
    zero_point: int
    """Quantised value of 0.0, in [−128, 127]. Exactly 0 for float codecs."""
    payload: bytes
    """The codec's bytes (zstd-compressed when `compressed`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.codec, str) or self.codec not in KNOWN_CODECS:
            raise TensorError(f"unknown codec {self.codec!r}; expected one of {KNOWN_CODECS}")
        if not isinstance(self.compressed, bool):
            raise TensorError(f"compressed must be a bool, got {type(self.compressed).__name__}")
        shape = self.shape
        if isinstance(shape, list):
            shape = tuple(shape)
            object.__setattr__(self, "shape", shape)
        if not isinstance(shape, tuple):
            raise TensorError(f"shape must be a sequence of ints, got {type(shape).__name__}")
        if len(shape) > MAX_NDIM:
            raise TensorError(f"shape has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= MAX_DIM:
                raise TensorError(f"shape {shape!r} has an invalid dimension {dim!r}")
        scale = self.scale
        if type(scale) is int:
            scale = float(scale)
            object.__setattr__(self, "scale", scale)
        if type(scale) is not float or not MIN_SCALE <= scale <= MAX_SCALE:
            # Bounded so that (q − zero_point)·scale stays a finite, normal float32.
            raise TensorError(f"scale must be a float in [2**-126, 2**120], got {scale!r}")
        if type(self.zero_point) is not int or not -128 <= self.zero_point <= 127:
            raise TensorError(f"zero_point must be an int in [-128, 127], got {self.zero_point!r}")
        if self.codec in _UNSCALED and (scale != 1.0 or self.zero_point != 0):
            raise TensorError(f"codec {self.codec} requires scale 1.0 and zero_point 0")
        if self.codec == LOSSY_CODEC and self.zero_point != 0:
            raise TensorError(f"codec {LOSSY_CODEC} requires zero_point 0")
        if self.codec == DICT_CODEC and self.compressed:
            raise TensorError(
                f"codec {DICT_CODEC} is coded with zstd already: compressed must be false"
            )
        if not isinstance(self.payload, bytes):
            raise TensorError(f"payload must be bytes, got {type(self.payload).__name__}")

    @property
    def numel(self) -> int:
        """Number of elements the shape declares."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of payload that travel on the wire."""
        return len(self.payload)
