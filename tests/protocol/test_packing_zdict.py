"""Tests of sparse_int8_zdict: protocol.packing with protocol.dictionaries (PROTOCOL.md §6.7).

The codec must decode to exactly what `int8` decodes (same levels, fewer bytes), refuse
every malformed payload with `TensorError` naming the problem, and be negotiated only
between peers holding the same dictionary file (§5.2). Real activations come from the
shipped default model and its dictionaries (models/default/model.zdict); the randomised
tests use a small set trained once per module on the same model's training activations.
A decoder written from a plain reading of §6.7 pins the bytes to the document.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench._common import stub_description
from protocol import (
    PROTOCOL_VERSION,
    ConnectionState,
    ErrorCode,
    Hello,
    Infer,
    LocalProtocolError,
    RemoteProtocolError,
    Welcome,
)
from protocol.dictionaries import FORMAT, DictionaryError, ZstdDictionaries
from protocol.errors import TensorError
from protocol.framing import encode_frame
from protocol.messages import MessageType, decode_message, encode_message
from protocol.packing import DICT_CODEC, PackedTensor, as_sparse_int8, pack, unpack
from spinn.model.checkpoint import load_checkpoint
from spinn.model.progressive import ProgressiveModel
from spinn.model.zdict_file import dictionaries_path
from spinn.offline.data import load_fashion_mnist
from spinn.offline.zdict_training import train_tables
from spinn.pretrained import DEFAULT_CHECKPOINT
from tests.support.protocol import SHA, ConnectionPair, assert_within_half_step

DEFAULT_MODEL = DEFAULT_CHECKPOINT
TEST_IMAGES = 32
TRAIN_IMAGES = 64
TRAINED_SPLITS = (1, 5, 8)
"""Splits of the default model the module's own small set has tables for, in order."""
Activations = dict[int, list[np.ndarray]]

# The tensor of PROTOCOL.md §11: a mask of rows 0110, 0111, 0011 (N = 12, 7 positions).
EXAMPLE = np.array([[0, 1.5, 3.0, 0], [0, 1.5, 3.0, 0.25], [0, 0, 3.0, 0.25]], np.float32)
EXAMPLE_MASK = bytes.fromhex("6140")  # the rows XOR the row above: 0110, 0001, 0100
EXAMPLE_VALUES = bytes.fromhex("ff7eff7e957e95")
EXAMPLE_PAYLOAD = "050007000000200211000061402007390000ff7eff7e957e95"


def _activations(model: ProgressiveModel, images: torch.Tensor) -> Activations:
    """Each split's input for every image, batch 1, as the device sends them."""
    per_split: Activations = {}
    with torch.no_grad():
        x = model.input_spec.preprocess(images)
        for k in range(model.num_stages):
            act = x.numpy()
            per_split[k] = [np.ascontiguousarray(act[i : i + 1]) for i in range(len(act))]
            if k + 1 < model.num_stages:
                x = model.run_trunk(k, x)
    return per_split


@pytest.fixture(scope="module")
def model() -> ProgressiveModel:
    loaded, _ = load_checkpoint(DEFAULT_MODEL)
    return loaded.eval()


@pytest.fixture(scope="module")
def shipped() -> ZstdDictionaries:
    """The default model's dictionary file, as device and server load it."""
    return ZstdDictionaries.from_bytes(dictionaries_path(DEFAULT_MODEL).read_bytes())


@pytest.fixture(scope="module")
def activations(model: ProgressiveModel) -> Activations:
    return _activations(model, load_fashion_mnist("test").head(TEST_IMAGES).images)


@pytest.fixture(scope="module")
def training_samples(model: ProgressiveModel) -> list[list[np.ndarray]]:
    per_split = _activations(model, load_fashion_mnist("train").head(TRAIN_IMAGES).images)
    return [per_split[k] for k in TRAINED_SPLITS]


@pytest.fixture(scope="module")
def trained(training_samples: list[list[np.ndarray]]) -> ZstdDictionaries:
    """A small set (1 KiB dictionaries) trained once on real ReLU activations."""
    return train_tables(training_samples, "test", mask_size=1024, values_size=1024)


def _int8(x: np.ndarray) -> PackedTensor:
    """The int8 codec's raw levels: what sparse_int8_zdict must decode to (§6.7.1)."""
    return pack(x, "int8", compress=False)


# -- a decoder from a plain reading of PROTOCOL.md §6.7 ---------------------------------------


def ref_decode(packed: PackedTensor, dictionaries: ZstdDictionaries) -> tuple[list[int], bytes]:
    """(the mask m, element by element, and the values content) of a valid payload."""
    payload = packed.payload
    table, f = struct.unpack_from("<HI", payload)
    contents = []
    for frame, data in zip(
        (payload[6 : 6 + f], payload[6 + f :]), dictionaries.tables[table], strict=True
    ):
        assert zstandard.get_frame_parameters(frame, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        dctx = zstandard.ZstdDecompressor(
            dict_data=zstandard.ZstdCompressionDict(data),
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
        )
        contents.append(dctx.decompress(frame))
    bitmask, values = contents
    shape, n = packed.shape, math.prod(packed.shape)
    assert len(bitmask) == (n + 7) // 8
    t = [(bitmask[i // 8] >> (7 - i % 8)) & 1 for i in range(8 * len(bitmask))]
    assert not any(t[n:]), "padding bits are 0"
    m = t[:n]
    if len(shape) >= 2 and shape[-2] >= 2:
        width, height = shape[-1], shape[-2]
        for i in range(n):  # ascending: the row above is decoded already
            if (i // width) % height >= 1:
                m[i] = t[i] ^ m[i - width]
    assert len(values) == sum(m)
    return m, values


# -- round trips -------------------------------------------------------------------------------


def test_real_activations_decode_exactly_as_int8_at_every_split(
    shipped: ZstdDictionaries, activations: Activations
) -> None:
    assert len(shipped) == len(activations) == 11
    for split, arrays in activations.items():
        for a in arrays[:8]:
            packed = pack(a, DICT_CODEC, dictionaries=shipped, table=split)
            assert packed.codec == DICT_CODEC and not packed.compressed
            assert struct.unpack_from("<H", packed.payload) == (split,)
            plain = _int8(a)
            assert (packed.scale, packed.zero_point) == (plain.scale, plain.zero_point)
            y = unpack(packed, dictionaries=shipped)
            np.testing.assert_array_equal(y, unpack(plain))
            assert_within_half_step(a, y, packed.scale)


def test_the_wire_is_that_of_the_document(
    shipped: ZstdDictionaries, activations: Activations
) -> None:
    for split in (1, 5, 8, 10):
        a = activations[split][0]
        packed = pack(a, DICT_CODEC, dictionaries=shipped, table=split)
        m, values = ref_decode(packed, shipped)
        q = np.frombuffer(_int8(a).payload, np.int8)
        assert m == (q != packed.zero_point).astype(int).tolist()
        assert values == q[q != packed.zero_point].tobytes()


def test_the_worked_example_decodes_with_any_table(shipped: ZstdDictionaries) -> None:
    # PROTOCOL.md §11: contents this small are raw blocks, whatever the dictionary.
    assert pack(EXAMPLE, DICT_CODEC, dictionaries=shipped, table=5).payload.hex() == (
        EXAMPLE_PAYLOAD
    )
    plain = _int8(EXAMPLE)
    for table in range(len(shipped)):
        payload = struct.pack("<H", table) + bytes.fromhex(EXAMPLE_PAYLOAD)[2:]
        packed = PackedTensor(DICT_CODEC, False, (3, 4), plain.scale, -128, payload)
        np.testing.assert_array_equal(unpack(packed, dictionaries=shipped), unpack(plain))
        assert ref_decode(packed, shipped)[1] == EXAMPLE_VALUES


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)
finite_f32 = st.floats(-(2.0**126), 2.0**126, width=32)
arrays = st.one_of(
    hnp.arrays(np.float32, shapes, elements=st.one_of(st.just(0.0), finite_f32)),
    hnp.arrays(np.float32, shapes, elements=st.one_of(st.just(0.0), st.floats(0, 8, width=32))),
    st.builds(lambda s, v: np.full(s, v, np.float32), shapes, st.one_of(st.just(0.0), finite_f32)),
)


@settings(max_examples=150, deadline=None)
@given(arrays, st.integers(0, len(TRAINED_SPLITS) - 1))
def test_random_tensors_decode_exactly_as_int8(
    trained: ZstdDictionaries, x: np.ndarray, table: int
) -> None:
    packed = pack(x, DICT_CODEC, dictionaries=trained, table=table)
    y = unpack(packed, dictionaries=trained)
    plain = _int8(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert (packed.scale, packed.zero_point) == (plain.scale, plain.zero_point)
    np.testing.assert_array_equal(y, unpack(plain))
    assert_within_half_step(x, y, packed.scale)
    m, values = ref_decode(packed, trained)
    q = np.frombuffer(plain.payload, np.int8)
    assert m == (q != plain.zero_point).astype(int).tolist()
    assert values == q[q != plain.zero_point].tobytes()


def test_a_tensor_too_large_for_the_integer_row_xor_decodes_the_same(
    trained: ZstdDictionaries,
) -> None:
    from protocol.packing import _INT_XOR_MAX

    rng = np.random.default_rng(3)
    # Above the size whose row XOR is undone as one integer: numpy's accumulate does it.
    x = np.maximum(rng.standard_normal((1, 10, 180, 160)), 0).astype(np.float32)
    assert _INT_XOR_MAX < x.size
    packed = pack(x, DICT_CODEC, True, dictionaries=trained, table=2)
    np.testing.assert_array_equal(unpack(packed, dictionaries=trained), unpack(_int8(x)))
    small = x[:, :, :20]
    packed = pack(small, DICT_CODEC, True, dictionaries=trained, table=2)
    np.testing.assert_array_equal(unpack(packed, dictionaries=trained), unpack(_int8(small)))


@settings(max_examples=150, deadline=None)
@given(arrays, st.sampled_from([False, True]))
def test_recoded_as_sparse_int8_it_decodes_to_the_same_bits(
    trained: ZstdDictionaries, x: np.ndarray, compress: bool
) -> None:
    packed = pack(x, DICT_CODEC, True, dictionaries=trained, table=1)
    plain = as_sparse_int8(packed, trained, compress)
    assert plain.codec == "sparse_int8" and not (plain.compressed and not compress)
    assert (plain.scale, plain.zero_point) == (packed.scale, packed.zero_point)
    # Bit for bit: re-quantising the decoded values instead differs by rounding now and then.
    want = unpack(packed, dictionaries=trained)
    np.testing.assert_array_equal(unpack(plain).view(np.uint32), want.view(np.uint32))
    assert plain.nbytes <= pack(x, "sparse_int8", compress).nbytes + 8


def test_recoding_refuses_other_codecs_and_broken_payloads(trained: ZstdDictionaries) -> None:
    with pytest.raises(ValueError, match="expected a sparse_int8_zdict tensor"):
        as_sparse_int8(pack(EXAMPLE, "sparse_int8"), trained)
    packed = pack(EXAMPLE, DICT_CODEC, True, dictionaries=trained, table=0)
    with pytest.raises(TensorError, match="holds no zstd dictionaries"):
        as_sparse_int8(packed, None)
    broken = PackedTensor(DICT_CODEC, False, (3, 4), packed.scale, packed.zero_point, b"\0" * 5)
    with pytest.raises(TensorError, match="the header alone needs 6"):
        as_sparse_int8(broken, trained)


def test_beats_sparse_int8_with_zstd_where_half_is_zeros(
    shipped: ZstdDictionaries, activations: Activations
) -> None:
    float32 = zdict = sparse = 0
    sparse_splits = [
        k for k, arrays in activations.items() if np.mean([(a == 0).mean() for a in arrays]) >= 0.5
    ]
    assert sparse_splits, "the default model has splits with at least half zeros (5, 8)"
    for split in sparse_splits:
        for a in activations[split]:
            float32 += a.nbytes
            zdict += pack(a, DICT_CODEC, True, dictionaries=shipped, table=split).nbytes
            sparse += pack(a, "sparse_int8", True).nbytes
    assert float32 / zdict > 1.05 * float32 / sparse, (float32 / zdict, float32 / sparse)


# -- when the codec is used ---------------------------------------------------------------------


def test_packing_needs_the_dictionaries_and_a_table_they_have(
    shipped: ZstdDictionaries,
) -> None:
    with pytest.raises(ValueError, match="needs the model's zstd dictionaries"):
        pack(EXAMPLE, DICT_CODEC)
    with pytest.raises(TensorError, match="names table 11"):
        pack(EXAMPLE, DICT_CODEC, dictionaries=shipped, table=11)


def test_without_zstd_or_on_a_fast_link_it_falls_back_to_raw_sparse_int8(
    shipped: ZstdDictionaries, activations: Activations
) -> None:
    a = activations[5][0]
    raw = pack(a, "sparse_int8", compress=False)
    for packed in (
        pack(a, DICT_CODEC, compress=False, dictionaries=shipped, table=5),
        pack(a, DICT_CODEC, bandwidth_bps=1e12, dictionaries=shipped, table=5),
    ):
        assert packed == raw and not packed.compressed
    slow = pack(a, DICT_CODEC, bandwidth_bps=1e6, dictionaries=shipped, table=5)
    assert slow.codec == DICT_CODEC and slow.nbytes < raw.nbytes


def test_compressed_is_refused_for_the_codec() -> None:
    with pytest.raises(TensorError, match="compressed must be false"):
        PackedTensor(DICT_CODEC, True, (3, 4), 0.5, -128, b"")
    tensor = {
        "codec": DICT_CODEC,
        "compressed": True,
        "shape": (3, 4),
        "scale": 0.5,
        "zero_point": -128,
        "payload": b"",
    }
    fields = {"request_id": 1, "split": 5, "thr_conf": 0.5, "tensor": tensor}
    with pytest.raises(RemoteProtocolError, match="compressed must be false") as info:
        decode_message([int(MessageType.INFER), fields])
    assert info.value.code is ErrorCode.BAD_TENSOR


# -- hostile payloads ---------------------------------------------------------------------------


def _frames(d: ZstdDictionaries, mask: bytes, values: bytes) -> tuple[bytes, bytes]:
    mask_z, values_z = d.compressors(0)
    return mask_z.compress(mask), values_z.compress(values)


def _example(payload: bytes) -> PackedTensor:
    return PackedTensor(DICT_CODEC, False, (3, 4), _int8(EXAMPLE).scale, -128, payload)


def _payload(mask_frame: bytes, values_frame: bytes, table: int = 0, f: int | None = None) -> bytes:
    header = struct.pack("<HI", table, len(mask_frame) if f is None else f)
    return header + mask_frame + values_frame


def _raw_frame(content: bytes, block_type: int = 0, with_size: bool = True) -> bytes:
    """A magicless frame of one last block, by hand (RFC 8878 §3.1.1)."""
    # Frame_Header_Descriptor 0x20: single segment, a 1-byte Frame_Content_Size; 0x00: no
    # size, a Window_Descriptor instead.
    header = bytes([0x20, len(content)]) if with_size else b"\x00\x00"
    block = (len(content) << 3) | (block_type << 1) | 1
    return header + block.to_bytes(3, "little") + content


def _good(d: ZstdDictionaries) -> tuple[bytes, bytes]:
    return _frames(d, EXAMPLE_MASK, EXAMPLE_VALUES)


MALFORMED: list[tuple[str, Callable[[ZstdDictionaries], bytes], str]] = [
    ("short header", lambda d: b"\x00\x00\x07\x00\x00", "the header alone needs 6"),
    ("unknown table", lambda d: _payload(*_good(d), table=len(d)), "names table 3"),
    (
        "frame length overruns",
        lambda d: _payload(*_good(d), f=sum(map(len, _good(d))) + 1),
        r"bitmask frame of \d+ bytes overruns the \d+-byte payload",
    ),
    (
        "truncated bitmask frame",
        lambda d: _payload(_good(d)[0][:-1], _good(d)[1]),
        "bitmask frame is truncated",
    ),
    (
        "trailing bytes in the bitmask frame",
        lambda d: _payload(_good(d)[0] + b"\x00", _good(d)[1]),
        r"bitmask frame .*trailing bytes .*1 bytes left over",
    ),
    (
        "truncated values frame",
        lambda d: _payload(_good(d)[0], _good(d)[1][:-1]),
        "values frame is truncated",
    ),
    (
        "trailing bytes in the values frame",
        lambda d: _payload(_good(d)[0], _good(d)[1] + b"\x00"),
        r"values frame .*trailing bytes .*1 bytes left over",
    ),
    (
        "bitmask content size",
        lambda d: _payload(*_frames(d, EXAMPLE_MASK + b"\x00", EXAMPLE_VALUES)),
        "bitmask frame declares 3 bytes; the tensor needs exactly 2",
    ),
    (
        "values content size above the popcount",
        lambda d: _payload(*_frames(d, EXAMPLE_MASK, EXAMPLE_VALUES + b"\x01")),
        "values frame declares 8 bytes; the tensor needs exactly 7",
    ),
    (
        "values content size below the popcount",
        lambda d: _payload(*_frames(d, EXAMPLE_MASK, EXAMPLE_VALUES[:-1])),
        "values frame declares 6 bytes; the tensor needs exactly 7",
    ),
    (
        "bitmask frame without a content size",
        lambda d: _payload(_raw_frame(EXAMPLE_MASK, with_size=False), _good(d)[1]),
        "bitmask frame does not declare its content size",
    ),
    (
        "values frame without a content size",
        lambda d: _payload(_good(d)[0], _raw_frame(EXAMPLE_VALUES, with_size=False)),
        "values frame does not declare its content size",
    ),
    (
        "empty bitmask frame",
        lambda d: _payload(b"", _good(d)[1]),
        "bitmask frame is not a zstd frame",
    ),
    (
        "corrupt bitmask frame",
        lambda d: _payload(_raw_frame(EXAMPLE_MASK, block_type=3), _good(d)[1]),
        "corrupt bitmask frame",
    ),
    (
        "corrupt values frame",
        lambda d: _payload(_good(d)[0], _raw_frame(EXAMPLE_VALUES, block_type=3)),
        "corrupt values frame",
    ),
    (
        "padding bits set",
        lambda d: _payload(*_frames(d, EXAMPLE_MASK[:1] + b"\x41", EXAMPLE_VALUES)),
        "bitmask has bits set past the last element",
    ),
]


def test_the_hand_made_frames_are_valid(trained: ZstdDictionaries) -> None:
    # The hostile cases below change one thing each: unchanged, their parts decode.
    for payload in (
        _payload(*_good(trained)),
        _payload(_raw_frame(EXAMPLE_MASK), _good(trained)[1]),
    ):
        np.testing.assert_array_equal(
            unpack(_example(payload), dictionaries=trained), unpack(_int8(EXAMPLE))
        )


@pytest.mark.parametrize(
    ("build", "match"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_payloads_name_the_problem(
    trained: ZstdDictionaries, build: Callable[[ZstdDictionaries], bytes], match: str
) -> None:
    with pytest.raises(TensorError, match=match) as info:
        unpack(_example(build(trained)), dictionaries=trained)
    assert info.value.code is ErrorCode.BAD_TENSOR


def test_a_receiver_without_dictionaries_refuses_the_codec(trained: ZstdDictionaries) -> None:
    packed = pack(EXAMPLE, DICT_CODEC, dictionaries=trained)
    with pytest.raises(TensorError, match="holds no zstd dictionaries") as info:
        unpack(packed)
    assert info.value.code is ErrorCode.BAD_TENSOR


@st.composite
def hostile(draw: st.DrawFn, valid: bytes) -> bytes:
    """Random bytes, a random header before random frames, or edits of a valid payload."""
    kind = draw(st.sampled_from(["random", "header", "edit"]))
    if kind == "random":
        return draw(st.binary(max_size=120))
    if kind == "header":
        head = struct.pack("<HI", draw(st.integers(0, 3)), draw(st.integers(0, 64)))
        return head + draw(st.binary(max_size=120))
    payload = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(payload)))
        edit = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        if edit == "set" and at < len(payload):
            payload[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            payload[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif edit == "delete":
            del payload[at : at + draw(st.integers(1, 4))]
        else:
            del payload[at:]
    return bytes(payload)


HOSTILE_SHAPES = [(), (0,), (7,), (3, 4), (1, 4, 6, 6), (2, 1, 5)]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hostile_payloads_only_raise_tensor_error(
    trained: ZstdDictionaries, data: st.DataObject
) -> None:
    shape = data.draw(st.sampled_from(HOSTILE_SHAPES))
    x = np.maximum(np.random.default_rng(len(shape)).standard_normal(shape), 0).astype(np.float32)
    valid = pack(x, DICT_CODEC, dictionaries=trained, table=data.draw(st.integers(0, 2)))
    payload = data.draw(hostile(valid.payload))
    packed = PackedTensor(DICT_CODEC, False, shape, valid.scale, valid.zero_point, payload)
    try:
        y = unpack(packed, dictionaries=trained)
    except TensorError:
        return
    assert y.shape == shape and y.dtype == np.float32 and bool(np.isfinite(y).all())


# -- the dictionary file ------------------------------------------------------------------------


def test_the_file_round_trips_and_its_sha256_is_that_of_its_bytes(
    shipped: ZstdDictionaries, trained: ZstdDictionaries, model: ProgressiveModel
) -> None:
    data = dictionaries_path(DEFAULT_MODEL).read_bytes()
    assert shipped.to_bytes() == data
    assert shipped.sha256 == hashlib.sha256(data).hexdigest()
    assert len(shipped) == model.num_stages
    again = ZstdDictionaries.from_bytes(trained.to_bytes())
    assert (again.sha256, again.tables, again.model_id) == (
        trained.sha256,
        trained.tables,
        trained.model_id,
    )
    assert again.to_bytes() == trained.to_bytes()
    # The canonical encoding of PROTOCOL.md §6.7.3, spelled out.
    assert data.startswith(b"\x83\xa6format\xad" + FORMAT.encode() + b"\xa8model_id"), (
        "keys in the order format, model_id, tables"
    )


def test_training_twice_on_the_same_samples_gives_the_same_file(
    trained: ZstdDictionaries, training_samples: list[list[np.ndarray]]
) -> None:
    again = train_tables(training_samples, "test", mask_size=1024, values_size=1024)
    assert again.to_bytes() == trained.to_bytes() and again.sha256 == trained.sha256
    with pytest.raises(DictionaryError, match="table 0: cannot train the bitmask dictionary"):
        train_tables([[np.zeros((1, 4), np.float32)]])


GOOD_TABLE = [b"b" * 16, b"v" * 16]


def _file(**fields: object) -> bytes:
    body: dict[str, object] = {"format": FORMAT, "model_id": "m", "tables": [GOOD_TABLE]}
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


BAD_FILES = [
    ("garbage", b"\xc1not msgpack", "not a msgpack dictionary file"),
    ("trailing bytes", _file() + b"\x00", "not a msgpack dictionary file"),
    ("not a map", msgpack.packb([FORMAT]), "format is 'tuple'"),
    ("wrong format", _file(format="spinn-zdict/2"), "format is 'spinn-zdict/2'"),
    ("tables not a list", _file(tables={"0": GOOD_TABLE}), "'tables' must be a list"),
    ("tables a bin", _file(tables=b"tables"), "'tables' must be a list"),
    ("no tables", _file(tables=[]), "holds 1..65536 tables, got 0"),
    (
        "one dictionary",
        _file(tables=[[b"b" * 16]]),
        r"table 0: expected a \(bitmask, values\) pair",
    ),
    ("three dictionaries", _file(tables=[GOOD_TABLE + [b"x" * 16]]), "expected a"),
    ("a pair of str", _file(tables=[["b" * 16, "v" * 16]]), "bitmask dictionary must be 8"),
    ("too-short dictionary", _file(tables=[[b"b" * 16, b"v" * 7]]), "values dictionary must be 8"),
    (
        "malformed zstd dictionary",
        _file(tables=[[b"\x37\xa4\x30\xec" + b"\x00" * 60, b"v" * 16]]),
        "bad bitmask dictionary",
    ),
    ("model_id not a str", _file(model_id=7), "model_id must be a str"),
    ("an extra key", _file(comment="hello"), "not in canonical form"),
    (
        "keys in another order",
        msgpack.packb({"model_id": "m", "format": FORMAT, "tables": [GOOD_TABLE]}),
        "not in canonical form",
    ),
    ("no model_id", msgpack.packb({"format": FORMAT, "tables": [GOOD_TABLE]}), "canonical"),
]


@pytest.mark.parametrize(
    ("data", "match"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_unusable_files_raise_dictionary_error(data: bytes, match: str) -> None:
    with pytest.raises(DictionaryError, match=match):
        ZstdDictionaries.from_bytes(data, "model.zdict")


def test_a_raw_content_file_is_usable() -> None:
    # Dictionaries not in zstd's format are raw content (PROTOCOL.md §6.7.3).
    d = ZstdDictionaries.from_bytes(_file())
    assert d.sha256 == hashlib.sha256(_file()).hexdigest()
    packed = pack(EXAMPLE, DICT_CODEC, dictionaries=d)
    np.testing.assert_array_equal(unpack(packed, dictionaries=d), unpack(_int8(EXAMPLE)))


# -- threads ------------------------------------------------------------------------------------


def test_pack_and_unpack_from_several_threads_at_once(
    shipped: ZstdDictionaries, activations: Activations
) -> None:
    work = [(split, a) for split in (1, 5, 8, 10) for a in activations[split][:6]]
    expected = [pack(a, DICT_CODEC, dictionaries=shipped, table=s) for s, a in work]
    decoded = [unpack(p, dictionaries=shipped) for p in expected]
    threads = 4
    barrier = threading.Barrier(threads)
    failures: list[str] = []

    def worker(offset: int) -> None:
        barrier.wait()
        for rounds in range(5):
            for i in range(len(work)):
                j = (i + offset + rounds) % len(work)
                split, a = work[j]
                packed = pack(a, DICT_CODEC, dictionaries=shipped, table=split)
                if packed != expected[j]:
                    failures.append(f"thread {offset}: pack of item {j} differs")
                if not np.array_equal(unpack(packed, dictionaries=shipped), decoded[j]):
                    failures.append(f"thread {offset}: unpack of item {j} differs")

    pool = [threading.Thread(target=worker, args=(k * 7,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures, failures[:5]
    # Contexts are the thread's own: reused within it, never shared with another.
    mine = shipped.compressors(3)
    assert shipped.compressors(3) is mine
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(shipped.compressors(3)))
    t.start()
    t.join()
    assert other[0] is not mine


# -- the handshake (PROTOCOL.md §5.1, §5.2) ------------------------------------------------------

DICT_SHA = "cd" * 32
ZDICT_CODECS = (DICT_CODEC, "sparse_int8")


def _hello(dictionaries_sha256: str) -> Hello:
    return Hello(PROTOCOL_VERSION, "resnet20", SHA, ZDICT_CODECS, "dev", b"", dictionaries_sha256)


def _welcome(dictionaries_sha256: str, codecs: tuple[str, ...] = ZDICT_CODECS) -> Welcome:
    return Welcome(
        PROTOCOL_VERSION,
        "resnet20",
        SHA,
        codecs,
        True,
        "srv",
        dictionaries_sha256=dictionaries_sha256,
        description=stub_description(),
    )


@pytest.mark.parametrize(
    ("hello_sha", "welcome_sha"),
    [(DICT_SHA, "ef" * 32), (DICT_SHA, ""), ("", DICT_SHA), ("", "")],
    ids=["other", "welcome empty", "hello empty", "both empty"],
)
def test_a_welcome_accepting_the_codec_needs_the_same_dictionaries(
    hello_sha: str, welcome_sha: str
) -> None:
    pair = ConnectionPair()
    pair.send(pair.device, _hello(hello_sha))
    welcome = _welcome(welcome_sha)
    with pytest.raises(LocalProtocolError, match="dictionaries_sha256"):
        pair.server.send(welcome)
    pair.device.receive_data(encode_frame(encode_message(welcome)))
    with pytest.raises(
        RemoteProtocolError, match=f"accepts {DICT_CODEC} but its dictionaries"
    ) as info:
        pair.device.next_event()
    assert info.value.code is ErrorCode.PROTOCOL
    assert pair.device.state is ConnectionState.FAILED


def test_with_the_same_dictionaries_the_codec_is_used(trained: ZstdDictionaries) -> None:
    pair = ConnectionPair()
    pair.send(pair.device, _hello(trained.sha256))
    welcome = _welcome(trained.sha256)
    assert pair.send(pair.server, welcome) == [welcome]
    assert pair.device.codecs == pair.server.codecs == ZDICT_CODECS
    assert pair.device.welcome is not None
    assert pair.device.welcome.dictionaries_sha256 == trained.sha256
    x = np.maximum(np.random.default_rng(0).standard_normal((1, 4, 6, 6)), 0).astype(np.float32)
    infer = Infer(1, 5, 0.8, pack(x, DICT_CODEC, dictionaries=trained, table=1))
    [got] = pair.send(pair.device, infer)
    assert isinstance(got, Infer) and got == infer
    np.testing.assert_array_equal(unpack(got.tensor, dictionaries=trained), unpack(_int8(x)))


def test_the_codec_is_offered_and_accepted_only_beside_sparse_int8() -> None:
    alone = (DICT_CODEC, "int8")
    pair = ConnectionPair()
    hello = Hello(PROTOCOL_VERSION, "resnet20", SHA, alone, "dev", b"", DICT_SHA)
    with pytest.raises(LocalProtocolError, match="without sparse_int8"):
        pair.device.send(hello)
    pair.server.receive_data(encode_frame(encode_message(hello)))
    with pytest.raises(RemoteProtocolError, match="HELLO offers sparse_int8_zdict without"):
        pair.server.next_event()
    # A WELCOME taking the codec but not its fallback: the device could not send a tensor
    # that zstd does not pay off for.
    pair = ConnectionPair()
    pair.send(pair.device, _hello(DICT_SHA))
    welcome = _welcome(DICT_SHA, (DICT_CODEC,))
    with pytest.raises(LocalProtocolError, match="WELCOME accepts sparse_int8_zdict without"):
        pair.server.send(welcome)
    pair.device.receive_data(encode_frame(encode_message(welcome)))
    with pytest.raises(RemoteProtocolError, match="without sparse_int8") as info:
        pair.device.next_event()
    assert info.value.code is ErrorCode.PROTOCOL


def test_other_dictionaries_are_fine_when_the_codec_is_left_out() -> None:
    pair = ConnectionPair()
    pair.send(pair.device, _hello(DICT_SHA))
    welcome = _welcome("ef" * 32, ("sparse_int8",))
    assert pair.send(pair.server, welcome) == [welcome]
    assert pair.device.state is ConnectionState.OPEN


def test_the_field_travels_only_when_set() -> None:
    for message in (_hello(DICT_SHA), _welcome(DICT_SHA)):
        body = encode_message(message)
        fields = msgpack.unpackb(body, raw=False)[1]
        assert fields["dictionaries_sha256"] == DICT_SHA
        assert decode_message(msgpack.unpackb(body, use_list=False, raw=False)) == message
    for message in (_hello(""), _welcome("")):
        assert b"dictionaries_sha256" not in encode_message(message)
    # A HELLO without dictionaries is byte for byte the worked example of PROTOCOL.md §11.
    plain = Hello(PROTOCOL_VERSION, "resnet20", "", ("sparse_int8", "int8"))
    assert encode_frame(encode_message(plain)).hex() == (
        "000000549201"
        "85a776657273696f6e02a86d6f64656c5f6964a8726573"
        "6e65743230ae776569676874735f736861323536a0a6636f646563"
        "7392ab7370617273655f696e7438a4696e7438ab6465766963655f6e"
        "616d65a0"
    )


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "g" * 64, 7])
def test_the_field_is_64_lowercase_hex_digits(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        _hello(bad)  # type: ignore[arg-type]
    fields = {
        "version": 1,
        "model_id": "m",
        "weights_sha256": "",
        "codecs": ["sparse_int8"],
        "dictionaries_sha256": bad,
    }
    with pytest.raises(RemoteProtocolError, match="dictionaries_sha256"):
        decode_message([int(MessageType.HELLO), fields])
