"""HMAC proofs of the shared-token handshake (protocol.auth, PROTOCOL.md §10)."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest

from bench._common import stub_description
from protocol import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Connection,
    ConnectionConfig,
    ConnectionState,
    ErrorCode,
    Hello,
    Infer,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    Welcome,
    pack,
)
from protocol.auth import (
    NONCE_SIZE,
    PROOF_SIZE,
    device_proof,
    proofs_equal,
    server_proof,
)

TOKEN = b"0123456789abcdef-shared-token"
DN = bytes(range(NONCE_SIZE))
SN = bytes(range(100, 100 + NONCE_SIZE))


def test_proofs_are_the_documented_hmacs() -> None:
    expected = hmac.new(TOKEN, b"SPINN-1 device" + DN + SN, hashlib.sha256).digest()
    assert device_proof(TOKEN, DN, SN) == expected
    assert len(server_proof(TOKEN, DN, SN)) == PROOF_SIZE


def test_roles_nonces_and_tokens_all_change_the_proof() -> None:
    base = device_proof(TOKEN, DN, SN)
    assert server_proof(TOKEN, DN, SN) != base  # a server proof cannot be replayed as AUTH
    assert device_proof(TOKEN, SN, DN) != base
    assert device_proof(TOKEN + b"x", DN, SN) != base
    assert device_proof(TOKEN, DN, SN[:-1] + b"\xff") != base


def test_comparison() -> None:
    proof = device_proof(TOKEN, DN, SN)
    assert proofs_equal(proof, bytes(proof))
    assert not proofs_equal(proof, proof[:-1] + bytes([proof[-1] ^ 1]))
    assert not proofs_equal(proof, b"")


def test_short_tokens_and_bad_nonces_are_refused() -> None:
    with pytest.raises(ValueError, match="token must be at least 16"):
        device_proof(b"short", DN, SN)
    with pytest.raises(ValueError, match="server nonce must be 16..64"):
        server_proof(TOKEN, DN, b"x" * 8)
    with pytest.raises(ValueError, match="device nonce"):
        server_proof(TOKEN, b"x" * 65, SN)


# -- the handshake in the sans-I/O connection (PROTOCOL.md §10) ------------------------------


def _pair(device_token: bytes | None, server_token: bytes | None) -> tuple[Connection, Connection]:
    return (
        Connection(Role.DEVICE, ConnectionConfig(auth_token=device_token)),
        Connection(Role.SERVER, ConnectionConfig(auth_token=server_token)),
    )


def _deliver(src: Connection, dst: Connection, message: object) -> object:
    dst.receive_data(src.send(message))  # type: ignore[arg-type]
    return dst.next_event()


def _hello(nonce: bytes = DN) -> Hello:
    return Hello(PROTOCOL_VERSION, "m", "", ("int8",), "dev", auth_nonce=nonce)


def _welcome() -> Welcome:
    return Welcome(PROTOCOL_VERSION, "m", "", ("int8",), True, description=stub_description())


def test_token_handshake_opens_the_connection_and_lifts_the_frame_limit() -> None:
    device, server = _pair(TOKEN, TOKEN)
    assert _deliver(device, server, _hello()) == _hello()
    challenge = Challenge(SN, server_proof(TOKEN, DN, SN))
    assert _deliver(server, device, challenge) == challenge
    assert device.state is ConnectionState.AWAIT_AUTH is server.state
    wire = device.send(Auth(device_proof(TOKEN, DN, SN)))
    assert TOKEN not in wire  # the token itself never crosses the wire
    server.receive_data(wire)
    assert isinstance(server.next_event(), Auth)
    assert server.authenticated and device.authenticated
    assert isinstance(_deliver(server, device, _welcome()), Welcome)
    assert server.state is ConnectionState.OPEN
    x = np.random.default_rng(0).random(100_000, dtype=np.float32)
    big = Infer(1, 1, 0.5, pack(x, "int8", compress=False))  # a 100 kB frame
    assert isinstance(_deliver(device, server, big), Infer)


def test_server_with_a_token_refuses_a_hello_without_nonce() -> None:
    _, server = _pair(None, TOKEN)
    plain = Connection(Role.DEVICE)
    server.receive_data(plain.send(Hello(PROTOCOL_VERSION, "m", "", ("int8",))))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.UNAUTHENTICATED
    assert "auth_nonce" in str(info.value)


def test_wrong_device_token_is_refused_at_auth() -> None:
    device, server = _pair(TOKEN + b"-wrong", TOKEN)
    _deliver(device, server, _hello())
    # The device with a different token already refuses the server's proof...
    server_side = Challenge(SN, server_proof(TOKEN, DN, SN))
    with pytest.raises(RemoteProtocolError) as info:
        _deliver(server, device, server_side)
    assert info.value.code is ErrorCode.UNAUTHENTICATED
    # ...and a forged AUTH (a guess, or the server's proof replayed) gets nowhere either.
    for forged in (device_proof(TOKEN + b"-wrong", DN, SN), server_proof(TOKEN, DN, SN)):
        device2, server2 = _pair(TOKEN, TOKEN)
        _deliver(device2, server2, _hello())
        _deliver(server2, device2, Challenge(SN, server_proof(TOKEN, DN, SN)))
        server2.receive_data(Connection_send_auth(forged))
        with pytest.raises(RemoteProtocolError) as info:
            server2.next_event()
        assert info.value.code is ErrorCode.UNAUTHENTICATED
        assert not server2.authenticated


def Connection_send_auth(proof: bytes) -> bytes:  # noqa: N802 - reads as the wire it makes
    """An AUTH frame as a hostile device would write it, without a state machine."""
    from protocol.framing import encode_frame
    from protocol.messages import encode_message

    return encode_frame(encode_message(Auth(proof)))


def test_device_with_a_token_refuses_a_server_that_skips_authentication() -> None:
    device, server = _pair(TOKEN, None)
    _deliver(device, server, _hello())  # a server without a token ignores the nonce
    with pytest.raises(RemoteProtocolError) as info:
        _deliver(server, device, _welcome())
    assert info.value.code is ErrorCode.UNAUTHENTICATED


def test_nothing_but_auth_is_accepted_while_challenged() -> None:
    device, server = _pair(TOKEN, TOKEN)
    _deliver(device, server, _hello())
    _deliver(server, device, Challenge(SN, server_proof(TOKEN, DN, SN)))
    with pytest.raises(LocalProtocolError):
        device.send(Infer(1, 1, 0.5, pack(np.ones(4, np.float32), "int8")))
    with pytest.raises(LocalProtocolError, match="may not send WELCOME in state await_auth"):
        server.send(_welcome())


def test_unauthenticated_peer_cannot_make_the_server_buffer_a_large_frame() -> None:
    _, server = _pair(None, TOKEN)
    server.receive_data((1_000_000).to_bytes(4, "big") + b"\0" * 100)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_without_tokens_the_hello_bytes_are_unchanged() -> None:
    plain = Connection(Role.DEVICE).send(Hello(PROTOCOL_VERSION, "resnet20", "",
                                               ("sparse_int8", "int8")))  # fmt: skip
    # PROTOCOL.md §11, the HELLO of the worked example.
    assert plain.hex().startswith("0000005492018")
    device, server = _pair(None, None)
    _deliver(device, server, Hello(PROTOCOL_VERSION, "m", "", ("int8",)))
    assert isinstance(_deliver(server, device, _welcome()), Welcome)
    assert not device.authenticated


def test_auth_messages_validate_their_sizes() -> None:
    with pytest.raises(ValueError, match="nonce must be 16..64"):
        Challenge(b"short", bytes(32))
    with pytest.raises(ValueError, match="proof must be 32..32"):
        Auth(b"\0" * 31)
    with pytest.raises(ValueError, match="auth_nonce"):
        Hello(PROTOCOL_VERSION, "m", "", ("int8",), auth_nonce=b"x")
    with pytest.raises(ValueError, match="auth_token"):
        ConnectionConfig(auth_token=b"short")
    assert TOKEN.decode() not in repr(ConnectionConfig(auth_token=TOKEN))
