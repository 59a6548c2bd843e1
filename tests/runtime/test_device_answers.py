"""Every frame read gets one answer or one error record, whatever fails around it: the
source, the sink the answers go to, or a server whose RESULT cannot be true."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop

from protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    Result,
    Role,
    Welcome,
)
from spinn.model.checkpoint import load_checkpoint
from spinn.runtime.config import DeviceConfig
from spinn.runtime.device import DeviceError, SpinnDevice
from spinn.runtime.server_description import describe
from spinn.runtime.sources import ArraySource, Frame, SourceError
from tests.support.runtime import by_frame, noise_frames

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


class _Unplugged(ArraySource):
    """A camera that fails after `good` frames (the edge of the system)."""

    def __init__(self, good: int) -> None:
        rng = np.random.default_rng(0)
        super().__init__(rng.integers(0, 256, (good, 28, 28), dtype=np.uint8), name="unplugged")

    def __iter__(self) -> Iterator[Frame]:
        yield from super().__iter__()
        raise SourceError("camera unplugged")


def test_a_source_failing_mid_stream_still_answers_the_frames_read(checkpoint: Path) -> None:
    device = SpinnDevice(
        DeviceConfig.from_fields(
            checkpoint=checkpoint, server=None, max_in_flight=4, status_interval_s=0
        )
    )
    records: list[dict[str, Any]] = []
    with pytest.raises(SourceError, match="camera unplugged"):
        uvloop.run(device.run(_Unplugged(6), records.append))
    assert sorted(r["frame"] for r in records) == list(range(6))
    assert device.core.frames_read == 6 and device.core.tracker.in_flight == 0


def test_status_interval_zero_prints_the_final_line_only(checkpoint: Path) -> None:
    device = SpinnDevice(
        DeviceConfig.from_fields(checkpoint=checkpoint, server=None, status_interval_s=0)
    )
    lines: list[str] = []
    uvloop.run(device.run(noise_frames(30), lambda r: None, lines.append))
    assert len(lines) == 1


def _edge_server(
    checkpoint: Path,
    *,
    lie: bool = False,
    die: bool = False,
    classes: tuple[str, ...] = (),
    garbage: list[object] | None = None,
) -> Any:
    """A server at the system's edge: it welcomes any model, describing it as
    ``checkpoint``, and answers PINGs, nothing more. ``lie``: it answers every INFER from
    an exit and a class that do not exist. ``die``: it closes right after its WELCOME (a
    server crashing at each start). ``classes``: it names the classes so (a misdescription).
    ``garbage``: after its WELCOME it sends a frame that is no msgpack, and keeps the
    device's messages after it in this list."""
    model, meta = load_checkpoint(checkpoint)
    description = describe(
        model,
        meta,
        max_batch=1,
        max_frame_bytes=2**26,
        max_tensor_elements=2**24,
        max_in_flight=256,
        max_outstanding=1024,
        handshake_timeout_s=10.0,
        idle_timeout_s=60.0,
    )
    if classes:
        description = dataclasses.replace(description, classes=classes)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.SERVER)
        while data := await reader.read(1 << 16):
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, Hello):
                    welcome = Welcome(
                        event.version,
                        event.model_id,
                        event.weights_sha256,
                        event.codecs,
                        False,
                        description=description,
                    )
                    writer.write(conn.send(welcome))
                    if garbage is not None:
                        writer.write(b"\x00\x00\x00\x05\xc1garb")
                        garbage.append("sent")
                    if die:
                        await writer.drain()
                        writer.close()
                        return
                elif garbage is not None and garbage:
                    garbage.append(event)
                elif isinstance(event, Ping):
                    writer.write(conn.send(Pong.reply_to(event, time.time())))
                elif isinstance(event, Infer) and lie:
                    writer.write(conn.send(Result(event.request_id, 999, (123456,), (0.9,))))

    return handle


def _run_against(
    handler: Any, checkpoint: Path, frames: int, prepare: Any = None, **options: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run `frames` noise frames through a device connected to `handler` on loopback;
    `prepare(device)` runs before the stream starts. The records and the summary."""

    async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = DeviceConfig.from_fields(
            checkpoint=checkpoint, server=("127.0.0.1", port), status_interval_s=0, **options
        )
        device = SpinnDevice(config)
        if prepare is not None:
            prepare(device)
        records: list[dict[str, Any]] = []
        try:
            summary = await device.run(noise_frames(frames), records.append)
        finally:
            server.close()
        return records, summary

    return uvloop.run(main())


def test_an_impossible_result_is_refused_and_the_frame_finishes_locally(
    checkpoint: Path,
) -> None:
    records, summary = _run_against(
        _edge_server(checkpoint, lie=True), checkpoint, 8, split=1, thr_conf=1.0
    )
    by_frame(records, 8)
    assert {r["where"] for r in records} == {"fallback"}
    assert all(r["exit"] != 999 and 0 <= r["class"] < 10 for r in records)
    assert summary["answered_by"]["server"] == 0
    assert summary["server_connects"] == 1, summary  # refused, not a link dropped over it


def test_bad_data_from_the_server_is_answered_with_an_error_and_the_link_dropped(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[object] = []
    with caplog.at_level("INFO", logger="spinn.device"):
        records, summary = _run_against(
            _edge_server(checkpoint, garbage=seen), checkpoint, 20, rate_fps=20.0
        )
    by_frame(records, 20)  # every frame answered, on the device
    errors = [e for e in seen if isinstance(e, Error)]
    assert errors and errors[0].code is ErrorCode.PROTOCOL and errors[0].request_id is None
    assert "not valid msgpack" in errors[0].message
    assert any("bad data from server" in r.getMessage() for r in caplog.records)
    assert summary["server_connects"] >= 1


def test_a_closed_stdout_stops_the_run_with_a_clear_error(checkpoint: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "spinn_device.py"), "--checkpoint", str(checkpoint),
         "--dataset", "mnist", "--limit", "3000", "--device-only", "--no-status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("{")
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 2, err
    assert "cannot write the answers" in err and "Traceback" not in err


def test_a_server_that_drops_every_link_at_once_is_retried_with_backoff(
    checkpoint: Path,
) -> None:
    accepted = 0
    crashing = _edge_server(checkpoint, die=True)

    async def crash_looping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Restarted at once after each crash, again and again."""
        nonlocal accepted
        accepted += 1
        await crashing(reader, writer)

    records, summary = _run_against(crash_looping, checkpoint, 40, rate_fps=20.0)
    by_frame(records, 40)  # two seconds of frames, each answered on the device
    assert summary["answered_by"]["server"] == 0
    # Backoff from 0.1 s doubling: a handful of tries in two seconds, not a tight loop.
    assert 2 <= accepted <= 12, accepted


def test_the_end_of_a_run_does_not_wait_out_a_reconnect_backoff(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def grown_backoff(device: SpinnDevice) -> None:
        for _ in range(6):  # as after an outage at start-up
            device.core.rotation.backoff.next_delay()

    # The edge server never answers a request: the link ends unanswered.
    with caplog.at_level("INFO", logger="spinn.device"):
        _run_against(_edge_server(checkpoint), checkpoint, 3, grown_backoff, split=0)
    assert not [r for r in caplog.records if "next try" in r.getMessage()]


def test_a_server_describing_another_model_is_refused_naming_the_difference(
    checkpoint: Path,
) -> None:
    # PROTOCOL.md §5.12: same model id and weights, but other class names in WELCOME.
    wrong = tuple(f"not-c{i}" for i in range(10))
    with pytest.raises(DeviceError, match=r"classes: server \['not-c0'"):
        _run_against(_edge_server(checkpoint, classes=wrong), checkpoint, 3, split=1)
