"""The packed bytes stay those of PROTOCOL.md §6, whatever the packer does to be fast.

A straightforward encoder and decoder, written from the specification with per-element
float32 scalar arithmetic and no cleverness, are compared byte for byte (payload, scale,
zero_point, decoded values) with `protocol.packing`, so that a device and a server of
different versions keep interoperating. Also: pack and unpack from several threads at once.
"""

from __future__ import annotations

import math
import struct
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import TensorError
from protocol.packing import CODECS, PackedTensor, pack, quantise, unpack

F32_TINY = float(np.finfo(np.float32).tiny)


# -- the reference, from PROTOCOL.md §6 ------------------------------------------------------


def ref_quantise(x: list[float]) -> tuple[list[int], float, int]:
    """§6.4, element by element in float32."""
    if not x:
        return [], 1.0, 0
    lo, hi = min(min(x), 0.0), max(max(x), 0.0)
    if hi == lo:
        return [0] * len(x), 1.0, 0
    scale = np.float32(max(float(np.float32((hi - lo) / 254)), F32_TINY))
    if lo == 0.0:
        zero_point = -128
    else:
        zero_point = -128 - int(np.rint(np.float32(lo) / scale))
    q = [int(np.rint(np.float32(v) / scale)) + zero_point for v in x]
    assert all(-128 <= level <= 127 for level in q), "§6.4: no clamp is ever needed"
    return q, float(scale), zero_point


def ref_pack(x: np.ndarray, codec: str) -> tuple[bytes, float, int]:
    """§6.2–6.5: (raw payload, scale, zero_point)."""
    values = [float(v) for v in np.asarray(x, np.float32).reshape(-1)]
    n = len(values)
    if codec == "float32":
        return struct.pack(f"<{n}f", *values), 1.0, 0
    if codec == "float16":
        return struct.pack(f"<{n}e", *values), 1.0, 0
    if codec == "int8":
        q, scale, zero_point = ref_quantise(values)
        return struct.pack(f"<{n}b", *q), scale, zero_point
    nonzero = [i for i, v in enumerate(values) if v != 0.0]
    q, scale, zero_point = ref_quantise([values[i] for i in nonzero])
    mask_len = math.ceil(n / 8)
    width = 2 if n <= 65536 else 4
    if len(nonzero) * width < mask_len:  # the bitmask on a tie
        layout = 1 if width == 2 else 2
        positions = struct.pack(f"<{len(nonzero)}{'H' if width == 2 else 'I'}", *nonzero)
    else:
        layout = 0
        mask = bytearray(mask_len)
        for i in nonzero:
            mask[i // 8] |= 1 << (7 - i % 8)
        positions = bytes(mask)
    header = struct.pack("<BI", layout, len(nonzero))
    return header + positions + struct.pack(f"<{len(q)}b", *q), scale, zero_point


def ref_unpack(payload: bytes, codec: str, n: int, scale: float, zero_point: int) -> np.ndarray:
    """§6.2–6.5 decoding: x̂ = (q − zero_point)·scale in float32, zeros elsewhere."""
    if codec == "float32":
        return np.array(struct.unpack(f"<{n}f", payload), np.float32)
    if codec == "float16":
        return np.array(struct.unpack(f"<{n}e", payload), np.float32)
    s32, zp32 = np.float32(scale), np.float32(zero_point)
    if codec == "int8":
        return np.array([(np.float32(q) - zp32) * s32 for q in payload_levels(payload)])
    layout, nnz = struct.unpack_from("<BI", payload)
    if layout == 0:
        mask_len = math.ceil(n / 8)
        bits = payload[5 : 5 + mask_len]
        positions = [i for i in range(n) if bits[i // 8] >> (7 - i % 8) & 1]
        levels = payload_levels(payload[5 + mask_len :])
    else:
        fmt = "H" if layout == 1 else "I"
        positions = list(struct.unpack_from(f"<{nnz}{fmt}", payload, 5))
        levels = payload_levels(payload[5 + struct.calcsize(fmt) * nnz :])
    out = np.zeros(n, np.float32)
    for i, level in zip(positions, levels, strict=True):
        out[i] = (np.float32(level) - zp32) * s32
    return out


def payload_levels(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data)}b", data))


def assert_matches_reference(x: np.ndarray, codec: str) -> PackedTensor:
    packed = pack(x, codec, compress=False)
    payload, scale, zero_point = ref_pack(x, codec)
    assert packed.payload == payload, f"{codec} payload differs from PROTOCOL.md §6"
    assert packed.scale == scale and type(packed.scale) is float
    assert packed.zero_point == zero_point and type(packed.zero_point) is int
    assert packed.shape == x.shape and not packed.compressed
    decoded = unpack(packed)
    expected = ref_unpack(payload, codec, x.size, scale, zero_point).reshape(x.shape)
    assert decoded.dtype == np.float32
    assert decoded.tobytes() == expected.astype(np.float32).tobytes()
    return packed


# -- fixed arrays ----------------------------------------------------------------------------


def fixed_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    relu = np.maximum(rng.standard_normal((1, 8, 7, 7)), 0).astype(np.float32)
    signed = rng.standard_normal((2, 3, 5)).astype(np.float32) * 40
    signed[:, 1] = 0
    # Exact half steps: x / scale lands on ties, which rint breaks to even.
    ties = (np.arange(-60, 200, dtype=np.float32) * 0.5).reshape(2, 130)
    relu_ties = np.abs(ties)
    relu_ties[:, ::3] = 0
    very_sparse = np.zeros((1, 4, 32, 32), np.float32)
    very_sparse.flat[[3, 77, 800, 4000]] = [1.0, 2.5, 0.25, 7.0]
    huge_sparse = np.zeros(70001, np.float32)
    huge_sparse[[0, 12345, 70000]] = [1.0, -3.0, 0.5]
    signed_zeros = np.abs(rng.standard_normal(37)).astype(np.float32)
    signed_zeros[::4] = -0.0
    tiny = np.array([1e-38, 0.0, 3e-39, 2e-45], np.float32)
    return {
        "relu": relu,
        "signed": signed,
        "ties": ties,
        "relu_ties": relu_ties,
        "very_sparse_u16": very_sparse,
        "sparse_u32": huge_sparse,
        "signed_zeros": signed_zeros,
        "tiny": tiny,
        "all_zero": np.zeros((3, 5), np.float32),
        "one_negative": np.array([[-2.0]], np.float32),
        "empty": np.zeros((2, 0), np.float32),
        "constant": np.full(9, 0.75, np.float32),
    }


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("name", sorted(fixed_arrays()))
def test_fixed_arrays_match_the_reference_byte_for_byte(name: str, codec: str) -> None:
    x = fixed_arrays()[name]
    if codec == "float16" and np.abs(x).max(initial=0) > 65504:
        pytest.skip("out of float16 range")
    assert_matches_reference(x, codec)


def test_layouts_chosen_as_the_specification_says() -> None:
    arrays = fixed_arrays()
    assert pack(arrays["relu"], compress=False).payload[0] == 0
    assert pack(arrays["very_sparse_u16"], compress=False).payload[0] == 1
    assert pack(arrays["sparse_u32"], compress=False).payload[0] == 2
    # 16 elements, 1 non-zero: index list 2 bytes = bitmask 2 bytes, a tie: the bitmask.
    tie = np.zeros(16, np.float32)
    tie[5] = 1.0
    assert pack(tie, compress=False).payload == bytes([0, 1, 0, 0, 0, 0b100, 0, 126])


def test_golden_bytes_of_a_small_activation() -> None:
    # Written out once from the reference above; pins the format against both drifting.
    x = np.array([0.0, 1.5, 0.0, -0.25, 3.0, 0.0, 0.0, 0.75, 2.0], np.float32)
    packed = pack(x, "sparse_int8", compress=False)
    # layout 0, nnz 5, mask 0101 1001 1000 0000, then rint(x / scale) − 108.
    assert packed.payload.hex() == "0005000000598009807ecf30"
    assert packed.scale == float(np.float32(3.25 / 254))
    assert packed.zero_point == -108  # −128 − rint(−0.25 / scale) = −128 + 20
    assert pack(x, "int8", compress=False).payload.hex() == "940994807e9494cf30"


def test_real_relu_activation_of_batch_32_matches_the_reference() -> None:
    rng = np.random.default_rng(7)
    x = np.maximum(rng.standard_normal((32, 16, 14, 14)), 0).astype(np.float32)
    for codec in ("int8", "sparse_int8"):
        assert_matches_reference(x, codec)


finite_f32 = st.floats(-(2.0**126), 2.0**126, width=32)
small_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
    elements=st.one_of(st.just(0.0), st.just(-0.0), finite_f32, st.integers(-300, 300)),
)


@settings(max_examples=150, deadline=None)
@given(small_arrays, st.sampled_from(["int8", "sparse_int8"]))
def test_random_arrays_match_the_reference(x: np.ndarray, codec: str) -> None:
    assert_matches_reference(x, codec)


@settings(max_examples=60, deadline=None)
@given(small_arrays, st.integers(1, 64).map(lambda k: k / 2))
def test_relu_with_ties_matches_the_reference(x: np.ndarray, step: float) -> None:
    # Non-negative multiples of half a step: the fast path for ReLU outputs, on ties.
    relu = (np.abs(np.rint(x / 2**100)) * np.float32(step)).astype(np.float32)
    assert_matches_reference(relu, "sparse_int8")


@pytest.mark.parametrize("codec", CODECS)
def test_every_input_layout_packs_like_its_contiguous_float32_copy(codec: str) -> None:
    # The runtime's C-contiguous float32 arrays take a fast path; everything else is
    # converted first and must give the very same bytes.
    rng = np.random.default_rng(11)
    base = np.maximum(rng.standard_normal((2, 6, 10)), 0).astype(np.float32)
    variants = {
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f4"),
        "float64": base.astype(np.float64),
        "strided": np.repeat(base, 2, axis=2)[:, :, ::2],
        "list": base.tolist(),
    }
    expected = pack(base, codec, compress=False)
    for name, variant in variants.items():
        got = pack(variant, codec, compress=False)  # type: ignore[arg-type]
        assert got == expected, name


def test_pack_refuses_a_dimension_the_protocol_refuses() -> None:
    with pytest.raises(ValueError, match="dimensions above"):
        pack(np.empty((0, 2**31), np.float32), compress=False)
    assert pack(np.empty((0, 2**31 - 1), np.float32), compress=False).shape == (0, 2**31 - 1)


def test_quantise_accepts_any_shape_and_dtype() -> None:
    x = np.array([[0.0, 1.0], [-1.0, 0.5]], np.float64)
    q, scale, zero_point = quantise(x)
    expected, ref_scale, ref_zero_point = ref_quantise([0.0, 1.0, -1.0, 0.5])
    assert q.tolist() == expected and (scale, zero_point) == (ref_scale, ref_zero_point)


# -- threads ---------------------------------------------------------------------------------


def test_pack_and_unpack_are_thread_safe() -> None:
    # The runtime packs and unpacks on executor threads; zstd contexts must not be shared.
    rng = np.random.default_rng(3)
    arrays = [
        np.maximum(rng.standard_normal((1, 16, 14, 14)), 0).astype(np.float32) * (i + 1)
        for i in range(8)
    ]
    expected = [
        (codec, z, pack(a, codec, z)) for a in arrays for codec in CODECS for z in (False, True)
    ]
    decoded = [unpack(p).tobytes() for _, _, p in expected]
    failures: list[str] = []
    barrier = threading.Barrier(4)

    def worker(offset: int) -> None:
        barrier.wait(timeout=10)
        for _ in range(5):
            for k in range(len(expected)):
                i = (k + offset) % len(expected)
                codec, z, ref = expected[i]
                got = pack(arrays[i // (2 * len(CODECS))], codec, z)
                if got != ref or unpack(got).tobytes() != decoded[i]:
                    failures.append(f"{codec} zstd={z} #{i}")

    threads = [threading.Thread(target=worker, args=(o * 5,)) for o in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between almost any two steps
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:5]


def test_hostile_bitmask_counts_are_still_rejected() -> None:
    # The bit count check now reads the scatter index; a one-value payload must not broadcast.
    x = np.zeros(16, np.float32)
    x[[1, 2, 3]] = 1.0
    good = pack(x, compress=False)
    lying = b"\x00\x01\x00\x00\x00" + good.payload[5:7] + b"\x7f"
    with pytest.raises(TensorError, match="3 bits set; header says 1"):
        unpack(PackedTensor("sparse_int8", False, (16,), good.scale, -128, lying))
