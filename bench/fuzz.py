"""Fuzzing of the wire protocol: the decoders in-process, then a live server over sockets.

``python -m bench.fuzz [--seconds 60] [--socket-seconds 30]``;
``python -m bench.fuzz --engine atheris [--runs 1000000]`` for coverage-guided fuzzing
instead (``bench.fuzz_atheris``: its targets, corpus and crash regressions).

1. Property-based fuzzing (hypothesis) of every decoder that reads peer bytes: the frame
   decoder, the message decoder (``protocol.messages.decode_message``) on random and
   mutated message maps, the whole ``protocol.Connection`` on random and mutated byte
   streams, and the tensor unpacker on random and mutated packed tensors. The rule checked
   (PROTOCOL.md §7.4, STYLE.md msgpack notes): only ``ProtocolError`` may escape, and
   buffering and allocation stay bounded by the configured limits.
2. Socket-level fuzzing: a real server process; a well-behaved device streams real
   Fashion-MNIST frames through it while attackers open connections and send random
   bytes, mutated valid frames, oversized length prefixes, floods of requests and
   slow-loris dribbles. The server must stay up, the good device must lose no frame, and
   the server's resident memory must stay bounded.

The targets and strategies here are also what ``tests/protocol/test_fuzz.py`` runs in its
short form. The last line is one JSON object with ``inputs_tried``, ``frames_lost`` and
``rss_mb``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._common import stub_description
from protocol import (
    CODECS,
    NEED_DATA,
    PROTOCOL_VERSION,
    Auth,
    Bye,
    Cancel,
    Challenge,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    ProtocolError,
    Result,
    Role,
    TensorError,
    Welcome,
    pack,
    unpack,
)
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import Message, decode_message, encode_message
from protocol.packing import IMAGE_CODEC, LOSSY_CODEC, PackedTensor

__all__ = [
    "ALLOC_SLACK",
    "FUZZ_CONFIG",
    "INPUTS",
    "check_connection_stream",
    "check_frame_stream",
    "check_message_object",
    "check_tensor",
    "bounded_allocation",
    "device_stream",
    "message_objects",
    "mutate",
    "msgpack_values",
    "packed_tensors",
    "run_for",
    "socket_fuzz",
    "zstd_declaring",
]

INPUTS: collections.Counter[str] = collections.Counter()
"""Inputs tried per target since the process started (reported by the long run)."""

FUZZ_CONFIG = ConnectionConfig(max_frame_size=1 << 16, max_tensor_elements=1 << 12)
"""Small limits, so that a decoder honouring them is visibly bounded in memory."""

ALLOC_SLACK = 256 * 1024
"""Interpreter and numpy bookkeeping allowed on top of what the limits permit."""


# -- mutation ----------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random, rounds: int = 3) -> bytes:
    """``data`` with a few random edits: bit flips, byte sets, cuts, inserts, duplications.

    The classic mutation operators of coverage-guided fuzzers (AFL's havoc stage), seeded.
    """
    buf = bytearray(data)
    for _ in range(rounds):
        op = rng.randrange(7)
        if not buf:
            buf.extend(rng.randbytes(rng.randint(1, 8)))
            continue
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xD4, 0xDC, 0xDE))
        elif op == 2:
            del buf[i : i + rng.randint(1, 16)]
        elif op == 3:
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randint(1, 32)]
        elif op == 5:
            del buf[i:]
        else:
            # A 32-bit field at a random place: lengths and counts are where decoders break.
            value = rng.choice((0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)))
            buf[i : i + 4] = value.to_bytes(4, "big")
    return bytes(buf)


# -- targets -----------------------------------------------------------------------------


def check_frame_stream(chunks: list[bytes], max_frame_size: int = 1 << 12) -> int:
    """Feed ``chunks`` to a `FrameDecoder`; returns the frames decoded.

    Only `ProtocolError` may escape, and the buffer never holds more than one frame plus
    the chunk that completed it (PROTOCOL.md §3: the length is checked before the body).
    """
    INPUTS["frames"] += 1
    decoder = FrameDecoder(max_frame_size)
    frames = 0
    biggest = max((len(c) for c in chunks), default=0)
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
            assert decoder.buffered <= 4 + max_frame_size + biggest, decoder.buffered
            while (body := decoder.next_frame()) is not None:
                assert 0 < len(body) <= max_frame_size
                body.release()
                frames += 1
    except ProtocolError:
        pass
    return frames


def check_message_object(obj: object) -> Message | None:
    """`decode_message` on any decoded msgpack value: a message or a `ProtocolError`."""
    INPUTS["messages"] += 1
    try:
        message = decode_message(obj)
    except ProtocolError:
        return None
    # What decodes must encode again and decode to the same message (no half-valid state).
    again = decode_message(msgpack.unpackb(encode_message(message), use_list=False, raw=False))
    assert again == message, (again, message)
    return message


def check_connection_stream(
    data: bytes, role: Role = Role.SERVER, chunk: int = 0, config: ConnectionConfig = FUZZ_CONFIG
) -> int:
    """Feed ``data`` (in pieces of ``chunk`` bytes, 0 = at once) to a `Connection`.

    Returns the events decoded before the end or the first violation. Only `ProtocolError`
    may escape; a failed connection refuses further input with `LocalProtocolError`.
    """
    INPUTS["connection"] += 1
    conn = Connection(role, config)
    events = 0
    step = chunk or max(len(data), 1)
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
                events += 1
    except ProtocolError:
        assert conn.failure is not None or conn.state.value in ("closed", "failed")
        try:
            conn.receive_data(b"x")
        except ProtocolError:
            pass
        else:
            raise AssertionError("a failed connection accepted more bytes") from None
    return events


def check_tensor(
    fields: dict[str, Any], max_elements: int = FUZZ_CONFIG.max_tensor_elements
) -> np.ndarray | None:
    """Build and unpack a tensor from peer-controlled ``fields``: an array or `TensorError`.

    A decoded array has the declared shape, is float32 and finite.
    """
    INPUTS["tensor"] += 1
    try:
        packed = PackedTensor(**fields)
        out = unpack(packed, max_elements)
    except TensorError:
        return None
    assert out.dtype == np.float32 and out.shape == packed.shape
    assert bool(np.isfinite(out).all())
    return out


def bounded_allocation(target: Callable[[], object], limit_bytes: int) -> int:
    """Run ``target`` under tracemalloc; assert its peak stays under ``limit_bytes``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        target()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= limit_bytes, f"peak allocation {peak} bytes above the bound {limit_bytes}"
    return peak


# -- strategies --------------------------------------------------------------------------

msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=12,
)
"""Any value a msgpack decoder configured as the protocol's can produce."""

_FIELD_NAMES = (
    "version model_id weights_sha256 codecs device_name reports_compute_time server_name "
    "request_id split thr_conf tensor deadline_ms exit_index classes probs compute_ms seq "
    "sent_at padding received_at padding_len code message reason auth_nonce auth_mac mac"
).split()


_CODECS: Final = (*CODECS, IMAGE_CODEC, LOSSY_CODEC)
"""The self-contained codecs the strategies draw from: the activation codecs and the
split-0 pixels (PROTOCOL.md §6.8), the lossy sparse_uintb (§6.9, at a random width), so mutations reach every decoder but the dictionary one
(which needs the model's dictionaries: the socket corpus covers it)."""


def _small_tensor(seed: int, codec: str, compress: bool) -> PackedTensor:
    rng = np.random.default_rng(seed)
    shape = (1, int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
    if codec == IMAGE_CODEC:
        # Noise, or a smooth ramp (the gradient filter wins on it when zstd runs).
        ramp = np.cumsum(rng.integers(0, 3, shape), axis=-1) + np.arange(shape[-2])[:, None]
        noise = rng.integers(0, 256, shape)
        return pack((ramp if seed % 2 else noise).astype(np.uint8), codec, compress=compress)
    x = np.maximum(rng.standard_normal(shape).astype(np.float32), 0.0)
    if codec == LOSSY_CODEC:
        return pack(x, codec, compress=compress, bits=int(rng.integers(1, 9)))
    return pack(x, codec, compress=compress)


def _valid_messages(draw: st.DrawFn) -> list[Message]:
    seed = draw(st.integers(0, 2**16))
    codec = draw(st.sampled_from(_CODECS))
    tensor = _small_tensor(seed, codec, draw(st.booleans()))
    rid = draw(st.integers(0, 2**64 - 1))
    return [
        Hello(PROTOCOL_VERSION, draw(st.text(max_size=10)), "", (codec,), "fuzz"),
        Welcome(
            PROTOCOL_VERSION,
            "m",
            "",
            (codec,),
            draw(st.booleans()),
            "srv",
            description=stub_description(),
        ),
        Infer(rid, draw(st.integers(0, 9)), draw(st.floats(0, 1)), tensor, 5.0),
        Result(rid, 1, (3, 1), (0.75, 0.25), 1.5),
        Cancel(rid),
        Ping(draw(st.integers(0, 99)), 1.0, draw(st.binary(max_size=64))),
        Pong(1, 1.0, 2.0, 3),
        Error(draw(st.sampled_from(list(ErrorCode))), "why", draw(st.none() | st.just(rid))),
        Bye("done"),
        Hello(
            PROTOCOL_VERSION,
            "m",
            "",
            (codec,),
            auth_nonce=draw(st.binary(min_size=16, max_size=64)),
        ),
        Challenge(
            draw(st.binary(min_size=16, max_size=64)), draw(st.binary(min_size=32, max_size=32))
        ),
        Auth(draw(st.binary(min_size=32, max_size=32))),
    ]


@st.composite
def message_objects(draw: st.DrawFn) -> object:
    """Decoded msgpack of a valid message, then edited: a key dropped, a value replaced,
    an unknown key added, the type tag changed, or the whole thing swapped for noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(msgpack_values)
    message = draw(st.sampled_from(_valid_messages(draw)))
    tag, fields = msgpack.unpackb(encode_message(message), use_list=False, raw=False)
    fields = dict(fields)
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.integers(0, 4))
        if edit == 0 and fields:
            del fields[draw(st.sampled_from(sorted(fields)))]
        elif edit == 1 and fields:
            fields[draw(st.sampled_from(sorted(fields)))] = draw(msgpack_values)
        elif edit == 2:
            fields[draw(st.sampled_from(_FIELD_NAMES) | st.text(max_size=8))] = draw(msgpack_values)
        elif edit == 3:
            tag = draw(st.integers(-2, 12) | msgpack_values)
        elif edit == 4 and isinstance(fields.get("tensor"), dict):
            tensor = dict(fields["tensor"])
            key = draw(st.sampled_from(sorted(tensor)))
            tensor[key] = draw(msgpack_values)
            fields["tensor"] = tensor
    return (tag, fields)


@st.composite
def device_stream(draw: st.DrawFn) -> bytes:
    """The bytes a device sends (HELLO, INFERs, CANCELs, PINGs, BYE), then mutated."""
    codec = draw(st.sampled_from(_CODECS))
    out = [encode_frame(encode_message(Hello(PROTOCOL_VERSION, "m", "", (codec,))))]
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 3))
        if kind <= 1:
            tensor = _small_tensor(draw(st.integers(0, 999)), codec, draw(st.booleans()))
            out.append(encode_frame(encode_message(Infer(i, 1, 0.5, tensor))))
        elif kind == 2:
            out.append(encode_frame(encode_message(Cancel(i))))
        else:
            out.append(encode_frame(encode_message(Ping(i, 0.0, draw(st.binary(max_size=32))))))
    if draw(st.booleans()):
        out.append(encode_frame(encode_message(Bye())))
    data = b"".join(out)
    rng = random.Random(draw(st.integers(0, 2**32)))
    return mutate(data, rng, draw(st.integers(0, 6)))


@st.composite
def packed_tensors(draw: st.DrawFn) -> dict[str, Any]:
    """Fields of a PackedTensor as a peer could send them: valid ones mutated, zstd frames
    that lie about their size, and plain noise in every field."""
    kind = draw(st.integers(0, 3))
    codec = draw(st.sampled_from(_CODECS))
    shape: Any = draw(st.lists(st.integers(0, 40), max_size=4).map(tuple))
    if kind == 0:  # a real tensor, payload mutated
        valid = _small_tensor(draw(st.integers(0, 999)), codec, draw(st.booleans()))
        rng = random.Random(draw(st.integers(0, 2**32)))
        fields = {
            "codec": valid.codec,
            "compressed": valid.compressed,
            "shape": valid.shape,
            "scale": valid.scale,
            "zero_point": valid.zero_point,
            "payload": mutate(valid.payload, rng, draw(st.integers(0, 3))),
        }
        if draw(st.booleans()):
            fields["shape"] = shape
        return fields
    if kind == 1:  # zstd frames, honest or not about their content size
        raw = draw(st.binary(max_size=200))
        if draw(st.booleans()):
            payload = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
        else:
            payload = zstd_declaring(draw(st.sampled_from([0, 1, 7, 4096, 2**30, 2**64 - 1])))
        compressed = True
    else:
        payload = draw(st.binary(max_size=300))
        compressed = draw(st.booleans())
    return {
        "codec": codec if kind != 3 else draw(st.sampled_from(_CODECS) | msgpack_values),
        "compressed": compressed if kind != 3 else draw(msgpack_values),
        "shape": shape if kind != 3 else draw(msgpack_values),
        "scale": draw(st.floats(allow_nan=True, allow_infinity=True) | st.just(1.0)),
        "zero_point": draw(st.integers(-300, 300) | st.just(0)),
        "payload": payload,
    }


def zstd_declaring(size: int) -> bytes:
    """A zstd frame whose header declares ``size`` bytes of content but holds none."""
    # RFC 8878 §3.1.1: magic, descriptor 0xE0 (single segment, 8-byte content size), the
    # size, then one last raw block of length 0 (block header 0x000001).
    return b"\x28\xb5\x2f\xfd\xe0" + size.to_bytes(8, "little") + b"\x01\x00\x00"


# -- the long in-process run ---------------------------------------------------------------


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    st.lists(st.binary(min_size=1, max_size=64), max_size=8) | device_stream().map(lambda b: [b])
)
def _fuzz_frames(chunks: list[bytes]) -> None:
    check_frame_stream(chunks)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(message_objects())
def _fuzz_messages(obj: object) -> None:
    check_message_object(obj)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(device_stream() | st.binary(max_size=300), st.sampled_from([0, 1, 7, 100]))
def _fuzz_connection(data: bytes, chunk: int) -> None:
    check_connection_stream(data, Role.SERVER, chunk)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(packed_tensors())
def _fuzz_tensors(fields: dict[str, Any]) -> None:
    check_tensor(fields)


IN_PROCESS_TARGETS: dict[str, Callable[[], None]] = {
    "frames": _fuzz_frames,
    "messages": _fuzz_messages,
    "connection": _fuzz_connection,
    "tensor": _fuzz_tensors,
}


def run_for(seconds: float, report: Callable[[str], None] = print) -> int:
    """Run every in-process target in turn, 200 fresh examples at a time, for ``seconds``.

    Returns the number of inputs tried. A failing input raises (hypothesis shrinks it first).
    """
    start = time.monotonic()
    before = sum(INPUTS.values())
    rounds = 0
    while time.monotonic() - start < seconds:
        for target in IN_PROCESS_TARGETS.values():
            target()
        rounds += 1
        report(
            f"  {time.monotonic() - start:6.1f} s: {sum(INPUTS.values()) - before} inputs "
            f"({', '.join(f'{k} {v}' for k, v in sorted(INPUTS.items()))})"
        )
    return sum(INPUTS.values()) - before


# -- socket-level fuzzing against a live server ---------------------------------------------


async def _attacker(port: int, rng: random.Random, corpus: list[bytes], stop: float) -> int:
    """Open connections and send hostile bytes until ``stop``; returns connections made."""
    made = 0
    while time.monotonic() < stop:
        made += 1
        INPUTS["socket"] += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        try:
            kind = rng.randrange(6)
            if kind == 0:  # noise
                writer.write(rng.randbytes(rng.randint(1, 4096)))
            elif kind == 1:  # a valid stream, mutated
                writer.write(mutate(rng.choice(corpus), rng, rng.randint(1, 8)))
            elif kind == 2:  # a length prefix far above the limit, then a trickle of body
                writer.write((0xFFFFFFF0).to_bytes(4, "big") + rng.randbytes(1024))
            elif kind == 3:  # slow loris: a valid HELLO one byte at a time
                hello = corpus[0][:40]
                for i in range(len(hello)):
                    writer.write(hello[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.02)
                    if time.monotonic() > stop:
                        break
            elif kind == 4:  # a valid stream, cut at a random point
                data = rng.choice(corpus)
                writer.write(data[: rng.randrange(1, len(data) + 1)])
            else:  # a flood of well-formed requests, never reading the answers
                writer.write(corpus[1] * rng.randint(1, 40))
            await asyncio.wait_for(writer.drain(), 2.0)
            # Read whatever the server says (an ERROR naming the fault), briefly.
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(reader.read(1 << 16), 0.2)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    return made


def _corpus(checkpoint: Path) -> list[bytes]:
    """Valid device streams for this model: HELLO, INFERs at a few splits, PING, BYE."""
    from protocol.packing import DICT_CODEC
    from spinn.model.checkpoint import load_checkpoint
    from spinn.model.zdict_file import load_dictionaries

    model, meta = load_checkpoint(checkpoint)
    # With the model's zstd dictionaries the streams offer sparse_int8_zdict too, so the
    # mutations reach the server's dictionary decoder (PROTOCOL.md §6.7).
    zdict = load_dictionaries(checkpoint, meta.model_id, model.num_stages)
    codecs = (*CODECS, LOSSY_CODEC) if zdict is None else (*CODECS, LOSSY_CODEC, DICT_CODEC)
    codecs = (IMAGE_CODEC, *codecs)  # split 0 goes as pixels (PROTOCOL.md §6.8)
    hello = encode_frame(
        encode_message(
            Hello(
                PROTOCOL_VERSION,
                meta.model_id,
                meta.weights_sha256,
                codecs,
                dictionaries_sha256="" if zdict is None else zdict.sha256,
            )
        )
    )
    infers = []
    rng = np.random.default_rng(0)
    for i, split in enumerate(range(min(model.num_stages, len(codecs)))):
        x = np.maximum(rng.standard_normal((1, *model.split_shape(split))), 0).astype(np.float32)
        if codecs[i] == IMAGE_CODEC:
            x = (x * 64).clip(0, 255).astype(np.uint8)
        tensor = pack(x, codecs[i], True, dictionaries=zdict, table=split)
        infers.append(encode_frame(encode_message(Infer(i, split, 0.5, tensor))))
    ping = encode_frame(encode_message(Ping(1, 0.0, b"\0" * 100)))
    bye = encode_frame(encode_message(Bye()))
    return [hello + b"".join(infers) + ping + bye, hello + infers[0], *(hello + i for i in infers)]


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def _socket_fuzz(
    checkpoint: Path, port: int, server_pid: int, seconds: float, attackers: int, seed: int
) -> dict[str, Any]:
    import io

    from bench._common import ensure_profile
    from spinn.runtime.config import DeviceConfig
    from spinn.runtime.device_process import run_device
    from spinn.runtime.sources import dataset_source

    corpus = _corpus(checkpoint)
    rng = random.Random(seed)
    frames = max(30, int(seconds * 20))
    workdir = Path(tempfile.mkdtemp(prefix="spinn-fuzz-"))
    config = DeviceConfig.from_fields(
        checkpoint=checkpoint,
        profile=ensure_profile(checkpoint, checkpoint.with_name("profile.json"), workdir),
        server=("127.0.0.1", port),
        rate_fps=20.0,
        limit=frames,
        thr_conf=1.0,
        split=1,
        continue_locally=False,
        status_interval_s=0,
        seed=seed,
    )
    sink = io.StringIO()
    rss = [_rss_mb(server_pid)]
    stop = time.monotonic() + seconds

    async def sample_rss() -> None:
        while time.monotonic() < stop:
            rss.append(_rss_mb(server_pid))
            await asyncio.sleep(0.5)

    device = asyncio.create_task(
        run_device(config, dataset_source("fashion-mnist:test", limit=frames), out=sink,
                   show_status=False)
    )  # fmt: skip
    await asyncio.sleep(0.5)  # the good device connects first
    tasks = [
        asyncio.create_task(_attacker(port, random.Random(rng.random()), corpus, stop))
        for _ in range(attackers)
    ]
    sampler = asyncio.create_task(sample_rss())
    connections = sum(await asyncio.gather(*tasks))
    await sampler
    summary = await asyncio.wait_for(device, seconds + 120)
    records = [json.loads(line) for line in sink.getvalue().splitlines()]
    answered = collections.Counter(r["frame"] for r in records)
    twice = sum(1 for n in answered.values() if n > 1)
    return {
        "socket_connections": connections,
        "frames": frames,
        "frames_lost": frames - len(answered),
        "frames_answered_twice": twice,
        "answered_by": summary.get("answered_by", {}),
        "rss_mb_start": round(rss[0], 1),
        "rss_mb_max": round(max(rss), 1),
    }


def socket_fuzz(
    checkpoint: Path, seconds: float, attackers: int = 8, seed: int = 0, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Fuzz a live server process for ``seconds`` while a good device streams through it."""
    from spinn.runtime.processes import free_port, wait_listening

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parents[1] / "spinn_server.py"),
             "--checkpoint", str(checkpoint), "--port", str(port), "--stats-interval", "0",
             "--grace", "1", "-q", *extra],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_listening(port, proc, 120)
            import uvloop

            result = uvloop.run(_socket_fuzz(checkpoint, port, proc.pid, seconds, attackers, seed))
            result["server_alive"] = proc.poll() is None
            result["rss_mb"] = round(_rss_mb(proc.pid), 1) if proc.poll() is None else None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            tail = log.read()[-3000:]
    result["server_exit"] = proc.returncode
    if not result["server_alive"]:
        result["server_log_tail"] = tail
    return result


def _main_atheris(args: argparse.Namespace) -> int:
    from bench.fuzz_atheris import TARGETS, run_atheris

    targets = args.targets.split(",") if args.targets else list(TARGETS)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        print(f"unknown target(s) {unknown}; choose from {list(TARGETS)}", file=sys.stderr)
        return 2
    print(f"atheris: {len(targets)} targets, {args.runs} inputs each", flush=True)
    result = run_atheris(args.runs, args.target_seconds, targets, args.log)
    short = {k: v for k, v in result["inputs_tried"].items() if v < args.runs}
    figures = {
        "engine": "atheris",
        "inputs_tried": result["inputs_tried"],
        "inputs_tried_min": min(result["inputs_tried"].values()),
        "targets_short_of_runs": sorted(short),
        "crashes": result["crashes"],
        "crash_inputs": result["crash_inputs"],
        "seconds": result["seconds"],
    }
    print(json.dumps(figures))
    return 0 if result["crashes"] == 0 and not short else 1


def main(argv: list[str] | None = None) -> int:
    from spinn.pretrained import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="in-process fuzzing time")
    p.add_argument("--socket-seconds", type=float, default=30.0, help="socket fuzzing time")
    p.add_argument("--attackers", type=int, default=8, help="concurrent hostile clients")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=("hypothesis", "atheris"),
        default="hypothesis",
        help="hypothesis: property-based, then the socket fuzz (default); atheris: "
        "coverage-guided (bench.fuzz_atheris), --runs inputs per target",
    )
    p.add_argument("--runs", type=int, default=1_000_000, help="atheris: inputs per target")
    p.add_argument(
        "--target-seconds", type=float, default=3600.0, help="atheris: most time per target"
    )
    p.add_argument("--targets", help="atheris: comma-separated targets (default: all)")
    p.add_argument("--log", type=Path, help="atheris: libFuzzer's output of each target")
    args = p.parse_args(argv)
    if args.engine == "atheris":
        return _main_atheris(args)
    print(f"in-process fuzzing for {args.seconds:.0f} s")
    tried = run_for(args.seconds)
    print(f"{tried} inputs, no crash, no escape other than ProtocolError")
    print(f"socket fuzzing for {args.socket_seconds:.0f} s with {args.attackers} attackers")
    sock = socket_fuzz(args.checkpoint, args.socket_seconds, args.attackers, args.seed)
    for key, value in sock.items():
        print(f"  {key}: {value}")
    figures = {
        "inputs_tried": tried + sock["socket_connections"],
        "frames_lost": sock["frames_lost"],
        "frames_answered_twice": sock["frames_answered_twice"],
        "server_alive": sock["server_alive"],
        "rss_mb": sock["rss_mb_max"],
        "rss_mb_start": sock["rss_mb_start"],
    }
    print(json.dumps(figures))
    ok = sock["server_alive"] and sock["frames_lost"] == 0 and sock["frames_answered_twice"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
