"""The error table of PROTOCOL.md §8.1, row by row, against the reference implementation.

The rows are read from the document itself: each is held to its code and its scope
(fatal or answering one request) by a scenario of the same id. Rows the server detects
run against a real server on loopback, with frames written byte by byte as any client
would; rows only the device detects run against the device's sans-I/O `Connection`, which
the reference device is built on. A row without a scenario, or a scenario without a row,
fails `test_every_row_has_a_scenario`.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgpack
import numpy as np
import pytest
import zstandard

from bench._common import stub_description
from protocol import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionConfig,
    ErrorCode,
    Hello,
    RemoteProtocolError,
    Result,
    Role,
    Welcome,
    pack,
)
from protocol.auth import server_proof
from protocol.messages import encode_message
from spinn.runtime.server import SpinnServer
from tests.support.runtime import make_certs, sample_input, serve

pytestmark = pytest.mark.timeout(120)

SPEC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
HELLO, WELCOME, INFER, RESULT, CANCEL, PING, PONG, ERROR, BYE, CHALLENGE, AUTH = range(1, 12)


@dataclass(frozen=True)
class Row:
    id: str
    detected_by: str
    code: ErrorCode | None
    fatal: bool | None


def table_rows() -> list[Row]:
    """The rows of PROTOCOL.md §8.1, as written there."""
    text = SPEC.read_text()
    section = text[text.index("### 8.1 Error table") : text.index("### 8.2")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        ident, by, _condition, code, fatal, _next = cells
        rows.append(
            Row(
                ident.strip("`"),
                by,
                None if code == "—" else ErrorCode[code.strip("`")],
                None if fatal == "—" else {"yes": True, "no": False}[fatal],
            )
        )
    return rows


ROWS = table_rows()


# -- a client written with msgpack alone, to send what the reference never would ------------


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def hello_fields(server: SpinnServer, **extra: Any) -> dict[str, Any]:
    meta = server.meta
    return {
        "version": PROTOCOL_VERSION,
        "model_id": meta.model_id,
        "weights_sha256": meta.weights_sha256,
        "codecs": ["float32"],
        **extra,
    }


def tensor(array: np.ndarray | None = None, **override: Any) -> dict[str, Any]:
    x = sample_input(1).numpy() if array is None else array
    t = pack(x, "float32")
    fields = {
        "codec": t.codec,
        "compressed": t.compressed,
        "shape": list(t.shape),
        "scale": t.scale,
        "zero_point": t.zero_point,
        "payload": t.payload,
    }
    fields.update(override)
    return fields


def infer(rid: int, split: int = 0, **fields: Any) -> bytes:
    body = {"request_id": rid, "split": split, "thr_conf": 1.0, "tensor": tensor()}
    body.update(fields)
    return frame([INFER, body])


class Peer:
    """A raw connection: frames go out as bytes, frames come back as msgpack objects."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Peer:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def next(self, timeout: float = 10.0) -> list[Any] | None:
        """The next frame, or None at the end of the stream."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        except asyncio.IncompleteReadError:
            return None
        (n,) = struct.unpack(">I", header)
        return list(msgpack.unpackb(await self.reader.readexactly(n), raw=False))

    async def welcome(self, server: SpinnServer, **extra: Any) -> None:
        self.send(frame([HELLO, hello_fields(server, **extra)]))
        msg = await self.next()
        assert msg is not None and msg[0] == WELCOME, msg

    async def error(self, timeout: float = 10.0) -> dict[str, Any]:
        """The first ERROR, skipping other frames."""
        while True:
            msg = await self.next(timeout)
            assert msg is not None, "the stream ended without an ERROR"
            if msg[0] == ERROR:
                return dict(msg[1])

    async def closed(self) -> bool:
        """True when the server closes the stream (frames before the end are dropped)."""
        try:
            while await self.next(10.0) is not None:
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        return True

    async def still_open(self) -> bool:
        """A PING is answered: the connection goes on after a request ERROR."""
        self.send(frame([PING, {"seq": 99, "sent_at": 1.0}]))
        while True:
            msg = await self.next()
            assert msg is not None, "closed after a request error"
            if msg[0] == PONG:
                return True


@dataclass
class Seen:
    """What a scenario observed: the ERROR's fields, and the connection afterwards."""

    error: dict[str, Any] | None
    open_after: bool | None = None


Scenario = Callable[[SpinnServer, int], Awaitable[Seen]]
SCENARIOS: dict[str, tuple[Scenario | Callable[[], Seen], dict[str, Any]]] = {}


def scenario(row_id: str, **server_options: Any) -> Callable[[Any], Any]:
    def register(fn: Any) -> Any:
        SCENARIOS[row_id] = (fn, server_options)
        return fn

    return register


async def fatal_after(port: int, server: SpinnServer, *frames: bytes, welcome: bool = True) -> Seen:
    peer = await Peer.open(port)
    if welcome:
        await peer.welcome(server)
    peer.send(*frames)
    error = await peer.error()
    await peer.closed()
    peer.writer.close()
    return Seen(error, open_after=False)


async def request_error(port: int, server: SpinnServer, *frames: bytes, **hello_extra: Any) -> Seen:
    peer = await Peer.open(port)
    await peer.welcome(server, **hello_extra)
    peer.send(*frames)
    error = await peer.error()
    open_after = await peer.still_open()
    peer.writer.close()
    return Seen(error, open_after)


# -- rows the server detects ---------------------------------------------------------------


@scenario("frame-empty")
async def _frame_empty(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(port, server, b"\x00\x00\x00\x00")


@scenario("frame-too-large")
async def _frame_too_large(server: SpinnServer, port: int) -> Seen:
    # Before WELCOME the handshake limit (64 KiB) applies; no body follows the header.
    return await fatal_after(port, server, struct.pack(">I", 70_000), welcome=False)


@scenario("frame-truncated")
async def _frame_truncated(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    await peer.welcome(server)
    peer.send(b"\x00\x00\x00\x10\x92\x06")  # 16 bytes announced, 2 sent, then half-close
    peer.writer.write_eof()
    error = await peer.error()
    await peer.closed()
    peer.writer.close()
    return Seen(error, open_after=False)


@scenario("body-not-msgpack")
async def _body_not_msgpack(server: SpinnServer, port: int) -> Seen:
    ping = msgpack.packb([PING, {"seq": 1, "sent_at": 1.0}]) + b"\x00"  # trailing byte
    return await fatal_after(port, server, struct.pack(">I", len(ping)) + ping)


@scenario("body-envelope")
async def _body_envelope(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(port, server, frame([99, {}]))


@scenario("state")
async def _state(server: SpinnServer, port: int) -> Seen:
    # An INFER before the handshake, with a malformed tensor: the state is checked first.
    bad = frame([INFER, {"request_id": 1, "split": 0, "thr_conf": 1.0, "tensor": {"codec": 5}}])
    seen = await fatal_after(port, server, bad, welcome=False)
    assert seen.error is not None and "INFER" in seen.error["message"], seen.error
    return seen


@scenario("after-bye", workers=1, slowdown=20.0)
async def _after_bye(server: SpinnServer, port: int) -> Seen:
    # BYE with a request still running, then an INFER: refused, not left unanswered.
    peer = await Peer.open(port)
    await peer.welcome(server)
    peer.send(infer(1), frame([BYE, {}]))
    await asyncio.sleep(0.05)
    peer.send(infer(2))
    error = await peer.error()
    await peer.closed()
    peer.writer.close()
    assert "after its own BYE" in error["message"], error
    return Seen(error, open_after=False)


@scenario("field")
async def _field(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(port, server, frame([CANCEL, {"request_id": "seven"}]))


@scenario("version")
async def _version(server: SpinnServer, port: int) -> Seen:
    hello = frame([HELLO, hello_fields(server, version=999)])
    return await fatal_after(port, server, hello, welcome=False)


@scenario("hello-zdict-alone")
async def _hello_zdict_alone(server: SpinnServer, port: int) -> Seen:
    hello = frame([HELLO, hello_fields(server, codecs=["sparse_int8_zdict"])])
    return await fatal_after(port, server, hello, welcome=False)


@scenario("auth-missing", token=True)
async def _auth_missing(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(port, server, frame([HELLO, hello_fields(server)]), welcome=False)


@scenario("auth-proof", token=True)
async def _auth_proof(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    peer.send(frame([HELLO, hello_fields(server, auth_nonce=bytes(32))]))
    challenge = await peer.next()
    assert challenge is not None and challenge[0] == CHALLENGE, challenge
    # Even an INFER before AUTH is a state error; a wrong proof is UNAUTHENTICATED.
    peer.send(frame([AUTH, {"proof": bytes(32)}]))
    error = await peer.error()
    await peer.closed()
    peer.writer.close()
    return Seen(error, open_after=False)


@scenario("model")
async def _model(server: SpinnServer, port: int) -> Seen:
    hello = frame([HELLO, hello_fields(server, model_id="resnet20")])
    return await fatal_after(port, server, hello, welcome=False)


@scenario("no-codec")
async def _no_codec(server: SpinnServer, port: int) -> Seen:
    hello = frame([HELLO, hello_fields(server, codecs=["bfloat9"])])
    return await fatal_after(port, server, hello, welcome=False)


@scenario("server-full", max_connections=1)
async def _server_full(server: SpinnServer, port: int) -> Seen:
    first = await Peer.open(port)
    await first.welcome(server)
    seen = await fatal_after(port, server, welcome=False)
    first.writer.close()
    return seen


@scenario("handshake-pool-full", max_handshakes=1)
async def _handshake_pool_full(server: SpinnServer, port: int) -> Seen:
    # The one stranger has spoken (a byte of a frame) and is not past its grace.
    first = await Peer.open(port)
    first.send(b"\x00")
    for _ in range(200):
        if not server.core.handshakes.silent:
            break
        await asyncio.sleep(0.01)
    seen = await fatal_after(port, server, welcome=False)
    first.writer.close()
    return seen


@scenario("handshake-evicted", max_handshakes=1)
async def _handshake_evicted(server: SpinnServer, port: int) -> Seen:
    silent = await Peer.open(port)
    for _ in range(200):
        if server.stats.handshakes == 1:
            break
        await asyncio.sleep(0.01)
    newcomer = await Peer.open(port)  # the silent one makes room for it
    error = await silent.error()
    await silent.closed()
    silent.writer.close()
    newcomer.writer.close()
    return Seen(error, open_after=False)


@scenario("tls-on-plain-port")
async def _tls_on_plain_port(server: SpinnServer, port: int) -> Seen:
    # The first bytes of a TLS 1.2/1.3 ClientHello record.
    return await fatal_after(
        port, server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", welcome=False
    )


@scenario("plain-on-tls-port", tls=True)
async def _plain_on_tls_port(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    peer.send(frame([HELLO, hello_fields(server)]))
    assert await peer.next(5.0) is None  # closed, nothing sent: no ERROR before TLS
    peer.writer.close()
    return Seen(None, open_after=False)


@scenario("handshake-timeout", handshake_timeout_s=0.3)
async def _handshake_timeout(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(port, server, welcome=False)


@scenario("idle-timeout", idle_timeout_s=0.6)
async def _idle_timeout(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    await peer.welcome(server)
    # PINGs are activity: two of them, 0.4 s apart, carry the connection past 0.6 s.
    for seq in range(2):
        await asyncio.sleep(0.4)
        peer.send(frame([PING, {"seq": seq, "sent_at": 0.0}]))
        pong = await peer.next()
        assert pong is not None and pong[0] == PONG, pong
    error = await peer.error()
    await peer.closed()
    peer.writer.close()
    return Seen(error, open_after=False)


@scenario("request-id-in-use", workers=1, slowdown=20.0)
async def _request_id_in_use(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(port, server, infer(1), infer(1))


@scenario("too-many-requests")
def _too_many_requests() -> Seen:
    # The reference server answers BUSY at 256 (queue-full); the state machine's own limit.
    conn = _open_server_connection(ConnectionConfig(max_outstanding=2))
    conn.receive_data(infer(1) + infer(2) + infer(3))
    conn.next_event(), conn.next_event()
    return _remote_error(conn)


@scenario("tensor-map")
async def _tensor_map(server: SpinnServer, port: int) -> Seen:
    # The four cases must agree: a str payload, scale 0, zero_point 200, and a
    # float codec with a scale; each is one fatal BAD_TENSOR.
    codes = []
    for bad in ({"payload": "text"}, {"scale": 0.0}, {"zero_point": 200}, {"scale": 2.0}):
        seen = await fatal_after(port, server, infer(1, tensor=tensor(**bad)))
        assert seen.error is not None
        codes.append(seen.error["code"])
    assert len(set(codes)) == 1, codes
    return seen


@scenario("codec-not-agreed")
async def _codec_not_agreed(server: SpinnServer, port: int) -> Seen:
    # Known but not agreed (int8: WELCOME had float32 only), and unknown: the same answer.
    x = sample_input(2).numpy()
    int8 = pack(x, "int8")
    known = tensor(codec="int8", scale=int8.scale, zero_point=int8.zero_point, payload=int8.payload)
    first = await fatal_after(port, server, infer(1, tensor=known))
    second = await fatal_after(port, server, infer(1, tensor=tensor(codec="bfloat9")))
    assert first.error is not None and second.error is not None
    assert first.error["code"] == second.error["code"]
    return first


@scenario("tensor-elements")
async def _tensor_elements(server: SpinnServer, port: int) -> Seen:
    n = server.config.limits.max_tensor_elements + 1
    return await fatal_after(port, server, infer(1, tensor=tensor(shape=[1, n], payload=b"")))


@scenario("split")
async def _split(server: SpinnServer, port: int) -> Seen:
    return await request_error(port, server, infer(1, split=server.model.num_stages))


@scenario("image-split")
async def _image_split(server: SpinnServer, port: int) -> Seen:
    # The frame's pixels are valid at split 0 only, whatever their shape (PROTOCOL.md §6.8).
    pixels = pack(np.zeros((1, 1, 28, 28), np.uint8), "uint8_image", compress=False)
    image = tensor(codec=pixels.codec, payload=pixels.payload, shape=list(pixels.shape))
    codecs = ["float32", "uint8_image"]
    seen = await request_error(port, server, infer(1, split=1, tensor=image), codecs=codecs)
    assert seen.error is not None and "split 0 only" in seen.error["message"]  # not "shape"
    return seen


@scenario("queue-full", workers=1, slowdown=20.0, max_queue_per_connection=1)
async def _queue_full(server: SpinnServer, port: int) -> Seen:
    seen = await request_error(port, server, infer(1), infer(2))
    assert seen.error is not None and seen.error["request_id"] == 2
    return seen


@scenario("deadline-unreachable", workers=1)
async def _deadline_unreachable(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    await peer.welcome(server)
    # The server predicts from what it measured: ten requests first, nothing queued after.
    peer.send(*(infer(i) for i in range(10)))
    for _ in range(10):
        msg = await peer.next()
        assert msg is not None and msg[0] == RESULT, msg
    peer.send(infer(10, deadline_ms=1e-6))
    error = await peer.error()
    open_after = await peer.still_open()
    peer.writer.close()
    return Seen(error, open_after)


@scenario("shape")
async def _shape(server: SpinnServer, port: int) -> Seen:
    # A batch of 2 is refused like any other shape that is not [1, *split shape].
    x = np.concatenate([sample_input(1).numpy(), sample_input(2).numpy()])
    return await request_error(port, server, infer(1, tensor=tensor(x)))


@scenario("payload")
async def _payload(server: SpinnServer, port: int) -> Seen:
    return await request_error(port, server, infer(1, tensor=tensor(payload=bytes(8))))


@scenario("zstd-size")
async def _zstd_size(server: SpinnServer, port: int) -> Seen:
    # A zstd frame declaring one element more than float32 [1, 1, 28, 28] can hold.
    big = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(4 * 784 + 4))
    return await request_error(port, server, infer(1, tensor=tensor(compressed=True, payload=big)))


@scenario("cancelled", workers=1)
async def _cancelled(server: SpinnServer, port: int) -> Seen:
    seen = await request_error(port, server, infer(1), infer(2), frame([CANCEL, {"request_id": 2}]))
    assert seen.error is not None and seen.error["request_id"] == 2
    return seen


@scenario("deadline-passed", workers=1)
async def _deadline_passed(server: SpinnServer, port: int) -> Seen:
    seen = await request_error(port, server, infer(1), infer(2, deadline_ms=0.0))
    assert seen.error is not None and "deadline" in seen.error["message"]
    return seen


@scenario("bye-unfinished", workers=1, slowdown=200.0, idle_timeout_s=0.3)
async def _bye_unfinished(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    await peer.welcome(server)
    peer.send(infer(1), frame([BYE, {}]))
    error = await peer.error()
    bye = await peer.next()
    assert bye is not None and bye[0] == BYE, bye
    peer.writer.close()
    return Seen(error, open_after=True)  # answered, then the orderly BYE


@scenario("compute-failed")
async def _compute_failed(server: SpinnServer, port: int) -> Seen:
    # A finite input so large that the network overflows: no valid probabilities.
    x = np.full((1, 1, 28, 28), 3e38, np.float32)
    return await request_error(port, server, infer(1, tensor=tensor(x)))


@scenario("ping-rate", max_ping_rate=5.0)
async def _ping_rate(server: SpinnServer, port: int) -> Seen:
    pings = [frame([PING, {"seq": seq, "sent_at": 1.0}]) for seq in range(30)]
    return await fatal_after(port, server, *pings)


@scenario("cancel-rate", max_unknown_cancel_rate=5.0)
async def _cancel_rate(server: SpinnServer, port: int) -> Seen:
    cancels = [frame([CANCEL, {"request_id": 1000 + i}]) for i in range(30)]
    return await fatal_after(port, server, *cancels)


@scenario("ping-seq")
def _ping_seq() -> Seen:
    # The server answers each PING at once and a PONG frees its seq, so a reused seq can
    # only be caught before the answer: the state machine the server runs holds it.
    conn = _open_server_connection()
    ping = frame([PING, {"seq": 5, "sent_at": 0.0}])
    conn.receive_data(ping + ping)
    conn.next_event()
    return _remote_error(conn)


@scenario("too-many-pings")
def _too_many_pings() -> Seen:
    conn = _open_server_connection(ConnectionConfig(max_outstanding=1))
    conn.receive_data(
        frame([PING, {"seq": 1, "sent_at": 0.0}]) + frame([PING, {"seq": 2, "sent_at": 0.0}])
    )
    conn.next_event()
    return _remote_error(conn)


@scenario("pong")
async def _pong(server: SpinnServer, port: int) -> Seen:
    return await fatal_after(
        port, server, frame([PONG, {"seq": 3, "sent_at": 0.0, "received_at": 0.0}])
    )


@scenario("peer-fatal", workers=1, slowdown=200.0)
async def _peer_fatal(server: SpinnServer, port: int) -> Seen:
    peer = await Peer.open(port)
    await peer.welcome(server)
    peer.send(infer(1), frame([ERROR, {"code": 1, "message": "device gives up"}]))
    t0 = asyncio.get_running_loop().time()
    assert await peer.next(5.0) is None  # closed, nothing answered
    assert asyncio.get_running_loop().time() - t0 < 3.0
    peer.writer.close()
    return Seen(None, open_after=False)


# -- rows only the device detects: the device's state machine -------------------------------


def _device_after_hello(token: bytes | None = None) -> Connection:
    conn = Connection(Role.DEVICE, ConnectionConfig(auth_token=token))
    conn.send(
        Hello(
            PROTOCOL_VERSION, "m", "", ("float32", "int8"), auth_nonce=bytes(32) if token else b""
        )
    )
    return conn


def _open_server_connection(config: ConnectionConfig | None = None) -> Connection:
    conn = Connection(Role.SERVER, config)
    conn.receive_data(
        frame(
            [
                HELLO,
                {
                    "version": PROTOCOL_VERSION,
                    "model_id": "m",
                    "weights_sha256": "",
                    "codecs": ["float32"],
                },
            ]
        )
    )
    conn.next_event()
    conn.send(
        Welcome(PROTOCOL_VERSION, "m", "", ("float32",), True, description=stub_description())
    )
    return conn


def welcome_frame(codec: str) -> bytes:
    """A version-2 WELCOME accepting `codec`, written by hand."""
    fields = {
        "version": PROTOCOL_VERSION,
        "model_id": "m",
        "weights_sha256": "",
        "codecs": [codec],
        "reports_compute_time": True,
        "description": stub_description().to_wire(),
    }
    return frame([WELCOME, fields])


def _remote_error(conn: Connection) -> Seen:
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    return Seen({"code": int(info.value.code), "request_id": None, "message": str(info.value)})


@scenario("challenge-proof")
def _challenge_proof() -> Seen:
    token = b"t" * 32
    conn = _device_after_hello(token)
    wrong = server_proof(b"x" * 32, bytes(32), bytes(16))
    conn.receive_data(frame([CHALLENGE, {"nonce": bytes(16), "proof": wrong}]))
    seen = _remote_error(conn)
    # A WELCOME without CHALLENGE, to a device with a token: the same refusal.
    other = _device_after_hello(token)
    other.receive_data(welcome_frame("float32"))
    other_seen = _remote_error(other)
    assert seen.error is not None and other_seen.error is not None
    assert other_seen.error["code"] == seen.error["code"], other_seen
    return seen


@scenario("welcome-codecs")
def _welcome_codecs() -> Seen:
    conn = _device_after_hello()
    conn.receive_data(welcome_frame("float16"))
    seen = _remote_error(conn)
    assert seen.error is not None and "'float16' was not offered" in seen.error["message"]
    return seen


@scenario("answer-unknown")
def _answer_unknown() -> Seen:
    conn = _device_after_hello()
    conn.receive_data(welcome_frame("float32"))
    assert isinstance(conn.next_event(), Welcome)
    conn.receive_data(encode_frame_of(Result(7, 0, (1,), (1.0,))))
    return _remote_error(conn)


def encode_frame_of(message: Any) -> bytes:
    body = encode_message(message)
    return struct.pack(">I", len(body)) + body


# -- the test ------------------------------------------------------------------------------


def test_the_table_is_there_and_complete() -> None:
    ids = [row.id for row in ROWS]
    assert len(ids) >= 30 and len(set(ids)) == len(ids), ids
    # Every code but the generic ones has at least one row that produces it.
    assert {row.code for row in ROWS} >= set(ErrorCode)


def test_every_row_has_a_scenario() -> None:
    assert {row.id for row in ROWS} == set(SCENARIOS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_row(row: Row, checkpoint: Path, tmp_path: Path) -> None:
    fn, options = SCENARIOS[row.id]
    options = dict(options)
    if options.pop("token", False):
        token = tmp_path / "token"
        token.write_bytes(b"k" * 32 + b"\n")
        token.chmod(0o600)
        options["token_file"] = token
    if options.pop("tls", False):
        if shutil.which("openssl") is None:
            pytest.skip("openssl missing")
        certs = make_certs(tmp_path)
        options.update(tls_cert=certs["server_pem"], tls_key=certs["server_key"])
    seen: Seen
    if not asyncio.iscoroutinefunction(fn):
        seen = cast(Callable[[], Seen], fn)()
    else:
        run = cast(Scenario, fn)
        result: list[Seen] = []

        async def body(server: SpinnServer, port: int) -> None:
            result.append(await run(server, port))

        serve(checkpoint, body, **options)
        seen = result[0]
    if row.code is None:  # peer-fatal, plain-on-tls-port: nothing is sent back
        assert seen.error is None
        return
    assert seen.error is not None
    assert seen.error["code"] == int(row.code), (row, seen.error)
    assert (seen.error.get("request_id") is None) is row.fatal, (row, seen.error)
    if seen.open_after is not None:
        # A fatal ERROR ends the connection; a request ERROR leaves it usable.
        assert seen.open_after is not row.fatal, row
