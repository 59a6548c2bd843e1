"""Length-prefixed framing (PROTOCOL.md §3): a 4-byte big-endian length, then msgpack.

`FrameDecoder` is the incremental receive buffer: bytes go in through `receive_data` (or,
without a copy, through `get_buffer`/`buffer_updated` as in asyncio's BufferedProtocol)
and complete frame bodies come out of `next_frame`. The buffer is one bytearray with a
read offset that is compacted lazily, so a frame is copied once on its way in and never
re-sliced byte by byte.
"""

from __future__ import annotations

import struct
from typing import Final

import msgpack

from protocol.errors import ErrorCode, RemoteProtocolError

__all__ = [
    "FRAME_HEADER",
    "HEADER_SIZE",
    "DEFAULT_MAX_FRAME_SIZE",
    "FrameDecoder",
    "decode_msgpack",
    "encode_frame",
]

HEADER_SIZE: Final = 4
"""Bytes of the length prefix."""

DEFAULT_MAX_FRAME_SIZE: Final = 64 * 2**20
"""Default limit on a frame body: 64 MiB."""

FRAME_HEADER: Final = struct.Struct(">I")
"""The length prefix: unsigned 32-bit big-endian."""
_MIN_READ: Final = 64 * 1024
_MAX_READ: Final = 4 * 2**20
_KEEP_CAPACITY: Final = 8 * 2**20


def encode_frame(body: bytes) -> bytes:
    """`body` with its length prefix."""
    return FRAME_HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental splitter of a byte stream into frame bodies.

    A length prefix above `max_frame_size` (or zero) is rejected as soon as its four bytes
    have arrived, before any of the body is buffered (PROTOCOL.md §3).
    """

    __slots__ = ("_buf", "_start", "_end", "_max_frame_size", "_error", "_eof", "_discard")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= 0xFFFFFFFF:
            raise ValueError(f"max_frame_size must be in [1, 2**32 - 1], got {max_frame_size}")
        self._buf = bytearray()
        self._start = 0
        self._end = 0
        self._max_frame_size = max_frame_size
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self._discard: bytearray | None = None

    @property
    def max_frame_size(self) -> int:
        """The limit on the next frames; a connection raises it after its handshake."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if not 0 < value <= 0xFFFFFFFF:
            raise ValueError(f"max_frame_size must be in [1, 2**32 - 1], got {value}")
        self._max_frame_size = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        """Bytes allocated for the receive buffer: the memory this stream holds.

        At most `HEADER_SIZE + max_frame_size` plus one read (64 KiB, or the `receive_data`
        chunk or `get_buffer` size hint when larger), whatever the frame sizes, while
        frames are taken out with `next_frame` as they complete.
        """
        return len(self._buf)

    @property
    def eof(self) -> bool:
        """True once the end of the stream was signalled."""
        return self._eof

    def _check_header(self) -> None:
        # Only the frame at the read offset is checked eagerly; later headers are checked
        # when `next_frame` reaches them, which bounds the buffer at one frame plus a read.
        if self._error is None and self._end - self._start >= HEADER_SIZE:
            (length,) = FRAME_HEADER.unpack_from(self._buf, self._start)
            if length > self._max_frame_size:
                self._error = RemoteProtocolError(
                    f"frame of {length} bytes exceeds the limit of {self._max_frame_size}",
                    ErrorCode.TOO_LARGE,
                )
            elif length == 0:
                self._error = RemoteProtocolError("empty frame (length prefix 0)")

    def _reserve(self, n: int) -> None:
        """Make room for `n` more bytes after `_end`.

        Live bytes are moved to the front only when they are few compared with the space
        this frees; otherwise the buffer grows to twice what is needed, so a stream of
        large frames is copied at most about once more on average, not once per frame.
        The doubling stops at one largest frame, its header and one 64 KiB read (more only
        when a larger chunk must fit at once): what one peer can make the receiver allocate
        is bounded by the frame limit, not twice it.
        """
        if len(self._buf) - self._end >= n:
            return
        live = self._end - self._start
        cap = HEADER_SIZE + self._max_frame_size + _MIN_READ
        if live + n <= len(self._buf) and (live <= self._start or len(self._buf) >= cap):
            self._buf[:live] = memoryview(self._buf)[self._start : self._end]
            self._start, self._end = 0, live
            return
        if self._start:
            # Growing anyway: drop the consumed prefix in the same reallocation.
            del self._buf[: self._start]
            self._start, self._end = 0, live
        size = max(live + n, min(2 * (live + n), cap))
        if size > len(self._buf):
            self._buf.extend(bytes(size - len(self._buf)))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the stream; b"" marks the end of the stream."""
        n = len(data)
        if n == 0:
            self._eof = True
            return
        if self._eof:
            raise RemoteProtocolError("data received after the end of the stream")
        if self._error is not None:
            return  # the stream is already condemned: do not buffer the oversized body
        self._reserve(n)
        self._buf[self._end : self._end + n] = data
        self._end += n
        self._check_header()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to receive into (asyncio BufferedProtocol.get_buffer).

        Sized for the rest of the current frame when its header is known, so that a large
        frame arrives with one `recv_into` and no intermediate copy.
        """
        if self._error is not None:
            # The stream is condemned (e.g. an oversized prefix): read into a scratch area
            # that `buffer_updated` discards, so nothing of it is ever buffered.
            return memoryview(self._scratch())
        want = max(sizehint, _MIN_READ)
        live = self._end - self._start
        if live >= HEADER_SIZE:
            (length,) = FRAME_HEADER.unpack_from(self._buf, self._start)
            # Capped: memory follows the bytes that actually arrive, not a header's promise.
            want = max(want, min(HEADER_SIZE + length - live, _MAX_READ))
        self._reserve(want)
        return memoryview(self._buf)[self._end :]

    def _scratch(self) -> bytearray:
        if self._discard is None:
            self._discard = bytearray(_MIN_READ)
        return self._discard

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written into the view from `get_buffer`."""
        if self._error is not None:
            return  # read into the scratch area of a condemned stream: dropped
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"buffer_updated({nbytes}) exceeds the buffer handed out")
        if self._eof:
            raise RemoteProtocolError("data received after the end of the stream")
        self._end += nbytes
        self._check_header()

    def next_frame(self) -> memoryview | None:
        """The next complete frame body, or None if more bytes are needed.

        The view stays valid only until the next call on this decoder; release it (or copy
        what is needed) first. Raises `RemoteProtocolError` on an oversized, empty or — at
        the end of the stream — truncated frame.
        """
        if self._error is not None:
            raise self._error
        live = self._end - self._start
        if live < HEADER_SIZE:
            if live and self._eof:
                self._error = RemoteProtocolError(
                    f"stream ended inside a frame header ({live} of {HEADER_SIZE} bytes)"
                )
                raise self._error
            if live == 0 and self._start:
                self._start = self._end = 0
                if len(self._buf) > _KEEP_CAPACITY:
                    # One huge frame must not pin its buffer for the connection's lifetime;
                    # a view of that frame still held elsewhere keeps the old one alive.
                    self._buf = bytearray()
            return None
        (length,) = FRAME_HEADER.unpack_from(self._buf, self._start)
        if length > self._max_frame_size or length == 0:
            self._check_header()
            assert self._error is not None
            raise self._error
        if live < HEADER_SIZE + length:
            if self._eof:
                self._error = RemoteProtocolError(
                    f"stream ended inside a frame: got {live - HEADER_SIZE} of {length} bytes"
                )
                raise self._error
            return None
        begin = self._start + HEADER_SIZE
        self._start = begin + length
        self._check_header()
        return memoryview(self._buf)[begin : begin + length]


def decode_msgpack(body: bytes | memoryview) -> object:
    """One msgpack object from untrusted bytes, arrays as tuples: the one place the
    protocol decodes msgpack (frames in `protocol.connection`, dictionary files in `protocol.dictionaries`)."""
    # strict_map_key and raw=False: keys must be text and text valid UTF-8; msgpack bounds
    # every declared length by the frame itself, so a hostile frame cannot force a large
    # allocation (msgpack-python "untrusted data" advice).
    return msgpack.unpackb(
        body, use_list=False, raw=False, strict_map_key=True, ext_hook=_reject_ext
    )


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack ext type {code} is not used by this protocol")
