"""Activation packing: the communication optimiser of SPINN (paper §4.3, PROTOCOL.md §6).

An activation crosses the network as a `PackedTensor`: a codec name, a shape, the affine
quantisation parameters and the payload bytes, optionally compressed with zstd. ReLU
outputs are about half zeros, so the `sparse_int8` codec sends a bitmask (or an index
list, whichever is smaller) of the non-zeros plus their int8 values; zstd is applied only
when the estimated time to compress and decompress is smaller than the transfer time it
saves at the current bandwidth (`should_compress`).

Everything is vectorised numpy: no per-element Python loops on either side. At batch 1 an
activation is a few thousand values, so the fixed cost of each numpy call and Python step
outweighs the arithmetic: the common path (finite ReLU outputs) takes as few as it can,
and tests/protocol/test_packing_wire.py pins its bytes to a plain reading of PROTOCOL.md §6.
`pack` and `unpack` are thread-safe (the runtime calls them from executor threads): zstd
contexts and the one scratch operand are per thread; everything else shared is read-only.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import zstandard

from protocol.errors import ErrorCode, TensorError
from protocol.tensor import (
    CODECS,
    DEFAULT_MAX_ELEMENTS,
    DICT_CODEC,
    IMAGE_CODEC,
    KNOWN_CODECS,
    LOSSY_CODEC,
    MAX_DIM,
    MAX_NDIM,
    MAX_SCALE,
    PackedTensor,
)

if TYPE_CHECKING:
    from protocol.dictionaries import ZstdDictionaries

__all__ = [
    "CODECS",
    "DICT_CODEC",
    "IMAGE_CODEC",
    "IMAGE_FILTER_GRADIENT",
    "IMAGE_FILTER_NONE",
    "KNOWN_CODECS",
    "LOSSY_BITS",
    "LOSSY_CODEC",
    "DEFAULT_MAX_ELEMENTS",
    "MAX_NDIM",
    "SPARSE_BITMASK",
    "SPARSE_INDEX_U16",
    "SPARSE_INDEX_U32",
    "ZSTD_COMPRESS_BPS",
    "ZSTD_DECOMPRESS_BPS",
    "ZSTD_LEVEL",
    "PackedTensor",
    "as_sparse_int8",
    "estimate_zstd_ratio",
    "pack",
    "quantise",
    "raw_payload_limit",
    "should_compress",
    "unpack",
    "zdict_streams",
]

LOSSY_BITS: Final = range(1, 9)
"""The code widths sparse_uintb allows (bits a non-zero value)."""

IMAGE_FILTER_NONE: Final = 0
"""uint8_image filter byte: the pixels as they are (PROTOCOL.md §6.8)."""
IMAGE_FILTER_GRADIENT: Final = 1
"""uint8_image filter byte: each pixel minus its left and upper neighbours plus the upper
left one, mod 256 (PNG's idea, decodable by two cumulative sums): smooth images become
mostly small numbers, which zstd codes in far fewer bytes (PROTOCOL.md §6.8)."""

SPARSE_BITMASK: Final = 0
"""sparse_int8 layout byte: a bitmask of ceil(N/8) bytes follows (PROTOCOL.md §6.5)."""
SPARSE_INDEX_U16: Final = 1
"""sparse_int8 layout byte: nnz little-endian uint16 flat indices follow."""
SPARSE_INDEX_U32: Final = 2
"""sparse_int8 layout byte: nnz little-endian uint32 flat indices follow."""

ZSTD_LEVEL: Final = 1
"""zstd level used by `pack`: level 1 keeps compression well above link speeds up to
~1 Gbit/s on one core, where higher levels would cost more time than the bytes they save."""

ZSTD_COMPRESS_BPS: Final = 150e6
"""Calibrated zstd level-1 compression speed in payload bytes per CPU-second: measured by
`python -m bench.wire` on batch-1 sparse_int8 payloads (a few KiB, where per-call
costs dominate) on a shared 2-core machine, so conservative for larger payloads."""

ZSTD_DECOMPRESS_BPS: Final = 330e6
"""Calibrated zstd decompression speed, payload bytes per CPU-second (same measurement)."""

_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
"""The magic number a zstd frame starts with, which sparse_int8_zdict leaves out (§6.7)."""
_SAMPLE_CHUNK: Final = 4096
_SAMPLE_CHUNKS: Final = 4
_MIN_COMPRESS_BYTES: Final = 64
_SPARSE_HEADER = struct.Struct("<BI")
_ZDICT_HEADER = struct.Struct("<HI")
"""sparse_int8_zdict payload header: table (uint16), bytes of the bitmask frame (uint32)."""
_ZDICT_GAIN: Final = 1.3
"""Conservative size ratio of a sparse_int8 raw payload to its sparse_int8_zdict coding,
for the compress-or-not decision (`python -m bench.wire` measures about 1.4)."""
"""Codecs whose tensor map carries scale 1.0 and zero_point 0 (nothing is quantised)."""
_FLOAT16_MAX: Final = 65504.0
_QUANT_MAX: Final = 2.0**126
_F32_TINY: Final = float(np.finfo(np.float32).tiny)
_F32: Final = struct.Struct("<f")
_INF_BITS: Final = 0x7F800000
"""uint32 pattern of +inf: below it lie exactly the non-negative finite float32 values."""
_FLOAT32: Final = np.dtype(np.float32)
_UINT32: Final = np.dtype(np.uint32)
_BOOL: Final = np.dtype(np.bool_)
_UINT8: Final = np.dtype(np.uint8)
_INT8: Final = np.dtype(np.int8)
_F4_LE: Final = np.dtype("<f4")
_F2_LE: Final = np.dtype("<f2")
_U2_LE: Final = np.dtype("<u2")
_U4_LE: Final = np.dtype("<u4")
_ROUND_MINUS_128: Final = 12582912.0 - 128.0
"""1.5·2**23 − 128: adding it to t in [−2**21, 2**21] rounds t half-to-even to an integer
(the sum's float32 spacing is 1 and the constant is even) and leaves rint(t) − 128 in the
low byte of the sum's bit pattern."""


def _const(value: float) -> np.ndarray:
    """A read-only 0-d float32 array: a cheaper ufunc operand than a Python or numpy scalar,
    and safe to share between threads."""
    array = np.array(value, np.float32)
    array.setflags(write=False)
    return array


_ROUND_MINUS_128_F32: Final = _const(_ROUND_MINUS_128)
_LEVEL_F32: Final = tuple(_const(level) for level in range(-128, 128))
"""_LEVEL_F32[zp + 128] is zero_point zp as a float32 operand."""


_NEW: Final = object.__new__


class _PerThread(threading.local):
    """State of one thread: pack and unpack run on the runtime's executor threads, a zstd
    context serves one operation at a time, and the scale scratch is written per call."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()
        self.scale = np.empty((), np.float32)
        """The scale as a 0-d float32 operand: half the cost of a Python float in a ufunc."""


_thread = _PerThread()


def _range(flat: np.ndarray) -> tuple[float, float, float]:
    """(min(x), min(x, 0), max(x, 0)) of a non-empty contiguous 1-D float32 array.

    NaN propagates into the result (argmin/argmax return the first NaN). argmin/argmax cost
    a third of a min/max reduction on a few thousand values, and ReLU outputs need only one:
    when the largest uint32 bit pattern is that of a finite value >= +0.0, no element has its
    sign bit set, so the minimum is >= 0 and the largest pattern is the largest value.
    """
    bits = flat.view(_UINT32)
    top = bits.argmax()
    if bits.item(top) < _INF_BITS:
        hi: float = flat.item(top)
        return 0.0, 0.0, hi
    vmin: float = flat.item(flat.argmin())
    vmax: float = flat.item(flat.argmax())
    return vmin, min(vmin, 0.0), max(vmax, 0.0)


def _f32(x: float) -> float:
    """`x` rounded to float32, as a Python float (no numpy scalar: cheaper per call)."""
    return float(_F32.unpack(_F32.pack(x))[0])


def _quantise_into(
    values: np.ndarray, out: np.ndarray | None, scratch: bool = False
) -> tuple[np.ndarray, float, int]:
    """Quantise a contiguous 1-D float32 array: (q, scale, zero_point) (PROTOCOL.md §6.4).

    q is `out` when given (an int8 array of the same size), else a new array. With
    `scratch`, `values` is the caller's temporary and is overwritten. At batch 1 the fixed
    cost of each numpy call and Python statement is most of the time, so the common case
    (ReLU outputs: finite and >= +0.0) takes the fewest of both.
    """
    if not values.size:
        return (np.empty(0, _INT8) if out is None else out), 1.0, 0
    bits = values.view(_UINT32)
    top = bits.argmax()
    if bits.item(top) < _INF_BITS:
        # No sign bit set, all finite (see `_range`): lo = 0, so zero_point = −128.
        hi: float = values.item(top)
        if hi > _QUANT_MAX:
            raise ValueError(f"values up to {hi:g} exceed the int8 codecs' range 2**126")
        if not hi:
            if out is None:
                return np.zeros(values.size, _INT8), 1.0, 0
            out[...] = 0
            return out, 1.0, 0
        # Assignment rounds to float32 like the reference's float32((hi − lo) / 254), and a
        # 0-d float32 operand costs half as much as a Python float in a ufunc.
        operand = _thread.scale
        operand[()] = hi / 254.0
        scale: float = operand.item()
        if scale < _F32_TINY:
            scale = _F32_TINY
            operand[()] = scale
        if scratch:
            # In place: bits is a view of values, and the cast below reads it as integers.
            np.divide(values, operand, values)
            np.add(values, _ROUND_MINUS_128_F32, values)
        else:
            t = np.divide(values, operand)
            np.add(t, _ROUND_MINUS_128_F32, t)
            bits = t.view(_UINT32)
        # t lies in [0, 255]: adding 1.5·2**23 − 128 rounds half-to-even and subtracts 128,
        # and the cast to int8 keeps the low byte of the bit pattern: exactly rint(t) − 128.
        if out is None:
            return bits.astype(_INT8), scale, -128
        out[...] = bits
        return out, scale, -128
    vmin, lo, hi = _range(values)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("cannot pack non-finite values (nan or inf) with an int8 codec")
    if max(-lo, hi) > _QUANT_MAX:
        # Keeps (q − zero_point)·scale below float32's maximum on the way back.
        raise ValueError(f"values up to {max(-lo, hi):g} exceed the int8 codecs' range 2**126")
    q = np.empty(values.size, _INT8) if out is None else out
    if hi == lo:
        q[...] = 0
        return q, 1.0, 0
    scale = max(_f32((hi - lo) / 254.0), _F32_TINY)
    t = np.divide(values, scale, values if scratch else None)
    # zero_point comes from the same float32 arithmetic as the levels, so the minimum maps
    # to exactly −128; the maximum then lands at most 255 levels higher, i.e. ≤ 127, and
    # no clamp is needed (rint(x / scale) is monotonic in x). PROTOCOL.md §6.4. A double
    # quotient of two float32 values rounded to float32 is the float32 quotient, and
    # Python's round() is round-half-even like rint. (lo may be −0.0: zero_point −128.)
    zero_point = -128 if lo == 0.0 else -128 - round(_f32(vmin / scale))
    np.rint(t, t)
    np.add(t, _LEVEL_F32[zero_point + 128], t)
    q[...] = t  # exact small integers: the cast to int8 is exact
    return q, scale, zero_point


def quantise(values: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float, int]:
    """Affine int8 quantisation of a float32 array: returns (q, scale, zero_point).

    The range [min(x, 0), max(x, 0)] is mapped onto 255 of the 256 int8 levels, so 0.0 is
    exact and round(x/scale) + zero_point never leaves [−128, 127]; hence
    |x − (q − zero_point)·scale| ≤ scale/2 up to float32 rounding (PROTOCOL.md §6.4).
    q is flat, in C order. `out`, an int8 array of the same size, receives q (e.g. a slice
    of a payload buffer).
    """
    return _quantise_into(_as_float32(values)[0], out)


def _dequantise(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """(q − zero_point)·scale in float32 (PROTOCOL.md §6.4), as a new array."""
    # Widening first, then two in-place float32 passes: a mixed-type ufunc loop (int8 in,
    # float32 out) goes through numpy's buffered casting and costs twice as much; 0-d
    # float32 operands cost half as much as scalars.
    out = q.astype(_FLOAT32)
    np.subtract(out, _LEVEL_F32[zero_point + 128], out)
    operand = _thread.scale
    operand[()] = scale  # rounds to float32, as the reference's float32(scale)
    np.multiply(out, operand, out)
    return out


def _sample_ratio(payload: bytes) -> tuple[float, bytes | None]:
    """(estimated raw/compressed ratio, the compressed payload if the sample was all of it)."""
    n = len(payload)
    if n == 0:
        return 1.0, None
    if n <= _SAMPLE_CHUNK * _SAMPLE_CHUNKS:
        whole = _thread.compressor.compress(payload)
        return n / max(1, len(whole)), whole
    view = memoryview(payload)
    step = (n - _SAMPLE_CHUNK) // (_SAMPLE_CHUNKS - 1)
    sample = b"".join(view[i * step : i * step + _SAMPLE_CHUNK] for i in range(_SAMPLE_CHUNKS))
    return len(sample) / max(1, len(_thread.compressor.compress(sample))), None


def estimate_zstd_ratio(payload: bytes) -> float:
    """Estimated size ratio raw/compressed of `payload`, from a small sample.

    Compresses up to four evenly spaced 4 KiB chunks, so the estimate costs a few tens of
    microseconds whatever the payload size (paper §4.3: the decision must be cheap).
    """
    return _sample_ratio(payload)[0]


def should_compress(
    raw_len: int,
    bandwidth_bps: float | None,
    *,
    ratio: float = 2.0,
    compress_bps: float = ZSTD_COMPRESS_BPS,
    decompress_bps: float = ZSTD_DECOMPRESS_BPS,
) -> bool:
    """Whether zstd pays off for `raw_len` payload bytes at `bandwidth_bps` bits per second.

    True when the transfer time saved, raw_len·(1 − 1/ratio)·8 / bandwidth, exceeds the
    estimated time to compress and decompress (paper §4.3, PROTOCOL.md §6.6). An unknown
    bandwidth (None) favours fewer bytes; an infinite one never compresses.
    """
    if raw_len < 0:
        raise ValueError(f"raw_len must be >= 0, got {raw_len}")
    if bandwidth_bps is not None and not bandwidth_bps > 0:
        raise ValueError(f"bandwidth_bps must be > 0 or None, got {bandwidth_bps!r}")
    if raw_len < _MIN_COMPRESS_BYTES or ratio <= 1.0:
        return False
    if bandwidth_bps is None:
        return True
    codec_s = raw_len / compress_bps + raw_len / decompress_bps
    saved_s = raw_len * (1.0 - 1.0 / ratio) * 8.0 / bandwidth_bps
    return saved_s > codec_s


def _as_float32(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(the values as a contiguous 1-D float32 array, the shape), for any array-like."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"cannot pack an array of dtype {arr.dtype}; expected real numbers")
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"cannot pack {arr.ndim} dimensions; at most {MAX_NDIM} allowed")
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1), arr.shape


def _check_finite(flat: np.ndarray, limit: float = math.inf) -> None:
    if flat.size == 0:
        return
    _, lo, hi = _range(flat)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("cannot pack non-finite values (nan or inf)")
    if max(-lo, hi) > limit:
        raise ValueError(f"values up to {max(-lo, hi):g} overflow float16 (max {limit:g})")


def _pack_sparse(flat: np.ndarray) -> tuple[bytes, float, int]:
    # astype(bool) is x != 0 (NaN included, −0.0 excluded) at two thirds of the cost.
    mask = flat.astype(_BOOL)
    # nonzero() is branch-free; boolean indexing mispredicts on the random masks of ReLU
    # outputs and costs twice as much at batch 1 (compress() is nonzero() + take() inside).
    index = mask.nonzero()[0]
    values = flat.take(index)
    q, scale, zero_point = _quantise_into(values, None, scratch=True)
    return _sparse_payload(mask, index, q), scale, zero_point


def _sparse_payload(mask: np.ndarray, index: np.ndarray, q: Any) -> bytes:
    """The sparse_int8 payload of int8 levels `q` at the flat positions `index` (where the
    bool `mask` is set): the bitmask or the index list, whichever is smaller (§6.5)."""
    n, nnz = mask.size, index.size
    mask_len = (n + 7) >> 3
    width = 2 if n <= 0x10000 else 4
    positions: np.ndarray
    if nnz * width < mask_len:
        layout = SPARSE_INDEX_U16 if width == 2 else SPARSE_INDEX_U32
        positions = index.astype(_U2_LE if width == 2 else _U4_LE)
    else:
        layout = SPARSE_BITMASK
        positions = np.packbits(mask)
    parts: tuple[Any, ...] = (_SPARSE_HEADER.pack(layout, nnz), positions, q)  # buffers
    return b"".join(parts)


def _row_xor(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The bitmask as sparse_int8_zdict sends it: each bit XOR the one a row above (the
    same index along the last axis, one less along the second-to-last), where there is one
    (PROTOCOL.md §6.7). Zeros come in blobs, so this leaves far fewer set bits."""
    if len(shape) < 2 or mask.size == 0 or shape[-2] < 2:
        return mask
    rows = mask.reshape(-1, shape[-2], shape[-1])
    out = rows.copy()
    np.not_equal(rows[:, 1:], rows[:, :-1], out=out[:, 1:])
    return out.reshape(-1)


def _zdict_parts(flat: np.ndarray, shape: tuple[int, ...]) -> tuple[Any, Any, float, int]:
    """(packed XOR-ed bitmask, int8 values, scale, zero_point) of sparse_int8_zdict.

    The positions are where the int8 level (PROTOCOL.md §6.4, over the whole tensor) is
    not zero_point, i.e. where x̂ ≠ 0: a value below half a step is 0.0 on the way back
    either way, and leaving it out of the positions costs nothing in accuracy.
    """
    q, scale, zero_point = _quantise_into(flat, None)
    mask = q != zero_point
    values = q.take(mask.nonzero()[0])
    return np.packbits(_row_xor(mask, shape)), values, scale, zero_point


def zdict_streams(array: np.ndarray) -> tuple[bytes, bytes]:
    """(bitmask bytes, values bytes) that sparse_int8_zdict compresses for `array`: what
    its dictionaries are trained on (`spinn.offline.zdict_training.train_tables`)."""
    flat, shape = _as_float32(array)
    bits, values, _, _ = _zdict_parts(flat, tuple(shape))
    return bits.tobytes(), values.tobytes()


def _pack_zdict(
    flat: np.ndarray, shape: tuple[int, ...], dictionaries: ZstdDictionaries, table: int
) -> tuple[bytes, float, int]:
    mask_z, values_z = dictionaries.compressors(table)  # checks the table first
    bits, values, scale, zero_point = _zdict_parts(flat, shape)
    mask_frame = mask_z.compress(bits)
    parts = (_ZDICT_HEADER.pack(table, len(mask_frame)), mask_frame, values_z.compress(values))
    return b"".join(parts), scale, zero_point


def _uintb_codes(codes: np.ndarray, bits: int) -> bytes:
    """uint8 `codes` below 2**bits, each as `bits` bits, most significant first, packed
    end to end (PROTOCOL.md §6.9); the last byte's padding bits are 0."""
    if bits == 8:
        return codes.tobytes()
    return np.packbits(np.unpackbits(codes[:, None], axis=1)[:, 8 - bits :]).tobytes()


def _pack_uintb(flat: np.ndarray, bits: int) -> tuple[bytes, float]:
    """(sparse_uintb payload, scale) of a contiguous 1-D float32 array (PROTOCOL.md §6.9).

    scale = hi / 2**bits, level q = rint(x / scale) in [0, 2**bits]: the positions are the
    elements with q ≥ 1 (x̂ ≠ 0), each coded as q − 1 in `bits` bits, so every element is
    within scale/2 of its value and 2**bits non-zero levels use all the codes.
    """
    hi = 0.0
    if flat.size:
        vmin, lo, hi = _range(flat)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"cannot pack non-finite values (nan or inf) with {LOSSY_CODEC}")
        if vmin < 0.0:
            raise ValueError(
                f"{LOSSY_CODEC} codes non-negative values (ReLU outputs) only; "
                f"the tensor's minimum is {vmin:g}"
            )
        if hi > MAX_SCALE:
            # Keeps scale = hi / 2**bits within a tensor's bounds (below 2**120).
            raise ValueError(f"values up to {hi:g} exceed {LOSSY_CODEC}'s range 2**120")
    mask_len = (flat.size + 7) >> 3
    if not hi:
        return _SPARSE_HEADER.pack(bits, 0) + bytes(mask_len), 1.0
    scale = max(_f32(hi / (1 << bits)), _F32_TINY)
    # float32 quotient then rint (half to even), as §6.9 specifies: hi / scale is 2**bits
    # to within float32 rounding, so no level exceeds 2**bits and no clamp is needed.
    levels = np.rint(np.divide(flat, np.float32(scale)))
    mask = levels.astype(_BOOL)
    index = mask.nonzero()[0]
    codes = (levels.take(index) - 1.0).astype(_UINT8)
    mask_bits = np.packbits(mask).tobytes()
    parts = (_SPARSE_HEADER.pack(bits, index.size), mask_bits, _uintb_codes(codes, bits))
    return b"".join(parts), scale


def pack(
    array: np.ndarray,
    codec: str = "sparse_int8",
    compress: bool | None = None,
    bandwidth_bps: float | None = None,
    *,
    dictionaries: ZstdDictionaries | None = None,
    table: int = 0,
    bits: int | None = None,
) -> PackedTensor:
    """Pack `array` with `codec`; zstd when `compress`, or when it pays off if None.

    With compress=None the decision is `should_compress(len(raw), bandwidth_bps)` with the
    ratio estimated on a sample of the raw payload (`estimate_zstd_ratio`); a compressed
    payload that turns out no smaller than the raw one is sent raw.

    `DICT_CODEC` codes with `dictionaries`' table `table` (the split point); where zstd
    does not pay off (compress=False, or a link too fast for it) the tensor goes out as
    raw sparse_int8 instead, which every peer decodes.

    `IMAGE_CODEC` packs uint8 pixels (the input frame, shape (1, C, H, W)) losslessly;
    any other dtype is refused. Compressed, it is the smaller of the plain and the
    gradient-filtered pixels (PROTOCOL.md §6.8).
    `LOSSY_CODEC` codes each non-zero in `bits` bits (default 8; one of `LOSSY_BITS`), and
    only non-negative values; `bits` is refused with any other codec.
    """
    if codec == IMAGE_CODEC:
        return _pack_image(array, compress, bandwidth_bps)
    if bits is not None and codec != LOSSY_CODEC:
        raise ValueError(f"bits={bits} is for codec {LOSSY_CODEC} only, not {codec!r}")
    if codec == LOSSY_CODEC and (bits is None or type(bits) is not int or bits not in LOSSY_BITS):
        if bits is not None:
            raise ValueError(f"{LOSSY_CODEC} codes 1 to 8 bits a value, got bits={bits!r}")
        bits = 8
    if codec == DICT_CODEC:
        if dictionaries is None:
            raise ValueError(f"codec {DICT_CODEC} needs the model's zstd dictionaries")
        if compress is None and bandwidth_bps is not None:
            # The int8 positions and values take about 5/8 of a byte per element at 50%
            # zeros: enough to decide without packing twice.
            estimate = (_as_float32(array)[0].size * 5) // 8
            compress = should_compress(estimate, bandwidth_bps, ratio=_ZDICT_GAIN)
        if compress is False:
            return pack(array, "sparse_int8", compress=False)
    elif codec not in CODECS and codec != LOSSY_CODEC:
        raise ValueError(f"unknown codec {codec!r}; expected one of {KNOWN_CODECS}")
    if (
        type(array) is np.ndarray
        and array.dtype is _FLOAT32
        and array.flags.c_contiguous
        and array.ndim <= MAX_NDIM
    ):
        # What the runtime sends: a view, no conversion (per-call costs rule at batch 1).
        flat, shape = array.ravel(), array.shape
    else:
        flat, shape = _as_float32(array)
    n = flat.size
    if not (0 < n <= MAX_DIM) and shape and max(shape) > MAX_DIM:
        # Otherwise every dimension is at most the element count: only an empty array can
        # declare a dimension the protocol refuses (PROTOCOL.md §6).
        raise ValueError(f"cannot pack shape {shape}: dimensions above {MAX_DIM}")
    if codec == DICT_CODEC:
        assert dictionaries is not None
        payload, scale, zero_point = _pack_zdict(flat, shape, dictionaries, table)
        return _trusted(codec, False, shape, scale, zero_point, payload)
    if codec == "sparse_int8":
        raw, scale, zero_point = _pack_sparse(flat)
    elif codec == LOSSY_CODEC:
        assert bits is not None
        raw, scale = _pack_uintb(flat, bits)
        zero_point = 0
    elif codec == "int8":
        q, scale, zero_point = _quantise_into(flat, None)
        raw = q.tobytes()
    else:
        _check_finite(flat, _FLOAT16_MAX if codec == "float16" else math.inf)
        raw = flat.astype(_F2_LE if codec == "float16" else _F4_LE, copy=False).tobytes()
        scale, zero_point = 1.0, 0
    return _with_zstd(codec, raw, compress, bandwidth_bps, shape, scale, zero_point)


def _gradient(pixels: np.ndarray) -> np.ndarray:
    """The gradient filter of PROTOCOL.md §6.8 over the last two axes of uint8 `pixels`:
    p − left − up + up-left, mod 256 (uint8 arithmetic wraps), zeros outside the image."""
    along_w = np.diff(pixels, axis=-1, prepend=np.uint8(0))
    return np.diff(along_w, axis=-2, prepend=np.uint8(0))


def _undo_gradient(filtered: np.ndarray) -> np.ndarray:
    """The pixels of `_gradient`'s output: cumulative sums mod 256 down and across."""
    rows = np.cumsum(filtered, axis=-2, dtype=_UINT8)
    return np.cumsum(rows, axis=-1, dtype=_UINT8)


def _pack_image(
    array: np.ndarray, compress: bool | None, bandwidth_bps: float | None
) -> PackedTensor:
    """`pack` for `IMAGE_CODEC`: the filter byte and the pixels. zstd codes both the plain
    and the gradient-filtered pixels and the smaller frame goes, when §6.6's rule says it
    pays with the ratio that frame reached (on camera frames the filter's ratio is what
    makes zstd pay at all: sensor noise leaves the plain pixels at ~1.1); otherwise the
    plain pixels go uncompressed."""
    arr = np.asarray(array)
    if arr.dtype != _UINT8:
        raise ValueError(f"codec {IMAGE_CODEC} packs uint8 pixels; got an array of {arr.dtype}")
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"cannot pack {arr.ndim} dimensions; at most {MAX_NDIM} allowed")
    arr = np.asarray(arr, order="C")  # ascontiguousarray would make a 0-d array 1-d
    shape = arr.shape
    if arr.size == 0 and shape and max(shape) > MAX_DIM:
        raise ValueError(f"cannot pack shape {shape}: dimensions above {MAX_DIM}")
    raw = b"".join((bytes((IMAGE_FILTER_NONE,)), arr.reshape(-1).data))
    plain = _trusted(IMAGE_CODEC, False, shape, 1.0, 0, raw)
    if compress is None:
        # As `_with_zstd`: no coding where even removing every byte would not pay.
        compress = len(raw) >= _MIN_COMPRESS_BYTES and (
            bandwidth_bps is None or should_compress(len(raw), bandwidth_bps, ratio=math.inf)
        )
        if not compress:
            return plain
        compress = None if bandwidth_bps is not None else True
    elif not compress:
        return plain
    # An input frame is coded whole, each way: a few tens of KiB at most, and the ratio
    # the frame reaches is the one the decision needs.
    frames = [_thread.compressor.compress(raw)]
    if arr.ndim >= 2:
        filtered = b"".join((bytes((IMAGE_FILTER_GRADIENT,)), _gradient(arr).reshape(-1).data))
        frames.append(_thread.compressor.compress(filtered))
    best = min(frames, key=len)
    if len(best) >= len(raw):
        return plain
    if compress is None:
        assert bandwidth_bps is not None
        if not should_compress(len(raw), bandwidth_bps, ratio=len(raw) / len(best)):
            return plain
    return _trusted(IMAGE_CODEC, True, shape, 1.0, 0, best)


def _unpack_image(raw: bytes, shape: tuple[int, ...], n: int) -> np.ndarray:
    """The pixels of a uint8_image raw payload, validated (PROTOCOL.md §6.8), as float32."""
    _expect_len(IMAGE_CODEC, raw, 1 + n)
    kind = raw[0]
    pixels = np.frombuffer(raw, _UINT8, n, 1).reshape(shape)
    if kind == IMAGE_FILTER_GRADIENT:
        if len(shape) < 2:
            raise TensorError(
                f"{IMAGE_CODEC} gradient filter needs at least 2 dimensions, shape is {shape}"
            )
        pixels = _undo_gradient(pixels)
    elif kind != IMAGE_FILTER_NONE:
        raise TensorError(f"{IMAGE_CODEC} has unknown filter byte {kind}")
    return pixels.astype(_FLOAT32)


def _with_zstd(
    codec: str,
    raw: bytes,
    compress: bool | None,
    bandwidth_bps: float | None,
    shape: tuple[int, ...],
    scale: float,
    zero_point: int,
) -> PackedTensor:
    """The tensor of `raw` payload bytes, zstd-compressed when `compress`, or when it pays
    off at `bandwidth_bps` if None (`pack`)."""
    packed: bytes | None = None
    if compress is None:
        # Sampling costs tens of microseconds: skip it when the answer cannot depend on it
        # (unknown bandwidth, or a link so fast that even removing every byte would not pay).
        compress = len(raw) >= _MIN_COMPRESS_BYTES and (
            bandwidth_bps is None or should_compress(len(raw), bandwidth_bps, ratio=math.inf)
        )
        if compress and bandwidth_bps is not None:
            ratio, packed = _sample_ratio(raw)  # a small payload is its own sample
            compress = should_compress(len(raw), bandwidth_bps, ratio=ratio)
    payload = raw
    if compress:
        if packed is None:
            packed = _thread.compressor.compress(raw)
        if len(packed) < len(raw):
            payload = packed
        else:
            compress = False
    return _trusted(codec, bool(compress), shape, scale, zero_point, payload)


def _trusted(
    codec: str,
    compressed: bool,
    shape: tuple[int, ...],
    scale: float,
    zero_point: int,
    payload: bytes,
) -> PackedTensor:
    """A PackedTensor of fields that `pack` made valid by construction.

    Skips `__post_init__`, whose checks guard against peers: at batch 1 they and the frozen
    dataclass's initialiser cost a tenth of a pack.
    """
    packed = _NEW(PackedTensor)
    _SET_CODEC(packed, codec)
    _SET_COMPRESSED(packed, compressed)
    _SET_SHAPE(packed, shape)
    _SET_SCALE(packed, scale)
    _SET_ZERO_POINT(packed, zero_point)
    _SET_PAYLOAD(packed, payload)
    return packed


# The slots' own setters: what object.__setattr__ ends up calling, minus the lookup.
_SET_CODEC = PackedTensor.__dict__["codec"].__set__
_SET_COMPRESSED = PackedTensor.__dict__["compressed"].__set__
_SET_SHAPE = PackedTensor.__dict__["shape"].__set__
_SET_SCALE = PackedTensor.__dict__["scale"].__set__
_SET_ZERO_POINT = PackedTensor.__dict__["zero_point"].__set__
_SET_PAYLOAD = PackedTensor.__dict__["payload"].__set__


def raw_payload_limit(codec: str, numel: int) -> int:
    """Largest raw (uncompressed) payload a tensor of `numel` elements may have."""
    if codec == "float32":
        return 4 * numel
    if codec == "float16":
        return 2 * numel
    if codec == "int8":
        return numel
    if codec == IMAGE_CODEC:
        return 1 + numel  # the filter byte, one byte per pixel
    if codec == LOSSY_CODEC:
        # header + bitmask + 8 bits per element at most.
        return _SPARSE_HEADER.size + ((numel + 7) >> 3) + numel
    # sparse_int8: header + the largest index list (uint32 each) + one int8 per element.
    return _SPARSE_HEADER.size + 4 * numel + numel


def _decompress(
    payload: bytes | memoryview,
    limit: int,
    dctx: zstandard.ZstdDecompressor | None = None,
    exact: int | None = None,
    what: str = "zstd frame",
) -> bytes:
    """The content of exactly one zstd frame, refused before any allocation when it
    declares no size, more than `limit` bytes, or other than `exact` bytes (`dctx`: a
    dictionary's magicless decompressor, PROTOCOL.md §6.7; None: plain frames, §6.6)."""
    try:
        if dctx is None:
            size = zstandard.frame_content_size(payload)
        else:
            # The header of a magicless frame is that of a frame after its magic number
            # (at most 14 bytes): read with the magic put back, as every zstandard can.
            size = zstandard.frame_content_size(_ZSTD_MAGIC + bytes(payload[:14]))
    except zstandard.ZstdError as exc:
        raise TensorError(f"{what} is not a zstd frame: {exc}") from None
    if size < 0:
        raise TensorError(f"{what} does not declare its content size")
    if exact is not None and size != exact:
        raise TensorError(f"{what} declares {size} bytes; the tensor needs exactly {exact}")
    if size > limit:
        raise TensorError(
            f"{what} declares {size} bytes; the shape allows at most {limit}",
            ErrorCode.TOO_LARGE,
        )
    try:
        decompressor = _thread.decompressor if dctx is None else dctx
        dobj = decompressor.decompressobj(write_size=max(size, 1))
        raw = dobj.decompress(payload)
    except zstandard.ZstdError as exc:
        raise TensorError(f"corrupt {what}: {exc}") from None
    if not dobj.eof or dobj.unused_data or len(raw) != size:
        raise TensorError(
            f"{what} is truncated or has trailing bytes "
            f"(decoded {len(raw)} of {size} bytes, {len(dobj.unused_data)} bytes left over)"
        )
    return raw


def _expect_len(codec: str, raw: bytes, expected: int) -> None:
    if len(raw) != expected:
        raise TensorError(f"{codec} payload has {len(raw)} bytes; the shape needs {expected}")


def _unpack_sparse(raw: bytes, out: np.ndarray, scale: float, zero_point: int) -> None:
    """Decode a sparse_int8 payload into `out`, flat and all zeros (PROTOCOL.md §6.5)."""
    n = out.size
    hs = _SPARSE_HEADER.size
    if len(raw) < hs:
        raise TensorError(f"sparse_int8 payload has {len(raw)} bytes; the header alone needs {hs}")
    layout, nnz = _SPARSE_HEADER.unpack_from(raw)
    if nnz > n:
        raise TensorError(f"sparse_int8 declares {nnz} non-zeros for {n} elements")
    if layout == SPARSE_BITMASK:
        mask_len = (n + 7) >> 3
        _expect_len("sparse_int8", raw, hs + mask_len + nnz)
        if n & 7 and raw[hs + mask_len - 1] & ((1 << (8 - (n & 7))) - 1):
            raise TensorError("sparse_int8 bitmask has bits set past the last element")
        # Scatter through flat indices: nonzero() on a bool view of the unpacked bits is
        # branch-free, where assigning through a boolean mask mispredicts on ReLU masks
        # and costs three times as much.
        mask = np.unpackbits(np.frombuffer(raw, _UINT8, mask_len, hs), None, n).view(_BOOL)
        index = mask.nonzero()[0]
        if index.size != nnz:
            raise TensorError(f"sparse_int8 bitmask has {index.size} bits set; header says {nnz}")
        q = np.frombuffer(raw, _INT8, nnz, hs + mask_len)
        out[index] = _dequantise(q, scale, zero_point)
        return
    if layout not in (SPARSE_INDEX_U16, SPARSE_INDEX_U32):
        raise TensorError(f"sparse_int8 has unknown layout byte {layout}")
    width = 2 if layout == SPARSE_INDEX_U16 else 4
    _expect_len("sparse_int8", raw, hs + width * nnz + nnz)
    if nnz:
        index = np.frombuffer(raw, _U2_LE if width == 2 else _U4_LE, nnz, hs).astype(np.intp)
        if index.item(-1) >= n or (nnz > 1 and not bool((index[1:] > index[:-1]).all())):
            raise TensorError(
                f"sparse_int8 indices must be strictly ascending and below {n} elements"
            )
        q = np.frombuffer(raw, _INT8, nnz, hs + width * nnz)
        out[index] = _dequantise(q, scale, zero_point)


def _unpack_uintb(raw: bytes, out: np.ndarray, scale: float) -> None:
    """Decode a sparse_uintb payload into `out`, flat and all zeros (PROTOCOL.md §6.9)."""
    n = out.size
    hs = _SPARSE_HEADER.size
    if len(raw) < hs:
        raise TensorError(
            f"{LOSSY_CODEC} payload has {len(raw)} bytes; the header alone needs {hs}"
        )
    bits, nnz = _SPARSE_HEADER.unpack_from(raw)
    if bits not in LOSSY_BITS:
        raise TensorError(f"{LOSSY_CODEC} declares {bits} bits a value; 1 to 8 allowed")
    if nnz > n:
        raise TensorError(f"{LOSSY_CODEC} declares {nnz} non-zeros for {n} elements")
    if scale > 2.0 ** (127 - bits):
        # The top level, 2**bits·scale, must stay a finite float32.
        raise TensorError(f"{LOSSY_CODEC} scale {scale!r} exceeds 2**{127 - bits} at {bits} bits")
    mask_len = (n + 7) >> 3
    code_bits = nnz * bits
    _expect_len(LOSSY_CODEC, raw, hs + mask_len + ((code_bits + 7) >> 3))
    if n & 7 and raw[hs + mask_len - 1] & ((1 << (8 - (n & 7))) - 1):
        raise TensorError(f"{LOSSY_CODEC} bitmask has bits set past the last element")
    if code_bits & 7 and raw[-1] & ((1 << (8 - (code_bits & 7))) - 1):
        raise TensorError(f"{LOSSY_CODEC} codes have padding bits set after the last value")
    mask = np.unpackbits(np.frombuffer(raw, _UINT8, mask_len, hs), None, n).view(_BOOL)
    index = mask.nonzero()[0]
    if index.size != nnz:
        raise TensorError(f"{LOSSY_CODEC} bitmask has {index.size} bits set; header says {nnz}")
    codes = np.frombuffer(raw, _UINT8, len(raw) - hs - mask_len, hs + mask_len)
    if bits != 8:
        split = np.unpackbits(codes, None, code_bits).reshape(nnz, bits)
        codes = np.packbits(split, axis=1).reshape(nnz) >> (8 - bits)
    values = codes.astype(_FLOAT32)
    np.add(values, _LEVEL_F32[129], values)  # code c is level c + 1
    operand = _thread.scale
    operand[()] = scale
    out[index] = np.multiply(values, operand, values)


_INT_XOR_MAX: Final = 1 << 18
"""Largest tensor (elements) whose row XOR is undone on the bitmask as one Python int."""


@functools.lru_cache(maxsize=16)
def _row_keeps(n: int, rows: int, width: int) -> tuple[tuple[int, int], ...]:
    """(shift, keep) steps of `_undo_row_xor_int`: shift = width · 2^j bits, and keep has
    the bits of the elements at least 2^j rows into their plane (a prefix over the rows
    must not cross from one plane into the next)."""
    row = (np.arange(n) // width) % rows
    steps = []
    k = 1
    while k < rows:
        steps.append((width * k, int.from_bytes(np.packbits(row >= k).tobytes(), "big")))
        k *= 2
    return tuple(steps)


def _undo_row_xor_int(bits: bytes, n: int, rows: int, width: int) -> bytes:
    """The packed bitmask of `_row_xor`'s inverse: each bit XOR every bit above it in its
    column, a prefix XOR over the rows done in log2(rows) steps on the bitmask as one
    big-endian integer (element 0 its top bit), three times as fast as numpy's
    accumulate on the unpacked bits at batch 1."""
    m = int.from_bytes(bits, "big")
    for shift, keep in _row_keeps(n, rows, width):
        m ^= (m >> shift) & keep
    return m.to_bytes(len(bits), "big")


def _undo_row_xor(bits: bytes, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """The bool mask of the packed bitmask `bits` that `_row_xor` made for `shape`."""
    xored = len(shape) >= 2 and n and shape[-2] >= 2
    if xored and n <= _INT_XOR_MAX:
        bits = _undo_row_xor_int(bits, n, shape[-2], shape[-1])
    mask = np.unpackbits(np.frombuffer(bits, _UINT8), None, n).view(_BOOL)
    if not xored or n <= _INT_XOR_MAX:
        return mask
    rows = mask.reshape(-1, shape[-2], shape[-1])
    # On the bytes of the bools, where numpy's loop is 40% faster.
    return np.bitwise_xor.accumulate(rows.view(_UINT8), axis=1).view(_BOOL).reshape(-1)


def _zdict_levels(
    packed: PackedTensor, dictionaries: ZstdDictionaries | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bool mask, flat positions, int8 levels there) of a sparse_int8_zdict tensor,
    validated (PROTOCOL.md §6.7)."""
    raw = packed.payload
    n = math.prod(packed.shape)
    hs = _ZDICT_HEADER.size
    if len(raw) < hs:
        raise TensorError(f"{DICT_CODEC} payload has {len(raw)} bytes; the header alone needs {hs}")
    table, mask_frame = _ZDICT_HEADER.unpack_from(raw)
    if dictionaries is None:
        raise TensorError(f"{DICT_CODEC} tensor, but this receiver holds no zstd dictionaries")
    mask_z, values_z = dictionaries.decompressors(table)
    if hs + mask_frame > len(raw):
        raise TensorError(
            f"{DICT_CODEC} bitmask frame of {mask_frame} bytes overruns the {len(raw)}-byte payload"
        )
    view = memoryview(raw)
    mask_len = (n + 7) >> 3
    bits = _decompress(view[hs : hs + mask_frame], mask_len, mask_z, mask_len, "bitmask frame")
    if n & 7 and bits[-1] & ((1 << (8 - (n & 7))) - 1):
        raise TensorError(f"{DICT_CODEC} bitmask has bits set past the last element")
    mask = _undo_row_xor(bits, n, packed.shape)
    index = mask.nonzero()[0]
    q = _decompress(view[hs + mask_frame :], index.size, values_z, index.size, "values frame")
    return mask, index, np.frombuffer(q, _INT8)


def as_sparse_int8(
    packed: PackedTensor, dictionaries: ZstdDictionaries | None, compress: bool | None = None
) -> PackedTensor:
    """`packed`, a sparse_int8_zdict tensor, re-coded as sparse_int8 for a peer without the
    dictionaries: the same int8 levels, scale and zero point, so it decodes to the same
    values bit for bit. zstd as `pack` decides it with no bandwidth known. Raises
    `TensorError` if `packed` does not decode."""
    if packed.codec != DICT_CODEC:
        raise ValueError(f"expected a {DICT_CODEC} tensor, got {packed.codec}")
    raw = _sparse_payload(*_zdict_levels(packed, dictionaries))
    return _with_zstd(
        "sparse_int8", raw, compress, None, packed.shape, packed.scale, packed.zero_point
    )


def unpack(
    packed: PackedTensor,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    dictionaries: ZstdDictionaries | None = None,
) -> np.ndarray:
    """Decode `packed` into a float32 array of its shape, validating everything.

    Raises `TensorError` (never another exception) when the payload does not match the
    codec and shape; never allocates more than the declared shape allows, and refuses shapes
    above `max_elements` before allocating anything. `dictionaries` decode `DICT_CODEC`.
    `IMAGE_CODEC` decodes to the pixel values 0..255; the model input is their
    normalisation, which the receiver applies with its model's input spec (§6.8).
    """
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"expected a PackedTensor, got {type(packed).__name__}")
    shape = packed.shape
    n = math.prod(shape)
    if n > max_elements:
        raise TensorError(
            f"tensor of shape {shape} has {n} elements; the limit is {max_elements}",
            ErrorCode.TOO_LARGE,
        )
    codec = packed.codec
    raw = packed.payload
    if codec == DICT_CODEC:
        _, index, q = _zdict_levels(packed, dictionaries)
        out = np.zeros(shape, _FLOAT32)
        out.ravel()[index] = _dequantise(q, packed.scale, packed.zero_point)
        return out
    if packed.compressed:
        raw = _decompress(raw, raw_payload_limit(codec, n))
    if codec == IMAGE_CODEC:
        return _unpack_image(raw, shape, n)
    if codec == "sparse_int8":
        out = np.zeros(shape, _FLOAT32)
        _unpack_sparse(raw, out.ravel(), packed.scale, packed.zero_point)  # a view: C order
        return out
    if codec == LOSSY_CODEC:
        out = np.zeros(shape, _FLOAT32)
        _unpack_uintb(raw, out.ravel(), packed.scale)
        return out
    if codec == "int8":
        _expect_len(codec, raw, n)
        out = _dequantise(np.frombuffer(raw, _INT8, n), packed.scale, packed.zero_point)
    else:
        wire = _F4_LE if codec == "float32" else _F2_LE
        _expect_len(codec, raw, wire.itemsize * n)
        out = np.frombuffer(raw, wire, n).astype(_FLOAT32)
        if n:
            _, lo, hi = _range(out)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise TensorError(f"{codec} payload holds non-finite values (nan or inf)")
    return out.reshape(shape)
