"""uint8_image between a real device and server on loopback (PROTOCOL.md §6.8): split 0
sends the frame's pixels, the server normalises them exactly as the device does, and peers
without the codec keep sending the float input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol import PROTOCOL_VERSION, Error, ErrorCode, Hello, Infer, Result, Welcome
from protocol.packing import DICT_CODEC, IMAGE_CODEC, PackedTensor, pack, unpack
from spinn.decisions.offline_profile import Profile
from spinn.decisions.scheduler import SchedulerConfig
from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.offline.data import load_fashion_mnist
from spinn.runtime.config import DeviceConfig
from spinn.runtime.device_compute import recode
from spinn.runtime.device_core import recode_target
from spinn.runtime.device_policy import profiled_input_codec
from spinn.runtime.sources import ArraySource
from tests.support.runtime import (
    CHECKPOINT,
    PATIENT,
    RawClient,
    by_frame,
    run_in_process,
    serve,
)

pytestmark = pytest.mark.timeout(120)

N = 16
# Server-only: split 0, only the final exit, every frame answered by the server.
SERVER_ONLY = {"policy": "fixed", "split": 0, "thr_conf": 1.0, "continue_locally": False, **PATIENT}


def _images() -> ArraySource:
    data = load_fashion_mnist("test").head(N)
    return ArraySource(data.images[:, 0].numpy(), data.labels.numpy(), name="fashion-mnist")


def test_split_0_sends_the_pixels_and_the_server_answers_as_the_device_would() -> None:
    pixels = run_in_process(CHECKPOINT, _images(), zstd="always", **SERVER_ONLY)
    floats = run_in_process(
        CHECKPOINT, _images(), zstd="always", codec="float32", image_codec=False, **SERVER_ONLY
    )
    local = run_in_process(CHECKPOINT, _images(), connect=False, **SERVER_ONLY)
    assert pixels.device.compute.offered_codecs == (DICT_CODEC, "sparse_int8", IMAGE_CODEC)
    got, lossless, own = (
        by_frame(pixels.records, N),
        by_frame(floats.records, N),
        by_frame(local.records, N),
    )
    assert {r["where"] for r in got} == {"server"} == {r["where"] for r in lossless}
    # The server ran the network on the device's own input bits: the same answers, to the
    # last digit of the confidence, as lossless float32 input and as the device alone.
    for frame in zip(got, lossless, own, strict=True):
        assert len({(r["class"], r["exit"], r["confidence"]) for r in frame}) == 1
    # The frame (784 pixels) in fewer bytes than its raw pixels, message included, and
    # about half of the lossless float32 input's, zstd-coded as well.
    pixels_sent = np.median([r["bytes_sent"] for r in got])
    assert pixels_sent < 784 and pixels_sent < 0.6 * np.median([r["bytes_sent"] for r in lossless])


def test_a_server_without_the_codec_gets_the_float_input() -> None:
    old_server = run_in_process(
        CHECKPOINT, _images(), zstd="always", server_options={"image_codec": False}, **SERVER_ONLY
    )
    old_device = run_in_process(
        CHECKPOINT, _images(), zstd="always", image_codec=False, **SERVER_ONLY
    )
    assert old_device.device.compute.offered_codecs == (DICT_CODEC, "sparse_int8")
    for run in (old_server, old_device):
        records = by_frame(run.records, N)
        assert {r["where"] for r in records} == {"server"}
    # Both carry the same zdict-coded float input at split 0.
    assert [r["bytes_sent"] for r in by_frame(old_server.records, N)] == [
        r["bytes_sent"] for r in by_frame(old_device.records, N)
    ]


def test_the_server_takes_pixels_at_split_0_only_and_refuses_bad_ones() -> None:
    model, meta = load_checkpoint(CHECKPOINT)
    image = load_fashion_mnist("test").images[:1].numpy()  # (1, 1, 28, 28) uint8
    good = pack(image, IMAGE_CODEC, compress=True)
    bad_filter = PackedTensor(IMAGE_CODEC, False, image.shape, 1.0, 0, b"\x07" + image.tobytes())
    answers: dict[int, object] = {}

    async def body(server: object, port: int) -> None:
        for offered, accepted in (((IMAGE_CODEC,), True), (("float32",), False)):
            client = await RawClient.open(port)
            client.send(
                Hello(
                    PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, (*offered, "sparse_int8")
                )
            )
            welcome = await client.next()
            assert isinstance(welcome, Welcome)
            assert (IMAGE_CODEC in welcome.codecs) is accepted
            client.close()
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, (IMAGE_CODEC,)))
        assert (await client.next()).codecs == (IMAGE_CODEC,)  # type: ignore[attr-defined]
        client.send(Infer(1, 1, 0.5, good), Infer(2, 0, 0.5, bad_filter), Infer(3, 0, 1.0, good))
        for _ in range(3):
            event = await client.next()
            answers[event.request_id] = event  # type: ignore[attr-defined]
        client.close()

    serve(CHECKPOINT, body, top_k=3)
    assert isinstance(answers[1], Error) and answers[1].code is ErrorCode.BAD_SPLIT
    assert "split 0 only" in answers[1].message
    assert isinstance(answers[2], Error) and answers[2].code is ErrorCode.BAD_TENSOR
    assert "filter byte 7" in answers[2].message
    result = answers[3]
    assert isinstance(result, Result)
    x = model.input_spec.preprocess(torch.from_numpy(image))
    offline = run_stages(model, x, 0, model.num_stages, ExitRule.from_wire(1.0, True))
    assert offline.answer is not None
    assert result.exit_index == offline.answer.exit
    assert result.classes == tuple(c for c, _ in offline.answer.topk(3))


def test_pixels_packed_for_a_link_that_lost_the_codec_go_as_float_input() -> None:
    model, _ = load_checkpoint(CHECKPOINT)
    image = load_fashion_mnist("test").images[:1].numpy()
    packed = pack(image, IMAGE_CODEC, compress=True)
    # What DeviceCore.recode_to names for the link (recode_target), then what
    # DeviceModel.recode does with it (recode).
    assert recode_target(packed.codec, "float32", ("float32", IMAGE_CODEC)) is None
    target = recode_target(packed.codec, "float32", ("float32",))
    assert target == "float32"
    floats = recode(packed, target, None, input_spec=model.input_spec)
    assert floats.codec == "float32" and floats.shape == image.shape
    expected = model.input_spec.preprocess(torch.from_numpy(image)).numpy()
    np.testing.assert_array_equal(unpack(floats), expected)


def test_the_scheduler_predicts_split_0_with_the_pixels_size() -> None:
    profile = Profile.load(CHECKPOINT.with_name("profile.json"))
    config = DeviceConfig.from_fields(checkpoint=CHECKPOINT)
    input_codec = profiled_input_codec(config, profile)
    assert input_codec == f"{IMAGE_CODEC}+zstd"
    assert (
        profiled_input_codec(
            DeviceConfig.from_fields(checkpoint=CHECKPOINT, image_codec=False), profile
        )
        is None
    )
    assert (
        profiled_input_codec(DeviceConfig.from_fields(checkpoint=CHECKPOINT, zstd="never"), profile)
        == IMAGE_CODEC
    )
    sched = SchedulerConfig(codec=DICT_CODEC, input_codec=input_codec)
    assert sched.upload_bytes(profile, 0) == profile.splits[0].bytes[input_codec]
    assert sched.upload_bytes(profile, 1) == profile.splits[1].bytes[DICT_CODEC]
    assert (
        SchedulerConfig(codec=DICT_CODEC).upload_bytes(profile, 0)
        == profile.splits[0].bytes[DICT_CODEC]
    )
    # Lossless, what a client holds, and under a fifth of the float32 input.
    assert profile.splits[0].bytes[IMAGE_CODEC] == 785
    assert profile.splits[0].bytes[input_codec] < 0.2 * profile.splits[0].bytes["float32"]
