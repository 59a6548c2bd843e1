"""Tests of protocol.connection: the state machine both ways, through a fake link."""

from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._common import stub_description
from protocol import (
    CODECS,
    NEED_DATA,
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    ConnectionState,
    Error,
    ErrorCode,
    Event,
    Hello,
    Infer,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Result,
    Role,
    Welcome,
    pack,
    unpack,
)
from protocol.framing import encode_frame
from protocol.messages import encode_message
from tests.support.protocol import SHA, ConnectionPair, messages


def _tensor(shape: tuple[int, ...] = (1, 4, 6, 6)) -> np.ndarray:
    return np.maximum(np.random.default_rng(0).standard_normal(shape), 0).astype(np.float32)


def _infer(request_id: int, codec: str = "sparse_int8") -> Infer:
    return Infer(request_id, split=2, thr_conf=0.8, tensor=pack(_tensor(), codec))


def test_full_conversation() -> None:
    pair = ConnectionPair()
    d, s = pair.device, pair.server
    assert d.state is s.state is ConnectionState.AWAIT_HELLO
    pair.send(d, Hello(PROTOCOL_VERSION, "resnet20", SHA, CODECS))
    assert d.state is s.state is ConnectionState.AWAIT_WELCOME
    pair.send(
        s,
        Welcome(
            PROTOCOL_VERSION,
            "resnet20",
            SHA,
            ("sparse_int8",),
            True,
            description=stub_description(),
        ),
    )
    assert d.state is s.state is ConnectionState.OPEN
    assert d.codecs == s.codecs == ("sparse_int8",)
    [infer] = pair.send(d, _infer(1))
    assert isinstance(infer, Infer) and infer == _infer(1)
    assert d.outstanding == s.outstanding == {1}
    result = Result(1, exit_index=3, classes=(4, 1), probs=(0.9, 0.05), compute_ms=2.5)
    assert pair.send(s, result) == [result]
    assert d.outstanding == s.outstanding == frozenset()
    ping = Ping(0, sent_at=100.0, padding=b"\x00" * 5000)
    assert pair.send(d, ping) == [ping]
    assert pair.send(s, Pong.reply_to(ping, 100.5)) == [Pong(0, 100.0, 100.5, 5000)]
    server_ping = Ping(0, 7.0)
    assert pair.send(s, server_ping) == [server_ping]  # either side may ping
    pair.send(d, Pong.reply_to(server_ping, 8.0))
    pair.send(d, Bye("done"))
    assert d.state is s.state is ConnectionState.CLOSING
    pair.send(s, Bye())
    assert d.state is s.state is ConnectionState.CLOSED
    d.receive_data(b"")
    assert d.next_event() == ConnectionClosed(clean=True)


def test_infer_before_handshake_is_illegal_both_ways() -> None:
    device = Connection(Role.DEVICE)
    with pytest.raises(LocalProtocolError, match="may not send INFER in state await_hello"):
        device.send(_infer(1))
    assert device.state is ConnectionState.AWAIT_HELLO, "a refused send changes nothing"
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame(encode_message(_infer(1))))
    with pytest.raises(RemoteProtocolError, match="device may not send INFER") as info:
        server.next_event()
    assert info.value.code is ErrorCode.PROTOCOL
    assert server.state is ConnectionState.FAILED
    with pytest.raises(LocalProtocolError, match="cannot be reused"):
        server.next_event()
    with pytest.raises(LocalProtocolError, match="do not feed"):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError, match="only a fatal ERROR"):
        server.send(Bye())
    frame = server.send(Error(info.value.code, str(info.value)))
    assert frame and server.state is ConnectionState.CLOSED


def test_roles_are_enforced() -> None:
    pair = ConnectionPair()
    pair.handshake()
    with pytest.raises(LocalProtocolError, match="server may not send INFER"):
        pair.server.send(_infer(1))
    with pytest.raises(LocalProtocolError, match="device may not send RESULT"):
        pair.device.send(Result(1, 0, (1,), (1.0,)))
    with pytest.raises(LocalProtocolError, match="device may not send HELLO"):
        pair.device.send(Hello(PROTOCOL_VERSION, "m", "", CODECS))
    with pytest.raises(LocalProtocolError, match="device may not answer"):
        pair.device.send(Error(ErrorCode.BUSY, "x", request_id=1))
    with pytest.raises(LocalProtocolError, match="not a protocol message"):
        pair.device.send("INFER")  # type: ignore[arg-type]


def test_version_mismatch() -> None:
    server = Connection(Role.SERVER)
    wire = [1, {"version": 3, "model_id": "m", "weights_sha256": "", "codecs": ["int8"]}]
    server.receive_data(encode_frame(msgpack.packb(wire)))
    with pytest.raises(RemoteProtocolError, match="version 3; this end speaks 1 and 2") as info:
        server.next_event()
    assert info.value.code is ErrorCode.VERSION
    with pytest.raises(LocalProtocolError, match="version") as local:
        Connection(Role.DEVICE).send(Hello(PROTOCOL_VERSION + 1, "m", "", CODECS))
    assert local.value.code is ErrorCode.VERSION


def test_welcome_must_choose_offered_codecs() -> None:
    pair = ConnectionPair()
    pair.send(pair.device, Hello(PROTOCOL_VERSION, "m", "", ("int8",)))
    with pytest.raises(LocalProtocolError, match="not offered"):
        pair.server.send(
            Welcome(PROTOCOL_VERSION, "m", "", ("float32",), False, description=stub_description())
        )
    with pytest.raises(LocalProtocolError, match="no codec"):
        pair.server.send(
            Welcome(PROTOCOL_VERSION, "m", "", (), False, description=stub_description())
        )
    # A fatal ERROR is how a server refuses the handshake (e.g. another model).
    refusal = Error(ErrorCode.MODEL_MISMATCH, "serving resnet56")
    assert pair.send(pair.server, refusal) == [refusal]
    assert pair.device.state is pair.server.state is ConnectionState.CLOSED


def test_infer_limits_and_codecs() -> None:
    pair = ConnectionPair(ConnectionConfig(max_outstanding=2, max_tensor_elements=200))
    pair.handshake(codecs=("sparse_int8", "int8"))
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        pair.device.send(_infer(1, "float32"))
    with pytest.raises(LocalProtocolError, match="limit is 200") as info:
        pair.device.send(Infer(1, 1, 0.5, pack(np.zeros(201, np.float32))))
    assert info.value.code is ErrorCode.TOO_LARGE
    pair.send(pair.device, _infer(1))
    with pytest.raises(LocalProtocolError, match="reuses request id 1"):
        pair.device.send(_infer(1))
    pair.send(pair.device, _infer(2, "int8"))
    with pytest.raises(LocalProtocolError, match="2 unanswered"):
        pair.device.send(_infer(3))


def test_peer_exceeding_limits_is_remote_error() -> None:
    pair = ConnectionPair(ConnectionConfig(max_tensor_elements=200))
    pair.handshake()
    lax_device = Connection(Role.DEVICE)  # a peer with larger limits than the server
    lax_device.send(Hello(PROTOCOL_VERSION, "m", "", CODECS))
    lax_device._welcome = Welcome(
        PROTOCOL_VERSION, "m", "", CODECS, True, description=stub_description()
    )
    lax_device._phase = ConnectionState.OPEN
    pair.server.receive_data(lax_device.send(Infer(1, 1, 0.5, pack(np.zeros(500)))))
    with pytest.raises(RemoteProtocolError, match="limit is 200") as info:
        pair.server.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_answers_must_match_outstanding_requests() -> None:
    pair = ConnectionPair()
    pair.handshake()
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        pair.server.send(Result(5, 0, (1,), (1.0,)))
    # A device receiving an answer to a request it never made: the peer is broken.
    pair.device.receive_data(encode_frame(encode_message(Result(5, 0, (1,), (1.0,)))))
    with pytest.raises(RemoteProtocolError, match="request id 5, which is not outstanding"):
        pair.device.next_event()


def test_request_error_keeps_connection_fatal_error_closes() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.device, _infer(1))
    busy = Error(ErrorCode.BUSY, "queue full", request_id=1)
    assert pair.send(pair.server, busy) == [busy]
    assert pair.device.state is ConnectionState.OPEN and not pair.device.outstanding
    pair.send(pair.device, _infer(2))
    fatal = Error(ErrorCode.INTERNAL, "shutting down")
    assert pair.send(pair.server, fatal) == [fatal]
    assert pair.device.state is pair.server.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError, match="after the connection closed"):
        pair.device.send(_infer(3))


def test_cancel_may_cross_the_result() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.device, _infer(1))
    # The server answers while the device, whose local exit was confident, cancels.
    result_bytes = pair.server.send(Result(1, 2, (3,), (0.7,)))
    cancel_bytes = pair.device.send(Cancel(1))
    pair.server.receive_data(cancel_bytes)
    assert pair.server.next_event() == Cancel(1)
    pair.device.receive_data(result_bytes)
    assert pair.device.next_event() == Result(1, 2, (3,), (0.7,))
    # The usual case: the server answers the cancelled request with ERROR CANCELLED.
    pair.send(pair.device, _infer(2))
    pair.send(pair.device, Cancel(2))
    pair.send(pair.server, Error(ErrorCode.CANCELLED, "cancelled", request_id=2))
    assert not pair.device.outstanding and not pair.server.outstanding


def test_ping_pong_checks() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.device, Ping(1, 1.0, b"abc"))
    with pytest.raises(LocalProtocolError, match="reuses sequence number 1"):
        pair.device.send(Ping(1, 2.0))
    with pytest.raises(LocalProtocolError, match="padding_len 0"):
        pair.server.send(Pong(1, 1.0, 1.5, 0))
    with pytest.raises(LocalProtocolError, match="not an unanswered PING"):
        pair.server.send(Pong(2, 1.0, 1.5, 3))
    pair.send(pair.server, Pong(1, 1.0, 1.5, 3))
    pair.device.receive_data(pair.server.send(Ping(1, 5.0)))
    pair.device.next_event()
    pair.device.receive_data(encode_frame(encode_message(Pong(1, 5.0, 6.0))))
    with pytest.raises(RemoteProtocolError, match="PONG for sequence number 1"):
        pair.device.next_event()


def test_bye_is_a_half_close() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.device, _infer(1))
    pair.send(pair.device, Bye("leaving"))
    with pytest.raises(LocalProtocolError, match="after its own BYE"):
        pair.device.send(Cancel(1))
    with pytest.raises(LocalProtocolError, match="server may not send PING"):
        pair.server.send(Ping(1, 0.0))
    # The server still answers what is outstanding, then says BYE itself.
    pair.send(pair.server, Result(1, 0, (1,), (1.0,)))
    pair.send(pair.server, Bye())
    assert pair.device.state is ConnectionState.CLOSED


def test_frame_after_peer_bye_is_remote_error() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.device, Bye())
    pair.server.receive_data(encode_frame(encode_message(Cancel(1))))
    with pytest.raises(RemoteProtocolError, match="after its own BYE"):
        pair.server.next_event()


def test_end_of_stream() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.device.receive_data(b"")
    assert pair.device.next_event() == ConnectionClosed(clean=False)
    assert pair.device.state is ConnectionState.CLOSED
    server = Connection(Role.SERVER)
    frame = encode_frame(encode_message(Hello(PROTOCOL_VERSION, "m", "", CODECS)))
    server.receive_data(frame[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="stream ended inside a frame"):
        server.next_event()


def test_byte_at_a_time_and_many_frames_in_one_read() -> None:
    device = Connection(Role.DEVICE)
    frames = [
        device.send(Hello(PROTOCOL_VERSION, "m", SHA, CODECS)),
        device.send(Bye()),
    ]
    server = Connection(Role.SERVER)
    got: list[object] = []
    for byte in b"".join(frames):
        server.receive_data(bytes([byte]))
        while (event := server.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == [Hello(PROTOCOL_VERSION, "m", SHA, CODECS), Bye()]
    pair = ConnectionPair()
    pair.handshake()
    burst = b"".join(pair.device.send(_infer(i)) for i in range(50))
    pair.server.receive_data(burst)
    ids = []
    while (event := pair.server.next_event()) is not NEED_DATA:
        assert isinstance(event, Infer)
        ids.append(event.request_id)
    assert ids == list(range(50))


def test_receive_into_buffer() -> None:
    pair = ConnectionPair()
    pair.handshake()
    big = Infer(1, 0, 0.5, pack(np.ones((1, 3, 256, 256), np.float32), "float32", False))
    data = pair.device.send(big)
    pos = 0
    while pos < len(data):
        view = pair.server.get_buffer(65536)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        view.release()
        pair.server.buffer_updated(n)
        pos += n
    assert pair.server.next_event() == big


def test_oversized_frames() -> None:
    config = ConnectionConfig(max_frame_size=1024)
    server = Connection(Role.SERVER, config)
    server.receive_data(struct.pack(">I", 1025))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 1024") as info:
        server.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE
    device = Connection(Role.DEVICE, config)
    with pytest.raises(LocalProtocolError, match="exceeds the limit") as local:
        device.send(Hello(PROTOCOL_VERSION, "m" * 2000, "", CODECS))
    assert local.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc1", "not valid msgpack"),  # 0xc1 is never used in msgpack
        (b"\x92\x01", "not valid msgpack"),  # truncated array
        (msgpack.packb([1, {}]) + b"\x00", "not valid msgpack"),  # trailing data
        (msgpack.packb([1, {1: 2}]), "not valid msgpack"),  # non-text map key
        (b"\xa2\xff\xfe", "not valid msgpack"),  # invalid UTF-8
        (msgpack.packb([1, msgpack.ExtType(1, b"x")]), "ext type 1"),
        (msgpack.packb([42, {}]), "unknown message type 42"),
        (msgpack.packb([1, {"version": "1"}]), "missing field"),
    ],
)
def test_garbage_bodies(body: bytes, match: str) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame(body))
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        ConnectionConfig(max_frame_size=2**40)
    with pytest.raises(ValueError, match="max_outstanding"):
        ConnectionConfig(max_outstanding=0)
    with pytest.raises(TypeError, match="Role"):
        Connection("device")  # type: ignore[arg-type]


def _drain_or_protocol_error(conn: Connection) -> None:
    try:
        for _ in range(1000):
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
    except ProtocolError:
        return


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(list(Role)), st.booleans())
def test_random_bytes_never_crash_the_decoder(data: bytes, role: Role, eof: bool) -> None:
    conn = Connection(role)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    _drain_or_protocol_error(conn)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=4), st.booleans())
def test_random_msgpack_frames_never_crash(bodies: list[bytes], handshaken: bool) -> None:
    pair = ConnectionPair()
    if handshaken:
        pair.handshake()
    pair.server.receive_data(b"".join(encode_frame(b) for b in bodies))
    _drain_or_protocol_error(pair.server)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=5), st.booleans(), st.sampled_from(list(Role)))
def test_well_formed_messages_in_any_order_only_raise_protocol_errors(
    msgs: list[Message], handshaken: bool, receiver: Role
) -> None:
    pair = ConnectionPair()
    if handshaken:
        pair.handshake()
    conn = pair.server if receiver is Role.SERVER else pair.device
    conn.receive_data(b"".join(encode_frame(encode_message(m)) for m in msgs))
    _drain_or_protocol_error(conn)


def test_send_parts_is_send_without_the_copy() -> None:
    pair = ConnectionPair()
    pair.handshake()
    infer = _infer(1)
    parts = pair.device.send_parts(infer)
    assert parts[-1] is infer.tensor.payload, "the payload itself, not a copy"
    other = ConnectionPair()
    other.handshake()
    assert b"".join(parts) == other.device.send(infer)
    assert len(pair.device.send_parts(Cancel(1))) == 1


def test_over_a_real_socket_pair() -> None:
    # Kernel sockets, no threads: every frame here fits in the socket buffers.
    dev_sock, srv_sock = socket.socketpair()
    with dev_sock, srv_sock:
        dev_sock.settimeout(5)
        srv_sock.settimeout(5)
        device, server = Connection(Role.DEVICE), Connection(Role.SERVER)

        def pump(sock: socket.socket, conn: Connection) -> Event:
            while (event := conn.next_event()) is NEED_DATA:
                view = conn.get_buffer(4096)
                n = sock.recv_into(view)
                view.release()
                if n == 0:
                    conn.receive_data(b"")
                else:
                    conn.buffer_updated(n)
            assert not isinstance(event, type(NEED_DATA))
            return event

        activation = _tensor((1, 8, 16, 16))
        dev_sock.sendmsg(device.send_parts(Hello(PROTOCOL_VERSION, "m", SHA, CODECS)))
        assert isinstance(pump(srv_sock, server), Hello)
        srv_sock.sendall(
            server.send(
                Welcome(PROTOCOL_VERSION, "m", SHA, CODECS, False, description=stub_description())
            )
        )
        assert isinstance(pump(dev_sock, device), Welcome)
        dev_sock.sendmsg(device.send_parts(Infer(3, 2, 0.9, pack(activation))))
        infer = pump(srv_sock, server)
        assert isinstance(infer, Infer)
        restored = unpack(infer.tensor)
        assert np.abs(restored - activation).max() <= infer.tensor.scale / 2 * (1 + 1e-6)
        srv_sock.sendall(server.send(Result(3, 1, (2,), (0.97,))))
        assert pump(dev_sock, device) == Result(3, 1, (2,), (0.97,))
        dev_sock.sendall(device.send(Bye()))
        assert pump(srv_sock, server) == Bye()
        srv_sock.sendall(server.send(Bye()))
        srv_sock.shutdown(socket.SHUT_WR)
        assert pump(dev_sock, device) == Bye()
        assert pump(dev_sock, device) == ConnectionClosed(clean=True)


def test_sparse_uintb_only_where_the_server_accepted_it() -> None:
    # A server that does not know the lossy codec (PROTOCOL.md §6.8) leaves it out of
    # WELCOME; the device's connection then refuses to send it, and the server's refuses
    # to receive it.
    pair = ConnectionPair()
    pair.handshake(codecs=("sparse_uintb", "sparse_int8"), accept=("sparse_int8",))
    lossy = Infer(1, 1, 0.5, pack(np.ones((1, 4), np.float32), "sparse_uintb", bits=3))
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        pair.device.send(lossy)
    pair.server.receive_data(encode_frame(encode_message(lossy)))
    with pytest.raises(RemoteProtocolError, match="not negotiated"):
        pair.server.next_event()
    accepted = ConnectionPair()
    accepted.handshake(codecs=("sparse_uintb", "sparse_int8"))
    [event] = accepted.send(accepted.device, lossy)
    assert event == lossy
