"""Tests of protocol.messages: encoding round-trips, field validation, hostile bodies."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings

from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.framing import encode_frame
from protocol.messages import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Cancel,
    Error,
    Hello,
    Infer,
    Message,
    MessageType,
    Ping,
    Pong,
    Result,
    decode_message,
    encode_message,
    frame_bytes,
    infer_envelope_bytes,
    message_type,
)
from protocol.packing import PackedTensor
from tests.support.protocol import messages


def _roundtrip(message: Message) -> Message:
    obj = msgpack.unpackb(encode_message(message), use_list=False, raw=False)
    return decode_message(obj)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    decoded = _roundtrip(message)
    assert decoded == message
    assert type(decoded) is type(message)


def test_wire_layout_is_type_then_map() -> None:
    obj = msgpack.unpackb(encode_message(Cancel(5)), raw=False)
    assert obj == [MessageType.CANCEL, {"request_id": 5}]
    ping = msgpack.unpackb(encode_message(Ping(1, 2.5, b"\x00\x01")), raw=False)
    assert isinstance(ping[1]["padding"], bytes), "padding travels as msgpack bin"


@settings(max_examples=100, deadline=None)
@given(messages)
def test_frame_bytes_is_the_framed_length(message: Message) -> None:
    assert frame_bytes(message) == len(encode_frame(encode_message(message)))


def test_infer_envelope_is_the_frame_less_its_payload() -> None:
    # What a device's INFER carries besides the tensor's bytes: within a few bytes of a
    # real frame's (the request id and the payload's bin header vary in size).
    for codec, compressed, shape in (
        ("uint8_image", True, (1, 1, 28, 28)),
        ("sparse_int8_zdict", False, (1, 32, 14, 14)),
        ("float32", False, (1, 3, 96, 96)),
    ):
        for request_id, n in ((7, 300), (70_000, 5_000), (2**40, 70_000)):
            tensor = PackedTensor(codec, compressed, shape, 1.0, 0, bytes(n))
            frame = encode_frame(encode_message(Infer(request_id, 1, 0.75, tensor, 50.0)))
            assert abs(len(frame) - n - infer_envelope_bytes(codec, shape)) <= 6
    assert 140 <= infer_envelope_bytes("uint8_image", (1, 1, 28, 28)) <= 170


def test_unknown_fields_are_ignored_and_defaults_apply() -> None:
    body = [int(MessageType.HELLO), {"version": 1, "model_id": "m", "weights_sha256": "",
                                     "codecs": ["int8"], "auth_token": "later"}]  # fmt: skip
    hello = decode_message(body)
    assert hello == Hello(1, "m", "", ("int8",), device_name="")


def test_early_exits_travels_only_when_off() -> None:
    tensor = PackedTensor("float32", False, (1,), 1.0, 0, bytes(4))
    on = msgpack.unpackb(encode_message(Infer(1, 2, 0.5, tensor)), raw=False)
    assert "early_exits" not in on[1], "a default INFER is what a peer unaware of it sends"
    off = Infer(1, 2, 0.5, tensor, early_exits=False)
    assert msgpack.unpackb(encode_message(off), raw=False)[1]["early_exits"] is False
    assert _roundtrip(off) == off
    fields = dict(on[1], early_exits=1)
    with pytest.raises(RemoteProtocolError, match="early_exits must be a bool"):
        decode_message([int(MessageType.INFER), fields])


def test_held_ms_travels_only_when_set() -> None:
    plain = Result(1, 0, (3,), (0.5,), compute_ms=2.0)
    body = msgpack.unpackb(encode_message(plain), raw=False)
    assert "held_ms" not in body[1], "a RESULT without it is what a peer unaware of it sends"
    held = Result(1, 0, (3,), (0.5,), compute_ms=2.0, held_ms=7.5)
    assert msgpack.unpackb(encode_message(held), raw=False)[1]["held_ms"] == 7.5
    assert _roundtrip(held) == held
    with pytest.raises(RemoteProtocolError, match="held_ms"):
        decode_message([int(MessageType.RESULT), dict(body[1], held_ms=-1.0)])


def test_received_bytes_travels_only_when_set() -> None:
    plain = Pong(1, 3.0, 4.0, 10)
    body = msgpack.unpackb(encode_message(plain), raw=False)
    assert "received_bytes" not in body[1], "a PONG without it is what an older peer sends"
    counted = Pong.reply_to(Ping(1, 3.0, b"x" * 10), 4.0, received_bytes=123_456)
    assert msgpack.unpackb(encode_message(counted), raw=False)[1]["received_bytes"] == 123_456
    assert _roundtrip(counted) == counted
    with pytest.raises(RemoteProtocolError, match="received_bytes"):
        decode_message([int(MessageType.PONG), dict(body[1], received_bytes=-1)])


def test_integral_floats_from_other_languages_are_accepted() -> None:
    msg = decode_message([int(MessageType.PONG), {"seq": 1, "sent_at": 3.0, "received_at": 4}])
    assert msg == Pong(1, 3.0, 4.0)
    assert isinstance(msg, Pong) and type(msg.received_at) is float


def test_ping_time_is_echoed_as_sent() -> None:
    # PROTOCOL.md §5.7: PONG echoes sent_at unchanged; an integer stays one on the wire.
    for sent_at in (3, 2**63 - 1, -5, 1.25):
        ping = decode_message([int(MessageType.PING), {"seq": 1, "sent_at": sent_at}])
        assert isinstance(ping, Ping)
        pong = Pong.reply_to(ping, received_at=7.0)
        echoed = decode_message(msgpack.unpackb(encode_message(pong)))
        assert isinstance(echoed, Pong)
        assert type(echoed.sent_at) is type(sent_at) and echoed.sent_at == sent_at
    with pytest.raises(RemoteProtocolError, match="sent_at must be a float"):
        decode_message([int(MessageType.PING), {"seq": 1, "sent_at": True}])


def test_thr_conf_may_be_left_out_without_early_exits() -> None:
    # PROTOCOL.md §5.3: without early exits the threshold is unused.
    tensor = {
        "codec": "float32",
        "compressed": False,
        "shape": [1],
        "scale": 1.0,
        "zero_point": 0,
        "payload": bytes(4),
    }
    infer = decode_message(
        [3, {"request_id": 1, "split": 0, "early_exits": False, "tensor": tensor}]
    )
    assert isinstance(infer, Infer) and not infer.early_exits
    with pytest.raises(RemoteProtocolError, match="thr_conf"):
        decode_message([3, {"request_id": 1, "split": 0, "tensor": tensor}])


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"type": 1}, "array"),
        ([1], "array"),
        (["1", {}], "type must be an int"),
        ([99, {}], "unknown message type 99"),
        ([1, []], "must be a msgpack map"),
        ([5, {}], r"CANCEL is missing field\(s\) \['request_id'\]"),
        ([5, {"request_id": "7"}], "request_id must be an int"),
        ([5, {"request_id": True}], "request_id must be an int"),
        ([5, {"request_id": -1}], "request_id must be in"),
        ([5, {"request_id": 2**64}], "request_id must be in"),
        ([6, {"seq": 1, "sent_at": math.nan}], "sent_at must be a finite"),
        ([6, {"seq": 1, "sent_at": 1.0, "padding": "text"}], "padding must be bytes"),
        ([8, {"code": 999, "message": "x"}], "unknown error code 999"),
        ([8, {"code": 1, "message": b"bytes"}], "message must be a str"),
        ([9, {"reason": "x" * 5000}], "at most 4096"),
        ([1, {"version": 1, "model_id": "m", "weights_sha256": "xyz", "codecs": []}], "hex"),
        ([1, {"version": 1, "model_id": "m", "weights_sha256": "", "codecs": "int8"}], "codecs"),
        ([4, {"request_id": 1, "exit_index": 0, "classes": [1, 2], "probs": [0.5]}], "length"),
        ([4, {"request_id": 1, "exit_index": 0, "classes": [1], "probs": [1.5]}], r"\[0, 1\]"),
        ([4, {"request_id": 1, "exit_index": 0, "classes": [], "probs": []}], "length"),
        ([3, {"request_id": 1, "split": 1, "thr_conf": 2.0, "tensor": {}}], "tensor"),
        ([3, {"request_id": 1, "split": 1, "thr_conf": 0.5, "tensor": 5}], "msgpack map"),
    ],
)
def test_malformed_bodies_name_the_problem(obj: object, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode_message(obj)
    assert info.value.code in (ErrorCode.PROTOCOL, ErrorCode.BAD_TENSOR)


def test_bad_tensor_fields_carry_bad_tensor_code() -> None:
    tensor = {
        "codec": "int8",
        "compressed": False,
        "shape": [-3],
        "scale": 1.0,
        "zero_point": 0,
        "payload": b"",
    }
    body = [3, {"request_id": 1, "split": 1, "thr_conf": 0.5, "tensor": tensor}]
    with pytest.raises(RemoteProtocolError, match="invalid dimension") as info:
        decode_message(body)
    assert info.value.code is ErrorCode.BAD_TENSOR


def test_local_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="thr_conf"):
        Infer(1, 1, 1.5, PackedTensor("float32", False, (1,), 1.0, 0, bytes(4)))
    with pytest.raises(TypeError, match="code must be an ErrorCode"):
        Error("BUSY", "x")  # type: ignore[arg-type]
    assert Error(6, "x").code is ErrorCode.BUSY  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        message_type("not a message")  # type: ignore[arg-type]


def test_pong_reply_to_echoes_time_not_padding() -> None:
    pong = Pong.reply_to(Ping(9, 12.5, b"x" * 1000), received_at=13.0)
    assert pong == Pong(9, 12.5, 13.0, 1000)
    assert len(encode_message(pong)) < 100


def test_error_fatal_flag() -> None:
    assert Error(ErrorCode.PROTOCOL, "bad").fatal
    assert not Error(ErrorCode.BUSY, "later", request_id=3).fatal


def test_version_constant() -> None:
    assert PROTOCOL_VERSION == 2 and SUPPORTED_VERSIONS == (1, 2)


def test_an_optional_field_sent_as_nil_takes_its_default() -> None:
    # PROTOCOL.md §4: an optional field MAY be omitted or sent as nil.
    fields = {"version": 1, "model_id": "m", "weights_sha256": "", "codecs": ["float32"]}
    hello = decode_message([int(MessageType.HELLO), {**fields, "device_name": None}])
    assert isinstance(hello, Hello) and hello.device_name == ""
    # A required field stays required: nil is no value for it.
    with pytest.raises(RemoteProtocolError, match="model_id"):
        decode_message([int(MessageType.HELLO), {**fields, "model_id": None}])
