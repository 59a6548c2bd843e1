"""Token files, TLS and token authentication of the runtime (docs/PROTOCOL.md §10).

TLS contexts and the token handshake are tested over real sockets, with certificates made
here.
The certificates come from the ``openssl`` command line (the ``cryptography`` package is
not a dependency); the TLS tests are skipped only where ``openssl`` is missing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Connection,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Result,
    Role,
    Welcome,
    pack,
)
from protocol.auth import device_proof
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import decode_message, encode_message
from spinn.runtime.credentials import (
    SecurityError,
    device_ssl_context,
    load_token,
    server_ssl_context,
)
from spinn.runtime.server import SpinnServer
from tests.support.runtime import Device, RawClient, Server, by_frame, needs_openssl, serve


def _write_token(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_is_stripped_and_checked(tmp_path: Path) -> None:
    good = _write_token(tmp_path / "token", "  0123456789abcdef0123\n")
    assert load_token(good) == b"0123456789abcdef0123"
    with pytest.raises(SecurityError, match="at least 16"):
        load_token(_write_token(tmp_path / "short", "tooshort\n"))
    with pytest.raises(SecurityError, match="chmod 600"):
        load_token(_write_token(tmp_path / "open", "0123456789abcdef0123", 0o644))
    with pytest.raises(SecurityError, match="cannot read token file"):
        load_token(tmp_path / "missing")
    with pytest.raises(SecurityError, match="a token is short"):
        load_token(_write_token(tmp_path / "big", "x" * 10000))


def _handshake(server_ctx: ssl.SSLContext, device_ctx: ssl.SSLContext) -> bytes:
    """One TLS connection over a real loopback socket; returns what the server read."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: list[bytes | BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                got.append(tls.recv(100))
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            got.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with device_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"hello")
                assert tls.recv(2) == b"ok"
    finally:
        thread.join(10)
        listener.close()
    assert isinstance(got[0], bytes), got
    return got[0]


@needs_openssl
def test_tls_server_verified_by_its_ca(certs: dict[str, Path]) -> None:
    server = server_ssl_context(certs["server_pem"], certs["server_key"])
    assert _handshake(server, device_ssl_context(certs["ca_pem"])) == b"hello"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, device_ssl_context(certs["other_pem"]))


@needs_openssl
def test_mutual_tls_requires_a_device_certificate(certs: dict[str, Path]) -> None:
    server = server_ssl_context(certs["server_pem"], certs["server_key"], certs["ca_pem"])
    device = device_ssl_context(certs["ca_pem"], certs["device_pem"], certs["device_key"])
    assert _handshake(server, device) == b"hello"
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        _handshake(server, device_ssl_context(certs["ca_pem"]))


@needs_openssl
def test_bad_tls_files_name_the_field(certs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="^security.tls_cert/security.tls_key: "):
        server_ssl_context(tmp_path / "nope.pem", certs["server_key"])
    with pytest.raises(SecurityError, match="^link.tls_ca: "):
        device_ssl_context(tmp_path / "nope.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(SecurityError, match="cannot load"):
        server_ssl_context(garbage, certs["server_key"])
    with pytest.raises(SecurityError, match="link.tls_key needs link.tls_cert"):
        device_ssl_context(certs["ca_pem"], None, certs["device_key"])


# -- token authentication through the real server (PROTOCOL.md §10) -------------------------

TOKEN = b"a-shared-token-of-32-bytes-long!"


async def _open(port: int, token: bytes | None) -> RawClient:

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return RawClient(reader, writer, Connection(Role.DEVICE, ConnectionConfig(auth_token=token)))


def _frames(data: bytes) -> list[object]:
    """Messages in raw bytes, read without a state machine (the peer here is hostile)."""
    decoder = FrameDecoder()
    decoder.receive_data(data)
    out: list[object] = []
    while (body := decoder.next_frame()) is not None:
        out.append(decode_message(msgpack.unpackb(body, use_list=False, raw=False)))
    return out


def _hello(server: SpinnServer, nonce: bytes = b"") -> Hello:
    meta = server.meta
    return Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, ("float32",),
                 auth_nonce=nonce)  # fmt: skip


def test_server_admits_only_devices_that_prove_the_token(checkpoint: Path, tmp_path: Path) -> None:
    token_file = _write_token(tmp_path / "token", TOKEN.decode() + "\n")
    nonce = bytes(range(32))

    async def body(server: SpinnServer, port: int) -> None:
        good = await _open(port, TOKEN)
        good.send(_hello(server, nonce))
        challenge = await good.next()
        assert isinstance(challenge, Challenge)
        good.send(Auth(device_proof(TOKEN, nonce, challenge.nonce)))
        assert isinstance(await good.next(), Welcome)
        x = np.zeros((1, *server.model.split_shape(1)), np.float32)
        good.send(Infer(1, 1, 1.0, pack(x, "float32")))
        assert isinstance(await good.next(), Result)

        # A wrong proof (a guess): fatal UNAUTHENTICATED, closed, no model work done.
        bad = await _open(port, None)
        frames = (_hello(server, nonce), Auth(bytes(32)))
        bad.writer.write(b"".join(encode_frame(encode_message(m)) for m in frames))
        replies = _frames(await asyncio.wait_for(bad.reader.read(), 10))
        assert isinstance(replies[0], Challenge)
        assert isinstance(replies[-1], Error) and replies[-1].code is ErrorCode.UNAUTHENTICATED
        # A HELLO without a nonce is refused at once.
        plain = await _open(port, None)
        plain.send(_hello(server))
        error = await plain.next()
        assert isinstance(error, Error) and error.code is ErrorCode.UNAUTHENTICATED
        assert server.stats.requests == 1
        assert server.stats.connections_refused >= 2
        for client in (good, bad, plain):
            client.close()

    serve(checkpoint, body, token_file=token_file)


@pytest.mark.integration
@pytest.mark.timeout(150)
@needs_openssl
def test_tls_and_token_on_both_cli_ends(
    certs: dict[str, Path],
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import spinn_device
    from spinn.runtime.processes import free_port

    token = _write_token(tmp_path / "token", TOKEN.decode())
    wrong = _write_token(tmp_path / "wrong", "another-token-of-enough-bytes")
    port = free_port()
    # Mutual TLS (device certificates signed by the test CA) and the shared token.
    server = Server(tmp_path, port, "--token-file", str(token),
                    "--tls-cert", str(certs["server_pem"]), "--tls-key", str(certs["server_key"]),
                    "--tls-client-ca", str(certs["ca_pem"]), checkpoint=checkpoint)  # fmt: skip
    common = ("--no-status", "--split", "2", "--thr", "1.0", "--no-continue",
              "--tls-cert", str(certs["device_pem"]), "--tls-key",
              str(certs["device_key"]))  # fmt: skip
    trusted = ("--tls-ca", str(certs["ca_pem"]))
    device = Device(port, *common, *trusted, "--limit", "40", "--token-file", str(token),
                    checkpoint=checkpoint)  # fmt: skip
    # The two refused devices run the same CLI entry point in this process (its return
    # value is the exit status), while the trusted one streams in its own process.
    base = ("--server", f"127.0.0.1:{port}", "--dataset", "fashion-mnist:test",
            "--checkpoint", str(checkpoint), *common)  # fmt: skip

    def refused(*flags: str) -> tuple[int, str]:
        caplog.clear()
        code = spinn_device.main([*base, *flags])
        return code, capsys.readouterr().err + caplog.text

    try:
        impostor = refused(*trusted, "--limit", "5", "--token-file", str(wrong))
        untrusting = refused("--tls-ca", str(certs["other_pem"]), "--limit", "5",
                             "--token-file", str(token))  # fmt: skip
        # No device certificate: the server drops it in the TLS handshake, which reads like a
        # restarting server, so the device answers locally and says what is likely wrong;
        # after the same failure --misconfig-tries times in a row it gives up (status 2).
        caplog.clear()
        uncertified = spinn_device.main(["--server", f"127.0.0.1:{port}", "--no-status",
                                         "--dataset", "fashion-mnist:test", "--checkpoint",
                                         str(checkpoint), *trusted, "--limit", "5",
                                         "--token-file", str(token)])  # fmt: skip
        uncertified_log = capsys.readouterr().err + caplog.text
        summary = device.finish()
    finally:
        device.kill()
        assert server.stop() == 0
    by_frame(device.records, 40)
    # The server answers; a deadline missed on these busy cores may add a fallback.
    assert summary["answered_by"]["server"] >= 30, summary["answered_by"]
    # The impostor refuses the server's proof itself, before proving anything.
    assert impostor[0] == 2, impostor[1][-2000:]
    assert "CHALLENGE proof does not match" in impostor[1]
    # A server whose certificate the device cannot verify is never used: a clear exit.
    assert untrusting[0] == 2, untrusting[1][-2000:]
    assert "not trusted" in untrusting[1], untrusting[1][-2000:]
    assert uncertified == 2, uncertified_log[-2000:]
    assert "give this device one with --tls-cert/--tls-key" in uncertified_log, uncertified_log
    assert "failed this way 5 times in a row" in uncertified_log, uncertified_log
    log = server.log.read_text()
    assert "TLS on with client certificates, token authentication on" in log
