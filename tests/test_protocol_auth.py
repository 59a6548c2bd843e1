"""HMAC proofs of the shared-token handshake (protocol.auth, PROTOCOL.md §10)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

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
