"""The server describes itself in WELCOME (PROTOCOL.md §5.12), and version 1 peers still
get what version 1 says (§9)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from protocol import Error, ErrorCode, Hello, Infer, Ping, Pong, Result, Welcome, pack
from protocol.description import PREPROCESS, Description
from protocol.messages import decode_message, encode_message
from spinn.runtime.server import SpinnServer
from spinn.runtime.server_description import checkpoint_facts, mismatches
from tests.support.runtime import RawClient, hello, sample_input, serve, until_closed

pytestmark = pytest.mark.timeout(60)


def test_welcome_describes_the_model_and_the_limits(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        # An empty model id asks for whatever is served: a client that knows nothing.
        client.send(Hello(2, "", "", ("float32",)))
        welcome = await client.next()
        assert isinstance(welcome, Welcome) and welcome.version == 2
        assert welcome.model_id == server.meta.model_id
        d = welcome.description
        assert d is not None
        model, meta, config = server.model, server.meta, server.config
        assert d.input_shape == meta.input_spec.shape == (1, 28, 28)
        assert d.input_mean == meta.input_spec.mean and d.input_std == meta.input_spec.std
        assert d.classes == meta.class_names
        assert d.num_splits == model.num_stages
        assert d.split_shapes == tuple(model.split_shape(s) for s in range(model.num_stages))
        assert d.preprocess == PREPROCESS and (d.input_dtype, d.input_range) == ("uint8", (0, 255))
        assert d.max_frame_bytes == server.max_frame_bytes
        assert d.max_tensor_elements == config.limits.max_tensor_elements
        assert d.max_in_flight == config.limits.max_queue_per_connection
        assert d.max_batch == 1 and d.ping_is_activity
        assert (d.handshake_timeout_s, d.idle_timeout_s) == (3.0, 7.0)
        # The control frames' token buckets (PROTOCOL.md §8.2), as the server enforces them.
        assert (d.max_ping_rate, d.max_ping_burst) == (config.limits.max_ping_rate, 2 * 4.0)
        assert (d.max_unknown_cancel_rate, d.max_unknown_cancel_burst) == (150.0, 300.0)
        # What it says is enough to be served: the formula applied to raw pixels, split 0.
        pixels = np.random.default_rng(0).integers(0, 256, (1, 28, 28), np.uint8)
        mean = np.float32(d.input_mean[0])
        std = np.float32(d.input_std[0])
        x = ((pixels.astype(np.float32) / np.float32(255) - mean) / std)[None]
        client.send(Infer(1, 0, 1.0, pack(x, "float32")))
        assert isinstance(await client.next(), Result)
        # A batch above max_batch is refused as the description says (BAD_SPLIT).
        client.send(Infer(2, 0, 1.0, pack(np.concatenate([x, x]), "float32")))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_SPLIT
        client.close()

    serve(
        checkpoint,
        body,
        handshake_timeout_s=3.0,
        idle_timeout_s=7.0,
        max_ping_rate=4.0,
        max_unknown_cancel_rate=150.0,
    )


def test_a_client_within_the_described_ping_burst_is_served_and_one_more_is_not(
    checkpoint: Path,
) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        d = (await hello(client, server)).description
        assert d is not None and d.max_ping_burst is not None
        burst = int(d.max_ping_burst)
        client.send(*(Ping(seq, 0.0) for seq in range(burst)))  # the whole bucket at once
        for _ in range(burst):
            assert isinstance(await client.next(), Pong)
        client.send(Ping(burst, 0.0))  # a few ms refill far less than one token
        events = await until_closed(client)
        assert len(events) == 1, events
        error = events[0]
        assert isinstance(error, Error) and error.code is ErrorCode.TOO_LARGE and error.fatal
        assert f"more than {d.max_ping_rate:g} PINGs a second" in error.message

    serve(checkpoint, body, max_ping_rate=1.5)


def test_a_version_1_device_gets_a_version_1_welcome(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        meta = server.meta
        client = await RawClient.open(port)
        client.send(Hello(1, meta.model_id, meta.weights_sha256, ("float32",)))
        welcome = await client.next()
        assert isinstance(welcome, Welcome) and welcome.version == 1
        assert welcome.description is None
        assert b"description" not in encode_message(welcome)  # byte for byte version 1
        client.close()
        # Version 1 has no "any model": an empty id is a mismatch there.
        other = await RawClient.open(port)
        other.send(Hello(1, "", "", ("float32",)))
        error = await other.next()
        assert isinstance(error, Error) and error.code is ErrorCode.MODEL_MISMATCH
        other.close()

    serve(checkpoint, body)


def _described(checkpoint: Path) -> tuple[Any, Any, Description]:
    """The checkpoint's model, metadata and description with round limits."""
    from spinn.model.checkpoint import load_checkpoint
    from spinn.runtime.server_description import describe

    model, meta = load_checkpoint(checkpoint)
    limits = {"max_frame_bytes": 1 << 20, "max_tensor_elements": 1 << 22}
    rates = {"max_ping_rate": 50, "max_ping_burst": 100, "max_unknown_cancel_rate": 200.0,
             "max_unknown_cancel_burst": 400.0}  # fmt: skip
    d = describe(
        model, meta, max_batch=1, max_in_flight=256, max_outstanding=1024,
        handshake_timeout_s=10, idle_timeout_s=60, **limits, **rates,
    )  # fmt: skip
    return model, meta, d


def test_the_description_round_trips_and_refuses_nonsense(checkpoint: Path) -> None:
    model, meta, d = _described(checkpoint)
    welcome = Welcome(2, meta.model_id, "", ("float32",), True, description=d)
    wire = msgpack.unpackb(encode_message(welcome), use_list=False, raw=False)
    assert decode_message(wire) == welcome
    assert set(wire[1]["description"]) == {f.name for f in dataclasses.fields(Description)}
    assert mismatches(d, checkpoint_facts(model, meta)) == []
    fields = dict(wire[1]["description"])
    for key, bad, match in [
        ("input_shape", [1, 28], "input_shape"),
        ("input_std", [0.0], "positive"),
        ("classes", [], "classes"),
        ("max_batch", 0, "max_batch"),
        ("idle_timeout_s", -1.0, "idle_timeout_s"),
        ("max_ping_rate", 0, "max_ping_rate must be a positive number"),
        ("max_ping_rate", None, "go together"),
        ("max_unknown_cancel_burst", 0.5, "max_unknown_cancel_burst must be a number >= 1"),
        ("max_unknown_cancel_rate", True, "max_unknown_cancel_rate"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            Description.from_wire({**fields, key: bad})
    with pytest.raises(ValueError, match="missing"):
        Description.from_wire({k: v for k, v in fields.items() if k != "split_shapes"})
    # Unknown keys are ignored (§9), defaults apply to the optional ones.
    assert Description.from_wire({**fields, "later": 1}) == d
    # A server that states no rates leaves their keys out (an older version-2 server).
    quiet = dataclasses.replace(
        d,
        max_ping_rate=None,
        max_ping_burst=None,
        max_unknown_cancel_rate=None,
        max_unknown_cancel_burst=None,
    )
    assert not {k for k in quiet.to_wire() if k.endswith(("_rate", "_burst"))}
    rates = (
        "max_ping_rate",
        "max_ping_burst",
        "max_unknown_cancel_rate",
        "max_unknown_cancel_burst",
    )
    assert Description.from_wire({k: v for k, v in fields.items() if k not in rates}) == quiet


def test_the_device_names_each_mismatch(checkpoint: Path) -> None:
    model, meta, d = _described(checkpoint)
    shapes = list(d.split_shapes)
    shapes[2] = (99, 1, 1)
    wrong = dataclasses.replace(d, input_std=(0.5,), split_shapes=tuple(shapes), preprocess="x")
    found = mismatches(wrong, checkpoint_facts(model, meta))
    assert [line.split(":")[0] for line in found] == ["input_std", "split_shapes", "preprocess"]
    assert found[1] == "split_shapes: split 2 server [99, 1, 1], checkpoint [8, 28, 28]"
    assert sample_input(0).shape[1:] == d.input_shape


def test_the_specification_lists_every_field_of_the_description() -> None:
    # PROTOCOL.md §5.12's table and the code agree, the optional rates included.
    spec = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = spec.split("### 5.12", 1)[1].split("\n## ", 1)[0]
    keys = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(Description)), keys
