"""Shared by the protocol tests: message strategies, a connection pair over a fake
link, and the quantisation bound of PROTOCOL.md §6.4."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from bench._common import stub_description
from protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Event,
    Role,
)
from protocol.errors import ErrorCode
from protocol.messages import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Error,
    Hello,
    Infer,
    Message,
    Ping,
    Pong,
    Result,
    Welcome,
)
from protocol.packing import (
    CODECS,
    PackedTensor,
)

__all__ = ["SHA", "ConnectionPair", "assert_within_half_step", "messages"]

F32_EPS = float(np.finfo(np.float32).eps)

ids = st.integers(0, 2**64 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(0.0, 1e12)
text = st.text(max_size=40)
sha = st.one_of(st.just(""), st.text("0123456789abcdef", min_size=64, max_size=64))
codec_lists = st.lists(st.sampled_from(CODECS), max_size=4, unique=True).map(tuple)


@st.composite
def packed_tensors(draw: st.DrawFn) -> PackedTensor:
    codec = draw(st.sampled_from(CODECS))
    quantised = codec in ("int8", "sparse_int8")
    return PackedTensor(
        codec=codec,
        compressed=draw(st.booleans()),
        shape=tuple(draw(st.lists(st.integers(0, 2**31 - 1), max_size=8))),
        scale=draw(st.floats(2.0**-126, 2.0**120)) if quantised else 1.0,
        zero_point=draw(st.integers(-128, 127)) if quantised else 0,
        payload=draw(st.binary(max_size=200)),
    )


@st.composite
def results(draw: st.DrawFn) -> Result:
    k = draw(st.integers(1, 5))
    return Result(
        request_id=draw(ids),
        exit_index=draw(st.integers(0, 100)),
        classes=tuple(draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k))),
        probs=tuple(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))),
        compute_ms=draw(st.one_of(st.none(), non_negative)),
        held_ms=draw(st.one_of(st.none(), non_negative)),
    )


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, st.integers(0, 2**32 - 1), text, sha, codec_lists, text),
    st.builds(Welcome, st.integers(0, 2**32 - 1), text, sha, codec_lists, st.booleans(), text),
    st.builds(
        Infer,
        ids,
        st.integers(0, 1000),
        st.floats(0.0, 1.0),
        packed_tensors(),
        st.one_of(st.none(), non_negative),
        st.booleans(),
    ),
    results(),
    st.builds(Cancel, ids),
    st.builds(Ping, ids, finite, st.binary(max_size=300)),
    st.builds(Pong, ids, finite, finite, st.integers(0, 2**32 - 1), st.one_of(st.none(), ids)),
    st.builds(Error, st.sampled_from(ErrorCode), text, st.one_of(st.none(), ids)),
    st.builds(Bye, text),
)


SHA = "ab" * 32


class ConnectionPair:
    """A device and a server joined by an in-memory link (bytes are really encoded)."""

    def __init__(self, config: ConnectionConfig | None = None) -> None:
        self.device = Connection(Role.DEVICE, config)
        self.server = Connection(Role.SERVER, config)

    def _peer(self, conn: Connection) -> Connection:
        return self.server if conn is self.device else self.device

    def send(self, conn: Connection, message: Message) -> list[Event]:
        data = conn.send(message)
        peer = self._peer(conn)
        peer.receive_data(data)
        events: list[Event] = []
        while (event := peer.next_event()) is not NEED_DATA:
            assert not isinstance(event, type(NEED_DATA))
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return events

    def handshake(
        self, codecs: tuple[str, ...] = CODECS, accept: tuple[str, ...] | None = None
    ) -> None:
        assert self.send(self.device, Hello(PROTOCOL_VERSION, "resnet20", SHA, codecs, "dev"))
        welcome = Welcome(
            PROTOCOL_VERSION,
            "resnet20",
            SHA,
            codecs if accept is None else accept,
            True,
            "srv",
            description=stub_description(),
        )
        assert self.send(self.server, welcome) == [welcome]


def assert_within_half_step(x: np.ndarray, y: np.ndarray, scale: float) -> None:
    # |x − x̂| ≤ scale/2, plus a few float32 ulps of the operands (PROTOCOL.md §6.4).
    bound = scale / 2 + 4 * F32_EPS * (np.abs(x) + scale)
    assert np.all(np.abs(x.astype(np.float64) - y) <= bound)
