"""Tests of protocol.packing: codecs round-trip, error bounds, hostile payloads."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import ErrorCode, TensorError
from protocol.packing import (
    CODECS,
    LOSSY_CODEC,
    SPARSE_BITMASK,
    SPARSE_INDEX_U16,
    SPARSE_INDEX_U32,
    PackedTensor,
    estimate_zstd_ratio,
    pack,
    quantise,
    should_compress,
    unpack,
)
from tests.support.protocol import assert_within_half_step

F32_EPS = float(np.finfo(np.float32).eps)


def _relu_activation(seed: int, shape: tuple[int, ...] = (1, 16, 12, 12)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal(shape).astype(np.float32), 0.0)


finite_f32 = st.floats(-(2.0**126), 2.0**126, width=32)
arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
    elements=st.one_of(st.just(0.0), finite_f32),
)


@settings(max_examples=150, deadline=None)
@given(arrays, st.sampled_from(["int8", "sparse_int8"]), st.booleans())
def test_quantised_codecs_error_at_most_half_a_step(
    x: np.ndarray, codec: str, compress: bool
) -> None:
    packed = pack(x, codec, compress)
    y = unpack(packed)
    assert y.shape == x.shape and y.dtype == np.float32
    assert_within_half_step(x, y, packed.scale)
    if codec == "sparse_int8":
        assert np.all(y[x == 0] == 0), "zeros stay exactly zero"


@settings(max_examples=100, deadline=None)
@given(arrays, st.booleans())
def test_float32_is_lossless(x: np.ndarray, compress: bool) -> None:
    y = unpack(pack(x, "float32", compress))
    np.testing.assert_array_equal(x, y)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
        elements=st.floats(-60000, 60000, width=32),
    ),
    st.booleans(),
)
def test_float16_relative_error(x: np.ndarray, compress: bool) -> None:
    y = unpack(pack(x, "float16", compress))
    np.testing.assert_allclose(y, x, rtol=2**-11, atol=6e-8)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("compress", [False, True, None])
def test_real_relu_activation_round_trip(codec: str, compress: bool | None) -> None:
    x = _relu_activation(0)
    packed = pack(x, codec, compress, bandwidth_bps=10e6)
    y = unpack(packed)
    assert y.shape == x.shape
    if codec in ("int8", "sparse_int8"):
        assert_within_half_step(x, y, packed.scale)
    else:
        np.testing.assert_allclose(y, x, rtol=1e-3)


def test_sparse_is_smaller_than_dense_int8_on_relu() -> None:
    x = _relu_activation(1)
    sparse = pack(x, "sparse_int8", compress=False)
    assert sparse.nbytes < pack(x, "int8", compress=False).nbytes
    assert sparse.payload[0] == SPARSE_BITMASK


def test_very_sparse_uses_index_list_u16_and_u32() -> None:
    x = np.zeros((1, 4, 32, 32), np.float32)
    x.flat[[3, 77, 4000]] = [1.0, 2.5, 0.25]
    packed = pack(x, "sparse_int8", compress=False)
    assert packed.payload[0] == SPARSE_INDEX_U16
    assert packed.nbytes == 5 + 3 * 2 + 3
    assert_within_half_step(x, unpack(packed), packed.scale)
    big = np.zeros(70000, np.float32)
    big[[0, 69999]] = [1.0, -3.0]
    packed = pack(big, "sparse_int8", compress=False)
    assert packed.payload[0] == SPARSE_INDEX_U32
    assert_within_half_step(big, unpack(packed), packed.scale)


def test_all_zero_and_empty_tensors() -> None:
    for shape in [(0,), (3, 0, 2), (1, 8, 4, 4)]:
        x = np.zeros(shape, np.float32)
        for codec in CODECS:
            y = unpack(pack(x, codec, False))
            assert y.shape == shape
            assert not y.any()


def test_pack_rejects_non_finite_and_bad_input() -> None:
    for codec in CODECS:
        with pytest.raises(ValueError, match="non-finite"):
            pack(np.array([1.0, np.nan], np.float32), codec)
        with pytest.raises(ValueError, match="non-finite"):
            pack(np.array([np.inf], np.float32), codec)
    with pytest.raises(ValueError, match="range"):
        pack(np.array([3e38], np.float32), "int8")
    with pytest.raises(ValueError, match="overflow float16"):
        pack(np.array([1e6], np.float32), "float16")
    with pytest.raises(ValueError, match="unknown codec"):
        pack(np.ones(3), "jpeg")
    with pytest.raises(ValueError, match="dtype"):
        pack(np.array(["a"]), "float32")


def test_quantise_zero_is_exact_and_levels_stay_in_range() -> None:
    q, scale, zp = quantise(np.array([0.0, 1.0, -1.0, 0.5], np.float32))
    assert q[0] == zp
    assert q.min() == -128 and q.max() <= 127, "the minimum maps to exactly -128"
    assert math.isclose(scale, 2.0 / 254, rel_tol=1e-6)
    # Integers over 254 steps: every x / scale is an exact integer or an exact tie.
    ties = np.arange(-127, 128, 0.5, dtype=np.float32)
    q, scale, zp = quantise(ties)
    assert int(q.min()) == -128 and int(q.max()) <= 127
    out = np.empty(ties.size, np.int8)
    assert quantise(ties, out)[0] is out


def test_should_compress_trades_codec_time_for_transfer_time() -> None:
    mib = 2**20
    # 1 MiB halved saves 4 Mbit: 4 s at 1 Mbit/s, far more than ~5 ms of zstd.
    assert should_compress(mib, 1e6)
    # At 100 Gbit/s the transfer takes 42 µs: zstd cannot pay off.
    assert not should_compress(mib, 100e9)
    assert not should_compress(mib, 1e6, ratio=1.0)
    assert should_compress(mib, None)
    assert not should_compress(10, 1e3)
    with pytest.raises(ValueError, match="bandwidth_bps"):
        should_compress(mib, 0.0)


def test_pack_decides_from_bandwidth() -> None:
    x = _relu_activation(2, (1, 32, 16, 16))
    assert pack(x, compress=None, bandwidth_bps=1e6).compressed
    assert not pack(x, compress=None, bandwidth_bps=1e12).compressed


def test_incompressible_payload_is_sent_raw() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(-127, 128, 4096).astype(np.float32)  # uniform int8 levels: no redundancy
    packed = pack(x, "int8", compress=True)
    assert not packed.compressed
    assert estimate_zstd_ratio(packed.payload) < 1.1


# -- hostile payloads --------------------------------------------------------------------


def _tensor(codec: str, shape: tuple[int, ...], payload: bytes, **kw: object) -> PackedTensor:
    fields: dict[str, object] = {"compressed": False, "scale": 1.0, "zero_point": 0}
    fields.update(kw)
    return PackedTensor(codec, shape=shape, payload=payload, **fields)  # type: ignore[arg-type]


def test_shape_payload_mismatch_is_rejected() -> None:
    with pytest.raises(TensorError, match="float32 payload has 8 bytes; the shape needs 12"):
        unpack(_tensor("float32", (3,), bytes(8)))
    with pytest.raises(TensorError, match="int8 payload"):
        unpack(_tensor("int8", (2, 2), bytes(5), scale=0.5))
    with pytest.raises(TensorError, match="float16"):
        unpack(_tensor("float16", (4,), bytes(7)))


def test_absurd_dims_are_refused_before_allocation() -> None:
    with pytest.raises(TensorError, match="limit") as info:
        unpack(_tensor("float32", (2**31 - 1,) * 8, b""))
    assert info.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(TensorError, match="invalid dimension"):
        _tensor("float32", (-1, 3), b"")
    with pytest.raises(TensorError, match="at most 8"):
        _tensor("float32", (1,) * 9, b"")
    with pytest.raises(TensorError, match="limit"):
        unpack(_tensor("float32", (100, 100), bytes(40000)), max_elements=9999)


def test_zstd_bomb_is_refused_from_its_header() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(10 * 2**20))
    with pytest.raises(TensorError, match="declares 10485760 bytes") as info:
        unpack(_tensor("int8", (16,), bomb, compressed=True, scale=0.1))
    assert info.value.code is ErrorCode.TOO_LARGE


def test_bad_zstd_frames_are_rejected() -> None:
    good = zstandard.ZstdCompressor().compress(bytes(16))
    with pytest.raises(TensorError, match="not a zstd frame"):
        unpack(_tensor("int8", (16,), b"garbage!", compressed=True))
    with pytest.raises(TensorError, match="trailing"):
        unpack(_tensor("int8", (16,), good + b"xx", compressed=True))
    with pytest.raises(TensorError):
        unpack(_tensor("int8", (16,), good[:-3], compressed=True))
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(16))
    with pytest.raises(TensorError, match="content size"):
        unpack(_tensor("int8", (16,), unsized, compressed=True))


def test_corrupt_sparse_payloads_are_rejected() -> None:
    x = _relu_activation(4, (1, 2, 5, 5))  # 50 elements: the mask has 6 pad bits
    good = pack(x, "sparse_int8", compress=False)
    raw = bytearray(good.payload)
    layout, nnz = struct.unpack_from("<BI", raw)

    def bad(payload: bytes, match: str) -> None:
        t = _tensor(
            "sparse_int8", good.shape, payload, scale=good.scale, zero_point=good.zero_point
        )
        with pytest.raises(TensorError, match=match):
            unpack(t)

    bad(bytes(raw[:3]), "header")
    bad(bytes([7]) + bytes(raw[1:]), "unknown layout")
    bad(struct.pack("<BI", layout, 51) + bytes(raw[5:]), "51 non-zeros")
    bad(struct.pack("<BI", layout, nnz + 1) + bytes(raw[5:]) + b"\x00", "bits set")
    padded = bytearray(raw)
    padded[5 + 6] |= 0x01  # a bit past element 50
    bad(bytes(padded), "past the last element")
    bad(bytes(raw[:-1]), "payload has")
    bad(
        struct.pack("<BI", SPARSE_INDEX_U16, 2) + struct.pack("<HH", 5, 5) + b"\x01\x02",
        "ascending",
    )
    bad(struct.pack("<BI", SPARSE_INDEX_U16, 1) + struct.pack("<H", 50) + b"\x01", "below 50")


def test_float_payload_with_nan_is_rejected() -> None:
    with pytest.raises(TensorError, match="non-finite"):
        unpack(_tensor("float32", (2,), np.array([1, np.nan], "<f4").tobytes()))


def test_packed_tensor_validates_fields() -> None:
    with pytest.raises(TensorError, match="unknown codec"):
        _tensor("bf16", (1,), b"")
    with pytest.raises(TensorError, match="scale"):
        _tensor("int8", (1,), b"\x00", scale=0.0)
    with pytest.raises(TensorError, match="scale"):
        _tensor("int8", (1,), b"\x00", scale=float("nan"))
    with pytest.raises(TensorError, match="scale"):
        _tensor("int8", (1,), b"\x00", scale=1e300)  # would decode to inf in float32
    with pytest.raises(TensorError, match="zero_point"):
        _tensor("int8", (1,), b"\x00", scale=1.0, zero_point=300)
    with pytest.raises(TensorError, match="scale 1.0"):
        _tensor("float32", (1,), bytes(4), scale=2.0)
    with pytest.raises(TensorError, match="payload must be bytes"):
        _tensor("float32", (1,), "abcd")  # type: ignore[arg-type]
    with pytest.raises(TensorError, match="compressed"):
        _tensor("float32", (1,), bytes(4), compressed=1)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from((*CODECS, LOSSY_CODEC)),
    st.booleans(),
    st.lists(st.integers(0, 6), max_size=3).map(tuple),
    st.binary(max_size=64),
)
def test_random_payloads_never_crash_unpack(
    codec: str, compressed: bool, shape: tuple[int, ...], payload: bytes
) -> None:
    scale = 1.0
    zp = 0 if codec in ("float32", "float16", LOSSY_CODEC) else 3
    t = PackedTensor(codec, compressed, shape, scale, zp, payload)
    try:
        y = unpack(t)
    except TensorError:
        return
    assert y.shape == shape and y.dtype == np.float32


def test_unknown_bandwidth_compresses_without_sampling() -> None:
    x = _relu_activation(5)
    x[:, :, :8, :] = 0  # a dark image region: long zero runs in the bitmask
    assert pack(x, compress=None, bandwidth_bps=None).compressed
    tiny = pack(np.zeros(4, np.float32), "float32", compress=None)
    assert not tiny.compressed, "below the minimum size zstd is never tried"


# sparse_uintb (PROTOCOL.md §6.8): the non-zeros of a non-negative tensor in b bits each.

non_negative = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
    elements=st.one_of(st.just(0.0), st.floats(0.0, 2.0**120, width=32)),
)


@settings(max_examples=200, deadline=None)
@given(non_negative, st.integers(1, 8), st.booleans())
def test_sparse_uintb_error_at_most_half_a_step(x: np.ndarray, bits: int, compress: bool) -> None:
    packed = pack(x, LOSSY_CODEC, compress, bits=bits)
    y = unpack(packed)
    assert y.shape == x.shape and y.dtype == np.float32
    assert packed.zero_point == 0
    assert_within_half_step(x, y, packed.scale)
    assert np.all(y[x == 0] == 0), "zeros stay exactly zero"
    if x.size and x.max() > 0:
        # The step is the range over 2**bits levels (to float32 rounding, or the smallest
        # normal float32 for tiny ranges).
        assert packed.scale <= max(float(x.max()) / 2**bits * (1 + 2 * F32_EPS), 2.0**-126)
    assert len(np.unique(y)) <= 2**bits + 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_sparse_uintb_sizes_on_a_relu_activation(bits: int) -> None:
    x = _relu_activation(11)
    packed = pack(x, LOSSY_CODEC, compress=False, bits=bits)
    nnz = struct.unpack_from("<BI", packed.payload)[1]
    assert packed.payload[0] == bits
    assert packed.nbytes == 5 + (x.size + 7) // 8 + (nnz * bits + 7) // 8
    assert nnz <= np.count_nonzero(x)
    if bits <= 4:
        assert 10 * packed.nbytes <= x.nbytes, "at most 4 bits: 10x below float32"
    assert packed.nbytes <= pack(x, "sparse_int8", compress=False).nbytes
    assert_within_half_step(x, unpack(packed), packed.scale)


def test_sparse_uintb_refuses_what_it_cannot_code() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        pack(np.array([1.0, -0.5], np.float32), LOSSY_CODEC, bits=4)
    with pytest.raises(ValueError, match="non-finite"):
        pack(np.array([1.0, np.inf], np.float32), LOSSY_CODEC, bits=4)
    with pytest.raises(ValueError, match="non-finite"):
        pack(np.array([np.nan, 1.0], np.float32), LOSSY_CODEC, bits=4)
    with pytest.raises(ValueError, match="2\\*\\*120"):
        pack(np.array([2.0**121], np.float32), LOSSY_CODEC, bits=1)
    top = unpack(pack(np.array([2.0**120], np.float32), LOSSY_CODEC, bits=8))
    assert top.item() == 2.0**120
    for bits in (0, 9, 4.0, True):
        with pytest.raises(ValueError, match="1 to 8 bits"):
            pack(np.ones(3, np.float32), LOSSY_CODEC, bits=bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only"):
        pack(np.ones(3, np.float32), "int8", bits=4)
    # Negative zero is zero; all zeros and empty tensors code to nothing.
    y = unpack(pack(np.array([-0.0, 2.0], np.float32), LOSSY_CODEC, bits=2))
    np.testing.assert_array_equal(y, [0.0, 2.0])
    for x in (np.zeros((2, 3), np.float32), np.zeros((0, 4), np.float32)):
        packed = pack(x, LOSSY_CODEC, compress=False, bits=3)
        assert packed.scale == 1.0
        np.testing.assert_array_equal(unpack(packed), x)
    assert pack(np.ones(2, np.float32), LOSSY_CODEC).payload[0] == 8, "8 bits by default"


def test_corrupt_sparse_uintb_payloads_are_rejected() -> None:
    x = _relu_activation(4, (1, 2, 5, 5))  # 50 elements: the mask has 6 pad bits
    good = pack(x, LOSSY_CODEC, compress=False, bits=3)
    raw = bytes(good.payload)
    bits, nnz = struct.unpack_from("<BI", raw)
    assert (nnz * bits) % 8, "the codes end inside a byte: padding bits to corrupt"

    def bad(payload: bytes, match: str, scale: float = good.scale) -> None:
        t = _tensor(LOSSY_CODEC, good.shape, payload, scale=scale, zero_point=0)
        with pytest.raises(TensorError, match=match):
            unpack(t)

    bad(raw[:3], "header")
    bad(bytes([0]) + raw[1:], "0 bits")
    bad(bytes([9]) + raw[1:], "9 bits")
    bad(struct.pack("<BI", 3, 51) + raw[5:], "51 non-zeros")
    bad(raw[:-1], "payload has")
    bad(raw + b"\x00", "payload has")
    padded = bytearray(raw)
    padded[5 + 6] |= 0x01  # a bit past element 50
    bad(bytes(padded), "past the last element")
    padded = bytearray(raw)
    padded[-1] |= 0x01  # a padding bit after the last code
    bad(bytes(padded), "padding bits")
    # One position less in the header, the codes one shorter: the bitmask disagrees.
    short = struct.pack("<BI", 3, nnz - 1) + raw[5 : 5 + 7] + bytes((3 * (nnz - 1) + 7) // 8)
    bad(short, "bits set")
    with pytest.raises(TensorError, match="zero_point 0"):
        _tensor(LOSSY_CODEC, good.shape, raw, scale=good.scale, zero_point=3)
    # At 8 bits the top level is 256·scale: finite up to scale 2**119 only.
    eight = pack(x, LOSSY_CODEC, compress=False, bits=8).payload
    bad(eight, "exceeds 2\\*\\*119", scale=2.0**120)
    assert np.isfinite(unpack(_tensor(LOSSY_CODEC, good.shape, eight, scale=2.0**119))).all()
