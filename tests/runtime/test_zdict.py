"""sparse_int8_zdict between a real device and server on loopback (PROTOCOL.md §6.7).

The shipped model has its dictionaries beside it (models/default/model.zdict): device and
server load them, agree in the handshake, and the activations cross with them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from protocol.dictionaries import DictionaryError, ZstdDictionaries
from protocol.packing import DICT_CODEC
from spinn.model.zdict_file import dictionaries_path, load_dictionaries
from spinn.offline.data import load_fashion_mnist
from spinn.runtime.config import DeviceConfig, ServerConfig
from spinn.runtime.device import DeviceError, SpinnDevice
from spinn.runtime.device_compute import recode
from spinn.runtime.device_core import recode_target
from spinn.runtime.device_policy import profiled_codec
from spinn.runtime.server import SpinnServer
from spinn.runtime.sources import ArraySource
from tests.support.runtime import CHECKPOINT, PATIENT, by_frame, run_in_process

pytestmark = pytest.mark.timeout(120)

N = 24
# Split 5 (16x14x14, about half zeros), every frame answered by the server.
FIXED = {"policy": "fixed", "split": 5, "thr_conf": 1.0, "continue_locally": False, **PATIENT}


def _images() -> ArraySource:
    data = load_fashion_mnist("test").head(N)
    return ArraySource(data.images[:, 0].numpy(), data.labels.numpy(), name="fashion-mnist")


def _beside_a_copy(tmp_path: Path, zdict: bytes | None = None) -> Path:
    """A copy of the default checkpoint and profile, with `zdict` as its dictionary file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = tmp_path / "model.pt"
    shutil.copy(CHECKPOINT, checkpoint)
    shutil.copy(CHECKPOINT.with_name("profile.json"), tmp_path / "profile.json")
    if zdict is not None:
        dictionaries_path(checkpoint).write_bytes(zdict)
    return checkpoint


def _shipped() -> ZstdDictionaries:
    return ZstdDictionaries.from_bytes(dictionaries_path(CHECKPOINT).read_bytes())


def test_dictionaries_are_negotiated_and_decode_like_sparse_int8() -> None:
    zdict = run_in_process(CHECKPOINT, _images(), zstd="always", **FIXED)
    plain = run_in_process(
        CHECKPOINT, _images(), zstd="always", server_options={"dictionaries": False}, **FIXED
    )
    assert zdict.device.compute.codecs == (DICT_CODEC, "sparse_int8")
    assert zdict.server is not None and zdict.server.dictionaries is not None
    with_dicts, without = by_frame(zdict.records, N), by_frame(plain.records, N)
    assert {r["where"] for r in with_dicts} == {"server"} == {r["where"] for r in without}
    # Both codecs carry the same int8 levels, so the server computes the same answers...
    assert [r["class"] for r in with_dicts] == [r["class"] for r in without]
    # ...from fewer bytes: the default model's split 5 packs about 10% smaller.
    sent = sum(r["bytes_sent"] for r in with_dicts)
    assert sent < 0.95 * sum(r["bytes_sent"] for r in without)


def test_a_device_without_the_file_offers_plain_sparse_int8(tmp_path: Path) -> None:
    run = run_in_process(_beside_a_copy(tmp_path), _images(), zstd="always", **FIXED)
    assert run.device.compute.codecs == ("sparse_int8",) and run.device.compute.dictionaries is None
    assert {r["where"] for r in by_frame(run.records, N)} == {"server"}


def test_a_tensor_packed_for_the_dictionaries_is_recoded_for_a_link_without() -> None:
    from protocol.packing import pack, unpack
    from spinn.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(CHECKPOINT)
    zdict = _shipped()
    x = model.input_spec.preprocess(load_fashion_mnist("test").images[:1])
    for k in range(5):
        x = model.run_trunk(k, x)
    packed = pack(x.detach().numpy(), DICT_CODEC, True, dictionaries=zdict, table=5)
    # What DeviceCore.recode_to names for the link (recode_target), then what
    # DeviceModel.recode does with it (recode).
    assert recode_target(packed.codec, DICT_CODEC, (DICT_CODEC, "sparse_int8")) is None
    target = recode_target(packed.codec, "sparse_int8", ("sparse_int8",))
    assert target == "sparse_int8"
    want = unpack(packed, dictionaries=zdict)
    for zstd, compressed in (("always", True), ("never", False), ("auto", True)):
        plain = recode(packed, target, zdict, zstd)
        assert plain.codec == "sparse_int8" and plain.compressed is compressed, zstd
        # The same int8 levels, hence the same values on the server.
        assert (unpack(plain) == want).all()


def test_a_server_with_other_dictionaries_gets_plain_sparse_int8(tmp_path: Path) -> None:
    shipped = _shipped()
    # Same model, same number of tables, another file: the tables in reverse order.
    other = ZstdDictionaries(shipped.tables[::-1], shipped.model_id)
    run = run_in_process(
        _beside_a_copy(tmp_path, other.to_bytes()),
        _images(),
        zstd="always",
        server_options={"checkpoint": CHECKPOINT},
        **FIXED,
    )
    assert run.server is not None and run.server.dictionaries is not None
    assert run.device.compute.dictionaries is not None
    assert run.device.compute.dictionaries.sha256 != run.server.dictionaries.sha256
    assert run.device.compute.codecs == (DICT_CODEC, "sparse_int8")
    # The server left the codec out of WELCOME: the very bytes of a server without any.
    without = run_in_process(
        CHECKPOINT, _images(), zstd="always", server_options={"dictionaries": False}, **FIXED
    )
    got, want = by_frame(run.records, N), by_frame(without.records, N)
    assert {r["where"] for r in got} == {"server"}
    assert [r["bytes_sent"] for r in got] == [r["bytes_sent"] for r in want]


def test_unusable_files_are_refused_by_name_with_the_way_out(tmp_path: Path) -> None:
    shipped = _shipped()
    cases = {
        "not a file": (b"not a dictionary file", r"model\.zdict: not a msgpack dictionary file"),
        "another model": (
            ZstdDictionaries(shipped.tables, "other-model").to_bytes(),
            r"trained for model 'other-model'",
        ),
        "too few tables": (
            ZstdDictionaries(shipped.tables[:3], shipped.model_id).to_bytes(),
            r"3 tables for a model of 11 splits",
        ),
    }
    for name, (data, match) in cases.items():
        checkpoint = _beside_a_copy(tmp_path / name.replace(" ", "-"), data)
        with pytest.raises(DeviceError, match=f"{match}.*link.codec sparse_int8"):
            SpinnDevice(DeviceConfig.from_fields(checkpoint=checkpoint, server=None))
        with pytest.raises(DictionaryError, match=f"{match}.*compute.dictionaries off"):
            SpinnServer(ServerConfig.from_fields(checkpoint=checkpoint))
        # Either end runs without the file when told to.
        assert (
            SpinnDevice(
                DeviceConfig.from_fields(checkpoint=checkpoint, server=None, codec="sparse_int8")
            ).compute.dictionaries
            is None
        )
        assert (
            SpinnServer(
                ServerConfig.from_fields(checkpoint=checkpoint, dictionaries=False)
            ).dictionaries
            is None
        )


def test_spinn_server_exits_2_naming_an_unusable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import spinn_server

    checkpoint = _beside_a_copy(tmp_path, b"not a dictionary file")
    assert spinn_server.main(["--checkpoint", str(checkpoint), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "model.zdict: not a msgpack dictionary file" in err and "--no-dictionaries" in err


def test_an_unreadable_file_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = _beside_a_copy(tmp_path)
    dictionaries_path(checkpoint).mkdir()  # there, and not readable as a file
    with pytest.raises(DictionaryError, match=r"model\.zdict: cannot read"):
        load_dictionaries(checkpoint, "any", 11)


def test_the_scheduler_predicts_with_the_sizes_of_what_is_sent() -> None:
    full = ("int8", "int8+zstd", "sparse_int8", "sparse_int8+zstd", DICT_CODEC)
    assert profiled_codec(DICT_CODEC, "auto", full) == DICT_CODEC
    assert profiled_codec(DICT_CODEC, "always", full) == DICT_CODEC
    assert profiled_codec(DICT_CODEC, "never", full) == "sparse_int8"
    assert profiled_codec("int8", "auto", full) == "int8+zstd"
    assert profiled_codec("int8", "never", full) == "int8"
    # A profile without the compressed sizes: the nearest it has, or none at all.
    assert profiled_codec(DICT_CODEC, "auto", full[:4]) == "sparse_int8+zstd"
    assert profiled_codec("int8", "auto", ("int8",)) == "int8"
    assert profiled_codec("int8", "auto", ("float32",)) is None
    for zstd, expected in (("auto", DICT_CODEC), ("never", "sparse_int8")):
        config = DeviceConfig.from_fields(
            checkpoint=CHECKPOINT, server=None, zstd=zstd, policy="spinn"
        )
        device = SpinnDevice(config)
        assert device.core.policy.config.codec == expected  # type: ignore[attr-defined]
