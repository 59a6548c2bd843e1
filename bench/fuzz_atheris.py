"""Coverage-guided fuzzing (atheris, libFuzzer) of every decoder that reads peer bytes.

``python -m bench.fuzz --engine atheris [--runs 1000000]`` runs each target below in a
process of its own (libFuzzer ends the process when it is done), seeded with the frames of
a real device–server session recorded on loopback (``bench/fuzz_corpus/session``;
``python -m bench.fuzz_atheris --record`` records it again). Targets:

* ``frames``: the frame decoder (``protocol.framing.FrameDecoder``), fed in pieces;
* ``server_fresh`` / ``device_fresh``: a ``protocol.Connection`` in either role, from
  its first byte (the device has sent its HELLO);
* ``server_welcomed`` / ``device_welcomed``: the same after a completed handshake (the
  device has also sent the session's INFERs, CANCELs and PINGs), so that INFER, CANCEL,
  RESULT, PONG and ERROR bodies are reached; the server's INFER tensors are unpacked too;
* ``tensor_<codec>``: ``protocol.packing.unpack`` for every codec (``sparse_int8_zdict``
  with the shipped model's dictionaries), from a msgpack tensor map as INFER carries it.

The rule (PROTOCOL.md §7.4, STYLE.md): only ``ProtocolError`` may escape, and memory stays
bounded (libFuzzer's ``-rss_limit_mb``). An input that breaks it is a crash: libFuzzer
saves it, and ``bench.fuzz`` copies it into ``tests/fuzz_regressions/<target>/``, which
``tests/protocol/test_fuzz_regressions.py`` replays through the same target functions (plain
Python: the test suite needs no atheris).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from protocol import (
    NEED_DATA,
    Bye,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Infer,
    ProtocolError,
    Role,
    pack,
    unpack,
)
from protocol.dictionaries import ZstdDictionaries
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import Message, _decode_tensor, decode_message
from protocol.packing import IMAGE_CODEC, KNOWN_CODECS, LOSSY_CODEC

__all__ = [
    "CORPUS",
    "REGRESSIONS",
    "SESSION_KINDS",
    "TARGETS",
    "record_session",
    "run_atheris",
    "seeds",
    "session_frames",
    "session_kinds",
]

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "bench" / "fuzz_corpus" / "session"
"""The recorded session: ``device_to_server.bin`` and ``server_to_device.bin``."""
SESSION_KINDS = frozenset(
    {"Hello", "Welcome", "Infer", "Result", "Cancel", "Error", "Ping", "Pong", "Bye"}
)
"""The message kinds the recorded session holds (``record_session``), so that the seeds
reach every body a peer may send."""
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
"""Crash inputs, one folder per target, replayed by the test suite."""

CONFIG = ConnectionConfig(max_frame_size=1 << 18, max_tensor_elements=1 << 16)
"""Limits above every frame of the session and low enough to keep each input cheap."""
_RSS_LIMIT_MB = 2048


# -- the recorded session ------------------------------------------------------------------


def _split_frames(stream: bytes) -> list[bytes]:
    """The frames of a recorded stream, each with its 4-byte header."""
    decoder = FrameDecoder(1 << 26)
    decoder.receive_data(stream)
    frames = []
    while (body := decoder.next_frame()) is not None:
        frames.append(encode_frame(bytes(body)))
        body.release()
    return frames


@functools.cache
def session_frames() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(device → server frames, server → device frames) of the recorded session."""
    up = (CORPUS / "device_to_server.bin").read_bytes()
    down = (CORPUS / "server_to_device.bin").read_bytes()
    return tuple(_split_frames(up)), tuple(_split_frames(down))


def _message(frame: bytes) -> Message:
    return decode_message(msgpack.unpackb(frame[4:], use_list=False, raw=False))


@functools.cache
def _dictionaries() -> ZstdDictionaries:
    """The shipped model's zstd dictionaries, read without torch (the fuzzing processes
    load nothing they do not fuzz)."""
    return ZstdDictionaries.from_bytes((ROOT / "models" / "default" / "model.zdict").read_bytes())


# -- targets: plain functions of the input bytes --------------------------------------------


def _drain(conn: Connection, data: bytes, on_event: Callable[[object], None]) -> None:
    # In two pieces (where the first byte says), then the end of the stream: a frame split
    # across reads and a stream cut inside a frame are both reached.
    cut = data[0] * len(data) // 256 if data else 0
    # An empty read is the end of the stream: only the last piece may be empty.
    for piece in [p for p in (data[:cut], data[cut:]) if p] + [b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            on_event(event)


def _ignore(_event: object) -> None:
    return None


def _unpack_infer(event: object) -> None:
    # What the server does with an INFER that the state machine accepted.
    if isinstance(event, Infer):
        with contextlib.suppress(ProtocolError):
            unpack(event.tensor, CONFIG.max_tensor_elements, _dictionaries())


def _server(welcomed: bool) -> Connection:
    up, down = session_frames()
    conn = Connection(Role.SERVER, CONFIG)
    if welcomed:
        conn.receive_data(up[0])
        conn.next_event()  # the HELLO
        conn.send(_message(down[0]))  # the WELCOME
    return conn


@functools.cache
def _device_sends() -> tuple[Message, ...]:
    """What the recorded device sent after HELLO, so that the session's answers are
    expected: the same request ids and PINGs, each INFER with a one-element tensor (only
    its id matters to the device's state machine, and encoding it is cheap). BYE is left
    out: answers may follow it."""
    up, _ = session_frames()
    tiny = pack(np.zeros((1, 1), np.float32), "sparse_int8")  # a codec of the session
    out: list[Message] = []
    for message in map(_message, up[1:]):
        if isinstance(message, Infer):
            out.append(Infer(message.request_id, message.split, message.thr_conf, tiny))
        elif not isinstance(message, Bye):
            out.append(message)
    return tuple(out)


def _build_device(welcomed: bool) -> Connection:
    up, down = session_frames()
    conn = Connection(Role.DEVICE, CONFIG)
    conn.send(_message(up[0]))  # the HELLO
    if welcomed:
        conn.receive_data(down[0])
        conn.next_event()  # the WELCOME
        for message in _device_sends():
            conn.send(message)
    return conn


@functools.cache
def _welcomed_device_state() -> bytes:
    return pickle.dumps(_build_device(True), protocol=pickle.HIGHEST_PROTOCOL)


def _device(welcomed: bool) -> Connection:
    """A device's connection; the welcomed one is a copy of one built once (building it
    sends some fifty messages, which would cost more than the input it is fed)."""
    if not welcomed:
        return _build_device(False)
    conn = pickle.loads(_welcomed_device_state())
    assert isinstance(conn, Connection)
    return conn


def target_frames(data: bytes) -> None:
    """The frame decoder: buffering bounded by one frame plus the last chunk."""
    limit = 1 << 12
    decoder = FrameDecoder(limit)
    # Pieces of 1 to 24 736 bytes; a real frame's first byte (0) gives the largest.
    step = 1 + 97 * (data[0] ^ 0xFF) if data else 1
    with contextlib.suppress(ProtocolError):
        for i in range(0, len(data) + 1, step):
            chunk = data[i : i + step]
            decoder.receive_data(chunk)
            if decoder.buffered > 4 + limit + step:
                raise AssertionError(f"decoder buffers {decoder.buffered} bytes")
            while (body := decoder.next_frame()) is not None:
                body.release()


def _connection_target(make: Callable[[], Connection], on_event: Callable[[object], None]):
    def target(data: bytes) -> None:
        conn = make()
        with contextlib.suppress(ProtocolError):
            _drain(conn, data, on_event)

    return target


def _tensor_target(codec: str) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:  # not msgpack: the frame layer's business, not the unpacker's
            return
        if not isinstance(obj, dict):
            return
        obj["codec"] = codec
        with contextlib.suppress(ProtocolError):
            tensor = _decode_tensor(obj)
            out = unpack(tensor, CONFIG.max_tensor_elements, _dictionaries())
            if tuple(out.shape) != tuple(tensor.shape):
                raise AssertionError(f"unpacked shape {out.shape} != declared {tensor.shape}")

    return target


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": target_frames,
    "server_fresh": _connection_target(functools.partial(_server, False), _unpack_infer),
    "server_welcomed": _connection_target(functools.partial(_server, True), _unpack_infer),
    "device_fresh": _connection_target(functools.partial(_device, False), _ignore),
    "device_welcomed": _connection_target(functools.partial(_device, True), _ignore),
    **{f"tensor_{codec}": _tensor_target(codec) for codec in KNOWN_CODECS},
}
"""Every target by name: a function of the input bytes that lets only ProtocolError out."""


# -- seeds ----------------------------------------------------------------------------------


def _tensor_map(tensor: Any) -> bytes:
    return msgpack.packb(
        {
            "codec": tensor.codec,
            "compressed": tensor.compressed,
            "shape": list(tensor.shape),
            "scale": tensor.scale,
            "zero_point": tensor.zero_point,
            "payload": bytes(tensor.payload),
        },
        use_bin_type=True,
    )


_SEED_BYTES = 16384
"""Longest seed made of several frames: longer inputs only slow each run."""


def _joined(frames: tuple[bytes, ...]) -> bytes:
    """The first frames, in order, up to ``_SEED_BYTES`` (at least one)."""
    out = bytearray()
    for f in frames:
        if out and len(out) + len(f) > _SEED_BYTES:
            break
        out += f
    return bytes(out)


def seeds(target: str) -> list[bytes]:
    """The seed inputs of ``target``, all from the recorded session."""
    up, down = session_frames()
    if target == "frames":
        return [_joined(up), _joined(down), *up[:8], *down[:8]]
    if target == "server_fresh":
        return [_joined(up), up[0], *(up[0] + f for f in up[1:12])]
    if target == "server_welcomed":
        return [_joined(up[1:]), *up[1:16]]
    if target == "device_fresh":
        return [_joined(down), down[0], *(down[0] + f for f in down[1:12])]
    if target == "device_welcomed":
        return [_joined(down[1:]), *down[1:16]]
    codec = target.removeprefix("tensor_")
    out = []
    infers = [m for m in map(_message, up) if isinstance(m, Infer)]
    for i, infer in enumerate(infers[:6]):
        activation = unpack(infer.tensor, 1 << 24, _dictionaries())
        for compress in (False, True):
            options: dict[str, Any] = {"dictionaries": _dictionaries(), "table": infer.split}
            array = activation
            if codec == IMAGE_CODEC:
                # Pixels: the session's activations, scaled into 0..255 as uint8.
                scale = 255.0 / max(float(activation.max()), 1e-6)
                array = (activation * scale).astype(np.uint8)
                options = {}
            elif codec == LOSSY_CODEC:
                options = {"bits": (2, 4, 8)[i % 3]}
            out.append(_tensor_map(pack(array, codec, compress, **options)))
    return out


# -- recording a session ----------------------------------------------------------------------


async def _record(frames: int) -> tuple[bytes, bytes]:
    from spinn.runtime.config import DeviceConfig, ServerConfig
    from spinn.runtime.device import SpinnDevice
    from spinn.runtime.server import SpinnServer
    from spinn.runtime.sources import dataset_source

    server = SpinnServer(ServerConfig.from_fields(port=0, stats_interval_s=0, workers=1))
    await server.start()
    up, down = bytearray(), bytearray()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tape: bytearray):
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                tape += data
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(pipe(reader, up_writer, up), pipe(up_reader, writer, down))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    # Every frame offloaded at a few splits, continued locally (so some are cancelled),
    # with PINGs and bandwidth probes: the kinds of frame a real session carries.
    device = SpinnDevice(
        DeviceConfig.from_fields(
            server=("127.0.0.1", port),
            thr_conf=1.0,
            split=2,
            rate_fps=40.0,
            status_interval_s=0,
            probe_bytes=2048,
        )  # fmt: skip
    )
    await device.run(dataset_source("fashion-mnist:test", limit=frames), lambda _r: None)
    proxy.close()
    await server.close()
    return bytes(up), bytes(down)


def session_kinds(up: bytes, down: bytes) -> set[str]:
    """The names of the message kinds in a recorded session's two streams."""
    return {type(_message(f)).__name__ for f in _split_frames(up) + _split_frames(down)}


def record_session(frames: int = 40, tries: int = 10) -> None:
    """Record a real session on loopback into ``CORPUS``: again (up to ``tries`` times)
    until it holds every kind of ``SESSION_KINDS``. Whether a CANCEL reaches a request the
    server still holds, and so is answered with ERROR, depends on timing: one recording in
    a few has none."""
    import uvloop

    for _ in range(tries):
        up, down = uvloop.run(_record(frames))
        missing = SESSION_KINDS - session_kinds(up, down)
        if not missing:
            break
        print(f"recorded a session without {', '.join(sorted(missing))}: again", flush=True)
    else:
        raise SystemExit(f"no session with every kind of frame in {tries} recordings")
    CORPUS.mkdir(parents=True, exist_ok=True)
    (CORPUS / "device_to_server.bin").write_bytes(up)
    (CORPUS / "server_to_device.bin").write_bytes(down)
    print(f"recorded {len(up)} bytes up, {len(down)} bytes down into {CORPUS}")


# -- the driver ---------------------------------------------------------------------------


_BOOT = """
import sys, atheris
# Coverage of the protocol package only: it holds every decoder of peer bytes.
with atheris.instrument_imports(include=["protocol"]):
    import protocol, protocol.connection, protocol.dictionaries, protocol.framing
    import protocol.messages, protocol.packing, protocol.state, protocol.auth
from bench.fuzz_atheris import _child
_child(sys.argv[1], sys.argv[2:])
"""
"""A fuzzing process: instrument the protocol package as it is imported, then fuzz."""


def _child(target: str, libfuzzer_args: list[str]) -> None:
    """Run ``target`` under atheris in this process (libFuzzer exits it when done)."""
    import atheris

    fn = TARGETS[target]
    session_frames()
    _dictionaries()
    _welcomed_device_state()
    atheris.Setup([sys.argv[0], *libfuzzer_args], fn)
    atheris.Fuzz()


_DONE = re.compile(r"Done (\d+) runs")
_STAT = re.compile(r"#(\d+)\s+(?:NEW|REDUCE|pulse|INITED|DONE)")


def run_atheris(
    runs: int, max_seconds: float, targets: list[str] | None = None, log: Path | None = None
) -> dict[str, Any]:
    """Every target for ``runs`` inputs (or ``max_seconds``), one process each."""
    names = targets or list(TARGETS)
    tried: dict[str, int] = {}
    crashes: list[str] = []
    seconds: dict[str, float] = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"spinn-fuzz-{name}-") as tmp:
            corpus = Path(tmp) / "corpus"
            artifacts = Path(tmp) / "artifacts"
            corpus.mkdir()
            artifacts.mkdir()
            for seed in seeds(name):
                (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
            longest = max(len(s) for s in seeds(name))
            args = [
                f"-runs={runs}",
                f"-max_total_time={int(max_seconds)}",
                f"-rss_limit_mb={_RSS_LIMIT_MB}",
                f"-max_len={min(1 << 16, max(4096, 2 * longest))}",
                f"-artifact_prefix={artifacts}/",
                "-print_final_stats=1",
                "-seed=1",
                str(corpus),
            ]
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-c", _BOOT, name, *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=max_seconds + 600,
            )
            seconds[name] = round(time.monotonic() - t0, 1)
            out = proc.stderr + proc.stdout
            if log is not None:
                with log.open("a") as f:
                    f.write(f"== {name} (exit {proc.returncode})\n{out[-20000:]}\n")
            done = _DONE.findall(out)
            stats = _STAT.findall(out)
            tried[name] = int(done[-1]) if done else (int(stats[-1]) if stats else 0)
            for artifact in sorted(artifacts.iterdir()):
                keep = REGRESSIONS / name
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(artifact, keep / artifact.name)
                crashes.append(f"{name}/{artifact.name}")
            if proc.returncode != 0 and not list(artifacts.iterdir()):
                crashes.append(f"{name}: exit {proc.returncode} without an artifact")
            print(
                f"  {name}: {tried[name]} inputs in {seconds[name]} s, exit {proc.returncode}",
                flush=True,
            )
    return {"inputs_tried": tried, "crashes": len(crashes), "crash_inputs": crashes,
            "seconds": seconds}  # fmt: skip


def iter_regressions() -> Iterator[tuple[str, Path]]:
    """(target, input file) of every saved crash input."""
    if not REGRESSIONS.is_dir():
        return
    for folder in sorted(REGRESSIONS.iterdir()):
        if folder.is_dir() and folder.name in TARGETS:
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    yield folder.name, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_atheris", description=__doc__)
    p.add_argument("--record", action="store_true", help="record the session corpus again")
    p.add_argument("--frames", type=int, default=40, help="frames of the recorded session")
    args = p.parse_args(argv)
    if args.record:
        record_session(args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
