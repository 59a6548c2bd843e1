"""Credentials of the runtime: the shared token file and TLS contexts (docs/PROTOCOL.md §10).

The token proves each end to the other in the handshake (``protocol.auth``,
PROTOCOL.md §10); TLS (the standard :mod:`ssl` module) encrypts the stream and, with
client certificates, authenticates devices a second way. Both are optional and
independent: a trusted network needs neither, a hostile one should use both.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from protocol.auth import MIN_TOKEN_SIZE

__all__ = ["SecurityError", "device_ssl_context", "load_token", "server_ssl_context"]

_MAX_TOKEN_FILE = 4096


class SecurityError(ValueError):
    """A token file or certificate cannot be used; the message names the file and why."""


def load_token(path: Path) -> bytes:
    """The shared token in ``path``: its bytes without surrounding whitespace.

    At least ``MIN_TOKEN_SIZE`` (16) bytes, so that the HMAC cannot be brute-forced; e.g.
    ``openssl rand -hex 32 > token``. A file others can read is refused, like ssh keys.
    """
    path = Path(path)
    try:
        stat = path.stat()
        if stat.st_size > _MAX_TOKEN_FILE:
            raise SecurityError(f"token file {path} is {stat.st_size} bytes; a token is short")
        data = path.read_bytes().strip()
    except OSError as exc:
        raise SecurityError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if stat.st_mode & 0o077:
        raise SecurityError(
            f"token file {path} is readable by other users (mode {stat.st_mode & 0o777:o}); "
            f"run chmod 600 {path}"
        )
    if len(data) < MIN_TOKEN_SIZE:
        raise SecurityError(
            f"token in {path} has {len(data)} bytes; at least {MIN_TOKEN_SIZE} are needed "
            "(e.g. openssl rand -hex 32)"
        )
    return data


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    try:
        context.load_cert_chain(str(cert), None if key is None else str(key))
    except FileNotFoundError as exc:
        raise SecurityError(f"{what}: {exc.filename or cert} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise SecurityError(f"{what}: cannot load {cert} / {key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise SecurityError(f"{what}: CA file {ca} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise SecurityError(f"{what}: cannot load CA file {ca}: {exc}") from None


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS for the server: its certificate and key; with ``client_ca``, devices must present
    a certificate signed by it (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key, "security.tls_cert/security.tls_key")
    if client_ca is not None:
        _load_ca(context, client_ca, "security.tls_client_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def device_ssl_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS for the device: the server's certificate is verified against ``ca`` (None: the
    system's trusted CAs) including its host name; ``cert``/``key`` are the device's own
    certificate for servers that require one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(context, ca, "link.tls_ca")
    if cert is not None:
        _load_chain(context, cert, key, "link.tls_cert/link.tls_key")
    elif key is not None:
        raise SecurityError("link.tls_key needs link.tls_cert")
    return context
