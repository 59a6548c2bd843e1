"""Tests of protocol.framing: incremental decoding, limits, truncation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.framing import FrameDecoder, encode_frame


def _drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (view := decoder.next_frame()) is not None:
        frames.append(bytes(view))
        view.release()
    return frames


def test_byte_at_a_time() -> None:
    bodies = [b"a", b"hello", bytes(range(256)) * 10]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        got += _drain(decoder)
    assert got == bodies
    assert decoder.buffered == 0


def test_many_frames_in_one_read() -> None:
    bodies = [bytes([i]) * (i + 1) for i in range(100)]
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(b) for b in bodies))
    assert _drain(decoder) == bodies


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_any_chunking_yields_the_same_frames(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:  # b"" would mean end of stream
            decoder.receive_data(memoryview(stream)[prev:cut])
        prev = cut
        got += _drain(decoder)
    assert got == bodies


def test_buffer_protocol_receive_into() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    stream = encode_frame(body) + encode_frame(b"tail")
    decoder = FrameDecoder()
    pos = 0
    got: list[bytes] = []
    while pos < len(stream):
        view = decoder.get_buffer(1000)
        n = min(len(view), len(stream) - pos, 300_000)
        view[:n] = stream[pos : pos + n]
        view.release()
        decoder.buffer_updated(n)
        pos += n
        got += _drain(decoder)
    assert got == [body, b"tail"]
    with pytest.raises(ValueError, match="exceeds"):
        decoder.buffer_updated(10**9)


def test_oversized_prefix_rejected_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.receive_data(struct.pack(">I", 1001))
    decoder.receive_data(bytes(5000))
    assert decoder.buffered == 4, "the body of an oversized frame is never buffered"
    with pytest.raises(RemoteProtocolError, match="1001 bytes exceeds the limit of 1000") as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_oversized_second_frame_rejected() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    decoder.receive_data(encode_frame(b"ok") + struct.pack(">I", 2**32 - 1))
    assert bytes(decoder.next_frame() or b"") == b"ok"
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_frame()


def test_empty_frame_rejected() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(bytes(4))
    with pytest.raises(RemoteProtocolError, match="empty frame"):
        decoder.next_frame()


def test_truncated_stream() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"hello")[:-2])
    assert decoder.next_frame() is None
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="got 3 of 5 bytes"):
        decoder.next_frame()
    decoder = FrameDecoder()
    decoder.receive_data(b"\x00\x00")
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="frame header"):
        decoder.next_frame()
    with pytest.raises(RemoteProtocolError, match="after the end"):
        decoder.receive_data(b"x")


def test_clean_end_of_stream() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"x"))
    decoder.receive_data(b"")
    assert bytes(decoder.next_frame() or b"") == b"x"
    assert decoder.next_frame() is None and decoder.eof


def test_invalid_limit() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(0)


def test_buffer_is_released_after_a_huge_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(bytes(9 * 2**20)))
    view = decoder.next_frame()
    assert view is not None and len(view) == 9 * 2**20
    assert decoder.next_frame() is None
    assert bytes(view[:4]) == bytes(4), "a view still held stays valid"
    view.release()
    decoder.receive_data(encode_frame(b"small"))
    assert bytes(decoder.next_frame() or b"") == b"small"
    assert decoder.capacity < 2**20


def test_condemned_stream_is_not_buffered_through_get_buffer() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    view = decoder.get_buffer()
    view[:4] = struct.pack(">I", 10**6)
    view.release()
    decoder.buffer_updated(4)
    for _ in range(5):
        view = decoder.get_buffer(65536)
        n = len(view)
        view.release()
        decoder.buffer_updated(n)
    assert decoder.buffered == 4
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_frame()


def test_a_header_alone_does_not_reserve_its_whole_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", 60 * 2**20))
    view = decoder.get_buffer()
    assert len(view) < 16 * 2**20
    view.release()


@pytest.mark.parametrize("chunk", [1000, 65536])
def test_buffer_growth_is_capped_at_one_frame_and_a_read(chunk: int) -> None:
    # Doubling alone would leave ~2x the largest frame allocated per peer.
    limit = 2**20
    bodies = [bytes([i]) * size for i, size in enumerate([limit, 300_000, limit, 17, limit])]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(max_frame_size=limit)
    frames: list[bytes] = []
    peak = 0
    for i in range(0, len(stream), chunk):
        decoder.receive_data(stream[i : i + chunk])
        peak = max(peak, decoder.capacity)
        frames += _drain(decoder)
    assert frames == bodies
    assert limit <= peak <= 4 + limit + max(chunk, 65536), peak


def test_buffer_growth_is_capped_through_get_buffer() -> None:
    limit = 3 * 2**20 + 5
    bodies = [b"a" * limit, b"b" * 1000, b"c" * limit]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(max_frame_size=limit)
    frames: list[bytes] = []
    peak, sent = 0, 0
    while sent < len(stream):
        view = decoder.get_buffer(65536)
        n = min(len(view), len(stream) - sent, 65536)
        view[:n] = stream[sent : sent + n]
        view.release()
        decoder.buffer_updated(n)
        sent += n
        peak = max(peak, decoder.capacity)
        frames += _drain(decoder)
    assert frames == bodies
    assert peak <= 4 + limit + 65536, peak
