"""The worked examples of PROTOCOL.md §11, read from the document, byte for byte.

Each hex block of §11 is parsed out of the text and compared with what the reference
implementation produces for the example's description, so the document and the code
cannot drift apart: a change to either fails here.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from protocol import PROTOCOL_VERSION, Cancel, Connection, Hello, Role, pack, unpack
from protocol.dictionaries import ZstdDictionaries
from protocol.framing import encode_frame
from protocol.messages import encode_message
from protocol.packing import DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, PackedTensor
from spinn.model.zdict_file import dictionaries_path
from spinn.pretrained import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "docs" / "PROTOCOL.md"
_HEX = re.compile(r"[0-9a-f]{2}")


def example_blocks() -> list[bytes]:
    """The bytes of each fenced block of §11, in order: the leading hex pairs of each line
    (what follows them on a line is commentary)."""
    text = SPEC.read_text()
    section = text[text.index("## 11. Worked examples") : text.index("## 12.")]
    blocks = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        data = bytearray()
        for line in block.splitlines():
            for token in line.split():
                if not _HEX.fullmatch(token):
                    break
                data.append(int(token, 16))
        blocks.append(bytes(data))
    return blocks


BLOCKS = example_blocks()


def test_there_are_the_seven_examples() -> None:
    assert len(BLOCKS) == 7 and all(BLOCKS), [len(b) for b in BLOCKS]


def test_cancel_frame() -> None:
    cancel = BLOCKS[0]
    assert cancel[:4] == bytes.fromhex("0000000f")  # "15 body bytes", as the text says
    assert cancel == encode_frame(encode_message(Cancel(5)))


def test_hello_frame() -> None:
    hello = Hello(PROTOCOL_VERSION, "resnet20", "", ("sparse_int8", "int8"))
    assert BLOCKS[1] == Connection(Role.DEVICE).send(hello)


def test_sparse_int8_payload() -> None:
    x = np.array([[0, 1.5, 0, 0.25, 0, 0, 3.0, 0, 0, 0]], np.float32)
    packed = pack(x, "sparse_int8", compress=False)
    assert packed.payload == BLOCKS[2]
    assert packed.scale == float(np.float32(3.0 / 254)) and packed.zero_point == -128
    # The decoded values the example states: 127·s = 1.5, 21·s ≈ 0.248, 254·s = 3.0.
    np.testing.assert_allclose(unpack(packed)[0, [1, 3, 6]], [1.5, 0.248, 3.0], atol=1e-3)


def test_sparse_int8_zdict_payload() -> None:
    x = np.array([[0, 1.5, 3.0, 0], [0, 1.5, 3.0, 0.25], [0, 0, 3.0, 0.25]], np.float32)
    shipped = ZstdDictionaries.from_bytes(dictionaries_path(DEFAULT_CHECKPOINT).read_bytes())
    packed = pack(x, DICT_CODEC, dictionaries=shipped, table=5)
    assert packed.payload == BLOCKS[3]
    # "these bytes decode with any dictionary": every table of the shipped file.
    plain = pack(x, "int8", compress=False)
    for table in range(len(shipped)):
        payload = struct.pack("<H", table) + BLOCKS[3][2:]
        other = PackedTensor(DICT_CODEC, False, (3, 4), packed.scale, -128, payload)
        np.testing.assert_array_equal(unpack(other, dictionaries=shipped), unpack(plain))


def test_uint8_image_payloads() -> None:
    pixels = np.array([[[[10, 12, 14], [11, 13, 5]]]], np.uint8)
    plain, gradient = BLOCKS[4], BLOCKS[5]
    assert pack(pixels, IMAGE_CODEC, compress=False).payload == plain
    for payload in (plain, gradient):
        decoded = unpack(PackedTensor(IMAGE_CODEC, False, pixels.shape, 1.0, 0, payload))
        np.testing.assert_array_equal(decoded, pixels)
    # The gradient as the example works it out, pixel by pixel.
    assert gradient == bytes([1, 10, 12 - 10, 14 - 12, 11 - 10, 13 - 11 - 12 + 10, 246])
    # The model input's bit patterns, as the table states them (6.8's formula in float32).
    x = (pixels.astype(np.float32) / np.float32(255) - np.float32(0.286)) / np.float32(0.353)
    text = SPEC.read_text()
    for row in x[0, 0]:
        assert " ".join(f"{v:08x}" for v in row.view(np.uint32)) in text


def test_sparse_uintb_payload() -> None:
    x = np.array([[[0, 1.0, 0.1], [3.0, 0, 2.5]]], np.float32)
    packed = pack(x, LOSSY_CODEC, compress=False, bits=3)
    assert packed.payload == BLOCKS[6]
    assert packed.scale == 0.375 and packed.zero_point == 0
    # The decoded tensor the example states, exactly: (c + 1)·scale.
    y = unpack(PackedTensor(LOSSY_CODEC, False, (1, 2, 3), 0.375, 0, BLOCKS[6]))
    np.testing.assert_array_equal(y, [[[0, 1.125, 0], [3.0, 0, 2.625]]])
