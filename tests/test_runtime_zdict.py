"""sparse_int8_zdict between a real device and server on loopback (PROTOCOL.md §6.7).

The shipped model has its dictionaries beside it (models/default/model.zdict): device and
server load them, agree in the handshake, and the activations cross with them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from protocol.packing import DICT_CODEC
from spinn.data import load_fashion_mnist
from spinn.dictionaries import dictionaries_path
from spinn.runtime.device import DeviceConfig, DeviceError, SpinnDevice
from spinn.sources import ArraySource
from tests._runtime_support import CHECKPOINT, by_frame, run_in_process

pytestmark = pytest.mark.timeout(120)

N = 24
# Split 5 (16x14x14, about half zeros), every frame answered by the server.
FIXED = {"policy": "fixed", "split": 5, "thr_conf": 1.0, "continue_locally": False}


def _images() -> ArraySource:
    data = load_fashion_mnist("test").head(N)
    return ArraySource(data.images[:, 0].numpy(), data.labels.numpy(), name="fashion-mnist")


def test_dictionaries_are_negotiated_and_decode_like_sparse_int8() -> None:
    zdict = run_in_process(CHECKPOINT, _images(), zstd="always", **FIXED)
    plain = run_in_process(
        CHECKPOINT, _images(), zstd="always", server_options={"dictionaries": False}, **FIXED
    )
    assert zdict.device.codecs == (DICT_CODEC, "sparse_int8")
    assert zdict.server is not None and zdict.server.dictionaries is not None
    with_dicts, without = by_frame(zdict.records, N), by_frame(plain.records, N)
    assert {r["where"] for r in with_dicts} == {"server"} == {r["where"] for r in without}
    # Both codecs carry the same int8 levels, so the server computes the same answers...
    assert [r["class"] for r in with_dicts] == [r["class"] for r in without]
    # ...from fewer bytes: the default model's split 5 packs about 10% smaller.
    sent = sum(r["bytes_sent"] for r in with_dicts)
    assert sent < 0.95 * sum(r["bytes_sent"] for r in without)


def test_a_device_without_the_file_offers_plain_sparse_int8(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    shutil.copy(CHECKPOINT, checkpoint)
    shutil.copy(CHECKPOINT.with_name("profile.json"), tmp_path / "profile.json")
    run = run_in_process(checkpoint, _images(), zstd="always", **FIXED)
    assert run.device.codecs == ("sparse_int8",) and run.device.dictionaries is None
    assert {r["where"] for r in by_frame(run.records, N)} == {"server"}


def test_a_corrupt_file_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    shutil.copy(CHECKPOINT, checkpoint)
    shutil.copy(CHECKPOINT.with_name("profile.json"), tmp_path / "profile.json")
    dictionaries_path(checkpoint).write_bytes(b"not a dictionary file")
    with pytest.raises(DeviceError, match=r"model\.zdict: not a msgpack dictionary file"):
        SpinnDevice(DeviceConfig(checkpoint=checkpoint, server=None))


def test_a_tensor_packed_for_the_dictionaries_is_recoded_for_a_link_without() -> None:
    from protocol.dictionaries import ZstdDictionaries
    from protocol.packing import pack, unpack
    from spinn.checkpoint import load_checkpoint
    from spinn.runtime.device import recode_for

    model, _ = load_checkpoint(CHECKPOINT)
    zdict = ZstdDictionaries.from_bytes(dictionaries_path(CHECKPOINT).read_bytes())
    x = model.input_spec.preprocess(load_fashion_mnist("test").images[:1])
    for k in range(5):
        x = model.run_trunk(k, x)
    packed = pack(x.detach().numpy(), DICT_CODEC, True, dictionaries=zdict, table=5)
    assert recode_for(packed, DICT_CODEC, zdict) is packed
    plain = recode_for(packed, "sparse_int8", zdict, "always")
    assert plain.codec == "sparse_int8" and plain.compressed
    # The same int8 levels, hence the same values on the server.
    assert (unpack(plain) == unpack(packed, dictionaries=zdict)).all()
