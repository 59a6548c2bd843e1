"""Property-based fuzzing of every decoder that reads peer bytes.

The targets and strategies are ``bench.fuzz``'s; here they run briefly in ``make test``.
``SPINN_FUZZ_SECONDS=N`` turns the last test into a long run of N seconds that prints the
number of inputs tried (``python -m bench.fuzz`` adds the socket-level fuzz).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.fuzz import (
    ALLOC_SLACK,
    FUZZ_CONFIG,
    INPUTS,
    bounded_allocation,
    check_connection_stream,
    check_frame_stream,
    check_message_object,
    check_tensor,
    device_stream,
    message_objects,
    msgpack_values,
    mutate,
    packed_tensors,
    run_for,
    zstd_declaring,
)
from protocol import PROTOCOL_VERSION, Hello, Infer, Role, pack
from protocol.framing import encode_frame
from protocol.messages import encode_message

_FAST = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@_FAST
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
@example([b"\xff\xff\xff\xff"])  # a length far above the limit
@example([b"\x00\x00\x00\x00"])  # an empty frame
@example([b"\x00\x00", b"\x00\x03ab"])  # a frame cut by the end of the stream
def test_frame_decoder_random_chunks(chunks: list[bytes]) -> None:
    check_frame_stream(chunks)


@_FAST
@given(device_stream())
def test_frame_decoder_mutated_streams(data: bytes) -> None:
    check_frame_stream([data], max_frame_size=1 << 16)


def test_frame_decoder_counts_valid_frames() -> None:
    # The target must see frames, or every other test here would pass vacuously.
    body = encode_message(Hello(PROTOCOL_VERSION, "m", "", ("int8",)))
    assert check_frame_stream([encode_frame(body) * 3], 1 << 12) == 3


@_FAST
@given(msgpack_values)
def test_message_decoder_random_values(obj: object) -> None:
    check_message_object(obj)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(message_objects())
def test_message_decoder_mutated_messages(obj: object) -> None:
    check_message_object(obj)


def test_message_decoder_accepts_every_valid_message() -> None:
    hello = Hello(PROTOCOL_VERSION, "m", "", ("int8",))
    obj = msgpack.unpackb(encode_message(hello), use_list=False, raw=False)
    assert check_message_object(obj) == hello
    assert check_message_object((1, {"version": True})) is None  # a bool is not an int


@_FAST
@given(device_stream(), st.sampled_from([0, 1, 5, 64]), st.sampled_from(list(Role)))
def test_connection_mutated_streams(data: bytes, chunk: int, role: Role) -> None:
    check_connection_stream(data, role, chunk)


@_FAST
@given(st.binary(max_size=400), st.sampled_from(list(Role)))
def test_connection_random_bytes(data: bytes, role: Role) -> None:
    check_connection_stream(data, role)


def test_connection_stream_of_a_real_device_decodes() -> None:
    tensor = pack(np.ones((1, 2, 3), "float32"), "int8")
    stream = b"".join(
        encode_frame(encode_message(m))
        for m in (Hello(PROTOCOL_VERSION, "m", "", ("int8",)), Infer(1, 1, 0.5, tensor))
    )
    # HELLO decodes; INFER before WELCOME is a violation, raised as ProtocolError only.
    assert check_connection_stream(stream, Role.SERVER) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(packed_tensors())
def test_tensor_unpacker(fields: dict[str, Any]) -> None:
    check_tensor(fields)


def test_tensor_unpacker_refuses_lying_zstd_before_allocating() -> None:
    fields = {"codec": "float32", "compressed": True, "shape": (1, 64), "scale": 1.0,
              "zero_point": 0, "payload": zstd_declaring(2**62)}  # fmt: skip
    peak = bounded_allocation(lambda: check_tensor(fields), 64 * 1024)
    assert peak < 64 * 1024
    assert check_tensor({**fields, "payload": zstd_declaring(256)}) is None  # holds 0 bytes


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(device_stream(), st.integers(0, 2**32))
def test_connection_allocation_is_bounded_by_its_limits(data: bytes, seed: int) -> None:
    # Whatever the bytes declare, memory is bounded by the frame limit and the tensor
    # element limit (PROTOCOL.md §3, §6): a 4 GiB length or a 2**30-element shape costs
    # nothing before it is refused.
    data = mutate(data, random.Random(seed), 2)
    bound = 2 * FUZZ_CONFIG.max_frame_size + 8 * FUZZ_CONFIG.max_tensor_elements + ALLOC_SLACK
    bounded_allocation(lambda: check_connection_stream(data, Role.SERVER), bound)


def test_mutate_is_seeded_and_changes_data() -> None:
    data = bytes(range(64))
    assert mutate(data, random.Random(3)) == mutate(data, random.Random(3))
    assert any(mutate(data, random.Random(s)) != data for s in range(10))


@pytest.mark.skipif(
    not os.environ.get("SPINN_FUZZ_SECONDS"), reason="long fuzz run: set SPINN_FUZZ_SECONDS"
)
def test_long_fuzz_run(capsys: pytest.CaptureFixture[str]) -> None:
    seconds = float(os.environ["SPINN_FUZZ_SECONDS"])
    tried = run_for(seconds)
    with capsys.disabled():
        print(f"\nfuzzed {tried} inputs in {seconds:.0f} s: {dict(INPUTS)}")
    assert tried > 0


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_socket_fuzz_short(tmp_path: Path) -> None:
    # Hostile connections against a live server process while a good device streams
    # through it: the server stays up and the good device loses nothing.
    from bench.fuzz import socket_fuzz
    from tests.support.runtime import make_small_checkpoint

    result = socket_fuzz(make_small_checkpoint(tmp_path), seconds=4.0, attackers=4, seed=1)
    assert result["server_alive"], result.get("server_log_tail")
    assert result["socket_connections"] > 20
    assert result["frames_lost"] == 0 and result["frames_answered_twice"] == 0
    assert result["answered_by"]["server"] > 0
    assert result["rss_mb_max"] < result["rss_mb_start"] + 100
