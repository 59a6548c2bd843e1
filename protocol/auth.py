"""Shared-token authentication of the handshake (PROTOCOL.md §10).

Both ends hold the same secret token; it never crosses the wire. Each side proves that it
knows the token with an HMAC-SHA256 over both nonces, labelled by role so that one side's
proof can never be replayed as the other's:

    server proof = HMAC-SHA256(token, "SPINN-1 server" ‖ device_nonce ‖ server_nonce)
    device proof = HMAC-SHA256(token, "SPINN-1 device" ‖ device_nonce ‖ server_nonce)

The device's nonce travels in HELLO (``auth_nonce``), the server's nonce and proof in
CHALLENGE, the device's proof in AUTH. Proofs are compared with `hmac.compare_digest`
(constant time). Nothing here reads a clock or a random source: nonces are made by the
caller (``secrets.token_bytes(NONCE_SIZE)`` in the runtime) and passed in.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = [
    "MAX_NONCE_SIZE",
    "MIN_NONCE_SIZE",
    "MIN_TOKEN_SIZE",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "device_proof",
    "proofs_equal",
    "server_proof",
]

NONCE_SIZE: Final = 32
"""Bytes of nonce each side sends (256 bits: never repeats by chance)."""
MIN_NONCE_SIZE: Final = 16
"""Shortest nonce a receiver accepts."""
MAX_NONCE_SIZE: Final = 64
"""Longest nonce a receiver accepts."""
PROOF_SIZE: Final = 32
"""Bytes of an HMAC-SHA256 proof."""
MIN_TOKEN_SIZE: Final = 16
"""Shortest token accepted: 128 bits, so it cannot be found by trying HMACs offline."""

_SERVER_LABEL: Final = b"SPINN-1 server"
_DEVICE_LABEL: Final = b"SPINN-1 device"


def _check(token: bytes, device_nonce: bytes, server_nonce: bytes) -> None:
    if not isinstance(token, bytes) or len(token) < MIN_TOKEN_SIZE:
        raise ValueError(f"the token must be at least {MIN_TOKEN_SIZE} bytes")
    for name, nonce in (("device nonce", device_nonce), ("server nonce", server_nonce)):
        if not isinstance(nonce, bytes) or not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
            raise ValueError(f"{name} must be {MIN_NONCE_SIZE}..{MAX_NONCE_SIZE} bytes")


def server_proof(token: bytes, device_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the server sends in CHALLENGE to prove it holds ``token``."""
    _check(token, device_nonce, server_nonce)
    return hmac.digest(token, _SERVER_LABEL + device_nonce + server_nonce, hashlib.sha256)


def device_proof(token: bytes, device_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the device sends in AUTH to prove it holds ``token``."""
    _check(token, device_nonce, server_nonce)
    return hmac.digest(token, _DEVICE_LABEL + device_nonce + server_nonce, hashlib.sha256)


def proofs_equal(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison: the time taken says nothing about where they differ."""
    return hmac.compare_digest(expected, received)
