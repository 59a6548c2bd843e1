"""uint8_image, the split-0 codec (PROTOCOL.md §6.8): the worked example byte for byte,
lossless round trips, the filter choice on real images, the receiver's bounds, and the
normalisation that makes the server's input the device's bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench._common import stub_description
from protocol import PROTOCOL_VERSION, Connection, Hello, Infer, Role, Welcome
from protocol.errors import ErrorCode, LocalProtocolError, TensorError
from protocol.packing import (
    IMAGE_CODEC,
    IMAGE_FILTER_GRADIENT,
    IMAGE_FILTER_NONE,
    KNOWN_CODECS,
    PackedTensor,
    pack,
    raw_payload_limit,
    should_compress,
    unpack,
)
from spinn.model.progressive import InputSpec
from spinn.offline.data import FASHION_MNIST_DIR, load_fashion_mnist, render_camera_frames
from spinn.runtime.sources import input_pixels

EXAMPLE = np.array([[[[10, 12, 14], [11, 13, 5]]]], np.uint8)
"""PROTOCOL.md §11: the grey 2×3 image of the uint8_image example."""
EXAMPLE_PLAIN = "00 0a 0c 0e 0b 0d 05"
EXAMPLE_GRADIENT = "01 0a 02 02 01 00 f6"
EXAMPLE_INPUT_BITS = "bf32f899 bf2d487c bf27985f bf30208a bf2a706d bf4130e1"
"""The model input of the example under mean 0.286, std 0.353, as float32 bit patterns."""


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _tensor(payload: bytes, shape: tuple[int, ...], compressed: bool = False) -> PackedTensor:
    return PackedTensor(IMAGE_CODEC, compressed, shape, 1.0, 0, payload)


def _ref_gradient(p: np.ndarray) -> np.ndarray:
    """§6.8's formula as written: one pixel at a time, p = 0 outside the image."""
    h, w = p.shape[-2:]
    flat = p.reshape(-1, h, w).astype(int)
    out = np.zeros_like(flat)
    at = lambda b, r, c: flat[b, r, c] if r >= 0 and c >= 0 else 0  # noqa: E731
    for b in range(flat.shape[0]):
        for r in range(h):
            for c in range(w):
                out[b, r, c] = (
                    at(b, r, c) - at(b, r, c - 1) - at(b, r - 1, c) + at(b, r - 1, c - 1)
                ) % 256
    return out.astype(np.uint8).reshape(p.shape)


def test_the_worked_example_normalises_as_the_input_spec_does() -> None:
    # PROTOCOL.md §11 (tests/protocol/test_spec_examples.py reads its bytes): 6.8's
    # formula is InputSpec.preprocess, bit for bit, from the pixels or their decoding.
    assert _ref_gradient(EXAMPLE).tobytes() == _hex(EXAMPLE_GRADIENT)[1:]
    for payload in (EXAMPLE_PLAIN, EXAMPLE_GRADIENT):
        np.testing.assert_array_equal(unpack(_tensor(_hex(payload), EXAMPLE.shape)), EXAMPLE)
    spec = InputSpec(1, 2, 3, (0.286,), (0.353,))
    for pixels in (EXAMPLE, unpack(pack(EXAMPLE, IMAGE_CODEC))):
        x = spec.preprocess(torch.from_numpy(pixels)).numpy()
        assert " ".join(f"{v:08x}" for v in x.view(np.uint32).ravel()) == EXAMPLE_INPUT_BITS
        p = pixels.astype(np.float32)
        formula = (p / np.float32(255) - np.float32(0.286)) / np.float32(0.353)
        np.testing.assert_array_equal(formula.view(np.uint32), x.view(np.uint32))


def test_the_codec_is_known_and_carries_no_quantisation() -> None:
    assert IMAGE_CODEC in KNOWN_CODECS
    assert raw_payload_limit(IMAGE_CODEC, 784) == 785
    with pytest.raises(TensorError, match="scale 1.0 and zero_point 0"):
        PackedTensor(IMAGE_CODEC, False, (1,), 0.5, 0, b"\x00\x01")
    with pytest.raises(TensorError, match="scale 1.0 and zero_point 0"):
        PackedTensor(IMAGE_CODEC, False, (1,), 1.0, 3, b"\x00\x01")


images = hnp.arrays(
    np.uint8,
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
    elements=st.integers(0, 255),
)


@settings(max_examples=150, deadline=None)
@given(images, st.sampled_from([False, True, None]), st.sampled_from([None, 1e5, 1e9]))
def test_pixels_round_trip_exactly(x: np.ndarray, compress: bool | None, bps: float | None) -> None:
    packed = pack(x, IMAGE_CODEC, compress, bps)
    assert packed.codec == IMAGE_CODEC and packed.shape == x.shape
    assert (packed.scale, packed.zero_point) == (1.0, 0)
    y = unpack(packed)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    raw = (
        zstandard.ZstdDecompressor().decompress(packed.payload)
        if packed.compressed
        else packed.payload
    )
    assert len(raw) == 1 + x.size
    if raw[0] == IMAGE_FILTER_GRADIENT:
        assert raw[1:] == _ref_gradient(x).tobytes()
    else:
        assert raw[0] == IMAGE_FILTER_NONE and raw[1:] == x.tobytes()
    if compress is False:
        assert not packed.compressed and raw[0] == IMAGE_FILTER_NONE


def test_pack_takes_only_uint8_pixels() -> None:
    for bad in (np.zeros((1, 1, 2, 2), np.float32), np.zeros(3, np.int16), np.zeros(2, bool)):
        with pytest.raises(ValueError, match="uint8 pixels"):
            pack(bad, IMAGE_CODEC)
    strided = np.arange(48, dtype=np.uint8).reshape(1, 3, 4, 4)[..., ::2]
    np.testing.assert_array_equal(unpack(pack(strided, IMAGE_CODEC)), strided)


def test_bad_payloads_are_refused() -> None:
    with pytest.raises(TensorError, match="uint8_image payload has 6 bytes; the shape needs 7"):
        unpack(_tensor(_hex(EXAMPLE_PLAIN)[:-1], EXAMPLE.shape))
    with pytest.raises(TensorError, match="needs 7"):
        unpack(_tensor(_hex(EXAMPLE_PLAIN) + b"\x00", EXAMPLE.shape))
    with pytest.raises(TensorError, match="unknown filter byte 2"):
        unpack(_tensor(b"\x02" + _hex(EXAMPLE_PLAIN)[1:], EXAMPLE.shape))
    with pytest.raises(TensorError, match="at least 2 dimensions"):
        unpack(_tensor(b"\x01\x05\x06", (2,)))
    # A zstd frame declaring more than 1 + N bytes is refused from its header.
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    with pytest.raises(TensorError, match="at most 785") as info:
        unpack(_tensor(bomb, (1, 1, 28, 28), compressed=True))
    assert info.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(TensorError, match="limit") as info:
        unpack(_tensor(b"", (1, 3, 4096, 4096)), max_elements=1 << 24)
    assert info.value.code is ErrorCode.TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(st.integers(0, 6), max_size=4).map(tuple), st.binary(max_size=64))
def test_random_payloads_never_crash_unpack(
    compressed: bool, shape: tuple[int, ...], payload: bytes
) -> None:
    try:
        y = unpack(_tensor(payload, shape, compressed))
    except TensorError:
        return
    assert y.shape == shape and y.dtype == np.float32
    assert y.size == 0 or (y.min() >= 0 and y.max() <= 255 and np.array_equal(y, np.rint(y)))


def _camera_frames(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(28×28 grey inputs, 3×96×96 RGB inputs) of the first Fashion-MNIST test images,
    the latter made as a device makes a 96×96 RGB model's input from a grey frame."""
    test = load_fashion_mnist("test")
    grey = test.images[:count].numpy()
    spec = InputSpec(3, 96, 96, (0.5,) * 3, (0.25,) * 3)
    rgb = np.stack([input_pixels(g[0], spec) for g in grey])
    return grey, rgb


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_frames_take_fewer_bytes_than_float_input_and_raw_pixels() -> None:
    grey, rgb = _camera_frames(20)
    for frames, filters in (
        (grey, {IMAGE_FILTER_NONE, IMAGE_FILTER_GRADIENT}),
        (rgb, {IMAGE_FILTER_GRADIENT}),
    ):
        sizes, used = [], set()
        for f in frames:
            packed = pack(f[None], IMAGE_CODEC, compress=True)
            assert packed.compressed
            used.add(zstandard.ZstdDecompressor().decompress(packed.payload)[0])
            np.testing.assert_array_equal(unpack(packed), f[None])
            sizes.append(packed.nbytes)
        median = float(np.median(sizes))
        assert median < 0.75 * f.size  # below the raw pixels, let alone 4 bytes of float32
        assert used <= filters
    # On the smooth enlarged frames the gradient filter always wins (PROTOCOL.md §6.8).
    plain = np.median([len(zstandard.ZstdCompressor(level=1).compress(f.tobytes())) for f in rgb])
    assert np.median([pack(f[None], IMAGE_CODEC, True).nbytes for f in rgb]) < 0.8 * plain


def _handshake(device_codecs: tuple[str, ...], server_codecs: tuple[str, ...]) -> Connection:
    device = Connection(Role.DEVICE)
    server = Connection(Role.SERVER)
    server.receive_data(device.send(Hello(PROTOCOL_VERSION, "m", "", device_codecs)))
    server.next_event()
    welcome = Welcome(
        PROTOCOL_VERSION, "m", "", server_codecs, True, description=stub_description()
    )
    device.receive_data(server.send(welcome))
    device.next_event()
    return device


def test_negotiated_like_any_codec() -> None:
    pixels = pack(EXAMPLE, IMAGE_CODEC, compress=False)
    device = _handshake(("sparse_int8", IMAGE_CODEC), ("sparse_int8", IMAGE_CODEC))
    assert device.codecs == ("sparse_int8", IMAGE_CODEC)
    device.send(Infer(1, 0, 0.5, pixels))
    # A server that does not know the codec leaves it out: the device may not send it.
    device = _handshake(("sparse_int8", IMAGE_CODEC), ("sparse_int8",))
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        device.send(Infer(1, 0, 0.5, pixels))
    device.send(Infer(1, 0, 0.5, pack(EXAMPLE.astype(np.float32), "sparse_int8")))


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_the_zstd_decision_uses_the_better_filtering() -> None:
    # Camera frames with sensor noise: the plain pixels compress ~1.1x, too little to pay
    # at 200 Mbit/s (PROTOCOL.md §6.6); the gradient-filtered ones ~1.7x, which pays.
    test = load_fashion_mnist("test").head(4)
    frames = render_camera_frames(test.images, np.arange(4)).numpy()
    for f in frames:
        plain = len(zstandard.ZstdCompressor(level=1).compress(b"\0" + f.tobytes()))
        assert not should_compress(f.size + 1, 2e8, ratio=(f.size + 1) / plain)
        packed = pack(f[None], IMAGE_CODEC, None, 2e8)
        assert packed.compressed and packed.nbytes < 0.7 * f.size
        assert zstandard.ZstdDecompressor().decompress(packed.payload)[0] == IMAGE_FILTER_GRADIENT
        # A link so fast that even removing every byte would not pay: the pixels as they are.
        assert not pack(f[None], IMAGE_CODEC, None, 1e11).compressed
